//! Parked keep-alive connections: an HTTP/1.1 connection that is idle between requests
//! holds no HTTP state (what nginx does with its keep-alive connections).
//!
//! hyper gives every HTTP/1.1 connection an 8 KiB read buffer and an 8 KiB write buffer for
//! its whole life. With thousands of keep-alive callers, most of them idle at any moment,
//! those buffers are most of the sidecar's memory. So a connection is served in
//! generations: when it has been idle for [`Settings`'s `limits.parkIdleAfter`] (no request
//! in flight, everything written and flushed), hyper closes its side gracefully and hands
//! the stream back ([`hyper::server::conn::http1::Connection::graceful_shutdown`] on an
//! idle connection sends nothing), the stream waits for the caller's next byte with no
//! buffers, and a new hyper connection serves from that byte on. Bytes hyper had read but
//! not parsed are given back to the next generation first.
//!
//! A connection is parked only at a message boundary hyper itself reached: after a request
//! without a body (a request body might be still unread when its response is done), not
//! after an upgrade or `Connection: close`. The idle deadline is hyper's header-read timeout,
//! counted from when the connection went idle, as without parking.
//!
//! In: an accepted stream and the service. Out: the same HTTP/1.1 behaviour, with idle
//! connections costing the TLS session and a few hundred bytes.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

/// What a connection's requests and stream tell the parking loop. Shared by the stream
/// wrapper, the service and the loop, all of which run on the connection's task.
#[derive(Debug, Default)]
pub struct Track {
    /// Requests whose response hyper still holds.
    busy: AtomicUsize,
    /// Requests seen (the idle timer restarts when it changes).
    requests: AtomicU64,
    /// The last request left the stream at a boundary hyper reaches by itself.
    resumable: AtomicBool,
    /// Something was written and not yet flushed.
    unflushed: AtomicBool,
    /// The connection is being parked: its shutdown must not close the stream.
    parking: AtomicBool,
}

