//! Startup and serving: builds everything from a validated [`Config`], binds
//! the caller and admin listeners, serves HTTP/1.1 and h2c, and drains on
//! shutdown.

pub mod h1_guard;
mod idle;

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::future::Either;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::io::ReadBuf;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tower::util::Oneshot;
use tower::{Service, ServiceExt};

use crate::admin::Admin;
use crate::body::Body;
use crate::config::{Config, ServerConfig, UpstreamTarget};
use crate::health::Health;
use crate::metrics::RequestMetrics;
use crate::oauth::{OAuthMetrics, TokenCache};
use crate::policy::Policy;
use crate::ratelimit::{LimiterRegistry, RateLimitMetrics};
use crate::sim::{SimHandle, SimOptions, Simulator};
use crate::stack::{self, GatewayService, StackParts};
use crate::telemetry::Telemetry;
use crate::upstream::headers::strip_hop_by_hop;
use crate::upstream::{Upstream, build_clients};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Which listener.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The embedded simulator could not start.
    #[error("cannot start the embedded Zuora simulator: {0}")]
    Simulator(std::io::Error),
    /// An upstream client could not be built.
    #[error("{0}")]
    Upstream(String),
}

/// A running gateway.
pub struct Running {
    /// The caller-facing address actually bound.
    pub listen_addr: SocketAddr,
    /// The admin address actually bound.
    pub admin_addr: SocketAddr,
    /// The embedded simulator, when `base_url: simulator`.
    pub simulator: Option<SimHandle>,
    /// Readiness facts.
    pub health: Arc<Health>,
    /// The swappable policy (reload stores into it).
    pub policy: Arc<ArcSwap<Policy>>,
    shutdown: watch::Sender<bool>,
    serving: JoinHandle<()>,
    telemetry: Telemetry,
    background: Vec<JoinHandle<()>>,
}

impl Running {
    /// Begins shutdown: readiness goes false, listeners stop accepting,
    /// in-flight requests get `shutdown_grace` to finish. Resolves when done.
    pub async fn shutdown(self) {
        self.health.set_draining();
        let _ = self.shutdown.send(true);
        let _ = self.serving.await;
        for task in self.background {
            task.abort();
        }
        if let Some(sim) = self.simulator {
            sim.shutdown().await;
        }
        // Last: export the spans of the drained requests.
        self.telemetry.shutdown(Duration::from_secs(5)).await;
    }
}

/// Starts the gateway described by `config` (already validated), without a
/// global log subscriber or span export (in-process tests, tools).
pub async fn start(config: Config) -> Result<Running, StartError> {
    let telemetry = Telemetry::detached(&config.telemetry);
    start_with_telemetry(config, telemetry).await
}

/// Starts the gateway with telemetry already installed ([`Telemetry::init`]).
pub async fn start_with_telemetry(
    config: Config,
    telemetry: Telemetry,
) -> Result<Running, StartError> {
    start_on(config, telemetry, Vec::new()).await
}

