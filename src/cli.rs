//! The command line: `serve`, `check`, `explain`, `simulate`, `dev-token`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::{CallerAuthConfig, Config, JwtKeyMaterial, UpstreamTarget, Validation};

/// Exit code for configuration errors (EX_CONFIG).
pub const EXIT_CONFIG: u8 = 78;

/// zuora-gateway: an authenticating reverse proxy for the Zuora REST API.
#[derive(Debug, Parser)]
#[command(name = "zuora-gateway", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve {
        /// Configuration file.
        #[arg(long, short, default_value = "config/gateway.yaml")]
        config: PathBuf,
    },
    /// Validate a configuration file and print a summary.
    Check {
        /// Configuration file.
        #[arg(long, short, default_value = "config/gateway.yaml")]
        config: PathBuf,
    },
    /// Explain the decision a request would get: route, access, tenancy
    /// headers, validation and rate limits (no request is sent).
    Explain {
        /// Configuration file.
        #[arg(long, short, default_value = "config/gateway.yaml")]
        config: PathBuf,
        /// The caller identity (as authentication would establish it).
        #[arg(long)]
        caller: String,
        /// A claim of the caller's token, `name=value` (repeatable).
        #[arg(long = "claim")]
        claims: Vec<String>,
        /// HTTP method, e.g. `PUT`.
        method: String,
        /// Request path, e.g. `/v1/uno/data-backfill/propagation/jobs/<jobId>`.
        path: String,
    },
    /// Run the embedded Zuora simulator alone.
    Simulate {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: std::net::SocketAddr,
        /// Bench mode: every authenticated `/v1` request gets a fixed small 200
        /// (used by `cargo bench --bench load`).
        #[arg(long, hide = true)]
        fixed_answer: bool,
        /// Lifetime of issued tokens, e.g. `4s` (default: Zuora's 3599 s).
        /// At least one second (`expires_in` is announced in whole seconds).
        #[arg(long, value_parser = parse_token_ttl)]
        token_ttl: Option<Duration>,
    },
    /// Probe an admin endpoint (for container HEALTHCHECKs: no curl needed).
    Healthcheck {
        /// URL to GET; exit 0 on 200.
        #[arg(long, default_value = "http://127.0.0.1:9901/healthz")]
        url: http::Uri,
    },
    /// Mint a caller JWT with the config's HS* key (local development only).
    DevToken {
        /// Configuration file holding an HS256/384/512 key.
        #[arg(long, short, default_value = "config/local.yaml")]
        config: PathBuf,
        /// The caller identity (the `identity_claim`).
        #[arg(long)]
        caller: String,
        /// Lifetime, e.g. `1h`.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Extra claims, `name=value` (repeatable).
        #[arg(long = "claim")]
        claims: Vec<String>,
    },
}

/// `--token-ttl`: a duration like `4s` or `1h`, at least one second.
fn parse_token_ttl(s: &str) -> Result<Duration, String> {
    match crate::config::parse_duration(s) {
        Some(d) if d >= Duration::from_secs(1) => Ok(d),
        Some(_) => Err("must be at least 1s".to_owned()),
        None => Err("expected a duration like 4s or 1h".to_owned()),
    }
}

