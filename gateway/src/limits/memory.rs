//! Limit state in this process: `governor` for request rates, counters for
//! concurrency, and fixed hourly windows for byte and token budgets.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use super::{window_now, Budgets, Key, LimitHit, LimitKind, LimitUsage, Verdict};

/// (window id, used in that window).
type WindowCount = (u64, u64);

#[derive(Default)]
pub struct MemoryBackend {
    /// Keyed with the rate too, so a reload that changes it starts a fresh limiter.
    rates: DashMap<(Key, u32), Arc<DefaultDirectRateLimiter>>,
    in_flight: DashMap<Key, Arc<InFlight>>,
    /// (window id, used) per key and budget.
    budgets: DashMap<(Key, LimitKind), Arc<Mutex<WindowCount>>>,
}

pub struct InFlight {
    count: AtomicU64,
    max: AtomicU64,
}

/// A concurrency slot, given back on drop.
pub struct Permit(Arc<InFlight>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::AcqRel);
    }
}

impl MemoryBackend {
    pub(crate) fn acquire(&self, key: &Key, max: u32) -> Option<Permit> {
        let slot = self
            .in_flight
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(InFlight {
                    count: AtomicU64::new(0),
                    max: AtomicU64::new(0),
                })
            })
            .clone();
        slot.max.store(u64::from(max), Ordering::Relaxed);
        let max = u64::from(max);
        slot.count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Permit(slot))
    }

    pub(crate) fn concurrency_snapshot(&self) -> Vec<LimitUsage> {
        self.in_flight
            .iter()
            .map(|e| LimitUsage {
                agent: e.key().agent.to_string(),
                pathway: e.key().pathway.to_string(),
                kind: LimitKind::MaxConcurrent.as_str(),
                used: e.value().count.load(Ordering::Relaxed),
                limit: e.value().max.load(Ordering::Relaxed),
            })
            .collect()
    }

    fn used(&self, key: &Key, kind: LimitKind, window: u64) -> u64 {
        match self.budgets.get(&(key.clone(), kind)) {
            Some(slot) => match slot.lock() {
                Ok(g) if g.0 == window => g.1,
                _ => 0,
            },
            None => 0,
        }
    }

    pub(crate) fn admit(&self, key: &Key, b: Budgets) -> Verdict {
        let (window, left) = window_now();
        let bytes_used = self.used(key, LimitKind::BytesPerHour, window);
        let tokens_used = self.used(key, LimitKind::LlmTokensPerHour, window);
        for (kind, limit, used, unit) in [
            (LimitKind::BytesPerHour, b.bytes, bytes_used, "bytes"),
            (
                LimitKind::LlmTokensPerHour,
                b.tokens,
                tokens_used,
                "LLM tokens",
            ),
        ] {
            if let Some(limit) = limit {
                if used >= limit {
                    return Verdict::Refuse(LimitHit {
                        kind,
                        retry_after: left,
                        reason: format!(
                            "{used} of {limit} {unit} this hour used on pathway `{}`",
                            key.pathway
                        ),
                    });
                }
            }
        }
        // Checked last, so a request refused for a budget does not use up the rate.
        if let Some(rpm) = b.rpm.and_then(NonZeroU32::new) {
            let limiter = self
                .rates
                .entry((key.clone(), rpm.get()))
                .or_insert_with(|| Arc::new(RateLimiter::direct(Quota::per_minute(rpm))))
                .clone();
            if let Err(not_until) = limiter.check() {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                return Verdict::Refuse(LimitHit {
                    kind: LimitKind::RequestsPerMinute,
                    retry_after: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
                    reason: format!(
                        "more than {rpm} requests per minute on pathway `{}`",
                        key.pathway
                    ),
                });
            }
        }
        Verdict::Admit {
            bytes_used,
            tokens_used,
            in_flight: None,
        }
    }

    /// Adds `n` to the current window; returns the window's total.
    pub(crate) fn charge(&self, key: &Key, kind: LimitKind, n: u64) -> u64 {
        let (window, _) = window_now();
        let slot = self
            .budgets
            .entry((key.clone(), kind))
            .or_insert_with(|| Arc::new(Mutex::new((window, 0))))
            .clone();
        let Ok(mut g) = slot.lock() else {
            return 0;
        };
        if g.0 != window {
            *g = (window, 0);
        }
        g.1 = g.1.saturating_add(n);
        g.1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        Key {
            agent: "a".into(),
            pathway: "p".into(),
        }
    }

    #[test]
    fn rate_fires_after_the_quota_not_before() {
        let m = MemoryBackend::default();
        let b = Budgets {
            rpm: Some(3),
            ..Default::default()
        };
        for _ in 0..3 {
            assert!(matches!(m.admit(&key(), b), Verdict::Admit { .. }));
        }
        match m.admit(&key(), b) {
            Verdict::Refuse(hit) => {
                assert_eq!(hit.kind, LimitKind::RequestsPerMinute);
                assert!(hit.retry_after >= 1 && hit.retry_after <= 20);
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn budgets_refuse_once_spent() {
        let m = MemoryBackend::default();
        let b = Budgets {
            tokens: Some(100),
            ..Default::default()
        };
        assert!(matches!(m.admit(&key(), b), Verdict::Admit { .. }));
        assert_eq!(m.charge(&key(), LimitKind::LlmTokensPerHour, 99), 99);
        assert!(matches!(m.admit(&key(), b), Verdict::Admit { .. }));
        m.charge(&key(), LimitKind::LlmTokensPerHour, 1);
        assert!(matches!(
            m.admit(&key(), b),
            Verdict::Refuse(LimitHit {
                kind: LimitKind::LlmTokensPerHour,
                ..
            })
        ));
    }

    #[test]
    fn concurrency_slots_come_back() {
        let m = MemoryBackend::default();
        let p1 = m.acquire(&key(), 2).unwrap();
        let _p2 = m.acquire(&key(), 2).unwrap();
        assert!(m.acquire(&key(), 2).is_none());
        drop(p1);
        assert!(m.acquire(&key(), 2).is_some());
    }
}
