//! Path templates: how policies name a set of request paths.
//!
//! Syntax (one template per string, always starting with `/`):
//!
//! | segment      | matches                                             | example            |
//! |--------------|-----------------------------------------------------|--------------------|
//! | `orders`     | exactly that segment                                | `/orders`          |
//! | `{orderId}`  | any one non-empty segment, captured as `orderId`    | `/orders/{orderId}`|
//! | `*`          | any one non-empty segment                           | `/files/*/meta`    |
//! | `v*`, `*.js` | one segment matching the glob (`*` = any characters)| `/static/*.js`     |
//! | `**`         | zero or more segments; only as the last segment     | `/api/**`          |
//!
//! Literal segments may use RFC 3986 unreserved characters, sub-delimiters, `:` and `@`.
//! Percent-encoding, `.`/`..` segments, empty segments and a trailing slash are refused:
//! templates are matched against normalized paths, so they must be normal themselves.

use std::fmt;

/// Most segments a template (or a normalized request path) may have.
pub const MAX_SEGMENTS: usize = 64;
/// Longest template accepted, in bytes.
pub const MAX_TEMPLATE_LEN: usize = 1024;

/// One segment of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Segment {
    /// Exactly this text.
    Literal(String),
    /// Any one segment, captured under this name.
    Param(String),
    /// One segment matching a glob; the parts between `*`s, in order (`*` alone is `["", ""]`).
    Glob(Vec<String>),
    /// Zero or more trailing segments (`**`).
    Tail,
}

/// A parsed, valid path template.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PathTemplate {
    raw: String,
    segments: Vec<Segment>,
}

/// Why a template was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid path template {template:?}: {reason}")]
pub struct TemplateError {
    /// The template as given.
    pub template: String,
    /// What is wrong with it.
    pub reason: String,
}

fn is_literal_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~!$&'()+,;=:@".contains(c)
}

fn is_param_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl PathTemplate {
    /// Parses a template, refusing anything ambiguous.
    pub fn parse(raw: &str) -> Result<Self, TemplateError> {
        let err = |reason: String| TemplateError {
            template: raw.to_owned(),
            reason,
        };
        if raw.len() > MAX_TEMPLATE_LEN {
            return Err(err(format!("longer than {MAX_TEMPLATE_LEN} bytes")));
        }
        let Some(rest) = raw.strip_prefix('/') else {
            return Err(err("must start with '/'".into()));
        };
        let mut segments = Vec::new();
        if rest.is_empty() {
            return Ok(Self {
                raw: raw.to_owned(),
                segments,
            });
        }
        let parts: Vec<&str> = rest.split('/').collect();
        if parts.len() > MAX_SEGMENTS {
            return Err(err(format!("more than {MAX_SEGMENTS} segments")));
        }
        let last = parts.len() - 1;
        for (i, part) in parts.iter().enumerate() {
            let seg = match *part {
                "" if i == last => return Err(err("must not end with '/'".into())),
                "" => return Err(err("empty segment ('//')".into())),
                "." | ".." => return Err(err(format!("dot segment {part:?}"))),
                "**" if i == last => Segment::Tail,
                "**" => return Err(err("'**' is only allowed as the last segment".into())),
                p if p.starts_with('{') && p.ends_with('}') => {
                    let name = &p[1..p.len() - 1];
                    if !is_param_name(name) {
                        return Err(err(format!(
                            "parameter name {name:?} must be a letter or '_' followed by letters, digits or '_'"
                        )));
                    }
                    if segments
                        .iter()
                        .any(|s| matches!(s, Segment::Param(n) if n == name))
                    {
                        return Err(err(format!("parameter {{{name}}} appears twice")));
                    }
                    Segment::Param(name.to_owned())
                }
                p if p.contains('{') || p.contains('}') => {
                    return Err(err(format!(
                        "segment {p:?}: a parameter must be a whole segment, like {{id}}"
                    )));
                }
                p if p.contains("**") => {
                    return Err(err(format!(
                        "segment {p:?}: '**' must be a whole segment; use '*' inside a segment"
                    )));
                }
                p => {
                    if let Some(c) = p.chars().find(|&c| c != '*' && !is_literal_char(c)) {
                        let what = match c {
                            '%' => "percent-encoding (write the decoded character)".to_owned(),
                            '?' | '#' => "a query or fragment".to_owned(),
                            c => format!("the character {c:?}"),
                        };
                        return Err(err(format!("segment {p:?} contains {what}")));
                    }
                    if p.contains('*') {
                        Segment::Glob(p.split('*').map(str::to_owned).collect())
                    } else {
                        Segment::Literal(p.to_owned())
                    }
                }
            };
            segments.push(seg);
        }
        Ok(Self {
            raw: raw.to_owned(),
            segments,
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The parsed segments.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Names of the `{params}` in order.
    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Param(n) => Some(n.as_str()),
            _ => None,
        })
    }

    /// True when the template has no parameter, glob or tail: it names exactly one path.
    pub fn is_exact(&self) -> bool {
        self.segments
            .iter()
            .all(|s| matches!(s, Segment::Literal(_)))
    }
}

