//! The route table: path templates compiled once per config load.
//!
//! Template syntax: literal segments, `{param}` (exactly one segment) and a
//! final `**` (zero or more remaining segments). Routes are tried in file
//! order; the first whose path and method match wins. A path that matches
//! some route but not with this method is a 405 listing the allowed methods.

use std::sync::Arc;

use http::Method;

use crate::config::RouteConfig;
use crate::error::GatewayError;

#[derive(Debug, Clone)]
enum Segment {
    Literal(Box<str>),
    Param,
}

#[derive(Debug, Clone)]
struct CompiledRoute {
    methods: Option<Vec<Method>>,
    /// The standard methods among `methods`, as bits ([`method_bit`]): the
    /// per-route check on every lookup, without following a pointer.
    method_bits: u16,
    segments: Vec<Segment>,
    tail: bool,
    params: Vec<Arc<str>>,
}

/// A successful lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matched {
    /// Index of the route (same as in `Config::routes`).
    pub route: usize,
    /// Parameter values in template order.
    pub params: Vec<String>,
}

/// Compiled routes.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<CompiledRoute>,
}

impl RouteTable {
    /// Compiles validated route configs (templates were checked by `config`).
    pub fn new(routes: &[RouteConfig]) -> Self {
        let routes = routes
            .iter()
            .map(|r| {
                let mut segments = Vec::new();
                let mut params = Vec::new();
                let mut tail = false;
                for seg in r
                    .path
                    .trim_start_matches('/')
                    .split('/')
                    .filter(|s| !s.is_empty())
                {
                    if seg == "**" {
                        tail = true;
                    } else if let Some(name) =
                        seg.strip_prefix('{').and_then(|s| s.strip_suffix('}'))
                    {
                        params.push(Arc::from(name));
                        segments.push(Segment::Param);
                    } else {
                        segments.push(Segment::Literal(seg.into()));
                    }
                }
                CompiledRoute {
                    methods: r.methods.clone(),
                    method_bits: r
                        .methods
                        .iter()
                        .flatten()
                        .fold(0, |bits, m| bits | method_bit(m)),
                    segments,
                    tail,
                    params,
                }
            })
            .collect();
        RouteTable { routes }
    }

    /// Parameter names of route `index`.
    pub fn param_names(&self, index: usize) -> &[Arc<str>] {
        self.routes
            .get(index)
            .map(|r| r.params.as_slice())
            .unwrap_or(&[])
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Finds the route for `method` and `path` (the path must already have
    /// passed [`check_path`]).
    pub fn lookup(&self, method: &Method, path: &str) -> Result<Matched, GatewayError> {
        // The first route whose methods and path both match wins.
        let bit = method_bit(method);
        for (i, r) in self.routes.iter().enumerate() {
            if !r.allows(method, bit) {
                continue;
            }
            if let Some(params) = match_and_capture(r, path) {
                return Ok(Matched { route: i, params });
            }
        }
        // Nothing for this method: 405 if the path matches one of the routes
        // without it (the others were tried above), else 404.
        let mut allowed: Vec<&Method> = Vec::new();
        let mut path_matched = false;
        for r in &self.routes {
            if let Some(ms) = &r.methods
                && !r.allows(method, bit)
                && path_matches(r, path)
            {
                path_matched = true;
                allowed.extend(ms.iter());
            }
        }
        if path_matched {
            allowed.sort_by(|a, b| a.as_str().cmp(b.as_str()));
            allowed.dedup();
            let allow = allowed
                .iter()
                .map(|m| m.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(GatewayError::MethodNotAllowed {
                method: method.to_string(),
                allow,
            });
        }
        Err(GatewayError::NoRoute(format!(
            "{method} {}",
            truncate(path, 200)
        )))
    }
}

/// A bit for each standard method (0 for extension methods).
fn method_bit(m: &Method) -> u16 {
    const STANDARD: [Method; 9] = [
        Method::GET,
        Method::PUT,
        Method::POST,
        Method::DELETE,
        Method::PATCH,
        Method::HEAD,
        Method::OPTIONS,
        Method::CONNECT,
        Method::TRACE,
    ];
    STANDARD.iter().position(|s| s == m).map_or(0, |i| 1 << i)
}

impl CompiledRoute {
    /// Whether the route takes `method` (`bit` is its [`method_bit`]).
    fn allows(&self, method: &Method, bit: u16) -> bool {
        match &self.methods {
            None => true,
            Some(_) if bit != 0 => self.method_bits & bit != 0,
            Some(ms) => ms.contains(method),
        }
    }
}

/// The parameter values if `path` matches `r`, in one pass over the path
/// (values are copied only once the whole path has matched).
fn match_and_capture(r: &CompiledRoute, path: &str) -> Option<Vec<String>> {
    const INLINE: usize = 8;
    let mut found: [&str; INLINE] = [""; INLINE];
    let mut n = 0;
    let mut segs = segments(path);
    for expected in &r.segments {
        let seg = segs.next()?;
        match expected {
            Segment::Literal(lit) => {
                if lit.as_ref() != seg {
                    return None;
                }
            }
            Segment::Param => {
                if let Some(slot) = found.get_mut(n) {
                    *slot = seg;
                }
                n += 1;
            }
        }
    }
    if !r.tail && segs.next().is_some() {
        return None;
    }
    Some(match found.get(..n) {
        Some(values) => values.iter().map(|v| (*v).to_owned()).collect(),
        // More parameters than kept inline (a template nobody writes): a second pass.
        None => r
            .segments
            .iter()
            .zip(segments(path))
            .filter(|(seg, _)| matches!(seg, Segment::Param))
            .map(|(_, v)| v.to_owned())
            .collect(),
    })
}

fn segments(path: &str) -> Segments<'_> {
    Segments {
        rest: path.strip_prefix('/').unwrap_or(path),
    }
}

/// The non-empty `/`-separated segments of a path: what
/// `split('/').filter(|s| !s.is_empty())` yields, with a plain byte loop
/// instead of a `memchr` call per segment (path segments are short).
struct Segments<'a> {
    rest: &'a str,
}

impl<'a> Iterator for Segments<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        loop {
            if self.rest.is_empty() {
                return None;
            }
            let end = self
                .rest
                .bytes()
                .position(|b| b == b'/')
                .unwrap_or(self.rest.len());
            // `/` is ASCII: both cuts are on character boundaries.
            let seg = self.rest.get(..end).unwrap_or("");
            self.rest = self.rest.get(end + 1..).unwrap_or("");
            if !seg.is_empty() {
                return Some(seg);
            }
        }
    }
}

