//! What the gateway asks the policy about, and parsing of the textual request
//! form used by policy tests and `policy explain` (`CONNECT host:port` or
//! `METHOD http://host:port/path?query`).

use std::fmt;
use std::net::SocketAddr;
use std::time::SystemTime;

use crate::headers::HeaderView;
use crate::spiffe_id::SpiffeId;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// A `CONNECT` tunnel.
    Connect,
    /// A request the gateway sees (absolute-form `http://` URL).
    Http,
}

impl RequestKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::Connect => "connect",
            RequestKind::Http => "http",
        }
    }
}

impl fmt::Display for RequestKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub source: &'a SpiffeId,
    pub source_address: Option<SocketAddr>,
    pub kind: RequestKind,
    pub method: &'a str,
    /// As the client sent it; the policy normalizes it. IPv6 literals without brackets.
    pub host: &'a str,
    pub port: u16,
    /// `""` for CONNECT.
    pub path: &'a str,
    pub query: &'a str,
    /// What `request.headers` shows (see [`HeaderView`]).
    pub headers: &'a HeaderView,
    pub llm_model: Option<&'a str>,
    pub now: SystemTime,
}

/// An owned request target parsed from `CONNECT host:port` or
/// `METHOD http://host:port/path?query`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestLine {
    pub kind: RequestKind,
    pub method: String,
    pub host: String,
    pub port: u16,
    pub path: String,
    pub query: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid request {input:?}: {why} (expected `CONNECT host:port` or `METHOD http://host:port/path`)")]
pub struct RequestLineError {
    pub input: String,
    pub why: String,
}

impl RequestLine {
    pub fn parse(input: &str) -> Result<RequestLine, RequestLineError> {
        let err = |why: &str| RequestLineError {
            input: input.into(),
            why: why.into(),
        };
        let (method, target) = input
            .trim()
            .split_once(char::is_whitespace)
            .ok_or_else(|| err("missing method or target"))?;
        let target = target.trim();
        if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic() || b == b'-') {
            return Err(err("bad method"));
        }
        let method = method.to_ascii_uppercase();
        if method == "CONNECT" {
            let (host, port) = split_authority(target).ok_or_else(|| err("bad host:port"))?;
            let port = port.ok_or_else(|| err("CONNECT needs host:port"))?;
            return Ok(RequestLine {
                kind: RequestKind::Connect,
                method,
                host,
                port,
                path: String::new(),
                query: String::new(),
            });
        }
        let rest = target.strip_prefix("http://").ok_or_else(|| {
            err("the URL must be absolute http:// (the gateway speaks TLS upstream)")
        })?;
        let split_at = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path_query) = rest.split_at(split_at);
        let (host, port) = split_authority(authority).ok_or_else(|| err("bad host:port"))?;
        let (path, query) = match path_query.split_once('?') {
            Some((p, q)) => (p, q),
            None => (path_query, ""),
        };
        let path = if path.is_empty() { "/" } else { path };
        Ok(RequestLine {
            kind: RequestKind::Http,
            method,
            host,
            port: port.unwrap_or(80),
            path: path.into(),
            query: query.into(),
        })
    }
}

/// `host[:port]`, with `[v6]` brackets removed.
fn split_authority(a: &str) -> Option<(String, Option<u16>)> {
    if a.is_empty() || a.contains(['@', ' ']) {
        return None;
    }
    let (host, port) = if let Some(rest) = a.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        match after {
            "" => (h, None),
            p => (h, Some(p.strip_prefix(':')?)),
        }
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (a, None),
        }
    };
    if host.is_empty() {
        return None;
    }
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => Some(n),
            _ => return None,
        },
    };
    Some((host.into(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_connect_and_http() {
        let c = RequestLine::parse("CONNECT en.wikipedia.org:443").unwrap();
        assert_eq!(
            (c.kind, c.host.as_str(), c.port),
            (RequestKind::Connect, "en.wikipedia.org", 443)
        );
        let h =
            RequestLine::parse("post http://api.openai.com:443/v1/chat/completions?x=1").unwrap();
        assert_eq!(h.kind, RequestKind::Http);
        assert_eq!(h.method, "POST");
        assert_eq!((h.host.as_str(), h.port), ("api.openai.com", 443));
        assert_eq!(
            (h.path.as_str(), h.query.as_str()),
            ("/v1/chat/completions", "x=1")
        );
        let d = RequestLine::parse("GET http://example.com").unwrap();
        assert_eq!((d.port, d.path.as_str()), (80, "/"));
        let v6 = RequestLine::parse("CONNECT [::1]:8443").unwrap();
        assert_eq!(v6.host, "::1");
    }

    #[test]
    fn rejects_bad_lines() {
        for bad in [
            "CONNECT example.com",
            "CONNECT example.com:0",
            "GET https://example.com/",
            "GET",
            "G(T http://x/",
            "GET http://u@x/",
            "GET http://:80/",
        ] {
            assert!(RequestLine::parse(bad).is_err(), "{bad}");
        }
    }
}
