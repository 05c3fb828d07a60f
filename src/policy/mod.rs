//! The policy: everything a config load compiles for the request path —
//! route table, caller authentication, route access globs, tenancy rules —
//! swapped atomically on reload.

mod explain;
mod glob;
mod route;
pub mod stop_job;
mod tenancy;

use std::sync::Arc;

pub use explain::{Explanation, explain};
pub use glob::{Glob, GlobSet};
pub use route::{Matched, RouteTable, check_path};
pub use tenancy::{ENTITY_IDS, ORG_IDS, TenancyIds, TenancyRule, TenancyRules};

use crate::authn::Authenticator;
use crate::config::Config;
use crate::context::Caller;
use crate::error::GatewayError;

/// One compiled configuration. Requests hold an `Arc<Policy>` from routing to
/// completion, so a reload never changes the rules under an in-flight request.
#[derive(Debug)]
pub struct Policy {
    /// The validated configuration this policy was compiled from.
    pub config: Arc<Config>,
    /// Compiled route templates.
    pub routes: RouteTable,
    /// `allow_callers` of each route, by route index.
    pub access: Vec<GlobSet>,
    /// Tenancy rules, first match wins.
    pub tenancy: TenancyRules,
    /// Caller authentication (shared with the previous policy when
    /// `callers:` did not change, keeping its token cache and JWKS).
    pub authn: Arc<Authenticator>,
}

impl Policy {
    /// Compiles `config`. Cannot fail for a validated config; should key
    /// material still be unusable, the policy refuses every request (fail
    /// closed) and the reason is logged.
    pub fn compile(config: Arc<Config>) -> Policy {
        match Self::try_compile(config.clone(), None) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "caller authentication cannot be built; refusing every request");
                Self::assemble(config, Arc::new(Authenticator::Unavailable(e)))
            }
        }
    }

    /// Compiles `config`, reusing `previous`'s authenticator when the
    /// `callers:` section is unchanged.
    pub fn try_compile(config: Arc<Config>, previous: Option<&Policy>) -> Result<Policy, String> {
        let authn = match previous {
            Some(p) if p.authn.is_built_from(&config.callers) => p.authn.clone(),
            _ => Arc::new(Authenticator::new(&config.callers)?),
        };
        Ok(Self::assemble(config, authn))
    }

    fn assemble(config: Arc<Config>, authn: Arc<Authenticator>) -> Policy {
        let routes = RouteTable::new(&config.routes);
        let access = config
            .routes
            .iter()
            .map(|r| GlobSet::new(&r.allow_callers))
            .collect();
        let tenancy = TenancyRules::new(&config.tenancy, &config.routes);
        Policy {
            config,
            routes,
            access,
            tenancy,
            authn,
        }
    }

    /// The `allow_callers` pattern of route `route` that admits `identity`.
    pub fn allowed_by(&self, route: usize, identity: &str) -> Option<&Glob> {
        self.access
            .get(route)
            .and_then(|set| set.first_match(identity))
    }

    /// Refuses `caller` on route `route` unless one of its `allow_callers`
    /// globs matches (deny by default: an empty list admits nobody).
    pub fn authorize(&self, route: usize, caller: &Caller) -> Result<(), GatewayError> {
        if self.allowed_by(route, &caller.identity).is_some() {
            return Ok(());
        }
        let name = self
            .config
            .routes
            .get(route)
            .map_or("?", |r| r.name.as_str());
        Err(GatewayError::Forbidden(format!(
            "caller `{}` is not allowed to use route `{name}`",
            caller.identity
        )))
    }
}
