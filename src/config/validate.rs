//! Raw → typed conversion: `${ENV}` / `${file:…}` substitution, parsing of
//! durations, sizes, addresses and URLs, and every cross-reference check.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method, Uri};

use super::ConfigError;
use super::EnvSource;
use super::model::*;
use super::raw::*;
use crate::secret::Secret;

/// Parses YAML into the raw model, reporting the key path of any mismatch.
pub(super) fn parse(text: &str, file: &Path) -> Result<RawConfig, ConfigError> {
    let mut options = serde_saphyr::Options::default();
    options.with_snippet = false;
    let mut failed_at: Option<String> = None;
    let outcome = serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
        serde_path_to_error::deserialize::<_, RawConfig>(de).map_err(|e| {
            failed_at = Some(e.path().to_string());
            e.into_inner()
        })
    });
    outcome.map_err(|e| {
        let (path, message) = match failed_at {
            Some(path) => (
                if path == "." { String::new() } else { path },
                e.to_string(),
            ),
            None => (String::new(), format!("not valid YAML: {e}")),
        };
        ConfigError {
            file: file.to_path_buf(),
            path,
            message,
        }
    })
}

/// Parses `250ms`, `30s`, `5m`, `2h`, `1d`; a bare integer is seconds.
pub(super) fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let d = match unit.trim() {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "us" | "µs" => Duration::from_micros(n),
        "m" | "min" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        "d" => Duration::from_secs(n.checked_mul(86_400)?),
        _ => return None,
    };
    Some(d)
}

const DEFAULT_MAX_BODY: u64 = 10 * 1024 * 1024;

/// Paths of Zuora's stop-job operations (the routes that get stop validation by default).
const STOP_JOB_PREFIXES: [&str; 3] = [
    "/v1/uno/data-backfill/propagation/jobs/",
    "/v1/uno/data-backfill/jobs/",
    "/v1/uno/data-backfill/bookingdate/jobs/",
];

pub(super) struct Validator<'a> {
    file: &'a Path,
    base_dir: &'a Path,
    env: &'a dyn EnvSource,
}

type R<T> = Result<T, ConfigError>;

impl<'a> Validator<'a> {
    pub(super) fn new(file: &'a Path, base_dir: &'a Path, env: &'a dyn EnvSource) -> Self {
        Validator {
            file,
            base_dir,
            env,
        }
    }

