//! Process-level glue for the binary: runtime, logging, signals.

use std::net::SocketAddr;
use std::process::ExitCode;

use crate::config::Config;

/// The runtime: `server.worker_threads: 1` is a current-thread runtime
/// (accept loop, connections and the Zuora client on one thread: no
/// cross-thread wake-ups, the cheapest per request); otherwise a
/// multi-thread runtime with that many workers, or tokio's default (one
/// per CPU the process may use, or `TOKIO_WORKER_THREADS`).
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
    let rt = match runtime(config.server.worker_threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        // Logs, access log and (when configured) OTLP export; inside the runtime.
        let telemetry = match crate::telemetry::Telemetry::init(&config.telemetry) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        let running = match crate::server::start_with_telemetry(config, telemetry).await {
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
    })
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