/// Starts the gateway serving caller connections on the current runtime and
/// on each of `runtimes` (one current-thread runtime per core, see
/// `run::serve`): connections are accepted here and handed to the runtime
/// serving the fewest, which keeps them to the end. Each runtime has its own
/// Zuora pool ([`crate::upstream::Clients`]); a runtime's thread must have
/// called [`crate::upstream::set_runtime_index`] with its position in
/// `runtimes` plus one. Background work (token refresh, reload, admin) stays
/// on the current runtime.
pub async fn start_on(
    config: Config,
    telemetry: Telemetry,
    runtimes: Vec<tokio::runtime::Handle>,
) -> Result<Running, StartError> {
    let config = Arc::new(config);

    // The embedded simulator, if any upstream asks for it.
    let mut simulator = None;
    let mut upstreams = HashMap::new();
    for (name, up) in &config.upstreams {
        let base = match &up.target {
            UpstreamTarget::Url(uri) => uri.clone(),
            UpstreamTarget::Simulator => {
                let sim = match &simulator {
                    Some(sim) => sim,
                    None => {
                        let opts = SimOptions {
                            client_id: Some(up.oauth.client_id.expose().to_owned()),
                            client_secret: Some(up.oauth.client_secret.expose().to_owned()),
                            ..SimOptions::default()
                        };
                        let sim = Simulator::start(SocketAddr::from(([127, 0, 0, 1], 0)), opts)
                            .await
                            .map_err(StartError::Simulator)?;
                        tracing::info!(addr = %sim.addr(), "embedded Zuora simulator started");
                        simulator.insert(sim)
                    }
                };
                sim.base_url()
                    .parse()
                    .map_err(|_| StartError::Upstream("simulator address is not a URL".into()))?
            }
        };
        let client = build_clients(up, 1 + runtimes.len())
            .map_err(|e| StartError::Upstream(e.to_string()))?;
        upstreams.insert(
            name.clone(),
            Upstream {
                config: up.clone(),
                base,
                client,
                breaker: crate::upstream::breaker::CircuitBreaker::new(&up.circuit_breaker),
                slots: Arc::new(tokio::sync::Semaphore::new(up.max_concurrent_requests)),
            },
        );
    }
    let upstreams = Arc::new(upstreams);

    let mut registry = Registry::default();
    let request_metrics = RequestMetrics::new(&mut registry);
    telemetry.register_metrics(&mut registry);
    let rate_limits = LimiterRegistry::new(RateLimitMetrics::new(&mut registry));
    let health = Arc::new(Health::new(config.upstreams.keys()));
    // Idle rate-limit keys are evicted every minute (memory stays bounded).
    let mut background = vec![rate_limits.spawn_sweeper(Duration::from_secs(60))];
    // One token cache per upstream: fetches now (readiness waits for it),
    // refreshes ahead of expiry, never fails startup if Zuora is unreachable.
    let oauth_metrics = OAuthMetrics::new(&mut registry);
    let mut tokens = HashMap::new();
    for (name, up) in upstreams.iter() {
        let token_url = up
            .token_url()
            .map_err(|e| StartError::Upstream(format!("upstream `{name}`: {e}")))?;
        let ready = health.token_flag(name).unwrap_or_default();
        let cache = TokenCache::new(
            &up.config,
            token_url,
            up.client.first().clone(),
            ready,
            oauth_metrics.clone(),
        );
        background.push(cache.start());
        tokens.insert(name.clone(), cache);
    }

    let policy = Arc::new(ArcSwap::from_pointee(Policy::compile(config.clone())));
    // JWKS keys at startup (a failure is retried in the background, never fatal).
    policy.load().authn.start().await;
    let reload_metrics = crate::reload::ReloadMetrics::new(&mut registry);
    let service = stack::build(&StackParts {
        policy: policy.clone(),
        upstreams: upstreams.clone(),
        tokens: Arc::new(tokens),
        metrics: request_metrics,
        debug_ring: telemetry.debug_ring(),
        max_in_flight: config.server.max_in_flight,
        rate_limits,
        body_metrics: crate::compression::BodyMetrics::new(&mut registry),
    });

    let listener = TcpListener::bind(config.server.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.server.listen,
            what: "server.listen",
            source,
        })?;
    let admin_listener = TcpListener::bind(config.server.admin_listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.server.admin_listen,
            what: "server.admin_listen",
            source,
        })?;
    let listen_addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: config.server.listen,
        what: "server.listen",
        source,
    })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: config.server.admin_listen,
            what: "server.admin_listen",
            source,
        })?;

    let released = Counter::default();
    registry.register(
        "gateway_idle_connections_released",
        "Keep-alive connections that gave back their HTTP/1 buffers after a second idle",
        released.clone(),
    );
    let admin = Admin {
        health: health.clone(),
        registry: Arc::new(registry),
        debug_ring: telemetry.debug_ring(),
    };
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    // Hot reload: SIGHUP or a change to the file swaps the policy; a broken file keeps the old one.
    let mut reload_shutdown = shutdown_rx.clone();
    background.push(
        crate::reload::Reloader::new(config.source.clone(), policy.clone())
            .with_metrics(reload_metrics)
            .spawn(async move {
                let _ = reload_shutdown.changed().await;
            }),
    );
    let server_cfg = config.server.clone();
    let serving = tokio::spawn(serve(
        listener,
        admin_listener,
        (service, released),
        admin,
        server_cfg,
        shutdown_rx,
        runtimes,
    ));
    health.set_config_loaded();
    tracing::info!(listen = %listen_addr, admin = %admin_addr, "zuora-gateway listening");
    Ok(Running {
        listen_addr,
        admin_addr,
        simulator,
        health,
        policy,
        shutdown: shutdown_tx,
        serving,
        background,
        telemetry,
    })
}

