//! Tenancy rules: which `Zuora-Entity-Ids` / `Zuora-Org-Ids` a caller's
//! request carries to Zuora.
//!
//! Rules are tried in file order; the first whose caller globs, route names
//! and claim patterns all match wins. Its IDs are sent as pre-built header
//! values (comma-joined). The caller's own values of these headers are never
//! forwarded, except under a rule with `caller_may_narrow: true`, where a
//! caller value naming a subset of the rule's IDs is kept (anything else is
//! refused with 403).

use std::collections::BTreeSet;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;

use super::glob::{Glob, GlobSet};
use crate::config::{RouteConfig, TenancyRuleConfig};
use crate::context::Caller;
use crate::error::GatewayError;

/// `Zuora-Entity-Ids`.
pub static ENTITY_IDS: HeaderName = HeaderName::from_static("zuora-entity-ids");
/// `Zuora-Org-Ids`.
pub static ORG_IDS: HeaderName = HeaderName::from_static("zuora-org-ids");

/// One claim condition of a rule.
#[derive(Debug, Clone)]
struct ClaimMatcher {
    name: Box<str>,
    glob: Glob,
    /// The pattern as a number, when it is one (numeric claims compare by value).
    number: Option<f64>,
    /// The pattern as a boolean, when it is one.
    boolean: Option<bool>,
}

impl ClaimMatcher {
    fn matches(&self, value: Option<&Value>) -> bool {
        match value {
            Some(Value::String(s)) => self.glob.matches(s),
            Some(Value::Number(n)) => self.number.is_some_and(|want| n.as_f64() == Some(want)),
            Some(Value::Bool(b)) => self.boolean == Some(*b),
            // A list claim (`groups: [a, b]`) matches when any string member does.
            Some(Value::Array(items)) => items
                .iter()
                .any(|v| matches!(v, Value::String(s) if self.glob.matches(s))),
            Some(Value::Null) | Some(Value::Object(_)) | None => false,
        }
    }
}

/// The IDs one rule sends for one header.
#[derive(Debug, Clone)]
pub struct TenancyIds {
    ids: Box<[Box<str>]>,
    /// Pre-built comma-joined value; `None` when the list is empty (no header sent).
    value: Option<HeaderValue>,
}

impl TenancyIds {
    fn new(ids: &[String]) -> Self {
        let value = if ids.is_empty() {
            None
        } else {
            // Config validation refused IDs with commas or control characters.
            HeaderValue::from_str(&ids.join(",")).ok()
        };
        TenancyIds {
            ids: ids.iter().map(|s| s.as_str().into()).collect(),
            value,
        }
    }

    /// The IDs.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.ids.iter().map(|s| &**s)
    }

    /// The header value sent (`None`: header not sent).
    pub fn header_value(&self) -> Option<&HeaderValue> {
        self.value.as_ref()
    }

    fn contains(&self, id: &str) -> bool {
        self.ids.iter().any(|i| &**i == id)
    }
}

/// One compiled tenancy rule.
#[derive(Debug, Clone)]
pub struct TenancyRule {
    /// Position in the config's `tenancy:` list.
    pub index: usize,
    /// Caller globs.
    pub callers: GlobSet,
    /// Route indexes this rule is limited to (`None`: all routes).
    routes: Option<Box<[usize]>>,
    /// Route names as written (for explain).
    pub route_names: Vec<String>,
    claims: Box<[ClaimMatcher]>,
    /// `Zuora-Entity-Ids`.
    pub entity_ids: TenancyIds,
    /// `Zuora-Org-Ids`.
    pub org_ids: TenancyIds,
    /// Whether a caller may send a subset of the rule's IDs.
    pub caller_may_narrow: bool,
}

impl TenancyRule {
    /// Whether this rule applies to `caller` on route `route`.
    pub fn applies(&self, caller: &Caller, route: usize) -> bool {
        if let Some(routes) = &self.routes
            && !routes.contains(&route)
        {
            return false;
        }
        self.callers.matches(&caller.identity)
            && self
                .claims
                .iter()
                .all(|c| c.matches(caller.claims.get(&*c.name)))
    }

