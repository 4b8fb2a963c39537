//! Server names: what a valid DNS name and route pattern are, and routing by name
//! (an exact name first, then one leading wildcard label).
//!
//! Shared by the config (validating `routes` and certificate `names`), the routing
//! snapshot (SNI routes) and TLS termination (the certificate for a name), so it sits
//! below all of them and imports none.

use std::borrow::Cow;
use std::collections::HashMap;
use std::collections::hash_map::Entry;

/// Longest DNS name in text form, without a trailing dot.
pub const MAX_NAME_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;

/// Routes chosen by server name: exact names first, then one leading wildcard label.
///
/// Names and patterns compare case-insensitively. `*.example.org` matches
/// `a.example.org` but neither `a.b.example.org` nor `example.org`.
#[derive(Debug, Clone)]
pub struct SniRoutes<T> {
    /// Lowercased exact names.
    exact: HashMap<String, T>,
    /// Lowercased wildcard patterns without their leading `*.`.
    wildcard: HashMap<String, T>,
}

/// A route list that cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("SNI route {0}")]
    InvalidPattern(String),
    #[error("SNI route {pattern:?} is listed twice (names are case-insensitive)")]
    Duplicate { pattern: String },
}

/// Checks a route pattern from the config: an exact DNS name or `*.` followed by one.
///
/// The message names the pattern, what is wrong and what is allowed.
pub fn validate_pattern(pattern: &str) -> Result<(), String> {
    let problem = match pattern.strip_prefix("*.") {
        Some("") => Some("has nothing after \"*.\""),
        Some(_) if pattern.len() > MAX_NAME_LEN => Some("is longer than 253 bytes"),
        Some(suffix) if suffix.contains('*') => Some("has more than one wildcard"),
        Some(suffix) => dns_name_problem(suffix.as_bytes()),
        None if pattern.contains('*') => {
            Some("has a wildcard that is not the whole first label followed by '.'")
        }
        None => dns_name_problem(pattern.as_bytes()),
    };
    match problem {
        None => Ok(()),
        Some(why) => Err(format!(
            "{pattern:?} {why}; a route is an exact host name (\"db.example.com\") or one \
             leading wildcard label (\"*.example.org\"), made of ASCII letters, digits, '-' \
             and '.'"
        )),
    }
}

// === impl SniRoutes ===

impl<T> Default for SniRoutes<T> {
    fn default() -> Self {
        Self {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        }
    }
}

impl<T> SniRoutes<T> {
    /// Builds the routes from `(pattern, target)` pairs, refusing invalid patterns and
    /// patterns that differ only by case.
    pub fn new<P: AsRef<str>>(
        routes: impl IntoIterator<Item = (P, T)>,
    ) -> Result<Self, RouteError> {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (pattern, target) in routes {
            let pattern = pattern.as_ref();
            validate_pattern(pattern).map_err(RouteError::InvalidPattern)?;
            let lower = pattern.to_ascii_lowercase();
            let (map, key) = match lower.strip_prefix("*.") {
                Some(suffix) => (&mut wildcard, suffix.to_owned()),
                None => (&mut exact, lower),
            };
            match map.entry(key) {
                Entry::Occupied(_) => {
                    return Err(RouteError::Duplicate {
                        pattern: pattern.to_owned(),
                    });
                }
                Entry::Vacant(slot) => {
                    slot.insert(target);
                }
            }
        }
        Ok(Self { exact, wildcard })
    }

    /// The target for `name`: its exact route, else the wildcard route of its parent
    /// domain, else `None`.
    pub fn lookup(&self, name: &str) -> Option<&T> {
        // Names from `parse_client_hello` are already lowercase: allocate only otherwise.
        let name: Cow<'_, str> = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(name.to_ascii_lowercase())
        } else {
            Cow::Borrowed(name)
        };
        if let Some(target) = self.exact.get(name.as_ref()) {
            return Some(target);
        }
        // A wildcard stands for exactly one non-empty label.
        let (first, parent) = name.split_once('.')?;
        if first.is_empty() {
            return None;
        }
        self.wildcard.get(parent)
    }

    /// True when there are no routes at all.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty()
    }
}

/// What is wrong with `name` as a DNS host name, phrased to follow "it" or the name.
pub fn dns_name_problem(name: &[u8]) -> Option<&'static str> {
    if name.is_empty() {
        return Some("is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return Some("is longer than 253 bytes");
    }
    for label in name.split(|&b| b == b'.') {
        if label.is_empty() {
            return Some("has an empty label (a leading, trailing or doubled '.')");
        }
        if label.len() > MAX_LABEL_LEN {
            return Some("has a label longer than 63 bytes");
        }
        if !label
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Some("contains a character other than ASCII letters, digits, '-' and '.'");
        }
        if label.starts_with(b"-") || label.ends_with(b"-") {
            return Some("has a label that starts or ends with '-'");
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes() -> SniRoutes<&'static str> {
        SniRoutes::new([
            ("db.example.com", "postgres"),
            ("*.example.org", "web-org"),
            ("API.example.org", "api"),
        ])
        .unwrap()
    }

    #[test]
    fn route_matching_table() {
        let routes = routes();
        for (name, expected) in [
            ("db.example.com", Some("postgres")),
            ("DB.Example.COM", Some("postgres")),
            ("x.db.example.com", None),
            ("example.com", None),
            ("a.example.org", Some("web-org")),
            ("A.EXAMPLE.ORG", Some("web-org")),
            ("a.b.example.org", None),
            ("example.org", None),
            (".example.org", None),
            ("aexample.org", None),
            ("api.example.org", Some("api")),
            ("Api.Example.Org", Some("api")),
            ("", None),
        ] {
            assert_eq!(routes.lookup(name).copied(), expected, "{name:?}");
        }
        assert!(!routes.is_empty());
        assert!(
            SniRoutes::<u8>::new(Vec::<(String, u8)>::new())
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn routes_refuse_bad_and_duplicate_patterns() {
        let dup = SniRoutes::new([("a.example", 1), ("A.Example", 2)]).unwrap_err();
        assert_eq!(
            dup,
            RouteError::Duplicate {
                pattern: "A.Example".into()
            }
        );
        let dup = SniRoutes::new([("*.example", 1), ("*.EXAMPLE", 2)]).unwrap_err();
        assert!(matches!(dup, RouteError::Duplicate { .. }));
        // An exact name and a wildcard on the same parent are not duplicates.
        assert!(SniRoutes::new([("example", 1), ("*.example", 2)]).is_ok());
        let bad = SniRoutes::new([("a..b", 1)]).unwrap_err();
        assert!(
            bad.to_string().contains("\"a..b\" has an empty label"),
            "{bad}"
        );
    }

    #[test]
    fn pattern_validation_table() {
        for ok in [
            "db.example.com",
            "*.example.org",
            "localhost",
            "*.com",
            "Mixed-Case.Example",
        ] {
            assert_eq!(validate_pattern(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "*",
            "*.",
            "**.example.org",
            "a.*.example.org",
            "*.*.example.org",
            "*a.example.org",
            "a..b",
            "example.org.",
            "-",
            "ex ample.org",
            "exämple.org",
        ] {
            let message = validate_pattern(bad).expect_err(bad);
            assert!(message.contains("\"*.example.org\""), "{bad}: {message}");
        }
        let long = format!("*.{}.co", vec!["a".repeat(62); 4].join("."));
        assert!(validate_pattern(&long).unwrap_err().contains("253"));
    }
}
