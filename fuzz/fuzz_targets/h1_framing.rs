//! The HTTP/1.1 framing guard: no panic, and hyper only ever sees a prefix of
//! what the caller sent (the guard holds back or refuses; it never invents or
//! reorders caller bytes). The first byte picks how the input is split.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use zuora_gateway::server::h1_guard::{Outcome, Scanner};

fuzz_target!(|data: &[u8]| {
    let Some((&step, input)) = data.split_first() else {
        return;
    };
    let step = usize::from(step % 32) + 1;
    let mut scanner = Scanner::default();
    let mut out = BytesMut::new();
    for piece in input.chunks(step) {
        match scanner.feed(piece, &mut out) {
            Outcome::Continue => {}
            Outcome::RefusedHead(_) | Outcome::RefusedBody(_) => break,
        }
    }
    assert!(
        input.starts_with(&out),
        "hyper must see a prefix of the input"
    );
});
