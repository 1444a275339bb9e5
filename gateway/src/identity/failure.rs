//! TLS handshake failures as sentences for people (error bodies, logs), not the Rust
//! debug text rustls prints for some of them (`Other(OtherError(UnexpectedPeer {..}))`).

use rustls::{AlertDescription, CertificateError};

use super::SpiffeRejection;

/// Why a handshake with `peer` (e.g. "the gateway") failed, as a sentence fragment.
pub fn describe_tls_failure(e: &std::io::Error, peer: &str) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(tls) => describe(tls, peer),
        None => e.to_string(),
    }
}

fn describe(e: &rustls::Error, peer: &str) -> String {
    match e {
        rustls::Error::InvalidCertificate(c) => {
            format!("{peer}'s certificate was refused: {}", certificate(c))
        }
        rustls::Error::AlertReceived(alert) => {
            format!("{peer} refused the handshake ({})", alert_text(*alert))
        }
        rustls::Error::NoCertificatesPresented => format!("{peer} presented no certificate"),
        other => other.to_string(),
    }
}

fn certificate(c: &CertificateError) -> String {
    match c {
        CertificateError::Other(other) => match other.0.downcast_ref::<SpiffeRejection>() {
            Some(SpiffeRejection::UnexpectedPeer { got, expected }) => {
                format!("it is `{got}`, not the expected `{expected}`")
            }
            Some(r) => r.to_string(),
            None => other.0.to_string(),
        },
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            "it has expired".into()
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "it is not valid yet".into()
        }
        CertificateError::UnknownIssuer => {
            "it is not signed by a trusted CA (is the trust bundle current?)".into()
        }
        CertificateError::BadSignature => "its signature does not verify".into(),
        CertificateError::Revoked => "it has been revoked".into(),
        CertificateError::BadEncoding => "it is not a well-formed certificate".into(),
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            "it is not valid for the name that was dialled".into()
        }
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            "it is not valid for this use (extended key usage)".into()
        }
        _ => "it is not acceptable".into(),
    }
}

/// An alert's name in words: `UnknownCA` is "unknown CA".
fn alert_text(alert: AlertDescription) -> String {
    let name = match alert {
        AlertDescription::UnknownCA => return "alert: unknown CA".into(),
        other => format!("{other:?}"),
    };
    let mut words = String::from("alert: ");
    for (i, ch) in name.chars().enumerate() {
        if ch.is_ascii_uppercase() && i > 0 {
            words.push(' ');
        }
        words.push(ch.to_ascii_lowercase());
    }
    words
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn io(e: rustls::Error) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn an_unexpected_spiffe_id_reads_as_a_sentence() {
        let e = io(rustls::Error::InvalidCertificate(CertificateError::Other(
            rustls::OtherError(Arc::new(SpiffeRejection::UnexpectedPeer {
                got: "spiffe://example.org/gw".into(),
                expected: "spiffe://example.org/other".into(),
            })),
        )));
        let text = describe_tls_failure(&e, "the gateway");
        assert_eq!(
            text,
            "the gateway's certificate was refused: it is `spiffe://example.org/gw`, \
             not the expected `spiffe://example.org/other`"
        );
    }

    #[test]
    fn alerts_and_plain_io_errors() {
        let e = io(rustls::Error::AlertReceived(
            AlertDescription::CertificateExpired,
        ));
        assert_eq!(
            describe_tls_failure(&e, "the gateway"),
            "the gateway refused the handshake (alert: certificate expired)"
        );
        let e = io(rustls::Error::AlertReceived(AlertDescription::UnknownCA));
        assert!(describe_tls_failure(&e, "the gateway").ends_with("(alert: unknown CA)"));
        let e = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        assert_eq!(describe_tls_failure(&e, "the gateway"), "reset by peer");
    }
}
