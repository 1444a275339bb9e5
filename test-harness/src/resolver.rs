//! Resolvers for SSRF tests: fixed answers per name, and a rebinding resolver whose
//! answer changes between lookups. Both count lookups, so a test can show that the
//! gateway resolves a name exactly once per request.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use egress_gateway::proxy::dial::ResolveFuture;
use egress_gateway::proxy::Resolve;

fn not_found(name: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("{name}: no such test name"),
    )
}

/// Answers each configured name with its fixed list of addresses; other names fail.
#[derive(Default)]
pub struct StaticResolver {
    answers: HashMap<String, Vec<IpAddr>>,
    lookups: Mutex<Vec<String>>,
}

impl StaticResolver {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `name` answering `ips` (written as strings; a bad literal is a test bug).
    pub fn with(mut self, name: &str, ips: &[&str]) -> Self {
        let ips = ips
            .iter()
            .map(|s| s.parse().expect("test resolver address literal"))
            .collect();
        self.answers.insert(name.to_string(), ips);
        self
    }

    /// Every name looked up so far, in order.
    pub fn lookups(&self) -> Vec<String> {
        self.lookups.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl Resolve for StaticResolver {
    fn resolve<'a>(&'a self, name: &'a str) -> ResolveFuture<'a> {
        Box::pin(async move {
            if let Ok(mut l) = self.lookups.lock() {
                l.push(name.to_string());
            }
            self.answers
                .get(name)
                .cloned()
                .ok_or_else(|| not_found(name))
        })
    }
}

/// Answers `name` with `answers[i % len]` on its i-th lookup: an attacker's DNS server
/// that says "allowed" first and "private" next (DNS rebinding).
pub struct RebindingResolver {
    name: String,
    answers: Vec<Vec<IpAddr>>,
    lookups: AtomicUsize,
}

impl RebindingResolver {
    pub fn new(name: &str, answers: &[&[&str]]) -> Arc<Self> {
        Arc::new(RebindingResolver {
            name: name.to_string(),
            answers: answers
                .iter()
                .map(|a| {
                    a.iter()
                        .map(|s| s.parse().expect("test resolver address literal"))
                        .collect()
                })
                .collect(),
            lookups: AtomicUsize::new(0),
        })
    }

    pub fn lookups(&self) -> usize {
        self.lookups.load(Ordering::SeqCst)
    }
}

impl Resolve for RebindingResolver {
    fn resolve<'a>(&'a self, name: &'a str) -> ResolveFuture<'a> {
        Box::pin(async move {
            if name != self.name || self.answers.is_empty() {
                return Err(not_found(name));
            }
            let i = self.lookups.fetch_add(1, Ordering::SeqCst);
            Ok(self.answers[i % self.answers.len()].clone())
        })
    }
}
