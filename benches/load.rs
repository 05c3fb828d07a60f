//! End-to-end load comparison: the same request mix sent **direct** to a fast
//! upstream (the embedded simulator in fixed-answer mode), through **nginx**
//! (keep-alive `proxy_pass` with the same header injection) and through
//! **zuora-gateway** (full policy: JWT, route, tenancy, token injection, rate
//! limit, tracing to a local dummy OTLP receiver).
//!
//! One command: `cargo bench --bench load` (options after `--`, see `--help`).
//! It spawns the `zuora-gateway` binary that `cargo bench` builds with the
//! bench profile (`target/release/zuora-gateway`) twice: as the simulator
//! (`simulate --fixed-answer`) and as the gateway (`serve`), plus nginx and
//! wrk from Debian (installed with apt-get when missing and running as root).
//! The token-refresh phase adds a second pair: a full simulator issuing 4 s
//! tokens (`simulate --token-ttl 4s`) and a gateway in front of it.
//! Traffic goes only to 127.0.0.1; every phase is bounded in time and count.
//!
//! Under `cargo test --all-targets` (no `--bench` argument) it prints one line
//! and exits. See docs/performance.md for what it measures and the results.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

type R<T> = Result<T, String>;

const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_zuora-gateway");
const HS_SECRET: &str = "bench-only-hs256-key-0123456789abcdef0123456789";
const ISSUER: &str = "https://bench.local";
const AUDIENCE: &str = "zuora-gateway";
const CALLER: &str = "billing-bench";
const ORG_IDS: &str = "org-bench";
const ENTITY_IDS: &str = "3c4fd2c0-1b2a-4c3d-8e9f-0a1b2c3d4e5f";
const ZUORA_VERSION: &str = "2026-02-20";
/// The bearer nginx injects (the simulator in fixed-answer mode accepts any).
const NGINX_BEARER: &str = "Bearer nginx-static-zuora-token";
const JOBS: &str = "/v1/uno/data-backfill/propagation/jobs";
const STOP_BODY: &str = r#"{"status":"Stopping"}"#;
/// Requests per generated mix (per wrk thread / per fixed-rate connection).
const MIX_LEN: usize = 256;

// ---------------------------------------------------------------- options

#[derive(Debug, Clone)]
struct Opts {
    rounds: u32,
    secs: u64,
    warmup_secs: u64,
    conns: u32,
    threads: u32,
    fixed_secs: u64,
    fixed_rounds: u32,
    fixed_conns: usize,
    fixed_rate: Option<u64>,
    refresh: bool,
    refresh_secs: u64,
    refresh_rate: Option<u64>,
    soak: bool,
    soak_requests: u64,
    soak_conns: u32,
    soak_phase_secs: u64,
    soak_phases: u32,
    targets: Vec<Target>,
    trusted_identity: bool,
    access_log: bool,
    otlp: bool,
    sampling: Option<f64>,
    debug_requests: Option<u64>,
    workers: Option<usize>,
    work_stealing: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            rounds: 2,
            secs: 10,
            warmup_secs: 2,
            conns: 50,
            threads: 2,
            fixed_secs: 15,
            fixed_rounds: 5,
            fixed_conns: 128,
            fixed_rate: None,
            refresh: true,
            refresh_secs: 20,
            refresh_rate: None,
            soak: true,
            soak_requests: 1_000_000,
            soak_conns: 1000,
            soak_phase_secs: 30,
            soak_phases: 4,
            targets: vec![Target::Direct, Target::Nginx, Target::Gateway],
            trusted_identity: false,
            access_log: true,
            otlp: true,
            sampling: None,
            debug_requests: None,
            workers: None,
            work_stealing: false,
        }
    }
}

const HELP: &str = "\
cargo bench --bench load [-- OPTIONS]
  --quick              1 round of 5 s, fixed rate 3 rounds of 2 s, refresh phase 10 s, soak of 200k requests
  --rounds N           closed-loop rounds per target, interleaved (default 2; best is reported)
  --secs N             closed-loop seconds per round (default 10, max 30)
  --conns N            closed-loop wrk connections (default 50)
  --fixed-rate N       fixed-rate requests/s (default: 25% of direct saturation)
  --fixed-secs N       fixed-rate seconds per target and rate, split into the rounds (default 15, max 60)
  --fixed-rounds N     fixed-rate rounds, targets interleaved in each; medians reported (default 5)
  --no-refresh         skip the token-refresh-under-load phase (own simulator with 4 s tokens + gateway)
  --refresh-secs N     token refresh phase seconds (default 20, max 60; a refresh every ~2 s)
  --refresh-rate N     token refresh phase requests/s (default: 25% of the gateway's closed-loop max)
  --no-soak            skip the 1M-requests-over-1000-connections memory soak
  --soak-only          only idle RSS and the soak (gateway only)
  --soak-requests N    soak request target (default 1000000; phases of <= 30 s, at most 4)
  --targets a,b        subset of direct,nginx,gateway
  --trusted-identity   gateway in sidecar mode (callers.trusted_identity) instead of JWT
  --no-access-log      access logs off in both nginx and the gateway (default: both on, to /dev/null)
  --no-otlp            no OTLP endpoint (the gateway's tracing without export)
  --sampling R         telemetry.sampling_ratio (default: the gateway's default, 0.1; failures always exported)
  --debug-requests N   telemetry.debug_requests (default: the gateway's default, 10000)
  --workers N          gateway `server.worker_threads` = nginx worker_processes (default: nproc)
  --work-stealing      gateway `server.work_stealing: true` (tokio's multi-thread runtime)";

fn parse_opts(args: &[String]) -> R<Opts> {
    let mut o = Opts::default();
    let mut it = args.iter().skip(1);
    let num = |v: Option<&String>, name: &str| -> R<u64> {
        v.and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("{name}: expected a number"))
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--bench" => {}
            "--quick" => {
                o.rounds = 1;
                o.secs = 5;
                o.fixed_secs = 6;
                o.fixed_rounds = 3;
                o.refresh_secs = 10;
                o.soak_requests = 200_000;
                o.soak_phase_secs = 20;
            }
            "--rounds" => o.rounds = num(it.next(), a)?.clamp(1, 5) as u32,
            "--secs" => o.secs = num(it.next(), a)?.clamp(1, 30),
            "--conns" => o.conns = num(it.next(), a)?.clamp(1, 2000) as u32,
            "--fixed-rate" => o.fixed_rate = Some(num(it.next(), a)?.max(1)),
            "--fixed-secs" => o.fixed_secs = num(it.next(), a)?.clamp(1, 60),
            "--fixed-rounds" => o.fixed_rounds = num(it.next(), a)?.clamp(1, 20) as u32,
            "--no-refresh" => o.refresh = false,
            "--refresh-secs" => o.refresh_secs = num(it.next(), a)?.clamp(1, 60),
            "--refresh-rate" => o.refresh_rate = Some(num(it.next(), a)?.max(1)),
            "--no-soak" => o.soak = false,
            "--soak-only" => {
                o.soak = true;
                o.targets = vec![];
            }
            "--soak-requests" => o.soak_requests = num(it.next(), a)?.max(1),
            "--targets" => {
                let list = it.next().ok_or("--targets: expected a list")?;
                o.targets = list
                    .split(',')
                    .map(|t| match t.trim() {
                        "direct" => Ok(Target::Direct),
                        "nginx" => Ok(Target::Nginx),
                        "gateway" => Ok(Target::Gateway),
                        other => Err(format!("--targets: unknown `{other}`")),
                    })
                    .collect::<R<_>>()?;
            }
            "--trusted-identity" => o.trusted_identity = true,
            "--no-access-log" => o.access_log = false,
            "--no-otlp" => o.otlp = false,
            "--debug-requests" => o.debug_requests = Some(num(it.next(), a)?),
            "--workers" => o.workers = Some(num(it.next(), a)?.clamp(1, 64) as usize),
            "--work-stealing" => o.work_stealing = true,
            "--sampling" => {
                let v: f64 = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .filter(|v| (0.0..=1.0).contains(v))
                    .ok_or("--sampling: expected a number in 0..1")?;
                o.sampling = Some(v);
            }
            "--help" | "-h" => return Err(HELP.to_owned()),
            // cargo bench passes filters through; ignore anything else.
            _ => {}
        }
    }
    Ok(o)
}

// ---------------------------------------------------------------- processes

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Direct,
    Nginx,
    Gateway,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Nginx => "nginx",
            Target::Gateway => "gateway",
        }
    }
}

/// A child process stopped with SIGTERM (then SIGKILL) when dropped.
struct Proc {
    name: &'static str,
    child: Child,
}

