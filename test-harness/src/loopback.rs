//! Listeners on loopback addresses of their own (`127.x.y.z`), so a test can serve a
//! well-known port such as 443 (where an unmodified `https://` client goes) without
//! colliding with other tests running at the same time.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::Context as _;
use tokio::net::TcpListener;

/// Binds `port` on a random `127.x.y.z` address not in use. Linux routes all of
/// 127.0.0.0/8 to loopback; binding a port below 1024 needs root (or a lowered
/// `net.ipv4.ip_unprivileged_port_start`).
pub async fn bind_unique(port: u16) -> anyhow::Result<TcpListener> {
    let mut last = None;
    for _ in 0..50 {
        let [a, b, c]: [u8; 3] = rand::random();
        // Keep clear of 127.0.0.x, where the other tests and services listen.
        let ip = Ipv4Addr::new(127, a.max(1), b, c.clamp(1, 254));
        match TcpListener::bind(SocketAddr::from((ip, port))).await {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(e).with_context(|| {
                    format!("binding port {port} on loopback needs root or a lower net.ipv4.ip_unprivileged_port_start")
                })
            }
            Err(e) => last = Some(e),
        }
    }
    Err(anyhow::anyhow!(
        "no free loopback address for port {port}: {last:?}"
    ))
}
