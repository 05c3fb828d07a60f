//! Forward: the innermost service. Rewrites the URI onto the route's
//! upstream, cleans headers, sends the request over the pooled client with
//! the upstream's deadline, and hands Zuora's response back (headers such as
//! `Zuora-Request-Id`, `ratelimit-*`, `Concurrency-Limit-*` and `Retry-After`
//! pass through untouched). A 401 carries the request's extensions back for
//! the token layer's replay ([`RequestExtensions`]).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Scheme};
use http::{Request, Uri};
use tower::Service;

use super::breaker::{Admission, CircuitBreaker};
use super::client::Clients;
use super::headers::strip_hop_by_hop;
use crate::body::{self, Body};
use crate::config::UpstreamConfig;
use crate::context::{RequestExtensions, RouteMatch};
use crate::error::GatewayError;
use crate::layers::token::ReplayCopy;
use crate::layers::{GwResult, LayerFuture, Req};
use crate::telemetry::upstream::CallTrace;

/// One upstream, ready to receive requests.
#[derive(Clone, Debug)]
pub struct Upstream {
    /// Its configuration.
    pub config: Arc<UpstreamConfig>,
    /// The resolved base URL (the simulator's address for `base_url: simulator`).
    pub base: Uri,
    /// The pooled clients, one per serving runtime.
    pub client: Clients,
    /// Sheds load while Zuora is failing.
    pub breaker: CircuitBreaker,
    /// Slots for requests in flight (`max_concurrent_requests`).
    pub slots: Arc<tokio::sync::Semaphore>,
}

impl Upstream {
    /// The token endpoint: `oauth.token_url` or `<base>/oauth/token`.
    pub fn token_url(&self) -> Result<Uri, GatewayError> {
        if let Some(u) = &self.config.oauth.token_url {
            return Ok(u.clone());
        }
        join(&self.base, "/oauth/token", None)
    }
}

/// Upstreams by name.
pub type Upstreams = Arc<HashMap<String, Upstream>>;

/// A map by upstream name, for lookups on every request. The names come from
/// the configuration, never from a caller, so a simple FNV-1a hash (several
/// times cheaper than the default SipHash for names of a few bytes) is safe.
pub type ByName<V> = HashMap<String, V, BuildHasherDefault<NameHasher>>;

/// FNV-1a, for [`ByName`].
#[derive(Debug)]
pub struct NameHasher(u64);