/// Loads a config or prints why not (naming file and key) and returns the exit code.
pub fn load_or_report(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// `check`: validate and summarise.
pub fn check(path: &std::path::Path) -> ExitCode {
    match load_or_report(path) {
        Ok(c) => {
            print!("{}", summary(&c));
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// A one-screen summary of a valid config (no secret values).
pub fn summary(c: &Config) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "{}: OK", c.source.display());
    let _ = writeln!(
        s,
        "  listen {}  admin {}  max_body_bytes {}",
        c.server.listen, c.server.admin_listen, c.server.max_body_bytes
    );
    for (name, u) in &c.upstreams {
        let target = match &u.target {
            UpstreamTarget::Url(uri) => uri.to_string(),
            UpstreamTarget::Simulator => "embedded simulator".to_owned(),
        };
        let _ = writeln!(
            s,
            "  upstream {name}: {target} (connect {:?}, request {:?}, gzip requests over {} B)",
            u.connect_timeout, u.request_timeout, u.compress_requests_over
        );
    }
    match &c.callers {
        CallerAuthConfig::TrustedIdentity(id) => {
            let _ = writeln!(s, "  callers: trusted identity `{id}` (sidecar mode)");
        }
        CallerAuthConfig::Jwt(j) => {
            let _ = writeln!(
                s,
                "  callers: JWT, {} static key(s){}, identity claim `{}`",
                j.keys.len(),
                j.jwks_url
                    .as_ref()
                    .map(|u| format!(", JWKS {u}"))
                    .unwrap_or_default(),
                j.identity_claim
            );
        }
    }
    let _ = writeln!(s, "  routes ({}):", c.routes.len());
    for r in &c.routes {
        let methods = r
            .methods
            .as_ref()
            .map(|m| m.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(","))
            .unwrap_or_else(|| "*".to_owned());
        let _ = writeln!(
            s,
            "    {:<28} {methods:<6} {} -> {}  allow [{}]{}{}",
            r.name,
            r.path,
            r.upstream,
            r.allow_callers.join(", "),
            if r.rate_limits.is_empty() {
                String::new()
            } else {
                format!("  limits [{}]", r.rate_limits.join(", "))
            },
            if r.validation == Validation::StopJob {
                "  validate stop_job"
            } else {
                ""
            },
        );
    }
    let _ = writeln!(s, "  tenancy rules: {}", c.tenancy.len());
    for (name, l) in &c.rate_limits {
        let _ = writeln!(
            s,
            "  rate limit {name}: {}/{:?} burst {} ({:?})",
            l.count, l.per, l.burst, l.store
        );
    }
    let _ = writeln!(
        s,
        "  telemetry: {}{}",
        c.telemetry.service_name,
        c.telemetry
            .otlp_endpoint
            .as_ref()
            .map(|u| format!(", OTLP {u}"))
            .unwrap_or_default()
    );
    s
}

/// `explain`: print the decision for `method path` from `caller`. Exit 0
/// whenever it could be evaluated (allowed or denied), 2 for bad arguments,
/// 78 for an invalid configuration.
pub fn explain(
    path: &std::path::Path,
    caller: &str,
    claims: &[String],
    method: &str,
    request_path: &str,
) -> ExitCode {
    let config = match load_or_report(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Ok(method) = http::Method::from_bytes(method.to_ascii_uppercase().as_bytes()) else {
        eprintln!("error: `{method}` is not an HTTP method");
        return ExitCode::from(2);
    };
    if !request_path.starts_with('/') {
        eprintln!("error: the path must start with `/`");
        return ExitCode::from(2);
    }
    let mut map = serde_json::Map::new();
    for c in claims {
        let Some((k, v)) = c.split_once('=') else {
            eprintln!("error: --claim `{c}`: expected name=value");
            return ExitCode::from(2);
        };
        map.insert(k.to_owned(), v.into());
    }
    let caller = crate::context::Caller::new(caller, map);
    let policy = crate::policy::Policy::compile(std::sync::Arc::new(config));
    print!(
        "{}",
        crate::policy::explain(&policy, &caller, &method, request_path)
    );
    ExitCode::SUCCESS
}

/// `dev-token`: mint a JWT with the config's HMAC key.
pub fn dev_token(path: &std::path::Path, caller: &str, ttl: &str, claims: &[String]) -> ExitCode {
    let config = match load_or_report(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(ttl) = crate::config::parse_duration(ttl) else {
        eprintln!("error: --ttl: expected a duration like 1h");
        return ExitCode::from(2);
    };
    let CallerAuthConfig::Jwt(jwt) = &config.callers else {
        eprintln!(
            "error: {}: callers: not JWT (trusted identity needs no token)",
            path.display()
        );
        return ExitCode::from(EXIT_CONFIG);
    };
    let Some(key) = jwt
        .keys
        .iter()
        .find(|k| matches!(k.material, JwtKeyMaterial::Secret(_)))
    else {
        eprintln!(
            "error: {}: callers.jwt.keys: no HS256/384/512 `secret` key to sign with",
            path.display()
        );
        return ExitCode::from(EXIT_CONFIG);
    };
    let JwtKeyMaterial::Secret(secret) = &key.material else {
        return ExitCode::from(EXIT_CONFIG);
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let mut body = serde_json::Map::new();
    body.insert(jwt.identity_claim.clone(), caller.into());
    if let Some(iss) = &jwt.issuer {
        body.insert("iss".into(), iss.clone().into());
    }
    if let Some(aud) = jwt.audience.first() {
        body.insert("aud".into(), aud.clone().into());
    }
    body.insert("iat".into(), now.into());
    body.insert("exp".into(), (now + ttl.as_secs()).into());
    for c in claims {
        let Some((k, v)) = c.split_once('=') else {
            eprintln!("error: --claim `{c}`: expected name=value");
            return ExitCode::from(2);
        };
        body.insert(k.to_owned(), v.into());
    }
    let mut header = jsonwebtoken::Header::new(key.alg);
    header.kid = key.kid.clone();
    let signing = match jsonwebtoken::EncodingKey::from_secret(secret.expose().as_bytes()) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("error: unusable HMAC key: {e}");
            return ExitCode::FAILURE;
        }
    };
    match jsonwebtoken::encode(&header, &body, &signing) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: cannot sign: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn simulate_ttl(args: &[&str]) -> Result<Option<Duration>, clap::Error> {
        let argv = ["zuora-gateway", "simulate"].iter().chain(args);
        match Cli::try_parse_from(argv)?.command {
            Command::Simulate { token_ttl, .. } => Ok(token_ttl),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn simulate_token_ttl_takes_a_duration_of_at_least_a_second() {
        assert_eq!(simulate_ttl(&[]).unwrap(), None);
        assert_eq!(
            simulate_ttl(&["--token-ttl", "4s"]).unwrap(),
            Some(Duration::from_secs(4))
        );
        assert_eq!(
            simulate_ttl(&["--token-ttl", "2m"]).unwrap(),
            Some(Duration::from_secs(120))
        );
        for bad in ["500ms", "0s", "soon", ""] {
            assert!(
                simulate_ttl(&["--token-ttl", bad]).is_err(),
                "`{bad}` accepted"
            );
        }
    }
}