    /// The claim conditions as `name=pattern` (for explain).
    pub fn claim_conditions(&self) -> impl Iterator<Item = (&str, &str)> {
        self.claims.iter().map(|c| (&*c.name, c.glob.as_str()))
    }
}

/// All tenancy rules of one config, compiled.
#[derive(Debug, Clone, Default)]
pub struct TenancyRules {
    rules: Box<[TenancyRule]>,
}

impl TenancyRules {
    /// Compiles validated rules (route names were checked by `config`).
    pub fn new(rules: &[TenancyRuleConfig], routes: &[RouteConfig]) -> Self {
        let rules = rules
            .iter()
            .enumerate()
            .map(|(index, r)| TenancyRule {
                index,
                callers: GlobSet::new(&r.callers),
                routes: if r.routes.is_empty() {
                    None
                } else {
                    Some(
                        r.routes
                            .iter()
                            .filter_map(|name| routes.iter().position(|route| &route.name == name))
                            .collect(),
                    )
                },
                route_names: r.routes.clone(),
                claims: r
                    .claims
                    .iter()
                    .map(|(name, pattern)| ClaimMatcher {
                        name: name.as_str().into(),
                        glob: Glob::new(pattern),
                        number: pattern.trim().parse().ok(),
                        boolean: pattern.trim().parse().ok(),
                    })
                    .collect(),
                entity_ids: TenancyIds::new(&r.entity_ids),
                org_ids: TenancyIds::new(&r.org_ids),
                caller_may_narrow: r.caller_may_narrow,
            })
            .collect();
        TenancyRules { rules }
    }

    /// The first rule that applies.
    pub fn find(&self, caller: &Caller, route: usize) -> Option<&TenancyRule> {
        self.rules.iter().find(|r| r.applies(caller, route))
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Rewrites the tenancy headers of a request from `caller` on `route`:
    /// removes the caller's, then sets the matched rule's (or keeps a
    /// permitted narrowing). Returns the index of the rule that matched.
    pub fn apply(
        &self,
        headers: &mut HeaderMap,
        caller: &Caller,
        route: usize,
    ) -> Result<Option<usize>, GatewayError> {
        let rule = self.find(caller, route);
        // The caller's values are always taken out first: nothing below forwards them unchecked.
        // Callers rarely send either: one pass over the names finds out,
        // where looking each up would hash it.
        let (sent_entity, sent_org) = if headers
            .keys()
            .any(|name| name == ENTITY_IDS || name == ORG_IDS)
        {
            (take_all(headers, &ENTITY_IDS), take_all(headers, &ORG_IDS))
        } else {
            (None, None)
        };
        let Some(rule) = rule else {
            return Ok(None);
        };
        for (name, ids, sent) in [
            (&ENTITY_IDS, &rule.entity_ids, sent_entity),
            (&ORG_IDS, &rule.org_ids, sent_org),
        ] {
            let value = match sent {
                Some(values) if rule.caller_may_narrow => {
                    Some(narrowing(name, &values, ids, rule.index)?)
                }
                _ => ids.header_value().cloned(),
            };
            if let Some(v) = value {
                headers.insert(name.clone(), v);
            }
        }
        Ok(Some(rule.index))
    }
}

/// Removes every value of `name`; `Some` when the caller sent any.
fn take_all(headers: &mut HeaderMap, name: &HeaderName) -> Option<Vec<HeaderValue>> {
    if !headers.contains_key(name) {
        return None;
    }
    match headers.entry(name) {
        http::header::Entry::Occupied(e) => Some(e.remove_entry_mult().1.collect()),
        http::header::Entry::Vacant(_) => None,
    }
}

/// Checks that the caller's values name a non-empty subset of `allowed`;
/// returns the value to forward (the caller's, re-joined when it was sent
/// in several header lines).
fn narrowing(
    name: &HeaderName,
    values: &[HeaderValue],
    allowed: &TenancyIds,
    rule: usize,
) -> Result<HeaderValue, GatewayError> {
    let header = display_name(name);
    let mut seen = BTreeSet::new();
    for v in values {
        let text = v.to_str().map_err(|_| {
            GatewayError::Forbidden(format!(
                "{header} contains characters that are not visible ASCII"
            ))
        })?;
        for id in text.split(',').map(str::trim) {
            if id.is_empty() {
                return Err(GatewayError::Forbidden(format!(
                    "{header} contains an empty ID"
                )));
            }
            if !allowed.contains(id) {
                return Err(GatewayError::Forbidden(format!(
                    "{header} may only name IDs allowed to this caller by tenancy rule {rule}; `{}` is not one of them",
                    truncate(id, 64)
                )));
            }
            seen.insert(id);
        }
    }
    if values.len() == 1 {
        return Ok(values[0].clone());
    }
    let joined = seen.into_iter().collect::<Vec<_>>().join(",");
    HeaderValue::from_str(&joined)
        .map_err(|_| GatewayError::Forbidden(format!("{header} is not a valid header value")))
}

fn display_name(name: &HeaderName) -> &'static str {
    if name == ENTITY_IDS {
        "Zuora-Entity-Ids"
    } else {
        "Zuora-Org-Ids"
    }
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::Validation;

