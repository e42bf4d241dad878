//! Bytes both ways between two streams until both ends close or nothing moves for a while:
//! WebSocket tunnels and TCP maps. Two 16 KiB buffers per connection, whatever the traffic.

use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const BUF: usize = 16 * 1024;

/// Copies `a` ⇄ `b`. A side's EOF shuts the other's write half and the other direction goes
/// on; `idle` without a byte either way ends it. Returns the bytes moved (a→b, b→a).
pub async fn pump<A, B>(a: A, b: B, idle: Duration) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let (mut ab_buf, mut ba_buf) = (vec![0u8; BUF], vec![0u8; BUF]);
    let (mut ab, mut ba) = (0u64, 0u64);
    let (mut a_open, mut b_open) = (true, true);
    while a_open || b_open {
        tokio::select! {
            r = ar.read(&mut ab_buf), if a_open => match r {
                Ok(0) | Err(_) => {
                    a_open = false;
                    let _ = tokio::time::timeout(idle, bw.shutdown()).await;
                }
                Ok(n) => {
                    // A peer that stops reading is idle too.
                    match tokio::time::timeout(idle, bw.write_all(&ab_buf[..n])).await {
                        Ok(Ok(())) => ab += n as u64,
                        _ => break,
                    }
                }
            },
            r = br.read(&mut ba_buf), if b_open => match r {
                Ok(0) | Err(_) => {
                    b_open = false;
                    let _ = tokio::time::timeout(idle, aw.shutdown()).await;
                }
                Ok(n) => {
                    match tokio::time::timeout(idle, aw.write_all(&ba_buf[..n])).await {
                        Ok(Ok(())) => ba += n as u64,
                        _ => break,
                    }
                }
            },
            _ = tokio::time::sleep(idle) => break,
        }
    }
    (ab, ba)
}

/// A stream that counts the bytes it moves (read or written) into `seen` — how a connection's
/// idleness is told from outside — and fails a write that cannot progress for `stall`: a peer
/// that stops reading (a full socket buffer, a zero HTTP/2 window) cannot hold the connection
/// for ever.
pub struct Counted<T> {
    inner: T,
    seen: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stall: std::time::Duration,
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<T> Counted<T> {
    pub fn new(
        inner: T,
        seen: std::sync::Arc<std::sync::atomic::AtomicU64>,
        stall: std::time::Duration,
    ) -> Self {
        Self {
            inner,
            seen,
            stall,
            stalled: None,
        }
    }

    /// A write is pending: `Err(TimedOut)` once it has been for `stall`.
    fn check_stall(&mut self, cx: &mut std::task::Context<'_>) -> std::io::Result<()> {
        use std::future::Future;
        let stall = self.stall;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        match timer.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the peer read nothing for the idle timeout",
            )),
            std::task::Poll::Pending => Ok(()),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.seen
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        match std::pin::Pin::new(&mut this.inner).poll_write(cx, data) {
            std::task::Poll::Ready(Ok(n)) => {
                this.stalled = None;
                this.seen
                    .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                std::task::Poll::Ready(Ok(n))
            }
            std::task::Poll::Pending => match this.check_stall(cx) {
                Ok(()) => std::task::Poll::Pending,
                Err(e) => std::task::Poll::Ready(Err(e)),
            },
            other => other,
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        match std::pin::Pin::new(&mut this.inner).poll_flush(cx) {
            std::task::Poll::Pending => match this.check_stall(cx) {
                Ok(()) => std::task::Poll::Pending,
                Err(e) => std::task::Poll::Ready(Err(e)),
            },
            std::task::Poll::Ready(r) => {
                this.stalled = None;
                std::task::Poll::Ready(r)
            }
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
