//! A mutational fuzzer that builds with the stable toolchain (cargo-fuzz needs nightly).
//! Shared by `examples/fuzz.rs` (long runs) and `tests/fuzz_smoke.rs` (CI smoke runs).
//!
//! Each target has seed inputs, a dictionary and oracles beyond "does not panic": the
//! host parser must never produce a name a C resolver reads as an address, the
//! ClientHello reader must agree with itself across prefixes and record splits, and a
//! policy that loads must evaluate. A panic is a crash; its input is saved.

use std::net::{IpAddr, Ipv4Addr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use egress_gateway::proxy::client_hello;
use egress_gateway::proxy::target::{parse_authority, Host};

pub const TARGETS: &[&str] = &["host", "client_hello", "policy"];

#[derive(Debug, Default, Clone)]
pub struct Report {
    pub target: String,
    pub executions: u64,
    pub elapsed: Duration,
    pub crashes: u64,
    pub accepted: u64,
    pub crash_files: Vec<PathBuf>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "target={} executions={} seconds={:.1} exec/s={:.0} accepted={} crashes={}",
            self.target,
            self.executions,
            self.elapsed.as_secs_f64(),
            self.executions as f64 / self.elapsed.as_secs_f64().max(0.001),
            self.accepted,
            self.crashes
        )
    }
}

/// xorshift64*: deterministic for a seed, good enough to pick mutations.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

const INTERESTING: &[u8] = &[
    0, 1, 0x7f, 0x80, 0xff, b'.', b':', b'[', b']', b'0', b'x', b'%', b'@',
];

/// One random edit (or a few) of `input`, using `dict` tokens and `pool` for splices.
pub fn mutate(
    rng: &mut Rng,
    input: &[u8],
    dict: &[&[u8]],
    pool: &[Vec<u8>],
    max: usize,
) -> Vec<u8> {
    let mut out = input.to_vec();
    let edits = 1 + rng.below(4);
    for _ in 0..edits {
        let len = out.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                out[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                out[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 if len > 0 => {
                let i = rng.below(len);
                out[i] = rng.next() as u8;
            }
            3 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                out.splice(i..i, bytes);
            }
            4 if len > 0 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(16)).min(len);
                out.drain(a..b);
            }
            5 if len > 0 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(32)).min(len);
                let chunk = out[a..b].to_vec();
                let at = rng.below(out.len() + 1);
                out.splice(at..at, chunk);
            }
            6 if !dict.is_empty() => {
                let t = dict[rng.below(dict.len())];
                let at = rng.below(len + 1);
                out.splice(at..at, t.iter().copied());
            }
            7 if !pool.is_empty() => {
                let other = &pool[rng.below(pool.len())];
                if !other.is_empty() {
                    let a = rng.below(other.len());
                    let b = (a + 1 + rng.below(64)).min(other.len());
                    let at = rng.below(len + 1);
                    out.splice(at..at, other[a..b].iter().copied());
                }
            }
            8 if len > 1 => {
                out.truncate(rng.below(len));
            }
            _ => {}
        }
    }
    out.truncate(max);
    out
}

// === host target ===

const HOST_SEEDS: &[&str] = &[
    "example.com:443",
    "API.OpenAI.com.:443",
    "[::1]:80",
    "[::ffff:127.0.0.1]:8080",
    "[64:ff9b::a9fe:a9fe]:80",
    "127.0.0.1:80",
    "169.254.169.254:80",
    "2852039166:80",
    "0xA9FEA9FE:80",
    "0251.0376.0251.0376:80",
    "127.1:80",
    "bücher.example:443",
    "ｅｘａｍｐｌｅ.com:443",
    "１２７.０.０.１:80",
    "xn--bcher-kva.example:443",
    "a.b.c.d.e:1",
    "user@host:80",
    "[fe80::1%25eth0]:80",
];

const HOST_DICT: &[&[u8]] = &[
    b"0x",
    b"0X",
    b"0",
    b"00",
    b".",
    b"..",
    b":",
    b"::",
    b"[",
    b"]",
    b"%",
    b"%25",
    b"@",
    b"xn--",
    b"::ffff:",
    b"64:ff9b::",
    b"2002:",
    b"127",
    b"255",
    b"4294967295",
    b"4294967296",
    b"\xef\xbc\x8e",
    b"\xef\xbc\x91",
    b"\xe3\x80\x82",
    b"-",
    b"_",
    b"*",
    b"\0",
    b" ",
    b"443",
    b"65535",
    b"65536",
];

