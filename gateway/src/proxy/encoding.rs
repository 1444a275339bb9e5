//! Content codings (RFC 9110 §8.4): the one place that decodes `gzip`, `deflate`, `br`
//! and `zstd` bodies, for the stages that read what a body says (the request's model,
//! a response's token usage). Decoding is for reading only: what is forwarded is the
//! original bytes, unless a stage rewrites the body.
//!
//! Memory is bounded: decoders are streaming (push), their windows are capped (zstd at
//! 8 MiB; brotli's format caps its window at 16 MiB; deflate's is 32 KiB), and the
//! decoded bytes go straight to a sink that keeps only what it needs.

use std::io::{self, Write};

use http::header::{self, HeaderMap};

/// A response body decoded with a window over this is not read (zstd's `windowLogMax`).
const ZSTD_WINDOW_LOG_MAX: u32 = 23;
/// Output buffer of the brotli decoder.
const BROTLI_BUFFER: usize = 8 * 1024;

/// One content coding the gateway can decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Identity,
    Gzip,
    /// zlib-wrapped per RFC 9110, or raw deflate as some servers send it.
    Deflate,
    Br,
    Zstd,
}

/// A `Content-Encoding` the gateway cannot decode: several codings stacked, or one it
/// does not know.
#[derive(Debug, Clone, thiserror::Error)]
#[error("content-encoding {0:?} is not supported here (gzip, deflate, br or zstd)")]
pub struct UnsupportedCoding(pub String);

impl Coding {
    /// The coding `Content-Encoding` names; none (or `identity`) is `Identity`.
    pub fn of(headers: &HeaderMap) -> Result<Coding, UnsupportedCoding> {
        let mut found = Coding::Identity;
        let mut all = String::new();
        for value in headers.get_all(header::CONTENT_ENCODING) {
            let text = String::from_utf8_lossy(value.as_bytes());
            for token in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                if !all.is_empty() {
                    all.push_str(", ");
                }
                all.push_str(token);
                let coding = match token.to_ascii_lowercase().as_str() {
                    "identity" => continue,
                    "gzip" | "x-gzip" => Coding::Gzip,
                    "deflate" => Coding::Deflate,
                    "br" => Coding::Br,
                    "zstd" => Coding::Zstd,
                    _ => return Err(UnsupportedCoding(text.to_string())),
                };
                if found != Coding::Identity {
                    // Stacked codings are legal but nobody's API sends them.
                    return Err(UnsupportedCoding(all));
                }
                found = coding;
            }
        }
        Ok(found)
    }
}

/// A push decoder: compressed bytes in, decoded bytes out to `W` as they come.
pub struct Decoder<W: Write> {
    state: State<W>,
    /// Set once the input could not be decoded; everything after is ignored.
    failed: bool,
}

enum State<W: Write> {
    Identity(W),
    Gzip(Box<flate2::write::MultiGzDecoder<W>>),
    /// `deflate` before its first two bytes tell zlib from raw deflate.
    DeflateStart(W, Vec<u8>),
    Zlib(Box<flate2::write::ZlibDecoder<W>>),
    RawDeflate(Box<flate2::write::DeflateDecoder<W>>),
    Br(Box<brotli_decompressor::DecompressorWriter<W>>),
    Zstd(Box<zstd::stream::write::Decoder<'static, W>>),
    /// Only while switching states.
    Empty,
}

impl<W: Write> Decoder<W> {
    pub fn new(coding: Coding, sink: W) -> Self {
        let mut failed = false;
        let state = match coding {
            Coding::Identity => State::Identity(sink),
            Coding::Gzip => State::Gzip(Box::new(flate2::write::MultiGzDecoder::new(sink))),
            Coding::Deflate => State::DeflateStart(sink, Vec::with_capacity(2)),
            Coding::Br => State::Br(Box::new(brotli_decompressor::DecompressorWriter::new(
                sink,
                BROTLI_BUFFER,
            ))),
            Coding::Zstd => match zstd_decoder(sink) {
                Ok(d) => State::Zstd(Box::new(d)),
                Err(sink) => {
                    failed = true;
                    State::Identity(sink)
                }
            },
        };
        Decoder { state, failed }
    }

