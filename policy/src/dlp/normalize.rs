//! The decoded view of a body: JSON string escapes and percent-encoding undone,
//! with a map from every decoded byte back to the raw bytes that produced it,
//! so a match in the view can be redacted in the raw body.

use memchr::{memchr2, memchr3};

use super::BodyFormat;

/// Nested encodings (a JSON string holding escaped JSON) are decoded this many
/// times at most; each round costs a copy of the body.
const MAX_ROUNDS: usize = 3;

pub(crate) struct View<'a> {
    raw: &'a [u8],
    /// `None` when the body has nothing to decode: the raw bytes are the view.
    decoded: Option<Decoded>,
}

struct Decoded {
    bytes: Vec<u8>,
    /// `map[i]` is the raw offset where the escape that produced byte `i`
    /// starts; `map[bytes.len()]` is `raw.len()`.
    map: Vec<u32>,
}

impl<'a> View<'a> {
    pub(crate) fn new(raw: &'a [u8], format: BodyFormat) -> View<'a> {
        // Offsets are kept as u32 to halve the map; a body this large is
        // scanned as is rather than refused.
        if raw.len() >= u32::MAX as usize || !needs_decoding(raw, format) {
            return View { raw, decoded: None };
        }
        let mut current = decode_once(raw, format);
        for _ in 1..MAX_ROUNDS {
            if !needs_decoding(&current.bytes, format) {
                break;
            }
            let next = decode_once(&current.bytes, format);
            if next.bytes.len() == current.bytes.len() {
                // Nothing decodable was left (only stray `\` or `%`).
                break;
            }
            let map = next.map.iter().map(|&m| current.map[m as usize]).collect();
            current = Decoded {
                bytes: next.bytes,
                map,
            };
        }
        View {
            raw,
            decoded: Some(current),
        }
    }

    /// The bytes to match against.
    pub(crate) fn bytes(&self) -> &[u8] {
        match &self.decoded {
            Some(d) => &d.bytes,
            None => self.raw,
        }
    }

    pub(crate) fn is_decoded(&self) -> bool {
        self.decoded.is_some()
    }

    /// The raw span for the view span `start..end`, widened to whole escapes.
    pub(crate) fn raw_span(&self, start: usize, end: usize) -> (usize, usize) {
        let Some(d) = &self.decoded else {
            return (start, end);
        };
        let raw_start = d.map[start] as usize;
        if end == 0 || end >= d.bytes.len() {
            return (raw_start, if end == 0 { raw_start } else { self.raw.len() });
        }
        // Several view bytes can come from one escape (`\u00e9`): end after
        // the escape that produced the last byte, not inside it.
        let last = d.map[end - 1];
        let mut j = end;
        while d.map[j] == last {
            j += 1;
        }
        (raw_start, d.map[j] as usize)
    }

    /// The first view offset whose raw origin is at or after `raw`.
    pub(crate) fn view_offset(&self, raw: usize) -> usize {
        match &self.decoded {
            Some(d) => d.map.partition_point(|&m| (m as usize) < raw),
            None => raw,
        }
    }
}

fn needs_decoding(bytes: &[u8], format: BodyFormat) -> bool {
    match format {
        BodyFormat::Form => memchr3(b'\\', b'%', b'+', bytes).is_some(),
        BodyFormat::Json | BodyFormat::Text => memchr2(b'\\', b'%', bytes).is_some(),
    }
}

fn decode_once(raw: &[u8], format: BodyFormat) -> Decoded {
    let mut bytes = Vec::with_capacity(raw.len());
    let mut map: Vec<u32> = Vec::with_capacity(raw.len() + 1);
    let form = format == BodyFormat::Form;
    let mut i = 0;
    while i < raw.len() {
        let next = if form {
            memchr3(b'\\', b'%', b'+', &raw[i..])
        } else {
            memchr2(b'\\', b'%', &raw[i..])
        };
        let special = match next {
            Some(n) => i + n,
            None => raw.len(),
        };
        // Plain run: copied in bulk, each byte maps to itself.
        bytes.extend_from_slice(&raw[i..special]);
        map.extend((i..special).map(|p| p as u32));
        i = special;
        if i >= raw.len() {
            break;
        }
        let (consumed, out) = decode_escape(&raw[i..], form);
        for &b in out.as_slice() {
            bytes.push(b);
            map.push(i as u32);
        }
        i += consumed;
    }
    map.push(raw.len() as u32);
    Decoded { bytes, map }
}

/// Up to four decoded bytes (one UTF-8 scalar) without allocating.
struct Out {
    buf: [u8; 4],
    len: usize,
}

impl Out {
    fn one(b: u8) -> Out {
        Out {
            buf: [b, 0, 0, 0],
            len: 1,
        }
    }
    fn char(c: char) -> Out {
        let mut buf = [0; 4];
        let len = c.encode_utf8(&mut buf).len();
        Out { buf, len }
    }
    fn as_slice(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Decodes the escape at the start of `s` (which starts with `\`, `%` or `+`):
/// how many raw bytes it used and what it stands for. Anything that is not a
/// well-formed escape stands for itself.
fn decode_escape(s: &[u8], form: bool) -> (usize, Out) {
    match s[0] {
        b'+' if form => (1, Out::one(b' ')),
        b'%' => match (s.get(1).and_then(hex_val), s.get(2).and_then(hex_val)) {
            (Some(h), Some(l)) => (3, Out::one(h << 4 | l)),
            _ => (1, Out::one(b'%')),
        },
        b'\\' => {
            let simple = match s.get(1) {
                Some(b'n') => Some(b'\n'),
                Some(b'r') => Some(b'\r'),
                Some(b't') => Some(b'\t'),
                Some(b'b') => Some(0x08),
                Some(b'f') => Some(0x0c),
                Some(b'/') => Some(b'/'),
                Some(b'\\') => Some(b'\\'),
                Some(b'"') => Some(b'"'),
                _ => None,
            };
            if let Some(b) = simple {
                return (2, Out::one(b));
            }
            if s.get(1) == Some(&b'u') {
                if let Some(unit) = u_escape(&s[1..]) {
                    if (0xD800..0xDC00).contains(&unit) {
                        let low = s
                            .get(6..8)
                            .filter(|p| *p == b"\\u")
                            .and_then(|_| u_escape(&s[7..]))
                            .filter(|l| (0xDC00..0xE000).contains(l));
                        if let Some(low) = low {
                            let c = 0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00);
                            if let Some(c) = char::from_u32(c) {
                                return (12, Out::char(c));
                            }
                        }
                    } else if let Some(c) = char::from_u32(unit) {
                        return (6, Out::char(c));
                    }
                }
            }
            (1, Out::one(b'\\'))
        }
        other => (1, Out::one(other)),
    }
}

/// `uXXXX` at the start of `s`: the code unit.
fn u_escape(s: &[u8]) -> Option<u32> {
    if s.len() < 5 || s[0] != b'u' {
        return None;
    }
    s[1..5]
        .iter()
        .try_fold(0u32, |acc, b| hex_val(b).map(|v| acc << 4 | u32::from(v)))
}

fn hex_val(b: &u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(raw: &[u8], f: BodyFormat) -> Vec<u8> {
        View::new(raw, f).bytes().to_vec()
    }

    #[test]
    fn plain_body_is_not_copied() {
        let v = View::new(b"hello world", BodyFormat::Json);
        assert!(!v.is_decoded());
        assert_eq!(v.raw_span(2, 5), (2, 5));
    }

    #[test]
    fn json_escapes() {
        assert_eq!(
            view(
                br#"a\nb\"c\\d\/e\u0041\u00e9\ud83d\ude00"#,
                BodyFormat::Json
            ),
            "a\nb\"c\\d/eA\u{e9}\u{1F600}".as_bytes()
        );
        // Malformed escapes stand for themselves.
        assert_eq!(
            view(br"\q \u12 \ud800x", BodyFormat::Json),
            br"\q \u12 \ud800x"
        );
    }

    #[test]
    fn percent_and_plus() {
        assert_eq!(view(b"a%41+b%zz", BodyFormat::Form), b"aA b%zz");
        assert_eq!(view(b"a%41+b", BodyFormat::Text), b"aA+b");
    }

    #[test]
    fn nested_escapes_are_decoded() {
        assert_eq!(view(br"\\u0073k", BodyFormat::Json), b"sk");
    }

    #[test]
    fn spans_widen_to_whole_escapes() {
        let raw = br"xx\u00e9yy\nz";
        let v = View::new(raw, BodyFormat::Json);
        let b = v.bytes();
        assert_eq!(b, "xx\u{e9}yy\nz".as_bytes());
        // The two bytes of é map to the whole `\u00e9`.
        assert_eq!(v.raw_span(2, 4), (2, 8));
        assert_eq!(v.raw_span(3, 4), (2, 8));
        assert_eq!(v.raw_span(6, 7), (10, 12));
        assert_eq!(v.raw_span(0, b.len()), (0, raw.len()));
        assert_eq!(v.view_offset(3), 4);
        assert_eq!(v.view_offset(10), 6);
    }
}