    fn route(name: &str) -> RouteConfig {
        RouteConfig {
            name: name.into(),
            methods: None,
            path: format!("/{name}"),
            upstream: "zuora".into(),
            allow_callers: vec!["*".into()],
            rate_limits: vec![],
            validation: Validation::None,
        }
    }

    fn rule(callers: &[&str], entity: &[&str], orgs: &[&str]) -> TenancyRuleConfig {
        TenancyRuleConfig {
            callers: callers.iter().map(|s| s.to_string()).collect(),
            routes: vec![],
            claims: BTreeMap::new(),
            entity_ids: entity.iter().map(|s| s.to_string()).collect(),
            org_ids: orgs.iter().map(|s| s.to_string()).collect(),
            caller_may_narrow: false,
        }
    }

    fn caller(name: &str, claims: serde_json::Value) -> Caller {
        Caller::new(name, claims.as_object().cloned().unwrap_or_default())
    }

    fn routes() -> Vec<RouteConfig> {
        vec![route("stop"), route("read")]
    }

    #[test]
    fn first_matching_rule_sets_both_headers_and_replaces_spoofed_values() {
        let rules = TenancyRules::new(
            &[
                rule(&["billing-eu-*"], &["E1"], &["org-eu-1", "org-eu-2"]),
                rule(&["*"], &[], &["org-us"]),
            ],
            &routes(),
        );
        let mut h = HeaderMap::new();
        h.insert("zuora-entity-ids", HeaderValue::from_static("SPOOF"));
        h.append("zuora-org-ids", HeaderValue::from_static("org-spoof"));
        h.append("zuora-org-ids", HeaderValue::from_static("org-spoof-2"));
        rules
            .apply(&mut h, &caller("billing-eu-7", serde_json::json!({})), 0)
            .unwrap();
        assert_eq!(
            h.get_all("zuora-entity-ids").iter().collect::<Vec<_>>(),
            ["E1"]
        );
        assert_eq!(
            h.get_all("zuora-org-ids").iter().collect::<Vec<_>>(),
            ["org-eu-1,org-eu-2"]
        );

        let mut h = HeaderMap::new();
        h.insert("zuora-entity-ids", HeaderValue::from_static("SPOOF"));
        rules
            .apply(&mut h, &caller("revenue-ops", serde_json::json!({})), 0)
            .unwrap();
        assert!(
            h.get("zuora-entity-ids").is_none(),
            "an empty list sends no header"
        );
        assert_eq!(h["zuora-org-ids"], "org-us");
    }