    /// Feeds compressed bytes; decoded ones reach the sink.
    pub fn write(&mut self, data: &[u8]) {
        if self.failed || data.is_empty() {
            return;
        }
        if let State::DeflateStart(_, head) = &mut self.state {
            head.extend_from_slice(data);
            if head.len() < 2 {
                return;
            }
            let State::DeflateStart(sink, head) = std::mem::replace(&mut self.state, State::Empty)
            else {
                return;
            };
            // RFC 1950: CM = 8 and the header checksum; otherwise it is raw deflate.
            let zlib =
                head[0] & 0x0f == 8 && (u16::from(head[0]) << 8 | u16::from(head[1])) % 31 == 0;
            self.state = if zlib {
                State::Zlib(Box::new(flate2::write::ZlibDecoder::new(sink)))
            } else {
                State::RawDeflate(Box::new(flate2::write::DeflateDecoder::new(sink)))
            };
            let r = self.write_state(&head);
            self.fail_on(r);
            return;
        }
        let r = self.write_state(data);
        self.fail_on(r);
    }

    fn write_state(&mut self, data: &[u8]) -> io::Result<()> {
        match &mut self.state {
            State::Identity(w) => w.write_all(data),
            State::Gzip(d) => d.write_all(data),
            State::Zlib(d) => d.write_all(data),
            State::RawDeflate(d) => d.write_all(data),
            State::Br(d) => d.write_all(data),
            State::Zstd(d) => d.write_all(data),
            State::DeflateStart(..) | State::Empty => Ok(()),
        }
    }

    fn fail_on(&mut self, r: io::Result<()>) {
        if r.is_err() {
            self.failed = true;
        }
    }

    /// Ends the input: flushes what the decoder holds. False when the input could not
    /// be decoded, or ended inside a compressed stream.
    pub fn finish(&mut self) -> bool {
        if self.failed {
            return false;
        }
        let r = match &mut self.state {
            State::Identity(w) => w.flush(),
            State::Gzip(d) => d.try_finish(),
            State::Zlib(d) => d.try_finish(),
            State::RawDeflate(d) => d.try_finish(),
            State::Br(d) => d.close().map_err(|_| io::ErrorKind::InvalidData.into()),
            State::Zstd(d) => d.do_finish(),
            // One byte of deflate is not a stream.
            State::DeflateStart(_, head) if head.is_empty() => Ok(()),
            State::DeflateStart(..) | State::Empty => Err(io::ErrorKind::UnexpectedEof.into()),
        };
        self.fail_on(r);
        !self.failed
    }

    pub fn sink(&self) -> Option<&W> {
        match &self.state {
            State::Identity(w) | State::DeflateStart(w, _) => Some(w),
            State::Gzip(d) => Some(d.get_ref()),
            State::Zlib(d) => Some(d.get_ref()),
            State::RawDeflate(d) => Some(d.get_ref()),
            State::Br(d) => Some(d.get_ref()),
            State::Zstd(d) => Some(d.get_ref()),
            State::Empty => None,
        }
    }

    pub fn sink_mut(&mut self) -> Option<&mut W> {
        match &mut self.state {
            State::Identity(w) | State::DeflateStart(w, _) => Some(w),
            State::Gzip(d) => Some(d.get_mut()),
            State::Zlib(d) => Some(d.get_mut()),
            State::RawDeflate(d) => Some(d.get_mut()),
            State::Br(d) => Some(d.get_mut()),
            State::Zstd(d) => Some(d.get_mut()),
            State::Empty => None,
        }
    }
}

fn zstd_decoder<W: Write>(sink: W) -> Result<zstd::stream::write::Decoder<'static, W>, W> {
    let raw = zstd::stream::raw::Decoder::new().and_then(|mut raw| {
        raw.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(
            ZSTD_WINDOW_LOG_MAX,
        ))?;
        Ok(raw)
    });
    match raw {
        Ok(raw) => Ok(zstd::stream::write::Decoder::with_decoder(sink, raw)),
        Err(_) => Err(sink),
    }
}

