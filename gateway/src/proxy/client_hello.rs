//! A bounded, panic-free reader of the TLS ClientHello an agent sends into a tunnel,
//! for its SNI. Nothing is decrypted: the ClientHello is plaintext, and the bytes read
//! are relayed to the upstream unchanged.
//!
//! The handshake message may span several TLS records, and a record several TCP reads,
//! so [`parse`] is called on everything buffered so far and says whether it needs more.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

use super::target::{parse_host, Host};

/// The most a ClientHello may take, records included. Real ones are a few hundred
/// bytes to about 2 KiB (post-quantum key shares); PSK-heavy ones stay well below this.
pub const MAX_CLIENT_HELLO_BYTES: usize = 16 * 1024;

const RECORD_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
const EXT_SERVER_NAME: u16 = 0x0000;
const NAME_TYPE_HOST: u8 = 0x00;
/// TLS records carry at most 2^14 bytes of plaintext.
const MAX_RECORD_LEN: usize = 1 << 14;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The `host_name` of the server_name extension, as sent (not lower-cased).
    pub sni: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientHelloError {
    #[error("the tunnel did not start with a TLS handshake record")]
    NotTls,
    #[error("the first TLS handshake message is not a ClientHello")]
    NotClientHello,
    #[error("the ClientHello is larger than {MAX_CLIENT_HELLO_BYTES} bytes")]
    TooLarge,
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    #[error("the client closed the tunnel before a complete ClientHello")]
    Truncated,
    #[error("no complete ClientHello within {0:?}")]
    Timeout(Duration),
    #[error("reading the ClientHello failed: {0}")]
    Io(String),
}

/// Parses the ClientHello at the start of `buf`: `Ok(None)` if more bytes are needed.
pub fn parse(buf: &[u8]) -> Result<Option<ClientHello>, ClientHelloError> {
    // Reassemble the handshake bytes from consecutive handshake records.
    let mut handshake: Vec<u8> = Vec::new();
    let mut pos = 0usize;
    loop {
        let Some(header) = buf.get(pos..pos + 5) else {
            if pos == 0 && !buf.is_empty() && buf[0] != RECORD_HANDSHAKE {
                return Err(ClientHelloError::NotTls);
            }
            return need_more(buf);
        };
        if header[0] != RECORD_HANDSHAKE {
            return Err(if pos == 0 {
                ClientHelloError::NotTls
            } else {
                // Something other than handshake records before the ClientHello ended.
                ClientHelloError::Malformed("record interleaved in the ClientHello")
            });
        }
        if header[1] != 0x03 {
            return Err(ClientHelloError::NotTls);
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > MAX_RECORD_LEN {
            return Err(ClientHelloError::Malformed("bad record length"));
        }
        let Some(fragment) = buf.get(pos + 5..pos + 5 + len) else {
            return need_more(buf);
        };
        handshake.extend_from_slice(fragment);
        pos += 5 + len;

        if handshake[0] != HANDSHAKE_CLIENT_HELLO {
            return Err(ClientHelloError::NotClientHello);
        }
        let Some(h) = handshake.get(1..4) else {
            continue;
        };
        let body_len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
        if body_len + 4 > MAX_CLIENT_HELLO_BYTES {
            return Err(ClientHelloError::TooLarge);
        }
        if let Some(body) = handshake.get(4..4 + body_len) {
            return parse_body(body).map(Some);
        }
    }
}

fn need_more(buf: &[u8]) -> Result<Option<ClientHello>, ClientHelloError> {
    if buf.len() >= MAX_CLIENT_HELLO_BYTES {
        Err(ClientHelloError::TooLarge)
    } else {
        Ok(None)
    }
}

/// A cursor that never reads past its slice.
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ClientHelloError> {
        if n > self.data.len() {
            return Err(ClientHelloError::Malformed(what));
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, ClientHelloError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, ClientHelloError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], ClientHelloError> {
        let n = usize::from(self.u8(what)?);
        self.take(n, what)
    }

    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], ClientHelloError> {
        let n = usize::from(self.u16(what)?);
        self.take(n, what)
    }
}