/// Applies the server connections' HTTP/1.1 settings to `$b`, which is
/// either hyper's `http1::Builder` (caller connections) or hyper-util's
/// `auto` HTTP/1 builder (the admin port): one list for both.
macro_rules! http1_settings {
    ($b:expr, $cfg:expr) => {
        $b.timer(TokioTimer::new())
            .header_read_timeout($cfg.header_read_timeout)
            .max_headers($cfg.max_header_count)
            .max_buf_size($cfg.max_header_bytes.max(8192))
            .keep_alive(true)
    };
}

/// The HTTP/2 counterpart of [`http1_settings`].
macro_rules! http2_settings {
    ($b:expr, $cfg:expr) => {
        $b.timer(TokioTimer::new())
            .max_concurrent_streams($cfg.http2_max_concurrent_streams)
            .max_pending_accept_reset_streams(Some(20))
            .max_local_error_reset_streams(Some(256))
            .max_header_list_size(u32::try_from($cfg.max_header_bytes).unwrap_or(u32::MAX))
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(20))
    };
}

/// The admin port's connections: HTTP/1.1 or h2c, detected by hyper-util,
/// with the same settings as the caller connections'.
fn builder(cfg: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    http1_settings!(b.http1(), cfg);
    http2_settings!(b.http2(), cfg);
    b
}

/// The caller connections' HTTP/1.1 settings.
fn http1_builder(cfg: &ServerConfig) -> http1::Builder {
    let mut b = http1::Builder::new();
    http1_settings!(b, cfg);
    b
}

/// The caller connections' HTTP/2 (h2c prior knowledge) settings.
fn http2_builder(cfg: &ServerConfig) -> http2::Builder<TokioExecutor> {
    let mut b = http2::Builder::new(TokioExecutor::new());
    http2_settings!(b, cfg);
    b
}

/// Adapts hyper to the stack: hop-by-hop headers removed on arrival, the
/// framing guard's verdict attached to its stand-in request, body boxing, no
/// async block. Every check happens inside the stack, so every refusal gets a
/// track ID and a log line.
struct HyperAdapter {
    /// The connection's own copy of the stack, called in place (see `call`).
    service: RefCell<GatewayService>,
    /// What the connection's framing guard refused, if anything; told
    /// when a request arrives (see `drive`).
    framing: Arc<h1_guard::Verdict>,
}

impl hyper::service::Service<Request<Incoming>> for HyperAdapter {
    type Response = Response<idle::ResponseBody>;
    type Error = std::convert::Infallible;
    type Future = idle::Respond<
        Either<
            <GatewayService as Service<Request<Body>>>::Future,
            Oneshot<GatewayService, Request<Body>>,
        >,
    >;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        self.framing.note_request();
        if let Some(violation) = self.framing.refused()
            && req.uri().path() == h1_guard::REFUSAL_TARGET
        {
            // The stand-in for a head the framing guard refused: the route
            // layer answers it with a 400.
            req.extensions_mut().insert(violation);
        }
        // Hop-by-hop headers (and those the caller names in `Connection`) end
        // here, before any layer adds headers of its own: a caller cannot use
        // `Connection: authorization, zuora-entity-ids` to strip what the
        // gateway sets later.
        strip_hop_by_hop(req.headers_mut());
        unpin_head(&mut req);
        let req = req.map(|b| Body::new(idle::CallerBody::new(b, &self.framing)));
        // Every layer of the stack is always ready, so the connection's copy
        // is called in place: cloning the boxed stack for each request (an
        // allocation and an Arc count per layer) was measurable. hyper
        // calls the service from the connection's task only (HTTP/2 streams
        // too: their futures run elsewhere, `call` does not), and the borrow
        // ends with `call`; if it is ever busy, or a layer reports
        // not-ready, fall back to a clone.
        let fut = match self.service.try_borrow_mut() {
            Err(_) => {
                let svc = self.service.borrow().clone();
                Either::Right(svc.oneshot(req))
            }
            Ok(mut svc) => {
                let mut cx = Context::from_waker(Waker::noop());
                match svc.poll_ready(&mut cx) {
                    Poll::Ready(Ok(())) => Either::Left(svc.call(req)),
                    _ => Either::Right(svc.clone().oneshot(req)),
                }
            }
        };
        idle::Respond::new(fut, &self.framing)
    }
}