impl Track {
    /// A new connection's tracker.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Records a request as it reaches the service; the guard goes on its response body.
    pub fn begin<B: Body>(self: &Arc<Self>, req: &http::Request<B>) -> Guard {
        let h = req.headers();
        let resumable = req.body().is_end_stream()
            && req.version() == http::Version::HTTP_11
            && !h.contains_key(http::header::UPGRADE)
            && !h
                .get_all(http::header::CONNECTION)
                .iter()
                .any(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        self.resumable.store(resumable, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.busy.fetch_add(1, Ordering::Relaxed);
        Guard(self.clone())
    }

    /// Nothing in flight, nothing unflushed, and the stream is at a message boundary.
    fn idle(&self) -> bool {
        self.busy.load(Ordering::Relaxed) == 0
            && self.resumable.load(Ordering::Relaxed)
            && !self.unflushed.load(Ordering::Relaxed)
    }
}

/// Held by a response body until hyper drops it (after writing its last byte).
#[derive(Debug)]
pub struct Guard(Arc<Track>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that holds its request's [`Guard`] (none on HTTP/2).
#[derive(Debug)]
pub struct Tracked<B> {
    inner: B,
    _guard: Option<Guard>,
}

impl<B> Tracked<B> {
    /// Wraps a response body.
    pub fn new(inner: B, guard: Option<Guard>) -> Self {
        Self {
            inner,
            _guard: guard,
        }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The stream under hyper: serves bytes given back by the last generation first, tracks
/// unflushed writes, and keeps the stream open when hyper shuts down to park.
#[derive(Debug)]
pub struct Parkable<IO> {
    io: IO,
    prefix: Bytes,
    track: Arc<Track>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Parkable<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        crate::deadline::poll_read_prefixed(&mut this.prefix, &mut this.io, cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Parkable<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.track.unflushed.store(true, Ordering::Relaxed);
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.track.unflushed.store(true, Ordering::Relaxed);
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.io).poll_flush(cx))?;
        this.track.unflushed.store(false, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.track.parking.load(Ordering::Relaxed) {
            return Pin::new(&mut this.io).poll_flush(cx);
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// How parking is configured for a connection.
#[derive(Debug, Clone)]
pub struct Parking {
    /// Idle this long, a connection parks (zero: as soon as it is idle).
    pub after: Duration,
    /// hyper's header-read timeout: the longest a connection waits for a request head,
    /// idle time included.
    pub header_timeout: Duration,
    /// Connections parked now (`apiward_sidecar_parked_connections`).
    pub parked: prometheus_client::metrics::gauge::Gauge,
}

/// Serves HTTP/1.1 on `io` in generations (see the module docs). `builder` carries the
/// connection limits, and its header-read timeout should be `parking.header_timeout`. `track` must be the tracker the
/// service's [`Track::begin`] calls use.
pub async fn serve_http1<IO, S>(
    io: IO,
    mut svc: S,
    track: Arc<Track>,
    builder: &http1::Builder,
    parking: Parking,
) -> Result<(), hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<http::Request<Incoming>, Response = http::Response<Tracked<crate::body::ProxyBody>>>
        + Unpin,
    S::Future: Unpin + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut io = Parkable {
        io,
        prefix: Bytes::new(),
        track: track.clone(),
    };
    // The first request head is awaited parked too: a connection opened ahead of use (a
    // client's warm pool) costs no buffers either.
    let mut idle_since = Instant::now();
    loop {
        let deadline = idle_since + parking.header_timeout;
        if io.prefix.is_empty() {
            let mut first = [0u8; 1];
            let waited = {
                let _parked = Parked::new(&parking.parked);
                tokio::time::timeout_at(deadline, io.read(&mut first)).await
            };
            match waited {
                Ok(Ok(1)) => io.prefix = Bytes::copy_from_slice(&first),
                // The caller closed, or the stream failed: nothing to answer.
                Ok(_) => return Ok(()),
                Err(_) => {
                    // Idle past the header-read timeout: close (TLS close_notify, FIN).
                    let _ = io.shutdown().await;
                    return Ok(());
                }
            }
        }
        // Boxed: a parked connection frees hyper's state, not only its buffers.
        let mut conn = Box::new(
            builder
                .serve_connection(TokioIo::new(io), svc)
                .with_upgrades(),
        );
        let Some(parked_at) = drive(&mut conn, &track, parking.after, deadline).await? else {
            return Ok(());
        };
        let Some(parts) = conn.into_parts() else {
            return Ok(()); // upgraded
        };
        track.parking.store(false, Ordering::Relaxed);
        svc = parts.service;
        io = parts.io.into_inner();
        // `read_buf` is a view of hyper's whole read buffer: keep only its unparsed bytes.
        io.prefix = if parts.read_buf.is_empty() {
            Bytes::new()
        } else {
            Bytes::copy_from_slice(&parts.read_buf)
        };
        idle_since = parked_at.checked_sub(parking.after).unwrap_or(parked_at);
    }
}

/// Counts a connection as parked while it lives.
struct Parked<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl<'a> Parked<'a> {
    fn new(g: &'a prometheus_client::metrics::gauge::Gauge) -> Self {
        g.inc();
        Self(g)
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Polls a connection until it ends (`None`) or has been parked (`Some(when)`). Its first
/// request head must be complete by `first_head_by` (the idle deadline it was parked with;
/// hyper's own header-read timer, full length, covers the requests after it).
async fn drive<IO, S>(
    conn: &mut http1::UpgradeableConnection<TokioIo<Parkable<IO>>, S>,
    track: &Track,
    after: Duration,
    first_head_by: Instant,
) -> Result<Option<Instant>, hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<http::Request<Incoming>, Response = http::Response<Tracked<crate::body::ProxyBody>>>
        + Unpin,
    S::Future: Unpin + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// What the timer is set for.
    #[derive(PartialEq)]
    enum Armed {
        Nothing,
        FirstHead,
        /// Parking, once idle since this many requests.
        Idle(u64),
    }
    let timer = tokio::time::sleep_until(first_head_by);
    tokio::pin!(timer);
    let mut armed = Armed::Nothing;
    // hyper treats a new connection as busy until its first response is done: parking it
    // earlier would only turn keep-alive off. So a generation parks after one request.
    let first = track.requests.load(Ordering::Relaxed);
    let mut parked_at: Option<Instant> = None;
    std::future::poll_fn(|cx| {
        loop {
            if let Poll::Ready(r) = Pin::new(&mut *conn).poll(cx) {
                return Poll::Ready(r.map(|()| parked_at));
            }
            if parked_at.is_some() {
                return Poll::Pending;
            }
            let seen = track.requests.load(Ordering::Relaxed);
            if seen == first {
                // Still reading the first head: as slow as a slowloris may be, it had
                // the idle time before it too. Closed without an answer, as hyper would.
                if armed != Armed::FirstHead {
                    timer.as_mut().reset(first_head_by);
                    armed = Armed::FirstHead;
                }
                return match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Ok(None)),
                    Poll::Pending => Poll::Pending,
                };
            }
            if !track.idle() {
                armed = Armed::Nothing;
                return Poll::Pending;
            }
            if !after.is_zero() {
                if armed != Armed::Idle(seen) {
                    timer.as_mut().reset(Instant::now() + after);
                    armed = Armed::Idle(seen);
                }
                if timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
            // Idle: hyper closes at once and sends nothing; poll it again to finish.
            track.parking.store(true, Ordering::Relaxed);
            parked_at = Some(Instant::now());
            Pin::new(&mut *conn).graceful_shutdown();
        }
    })
    .await
}