impl fmt::Display for PathTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

/// Does one path segment match a glob's parts (`["v", ""]` for `v*`)?
pub fn glob_matches(parts: &[String], segment: &str) -> bool {
    let (first, rest) = match parts.split_first() {
        Some(x) => x,
        None => return segment.is_empty(),
    };
    let Some(mut remaining) = segment.strip_prefix(first.as_str()) else {
        return false;
    };
    let Some((last, middle)) = rest.split_last() else {
        return remaining.is_empty();
    };
    for part in middle {
        match remaining.find(part.as_str()) {
            Some(at) => remaining = &remaining[at + part.len()..],
            None => return false,
        }
    }
    remaining.len() >= last.len() && remaining.ends_with(last.as_str()) && !segment.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_segment_kind() {
        let t = PathTemplate::parse("/api/v*/users/{userId}/files/*.json/**").unwrap();
        assert_eq!(
            t.segments(),
            &[
                Segment::Literal("api".into()),
                Segment::Glob(vec!["v".into(), "".into()]),
                Segment::Literal("users".into()),
                Segment::Param("userId".into()),
                Segment::Literal("files".into()),
                Segment::Glob(vec!["".into(), ".json".into()]),
                Segment::Tail,
            ]
        );
        assert_eq!(t.params().collect::<Vec<_>>(), ["userId"]);
        assert!(PathTemplate::parse("/").unwrap().segments().is_empty());
        assert!(PathTemplate::parse("/orders").unwrap().is_exact());
    }

    #[test]
    fn refuses_ambiguous_templates_with_a_reason() {
        let cases = [
            ("orders", "must start with '/'"),
            ("/orders/", "must not end with '/'"),
            ("/a//b", "empty segment"),
            ("/a/../b", "dot segment"),
            ("/a/**/b", "only allowed as the last segment"),
            ("/a/x**", "'**' must be a whole segment"),
            ("/u/{id}/{id}", "appears twice"),
            ("/u/id{x}", "must be a whole segment"),
            ("/u/{1x}", "parameter name"),
            ("/u/%2F", "percent-encoding"),
            ("/u?x=1", "query or fragment"),
            ("/u/a b", "the character ' '"),
        ];
        for (input, reason) in cases {
            let e = PathTemplate::parse(input).unwrap_err();
            assert!(e.reason.contains(reason), "{input}: {}", e.reason);
        }
    }

    #[test]
    fn globs_match_within_one_segment() {
        let g = |s: &str| match &PathTemplate::parse(&format!("/{s}")).unwrap().segments()[0] {
            Segment::Glob(p) => p.clone(),
            other => panic!("{other:?}"),
        };
        assert!(glob_matches(&g("*"), "anything"));
        assert!(!glob_matches(&g("*"), ""));
        assert!(glob_matches(&g("v*"), "v1"));
        assert!(!glob_matches(&g("v*"), "x1"));
        assert!(glob_matches(&g("*.json"), "a.json"));
        assert!(!glob_matches(&g("*.json"), "a.jsonx"));
        assert!(glob_matches(&g("a*b*c"), "abc"));
        assert!(glob_matches(&g("a*b*c"), "aXbYc"));
        assert!(!glob_matches(&g("a*b*c"), "acb"));
        assert!(!glob_matches(&g("ab*ba"), "aba"));
    }
}