fn parse_body(body: &[u8]) -> Result<ClientHello, ClientHelloError> {
    let mut r = Reader { data: body };
    let version = r.u16("legacy_version")?;
    if version >> 8 != 0x03 {
        return Err(ClientHelloError::Malformed("legacy_version"));
    }
    r.take(32, "random")?;
    if r.vec8("session_id")?.len() > 32 {
        return Err(ClientHelloError::Malformed(
            "session_id longer than 32 bytes",
        ));
    }
    let suites = r.vec16("cipher_suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(ClientHelloError::Malformed("cipher_suites"));
    }
    if r.vec8("compression_methods")?.is_empty() {
        return Err(ClientHelloError::Malformed("compression_methods"));
    }
    if r.data.is_empty() {
        // SSLv3-style hello without extensions: valid, and without SNI.
        return Ok(ClientHello { sni: None });
    }
    let mut exts = Reader {
        data: r.vec16("extensions")?,
    };
    if !r.data.is_empty() {
        return Err(ClientHelloError::Malformed("bytes after the extensions"));
    }
    let mut seen: Vec<u16> = Vec::new();
    let mut sni = None;
    while !exts.data.is_empty() {
        let ty = exts.u16("extension type")?;
        let data = exts.vec16("extension data")?;
        // Duplicates are forbidden (RFC 8446 4.2); two server_name extensions are a
        // classic way to show the gateway one name and the server another.
        if seen.contains(&ty) {
            return Err(ClientHelloError::Malformed("duplicate extension"));
        }
        seen.push(ty);
        if ty == EXT_SERVER_NAME {
            sni = parse_server_name(data)?;
        }
    }
    Ok(ClientHello { sni })
}

fn parse_server_name(data: &[u8]) -> Result<Option<String>, ClientHelloError> {
    if data.is_empty() {
        // The empty form is what a server sends back; from a client it names nothing.
        return Ok(None);
    }
    let mut r = Reader { data };
    let mut list = Reader {
        data: r.vec16("server_name_list")?,
    };
    if !r.data.is_empty() {
        return Err(ClientHelloError::Malformed("bytes after server_name_list"));
    }
    let mut host = None;
    while !list.data.is_empty() {
        let ty = list.u8("name_type")?;
        let name = list.vec16("host_name")?;
        if ty != NAME_TYPE_HOST {
            continue;
        }
        // RFC 6066: at most one name of each type.
        if host.is_some() {
            return Err(ClientHelloError::Malformed("more than one host_name"));
        }
        if name.is_empty()
            || !name
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'))
        {
            return Err(ClientHelloError::Malformed(
                "host_name is not an ASCII name",
            ));
        }
        host = Some(String::from_utf8_lossy(name).into_owned());
    }
    Ok(host)
}

/// Whether a ClientHello's SNI fits the CONNECT host; `Err` says why not.
///
/// For a DNS name the SNI must be present and name the same host (case-insensitive,
/// trailing dot ignored). For an IP literal, TLS clients send no SNI (RFC 6066 forbids
/// literal addresses there), so absence is fine; a DNS name there would pick a virtual
/// host the policy never saw (domain fronting), so it is refused.
pub fn check_sni(host: &Host, sni: Option<&str>) -> Result<(), String> {
    match (host, sni) {
        (Host::Name(_), None) => Err("TLS ClientHello has no SNI".into()),
        (Host::Ip(_), None) => Ok(()),
        (_, Some(sni)) => match parse_host(sni) {
            Ok(parsed) if parsed == *host => Ok(()),
            _ => Err(format!(
                "TLS SNI {:?} does not match the CONNECT host {}",
                sni.chars().take(255).collect::<String>(),
                host.as_policy_str()
            )),
        },
    }
}

