//! Request completion: one access-log line (target `access`), the request
//! metrics, and a record in the `/debug/requests` ring — the same facts in
//! all three, from one place.
//!
//! With `log_format: json` (the default) and the `access` target enabled,
//! the access line does not go through `tracing`: it is written here, in the
//! exact shape the `tracing-subscriber` JSON formatter gave it
//! (`{"timestamp":…,"level":"INFO","message":"request",<fields>,"target":"access"}`,
//! absent fields left out), into a per-thread buffer, and handed to one
//! writer thread that writes batches to stdout ([`install_json_writer`]).
//! With `log_format: text`, or without an installed writer (in-process
//! tests, tools), the line is a `tracing` event as before.
//!
//! The writer never makes a request wait on stdout: lines queue in a
//! bounded buffer ([`MAX_PENDING_BYTES`]); when stdout is too slow for it
//! to drain, new lines are dropped and counted
//! (`gateway_access_log_dropped_lines_total`). Blocking instead would stall
//! every request behind a stuck log pipe. Each batch is written whole while
//! holding stdout's lock, so lines never interleave with the other log lines
//! mid-line; [`flush`] (called at shutdown) waits for what is queued.

use std::cell::RefCell;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderValue, Method};
use prometheus_client::metrics::counter::Counter;

use super::debug::{
    DebugRing, RequestFacts, RequestRecord, Values, date_time_seconds, encode_values, field,
    put_digits,
};
use super::trail::Trail;
use crate::layers::rescue::RescuedError;
use crate::metrics::RequestMetrics;

/// What the request-path layers need from telemetry: the debug ring and the
/// request metrics. Shared (`Arc`) by the track-ID and trace layers.
#[derive(Clone)]
pub struct Recorder {
    ring: Arc<DebugRing>,
    metrics: Option<RequestMetrics>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("ring_capacity", &self.ring.capacity())
            .field("metrics", &self.metrics.is_some())
            .finish()
    }
}

/// Everything known about a request when its response headers are ready.
#[derive(Debug)]
pub struct Completion<'a> {
    /// Arrival (wall clock, for the ring).
    pub time: SystemTime,
    /// Arrival (monotonic, for latency).
    pub started: Instant,
    /// The request's track ID.
    pub track_id: &'a HeaderValue,
    /// Trace ID (hex) when known.
    pub trace_id: Option<Box<str>>,
    /// Request method.
    pub method: &'a Method,
    /// Request path, without the query string.
    pub path: Box<str>,
    /// Status sent to the caller.
    pub status: u16,
    /// Request body size when known.
    pub bytes_in: Option<u64>,
    /// Response body size when known.
    pub bytes_out: Option<u64>,
    /// The gateway error behind the response, if any.
    pub rescued: Option<&'a RescuedError>,
    /// `Zuora-Request-Id` on the response (used when the trail has none).
    pub response_request_id: Option<&'a HeaderValue>,
    /// What the layers decided.
    pub trail: Trail,
}

