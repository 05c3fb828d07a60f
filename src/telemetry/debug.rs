//! The `/debug/requests` ring: the last N requests' decision trails, in
//! bounded memory, searchable by track ID and status.
//!
//! `GET /debug/requests?track_id=ID&status=429&limit=50` on the admin port
//! answers newest first as JSON:
//! `{"capacity":10000,"requests":[{"caller":"…",…,"track_id":"…",…}],"returned":1}`
//! (keys sorted, as `serde_json` orders them).
//!
//! Memory: each record is serialized once, when the request completes, into
//! the JSON values of the object `/debug/requests` returns for it (the keys
//! are the same for every record and put back when answering), and kept as
//! one shared string plus the arrival time (a number, formatted when
//! answering) and the two facts the filters need (status, where the track ID
//! sits in the text). About 350 bytes per record for a typical proxied
//! request, and nothing of the request is kept alive (no header buffers, no
//! policy snapshot).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderValue, Response, StatusCode, header};

use super::access::json;
use super::trail::Note;
use crate::body::{Body, full};

/// Default number of records returned when `limit` is not given.
pub const DEFAULT_LIMIT: usize = 100;

/// The facts of one completed request, borrowed from the request's state:
/// what the ring keeps (and what the access line is written from).
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// When the request arrived.
    pub time: SystemTime,
    /// Its `Zuora-Track-Id`.
    pub track_id: &'a str,
    /// Its trace ID (hex), when known.
    pub trace_id: Option<&'a str>,
    /// Request method.
    pub method: &'a str,
    /// Request path (no query string).
    pub path: &'a str,
    /// The matched route's name.
    pub route: Option<&'a str>,
    /// The authenticated caller.
    pub caller: Option<&'a str>,
    /// `Zuora-Entity-Ids` sent upstream.
    pub entity_ids: Option<&'a str>,
    /// Status returned to the caller.
    pub status: u16,
    /// Time to response headers.
    pub latency: Duration,
    /// Zuora's status (`None`: no response).
    pub upstream_status: Option<u16>,
    /// Calls made to Zuora.
    pub upstream_attempts: u32,
    /// Time to Zuora's response headers, all attempts (`None`: not called).
    pub upstream_latency: Option<Duration>,
    /// Zuora's `Zuora-Request-Id`.
    pub zuora_request_id: Option<&'a str>,
    /// `(kind, code)` of a gateway error.
    pub error: Option<(&'a str, &'a str)>,
    /// What the layers decided.
    pub notes: &'a [Note],
    /// Notes that did not fit in the trail.
    pub notes_dropped: u32,
}

/// The keys of a record's JSON object, in the order `serde_json` sorts
/// them (the order `/debug/requests` has always answered in).
const KEYS: [&str; FIELDS] = [
    "caller",
    "decisions",
    "decisions_dropped",
    "entity_ids",
    "error_code",
    "error_kind",
    "latency_ms",
    "method",
    "path",
    "route",
    "status",
    "time",
    "trace_id",
    "track_id",
    "upstream_attempts",
    "upstream_latency_ms",
    "upstream_status",
    "zuora_request_id",
];

/// Number of fields of a record.
pub(crate) const FIELDS: usize = 18;

/// Position of each field in [`KEYS`] (and in an encoded record).
pub(crate) mod field {
    pub(crate) const CALLER: usize = 0;
    pub(crate) const DECISIONS: usize = 1;
    pub(crate) const DECISIONS_DROPPED: usize = 2;
    pub(crate) const ENTITY_IDS: usize = 3;
    pub(crate) const ERROR_CODE: usize = 4;
    pub(crate) const ERROR_KIND: usize = 5;
    pub(crate) const LATENCY_MS: usize = 6;
    pub(crate) const METHOD: usize = 7;
    pub(crate) const PATH: usize = 8;
    pub(crate) const ROUTE: usize = 9;
    pub(crate) const STATUS: usize = 10;
    pub(crate) const TIME: usize = 11;
    pub(crate) const TRACE_ID: usize = 12;
    pub(crate) const TRACK_ID: usize = 13;
    pub(crate) const UPSTREAM_ATTEMPTS: usize = 14;
    pub(crate) const UPSTREAM_LATENCY_MS: usize = 15;
    pub(crate) const UPSTREAM_STATUS: usize = 16;
    pub(crate) const ZUORA_REQUEST_ID: usize = 17;
}

