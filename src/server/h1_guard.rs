//! A strict HTTP/1.1 framing guard in front of hyper's parser.
//!
//! hyper handles the classic smuggling inputs safely but leniently: with both
//! `Content-Length` and `Transfer-Encoding` it uses the chunked framing, drops
//! `Content-Length` and closes the connection after the response (RFC 9112
//! §6.1), and it accepts bare LF as a line terminator (RFC 9112 §2.2 "MAY").
//! Both are sound inside hyper but are exactly where a front proxy and the
//! gateway can disagree about where a request ends, and neither is visible to
//! a service: by then hyper has removed `Content-Length` and normalised the
//! lines. So the raw bytes are checked here, before hyper reads them:
//!
//! - a request head is held back until it is complete, then refused if it has
//!   both `Content-Length` and `Transfer-Encoding`, a bare LF or bare CR, or an
//!   obs-fold continuation line. A refused head is replaced by a fixed internal
//!   request ([`REFUSAL_TARGET`], `Connection: close`) that the server answers
//!   with a Zuora-shaped 400; nothing of the refused request or anything after
//!   it on the connection reaches hyper.
//! - chunked bodies are followed chunk by chunk: a chunk-size line must be hex
//!   digits ended by CRLF (extensions without quotes), chunk data must end in
//!   CRLF, trailers must use CRLF. Size and trailer lines are held back until
//!   checked; a bad one is replaced by bytes hyper's decoder refuses, so the
//!   body fails, the caller gets a 400 and nothing more is read.
//!
//! With [`H1Guard::detect_h2c`] the guard also tells HTTP/1.1 from HTTP/2
//! prior knowledge on the connection's first bytes (the server needs no
//! version sniff of its own, and the first read of an HTTP/1 connection goes
//! straight into hyper's buffer like any other).
//!
//! The guard hands over to hyper's own parser only where that cannot switch
//! the checks off for a later request: HTTP/2 prior knowledge, and inputs
//! hyper refuses and closes the connection on (heads over the limit, bad
//! `Content-Length` / `Transfer-Encoding` values, lines without a colon). It
//! never accepts something hyper would refuse.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use memchr::{memchr, memchr2};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Heads larger than the limit are passed to hyper unchecked, and hyper
/// refuses them (431). The server uses hyper's own read-buffer limit, so the
/// guard never holds more per connection than hyper would; this is the
/// default for [`Scanner::default`].
pub const HEAD_LIMIT: usize = 64 * 1024;

/// The request target of the internal request that stands in for a refused
/// head. It fails `check_path` (encoded NUL), so even on its own it can only
/// ever be a 400.
pub const REFUSAL_TARGET: &str = "/%00gateway-refused-framing";

const REFUSAL_REQUEST: &[u8] =
    b"GET /%00gateway-refused-framing HTTP/1.1\r\nhost: gateway.invalid\r\nconnection: close\r\n\r\n";

/// Fed to hyper in place of a refused chunked-body line.
const POISON: &[u8] = b"\rX";

/// The longest chunk-size or trailer line held back.
const MAX_CHUNK_LINE: usize = 8 * 1024;

/// How much is read from the caller at a time when the guard reads into its
/// own buffer.
const READ_SIZE: usize = 8192;

/// hyper's buffer is read into directly only when it has at least this much
/// room, so the guard never reads in small pieces. It is the first read
/// buffer of our hyper (`INIT_READ_BUF_SIZE` in `crates/hyper`, 2 KiB): with
/// `READ_SIZE` here, no fresh connection's read qualified, and every head was
/// staged and copied through a buffer of the guard's own, kept per connection.
const DIRECT_READ_MIN: usize = 2048;

/// A held head's allocation is kept for the next one up to this capacity.
const KEEP_LINE_CAPACITY: usize = 8 * 1024;

/// Where the [`Scanner`] puts the bytes that may go to hyper.
trait Out {
    fn put(&mut self, bytes: &[u8]);
}

impl Out for BytesMut {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// Counts the bytes instead of copying them. Only correct when the scanner
/// held nothing before the input: then what it passes is always a prefix of
/// the input (it holds back or refuses a suffix, it never reorders), so the
/// count says how much of the input, in place, may go to hyper.
struct Passed(usize);

impl Out for Passed {
    fn put(&mut self, bytes: &[u8]) {
        self.0 += bytes.len();
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Violation {
    /// Both `Content-Length` and `Transfer-Encoding`.
    LengthAndChunked = 1,
    /// A line ended by LF alone.
    BareLf = 2,
    /// A CR not followed by LF.
    BareCr = 3,
    /// A header line starting with whitespace (obs-fold).
    ObsFold = 4,
    /// A malformed chunk-size line, chunk end or trailer.
    ChunkFraming = 5,
}

impl Violation {
    /// A message for the caller.
    pub fn message(self) -> &'static str {
        match self {
            Violation::LengthAndChunked => {
                "ambiguous request framing: both Content-Length and Transfer-Encoding are present"
            }
            Violation::BareLf => "request lines must end with CRLF (bare LF found)",
            Violation::BareCr => "bare CR in the request head",
            Violation::ObsFold => "obsolete header line folding is not accepted",
            Violation::ChunkFraming => "malformed chunked body framing",
        }
    }

    fn from_u8(v: u8) -> Option<Violation> {
        Some(match v {
            1 => Violation::LengthAndChunked,
            2 => Violation::BareLf,
            3 => Violation::BareCr,
            4 => Violation::ObsFold,
            5 => Violation::ChunkFraming,
            _ => return None,
        })
    }
}

/// What a guard and the server share about one connection: the head the
/// guard refused, which protocol its first bytes chose (see
/// [`H1Guard::detect_h2c`]), and the counts that tell when hyper's HTTP/1
/// connection is idle between requests (see [`Verdict::idle`]).
#[derive(Debug, Default)]
pub struct Verdict {
    refused: AtomicU8,
    flags: AtomicU8,
    /// Heads passed to hyper, published by the guard while it stands at a
    /// message boundary; [`NOT_AT_BOUNDARY`] otherwise.
    heads: AtomicU32,
    /// Requests that reached the service.
    calls: AtomicU32,
    /// Responses hyper is done with (their body dropped).
    responses: AtomicU32,
    /// `responses` as it was when the guard last saw a completed flush.
    flushed: AtomicU32,
    /// Request bodies not yet read to their end.
    open_bodies: AtomicU32,
}

/// [`Verdict`] flag: the first bytes are not the HTTP/2 preface.
const HTTP1: u8 = 1;
/// [`Verdict`] flag: the first bytes are the HTTP/2 preface.
const H2C: u8 = 2;
/// [`Verdict`] flag: hyper's connection can never be given up between
/// requests (a request body was dropped unread, so hyper may still hold
/// part of it). A guard that stopped checking says so through
/// [`NOT_AT_BOUNDARY`] instead.
const PINNED: u8 = 4;

/// [`Verdict::heads`] while the guard holds or stages bytes, or has stopped.
const NOT_AT_BOUNDARY: u32 = u32::MAX;

impl Verdict {
    /// The head violation that made the guard substitute [`REFUSAL_TARGET`].
    pub fn refused(&self) -> Option<Violation> {
        Violation::from_u8(self.refused.load(Ordering::Acquire))
    }
    fn set(&self, v: Violation) {
        self.refused.store(v as u8, Ordering::Release);
    }
    fn flag(&self, flag: u8) {
        self.flags.fetch_or(flag, Ordering::Relaxed);
    }
    fn has(&self, flag: u8) -> bool {
        self.flags.load(Ordering::Relaxed) & flag != 0
    }
    /// Notes that a request of the connection reached the service (called
    /// from the connection's task only).
    pub fn note_request(&self) {
        let calls = self.calls.load(Ordering::Relaxed);
        self.calls.store(calls.wrapping_add(1), Ordering::Relaxed);
    }
    /// Whether a request of the connection reached the service.
    pub fn request_seen(&self) -> bool {
        self.calls.load(Ordering::Relaxed) != 0
    }
    /// Notes that hyper is done with a response (its body was dropped:
    /// written to its end, or abandoned with the connection).
    pub fn note_response_done(&self) {
        self.responses.fetch_add(1, Ordering::Relaxed);
    }
    /// Notes a request body that is not empty: until
    /// [`Verdict::note_body_read`], hyper may hold part of it.
    pub fn note_body_open(&self) {
        self.open_bodies.fetch_add(1, Ordering::Relaxed);
    }
    /// A body noted by [`Verdict::note_body_open`] was read to its end.
    pub fn note_body_read(&self) {
        self.open_bodies.fetch_sub(1, Ordering::Relaxed);
    }
    /// A body noted by [`Verdict::note_body_open`] was dropped unread:
    /// hyper discards the rest itself, and nothing tells when it is done,
    /// so the connection keeps its hyper connection for good.
    pub fn note_body_dropped(&self) {
        self.flag(PINNED);
    }
    /// The number of requests so far if hyper's HTTP/1 connection is idle:
    /// every head the guard passed reached the service, every response was
    /// written and flushed, every request body was read to its end, and the
    /// guard holds nothing. hyper then holds nothing but its (empty) buffers,
    /// and the connection can be given up and built again at the caller's
    /// next bytes with nothing lost.
    pub fn idle(&self) -> Option<u32> {
        let calls = self.calls.load(Ordering::Relaxed);
        let idle = !self.has(PINNED)
            && self.open_bodies.load(Ordering::Relaxed) == 0
            && self.heads.load(Ordering::Relaxed) == calls
            && self.responses.load(Ordering::Relaxed) == calls
            && self.flushed.load(Ordering::Relaxed) == calls
            && calls != 0;
        idle.then_some(calls)
    }
    /// Whether the connection's first bytes were the HTTP/2 preface: the
    /// guard stopped reading for the HTTP/1 connection, which must be given
    /// up for an HTTP/2 one (see [`H1Guard::resume_after_preface`]).
    pub fn is_h2c(&self) -> bool {
        self.has(H2C)
    }
    /// Whether the guard has not yet seen enough bytes to choose between
    /// HTTP/1 and HTTP/2 (always `false` without detection).
    pub fn undecided(&self) -> bool {
        !self.has(HTTP1 | H2C)
    }
}

/// HTTP/2's connection preface (RFC 9113 §3.4), sent first by a client
/// with prior knowledge.
pub const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Where a guard is in telling HTTP/1 from HTTP/2 prior knowledge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Detect {
    /// Decided (or never asked): a plain HTTP/1 guard.
    Done,
    /// This many bytes, all a prefix of the preface, are held raw in `ready`.
    Matching(u8),
    /// The preface was seen: nothing is read until the server takes the
    /// connection over for HTTP/2.
    HandedOff,
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Holding back a head until it is complete.
    Head,
    /// Passing `n` more body bytes.
    Length(u64),
    /// Reading a chunk-size line.
    ChunkSize,
    /// Passing `n` more chunk data bytes.
    ChunkData(u64),
    /// Expecting the CRLF after chunk data (`true`: CR seen).
    ChunkEnd(bool),
    /// Reading trailer lines after the last chunk.
    Trailers,
    /// Not checking any more; everything goes to hyper as is.
    Passthrough,
    /// A body violation was reported; the connection is finished.
    Failed,
}

/// What [`Scanner::feed`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Keep going.
    Continue,
    /// A head was refused: stop reading from the caller.
    RefusedHead(Violation),
    /// A body was refused: fail the read.
    RefusedBody(Violation),
}

/// The framing state machine (no I/O; fuzzed on its own).
#[derive(Debug)]
pub struct Scanner {
    state: State,
    /// The head held back, or the current chunk-size / trailer line.
    line: Vec<u8>,
    /// Where the current head line starts in `line`.
    head_line_start: usize,
    /// Whether the head has a non-empty line yet (the request line).
    head_seen_line: bool,
    /// Largest head held back.
    head_limit: usize,
    /// Complete heads passed on (wrapping).
    heads: u32,
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner {
            state: State::Head,
            line: Vec::new(),
            head_line_start: 0,
            head_seen_line: false,
            head_limit: HEAD_LIMIT,
            heads: 0,
        }
    }
}

