//! The `/debug/requests` ring: the last N requests' decision trails, in
//! bounded memory, searchable by track ID and status.
//!
//! `GET /debug/requests?track_id=ID&status=429&limit=50` on the admin port
//! answers newest first as JSON:
//! `{"capacity":10000,"returned":1,"requests":[{"time":"…","track_id":"…",…}]}`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderValue, Method, Response, StatusCode, header};
use serde::Serialize;

use super::trail::Trail;
use crate::body::{Body, full};

/// Default number of records returned when `limit` is not given.
pub const DEFAULT_LIMIT: usize = 100;

/// One completed request, as kept in the ring.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    /// When the request arrived.
    pub time: SystemTime,
    /// Its `Zuora-Track-Id`.
    pub track_id: HeaderValue,
    /// Its trace ID (hex), when known.
    pub trace_id: Option<Box<str>>,
    /// Request method.
    pub method: Method,
    /// Request path (no query string).
    pub path: Box<str>,
    /// Status returned to the caller.
    pub status: u16,
    /// Time to response headers.
    pub latency: Duration,
    /// `(kind, code)` of a gateway error.
    pub error: Option<(&'static str, Box<str>)>,
    /// What the layers decided.
    pub trail: Trail,
}

/// A bounded ring of [`RequestRecord`]s (oldest evicted first).
#[derive(Debug)]
pub struct DebugRing {
    capacity: usize,
    records: Mutex<VecDeque<Arc<RequestRecord>>>,
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

    /// Adds a record, evicting the oldest when full.
    pub fn push(&self, record: RequestRecord) {
        if self.capacity == 0 {
            return;
        }
        let record = Arc::new(record);
        // The evicted record is dropped after the lock is released.
        let evicted = {
            let mut q = self
                .records
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let evicted = if q.len() >= self.capacity {
                q.pop_front()
            } else {
                None
            };
            q.push_back(record);
            evicted
        };
        drop(evicted);
    }

    /// Records matching `query`, newest first.
    pub fn find(&self, query: &DebugQuery) -> Vec<Arc<RequestRecord>> {
        let limit = query.limit.min(self.capacity);
        let q = self
            .records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        q.iter()
            .rev()
            .filter(|r| query.status.is_none_or(|s| r.status == s))
            .filter(|r| {
                query
                    .track_id
                    .as_deref()
                    .is_none_or(|t| r.track_id.as_bytes() == t.as_bytes())
            })
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

#[derive(Serialize)]
struct NoteView<'a> {
    kind: &'a str,
    text: &'a str,
}

#[derive(Serialize)]
struct RecordView<'a> {
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
    decisions: Vec<NoteView<'a>>,
    #[serde(skip_serializing_if = "is_zero")]
    decisions_dropped: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn ms(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

impl RequestRecord {
    fn view(&self) -> RecordView<'_> {
        let t = &self.trail;
        RecordView {
            time: rfc3339(self.time),
            track_id: self.track_id.to_str().unwrap_or(""),
            trace_id: self.trace_id.as_deref(),
            method: self.method.as_str(),
            path: &self.path,
            route: t.route.as_ref().map(|r| r.name()),
            caller: t.caller.as_deref(),
            entity_ids: t.entity_ids.as_ref().and_then(|v| v.to_str().ok()),
            status: self.status,
            latency_ms: ms(self.latency),
            upstream_status: t.upstream.as_ref().and_then(|u| u.status),
            upstream_attempts: t.upstream.as_ref().map_or(0, |u| u.attempts),
            upstream_latency_ms: t.upstream.as_ref().map(|u| ms(u.latency)),
            zuora_request_id: t
                .upstream
                .as_ref()
                .and_then(|u| u.request_id.as_ref())
                .and_then(|v| v.to_str().ok()),
            error_kind: self.error.as_ref().map(|e| e.0),
            error_code: self.error.as_ref().map(|e| &*e.1),
            decisions: t
                .notes
                .iter()
                .map(|n| NoteView {
                    kind: n.kind,
                    text: &n.text,
                })
                .collect(),
            decisions_dropped: t.notes_dropped,
        }
    }
}

/// The `/debug/requests` response for `query` (the raw query string).
pub fn debug_requests_response(ring: &DebugRing, query: Option<&str>) -> Response<Body> {
    let (status, body) = match DebugQuery::parse(query) {
        Ok(q) => {
            let found = ring.find(&q);
            let views: Vec<RecordView<'_>> = found.iter().map(|r| r.view()).collect();
            let body = serde_json::json!({
                "capacity": ring.capacity(),
                "returned": views.len(),
                "requests": views,
            });
            (StatusCode::OK, body)
        }
        Err(e) => (StatusCode::BAD_REQUEST, serde_json::json!({ "error": e })),
    };
    let mut resp = Response::new(full(body.to_string()));
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
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, dd) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{dd:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        d.subsec_millis()
    )
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

    fn record(track: &str, status: u16) -> RequestRecord {
        RequestRecord {
            time: UNIX_EPOCH + Duration::from_millis(1_795_000_000_123),
            track_id: HeaderValue::from_str(track).unwrap(),
            trace_id: None,
            method: Method::PUT,
            path: "/v1/x".into(),
            status,
            latency: Duration::from_micros(1500),
            error: None,
            trail: Trail::default(),
        }
    }

    #[test]
    fn ring_keeps_only_the_newest_capacity_records() {
        let ring = DebugRing::new(3);
        for i in 0..5 {
            ring.push(record(&format!("t{i}"), 200));
        }
        assert_eq!(ring.len(), 3);
        let all = ring.find(&DebugQuery::parse(None).unwrap());
        let ids: Vec<_> = all
            .iter()
            .map(|r| r.track_id.to_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids, ["t4", "t3", "t2"]);
    }

    #[test]
    fn zero_capacity_keeps_nothing() {
        let ring = DebugRing::new(0);
        ring.push(record("a", 200));
        assert!(ring.is_empty());
        assert!(!ring.enabled());
    }

    #[test]
    fn find_filters_by_track_id_status_and_limit() {
        let ring = DebugRing::new(100);
        for i in 0..10 {
            ring.push(record(
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
        assert_eq!(found[0].track_id, "t0");
    }

    #[test]
    fn bad_queries_are_refused() {
        assert!(DebugQuery::parse(Some("status=abc")).is_err());
        assert!(DebugQuery::parse(Some("trackid=x")).is_err());
        assert!(DebugQuery::parse(Some("limit=-1")).is_err());
    }

    #[tokio::test]
    async fn response_is_json_with_the_record_fields() {
        let ring = DebugRing::new(10);
        let mut r = record("abc", 429);
        r.error = Some(("rate_limited", "99000670".into()));
        r.trail.notes.push(super::super::trail::Note {
            kind: "rate_limit",
            text: "stop-per-job: denied".into(),
        });
        ring.push(r);
        let resp = debug_requests_response(&ring, Some("track_id=abc"));
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let r = &v["requests"][0];
        assert_eq!(r["track_id"], "abc");
        assert_eq!(r["status"], 429);
        assert_eq!(r["error_code"], "99000670");
        assert_eq!(r["decisions"][0]["text"], "stop-per-job: denied");
        assert_eq!(r["latency_ms"], 1.5);
        assert_eq!(r["time"], "2026-11-18T11:06:40.123Z");
        let resp = debug_requests_response(&ring, Some("bogus=1"));
        assert_eq!(resp.status(), 400);
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
    }
}