/// Separates the values of an encoded record: a control character, which
/// JSON text only ever holds escaped.
const SEPARATOR: u8 = 0x01;

/// A record's fields JSON-encoded, in [`KEYS`] order, separated by
/// [`SEPARATOR`]; an empty value means the key is left out.
pub(crate) struct Values<'b> {
    text: &'b [u8],
    /// `text` followed by [`PADDING`] bytes (for [`Values::append`]).
    padded: &'b [u8],
    starts: [u32; FIELDS],
}

/// Bytes after an encoded text, so that a short value can be copied as a
/// fixed-size block.
const PADDING: usize = 16;

impl<'b> Values<'b> {
    /// Byte range of field `i`'s value.
    fn range(&self, i: usize) -> (usize, usize) {
        let start = self.starts.get(i).map_or(self.text.len(), |&s| s as usize);
        let end = self
            .starts
            .get(i + 1)
            .map_or(self.text.len(), |&next| (next as usize).saturating_sub(1));
        (start, end.max(start))
    }

    /// Appends field `i`'s value to `out`. A short one (most are) is one
    /// fixed-size copy, its tail cut off again, instead of a call to
    /// `memcpy`.
    #[inline(always)]
    pub(crate) fn append(&self, i: usize, out: &mut Vec<u8>) {
        let (start, end) = self.range(i);
        self.append_range(start, end, out);
    }

    /// Appends field `i`'s value to `out` unless it is empty or `null`
    /// (how `tracing` leaves out a `None` field), after `key`.
    #[inline(always)]
    pub(crate) fn append_present(&self, key: &[u8], i: usize, out: &mut Vec<u8>) {
        let (start, end) = self.range(i);
        let value = self.text.get(start..end).unwrap_or(b"");
        if !value.is_empty() && value != b"null" {
            out.extend_from_slice(key);
            self.append_range(start, end, out);
        }
    }

    /// [`Values::append`] of the value at `start..end`.
    #[inline(always)]
    fn append_range(&self, start: usize, end: usize, out: &mut Vec<u8>) {
        if end - start <= PADDING {
            let block = self
                .padded
                .get(start..start + PADDING)
                .and_then(|b| <&[u8; PADDING]>::try_from(b).ok());
            if let Some(block) = block {
                let len = out.len() + (end - start);
                out.extend_from_slice(block);
                out.truncate(len);
                return;
            }
        }
        out.extend_from_slice(self.text.get(start..end).unwrap_or(b""));
    }

    /// Length of the whole encoded text.
    pub(crate) fn text_len(&self) -> usize {
        self.text.len()
    }
}

/// Encodes `f` into `buf` (cleared first); see [`Values`].
pub(crate) fn encode_values<'b>(buf: &'b mut Vec<u8>, f: &RequestFacts<'_>) -> Values<'b> {
    buf.clear();
    let mut starts = [0u32; FIELDS];
    let mut next = |buf: &mut Vec<u8>, i: usize| {
        if i > 0 {
            buf.push(SEPARATOR);
        }
        if let Some(s) = starts.get_mut(i) {
            *s = u32::try_from(buf.len()).unwrap_or(u32::MAX);
        }
    };
    next(buf, field::CALLER);
    json::opt_str(buf, f.caller);
    next(buf, field::DECISIONS);
    buf.push(b'[');
    for (i, n) in f.notes.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        buf.extend_from_slice(b"{\"kind\":");
        json::str(buf, n.kind);
        buf.extend_from_slice(b",\"text\":");
        json::str(buf, &n.text);
        buf.push(b'}');
    }
    buf.push(b']');
    next(buf, field::DECISIONS_DROPPED);
    if f.notes_dropped != 0 {
        json::u64(buf, f.notes_dropped.into());
    }
    next(buf, field::ENTITY_IDS);
    json::opt_str(buf, f.entity_ids);
    next(buf, field::ERROR_CODE);
    json::opt_str(buf, f.error.map(|e| e.1));
    next(buf, field::ERROR_KIND);
    json::opt_str(buf, f.error.map(|e| e.0));
    next(buf, field::LATENCY_MS);
    json::millis(buf, f.latency);
    next(buf, field::METHOD);
    json::str(buf, f.method);
    next(buf, field::PATH);
    json::str(buf, f.path);
    next(buf, field::ROUTE);
    json::opt_str(buf, f.route);
    next(buf, field::STATUS);
    json::u64(buf, f.status.into());
    // The time is kept as a number in the record and formatted when
    // answering (26 bytes less each): its value stays empty here.
    next(buf, field::TIME);
    next(buf, field::TRACE_ID);
    if let Some(t) = f.trace_id {
        json::str(buf, t);
    }
    next(buf, field::TRACK_ID);
    json::str(buf, f.track_id);
    next(buf, field::UPSTREAM_ATTEMPTS);
    json::u64(buf, f.upstream_attempts.into());
    next(buf, field::UPSTREAM_LATENCY_MS);
    match f.upstream_latency {
        Some(d) => json::millis(buf, d),
        None => json::null(buf),
    }
    next(buf, field::UPSTREAM_STATUS);
    match f.upstream_status {
        Some(s) => json::u64(buf, s.into()),
        None => json::null(buf),
    }
    next(buf, field::ZUORA_REQUEST_ID);
    json::opt_str(buf, f.zuora_request_id);
    let len = buf.len();
    buf.extend_from_slice(&[0; PADDING]);
    Values {
        text: buf.get(..len).unwrap_or(b""),
        padded: buf,
        starts,
    }
}

