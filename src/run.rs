//! Process-level glue for the binary: runtime, logging, signals.

use std::net::SocketAddr;
use std::process::ExitCode;

use crate::config::Config;

/// A current-thread runtime for `Some(1)`, else a multi-thread runtime with
/// that many workers (`None`: tokio's default, as `simulate` uses).
fn runtime(worker_threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    match worker_threads {
        Some(1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Some(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
        None => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    }
}

/// How `serve` runs its threads.
enum Threads {
    /// One current-thread runtime per serving thread (`work_stealing:
    /// false`, the default): each thread serves its share of the caller
    /// connections start to end, with its own Zuora pool, and never wakes
    /// another thread on a request's path. With one thread this is simply a
    /// current-thread runtime.
    PerCore(usize),
    /// tokio's work-stealing runtime with that many workers.
    WorkStealing(usize),
}

impl Threads {
    fn of(server: &crate::config::ServerConfig) -> Threads {
        let n = server.worker_threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
        });
        if server.work_stealing && n > 1 {
            Threads::WorkStealing(n)
        } else {
            Threads::PerCore(n)
        }
    }
}

/// The extra current-thread runtimes of [`Threads::PerCore`], each driven
/// by its own thread until [`ExtraRuntimes::stop`].
struct ExtraRuntimes {
    handles: Vec<tokio::runtime::Handle>,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl ExtraRuntimes {
    /// Starts `n` runtimes; the thread of the `i`th (from 0) serves with the
    /// Zuora pool `i + 1` (the main thread has pool 0).
    fn start(n: usize) -> std::io::Result<ExtraRuntimes> {
        let mut extra = ExtraRuntimes {
            handles: Vec::with_capacity(n),
            stops: Vec::with_capacity(n),
            threads: Vec::with_capacity(n),
        };
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            extra.handles.push(rt.handle().clone());
            extra.stops.push(stop);
            let thread = std::thread::Builder::new()
                .name(format!("zuora-gateway-{}", i + 1))
                .spawn(move || {
                    crate::upstream::set_runtime_index(i + 1);
                    // Tasks spawned through the handle run while this blocks.
                    rt.block_on(async move {
                        tokio::spawn(crate::memory::release_after_bursts());
                        let _ = stopped.await;
                    });
                });
            match thread {
                Ok(t) => extra.threads.push(t),
                Err(e) => {
                    extra.stop();
                    return Err(e);
                }
            }
        }
        Ok(extra)
    }

    /// Ends the runtimes (after serving drained) and joins their threads.
    fn stop(self) {
        drop(self.stops);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Waits for SIGTERM or SIGINT.
async fn terminate_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// `serve`: run until SIGTERM/SIGINT, then drain and exit 0.
pub fn serve(config: Config) -> ExitCode {
    let (rt, extra) = match Threads::of(&config.server) {
        Threads::WorkStealing(n) => (runtime(Some(n)), 0),
        Threads::PerCore(n) => (runtime(Some(1)), n - 1),
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let extra = match ExtraRuntimes::start(extra) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error: cannot start the serving threads: {e}");
            return ExitCode::FAILURE;
        }
    };
    let handles = extra.handles.clone();
    let code = rt.block_on(async move {
        // Frees what a burst of traffic leaves behind (see `memory`).
        tokio::spawn(crate::memory::release_after_bursts());
        // Logs, access log and (when configured) OTLP export; inside the runtime.
        let telemetry = match crate::telemetry::Telemetry::init(&config.telemetry) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        let running = match crate::server::start_on(config, telemetry, handles).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        terminate_signal().await;
        tracing::info!("shutdown signal received");
        running.shutdown().await;
        tracing::info!("stopped");
        ExitCode::SUCCESS
    });
    extra.stop();
    code
}

/// `simulate`: run the embedded simulator alone (`fixed_answer`: bench mode,
/// see [`crate::sim::SimOptions::fixed_answer`]; `token_ttl`: lifetime of issued
/// tokens, Zuora's when `None`).
pub fn simulate(
    listen: SocketAddr,
    fixed_answer: bool,
    token_ttl: Option<std::time::Duration>,
) -> ExitCode {
    let rt = match runtime(None) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let defaults = crate::sim::SimOptions::default();
        let opts = crate::sim::SimOptions {
            fixed_answer,
            token_ttl: token_ttl.unwrap_or(defaults.token_ttl),
            ..defaults
        };
        let sim = match crate::sim::Simulator::start(listen, opts).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: cannot listen on {listen}: {e}");
                return ExitCode::FAILURE;
            }
        };
        println!("Zuora simulator listening on {}", sim.base_url());
        terminate_signal().await;
        sim.shutdown().await;
        ExitCode::SUCCESS
    })
}

/// `healthcheck`: GET `url`, exit 0 on 200 within 2 s.
pub fn healthcheck(url: http::Uri) -> ExitCode {
    use http_body_util::Empty;
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(_) => return ExitCode::FAILURE,
    };
    rt.block_on(async move {
        let client: Client<HttpConnector, Empty<bytes::Bytes>> =
            Client::builder(hyper_util::rt::TokioExecutor::new()).build(HttpConnector::new());
        match tokio::time::timeout(std::time::Duration::from_secs(2), client.get(url)).await {
            Ok(Ok(resp)) if resp.status() == http::StatusCode::OK => ExitCode::SUCCESS,
            Ok(Ok(resp)) => {
                eprintln!("unhealthy: {}", resp.status());
                ExitCode::FAILURE
            }
            Ok(Err(e)) => {
                eprintln!("unhealthy: {e}");
                ExitCode::FAILURE
            }
            Err(_) => {
                eprintln!("unhealthy: no answer within 2s");
                ExitCode::FAILURE
            }
        }
    })
}