/// Why a whole body could not be decoded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DecodeError {
    #[error("the {0:?}-encoded body could not be decoded")]
    Invalid(Coding),
    #[error("the decoded body is larger than {0} bytes")]
    TooLarge(u64),
}

/// Decodes a whole (already bounded) body, at most `limit` decoded bytes.
pub fn decode_all(coding: Coding, data: &[u8], limit: u64) -> Result<Vec<u8>, DecodeError> {
    if coding == Coding::Identity {
        return Ok(data.to_vec());
    }
    let mut d = Decoder::new(
        coding,
        Bounded::new(usize::try_from(limit).unwrap_or(usize::MAX)),
    );
    d.write(data);
    let ok = d.finish();
    if d.sink().is_some_and(|s| s.over) {
        return Err(DecodeError::TooLarge(limit));
    }
    match d.sink_mut() {
        Some(s) if ok => Ok(std::mem::take(&mut s.out)),
        _ => Err(DecodeError::Invalid(coding)),
    }
}

/// A sink that refuses to grow past `limit` (a decompression bomb stops there).
pub struct Bounded {
    pub out: Vec<u8>,
    limit: usize,
    /// Set once a write would have passed `limit`.
    pub over: bool,
}

impl Bounded {
    pub fn new(limit: usize) -> Bounded {
        Bounded {
            out: Vec::new(),
            limit,
            over: false,
        }
    }
}

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.out.len() + buf.len() > self.limit {
            self.over = true;
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &[u8] =
        br#"{"model":"gpt-4o-mini","usage":{"prompt_tokens":3,"completion_tokens":4}}"#;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_ENCODING, v.parse().unwrap());
        h
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn codings_from_headers() {
        assert_eq!(Coding::of(&HeaderMap::new()).unwrap(), Coding::Identity);
        assert_eq!(Coding::of(&headers("GZIP")).unwrap(), Coding::Gzip);
        assert_eq!(Coding::of(&headers("identity, br")).unwrap(), Coding::Br);
        assert_eq!(Coding::of(&headers("zstd")).unwrap(), Coding::Zstd);
        assert!(Coding::of(&headers("compress")).is_err());
        assert!(Coding::of(&headers("gzip, br")).is_err());
    }

    #[test]
    fn every_coding_decodes_in_small_pieces() {
        let zlib = {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(TEXT).unwrap();
            e.finish().unwrap()
        };
        let raw = {
            let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(TEXT).unwrap();
            e.finish().unwrap()
        };
        let zstd = zstd::stream::encode_all(TEXT, 3).unwrap();
        for (coding, data) in [
            (Coding::Gzip, gzip(TEXT)),
            (Coding::Deflate, zlib),
            (Coding::Deflate, raw),
            (Coding::Zstd, zstd),
            (Coding::Identity, TEXT.to_vec()),
        ] {
            let mut d = Decoder::new(coding, Vec::new());
            for piece in data.chunks(1) {
                d.write(piece);
            }
            assert!(d.finish(), "{coding:?}");
            assert_eq!(d.sink().unwrap().as_slice(), TEXT, "{coding:?}");
        }
    }

    #[test]
    fn garbage_and_truncation_fail() {
        let mut d = Decoder::new(Coding::Gzip, Vec::new());
        d.write(b"not gzip at all");
        assert!(!d.finish());
        let data = gzip(TEXT);
        let mut d = Decoder::new(Coding::Gzip, Vec::new());
        d.write(&data[..data.len() / 2]);
        assert!(!d.finish());
    }

    #[test]
    fn whole_bodies_are_bounded() {
        let big = vec![b'a'; 1 << 20];
        let packed = gzip(&big);
        assert!(packed.len() < 16 * 1024);
        assert!(matches!(
            decode_all(Coding::Gzip, &packed, 1000),
            Err(DecodeError::TooLarge(1000))
        ));
        assert_eq!(
            decode_all(Coding::Gzip, &packed, 1 << 20).unwrap().len(),
            1 << 20
        );
        assert!(matches!(
            decode_all(Coding::Br, b"junk", 100),
            Err(DecodeError::Invalid(Coding::Br))
        ));
    }
}