    #[test]
    fn no_matching_rule_removes_caller_headers_and_sends_none() {
        let rules = TenancyRules::new(&[rule(&["billing-*"], &["E1"], &[])], &routes());
        let mut h = HeaderMap::new();
        h.insert("zuora-entity-ids", HeaderValue::from_static("SPOOF"));
        h.insert("zuora-org-ids", HeaderValue::from_static("SPOOF"));
        rules
            .apply(&mut h, &caller("other", serde_json::json!({})), 0)
            .unwrap();
        assert!(h.is_empty());
    }

    #[test]
    fn rules_can_be_limited_to_routes_and_claims() {
        let mut r0 = rule(&["*"], &["E-READ"], &[]);
        r0.routes = vec!["read".into()];
        let mut r1 = rule(&["*"], &["E-GOLD"], &[]);
        r1.claims.insert("tier".into(), "gold*".into());
        r1.claims.insert("level".into(), "3".into());
        let rules = TenancyRules::new(&[r0, r1, rule(&["*"], &["E-ANY"], &[])], &routes());
        let gold = caller("svc", serde_json::json!({"tier": "gold-plus", "level": 3}));
        let silver = caller("svc", serde_json::json!({"tier": "silver", "level": 3}));
        let gold_wrong_level = caller("svc", serde_json::json!({"tier": "gold", "level": "4"}));
        assert_eq!(rules.find(&gold, 1).unwrap().index, 0);
        assert_eq!(rules.find(&gold, 0).unwrap().index, 1);
        assert_eq!(rules.find(&silver, 0).unwrap().index, 2);
        assert_eq!(rules.find(&gold_wrong_level, 0).unwrap().index, 2);
        let listed = caller(
            "svc",
            serde_json::json!({"tier": ["bronze", "gold"], "level": 3.0}),
        );
        assert_eq!(rules.find(&listed, 0).unwrap().index, 1);
    }

    #[test]
    fn narrowing_keeps_a_subset_and_refuses_anything_else() {
        let mut r = rule(&["*"], &["E1", "E2"], &["o1", "o2", "o3"]);
        r.caller_may_narrow = true;
        let rules = TenancyRules::new(&[r], &routes());
        let c = caller("svc", serde_json::json!({}));

        let mut h = HeaderMap::new();
        h.insert("zuora-entity-ids", HeaderValue::from_static("E2"));
        h.insert("zuora-org-ids", HeaderValue::from_static("o1, o3"));
        rules.apply(&mut h, &c, 0).unwrap();
        assert_eq!(h["zuora-entity-ids"], "E2");
        assert_eq!(h["zuora-org-ids"], "o1, o3");

        let mut h = HeaderMap::new();
        rules.apply(&mut h, &c, 0).unwrap();
        assert_eq!(
            h["zuora-entity-ids"], "E1,E2",
            "no caller value: the rule's list"
        );

        for (name, bad) in [
            ("zuora-entity-ids", "E3"),
            ("zuora-org-ids", "o1,o4"),
            ("zuora-org-ids", "o1,,o2"),
            ("zuora-org-ids", ""),
        ] {
            let mut h = HeaderMap::new();
            h.insert(name, HeaderValue::from_static(bad));
            let e = rules.apply(&mut h, &c, 0).unwrap_err();
            assert!(
                matches!(e, GatewayError::Forbidden(_)),
                "{name}: {bad}: {e:?}"
            );
        }
    }

    #[test]
    fn narrowing_is_refused_when_the_rule_does_not_allow_it() {
        let rules = TenancyRules::new(&[rule(&["*"], &["E1", "E2"], &[])], &routes());
        let mut h = HeaderMap::new();
        h.insert("zuora-entity-ids", HeaderValue::from_static("E2"));
        rules
            .apply(&mut h, &caller("svc", serde_json::json!({})), 0)
            .unwrap();
        assert_eq!(h["zuora-entity-ids"], "E1,E2");
    }
}