impl Proc {
    /// Starts `cmd` with stderr (and stdout unless `discard_stdout`) in `log`.
    fn spawn(name: &'static str, cmd: &mut Command, log: &Path, discard_stdout: bool) -> R<Proc> {
        let err = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let out = if discard_stdout {
            Stdio::null()
        } else {
            Stdio::from(err.try_clone().map_err(|e| e.to_string())?)
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        Ok(Proc { name, child })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // Polite first (nginx must not orphan its workers), by process id only.
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{} did not stop within 5 s; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> R<u16> {
    let l = StdListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

fn wait_port(addr: SocketAddr, within: Duration) -> R<()> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if StdStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("nothing listens on {addr} after {within:?}"))
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs Debian packages when missing (only as root, only via apt-get).
fn ensure_tool(cmd: &str, packages: &[&str]) -> bool {
    if have(cmd) {
        return true;
    }
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    if !root || !have("apt-get") {
        eprintln!("`{cmd}` is missing; install {packages:?} (apt-get) to include it");
        return false;
    }
    for pkg in packages {
        eprintln!("installing {pkg} (apt-get install -y {pkg}) …");
        let ok = Command::new("apt-get")
            .args(["install", "-y", "-q", pkg])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok && have(cmd) {
            return true;
        }
    }
    eprintln!("could not install `{cmd}`");
    false
}

// ---------------------------------------------------------------- /proc

#[derive(Debug, Clone, Copy, Default)]
struct CpuTicks(u64);

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(100.0)
}

/// utime + stime of one process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

fn ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// `pid` and its direct children (nginx master + workers).
fn family(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            if let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok())
                && ppid(p) == Some(pid)
            {
                out.push(p);
            }
        }
    }
    out
}

/// A `kB` field of /proc/PID/status, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn family_ticks(pids: &[u32]) -> CpuTicks {
    CpuTicks(pids.iter().map(|&p| cpu_ticks(p)).sum())
}

fn family_kib(pids: &[u32], field: &str) -> u64 {
    pids.iter().map(|&p| status_kib(p, field)).sum()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

// ---------------------------------------------------------------- the setup

/// What runs during the bench; fields drop in order (processes before the temp dir).
struct Env {
    sim: Proc,
    sim_addr: SocketAddr,
    nginx: Option<(Proc, SocketAddr)>,
    gateway: Option<(Proc, SocketAddr, SocketAddr)>,
    jwt: String,
    otlp: Option<Otlp>,
    dir: tempfile::TempDir,
}

impl Env {
    fn addr(&self, t: Target) -> Option<SocketAddr> {
        match t {
            Target::Direct => Some(self.sim_addr),
            Target::Nginx => self.nginx.as_ref().map(|n| n.1),
            Target::Gateway => self.gateway.as_ref().map(|g| g.1),
        }
    }

    /// The proxy's processes (none for direct).
    fn proxy_pids(&self, t: Target) -> Vec<u32> {
        match t {
            Target::Direct => vec![],
            Target::Nginx => self
                .nginx
                .as_ref()
                .map(|n| family(n.0.pid()))
                .unwrap_or_default(),
            Target::Gateway => self
                .gateway
                .as_ref()
                .map(|g| vec![g.0.pid()])
                .unwrap_or_default(),
        }
    }
}

fn mint_jwt() -> R<String> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs();
    let claims = serde_json::json!({
        "sub": CALLER, "iss": ISSUER, "aud": AUDIENCE,
        "iat": now, "exp": now + 3600,
    });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("bench".into());
    let key =
        jsonwebtoken::EncodingKey::from_secret(HS_SECRET.as_bytes()).map_err(|e| e.to_string())?;
    jsonwebtoken::encode(&header, &claims, &key).map_err(|e| e.to_string())
}

/// Starts `zuora-gateway serve --config conf` (its stdout, the access log,
/// discarded like nginx's; stderr to `log`) and waits until its admin port is
/// ready; on failure the error carries the gateway's log.
async fn spawn_gateway(
    name: &'static str,
    conf: &Path,
    log: &Path,
    admin_port: u16,
    o: &Opts,
) -> R<Proc> {
    let rust_log = if o.access_log {
        "warn"
    } else {
        "warn,access=off"
    };
    let gw = Proc::spawn(
        name,
        Command::new(GATEWAY_BIN)
            .arg("serve")
            .arg("--config")
            .arg(conf)
            .env("RUST_LOG", rust_log),
        log,
        true,
    )?;
    let admin: SocketAddr = ([127, 0, 0, 1], admin_port).into();
    if let Err(e) = wait_ready(admin, Duration::from_secs(15)).await {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        return Err(format!("{e}\n--- {name} log ---\n{text}"));
    }
    Ok(gw)
}