    fn err(&self, path: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            path: path.into(),
            message: message.into(),
        }
    }

    /// Replaces `${NAME}` with the environment variable and `${file:PATH}`
    /// with the file's trimmed contents. Messages never include the values.
    fn interp(&self, path: &str, s: &str) -> R<String> {
        if !s.contains("${") {
            return Ok(s.to_owned());
        }
        let mut out = String::with_capacity(s.len());
        let mut rest = s;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after.find('}').ok_or_else(|| {
                self.err(
                    path,
                    "unterminated `${` (expected `${NAME}` or `${file:PATH}`)",
                )
            })?;
            let reference = &after[..end];
            if let Some(file) = reference.strip_prefix("file:") {
                let full = self.resolve(file);
                let text = std::fs::read_to_string(&full).map_err(|e| {
                    self.err(
                        path,
                        format!("cannot read `${{file:{file}}}` ({}): {e}", full.display()),
                    )
                })?;
                out.push_str(text.trim());
            } else {
                let valid = !reference.is_empty()
                    && reference
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid {
                    return Err(self.err(
                        path,
                        format!("`${{{reference}}}` is not a valid environment variable reference"),
                    ));
                }
                let value = self.env.var(reference).ok_or_else(|| {
                    self.err(path, format!("environment variable {reference} is not set"))
                })?;
                out.push_str(&value);
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }

    fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    fn string(&self, path: &str, v: &Scalar) -> R<String> {
        match v {
            Scalar::Str(s) => self.interp(path, s),
            Scalar::Int(i) => Ok(i.to_string()),
            Scalar::Float(f) => Ok(f.to_string()),
            Scalar::Bool(b) => Ok(b.to_string()),
        }
    }

    fn opt_string(&self, path: &str, v: &Option<Scalar>) -> R<Option<String>> {
        v.as_ref().map(|v| self.string(path, v)).transpose()
    }

    fn non_empty(&self, path: &str, v: &Scalar) -> R<String> {
        let s = self.string(path, v)?;
        if s.trim().is_empty() {
            return Err(self.err(path, "must not be empty"));
        }
        Ok(s)
    }

    fn u64(&self, path: &str, v: &Option<Scalar>, default: u64) -> R<u64> {
        match v {
            None => Ok(default),
            Some(Scalar::Int(i)) => Ok(*i),
            Some(other) => {
                let s = self.string(path, other)?;
                s.trim()
                    .replace('_', "")
                    .parse()
                    .map_err(|_| self.err(path, format!("expected a whole number, got `{s}`")))
            }
        }
    }

    fn usize(&self, path: &str, v: &Option<Scalar>, default: usize) -> R<usize> {
        let n = self.u64(path, v, default as u64)?;
        usize::try_from(n).map_err(|_| self.err(path, "number too large"))
    }

    fn worker_threads(&self, v: &Option<Scalar>) -> R<usize> {
        const PATH: &str = "server.worker_threads";
        let n = self.usize(PATH, v, 1)?;
        if !(1..=256).contains(&n) {
            return Err(self.err(PATH, "must be between 1 and 256"));
        }
        Ok(n)
    }

    fn positive_u32(&self, path: &str, v: &Option<Scalar>, default: u32) -> R<u32> {
        let n = self.u64(path, v, u64::from(default))?;
        if n == 0 {
            return Err(self.err(path, "must be at least 1"));
        }
        u32::try_from(n).map_err(|_| self.err(path, "number too large"))
    }

    fn bool(&self, path: &str, v: &Option<Scalar>, default: bool) -> R<bool> {
        match v {
            None => Ok(default),
            Some(Scalar::Bool(b)) => Ok(*b),
            Some(other) => match self.string(path, other)?.trim() {
                "true" | "yes" | "on" => Ok(true),
                "false" | "no" | "off" => Ok(false),
                s => Err(self.err(path, format!("expected true or false, got `{s}`"))),
            },
        }
    }

    fn duration(&self, path: &str, v: &Option<Scalar>, default: Duration) -> R<Duration> {
        match v {
            None => Ok(default),
            Some(v) => {
                let s = self.string(path, v)?;
                parse_duration(&s).ok_or_else(|| {
                    self.err(
                        path,
                        format!("expected a duration like `250ms`, `30s`, `5m` or `1h`, got `{s}`"),
                    )
                })
            }
        }
    }

    fn positive_duration(&self, path: &str, v: &Option<Scalar>, default: Duration) -> R<Duration> {
        let d = self.duration(path, v, default)?;
        if d.is_zero() {
            return Err(self.err(path, "must be greater than zero"));
        }
        Ok(d)
    }

    fn addr(&self, path: &str, v: &Scalar) -> R<SocketAddr> {
        let s = self.string(path, v)?;
        let s = s.trim();
        let with_host = if s.starts_with(':') {
            format!("0.0.0.0{s}")
        } else if s.starts_with("localhost:") {
            s.replacen("localhost", "127.0.0.1", 1)
        } else {
            s.to_owned()
        };
        with_host.parse().map_err(|_| {
            self.err(
                path,
                format!("expected an address like `127.0.0.1:8080`, got `{s}`"),
            )
        })
    }

    fn http_url(&self, path: &str, s: &str) -> R<Uri> {
        let uri: Uri = s
            .trim()
            .parse()
            .map_err(|_| self.err(path, format!("`{s}` is not a valid URL")))?;
        match uri.scheme_str() {
            Some("http") | Some("https") => {}
            _ => {
                return Err(self.err(path, format!("`{s}` must start with http:// or https://")));
            }
        }
        if uri.authority().is_none() {
            return Err(self.err(path, format!("`{s}` has no host")));
        }
        Ok(uri)
    }

    fn read_file(&self, path: &str, v: &Scalar) -> R<(PathBuf, Vec<u8>)> {
        let name = self.non_empty(path, v)?;
        let full = self.resolve(&name);
        let bytes = std::fs::read(&full)
            .map_err(|e| self.err(path, format!("cannot read {}: {e}", full.display())))?;
        Ok((full, bytes))
    }

    fn pem_certs(&self, path: &str, v: &Scalar) -> R<(PathBuf, Arc<Vec<u8>>)> {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        let (full, pem) = self.read_file(path, v)?;
        let mut count = 0usize;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            cert.map_err(|e| {
                self.err(
                    path,
                    format!(
                        "{} is not a valid PEM certificate file: {e}",
                        full.display()
                    ),
                )
            })?;
            count += 1;
        }
        if count == 0 {
            return Err(self.err(path, format!("{} holds no PEM certificate", full.display())));
        }
        Ok((full, Arc::new(pem)))
    }

    pub(super) fn config(&self, raw: RawConfig) -> R<Config> {
        let server = self.server(&raw.server)?;
        if raw.upstreams.is_empty() {
            return Err(self.err("upstreams", "at least one upstream is required"));
        }
        let mut upstreams = BTreeMap::new();
        for (name, up) in &raw.upstreams {
            let u = self.upstream(name, up)?;
            upstreams.insert(name.clone(), Arc::new(u));
        }
        let callers = self.callers(&raw.callers, &server)?;
        let rate_limits = self.rate_limits(&raw.rate_limits)?;
        let redis = raw.redis.as_ref().map(|r| self.redis(r)).transpose()?;
        for (name, limit) in &rate_limits {
            if limit.store == LimitStore::Redis && redis.is_none() {
                return Err(self.err(
                    format!("rate_limits.{name}.store"),
                    "`store: redis` needs a top-level `redis:` section with a url",
                ));
            }
        }
        let routes = self.routes(&raw.routes, &upstreams, &rate_limits)?;
        let tenancy = self.tenancy(&raw.tenancy, &routes)?;
        let telemetry = self.telemetry(raw.telemetry.as_ref())?;
        Ok(Config {
            source: self.file.to_path_buf(),
            server,
            upstreams,
            callers,
            routes,
            tenancy,
            rate_limits,
            redis,
            telemetry,
        })
    }

    fn server(&self, s: &RawServer) -> R<ServerConfig> {
        let listen = self.addr("server.listen", &s.listen)?;
        let admin_listen = match &s.admin_listen {
            Some(v) => self.addr("server.admin_listen", v)?,
            None => SocketAddr::from(([127, 0, 0, 1], 9901)),
        };
        if listen == admin_listen && listen.port() != 0 {
            return Err(self.err(
                "server.admin_listen",
                "must differ from server.listen (the admin port is not for callers)",
            ));
        }
        let max_body_bytes =
            self.u64("server.max_body_bytes", &s.max_body_bytes, DEFAULT_MAX_BODY)?;
        if max_body_bytes == 0 {
            return Err(self.err("server.max_body_bytes", "must be greater than zero"));
        }
        let compress_responses_over = match &s.compress_responses_over {
            None => None,
            Some(_) => Some(self.u64(
                "server.compress_responses_over",
                &s.compress_responses_over,
                0,
            )?),
        };
        Ok(ServerConfig {
            listen,
            admin_listen,
            max_body_bytes,
            shutdown_grace: self.duration(
                "server.shutdown_grace",
                &s.shutdown_grace,
                Duration::from_secs(30),
            )?,
            header_read_timeout: self.positive_duration(
                "server.header_read_timeout",
                &s.header_read_timeout,
                Duration::from_secs(10),
            )?,
            body_read_timeout: self.positive_duration(
                "server.body_read_timeout",
                &s.body_read_timeout,
                Duration::from_secs(30),
            )?,
            max_connections: self
                .usize("server.max_connections", &s.max_connections, 10_000)?
                .max(1),
            max_in_flight: self
                .usize("server.max_in_flight", &s.max_in_flight, 4096)?
                .max(1),
            max_header_count: self
                .usize("server.max_header_count", &s.max_header_count, 100)?
                .max(1),
            max_header_bytes: self
                .usize("server.max_header_bytes", &s.max_header_bytes, 16 * 1024)?
                .max(1024),
            max_uri_bytes: self
                .usize("server.max_uri_bytes", &s.max_uri_bytes, 8 * 1024)?
                .max(64),
            http2_max_concurrent_streams: self.positive_u32(
                "server.http2_max_concurrent_streams",
                &s.http2_max_concurrent_streams,
                100,
            )?,
            compress_responses_over,
            allow_unauthenticated_network: self.bool(
                "server.allow_unauthenticated_network",
                &s.allow_unauthenticated_network,
                false,
            )?,
            worker_threads: match &s.worker_threads {
                None => None,
                v => Some(self.worker_threads(v)?),
            },
            work_stealing: self.bool("server.work_stealing", &s.work_stealing, false)?,
        })
    }

    fn upstream(&self, name: &str, u: &RawUpstream) -> R<UpstreamConfig> {
        let p = format!("upstreams.{name}");
        let base = self.non_empty(&format!("{p}.base_url"), &u.base_url)?;
        let target = if base.trim() == "simulator" {
            UpstreamTarget::Simulator
        } else {
            let uri = self.http_url(&format!("{p}.base_url"), &base)?;
            if uri.query().is_some() {
                return Err(self.err(format!("{p}.base_url"), "must not carry a query string"));
            }
            UpstreamTarget::Url(uri)
        };
        let (ca_file, ca_pem) = match &u.ca_file {
            Some(v) => {
                let (f, pem) = self.pem_certs(&format!("{p}.ca_file"), v)?;
                (Some(f), Some(pem))
            }
            None => (None, None),
        };
        let zuora_version =
            match self.opt_string(&format!("{p}.zuora_version"), &u.zuora_version)? {
                Some(v) => Some(HeaderValue::from_str(v.trim()).map_err(|_| {
                    self.err(format!("{p}.zuora_version"), "not a valid header value")
                })?),
                None => None,
            };
        let timeouts = u.timeouts.as_ref();
        let pool = u.pool.as_ref();
        let retry = u.retry.as_ref();
        let breaker = u.circuit_breaker.as_ref();
        let oauth = self.oauth(&p, u.oauth.as_ref(), &target)?;
        Ok(UpstreamConfig {
            name: name.to_owned(),
            target,
            ca_pem,
            ca_file,
            zuora_version,
            compress_requests_over: self.u64(
                &format!("{p}.compress_requests_over"),
                &u.compress_requests_over,
                1024,
            )?,
            connect_timeout: self.positive_duration(
                &format!("{p}.timeouts.connect"),
                &timeouts.and_then(|t| t.connect.clone()),
                Duration::from_secs(5),
            )?,
            request_timeout: self.positive_duration(
                &format!("{p}.timeouts.request"),
                &timeouts.and_then(|t| t.request.clone()),
                Duration::from_secs(125),
            )?,
            // Closed by us before the usual 60 s idle timeout of load balancers in front of
            // Zuora, so a request never races the server closing an idle connection.
            pool_idle_timeout: self.positive_duration(
                &format!("{p}.pool.idle_timeout"),
                &pool.and_then(|t| t.idle_timeout.clone()),
                Duration::from_secs(30),
            )?,
            // Zuora allows about 40 concurrent requests per tenant: more idle connections
            // than that are never all needed again, and each costs about 30 KiB.
            pool_max_idle_per_host: self.usize(
                &format!("{p}.pool.max_idle_per_host"),
                &pool.and_then(|t| t.max_idle_per_host.clone()),
                32,
            )?,
            // Zuora's default concurrency limit per tenant: beyond it Zuora answers 429,
            // so waiting here for a slot costs the caller nothing it would not lose anyway.
            max_concurrent_requests: self
                .usize(
                    &format!("{p}.max_concurrent_requests"),
                    &u.max_concurrent_requests,
                    40,
                )?
                .max(1),
            oauth,
            forward_traceparent: self.bool(
                &format!("{p}.forward_traceparent"),
                &u.forward_traceparent,
                false,
            )?,
            retry: RetryConfig {
                max_attempts: self.positive_u32(
                    &format!("{p}.retry.max_attempts"),
                    &retry.and_then(|r| r.max_attempts.clone()),
                    2,
                )?,
                backoff: self.duration(
                    &format!("{p}.retry.backoff"),
                    &retry.and_then(|r| r.backoff.clone()),
                    Duration::from_millis(50),
                )?,
            },
            circuit_breaker: CircuitBreakerConfig {
                failure_threshold: u32::try_from(self.u64(
                    &format!("{p}.circuit_breaker.failure_threshold"),
                    &breaker.and_then(|b| b.failure_threshold.clone()),
                    20,
                )?)
                .map_err(|_| {
                    self.err(
                        format!("{p}.circuit_breaker.failure_threshold"),
                        "too large",
                    )
                })?,
                open_for: self.positive_duration(
                    &format!("{p}.circuit_breaker.open_for"),
                    &breaker.and_then(|b| b.open_for.clone()),
                    Duration::from_secs(5),
                )?,
            },
        })
    }

    fn oauth(&self, p: &str, o: Option<&RawOAuth>, target: &UpstreamTarget) -> R<OAuthConfig> {
        let simulator = *target == UpstreamTarget::Simulator;
        let field = |key: &str, v: Option<&Scalar>, sim_default: &str| -> R<Secret> {
            let path = format!("{p}.oauth.{key}");
            match v {
                Some(v) => Ok(Secret::new(self.non_empty(&path, v)?)),
                None if simulator => Ok(Secret::new(sim_default)),
                None => Err(self.err(path, "required for a Zuora base_url")),
            }
        };
        let client_id = field(
            "client_id",
            o.and_then(|o| o.client_id.as_ref()),
            "local-simulator-client",
        )?;
        let client_secret = field(
            "client_secret",
            o.and_then(|o| o.client_secret.as_ref()),
            "local-simulator-secret",
        )?;
        let token_url = match o.and_then(|o| o.token_url.as_ref()) {
            Some(v) => {
                let path = format!("{p}.oauth.token_url");
                let s = self.non_empty(&path, v)?;
                Some(self.http_url(&path, &s)?)
            }
            None => None,
        };
        Ok(OAuthConfig {
            client_id,
            client_secret,
            token_url,
            refresh_before_expiry: self.duration(
                &format!("{p}.oauth.refresh_before_expiry"),
                &o.and_then(|o| o.refresh_before_expiry.clone()),
                Duration::from_secs(300),
            )?,
        })
    }

    fn callers(&self, c: &RawCallers, server: &ServerConfig) -> R<CallerAuthConfig> {
        match (&c.jwt, &c.trusted_identity) {
            (Some(_), Some(_)) => Err(self.err(
                "callers",
                "set either `jwt` or `trusted_identity`, not both",
            )),
            (None, None) => Err(self.err(
                "callers",
                "one of `jwt` or `trusted_identity` is required (deny by default)",
            )),
            (None, Some(identity)) => {
                let identity = self.non_empty("callers.trusted_identity", identity)?;
                if !server.listen.ip().is_loopback() && !server.allow_unauthenticated_network {
                    return Err(self.err(
                        "callers.trusted_identity",
                        format!(
                            "refusing to trust every caller on the non-loopback listener {}; \
                             listen on 127.0.0.1 or set server.allow_unauthenticated_network: true",
                            server.listen
                        ),
                    ));
                }
                Ok(CallerAuthConfig::TrustedIdentity(
                    identity.trim().to_owned(),
                ))
            }
            (Some(jwt), None) => Ok(CallerAuthConfig::Jwt(Box::new(self.jwt(jwt)?))),
        }
    }

    fn jwt(&self, j: &RawJwt) -> R<JwtConfig> {
        let audience = match &j.audience {
            None => Vec::new(),
            Some(OneOrMany::One(a)) => vec![self.interp("callers.jwt.audience", a)?],
            Some(OneOrMany::Many(list)) => list
                .iter()
                .enumerate()
                .map(|(i, a)| self.interp(&format!("callers.jwt.audience[{i}]"), a))
                .collect::<R<_>>()?,
        };
        let mut keys = Vec::new();
        let mut kids = BTreeSet::new();
        for (i, k) in j.keys.iter().enumerate() {
            let key = self.jwt_key(&format!("callers.jwt.keys[{i}]"), k)?;
            if let Some(kid) = &key.kid
                && !kids.insert(kid.clone())
            {
                return Err(self.err(
                    format!("callers.jwt.keys[{i}].kid"),
                    format!("kid `{kid}` is used by another key"),
                ));
            }
            keys.push(key);
        }
        let jwks_url = match &j.jwks_url {
            Some(v) => {
                let s = self.non_empty("callers.jwt.jwks_url", v)?;
                Some(self.http_url("callers.jwt.jwks_url", &s)?)
            }
            None => None,
        };
        if keys.is_empty() && jwks_url.is_none() {
            return Err(self.err(
                "callers.jwt",
                "no verification keys: give `keys` and/or `jwks_url`",
            ));
        }
        let jwks_ca_pem = match &j.jwks_ca_file {
            Some(v) => Some(self.pem_certs("callers.jwt.jwks_ca_file", v)?.1),
            None => None,
        };
        let identity_claim = match &j.identity_claim {
            Some(v) => self.non_empty("callers.jwt.identity_claim", v)?,
            None => "sub".to_owned(),
        };
        Ok(JwtConfig {
            issuer: self.opt_string("callers.jwt.issuer", &j.issuer)?,
            audience,
            identity_claim,
            leeway: self.duration("callers.jwt.leeway", &j.leeway, Duration::from_secs(30))?,
            keys,
            jwks_url,
            jwks_refresh: self.positive_duration(
                "callers.jwt.jwks_refresh",
                &j.jwks_refresh,
                Duration::from_secs(300),
            )?,
            jwks_ca_pem,
            cache_entries: self.usize("callers.jwt.cache_entries", &j.cache_entries, 10_000)?,
        })
    }

    fn jwt_key(&self, p: &str, k: &RawKey) -> R<JwtKeyConfig> {
        use jsonwebtoken::{Algorithm, DecodingKey};
        let alg_s = self.non_empty(&format!("{p}.alg"), &k.alg)?;
        let alg = Algorithm::from_str(alg_s.trim()).map_err(|_| {
            self.err(
                format!("{p}.alg"),
                format!(
                    "unknown algorithm `{alg_s}` (expected one of HS256 HS384 HS512 RS256 RS384 RS512 PS256 PS384 PS512 ES256 ES384 EdDSA)"
                ),
            )
        })?;
        let kid = self.opt_string(&format!("{p}.kid"), &k.kid)?;
        let given = [
            k.public_key_file.is_some(),
            k.secret.is_some(),
            k.jwk_file.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if given != 1 {
            return Err(self.err(
                p,
                "give exactly one of `public_key_file`, `secret` or `jwk_file`",
            ));
        }
        let hmac = matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512);
        let material = if let Some(secret) = &k.secret {
            let path = format!("{p}.secret");
            if !hmac {
                return Err(self.err(
                    path,
                    format!(
                        "`secret` is for HS* keys; {alg_s} needs `public_key_file` or `jwk_file`"
                    ),
                ));
            }
            let s = self.non_empty(&path, secret)?;
            if s.len() < 32 {
                return Err(self.err(path, "an HMAC secret must be at least 32 bytes"));
            }
            JwtKeyMaterial::Secret(Secret::new(s))
        } else if let Some(file) = &k.public_key_file {
            let path = format!("{p}.public_key_file");
            if hmac {
                return Err(self.err(
                    path,
                    format!("{alg_s} is an HMAC algorithm: give `secret`, not a public key"),
                ));
            }
            let (full, pem) = self.read_file(&path, file)?;
            let parsed = match alg {
                Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512 => DecodingKey::from_rsa_pem(&pem).map(|_| ()),
                Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(&pem).map(|_| ()),
                Algorithm::EdDSA => DecodingKey::from_ed_pem(&pem).map(|_| ()),
                _ => Ok(()),
            };
            parsed.map_err(|e| {
                self.err(
                    path,
                    format!("{} is not a {alg_s} public key in PEM: {e}", full.display()),
                )
            })?;
            JwtKeyMaterial::PublicKeyPem(Arc::new(pem))
        } else if let Some(file) = &k.jwk_file {
            let path = format!("{p}.jwk_file");
            let (full, bytes) = self.read_file(&path, file)?;
            let text = String::from_utf8(bytes)
                .map_err(|_| self.err(&path, format!("{} is not UTF-8", full.display())))?;
            let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_str(&text)
                .map_err(|e| self.err(&path, format!("{} is not a JWK: {e}", full.display())))?;
            DecodingKey::from_jwk(&jwk).map_err(|e| {
                self.err(
                    &path,
                    format!("{} is not a usable JWK: {e}", full.display()),
                )
            })?;
            JwtKeyMaterial::Jwk(Arc::new(text))
        } else {
            return Err(self.err(p, "no key material"));
        };
        Ok(JwtKeyConfig { kid, alg, material })
    }

    fn routes(
        &self,
        routes: &[RawRoute],
        upstreams: &BTreeMap<String, Arc<UpstreamConfig>>,
        limits: &BTreeMap<String, RateLimitConfig>,
    ) -> R<Vec<RouteConfig>> {
        let mut names = BTreeSet::new();
        let mut out = Vec::with_capacity(routes.len());
        for (i, r) in routes.iter().enumerate() {
            let p = format!("routes[{i}]");
            let name = self.non_empty(&format!("{p}.name"), &r.name)?;
            if !names.insert(name.clone()) {
                return Err(self.err(
                    format!("{p}.name"),
                    format!("route name `{name}` is used twice"),
                ));
            }
            let methods = match &r.method {
                None => None,
                Some(OneOrMany::One(m)) if m.trim() == "*" => None,
                Some(OneOrMany::One(m)) => Some(vec![self.method(&format!("{p}.method"), m)?]),
                Some(OneOrMany::Many(ms)) => Some(
                    ms.iter()
                        .enumerate()
                        .map(|(j, m)| self.method(&format!("{p}.method[{j}]"), m))
                        .collect::<R<_>>()?,
                ),
            };
            let path = self.non_empty(&format!("{p}.path"), &r.path)?;
            let params = self.template(&format!("{p}.path"), &path)?;
            let upstream = self.non_empty(&format!("{p}.upstream"), &r.upstream)?;
            if !upstreams.contains_key(&upstream) {
                return Err(self.err(
                    format!("{p}.upstream"),
                    format!(
                        "unknown upstream `{upstream}` (defined: {})",
                        join_keys(upstreams)
                    ),
                ));
            }
            let mut allow_callers = Vec::with_capacity(r.allow_callers.len());
            for (j, c) in r.allow_callers.iter().enumerate() {
                let c = self.interp(&format!("{p}.allow_callers[{j}]"), c)?;
                if c.trim().is_empty() {
                    return Err(self.err(format!("{p}.allow_callers[{j}]"), "must not be empty"));
                }
                allow_callers.push(c.trim().to_owned());
            }
            for (j, l) in r.rate_limits.iter().enumerate() {
                let lp = format!("{p}.rate_limits[{j}]");
                let limit = limits.get(l).ok_or_else(|| {
                    self.err(
                        &lp,
                        format!("unknown rate limit `{l}` (defined: {})", join_keys(limits)),
                    )
                })?;
                for k in &limit.key {
                    if let LimitKey::Param(param) = k
                        && !params.contains(param)
                    {
                        return Err(self.err(
                            &lp,
                            format!(
                                "rate limit `{l}` is keyed by path parameter `{param}`, which path `{path}` does not have"
                            ),
                        ));
                    }
                }
            }
            let is_stop = methods.as_deref() == Some(&[Method::PUT][..])
                && STOP_JOB_PREFIXES.iter().any(|prefix| {
                    path.strip_prefix(prefix).is_some_and(|rest| {
                        rest.starts_with('{') && rest.ends_with('}') && !rest.contains('/')
                    })
                });
            let validation = match self
                .opt_string(&format!("{p}.validate"), &r.validate)?
                .as_deref()
            {
                None => {
                    if is_stop {
                        Validation::StopJob
                    } else {
                        Validation::None
                    }
                }
                Some("stop_job") => {
                    if params.is_empty() {
                        return Err(self.err(
                            format!("{p}.validate"),
                            "`stop_job` needs a `{jobId}` path parameter",
                        ));
                    }
                    Validation::StopJob
                }
                Some("none") => Validation::None,
                Some(other) => {
                    return Err(self.err(
                        format!("{p}.validate"),
                        format!("unknown validation `{other}` (expected `stop_job` or `none`)"),
                    ));
                }
            };
            out.push(RouteConfig {
                name,
                methods,
                path,
                upstream,
                allow_callers,
                rate_limits: r.rate_limits.clone(),
                validation,
            });
        }
        Ok(out)
    }

    fn method(&self, path: &str, m: &str) -> R<Method> {
        let m = self.interp(path, m)?;
        let upper = m.trim().to_ascii_uppercase();
        match upper.as_str() {
            "GET" | "PUT" | "POST" | "PATCH" | "DELETE" | "HEAD" | "OPTIONS" => {
                Method::from_bytes(upper.as_bytes()).map_err(|_| self.err(path, format!("invalid method `{m}`")))
            }
            _ => Err(self.err(
                path,
                format!("unsupported method `{m}` (expected GET, PUT, POST, PATCH, DELETE, HEAD, OPTIONS or *)"),
            )),
        }
    }

    /// Checks a path template and returns its parameter names.
    fn template(&self, path: &str, t: &str) -> R<Vec<String>> {
        if !t.starts_with('/') {
            return Err(self.err(path, format!("`{t}` must start with `/`")));
        }
        let segments: Vec<&str> = t[1..].split('/').collect();
        let mut params = Vec::new();
        let last = segments.len().saturating_sub(1);
        for (i, seg) in segments.iter().enumerate() {
            if seg.is_empty() {
                if t == "/" {
                    break;
                }
                return Err(self.err(path, format!("`{t}` has an empty segment")));
            }
            if *seg == "**" {
                if i != last {
                    return Err(self.err(path, format!("`**` must be the last segment of `{t}`")));
                }
                continue;
            }
            if let Some(inner) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                let valid = inner
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && inner.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid {
                    return Err(self.err(
                        path,
                        format!("`{seg}` is not a valid parameter (expected `{{name}}`)"),
                    ));
                }
                if params.iter().any(|p| p == inner) {
                    return Err(
                        self.err(path, format!("parameter `{inner}` appears twice in `{t}`"))
                    );
                }
                params.push(inner.to_owned());
                continue;
            }
            let bad = seg.contains(['{', '}', '*', '%', '\\', '?', '#'])
                || *seg == "."
                || *seg == ".."
                || !seg.chars().all(|c| c.is_ascii_graphic());
            if bad {
                return Err(self.err(
                    path,
                    format!(
                        "segment `{seg}` of `{t}` must be a literal, `{{param}}` or a final `**`"
                    ),
                ));
            }
        }
        Ok(params)
    }

    fn tenancy(
        &self,
        rules: &[RawTenancyRule],
        routes: &[RouteConfig],
    ) -> R<Vec<TenancyRuleConfig>> {
        let mut out = Vec::with_capacity(rules.len());
        for (i, t) in rules.iter().enumerate() {
            let p = format!("tenancy[{i}]");
            if t.callers.is_empty() {
                return Err(self.err(
                    format!("{p}.callers"),
                    "list the caller globs this rule applies to (`[\"*\"]` for all)",
                ));
            }
            let callers = t
                .callers
                .iter()
                .enumerate()
                .map(|(j, c)| {
                    self.interp(&format!("{p}.callers[{j}]"), c)
                        .map(|c| c.trim().to_owned())
                })
                .collect::<R<Vec<_>>>()?;
            for (j, r) in t.routes.iter().enumerate() {
                if !routes.iter().any(|route| &route.name == r) {
                    return Err(
                        self.err(format!("{p}.routes[{j}]"), format!("unknown route `{r}`"))
                    );
                }
            }
            let header_values = |key: &str, list: &[String]| -> R<Vec<String>> {
                list.iter()
                    .enumerate()
                    .map(|(j, v)| {
                        let path = format!("{p}.{key}[{j}]");
                        let v = self.interp(&path, v)?.trim().to_owned();
                        if v.is_empty() || v.contains(',') || HeaderValue::from_str(&v).is_err() {
                            return Err(self.err(
                                path,
                                "must be a non-empty ID without commas or control characters",
                            ));
                        }
                        Ok(v)
                    })
                    .collect()
            };
            let mut claims = BTreeMap::new();
            for (k, v) in &t.claims {
                claims.insert(k.clone(), self.interp(&format!("{p}.claims.{k}"), v)?);
            }
            out.push(TenancyRuleConfig {
                callers,
                routes: t.routes.clone(),
                claims,
                entity_ids: header_values("entity_ids", &t.entity_ids)?,
                org_ids: header_values("org_ids", &t.org_ids)?,
                caller_may_narrow: self.bool(
                    &format!("{p}.caller_may_narrow"),
                    &t.caller_may_narrow,
                    false,
                )?,
            });
        }
        Ok(out)
    }

    fn rate_limits(
        &self,
        limits: &BTreeMap<String, RawRateLimit>,
    ) -> R<BTreeMap<String, RateLimitConfig>> {
        let mut out = BTreeMap::new();
        for (name, l) in limits {
            let p = format!("rate_limits.{name}");
            let parts: Vec<String> = match &l.key {
                OneOrMany::One(k) => vec![k.clone()],
                OneOrMany::Many(ks) => ks.clone(),
            };
            if parts.is_empty() {
                return Err(self.err(format!("{p}.key"), "must name at least one key part"));
            }
            let key = parts
                .iter()
                .map(|k| match k.trim() {
                    "caller" => Ok(LimitKey::Caller),
                    "global" => Ok(LimitKey::Global),
                    param
                        if !param.is_empty()
                            && param.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
                    {
                        Ok(LimitKey::Param(param.to_owned()))
                    }
                    other => Err(self.err(
                        format!("{p}.key"),
                        format!("`{other}` is not `caller`, `global` or a path parameter name"),
                    )),
                })
                .collect::<R<Vec<_>>>()?;
            let rate = self.non_empty(&format!("{p}.rate"), &l.rate)?;
            let (count, per) = parse_rate(&rate).ok_or_else(|| {
                self.err(
                    format!("{p}.rate"),
                    format!("expected `N/second`, `N/minute` or `N/hour` with N ≥ 1, got `{rate}`"),
                )
            })?;
            let store = match self
                .opt_string(&format!("{p}.store"), &l.store)?
                .as_deref()
                .map(str::trim)
            {
                None | Some("local") => LimitStore::Local,
                Some("redis") => LimitStore::Redis,
                Some(other) => {
                    return Err(self.err(
                        format!("{p}.store"),
                        format!("expected `local` or `redis`, got `{other}`"),
                    ));
                }
            };
            let on_store_error = match self
                .opt_string(&format!("{p}.on_store_error"), &l.on_store_error)?
                .as_deref()
                .map(str::trim)
            {
                None | Some("local") => StoreErrorPolicy::Local,
                Some("allow") => StoreErrorPolicy::Allow,
                Some("deny") => StoreErrorPolicy::Deny,
                Some(other) => {
                    return Err(self.err(
                        format!("{p}.on_store_error"),
                        format!("expected `local`, `allow` or `deny`, got `{other}`"),
                    ));
                }
            };
            out.insert(
                name.clone(),
                RateLimitConfig {
                    name: name.clone(),
                    key,
                    count,
                    per,
                    burst: self.positive_u32(&format!("{p}.burst"), &l.burst, 1)?,
                    store,
                    on_store_error,
                },
            );
        }
        Ok(out)
    }

    fn redis(&self, r: &RawRedis) -> R<RedisConfig> {
        let url = self.non_empty("redis.url", &r.url)?;
        let url = url.trim();
        if !(url.starts_with("redis://")
            || url.starts_with("rediss://")
            || url.starts_with("redis+unix://"))
        {
            return Err(self.err(
                "redis.url",
                "must start with redis://, rediss:// or redis+unix://",
            ));
        }
        Ok(RedisConfig {
            url: Secret::new(url),
            timeout: self.positive_duration(
                "redis.timeout",
                &r.timeout,
                Duration::from_millis(250),
            )?,
            key_prefix: self
                .opt_string("redis.key_prefix", &r.key_prefix)?
                .unwrap_or_else(|| "zgw:".to_owned()),
        })
    }

    fn telemetry(&self, t: Option<&RawTelemetry>) -> R<TelemetryConfig> {
        let get = |f: fn(&RawTelemetry) -> &Option<Scalar>| t.and_then(|t| f(t).clone());
        let otlp_endpoint = match self
            .opt_string("telemetry.otlp_endpoint", &get(|t| &t.otlp_endpoint))?
        {
            Some(s) if !s.trim().is_empty() => Some(self.http_url("telemetry.otlp_endpoint", &s)?),
            _ => None,
        };
        let otlp_protocol = match self
            .opt_string("telemetry.otlp_protocol", &get(|t| &t.otlp_protocol))?
            .as_deref()
            .map(str::trim)
        {
            None | Some("http/protobuf") | Some("http") => OtlpProtocol::HttpProtobuf,
            Some(other) => {
                return Err(self.err(
                    "telemetry.otlp_protocol",
                    format!("`{other}` is not supported by this build (expected `http/protobuf`)"),
                ));
            }
        };
        let sampling_ratio = match get(|t| &t.sampling_ratio) {
            // Successes are head-sampled; failures and sampled callers are always exported.
            None => DEFAULT_SAMPLING_RATIO,
            Some(Scalar::Float(f)) => f,
            Some(Scalar::Int(i)) => i as f64,
            Some(other) => {
                let s = self.string("telemetry.sampling_ratio", &other)?;
                s.trim().parse().map_err(|_| {
                    self.err(
                        "telemetry.sampling_ratio",
                        format!("expected a number in 0..1, got `{s}`"),
                    )
                })?
            }
        };
        if !(0.0..=1.0).contains(&sampling_ratio) {
            return Err(self.err("telemetry.sampling_ratio", "must be between 0 and 1"));
        }
        let log_format = match self
            .opt_string("telemetry.log_format", &get(|t| &t.log_format))?
            .as_deref()
            .map(str::trim)
        {
            None | Some("json") => LogFormat::Json,
            Some("text") => LogFormat::Text,
            Some(other) => {
                return Err(self.err(
                    "telemetry.log_format",
                    format!("expected `json` or `text`, got `{other}`"),
                ));
            }
        };
        Ok(TelemetryConfig {
            service_name: self
                .opt_string("telemetry.service_name", &get(|t| &t.service_name))?
                .unwrap_or_else(|| "zuora-gateway".to_owned()),
            otlp_endpoint,
            otlp_protocol,
            sampling_ratio,
            export_queue: self
                .usize("telemetry.export_queue", &get(|t| &t.export_queue), 2048)?
                .max(1),
            log_format,
            log_level: self
                .opt_string("telemetry.log_level", &get(|t| &t.log_level))?
                .unwrap_or_else(|| "info".to_owned()),
            debug_requests: self.usize(
                "telemetry.debug_requests",
                &get(|t| &t.debug_requests),
                10_000,
            )?,
        })
    }
}

/// `30/minute` → (30, 60 s).
fn parse_rate(s: &str) -> Option<(u32, Duration)> {
    let (n, unit) = s.split_once('/')?;
    let n: u32 = n.trim().parse().ok()?;
    if n == 0 {
        return None;
    }
    let per = match unit.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        "d" | "day" => Duration::from_secs(86_400),
        _ => return None,
    };
    Some((n, per))
}

fn join_keys<V>(m: &BTreeMap<String, V>) -> String {
    if m.is_empty() {
        return "none".to_owned();
    }
    m.keys().map(String::as_str).collect::<Vec<_>>().join(", ")
}