impl Default for NameHasher {
    fn default() -> Self {
        NameHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for NameHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Builds `base` + `path` (+ `?query`), keeping a path prefix of `base`.
fn join(base: &Uri, path: &str, query: Option<&str>) -> Result<Uri, GatewayError> {
    let prefix = base.path().trim_end_matches('/');
    let mut pq =
        String::with_capacity(prefix.len() + path.len() + query.map_or(0, |q| q.len() + 1));
    pq.push_str(prefix);
    pq.push_str(path);
    if let Some(q) = query {
        pq.push('?');
        pq.push_str(q);
    }
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(base.scheme().cloned().unwrap_or(Scheme::HTTPS));
    parts.authority = base.authority().cloned();
    parts.path_and_query = Some(
        PathAndQuery::try_from(pq)
            .map_err(|e| GatewayError::Internal(format!("bad upstream URI: {e}")))?,
    );
    Uri::from_parts(parts).map_err(|e| GatewayError::Internal(format!("bad upstream URI: {e}")))
}

/// The caller's URI moved onto `base`: like [`join`], but when `base` has no
/// path prefix the caller's path-and-query is reused as is (a reference-counted
/// clone; no re-parse, no allocation on the hot path).
fn rebase(base: &Uri, uri: &Uri) -> Result<Uri, GatewayError> {
    match uri.path_and_query() {
        Some(pq)
            if pq.as_str().starts_with('/') && base.path().trim_end_matches('/').is_empty() =>
        {
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(base.scheme().cloned().unwrap_or(Scheme::HTTPS));
            parts.authority = base.authority().cloned();
            parts.path_and_query = Some(pq.clone());
            Uri::from_parts(parts)
                .map_err(|e| GatewayError::Internal(format!("bad upstream URI: {e}")))
        }
        _ => join(base, uri.path(), uri.query()),
    }
}

/// The innermost service.
#[derive(Clone)]
pub struct Forward {
    upstreams: Arc<ByName<Arc<Target>>>,
}

/// An upstream with what every request to it shares, computed once.
struct Target {
    upstream: Upstream,
    /// `Host` for a plain-http upstream (always HTTP/1.1): what the client
    /// would otherwise format (`host:port`) into every single request.
    /// `None` for https, where ALPN may pick HTTP/2 (no `Host` there).
    host: Option<HeaderValue>,
}

impl Forward {
    /// Forwards to `upstreams` (looked up by the matched route's `upstream`).
    pub fn new(upstreams: Upstreams) -> Self {
        let upstreams = upstreams
            .iter()
            .map(|(name, u)| {
                let target = Target {
                    upstream: u.clone(),
                    host: http_host(&u.base),
                };
                (name.clone(), Arc::new(target))
            })
            .collect();
        Forward {
            upstreams: Arc::new(upstreams),
        }
    }
}

/// The `Host` the client ([`super::client`]) sets on an HTTP/1 request to `base`
/// (host, and the port unless it is the scheme's default), for plain-http
/// bases only.
fn http_host(base: &Uri) -> Option<HeaderValue> {
    let probe = rebase(base, &Uri::from_static("/")).ok()?;
    if probe.scheme() != Some(&Scheme::HTTP) {
        return None;
    }
    let host = probe.host()?;
    let value = match probe.port_u16() {
        Some(port) if port != 80 => format!("{host}:{port}"),
        _ => host.to_owned(),
    };
    HeaderValue::from_str(&value).ok()
}

impl Service<Req> for Forward {
    type Response = http::Response<Body>;
    type Error = GatewayError;
    type Future = LayerFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let upstream = match self.target_of(&req) {
            Ok(target) => target,
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        let deadline = tokio::time::Instant::now() + upstream.upstream.config.request_timeout;
        // A slot (taken before the breaker is asked, so a probe is never
        // spent waiting): at most `max_concurrent_requests` in flight.
        match upstream.upstream.slots.clone().try_acquire_owned() {
            Ok(slot) => Box::pin(async move { send(&upstream, req, deadline, slot).await }),
            // Requests waiting for a slot (under load, often most of them)
            // hold this small future; the exchange's (≈ 2.7 KiB) is
            // allocated once they have one.
            Err(_) => Box::pin(async move {
                let slot = wait_for_slot(&upstream, deadline).await?;
                Box::pin(send(&upstream, req, deadline, slot)).await
            }),
        }
    }
}

impl Forward {
    /// The request's upstream. The head is rewritten for it in [`send`],
    /// once the request has a slot.
    fn target_of(&self, req: &Req) -> Result<Arc<Target>, GatewayError> {
        let m = req.extensions().get::<RouteMatch>().ok_or_else(|| {
            GatewayError::Internal("request reached forward without a route".into())
        })?;
        let name = &m.config().upstream;
        self.upstreams
            .get(name)
            .cloned()
            .ok_or_else(|| GatewayError::Internal(format!("upstream `{name}` is not running")))
    }
}

/// `Zuora-Version`.
static ZUORA_VERSION: HeaderName = HeaderName::from_static("zuora-version");

/// The request head as it goes to `target`: URI rebased, hop-by-hop
/// headers removed, `Host` the upstream's, `Zuora-Version` defaulted, HTTP/1.1.
fn prepare_head(target: &Target, parts: &mut http::request::Parts) -> Result<(), GatewayError> {
    let upstream = &target.upstream;
    parts.uri = rebase(&upstream.base, &parts.uri)?;
    strip_hop_by_hop(&mut parts.headers);
    // Never the caller's Host: ours, or the client sets it from the URI authority.
    match &target.host {
        Some(host) => parts.headers.insert(header::HOST, host.clone()),
        None => parts.headers.remove(header::HOST),
    };
    if let Some(v) = &upstream.config.zuora_version
        // One lookup (hashing the name once) for "absent, then insert".
        && let header::Entry::Vacant(slot) = parts.headers.entry(&ZUORA_VERSION)
    {
        slot.insert(v.clone());
    }
    // HTTP/2 to the upstream is negotiated by the connector, not inherited from the caller.
    parts.version = http::Version::HTTP_11;
    Ok(())
}

/// Bodies up to this size are buffered so a safe retry can resend them.
const REPLAY_LIMIT: u64 = 64 * 1024;

/// Whether a request may be sent again after a failure that may have reached
/// Zuora: idempotent methods, and POST/PATCH only with an `Idempotency-Key`.
fn idempotent(parts: &http::request::Parts) -> bool {
    use http::Method;
    match parts.method {
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS => true,
        Method::POST | Method::PATCH => parts.headers.contains_key("idempotency-key"),
        _ => false,
    }
}

/// The request body as bytes when it is small enough to replay.
async fn buffer_if_small(
    parts: &http::request::Parts,
    body: Body,
) -> Result<Result<Bytes, Body>, GatewayError> {
    use http_body::Body as _;
    let hint = body.size_hint();
    let announced = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let small = hint.upper().is_some_and(|u| u <= REPLAY_LIMIT)
        || announced.is_some_and(|n| n <= REPLAY_LIMIT);
    // A chunked body of unknown size is read up to the replay limit too: most
    // are small, and a framing error in one is then found before any byte of
    // the request has gone to Zuora.
    let unknown = hint.upper().is_none() && announced.is_none();
    if !small && !unknown {
        return Ok(Err(body));
    }
    use http_body_util::BodyExt;
    let mut body = body;
    let mut buf = body::Chunks::default();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| body::body_error(&*e))?;
        if let Ok(data) = frame.into_data() {
            buf.push(data);
            if buf.len() as u64 > REPLAY_LIMIT {
                // Larger than announced: stream what we have plus the rest, no replay.
                return Ok(Err(concat(body::full(buf.into_bytes()), body)));
            }
        }
    }
    Ok(Ok(buf.into_bytes()))
}

