//! The stream the agent asked for: when the gateway added
//! `stream_options.include_usage` to an OpenAI-compatible streaming request, the
//! usage-only chunk that option adds (`"choices":[]` with a `usage` object) is dropped
//! before the agent sees it. Every other event passes as soon as it is complete.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use serde_json::Value;

use super::usage::{carries_usage, find};

/// An event not complete after this many bytes is passed on as it is.
const MAX_PENDING: usize = 1024 * 1024;

pin_project_lite::pin_project! {
    pub struct StripUsageChunk<B> {
        #[pin]
        inner: B,
        pending: BytesMut,
        trailers: Option<Frame<Bytes>>,
        ended: bool,
    }
}

impl<B> StripUsageChunk<B> {
    pub fn new(inner: B) -> Self {
        StripUsageChunk {
            inner,
            pending: BytesMut::new(),
            trailers: None,
            ended: false,
        }
    }
}

/// Where the complete events in `buf` end (after the blank line that ends the last).
fn complete_prefix(buf: &[u8]) -> usize {
    let lf = buf.windows(2).rposition(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buf
        .windows(4)
        .rposition(|w| w == b"\r\n\r\n")
        .map(|i| i + 4);
    lf.max(crlf).unwrap_or(0)
}

/// True for `data: {"choices":[], "usage":{...}}` (the chunk `include_usage` adds).
fn is_usage_only(event: &[u8]) -> bool {
    let mut data_lines = event
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter_map(|l| l.strip_prefix(b"data:"));
    let Some(data) = data_lines.next() else {
        return false;
    };
    if data_lines.next().is_some() || !carries_usage(data) || find(data, b"\"choices\"").is_none() {
        return false;
    }
    serde_json::from_slice::<Value>(data).is_ok_and(|v| {
        v.get("usage").is_some_and(Value::is_object)
            && v.get("choices")
                .and_then(Value::as_array)
                .is_some_and(|c| c.is_empty())
    })
}

/// The events of `buf` (complete ones), without usage-only chunks.
fn filter(buf: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(buf.len());
    let mut rest = buf;
    while !rest.is_empty() {
        let end = next_event_end(rest);
        let (event, tail) = rest.split_at(end);
        if !is_usage_only(event) {
            out.extend_from_slice(event);
        }
        rest = tail;
    }
    out.freeze()
}

/// The end of the first event in `buf`, its blank line included (all of `buf` when
/// there is none).
fn next_event_end(buf: &[u8]) -> usize {
    let lf = find(buf, b"\n\n").map(|i| i + 2);
    let crlf = find(buf, b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => buf.len(),
    }
}

impl<B> Body for StripUsageChunk<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        loop {
            if *this.ended {
                if !this.pending.is_empty() {
                    let rest = this.pending.split();
                    return Poll::Ready(Some(Ok(Frame::data(filter(&rest)))));
                }
                return Poll::Ready(this.trailers.take().map(Ok));
            }
            match this.inner.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        this.pending.extend_from_slice(&data);
                        let end = if this.pending.len() > MAX_PENDING {
                            this.pending.len()
                        } else {
                            complete_prefix(this.pending)
                        };
                        if end == 0 {
                            continue;
                        }
                        let events = this.pending.split_to(end);
                        let out = filter(&events);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Err(trailers) => {
                        *this.trailers = Some(trailers);
                        *this.ended = true;
                    }
                },
                Poll::Ready(None) => *this.ended = true,
                other => return other,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.pending.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        // Dropping a chunk changes the length.
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    #[tokio::test]
    async fn only_the_usage_chunk_is_dropped() {
        let stream = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n\
                      data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n\
                      data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7,\"total_tokens\":12}}\r\n\r\n\
                      data: [DONE]\n\n";
        let expected = stream.replace(
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7,\"total_tokens\":12}}\r\n\r\n",
            "",
        );
        for size in [1, 5, 64, 4096] {
            let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = stream
                .as_bytes()
                .chunks(size)
                .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
                .collect();
            let body = StripUsageChunk::new(StreamBody::new(futures::stream::iter(frames)));
            let out = body.collect().await.unwrap().to_bytes();
            assert_eq!(String::from_utf8_lossy(&out), expected, "chunks of {size}");
        }
    }
}