/// Moves the request's URI and header values out of hyper's read buffer
/// into one small allocation of their own.
///
/// hyper hands them out as slices of its (8 KiB) read buffer, so while the
/// request is in flight that buffer cannot be reused, and hyper's read for
/// the caller going away allocates a second one: 8 KiB more per busy
/// connection. Once nothing refers to it, hyper reuses its buffer.
fn unpin_head<B>(req: &mut Request<B>) {
    use std::fmt::Write as _;
    let uri_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len())
        + req.uri().authority().map_or(0, |a| a.as_str().len() + 16);
    let total = uri_len + req.headers().values().map(|v| v.len()).sum::<usize>();
    let mut copy = bytes::BytesMut::with_capacity(total);
    let _ = write!(copy, "{}", req.uri());
    let uri_end = copy.len();
    for v in req.headers().values() {
        copy.extend_from_slice(v.as_bytes());
    }
    let copy = copy.freeze();
    if let Ok(uri) = http::Uri::from_maybe_shared(copy.slice(..uri_end)) {
        *req.uri_mut() = uri;
    }
    let mut at = uri_end;
    for v in req.headers_mut().values_mut() {
        let end = at + v.len();
        // The same bytes, so always valid; if not, the original stays.
        if let Ok(mut moved) = http::HeaderValue::from_maybe_shared(copy.slice(at..end)) {
            moved.set_sensitive(v.is_sensitive());
            *v = moved;
        }
        at = end;
    }
}

