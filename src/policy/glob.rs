//! Caller and claim globs: `*` matches any run of characters (including
//! none), anywhere in the pattern; everything else matches itself,
//! case-sensitively. Compiled once per config load; matching never allocates.

use std::fmt;

/// A compiled glob.
#[derive(Clone, PartialEq, Eq)]
pub struct Glob {
    source: Box<str>,
    kind: Kind,
}

#[derive(Clone, PartialEq, Eq)]
enum Kind {
    /// `*`: everything.
    Any,
    /// No `*`: the whole string.
    Exact,
    /// `prefix*middle*…*suffix`.
    Parts {
        prefix: Box<str>,
        middles: Box<[Box<str>]>,
        suffix: Box<str>,
    },
}

impl Glob {
    /// Compiles `pattern`.
    pub fn new(pattern: &str) -> Self {
        let kind = if !pattern.contains('*') {
            Kind::Exact
        } else if pattern.chars().all(|c| c == '*') {
            Kind::Any
        } else {
            let mut pieces: Vec<&str> = pattern.split('*').collect();
            // `split` on a pattern containing `*` yields at least two pieces.
            let suffix = pieces.pop().unwrap_or_default();
            let prefix = if pieces.is_empty() {
                ""
            } else {
                pieces.remove(0)
            };
            Kind::Parts {
                prefix: prefix.into(),
                middles: pieces
                    .into_iter()
                    .filter(|p| !p.is_empty())
                    .map(Into::into)
                    .collect(),
                suffix: suffix.into(),
            }
        };
        Glob {
            source: pattern.into(),
            kind,
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        match &self.kind {
            Kind::Any => true,
            Kind::Exact => *self.source == *value,
            Kind::Parts {
                prefix,
                middles,
                suffix,
            } => {
                if value.len() < prefix.len() + suffix.len() {
                    return false;
                }
                let Some(rest) = value.strip_prefix(&**prefix) else {
                    return false;
                };
                let Some(mut rest) = rest.strip_suffix(&**suffix) else {
                    return false;
                };
                // Greedy leftmost placement of each middle piece is optimal for `*` globs.
                for m in middles.iter() {
                    match rest.find(&**m) {
                        Some(at) => rest = &rest[at + m.len()..],
                        None => return false,
                    }
                }
                true
            }
        }
    }
}

impl fmt::Debug for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Glob({:?})", self.source)
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// A list of globs: matches when any member does.
#[derive(Debug, Clone, Default)]
pub struct GlobSet {
    globs: Box<[Glob]>,
}

impl GlobSet {
    /// Compiles every pattern.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Self {
        GlobSet {
            globs: patterns.iter().map(|p| Glob::new(p.as_ref())).collect(),
        }
    }

    /// The first glob matching `value`.
    pub fn first_match(&self, value: &str) -> Option<&Glob> {
        self.globs.iter().find(|g| g.matches(value))
    }

    /// Whether any glob matches `value`.
    pub fn matches(&self, value: &str) -> bool {
        self.first_match(value).is_some()
    }

    /// Whether the set is empty (matches nothing).
    pub fn is_empty(&self) -> bool {
        self.globs.is_empty()
    }

    /// The patterns.
    pub fn iter(&self) -> impl Iterator<Item = &Glob> {
        self.globs.iter()
    }
}

impl fmt::Display for GlobSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, g) in self.globs.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "\"{g}\"")?;
        }
        f.write_str("]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn star_matches_any_run_anywhere() {
        let cases: &[(&str, &str, bool)] = &[
            ("*", "", true),
            ("*", "anything", true),
            ("billing-*", "billing-eu-1", true),
            ("billing-*", "billing-", true),
            ("billing-*", "billin", false),
            ("billing-*", "xbilling-a", false),
            ("*-eu", "billing-eu", true),
            ("*-eu", "billing-eu-1", false),
            ("a*b*c", "abc", true),
            ("a*b*c", "a-b-b-c", true),
            ("a*b*c", "acb", false),
            ("a*bb*b", "abbb", true),
            ("a*bb*b", "abb", false),
            ("ab*ba", "aba", false),
            ("**", "x", true),
            ("revenue-ops", "revenue-ops", true),
            ("revenue-ops", "Revenue-ops", false),
            ("*ops*", "revenue-ops-2", true),
            ("é*", "été", true),
        ];
        for (pattern, value, expected) in cases {
            assert_eq!(
                Glob::new(pattern).matches(value),
                *expected,
                "{pattern} vs {value}"
            );
        }
    }

    #[test]
    fn set_reports_the_first_matching_pattern() {
        let s = GlobSet::new(&["revenue-ops", "billing-*", "*"]);
        assert_eq!(
            s.first_match("billing-us").map(Glob::as_str),
            Some("billing-*")
        );
        assert!(GlobSet::new::<&str>(&[]).first_match("x").is_none());
        assert_eq!(s.to_string(), "[\"revenue-ops\", \"billing-*\", \"*\"]");
    }
}
