//! Writes a synthetic audit log for timing `policy suggest`:
//! `cargo run --release -p egress-gateway --example gen_audit_log -- 1000000 > audit.log`.
//!
//! 50 agents of ~40 hosts each under 200 registrable domains (some below public
//! suffixes such as github.io), tunnels and L7 requests, allows, audit-mode
//! denials, rule denials and blocked addresses. Deterministic.

use std::io::{BufWriter, Write};

/// xorshift64*: deterministic without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn main() -> anyhow::Result<()> {
    let lines: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut out = BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
    let start_ms: i64 = 1_740_000_000_000;
    for i in 0..lines {
        let agent = rng.below(50);
        // Each agent talks to its own ~40 hosts, a few of them most of the
        // time (as real agents do), drawn from 200 registrable domains.
        let slot = if rng.below(4) == 0 {
            rng.below(40)
        } else {
            rng.below(5)
        };
        let domain = (agent * 7 + slot * 13) % 200;
        let sub = (agent + slot) % 10;
        let host = match domain % 10 {
            0 => format!("user{domain}-{sub}.github.io"),
            1 => format!("svc{sub}.team{domain}.svc.cluster.local"),
            _ => format!("h{sub}.domain{domain}.com"),
        };
        let http = rng.below(4) == 0;
        let (kind, method, port, path) = if http {
            let m = ["GET", "POST", "GET", "PUT"][rng.below(4) as usize];
            let p = format!("/v{}/items/{}", rng.below(2) + 1, rng.below(1000));
            ("http", m, 443, p)
        } else {
            ("connect", "CONNECT", 443, String::new())
        };
        let roll = rng.below(100);
        let (decision, enforced, rule, reason) = match roll {
            0..=39 => ("allow", true, "null", "allowed by pathway"),
            40..=89 => ("deny", false, "null", "no pathway allows this destination"),
            90..=94 => ("deny", false, "\"no-paste-sites\"", "denied by rule"),
            _ => ("deny", true, "null", "destination address not allowed"),
        };
        let ms = start_ms + (i as i64) * 50;
        let secs = ms / 1000;
        let ts = format!("{}.{:03}Z", chrono_like(secs), ms % 1000);
        writeln!(
            out,
            r#"{{"ts":"{ts}","trace_id":"{:032x}","span_id":"{:016x}","source_spiffe_id":"spiffe://example.org/ns/ai-workloads/sa/agent-{agent}","source_address":"10.1.0.{agent}:40000","agent":null,"kind":"{kind}","method":"{method}","host":"{host}","port":{port},"path":"{path}","decision":"{decision}","enforced":{enforced},"rule":{rule},"pathway":null,"reason":"{reason}","status":403,"resolved_ip":"203.0.113.7","bytes_sent":{},"bytes_received":{},"duration_ms":{}}}"#,
            rng.next(),
            rng.next(),
            rng.below(10_000),
            rng.below(100_000),
            rng.below(500)
        )?;
    }
    out.flush()?;
    Ok(())
}

/// `YYYY-MM-DDTHH:MM:SS` for seconds since the epoch (UTC, proleptic Gregorian).
fn chrono_like(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}