/// Caller connections are served by `service` on `listener`; `released`
/// counts those that gave their HTTP/1 state back while idle.
async fn serve(
    listener: TcpListener,
    admin_listener: TcpListener,
    (service, released): (GatewayService, Counter),
    admin: Admin,
    cfg: ServerConfig,
    mut shutdown: watch::Receiver<bool>,
    runtimes: Vec<tokio::runtime::Handle>,
) {
    let builder = builder(&cfg);
    // The admin port has its own accept loop: outside the caller connection
    // limit (probes work at capacity) and open until draining ends (so
    // /readyz answers 503 while in-flight requests finish).
    let (admin_stop, admin_stopped) = watch::channel(false);
    let admin_task = tokio::spawn(serve_admin(
        admin_listener,
        admin,
        builder.clone(),
        admin_stopped,
    ));
    // One worker per serving runtime; the first is this one.
    let conn_cfg = ConnConfig {
        service,
        shared: Arc::new(ConnShared {
            http1: http1_builder(&cfg),
            http2: http2_builder(&cfg),
            // The same bound as hyper's read buffer (see `builder`).
            head_limit: cfg.max_header_bytes.max(8192),
            // hyper closes a keep-alive connection idle for
            // header_read_timeout; one given up after a sweep interval
            // (see `idle`) waits the rest of it.
            idle_close_after: cfg.header_read_timeout.saturating_sub(idle::SWEEP_EVERY),
            released,
        }),
        first_request_timeout: cfg.header_read_timeout,
        shutdown_grace: cfg.shutdown_grace,
    };
    let mut workers = vec![Worker::start(None, conn_cfg.clone())];
    workers.extend(
        runtimes
            .iter()
            .map(|rt| Worker::start(Some(rt), conn_cfg.clone())),
    );
    drop(conn_cfg);
    let connections = Arc::new(Semaphore::new(cfg.max_connections));
    loop {
        // Beyond max_connections, stop accepting: new connections wait in the kernel backlog.
        let permit = tokio::select! {
            p = connections.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.changed() => break,
        };
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                // The runtime serving the fewest connections takes it.
                if let Some(worker) = workers.iter().min_by_key(|w| w.active.load(Ordering::Relaxed)) {
                    worker.hand_over(stream, permit);
                }
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    tracing::info!(grace = ?cfg.shutdown_grace, "draining in-flight requests");
    // Closing the hand-over channels makes every worker drain its connections.
    let draining: Vec<_> = workers.into_iter().map(Worker::finish).collect();
    for task in draining {
        let _ = task.await;
    }
    let _ = admin_stop.send(true);
    let _ = admin_task.await;
}

/// What serving one caller connection needs (one copy per runtime).
#[derive(Clone)]
struct ConnConfig {
    service: GatewayService,
    /// Behind an `Arc`: each connection's task holds a reference, not a copy.
    shared: Arc<ConnShared>,
    first_request_timeout: Duration,
    shutdown_grace: Duration,
}

/// How caller connections are served (shared by all of them).
struct ConnShared {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    head_limit: usize,
    /// How long a connection given up while idle waits for its next request.
    idle_close_after: Duration,
    /// Counts idle connections that gave up their hyper state.
    released: Counter,
}

/// An accepted connection on its way to a worker, with its
/// `max_connections` permit.
enum Handoff {
    /// To the accepting runtime: still registered with its reactor.
    Local(tokio::net::TcpStream, OwnedSemaphorePermit),
    /// To another runtime: deregistered, registered again over there.
    Remote(std::net::TcpStream, OwnedSemaphorePermit),
}

/// One serving runtime's share of the caller connections.
struct Worker {
    to_worker: mpsc::UnboundedSender<Handoff>,
    /// Connections this worker is serving.
    active: Arc<AtomicUsize>,
    /// Whether it runs on the accepting runtime.
    local: bool,
    task: JoinHandle<()>,
}

impl Worker {
    /// Starts a worker on `runtime` (`None`: the current one).
    fn start(runtime: Option<&tokio::runtime::Handle>, cfg: ConnConfig) -> Worker {
        let (to_worker, from_acceptor) = mpsc::unbounded_channel();
        let active = Arc::new(AtomicUsize::new(0));
        let work = run_worker(from_acceptor, cfg, active.clone());
        let task = match runtime {
            None => tokio::spawn(work),
            Some(rt) => rt.spawn(work),
        };
        Worker {
            to_worker,
            active,
            local: runtime.is_none(),
            task,
        }
    }

    fn hand_over(&self, stream: tokio::net::TcpStream, permit: OwnedSemaphorePermit) {
        let handoff = if self.local {
            Handoff::Local(stream, permit)
        } else {
            match stream.into_std() {
                Ok(s) => Handoff::Remote(s, permit),
                Err(e) => {
                    tracing::warn!(error = %e, "could not hand a connection to a runtime");
                    return;
                }
            }
        };
        self.active.fetch_add(1, Ordering::Relaxed);
        if self.to_worker.send(handoff).is_err() {
            self.active.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Stops handing over; resolves once the worker drained.
    fn finish(self) -> JoinHandle<()> {
        drop(self.to_worker);
        self.task
    }
}

/// A worker: serves the connections handed to it until the acceptor stops,
/// then gives in-flight requests `shutdown_grace` to finish.
async fn run_worker(
    mut from_acceptor: mpsc::UnboundedReceiver<Handoff>,
    cfg: ConnConfig,
    active: Arc<AtomicUsize>,
) {
    // Graceful shutdown: every connection holds a receiver; the worker
    // sends, then waits until all of them are gone.
    let (stop, _) = watch::channel(());
    // Every sweep interval, HTTP/1 connections look whether they went idle
    // (see `idle`).
    let (sweep, _) = watch::channel(());
    let mut sweeps = tokio::time::interval_at(
        tokio::time::Instant::now() + idle::SWEEP_EVERY,
        idle::SWEEP_EVERY,
    );
    sweeps.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let handoff = tokio::select! {
            h = from_acceptor.recv() => match h {
                Some(h) => h,
                None => break,
            },
            _ = sweeps.tick() => {
                sweep.send_replace(());
                continue;
            }
        };
        let (stream, permit) = match handoff {
            Handoff::Local(s, p) => (s, p),
            Handoff::Remote(s, p) => match tokio::net::TcpStream::from_std(s) {
                Ok(s) => (s, p),
                Err(e) => {
                    tracing::warn!(error = %e, "could not register a handed-over connection");
                    active.fetch_sub(1, Ordering::Relaxed);
                    continue;
                }
            },
        };
        serve_connection(stream, permit, &cfg, &stop, &sweep, active.clone());
    }
    let _ = stop.send(());
    if tokio::time::timeout(cfg.shutdown_grace, stop.closed())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace elapsed with requests still in flight");
    }
}

/// The guarded caller socket hyper reads and writes.
type CallerIo = TokioIo<h1_guard::H1Guard<tokio::net::TcpStream>>;

/// A caller connection served as HTTP/1.1 (the usual case).
type H1Conn = http1::Connection<CallerIo, HyperAdapter>;

/// A caller connection served as h2c (HTTP/2 with prior knowledge).
type H2Conn = http2::Connection<CallerIo, HyperAdapter, TokioExecutor>;

/// What a caller connection holds until it ends: its `max_connections`
/// permit and its place in its worker's count.
struct Slot {
    _permit: OwnedSemaphorePermit,
    active: Arc<AtomicUsize>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A hyper connection that can be asked to finish (its own
/// `graceful_shutdown`; hyper-util's `GracefulShutdown` would own the
/// connection, and an HTTP/1 connection must stay at hand to give it up
/// for HTTP/2).
trait Graceful: Future<Output = hyper::Result<()>> {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl Graceful for H1Conn {
    fn graceful_shutdown(self: Pin<&mut Self>) {
        http1::Connection::graceful_shutdown(self);
    }
}

impl Graceful for H2Conn {
    fn graceful_shutdown(self: Pin<&mut Self>) {
        http2::Connection::graceful_shutdown(self);
    }
}

/// How driving a connection ended.
#[derive(Debug, PartialEq, Eq)]
enum Driven {
    /// It finished, or was closed (silent past the first-request deadline,
    /// or nothing read when shutdown began).
    Ended,
    /// Its first bytes were the HTTP/2 preface: it must become an HTTP/2
    /// connection.
    H2c,
    /// A sweep interval passed (HTTP/1 only): time to look whether it is idle.
    Swept,
}

/// Serves one caller connection on the current runtime.
///
/// The framing guard sees the first bytes and tells HTTP/1.1 from h2c prior
/// knowledge, so the connection starts as hyper's HTTP/1 connection in a
/// task sized for HTTP/1 only; the rare h2c connection is handed over to a
/// task of its own.
fn serve_connection(
    stream: tokio::net::TcpStream,
    permit: OwnedSemaphorePermit,
    cfg: &ConnConfig,
    stop: &watch::Sender<()>,
    sweep: &watch::Sender<()>,
    active: Arc<AtomicUsize>,
) {
    let mut served = Served {
        verdict: Arc::new(h1_guard::Verdict::default()),
        stop: stop.subscribe(),
        sweep: sweep.subscribe(),
        idle_at_last_sweep: None,
        // hyper's header_read_timeout runs only while hyper waits for a
        // head, and hyper starts at the caller's first bytes (see
        // `first_bytes`), so a silent socket would otherwise stay open
        // forever. Boxed, and dropped at the first request, so an idle
        // keep-alive connection carries no timer of ours.
        timer: Some(Box::pin(tokio::time::sleep(cfg.first_request_timeout))),
        _slot: Slot {
            _permit: permit,
            active,
        },
    };
    let service = cfg.service.clone();
    let shared = cfg.shared.clone();
    // An `async` block using its captures in place: an `async fn` would
    // keep its arguments twice in the task (rust-lang/rust#62958).
    tokio::spawn(async move {
        // hyper's HTTP/1 connection allocates its read buffer when first
        // polled: until the caller sends something, only the socket waits.
        if !first_bytes(&stream, &mut served).await {
            return;
        }
        let hyper_svc = HyperAdapter {
            service: RefCell::new(service),
            framing: served.verdict.clone(),
        };
        // Strict HTTP/1.1 framing checks on the raw bytes, before hyper
        // parses them; the guard also tells HTTP/1 from h2c.
        let io =
            h1_guard::H1Guard::new(stream, served.verdict.clone(), shared.head_limit).detect_h2c();
        // Boxed: a connection that gave its state back (see `idle`) keeps
        // only a small task.
        let mut conn = Box::new(shared.http1.serve_connection(TokioIo::new(io), hyper_svc));
        loop {
            match drive(Pin::new(&mut *conn), &mut served, true).await {
                Driven::Ended => return,
                Driven::H2c => return serve_h2c(*conn, served, &shared.http2),
                Driven::Swept => {
                    let idle = served.verdict.idle();
                    let idle_since_last = idle.is_some() && idle == served.idle_at_last_sweep;
                    served.idle_at_last_sweep = idle;
                    if !idle_since_last {
                        continue;
                    }
                    // Idle for a whole sweep interval: hyper's buffers and
                    // state go, the socket and its guard stay, and hyper
                    // starts again at the caller's next bytes.
                    served.idle_at_last_sweep = None;
                    let (io, service, wait) = give_up(conn);
                    if wait {
                        shared.released.inc();
                        crate::memory::note_connection_state_freed();
                        served.timer = Some(Box::pin(tokio::time::sleep(shared.idle_close_after)));
                        if !first_bytes(io.inner().get_ref(), &mut served).await {
                            return;
                        }
                    }
                    conn = Box::new(shared.http1.serve_connection(io, service));
                }
            }
        }
    });
}

/// Takes an idle HTTP/1 connection apart: its socket (with the guard, its
/// buffers freed) and its service. `true` if the next request is still to
/// come; `false` if hyper had read bytes it had not parsed (not expected
/// when idle), which are given back to the guard to be read again.
fn give_up(conn: Box<H1Conn>) -> (CallerIo, HyperAdapter, bool) {
    let parts = (*conn).into_parts();
    let mut io = parts.io;
    let guard = io.inner_mut();
    guard.release_buffers();
    let wait = parts.read_buf.is_empty();
    guard.unread(&parts.read_buf);
    (io, parts.service, wait)
}

/// Waits until the caller's first bytes can be read; `false` if the
/// connection is to be closed first (no bytes by the first-request
/// deadline, or the worker shutting down).
async fn first_bytes(stream: &tokio::net::TcpStream, served: &mut Served) -> bool {
    let timer = &mut served.timer;
    let mut stopped = std::pin::pin!(served.stop.changed());
    std::future::poll_fn(|cx| {
        // A peek, not `poll_read_ready`: tokio reports a new socket
        // readable before anything arrived. (One syscall per connection;
        // EOF and errors go on to hyper, which closes.)
        let mut byte = [std::mem::MaybeUninit::uninit()];
        if stream
            .poll_peek(cx, &mut ReadBuf::uninit(&mut byte))
            .is_ready()
        {
            return Poll::Ready(true);
        }
        if timer
            .as_mut()
            .is_some_and(|t| t.as_mut().poll(cx).is_ready())
        {
            return Poll::Ready(false);
        }
        if stopped.as_mut().poll(cx).is_ready() {
            // As hyper-util's version sniff was cancelled.
            return Poll::Ready(false);
        }
        Poll::Pending
    })
    .await
}

/// What a connection's task holds besides the hyper connection.
struct Served {
    verdict: Arc<h1_guard::Verdict>,
    /// Changes when the worker shuts down.
    stop: watch::Receiver<()>,
    /// Changes every sweep interval (see `idle`).
    sweep: watch::Receiver<()>,
    /// The request count at the last sweep, if the connection was idle then.
    idle_at_last_sweep: Option<u32>,
    /// Until the first request: a connection without one by then is closed.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    _slot: Slot,
}

/// h2c prior knowledge: the guard held the preface back, hyper's HTTP/1
/// side has read nothing. The socket moves on to an HTTP/2 connection in a
/// task of its own (not an `async` step of the HTTP/1 task, which would
/// size every HTTP/1 task for HTTP/2).
fn serve_h2c(conn: H1Conn, served: Served, http2: &http2::Builder<TokioExecutor>) {
    let parts = conn.into_parts();
    let mut io = parts.io;
    io.inner_mut().resume_after_preface(&parts.read_buf);
    let mut conn = http2.serve_connection(io, parts.service);
    let mut served = served;
    tokio::spawn(async move {
        drive(Pin::new(&mut conn), &mut served, false).await;
    });
}

/// Polls `conn` until it ends, closing it if it has not produced a request
/// by the deadline, and asking it to finish when the worker shuts down.
/// With `http1` (an HTTP/1 connection), stops as soon as the guard has seen
/// the HTTP/2 preface, and at each sweep until shutdown begins.
async fn drive<C: Graceful>(mut conn: Pin<&mut C>, served: &mut Served, http1: bool) -> Driven {
    let verdict = &*served.verdict;
    let timer = &mut served.timer;
    let mut stopping = false;
    let mut stopped = std::pin::pin!(served.stop.changed());
    let mut sweeping = http1;
    let mut swept = std::pin::pin!(served.sweep.changed());
    std::future::poll_fn(|cx| {
        if conn.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Driven::Ended);
        }
        if http1 && verdict.is_h2c() {
            return Poll::Ready(Driven::H2c);
        }
        if let Some(t) = timer.as_mut() {
            if verdict.request_seen() {
                *timer = None;
            } else if t.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Driven::Ended);
            }
        }
        if !stopping && stopped.as_mut().poll(cx).is_ready() {
            stopping = true;
            if verdict.undecided() {
                // Nothing read yet: closed now, as hyper-util's version
                // sniff was cancelled.
                return Poll::Ready(Driven::Ended);
            }
            conn.as_mut().graceful_shutdown();
            if conn.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Driven::Ended);
            }
        }
        // Only a connection that looks idle waits for the sweep: one poll
        // per request, not one per wake-up (it stays registered meanwhile).
        if sweeping && !stopping && verdict.idle().is_some() {
            match swept.as_mut().poll(cx) {
                Poll::Ready(Ok(())) => return Poll::Ready(Driven::Swept),
                // The worker is gone: no more sweeps.
                Poll::Ready(Err(_)) => sweeping = false,
                Poll::Pending => {}
            }
        }
        Poll::Pending
    })
    .await
}

