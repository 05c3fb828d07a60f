//! Bounded gzip decoding: never more than the limit, never a panic, and only
//! the two documented errors.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zuora_gateway::compression::gunzip_bounded;
use zuora_gateway::error::GatewayError;

const LIMIT: u64 = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    match gunzip_bounded(data, LIMIT) {
        Ok(out) => assert!(out.len() as u64 <= LIMIT),
        Err(GatewayError::InvalidValue(_)) | Err(GatewayError::PayloadTooLarge { .. }) => {}
        Err(other) => panic!("unexpected error {other:?}"),
    }
});
