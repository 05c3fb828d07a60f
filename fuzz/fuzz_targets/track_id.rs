//! The `Zuora-Track-Id` validator: no panic on any header value, and an
//! accepted value is short, printable ASCII (no CR/LF or other controls) and
//! free of the characters Zuora refuses.
#![no_main]

use http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use zuora_gateway::layers::track_id::{MAX_TRACK_ID_LEN, validate};

fuzz_target!(|data: &[u8]| {
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return;
    };
    if validate(&value).is_ok() {
        assert!(data.len() <= MAX_TRACK_ID_LEN);
        assert!(data.iter().all(|b| (0x20..0x7f).contains(b)), "{data:?}");
        assert!(!data.iter().any(|b| b":;\"'".contains(b)), "{data:?}");
    }
});