/// Everything glibc's `inet_aton` accepts: 1-4 parts, each decimal, octal (0...) or hex
/// (0x...), values within range for their position. Written independently of
/// `target.rs` so the two can disagree.
fn inet_aton_accepts(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return false;
    }
    let mut values = Vec::new();
    for p in &parts {
        let v = if let Some(h) = p.strip_prefix("0x").or_else(|| p.strip_prefix("0X")) {
            if h.is_empty() {
                Some(0)
            } else {
                u64::from_str_radix(h, 16).ok()
            }
        } else if p.len() > 1 && p.starts_with('0') {
            u64::from_str_radix(&p[1..], 8).ok()
        } else if p.is_empty() {
            None
        } else {
            p.parse::<u64>().ok()
        };
        match v {
            Some(v) => values.push(v),
            None => return false,
        }
    }
    let last_max = [u32::MAX as u64, 0xFF_FFFF, 0xFFFF, 0xFF][values.len() - 1];
    values[..values.len() - 1].iter().all(|v| *v <= 0xFF) && values[values.len() - 1] <= last_max
}

fn host_oracle(input: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(input) else {
        return false;
    };
    // The CONNECT form and the URL form (as forward.rs reads it).
    let mut accepted = false;
    for authority in [Some(text.to_string()), url_authority(text)]
        .into_iter()
        .flatten()
    {
        let Ok(t) = parse_authority(&authority) else {
            continue;
        };
        accepted = true;
        assert!(t.port != 0, "port 0 accepted from {authority:?}");
        match &t.host {
            Host::Name(n) => {
                assert!(!n.is_empty() && n.len() <= 253, "{authority:?} -> {n:?}");
                assert!(
                    n.bytes().all(|b| b.is_ascii_lowercase()
                        || b.is_ascii_digit()
                        || b == b'-'
                        || b == b'_'
                        || b == b'.'),
                    "{authority:?} -> non-canonical name {n:?}"
                );
                assert!(
                    !inet_aton_accepts(n),
                    "{authority:?} -> {n:?} is an address to a C resolver"
                );
                assert!(
                    n.parse::<IpAddr>().is_err(),
                    "{authority:?} -> {n:?} is an IP literal"
                );
                assert!(!n.ends_with('.'), "{authority:?} -> trailing dot kept");
                // Parsing is idempotent.
                let again = parse_authority(&format!("{n}:{}", t.port)).map(|t| t.host);
                assert_eq!(again.as_ref(), Ok(&t.host), "{authority:?} not idempotent");
            }
            Host::Ip(ip) => {
                // Only canonical literals: what we print parses back to the same address.
                let again = parse_authority(&t.to_string()).map(|t| t.host);
                assert_eq!(again, Ok(Host::Ip(*ip)), "{authority:?} round trip");
                if let IpAddr::V4(v4) = ip {
                    let host = authority.rsplit_once(':').map(|(h, _)| h).unwrap_or("");
                    assert_eq!(
                        host.parse::<Ipv4Addr>().ok(),
                        Some(*v4),
                        "{authority:?} non-canonical IPv4 accepted"
                    );
                }
            }
        }
    }
    accepted
}

fn url_authority(text: &str) -> Option<String> {
    let uri: http::Uri = format!("http://{text}/").parse().ok()?;
    let authority = uri.authority()?.as_str().to_string();
    Some(if uri.port_u16().is_some() {
        authority
    } else {
        format!("{authority}:80")
    })
}

// === ClientHello target ===