/// `first` followed by `rest`, as one body.
fn concat(first: Body, rest: Body) -> Body {
    use http_body_util::BodyExt;
    let stream =
        futures_util::stream::unfold((Some(first), Some(rest)), |(mut a, mut b)| async move {
            loop {
                if let Some(body) = a.as_mut() {
                    match body.frame().await {
                        Some(f) => return Some((f, (a, b))),
                        None => a = None,
                    }
                } else if let Some(body) = b.as_mut() {
                    match body.frame().await {
                        Some(f) => return Some((f, (a, b))),
                        None => b = None,
                    }
                } else {
                    return None;
                }
            }
        });
    http_body_util::StreamBody::new(stream).boxed_unsync()
}

/// Waits for a slot to send to `target`: waiting counts as connecting, and
/// ends at the request's deadline at the latest.
async fn wait_for_slot(
    target: &Target,
    deadline: tokio::time::Instant,
) -> Result<tokio::sync::OwnedSemaphorePermit, GatewayError> {
    let upstream = &target.upstream;
    let wait = deadline.min(tokio::time::Instant::now() + upstream.config.connect_timeout);
    match tokio::time::timeout_at(wait, upstream.slots.clone().acquire_owned()).await {
        Ok(Ok(slot)) => Ok(slot),
        _ => Err(GatewayError::Overloaded),
    }
}

