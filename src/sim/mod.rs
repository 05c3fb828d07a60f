//! The embedded Zuora simulator.
//!
//! A small, in-process stand-in for the Zuora REST API, built to Zuora's documented behaviour
//! (see `API-FACTS.md`). The gateway uses it for `base_url: simulator`, the `simulate`
//! subcommand runs it on its own, and the integration tests and benchmarks drive it over real
//! sockets.
//!
//! What it serves (HTTP/1.1 and h2c, or either over TLS):
//! - `POST /oauth/token`: the OAuth client-credentials flow. Issued tokens are random, expire
//!   after the configured TTL and can all be revoked at once.
//! - `/v1/**`: needs `Authorization: Bearer <token>`; a missing, unknown, expired or revoked
//!   token gets HTTP 401 with reason code `90000011`.
//! - The data backfill job families `/v1/uno/data-backfill/propagation/jobs` (auto backfill),
//!   `/v1/uno/data-backfill/jobs` (file-based) and `/v1/uno/data-backfill/bookingdate/jobs`:
//!   create (`POST …/jobs`), list (`GET …/jobs[?pageSize=&page=]`, 40 jobs seeded per family),
//!   get (`GET …/jobs/{jobId}`, unknown → 404 category 40) and stop
//!   (`PUT …/jobs/{jobId}` `{"status":"Stopping"}` → 200
//!   `{"processId","reasons":[],"requestId","success":true}`, the job turns `Stopping`, one
//!   second later `Stopped`). A stop with a `jobId` that is not 32 characters is a 400 with
//!   category 20, a non-JSON body category 90, no `status` category 22, another value category
//!   20. A well-formed id the simulator does not know is taken as a running job, so any
//!   documentation example id works; stopping a stopped or finished job is a 200 that changes
//!   nothing. Reason codes are integers: resource `5340F0` (F = 1 propagation, 2 file-based,
//!   3 booking date) followed by the category, e.g. `53401020`.
//! - Everything else under `/v1` is a Zuora-shaped 404; a wrong method on a known path a 405
//!   (category 45) with `Allow`.
//!
//! Every response carries `Zuora-Request-Id`, echoes `Zuora-Track-Id`, and `/v1` responses carry
//! the `ratelimit-*` and `Concurrency-Limit-*` headers (Production defaults: 50,000 a minute,
//! 40 concurrent; reported, never enforced, so benchmarks do not trip them; use
//! [`SimControl::inject_status`] for 429s). Request bodies sent with
//! `Content-Encoding: gzip` are decompressed; responses over 1000 bytes are gzipped when the
//! client accepts it.
//!
//! The order of work for a `/v1` request is: read the body (at most 20 MiB), record it, wait the
//! configured latency, check the bearer token, then apply an injected status, then route. So
//! latency applies to every `/v1` request, while injected statuses are only spent on requests
//! that passed authentication (a 401 does not use one up).
//!
//! [`SimControl`] is the test-side remote: counters, the request log, job snapshots and fault
//! injection (token endpoint down, slow, rate limited; tokens revoked; `/v1` latency and
//! injected statuses).
//!
//! The simulator never logs secrets: client secrets, tokens and request bodies stay out of
//! `tracing` output. Only [`SimControl::requests`] exposes them, for tests.

mod body;
mod control;
mod gzip;
mod jobs;
mod oauth;
mod response;
mod router;
mod server;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use control::{JobSnapshot, RecordedRequest, SimControl};

/// The token lifetime Zuora uses: one hour, announced as 3599 seconds.
const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3599);

/// How the simulator starts: accepted credentials, token lifetime and bench mode.
#[derive(Clone)]
pub struct SimOptions {
    /// The only accepted `client_id`; `None` accepts any non-empty value.
    pub client_id: Option<String>,
    /// The only accepted `client_secret`; `None` accepts any non-empty value.
    pub client_secret: Option<String>,
    /// Lifetime of issued tokens (Zuora: 3599 s). Changeable later with
    /// [`SimControl::set_token_ttl`].
    pub token_ttl: Duration,
    /// Bench mode: every `/v1` request that carries any `Bearer` token gets a fixed small
    /// `200 {"success":true}` with the usual headers. No token lookup, no job store, no request
    /// recording. Latency and injected statuses still apply; `/oauth/token` works as usual.
    pub fixed_answer: bool,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            client_id: None,
            client_secret: None,
            token_ttl: DEFAULT_TOKEN_TTL,
            fixed_answer: false,
        }
    }
}

impl fmt::Debug for SimOptions {
    // The secret never reaches a log line, even through `{:?}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimOptions")
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("token_ttl", &self.token_ttl)
            .field("fixed_answer", &self.fixed_answer)
            .finish()
    }
}

/// Starts simulator servers; see the [module docs](self) for what they serve.
#[derive(Debug, Clone, Copy)]
pub struct Simulator;

impl Simulator {
    /// Binds `addr` (use `127.0.0.1:0` in tests) and serves HTTP/1.1 and h2c in a spawned task.
    ///
    /// Must be called inside a tokio runtime. The server stops when the returned handle is shut
    /// down or dropped.
    pub async fn start(addr: SocketAddr, opts: SimOptions) -> std::io::Result<SimHandle> {
        Self::start_inner(addr, opts, None).await
    }

    /// Like [`Simulator::start`], but every connection is TLS (rustls) with `tls`.
    ///
    /// HTTP/2 is used when the client negotiates it (ALPN `h2` in `tls`) or sends the HTTP/2
    /// preface. [`SimHandle::base_url`] names the host `localhost`, so a certificate for
    /// `localhost` verifies.
    pub async fn start_tls(
        addr: SocketAddr,
        opts: SimOptions,
        tls: Arc<rustls::ServerConfig>,
    ) -> std::io::Result<SimHandle> {
        Self::start_inner(addr, opts, Some(tls)).await
    }

    async fn start_inner(
        addr: SocketAddr,
        opts: SimOptions,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<SimHandle> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let base_url = match tls {
            Some(_) => format!("https://localhost:{}", addr.port()),
            None => format!("http://{addr}"),
        };
        let control = Arc::new(SimControl::new(&opts));
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let task = tokio::spawn(server::run(
            listener,
            Arc::clone(&control),
            tls,
            shutdown_rx,
        ));
        tracing::info!(%addr, fixed_answer = opts.fixed_answer, "Zuora simulator listening");
        Ok(SimHandle {
            addr,
            base_url,
            control,
            shutdown_tx,
            task,
        })
    }
}

/// A running simulator. Dropping it stops the server (connections get a short grace period).
#[derive(Debug)]
pub struct SimHandle {
    addr: SocketAddr,
    base_url: String,
    control: Arc<SimControl>,
    // Dropping the sender is itself the stop signal, so a dropped handle stops the server.
    shutdown_tx: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl SimHandle {
    /// The bound address (the real port when started on port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, or `https://localhost:PORT` for a TLS simulator.
    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    /// The test-side remote control of this simulator.
    pub fn control(&self) -> Arc<SimControl> {
        Arc::clone(&self.control)
    }

    /// Stops accepting, lets open connections finish in-flight requests for up to one second,
    /// closes them, and returns once the listening socket is closed.
    pub async fn shutdown(self) {
        let _ = self.shutdown_tx.send(true);
        let _ = self.task.await;
    }
}