/// One request as kept in the ring: the JSON-encoded values of its
/// `/debug/requests` object in key order, in one shared allocation (the
/// keys are put back when the record is answered).
#[derive(Debug, Clone)]
pub struct RequestRecord {
    values: Arc<[u8]>,
    /// Arrival, milliseconds since the epoch (`time`, formatted when answered).
    time_ms: u64,
    /// Byte range of the (JSON-escaped) track ID inside `values`.
    track_at: u32,
    track_len: u16,
    status: u16,
}

impl RequestRecord {
    /// Serializes `facts`.
    pub fn new(facts: &RequestFacts<'_>) -> RequestRecord {
        let mut buf = Vec::new();
        RequestRecord::from_values(&encode_values(&mut buf, facts), facts)
    }

    /// The record of `facts`, already encoded as `v`.
    pub(crate) fn from_values(v: &Values<'_>, facts: &RequestFacts<'_>) -> RequestRecord {
        // Inside the quotes of the track ID's JSON string.
        let (start, end) = v.range(field::TRACK_ID);
        let (track_at, track_len) = match (
            u32::try_from(start + 1),
            u16::try_from(end.saturating_sub(start + 2)),
        ) {
            (Ok(at), Ok(len)) if len < u16::MAX => (at, len),
            // Track IDs are at most 64 characters; a longer one is not findable.
            _ => (0, u16::MAX),
        };
        let since_epoch = facts.time.duration_since(UNIX_EPOCH).unwrap_or_default();
        RequestRecord {
            values: Arc::from(v.text),
            time_ms: since_epoch
                .as_secs()
                .saturating_mul(1000)
                .saturating_add(u64::from(since_epoch.subsec_millis())),
            track_at,
            track_len,
            status: facts.status,
        }
    }

    /// Appends the record's JSON object (as `/debug/requests` returns it).
    pub fn write_json(&self, out: &mut String) {
        // Built from `&str`s and JSON punctuation: valid UTF-8.
        let text = String::from_utf8_lossy(&self.values);
        out.push('{');
        let mut first = true;
        for (i, (key, value)) in KEYS
            .iter()
            .zip(text.split(char::from(SEPARATOR)))
            .enumerate()
        {
            if value.is_empty() && i != field::TIME {
                continue;
            }
            if !std::mem::replace(&mut first, false) {
                out.push(',');
            }
            out.push('"');
            out.push_str(key);
            out.push_str("\":");
            if i == field::TIME {
                let time = rfc3339_millis(self.time_ms / 1000, (self.time_ms % 1000) as u32);
                out.push('"');
                out.push_str(std::str::from_utf8(&time).unwrap_or_default());
                out.push('"');
            } else {
                out.push_str(value);
            }
        }
        out.push('}');
    }

    /// The record's JSON object.
    pub fn json(&self) -> String {
        let mut out = String::with_capacity(self.values.len() + 256);
        self.write_json(&mut out);
        out
    }

    /// The record as a JSON value (tests, tools).
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::from_str(&self.json()).unwrap_or_default()
    }

    /// Status returned to the caller.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The track ID as it appears in the stored text (JSON-escaped).
    fn track_id_json(&self) -> Option<&[u8]> {
        if self.track_len == u16::MAX {
            return None;
        }
        let start = self.track_at as usize;
        self.values.get(start..start + usize::from(self.track_len))
    }

    /// Heap bytes this record holds (its shared text and the counts in
    /// front of it), for sizing; the allocator adds a few bytes per block.
    pub fn heap_bytes(&self) -> usize {
        2 * std::mem::size_of::<usize>() + self.values.len()
    }
}