/// Sends `req` to `target` holding `_slot` until it returns: buffered
/// responses have released their connection by then; a streamed one (over
/// 64 KiB) may still be reading when the next request takes the slot.
async fn send(
    target: &Target,
    req: Request<Body>,
    deadline: tokio::time::Instant,
    _slot: tokio::sync::OwnedSemaphorePermit,
) -> GwResult {
    let upstream = &target.upstream;
    let timeout = upstream.config.request_timeout;
    let (mut head, body) = req.into_parts();
    // Kept aside: read by each attempt's trace, handed back with a 401.
    let mut extensions = std::mem::take(&mut head.extensions);
    // The token layer's copy of the request, if it wants one: its head is
    // copied now, as the token layer sent it, and not while the request
    // waited for a slot (most of them, under load, each holding the copy).
    // Retries resend it; a 401 hands it back.
    if let Some(copy) = extensions.get_mut::<ReplayCopy>() {
        copy.copy_head(&head);
    }
    prepare_head(target, &mut head)?;
    let admission = upstream.breaker.admit();
    if admission == Admission::Open {
        return Err(GatewayError::CircuitOpen);
    }
    let probe = admission == Admission::Probe;
    let copy = extensions.get::<ReplayCopy>();
    let retry = upstream.config.retry;
    let mut body = match copy.and_then(ReplayCopy::plain_body) {
        // Already in memory: no second buffer.
        Some(bytes) if http_body::Body::size_hint(&body).exact() == Some(bytes.len() as u64) => {
            Ok(bytes.clone())
        }
        // Without retries there is nothing to buffer for.
        _ if retry.max_attempts > 1 => buffer_if_small(&head, body).await?,
        _ => Err(body),
    };
    let may_resend_after_send = idempotent(&head);
    let mut head = Some(head);
    let mut attempt = 1u32;
    loop {
        let replayable = body.is_ok();
        let more = attempt < retry.max_attempts && replayable;
        // The head is copied only when a retry actually happens (from the
        // token layer's copy), or up front if there is no such copy.
        let this_head = match (head.take(), copy) {
            (Some(h), None) if more => {
                head = Some(h.clone());
                h
            }
            (Some(h), _) => h,
            (None, copy) => {
                let Some(mut h) = copy.and_then(ReplayCopy::head) else {
                    return Err(GatewayError::Internal(
                        "forward: no request head left for another attempt".into(),
                    ));
                };
                prepare_head(target, &mut h)?;
                h
            }
        };
        let this_body = match &mut body {
            Ok(bytes) => body::full(bytes.clone()),
            Err(streaming) => std::mem::replace(streaming, body::empty()),
        };
        let mut req = Request::from_parts(this_head, this_body);
        // Telemetry: this attempt's `zuora.call` span, trace headers, decision-trail entry.
        let call = CallTrace::start(&mut req, &extensions, upstream.config.forward_traceparent);
        let outcome =
            tokio::time::timeout_at(deadline, upstream.client.current().request(req)).await;
        call.finish_attempt(&outcome);
        let retry_reason = match outcome {
            Err(_) => {
                upstream.breaker.failure(probe);
                return Err(GatewayError::UpstreamTimeout(timeout));
            }
            Ok(Ok(resp)) => {
                let status = resp.status().as_u16();
                let unavailable = matches!(status, 502..=504);
                if unavailable && more && may_resend_after_send {
                    upstream.breaker.failure(probe);
                    format!("Zuora answered {status}")
                } else {
                    let resp = match read_response(resp, deadline, timeout).await {
                        Ok(resp) => resp,
                        Err(e) => {
                            upstream.breaker.failure(probe);
                            return Err(e);
                        }
                    };
                    if unavailable {
                        upstream.breaker.failure(probe);
                    } else {
                        upstream.breaker.success();
                    }
                    return Ok(finish(resp, extensions));
                }
            }
            Ok(Err(e)) => {
                let err = classify_client_error(&e);
                let connect = matches!(err, GatewayError::UpstreamConnect(_));
                if matches!(
                    err,
                    GatewayError::UpstreamConnect(_) | GatewayError::BadUpstreamResponse(_)
                ) {
                    upstream.breaker.failure(probe);
                }
                // A connect error means nothing was sent: always safe to retry.
                if more
                    && (connect
                        || (may_resend_after_send
                            && matches!(err, GatewayError::BadUpstreamResponse(_))))
                {
                    err.to_string()
                } else {
                    return Err(err);
                }
            }
        };
        if probe || upstream.breaker.is_open() {
            return Err(GatewayError::CircuitOpen);
        }
        let backoff = retry.backoff.saturating_mul(1 << (attempt - 1).min(6));
        let jittered = backoff.mul_f64(0.5 + fastrand::f64());
        if tokio::time::Instant::now() + jittered >= deadline {
            return Err(GatewayError::UpstreamTimeout(timeout));
        }
        tracing::debug!(attempt, reason = %retry_reason, "retrying the Zuora call");
        tokio::time::sleep(jittered).await;
        attempt += 1;
    }
}

/// The response for the caller: hop-by-hop headers and the client's
/// extensions dropped. A 401 carries the request's `extensions` back
/// ([`RequestExtensions`]) for the token layer's replay.
fn finish(resp: http::Response<Body>, extensions: http::Extensions) -> http::Response<Body> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.extensions = http::Extensions::new();
    if parts.status == http::StatusCode::UNAUTHORIZED {
        parts.extensions.insert(RequestExtensions(extensions));
    }
    http::Response::from_parts(parts, body)
}

/// Responses announcing at most this many bytes are read whole before the
/// caller sees anything (at most `max_in_flight` times this in memory).
const RESPONSE_BUFFER_LIMIT: u64 = 64 * 1024;

