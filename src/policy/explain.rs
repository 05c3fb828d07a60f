//! `zuora-gateway explain`: the decision a request would get under a policy —
//! matched route (or why none), allowed or denied and by which pattern, the
//! tenancy rule and the headers it sends, the validation and rate limits that
//! apply. A pure function of the policy: no network, no clock.

use std::fmt;
use std::time::Duration;

use http::Method;

use super::Policy;
use super::route::check_path;
use super::stop_job::check_job_id;
use crate::config::{LimitKey, LimitStore, Validation};
use crate::context::Caller;

/// What [`explain`] found.
#[derive(Debug, Clone)]
pub struct Explanation {
    /// `METHOD PATH` as asked.
    pub request: String,
    /// The caller's identity.
    pub caller: String,
    /// The caller's claims as `name=value` (as given).
    pub claims: Vec<String>,
    /// How callers are authenticated under this policy.
    pub authentication: String,
    /// Routing outcome.
    pub route: RouteOutcome,
}

/// Routing outcome.
#[derive(Debug, Clone)]
pub enum RouteOutcome {
    /// Refused before any route applies (bad path, no route, wrong method).
    Unrouted {
        /// HTTP status the gateway answers with.
        status: u16,
        /// Why.
        reason: String,
    },
    /// A route matched.
    Routed(Box<RouteDecision>),
}

/// The decision on a routed request.
#[derive(Debug, Clone)]
pub struct RouteDecision {
    /// Route name.
    pub name: String,
    /// Index in `routes:`.
    pub index: usize,
    /// `METHODS template`.
    pub template: String,
    /// Path parameters `(name, value)`.
    pub params: Vec<(String, String)>,
    /// The `allow_callers` glob that admits the caller (`None`: denied).
    pub allowed_by: Option<String>,
    /// The route's `allow_callers` as written.
    pub allow_callers: String,
    /// The tenancy decision (only when allowed).
    pub tenancy: Option<TenancyDecision>,
    /// Validation applied, with the path part already checked.
    pub validation: Option<String>,
    /// The rate limits (only when allowed), one line each.
    pub rate_limits: Vec<String>,
}

/// The tenancy outcome.
#[derive(Debug, Clone)]
pub struct TenancyDecision {
    /// Index of the matched rule (`None`: no rule matched).
    pub rule: Option<usize>,
    /// Lines describing the rule's conditions.
    pub conditions: String,
    /// `Zuora-Entity-Ids` sent (`None`: not sent).
    pub entity_ids: Option<String>,
    /// `Zuora-Org-Ids` sent (`None`: not sent).
    pub org_ids: Option<String>,
    /// Whether the caller may narrow the IDs.
    pub caller_may_narrow: bool,
}

impl Explanation {
    /// Whether the request would be let through to Zuora (routing and access
    /// allow it; authentication, body validation and rate limits aside).
    pub fn allowed(&self) -> bool {
        matches!(&self.route, RouteOutcome::Routed(d) if d.allowed_by.is_some())
    }
}

/// Explains how `policy` treats `method path` from `caller` (as if the
/// caller had authenticated with those claims).
pub fn explain(policy: &Policy, caller: &Caller, method: &Method, path: &str) -> Explanation {
    let path_only = path.split('?').next().unwrap_or(path);
    let mut claims: Vec<String> = caller
        .claims
        .iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect();
    claims.sort();
    let base = Explanation {
        request: format!("{method} {path}"),
        caller: caller.identity.to_string(),
        claims,
        authentication: policy.authn.describe(),
        route: RouteOutcome::Unrouted {
            status: 0,
            reason: String::new(),
        },
    };
    if let Err(e) = check_path(path_only) {
        return Explanation {
            route: unrouted(&e),
            ..base
        };
    }
    let matched = match policy.routes.lookup(method, path_only) {
        Ok(m) => m,
        Err(e) => {
            return Explanation {
                route: unrouted(&e),
                ..base
            };
        }
    };
    let Some(route) = policy.config.routes.get(matched.route) else {
        return Explanation {
            route: RouteOutcome::Unrouted {
                status: 500,
                reason: "route index out of range".to_owned(),
            },
            ..base
        };
    };
    let names = policy.routes.param_names(matched.route);
    let params: Vec<(String, String)> = names
        .iter()
        .zip(&matched.params)
        .map(|(n, v)| (n.to_string(), v.clone()))
        .collect();
    let methods = match &route.methods {
        None => "*".to_owned(),
        Some(ms) => ms.iter().map(Method::as_str).collect::<Vec<_>>().join(","),
    };
    let allowed_by = policy
        .allowed_by(matched.route, &caller.identity)
        .map(|g| g.as_str().to_owned());
    let validation = match route.validation {
        Validation::None => None,
        Validation::StopJob => {
            let check = match params.last() {
                Some((name, value)) => match check_job_id(name, value) {
                    Ok(()) => format!("`{name}` is well-formed"),
                    Err(e) => format!("refused with 400: {e}"),
                },
                None => "the route has no path parameter".to_owned(),
            };
            Some(format!(
                "stop_job: job ID must be 32 letters/digits ({check}); body must be {{\"status\":\"Stopping\"}}"
            ))
        }
    };
    let (tenancy, rate_limits) = if allowed_by.is_some() {
        (
            Some(tenancy_decision(policy, caller, matched.route)),
            route
                .rate_limits
                .iter()
                .map(|name| describe_limit(policy, name, caller, &params))
                .collect(),
        )
    } else {
        (None, Vec::new())
    };
    Explanation {
        route: RouteOutcome::Routed(Box::new(RouteDecision {
            name: route.name.clone(),
            index: matched.route,
            template: format!("{methods} {}", route.path),
            params,
            allowed_by,
            allow_callers: policy
                .access
                .get(matched.route)
                .map(ToString::to_string)
                .unwrap_or_default(),
            tenancy,
            validation,
            rate_limits,
        })),
        ..base
    }
}

