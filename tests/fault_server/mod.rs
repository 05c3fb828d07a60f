//! A tiny raw-HTTP/1.1 "Zuora" for the faults the embedded simulator cannot
//! produce: a reset in the middle of a body, a body that trickles, a gzip
//! stream cut short, a connection held open without an answer. It serves
//! `POST /oauth/token` properly (so a token cache in front of it works) and
//! applies the current [`Fault`] to every other request.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// What the server does with a non-token request.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// 200 with a small JSON body.
    Ok,
    /// Reads the request, never answers, and notes when the peer closes.
    Hold,
    /// Announces a 1000-byte body, sends 10 bytes, then resets the connection.
    ResetMidBody,
    /// Sends the headers at once, then one body byte every `gap`.
    SlowBody(Duration),
    /// Waits before sending anything.
    SlowHeaders(Duration),
    /// `Content-Encoding: gzip` with a gzip stream cut in half.
    TruncatedGzip,
    /// Closes the connection as soon as the request was read (no response).
    CloseWithoutAnswer,
    /// This status with a Zuora-shaped error body.
    Status(u16),
}

/// One request as the fault server read it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub head: String,
    pub body: Vec<u8>,
}

/// A running fault server.
pub struct FaultServer {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

struct State {
    fault: Mutex<Fault>,
    api_requests: AtomicU64,
    token_requests: AtomicU64,
    connections: AtomicU64,
    peer_closed_while_held: AtomicU64,
    held_closed: Notify,
    seen: Mutex<Vec<Seen>>,
}

impl FaultServer {
    pub async fn start(fault: Fault) -> FaultServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            fault: Mutex::new(fault),
            api_requests: AtomicU64::new(0),
            token_requests: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            peer_closed_while_held: AtomicU64::new(0),
            held_closed: Notify::new(),
            seen: Mutex::new(Vec::new()),
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                st.connections.fetch_add(1, Ordering::Relaxed);
                let st = st.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, st).await;
                });
            }
        });
        FaultServer { addr, state, task }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn set(&self, fault: Fault) {
        *self.state.fault.lock().unwrap() = fault;
    }
    /// Non-token requests read so far.
    pub fn api_requests(&self) -> u64 {
        self.state.api_requests.load(Ordering::Relaxed)
    }
    pub fn token_requests(&self) -> u64 {
        self.state.token_requests.load(Ordering::Relaxed)
    }
    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::Relaxed)
    }
    /// How many held requests saw the gateway close the connection.
    pub fn held_closed(&self) -> u64 {
        self.state.peer_closed_while_held.load(Ordering::Relaxed)
    }
    /// Waits until `count` held requests have seen the gateway close their connection.
    pub async fn wait_held_closed(&self, count: u64, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.state.held_closed.notified();
            if self.held_closed() >= count {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.held_closed() >= count;
            }
        }
    }
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const TOKEN_BODY: &str = r#"{"access_token":"fault-server-token-0123456789","token_type":"bearer","expires_in":3599,"scope":"entity.1 platform.write service.usage.delete","jti":"0123456789abcdef"}"#;

async fn serve(mut stream: TcpStream, st: Arc<State>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let Some(req) = read_request(&mut stream, &mut buf).await? else {
            return Ok(());
        };
        if req.path.starts_with("/oauth/token") {
            st.token_requests.fetch_add(1, Ordering::Relaxed);
            write_response(
                &mut stream,
                200,
                "application/json",
                TOKEN_BODY.as_bytes(),
                &[],
            )
            .await?;
            continue;
        }
        st.api_requests.fetch_add(1, Ordering::Relaxed);
        st.seen.lock().unwrap().push(req);
        let fault = *st.fault.lock().unwrap();
        match fault {
            Fault::Ok => {
                write_response(
                    &mut stream,
                    200,
                    "application/json",
                    br#"{"success":true}"#,
                    &[],
                )
                .await?;
            }
            Fault::Status(code) => {
                let body = format!(
                    r#"{{"success":false,"reasons":[{{"code":"500000{}","message":"injected {code}"}}]}}"#,
                    if code == 429 { "70" } else { "61" }
                );
                let extra: &[(&str, &str)] = if code == 429 || code == 503 {
                    &[("retry-after", "1")]
                } else {
                    &[]
                };
                write_response(
                    &mut stream,
                    code,
                    "application/json",
                    body.as_bytes(),
                    extra,
                )
                .await?;
            }
            Fault::Hold => {
                // Wait for EOF (or a reset) from the gateway.
                let mut sink = [0u8; 1024];
                loop {
                    match stream.read(&mut sink).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
                st.peer_closed_while_held.fetch_add(1, Ordering::Relaxed);
                st.held_closed.notify_waiters();
                return Ok(());
            }
            Fault::ResetMidBody => {
                stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"success\":",
                    )
                    .await?;
                stream.flush().await?;
                tokio::time::sleep(Duration::from_millis(50)).await;
                stream.set_zero_linger()?;
                return Ok(());
            }
            Fault::SlowBody(gap) => {
                let body = br#"{"success":true,"padding":"................................"}"#;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                stream.write_all(head.as_bytes()).await?;
                for b in body {
                    tokio::time::sleep(gap).await;
                    stream.write_all(&[*b]).await?;
                }
            }
            Fault::SlowHeaders(delay) => {
                tokio::time::sleep(delay).await;
                write_response(
                    &mut stream,
                    200,
                    "application/json",
                    br#"{"success":true}"#,
                    &[],
                )
                .await?;
            }
            Fault::TruncatedGzip => {
                let gz = gzip(
                    br#"{"success":true,"data":"the rest of this body never arrives intact"}"#,
                );
                let cut = &gz[..gz.len() / 2];
                write_response(
                    &mut stream,
                    200,
                    "application/json",
                    cut,
                    &[("content-encoding", "gzip")],
                )
                .await?;
            }
            Fault::CloseWithoutAnswer => return Ok(()),
        }
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

async fn write_response(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
    extra: &[(&str, &str)],
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nzuora-request-id: fault-{status}\r\n",
        body.len()
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.flush().await
}

/// Reads one request (head + Content-Length or chunked body). `None` at EOF.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Option<Seen>> {
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    buf.drain(..head_end);
    let mut first = head.lines().next().unwrap_or("").split(' ');
    let method = first.next().unwrap_or("").to_owned();
    let path = first.next().unwrap_or("").to_owned();
    let lower = head.to_ascii_lowercase();
    let content_length = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let chunked = lower.contains("transfer-encoding: chunked");
    let body = if let Some(n) = content_length {
        while buf.len() < n {
            let mut chunk = [0u8; 4096];
            let read = stream.read(&mut chunk).await?;
            if read == 0 {
                return Ok(None);
            }
            buf.extend_from_slice(&chunk[..read]);
        }
        buf.drain(..n).collect()
    } else if chunked {
        loop {
            if let Some(i) = find(buf, b"0\r\n\r\n") {
                let body = buf[..i].to_vec();
                buf.drain(..i + 5);
                break body;
            }
            let mut chunk = [0u8; 4096];
            let read = stream.read(&mut chunk).await?;
            if read == 0 {
                return Ok(None);
            }
            buf.extend_from_slice(&chunk[..read]);
        }
    } else {
        Vec::new()
    };
    Ok(Some(Seen {
        method,
        path,
        head,
        body,
    }))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