fn ms(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

impl Recorder {
    /// A recorder over `ring`, recording into `metrics` when given.
    pub fn new(ring: Arc<DebugRing>, metrics: Option<RequestMetrics>) -> Self {
        Recorder { ring, metrics }
    }

    /// The debug ring.
    pub fn ring(&self) -> &Arc<DebugRing> {
        &self.ring
    }

    /// Increments the in-flight gauge (paired with [`Recorder::request_ended`]).
    pub fn request_started(&self) {
        if let Some(m) = &self.metrics {
            m.in_flight.inc();
        }
    }

    /// Decrements the in-flight gauge.
    pub fn request_ended(&self) {
        if let Some(m) = &self.metrics {
            m.in_flight.dec();
        }
    }

    /// Logs, counts and keeps one completed request.
    pub fn complete(&self, c: Completion<'_>) {
        let latency = c.started.elapsed();
        let t = &c.trail;
        let upstream = t.upstream.as_ref();
        // Zuora's request ID from the trail, else from the response (then the
        // request counts as having an upstream part, as before).
        let trail_request_id = upstream.and_then(|u| u.request_id.as_ref());
        let request_id = trail_request_id.or(c.response_request_id);
        let upstream_latency = match (upstream, c.response_request_id) {
            (Some(u), _) => Some(u.latency),
            (None, Some(_)) => Some(Duration::ZERO),
            (None, None) => None,
        };
        let facts = RequestFacts {
            time: c.time,
            track_id: c.track_id.to_str().unwrap_or(""),
            trace_id: c.trace_id.as_deref(),
            method: c.method.as_str(),
            path: &c.path,
            route: t.route.as_ref().map(|r| r.name()),
            caller: t.caller.as_deref(),
            entity_ids: t.entity_ids.as_ref().and_then(|v| v.to_str().ok()),
            status: c.status,
            latency,
            upstream_status: upstream.and_then(|u| u.status),
            upstream_attempts: upstream.map_or(0, |u| u.attempts),
            upstream_latency,
            zuora_request_id: request_id.and_then(|v| v.to_str().ok()),
            error: c.rescued.map(|e| (e.kind, e.code.as_str())),
            notes: &t.notes,
            notes_dropped: t.notes_dropped,
        };
        let sink = SINK.get();
        if sink.is_none() {
            tracing_line(&facts, c.bytes_in, c.bytes_out);
        }
        if let Some(m) = &self.metrics {
            m.record(
                facts.route.unwrap_or("none"),
                facts.status,
                facts.caller.unwrap_or("unknown"),
                latency,
                upstream.filter(|u| u.attempts > 0).map(|u| u.latency),
            );
        }
        if sink.is_some() || self.ring.enabled() {
            // The facts are JSON-encoded once; the ring keeps that text and
            // the access line copies its values.
            with_buffers(|values, line| {
                let v = encode_values(values, &facts);
                if let Some(sink) = sink {
                    let now = SystemTime::now();
                    sink.enqueue_with(v.text_len() + MAX_LINE_EXTRA, line, |out| {
                        write_line_from_values(out, now, &v, c.bytes_in, c.bytes_out)
                    });
                }
                if self.ring.enabled() {
                    self.ring.push(RequestRecord::from_values(&v, &facts));
                }
            });
        }
    }
}

thread_local! {
    /// Encoded values and access line, reused by every request on this thread.
    static BUFFERS: RefCell<(Vec<u8>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Runs `f` with this thread's (cleared) values buffer and its line buffer.
fn with_buffers<R>(f: impl FnOnce(&mut Vec<u8>, &mut Vec<u8>) -> R) -> R {
    BUFFERS.with(|cell| match cell.try_borrow_mut() {
        Ok(mut b) => {
            let (values, line) = &mut *b;
            values.clear();
            f(values, line)
        }
        // Only if re-entered on this thread: fresh buffers.
        Err(_) => f(&mut Vec::new(), &mut Vec::new()),
    })
}

/// The access line as a `tracing` event (text format; no installed writer).
fn tracing_line(f: &RequestFacts<'_>, bytes_in: Option<u64>, bytes_out: Option<u64>) {
    tracing::info!(
        target: "access",
        track_id = f.track_id,
        trace_id = f.trace_id,
        method = f.method,
        route = f.route,
        path = f.path,
        caller = f.caller,
        status = f.status,
        upstream_status = f.upstream_status,
        zuora_request_id = f.zuora_request_id,
        latency_ms = ms(f.latency),
        upstream_latency_ms = f.upstream_latency.map(ms),
        bytes_in,
        bytes_out,
        error_kind = f.error.map(|e| e.0),
        error_code = f.error.map(|e| e.1),
        "request"
    );
}

/// Appends the JSON access line of `f` (with its newline) to `buf`; the same
/// keys, order and number formats as `tracing-subscriber`'s JSON formatter
/// (flattened event), timestamped `now` with microseconds.
pub fn write_json_line(
    buf: &mut Vec<u8>,
    now: SystemTime,
    f: &RequestFacts<'_>,
    bytes_in: Option<u64>,
    bytes_out: Option<u64>,
) {
    let mut values = Vec::new();
    let v = encode_values(&mut values, f);
    write_line_from_values(buf, now, &v, bytes_in, bytes_out);
}

/// The access line from the already encoded values (see [`write_json_line`]):
/// constant key texts between copies of the values; a value that is `null`
/// or empty leaves its key out, as `tracing` leaves out a `None` field.
fn write_line_from_values(
    out: &mut Vec<u8>,
    now: SystemTime,
    v: &Values<'_>,
    bytes_in: Option<u64>,
    bytes_out: Option<u64>,
) {
    #[inline(always)]
    fn opt(out: &mut Vec<u8>, key: &[u8], v: &Values<'_>, i: usize) {
        v.append_present(key, i, out);
    }
    out.reserve(v.text_len() + 256);
    out.extend_from_slice(b"{\"timestamp\":\"");
    out.extend_from_slice(&timestamp_micros(now));
    out.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"request\",\"track_id\":");
    v.append(field::TRACK_ID, out);
    opt(out, b",\"trace_id\":", v, field::TRACE_ID);
    out.extend_from_slice(b",\"method\":");
    v.append(field::METHOD, out);
    opt(out, b",\"route\":", v, field::ROUTE);
    out.extend_from_slice(b",\"path\":");
    v.append(field::PATH, out);
    opt(out, b",\"caller\":", v, field::CALLER);
    out.extend_from_slice(b",\"status\":");
    v.append(field::STATUS, out);
    opt(out, b",\"upstream_status\":", v, field::UPSTREAM_STATUS);
    opt(out, b",\"zuora_request_id\":", v, field::ZUORA_REQUEST_ID);
    out.extend_from_slice(b",\"latency_ms\":");
    v.append(field::LATENCY_MS, out);
    opt(
        out,
        b",\"upstream_latency_ms\":",
        v,
        field::UPSTREAM_LATENCY_MS,
    );
    if let Some(n) = bytes_in {
        out.extend_from_slice(b",\"bytes_in\":");
        json::u64(out, n);
    }
    if let Some(n) = bytes_out {
        out.extend_from_slice(b",\"bytes_out\":");
        json::u64(out, n);
    }
    opt(out, b",\"error_kind\":", v, field::ERROR_KIND);
    opt(out, b",\"error_code\":", v, field::ERROR_CODE);
    out.extend_from_slice(b",\"target\":\"access\"}\n");
}

/// `2026-11-29T08:26:00.123456Z` (what `tracing-subscriber` writes).
fn timestamp_micros(now: SystemTime) -> [u8; 27] {
    let d = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut out = [0u8; 27];
    out[..19].copy_from_slice(&date_time_seconds(d.as_secs()));
    out[19] = b'.';
    let micros = d.subsec_micros();
    out[20..23].copy_from_slice(&json::padded(micros / 1000));
    out[23..26].copy_from_slice(&json::padded(micros % 1000));
    out[26] = b'Z';
    out
}

/// JSON values written into byte buffers, exactly as `serde_json` writes
/// them (checked in the tests): strings escaped the same way, integers in
/// decimal, durations as `serde_json` writes the `f64` milliseconds.
pub(crate) mod json {
    use std::time::Duration;

    /// `s` as a JSON string: `"` and `\`, and control characters escaped
    /// (`\b \f \n \r \t`, else `\u00xx`); everything else as is.
    #[inline(always)]
    pub(crate) fn str(out: &mut Vec<u8>, s: &str) {
        let bytes = s.as_bytes();
        if plain(bytes) {
            // The usual case, inlined: quotes around a copy.
            out.reserve(bytes.len() + 2);
            out.push(b'"');
            out.extend_from_slice(bytes);
            out.push(b'"');
        } else {
            escaped(out, bytes);
        }
    }

    /// Whether `bytes` need no escaping: eight bytes at a time (a
    /// word-at-a-time test for bytes below 0x20, `"` and `\`), the last
    /// word overlapping the previous one; shorter texts byte by byte.
    #[inline(always)]
    fn plain(bytes: &[u8]) -> bool {
        const ONES: u64 = 0x0101_0101_0101_0101;
        const HIGH: u64 = 0x8080_8080_8080_8080;
        /// High bit set in each byte lane that is below 0x20, `"` or `\`
        /// (exact as to whether any lane is).
        fn special(w: u64) -> u64 {
            let ctrl = w.wrapping_sub(ONES * 0x20) & !w;
            let q = w ^ (ONES * u64::from(b'"'));
            let quote = q.wrapping_sub(ONES) & !q;
            let b = w ^ (ONES * u64::from(b'\\'));
            let backslash = b.wrapping_sub(ONES) & !b;
            (ctrl | quote | backslash) & HIGH
        }
        fn word(chunk: &[u8]) -> u64 {
            let mut w = [0u8; 8];
            w.copy_from_slice(chunk);
            u64::from_le_bytes(w)
        }
        if bytes.len() < 8 {
            return bytes
                .iter()
                .all(|&b| (b >= 0x20) & (b != b'"') & (b != b'\\'));
        }
        let mut chunks = bytes.chunks_exact(8);
        let mut any = 0u64;
        for c in &mut chunks {
            any |= special(word(c));
        }
        if !chunks.remainder().is_empty() {
            any |= special(word(bytes.get(bytes.len() - 8..).unwrap_or(&[0x20; 8])));
        }
        any == 0
    }

    /// [`str`] for a text with something to escape.
    #[cold]
    fn escaped(out: &mut Vec<u8>, bytes: &[u8]) {
        out.reserve(bytes.len() + 2);
        out.push(b'"');
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut start = 0;
        for (i, &b) in bytes.iter().enumerate() {
            let short: &[u8] = match b {
                b'"' => b"\\\"",
                b'\\' => b"\\\\",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                b'\t' => b"\\t",
                0x08 => b"\\b",
                0x0c => b"\\f",
                0x00..=0x1f => b"",
                _ => continue,
            };
            out.extend_from_slice(bytes.get(start..i).unwrap_or(b""));
            if short.is_empty() {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            } else {
                out.extend_from_slice(short);
            }
            start = i + 1;
        }
        out.extend_from_slice(bytes.get(start..).unwrap_or(b""));
        out.push(b'"');
    }

    /// A string or `null`.
    #[inline]
    pub(crate) fn opt_str(out: &mut Vec<u8>, s: Option<&str>) {
        match s {
            Some(s) => str(out, s),
            None => null(out),
        }
    }

    /// `null`.
    pub(crate) fn null(out: &mut Vec<u8>) {
        out.extend_from_slice(b"null");
    }

    /// An integer in decimal.
    #[inline(always)]
    pub(crate) fn u64(out: &mut Vec<u8>, n: u64) {
        // Statuses, attempts and most latencies: one table look-up and a
        // fixed-size copy (no call), its unused tail cut off.
        match n {
            0..=999 => {
                let (digits, len) = unpadded(n as u32);
                let end = out.len() + len;
                out.extend_from_slice(&digits.to_le_bytes());
                out.truncate(end);
            }
            _ => u64_long(out, n),
        }
    }

    /// For every `n` below 1000: its three decimal digits, zero-padded, in
    /// the low bytes (first digit lowest), and its number of leading zeros
    /// (at most 2: `0` is one digit) in the high byte.
    static THREE_DIGITS: [u32; 1000] = {
        let mut table = [0u32; 1000];
        let mut n = 0;
        while n < 1000 {
            let (h, t, o) = (n / 100, (n / 10) % 10, n % 10);
            let lead = if h != 0 {
                0
            } else if t != 0 {
                1
            } else {
                2
            };
            table[n] = (b'0' as u32 + h as u32)
                | ((b'0' as u32 + t as u32) << 8)
                | ((b'0' as u32 + o as u32) << 16)
                | (lead << 24);
            n += 1;
        }
        table
    };

    /// `n` (below 1000; higher digits are dropped) as three zero-padded
    /// decimal digits.
    #[inline(always)]
    pub(crate) fn padded(n: u32) -> [u8; 3] {
        let e = THREE_DIGITS.get(n as usize).copied().unwrap_or(0x0030_3030);
        let [a, b, c, _] = e.to_le_bytes();
        [a, b, c]
    }

    /// `n` (below 1000) as decimal digits in the low bytes of a word (first
    /// digit lowest), and how many there are.
    #[inline(always)]
    fn unpadded(n: u32) -> (u32, usize) {
        let e = THREE_DIGITS.get(n as usize).copied().unwrap_or(0x0200_3030);
        let lead = e >> 24;
        ((e & 0x00ff_ffff) >> (8 * lead), 3 - lead as usize)
    }

    /// [`u64`] of any size.
    fn u64_long(out: &mut Vec<u8>, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        out.extend_from_slice(&digits[at..]);
    }

    /// A float as `serde_json` writes it (`null` if not finite).
    pub(crate) fn f64(out: &mut Vec<u8>, n: f64) {
        // Writing into a Vec cannot fail.
        let _ = serde_json::to_writer(out, &n);
    }

    /// A duration in milliseconds with microsecond precision, exactly as
    /// `serde_json` writes the `f64` `micros / 1000.0` (`1.5`, `2.0`,
    /// `0.864`): that float's shortest round-trip form is the decimal itself
    /// below 2^43 ms (278 years); past that, the float path is used.
    pub(crate) fn millis(out: &mut Vec<u8>, d: Duration) {
        // Below one second (nearly every latency): the whole text built on
        // the stack and copied once.
        if d.as_secs() == 0 {
            let micros = d.subsec_micros();
            let (int, int_len) = unpadded(micros / 1000);
            // `.FFF`, then its trailing zeros dropped but one digit kept
            // (`2.0`): the highest byte that is not a `0` digit (the point
            // always is not) ends it.
            let [f0, f1, f2] = padded(micros % 1000);
            let frac = u32::from_le_bytes([b'.', f0, f1, f2]);
            let significant = frac ^ 0x3030_3000;
            let frac_len = (4 - significant.leading_zeros() as usize / 8).max(2);
            let text = u64::from(int) | (u64::from(frac) << (8 * int_len));
            let end = out.len() + int_len + frac_len;
            out.extend_from_slice(&text.to_le_bytes());
            out.truncate(end);
            return;
        }
        millis_long(out, d);
    }

    /// [`millis`] of a second or more.
    #[inline(never)]
    fn millis_long(out: &mut Vec<u8>, d: Duration) {
        let micros = match u64::try_from(d.as_micros()) {
            Ok(m) if m < (1u64 << 43) * 1000 => m,
            _ => return f64(out, (d.as_micros() as f64) / 1000.0),
        };
        u64(out, micros / 1000);
        let frac = (micros % 1000) as u32;
        if frac == 0 {
            out.extend_from_slice(b".0");
            return;
        }
        let mut text = *b".000";
        super::put_digits(&mut text[1..], frac);
        let len = if frac.is_multiple_of(100) {
            2
        } else if frac.is_multiple_of(10) {
            3
        } else {
            4
        };
        out.extend_from_slice(&text[..len]);
    }
}

// ------------------------------------------------------------------ writer

/// Most bytes of access lines waiting for stdout (about 9,000 lines); beyond
/// it new lines are dropped and counted.
pub const MAX_PENDING_BYTES: usize = 4 << 20;
/// After writing a batch, the writer waits this long for more lines before
/// the next `write`: under load, one syscall carries many lines; the log
/// lags by at most this much.
const LINGER: Duration = Duration::from_millis(5);
/// An access line is at most this much longer than its encoded values
/// (keys, timestamp, byte counts: about 360 bytes).
const MAX_LINE_EXTRA: usize = 512;
/// Batch buffers larger than this are shrunk after use (a stall grew them).
const KEEP_BUFFER_BYTES: usize = 256 << 10;
/// At most one warning about dropped lines per this period.
const DROP_WARNING_EVERY: Duration = Duration::from_secs(60);

static SINK: OnceLock<Arc<LineSink>> = OnceLock::new();
static DROPPED: LazyLock<Counter> = LazyLock::new(Counter::default);

/// Access-log lines dropped because stdout could not keep up (or failed):
/// `gateway_access_log_dropped_lines_total`.
pub fn dropped_lines() -> Counter {
    DROPPED.clone()
}

/// Writes JSON access lines through a dedicated writer thread from now on
/// (call once, after the global subscriber is installed, when the format is
/// JSON and the `access` target is enabled). Returns `false` when the
/// thread could not be started (lines then keep going through `tracing`).
pub fn install_json_writer() -> bool {
    if SINK.get().is_some() {
        return true;
    }
    let out = |batch: &[u8]| {
        let mut out = std::io::stdout().lock();
        out.write_all(batch)?;
        out.flush()
    };
    match LineSink::spawn(out, DROPPED.clone()) {
        Ok(sink) => {
            let _ = SINK.set(sink);
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the access-log writer; using the log formatter");
            false
        }
    }
}

/// Waits (at most `timeout`) until every access line queued so far is
/// written. Call at shutdown, after the server has drained.
pub async fn flush(timeout: Duration) {
    if let Some(sink) = SINK.get() {
        sink.flush(timeout).await;
    }
}

/// A queue of whole lines and the thread that writes them.
struct LineSink {
    state: Mutex<Pending>,
    wake: Condvar,
    /// Bytes written (or given up on) so far; compared with `Pending::queued`.
    written: AtomicU64,
    flushed: tokio::sync::Notify,
    dropped: Counter,
}

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    lines: u64,
    /// Bytes ever queued.
    queued: u64,
    writer_waiting: bool,
}

impl LineSink {
    /// Starts the writer thread; `out` writes one batch of whole lines.
    fn spawn<W>(mut out: W, dropped: Counter) -> std::io::Result<Arc<LineSink>>
    where
        W: FnMut(&[u8]) -> std::io::Result<()> + Send + 'static,
    {
        let sink = Arc::new(LineSink {
            state: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            written: AtomicU64::new(0),
            flushed: tokio::sync::Notify::new(),
            dropped,
        });
        let s = sink.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || s.run(&mut out))?;
        Ok(sink)
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Formats `f`'s line on this thread and queues it.
    #[cfg(test)]
    fn write_line(&self, f: &RequestFacts<'_>, bytes_in: Option<u64>, bytes_out: Option<u64>) {
        let mut values = Vec::new();
        let v = encode_values(&mut values, f);
        let mut line = Vec::new();
        self.enqueue_with(v.text_len() + MAX_LINE_EXTRA, &mut line, |out| {
            write_line_from_values(out, SystemTime::now(), &v, bytes_in, bytes_out)
        });
    }

    /// Queues whole lines; drops them (counted) when the queue is full.
    fn enqueue(&self, lines: &[u8]) {
        if self
            .try_queue(lines.len(), |out| out.extend_from_slice(lines))
            .is_err()
        {
            self.dropped.inc();
        }
    }

    /// Writes one line (`write` appends it) straight into the queue, without
    /// a copy through a buffer of its own, when it surely fits (`most`: its
    /// greatest possible length); else as [`LineSink::enqueue`], through
    /// `line` (dropped, counted, exactly when that would drop it).
    fn enqueue_with(&self, most: usize, line: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
        if let Err(write) = self.try_queue(most, write) {
            line.clear();
            write(line);
            self.enqueue(line);
        }
    }

    /// Under the queue's lock: `write` appends one line of at most `most`
    /// bytes to the queue, unless that could pass [`MAX_PENDING_BYTES`]
    /// (then `write` comes back unused).
    fn try_queue<W: FnOnce(&mut Vec<u8>)>(&self, most: usize, write: W) -> Result<(), W> {
        let wake = {
            let mut p = self.lock();
            if p.bytes.len() + most > MAX_PENDING_BYTES {
                return Err(write);
            }
            let before = p.bytes.len();
            write(&mut p.bytes);
            let written = p.bytes.len() - before;
            debug_assert!(written <= most, "{written} > {most}");
            p.lines += 1;
            p.queued += written as u64;
            std::mem::replace(&mut p.writer_waiting, false)
        };
        // Only an idle writer needs a wake-up (a futex call); a busy one
        // takes the line with its next batch.
        if wake {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// The writer thread: takes everything queued, writes it in one call,
    /// lingers, repeats; sleeps while nothing is queued.
    fn run(&self, out: &mut dyn FnMut(&[u8]) -> std::io::Result<()>) {
        let mut batch = Vec::new();
        let mut warned: Option<Instant> = None;
        let mut reported = self.dropped.get();
        loop {
            let (lines, end) = {
                let mut p = self.lock();
                while p.bytes.is_empty() {
                    p.writer_waiting = true;
                    p = self
                        .wake
                        .wait(p)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                p.writer_waiting = false;
                std::mem::swap(&mut p.bytes, &mut batch);
                (std::mem::take(&mut p.lines), p.queued)
            };
            if out(&batch).is_err() {
                self.dropped.inc_by(lines);
            }
            batch.clear();
            if batch.capacity() > KEEP_BUFFER_BYTES {
                batch.shrink_to(KEEP_BUFFER_BYTES / 4);
            }
            self.written.store(end, Ordering::Release);
            self.flushed.notify_waiters();
            let dropped = self.dropped.get();
            if dropped > reported && warned.is_none_or(|t| t.elapsed() >= DROP_WARNING_EVERY) {
                tracing::warn!(
                    dropped = dropped - reported,
                    "access-log lines dropped: stdout too slow or failing"
                );
                reported = dropped;
                warned = Some(Instant::now());
            }
            std::thread::sleep(LINGER);
        }
    }

    async fn flush(&self, timeout: Duration) {
        let target = self.lock().queued;
        let written = async {
            loop {
                let notified = std::pin::pin!(self.flushed.notified());
                let mut notified = notified;
                // Registered before the check, so a batch finishing in
                // between still wakes us.
                notified.as_mut().enable();
                if self.written.load(Ordering::Acquire) >= target {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(timeout, written).await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::telemetry::trail::Note;
    use std::sync::Mutex as StdMutex;
    use tracing_subscriber::layer::SubscriberExt;

    fn facts<'a>(notes: &'a [Note]) -> RequestFacts<'a> {
        RequestFacts {
            time: UNIX_EPOCH + Duration::from_millis(1_795_000_000_123),
            track_id: "t-\\1",
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736"),
            method: "PUT",
            path: "/v1/uno/data-backfill/propagation/jobs/\"x\"",
            route: Some("stop-auto-backfill-job"),
            caller: Some("billing-test"),
            entity_ids: Some("e-1"),
            status: 429,
            latency: Duration::from_micros(1500),
            upstream_status: Some(200),
            upstream_attempts: 1,
            upstream_latency: Some(Duration::from_micros(1234)),
            zuora_request_id: Some("zr-1"),
            error: Some(("rate_limited", "99000670")),
            notes,
            notes_dropped: 0,
        }
    }

    /// A `MakeWriter` collecting everything written.
    #[derive(Clone, Default)]
    struct Collect(Arc<StdMutex<Vec<u8>>>);

    impl std::io::Write for Collect {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The line `tracing-subscriber` writes for `f`, configured as
    /// `Telemetry::init` configures it for `log_format: json`.
    fn formatter_line(
        f: &RequestFacts<'_>,
        bytes_in: Option<u64>,
        bytes_out: Option<u64>,
    ) -> String {
        let out = Collect::default();
        let w = out.clone();
        let layer = tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(move || w.clone());
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || tracing_line(f, bytes_in, bytes_out));
        String::from_utf8(out.0.lock().unwrap().clone()).unwrap()
    }

    fn ours(f: &RequestFacts<'_>, bytes_in: Option<u64>, bytes_out: Option<u64>) -> String {
        let mut buf = Vec::new();
        write_json_line(&mut buf, SystemTime::now(), f, bytes_in, bytes_out);
        String::from_utf8(buf).unwrap()
    }

    /// Both lines with the timestamp value blanked.
    fn without_timestamp(line: &str) -> String {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let ts = v["timestamp"].as_str().unwrap();
        assert_eq!(ts.len(), 27, "{ts}");
        line.replacen(ts, "T", 1)
    }

    #[test]
    fn json_line_is_byte_identical_to_the_formatters_with_every_field() {
        let notes = [];
        let f = facts(&notes);
        let expected = formatter_line(&f, Some(21), Some(0));
        let got = ours(&f, Some(21), Some(0));
        assert_eq!(without_timestamp(&got), without_timestamp(&expected));
        assert!(got.ends_with("\"target\":\"access\"}\n"), "{got}");
    }

    #[test]
    fn json_line_is_byte_identical_to_the_formatters_with_fields_absent() {
        let notes = [];
        let mut f = facts(&notes);
        f.trace_id = None;
        f.route = None;
        f.caller = None;
        f.upstream_status = None;
        f.upstream_latency = None;
        f.zuora_request_id = None;
        f.error = None;
        f.latency = Duration::from_millis(2);
        let expected = formatter_line(&f, None, None);
        let got = ours(&f, None, None);
        assert_eq!(without_timestamp(&got), without_timestamp(&expected));
        let v: serde_json::Value = serde_json::from_str(&got).unwrap();
        assert!(v.get("route").is_none() && v.get("bytes_in").is_none());
        assert_eq!(v["latency_ms"], 2.0);
    }

    #[test]
    fn strings_and_numbers_are_written_as_serde_json_writes_them() {
        let mut samples: Vec<String> = (0u32..0x80)
            .filter_map(char::from_u32)
            .map(|c| format!("a{c}b"))
            .collect();
        samples.extend(
            [
                "",
                "plain/path-123_ok",
                "é \u{2028} \u{7f} 😀",
                "\"\\\n\r\t\u{8}\u{c}\u{0}\u{1f}",
                "tail\\",
                "\"lead",
            ]
            .map(String::from),
        );
        // Every byte that matters at every position of texts around the
        // word size (the quick scan works on eight-byte words).
        for len in 1..=25 {
            for at in 0..len {
                for c in [
                    '"', '\\', '\n', '\u{0}', '\u{1f}', ' ', '!', '#', '[', ']', '\u{7f}', 'é',
                ] {
                    let mut t: Vec<char> = vec!['x'; len];
                    t[at] = c;
                    samples.push(t.into_iter().collect());
                }
            }
        }
        // Every ASCII character at every position of the short texts (the
        // four- and eight-byte word tests).
        for len in 1..=17 {
            for at in 0..len {
                for c in (0u8..0x80).map(char::from) {
                    let mut t: Vec<char> = vec!['x'; len];
                    t[at] = c;
                    samples.push(t.into_iter().collect());
                }
            }
        }
        for s in &samples {
            let mut out = Vec::new();
            json::str(&mut out, s);
            assert_eq!(out, serde_json::to_vec(s).unwrap(), "{s:?}");
        }
        for n in (0u64..=1100).chain([9_999, 10_000, 65_535, 1 << 40, u64::MAX]) {
            let mut out = Vec::new();
            json::u64(&mut out, n);
            assert_eq!(out, serde_json::to_vec(&n).unwrap());
        }
        for micros in [0u64, 1, 864, 1000, 1500, 210_338, 999_999, 123_456_789_012] {
            let v = ms(Duration::from_micros(micros));
            let mut out = Vec::new();
            json::f64(&mut out, v);
            assert_eq!(out, serde_json::to_vec(&v).unwrap(), "{micros} µs");
        }
        let mut out = Vec::new();
        json::f64(&mut out, f64::NAN);
        assert_eq!(out, b"null");
        // Every value of the sub-second fast path, then samples beyond it.
        let mut micros: Vec<u64> = (0..1_000_000).collect();
        micros.extend((0..2000u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 20));
        micros.extend([(1 << 43) * 1000 - 1, (1 << 43) * 1000, u64::MAX]);
        for m in micros {
            let d = Duration::from_micros(m);
            let mut out = Vec::new();
            json::millis(&mut out, d);
            assert_eq!(out, serde_json::to_vec(&ms(d)).unwrap(), "{m} µs");
        }
    }

    #[test]
    fn timestamp_has_microseconds_and_follows_the_clock_across_seconds() {
        let t = UNIX_EPOCH + Duration::from_micros(951_782_399_999_999);
        assert_eq!(&timestamp_micros(t), b"2000-02-28T23:59:59.999999Z");
        let t = t + Duration::from_micros(1);
        assert_eq!(&timestamp_micros(t), b"2000-02-29T00:00:00.000000Z");
        let t = UNIX_EPOCH + Duration::from_micros(1_795_000_000_123_456);
        assert_eq!(&timestamp_micros(t), b"2026-11-18T11:06:40.123456Z");
    }

    /// The batches a test sink received.
    type Batches = Arc<StdMutex<Vec<Vec<u8>>>>;

    fn collecting_sink() -> (Arc<LineSink>, Batches, Counter) {
        let batches = Arc::new(StdMutex::new(Vec::new()));
        let b = batches.clone();
        let dropped = Counter::default();
        let sink = LineSink::spawn(
            move |batch: &[u8]| {
                b.lock().unwrap().push(batch.to_vec());
                Ok(())
            },
            dropped.clone(),
        )
        .unwrap();
        (sink, batches, dropped)
    }

    #[tokio::test]
    async fn queued_lines_are_written_whole_and_flush_waits_for_them() {
        let (sink, batches, dropped) = collecting_sink();
        let notes = [];
        let f = facts(&notes);
        for _ in 0..999 {
            sink.write_line(&f, None, Some(1));
        }
        // The longest line there is (every field, the longest numbers):
        // within the bound the queue reserves for it.
        sink.write_line(&f, Some(u64::MAX), Some(u64::MAX));
        sink.flush(Duration::from_secs(5)).await;
        let all: Vec<u8> = batches.lock().unwrap().concat();
        let lines: Vec<&str> = std::str::from_utf8(&all).unwrap().lines().collect();
        assert_eq!(
            lines.len(),
            1000,
            "flush returns once everything is written"
        );
        for l in &lines {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["track_id"], "t-\\1");
        }
        for b in batches.lock().unwrap().iter() {
            assert_eq!(b.last(), Some(&b'\n'), "batches hold whole lines");
        }
        assert!(
            batches.lock().unwrap().len() < 1000,
            "lines are batched into fewer writes"
        );
        assert_eq!(dropped.get(), 0);
    }

    #[tokio::test]
    async fn a_stuck_writer_drops_and_counts_lines_instead_of_blocking() {
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let gate = StdMutex::new(gate);
        let written = Arc::new(AtomicU64::new(0));
        let w = written.clone();
        let dropped = Counter::default();
        let sink = LineSink::spawn(
            move |batch: &[u8]| {
                // The first write blocks until released, like a full pipe.
                let _ = gate.lock().unwrap().recv();
                w.fetch_add(batch.len() as u64, Ordering::Relaxed);
                Ok(())
            },
            dropped.clone(),
        )
        .unwrap();
        let line = vec![b'x'; 1023];
        let mut line = line;
        line.push(b'\n');
        let started = Instant::now();
        // Twice what the queue holds, plus the batch the writer is stuck on.
        for _ in 0..(2 * MAX_PENDING_BYTES / line.len() + 64) {
            sink.enqueue(&line);
        }
        assert!(started.elapsed() < Duration::from_secs(2), "never blocks");
        assert!(dropped.get() > 0, "drops are counted");
        drop(release);
        sink.flush(Duration::from_secs(5)).await;
        let total = written.load(Ordering::Relaxed);
        assert_eq!(total % line.len() as u64, 0, "only whole lines");
        assert!(total <= (MAX_PENDING_BYTES + 64 * line.len()) as u64 * 2);
    }

    #[tokio::test]
    async fn lines_formatted_into_a_full_queue_are_dropped_whole_and_counted() {
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let gate = StdMutex::new(gate);
        let written = Arc::new(StdMutex::new(Vec::new()));
        let w = written.clone();
        let dropped = Counter::default();
        let sink = LineSink::spawn(
            move |batch: &[u8]| {
                let _ = gate.lock().unwrap().recv();
                w.lock().unwrap().extend_from_slice(batch);
                Ok(())
            },
            dropped.clone(),
        )
        .unwrap();
        let notes = [];
        let f = facts(&notes);
        let line_len = ours(&f, None, Some(1)).len();
        let started = Instant::now();
        let n = 2 * MAX_PENDING_BYTES / line_len + 64;
        for _ in 0..n {
            sink.write_line(&f, None, Some(1));
        }
        assert!(started.elapsed() < Duration::from_secs(5), "never blocks");
        assert!(dropped.get() > 0, "drops are counted");
        drop(release);
        sink.flush(Duration::from_secs(5)).await;
        let all = written.lock().unwrap().clone();
        let lines: Vec<&str> = std::str::from_utf8(&all).unwrap().lines().collect();
        for l in &lines {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["track_id"], "t-\\1");
        }
        assert_eq!(lines.len() as u64 + dropped.get(), n as u64);
        // The batch the writer was stuck on, and the full queue behind it.
        assert!(all.len() <= 2 * (MAX_PENDING_BYTES + line_len * 64));
    }

    #[tokio::test]
    async fn flush_without_a_writer_returns_at_once() {
        tokio::time::timeout(Duration::from_secs(1), flush(Duration::from_secs(30)))
            .await
            .unwrap();
    }
}