fn build_hello(rng: &mut Rng) -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend((0..32).map(|_| rng.next() as u8));
    let sid = rng.below(33);
    body.push(sid as u8);
    body.extend((0..sid).map(|_| rng.next() as u8));
    let suites = 1 + rng.below(20);
    body.extend_from_slice(&((suites * 2) as u16).to_be_bytes());
    body.extend((0..suites * 2).map(|_| rng.next() as u8));
    body.extend_from_slice(&[1, 0]);
    let mut exts = Vec::new();
    for _ in 0..rng.below(12) {
        let (ty, data): (u16, Vec<u8>) = match rng.below(4) {
            0 => {
                let name: Vec<u8> = match rng.below(3) {
                    0 => b"example.com".to_vec(),
                    1 => b"api.openai.com".to_vec(),
                    _ => (0..1 + rng.below(40))
                        .map(|_| b"abc.-0123456789xyz"[rng.below(18)])
                        .collect(),
                };
                let mut list = vec![0];
                list.extend_from_slice(&(name.len() as u16).to_be_bytes());
                list.extend_from_slice(&name);
                let mut d = (list.len() as u16).to_be_bytes().to_vec();
                d.extend_from_slice(&list);
                (0, d)
            }
            1 => (43, vec![4, 3, 4, 3, 3]),
            2 => (10, vec![0, 4, 0, 29, 0x11, 0xec]),
            _ => {
                let n = rng.below(300);
                (
                    rng.next() as u16,
                    (0..n).map(|_| rng.next() as u8).collect(),
                )
            }
        };
        exts.extend_from_slice(&ty.to_be_bytes());
        exts.extend_from_slice(&(data.len() as u16).to_be_bytes());
        exts.extend_from_slice(&data);
    }
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    fragment(rng, &hs)
}

/// Splits handshake bytes into TLS records at random sizes.
fn fragment(rng: &mut Rng, hs: &[u8]) -> Vec<u8> {
    let per = if rng.chance(2) {
        hs.len().max(1)
    } else {
        1 + rng.below(hs.len().max(1))
    };
    let mut out = Vec::new();
    for part in hs.chunks(per) {
        out.extend_from_slice(&[0x16, 3, 1]);
        out.extend_from_slice(&(part.len() as u16).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// Handshake bytes back out of records, when the input is a clean record sequence.
fn unfragment(input: &[u8]) -> Option<Vec<u8>> {
    let mut hs = Vec::new();
    let mut pos = 0;
    while pos < input.len() {
        let h = input.get(pos..pos + 5)?;
        let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
        hs.extend_from_slice(input.get(pos + 5..pos + 5 + len)?);
        pos += 5 + len;
    }
    Some(hs)
}

fn client_hello_oracle(rng: &mut Rng, input: &[u8]) -> bool {
    let full = client_hello::parse(input);
    if let Ok(Some(hello)) = &full {
        if let Some(sni) = &hello.sni {
            assert!(!sni.is_empty() && sni.is_ascii(), "bad SNI {sni:?}");
        }
        // A prefix either asks for more or (when the input has bytes after the
        // ClientHello) gives the same answer; never an error or another SNI.
        for _ in 0..4 {
            let cut = rng.below(input.len());
            let p = client_hello::parse(&input[..cut]);
            assert!(
                p == Ok(None) || p == full,
                "prefix of {cut}/{} bytes gave {p:?}",
                input.len()
            );
        }
        // Re-splitting the records changes nothing.
        if let Some(hs) = unfragment(input) {
            if input.first() == Some(&0x16) && input.get(1) == Some(&3) {
                let again = client_hello::parse(&fragment(rng, &hs));
                assert_eq!(again, full, "record split changed the result");
            }
        }
        // The SNI check never panics either.
        let _ = client_hello::check_sni(&Host::Name("example.com".into()), hello.sni.as_deref());
        return true;
    }
    false
}

// === policy target ===

fn policy_seeds() -> Vec<Vec<u8>> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../policy/examples");
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.extension().is_some_and(|x| x == "yaml")
                        && !p.to_string_lossy().ends_with(".tests.yaml")
                })
                .filter_map(|p| std::fs::read(p).ok())
                .collect()
        })
        .unwrap_or_default();
    seeds.push(b"version: 1\ntrust_domains: [example.org]\nagents: []\n".to_vec());
    seeds
}

