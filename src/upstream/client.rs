//! The pooled HTTP client used for Zuora (API calls and token requests), the
//! JWKS fetch and the OTLP export: rustls with webpki roots plus the
//! upstream's `ca_file`, HTTP/1.1 and HTTP/2 by ALPN, plain http for the
//! simulator.
//!
//! It is built on hyper's connection API, not hyper-util's legacy client:
//! each client keeps its own small pool, one per serving runtime (see
//! [`Clients`]), so a request costs a lock of an uncontended mutex, a scan
//! of a handful of origins (a client talks to its upstream's base URL and
//! perhaps a token URL) and no hashing, no boxing and no task of its own.
//!
//! - HTTP/1.1: a connection has no task of its own. The request's task
//!   drives it (hyper's `Connection` future, kept with its `SendRequest`):
//!   while waiting for the response head, which also writes a streamed
//!   request body, and while reading the response body. Idle connections
//!   wait, unpolled, in a LIFO list per origin; one is reused when hyper
//!   says it is ready (its last response was read to the end). One the
//!   peer closed while idle shows it on the exchange's first poll, before
//!   anything is sent: the request is retried on another connection (see
//!   below), and the origin's other closed idle ones are dropped. The idle
//!   sweep polls idle connections too. A response body dropped
//!   before its end, or a request dropped before its answer, closes its
//!   connection.
//! - HTTP/2 (when ALPN picks `h2`): one connection per origin, shared by
//!   all requests (it runs as its own task), replaced when it closes.
//! - At most `pool.max_idle_per_host` idle HTTP/1.1 connections per origin
//!   (each keeps hyper's read and write buffers); idle
//!   ones are closed after `pool.idle_timeout`, by a sweep that runs while
//!   the pool holds any. Busy connections are not capped here: the
//!   upstream's `max_concurrent_requests` bounds them.
//! - A request that an idle connection refused before sending anything (it
//!   was closing) is sent again on another connection, as hyper-util's
//!   client did.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HOST, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::client::conn::{TrySendError, http1, http2};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::net::TcpStream;
use tower::Service;

use crate::body::{Body, BoxError};
use crate::config::UpstreamConfig;

/// The client type used for every upstream call.
pub type HttpClient = Client;

/// The connector: rustls (or plain http) over hyper-util's TCP connector
/// (connect timeout, `TCP_NODELAY`, keep-alive probes).
#[derive(Clone, Debug)]
pub struct Connector(HttpsConnector<HttpConnector>);

impl Connector {
    /// A TCP (and TLS for https) connection to `dst`'s authority.
    async fn connect(&self, dst: Uri) -> Result<Conn, BoxError> {
        // hyper-util's connector is always ready (its `poll_ready` returns
        // `Ready`); its legacy client called it the same way.
        self.0.clone().call(dst).await.map(Conn)
    }
}

/// A connection made by [`Connector`].
#[derive(Debug)]
pub struct Conn(MaybeHttpsStream<TokioIo<TcpStream>>);

impl Conn {
    /// Whether TLS negotiated HTTP/2 by ALPN.
    fn is_h2(&self) -> bool {
        match &self.0 {
            MaybeHttpsStream::Http(_) => false,
            MaybeHttpsStream::Https(tls) => {
                tls.inner().get_ref().1.alpn_protocol() == Some(b"h2".as_slice())
            }
        }
    }
}

impl Read for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl Write for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
}

/// A failed call, shaped like hyper-util's client error (`client error
/// (Connect)`, the cause in [`std::error::Error::source`]).
pub struct Error {
    kind: ErrorKind,
    source: Option<BoxError>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ErrorKind {
    /// The connector failed (DNS, TCP, TLS, connect timeout): nothing was sent.
    Connect,
    /// The connection failed during the handshake or the exchange.
    SendRequest,
    /// A new connection closed before it took the request.
    Canceled,
    /// The request's URI has no scheme or authority.
    UserAbsoluteUriRequired,
}

impl Error {
    fn new(kind: ErrorKind, source: impl Into<BoxError>) -> Self {
        Error {
            kind,
            source: Some(source.into()),
        }
    }

    /// Whether connecting failed (so nothing reached the upstream).
    pub fn is_connect(&self) -> bool {
        self.kind == ErrorKind::Connect
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut t = f.debug_tuple("client::Error");
        t.field(&self.kind);
        if let Some(source) = &self.source {
            t.field(source);
        }
        t.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "client error ({:?})", self.kind)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| &**e as _)
    }
}

/// Errors building a client (only from bad CA material, which config
/// validation already checked, so this is a belt-and-braces path).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the TLS client for upstream `{upstream}`: {message}")]
pub struct ClientBuildError {
    upstream: String,
    message: String,
}

