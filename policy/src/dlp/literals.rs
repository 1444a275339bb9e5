//! Exact credential values the gateway holds, matched raw and in the
//! encodings an agent would use to smuggle them out (base64, hex).

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, Input, MatchKind};

/// Shorter values would match by accident (and tell an attacker little).
const MIN_LEN: usize = 8;

/// Exact values of credentials the gateway holds (the policy's `secret_file`
/// contents). Built by the gateway at runtime; never printed.
pub struct Literals {
    matcher: Option<AhoCorasick>,
    /// The longest encoded form, so a stream holds enough bytes back.
    max_len: usize,
    /// Some value has `\`, `%` or `+`, which decoding the body would change:
    /// such values are also looked for in the raw body.
    needs_raw: bool,
}

impl std::fmt::Debug for Literals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The values are secrets: show only the shape.
        f.debug_struct("Literals")
            .field(
                "patterns",
                &self.matcher.as_ref().map_or(0, AhoCorasick::patterns_len),
            )
            .finish()
    }
}

impl Literals {
    pub fn new<I: IntoIterator<Item = Vec<u8>>>(values: I) -> Literals {
        let mut forms: Vec<Vec<u8>> = Vec::new();
        let mut needs_raw = false;
        for mut v in values {
            // Secret files usually end with a newline that is not part of the value.
            if v.last() == Some(&b'\n') {
                v.pop();
                if v.last() == Some(&b'\r') {
                    v.pop();
                }
            }
            if v.len() < MIN_LEN {
                continue;
            }
            needs_raw |= v.iter().any(|b| matches!(b, b'\\' | b'%' | b'+'));
            forms.extend(encoded_forms(&v));
            forms.push(v);
        }
        forms.sort();
        forms.dedup();
        let max_len = forms.iter().map(Vec::len).max().unwrap_or(0);
        let matcher = if forms.is_empty() {
            None
        } else {
            // Building only fails on absurd sizes; the values then cannot be
            // matched at all, which the gateway reports via `is_empty`.
            AhoCorasickBuilder::new()
                .match_kind(MatchKind::LeftmostLongest)
                .build(&forms)
                .ok()
        };
        Literals {
            matcher,
            max_len,
            needs_raw,
        }
    }

    pub fn empty() -> Literals {
        Literals {
            matcher: None,
            max_len: 0,
            needs_raw: false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.matcher.is_none()
    }

    pub(crate) fn max_len(&self) -> usize {
        self.max_len
    }

    pub(crate) fn needs_raw(&self) -> bool {
        self.needs_raw
    }

    /// Non-overlapping matches in `hay[from..]`, with `hay[..from]` as context.
    pub(crate) fn find(&self, hay: &[u8], from: usize, mut each: impl FnMut(usize, usize)) {
        let Some(m) = &self.matcher else { return };
        if from >= hay.len() {
            return;
        }
        for found in m.find_iter(Input::new(hay).range(from..)) {
            each(found.start(), found.end());
        }
    }
}

/// The standard and URL-safe base64 of `v` at each of the 3 byte alignments
/// it can have inside a larger encoded blob, and its lower/upper-case hex.
/// Standard base64 text in the URL-safe alphabet (`-` and `_` for `+` and `/`).
pub(super) fn url_safe(b64: &[u8]) -> Vec<u8> {
    b64.iter()
        .map(|&c| match c {
            b'+' => b'-',
            b'/' => b'_',
            c => c,
        })
        .collect()
}

fn encoded_forms(v: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity(8);
    for align in 0..3 {
        let mut padded = vec![0u8; align];
        padded.extend_from_slice(v);
        let enc = base64_nopad(&padded, STD);
        // Keep only characters whose 6 bits all come from `v`: the ones
        // before depend on the unknown preceding bytes, the last one on the
        // following bytes.
        let first = (8 * align).div_ceil(6);
        let last = (8 * (align + v.len())) / 6;
        if first < last {
            let core = enc[first..last].to_vec();
            let url = url_safe(&core);
            out.push(core);
            out.push(url);
        }
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let lower: Vec<u8> = v
        .iter()
        .flat_map(|&b| [HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]])
        .collect();
    out.push(lower.to_ascii_uppercase());
    out.push(lower);
    out
}

const STD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_nopad(data: &[u8], alphabet: &[u8; 64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for k in 0..chars {
            out.push(alphabet[((n >> (18 - 6 * k)) & 63) as usize]);
        }
    }
    out
}

#[cfg(test)]
pub(crate) fn base64_std(data: &[u8]) -> Vec<u8> {
    let mut s = base64_nopad(data, STD);
    while !s.len().is_multiple_of(4) {
        s.push(b'=');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(l: &Literals, hay: &[u8]) -> usize {
        let mut n = 0;
        l.find(hay, 0, |_, _| n += 1);
        n
    }

    #[test]
    fn base64_matches_known_encoding() {
        assert_eq!(base64_std(b"hello"), b"aGVsbG8=");
        assert_eq!(base64_std(b"hi!"), b"aGkh");
    }

    #[test]
    fn finds_all_forms() {
        let secret = b"correct-horse-battery-staple-42".to_vec();
        let l = Literals::new([{
            let mut s = secret.clone();
            s.push(b'\n');
            s
        }]);
        assert!(!l.is_empty());
        assert_eq!(count(&l, b"x correct-horse-battery-staple-42 y"), 1);
        for prefix in [&b""[..], b"a", b"ab", b"abc"] {
            let mut data = prefix.to_vec();
            data.extend_from_slice(&secret);
            data.extend_from_slice(b"trailing");
            let enc = base64_std(&data);
            assert_eq!(count(&l, &enc), 1, "alignment {}", prefix.len());
            let url = url_safe(&enc);
            assert_eq!(count(&l, &url), 1, "url-safe alignment {}", prefix.len());
        }
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(count(&l, hex.as_bytes()), 1);
        assert_eq!(count(&l, hex.to_uppercase().as_bytes()), 1);
        assert_eq!(count(&l, b"correct-horse-battery"), 0);
    }

    #[test]
    fn short_values_are_ignored() {
        let l = Literals::new([b"short\n".to_vec(), b"1234567".to_vec()]);
        assert!(l.is_empty());
        assert!(Literals::empty().is_empty());
    }
}
