//! Path templating for the API inventory: turns the raw paths a sidecar serves into
//! endpoint templates, so `/users/1`, `/users/2`, … are one endpoint, `/users/{id}`.
//!
//! Requests that match a declared endpoint take its template (the engine says so). Other
//! paths are templated segment by segment:
//!
//! 1. A segment that is obviously an identifier becomes a parameter at once:
//!    - integers → `{id}`;
//!    - UUIDs → `{uuid}`;
//!    - hex strings of 16 or more characters → `{hex}`;
//!    - mixed tokens of 8 or more characters that contain both digits and letters (`A1b2C3d4`,
//!      `ord_9f8e7d6c`) → `{token}`.
//! 2. Any other (free-text) segment stays literal until [`LEARN_THRESHOLD`] distinct values
//!    have been seen after the same templated prefix. Then that position becomes `{param}`
//!    from the next request on. So `/org/onboardingStatus` stays literal, but
//!    `/users/alice`, `/users/bob`, … become `/users/{param}` once ten users are seen.
//!
//! Memory is bounded: at most [`MAX_PREFIXES`] prefixes are learned, each holding at most
//! [`LEARN_THRESHOLD`] values. Past that, new prefixes stay literal; the sidecar's table
//! has its own cap. The same code templates paths offline (`apiward inventory --from-log`).

use std::collections::{HashMap, HashSet};

/// Distinct free-text values after one prefix that make the position a parameter.
pub const LEARN_THRESHOLD: usize = 10;
/// Prefixes whose values are tracked.
pub const MAX_PREFIXES: usize = 4096;

/// The parameter an obviously variable segment becomes, if it is one.
pub fn classify(seg: &str) -> Option<&'static str> {
    let b = seg.as_bytes();
    if b.is_empty() {
        return None;
    }
    if b.iter().all(u8::is_ascii_digit) {
        return Some("{id}");
    }
    let is_hex = |c: &u8| c.is_ascii_hexdigit();
    if b.len() == 36
        && [8, 13, 18, 23].iter().all(|&i| b[i] == b'-')
        && b.iter()
            .enumerate()
            .all(|(i, c)| [8, 13, 18, 23].contains(&i) || is_hex(c))
    {
        return Some("{uuid}");
    }
    if b.len() >= 16 && b.iter().all(is_hex) {
        return Some("{hex}");
    }
    if b.len() >= 8
        && b.iter().any(u8::is_ascii_digit)
        && b.iter().any(u8::is_ascii_alphabetic)
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_')
    {
        return Some("{token}");
    }
    None
}

#[derive(Debug)]
enum Learned {
    Values(HashSet<String>),
    Param,
}

/// Templates paths, learning free-text parameters as it goes.
#[derive(Debug, Default)]
pub struct Templater {
    learned: HashMap<String, Learned>,
}

impl Templater {
    /// A templater that has learned nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Prefixes tracked now.
    pub fn len(&self) -> usize {
        self.learned.len()
    }

    /// True when nothing is tracked.
    pub fn is_empty(&self) -> bool {
        self.learned.is_empty()
    }

    /// The template of `path` (already normalized; no query string).
    pub fn template(&mut self, method: &str, path: &str) -> String {
        let mut out = String::with_capacity(path.len());
        let mut key = String::with_capacity(path.len() + method.len() + 1);
        key.push_str(method);
        key.push(' ');
        for seg in path.split('/').skip(1) {
            out.push('/');
            key.push('/');
            if let Some(p) = classify(seg) {
                out.push_str(p);
                key.push_str(p);
                continue;
            }
            let param = match self.learned.get_mut(&key) {
                Some(Learned::Param) => true,
                Some(Learned::Values(seen)) => {
                    if seen.len() < LEARN_THRESHOLD && !seen.contains(seg) {
                        seen.insert(seg.to_owned());
                    }
                    if seen.len() >= LEARN_THRESHOLD {
                        self.learned.insert(key.clone(), Learned::Param);
                    }
                    false
                }
                None => {
                    if self.learned.len() < MAX_PREFIXES {
                        self.learned
                            .insert(key.clone(), Learned::Values([seg.to_owned()].into()));
                    }
                    false
                }
            };
            let part = if param { "{param}" } else { seg };
            out.push_str(part);
            key.push_str(part);
        }
        if out.is_empty() {
            out.push('/');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_become_parameters_at_once() {
        let mut t = Templater::new();
        assert_eq!(t.template("GET", "/users/1"), "/users/{id}");
        assert_eq!(
            t.template("GET", "/users/2/orders/77"),
            "/users/{id}/orders/{id}"
        );
        assert_eq!(
            t.template("GET", "/carts/3f2b8c1e-9d4a-4b7e-8f00-1234567890ab"),
            "/carts/{uuid}"
        );
        assert_eq!(
            t.template("GET", "/blobs/deadbeefcafebabe01"),
            "/blobs/{hex}"
        );
        assert_eq!(t.template("GET", "/orders/ord_9f8e7d6c"), "/orders/{token}");
        assert_eq!(t.template("GET", "/"), "/");
        // Words, short codes and version segments stay literal.
        assert_eq!(
            t.template("GET", "/v1/org/onboardingStatus"),
            "/v1/org/onboardingStatus"
        );
        assert_eq!(t.template("GET", "/api/v2/health"), "/api/v2/health");
    }

    #[test]
    fn free_text_becomes_a_parameter_after_enough_distinct_values() {
        let mut t = Templater::new();
        let names = [
            "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan",
        ];
        for n in names {
            assert_eq!(
                t.template("GET", &format!("/people/{n}")),
                format!("/people/{n}")
            );
        }
        // Repeats do not count twice.
        assert_eq!(t.template("GET", "/people/alice"), "/people/alice");
        // The tenth distinct value teaches the position; from then on it is a parameter.
        assert_eq!(t.template("GET", "/people/judy"), "/people/judy");
        assert_eq!(t.template("GET", "/people/mallory"), "/people/{param}");
        assert_eq!(
            t.template("GET", "/people/alice/avatar"),
            "/people/{param}/avatar"
        );
        // Per method and prefix: another method or prefix has not learned it.
        assert_eq!(t.template("POST", "/people/zed"), "/people/zed");
        assert_eq!(
            t.template("GET", "/org/onboardingStatus"),
            "/org/onboardingStatus"
        );
    }

    #[test]
    fn memory_is_bounded_under_a_spray_of_random_paths() {
        let mut t = Templater::new();
        for i in 0..100_000u32 {
            t.template("GET", &format!("/x{}/y{}/z", i % 5000, i));
        }
        assert!(t.len() <= MAX_PREFIXES, "{}", t.len());
    }
}
