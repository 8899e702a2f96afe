//! Lingering close for inbound connections (what nginx calls `lingering_close`).
//!
//! When the sidecar refuses a request before reading its body (a declared `Content-Length`
//! over `maxBodyBytes`, say), the client is usually still sending. Closing the socket with
//! unread bytes in its receive buffer makes the kernel answer with a TCP RST, and an RST
//! makes the client's kernel throw away the refusal it has received but not yet read: the
//! client sees "connection reset" instead of `413`. So when the connection ends, the
//! sidecar first shuts down its side (TLS `close_notify`, then TCP FIN), and then reads and
//! discards what the client still sends, until the client closes too or a bound is reached
//! ([`LINGER_TIME`], [`LINGER_BYTES`]).
//!
//! In: an accepted stream (TCP or TLS). Out: the same stream, whose `poll_shutdown` lingers.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// The longest a closing connection keeps reading what the client still sends.
pub const LINGER_TIME: Duration = Duration::from_secs(2);
/// The most a closing connection reads (and discards) before it closes anyway.
pub const LINGER_BYTES: u64 = 8 * 1024 * 1024;

/// A stream whose shutdown drains the peer's remaining input (bounded) before it reports
/// the shutdown done.
#[derive(Debug)]
pub struct Lingering<IO> {
    io: IO,
    /// Set once our side is shut down: the deadline of the drain (boxed, so an open
    /// connection carries one pointer, not a timer).
    draining: Option<Pin<Box<Sleep>>>,
    drained: u64,
}

impl<IO> Lingering<IO> {
    /// Wraps a stream.
    pub fn new(io: IO) -> Self {
        Self {
            io,
            draining: None,
            drained: 0,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Lingering<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Lingering<IO> {
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
        let Lingering {
            io,
            draining,
            drained,
        } = self.get_mut();
        if draining.is_none() {
            ready!(Pin::new(&mut *io).poll_shutdown(cx))?;
        }
        let deadline = draining.get_or_insert_with(|| Box::pin(tokio::time::sleep(LINGER_TIME)));
        let mut scratch = [0u8; 4096];
        while *drained < LINGER_BYTES {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut *io).poll_read(cx, &mut buf) {
                // The client closed (or reset) its side: nothing is left to lose.
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => *drained += buf.filled().len() as u64,
                Poll::Pending => {
                    ready!(deadline.as_mut().poll(cx));
                    return Poll::Ready(Ok(()));
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The server answers and closes while the client still has unsent bytes on their way:
    /// with lingering the client reads the whole answer; the drain ends when it closes.
    #[tokio::test]
    async fn a_client_still_sending_reads_the_answer_before_the_close() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut s = Lingering::new(tcp);
            let mut first = [0u8; 16];
            s.read_exact(&mut first).await.unwrap();
            s.write_all(b"413 refused").await.unwrap();
            s.shutdown().await.unwrap();
            s.drained
        });
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        // More than the socket buffers hold, so the server closes with bytes unread.
        let body = vec![b'x'; 4 * 1024 * 1024];
        let (mut r, mut w) = c.split();
        let write = async {
            let _ = w.write_all(&body).await;
            let _ = w.shutdown().await;
        };
        let read = async {
            let mut answer = Vec::new();
            r.read_to_end(&mut answer).await.map(|_| answer)
        };
        let ((), answer) = tokio::join!(write, read);
        assert_eq!(answer.expect("no reset").as_slice(), b"413 refused");
        let drained = server.await.unwrap();
        assert!(drained > 0 && drained <= 4 * 1024 * 1024, "{drained}");
    }

    /// A client that never closes does not hold the connection past the linger time.
    #[tokio::test]
    async fn a_silent_client_is_dropped_after_the_linger_time() {
        let (a, _b) = tokio::io::duplex(64);
        let mut s = Lingering::new(a);
        let started = tokio::time::Instant::now();
        tokio::time::timeout(LINGER_TIME * 5, s.shutdown())
            .await
            .expect("the drain ends on its own")
            .unwrap();
        assert!(started.elapsed() >= LINGER_TIME);
    }
}