fn unrouted(e: &crate::error::GatewayError) -> RouteOutcome {
    RouteOutcome::Unrouted {
        status: e.classify().0.as_u16(),
        reason: e.to_string(),
    }
}

fn tenancy_decision(policy: &Policy, caller: &Caller, route: usize) -> TenancyDecision {
    match policy.tenancy.find(caller, route) {
        None => TenancyDecision {
            rule: None,
            conditions: String::new(),
            entity_ids: None,
            org_ids: None,
            caller_may_narrow: false,
        },
        Some(rule) => {
            let mut conditions = format!("callers {}", rule.callers);
            if !rule.route_names.is_empty() {
                conditions.push_str(&format!(", routes {:?}", rule.route_names));
            }
            for (name, pattern) in rule.claim_conditions() {
                conditions.push_str(&format!(", claim {name}={pattern}"));
            }
            let text = |v: Option<&http::HeaderValue>| {
                v.map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            };
            TenancyDecision {
                rule: Some(rule.index),
                conditions,
                entity_ids: text(rule.entity_ids.header_value()),
                org_ids: text(rule.org_ids.header_value()),
                caller_may_narrow: rule.caller_may_narrow,
            }
        }
    }
}

fn describe_limit(
    policy: &Policy,
    name: &str,
    caller: &Caller,
    params: &[(String, String)],
) -> String {
    let Some(l) = policy.config.rate_limits.get(name) else {
        return format!("{name}: (not defined)");
    };
    let key = l
        .key
        .iter()
        .map(|k| match k {
            LimitKey::Caller => format!("caller={}", caller.identity),
            LimitKey::Global => "global".to_owned(),
            LimitKey::Param(p) => {
                let v = params
                    .iter()
                    .find(|(n, _)| n == p)
                    .map_or("?", |(_, v)| v.as_str());
                format!("{p}={v}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    let store = match l.store {
        LimitStore::Local => "local",
        LimitStore::Redis => "redis",
    };
    format!(
        "{name}: {} per {}, burst {}, key [{key}], store {store}",
        l.count,
        per(l.per),
        l.burst
    )
}

fn per(d: Duration) -> String {
    match d.as_secs() {
        1 => "second".to_owned(),
        60 => "minute".to_owned(),
        3600 => "hour".to_owned(),
        86_400 => "day".to_owned(),
        _ => format!("{d:?}"),
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "request:      {}", self.request)?;
        if self.claims.is_empty() {
            writeln!(f, "caller:       {}", self.caller)?;
        } else {
            writeln!(
                f,
                "caller:       {} (claims: {})",
                self.caller,
                self.claims.join(", ")
            )?;
        }
        writeln!(f, "authn:        {}", self.authentication)?;
        let d = match &self.route {
            RouteOutcome::Unrouted { status, reason } => {
                writeln!(f, "route:        none")?;
                return writeln!(f, "decision:     DENIED ({status}): {reason}");
            }
            RouteOutcome::Routed(d) => d,
        };
        write!(
            f,
            "route:        {} (routes[{}]: {})",
            d.name, d.index, d.template
        )?;
        for (n, v) in &d.params {
            write!(f, " {n}={v}")?;
        }
        writeln!(f)?;
        match &d.allowed_by {
            Some(pattern) => writeln!(
                f,
                "decision:     ALLOWED by allow_callers pattern \"{pattern}\""
            )?,
            None => {
                writeln!(
                    f,
                    "decision:     DENIED (403): no allow_callers pattern of route `{}` matches `{}` (patterns: {})",
                    d.name, self.caller, d.allow_callers
                )?;
                return writeln!(
                    f,
                    "              (tenancy, validation and rate limits are not reached)"
                );
            }
        }
        match &d.tenancy {
            Some(TenancyDecision {
                rule: Some(i),
                conditions,
                entity_ids,
                org_ids,
                caller_may_narrow,
            }) => {
                writeln!(f, "tenancy:      rule tenancy[{i}] ({conditions})")?;
                writeln!(
                    f,
                    "              Zuora-Entity-Ids: {}",
                    entity_ids.as_deref().unwrap_or("(not sent)")
                )?;
                writeln!(
                    f,
                    "              Zuora-Org-Ids: {}",
                    org_ids.as_deref().unwrap_or("(not sent)")
                )?;
                if *caller_may_narrow {
                    writeln!(
                        f,
                        "              the caller may send a subset of these IDs (caller_may_narrow)"
                    )?;
                } else {
                    writeln!(
                        f,
                        "              the caller's own Zuora-Entity-Ids / Zuora-Org-Ids are removed"
                    )?;
                }
            }
            _ => {
                writeln!(
                    f,
                    "tenancy:      no rule matches: no Zuora-Entity-Ids / Zuora-Org-Ids are sent"
                )?;
                writeln!(f, "              (the caller's own are removed)")?;
            }
        }
        match &d.validation {
            Some(v) => writeln!(f, "validation:   {v}")?,
            None => writeln!(f, "validation:   none")?,
        }
        if d.rate_limits.is_empty() {
            writeln!(f, "rate limits:  none")?;
        } else {
            writeln!(f, "rate limits:")?;
            for l in &d.rate_limits {
                writeln!(f, "              {l}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use super::*;
    use crate::config::Config;

    const YAML: &str = r#"
server: { listen: 127.0.0.1:8080 }
upstreams: { zuora: { base_url: simulator } }
callers: { trusted_identity: svc }
routes:
  - name: stop-auto-backfill-job
    method: PUT
    path: /v1/uno/data-backfill/propagation/jobs/{jobId}
    upstream: zuora
    allow_callers: ["billing-*", "revenue-ops"]
    rate_limits: [per-caller, per-job]
  - name: read
    method: GET
    path: /v1/uno/data-backfill/propagation/jobs/**
    upstream: zuora
    allow_callers: ["*"]
tenancy:
  - callers: ["billing-eu-*"]
    entity_ids: ["E-1"]
    org_ids: ["org-eu-1", "org-eu-2"]
rate_limits:
  per-caller: { key: caller, rate: 30/minute, burst: 5 }
  per-job: { key: jobId, rate: 1/minute }
"#;

    fn policy() -> Policy {
        let cfg =
            Config::from_yaml(YAML, Path::new("t.yaml"), Path::new("."), &|_: &str| None).unwrap();
        Policy::compile(Arc::new(cfg))
    }

    const STOP: &str = "/v1/uno/data-backfill/propagation/jobs/ff8080818bb300af018bb325fe0c58f3";

    #[test]
    fn an_allowed_caller_sees_pattern_tenancy_headers_and_limits() {
        let p = policy();
        let e = explain(&p, &Caller::named("billing-eu-1"), &Method::PUT, STOP);
        assert!(e.allowed());
        let text = e.to_string();
        for needle in [
            "route:        stop-auto-backfill-job (routes[0]: PUT /v1/uno/data-backfill/propagation/jobs/{jobId})",
            "ALLOWED by allow_callers pattern \"billing-*\"",
            "rule tenancy[0]",
            "Zuora-Entity-Ids: E-1",
            "Zuora-Org-Ids: org-eu-1,org-eu-2",
            "per-caller: 30 per minute, burst 5, key [caller=billing-eu-1], store local",
            "per-job: 1 per minute, burst 1, key [jobId=ff8080818bb300af018bb325fe0c58f3]",
            "`jobId` is well-formed",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }

    #[test]
    fn a_denied_caller_sees_the_patterns_it_failed() {
        let e = explain(&policy(), &Caller::named("intruder"), &Method::PUT, STOP);
        assert!(!e.allowed());
        let text = e.to_string();
        assert!(text.contains("DENIED (403)"), "{text}");
        assert!(text.contains("[\"billing-*\", \"revenue-ops\"]"), "{text}");
        assert!(!text.contains("Zuora-Org-Ids:"), "{text}");
    }

    #[test]
    fn unrouted_requests_say_why() {
        let p = policy();
        let e = explain(&p, &Caller::named("billing-1"), &Method::DELETE, STOP).to_string();
        assert!(e.contains("DENIED (405)") && e.contains("GET, PUT"), "{e}");
        let e = explain(&p, &Caller::named("billing-1"), &Method::GET, "/v1/other").to_string();
        assert!(e.contains("DENIED (404)"), "{e}");
        let e = explain(
            &p,
            &Caller::named("billing-1"),
            &Method::GET,
            "/v1/../oauth/token",
        )
        .to_string();
        assert!(e.contains("DENIED (400)"), "{e}");
    }

    #[test]
    fn a_malformed_job_id_is_reported() {
        let e = explain(
            &policy(),
            &Caller::named("revenue-ops"),
            &Method::PUT,
            "/v1/uno/data-backfill/propagation/jobs/short",
        )
        .to_string();
        assert!(e.contains("refused with 400") && e.contains("got 5"), "{e}");
        assert!(e.contains("no rule matches"), "{e}");
    }
}
