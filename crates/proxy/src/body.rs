//! Bodies the proxy passes on: streamed frame by frame, closed when idle too long.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// A body that fails when no frame came for `idle` while it was being read. Time the reader
/// spent not asking (a slow client) does not count against the sender.
pub struct IdleBody<B> {
    inner: B,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    /// Kept until the body is done (or dropped): the instance counts as in use and the
    /// upstream request holds its place in the caps meanwhile.
    _held: Option<Box<dyn std::any::Any + Send + Sync>>,
    /// Told once the body has ended (or is dropped: hyper drops a body it is done with).
    end: Option<std::sync::Arc<tokio::sync::Notify>>,
    /// Unix ms of the last frame, for whoever waits on the body's progress.
    progress: Option<std::sync::Arc<std::sync::atomic::AtomicI64>>,
}

impl<B> Drop for IdleBody<B> {
    fn drop(&mut self) {
        if let Some(end) = self.end.take() {
            end.notify_one();
        }
    }
}

/// Unix ms now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl<B> IdleBody<B> {
    pub fn new(inner: B, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            _held: None,
            end: None,
            progress: None,
        }
    }

    /// `progress` holds the time of the body's last frame.
    pub fn progress(mut self, progress: std::sync::Arc<std::sync::atomic::AtomicI64>) -> Self {
        progress.store(now_ms(), std::sync::atomic::Ordering::Relaxed);
        self.progress = Some(progress);
        self
    }

    /// `end` is told (a permit stored) when the body has ended; at once for an empty one.
    pub fn notify_end(mut self, end: std::sync::Arc<tokio::sync::Notify>) -> Self
    where
        B: Body,
    {
        if self.inner.is_end_stream() {
            end.notify_one();
        } else {
            self.end = Some(end);
        }
        self
    }

    pub fn holding(mut self, held: impl std::any::Any + Send + Sync) -> Self {
        self._held = Some(Box::new(held));
        self
    }
}

impl<B> Body for IdleBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(f) => {
                let next = tokio::time::Instant::now() + this.idle;
                this.timer.as_mut().reset(next);
                if let Some(p) = &this.progress {
                    p.store(now_ms(), std::sync::atomic::Ordering::Relaxed);
                }
                if f.is_none() || this.inner.is_end_stream() {
                    if let Some(end) = this.end.take() {
                        end.notify_one();
                    }
                }
                Poll::Ready(f.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    Poll::Ready(Some(Err(
                        format!("no data for {} s", this.idle.as_secs()).into()
                    )))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A short text body (the proxy's own answers).
pub fn text(s: impl Into<String>) -> ProxyBody {
    use http_body_util::BodyExt;
    http_body_util::Full::new(Bytes::from(s.into()))
        .map_err(|never| match never {})
        .boxed()
}
