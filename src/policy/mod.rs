//! The policy: everything a config load compiles for the request path —
//! route table, caller rules, tenancy rules — swapped atomically on reload.

mod route;

use std::sync::Arc;

pub use route::{Matched, RouteTable, check_path};

use crate::config::Config;

/// One compiled configuration. Requests hold an `Arc<Policy>` from routing to
/// completion, so a reload never changes the rules under an in-flight request.
#[derive(Debug)]
pub struct Policy {
    /// The validated configuration this policy was compiled from.
    pub config: Arc<Config>,
    /// Compiled route templates.
    pub routes: RouteTable,
}

impl Policy {
    /// Compiles `config`.
    pub fn compile(config: Arc<Config>) -> Policy {
        let routes = RouteTable::new(&config.routes);
        Policy { config, routes }
    }
}