/// The rustls client config: webpki roots plus `extra_ca_pem`.
pub fn tls_config(extra_ca_pem: Option<&[u8]>) -> Result<rustls::ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = extra_ca_pem {
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| format!("invalid PEM: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("unusable CA certificate: {e}"))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// Builds the pooled client for one upstream.
pub fn build_client(cfg: &UpstreamConfig) -> Result<HttpClient, ClientBuildError> {
    Ok(build_clients(cfg, 1)?.first().clone())
}

/// Builds `runtimes` pooled clients for one upstream, one per serving
/// runtime (at least one).
pub fn build_clients(cfg: &UpstreamConfig, runtimes: usize) -> Result<Clients, ClientBuildError> {
    let err = |message: String| ClientBuildError {
        upstream: cfg.name.clone(),
        message,
    };
    let tls = tls_config(cfg.ca_pem.as_deref().map(Vec::as_slice)).map_err(err)?;
    let clients = (0..runtimes.max(1))
        .map(|_| {
            https_client(
                tls.clone(),
                cfg.connect_timeout,
                cfg.pool_idle_timeout,
                cfg.pool_max_idle_per_host,
            )
        })
        .collect();
    Ok(Clients(clients))
}

thread_local! {
    /// Which serving runtime this thread drives (see [`set_runtime_index`]).
    static RUNTIME_INDEX: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the current thread as the driver of serving runtime `index`, so
/// that requests served on it use that runtime's pool ([`Clients::current`]).
/// Threads never marked use the first pool.
pub fn set_runtime_index(index: usize) {
    RUNTIME_INDEX.with(|i| i.set(index));
}

/// One pooled client per serving runtime. With one current-thread runtime
/// per core, a pooled connection's socket (and an HTTP/2 connection's task)
/// belongs to the runtime that made it; sharing one pool would have
/// requests on one thread use sockets of another's reactor (cross-thread
/// wake-ups, every request). Each runtime keeping its own pool avoids
/// that; the upstream's
/// `max_concurrent_requests` slots stay shared.
#[derive(Clone, Debug)]
pub struct Clients(Arc<[HttpClient]>);

impl Clients {
    /// The pool of the runtime this thread serves.
    pub fn current(&self) -> &HttpClient {
        let i = RUNTIME_INDEX.with(std::cell::Cell::get);
        // `Clients` always holds at least one client (see `build_clients`).
        &self.0[i % self.0.len()]
    }

    /// The first pool (background work: token requests).
    pub fn first(&self) -> &HttpClient {
        &self.0[0]
    }

    /// How many pools (serving runtimes).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never true: there is always at least one pool.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A pooled HTTP/1.1 + HTTP/2 (by ALPN) client over rustls that also speaks
/// plain http (the simulator, a local JWKS).
pub fn https_client(
    tls: rustls::ClientConfig,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle_per_host: usize,
) -> Client {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new());
    Client {
        pool: Arc::new(Pool {
            connector: Connector(connector),
            h1: http1::Builder::new(),
            h2,
            idle_timeout,
            max_idle: max_idle_per_host,
            state: Mutex::new(State {
                origins: Vec::new(),
                sweeping: false,
            }),
        }),
    }
}

/// A pooled client (cheap to clone: clones share the pool). Requests must
/// carry an absolute URI (`scheme://authority/path`).
pub struct Client {
    pool: Arc<Pool>,
}

impl Clone for Client {
    fn clone(&self) -> Self {
        Client {
            pool: self.pool.clone(),
        }
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("idle_timeout", &self.pool.idle_timeout)
            .field("max_idle_per_host", &self.pool.max_idle)
            .finish_non_exhaustive()
    }
}

/// At most this many times a request that a pooled connection refused
/// before sending anything (it was closing) is tried on another one.
const MAX_UNSENT_RETRIES: usize = 8;

impl Client {
    /// Sends `req` (absolute URI) on a pooled or new connection; the
    /// response's body gives the connection back once read to its end.
    pub fn request(
        &self,
        req: Request<Body>,
    ) -> impl Future<Output = Result<Response<ResponseBody>, Error>> + Send + '_ {
        self.send(req)
    }

    async fn send(&self, mut req: Request<Body>) -> Result<Response<ResponseBody>, Error> {
        // HTTP/1.1 wants `Host`; `forward` sets it for plain-http upstreams.
        let want_host = !req.headers().contains_key(HOST);
        let mut retries = 0;
        loop {
            let lease = self.pool.checkout(req.uri(), want_host)?;
            let reused = lease.conn.is_some();
            let conn = match lease.conn {
                Some(conn) => conn,
                // Boxed: the handshakes' state would otherwise make every
                // request's future (and the caller's) several KiB larger.
                None => Box::pin(self.pool.clone().connect(lease.origin)).await?,
            };
            let refused = match conn {
                Checked::H2(mut tx) => {
                    // Absolute form: hyper takes `:scheme` and `:authority` from it.
                    match tx.try_send_request(req).await {
                        Ok(resp) => return Ok(resp.map(|b| ResponseBody::new(b, None))),
                        Err(mut e) => match e.take_message() {
                            Some(unsent) if reused && retries < MAX_UNSENT_RETRIES => {
                                self.pool.forget_closed_h2(lease.origin);
                                (unsent, None, BoxError::from(e.into_error()))
                            }
                            Some(_) => return Err(Error::new(ErrorKind::Canceled, e.into_error())),
                            None => {
                                return Err(Error::new(ErrorKind::SendRequest, e.into_error()));
                            }
                        },
                    }
                }
                Checked::H1(mut h1) => {
                    if let Some(host) = lease.host {
                        req.headers_mut().insert(HOST, host);
                    }
                    let absolute = std::mem::take(req.uri_mut());
                    *req.uri_mut() = origin_form(&absolute);
                    match h1.exchange(req).await {
                        Ok(resp) => {
                            let back = GiveBack {
                                pool: self.pool.clone(),
                                origin: lease.origin,
                                h1,
                            };
                            return Ok(resp.map(|b| ResponseBody::new(b, Some(back))));
                        }
                        Err((Some(unsent), reason)) if reused && retries < MAX_UNSENT_RETRIES => {
                            // It closed while idle: so may have the others
                            // (an upstream restart): they go now, not one
                            // retry each.
                            self.pool.drop_closed_idle(lease.origin);
                            (unsent, Some(absolute), reason)
                        }
                        Err((Some(_), reason)) => {
                            return Err(Error::new(ErrorKind::Canceled, reason));
                        }
                        Err((None, reason)) => {
                            return Err(Error::new(ErrorKind::SendRequest, reason));
                        }
                    }
                }
            };
            let (unsent, absolute, reason) = refused;
            tracing::trace!(reason = %reason, "a pooled connection refused the request; trying another");
            req = unsent;
            if let Some(uri) = absolute {
                *req.uri_mut() = uri;
            }
            retries += 1;
        }
    }
}

/// `/path?query` of an absolute URI (what HTTP/1.1 puts on the request line).
fn origin_form(uri: &Uri) -> Uri {
    match uri.path_and_query() {
        Some(pq) if pq.as_str() != "/" => {
            let mut parts = http::uri::Parts::default();
            parts.path_and_query = Some(pq.clone());
            // A path-and-query alone always makes a valid URI.
            Uri::from_parts(parts).unwrap_or_default()
        }
        _ => Uri::default(),
    }
}

/// `host[:port]`, the port only when it is not the scheme's default (what
/// hyper-util's client set).
fn host_header(scheme: &Scheme, authority: &Authority) -> Option<HeaderValue> {
    let default = if *scheme == Scheme::HTTPS { 443 } else { 80 };
    let value = match authority.port_u16() {
        Some(port) if port != default => format!("{}:{port}", authority.host()),
        _ => authority.host().to_owned(),
    };
    HeaderValue::from_str(&value).ok()
}

/// One client's connections.
struct Pool {
    connector: Connector,
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    idle_timeout: Duration,
    max_idle: usize,
    state: Mutex<State>,
}

struct State {
    /// The origins this client talks to, in order of first use (a few:
    /// never removed, so an index stays valid).
    origins: Vec<Origin>,
    /// Whether the idle sweep task runs.
    sweeping: bool,
}

struct Origin {
    scheme: Scheme,
    authority: Authority,
    /// `Host` for HTTP/1.1 requests that carry none.
    host: Option<HeaderValue>,
    /// Idle HTTP/1.1 connections, the most recently used last (so their
    /// `since` only grows towards the end).
    idle: Vec<Idle<Box<H1>>>,
    /// The shared HTTP/2 connection, if the origin speaks it.
    h2: Option<Idle<http2::SendRequest<Body>>>,
}

struct Idle<T> {
    tx: T,
    /// When it went idle (HTTP/1.1) or was last used (HTTP/2).
    since: Instant,
}

enum Checked {
    H1(Box<H1>),
    H2(http2::SendRequest<Body>),
}

/// An HTTP/1.1 connection with no task of its own: hyper's connection state
/// machine ([`http1::Connection`]) is polled by the task that uses it, while
/// it waits for the response head ([`H1::exchange`]) and while it reads the
/// response body ([`ResponseBody`]); that saves the hops to and from a
/// connection task on every request. Idle in the pool, nobody polls it: a
/// checkout (and the idle sweep) polls it once to see whether the peer
/// closed it. Dropping it closes the connection.
struct H1 {
    tx: http1::SendRequest<Body>,
    /// `None` once the connection has finished (closed or failed).
    conn: Option<http1::Connection<Conn, Body>>,
}

/// Why an exchange failed: the request if nothing of it was sent, and the cause.
type Refused = (Option<Request<Body>>, BoxError);

impl H1 {
    /// Drives the connection: writes the request and its body, reads the
    /// response into the response body's channel. `Ready` once the
    /// connection has finished; it is dropped then, which answers any
    /// request still waiting on it (with an error).
    fn poll_conn(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(conn) = &mut self.conn else {
            return Poll::Ready(());
        };
        let Poll::Ready(done) = Pin::new(conn).poll(cx) else {
            return Poll::Pending;
        };
        if let Err(e) = done {
            tracing::debug!(error = %e, "upstream HTTP/1.1 connection error");
        }
        self.conn = None;
        Poll::Ready(())
    }

    /// Whether an idle connection can take a request: polled once, it is
    /// still open (it reads a close by the peer), and hyper wants the next
    /// request. No wake-up is wanted: nobody waits on an idle connection.
    /// (The idle sweep and a refused request use it; a checkout does not.)
    fn is_reusable(&mut self) -> bool {
        self.poll_conn(&mut Context::from_waker(Waker::noop()))
            .is_pending()
            && self.tx.is_ready()
    }

    /// Sends `req` and waits for the response head, driving the connection
    /// meanwhile (that is what writes the request and its body).
    fn exchange(
        &mut self,
        req: Request<Body>,
    ) -> Exchange<'_, impl Future<Output = Result<Response<Incoming>, TrySendError<Request<Body>>>>>
    {
        let resp = self.tx.try_send_request(req);
        Exchange {
            h1: self,
            resp,
            sent: false,
        }
    }
}

pin_project_lite::pin_project! {
    /// [`H1::exchange`]'s future.
    struct Exchange<'a, F> {
        h1: &'a mut H1,
        #[pin]
        resp: F,
        // Whether it was polled before (so the request went out).
        sent: bool,
    }
}

impl<F> Future for Exchange<'_, F>
where
    F: Future<Output = Result<Response<Incoming>, TrySendError<Request<Body>>>>,
{
    type Output = Result<Response<Incoming>, Refused>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let noop = &mut Context::from_waker(Waker::noop());
        // Once the request is out, the answer has usually come when this is
        // polled: the connection is polled without a waker first, so that
        // what it registers while reading the answer (hyper's body channel
        // keeps its waker, and wakes it as the body is taken) does not wake
        // this task again for nothing. Every `Pending` below still leaves
        // the connection polled with `cx` last, and so does every `Pending`
        // of the response body (see `ResponseBody::poll_frame`).
        if std::mem::replace(this.sent, true) {
            let finished = this.h1.poll_conn(noop).is_ready();
            if let Poll::Ready(answer) = this.resp.as_mut().poll(noop) {
                return Poll::Ready(refusal(answer));
            }
            if finished {
                return Poll::Ready(Err(unanswered()));
            }
        }
        let finished = this.h1.poll_conn(cx).is_ready();
        // Only the connection, polled just above, answers `resp` (or its
        // drop does): `resp` needs no wake-up of its own.
        match this.resp.poll(noop) {
            Poll::Ready(answer) => Poll::Ready(refusal(answer)),
            // hyper answers every request of a dropped connection; never
            // wait forever if it did not.
            Poll::Pending if finished => Poll::Ready(Err(unanswered())),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// hyper's answer, its refusal split into the request (if unsent) and the cause.
// The unsent request rides back for a retry (hyper's `TrySendError` does the same).
#[allow(clippy::result_large_err)]
fn refusal(
    answer: Result<Response<Incoming>, TrySendError<Request<Body>>>,
) -> Result<Response<Incoming>, Refused> {
    answer.map_err(|mut e| {
        let unsent = e.take_message();
        (unsent, BoxError::from(e.into_error()))
    })
}

/// A connection that finished without answering (hyper always answers).
fn unanswered() -> Refused {
    (
        None,
        BoxError::from("the connection closed without an answer"),
    )
}

struct Lease {
    origin: usize,
    conn: Option<Checked>,
    /// The origin's `Host`, when the request needs one.
    host: Option<HeaderValue>,
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding it; a poisoned pool is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn expired(&self, since: Instant, now: Instant) -> bool {
        now.saturating_duration_since(since) > self.idle_timeout
    }

    /// A live connection to `uri`'s origin, if one is idle (or shared).
    /// Stale and closed idle connections met on the way are dropped.
    fn checkout(&self, uri: &Uri, want_host: bool) -> Result<Lease, Error> {
        let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
            return Err(Error::new(
                ErrorKind::UserAbsoluteUriRequired,
                "the request URI has no scheme or authority",
            ));
        };
        let now = Instant::now();
        let mut state = self.lock();
        let origin = match state
            .origins
            .iter()
            .position(|o| o.scheme == *scheme && o.authority == *authority)
        {
            Some(i) => i,
            None => {
                state.origins.push(Origin {
                    scheme: scheme.clone(),
                    authority: authority.clone(),
                    host: host_header(scheme, authority),
                    idle: Vec::new(),
                    h2: None,
                });
                state.origins.len() - 1
            }
        };
        let Some(o) = state.origins.get_mut(origin) else {
            return Err(Error::new(ErrorKind::Canceled, "pool origin vanished"));
        };
        let host = if want_host { o.host.clone() } else { None };
        let lease = |conn| Lease { origin, conn, host };
        if let Some(shared) = &mut o.h2 {
            if !shared.tx.is_closed() {
                shared.since = now;
                return Ok(lease(Some(Checked::H2(shared.tx.clone()))));
            }
            o.h2 = None;
        }
        let mut candidate = o.idle.pop();
        drop(state);
        // The newest first: if it is stale, all are.
        while let Some(idle) = candidate {
            let h1 = idle.tx;
            if self.expired(idle.since, now) {
                let stale = self.take_idle(origin);
                // Dropped (closed) outside the lock.
                drop(stale);
            } else if h1.conn.is_some() && h1.tx.is_ready() {
                // Not polled here (≈ 800 instructions, 1 % of a proxied
                // request): a close by the peer shows on the exchange's
                // first poll, which reads before it writes anything, and the
                // request is then sent again on another connection (see
                // `Client::send`).
                return Ok(lease(Some(Checked::H1(h1))));
            }
            // Stale (or not ready, which `put` already refuses): closed.
            drop(h1);
            candidate = self
                .lock()
                .origins
                .get_mut(origin)
                .and_then(|o| o.idle.pop());
        }
        Ok(lease(None))
    }

    /// Drops `origin`'s idle HTTP/1.1 connections that have closed (each
    /// polled once, with no wake-up).
    fn drop_closed_idle(&self, origin: usize) {
        if let Some(o) = self.lock().origins.get_mut(origin) {
            o.idle.retain_mut(|i| i.tx.is_reusable());
        }
    }

    /// All of `origin`'s idle connections, taken out of the pool.
    fn take_idle(&self, origin: usize) -> Vec<Idle<Box<H1>>> {
        self.lock()
            .origins
            .get_mut(origin)
            .map(|o| std::mem::take(&mut o.idle))
            .unwrap_or_default()
    }

    /// Gives an HTTP/1.1 connection whose response was read to the end back
    /// (if hyper is ready for its next request: a connection still writing
    /// the request body of an early answer is closed instead).
    fn put(&self, origin: usize, h1: Box<H1>) -> bool {
        if h1.conn.is_none() || !h1.tx.is_ready() {
            return false;
        }
        let mut state = self.lock();
        let Some(o) = state.origins.get_mut(origin) else {
            return false;
        };
        if o.idle.len() >= self.max_idle {
            drop(state);
            drop(h1);
            return false;
        }
        o.idle.push(Idle {
            tx: h1,
            since: Instant::now(),
        });
        !std::mem::replace(&mut state.sweeping, true)
    }

    /// Drops `origin`'s shared HTTP/2 connection if it has closed.
    fn forget_closed_h2(&self, origin: usize) {
        let mut state = self.lock();
        if let Some(o) = state.origins.get_mut(origin)
            && o.h2.as_ref().is_some_and(|s| s.tx.is_closed())
        {
            o.h2 = None;
        }
    }

    /// Closes idle connections past the idle timeout (and forgets closed
    /// ones). Returns whether any are left; if none, the sweep stops.
    fn sweep(&self, now: Instant) -> bool {
        let mut state = self.lock();
        let mut left = false;
        for o in &mut state.origins {
            // Polled with no wake-up: this also notices a close by the peer.
            o.idle
                .retain_mut(|i| !self.expired(i.since, now) && i.tx.is_reusable());
            if o.h2
                .as_ref()
                .is_some_and(|s| s.tx.is_closed() || self.expired(s.since, now))
            {
                o.h2 = None;
            }
            left |= !o.idle.is_empty() || o.h2.is_some();
        }
        if !left {
            state.sweeping = false;
        }
        left
    }
}

impl Pool {
    /// Starts the idle sweep on the current runtime (it stops by itself
    /// when the pool has no idle connection left, or the client is gone).
    fn start_sweep(self: &Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime here: checkouts still drop stale connections.
            self.lock().sweeping = false;
            return;
        };
        let task = SweepTask {
            pool: Arc::downgrade(self),
            finished: false,
        };
        let period = self.idle_timeout.max(Duration::from_millis(100));
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(pool) = task.pool.upgrade() else {
                    return task.finish();
                };
                if !pool.sweep(Instant::now()) {
                    return task.finish();
                }
            }
        });
    }
}