/// Reads from `io` until a whole ClientHello is buffered, within `timeout`. Returns the
/// bytes read (to relay upstream) and the parse result.
pub async fn read<R>(
    io: &mut R,
    timeout: Duration,
) -> (Vec<u8>, Result<ClientHello, ClientHelloError>)
where
    R: AsyncRead + Unpin,
{
    let mut buf = Vec::with_capacity(2048);
    let result = tokio::time::timeout(timeout, async {
        let mut chunk = [0u8; 4096];
        loop {
            match parse(&buf) {
                Ok(Some(hello)) => return Ok(hello),
                Ok(None) => {}
                Err(e) => return Err(e),
            }
            let room = MAX_CLIENT_HELLO_BYTES
                .saturating_sub(buf.len())
                .min(chunk.len());
            match io.read(&mut chunk[..room]).await {
                Ok(0) => return Err(ClientHelloError::Truncated),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(ClientHelloError::Io(e.to_string())),
            }
        }
    })
    .await
    .unwrap_or(Err(ClientHelloError::Timeout(timeout)));
    (buf, result)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello with the given extensions, in one record.
    pub(crate) fn hello(exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0);
        body.extend_from_slice(&[0, 2, 0x13, 0x01]);
        body.extend_from_slice(&[1, 0]);
        let mut ext_bytes = Vec::new();
        for (ty, data) in exts {
            ext_bytes.extend_from_slice(&ty.to_be_bytes());
            ext_bytes.extend_from_slice(&(data.len() as u16).to_be_bytes());
            ext_bytes.extend_from_slice(data);
        }
        body.extend_from_slice(&(ext_bytes.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext_bytes);
        let mut hs = vec![HANDSHAKE_CLIENT_HELLO];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        records(&hs, hs.len())
    }

    fn records(hs: &[u8], per_record: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for part in hs.chunks(per_record) {
            out.extend_from_slice(&[RECORD_HANDSHAKE, 3, 1]);
            out.extend_from_slice(&(part.len() as u16).to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    fn sni_ext(names: &[&str]) -> (u16, Vec<u8>) {
        let mut list = Vec::new();
        for n in names {
            list.push(0);
            list.extend_from_slice(&(n.len() as u16).to_be_bytes());
            list.extend_from_slice(n.as_bytes());
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        (0, data)
    }

    #[test]
    fn reads_the_sni() {
        let h = hello(&[(10, vec![0, 2, 0, 29]), sni_ext(&["Example.COM"])]);
        assert_eq!(
            parse(&h).unwrap().unwrap().sni.as_deref(),
            Some("Example.COM")
        );
    }

    #[test]
    fn no_sni_extension() {
        let h = hello(&[(10, vec![0, 2, 0, 29])]);
        assert_eq!(parse(&h).unwrap().unwrap().sni, None);
    }

    #[test]
    fn every_prefix_asks_for_more() {
        let h = hello(&[sni_ext(&["example.com"])]);
        for n in 0..h.len() {
            assert_eq!(parse(&h[..n]), Ok(None), "prefix of {n} bytes");
        }
    }

    #[test]
    fn handshake_split_across_records() {
        let one = hello(&[sni_ext(&["split.example"])]);
        let hs = &one[5..];
        for per in [1, 3, 40, 100] {
            let h = records(hs, per);
            assert_eq!(
                parse(&h).unwrap().unwrap().sni.as_deref(),
                Some("split.example")
            );
        }
    }

    #[test]
    fn fronting_tricks_are_malformed() {
        let two_names = hello(&[sni_ext(&["a.example", "b.example"])]);
        assert!(matches!(
            parse(&two_names),
            Err(ClientHelloError::Malformed(_))
        ));
        let two_exts = hello(&[sni_ext(&["a.example"]), sni_ext(&["b.example"])]);
        assert!(matches!(
            parse(&two_exts),
            Err(ClientHelloError::Malformed(_))
        ));
        let nul = hello(&[sni_ext(&["a.example\0.evil"])]);
        assert!(matches!(parse(&nul), Err(ClientHelloError::Malformed(_))));
    }

    #[test]
    fn not_tls_and_oversize() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(ClientHelloError::NotTls));
        assert_eq!(parse(b"G"), Err(ClientHelloError::NotTls));
        // A handshake header claiming a 1 MiB ClientHello.
        let h = [RECORD_HANDSHAKE, 3, 1, 0, 4, 1, 0x10, 0, 0];
        assert_eq!(parse(&h), Err(ClientHelloError::TooLarge));
        // Server hello instead of client hello.
        let h = [RECORD_HANDSHAKE, 3, 1, 0, 4, 2, 0, 0, 0];
        assert_eq!(parse(&h), Err(ClientHelloError::NotClientHello));
    }

    #[test]
    fn sni_must_match_the_connect_host() {
        let name = Host::Name("api.example.com".into());
        assert!(check_sni(&name, Some("api.example.com")).is_ok());
        assert!(check_sni(&name, Some("API.Example.com.")).is_ok());
        assert!(check_sni(&name, None).is_err());
        assert!(check_sni(&name, Some("evil.example.com")).is_err());
        assert!(check_sni(&name, Some("127.0.0.1")).is_err());
        let ip = Host::Ip("93.184.216.34".parse().unwrap());
        assert!(check_sni(&ip, None).is_ok());
        assert!(check_sni(&ip, Some("93.184.216.34")).is_ok());
        assert!(check_sni(&ip, Some("allowed-cdn-customer.example")).is_err());
    }

    #[tokio::test]
    async fn reader_returns_the_bytes_it_consumed() {
        let h = hello(&[sni_ext(&["read.example"])]);
        let mut input = h.clone();
        input.extend_from_slice(b"application data after");
        let (mut a, mut b) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for c in input.chunks(7) {
                b.write_all(c).await.unwrap();
            }
            b
        });
        let (buf, result) = read(&mut a, Duration::from_secs(5)).await;
        assert_eq!(result.unwrap().sni.as_deref(), Some("read.example"));
        assert!(buf.starts_with(&h));
        drop(writer);
    }

    #[tokio::test]
    async fn reader_stops_at_eof() {
        let (mut a, b) = tokio::io::duplex(64);
        drop(b);
        let (_, result) = read(&mut a, Duration::from_secs(5)).await;
        assert_eq!(result, Err(ClientHelloError::Truncated));
    }
}
