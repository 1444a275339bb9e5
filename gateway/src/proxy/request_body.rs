//! A request body on its way through an L7 pathway: as received, read into memory
//! (bounded) for the stages that must see all of it, or its first bytes read and the
//! rest still streaming.

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::refusal::Refusal;
use super::ProxyBody;

/// A request body as received, or read into memory (bounded) for `models` or
/// `max_request_body_bytes`, or its first bytes read and the rest still streaming.
pub(super) enum ReqBody {
    Streaming(Incoming),
    Buffered(Bytes),
    Partial(Bytes, Incoming),
}

impl ReqBody {
    /// Reads the body into memory unless it already is; more than `limit` bytes is 413
    /// before anything is forwarded.
    pub(super) async fn buffer(self, headers: &HeaderMap, limit: u64) -> Result<ReqBody, Refusal> {
        let too_large = || Refusal::TooLarge {
            reason: format!("request body larger than {limit} bytes"),
            limit: "max_request_body_bytes".into(),
        };
        match self {
            ReqBody::Buffered(b) if b.len() as u64 > limit => Err(too_large()),
            ReqBody::Buffered(b) => Ok(ReqBody::Buffered(b)),
            ReqBody::Partial(head, _) if head.len() as u64 > limit => Err(too_large()),
            ReqBody::Partial(head, rest) => {
                let cap = usize::try_from(limit - head.len() as u64).unwrap_or(usize::MAX);
                match http_body_util::Limited::new(rest, cap).collect().await {
                    Ok(tail) => Ok(ReqBody::Buffered([head, tail.to_bytes()].concat().into())),
                    Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
                    Err(e) => Err(Refusal::BadRequest(format!(
                        "cannot read the request body: {e}"
                    ))),
                }
            }
            ReqBody::Streaming(body) => {
                let declared = headers
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                if declared.is_some_and(|n| n > limit) {
                    return Err(too_large());
                }
                let cap = usize::try_from(limit).unwrap_or(usize::MAX);
                match http_body_util::Limited::new(body, cap).collect().await {
                    Ok(c) => Ok(ReqBody::Buffered(c.to_bytes())),
                    Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
                    Err(e) => Err(Refusal::BadRequest(format!(
                        "cannot read the request body: {e}"
                    ))),
                }
            }
        }
    }

    /// Reads up to `cap` bytes: the whole body when it is no larger, else what was
    /// read and the rest still streaming.
    pub(super) async fn peek(self, cap: usize) -> Result<ReqBody, Refusal> {
        let ReqBody::Streaming(mut body) = self else {
            return Ok(self);
        };
        let mut read = bytes::BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame
                .map_err(|e| Refusal::BadRequest(format!("cannot read the request body: {e}")))?;
            if let Ok(data) = frame.into_data() {
                read.extend_from_slice(&data);
                if read.len() > cap {
                    return Ok(ReqBody::Partial(read.freeze(), body));
                }
            }
        }
        Ok(ReqBody::Buffered(read.freeze()))
    }

    pub(super) fn into_proxy_body(self) -> ProxyBody {
        match self {
            ReqBody::Streaming(b) => b.boxed(),
            ReqBody::Buffered(b) => super::refusal::full(b),
            ReqBody::Partial(head, rest) => {
                let head = futures::stream::iter([Ok(hyper::body::Frame::data(head))]);
                http_body_util::StreamBody::new(futures::StreamExt::chain(
                    head,
                    http_body_util::BodyStream::new(rest),
                ))
                .boxed()
            }
        }
    }
}
