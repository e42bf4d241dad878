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
    /// Kept until the body is done (or dropped): the instance counts as in use meanwhile.
    _in_use: Option<crate::InUse>,
    /// Told once the body has ended.
    end: Option<std::sync::Arc<tokio::sync::Notify>>,
}

impl<B> IdleBody<B> {
    pub fn new(inner: B, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            _in_use: None,
            end: None,
        }
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

    pub fn holding(mut self, in_use: crate::InUse) -> Self {
        self._in_use = Some(in_use);
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
