//! DLP scan throughput on 1 MiB bodies with the `secrets` and `pii` sets,
//! against a baseline measured in the same run: counting newlines with
//! `memchr` over the same bytes.
//!
//! Inputs are built deterministically: English prose, a JSON
//! chat-completions body with many messages, and base64 blobs.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use egress_policy::dlp::{BodyFormat, DetectorSet, Literals, Scanner};

const SIZE: usize = 1 << 20;

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "had",
    "they",
    "you",
    "were",
    "their",
    "one",
    "all",
    "we",
    "can",
    "her",
    "has",
    "there",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "request",
    "gateway",
    "policy",
    "model",
    "response",
    "summary",
    "September",
    "London",
    "2024",
    "42",
    "3.5",
    "customer",
    "invoice",
    "deploy",
    "agent",
    "token",
];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn prose(rng: &mut Rng, len: usize) -> String {
    let mut s = String::with_capacity(len + 16);
    let mut sentence = 0;
    while s.len() < len {
        let w = WORDS[(rng.next() % WORDS.len() as u64) as usize];
        if sentence == 0 {
            let mut c = w.chars();
            if let Some(f) = c.next() {
                s.extend(f.to_uppercase());
                s.push_str(c.as_str());
            }
        } else {
            s.push_str(w);
        }
        sentence += 1;
        if sentence > 8 && rng.next().is_multiple_of(6) {
            s.push_str(if rng.next().is_multiple_of(5) {
                ".\n"
            } else {
                ". "
            });
            sentence = 0;
        } else if rng.next().is_multiple_of(12) {
            s.push_str(", ");
        } else {
            s.push(' ');
        }
    }
    s
}

fn prose_body() -> Vec<u8> {
    let mut s = prose(&mut Rng(0x9E37_79B9_7F4A_7C15), SIZE).into_bytes();
    s.truncate(SIZE);
    s
}

fn chat_body() -> Vec<u8> {
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    let mut messages = Vec::new();
    let mut total = 0;
    while total < SIZE {
        let len = 200 + (rng.next() % 1800) as usize;
        let content = prose(&mut rng, len);
        total += content.len() + 40;
        let role = if messages.len() % 2 == 0 {
            "user"
        } else {
            "assistant"
        };
        messages.push(serde_json::json!({"role": role, "content": content}));
    }
    let mut body = serde_json::to_vec(&serde_json::json!({
        "model": "gpt-4o-mini",
        "temperature": 0.2,
        "stream": true,
        "messages": messages,
    }))
    .unwrap_or_default();
    body.truncate(SIZE);
    body
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_body() -> Vec<u8> {
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let mut body = Vec::with_capacity(SIZE);
    while body.len() < SIZE {
        for _ in 0..76 {
            body.push(B64[(rng.next() % 64) as usize]);
        }
        body.push(b'\n');
    }
    body.truncate(SIZE);
    body
}

fn bench(c: &mut Criterion) {
    let scanner = Scanner::new(&[DetectorSet::Secrets, DetectorSet::Pii], &[])
        .unwrap_or_else(|e| panic!("{e}"));
    let literals = Literals::new([b"not-in-the-body-0123456789".to_vec()]);
    let inputs = [
        ("prose", prose_body(), BodyFormat::Text),
        ("chat_json", chat_body(), BodyFormat::Json),
        ("base64", base64_body(), BodyFormat::Text),
    ];
    let mut group = c.benchmark_group("dlp");
    for (name, body, format) in &inputs {
        assert!(
            scanner.scan(body, *format, &literals).is_empty(),
            "{name} has findings"
        );
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(format!("scan/{name}"), |b| {
            b.iter(|| scanner.scan(black_box(body), *format, &literals))
        });
        group.bench_function(format!("memchr_newlines/{name}"), |b| {
            b.iter(|| memchr::memchr_iter(b'\n', black_box(body)).count())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