impl Scanner {
    /// A scanner that holds back at most `head_limit` bytes of a head.
    pub fn with_head_limit(head_limit: usize) -> Self {
        Scanner {
            head_limit,
            ..Scanner::default()
        }
    }

    /// Whether the scanner has stopped checking.
    pub fn is_passthrough(&self) -> bool {
        matches!(self.state, State::Passthrough)
    }

    /// Feeds bytes read from the caller; bytes that may go to hyper are
    /// appended to `out` (a held head is appended once it is complete).
    pub fn feed(&mut self, input: &[u8], out: &mut BytesMut) -> Outcome {
        self.scan(input, out)
    }

    /// Whether the scanner stands between two messages with nothing held:
    /// everything it passed on so far is whole requests.
    fn at_boundary(&self) -> bool {
        self.state == State::Head && self.line.is_empty()
    }

    /// Whether nothing is held back, so that what [`Scanner::scan`] passes
    /// on is a prefix of its input (see [`Passed`]).
    fn holds_nothing(&self) -> bool {
        self.line.is_empty() && !matches!(self.state, State::Failed)
    }

    fn scan<O: Out>(&mut self, mut input: &[u8], out: &mut O) -> Outcome {
        while !input.is_empty() {
            match self.state {
                State::Passthrough => {
                    out.put(input);
                    return Outcome::Continue;
                }
                State::Failed => return Outcome::RefusedBody(Violation::ChunkFraming),
                State::Head => {
                    let (taken, outcome) = self.head(input, out);
                    input = &input[taken..];
                    if outcome != Outcome::Continue {
                        return outcome;
                    }
                }
                State::Length(n) => {
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(input.len());
                    out.put(&input[..take]);
                    input = &input[take..];
                    let left = n - take as u64;
                    self.state = if left == 0 {
                        State::Head
                    } else {
                        State::Length(left)
                    };
                }
                State::ChunkData(n) => {
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(input.len());
                    out.put(&input[..take]);
                    input = &input[take..];
                    let left = n - take as u64;
                    self.state = if left == 0 {
                        State::ChunkEnd(false)
                    } else {
                        State::ChunkData(left)
                    };
                }
                State::ChunkEnd(cr) => {
                    let b = input[0];
                    self.state = match (cr, b) {
                        (false, b'\r') => State::ChunkEnd(true),
                        (true, b'\n') => State::ChunkSize,
                        _ => return self.fail(),
                    };
                    out.put(&input[..1]);
                    input = &input[1..];
                }
                State::ChunkSize | State::Trailers => {
                    // Held back until the line is complete and checked, so a
                    // refused line leaves hyper at a line start.
                    let trailers = matches!(self.state, State::Trailers);
                    let Some(lf) = memchr(b'\n', input) else {
                        self.line.extend_from_slice(input);
                        if self.line.len() > MAX_CHUNK_LINE {
                            return self.fail();
                        }
                        return Outcome::Continue;
                    };
                    let next = if self.line.is_empty() {
                        // The whole line is in the input: checked in place.
                        let line = &input[..=lf];
                        let next = chunk_line(trailers, line);
                        if next.is_some() {
                            out.put(line);
                        }
                        next
                    } else {
                        self.line.extend_from_slice(&input[..=lf]);
                        let next = chunk_line(trailers, &self.line);
                        if next.is_some() {
                            out.put(&self.line);
                        }
                        self.clear_line();
                        next
                    };
                    input = &input[lf + 1..];
                    match next {
                        Some(state) => self.state = state,
                        None => return self.fail(),
                    }
                }
            }
        }
        Outcome::Continue
    }

    fn fail(&mut self) -> Outcome {
        self.state = State::Failed;
        Outcome::RefusedBody(Violation::ChunkFraming)
    }

    /// Consumes head bytes; returns how many were taken. Incremental: each
    /// byte is looked at once, however slowly the head arrives.
    fn head<O: Out>(&mut self, input: &[u8], out: &mut O) -> (usize, Outcome) {
        // Line by line (a search for LF per line), in place: only a head that
        // is still incomplete at the end of the input is copied into `line`.
        // The same decisions at the same bytes as `head_bytewise`, which the
        // tests keep as the reference. Positions below count from the start
        // of the head: `held` bytes in `line`, then the input.
        let held = self.line.len();
        let mut line_start = self.head_line_start;
        let mut seen_line = self.head_seen_line;
        let mut k = 0;
        while k < input.len() {
            let end = memchr(b'\n', &input[k..]).map_or(input.len(), |p| k + p + 1);
            let lf = input[end - 1] == b'\n';
            let grown = held + end;
            // Byte by byte, the limit check follows the LF check of the same
            // byte: only the LF itself may take the head one byte over.
            if grown > self.head_limit && !(lf && grown == self.head_limit + 1) {
                self.pass_through(input, out);
                return (input.len(), Outcome::Continue);
            }
            if lf {
                // Lines end in LF (a CR before it is checked later); empty
                // lines before the request line are skipped, as hyper does.
                let i = grown - 1;
                let len = i - line_start;
                let empty = len == 0 || (len == 1 && self.head_byte(input, line_start) == b'\r');
                if empty && seen_line {
                    return self.head_complete(input, end, out);
                }
                if !empty {
                    seen_line = true;
                }
                line_start = i + 1;
            }
            if grown > self.head_limit {
                self.pass_through(input, out);
                return (input.len(), Outcome::Continue);
            }
            k = end;
        }
        self.line.extend_from_slice(input);
        self.head_line_start = line_start;
        self.head_seen_line = seen_line;
        (input.len(), Outcome::Continue)
    }

