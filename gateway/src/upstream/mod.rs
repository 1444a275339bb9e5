//! What the gateway does on the upstream side of an L7 pathway: TLS or SPIFFE mTLS
//! origination (`tls`) and credential injection (`secrets`).

pub mod secrets;
pub mod tls;

use egress_policy::Policy;

pub use secrets::{SecretError, Secrets};
pub use tls::{OriginationError, ProfileKey, UpstreamTls};

/// Checks, at policy load, everything an L7 pathway needs from the filesystem: every
/// `secret_file` is readable and non-empty, every `ca_file` holds certificates. A
/// policy that fails this is rejected, so no request is ever forwarded without its
/// credential or with an unusable trust anchor.
///
/// Every file is read off the runtime, bounded in size and time ([`crate::files`]): a
/// FIFO or a device where a file should be is an error naming it, never a stall.
pub async fn check_policy_files(policy: &Policy, secrets: &Secrets) -> Result<(), Vec<String>> {
    let mut errors = Vec::new();
    for pathway in policy.pathways() {
        let Some(up) = &pathway.upstream else {
            continue;
        };
        let context = format!("agent {:?}, pathway {:?}", pathway.agent, pathway.name);
        for (header, secret) in &up.inject_headers {
            if let Err(e) = secrets.load(&secret.secret_file).await {
                errors.push(format!("{context}: inject_headers.{header}: {e}"));
            }
        }
        if let Some(ca) = &up.ca_file {
            if let Err(e) = tls::read_ca_file(ca).await {
                errors.push(format!("{context}: upstream.ca_file: {e}"));
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}
