//! Track ID: every request has a valid `Zuora-Track-Id`, and every response
//! carries it back.
//!
//! - A caller's value is checked against Zuora's rules (at most 64
//!   characters, printable US-ASCII, none of `:` `;` `"` `'`); an invalid one
//!   is refused with 400 (category 20) and nothing is forwarded.
//! - Without one, the gateway generates one (32 lowercase hex characters)
//!   and sets it on the request, so Zuora sees it too.
//! - The value goes into the request extensions as [`TrackId`] and onto the
//!   response, overwriting whatever Zuora returned.
//!
//! This is the outermost layer (outside rescue): its own refusals are
//! rendered with [`crate::layers::rescue::into_response`] and still logged
//! (access log, metrics, debug ring) through the shared [`Recorder`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use futures_util::future::Either;
use http::header::HeaderName;
use http::{HeaderMap, HeaderValue};
use tower::{Layer, Service};

use super::{Req, Resp};
use crate::context::TrackId;
use crate::error::GatewayError;
use crate::telemetry::Recorder;
use crate::telemetry::access::Completion;
use crate::telemetry::trail::Trail;

/// `Zuora-Track-Id`.
pub static ZUORA_TRACK_ID: HeaderName = HeaderName::from_static("zuora-track-id");

/// Longest track ID Zuora accepts.
pub const MAX_TRACK_ID_LEN: usize = 64;

/// Checks a caller's track ID against Zuora's rules.
pub fn validate(value: &HeaderValue) -> Result<(), &'static str> {
    let b = value.as_bytes();
    if b.len() > MAX_TRACK_ID_LEN {
        return Err("Zuora-Track-Id must be at most 64 characters");
    }
    if let Some(&c) = b.iter().find(|&&c| !(0x20..=0x7e).contains(&c)) {
        return Err(if c >= 0x80 {
            "Zuora-Track-Id must be US-ASCII"
        } else {
            "Zuora-Track-Id must not contain control characters"
        });
    }
    if b.iter().any(|c| matches!(c, b':' | b';' | b'"' | b'\'')) {
        return Err("Zuora-Track-Id must not contain `:`, `;`, `\"` or `'`");
    }
    Ok(())
}

/// A new track ID: 32 lowercase hex characters (128 random bits).
pub fn generate() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n = fastrand::u128(..);
    let mut buf = [0u8; 32];
    // A byte (two digits) at a time, most significant first.
    for (pair, byte) in buf.chunks_exact_mut(2).zip(n.to_be_bytes()) {
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 0xf)];
    }
    // Hex digits are always a valid header value.
    HeaderValue::from_bytes(&buf)
        .unwrap_or_else(|_| HeaderValue::from_static("00000000000000000000000000000000"))
}

/// The request's track ID: the caller's (validated), or a generated one when
/// absent or empty. More than one `Zuora-Track-Id` header is refused.
pub fn from_headers(headers: &HeaderMap) -> Result<Option<HeaderValue>, &'static str> {
    let mut values = headers.get_all(&ZUORA_TRACK_ID).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err("only one Zuora-Track-Id header is allowed");
    }
    if first.is_empty() {
        return Ok(None);
    }
    validate(first)?;
    Ok(Some(first.clone()))
}

/// Builds [`TrackIdService`].
#[derive(Debug, Clone, Default)]
pub struct TrackIdLayer {
    recorder: Option<Arc<Recorder>>,
}

impl TrackIdLayer {
    /// Refusals are logged through `recorder` (they never reach the trace layer).
    pub fn new(recorder: Arc<Recorder>) -> Self {
        TrackIdLayer {
            recorder: Some(recorder),
        }
    }
}

impl<S> Layer<S> for TrackIdLayer {
    type Service = TrackIdService<S>;
    fn layer(&self, inner: S) -> TrackIdService<S> {
        TrackIdService {
            inner,
            recorder: self.recorder.clone(),
        }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct TrackIdService<S> {
    inner: S,
    recorder: Option<Arc<Recorder>>,
}

impl<S, E> Service<Req> for TrackIdService<S>
where
    S: Service<Req, Response = Resp, Error = E>,
{
    type Response = Resp;
    type Error = E;
    type Future = Either<std::future::Ready<Result<Resp, E>>, TrackIdFuture<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), E>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        let id = match from_headers(req.headers()) {
            Ok(Some(id)) => id,
            Ok(None) => {
                let id = generate();
                req.headers_mut().insert(ZUORA_TRACK_ID.clone(), id.clone());
                id
            }
            Err(msg) => return Either::Left(std::future::ready(Ok(self.refuse(&req, msg)))),
        };
        req.extensions_mut().insert(TrackId(id.clone()));
        Either::Right(TrackIdFuture {
            inner: self.inner.call(req),
            id: Some(id),
        })
    }
}

impl<S> TrackIdService<S> {
    fn refuse(&self, req: &Req, msg: &'static str) -> Resp {
        let started = Instant::now();
        let time = SystemTime::now();
        // The caller's value is invalid: answer (and log) under a fresh one.
        let id = generate();
        let mut resp =
            crate::layers::rescue::into_response(GatewayError::InvalidValue(msg.to_owned()));
        resp.headers_mut()
            .insert(ZUORA_TRACK_ID.clone(), id.clone());
        if let Some(rec) = &self.recorder {
            rec.complete(Completion {
                time,
                started,
                track_id: &id,
                trace_id: None,
                method: req.method(),
                path: req.uri().path().into(),
                status: resp.status().as_u16(),
                bytes_in: None,
                bytes_out: http_body::Body::size_hint(resp.body()).exact(),
                rescued: resp.extensions().get(),
                response_request_id: None,
                trail: Trail::default(),
            });
        }
        resp
    }
}

