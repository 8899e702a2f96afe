//! Request-path normalization: the first step of every decision (OWASP API1).
//!
//! Rules are matched against the path the app will act on, so the sidecar must see what the
//! app sees. Normalization:
//!
//! 1. refuses anything that is not an origin-form path (`/…`), control characters, raw
//!    non-ASCII, `\`, `#`, and malformed percent-encodings;
//! 2. decodes percent-encoded *unreserved* characters (`%34%33` → `43`) and upper-cases the
//!    hex of every other encoding;
//! 3. refuses encodings that would hide a separator or a traversal: `%2F` (`/`), `%5C`
//!    (`\`), `%25` (double encoding), `%00`, and segments that decode to `.` or `..`;
//! 4. removes `;` path parameters from every segment, as Tomcat and Spring do before they
//!    route (`/public/..;/admin` is `/public/../admin`, so `/admin`; `/a;jsessionid=1/b` is
//!    `/a/b`), so no backend resolves a path the policy did not see;
//! 5. refuses segments whose percent-decoding is not valid UTF-8 (overlong `%c0%ae`),
//!    that decode to look-alikes of `/`, `\` or `.` (fullwidth `／` `．` `＼`, division and
//!    fraction slashes, small and one-dot leaders), or that end in a dot or white space
//!    (`/admin.`, `/admin%20`: Windows and IIS strip them);
//! 6. merges duplicate slashes (`/users//43` → `/users/43`) and resolves plain dot
//!    segments (`/users/42/../43` → `/users/43`), never climbing above the root.
//!
//! The sidecar forwards the normalized path: the app receives exactly the path the
//! decision was made on.
//!
//! Ambiguous input is refused (400), never guessed.

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Does not start with `/`.
    #[error("the path must start with '/'")]
    NotOriginForm,
    /// A byte that may not appear in a path.
    #[error("the path contains a forbidden character")]
    ForbiddenChar,
    /// `%` not followed by two hex digits.
    #[error("the path has a malformed percent-encoding")]
    BadEncoding,
    /// An encoded `/`, `\`, `%` or NUL.
    #[error("the path encodes a separator or a percent sign")]
    EncodedSeparator,
    /// A segment that decodes to `.` or `..` from an encoded form.
    #[error("the path hides a dot segment in an encoding")]
    EncodedTraversal,
    /// Too many segments or too long.
    #[error("the path is too long")]
    TooLong,
    /// A segment whose percent-decoding is not valid UTF-8.
    #[error("the path decodes to invalid UTF-8")]
    InvalidUtf8,
    /// A segment that decodes to a look-alike of `/`, `\` or `.`.
    #[error("the path encodes a look-alike of a separator or a dot")]
    Confusable,
    /// A segment ending in a dot or white space, which some servers strip.
    #[error("a path segment ends in a dot or white space")]
    TrailingDotOrSpace,
}

/// Code points that Unicode compatibility normalization (NFKC) or a server's "best fit"
/// mapping turns into `/`, `\` or `.`.
const CONFUSABLES: [char; 10] = [
    '\u{FF0F}', // fullwidth solidus
    '\u{FF0E}', // fullwidth full stop
    '\u{FF3C}', // fullwidth reverse solidus
    '\u{2215}', // division slash
    '\u{2044}', // fraction slash
    '\u{2216}', // set minus
    '\u{FE52}', // small full stop
    '\u{FE68}', // small reverse solidus
    '\u{2024}', // one dot leader
    '\u{2025}', // two dot leader
];

/// Longest raw path accepted, in bytes.
pub const MAX_PATH_LEN: usize = 8192;

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// A normalized path: the text and its segment boundaries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NormalizedPath {
    text: String,
    /// (start, end) byte offsets of each segment in `text` (after the leading '/').
    segments: Vec<(u32, u32)>,
}

impl NormalizedPath {
    /// The normalized path, e.g. `/users/43`.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The normalized path, owned.
    pub fn into_string(self) -> String {
        self.text
    }

    /// Number of segments (`/` has none, `/a/` has two: `a` and the empty one).
    pub fn len(&self) -> usize {
        self.segments.len()
    }

    /// True for `/`.
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// Segment `i`.
    pub fn segment(&self, i: usize) -> &str {
        let (s, e) = self.segments[i];
        &self.text[s as usize..e as usize]
    }

    /// All segments.
    pub fn segments(&self) -> impl ExactSizeIterator<Item = &str> {
        self.segments
            .iter()
            .map(|&(s, e)| &self.text[s as usize..e as usize])
    }
}

