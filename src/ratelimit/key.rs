//! Limiter keys: which bucket a request draws from.
//!
//! A single-part key is the value itself (`alice`, a job ID, or empty for
//! `global`). A multi-part key length-prefixes every part (`5:alice32:ff80…`)
//! so no two different tuples can join to the same key, whatever characters
//! a caller identity or path parameter contains.

use std::fmt::Write as _;

use crate::config::LimitKey;
use crate::context::{Caller, RouteMatch};
use crate::error::GatewayError;

/// The value of one key part for this request.
fn part<'a>(
    part: &'a LimitKey,
    caller: Option<&'a Caller>,
    route: &'a RouteMatch,
) -> Result<&'a str, GatewayError> {
    match part {
        LimitKey::Global => Ok(""),
        // Missing facts mean the stack is assembled in the wrong order; refuse rather than share a bucket.
        LimitKey::Caller => caller.map(|c| &*c.identity).ok_or_else(|| {
            GatewayError::Internal("rate limit keyed by caller runs before authentication".into())
        }),
        LimitKey::Param(name) => route.param(name).ok_or_else(|| {
            GatewayError::Internal(format!(
                "rate limit keyed by path parameter `{name}` on a route without it"
            ))
        }),
    }
}

/// Builds the key of `parts` for a request.
pub fn build_key(
    parts: &[LimitKey],
    caller: Option<&Caller>,
    route: &RouteMatch,
) -> Result<String, GatewayError> {
    match parts {
        [one] => Ok(part(one, caller, route)?.to_owned()),
        many => {
            let mut key = String::new();
            for p in many {
                let v = part(p, caller, route)?;
                // Writing to a String cannot fail.
                let _ = write!(key, "{}:{v}", v.len());
            }
            Ok(key)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::policy::Policy;
    use std::path::Path;
    use std::sync::Arc;

    fn route(path: &str, params: &[&str]) -> RouteMatch {
        let yaml = format!(
            "server: {{ listen: 127.0.0.1:8080 }}\nupstreams: {{ zuora: {{ base_url: simulator }} }}\ncallers: {{ trusted_identity: svc }}\nroutes:\n  - {{ name: r, method: PUT, path: '{path}', upstream: zuora }}\n"
        );
        let config =
            Config::from_yaml(&yaml, Path::new("t.yaml"), Path::new("."), &|_: &str| None).unwrap();
        RouteMatch {
            policy: Arc::new(Policy::compile(Arc::new(config))),
            route: 0,
            params: params.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn single_part_keys_are_the_value_itself() {
        let r = route("/v1/jobs/{jobId}", &["ff80"]);
        let alice = Caller::named("alice");
        assert_eq!(
            build_key(&[LimitKey::Caller], Some(&alice), &r).unwrap(),
            "alice"
        );
        assert_eq!(build_key(&[LimitKey::Global], None, &r).unwrap(), "");
        assert_eq!(
            build_key(&[LimitKey::Param("jobId".into())], None, &r).unwrap(),
            "ff80"
        );
    }

    #[test]
    fn joined_keys_cannot_collide() {
        let r = route("/v1/{a}/{b}", &["x:1", "y"]);
        let r2 = route("/v1/{a}/{b}", &["x", "1:y"]);
        let parts = [LimitKey::Param("a".into()), LimitKey::Param("b".into())];
        let k1 = build_key(&parts, None, &r).unwrap();
        let k2 = build_key(&parts, None, &r2).unwrap();
        assert_ne!(k1, k2);
        assert_eq!(k1, "3:x:11:y");
        let alice = Caller::named("alice");
        let mixed = [LimitKey::Caller, LimitKey::Param("b".into())];
        assert_eq!(build_key(&mixed, Some(&alice), &r).unwrap(), "5:alice1:y");
    }

    #[test]
    fn caller_key_without_a_caller_is_refused_not_shared() {
        let r = route("/v1/jobs/{jobId}", &["ff80"]);
        let e = build_key(&[LimitKey::Caller], None, &r).unwrap_err();
        assert!(matches!(e, GatewayError::Internal(_)));
        let e = build_key(&[LimitKey::Param("nope".into())], None, &r).unwrap_err();
        assert!(matches!(e, GatewayError::Internal(_)));
    }
}
