//! Copies a tunnel's bytes both ways, holding a buffer only while bytes move.
//!
//! tokio's `copy_bidirectional` keeps both of its buffers for a tunnel's whole life.
//! Agents hold many keep-alive tunnels that sit idle most of the time, so here a
//! direction gives its buffer back whenever it has written everything it read and the
//! next read would wait; the allocator hands the same memory to whichever tunnel
//! moves next.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

/// One direction of a copy.
struct OneWay {
    buf: BytesMut,
    size: usize,
    read_done: bool,
    need_flush: bool,
    copied: u64,
}

impl OneWay {
    fn new(size: usize) -> OneWay {
        OneWay {
            buf: BytesMut::new(),
            size,
            read_done: false,
            need_flush: false,
            copied: 0,
        }
    }

    /// Copies until `reader` ends (then shuts `writer` down) or an error; returns the
    /// bytes copied.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            while !self.buf.is_empty() {
                let n = ready!(writer.as_mut().poll_write(cx, &self.buf))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.buf.advance(n);
                self.copied += n as u64;
                self.need_flush = true;
            }
            if self.read_done {
                ready!(writer.as_mut().poll_shutdown(cx))?;
                return Poll::Ready(Ok(self.copied));
            }
            // Empty here: `reserve` reuses the buffer in place, or allocates one.
            self.buf.reserve(self.size);
            match tokio_util::io::poll_read_buf(reader.as_mut(), cx, &mut self.buf) {
                Poll::Ready(Ok(0)) => self.read_done = true,
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Nothing to relay until the reader wakes us: hold no buffer.
                    self.buf = BytesMut::new();
                    if self.need_flush {
                        ready!(writer.as_mut().poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Copies `a` to `b` and `b` to `a` through buffers of `size` bytes until both have
/// ended, shutting each writer down when its reader ends. Returns the bytes copied
/// `(a to b, b to a)`; the first error ends both directions.
pub(crate) async fn copy_both_ways<A, B>(
    a: &mut A,
    b: &mut B,
    size: usize,
) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut a_to_b = OneWay::new(size);
    let mut b_to_a = OneWay::new(size);
    let mut forward = None;
    let mut backward = None;
    poll_fn(|cx| {
        if forward.is_none() {
            if let Poll::Ready(r) = a_to_b.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b)) {
                forward = Some(r?);
            }
        }
        if backward.is_none() {
            if let Poll::Ready(r) = b_to_a.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a)) {
                backward = Some(r?);
            }
        }
        match (forward, backward) {
            (Some(f), Some(b)) => Poll::Ready(Ok((f, b))),
            _ => Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_and_holds_no_buffer_while_idle() {
        let (mut agent, mut a) = tokio::io::duplex(64 * 1024);
        let (mut b, mut upstream) = tokio::io::duplex(64 * 1024);
        let relay = tokio::spawn(async move { copy_both_ways(&mut a, &mut b, 4096).await });

        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            agent.write_all(&sent).await?;
            agent.shutdown().await?;
            let mut back = Vec::new();
            agent.read_to_end(&mut back).await?;
            Ok::<_, io::Error>(back)
        });
        let mut got = vec![0; payload.len()];
        upstream.read_exact(&mut got).await.unwrap();
        assert_eq!(got, payload);
        // The agent's side ended: the relay passed the end on.
        assert_eq!(upstream.read(&mut [0u8; 1]).await.unwrap(), 0);
        upstream.write_all(b"answer").await.unwrap();
        upstream.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap().unwrap(), b"answer");
        assert_eq!(relay.await.unwrap().unwrap(), (200_000, 6));
    }

    #[tokio::test]
    async fn an_idle_direction_gives_its_buffer_back() {
        let (mut reader, mut source) = tokio::io::duplex(1024);
        let (mut writer, mut out) = tokio::io::duplex(1024);
        let mut way = OneWay::new(16 * 1024);
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let polled = way.poll_copy(&mut cx, Pin::new(&mut reader), Pin::new(&mut writer));
        assert!(polled.is_pending());
        assert_eq!(
            way.buf.capacity(),
            0,
            "a direction that never moved holds no buffer"
        );

        source.write_all(b"hello").await.unwrap();
        let polled = way.poll_copy(&mut cx, Pin::new(&mut reader), Pin::new(&mut writer));
        assert!(polled.is_pending());
        assert_eq!(
            way.buf.capacity(),
            0,
            "a drained direction gives its buffer back"
        );
        let mut got = [0u8; 5];
        out.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
    }
}
