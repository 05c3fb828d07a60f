//! The accept loop and per-connection serving (HTTP/1.1 and HTTP/2, plain or TLS).
//!
//! Shutdown: when the handle sends `true` on the watch channel or is dropped, the loop stops
//! accepting and closes the listener; each connection is asked to shut down gracefully (idle
//! keep-alive connections close at once, in-flight requests may finish) and whatever is still
//! open after [`GRACE`] is aborted.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::control::SimControl;
use super::router;

/// How long open connections get to finish after shutdown starts.
const GRACE: Duration = Duration::from_secs(1);
/// A TLS handshake that takes longer than this is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Back-off after a failed `accept` (for example out of file descriptors).
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

type Builder = auto::Builder<TokioExecutor>;

/// Serves `listener` until `shutdown` turns `true` or its sender is dropped.
pub(crate) async fn run(
    listener: TcpListener,
    control: Arc<SimControl>,
    tls: Option<Arc<rustls::ServerConfig>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    // No header-read timeout: hyper would also use it to cut idle keep-alive connections after
    // 30 s, which races with client pools that reuse a connection just then (flaky tests and
    // benchmarks). Idle connections stay open until the client or shutdown closes them.
    builder
        .http1()
        .keep_alive(true)
        .timer(TokioTimer::new())
        .header_read_timeout(None);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let acceptor = tls.map(TlsAcceptor::from);
    let mut connections = JoinSet::new();
    // Each connection gets a clone of this one; the loop itself waits on `shutdown`.
    let for_connections = shutdown.clone();

    loop {
        tokio::select! {
            // Err: the handle was dropped, which also means stop.
            () = stopped(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Small request/response exchanges: do not wait for Nagle.
                    let _ = stream.set_nodelay(true);
                    let builder = Arc::clone(&builder);
                    let control = Arc::clone(&control);
                    let shutdown = for_connections.clone();
                    match &acceptor {
                        None => {
                            connections.spawn(serve(stream, builder, control, shutdown));
                        }
                        Some(acceptor) => {
                            let acceptor = acceptor.clone();
                            connections.spawn(async move {
                                if let Some(tls_stream) =
                                    handshake(acceptor, stream, shutdown.clone()).await
                                {
                                    serve(tls_stream, builder, control, shutdown).await;
                                } else {
                                    tracing::debug!(%peer, "simulator TLS handshake failed");
                                }
                            });
                        }
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "simulator accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            },
            // Reap finished connection tasks so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }

    drop(listener);
    let drained = tokio::time::timeout(GRACE + Duration::from_millis(100), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        connections.shutdown().await;
    }
    tracing::debug!("simulator stopped");
}

/// Resolves once shutdown is requested or the handle is gone.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`; drop it here, not in the caller's future.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

async fn handshake<S>(
    acceptor: TlsAcceptor,
    stream: S,
    mut shutdown: watch::Receiver<bool>,
) -> Option<tokio_rustls::server::TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    tokio::select! {
        result = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)) => {
            result.ok()?.ok()
        }
        () = stopped(&mut shutdown) => None,
    }
}

/// Serves one connection until it closes or shutdown starts (then gracefully, up to [`GRACE`]).
async fn serve<S>(
    stream: S,
    builder: Arc<Builder>,
    control: Arc<SimControl>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request| {
        let control = Arc::clone(&control);
        async move { Ok::<_, Infallible>(router::handle(control, request).await) }
    });
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(err) = result {
                tracing::debug!(error = %err, "simulator connection ended with an error");
            }
            return;
        }
        () = stopped(&mut shutdown) => {}
    }
    connection.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(GRACE, connection).await;
}
