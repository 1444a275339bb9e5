//! `evaluate` on a policy with 10,000 agents x 20 destinations, against
//! baselines measured in the same run: a plain HashMap lookup of the source
//! ID and the same request on a single-agent policy.
//!
//! Before the criterion groups it prints p50 figures (median of 200 batches of
//! 1,000 calls) and the load+compile time, so the goals can be read directly.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime};

use criterion::{criterion_group, Criterion};
use egress_policy::{Policy, Request, RequestKind, SpiffeId};

const AGENTS: usize = 10_000;
/// 4 pathways x 5 destinations: exact hosts and `*.` wildcards.
const PATHWAYS: usize = 4;
const DESTS: usize = 5;

#[derive(Clone, Copy, PartialEq)]
enum Cel {
    None,
    /// One deny rule, evaluated for every request.
    DenyRule,
    /// A `when` on the allowing pathway.
    When,
}

fn policy_yaml(agents: usize, cel: Cel) -> String {
    let mut y = String::from("version: 1\ntrust_domains: [example.org]\n");
    if cel == Cel::DenyRule {
        y.push_str("rules:\n  - name: no-paste\n    action: deny\n    when: 'request.host.endsWith(\"pastebin.com\")'\n");
    }
    y.push_str("agents:\n");
    for a in 0..agents {
        let _ = write!(
            y,
            "  - name: agent-{a}\n    id: spiffe://example.org/ns/ai/sa/agent-{a}\n    pathways:\n"
        );
        for p in 0..PATHWAYS {
            let _ = write!(y, "      - name: p{p}\n        destinations: [");
            for d in 0..DESTS {
                let host = if d % 2 == 0 {
                    format!("h{d}.svc{p}.a{a}.example.com")
                } else {
                    format!("*.svc{p}-{d}.a{a}.example.net")
                };
                let _ = write!(y, "\"{host}:443\"{}", if d + 1 < DESTS { ", " } else { "" });
            }
            y.push_str("]\n");
            if cel == Cel::When && p == PATHWAYS - 1 {
                y.push_str("        when: 'request.path.startsWith(\"/v1/\")'\n");
            }
        }
    }
    y
}

struct Req {
    id: SpiffeId,
    host: String,
    kind: RequestKind,
}

impl Req {
    /// A request allowed by the last pathway's last exact destination of agent `a`.
    fn allowed(a: usize) -> Req {
        Req {
            id: format!("spiffe://example.org/ns/ai/sa/agent-{a}")
                .parse()
                .unwrap(),
            host: format!("h4.svc{}.a{a}.example.com", PATHWAYS - 1),
            kind: RequestKind::Http,
        }
    }

    fn request(&self) -> Request<'_> {
        Request {
            source: &self.id,
            source_address: None,
            kind: self.kind,
            method: "GET",
            host: &self.host,
            port: 443,
            path: "/v1/models",
            query: "",
            headers: egress_policy::HeaderView::empty(),
            llm_model: None,
            now: SystemTime::UNIX_EPOCH,
        }
    }
}

fn p50(mut f: impl FnMut()) -> Duration {
    const BATCH: u32 = 1_000;
    for _ in 0..BATCH * 20 {
        f();
    }
    let mut samples: Vec<Duration> = (0..200)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..BATCH {
                f();
            }
            t.elapsed() / BATCH
        })
        .collect();
    samples.sort();
    samples[samples.len() / 2]
}