async fn serve_admin(
    listener: TcpListener,
    admin: Admin,
    builder: auto::Builder<TokioExecutor>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let admin = admin.clone();
                let svc = hyper::service::service_fn(move |req| {
                    let admin = admin.clone();
                    async move { admin.handle(req).await }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), svc).into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            _ = stop.changed() => break,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn server_config() -> ServerConfig {
        ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            max_body_bytes: 1000,
            shutdown_grace: Duration::from_secs(3),
            header_read_timeout: Duration::from_millis(1234),
            body_read_timeout: Duration::from_secs(5),
            max_connections: 10,
            max_in_flight: 10,
            max_header_count: 77,
            max_header_bytes: 20_000,
            max_uri_bytes: 4000,
            http2_max_concurrent_streams: 33,
            compress_responses_over: None,
            allow_unauthenticated_network: false,
            worker_threads: Some(1),
            work_stealing: false,
        }
    }

    #[test]
    fn caller_connections_keep_every_setting_of_the_auto_builder() {
        let cfg = server_config();
        let auto = format!("{:?}", builder(&cfg));
        let h1 = format!("{:?}", http1_builder(&cfg));
        let h2 = format!("{:?}", http2_builder(&cfg));
        assert!(auto.contains(&h1), "{auto}\n{h1}");
        assert!(auto.contains(&h2), "{auto}\n{h2}");
        // The settings are there (not two sets of defaults that agree).
        assert_ne!(h1, format!("{:?}", http1::Builder::new()));
        assert!(
            h1.contains("1.234s") && h1.contains("77") && h1.contains("20000"),
            "{h1}"
        );
        assert!(h2.contains("33"), "{h2}");
    }
}
