//! The framing guard as hyper drives it: reads of fuzzer-chosen sizes (the
//! zero-copy path for large buffers, the staged path for small ones), the
//! socket returning fuzzer-chosen pieces and `Pending`s. Whatever the reads,
//! hyper gets exactly what the guard's scanner lets through for the bytes
//! the socket delivered, then the stand-in of a refusal or, at EOF, what was
//! held back: never a byte the caller did not send, never one out of order.
//! The first 8 bytes seed the read pattern; the rest is the caller's stream.
#![no_main]

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, ReadBuf};
use zuora_gateway::server::h1_guard::{H1Guard, HEAD_LIMIT, Outcome, Scanner, Verdict};

/// xorshift64*: the read pattern, reproducible from the input.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The caller's socket: `input` in pieces, with `Pending`s; every delivered
/// piece (empty: EOF) is logged.
struct Socket {
    input: Vec<u8>,
    at: usize,
    rng: Rng,
    log: Rc<RefCell<Log>>,
}

#[derive(Default)]
struct Log {
    delivered: Vec<Vec<u8>>,
    pendings: usize,
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.rng.below(8) == 0 {
            this.log.borrow_mut().pendings += 1;
            return Poll::Pending;
        }
        let left = this.input.len() - this.at;
        let most = [1, 7, 64, 1500, usize::MAX][this.rng.below(5)];
        let n = left.min(buf.remaining()).min(most);
        let piece = &this.input[this.at..this.at + n];
        buf.put_slice(piece);
        this.log.borrow_mut().delivered.push(piece.to_vec());
        this.at += n;
        Poll::Ready(Ok(()))
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (seed, input) = data.split_at(8);
    let mut rng = Rng(u64::from_le_bytes(seed.try_into().unwrap_or_default()) | 1);
    let head_limit = if rng.below(4) == 0 {
        16 + rng.below(4096)
    } else {
        HEAD_LIMIT
    };
    let log = Rc::new(RefCell::new(Log::default()));
    let socket = Socket {
        input: input.to_vec(),
        at: 0,
        rng: Rng(rng.next() | 1),
        log: log.clone(),
    };
    let verdict = Arc::new(Verdict::default());
    let mut guard = H1Guard::new(socket, verdict.clone(), head_limit);
    let mut cx = Context::from_waker(Waker::noop());

    // hyper's side: buffers from 1 byte to well over the guard's 8 KiB read.
    let mut out = Vec::new();
    let (mut eof, mut stopped) = (false, false);
    for _ in 0..100_000 {
        let room = [1, 24, 1 + rng.below(8191), 8192, 8192 + rng.below(20_000)][rng.below(5)];
        let mut storage = vec![0u8; room];
        let mut rb = ReadBuf::new(&mut storage);
        let pendings = log.borrow().pendings;
        match Pin::new(&mut guard).poll_read(&mut cx, &mut rb) {
            Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                eof = true;
                break;
            }
            Poll::Ready(Ok(())) => out.extend_from_slice(rb.filled()),
            Poll::Ready(Err(e)) => panic!("read error: {e}"),
            Poll::Pending if log.borrow().pendings > pendings => {}
            // Pending without the socket pending: the guard stopped reading.
            Poll::Pending => {
                stopped = true;
                break;
            }
        }
    }

    if eof {
        assert_eq!(
            log.borrow().delivered.last().map(Vec::len),
            Some(0),
            "EOF reaches hyper only after the caller closed"
        );
    }

    // The reference: the scanner fed the very pieces the socket delivered.
    let mut scanner = Scanner::with_head_limit(head_limit);
    let mut expected = BytesMut::new();
    let mut refused = None;
    for piece in log.borrow().delivered.iter().filter(|p| !p.is_empty()) {
        match scanner.feed(piece, &mut expected) {
            Outcome::Continue => {}
            Outcome::RefusedHead(v) => {
                refused = Some((true, Some(v)));
                break;
            }
            Outcome::RefusedBody(_) => {
                refused = Some((false, None));
                break;
            }
        }
    }
    assert!(
        input.starts_with(&expected),
        "the scanner only lets caller bytes through"
    );
    match refused {
        None => {
            // Not refused: the guard reached EOF and then also passed what it
            // held back (a continuation of the input); it never stops reading
            // on its own.
            assert!(!stopped, "the guard stopped reading without a refusal");
            assert!(
                out.starts_with(&expected),
                "hyper got what the scanner let through"
            );
            assert!(
                input.starts_with(&out),
                "and then only caller bytes, in order"
            );
            assert_eq!(verdict.refused(), None);
        }
        Some((head, v)) => {
            assert!(!eof, "a refused connection is not read to EOF");
            assert!(
                out.starts_with(&expected),
                "hyper got what preceded the refusal"
            );
            let stand_in = &out[expected.len()..];
            if head {
                assert_eq!(verdict.refused(), v);
                assert!(
                    stand_in.starts_with(b"GET /%00gateway-refused-framing HTTP/1.1\r\n"),
                    "a refused head is replaced by the stand-in request"
                );
            } else {
                assert_eq!(
                    stand_in, b"\rX",
                    "a refused body line is replaced by the poison"
                );
            }
        }
    }
});