thread_local! {
    /// The second last formatted on this thread, `YYYY-MM-DDTHH:MM:SS`.
    static SECOND: std::cell::Cell<(u64, [u8; 19])> =
        const { std::cell::Cell::new((u64::MAX, [0; 19])) };
}

/// A bounded ring of [`RequestRecord`]s (oldest evicted first).
#[derive(Debug)]
pub struct DebugRing {
    capacity: usize,
    records: Mutex<VecDeque<RequestRecord>>,
}

impl DebugRing {
    /// A ring keeping the last `capacity` requests (0: keeps nothing).
    pub fn new(capacity: usize) -> Self {
        DebugRing {
            capacity,
            // Grows on demand up to `capacity`: an idle gateway holds little.
            records: Mutex::new(VecDeque::new()),
        }
    }

    /// How many records the ring keeps at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether the ring keeps anything (callers skip building records if not).
    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    /// Serializes `facts` into a record and adds it.
    pub fn record(&self, facts: &RequestFacts<'_>) {
        if self.enabled() {
            self.push(RequestRecord::new(facts));
        }
    }

    /// Adds a record, evicting the oldest when full.
    pub fn push(&self, record: RequestRecord) {
        if self.capacity == 0 {
            return;
        }
        // The evicted record is dropped after the lock is released.
        let evicted = {
            let mut q = self
                .records
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let evicted = if q.len() >= self.capacity {
                q.pop_front()
            } else {
                if q.len() == q.capacity() {
                    // Doubling, but never past `capacity`: no unused slots.
                    let len = q.len();
                    q.reserve_exact((len * 2).max(16).min(self.capacity) - len);
                }
                None
            };
            q.push_back(record);
            evicted
        };
        drop(evicted);
    }

    /// Records matching `query`, newest first.
    pub fn find(&self, query: &DebugQuery) -> Vec<RequestRecord> {
        let limit = query.limit.min(self.capacity);
        // Compared in the stored (escaped) form: escaping is one-to-one.
        let track = query
            .track_id
            .as_deref()
            .map(|t| serde_json::to_string(t).unwrap_or_default());
        let track = track
            .as_deref()
            .map(|t| t.get(1..t.len().saturating_sub(1)).unwrap_or(""));
        let q = self
            .records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        q.iter()
            .rev()
            .filter(|r| query.status.is_none_or(|s| r.status == s))
            .filter(|r| track.is_none_or(|t| r.track_id_json() == Some(t.as_bytes())))
            .take(limit)
            .cloned()
            .collect()
    }

    /// Number of records held.
    pub fn len(&self) -> usize {
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Whether the ring holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Heap bytes held by the records (texts and the ring's slots), for
    /// sizing; excludes allocator overhead.
    pub fn heap_bytes(&self) -> usize {
        let q = self
            .records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        q.capacity() * std::mem::size_of::<RequestRecord>()
            + q.iter().map(RequestRecord::heap_bytes).sum::<usize>()
    }
}

/// A parsed `/debug/requests` query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebugQuery {
    /// Only this track ID.
    pub track_id: Option<String>,
    /// Only this status.
    pub status: Option<u16>,
    /// At most this many records.
    pub limit: usize,
}

impl DebugQuery {
    /// Parses `track_id=…&status=…&limit=…`; unknown keys are errors so a
    /// typo does not silently return everything.
    pub fn parse(query: Option<&str>) -> Result<DebugQuery, String> {
        let mut q = DebugQuery {
            track_id: None,
            status: None,
            limit: DEFAULT_LIMIT,
        };
        for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match &*k {
                "track_id" => q.track_id = Some(v.into_owned()),
                "status" => {
                    q.status = Some(v.parse().map_err(|_| format!("invalid status `{v}`"))?)
                }
                "limit" => q.limit = v.parse().map_err(|_| format!("invalid limit `{v}`"))?,
                other => {
                    return Err(format!(
                        "unknown parameter `{other}` (use track_id, status, limit)"
                    ));
                }
            }
        }
        Ok(q)
    }
}

