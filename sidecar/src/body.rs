//! Bodies: the boxed body type the proxy answers with, and a request body that refuses to
//! stream past a size limit (so an oversized upload is cut off without being buffered).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full, combinators::BoxBody};

/// Error type of proxied bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body every response has.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// A complete body from bytes.
pub fn full(b: impl Into<Bytes>) -> ProxyBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// The body is larger than the limit.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the limit")]
pub struct TooLarge;

/// Streams the inner body until `limit` bytes have passed, then fails and sets `tripped`.
#[derive(Debug)]
pub struct LimitedBody<B> {
    inner: B,
    remaining: u64,
    tripped: Arc<AtomicBool>,
}

impl<B> LimitedBody<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, limit: u64, tripped: Arc<AtomicBool>) -> Self {
        Self {
            inner,
            remaining: limit,
            tripped,
        }
    }
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > self.remaining {
                        self.tripped.store(true, Ordering::Release);
                        return Poll::Ready(Some(Err(Box::new(TooLarge))));
                    }
                    self.remaining -= n;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Depth of the deepest nesting in a JSON document (scanning bytes; strings are skipped).
pub fn json_depth(bytes: &[u8]) -> usize {
    let (mut depth, mut max, mut in_str, mut esc) = (0usize, 0usize, false, false);
    for &b in bytes {
        if in_str {
            match (esc, b) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Removes the values at JSON pointers (`*` matches every member or element; `**` any
/// number of levels, none included, so `/**/password` removes `password` everywhere).
pub fn remove_pointer(v: &mut serde_json::Value, pointer: &str) {
    let tokens: Vec<String> = pointer
        .split('/')
        .skip(1)
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect();
    remove_tokens(v, &tokens);
}

fn remove_tokens(v: &mut serde_json::Value, tokens: &[String]) {
    let Some((first, rest)) = tokens.split_first() else {
        return;
    };
    use serde_json::Value;
    if first == "**" {
        // Here, then at every level below.
        remove_tokens(v, rest);
        match v {
            Value::Object(map) => map.values_mut().for_each(|c| remove_tokens(c, tokens)),
            Value::Array(items) => items.iter_mut().for_each(|c| remove_tokens(c, tokens)),
            _ => {}
        }
        return;
    }
    match v {
        Value::Object(map) => {
            if rest.is_empty() {
                if first == "*" {
                    map.clear();
                } else {
                    map.remove(first);
                }
            } else if first == "*" {
                map.values_mut().for_each(|c| remove_tokens(c, rest));
            } else if let Some(c) = map.get_mut(first) {
                remove_tokens(c, rest);
            }
        }
        Value::Array(items) => {
            if first == "*" {
                if rest.is_empty() {
                    items.clear();
                } else {
                    items.iter_mut().for_each(|c| remove_tokens(c, rest));
                }
            } else if let Ok(i) = first.parse::<usize>() {
                if rest.is_empty() {
                    if i < items.len() {
                        items.remove(i);
                    }
                } else if let Some(c) = items.get_mut(i) {
                    remove_tokens(c, rest);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_depth_counts_nesting_outside_strings() {
        assert_eq!(json_depth(br#"{"a":[1,{"b":"[[[["}]}"#), 3);
        assert_eq!(json_depth(b"1"), 0);
        assert_eq!(json_depth(br#""\"{""#), 0);
    }

    #[test]
    fn pointers_remove_fields_and_wildcards() {
        let mut v: serde_json::Value = serde_json::from_str(
            r#"{"id":1,"internalNotes":"x","items":[{"sku":"a","costPrice":3},{"sku":"b","costPrice":4}],"a/b":1}"#,
        )
        .unwrap();
        remove_pointer(&mut v, "/internalNotes");
        remove_pointer(&mut v, "/items/*/costPrice");
        remove_pointer(&mut v, "/a~1b");
        remove_pointer(&mut v, "/missing/deeper");
        assert_eq!(
            v,
            serde_json::json!({"id":1,"items":[{"sku":"a"},{"sku":"b"}]})
        );
    }
}

/// A response body that holds a slot of the upstream connection limit until it ends
/// (or is dropped), so the slot frees up when the connection goes back to the pool.
#[derive(Debug)]
pub struct HeldBody<B> {
    inner: B,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl<B> HeldBody<B> {
    /// Wraps `inner`, releasing `permit` at the end of the stream.
    pub fn new(inner: B, permit: Option<tokio::sync::OwnedSemaphorePermit>) -> Self {
        Self { inner, permit }
    }
}

impl<B> Body for HeldBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) || self.inner.is_end_stream() {
            self.permit = None;
        }
        polled.map(|f| f.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
