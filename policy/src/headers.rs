//! `request.headers` as CEL sees it, built in one place for the live gateway, its
//! tunnel re-checks, `policy explain` and `policy test`, so a rule sees every header
//! the gateway forwards and all of them agree on what it sees.

/// Request headers for policy evaluation.
///
/// - Names are lower case.
/// - Values are the bytes as sent, decoded as UTF-8 with invalid sequences replaced by
///   U+FFFD: a value with a non-UTF-8 byte is still visible (`"x-exfil" in
///   request.headers` holds for `X-Exfil: caf\xe9`).
/// - A name sent more than once maps to all its values joined with `", "` in order, as
///   HTTP field semantics allow (RFC 9110 §5.3), so `X-Tenant: good` followed by
///   `X-Tenant: evil` is `"good, evil"` and fails `== "good"`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderView {
    /// One entry per name, in order of first appearance.
    entries: Vec<(String, String)>,
}

static EMPTY: HeaderView = HeaderView {
    entries: Vec::new(),
};

impl HeaderView {
    /// Builds the view from `(name, value)` pairs as received (repeats included).
    pub fn new<N, V>(pairs: impl IntoIterator<Item = (N, V)>) -> HeaderView
    where
        N: AsRef<[u8]>,
        V: AsRef<[u8]>,
    {
        let mut entries: Vec<(String, String)> = Vec::new();
        for (name, value) in pairs {
            let name = String::from_utf8_lossy(name.as_ref()).to_ascii_lowercase();
            let value = String::from_utf8_lossy(value.as_ref());
            match entries.iter_mut().find(|(n, _)| *n == name) {
                Some((_, joined)) => {
                    joined.push_str(", ");
                    joined.push_str(&value);
                }
                None => entries.push((name, value.into_owned())),
            }
        }
        HeaderView { entries }
    }

    /// No headers (CONNECT lines in tests, model look-ups).
    pub fn empty() -> &'static HeaderView {
        &EMPTY
    }

    /// The value for a lower-case `name`, repeated values joined.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// `(name, value)` per distinct name, in order of first appearance.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_utf8_is_replaced_not_dropped() {
        let v = HeaderView::new([(&b"X-Exfil"[..], &b"caf\xe9"[..])]);
        assert_eq!(v.get("x-exfil"), Some("caf\u{fffd}"));
    }

    #[test]
    fn repeated_names_are_joined_in_order() {
        let v = HeaderView::new([
            ("x-tenant", "good"),
            ("accept", "*/*"),
            ("X-Tenant", "evil"),
        ]);
        assert_eq!(v.get("x-tenant"), Some("good, evil"));
        assert_eq!(
            v.iter().collect::<Vec<_>>(),
            [("x-tenant", "good, evil"), ("accept", "*/*")]
        );
        assert!(HeaderView::empty().is_empty());
    }
}