    /// The byte at `at` (from the start of the head) of a head whose first
    /// bytes are held in `line` and continue in `input`.
    fn head_byte(&self, input: &[u8], at: usize) -> u8 {
        match at.checked_sub(self.line.len()) {
            None => self.line[at],
            Some(i) => input[i],
        }
    }

    /// The byte-at-a-time original of [`Scanner::head`], kept as the
    /// reference its tests compare against.
    #[cfg(test)]
    fn head_bytewise(&mut self, input: &[u8], out: &mut BytesMut) -> (usize, Outcome) {
        for (k, &b) in input.iter().enumerate() {
            self.line.push(b);
            if b == b'\n' {
                // Lines end in LF (a CR before it is checked later); empty
                // lines before the request line are skipped, as hyper does.
                let i = self.line.len() - 1;
                let len = i - self.head_line_start;
                let empty = len == 0 || (len == 1 && self.line[self.head_line_start] == b'\r');
                if empty && self.head_seen_line {
                    // The whole head is in `line`.
                    let (_, outcome) = self.head_complete(&[], 0, out);
                    return (k + 1, outcome);
                }
                if !empty {
                    self.head_seen_line = true;
                }
                self.head_line_start = i + 1;
            }
            if self.line.len() > self.head_limit {
                out.extend_from_slice(&self.line);
                out.extend_from_slice(&input[k + 1..]);
                self.line = Vec::new();
                self.reset_head();
                self.state = State::Passthrough;
                return (input.len(), Outcome::Continue);
            }
        }
        (input.len(), Outcome::Continue)
    }

    /// Over the head limit: what is held and `input` go to hyper unchecked
    /// (hyper refuses the oversized head and closes).
    fn pass_through<O: Out>(&mut self, input: &[u8], out: &mut O) {
        out.put(&self.line);
        out.put(input);
        self.line = Vec::new();
        self.reset_head();
        self.state = State::Passthrough;
    }

    /// The head (what `line` holds, then `input[..end]`) is complete: checked,
    /// then passed on or refused. Returns `end` and the outcome.
    fn head_complete<O: Out>(&mut self, input: &[u8], end: usize, out: &mut O) -> (usize, Outcome) {
        self.reset_head();
        let checked = if self.line.is_empty() {
            // The whole head is in the input: checked and passed in place.
            let head = &input[..end];
            let checked = check_head(head);
            if checked.is_ok() {
                out.put(head);
            }
            checked
        } else {
            self.line.extend_from_slice(&input[..end]);
            let checked = check_head(&self.line);
            if checked.is_ok() {
                out.put(&self.line);
            }
            self.clear_line();
            checked
        };
        match checked {
            Err(v) => {
                self.state = State::Passthrough;
                (end, Outcome::RefusedHead(v))
            }
            Ok(next) => {
                self.state = next;
                self.heads = self.heads.wrapping_add(1);
                (end, Outcome::Continue)
            }
        }
    }

    /// Empties `line`, keeping a small allocation for the next head or line.
    fn clear_line(&mut self) {
        if self.line.capacity() > KEEP_LINE_CAPACITY {
            self.line = Vec::new();
        } else {
            self.line.clear();
        }
    }

    fn reset_head(&mut self) {
        self.head_line_start = 0;
        self.head_seen_line = false;
    }

    /// The bytes of an incomplete head held back so far (at EOF they go to
    /// hyper, which then sees an incomplete message).
    fn take_held(&mut self) -> Vec<u8> {
        if matches!(self.state, State::Head) {
            self.reset_head();
            std::mem::take(&mut self.line)
        } else {
            Vec::new()
        }
    }
}

/// Checks a complete head; returns the body state that follows it.
///
/// One pass: CR and LF are jumped to (every LF must follow a CR, every CR
/// must precede an LF), and each line is interpreted as it is found. A
/// terminator violation anywhere in the head wins over what the lines say,
/// so a decision the lines reach early is only returned after the last line.
fn check_head(head: &[u8]) -> Result<State, Violation> {
    let mut pos = 0;
    let mut request_line_seen = false;
    let mut headers_ended = false;
    let mut decided: Option<Result<State, Violation>> = None;
    // `Transfer-Encoding` as hyper reads it: the last header's last coding.
    let mut te: Option<&[u8]> = None;
    let mut cl: Option<Option<u64>> = None;
    loop {
        let (line, next) = match memchr2(b'\r', b'\n', &head[pos..]) {
            Some(p) => {
                let at = pos + p;
                if head[at] == b'\n' {
                    // No CR right before it: that was jumped to first.
                    return Err(Violation::BareLf);
                }
                if head.get(at + 1) != Some(&b'\n') {
                    return Err(Violation::BareCr);
                }
                (&head[pos..at], Some(at + 2))
            }
            None => (&head[pos..], None),
        };
        if decided.is_none() && !headers_ended {
            if !request_line_seen {
                // Empty lines before the request line are skipped.
                if !line.is_empty() {
                    request_line_seen = true;
                    if line.starts_with(b"PRI * HTTP/2.0") {
                        decided = Some(Ok(State::Passthrough));
                    }
                }
            } else if line.is_empty() {
                headers_ended = true;
            } else if matches!(line[0], b' ' | b'\t') {
                decided = Some(Err(Violation::ObsFold));
            } else if let Some(colon) = memchr(b':', line) {
                let (name, value) = (&line[..colon], trim(&line[colon + 1..]));
                if name.eq_ignore_ascii_case(b"transfer-encoding") {
                    te = Some(value);
                } else if name.eq_ignore_ascii_case(b"content-length") {
                    let parsed = content_length(value);
                    cl = Some(match cl {
                        None => parsed,
                        Some(prev) if prev == parsed => prev,
                        Some(_) => None,
                    });
                }
            } else {
                // hyper refuses it and closes the connection.
                decided = Some(Ok(State::Passthrough));
            }
        }
        match next {
            Some(next) => pos = next,
            None => break,
        }
    }
    if let Some(decided) = decided {
        return decided;
    }
    if te.is_some() && cl.is_some() {
        return Err(Violation::LengthAndChunked);
    }
    // No pass-through for `Upgrade` or `CONNECT`: the gateway never switches
    // protocols (no 101, and CONNECT targets fail the path check), so hyper
    // keeps reading HTTP/1.1 on the connection and so must the guard.
    // The pass-throughs below are all inputs hyper refuses and then closes
    // the connection on, so they cannot switch the guard off for later
    // requests.
    match (te, cl) {
        (Some(v), None) => {
            let last = v
                .rsplit(|&b| b == b',')
                .next()
                .map(trim)
                .unwrap_or_default();
            if last.eq_ignore_ascii_case(b"chunked") {
                Ok(State::ChunkSize)
            } else {
                Ok(State::Passthrough)
            }
        }
        (None, Some(Some(0))) | (None, None) => Ok(State::Head),
        (None, Some(Some(n))) => Ok(State::Length(n)),
        _ => Ok(State::Passthrough),
    }
}

/// A complete chunk-size line (`trailers`: a trailer line) with its CRLF;
/// returns the state that follows it, or `None` if it is refused.
fn chunk_line(trailers: bool, line: &[u8]) -> Option<State> {
    let content = line.strip_suffix(b"\r\n")?;
    if content.len() > MAX_CHUNK_LINE || memchr(b'\r', content).is_some() {
        return None;
    }
    if !trailers {
        return match chunk_size(content)? {
            0 => Some(State::Trailers),
            n => Some(State::ChunkData(n)),
        };
    }
    if content.is_empty() {
        Some(State::Head)
    } else if matches!(content[0], b' ' | b'\t') {
        None
    } else {
        Some(State::Trailers)
    }
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |e| e + 1);
    &v[start..end.max(start)]
}

/// A `Content-Length` value (a comma-separated list of equal values is one value).
fn content_length(v: &[u8]) -> Option<u64> {
    let mut out = None;
    for part in v.split(|&b| b == b',') {
        let part = trim(part);
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n: u64 = std::str::from_utf8(part).ok()?.parse().ok()?;
        match out {
            None => out = Some(n),
            Some(prev) if prev == n => {}
            Some(_) => return None,
        }
    }
    out
}

