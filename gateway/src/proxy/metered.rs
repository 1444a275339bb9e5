//! Byte counting for bodies and tunnel streams.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::exchange::{ByteCounts, Exchange};

/// Which counter a body feeds.
#[derive(Debug, Clone, Copy)]
pub enum Direction {
    /// Agent -> destination.
    Sent,
    /// Destination -> agent.
    Received,
}

pin_project_lite::pin_project! {
    /// Counts data bytes as they pass. When it carries the exchange, the audit line is
    /// written when the body ends or is dropped, whichever comes first.
    pub struct CountingBody<B> {
        #[pin]
        inner: B,
        counts: Arc<ByteCounts>,
        direction: Direction,
        finish: Finisher,
    }
}

/// Writes the exchange's audit line once: at the end of the body, or when dropped.
struct Finisher {
    pending: Option<(Exchange, u16)>,
    counts: Arc<ByteCounts>,
}

impl Finisher {
    fn accounting(&mut self) -> Option<&mut super::llm::Accounting> {
        self.pending
            .as_mut()
            .and_then(|(ex, _)| ex.accounting_mut())
    }

    fn finish(&mut self, error: Option<String>) {
        if let Some((exchange, status)) = self.pending.take() {
            exchange.finish(status, &self.counts, error);
        }
    }
}

impl Drop for Finisher {
    fn drop(&mut self) {
        // Dropped before the end: the agent went away mid-body, or the body was
        // empty and never polled. Either way the line records what moved.
        self.finish(None);
    }
}

impl<B> CountingBody<B> {
    pub fn new(inner: B, counts: Arc<ByteCounts>, direction: Direction) -> Self {
        Self {
            inner,
            finish: Finisher {
                pending: None,
                counts: counts.clone(),
            },
            counts,
            direction,
        }
    }

    /// Writes the exchange's audit line with `status` once this body is done.
    pub fn finishing(mut self, exchange: Exchange, status: u16) -> Self {
        self.finish.pending = Some((exchange, status));
        self
    }
}

impl<B> Body for CountingBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    match this.direction {
                        Direction::Sent => this.counts.add_sent(n),
                        Direction::Received => this.counts.add_received(n),
                    }
                    // The response's usage is read from the bytes as they pass.
                    if let Some(acc) = this.finish.accounting() {
                        acc.feed(data);
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some(acc) = this.finish.accounting() {
                    acc.body_ended();
                }
                this.finish.finish(None)
            }
            Poll::Ready(Some(Err(e))) => this.finish.finish(Some(format!("body error: {e}"))),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// A stream that counts bytes in both directions and remembers when it last moved
    /// any, for tunnel idle timeouts.
    pub struct MeteredIo<S> {
        #[pin]
        inner: S,
        counts: Arc<ByteCounts>,
        activity: Arc<Activity>,
    }
}

impl<S> MeteredIo<S> {
    /// Reads count as received, writes as sent: wrap the upstream side.
    pub fn new(inner: S, counts: Arc<ByteCounts>, activity: Arc<Activity>) -> Self {
        Self {
            inner,
            counts,
            activity,
        }
    }
}

impl<S: AsyncRead> AsyncRead for MeteredIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.counts.add_received(n as u64);
            this.activity.touch();
        }
        r
    }
}

impl<S: AsyncWrite> AsyncWrite for MeteredIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            if *n > 0 {
                this.counts.add_sent(*n as u64);
                this.activity.touch();
            }
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

/// Last time a tunnel moved a byte.
#[derive(Debug)]
pub struct Activity {
    base: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Activity {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
        })
    }

    pub fn touch(&self) {
        self.last_ms
            .store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub fn idle_for(&self) -> std::time::Duration {
        let now = self.base.elapsed().as_millis() as u64;
        std::time::Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}
