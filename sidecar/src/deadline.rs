//! Deadlines for every phase of an inbound connection, and room for real callers when the
//! connection limit is reached.
//!
//! accept → first byte and TLS handshake (`limits.handshakeTimeout`) → protocol detection,
//! the HTTP/2 preface and SETTINGS, the first request head (`limits.firstRequestTimeout`,
//! counted from the end of the handshake) → idle: HTTP/1.1 keep-alive connections close
//! after `limits.headerReadTimeout` without a new head (hyper and [`crate::park`]),
//! HTTP/2 connections with no open stream get GOAWAY after `limits.idleTimeout`.
//!
//! Connections that have not sent a request yet are [`Fresh`]: when `limits.maxConnections`
//! are open and another caller arrives, the oldest fresh one is closed to make room, so
//! idle sockets opened by a slow or hostile client cannot starve callers that send requests.

use std::collections::BTreeMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// The connection preface of HTTP/2 with prior knowledge (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Connections that have not sent a request yet, oldest first.
#[derive(Debug, Default)]
pub struct Fresh {
    inner: Mutex<(u64, BTreeMap<u64, Arc<Notify>>)>,
}

impl Fresh {
    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, BTreeMap<u64, Arc<Notify>>)> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new connection; `notify` fires when it is reclaimed.
    pub fn register(self: &Arc<Self>) -> Arc<ConnState> {
        let notify = Arc::new(Notify::new());
        let mut g = self.lock();
        g.0 += 1;
        let id = g.0;
        g.1.insert(id, notify.clone());
        Arc::new(ConnState {
            id,
            fresh: self.clone(),
            reclaim: notify,
            first: Notify::new(),
            requested: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            last_change_ms: AtomicU64::new(crate::inbound::now_ms()),
        })
    }

    /// Closes the oldest connection that has sent nothing yet. Returns whether there was one.
    pub fn reclaim_oldest(&self) -> bool {
        let oldest = self.lock().1.pop_first();
        match oldest {
            Some((_, n)) => {
                n.notify_one();
                true
            }
            None => false,
        }
    }

    /// Connections that have not sent a request.
    pub fn len(&self) -> usize {
        self.lock().1.len()
    }

    /// True when every connection has sent a request.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn remove(&self, id: u64) {
        self.lock().1.remove(&id);
    }
}

/// One connection's requests, as its deadlines see them.
#[derive(Debug)]
pub struct ConnState {
    id: u64,
    fresh: Arc<Fresh>,
    /// Fires when the connection is reclaimed, or when its first request arrives (then
    /// [`ConnState::requested`] is true): the connection task stops watching after it.
    pub reclaim: Arc<Notify>,
    /// Fires when the first request arrives.
    pub first: Notify,
    requested: AtomicBool,
    in_flight: AtomicUsize,
    last_change_ms: AtomicU64,
}

impl ConnState {
    /// A request arrived; the returned guard marks its end.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        if !self.requested.load(Ordering::Relaxed) && !self.requested.swap(true, Ordering::Relaxed)
        {
            self.fresh.remove(self.id);
            self.first.notify_one();
            self.reclaim.notify_one();
        }
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Whether a request has arrived.
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::Relaxed)
    }

    /// Runs `serve` until it ends, or until `deadline` if no request has arrived by then
    /// (`None`: the deadline passed first). Once the first request arrives only `serve` is
    /// polled: keep-alive traffic pays nothing for the deadline.
    pub async fn first_request_by<F: std::future::Future>(
        &self,
        deadline: tokio::time::Instant,
        serve: F,
    ) -> Option<F::Output> {
        tokio::pin!(serve);
        tokio::select! {
            biased;
            r = &mut serve => return Some(r),
            _ = self.first.notified() => {}
            _ = tokio::time::sleep_until(deadline) => {
                if !self.requested() {
                    return None;
                }
            }
        }
        Some(serve.await)
    }

    /// How long the connection has had no request in flight (zero while one is).
    pub fn idle_ms(&self, now_ms: u64) -> u64 {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return 0;
        }
        now_ms.saturating_sub(self.last_change_ms.load(Ordering::Relaxed))
    }
}

impl Drop for ConnState {
    fn drop(&mut self) {
        if !self.requested.load(Ordering::Relaxed) {
            self.fresh.remove(self.id);
        }
    }
}

/// A request in flight on a connection.
#[derive(Debug)]
pub struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0
            .last_change_ms
            .store(crate::inbound::now_ms(), Ordering::Relaxed);
    }
}

/// What a plaintext connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// HTTP/1.x.
    Http1,
    /// HTTP/2 with prior knowledge.
    Http2,
}