fn gateway_yaml(
    listen: u16,
    admin: u16,
    sim: SocketAddr,
    otlp: Option<SocketAddr>,
    o: &Opts,
    workers: usize,
    refresh_before: Option<&str>,
) -> String {
    let (trusted_identity, sampling, debug_requests, work_stealing) = (
        o.trusted_identity,
        o.sampling,
        o.debug_requests,
        o.work_stealing,
    );
    let mut otlp = otlp
        .map(|a| format!("  otlp_endpoint: http://{a}\n"))
        .unwrap_or_default();
    if let Some(r) = sampling {
        otlp.push_str(&format!("  sampling_ratio: {r}\n"));
    }
    if let Some(n) = debug_requests {
        otlp.push_str(&format!("  debug_requests: {n}\n"));
    }
    let refresh_before = refresh_before
        .map(|d| format!("      refresh_before_expiry: {d}\n"))
        .unwrap_or_default();
    let callers = if trusted_identity {
        format!("  trusted_identity: {CALLER}\n")
    } else {
        format!(
            "  jwt:\n    issuer: {ISSUER}\n    audience: {AUDIENCE}\n    identity_claim: sub\n    keys:\n      - {{ kid: bench, alg: HS256, secret: \"{HS_SECRET}\" }}\n"
        )
    };
    format!(
        "\
# Generated by benches/load.rs: the full policy, against the fixed-answer simulator.
server:
  listen: 127.0.0.1:{listen}
  admin_listen: 127.0.0.1:{admin}
  max_connections: 4096
  max_in_flight: 4096
  shutdown_grace: 2s
  worker_threads: {workers}
  work_stealing: {work_stealing}
upstreams:
  zuora:
    base_url: http://{sim}
    zuora_version: \"{ZUORA_VERSION}\"
    timeouts: {{ connect: 2s, request: 10s }}
    pool: {{ max_idle_per_host: 1024 }}
    oauth:
      client_id: bench-client-id
      client_secret: bench-client-secret
{refresh_before}callers:
{callers}routes:
  - name: stop-auto-backfill-job
    method: PUT
    path: {JOBS}/{{jobId}}
    upstream: zuora
    allow_callers: [\"billing-*\"]
    rate_limits: [bench-never-trips]
  - name: read-auto-backfill-jobs
    method: GET
    path: {JOBS}/**
    upstream: zuora
    allow_callers: [\"*\"]
    rate_limits: [bench-never-trips]
tenancy:
  - callers: [\"*\"]
    org_ids: [\"{ORG_IDS}\"]
    entity_ids: [\"{ENTITY_IDS}\"]
rate_limits:
  bench-never-trips: {{ key: caller, rate: 10000000/second, burst: 10000000 }}
telemetry:
  service_name: zuora-gateway-bench
  log_format: json
{otlp}"
    )
}

fn nginx_conf(
    dir: &Path,
    listen: u16,
    sim: SocketAddr,
    workers: usize,
    access_log: bool,
) -> String {
    let d = dir.display();
    // Unbuffered, one write per request: what the gateway's access log does.
    let access_log = if access_log {
        "access_log /dev/null combined"
    } else {
        "access_log off"
    };
    format!(
        "\
# Generated by benches/load.rs: the proxy a platform team would otherwise deploy.
worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
  {access_log};
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  keepalive_requests 1000000;
  upstream zuora {{
    server {sim};
    keepalive 256;
    keepalive_requests 1000000;
  }}
  server {{
    listen 127.0.0.1:{listen} backlog=4096;
    location /v1/ {{
      proxy_pass http://zuora;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_set_header Host {sim};
      proxy_set_header Authorization \"{NGINX_BEARER}\";
      proxy_set_header Zuora-Org-Ids \"{ORG_IDS}\";
      proxy_set_header Zuora-Entity-Ids \"{ENTITY_IDS}\";
      proxy_set_header Zuora-Track-Id $request_id;
      proxy_set_header Zuora-Version \"{ZUORA_VERSION}\";
    }}
    location / {{ return 404; }}
  }}
}}
"
    )
}

/// The request mix, as (method, path, body) — varied job IDs per stream so
/// identical stop requests are never in flight together (no coalescing).
fn mix(stream: usize) -> Vec<Spec> {
    (0..MIX_LEN)
        .map(|i| {
            let job = format!("ff8080818bb300af{:04x}{:012x}", stream % 0x1_0000, i);
            match i % 8 {
                7 => (Method::PUT, format!("{JOBS}/{job}"), Some(STOP_BODY)),
                2 | 5 => (Method::GET, format!("{JOBS}?pageSize=20&page=1"), None),
                _ => (Method::GET, format!("{JOBS}/{job}"), None),
            }
        })
        .collect()
}

/// wrk's Lua script: the same mix, pre-formatted per thread.
fn wrk_lua(jwt: &str) -> String {
    format!(
        r#"-- Generated by benches/load.rs
local counter = 0
function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
end
local reqs = {{}}
local i = 0
function init(args)
  local t = tonumber(tid) or 0
  local auth = "Bearer {jwt}"
  local get = {{ ["Authorization"] = auth, ["Accept"] = "application/json" }}
  local put = {{ ["Authorization"] = auth, ["Accept"] = "application/json",
                ["Content-Type"] = "application/json" }}
  for n = 0, {last} do
    local job = string.format("ff8080818bb300af%04x%012x", t, n)
    local m = n % 8
    if m == 7 then
      reqs[#reqs + 1] = wrk.format("PUT", "{JOBS}/" .. job, put, '{STOP_BODY}')
    elseif m == 2 or m == 5 then
      reqs[#reqs + 1] = wrk.format("GET", "{JOBS}?pageSize=20&page=1", get)
    else
      reqs[#reqs + 1] = wrk.format("GET", "{JOBS}/" .. job, get)
    end
  end
end
function request()
  i = i + 1
  if i > #reqs then i = 1 end
  return reqs[i]
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "ZGW_RESULT requests=%d duration_us=%d status=%d connect=%d read=%d write=%d timeout=%d p50=%d p99=%d p999=%d max=%d\n",
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max))
end
"#,
        last = MIX_LEN - 1
    )
}

// ---------------------------------------------------------------- dummy OTLP receiver

/// A local OTLP/HTTP sink: answers 200 with an empty (valid) protobuf body.
struct Otlp {
    addr: SocketAddr,
    exports: Arc<AtomicU64>,
}

async fn start_otlp() -> R<Otlp> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let exports = Arc::new(AtomicU64::new(0));
    let counter = exports.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let counter = counter.clone();
                    async move {
                        let _ = req.into_body().collect().await;
                        counter.fetch_add(1, Ordering::Relaxed);
                        let mut resp = http::Response::new(Full::new(Bytes::new()));
                        resp.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static("application/x-protobuf"),
                        );
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(Otlp { addr, exports })
}

// ---------------------------------------------------------------- one-off requests

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> R<Sender> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}

fn request(addr: SocketAddr, jwt: &str, (method, path, body): &Spec) -> R<Request<Full<Bytes>>> {
    let mut b = Request::builder()
        .method(method.clone())
        .uri(path.as_str())
        .header(http::header::HOST, addr.to_string())
        .header(http::header::AUTHORIZATION, format!("Bearer {jwt}"))
        .header(http::header::ACCEPT, "application/json");
    if body.is_some() {
        b = b.header(http::header::CONTENT_TYPE, "application/json");
    }
    b.body(Full::new(
        body.map_or_else(Bytes::new, |s| Bytes::from_static(s.as_bytes())),
    ))
    .map_err(|e| e.to_string())
}

async fn send(sender: &mut Sender, req: Request<Full<Bytes>>) -> R<(StatusCode, Bytes)> {
    sender.ready().await.map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

/// Sends every request kind once; all must be 200 or the comparison is void.
async fn check_target(t: Target, addr: SocketAddr, jwt: &str) -> R<()> {
    let mut s = connect(addr).await?;
    for spec in mix(0xffff).iter().take(8) {
        let req = request(addr, jwt, spec)?;
        let (status, body) = tokio::time::timeout(Duration::from_secs(5), send(&mut s, req))
            .await
            .map_err(|_| format!("{}: no answer within 5 s", t.name()))??;
        if status != StatusCode::OK {
            return Err(format!(
                "{}: {} {} answered {status}: {}",
                t.name(),
                spec.0,
                spec.1,
                String::from_utf8_lossy(&body)
            ));
        }
    }
    Ok(())
}

async fn wait_ready(admin: SocketAddr, within: Duration) -> R<()> {
    let deadline = Instant::now() + within;
    let mut last = String::from("no answer");
    while Instant::now() < deadline {
        if let Ok(mut s) = connect(admin).await {
            let req = Request::get("/readyz")
                .header(http::header::HOST, admin.to_string())
                .body(Full::new(Bytes::new()))
                .map_err(|e| e.to_string())?;
            match send(&mut s, req).await {
                Ok((StatusCode::OK, _)) => return Ok(()),
                Ok((st, body)) => last = format!("{st} {}", String::from_utf8_lossy(&body)),
                Err(e) => last = e,
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("gateway not ready after {within:?}: {last}"))
}

// ---------------------------------------------------------------- closed loop (wrk)

#[derive(Debug, Clone, Default)]
struct WrkResult {
    requests: u64,
    secs: f64,
    errors: u64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    proxy_cpu_s: f64,
    upstream_cpu_s: f64,
}

impl WrkResult {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.secs.max(1e-9)
    }
}

fn run_wrk(
    addr: SocketAddr,
    script: &Path,
    threads: u32,
    conns: u32,
    secs: u64,
) -> R<(WrkResult, String)> {
    let out = Command::new("wrk")
        .args([
            &format!("-t{threads}"),
            &format!("-c{conns}"),
            &format!("-d{secs}s"),
            "--timeout",
            "5s",
            "-s",
        ])
        .arg(script)
        .arg(format!("http://{addr}"))
        .output()
        .map_err(|e| format!("wrk: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.starts_with("ZGW_RESULT"))
        .ok_or_else(|| {
            format!(
                "wrk printed no result: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let kv: BTreeMap<&str, u64> = line
        .split_whitespace()
        .filter_map(|p| p.split_once('='))
        .filter_map(|(k, v)| v.parse().ok().map(|v| (k, v)))
        .collect();
    let g = |k: &str| kv.get(k).copied().unwrap_or(0);
    Ok((
        WrkResult {
            requests: g("requests"),
            secs: g("duration_us") as f64 / 1e6,
            errors: g("status") + g("connect") + g("read") + g("write") + g("timeout"),
            p50_us: g("p50"),
            p99_us: g("p99"),
            p999_us: g("p999"),
            ..WrkResult::default()
        },
        text,
    ))
}

fn closed_loop(
    env: &Env,
    t: Target,
    script: &Path,
    o: &Opts,
    secs: u64,
    conns: u32,
) -> R<WrkResult> {
    let addr = env.addr(t).ok_or("target not running")?;
    let tck = clk_tck();
    let proxy = env.proxy_pids(t);
    let up = [env.sim.pid()];
    let (p0, u0) = (family_ticks(&proxy), family_ticks(&up));
    let (mut r, _) = run_wrk(addr, script, o.threads, conns, secs)?;
    let (p1, u1) = (family_ticks(&proxy), family_ticks(&up));
    r.proxy_cpu_s = (p1.0.saturating_sub(p0.0)) as f64 / tck;
    r.upstream_cpu_s = (u1.0.saturating_sub(u0.0)) as f64 / tck;
    Ok(r)
}

// ---------------------------------------------------------------- fixed rate (own client)

#[derive(Debug, Clone, Default)]
struct FixedResult {
    sent: u64,
    ok: u64,
    errors: u64,
    secs: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
}

/// One request of an open-loop run: when it was due (ns after the run's
/// `t0`), how long it took from then (ns) and its status (0: transport
/// error, timeout, or dropped at the drain deadline).
#[derive(Debug, Clone, Copy)]
struct Sample {
    at_ns: u64,
    lat_ns: u64,
    status: u16,
}

impl Sample {
    fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// A request spec: (method, path, body).
type Spec = (Method, String, Option<&'static str>);

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

/// Sorted latencies (ns) of the successful samples.
fn ok_latencies<'a>(samples: impl Iterator<Item = &'a Sample>) -> Vec<u64> {
    let mut lat: Vec<u64> = samples.filter(|s| s.ok()).map(|s| s.lat_ns).collect();
    lat.sort_unstable();
    lat
}

/// Open loop: a pacer thread releases request k at `start + k/rate`; idle
/// connections take them in order. Latency runs from the *intended* send
/// time to the last body byte, so queueing behind a slow response counts
/// (no coordinated omission). Returns the summary, every request's sample
/// and the `Instant` the samples' times count from.
async fn fixed_rate(
    addr: SocketAddr,
    jwt: &str,
    rate: u64,
    dur: Duration,
    conns: usize,
    mix: fn(usize) -> Vec<Spec>,
) -> R<(FixedResult, Vec<Sample>, Instant)> {
    let total = (u128::from(rate) * dur.as_millis() / 1000).max(1) as u64;
    let mut senders = Vec::with_capacity(conns);
    for _ in 0..conns {
        senders.push(connect(addr).await?);
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let t0 = Instant::now();
    // Requests still queued this long after the run's end are counted as
    // failed, not sent: an overloaded target cannot stretch the run.
    let drain_deadline = t0 + dur + Duration::from_secs(5);
    let mut workers = Vec::with_capacity(conns);
    for (w, mut sender) in senders.into_iter().enumerate() {
        let rx = rx.clone();
        let specs: Vec<Request<Full<Bytes>>> = mix(w)
            .iter()
            .map(|s| request(addr, jwt, s))
            .collect::<R<_>>()?;
        workers.push(tokio::spawn(async move {
            let mut out: Vec<Sample> = Vec::with_capacity((total as usize / conns) * 2 + 16);
            let mut n = 0usize;
            loop {
                let next = { rx.lock().await.recv().await };
                let Some(intended) = next else { break };
                let at_ns = intended.saturating_duration_since(t0).as_nanos() as u64;
                if Instant::now() > drain_deadline {
                    out.push(Sample {
                        at_ns,
                        lat_ns: 0,
                        status: 0,
                    });
                    continue;
                }
                let spec = &specs[n % specs.len()];
                n += 1;
                let mut req = Request::new(spec.body().clone());
                *req.method_mut() = spec.method().clone();
                *req.uri_mut() = spec.uri().clone();
                *req.headers_mut() = spec.headers().clone();
                let res =
                    tokio::time::timeout(Duration::from_secs(5), send(&mut sender, req)).await;
                let lat_ns = intended.elapsed().as_nanos() as u64;
                match res {
                    Ok(Ok((status, _))) => out.push(Sample {
                        at_ns,
                        lat_ns,
                        status: status.as_u16(),
                    }),
                    _ => {
                        out.push(Sample {
                            at_ns,
                            lat_ns,
                            status: 0,
                        });
                        match connect(addr).await {
                            Ok(s) => sender = s,
                            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                        }
                    }
                }
            }
            out
        }));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let stop_pacer = stop.clone();
    let pacer = std::thread::spawn(move || {
        let start = Instant::now() + Duration::from_millis(5);
        let at = |k: u64| start + Duration::from_nanos(k.saturating_mul(1_000_000_000) / rate);
        let hard_stop = start + dur + Duration::from_secs(5);
        let mut k = 0u64;
        while k < total && !stop_pacer.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now > hard_stop {
                break;
            }
            let due = at(k);
            if due > now {
                std::thread::sleep(due - now);
                continue;
            }
            while k < total && at(k) <= now {
                if tx.send(at(k)).is_err() {
                    return k;
                }
                k += 1;
            }
        }
        k
    });
    let mut samples = Vec::with_capacity(total as usize);
    // Workers end by drain_deadline + one request timeout.
    let overall = dur + Duration::from_secs(20);
    for w in workers {
        match tokio::time::timeout(overall.saturating_sub(t0.elapsed()), w).await {
            Ok(Ok(s)) => samples.extend(s),
            _ => stop.store(true, Ordering::Relaxed),
        }
    }
    let sent = pacer.join().map_err(|_| "pacer thread panicked")?;
    let secs_taken = t0.elapsed().as_secs_f64();
    let lat = ok_latencies(samples.iter());
    // Whatever did not complete with a 2xx (errors, timeouts, lost workers) failed.
    let errors = sent.saturating_sub(lat.len() as u64);
    samples.sort_unstable_by_key(|s| s.at_ns);
    Ok((
        FixedResult {
            sent,
            ok: lat.len() as u64,
            errors,
            secs: secs_taken,
            p50_us: percentile(&lat, 50.0),
            p99_us: percentile(&lat, 99.0),
            p999_us: percentile(&lat, 99.9),
            max_us: lat.last().map_or(0.0, |&v| v as f64 / 1000.0),
        },
        samples,
        t0,
    ))
}

// ---------------------------------------------------------------- main

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!(
            "load: not invoked with --bench (cargo test mode); the end-to-end load bench runs only under `cargo bench --bench load`"
        );
        return;
    }
    let opts = match parse_opts(&args) {
        Ok(o) => o,
        Err(msg) => {
            eprintln!("{msg}");
            std::process::exit(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("load: cannot start a runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(opts)) {
        eprintln!("load: {e}");
        std::process::exit(1);
    }
}

async fn run(o: Opts) -> R<()> {
    let started = Instant::now();
    let nproc = std::thread::available_parallelism().map_or(2, |n| n.get());
    let workers = o.workers.unwrap_or(nproc);
    let has_wrk = ensure_tool("wrk", &["wrk"]);
    if !has_wrk && !o.targets.is_empty() {
        return Err("wrk is required for the closed-loop runs".into());
    }
    let want_nginx = o.targets.contains(&Target::Nginx);
    let has_nginx = want_nginx && ensure_tool("nginx", &["nginx-light", "nginx"]);
    let dir = tempfile::Builder::new()
        .prefix("zgw-load-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let d = dir.path().to_path_buf();

    // The upstream: the simulator in fixed-answer mode, as its own process.
    let sim_addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let sim = Proc::spawn(
        "simulator",
        Command::new(GATEWAY_BIN).args([
            "simulate",
            "--fixed-answer",
            "--listen",
            &sim_addr.to_string(),
        ]),
        &d.join("sim.log"),
        false,
    )?;
    wait_port(sim_addr, Duration::from_secs(10))?;

    let jwt = mint_jwt()?;
    let mut env = Env {
        sim,
        sim_addr,
        nginx: None,
        gateway: None,
        jwt,
        otlp: None,
        dir,
    };

    if has_nginx {
        let port = free_port()?;
        for sub in ["body", "proxy", "fastcgi", "uwsgi", "scgi", "logs"] {
            std::fs::create_dir_all(d.join(sub)).map_err(|e| e.to_string())?;
        }
        let conf = d.join("nginx.conf");
        std::fs::write(&conf, nginx_conf(&d, port, sim_addr, workers, o.access_log))
            .map_err(|e| e.to_string())?;
        let p = Proc::spawn(
            "nginx",
            Command::new("nginx")
                .arg("-p")
                .arg(&d)
                .arg("-c")
                .arg(&conf)
                .args(["-g", "daemon off;"]),
            &d.join("nginx.log"),
            false,
        )?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        wait_port(addr, Duration::from_secs(10))?;
        env.nginx = Some((p, addr));
    }

    // The gateway: its own process, config generated here.
    let otlp = start_otlp().await?;
    let (gw_port, admin_port) = (free_port()?, free_port()?);
    let yaml = gateway_yaml(
        gw_port,
        admin_port,
        sim_addr,
        o.otlp.then_some(otlp.addr),
        &o,
        workers,
        None,
    );
    let gw_conf = d.join("gateway.yaml");
    std::fs::write(&gw_conf, &yaml).map_err(|e| e.to_string())?;
    env.otlp = Some(otlp);
    let gw = spawn_gateway(
        "zuora-gateway",
        &gw_conf,
        &d.join("gateway.log"),
        admin_port,
        &o,
    )
    .await?;
    let gw_addr: SocketAddr = ([127, 0, 0, 1], gw_port).into();
    let admin_addr: SocketAddr = ([127, 0, 0, 1], admin_port).into();
    env.gateway = Some((gw, gw_addr, admin_addr));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let gw_pid = env.proxy_pids(Target::Gateway);
    let idle_rss = family_kib(&gw_pid, "VmRSS:");
    let idle_anon = family_kib(&gw_pid, "RssAnon:");

    let script = d.join("mix.lua");
    std::fs::write(&script, wrk_lua(&env.jwt)).map_err(|e| e.to_string())?;

    for &t in &o.targets {
        if let Some(addr) = env.addr(t) {
            check_target(t, addr, &env.jwt).await?;
        }
    }
    let targets: Vec<Target> = o
        .targets
        .iter()
        .copied()
        .filter(|&t| env.addr(t).is_some())
        .collect();

    let mut report = String::new();
    let _ = writeln!(report, "\n## zuora-gateway load bench\n");
    let _ = writeln!(
        report,
        "nproc {nproc}; gateway: worker_threads {workers} ({}); nginx: worker_processes {workers}; simulator: {nproc} tokio workers; load generator: wrk -t{} on the same cores",
        if o.work_stealing && workers > 1 {
            "work_stealing: one multi-thread runtime"
        } else {
            "one current-thread runtime per thread"
        },
        o.threads
    );
    let _ = writeln!(
        report,
        "gateway callers: {}; tracing: {}; access logs (nginx and gateway): {}",
        if o.trusted_identity {
            "trusted_identity (sidecar mode)"
        } else {
            "JWT HS256 (same token every request: cache hits)"
        },
        match (o.otlp, o.sampling) {
            (false, _) => "no OTLP endpoint (spans not exported)".to_owned(),
            (true, None) =>
                "OTLP/HTTP to a dummy collector in the bench process, default sampling_ratio (0.1; failures always exported)"
                    .to_owned(),
            (true, Some(r)) =>
                format!("OTLP/HTTP to a dummy collector in the bench process, sampling_ratio {r}"),
        },
        if o.access_log {
            "on, to /dev/null"
        } else {
            "off"
        }
    );
    if let Some(n) = o.debug_requests {
        let _ = writeln!(report, "gateway telemetry.debug_requests: {n}");
    }
    let _ = writeln!(report, "loadavg at start: {}", loadavg());

    // 1. Closed loop, interleaved rounds, best round per target.
    let mut best: BTreeMap<Target, WrkResult> = BTreeMap::new();
    let mut all: BTreeMap<Target, Vec<f64>> = BTreeMap::new();
    for round in 0..o.rounds {
        for &t in &targets {
            let tb = tokio::task::block_in_place(|| -> R<WrkResult> {
                let _ = run_wrk(
                    env.addr(t).ok_or("down")?,
                    &script,
                    o.threads,
                    o.conns,
                    o.warmup_secs,
                )?;
                closed_loop(&env, t, &script, &o, o.secs, o.conns)
            })?;
            eprintln!(
                "round {} {:<8} {:>9.0} req/s  p99 {:>6} µs  errors {}",
                round + 1,
                t.name(),
                tb.rps(),
                tb.p99_us,
                tb.errors
            );
            all.entry(t).or_default().push(tb.rps());
            if best.get(&t).is_none_or(|b| tb.rps() > b.rps()) {
                best.insert(t, tb);
            }
        }
    }

    if !best.is_empty() {
        let _ = writeln!(
            report,
            "\n### Closed loop: wrk -t{} -c{} -d{}s, {} interleaved round(s), best shown\n",
            o.threads, o.conns, o.secs, o.rounds
        );
        let _ = writeln!(
            report,
            "| target | req/s | rounds req/s | p50 | p99 | p99.9 | proxy peak RSS | proxy CPU/req | upstream CPU/req | errors |"
        );
        let _ = writeln!(report, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|");
        for (t, r) in &best {
            let pids = env.proxy_pids(*t);
            let hwm = family_kib(&pids, "VmHWM:");
            let rounds = all
                .get(t)
                .map(|v| {
                    v.iter()
                        .map(|x| format!("{x:.0}"))
                        .collect::<Vec<_>>()
                        .join(" / ")
                })
                .unwrap_or_default();
            let _ = writeln!(
                report,
                "| {} | {:.0} | {} | {} µs | {} µs | {} µs | {} | {} | {:.1} µs | {} |",
                t.name(),
                r.rps(),
                rounds,
                r.p50_us,
                r.p99_us,
                r.p999_us,
                if pids.is_empty() {
                    "–".to_owned()
                } else {
                    format!("{:.1} MiB", mib(hwm))
                },
                if pids.is_empty() {
                    "–".to_owned()
                } else {
                    format!("{:.1} µs", r.proxy_cpu_s * 1e6 / r.requests.max(1) as f64)
                },
                r.upstream_cpu_s * 1e6 / r.requests.max(1) as f64,
                r.errors
            );
        }
        if best
            .get(&Target::Nginx)
            .is_some_and(|r| r.proxy_cpu_s > 0.0)
        {
            let _ = writeln!(
                report,
                "\n(nginx RSS is the sum over master + {workers} workers; shared pages are counted once per process.)"
            );
        }
        let ratio = |a: Target, b: Target| -> Option<f64> {
            Some(best.get(&a)?.rps() / best.get(&b)?.rps().max(1e-9))
        };
        if let Some(r) = ratio(Target::Gateway, Target::Nginx) {
            let _ = writeln!(
                report,
                "\n**throughput gateway/nginx = {r:.2}×** (target ≥ 1.0×: {})",
                verdict(r >= 1.0)
            );
        }
        if let Some(r) = ratio(Target::Gateway, Target::Direct) {
            let _ = writeln!(report, "throughput gateway/direct = {r:.2}×");
        }
        if let Some(r) = ratio(Target::Nginx, Target::Direct) {
            let _ = writeln!(report, "throughput nginx/direct = {r:.2}×");
        }
        if let (Some(g), Some(n)) = (best.get(&Target::Gateway), best.get(&Target::Nginx))
            && n.proxy_cpu_s > 0.0
        {
            let gc = g.proxy_cpu_s / g.requests.max(1) as f64;
            let nc = n.proxy_cpu_s / n.requests.max(1) as f64;
            let _ = writeln!(report, "CPU per request gateway/nginx = {:.2}×", gc / nc);
        }
        let errs: u64 = best.values().map(|r| r.errors).sum();
        if errs > 0 {
            let _ = writeln!(
                report,
                "\n**WARNING: {errs} non-2xx or socket errors: ratios are not comparable.**"
            );
        }
    }

    // 2. Fixed rate at ~25% of direct saturation, in interleaved rounds. When
    // that rate is over half the gateway's closed-loop maximum (it queues, or
    // cannot keep up at all), also at min(25% of direct, 50% of the gateway's
    // maximum), a rate it sustains, so its latency overhead is seen.
    let mut rates: Vec<(u64, String)> = Vec::new();
    if let Some(r) = o.fixed_rate {
        rates.push((r, "as given".to_owned()));
    } else if let Some(d) = best.get(&Target::Direct) {
        let r = ((d.rps() * 0.25) as u64).max(100);
        rates.push((r, "25% of direct saturation".to_owned()));
        // The gateway's maximum; without a gateway run, the slowest proxy's.
        let (who, max) = match best.get(&Target::Gateway) {
            Some(g) => ("the gateway", g.rps()),
            None => (
                "the slowest proxy",
                best.iter()
                    .filter(|(t, _)| **t != Target::Direct)
                    .map(|(_, b)| b.rps())
                    .fold(f64::INFINITY, f64::min),
            ),
        };
        if max.is_finite() && (r as f64) > max * 0.5 {
            let _ = writeln!(
                report,
                "\nFixed rate: 25% of direct saturation is {r} req/s, {} {who}'s closed-loop maximum ({max:.0} req/s), so there it {}. \
                 The fixed-rate runs are therefore also done at min(25% of direct, 50% of {who}'s maximum) = {} req/s, a rate it sustains.",
                if (r as f64) > max {
                    "above"
                } else {
                    "over half of"
                },
                if (r as f64) > max * 0.9 {
                    "cannot keep up and requests queue for seconds (the p99 comparison at that rate is void; 1 round only)"
                } else {
                    "queues"
                },
                ((max * 0.5) as u64).max(100),
            );
            rates.push((
                ((max * 0.5) as u64).max(100),
                format!("50% of {who}'s closed-loop maximum"),
            ));
        }
    }
    for (rate, why) in &rates {
        fixed_rate_section(&mut report, &env, &targets, &o, *rate, why, &best).await?;
    }

    // 3. Token refresh under load: its own simulator (short-lived tokens) and gateway.
    if o.refresh && targets.contains(&Target::Gateway) {
        let rate = o.refresh_rate.unwrap_or_else(|| {
            best.get(&Target::Gateway)
                .map_or(2000, |g| ((g.rps() * 0.25) as u64).max(100))
        });
        // A failure here is reported, and the memory phase still runs.
        if let Err(e) = refresh_phase(&mut report, &env, &o, workers, rate).await {
            eprintln!("token refresh phase failed: {e}");
            let _ = writeln!(
                report,
                "\n### Token refresh under load\n\n**the phase failed: {e}**"
            );
        }
    }

    // 4. Memory: idle, then ~1M requests over 1,000 keep-alive connections.
    let _ = writeln!(report, "\n### Gateway memory\n");
    let _ = writeln!(
        report,
        "idle RSS after start (before any request): **{:.1} MiB** (target ≤ 10 MiB: {}), of which anonymous {:.1} MiB (the rest is the binary's and libc's file-backed pages)",
        mib(idle_rss),
        verdict(mib(idle_rss) <= 10.0),
        mib(idle_anon)
    );
    if o.soak && has_wrk {
        let soak = tokio::task::block_in_place(|| soak(&env, &script, &o))?;
        let _ = writeln!(
            report,
            "after {} requests over {} keep-alive connections ({} phase(s), {:.0} req/s, {} errors): \
             RSS while loaded (max of 0.5 s samples) **{:.1} MiB** (target ≤ 30 MiB: {}), \
             RSS 3 s after the connections closed {:.1} MiB (anonymous {:.1} MiB), VmHWM {:.1} MiB",
            soak.requests,
            o.soak_conns,
            soak.phases,
            soak.rps,
            soak.errors,
            mib(soak.max_rss),
            verdict(mib(soak.max_rss) <= 30.0),
            mib(soak.after_rss),
            mib(soak.after_anon),
            mib(soak.hwm),
        );
        let i = &soak.idle;
        let _ = writeln!(
            report,
            "\nRSS with {} keep-alive connections open and idle {} s after one request each \
             (opened after the load, before the close above; {} failed to open, {} non-2xx): \
             **{:.1} MiB** (anonymous {:.1} MiB) (open-idle target ≤ 30 MiB: {}); \
             second request on each: {} ok, {} non-2xx, {} failed (connection closed or no answer)",
            i.opened,
            IDLE_OPEN_WAIT.as_secs(),
            i.connect_failed,
            i.first_non_2xx,
            mib(i.rss),
            mib(i.anon),
            // Void unless every connection was open.
            verdict(i.opened == u64::from(o.soak_conns) && mib(i.rss) <= 30.0),
            i.second_ok,
            i.second_non_2xx,
            i.second_closed,
        );
    }
    if let Some(otlp) = &env.otlp {
        let _ = writeln!(
            report,
            "\ntracing: OTLP/HTTP exports received by the bench's dummy collector: {}",
            otlp.exports.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        report,
        "loadavg at end: {}; wall time {:.0} s",
        loadavg(),
        started.elapsed().as_secs_f64()
    );
    println!("{report}");
    let _ = std::fs::write(
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("load-report.md"),
        &report,
    );
    drop(env);
    Ok(())
}

/// Median of `v` (mean of the middle two for an even count); 0 when empty.
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// "median [min … max]" of `v`, in µs.
fn spread(v: &[f64]) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if v.is_empty() {
        "–".to_owned()
    } else {
        format!("{:.0} µs [{min:.0} … {max:.0}]", median(v))
    }
}

/// Fixed-rate runs of every target at `rate` in interleaved rounds (direct,
/// nginx, gateway, direct, …), so all targets see the same noise; appended to
/// `report` as per-target medians and the per-round paired differences.
async fn fixed_rate_section(
    report: &mut String,
    env: &Env,
    targets: &[Target],
    o: &Opts,
    rate: u64,
    why: &str,
    best: &BTreeMap<Target, WrkResult>,
) -> R<()> {
    let overloaded = |t: Target| best.get(&t).is_some_and(|b| rate as f64 > b.rps() * 0.9);
    // A target that cannot keep up queues for seconds each round: one round shows that.
    let rounds = if targets.iter().any(|&t| overloaded(t)) {
        1
    } else {
        o.fixed_rounds
    };
    let round = Duration::from_millis((o.fixed_secs * 1000 / u64::from(o.fixed_rounds)).max(1000));
    let _ = writeln!(
        report,
        "\n### Fixed rate: {rate} req/s ({why}), {rounds} interleaved round(s) of {:.1} s per target over {} keep-alive connections (open loop, latency from the intended send time)\n",
        round.as_secs_f64(),
        o.fixed_conns
    );
    let mut runs: BTreeMap<Target, Vec<FixedResult>> = BTreeMap::new();
    for n in 0..rounds {
        for &t in targets {
            let addr = env.addr(t).ok_or("down")?;
            let (r, _, _) = fixed_rate(addr, &env.jwt, rate, round, o.fixed_conns, mix).await?;
            eprintln!(
                "fixed {rate}/s round {} {:<8} {} sent, p50 {:.0} µs p99 {:.0} µs p99.9 {:.0} µs errors {}",
                n + 1,
                t.name(),
                r.sent,
                r.p50_us,
                r.p99_us,
                r.p999_us,
                r.errors
            );
            runs.entry(t).or_default().push(r);
        }
    }
    let _ = writeln!(
        report,
        "| target | achieved req/s (median) | p50 (median) | p99: median [min … max] of rounds | p99.9 (median) | max | failed |"
    );
    let _ = writeln!(report, "|---|---:|---:|---:|---:|---:|---:|");
    let col =
        |rs: &[FixedResult], f: fn(&FixedResult) -> f64| -> Vec<f64> { rs.iter().map(f).collect() };
    for (t, rs) in &runs {
        let _ = writeln!(
            report,
            "| {}{} | {:.0} | {:.0} µs | {} | {:.0} µs | {:.0} µs | {} |",
            t.name(),
            if overloaded(*t) {
                " (rate ≥ 90% of its max: queueing)"
            } else {
                ""
            },
            median(&col(rs, |r| r.ok as f64 / r.secs.max(1e-9))),
            median(&col(rs, |r| r.p50_us)),
            spread(&col(rs, |r| r.p99_us)),
            median(&col(rs, |r| r.p999_us)),
            rs.iter().map(|r| r.max_us).fold(0.0, f64::max),
            rs.iter().map(|r| r.errors).sum::<u64>()
        );
    }
    let clean = |r: &FixedResult| r.errors * 1000 <= r.sent.max(1);
    // Paired per round: a − b in the same round, rounds where both ran clean.
    let paired = |a: Target, b: Target, f: fn(&FixedResult) -> f64| -> Option<(Vec<f64>, usize)> {
        let (ra, rb) = (runs.get(&a)?, runs.get(&b)?);
        let all = ra.len().min(rb.len());
        let d = ra
            .iter()
            .zip(rb)
            .filter(|(x, y)| clean(x) && clean(y))
            .map(|(x, y)| f(x) - f(y))
            .collect();
        Some((d, all))
    };
    let p99 = |r: &FixedResult| r.p99_us;
    let p50 = |r: &FixedResult| r.p50_us;
    if let Some((d, all)) = paired(Target::Gateway, Target::Direct, p99) {
        let of_medians = runs
            .get(&Target::Gateway)
            .zip(runs.get(&Target::Direct))
            .map_or(0.0, |(g, dr)| median(&col(g, p99)) - median(&col(dr, p99)));
        let (p50d, _) = paired(Target::Gateway, Target::Direct, p50).unwrap_or_default();
        let _ = writeln!(
            report,
            "\n**p99 gateway − direct, paired per round: {}** over {} of {all} clean round(s) (target ≤ 250 µs, on the median: {}); \
             median gateway p99 − median direct p99 = {of_medians:.0} µs; p50 gateway − direct, paired: {}",
            spread(&d),
            d.len(),
            if overloaded(Target::Gateway) {
                "NOT met: the gateway cannot sustain this rate (over 90% of its closed-loop maximum)"
            } else if d.is_empty() {
                "not comparable: over 0.1% of requests failed in every round"
            } else if d.len() < 3 {
                if median(&d) <= 250.0 {
                    "met, but on fewer than 3 rounds"
                } else {
                    "NOT met, on fewer than 3 rounds"
                }
            } else {
                verdict(median(&d) <= 250.0)
            },
            spread(&p50d),
        );
    }
    if let Some((d, _)) = paired(Target::Gateway, Target::Nginx, p99) {
        let (p50d, _) = paired(Target::Gateway, Target::Nginx, p50).unwrap_or_default();
        let (nd, _) = paired(Target::Nginx, Target::Direct, p99).unwrap_or_default();
        let _ = writeln!(
            report,
            "paired per round: p99 gateway − nginx {}; p50 gateway − nginx {}; p99 nginx − direct {}",
            spread(&d),
            spread(&p50d),
            spread(&nd)
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- token refresh under load

/// Token lifetime of the refresh phase's simulator, and the gateway's
/// `refresh_before_expiry`: a background refresh every ~2 s.
const REFRESH_TOKEN_TTL: &str = "4s";
const REFRESH_BEFORE: &str = "2s";
/// Requests sent within this of a refresh count as "near" it.
const REFRESH_WINDOW: Duration = Duration::from_millis(100);
/// How often the phase scrapes the gateway's `/metrics`.
const SCRAPE_EVERY: Duration = Duration::from_millis(20);

/// The refresh phase's mix, all answered 200 by the full simulator (which,
/// unlike the fixed-answer one, checks every token): per 4 requests a stop of
/// a job of this stream (created on the fly), two reads of it, one list.
fn refresh_mix(stream: usize) -> Vec<Spec> {
    (0..MIX_LEN)
        .map(|i| {
            let job = format!("ff8080818bb300af{:04x}{:012x}", stream % 0x1_0000, i / 4);
            match i % 4 {
                0 => (Method::PUT, format!("{JOBS}/{job}"), Some(STOP_BODY)),
                3 => (Method::GET, format!("{JOBS}?pageSize=1&page=1"), None),
                _ => (Method::GET, format!("{JOBS}/{job}"), None),
            }
        })
        .collect()
}

/// The token counters of the gateway's `/metrics`, at one instant.
#[derive(Debug, Clone, Copy, Default)]
struct TokenCounters {
    fetch_ok: u64,
    fetch_failed: u64,
    recoveries: u64,
}

/// One blocking scrape of `/metrics` (HTTP/1.1, `Connection: close`).
fn scrape(admin: SocketAddr) -> Option<TokenCounters> {
    use std::io::{Read, Write};
    let mut s = StdStream::connect_timeout(&admin, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let mut c = TokenCounters::default();
    for line in text.lines() {
        let value = || {
            line.rsplit_once(' ')
                .and_then(|(_, v)| v.trim().parse::<f64>().ok())
                .map_or(0, |v| v as u64)
        };
        if line.starts_with("zuora_token_fetches_total{") {
            if line.contains("outcome=\"success\"") {
                c.fetch_ok += value();
            } else {
                c.fetch_failed += value();
            }
        } else if line.starts_with("zuora_token_401_recoveries_total{") {
            c.recoveries += value();
        }
    }
    Some(c)
}

/// Scrapes every [`SCRAPE_EVERY`] on its own thread until `stop`.
fn start_scraper(
    admin: SocketAddr,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<(Instant, TokenCounters)>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let before = Instant::now();
            if let Some(c) = scrape(admin) {
                // Counted when the scrape was answered; the scrape is short.
                out.push((before, c));
            }
            std::thread::sleep(SCRAPE_EVERY.saturating_sub(before.elapsed()));
        }
        out
    })
}

/// Token refresh during load: a second simulator that issues 4 s tokens and
/// checks every token (so a request sent with an expired one would be a 401),
/// a second gateway refreshing 2 s before expiry, and a fixed-rate run against
/// it while `/metrics` is scraped every 20 ms to find the refresh instants.
async fn refresh_phase(
    report: &mut String,
    env: &Env,
    o: &Opts,
    workers: usize,
    rate: u64,
) -> R<()> {
    let d = env.dir.path();
    let sim_addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let _sim = Proc::spawn(
        "refresh simulator",
        Command::new(GATEWAY_BIN).args([
            "simulate",
            "--listen",
            &sim_addr.to_string(),
            "--token-ttl",
            REFRESH_TOKEN_TTL,
        ]),
        &d.join("sim-refresh.log"),
        false,
    )?;
    wait_port(sim_addr, Duration::from_secs(10))?;
    let (port, admin_port) = (free_port()?, free_port()?);
    let yaml = gateway_yaml(
        port,
        admin_port,
        sim_addr,
        if o.otlp {
            env.otlp.as_ref().map(|x| x.addr)
        } else {
            None
        },
        o,
        workers,
        Some(REFRESH_BEFORE),
    );
    let conf = d.join("gateway-refresh.yaml");
    std::fs::write(&conf, &yaml).map_err(|e| e.to_string())?;
    let _gw = spawn_gateway(
        "zuora-gateway (refresh)",
        &conf,
        &d.join("gateway-refresh.log"),
        admin_port,
        o,
    )
    .await?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let admin: SocketAddr = ([127, 0, 0, 1], admin_port).into();
    // Every request kind once (also creates stream 0xffff's jobs).
    {
        let mut s = connect(addr).await?;
        for spec in refresh_mix(0xffff).iter().take(8) {
            let (status, body) = send(&mut s, request(addr, &env.jwt, spec)?).await?;
            if status != StatusCode::OK {
                return Err(format!(
                    "refresh phase: {} {} answered {status}: {}",
                    spec.0,
                    spec.1,
                    String::from_utf8_lossy(&body)
                ));
            }
        }
    }

    let dur = Duration::from_secs(o.refresh_secs);
    let stop = Arc::new(AtomicBool::new(false));
    let scraper = start_scraper(admin, stop.clone());
    let run = fixed_rate(addr, &env.jwt, rate, dur, o.fixed_conns, refresh_mix).await;
    stop.store(true, Ordering::Relaxed);
    let scrapes =
        tokio::task::block_in_place(|| scraper.join()).map_err(|_| "scraper thread panicked")?;
    let (r, samples, t0) = run?;

    // Refresh instants: a scrape that counts one more successful fetch than the
    // previous one; the fetch finished between the two, so take the midpoint.
    let mut refreshes: Vec<i128> = Vec::new(); // ns after t0
    let mut failed_fetches = 0;
    for w in scrapes.windows(2) {
        let ((ta, a), (tb, b)) = (w[0], w[1]);
        failed_fetches += b.fetch_failed.saturating_sub(a.fetch_failed);
        if b.fetch_ok > a.fetch_ok {
            let mid = ta + (tb - ta) / 2;
            let ns = if mid >= t0 {
                (mid - t0).as_nanos() as i128
            } else {
                -((t0 - mid).as_nanos() as i128)
            };
            refreshes.push(ns);
        }
    }
    let recoveries = match (scrapes.first(), scrapes.last()) {
        (Some(a), Some(b)) => b.1.recoveries.saturating_sub(a.1.recoveries),
        _ => 0,
    };
    let span_ns = samples.last().map_or(0, |s| s.at_ns) as i128;
    refreshes.retain(|&t| t >= 0 && t <= span_ns);
    let win = REFRESH_WINDOW.as_nanos() as i128;
    let near = |s: &Sample| {
        refreshes
            .iter()
            .any(|&t| (s.at_ns as i128 - t).abs() <= win)
    };
    // Control windows of the same width midway between refreshes: the noise floor.
    let mids: Vec<i128> = refreshes.windows(2).map(|w| (w[0] + w[1]) / 2).collect();
    let control = |s: &Sample| mids.iter().any(|&t| (s.at_ns as i128 - t).abs() <= win);
    let near_lat = ok_latencies(samples.iter().filter(|s| near(s)));
    let rest_lat = ok_latencies(samples.iter().filter(|s| !near(s)));
    let control_lat = ok_latencies(samples.iter().filter(|s| control(s)));
    let non_2xx = samples.iter().filter(|s| !s.ok()).count() as u64
        + r.sent.saturating_sub(samples.len() as u64);
    let non_2xx_near = samples.iter().filter(|s| !s.ok() && near(s)).count();
    let (p99_near, p99_rest, p99_control) = (
        percentile(&near_lat, 99.0),
        percentile(&rest_lat, 99.0),
        percentile(&control_lat, 99.0),
    );
    eprintln!(
        "refreshes at (s after the run's start): {}",
        refreshes
            .iter()
            .map(|&t| format!("{:.2}", t as f64 / 1e9))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let step = p99_near - p99_rest;
    let step_control = p99_near - p99_control;
    let every = match (refreshes.first(), refreshes.last()) {
        (Some(a), Some(b)) if refreshes.len() > 1 => {
            (b - a) as f64 / 1e9 / (refreshes.len() - 1) as f64
        }
        _ => 0.0,
    };
    eprintln!(
        "refresh {rate}/s: {} sent, {} refreshes, non-2xx {non_2xx}, p99 near {p99_near:.0} µs rest {p99_rest:.0} µs control {p99_control:.0} µs",
        r.sent,
        refreshes.len()
    );

    let _ = writeln!(
        report,
        "\n### Token refresh under load: {rate} req/s for {} s against a second gateway (`refresh_before_expiry: {REFRESH_BEFORE}`) and a second, full simulator (`simulate --token-ttl {REFRESH_TOKEN_TTL}`: it checks every token, so a request forwarded with an expired one would be a 401)\n",
        o.refresh_secs
    );
    let _ = writeln!(
        report,
        "mix per 4 requests: 1 × `PUT …/jobs/{{id}}` stop, 2 × `GET …/jobs/{{id}}`, 1 × `GET …/jobs?pageSize=1&page=1`; refresh instants from the gateway's `zuora_token_fetches_total{{outcome=\"success\"}}`, scraped every {} ms (±{} ms); \"near\" = sent within ±{} ms of a refresh; \"control\" = windows of the same width midway between refreshes (the noise floor)\n",
        SCRAPE_EVERY.as_millis(),
        SCRAPE_EVERY.as_millis() / 2,
        REFRESH_WINDOW.as_millis()
    );
    let _ = writeln!(report, "| requests | count | p50 | p99 | max |");
    let _ = writeln!(report, "|---|---:|---:|---:|---:|");
    for (name, lat) in [
        ("near a refresh", &near_lat),
        ("control windows", &control_lat),
        ("rest (not near)", &rest_lat),
    ] {
        let _ = writeln!(
            report,
            "| {name} | {} | {:.0} µs | {:.0} µs | {:.0} µs |",
            lat.len(),
            percentile(lat, 50.0),
            percentile(lat, 99.0),
            lat.last().map_or(0.0, |&v| v as f64 / 1000.0)
        );
    }
    let _ = writeln!(
        report,
        "\nrefreshes observed during the run: {} (one every {every:.1} s; failed token fetches {failed_fetches}); 401s recovered by the gateway (it forwarded a token the simulator no longer accepted): {recoveries}; achieved {:.0} req/s",
        refreshes.len(),
        r.ok as f64 / r.secs.max(1e-9)
    );
    // A step is visible when requests near a refresh are slower, at p99, by
    // over 250 µs than both the rest and the equally small control sample.
    let met = non_2xx == 0 && (step <= 250.0 || step_control <= 250.0);
    let _ = writeln!(
        report,
        "**token refresh during load: {non_2xx} non-2xx ({non_2xx_near} near a refresh); p99 near a refresh − p99 of the rest = {step:.0} µs, − p99 of the control windows = {step_control:.0} µs** \
         (target: no non-2xx and no visible p99 step, i.e. near a refresh not over 250 µs slower than both: {})",
        if refreshes.len() < 3 {
            "not counted: fewer than 3 refreshes observed"
        } else if near_lat.len() < 100 {
            "not counted: fewer than 100 requests near a refresh"
        } else {
            verdict(met)
        }
    );
    Ok(())
}

struct Soak {
    requests: u64,
    errors: u64,
    phases: u32,
    rps: f64,
    max_rss: u64,
    after_rss: u64,
    after_anon: u64,
    hwm: u64,
    idle: IdleOpen,
}

/// The soak's open-idle step: `opened` keep-alive connections that each
/// answered one request, measured after idling, then asked once more.
struct IdleOpen {
    opened: u64,
    /// Connections that could not be opened or gave no answer to the first request.
    connect_failed: u64,
    /// First requests that were answered with a non-2xx status.
    first_non_2xx: u64,
    rss: u64,
    anon: u64,
    second_ok: u64,
    second_non_2xx: u64,
    /// Second requests that failed because the connection was closed, broke
    /// or did not answer within 10 s.
    second_closed: u64,
}

/// The memory soak on the gateway: wrk drives `o.soak_conns` keep-alive
/// connections for phases of `o.soak_phase_secs` until `o.soak_requests` are
/// done (at most `o.soak_phases`), sampling VmRSS every 0.5 s for the loaded
/// max. Then the literal target case (see [`idle_open`]): as many fresh
/// keep-alive connections each send one request and stay open and idle for
/// 5 s ([`IDLE_OPEN_WAIT`]) before RSS is sampled; a second request on each shows they still
/// work. Finally they close and, 3 s later, the "after close" RSS is sampled.
fn soak(env: &Env, script: &Path, o: &Opts) -> R<Soak> {
    let addr = env.addr(Target::Gateway).ok_or("gateway not running")?;
    let pids = env.proxy_pids(Target::Gateway);
    let sampling = Arc::new(AtomicBool::new(true));
    let max_rss = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (sampling, max_rss, pids) = (sampling.clone(), max_rss.clone(), pids.clone());
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                max_rss.fetch_max(family_kib(&pids, "VmRSS:"), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    let mut total = WrkResult::default();
    let mut phases = 0;
    while total.requests < o.soak_requests && phases < o.soak_phases {
        let (r, _) = run_wrk(addr, script, o.threads, o.soak_conns, o.soak_phase_secs)?;
        total.requests += r.requests;
        total.errors += r.errors;
        total.secs += r.secs;
        phases += 1;
        eprintln!(
            "soak phase {phases}: {} requests ({:.0} req/s), total {}",
            r.requests,
            r.rps(),
            total.requests
        );
    }
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.join();
    let idle = tokio::runtime::Handle::current().block_on(idle_open(
        addr,
        &env.jwt,
        o.soak_conns,
        &pids,
    ))?;
    eprintln!(
        "soak open-idle: {} connections, RSS {:.1} MiB (anonymous {:.1} MiB); second request: {} ok, {} non-2xx, {} closed/failed",
        idle.opened,
        mib(idle.rss),
        mib(idle.anon),
        idle.second_ok,
        idle.second_non_2xx,
        idle.second_closed
    );
    // The gateway's serving threads give their free memory back about 1–2 s
    // after they go idle (src/memory.rs); 3 s covers it.
    std::thread::sleep(Duration::from_secs(3));
    Ok(Soak {
        requests: total.requests,
        errors: total.errors,
        phases,
        rps: total.rps(),
        max_rss: max_rss.load(Ordering::Relaxed),
        after_rss: family_kib(&pids, "VmRSS:"),
        after_anon: family_kib(&pids, "RssAnon:"),
        hwm: family_kib(&pids, "VmHWM:"),
        idle,
    })
}

/// How long the open-idle connections wait before RSS is sampled.
const IDLE_OPEN_WAIT: Duration = Duration::from_secs(5);

/// Opens `conns` keep-alive connections to `addr` at once, sends one GET of
/// the mix on each (a stream per connection, distinct from wrk's) and reads
/// the answers; keeps them all open and idle for [`IDLE_OPEN_WAIT`], samples
/// the gateway's VmRSS and RssAnon (`pids`), then sends a second GET on
/// every connection. The connections close when this returns (their
/// senders drop).
async fn idle_open(addr: SocketAddr, jwt: &str, conns: u32, pids: &[u32]) -> R<IdleOpen> {
    const WITHIN: Duration = Duration::from_secs(10);
    let mut first = tokio::task::JoinSet::new();
    for c in 0..conns {
        // The connection's first two GETs: one now, one after the idle time.
        let mut gets = mix(0x8000 + c as usize)
            .into_iter()
            .filter(|s| s.0 == Method::GET);
        let (Some(now), Some(later)) = (gets.next(), gets.next()) else {
            return Err("the mix has fewer than two GETs".into());
        };
        let req = request(addr, jwt, &now)?;
        first.spawn(async move {
            let mut sender = tokio::time::timeout(WITHIN, connect(addr))
                .await
                .map_err(|_| "connect timed out".to_owned())??;
            let (status, _) = tokio::time::timeout(WITHIN, send(&mut sender, req))
                .await
                .map_err(|_| "no answer within 10 s".to_owned())??;
            Ok::<_, String>((sender, status, later))
        });
    }
    let mut open = Vec::with_capacity(conns as usize);
    let (mut connect_failed, mut first_non_2xx) = (0, 0);
    let mut first_error = None;
    while let Some(joined) = first.join_next().await {
        match joined.map_err(|e| e.to_string())? {
            Ok((sender, status, later)) => {
                if !status.is_success() {
                    first_non_2xx += 1;
                }
                open.push((sender, later));
            }
            Err(e) => {
                connect_failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        eprintln!("soak open-idle: {connect_failed} connection(s) failed; first error: {e}");
    }
    let opened = open.len() as u64;

    // All open, all idle: the gateway gives an idle connection's HTTP/1
    // state back after 1–2 s (two sweeps a second apart, src/server/idle.rs)
    // and its serving threads return the freed memory at their next quiet
    // tick (src/memory.rs), so by 3–4 s; 5 s covers it.
    tokio::time::sleep(IDLE_OPEN_WAIT).await;
    let rss = family_kib(pids, "VmRSS:");
    let anon = family_kib(pids, "RssAnon:");

    let mut second = tokio::task::JoinSet::new();
    for (mut sender, later) in open {
        let req = request(addr, jwt, &later)?;
        second.spawn(async move {
            match tokio::time::timeout(WITHIN, send(&mut sender, req)).await {
                Ok(Ok((status, _))) => Some(status),
                Ok(Err(_)) | Err(_) => None,
            }
            // `sender` drops here: the connection closes.
        });
    }
    let (mut second_ok, mut second_non_2xx, mut second_closed) = (0, 0, 0);
    while let Some(joined) = second.join_next().await {
        match joined.map_err(|e| e.to_string())? {
            Some(status) if status.is_success() => second_ok += 1,
            Some(_) => second_non_2xx += 1,
            None => second_closed += 1,
        }
    }
    Ok(IdleOpen {
        opened,
        connect_failed,
        first_non_2xx,
        rss,
        anon,
        second_ok,
        second_non_2xx,
        second_closed,
    })
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
