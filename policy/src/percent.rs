//! Strict percent-decoding (RFC 3986 `%XX`), for values whose escapes must be well formed.

/// `%XX` escapes decoded; `None` for a malformed escape (`%`, `%4`, `%zz`).
pub fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            // `from_str_radix` alone would take a sign: `%+1`.
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn escapes_decode_and_malformed_ones_are_refused() {
        assert_eq!(
            percent_decode("Bearer%20a%2Fb").as_deref(),
            Some(&b"Bearer a/b"[..])
        );
        assert_eq!(percent_decode("%e2%9c%93").as_deref(), Some("✓".as_bytes()));
        for bad in ["%", "%4", "%zz", "a%+1"] {
            assert_eq!(percent_decode(bad), None, "{bad}");
        }
    }
}