/// `1*16HEXDIG [ ";" ext ]` with no quotes in the extension.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return None;
    }
    let rest = &line[digits..];
    if !rest.is_empty() {
        let ext = rest.strip_prefix(b";")?;
        if ext
            .iter()
            .any(|&b| b == b'"' || !(b == b'\t' || (0x20..0x7f).contains(&b)))
        {
            return None;
        }
    }
    u64::from_str_radix(std::str::from_utf8(&line[..digits]).ok()?, 16).ok()
}

/// The connection's read side through the [`Scanner`].
///
/// When the scanner holds nothing (the usual case between requests), a read
/// goes straight into hyper's buffer and is scanned there: only an incomplete
/// head or chunk line at its end is moved out and held, and a refused part is
/// cut off before hyper sees it. Otherwise reads are staged in the guard.
pub struct H1Guard<T> {
    inner: T,
    scanner: Scanner,
    ready: BytesMut,
    eof_after_ready: bool,
    /// A head was refused: after the stand-in request nothing more is read
    /// (not even EOF, which would make hyper drop the stand-in's response).
    refused: bool,
    detect: Detect,
    verdict: Arc<Verdict>,
    /// hyper closed the connection's write side.
    shut: bool,
}

impl<T> H1Guard<T> {
    /// Guards `inner`; head refusals are reported in `verdict`; heads over
    /// `head_limit` bytes go to hyper unchecked (for it to refuse).
    pub fn new(inner: T, verdict: Arc<Verdict>, head_limit: usize) -> Self {
        H1Guard {
            inner,
            scanner: Scanner::with_head_limit(head_limit),
            ready: BytesMut::new(),
            eof_after_ready: false,
            refused: false,
            detect: Detect::Done,
            verdict,
            shut: false,
        }
    }

    /// The guarded socket.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Gives back what `unread` holds: bytes hyper's connection had read
    /// (through this guard, so already checked) but not parsed when it was
    /// given up. They are read again first.
    pub fn unread(&mut self, unread: &[u8]) {
        if unread.is_empty() {
            return;
        }
        let mut all = BytesMut::with_capacity(unread.len() + self.ready.len());
        all.extend_from_slice(unread);
        all.extend_from_slice(&self.ready);
        self.ready = all;
        self.publish();
    }

    /// Frees what the guard keeps for the next head, for a connection that
    /// has gone idle.
    pub fn release_buffers(&mut self) {
        if self.ready.is_empty() {
            self.ready = BytesMut::new();
        }
        if self.scanner.line.is_empty() {
            self.scanner.line = Vec::new();
        }
    }

    /// Tells the server whether the guard stands between two requests with
    /// nothing held or staged (see [`Verdict::idle`]).
    fn publish(&self) {
        let at_boundary = self.detect == Detect::Done
            && !self.refused
            && !self.eof_after_ready
            && !self.shut
            && self.ready.is_empty()
            && self.scanner.at_boundary();
        let heads = if at_boundary {
            self.scanner.heads
        } else {
            NOT_AT_BOUNDARY
        };
        self.verdict.heads.store(heads, Ordering::Relaxed);
    }

    /// Makes the guard tell HTTP/1 from HTTP/2 prior knowledge on the
    /// connection's first bytes, so that the server needs no version sniff
    /// of its own (which would send the first read down the staged path).
    /// The first bytes that cannot be the preface decide HTTP/1 (marked in
    /// the verdict, then checked as usual, in place). The whole preface
    /// decides HTTP/2: it is held back, the verdict says so
    /// ([`Verdict::is_h2c`]) and reads return `Pending` (without waking: the
    /// server checks the verdict after every poll of its HTTP/1 connection)
    /// until [`H1Guard::resume_after_preface`].
    #[must_use]
    pub fn detect_h2c(mut self) -> Self {
        self.detect = Detect::Matching(0);
        self
    }

    /// After the preface was detected: `unread` (what hyper's HTTP/1
    /// connection had read but not parsed, normally nothing), then the
    /// preface and everything after it are read unchecked, for HTTP/2.
    pub fn resume_after_preface(&mut self, unread: &[u8]) {
        if self.detect != Detect::HandedOff {
            return;
        }
        self.detect = Detect::Done;
        self.unread(unread);
    }

    /// How `bytes`, read after `matched` bytes that were all a prefix of
    /// the preface, continue it: `Some(true)` completes it, `Some(false)`
    /// still matches, `None` cannot be the preface.
    fn continues_preface(matched: u8, bytes: &[u8]) -> Option<bool> {
        let rest = &H2_PREFACE[usize::from(matched)..];
        let n = rest.len().min(bytes.len());
        (rest[..n] == bytes[..n]).then_some(n == rest.len())
    }

    /// The preface is complete and held in `ready`: stop for the hand-over.
    fn hand_off(&mut self) -> Poll<io::Result<()>> {
        self.detect = Detect::HandedOff;
        self.scanner.state = State::Passthrough;
        self.verdict.flag(H2C);
        Poll::Pending
    }

    /// HTTP/1 is decided: the raw bytes held while they matched the preface
    /// go through the scanner like any other.
    fn decide_http1(&mut self) {
        self.detect = Detect::Done;
        self.verdict.flag(HTTP1);
        if !self.ready.is_empty() {
            let raw = std::mem::take(&mut self.ready);
            let outcome = self.scanner.scan(&raw, &mut self.ready);
            self.refuse(outcome);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for H1Guard<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let read = this.read(cx, buf);
        this.publish();
        read
    }
}

impl<T: AsyncRead + Unpin> H1Guard<T> {
    /// Reads for hyper, through the scanner.
    fn read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self;
        loop {
            let matching = match this.detect {
                Detect::Done => None,
                Detect::Matching(matched) => Some(matched),
                Detect::HandedOff => return Poll::Pending,
            };
            // While the first bytes match the preface, `ready` holds them raw.
            if matching.is_none() && !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.refused {
                // hyper answers the stand-in (`Connection: close`) and closes.
                return Poll::Pending;
            }
            if this.eof_after_ready {
                return Poll::Ready(Ok(()));
            }
            if this.scanner.is_passthrough() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            if matching.unwrap_or(0) == 0
                && this.scanner.holds_nothing()
                && buf.remaining() >= DIRECT_READ_MIN
            {
                // The common case, without a copy: read into hyper's buffer,
                // scan the new bytes there, and take back out of it only what
                // must be held (the incomplete head or line at the end) or
                // refused (from the refused head or line on).
                let start = buf.filled().len();
                ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
                let data = &buf.filled()[start..];
                if data.is_empty() {
                    // The caller closed, and nothing is held.
                    if matching.is_some() {
                        this.decide_http1();
                    }
                    this.eof_after_ready = true;
                    return Poll::Ready(Ok(()));
                }
                if matching.is_some() {
                    // The connection's first bytes: almost always a request
                    // line, decided at its first byte and checked in place.
                    match Self::continues_preface(0, data) {
                        None => this.decide_http1(),
                        Some(complete) => {
                            this.ready.extend_from_slice(data);
                            let len = data.len();
                            buf.set_filled(start);
                            if complete {
                                return this.hand_off();
                            }
                            this.detect = Detect::Matching(preface_len(len));
                            continue;
                        }
                    }
                }
                let data = &buf.filled()[start..];
                let mut passed = Passed(0);
                let outcome = this.scanner.scan(data, &mut passed);
                buf.set_filled(start + passed.0);
                if this.refuse(outcome) || passed.0 == 0 {
                    // The stand-in bytes are in `ready`; or everything read
                    // is held (never an empty read: hyper would take it for
                    // EOF), and the next read goes through `ready`.
                    continue;
                }
                return Poll::Ready(Ok(()));
            }
            // Uninitialised: zeroing 8 KiB on every read (most of which
            // return Pending) cost more than everything else the guard does.
            let mut tmp = [std::mem::MaybeUninit::<u8>::uninit(); READ_SIZE];
            let mut rb = ReadBuf::uninit(&mut tmp);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            let data = rb.filled();
            if data.is_empty() {
                // The caller closed: whatever was held goes to hyper, which
                // sees an incomplete message.
                if matching.is_some() {
                    this.decide_http1();
                    if this.refused {
                        continue;
                    }
                }
                let held = this.scanner.take_held();
                this.ready.extend_from_slice(&held);
                this.eof_after_ready = true;
                continue;
            }
            if let Some(matched) = matching {
                match Self::continues_preface(matched, data) {
                    Some(complete) => {
                        this.ready.extend_from_slice(data);
                        if complete {
                            return this.hand_off();
                        }
                        this.detect =
                            Detect::Matching(preface_len(usize::from(matched) + data.len()));
                        continue;
                    }
                    None => {
                        this.decide_http1();
                        if this.refused {
                            continue;
                        }
                    }
                }
            }
            let outcome = this.scanner.scan(data, &mut this.ready);
            this.refuse(outcome);
        }
    }
}

