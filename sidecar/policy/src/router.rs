//! Route matching: a segment trie over path templates, built once per config.
//!
//! Every template that matches a path is found in one walk whose cost depends on the
//! path's length and the trie's branching, not on the number of rules.

use std::collections::HashMap;

use crate::normalize::NormalizedPath;
use crate::template::{PathTemplate, Segment, glob_matches};

#[derive(Debug, Default, Clone)]
struct Node {
    literals: HashMap<Box<str>, u32>,
    param: Option<u32>,
    globs: Vec<(Vec<String>, u32)>,
    /// Templates ending in `**` at this node.
    tails: Vec<u32>,
    /// Templates ending exactly at this node.
    terminal: Vec<u32>,
}

/// A set of templates, each with a dense id, and the trie that finds them.
#[derive(Debug, Clone)]
pub struct Router {
    nodes: Vec<Node>,
    templates: Vec<PathTemplate>,
    by_text: HashMap<String, u32>,
}

impl Default for Router {
    fn default() -> Self {
        Self {
            nodes: vec![Node::default()],
            templates: Vec::new(),
            by_text: HashMap::new(),
        }
    }
}

impl Router {
    /// Adds a template (once per distinct text) and returns its id.
    pub fn insert(&mut self, t: PathTemplate) -> u32 {
        if let Some(&id) = self.by_text.get(t.as_str()) {
            return id;
        }
        let id = self.templates.len() as u32;
        let mut node = 0usize;
        for seg in t.segments() {
            let next = match seg {
                Segment::Tail => {
                    self.nodes[node].tails.push(id);
                    None
                }
                Segment::Literal(l) => Some(match self.nodes[node].literals.get(l.as_str()) {
                    Some(&n) => n,
                    None => {
                        let n = self.new_node();
                        self.nodes[node].literals.insert(l.as_str().into(), n);
                        n
                    }
                }),
                Segment::Param(_) => Some(match self.nodes[node].param {
                    Some(n) => n,
                    None => {
                        let n = self.new_node();
                        self.nodes[node].param = Some(n);
                        n
                    }
                }),
                Segment::Glob(parts) => {
                    let found = self.nodes[node]
                        .globs
                        .iter()
                        .find(|(p, _)| p == parts)
                        .map(|(_, n)| *n);
                    Some(match found {
                        Some(n) => n,
                        None => {
                            let n = self.new_node();
                            self.nodes[node].globs.push((parts.clone(), n));
                            n
                        }
                    })
                }
            };
            match next {
                Some(n) => node = n as usize,
                None => break,
            }
        }
        if !matches!(t.segments().last(), Some(Segment::Tail)) {
            self.nodes[node].terminal.push(id);
        }
        self.by_text.insert(t.as_str().to_owned(), id);
        self.templates.push(t);
        id
    }

    fn new_node(&mut self) -> u32 {
        self.nodes.push(Node::default());
        (self.nodes.len() - 1) as u32
    }

    /// The template with this id.
    pub fn template(&self, id: u32) -> &PathTemplate {
        &self.templates[id as usize]
    }

    /// Number of templates.
    pub fn len(&self) -> usize {
        self.templates.len()
    }

    /// True when no template was added.
    pub fn is_empty(&self) -> bool {
        self.templates.is_empty()
    }

    /// Appends the ids of every template matching `path` to `out` (unordered).
    pub fn matches(&self, path: &NormalizedPath, out: &mut Vec<u32>) {
        self.visit(0, path, 0, out);
    }

    fn visit(&self, node: usize, path: &NormalizedPath, depth: usize, out: &mut Vec<u32>) {
        let n = &self.nodes[node];
        out.extend_from_slice(&n.tails);
        if depth == path.len() {
            out.extend_from_slice(&n.terminal);
            return;
        }
        let seg = path.segment(depth);
        if let Some(&next) = n.literals.get(seg) {
            self.visit(next as usize, path, depth + 1, out);
        }
        if seg.is_empty() {
            return;
        }
        if let Some(next) = n.param {
            self.visit(next as usize, path, depth + 1, out);
        }
        for (parts, next) in &n.globs {
            if glob_matches(parts, seg) {
                self.visit(*next as usize, path, depth + 1, out);
            }
        }
    }
}

/// The value of `{name}` in a path that matched `template`.
pub fn capture<'p>(
    template: &PathTemplate,
    path: &'p NormalizedPath,
    name: &str,
) -> Option<&'p str> {
    template
        .segments()
        .iter()
        .position(|s| matches!(s, Segment::Param(n) if n == name))
        .filter(|&i| i < path.len())
        .map(|i| path.segment(i))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::normalize::normalize;

    fn router(ts: &[&str]) -> Router {
        let mut r = Router::default();
        for t in ts {
            r.insert(PathTemplate::parse(t).unwrap());
        }
        r
    }

    fn hits(r: &Router, path: &str) -> Vec<String> {
        let mut out = Vec::new();
        r.matches(&normalize(path).unwrap(), &mut out);
        let mut v: Vec<String> = out
            .iter()
            .map(|&i| r.template(i).as_str().to_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn finds_every_matching_template() {
        let r = router(&[
            "/users/{id}",
            "/users/me",
            "/users/**",
            "/**",
            "/users/{id}/files/*.json",
            "/",
        ]);
        assert_eq!(
            hits(&r, "/users/me"),
            ["/**", "/users/me", "/users/{id}", "/users/**"]
                .map(String::from)
                .to_vec()
                .tap_sort()
        );
        assert_eq!(
            hits(&r, "/users"),
            ["/**", "/users/**"].map(String::from).to_vec().tap_sort()
        );
        assert_eq!(
            hits(&r, "/users/7/files/a.json"),
            ["/**", "/users/**", "/users/{id}/files/*.json"]
                .map(String::from)
                .to_vec()
                .tap_sort()
        );
        assert_eq!(
            hits(&r, "/users/7/files/a.txt"),
            ["/**", "/users/**"].map(String::from).to_vec().tap_sort()
        );
        assert_eq!(
            hits(&r, "/"),
            ["/", "/**"].map(String::from).to_vec().tap_sort()
        );
        // A parameter never matches an empty segment (trailing slash).
        assert_eq!(
            hits(&r, "/users/"),
            ["/**", "/users/**"].map(String::from).to_vec().tap_sort()
        );
    }

    #[test]
    fn captures_parameters() {
        let t = PathTemplate::parse("/orgs/{org}/users/{userId}").unwrap();
        let p = normalize("/orgs/acme/users/42").unwrap();
        assert_eq!(capture(&t, &p, "userId"), Some("42"));
        assert_eq!(capture(&t, &p, "org"), Some("acme"));
        assert_eq!(capture(&t, &p, "nope"), None);
    }

    trait TapSort {
        fn tap_sort(self) -> Self;
    }
    impl TapSort for Vec<String> {
        fn tap_sort(mut self) -> Self {
            self.sort();
            self
        }
    }
}