/// The sweep task's hold on its pool. Dropped before the sweep finished
/// (its runtime shut down), it lets the next idle connection start another.
struct SweepTask {
    pool: Weak<Pool>,
    finished: bool,
}

impl SweepTask {
    /// Ends the sweep normally (the pool is gone or has nothing idle).
    fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for SweepTask {
    fn drop(&mut self) {
        if !self.finished
            && let Some(pool) = self.pool.upgrade()
        {
            pool.lock().sweeping = false;
        }
    }
}

impl Pool {
    /// A new connection to `origin`: HTTP/2 if ALPN says so (then shared),
    /// HTTP/1.1 otherwise (no task: see [`H1`]). An HTTP/2 connection's
    /// task runs on the current runtime.
    fn connect(
        self: Arc<Self>,
        origin: usize,
    ) -> impl Future<Output = Result<Checked, Error>> + Send {
        self.connect_inner(origin)
    }

    async fn connect_inner(self: Arc<Self>, origin: usize) -> Result<Checked, Error> {
        let dst = {
            let state = self.lock();
            let o = state
                .origins
                .get(origin)
                .ok_or_else(|| Error::new(ErrorKind::Canceled, "pool origin vanished"))?;
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(o.scheme.clone());
            parts.authority = Some(o.authority.clone());
            parts.path_and_query = Some(PathAndQuery::from_static("/"));
            Uri::from_parts(parts).map_err(|e| Error::new(ErrorKind::Connect, e))?
        };
        let io = self
            .connector
            .connect(dst)
            .await
            .map_err(|e| Error::new(ErrorKind::Connect, e))?;
        if io.is_h2() {
            let (mut tx, conn) = self
                .h2
                .handshake(io)
                .await
                .map_err(|e| Error::new(ErrorKind::SendRequest, e))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection error");
                }
            });
            tx.ready()
                .await
                .map_err(|e| Error::new(ErrorKind::SendRequest, e))?;
            let start = {
                let mut state = self.lock();
                let Some(o) = state.origins.get_mut(origin) else {
                    return Ok(Checked::H2(tx));
                };
                // Shared unless a concurrent request already shared its own.
                if o.h2.as_ref().is_none_or(|s| s.tx.is_closed()) {
                    o.h2 = Some(Idle {
                        tx: tx.clone(),
                        since: Instant::now(),
                    });
                    !std::mem::replace(&mut state.sweeping, true)
                } else {
                    false
                }
            };
            if start {
                self.start_sweep();
            }
            return Ok(Checked::H2(tx));
        }
        let (tx, conn) = self
            .h1
            .handshake(io)
            .await
            .map_err(|e| Error::new(ErrorKind::SendRequest, e))?;
        // No task: the request's task drives it (see `H1`). A new connection
        // takes its first request before it has been polled.
        Ok(Checked::H1(Box::new(H1 {
            tx,
            conn: Some(conn),
        })))
    }
}