/// The `/debug/requests` response for `query` (the raw query string).
pub fn debug_requests_response(ring: &DebugRing, query: Option<&str>) -> Response<Body> {
    let (status, body) = match DebugQuery::parse(query) {
        Ok(q) => {
            let found = ring.find(&q);
            // Keys add about 220 bytes to each stored text.
            let texts: usize = found.iter().map(|r| r.values.len() + 256).sum();
            let mut body = String::with_capacity(texts + 64);
            body.push_str("{\"capacity\":");
            body.push_str(&ring.capacity().to_string());
            body.push_str(",\"requests\":[");
            for (i, r) in found.iter().enumerate() {
                if i > 0 {
                    body.push(',');
                }
                r.write_json(&mut body);
            }
            body.push_str("],\"returned\":");
            body.push_str(&found.len().to_string());
            body.push('}');
            (StatusCode::OK, body)
        }
        Err(e) => (
            StatusCode::BAD_REQUEST,
            serde_json::json!({ "error": e }).to_string(),
        ),
    };
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// `2026-11-29T06:47:14.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    String::from_utf8_lossy(&Rfc3339Millis(t).bytes()).into_owned()
}

/// `t` as `2026-11-29T06:47:14.123Z` (24 bytes).
struct Rfc3339Millis(SystemTime);

impl Rfc3339Millis {
    fn bytes(&self) -> [u8; 24] {
        let d = self.0.duration_since(UNIX_EPOCH).unwrap_or_default();
        rfc3339_millis(d.as_secs(), d.subsec_millis())
    }
}

/// `secs` seconds and `millis` milliseconds after the epoch as
/// `2026-11-29T06:47:14.123Z`.
fn rfc3339_millis(secs: u64, millis: u32) -> [u8; 24] {
    let mut out = [0u8; 24];
    out[..19].copy_from_slice(&date_time_seconds(secs));
    out[19] = b'.';
    out[20..23].copy_from_slice(&json::padded(millis));
    out[23] = b'Z';
    out
}

/// `YYYY-MM-DDTHH:MM:SS` of `secs` since the epoch (UTC; years 0–9999),
/// formatted once per second per thread.
pub(crate) fn date_time_seconds(secs: u64) -> [u8; 19] {
    let (cached, text) = SECOND.get();
    if cached == secs {
        return text;
    }
    let text = format_date_time(secs);
    SECOND.set((secs, text));
    text
}

fn format_date_time(secs: u64) -> [u8; 19] {
    let days = (secs / 86_400) as i64;
    let rem = (secs % 86_400) as u32;
    let (y, m, d) = civil_from_days(days);
    let mut out = *b"0000-00-00T00:00:00";
    put_digits(&mut out[0..4], y.clamp(0, 9999) as u32);
    put_digits(&mut out[5..7], m);
    put_digits(&mut out[8..10], d);
    put_digits(&mut out[11..13], rem / 3600);
    put_digits(&mut out[14..16], (rem / 60) % 60);
    put_digits(&mut out[17..19], rem % 60);
    out
}