/// Reads just enough of a plaintext connection to tell HTTP/1.1 from HTTP/2 with prior
/// knowledge: until the bytes stop matching the HTTP/2 preface, or all 24 of it arrived.
/// `None` when the caller closed or stalled (`PRI * HTTP/2.0` and then silence) past the
/// deadline. The bytes read are given back by the returned stream.
pub async fn detect<IO: AsyncRead + Unpin>(
    mut io: IO,
    deadline: tokio::time::Instant,
) -> Option<(Detected, Rewind<IO>)> {
    let mut buf = Vec::with_capacity(H2_PREFACE.len());
    let proto = loop {
        if !H2_PREFACE.starts_with(&buf) {
            break Detected::Http1;
        }
        if buf.len() == H2_PREFACE.len() {
            break Detected::Http2;
        }
        let mut chunk = [0u8; 24];
        let want = H2_PREFACE.len() - buf.len();
        match tokio::time::timeout_at(deadline, io.read(&mut chunk[..want])).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    };
    Some((
        proto,
        Rewind {
            prefix: Bytes::from(buf),
            io,
        },
    ))
}

/// A stream that first gives back bytes already read from it.
#[derive(Debug)]
pub struct Rewind<IO> {
    prefix: Bytes,
    io: IO,
}

/// Reads `prefix` first, then `io`: what [`Rewind`] and the parking stream share.
pub fn poll_read_prefixed<IO: AsyncRead + Unpin>(
    prefix: &mut Bytes,
    io: &mut IO,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    if prefix.is_empty() {
        return Pin::new(io).poll_read(cx, buf);
    }
    let n = prefix.len().min(buf.remaining());
    buf.put_slice(&prefix[..n]);
    prefix.advance(n);
    Poll::Ready(Ok(()))
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewind<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        poll_read_prefixed(&mut this.prefix, &mut this.io, cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Rewind<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn detect_bytes(sent: &[u8], close: bool) -> Option<(Detected, Vec<u8>)> {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(sent).await.unwrap();
        if close {
            drop(a);
        } else {
            // Keep the writer open (silence) for the duration of the detection.
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                drop(a);
            });
        }
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(200);
        let (d, mut r) = detect(b, deadline).await?;
        let mut got = vec![0u8; sent.len()];
        r.read_exact(&mut got).await.unwrap();
        Some((d, got))
    }

    #[tokio::test]
    async fn tells_the_protocols_apart_and_gives_the_bytes_back() {
        let (d, got) = detect_bytes(b"GET / HTTP/1.1\r\n", false).await.unwrap();
        assert_eq!(
            (d, got.as_slice()),
            (Detected::Http1, &b"GET / HTTP/1.1\r\n"[..])
        );
        // A whole head arriving at once, longer than the preface.
        let head = b"GET /a/long/path HTTP/1.1\r\nhost: x\r\n\r\n";
        let (d, got) = detect_bytes(head, false).await.unwrap();
        assert_eq!(d, Detected::Http1);
        assert!(head.starts_with(&got[..]));
        // `P` is shared by POST, PUT, PATCH and the preface: decided at the second byte.
        let (d, _) = detect_bytes(b"PUT /x HTTP/1.1\r\n", false).await.unwrap();
        assert_eq!(d, Detected::Http1);
        let (d, got) = detect_bytes(H2_PREFACE, false).await.unwrap();
        assert_eq!((d, got.as_slice()), (Detected::Http2, &H2_PREFACE[..]));
    }

    #[tokio::test]
    async fn a_stalled_preface_or_a_lone_byte_ends_at_the_deadline() {
        for stall in [
            &b"P"[..],
            b"PRI * HTTP/2.0",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n",
        ] {
            let started = std::time::Instant::now();
            assert!(detect_bytes(stall, false).await.is_none(), "{stall:?}");
            assert!(started.elapsed() < std::time::Duration::from_secs(2));
        }
        assert!(
            detect_bytes(b"PR", true).await.is_none(),
            "closed mid-preface"
        );
    }

    #[test]
    fn the_oldest_fresh_connection_is_reclaimed_and_one_with_a_request_never() {
        let fresh = Arc::new(Fresh::default());
        let a = fresh.register();
        let b = fresh.register();
        let _req = a.begin();
        assert_eq!(fresh.len(), 1);
        assert!(fresh.reclaim_oldest());
        assert!(
            !fresh.reclaim_oldest(),
            "a has sent a request: not reclaimable"
        );
        drop(b);
        assert!(fresh.is_empty());
    }
}