/// An HTTP/1.1 connection to give back once its response is read.
struct GiveBack {
    pool: Arc<Pool>,
    origin: usize,
    h1: Box<H1>,
}

impl GiveBack {
    fn give_back(self) {
        if self.pool.put(self.origin, self.h1) {
            self.pool.start_sweep();
        }
    }
}

/// A response body from [`Client::request`]: hyper's body, which gives its
/// HTTP/1.1 connection back to the pool once read to the end (or dropped
/// after its end). Dropped earlier, the connection is not reused.
pub struct ResponseBody {
    inner: Incoming,
    back: Option<GiveBack>,
}

impl ResponseBody {
    fn new(inner: Incoming, back: Option<GiveBack>) -> Self {
        ResponseBody { inner, back }
    }
}

impl fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let Some(back) = &mut this.back else {
            return Pin::new(&mut this.inner).poll_frame(cx);
        };
        // HTTP/1.1: this task drives the connection, which reads the body
        // into `inner`'s channel. Only that connection feeds `inner` (or its
        // drop ends it), and only when polled here: `inner` needs no wake-up
        // of its own (asking for one would only wake this task again). What
        // the connection has already read is taken first; it is polled only
        // when `inner` has nothing yet.
        let noop = &mut Context::from_waker(Waker::noop());
        let mut polled = Pin::new(&mut this.inner).poll_frame(noop);
        if polled.is_pending() {
            let _ = back.h1.poll_conn(cx);
            polled = Pin::new(&mut this.inner).poll_frame(noop);
        }
        match &polled {
            Poll::Ready(None) => {
                if let Some(back) = this.back.take() {
                    back.give_back();
                }
            }
            // A broken exchange: the connection goes with it.
            Poll::Ready(Some(Err(_))) => this.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let Some(back) = self.back.take()
            && self.inner.is_end_stream()
        {
            back.give_back();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use bytes::Bytes;
    use http::{Request, Response, Version};
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A `localhost` certificate signed by a fresh CA: (server config, CA PEM).
    fn pki(alpn: &[&[u8]]) -> (rustls::ServerConfig, String) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        server.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        (server, ca_cert.pem())
    }

    /// Serves over TLS, HTTP/2 only; answers with the version it was spoken
    /// to in and the request's authority. Counts accepted connections.
    async fn h2_only_server(server: rustls::ServerConfig) -> (u16, Arc<AtomicUsize>) {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let answer = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let text = format!(
                            "{:?} {}",
                            req.version(),
                            req.uri().authority().map_or("-", |a| a.as_str())
                        );
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), answer)
                        .await;
                });
            }
        });
        (port, accepted)
    }

    fn client(idle_timeout: Duration, max_idle: usize) -> Client {
        https_client(
            tls_config(None).unwrap(),
            Duration::from_secs(2),
            idle_timeout,
            max_idle,
        )
    }

    #[tokio::test]
    async fn an_upstream_choosing_h2_by_alpn_is_spoken_to_in_http2_on_one_shared_connection() {
        let (server, ca_pem) = pki(&[b"h2"]);
        let (port, accepted) = h2_only_server(server).await;
        let client: Client = https_client(
            tls_config(Some(ca_pem.as_bytes())).unwrap(),
            Duration::from_secs(5),
            Duration::from_secs(30),
            4,
        );
        for _ in 0..3 {
            let uri: Uri = format!("https://localhost:{port}/v1/x").parse().unwrap();
            let resp = send_get(&client, uri).await.unwrap();
            assert_eq!(resp.version(), Version::HTTP_2);
            assert!(resp.extensions().is_empty());
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, format!("HTTP/2.0 localhost:{port}").as_str());
        }
        // Concurrent requests share it too.
        let calls = (0..5).map(|_| {
            let client = client.clone();
            let uri: Uri = format!("https://localhost:{port}/v1/y").parse().unwrap();
            async move {
                let resp = send_get(&client, uri).await.unwrap();
                resp.into_body().collect().await.unwrap();
            }
        });
        futures_util::future::join_all(calls).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    /// What a raw test server does with each request.
    #[derive(Clone, Copy, PartialEq)]
    enum Mode {
        /// `200`, `ok`, keep-alive.
        KeepAlive,
        /// `200`, `ok` without `Connection: close`, then closes the socket.
        CloseAfterAnswer,
        /// Closes the socket without answering.
        CloseWithoutAnswer,
        /// A 4 MiB body, written until the client goes away.
        Large,
        /// `200`, `ok` after 200 ms.
        Slow,
    }

    /// A raw HTTP/1.1 server: counts accepted and finished connections and
    /// records each request head.
    struct Raw {
        port: u16,
        accepted: Arc<AtomicUsize>,
        finished: Arc<AtomicUsize>,
        heads: Arc<Mutex<Vec<String>>>,
    }

    async fn raw_server(mode: Mode) -> Raw {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let raw = Raw {
            port: listener.local_addr().unwrap().port(),
            accepted: Arc::default(),
            finished: Arc::default(),
            heads: Arc::default(),
        };
        let (accepted, finished, heads) = (
            raw.accepted.clone(),
            raw.finished.clone(),
            raw.heads.clone(),
        );
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                let (finished, heads) = (finished.clone(), heads.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    'conn: loop {
                        let head_end = loop {
                            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break i + 4;
                            }
                            let mut chunk = [0u8; 4096];
                            match tcp.read(&mut chunk).await {
                                Ok(0) | Err(_) => break 'conn,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        let head: Vec<u8> = buf.drain(..head_end).collect();
                        heads
                            .lock()
                            .unwrap()
                            .push(String::from_utf8_lossy(&head).into_owned());
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        match mode {
                            Mode::KeepAlive => {
                                if tcp.write_all(ok).await.is_err() {
                                    break;
                                }
                            }
                            Mode::Slow => {
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                if tcp.write_all(ok).await.is_err() {
                                    break;
                                }
                            }
                            Mode::CloseAfterAnswer => {
                                let _ = tcp.write_all(ok).await;
                                break;
                            }
                            Mode::CloseWithoutAnswer => break,
                            Mode::Large => {
                                let size = 4 << 20;
                                let head =
                                    format!("HTTP/1.1 200 OK\r\ncontent-length: {size}\r\n\r\n");
                                if tcp.write_all(head.as_bytes()).await.is_err() {
                                    break;
                                }
                                let chunk = vec![b'x'; 64 * 1024];
                                for _ in 0..size / chunk.len() {
                                    if tcp.write_all(&chunk).await.is_err() {
                                        break 'conn;
                                    }
                                }
                            }
                        }
                    }
                    drop(tcp);
                    finished.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        raw
    }

    impl Raw {
        fn url(&self, path: &str) -> Uri {
            format!("http://127.0.0.1:{}{path}", self.port)
                .parse()
                .unwrap()
        }

        fn accepted(&self) -> usize {
            self.accepted.load(Ordering::SeqCst)
        }

        fn finished(&self) -> usize {
            self.finished.load(Ordering::SeqCst)
        }
    }

    /// A GET of `uri` with an empty body, its response not read yet.
    fn send_get(
        client: &Client,
        uri: impl Into<Uri>,
    ) -> impl Future<Output = Result<Response<ResponseBody>, Error>> + '_ {
        client.request(Request::get(uri.into()).body(crate::body::empty()).unwrap())
    }

    async fn get(client: &Client, uri: Uri) -> Result<Bytes, Error> {
        let resp = send_get(client, uri).await?;
        Ok(resp.into_body().collect().await.unwrap().to_bytes())
    }

    /// Waits up to 2 s for `cond`.
    async fn eventually(cond: impl Fn() -> bool) -> bool {
        for _ in 0..200 {
            if cond() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cond()
    }

    #[tokio::test]
    async fn an_idle_http1_connection_is_reused_with_origin_form_and_host() {
        let server = raw_server(Mode::KeepAlive).await;
        let client = client(Duration::from_secs(30), 4);
        for _ in 0..3 {
            assert_eq!(
                get(&client, server.url("/v1/x?a=1&b=%20")).await.unwrap(),
                "ok"
            );
        }
        assert_eq!(server.accepted(), 1);
        let heads = server.heads.lock().unwrap().clone();
        assert_eq!(heads.len(), 3);
        for head in heads {
            let mut lines = head.lines();
            assert_eq!(lines.next(), Some("GET /v1/x?a=1&b=%20 HTTP/1.1"));
            let host = format!("host: 127.0.0.1:{}", server.port);
            assert!(lines.any(|l| l == host), "{head}");
        }
        // A `Host` the caller set is kept, and the bare origin is sent as `/`.
        let req = Request::get(server.url(""))
            .header(HOST, "zuora.example")
            .body(crate::body::empty())
            .unwrap();
        let resp = client.request(req).await.unwrap();
        resp.into_body().collect().await.unwrap();
        let last = server.heads.lock().unwrap().last().cloned().unwrap();
        assert!(last.starts_with("GET / HTTP/1.1\r\n"), "{last}");
        assert!(last.contains("host: zuora.example\r\n"), "{last}");
        assert!(!last.contains("127.0.0.1"), "{last}");
        assert_eq!(server.accepted(), 1);
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_after_the_idle_timeout_and_not_reused() {
        let server = raw_server(Mode::KeepAlive).await;
        let client = client(Duration::from_millis(150), 4);
        get(&client, server.url("/a")).await.unwrap();
        assert_eq!(server.finished(), 0);
        // The sweep closes it without any further request.
        assert!(eventually(|| server.finished() == 1).await);
        get(&client, server.url("/a")).await.unwrap();
        assert_eq!(server.accepted(), 2);
    }

    #[test]
    fn the_sweep_restarts_on_another_runtime_when_its_runtime_is_gone() {
        let servers = tokio::runtime::Runtime::new().unwrap();
        let server = servers.block_on(raw_server(Mode::KeepAlive));
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        let client = client(Duration::from_millis(150), 4);
        let first = runtime();
        first.block_on(get(&client, server.url("/a"))).unwrap();
        // Its sweep goes with it. The idle connection (it has no task) stays
        // in the pool, but its socket belonged to that runtime's reactor.
        drop(first);
        runtime().block_on(async {
            // The next checkout finds it unusable and closes it; the request
            // goes on a new connection, which this runtime's sweep closes.
            get(&client, server.url("/a")).await.unwrap();
            assert_eq!(server.accepted(), 2);
            assert!(eventually(|| server.finished() == 1).await);
            assert!(eventually(|| server.finished() == 2).await);
        });
    }

    #[tokio::test]
    async fn a_stale_idle_connection_is_dropped_at_checkout() {
        let server = raw_server(Mode::KeepAlive).await;
        let client: Client = client(Duration::from_millis(100), 4);
        get(&client, server.url("/a")).await.unwrap();
        // Pretend the sweep has not run yet.
        client.pool.lock().origins[0].idle[0].since -= Duration::from_millis(500);
        let lease = client.pool.checkout(&server.url("/a"), false).unwrap();
        assert!(lease.conn.is_none());
        assert!(client.pool.lock().origins[0].idle.is_empty());
        assert!(eventually(|| server.finished() == 1).await);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_not_reused_and_the_next_request_succeeds() {
        let server = raw_server(Mode::CloseAfterAnswer).await;
        let client = client(Duration::from_secs(30), 4);
        for _ in 0..3 {
            assert_eq!(get(&client, server.url("/a")).await.unwrap(), "ok");
            // Whether or not the pool noticed the close yet, the next one works.
        }
        assert_eq!(server.accepted(), 3);
    }

    #[tokio::test]
    async fn a_response_not_read_to_its_end_does_not_give_its_connection_back() {
        let server = raw_server(Mode::Large).await;
        let client: Client = client(Duration::from_secs(30), 4);
        let resp = send_get(&client, server.url("/big")).await.unwrap();
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.is_data());
        drop(body);
        assert!(eventually(|| server.finished() == 1).await);
        assert!(client.pool.lock().origins[0].idle.is_empty());
        let resp = send_get(&client, server.url("/big")).await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.len(), 4 << 20);
        assert_eq!(server.accepted(), 2);
        // Read to the end, that one is kept.
        assert!(eventually(|| client.pool.lock().origins[0].idle.len() == 1).await);
    }

    #[tokio::test]
    async fn a_streamed_request_body_is_sent_while_the_request_waits_for_its_answer() {
        // Answers once the whole (chunked) request body has arrived.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::<u8>::new()));
        let got = seen.clone();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut chunk = [0u8; 4096];
            loop {
                let n = tcp.read(&mut chunk).await.unwrap();
                assert!(n > 0, "the client closed before its body ended");
                let mut seen = got.lock().unwrap();
                seen.extend_from_slice(&chunk[..n]);
                if seen.ends_with(b"\r\n0\r\n\r\n") {
                    break;
                }
            }
            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
            tcp.write_all(ok).await.unwrap();
            let _ = tcp.read(&mut chunk).await;
        });
        let (feed, rx) = tokio::sync::mpsc::channel::<&'static str>(1);
        let frames = futures_util::stream::unfold(rx, |mut rx| async move {
            let data = rx.recv().await?;
            Some((
                Ok::<_, BoxError>(http_body::Frame::data(Bytes::from(data))),
                rx,
            ))
        });
        let body = http_body_util::StreamBody::new(frames).boxed_unsync();
        let uri: Uri = format!("http://127.0.0.1:{port}/up").parse().unwrap();
        let client = client(Duration::from_secs(30), 4);
        let call = client.request(Request::post(uri).body(body).unwrap());
        let contains = |s: &[u8]| seen.lock().unwrap().windows(s.len()).any(|w| w == s);
        let feeding = async {
            feed.send("first part").await.unwrap();
            // Only the waiting request drives the connection that writes it.
            assert!(eventually(|| contains(b"first part")).await);
            assert!(!contains(b"second"));
            feed.send("second part").await.unwrap();
            drop(feed);
        };
        let (resp, ()) = tokio::join!(call, feeding);
        let body = resp
            .unwrap()
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(body, "ok");
        assert!(contains(b"transfer-encoding: chunked\r\n"));
        assert!(contains(b"second part"));
    }

    #[tokio::test]
    async fn a_response_body_dropped_unread_closes_its_connection() {
        let server = raw_server(Mode::KeepAlive).await;
        let client: Client = client(Duration::from_secs(30), 4);
        let resp = send_get(&client, server.url("/a")).await.unwrap();
        drop(resp);
        assert!(eventually(|| server.finished() == 1).await);
        assert!(client.pool.lock().origins[0].idle.is_empty());
        assert_eq!(get(&client, server.url("/a")).await.unwrap(), "ok");
        assert_eq!(server.accepted(), 2);
    }

    #[tokio::test]
    async fn a_request_dropped_while_waiting_for_its_answer_closes_the_upstream_connection() {
        let server = raw_server(Mode::Slow).await;
        let client: Client = client(Duration::from_secs(30), 4);
        let heads = server.heads.clone();
        tokio::select! {
            _ = get(&client, server.url("/slow")) => panic!("answered"),
            seen = eventually(|| heads.lock().unwrap().len() == 1) => assert!(seen),
        }
        // The request future is gone, and its connection with it.
        assert!(eventually(|| server.finished() == 1).await);
        assert!(client.pool.lock().origins[0].idle.is_empty());
        assert_eq!(server.accepted(), 1);
    }

    #[tokio::test]
    async fn idle_connections_the_peer_closed_all_go_at_the_first_one_met() {
        // More connections than a request has retries answer once (after
        // 100 ms, so that all are opened) and close when told; later ones
        // answer and stay open.
        const N: usize = MAX_UNSENT_RETRIES + 2;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let close = Arc::new(tokio::sync::Notify::new());
        let (accepted, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (accepts, closes, closing) = (accepted.clone(), closed.clone(), close.clone());
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let first = accepts.fetch_add(1, Ordering::SeqCst) < N;
                let (closes, closing) = (closes.clone(), closing.clone());
                tokio::spawn(async move {
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    let mut chunk = [0u8; 4096];
                    if first {
                        let _ = tcp.read(&mut chunk).await.unwrap();
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        tcp.write_all(ok).await.unwrap();
                        closing.notified().await;
                        drop(tcp);
                        closes.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    while tcp.read(&mut chunk).await.is_ok_and(|n| n > 0) {
                        if tcp.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let uri: Uri = format!("http://127.0.0.1:{port}/a").parse().unwrap();
        let client: Client = client(Duration::from_secs(30), N);
        let calls = (0..N).map(|_| get(&client, uri.clone()));
        for r in futures_util::future::join_all(calls).await {
            assert_eq!(r.unwrap(), "ok");
        }
        assert_eq!(client.pool.lock().origins[0].idle.len(), N);
        close.notify_waiters();
        assert!(eventually(|| closed.load(Ordering::SeqCst) == N).await);
        // Let the reactor see the closes (nobody polls idle connections).
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(get(&client, uri).await.unwrap(), "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), N + 1);
        // The others were dropped with the first one met (one retry, not
        // one per closed connection, which would have run out).
        assert_eq!(client.pool.lock().origins[0].idle.len(), 1);
    }

    #[tokio::test]
    async fn a_request_meeting_a_connection_the_peer_closed_while_idle_goes_on_a_new_one() {
        // The first connection answers once and closes when told; the
        // second one answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (close, closing) = tokio::sync::oneshot::channel::<()>();
        let (accepted, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (accepts, closes) = (accepted.clone(), closed.clone());
        tokio::spawn(async move {
            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
            let mut chunk = [0u8; 4096];
            let (mut first, _) = listener.accept().await.unwrap();
            accepts.fetch_add(1, Ordering::SeqCst);
            let n = first.read(&mut chunk).await.unwrap();
            assert!(chunk[..n].ends_with(b"\r\n\r\n"));
            first.write_all(ok).await.unwrap();
            let _ = closing.await;
            drop(first);
            closes.fetch_add(1, Ordering::SeqCst);
            let (mut second, _) = listener.accept().await.unwrap();
            accepts.fetch_add(1, Ordering::SeqCst);
            let n = second.read(&mut chunk).await.unwrap();
            assert!(chunk[..n].ends_with(b"\r\n\r\n"));
            second.write_all(ok).await.unwrap();
            while second.read(&mut chunk).await.is_ok_and(|n| n > 0) {}
        });
        let uri: Uri = format!("http://127.0.0.1:{port}/a").parse().unwrap();
        let client: Client = client(Duration::from_secs(30), 4);
        assert_eq!(get(&client, uri.clone()).await.unwrap(), "ok");
        close.send(()).unwrap();
        assert!(eventually(|| closed.load(Ordering::SeqCst) == 1).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(get(&client, uri).await.unwrap(), "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(client.pool.lock().origins[0].idle.len(), 1);
    }

    #[tokio::test]
    async fn at_most_max_idle_connections_are_kept() {
        let server = raw_server(Mode::Slow).await;
        let client = client(Duration::from_secs(30), 2);
        let calls = (0..4).map(|_| get(&client, server.url("/slow")));
        for r in futures_util::future::join_all(calls).await {
            assert_eq!(r.unwrap(), "ok");
        }
        assert_eq!(server.accepted(), 4);
        assert_eq!(client.pool.lock().origins[0].idle.len(), 2);
        assert!(eventually(|| server.finished() == 2).await);
        // The two kept are reused.
        let calls = (0..2).map(|_| get(&client, server.url("/slow")));
        futures_util::future::join_all(calls).await;
        assert_eq!(server.accepted(), 4);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let uri: Uri = format!("http://{}/a", closed.local_addr().unwrap())
            .parse()
            .unwrap();
        drop(closed);
        let client = client(Duration::from_secs(30), 4);
        let e = get(&client, uri).await.unwrap_err();
        assert!(e.is_connect(), "{e:?}");
        assert_eq!(e.to_string(), "client error (Connect)");
    }

    #[tokio::test]
    async fn an_upstream_closing_without_an_answer_is_not_a_connect_error_and_not_retried() {
        let server = raw_server(Mode::CloseWithoutAnswer).await;
        let client = client(Duration::from_secs(30), 4);
        let e = get(&client, server.url("/a")).await.unwrap_err();
        assert!(!e.is_connect(), "{e:?}");
        let cause = std::error::Error::source(&e).unwrap().to_string();
        assert!(
            cause.contains("connection closed before message completed"),
            "{cause}"
        );
        assert_eq!(server.accepted(), 1);
    }

    #[tokio::test]
    async fn a_relative_uri_is_refused() {
        let client = client(Duration::from_secs(30), 4);
        let e = get(&client, Uri::from_static("/a")).await.unwrap_err();
        assert!(!e.is_connect());
    }

    #[tokio::test]
    async fn a_request_future_stays_small() {
        let client = client(Duration::from_secs(30), 4);
        let req = Request::get("http://127.0.0.1:9/").body(crate::body::empty());
        let fut = client.request(req.unwrap());
        // Connecting is boxed: it is rare, and its state is large.
        assert!(
            std::mem::size_of_val(&fut) < 1024,
            "{}",
            std::mem::size_of_val(&fut)
        );
    }

    #[test]
    fn the_host_header_omits_only_the_default_port() {
        let host = |s: &str, a: &str| {
            let v = host_header(&s.parse().unwrap(), &a.parse().unwrap()).unwrap();
            v.to_str().unwrap().to_owned()
        };
        assert_eq!(host("http", "127.0.0.1:18090"), "127.0.0.1:18090");
        assert_eq!(host("http", "sim.local:80"), "sim.local");
        assert_eq!(host("https", "rest.zuora.com:443"), "rest.zuora.com");
        assert_eq!(host("https", "rest.zuora.com"), "rest.zuora.com");
        assert_eq!(host("https", "localhost:8443"), "localhost:8443");
        assert_eq!(host("http", "[::1]:8080"), "[::1]:8080");
    }

    #[test]
    fn each_serving_runtime_thread_uses_its_own_pool() {
        let config = crate::oauth::test_support::config("http://127.0.0.1:9", "");
        let clients = build_clients(&config.upstreams["zuora"], 3).unwrap();
        assert_eq!(clients.len(), 3);
        let slot = |c: &Clients| (0..3).find(|&i| std::ptr::eq(c.current(), &c.0[i]));
        // Threads never marked (background tasks, tests) use the first pool.
        assert_eq!(slot(&clients), Some(0));
        assert!(std::ptr::eq(clients.first(), &clients.0[0]));
        for i in 0..3 {
            let c = clients.clone();
            let seen = std::thread::spawn(move || {
                set_runtime_index(i);
                slot(&c)
            })
            .join()
            .unwrap();
            assert_eq!(seen, Some(i));
        }
    }
}