pin_project_lite::pin_project! {
    /// Future of [`TrackIdService`]: puts the track ID on the response.
    pub struct TrackIdFuture<F> {
        #[pin]
        inner: F,
        id: Option<HeaderValue>,
    }
}

impl<F, E> Future for TrackIdFuture<F>
where
    F: Future<Output = Result<Resp, E>>,
{
    type Output = Result<Resp, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.inner.poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(mut resp)) => {
                if let Some(id) = this.id.take() {
                    resp.headers_mut().insert(ZUORA_TRACK_ID.clone(), id);
                }
                Poll::Ready(Ok(resp))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::body::{empty, full};
    use std::collections::HashSet;
    use std::convert::Infallible;
    use std::sync::Mutex;
    use tower::{ServiceBuilder, ServiceExt};

    fn hv(s: &[u8]) -> HeaderValue {
        HeaderValue::from_bytes(s).unwrap()
    }

    #[test]
    fn zuora_rules_are_enforced() {
        assert!(validate(&hv(b"order-sync 2026/11/29 #42")).is_ok());
        assert!(validate(&hv("a".repeat(64).as_bytes())).is_ok());
        assert!(validate(&hv("a".repeat(65).as_bytes())).is_err());
        for bad in [
            &b"a:b"[..],
            b"a;b",
            b"a\"b",
            b"a'b",
            b"a\tb",
            "café".as_bytes(),
        ] {
            assert!(validate(&hv(bad)).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn generated_ids_are_valid_distinct_lowercase_hex() {
        let ids: HashSet<_> = (0..1000).map(|_| generate()).collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            assert_eq!(id.len(), 32);
            assert!(
                id.as_bytes()
                    .iter()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
            );
            assert!(validate(id).is_ok());
        }
        // The 128 random bits, most significant digit first.
        for seed in 0..50 {
            fastrand::seed(seed);
            let n = fastrand::u128(..);
            fastrand::seed(seed);
            assert_eq!(generate(), format!("{n:032x}").as_str());
        }
    }

    #[test]
    fn duplicate_or_empty_headers() {
        let mut h = HeaderMap::new();
        h.insert(&ZUORA_TRACK_ID, HeaderValue::from_static(""));
        assert_eq!(from_headers(&h), Ok(None), "empty counts as absent");
        h.insert(&ZUORA_TRACK_ID, HeaderValue::from_static("a"));
        h.append(&ZUORA_TRACK_ID, HeaderValue::from_static("b"));
        assert!(from_headers(&h).is_err());
    }

    type Seen = Arc<Mutex<Vec<(Option<HeaderValue>, Option<HeaderValue>)>>>;

    fn service(seen: Seen) -> impl Service<Req, Response = Resp, Error = Infallible> {
        ServiceBuilder::new()
            .layer(TrackIdLayer::default())
            .service_fn(move |req: Req| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push((
                        req.headers().get(&ZUORA_TRACK_ID).cloned(),
                        req.extensions().get::<TrackId>().map(|t| t.0.clone()),
                    ));
                    let mut resp = Resp::new(full("ok"));
                    // Upstream echoes something else: the gateway's value must win.
                    resp.headers_mut()
                        .insert(&ZUORA_TRACK_ID, HeaderValue::from_static("upstream"));
                    Ok::<_, Infallible>(resp)
                }
            })
    }

    fn request(track: Option<&[u8]>) -> Req {
        let mut req = Req::new(empty());
        if let Some(t) = track {
            req.headers_mut().insert(&ZUORA_TRACK_ID, hv(t));
        }
        req
    }

    #[tokio::test]
    async fn callers_id_is_forwarded_and_echoed() {
        let seen = Seen::default();
        let resp = service(seen.clone())
            .oneshot(request(Some(b"job-42")))
            .await
            .unwrap();
        assert_eq!(resp.headers()[&ZUORA_TRACK_ID], "job-42");
        let (header, ext) = seen.lock().unwrap()[0].clone();
        assert_eq!(header.unwrap(), "job-42");
        assert_eq!(ext.unwrap(), "job-42");
    }

    #[tokio::test]
    async fn missing_id_is_generated_set_and_echoed() {
        let seen = Seen::default();
        let resp = service(seen.clone()).oneshot(request(None)).await.unwrap();
        let echoed = resp.headers()[&ZUORA_TRACK_ID].clone();
        assert_eq!(echoed.len(), 32);
        assert_eq!(seen.lock().unwrap()[0].0.as_ref(), Some(&echoed));
    }

    #[tokio::test]
    async fn invalid_id_is_refused_without_calling_inner() {
        let seen = Seen::default();
        let resp = service(seen.clone())
            .oneshot(request(Some(b"a;b")))
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        assert!(seen.lock().unwrap().is_empty());
        let e = resp
            .extensions()
            .get::<crate::layers::rescue::RescuedError>()
            .unwrap();
        assert!(e.code.ends_with("20"));
        assert_eq!(
            resp.headers()[&ZUORA_TRACK_ID].len(),
            32,
            "a fresh ID is returned"
        );
    }
}