fn path_matches(r: &CompiledRoute, path: &str) -> bool {
    let mut segs = segments(path);
    for expected in &r.segments {
        let Some(seg) = segs.next() else { return false };
        match expected {
            Segment::Literal(lit) => {
                if lit.as_ref() != seg {
                    return false;
                }
            }
            Segment::Param => {}
        }
    }
    r.tail || segs.next().is_none()
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Refuses paths that could reach something other than what the templates
/// name: dot segments, empty segments, encoded slashes, backslashes, encoded
/// dots, NUL and control characters, anything that is not ASCII, path
/// parameters (`;`, which servlet containers strip, so `/..;/` means `/../`
/// to them) and encoded `%` (double encoding, `%252e`).
pub fn check_path(path: &str) -> Result<(), GatewayError> {
    if !path.starts_with('/') {
        return Err(GatewayError::BadPath("the path must start with `/`"));
    }
    let bytes = path.as_bytes();
    // `//` and `/.` are rare: one branch-free pass over neighbouring bytes
    // (vectorizable) rules both out before any substring search.
    let slash_pair = bytes
        .iter()
        .zip(bytes.iter().skip(1))
        .fold(false, |found, (&a, &b)| {
            found | ((a == b'/') & ((b == b'/') | (b == b'.')))
        });
    if slash_pair && path.len() > 1 && path.contains("//") {
        return Err(GatewayError::BadPath(
            "empty path segments (`//`) are not allowed",
        ));
    }
    // The usual path has none of the bytes `check_bytes` looks at: one
    // branch-free pass (vectorizable) finds out.
    let plain = bytes.chunks(64).all(|chunk| {
        chunk.iter().fold(true, |ok, &b| {
            ok & (b > 0x20) & (b < 0x7f) & (b != b'%') & (b != b';') & (b != b'\\')
        })
    });
    if !plain {
        check_bytes(bytes)?;
    }
    // A dot segment needs a `/.`; most paths have none.
    if slash_pair && path.contains("/.") && path.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(GatewayError::BadPath(
            "dot segments (`.` / `..`) are not allowed in the path",
        ));
    }
    Ok(())
}