const POLICY_DICT: &[&[u8]] = &[
    b"\n",
    b"  ",
    b"- ",
    b": ",
    b"*",
    b"**",
    b"&a ",
    b"*a",
    b"!!str ",
    b"'",
    b"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b"when: ",
    b"request.host",
    b"==",
    b"&&",
    b"||",
    b"size(",
    b"matches(",
    b".*",
    b"allow_cidrs: ",
    b"10.0.0.0/8",
    b"::/0",
    b"destinations: ",
    b":443",
    b"spiffe://example.org/",
    b"dry_run: true",
    b"mode: audit",
    b"methods: [",
    b"models: [",
    b"limits: ",
    b"require_sni: true",
    b"upstream: ",
];

fn policy_oracle(input: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(input) else {
        return false;
    };
    let Ok(policy) = egress_policy::Policy::from_yaml_str(text, "fuzz.yaml") else {
        return false;
    };
    // A policy that loads must evaluate without panicking.
    let id: egress_policy::SpiffeId =
        match "spiffe://example.org/ns/ai-workloads/sa/research-agent".parse() {
            Ok(id) => id,
            Err(_) => return true,
        };
    for (kind, method, host, port, path) in [
        (
            egress_policy::RequestKind::Connect,
            "CONNECT",
            "en.wikipedia.org",
            443,
            "",
        ),
        (
            egress_policy::RequestKind::Http,
            "POST",
            "api.openai.com",
            443,
            "/v1/chat/completions",
        ),
        (egress_policy::RequestKind::Http, "GET", "10.0.0.1", 80, "/"),
    ] {
        let headers = egress_policy::HeaderView::new([("content-type", "application/json")]);
        let _ = policy.evaluate(&egress_policy::Request {
            source: &id,
            source_address: None,
            kind,
            method,
            host,
            port,
            path,
            query: "",
            headers: &headers,
            llm_model: Some("gpt-4o-mini"),
            now: SystemTime::now(),
        });
    }
    true
}

// === the loop ===

/// Runs `target` for `budget`; saves crashing inputs under `crash_dir`.
pub fn run(target: &str, budget: Duration, seed: u64, crash_dir: &std::path::Path) -> Report {
    let mut rng = Rng::new(seed);
    let (mut pool, dict, max): (Vec<Vec<u8>>, &[&[u8]], usize) = match target {
        "host" => (
            HOST_SEEDS.iter().map(|s| s.as_bytes().to_vec()).collect(),
            HOST_DICT,
            600,
        ),
        "client_hello" => (
            (0..16).map(|_| build_hello(&mut rng)).collect(),
            &[],
            20_000,
        ),
        "policy" => (policy_seeds(), POLICY_DICT, 8_000),
        other => panic!("unknown fuzz target {other}; targets: {TARGETS:?}"),
    };
    let seeds = pool.len();
    // Quiet the default hook: a crash is reported once, by us.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let started = Instant::now();
    let mut report = Report {
        target: target.to_string(),
        ..Default::default()
    };
    while started.elapsed() < budget {
        for _ in 0..64 {
            let input = if target == "client_hello" && rng.chance(4) {
                build_hello(&mut rng)
            } else {
                let base = pool[rng.below(pool.len())].clone();
                mutate(&mut rng, &base, dict, &pool, max)
            };
            let mut oracle_rng = Rng::new(rng.next());
            let outcome = catch_unwind(AssertUnwindSafe(|| match target {
                "host" => host_oracle(&input),
                "client_hello" => client_hello_oracle(&mut oracle_rng, &input),
                _ => policy_oracle(&input),
            }));
            report.executions += 1;
            match outcome {
                Ok(true) => {
                    report.accepted += 1;
                    // Inputs that still parse are good bases for further mutation.
                    if pool.len() < seeds + 512 {
                        pool.push(input);
                    } else {
                        let i = seeds + rng.below(512);
                        pool[i] = input;
                    }
                }
                Ok(false) => {}
                Err(panic) => {
                    report.crashes += 1;
                    let msg = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    let _ = std::fs::create_dir_all(crash_dir);
                    let path = crash_dir.join(format!("{target}-crash-{}.bin", report.crashes));
                    let _ = std::fs::write(&path, &input);
                    eprintln!(
                        "CRASH in {target}: {msg} (input saved to {})",
                        path.display()
                    );
                    report.crash_files.push(path);
                }
            }
        }
    }
    std::panic::set_hook(hook);
    report.elapsed = started.elapsed();
    report
}