/// Reads Zuora's response body within the request deadline. A small body
/// (the JSON answers of the job API) is read whole first, so a reset mid-body, a
/// body that trickles past the deadline or a corrupt gzip stream becomes a
/// Zuora-shaped 502/504 instead of a truncated 200. A larger or unsized body
/// is streamed, and fails if it is not finished by the deadline.
async fn read_response(
    resp: http::Response<super::client::ResponseBody>,
    deadline: tokio::time::Instant,
    timeout: std::time::Duration,
) -> Result<http::Response<Body>, GatewayError> {
    use http_body::Body as _;
    use http_body_util::BodyExt;
    let (parts, incoming) = resp.into_parts();
    let small = incoming
        .size_hint()
        .upper()
        .is_some_and(|n| n <= RESPONSE_BUFFER_LIMIT);
    if !small {
        let body = DeadlineBody {
            inner: body::boxed(incoming),
            sleep: tokio::time::sleep_until(deadline),
            timeout,
        };
        return Ok(http::Response::from_parts(parts, body.boxed_unsync()));
    }
    let bytes = tokio::time::timeout_at(deadline, incoming.collect())
        .await
        .map_err(|_| GatewayError::UpstreamTimeout(timeout))?
        .map_err(|e| {
            GatewayError::BadUpstreamResponse(format!(
                "the response body broke off: {}",
                root_cause(&e)
            ))
        })?
        .to_bytes();
    let gzipped = parts
        .headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
    if gzipped
        && let Err(GatewayError::InvalidValue(_)) =
            crate::compression::gunzip_bounded(&bytes, 16 * RESPONSE_BUFFER_LIMIT)
    {
        return Err(GatewayError::BadUpstreamResponse(
            "Zuora sent a corrupt gzip body".into(),
        ));
    }
    Ok(http::Response::from_parts(parts, body::full(bytes)))
}

pin_project_lite::pin_project! {
    /// A streamed upstream body that fails with a timeout at the request deadline.
    struct DeadlineBody {
        #[pin]
        inner: Body,
        #[pin]
        sleep: tokio::time::Sleep,
        timeout: std::time::Duration,
    }
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = body::BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, body::BoxError>>> {
        use std::future::Future;
        let this = self.project();
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if this.sleep.poll(cx).is_ready() {
            return Poll::Ready(Some(Err(Box::new(GatewayError::UpstreamTimeout(
                *this.timeout,
            )))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Maps a client error: a gateway error raised by the request body (size
/// limit, corrupt gzip) wins; then connect failures; everything else is a
/// broken exchange with Zuora.
fn classify_client_error(e: &super::client::Error) -> GatewayError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(gw) = s.downcast_ref::<GatewayError>() {
            return gw.clone();
        }
        source = s.source();
    }
    if e.is_connect() {
        return GatewayError::UpstreamConnect(root_cause(e));
    }
    GatewayError::BadUpstreamResponse(root_cause(e))
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last = e;
    while let Some(s) = last.source() {
        last = s;
    }
    last.to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn rebase_reuses_the_callers_path_and_query_exactly_like_join() {
        for base in [
            "https://rest.zuora.com",
            "https://rest.zuora.com/",
            "http://127.0.0.1:9000/prefix/",
        ] {
            let base: Uri = base.parse().unwrap();
            for caller in ["/v1/x?a=1&b=%20", "/v1/x", "/", "http://gw:8080/v1/y?q"] {
                let uri: Uri = caller.parse().unwrap();
                assert_eq!(
                    rebase(&base, &uri).unwrap(),
                    join(&base, uri.path(), uri.query()).unwrap(),
                    "{base} + {caller}"
                );
            }
        }
    }

    #[test]
    fn the_host_of_a_plain_http_upstream_is_what_the_client_would_set() {
        for (base, host) in [
            ("http://127.0.0.1:18090", Some("127.0.0.1:18090")),
            ("http://sim.local", Some("sim.local")),
            ("http://sim.local:80/prefix/", Some("sim.local")),
            ("http://[::1]:8080", Some("[::1]:8080")),
            ("https://rest.zuora.com", None),
            ("https://rest.zuora.com:8443", None),
        ] {
            let base: Uri = base.parse().unwrap();
            assert_eq!(
                http_host(&base).as_ref().map(|h| h.to_str().unwrap()),
                host,
                "{base}"
            );
        }
    }

    #[test]
    fn join_keeps_base_prefix_and_query() {
        let base: Uri = "https://rest.zuora.com".parse().unwrap();
        assert_eq!(
            join(&base, "/v1/x", Some("a=1")).unwrap().to_string(),
            "https://rest.zuora.com/v1/x?a=1"
        );
        let base: Uri = "http://127.0.0.1:9000/prefix/".parse().unwrap();
        assert_eq!(
            join(&base, "/v1/x", None).unwrap().to_string(),
            "http://127.0.0.1:9000/prefix/v1/x"
        );
    }
}