/// The byte rules of [`check_path`]: the first byte that breaks one decides.
fn check_bytes(bytes: &[u8]) -> Result<(), GatewayError> {
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'\\' => {
                return Err(GatewayError::BadPath(
                    "backslashes are not allowed in the path",
                ));
            }
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                let Some(value) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) else {
                    return Err(GatewayError::BadPath(
                        "invalid percent-encoding in the path",
                    ));
                };
                match value {
                    b'/' | b'\\' => {
                        return Err(GatewayError::BadPath(
                            "encoded slashes are not allowed in the path",
                        ));
                    }
                    b'.' => {
                        return Err(GatewayError::BadPath(
                            "encoded dots are not allowed in the path",
                        ));
                    }
                    b';' | b'%' => {
                        return Err(GatewayError::BadPath(
                            "encoded `;` or `%` are not allowed in the path",
                        ));
                    }
                    0x00..=0x1f | 0x7f..=0xff => {
                        return Err(GatewayError::BadPath(
                            "encoded control or non-ASCII bytes are not allowed in the path",
                        ));
                    }
                    _ => {}
                }
            }
            b';' => {
                return Err(GatewayError::BadPath(
                    "path parameters (`;`) are not allowed in the path",
                ));
            }
            0x00..=0x20 | 0x7f..=0xff => {
                return Err(GatewayError::BadPath(
                    "control, space or non-ASCII characters are not allowed in the path",
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::Validation;

    fn route(name: &str, methods: Option<Vec<Method>>, path: &str) -> RouteConfig {
        RouteConfig {
            name: name.into(),
            methods,
            path: path.into(),
            upstream: "zuora".into(),
            allow_callers: vec!["*".into()],
            rate_limits: vec![],
            validation: Validation::None,
        }
    }

    #[test]
    fn segments_are_the_non_empty_slash_separated_parts() {
        for path in [
            "",
            "/",
            "//",
            "/a",
            "a",
            "/a/",
            "/a//b",
            "/v1/jobs/abc",
            "///x///y//",
            "/é/ü/",
            "/a/b/c/d/e/f/g/h/i",
        ] {
            let want: Vec<&str> = path
                .strip_prefix('/')
                .unwrap_or(path)
                .split('/')
                .filter(|s| !s.is_empty())
                .collect();
            assert_eq!(segments(path).collect::<Vec<_>>(), want, "{path:?}");
        }
    }

    fn table() -> RouteTable {
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
            route("any", None, "/v1/anything/{a}/x/{b}"),
        ])
    }

    /// `check_path` as it was before its fast paths: the reference.
    fn reference_check_path(path: &str) -> Result<(), GatewayError> {
        if !path.starts_with('/') {
            return Err(GatewayError::BadPath("the path must start with `/`"));
        }
        if path.len() > 1 && path.contains("//") {
            return Err(GatewayError::BadPath(
                "empty path segments (`//`) are not allowed",
            ));
        }
        check_bytes(path.as_bytes())?;
        for seg in path.split('/') {
            if seg == "." || seg == ".." {
                return Err(GatewayError::BadPath(
                    "dot segments (`.` / `..`) are not allowed in the path",
                ));
            }
        }
        Ok(())
    }

    /// Every string of up to `max` characters over `alphabet`.
    fn all_strings(alphabet: &[&str], max: usize) -> Vec<String> {
        let mut out = vec![String::new()];
        let mut last = vec![String::new()];
        for _ in 0..max {
            last = last
                .iter()
                .flat_map(|s| alphabet.iter().map(move |c| format!("{s}{c}")))
                .collect();
            out.extend(last.iter().cloned());
        }
        out
    }

    #[test]
    fn check_path_fast_paths_decide_exactly_like_the_byte_loop() {
        let alphabet = [
            "/", ".", "a", "%", "2", "e", "F", ";", "\\", " ", "\u{e9}", "~",
        ];
        let mut checked = 0;
        for tail in all_strings(&alphabet, 5) {
            let path = format!("/{tail}");
            let fast = check_path(&path).map_err(|e| e.to_string());
            let slow = reference_check_path(&path).map_err(|e| e.to_string());
            assert_eq!(fast, slow, "{path:?}");
            checked += 1;
        }
        assert!(checked > 200_000);
    }

    /// `lookup` as it was before matching and capturing in one pass.
    fn reference_lookup(t: &RouteTable, method: &Method, path: &str) -> Result<Matched, String> {
        let mut allowed: Vec<&Method> = Vec::new();
        let mut path_matched = false;
        for (i, r) in t.routes.iter().enumerate() {
            if !path_matches(r, path) {
                continue;
            }
            let capture = || Matched {
                route: i,
                params: r
                    .segments
                    .iter()
                    .zip(segments(path))
                    .filter(|(s, _)| matches!(s, Segment::Param))
                    .map(|(_, v)| v.to_owned())
                    .collect(),
            };
            match &r.methods {
                None => return Ok(capture()),
                Some(ms) if ms.contains(method) => return Ok(capture()),
                Some(ms) => {
                    path_matched = true;
                    allowed.extend(ms.iter());
                }
            }
        }
        if path_matched {
            allowed.sort_by(|a, b| a.as_str().cmp(b.as_str()));
            allowed.dedup();
            return Err(format!("405 {allowed:?}"));
        }
        Err("404".into())
    }

    #[test]
    fn lookup_decides_exactly_like_the_two_pass_reference() {
        let mut routes = vec![
            route("stop", Some(vec![Method::PUT]), "/v1/jobs/{jobId}"),
            route("read", Some(vec![Method::GET]), "/v1/jobs/**"),
            route("post", Some(vec![Method::POST, Method::PUT]), "/v1/{a}"),
            route("any", None, "/v1/anything/{a}/x/{b}"),
            route(
                "deep",
                Some(vec![Method::DELETE]),
                "/{a}/{b}/{c}/{d}/{e}/{f}/{g}/{h}/{i}/{j}",
            ),
        ];
        routes.push(route("root", Some(vec![Method::GET]), "/"));
        routes.push(route(
            "purge",
            Some(vec![Method::from_bytes(b"PURGE").unwrap(), Method::PATCH]),
            "/v1/jobs/{id}",
        ));
        let t = RouteTable::new(&routes);
        let segs = ["v1", "jobs", "anything", "x", "q"];
        let methods = [
            Method::GET,
            Method::PUT,
            Method::POST,
            Method::DELETE,
            Method::PATCH,
            Method::from_bytes(b"PURGE").unwrap(),
        ];
        let mut paths = vec![
            "/".to_owned(),
            "/1/2/3/4/5/6/7/8/9/10".to_owned(),
            "/1/2/3/4/5/6/7/8/9".to_owned(),
        ];
        let mut frontier = vec![String::new()];
        for _ in 0..4 {
            frontier = frontier
                .iter()
                .flat_map(|p| segs.iter().map(move |s| format!("{p}/{s}")))
                .collect();
            paths.extend(frontier.iter().cloned());
        }
        for path in &paths {
            for m in &methods {
                let got = t.lookup(m, path).map_err(|e| match e {
                    GatewayError::MethodNotAllowed { allow, .. } => format!("405 {allow}"),
                    _ => "404".to_owned(),
                });
                let want = reference_lookup(&t, m, path).map_err(|e| {
                    // Same 405 list, in the error's own spelling.
                    e.replace(['[', ']'], "")
                });
                assert_eq!(got, want, "{m} {path}");
            }
        }
    }

    #[test]
    fn param_is_exactly_one_segment() {
        let t = table();
        let m = t
            .lookup(&Method::PUT, "/v1/uno/data-backfill/propagation/jobs/abc")
            .unwrap();
        assert_eq!(
            m,
            Matched {
                route: 0,
                params: vec!["abc".into()]
            }
        );
        assert!(
            t.lookup(
                &Method::PUT,
                "/v1/uno/data-backfill/propagation/jobs/abc/def"
            )
            .is_err()
        );
        assert!(
            t.lookup(&Method::PUT, "/v1/uno/data-backfill/propagation/jobs")
                .is_err()
        );
    }

    #[test]
    fn double_star_matches_zero_or_more_segments() {
        let t = table();
        assert_eq!(
            t.lookup(&Method::GET, "/v1/uno/data-backfill/propagation/jobs")
                .unwrap()
                .route,
            1
        );
        assert_eq!(
            t.lookup(&Method::GET, "/v1/uno/data-backfill/propagation/jobs/a/b")
                .unwrap()
                .route,
            1
        );
    }

    #[test]
    fn wrong_method_is_405_with_allow_and_unknown_path_is_404() {
        let t = table();
        match t.lookup(
            &Method::DELETE,
            "/v1/uno/data-backfill/propagation/jobs/abc",
        ) {
            Err(GatewayError::MethodNotAllowed { allow, .. }) => assert_eq!(allow, "GET, PUT"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            t.lookup(&Method::GET, "/v1/other"),
            Err(GatewayError::NoRoute(_))
        ));
    }

    #[test]
    fn several_params_are_captured_in_order() {
        let m = table().lookup(&Method::POST, "/v1/anything/1/x/2").unwrap();
        assert_eq!(m.params, vec!["1", "2"]);
    }

    #[test]
    fn path_tricks_are_refused() {
        for p in [
            "/v1/uno/data-backfill/propagation/jobs/../../../oauth/token",
            "/v1/./x",
            "/v1/%2e%2e/x",
            "/v1/%2E/x",
            "/v1/a%2Fb",
            "/v1/a%2fb",
            "/v1//x",
            "/v1\\x",
            "/v1/a%5cb",
            "/v1/a%00b",
            "/v1/a%zz",
            "/v1/a%",
            "/v1/\u{e9}",
            "/v1/%c0%ae%c0%ae/x",
            "v1/x",
            "/v1/jobs/..;/..;/oauth/token",
            "/v1/jobs/x;jsessionid=1",
            "/v1/jobs/x%3bx",
            "/v1/jobs/x%3B",
            "/v1/jobs/%252e%252e",
            "",
            "*",
        ] {
            assert!(check_path(p).is_err(), "{p} should be refused");
        }
        assert!(
            check_path("/v1/uno/data-backfill/propagation/jobs/ff8080818bb300af018bb325fe0c58f3")
                .is_ok()
        );
        assert!(check_path("/v1/a%20b").is_ok());
        assert!(check_path("/").is_ok());
    }
}