/// Writes `n` as zero-padded decimal into all of `out` (keeps the low digits).
pub(crate) fn put_digits(out: &mut [u8], mut n: u32) {
    for b in out.iter_mut().rev() {
        *b = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use serde::Serialize;

    const NO_NOTES: &[Note] = &[];

    fn facts(track: &str, status: u16) -> RequestFacts<'_> {
        RequestFacts {
            time: UNIX_EPOCH + Duration::from_millis(1_795_000_000_123),
            track_id: track,
            trace_id: None,
            method: "PUT",
            path: "/v1/x",
            route: None,
            caller: None,
            entity_ids: None,
            status,
            latency: Duration::from_micros(1500),
            upstream_status: None,
            upstream_attempts: 0,
            upstream_latency: None,
            zuora_request_id: None,
            error: None,
            notes: NO_NOTES,
            notes_dropped: 0,
        }
    }

    fn track_ids(found: &[RequestRecord]) -> Vec<String> {
        found
            .iter()
            .map(|r| r.to_value()["track_id"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn ring_keeps_only_the_newest_capacity_records() {
        let ring = DebugRing::new(3);
        for i in 0..5 {
            ring.record(&facts(&format!("t{i}"), 200));
        }
        assert_eq!(ring.len(), 3);
        let all = ring.find(&DebugQuery::parse(None).unwrap());
        assert_eq!(track_ids(&all), ["t4", "t3", "t2"]);
    }

    #[test]
    fn zero_capacity_keeps_nothing() {
        let ring = DebugRing::new(0);
        ring.record(&facts("a", 200));
        assert!(ring.is_empty());
        assert!(!ring.enabled());
    }

    #[test]
    fn find_filters_by_track_id_status_and_limit() {
        let ring = DebugRing::new(100);
        for i in 0..10 {
            ring.record(&facts(
                &format!("t{}", i % 2),
                if i % 3 == 0 { 429 } else { 200 },
            ));
        }
        let q = DebugQuery::parse(Some("track_id=t1")).unwrap();
        assert_eq!(ring.find(&q).len(), 5);
        let q = DebugQuery::parse(Some("status=429")).unwrap();
        assert_eq!(ring.find(&q).len(), 4);
        let q = DebugQuery::parse(Some("status=429&track_id=t0&limit=1")).unwrap();
        let found = ring.find(&q);
        assert_eq!(found.len(), 1);
        assert_eq!(track_ids(&found), ["t0"]);
        assert_eq!(found[0].status(), 429);
        let q = DebugQuery::parse(Some("track_id=t")).unwrap();
        assert!(ring.find(&q).is_empty(), "a prefix is not a match");
    }

    #[test]
    fn track_ids_that_json_escapes_are_found_exactly() {
        let ring = DebugRing::new(10);
        ring.record(&facts("a\\b", 200));
        ring.record(&facts("a/b", 200));
        ring.record(&facts("a\\\\b", 200));
        let q = DebugQuery::parse(Some("track_id=a%5Cb")).unwrap();
        assert_eq!(track_ids(&ring.find(&q)), ["a\\b"]);
        let q = DebugQuery::parse(Some("track_id=a/b")).unwrap();
        assert_eq!(track_ids(&ring.find(&q)), ["a/b"]);
    }

    #[test]
    fn bad_queries_are_refused() {
        assert!(DebugQuery::parse(Some("status=abc")).is_err());
        assert!(DebugQuery::parse(Some("trackid=x")).is_err());
        assert!(DebugQuery::parse(Some("limit=-1")).is_err());
    }

    async fn body_of(resp: Response<Body>) -> String {
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn response_is_json_with_the_record_fields() {
        let ring = DebugRing::new(10);
        let notes = [Note {
            kind: "rate_limit",
            text: "stop-per-job: denied".into(),
        }];
        let mut f = facts("abc", 429);
        f.error = Some(("rate_limited", "99000670"));
        f.notes = &notes;
        ring.record(&f);
        let resp = debug_requests_response(&ring, Some("track_id=abc"));
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "application/json");
        let v: serde_json::Value = serde_json::from_str(&body_of(resp).await).unwrap();
        let r = &v["requests"][0];
        assert_eq!(r["track_id"], "abc");
        assert_eq!(r["status"], 429);
        assert_eq!(r["error_code"], "99000670");
        assert_eq!(r["decisions"][0]["text"], "stop-per-job: denied");
        assert_eq!(r["latency_ms"], 1.5);
        assert_eq!(r["time"], "2026-11-18T11:06:40.123Z");
        let resp = debug_requests_response(&ring, Some("bogus=1"));
        assert_eq!(resp.status(), 400);
        let v: serde_json::Value = serde_json::from_str(&body_of(resp).await).unwrap();
        assert!(v["error"].as_str().unwrap().contains("bogus"));
    }

    /// The record view `/debug/requests` was built from before records were
    /// kept pre-serialized (declared in any order: `json!` sorts keys).
    #[derive(Serialize)]
    struct OldView<'a> {
        time: String,
        track_id: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        trace_id: Option<&'a str>,
        method: &'a str,
        path: &'a str,
        route: Option<&'a str>,
        caller: Option<&'a str>,
        entity_ids: Option<&'a str>,
        status: u16,
        latency_ms: f64,
        upstream_status: Option<u16>,
        upstream_attempts: u32,
        upstream_latency_ms: Option<f64>,
        zuora_request_id: Option<&'a str>,
        error_kind: Option<&'a str>,
        error_code: Option<&'a str>,
        decisions: Vec<serde_json::Value>,
        #[serde(skip_serializing_if = "is_zero")]
        decisions_dropped: u32,
    }

    fn ms(d: Duration) -> f64 {
        (d.as_micros() as f64) / 1000.0
    }

    fn is_zero(n: &u32) -> bool {
        *n == 0
    }

    fn old_view<'a>(f: &RequestFacts<'a>) -> OldView<'a> {
        OldView {
            time: rfc3339(f.time),
            track_id: f.track_id,
            trace_id: f.trace_id,
            method: f.method,
            path: f.path,
            route: f.route,
            caller: f.caller,
            entity_ids: f.entity_ids,
            status: f.status,
            latency_ms: ms(f.latency),
            upstream_status: f.upstream_status,
            upstream_attempts: f.upstream_attempts,
            upstream_latency_ms: f.upstream_latency.map(ms),
            zuora_request_id: f.zuora_request_id,
            error_kind: f.error.map(|e| e.0),
            error_code: f.error.map(|e| e.1),
            decisions: f
                .notes
                .iter()
                .map(|n| serde_json::json!({ "kind": n.kind, "text": n.text }))
                .collect(),
            decisions_dropped: f.notes_dropped,
        }
    }

    #[tokio::test]
    async fn response_is_byte_identical_to_the_serde_json_view() {
        let notes = [
            Note {
                kind: "tenancy",
                text: "tenancy[0]".into(),
            },
            Note {
                kind: "rate_limit",
                text: "quote \" backslash \\ newline \n é".into(),
            },
        ];
        let full = RequestFacts {
            time: UNIX_EPOCH + Duration::from_millis(1_795_000_000_007),
            track_id: "order-sync-42",
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736"),
            method: "GET",
            path: "/v1/uno/data-backfill/propagation/jobs",
            route: Some("read"),
            caller: Some("billing-test"),
            entity_ids: Some("3c4fd2c0-1b2a-4c3d-8e9f-0a1b2c3d4e5f"),
            status: 200,
            latency: Duration::from_micros(864),
            upstream_status: Some(200),
            upstream_attempts: 2,
            upstream_latency: Some(Duration::from_micros(701)),
            zuora_request_id: Some("549a8203-aad4-4dce-9539-52b47aa906c0"),
            error: None,
            notes: &notes,
            notes_dropped: 3,
        };
        let mut minimal = facts("t\\x", 404);
        minimal.error = Some(("no_route", "99000540"));
        minimal.upstream_latency = Some(Duration::ZERO);
        let ring = DebugRing::new(10);
        ring.record(&minimal);
        ring.record(&full);
        let got = body_of(debug_requests_response(&ring, None)).await;
        let expected = serde_json::json!({
            "capacity": 10,
            "returned": 2,
            "requests": [old_view(&full), old_view(&minimal)],
        })
        .to_string();
        assert_eq!(got, expected);
    }

    /// A record like the load bench's: generated track ID, routed, one
    /// tenancy note, Zuora's request ID.
    fn realistic<'a>(track: &'a str, path: &'a str, notes: &'a [Note]) -> RequestFacts<'a> {
        RequestFacts {
            time: SystemTime::now(),
            track_id: track,
            trace_id: None,
            method: "GET",
            path,
            route: Some("read-auto-backfill-jobs"),
            caller: Some("billing-bench"),
            entity_ids: Some("3c4fd2c0-1b2a-4c3d-8e9f-0a1b2c3d4e5f"),
            status: 200,
            latency: Duration::from_micros(864),
            upstream_status: Some(200),
            upstream_attempts: 1,
            upstream_latency: Some(Duration::from_micros(701)),
            zuora_request_id: Some("549a8203-aad4-4dce-9539-52b47aa906c0"),
            error: None,
            notes,
            notes_dropped: 0,
        }
    }

    #[test]
    fn a_full_ring_of_realistic_records_takes_under_450_bytes_each() {
        let notes = [Note {
            kind: "tenancy",
            text: "tenancy[0]".into(),
        }];
        let ring = DebugRing::new(10_000);
        for i in 0..12_000u32 {
            let track = format!("{:032x}", u128::from(i) * 0x9e37_79b9_7f4a_7c15);
            let path =
                format!("/v1/uno/data-backfill/propagation/jobs/ff8080818bb300af0000{i:012x}");
            ring.record(&realistic(&track, &path, &notes));
        }
        assert_eq!(ring.len(), 10_000);
        let per_record = ring.heap_bytes() / 10_000;
        // Plus the allocator's header and rounding: about 16 bytes a block.
        println!("debug ring: {per_record} heap bytes per realistic record");
        assert!(per_record + 16 <= 450, "{per_record} bytes per record");
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_millis(1_795_000_000_123)),
            "2026-11-18T11:06:40.123Z"
        );
    }
}
