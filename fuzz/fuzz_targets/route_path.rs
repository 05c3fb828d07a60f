//! The path checks and the route matcher: no panic on any path, and no path
//! that passes `check_path` can carry a traversal or an encoded separator.
#![no_main]

use std::sync::OnceLock;

use http::Method;
use libfuzzer_sys::fuzz_target;
use zuora_gateway::config::{RouteConfig, Validation};
use zuora_gateway::policy::{RouteTable, check_path};

fn table() -> &'static RouteTable {
    static TABLE: OnceLock<RouteTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let route = |name: &str, methods: Option<Vec<Method>>, path: &str| RouteConfig {
            name: name.into(),
            methods,
            path: path.into(),
            upstream: "zuora".into(),
            allow_callers: vec!["*".into()],
            rate_limits: vec![],
            validation: Validation::None,
        };
        RouteTable::new(&[
            route(
                "stop",
                Some(vec![Method::PUT]),
                "/v1/uno/data-backfill/propagation/jobs/{jobId}",
            ),
            route(
                "read",
                Some(vec![Method::GET]),
                "/v1/uno/data-backfill/propagation/jobs/**",
            ),
            route("any", None, "/v1/objects/{type}/x/{id}"),
        ])
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    if check_path(path).is_err() {
        return;
    }
    // What passes the checks is plain ASCII without traversal tricks.
    assert!(path.starts_with('/'));
    assert!(path.is_ascii());
    for seg in path.split('/') {
        assert!(seg != "." && seg != "..", "{path}");
    }
    let lower = path.to_ascii_lowercase();
    for bad in ["%2e", "%2f", "%5c", "%00", "%25", "%3b", "\\", ";", "//"] {
        assert!(!lower.contains(bad), "{path}");
    }
    for method in [Method::GET, Method::PUT, Method::POST] {
        if let Ok(m) = table().lookup(&method, path) {
            for p in &m.params {
                assert!(!p.is_empty() && !p.contains('/'), "{path}: {p}");
            }
        }
    }
});