/// Normalizes a raw request path (without the query string). One pass, one buffer: each
/// segment is decoded straight into the output, and `..` truncates back to the previous
/// segment.
pub fn normalize(raw: &str) -> Result<NormalizedPath, PathError> {
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotOriginForm);
    }
    if bytes.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong);
    }
    let mut text = String::with_capacity(raw.len());
    let mut segments: Vec<(u32, u32)> = Vec::with_capacity(8);
    let mut trailing_empty = false;
    // The decoded bytes of a segment that has non-ASCII encodings, to check as UTF-8.
    let mut decoded: Vec<u8> = Vec::new();
    for raw_seg in raw[1..].split('/') {
        // `;` starts the segment's path parameters: they are not part of the path.
        let raw_seg = raw_seg.split_once(';').map_or(raw_seg, |(base, _)| base);
        // Decode into the buffer after a provisional '/'.
        let seg_start = text.len();
        text.push('/');
        let start = text.len();
        let mut had_encoding = false;
        let mut high = false;
        decoded.clear();
        let sb = raw_seg.as_bytes();
        let mut i = 0;
        while i < sb.len() {
            let b = sb[i];
            match b {
                b'%' => {
                    let (h, l) = match (
                        sb.get(i + 1).copied().and_then(hex),
                        sb.get(i + 2).copied().and_then(hex),
                    ) {
                        (Some(h), Some(l)) => (h, l),
                        _ => return Err(PathError::BadEncoding),
                    };
                    let v = h * 16 + l;
                    had_encoding = true;
                    high |= v >= 0x80;
                    decoded.push(v);
                    if matches!(v, b'/' | b'\\' | b'%' | 0) {
                        return Err(PathError::EncodedSeparator);
                    }
                    if is_unreserved(v) {
                        text.push(v as char);
                    } else {
                        text.push('%');
                        text.push(char::from(b"0123456789ABCDEF"[usize::from(h)]));
                        text.push(char::from(b"0123456789ABCDEF"[usize::from(l)]));
                    }
                    i += 3;
                }
                b'#' | b'\\' | b'?' => return Err(PathError::ForbiddenChar),
                0x21..=0x7e => {
                    text.push(b as char);
                    decoded.push(b);
                    i += 1;
                }
                _ => return Err(PathError::ForbiddenChar),
            }
        }
        let seg = &text[start..];
        if high {
            let s = std::str::from_utf8(&decoded).map_err(|_| PathError::InvalidUtf8)?;
            if s.chars().any(|c| CONFUSABLES.contains(&c)) {
                return Err(PathError::Confusable);
            }
        }
        if !matches!(seg, "." | "..")
            && matches!(
                decoded.last(),
                Some(b'.' | b' ' | b'\t' | 0x0b | 0x0c | b'\r' | b'\n')
            )
        {
            return Err(PathError::TrailingDotOrSpace);
        }
        match seg {
            "." | ".." if had_encoding => return Err(PathError::EncodedTraversal),
            "." | "" => {
                // Dot segment or duplicate/trailing slash: drop it.
                text.truncate(seg_start);
                trailing_empty = true;
            }
            ".." => {
                text.truncate(seg_start);
                if let Some((s, _)) = segments.pop() {
                    text.truncate(s as usize - 1);
                }
                trailing_empty = true;
            }
            _ => {
                segments.push((start as u32, text.len() as u32));
                trailing_empty = false;
            }
        }
        if segments.len() > crate::template::MAX_SEGMENTS * 2 {
            return Err(PathError::TooLong);
        }
    }
    // Keep one trailing slash (it is meaningful to many apps), but only after a segment.
    if trailing_empty && !segments.is_empty() {
        text.push('/');
        let at = text.len() as u32;
        segments.push((at, at));
    }
    if text.is_empty() {
        text.push('/');
    }
    Ok(NormalizedPath { text, segments })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Result<String, PathError> {
        normalize(s).map(|p| p.as_str().to_owned())
    }

    #[test]
    fn normalizes_what_apps_treat_as_the_same_path() {
        assert_eq!(n("/users/42").unwrap(), "/users/42");
        assert_eq!(n("/users/%34%33").unwrap(), "/users/43");
        assert_eq!(n("/users/42/../43").unwrap(), "/users/43");
        assert_eq!(n("/users//43").unwrap(), "/users/43");
        assert_eq!(n("/users/./43").unwrap(), "/users/43");
        assert_eq!(n("/../../etc").unwrap(), "/etc");
        assert_eq!(n("/").unwrap(), "/");
        assert_eq!(n("//").unwrap(), "/");
        assert_eq!(n("/orders/").unwrap(), "/orders/");
        assert_eq!(n("/a/b/..").unwrap(), "/a/");
        assert_eq!(n("/caf%c3%a9").unwrap(), "/caf%C3%A9");
        assert_eq!(n("/%7Euser").unwrap(), "/~user");
    }

    #[test]
    fn refuses_what_hides_a_separator_or_traversal() {
        assert_eq!(n("/users/42%2F..%2F43"), Err(PathError::EncodedSeparator));
        assert_eq!(n("/users/%2e%2e/43"), Err(PathError::EncodedTraversal));
        assert_eq!(n("/users/.%2e/43"), Err(PathError::EncodedTraversal));
        assert_eq!(n("/a%5Cb"), Err(PathError::EncodedSeparator));
        assert_eq!(n("/a%252F"), Err(PathError::EncodedSeparator));
        assert_eq!(n("/a%00"), Err(PathError::EncodedSeparator));
        assert_eq!(n("/a%zz"), Err(PathError::BadEncoding));
        assert_eq!(n("/a%4"), Err(PathError::BadEncoding));
        assert_eq!(n("/a\\b"), Err(PathError::ForbiddenChar));
        assert_eq!(n("/a b"), Err(PathError::ForbiddenChar));
        assert_eq!(n("/é"), Err(PathError::ForbiddenChar));
        assert_eq!(n("users"), Err(PathError::NotOriginForm));
        assert_eq!(n("*"), Err(PathError::NotOriginForm));
    }

    /// Forms backends resolve differently from a plain reading: path parameters are
    /// removed before dot segments are resolved, as Tomcat and Spring do.
    #[test]
    fn path_parameters_are_removed_before_dot_segments_resolve() {
        assert_eq!(n("/public/..;/admin/x").unwrap(), "/admin/x");
        assert_eq!(n("/public/..;foo=bar/admin").unwrap(), "/admin");
        assert_eq!(n("/public/.;/admin").unwrap(), "/public/admin");
        assert_eq!(n("/a;jsessionid=0123/b").unwrap(), "/a/b");
        assert_eq!(n("/admin;x/secret").unwrap(), "/admin/secret");
        assert_eq!(n("/users/42;/../43").unwrap(), "/users/43");
        assert_eq!(n("/;/admin").unwrap(), "/admin");
        // Encoded `;` is data, not a parameter (Tomcat decodes it after removing them).
        assert_eq!(n("/a%3Bb").unwrap(), "/a%3Bb");
        // Encoded traversals inside parameters are still refused where they matter.
        assert_eq!(n("/a/%2e%2e;x/b"), Err(PathError::EncodedTraversal));
    }

    #[test]
    fn refuses_invalid_utf8_look_alikes_and_trailing_dots_or_spaces() {
        // Overlong encodings of '.' and '/' (not UTF-8), a lone continuation byte, a
        // truncated sequence.
        assert_eq!(n("/a/%c0%ae%c0%ae/b"), Err(PathError::InvalidUtf8));
        assert_eq!(n("/a%c0%afb"), Err(PathError::InvalidUtf8));
        assert_eq!(n("/a%e0%80%aeb"), Err(PathError::InvalidUtf8));
        assert_eq!(n("/a%80"), Err(PathError::InvalidUtf8));
        assert_eq!(n("/a%c3"), Err(PathError::InvalidUtf8));
        // Fullwidth solidus and full stop, division and fraction slashes.
        assert_eq!(
            n("/public%ef%bc%8f..%ef%bc%8fadmin"),
            Err(PathError::Confusable)
        );
        assert_eq!(n("/%ef%bc%8e%ef%bc%8e/admin"), Err(PathError::Confusable));
        assert_eq!(n("/a%ef%bc%bcb"), Err(PathError::Confusable));
        assert_eq!(n("/a%e2%88%95b"), Err(PathError::Confusable));
        assert_eq!(n("/a%e2%81%84b"), Err(PathError::Confusable));
        // Trailing dots and white space on a segment.
        assert_eq!(n("/admin./x"), Err(PathError::TrailingDotOrSpace));
        assert_eq!(n("/admin.."), Err(PathError::TrailingDotOrSpace));
        assert_eq!(n("/admin%20"), Err(PathError::TrailingDotOrSpace));
        assert_eq!(n("/admin%09/x"), Err(PathError::TrailingDotOrSpace));
        assert_eq!(n("/admin%2e"), Err(PathError::TrailingDotOrSpace));
        // Ordinary non-ASCII and dotted names still pass.
        assert_eq!(
            n("/caf%c3%a9/v1.2/a.json").unwrap(),
            "/caf%C3%A9/v1.2/a.json"
        );
    }

    #[test]
    fn segments_are_addressable() {
        let p = normalize("/a//b/c/").unwrap();
        assert_eq!(p.segments().collect::<Vec<_>>(), ["a", "b", "c", ""]);
        assert_eq!(p.segment(1), "b");
    }
}