/// A count of preface bytes matched so far (always below its 24 bytes).
fn preface_len(n: usize) -> u8 {
    u8::try_from(n).unwrap_or(u8::MAX)
}

impl<T> H1Guard<T> {
    /// Acts on a refusal: the stand-in bytes go to `ready` (after whatever
    /// passed before the refused part) and nothing more is read. Returns
    /// whether `outcome` was a refusal.
    fn refuse(&mut self, outcome: Outcome) -> bool {
        match outcome {
            Outcome::Continue => return false,
            Outcome::RefusedHead(v) => {
                self.verdict.set(v);
                self.ready.extend_from_slice(REFUSAL_REQUEST);
            }
            Outcome::RefusedBody(_) => {
                // hyper's chunked decoder refuses `\rX` in every state the
                // scanner can stop in (line start, after chunk data, after
                // its CR): the body fails with a decode error, the request
                // gets a 400, and nothing more is read.
                self.ready.extend_from_slice(POISON);
            }
        }
        self.refused = true;
        true
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for H1Guard<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
        // hyper flushes the socket only once its own buffer is written out:
        // every response it was done with before now is on the wire.
        let done = this.verdict.responses.load(Ordering::Relaxed);
        this.verdict.flushed.store(done, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.shut = true;
        this.publish();
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The scanner as it was before the in-place scanning (byte-at-a-time head,
/// every line copied, `check_head` in two byte-wise passes): the reference
/// the differential tests compare the scanner and the guard against.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod reference {
    use super::{Outcome, State, Violation, chunk_size, content_length, trim};
    use bytes::BytesMut;

    pub(super) struct Scanner {
        pub(super) state: State,
        line: Vec<u8>,
        head_line_start: usize,
        head_seen_line: bool,
        head_limit: usize,
    }

    impl Scanner {
        pub(super) fn with_head_limit(head_limit: usize) -> Self {
            Scanner {
                state: State::Head,
                line: Vec::new(),
                head_line_start: 0,
                head_seen_line: false,
                head_limit,
            }
        }

        pub(super) fn feed(&mut self, mut input: &[u8], out: &mut BytesMut) -> Outcome {
            while !input.is_empty() {
                match self.state {
                    State::Passthrough => {
                        out.extend_from_slice(input);
                        return Outcome::Continue;
                    }
                    State::Failed => return Outcome::RefusedBody(Violation::ChunkFraming),
                    State::Head => {
                        let (taken, outcome) = self.head(input, out);
                        input = &input[taken..];
                        if outcome != Outcome::Continue {
                            return outcome;
                        }
                    }
                    State::Length(n) => {
                        let take = usize::try_from(n).unwrap_or(usize::MAX).min(input.len());
                        out.extend_from_slice(&input[..take]);
                        input = &input[take..];
                        let left = n - take as u64;
                        self.state = if left == 0 {
                            State::Head
                        } else {
                            State::Length(left)
                        };
                    }
                    State::ChunkData(n) => {
                        let take = usize::try_from(n).unwrap_or(usize::MAX).min(input.len());
                        out.extend_from_slice(&input[..take]);
                        input = &input[take..];
                        let left = n - take as u64;
                        self.state = if left == 0 {
                            State::ChunkEnd(false)
                        } else {
                            State::ChunkData(left)
                        };
                    }
                    State::ChunkEnd(cr) => {
                        let b = input[0];
                        self.state = match (cr, b) {
                            (false, b'\r') => State::ChunkEnd(true),
                            (true, b'\n') => State::ChunkSize,
                            _ => return self.fail(),
                        };
                        out.extend_from_slice(&input[..1]);
                        input = &input[1..];
                    }
                    State::ChunkSize | State::Trailers => {
                        let Some(lf) = input.iter().position(|&b| b == b'\n') else {
                            self.line.extend_from_slice(input);
                            if self.line.len() > 8 * 1024 {
                                return self.fail();
                            }
                            return Outcome::Continue;
                        };
                        self.line.extend_from_slice(&input[..=lf]);
                        input = &input[lf + 1..];
                        let line = std::mem::take(&mut self.line);
                        let Some(content) = line.strip_suffix(b"\r\n") else {
                            return self.fail();
                        };
                        if content.contains(&b'\r') || content.len() > 8 * 1024 {
                            return self.fail();
                        }
                        if matches!(self.state, State::ChunkSize) {
                            match chunk_size(content) {
                                Some(0) => self.state = State::Trailers,
                                Some(n) => self.state = State::ChunkData(n),
                                None => return self.fail(),
                            }
                        } else if content.is_empty() {
                            self.state = State::Head;
                        } else if matches!(content.first(), Some(b' ' | b'\t')) {
                            return self.fail();
                        }
                        out.extend_from_slice(&line);
                    }
                }
            }
            Outcome::Continue
        }

        fn fail(&mut self) -> Outcome {
            self.state = State::Failed;
            Outcome::RefusedBody(Violation::ChunkFraming)
        }

        fn head(&mut self, input: &[u8], out: &mut BytesMut) -> (usize, Outcome) {
            for (k, &b) in input.iter().enumerate() {
                self.line.push(b);
                if b == b'\n' {
                    let i = self.line.len() - 1;
                    let len = i - self.head_line_start;
                    let empty = len == 0 || (len == 1 && self.line[self.head_line_start] == b'\r');
                    if empty && self.head_seen_line {
                        let head = std::mem::take(&mut self.line);
                        self.head_line_start = 0;
                        self.head_seen_line = false;
                        return match check_head(&head) {
                            Err(v) => {
                                self.state = State::Passthrough;
                                (k + 1, Outcome::RefusedHead(v))
                            }
                            Ok(next) => {
                                out.extend_from_slice(&head);
                                self.state = next;
                                (k + 1, Outcome::Continue)
                            }
                        };
                    }
                    if !empty {
                        self.head_seen_line = true;
                    }
                    self.head_line_start = i + 1;
                }
                if self.line.len() > self.head_limit {
                    out.extend_from_slice(&self.line);
                    out.extend_from_slice(&input[k + 1..]);
                    self.line = Vec::new();
                    self.head_line_start = 0;
                    self.head_seen_line = false;
                    self.state = State::Passthrough;
                    return (input.len(), Outcome::Continue);
                }
            }
            (input.len(), Outcome::Continue)
        }

        pub(super) fn take_held(&mut self) -> Vec<u8> {
            if matches!(self.state, State::Head) {
                self.head_line_start = 0;
                self.head_seen_line = false;
                std::mem::take(&mut self.line)
            } else {
                Vec::new()
            }
        }
    }

    pub(super) fn check_head(head: &[u8]) -> Result<State, Violation> {
        for (i, &b) in head.iter().enumerate() {
            match b {
                b'\n' if i == 0 || head[i - 1] != b'\r' => return Err(Violation::BareLf),
                b'\r' if head.get(i + 1) != Some(&b'\n') => return Err(Violation::BareCr),
                _ => {}
            }
        }
        let mut lines = head
            .split(|&b| b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .skip_while(|l| l.is_empty());
        let request_line = lines.next().unwrap_or_default();
        if request_line.starts_with(b"PRI * HTTP/2.0") {
            return Ok(State::Passthrough);
        }
        let mut te: Option<&[u8]> = None;
        let mut cl: Option<Option<u64>> = None;
        for line in lines {
            if line.is_empty() {
                break;
            }
            if matches!(line[0], b' ' | b'\t') {
                return Err(Violation::ObsFold);
            }
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                return Ok(State::Passthrough);
            };
            let (name, value) = (&line[..colon], trim(&line[colon + 1..]));
            if name.eq_ignore_ascii_case(b"transfer-encoding") {
                te = Some(value);
            } else if name.eq_ignore_ascii_case(b"content-length") {
                let parsed = content_length(value);
                cl = Some(match cl {
                    None => parsed,
                    Some(prev) if prev == parsed => prev,
                    Some(_) => None,
                });
            }
        }
        if te.is_some() && cl.is_some() {
            return Err(Violation::LengthAndChunked);
        }
        match (te, cl) {
            (Some(v), None) => {
                let last = v
                    .rsplit(|&b| b == b',')
                    .next()
                    .map(trim)
                    .unwrap_or_default();
                if last.eq_ignore_ascii_case(b"chunked") {
                    Ok(State::ChunkSize)
                } else {
                    Ok(State::Passthrough)
                }
            }
            (None, Some(Some(0))) | (None, None) => Ok(State::Head),
            (None, Some(Some(n))) => Ok(State::Length(n)),
            _ => Ok(State::Passthrough),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes; returns what hyper would see
    /// and the first refusal.
    fn run(input: &[u8], step: usize) -> (Vec<u8>, Outcome) {
        let mut s = Scanner::default();
        let mut out = BytesMut::new();
        for piece in input.chunks(step.max(1)) {
            let o = s.feed(piece, &mut out);
            if o != Outcome::Continue {
                return (out.to_vec(), o);
            }
        }
        (out.to_vec(), Outcome::Continue)
    }

    fn all_steps(input: &[u8]) -> Vec<(Vec<u8>, Outcome)> {
        [1, 2, 3, 7, 64, input.len()]
            .iter()
            .map(|&s| run(input, s))
            .collect()
    }

    #[test]
    fn well_formed_pipelined_requests_pass_unchanged() {
        let input = b"PUT /a HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\ntrailer: t\r\n\r\nGET /c HTTP/1.1\r\n\r\n";
        for (out, o) in all_steps(input) {
            assert_eq!(o, Outcome::Continue);
            assert_eq!(out, input.to_vec());
        }
    }

    #[test]
    fn content_length_with_transfer_encoding_is_refused_in_either_order() {
        for head in [
            &b"PUT /a HTTP/1.1\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n"[..],
            b"PUT /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
        ] {
            for (out, o) in all_steps(head) {
                assert_eq!(o, Outcome::RefusedHead(Violation::LengthAndChunked));
                assert!(out.is_empty(), "nothing of the head reaches hyper");
            }
        }
    }

    #[test]
    fn a_refused_head_after_a_good_request_keeps_the_good_one() {
        let input = b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\nhost: x\n\n";
        let (out, o) = run(input, input.len());
        assert_eq!(o, Outcome::RefusedHead(Violation::BareLf));
        assert_eq!(out, b"GET /a HTTP/1.1\r\n\r\n".to_vec());
    }

    #[test]
    fn bare_lf_bare_cr_and_obs_fold_are_refused() {
        let cases: [(&[u8], Violation); 4] = [
            (b"GET / HTTP/1.1\nhost: x\r\n\r\n", Violation::BareLf),
            (b"GET / HTTP/1.1\r\nhost: x\r\n\n", Violation::BareLf),
            (b"GET / HTTP/1.1\r\nx: a\rb\r\n\r\n", Violation::BareCr),
            (b"GET / HTTP/1.1\r\nx: a\r\n b\r\n\r\n", Violation::ObsFold),
        ];
        for (input, v) in cases {
            assert_eq!(run(input, 1).1, Outcome::RefusedHead(v), "{input:?}");
        }
    }

    #[test]
    fn malformed_chunk_framing_fails_the_body() {
        for body in [
            &b"zz\r\nabc\r\n0\r\n\r\n"[..],
            b"-1\r\n",
            b"fffffffffffffffff\r\n",
            b"3;x=\"q\r\nabc\r\n",
            b"5\r\nabc\r\n0\r\n\r\n",
            b"3\nabc\r\n",
            b"3\r\nabcXY",
            b"0\r\ntrailer: x\n\r\n",
        ] {
            let mut input = b"PUT / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
            input.extend_from_slice(body);
            for (_, o) in all_steps(&input) {
                assert_eq!(o, Outcome::RefusedBody(Violation::ChunkFraming), "{body:?}");
            }
        }
    }

    #[test]
    fn h2_preface_and_huge_heads_pass_through() {
        let h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
        assert_eq!(run(h2, 5), (h2.to_vec(), Outcome::Continue));
        let mut big = b"GET / HTTP/1.1\r\nx: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', HEAD_LIMIT + 10));
        let (out, o) = run(&big, 4096);
        assert_eq!(o, Outcome::Continue);
        assert_eq!(out, big);
    }

    #[test]
    fn upgrade_connect_or_two_te_headers_do_not_switch_the_guard_off() {
        for first in [
            &b"GET / HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"[..],
            b"CONNECT evil:443 HTTP/1.1\r\nhost: evil\r\n\r\n",
            b"PUT / HTTP/1.1\r\ntransfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        ] {
            let mut input = first.to_vec();
            input.extend_from_slice(b"GET / HTTP/1.1\nhost: x\n\n");
            let (out, o) = run(&input, 1);
            assert_eq!(o, Outcome::RefusedHead(Violation::BareLf), "{first:?}");
            assert_eq!(out, first.to_vec());
        }
    }

    #[test]
    fn leading_empty_lines_do_not_end_the_head() {
        let input = b"\r\nGET / HTTP/1.1\r\nhost: x\r\n\r\n";
        assert_eq!(run(input, 1), (input.to_vec(), Outcome::Continue));
    }

    /// The other end of the connection: returns the given pieces (at most
    /// what fits), sometimes `Pending` first, then EOF; logs every read.
    struct Pieces {
        pieces: std::collections::VecDeque<Vec<u8>>,
        rng: fastrand::Rng,
        /// Out of 256, how often a read returns `Pending` first.
        pending_odds: u8,
        pendings: usize,
        delivered: Vec<Vec<u8>>,
    }

    impl Pieces {
        /// `pieces`, each read as soon as asked for (never `Pending`).
        fn never_pending(pieces: Vec<Vec<u8>>) -> Pieces {
            Pieces {
                pieces: pieces.into(),
                rng: fastrand::Rng::with_seed(0),
                pending_odds: 0,
                pendings: 0,
                delivered: Vec::new(),
            }
        }
    }

    impl AsyncRead for Pieces {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            if this.rng.u8(..) < this.pending_odds {
                this.pendings += 1;
                return Poll::Pending;
            }
            let Some(front) = this.pieces.front_mut() else {
                this.delivered.push(Vec::new());
                return Poll::Ready(Ok(()));
            };
            let n = front.len().min(buf.remaining());
            buf.put_slice(&front[..n]);
            this.delivered.push(front[..n].to_vec());
            front.drain(..n);
            if front.is_empty() {
                this.pieces.pop_front();
            }
            Poll::Ready(Ok(()))
        }
    }

    #[derive(Debug, PartialEq, Eq)]
    enum End {
        /// The guard reported EOF.
        Eof,
        /// The guard stopped reading (after a refusal).
        Stopped,
    }

    /// Reads everything hyper would get from an [`H1Guard`] over `pieces`,
    /// with read buffers of random sizes (some already partly filled).
    fn drive_guard(
        pieces: Vec<Vec<u8>>,
        head_limit: usize,
        rng: &mut fastrand::Rng,
    ) -> (Vec<u8>, End, Option<Violation>, Vec<Vec<u8>>) {
        drive_guard_with(pieces, head_limit, rng, false)
    }

    /// [`drive_guard`], with h2c detection on if `detect`.
    fn drive_guard_with(
        pieces: Vec<Vec<u8>>,
        head_limit: usize,
        rng: &mut fastrand::Rng,
        detect: bool,
    ) -> (Vec<u8>, End, Option<Violation>, Vec<Vec<u8>>) {
        let verdict = Arc::new(Verdict::default());
        let inner = Pieces {
            pieces: pieces.into(),
            rng: fastrand::Rng::with_seed(rng.u64(..)),
            pending_odds: 32,
            pendings: 0,
            delivered: Vec::new(),
        };
        let mut guard = H1Guard::new(inner, verdict.clone(), head_limit);
        if detect {
            guard = guard.detect_h2c();
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut out = Vec::new();
        let end = loop {
            let room = match rng.u8(0..8) {
                0 => 1,
                1 => 24,
                2 => rng.usize(1..READ_SIZE),
                3 => READ_SIZE,
                _ => READ_SIZE + rng.usize(0..20_000),
            };
            let before = rng.usize(0..4);
            let mut storage = vec![0u8; before + room];
            let mut rb = ReadBuf::new(&mut storage);
            rb.put_slice(&vec![0xee; before]);
            let pendings = guard.inner.pendings;
            match Pin::new(&mut guard).poll_read(&mut cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let (kept, new) = rb.filled().split_at(before);
                    assert!(kept.iter().all(|&b| b == 0xee), "bytes already read kept");
                    if new.is_empty() {
                        break End::Eof;
                    }
                    out.extend_from_slice(new);
                }
                Poll::Ready(Err(e)) => panic!("read error {e}"),
                Poll::Pending if guard.inner.pendings > pendings => {}
                Poll::Pending => break End::Stopped,
            }
        };
        let delivered = std::mem::take(&mut guard.inner.delivered);
        (out, end, verdict.refused(), delivered)
    }

    /// What the guard did before the in-place scanning, over the same reads:
    /// the reference scanner into one buffer, the stand-ins after a refusal,
    /// what was held at EOF.
    fn old_guard(delivered: &[Vec<u8>], head_limit: usize) -> (Vec<u8>, End, Option<Violation>) {
        let mut s = reference::Scanner::with_head_limit(head_limit);
        let mut out = BytesMut::new();
        for piece in delivered {
            if piece.is_empty() {
                out.extend_from_slice(&s.take_held());
                return (out.to_vec(), End::Eof, None);
            }
            match s.feed(piece, &mut out) {
                Outcome::Continue => {}
                Outcome::RefusedHead(v) => {
                    out.extend_from_slice(REFUSAL_REQUEST);
                    return (out.to_vec(), End::Stopped, Some(v));
                }
                Outcome::RefusedBody(_) => {
                    out.extend_from_slice(POISON);
                    return (out.to_vec(), End::Stopped, None);
                }
            }
        }
        panic!("the guard stopped without EOF or a refusal");
    }

    /// Pipelined requests, valid and broken: Content-Length and chunked
    /// bodies, long headers, leading empty lines, the h2 preface, then a
    /// random mutation or none.
    fn random_stream(rng: &mut fastrand::Rng) -> Vec<u8> {
        let mut s = Vec::new();
        if rng.u8(0..32) == 0 {
            s.extend_from_slice(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        }
        for _ in 0..rng.usize(1..5) {
            if rng.u8(0..8) == 0 {
                s.extend_from_slice(b"\r\n");
            }
            let method = ["GET", "PUT", "POST"][rng.usize(0..3)];
            s.extend_from_slice(
                format!("{method} /v1/x/{} HTTP/1.1\r\nhost: gw\r\n", rng.u32(..)).as_bytes(),
            );
            if rng.bool() {
                let token: String = (0..rng.usize(0..3000))
                    .map(|_| rng.alphanumeric())
                    .collect();
                s.extend_from_slice(format!("authorization: Bearer {token}\r\n").as_bytes());
            }
            for i in 0..rng.usize(0..6) {
                s.extend_from_slice(format!("x-h{i}:  v{}\t\r\n", rng.u16(..)).as_bytes());
            }
            let body_kind = rng.u8(0..8);
            let data_len = rng.usize(0..300);
            let data: Vec<u8> = (0..data_len)
                .map(|_| b"ab\r\n0:"[rng.usize(0..6)])
                .collect();
            match body_kind {
                0 | 1 => s.extend_from_slice(b"\r\n"),
                2 | 3 => {
                    s.extend_from_slice(format!("content-length: {data_len}\r\n\r\n").as_bytes());
                    s.extend_from_slice(&data);
                }
                4..=6 => {
                    s.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
                    for part in data.chunks(rng.usize(1..100)) {
                        let ext = if rng.u8(0..4) == 0 { ";a=b" } else { "" };
                        s.extend_from_slice(format!("{:x}{ext}\r\n", part.len()).as_bytes());
                        s.extend_from_slice(part);
                        s.extend_from_slice(b"\r\n");
                    }
                    s.extend_from_slice(b"0\r\n");
                    if rng.bool() {
                        s.extend_from_slice(b"trailer: t\r\n");
                    }
                    s.extend_from_slice(b"\r\n");
                }
                _ => {
                    s.extend_from_slice(b"content-length: 3\r\ntransfer-encoding: chunked\r\n\r\n");
                    s.extend_from_slice(b"3\r\nabc\r\n0\r\n\r\n");
                }
            }
        }
        if !s.is_empty() {
            let at = rng.usize(0..s.len());
            let byte = b"\r\n :\t0a"[rng.usize(0..7)];
            match rng.u8(0..8) {
                0 => s[at] = byte,
                1 => {
                    s.remove(at);
                }
                2 => s.insert(at, byte),
                3 => s.truncate(at),
                _ => {}
            }
        }
        s
    }

    #[test]
    fn zero_copy_reads_match_the_old_guard() {
        let mut rng = fastrand::Rng::with_seed(0x5eed_0f9a_4d00);
        let (mut refused_heads, mut refused_bodies, mut eofs) = (0, 0, 0);
        for case in 0..6_000 {
            let input = random_stream(&mut rng);
            let head_limit = if rng.u8(0..4) == 0 {
                rng.usize(16..4096)
            } else {
                HEAD_LIMIT
            };
            let mut pieces = Vec::new();
            let mut rest = &input[..];
            let most = [1, 16, 700, 9000, usize::MAX][rng.usize(0..5)];
            while !rest.is_empty() {
                let n = rng.usize(1..=most.min(rest.len()));
                pieces.push(rest[..n].to_vec());
                rest = &rest[n..];
            }
            let (out, end, verdict, delivered) = drive_guard(pieces, head_limit, &mut rng);
            let expected = old_guard(&delivered, head_limit);
            let ctx = format!(
                "case {case}: limit {head_limit} input {:?}",
                String::from_utf8_lossy(&input)
            ) + &format!(" reads {delivered:?}");
            assert_eq!(out, expected.0, "{ctx}");
            assert_eq!((&end, verdict), (&expected.1, expected.2), "{ctx}");
            // Whatever the reads, the caller's bytes in order, or a prefix of
            // them and a stand-in.
            match (&end, verdict) {
                (End::Eof, _) => {
                    // All of it, but for a chunk line cut short by EOF.
                    eofs += 1;
                    assert!(input.starts_with(&out), "{ctx}");
                }
                (End::Stopped, Some(_)) => {
                    refused_heads += 1;
                    assert!(out.ends_with(REFUSAL_REQUEST), "{ctx}");
                    assert!(
                        input.starts_with(&out[..out.len() - REFUSAL_REQUEST.len()]),
                        "{ctx}"
                    );
                }
                (End::Stopped, None) => {
                    refused_bodies += 1;
                    assert!(out.ends_with(POISON), "{ctx}");
                    assert!(input.starts_with(&out[..out.len() - POISON.len()]), "{ctx}");
                }
            }
        }
        // Every kind of ending is exercised.
        assert!(
            eofs > 1000 && refused_heads > 300 && refused_bodies > 100,
            "{eofs} {refused_heads} {refused_bodies}"
        );
    }

    #[test]
    fn one_pass_check_head_matches_the_two_pass_reference() {
        let parts: [&[u8]; 14] = [
            b"a",
            b":",
            b" ",
            b"\t",
            b"\r",
            b"\n",
            b"\r\n",
            b"\r\n",
            b"\r\n",
            b"GET / HTTP/1.1",
            b"PRI * HTTP/2.0",
            b"content-length: 5",
            b"Transfer-Encoding: gzip, chunked",
            b"content-length: 0, 0",
        ];
        let mut rng = fastrand::Rng::with_seed(0xc4ec_4ead);
        for _ in 0..50_000 {
            let head: Vec<u8> = (0..rng.usize(0..12))
                .flat_map(|_| parts[rng.usize(0..parts.len())].iter().copied())
                .collect();
            assert_eq!(
                check_head(&head),
                reference::check_head(&head),
                "{:?}",
                String::from_utf8_lossy(&head)
            );
        }
    }

    #[test]
    fn a_request_read_whole_is_passed_in_place_and_a_split_head_reuses_its_buffer() {
        let request = b"PUT /a HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello".to_vec();
        let split = b"GET /b HTTP/1.1\r\nhost: x\r\n\r\n".to_vec();
        let inner = Pieces::never_pending(vec![
            request.clone(),
            split[..10].to_vec(),
            split[10..].to_vec(),
        ]);
        let mut guard = H1Guard::new(inner, Arc::new(Verdict::default()), HEAD_LIMIT);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut storage = vec![0u8; 2 * READ_SIZE];
        let mut rb = ReadBuf::new(&mut storage);
        assert!(Pin::new(&mut guard).poll_read(&mut cx, &mut rb).is_ready());
        assert_eq!(rb.filled(), &request[..]);
        // Straight into hyper's buffer: nothing was staged or held.
        assert_eq!(guard.ready.capacity(), 0);
        assert_eq!(guard.scanner.line.capacity(), 0);
        let mut rb = ReadBuf::new(&mut storage);
        assert!(Pin::new(&mut guard).poll_read(&mut cx, &mut rb).is_ready());
        assert_eq!(rb.filled(), &split[..]);
        // The held head's buffer is kept for the next one.
        assert!(guard.scanner.line.is_empty() && guard.scanner.line.capacity() > 0);
    }

    #[test]
    fn heads_are_read_in_place_with_hypers_first_read_buffer() {
        // Typical proxied heads (a JWT makes each about 600 bytes), five
        // pipelined, read with the 2 KiB our hyper starts each connection's
        // read buffer at.
        let mut head =
            b"GET /v1/accounts/A-1 HTTP/1.1\r\nhost: x\r\nauthorization: Bearer ".to_vec();
        head.extend_from_slice(&[b'e'; 560]);
        head.extend_from_slice(b"\r\n\r\n");
        let input = head.repeat(5);
        let inner = Pieces::never_pending(vec![input.clone()]);
        let mut guard = H1Guard::new(inner, Arc::new(Verdict::default()), HEAD_LIMIT);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut storage = vec![0u8; 2048];
        let mut rb = ReadBuf::new(&mut storage);
        assert!(Pin::new(&mut guard).poll_read(&mut cx, &mut rb).is_ready());
        // The socket was read into hyper's buffer (2 KiB of room), not into
        // the guard's own 8 KiB staging buffer.
        assert_eq!(guard.inner.delivered[0].len(), 2048);
        // What passed is the complete heads, in place; the incomplete one
        // at the end is held.
        let whole = 2048 / head.len() * head.len();
        assert_eq!(rb.filled(), &input[..whole]);
        assert_eq!(guard.scanner.line, &input[whole..2048]);
    }

    /// A guard with h2c detection over `pieces`, no `Pending` from the socket.
    fn detecting_guard(pieces: Vec<Vec<u8>>) -> (H1Guard<Pieces>, Arc<Verdict>) {
        let verdict = Arc::new(Verdict::default());
        let inner = Pieces::never_pending(pieces);
        let guard = H1Guard::new(inner, verdict.clone(), HEAD_LIMIT).detect_h2c();
        (guard, verdict)
    }

    /// Reads with an 8 KiB buffer (as hyper's grows to) until EOF or `Pending`.
    fn read_all(guard: &mut H1Guard<Pieces>) -> (Vec<u8>, bool) {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut out = Vec::new();
        loop {
            let mut storage = vec![0u8; READ_SIZE];
            let mut rb = ReadBuf::new(&mut storage);
            match Pin::new(&mut *guard).poll_read(&mut cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => return (out, true),
                Poll::Ready(Ok(())) => out.extend_from_slice(rb.filled()),
                Poll::Ready(Err(e)) => panic!("read error {e}"),
                Poll::Pending => return (out, false),
            }
        }
    }

    #[test]
    fn detection_decides_http1_at_the_first_byte_and_reads_in_place() {
        let request = b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n".to_vec();
        let (mut guard, verdict) = detecting_guard(vec![request.clone()]);
        assert!(verdict.undecided());
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut storage = vec![0u8; READ_SIZE];
        let mut rb = ReadBuf::new(&mut storage);
        assert!(Pin::new(&mut guard).poll_read(&mut cx, &mut rb).is_ready());
        assert_eq!(rb.filled(), &request[..]);
        // The first read went straight into hyper's buffer.
        assert_eq!(guard.ready.capacity(), 0);
        assert!(!verdict.undecided() && !verdict.is_h2c());
    }

    #[test]
    fn a_preface_in_tiny_pieces_is_detected_and_handed_over_whole() {
        let mut input = H2_PREFACE.to_vec();
        input.extend_from_slice(b"\0\0\0\x04\0\0\0\0\0"); // an empty SETTINGS frame
        input.extend_from_slice(b"GET / HTTP/1.1\r\nfoo\n\n"); // never checked
        for step in [1, 2, 3, 5, 23, 24, 25] {
            let pieces: Vec<Vec<u8>> = input.chunks(step).map(<[u8]>::to_vec).collect();
            let (mut guard, verdict) = detecting_guard(pieces);
            let (before, eof) = read_all(&mut guard);
            // Nothing reached hyper's HTTP/1 side; the guard stopped.
            assert!(before.is_empty() && !eof, "step {step}");
            assert!(verdict.is_h2c() && !verdict.undecided(), "step {step}");
            // Reads stay stopped until the hand-over.
            assert_eq!(read_all(&mut guard), (Vec::new(), false));
            guard.resume_after_preface(&[]);
            let (after, eof) = read_all(&mut guard);
            assert!(eof, "step {step}");
            assert_eq!(after, input, "step {step}");
        }
    }

    #[test]
    fn what_hyper_had_read_comes_first_after_the_hand_over() {
        let (mut guard, _) = detecting_guard(vec![H2_PREFACE.to_vec(), b"rest".to_vec()]);
        assert_eq!(read_all(&mut guard), (Vec::new(), false));
        guard.resume_after_preface(b"early");
        let mut expected = b"early".to_vec();
        expected.extend_from_slice(H2_PREFACE);
        expected.extend_from_slice(b"rest");
        assert_eq!(read_all(&mut guard), (expected, true));
    }

    #[test]
    fn a_preface_cut_short_or_gone_astray_is_http1() {
        // EOF inside the preface; a mismatch at its last byte; a request
        // line that starts like it. All go to hyper as HTTP/1, checked.
        let cases: [&[u8]; 3] = [
            b"PRI * HTTP/2.0\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\r",
            b"PRI * HTTP/1.1\r\nhost: x\r\n\r\n",
        ];
        for input in cases {
            for step in [1, 4, input.len()] {
                let pieces: Vec<Vec<u8>> = input.chunks(step).map(<[u8]>::to_vec).collect();
                let (mut guard, verdict) = detecting_guard(pieces.clone());
                let detected = read_all(&mut guard);
                assert!(!verdict.is_h2c() && !verdict.undecided());
                // Exactly what the guard without detection passes.
                let (mut plain, _) = detecting_guard(pieces);
                plain.detect = Detect::Done;
                assert_eq!(detected, read_all(&mut plain), "{input:?} step {step}");
            }
        }
    }

    #[test]
    fn detection_changes_nothing_for_http1_streams() {
        let mut rng = fastrand::Rng::with_seed(0xd37e_c7ed);
        for case in 0..3_000 {
            let input = random_stream(&mut rng);
            if input.starts_with(H2_PREFACE) {
                continue;
            }
            let mut pieces = Vec::new();
            let mut rest = &input[..];
            let most = [1, 3, 24, 700, usize::MAX][rng.usize(0..5)];
            while !rest.is_empty() {
                let n = rng.usize(1..=most.min(rest.len()));
                pieces.push(rest[..n].to_vec());
                rest = &rest[n..];
            }
            let mut a = rng.clone();
            let mut b = rng.clone();
            rng.u64(..);
            let plain = drive_guard_with(pieces.clone(), HEAD_LIMIT, &mut a, false);
            let detecting = drive_guard_with(pieces, HEAD_LIMIT, &mut b, true);
            assert_eq!(
                detecting,
                plain,
                "case {case}: {:?}",
                String::from_utf8_lossy(&input)
            );
        }
    }

    #[test]
    fn line_at_a_time_head_matches_the_byte_at_a_time_reference() {
        // Heads from a small alphabet (so CR, LF, colons and blank lines are
        // common), small limits (so the limit lands everywhere), any split.
        let alphabet = b"ab: \r\n\r\n\n";
        let mut rng = fastrand::Rng::with_seed(0x9e37_79b9);
        for case in 0..20_000 {
            let len = rng.usize(0..80);
            let mut input: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.usize(0..alphabet.len())])
                .collect();
            if case % 3 == 0 {
                input.splice(0..0, b"GET / HTTP/1.1\r\n".iter().copied());
            }
            let limit = rng.usize(1..64);
            let step = rng.usize(1..12);
            let (mut a, mut b) = (
                Scanner::with_head_limit(limit),
                Scanner::with_head_limit(limit),
            );
            let (mut out_a, mut out_b) = (BytesMut::new(), BytesMut::new());
            for piece in input.chunks(step) {
                let ra = a.head(piece, &mut out_a);
                let rb = b.head_bytewise(piece, &mut out_b);
                let ctx = format!("case {case}: limit {limit} step {step} input {input:?}");
                assert_eq!(ra, rb, "{ctx}");
                assert_eq!(out_a, out_b, "{ctx}");
                assert_eq!(a.state, b.state, "{ctx}");
                assert_eq!(a.line, b.line, "{ctx}");
                assert_eq!(
                    (a.head_line_start, a.head_seen_line),
                    (b.head_line_start, b.head_seen_line),
                    "{ctx}"
                );
                if ra.0 < piece.len() || a.state != State::Head || ra.1 != Outcome::Continue {
                    break;
                }
            }
        }
    }
}