fn report() {
    let big = policy_yaml(AGENTS, Cel::None);
    let t = Instant::now();
    let p = Policy::from_yaml_str(&big, "bench.yaml").unwrap();
    let load = t.elapsed();
    let small = Policy::from_yaml_str(&policy_yaml(1, Cel::None), "one.yaml").unwrap();
    let t = Instant::now();
    let _ = Policy::from_yaml_str(&policy_yaml(1, Cel::None), "one.yaml").unwrap();
    let load_one = t.elapsed();
    let deny = Policy::from_yaml_str(&policy_yaml(AGENTS, Cel::DenyRule), "b.yaml").unwrap();
    let when = Policy::from_yaml_str(&policy_yaml(AGENTS, Cel::When), "b.yaml").unwrap();
    let deny_one = Policy::from_yaml_str(&policy_yaml(1, Cel::DenyRule), "b.yaml").unwrap();

    let ids: HashMap<String, usize> = (0..AGENTS)
        .map(|a| (format!("spiffe://example.org/ns/ai/sa/agent-{a}"), a))
        .collect();
    let r = Req::allowed(AGENTS / 2);
    let r0 = Req::allowed(0);
    let miss = Req {
        host: "not-listed.example.org".into(),
        ..Req::allowed(AGENTS / 2)
    };

    let base = p50(|| {
        black_box(ids.get(black_box(r.id.as_str())));
    });
    let one = p50(|| assert!(black_box(small.evaluate(black_box(&r0.request()))).allowed));
    let allow = p50(|| assert!(black_box(p.evaluate(black_box(&r.request()))).allowed));
    let deny_miss = p50(|| assert!(!black_box(p.evaluate(black_box(&miss.request()))).allowed));
    let with_rule = p50(|| assert!(black_box(deny.evaluate(black_box(&r.request()))).allowed));
    let with_rule_one =
        p50(|| assert!(black_box(deny_one.evaluate(black_box(&r0.request()))).allowed));
    let with_when = p50(|| assert!(black_box(when.evaluate(black_box(&r.request()))).allowed));

    let ratio = |d: Duration, b: Duration| d.as_secs_f64() / b.as_secs_f64();
    println!(
        "== p50 per call ({AGENTS} agents x {} destinations) ==",
        PATHWAYS * DESTS
    );
    println!("baseline HashMap<String,_> lookup of the source ID: {base:?}");
    println!("baseline single-agent policy, allow, no CEL:        {one:?}");
    println!(
        "allow, no CEL:                 {allow:?}  ({:.1}x HashMap, {:.2}x single-agent)",
        ratio(allow, base),
        ratio(allow, one)
    );
    println!(
        "deny (no pathway), no CEL:     {deny_miss:?}  ({:.1}x HashMap, {:.2}x single-agent)",
        ratio(deny_miss, base),
        ratio(deny_miss, one)
    );
    println!(
        "allow, one CEL deny rule:      {with_rule:?}  ({:.1}x HashMap, {:.2}x single-agent same rule)",
        ratio(with_rule, base),
        ratio(with_rule, with_rule_one)
    );
    println!(
        "allow, one CEL `when`:         {with_when:?}  ({:.1}x HashMap, {:.2}x single-agent no CEL)",
        ratio(with_when, base),
        ratio(with_when, one)
    );
    println!(
        "load+compile {AGENTS} agents: {load:?} ({} bytes of YAML; single-agent load {load_one:?}, {:.0}x)",
        big.len(),
        ratio(load, load_one)
    );
}

fn benches(c: &mut Criterion) {
    let p = Policy::from_yaml_str(&policy_yaml(AGENTS, Cel::None), "bench.yaml").unwrap();
    let deny = Policy::from_yaml_str(&policy_yaml(AGENTS, Cel::DenyRule), "b.yaml").unwrap();
    let when = Policy::from_yaml_str(&policy_yaml(AGENTS, Cel::When), "b.yaml").unwrap();
    let small = Policy::from_yaml_str(&policy_yaml(1, Cel::None), "one.yaml").unwrap();
    let ids: HashMap<String, usize> = (0..AGENTS)
        .map(|a| (format!("spiffe://example.org/ns/ai/sa/agent-{a}"), a))
        .collect();
    let r = Req::allowed(AGENTS / 2);
    let r0 = Req::allowed(0);

    let mut g = c.benchmark_group("evaluate");
    g.bench_function("baseline_hashmap_source_id", |b| {
        b.iter(|| black_box(ids.get(black_box(r.id.as_str()))))
    });
    g.bench_function("baseline_single_agent", |b| {
        b.iter(|| black_box(small.evaluate(black_box(&r0.request()))))
    });
    g.bench_function("10k_agents_allowlist", |b| {
        b.iter(|| black_box(p.evaluate(black_box(&r.request()))))
    });
    g.bench_function("10k_agents_cel_deny_rule", |b| {
        b.iter(|| black_box(deny.evaluate(black_box(&r.request()))))
    });
    g.bench_function("10k_agents_cel_when", |b| {
        b.iter(|| black_box(when.evaluate(black_box(&r.request()))))
    });
    g.finish();

    let yaml = policy_yaml(AGENTS, Cel::None);
    let mut g = c.benchmark_group("load");
    g.sample_size(10);
    g.bench_function("10k_agents_load_compile", |b| {
        b.iter(|| black_box(Policy::from_yaml_str(black_box(&yaml), "bench.yaml").unwrap()))
    });
    g.finish();
}

criterion_group!(group, benches);

fn main() {
    report();
    group();
    Criterion::default().configure_from_args().final_summary();
}
