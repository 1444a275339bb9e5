//! Per-agent, per-pathway limits: request rate (`governor`), concurrency, and hourly
//! byte and LLM-token budgets. Counts live in this process (`memory`) or, with
//! `limits_backend: redis://…`, in Redis so that all replicas enforce one budget.
//!
//! Budgets are checked when a request or tunnel starts and charged as traffic moves,
//! so a request in flight is never cut by tokens counted after it started; the next
//! one is refused with 429 and `Retry-After` until the hourly window turns over.
//! With Redis, `max_concurrent` is shared too: each slot is a lease in Redis.

pub mod memory;
pub mod redis;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use egress_policy::Pathway;

use crate::config::OnBackendError;

pub use memory::MemoryBackend;
pub use redis::RedisBackend;

/// Which limit fired; the name is the policy key, as audit lines and metrics show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    RequestsPerMinute,
    MaxConcurrent,
    MaxRequestBodyBytes,
    BytesPerHour,
    LlmTokensPerHour,
    /// The shared backend was unreachable and `on_backend_error` is `deny`.
    Backend,
}

impl LimitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::RequestsPerMinute => "requests_per_minute",
            LimitKind::MaxConcurrent => "max_concurrent",
            LimitKind::MaxRequestBodyBytes => "max_request_body_bytes",
            LimitKind::BytesPerHour => "bytes_per_hour",
            LimitKind::LlmTokensPerHour => "llm_tokens_per_hour",
            LimitKind::Backend => "limits_backend",
        }
    }
}

/// A refused admission.
#[derive(Debug, Clone)]
pub struct LimitHit {
    pub kind: LimitKind,
    /// Seconds until a retry can succeed.
    pub retry_after: u64,
    pub reason: String,
}

/// One row of [`Limits::snapshot`]: consumption of one limit of one agent's pathway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitUsage {
    pub agent: String,
    pub pathway: String,
    /// `bytes_per_hour`, `llm_tokens_per_hour` or `max_concurrent`.
    pub kind: &'static str,
    /// Used in the current hour (budgets) or in flight (`max_concurrent`).
    pub used: u64,
    pub limit: u64,
}

/// The agent and pathway a count belongs to (policy names: bounded label values).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub agent: Arc<str>,
    pub pathway: Arc<str>,
}

/// Hourly budget windows: fixed, aligned to the Unix hour, the same in every replica.
pub const WINDOW: Duration = Duration::from_secs(3600);

pub(crate) fn window_now() -> (u64, u64) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let w = WINDOW.as_secs();
    // (window id, seconds until it ends)
    (secs / w, w - secs % w)
}

/// The budgets of one pathway that admission checks.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Budgets {
    pub rpm: Option<u32>,
    pub bytes: Option<u64>,
    pub tokens: Option<u64>,
}

impl Budgets {
    fn any(&self) -> bool {
        self.rpm.is_some() || self.bytes.is_some() || self.tokens.is_some()
    }
}

/// What the backends answer at admission.
#[derive(Debug)]
pub(crate) enum Verdict {
    Admit {
        bytes_used: u64,
        tokens_used: u64,
        /// In flight on all replicas, this one included (shared backend only).
        in_flight: Option<u64>,
    },
    Refuse(LimitHit),
}

/// All limit state of the gateway.
pub struct Limits {
    inner: Arc<Inner>,
}

struct Inner {
    memory: MemoryBackend,
    shared: Option<Arc<RedisBackend>>,
    on_error: OnBackendError,
    /// Last known consumption per (key, kind), for `snapshot`.
    observed: DashMap<(Key, &'static str), (u64, u64)>,
    last_backend_log: AtomicU64,
    on_backend_error: std::sync::OnceLock<BackendErrorHook>,
}

/// What the gateway did when the shared backend failed: `denied` or `counted_locally`.
pub type BackendErrorHook = Box<dyn Fn(&'static str) + Send + Sync>;

impl Default for Limits {
    fn default() -> Self {
        Limits::memory()
    }
}

impl Limits {
    /// Counts in this process only.
    pub fn memory() -> Self {
        Self::build(None, OnBackendError::Deny)
    }

    /// From `limits_backend` and `on_backend_error` in gateway.yaml. Redis is
    /// connected lazily: an unreachable Redis at start-up is a backend error per
    /// request (handled by `on_backend_error`), not a start-up failure.
    pub fn from_config(backend: &str, on_error: OnBackendError) -> Result<Self, LimitsError> {
        if backend == "memory" {
            return Ok(Self::memory());
        }
        let shared = RedisBackend::new(backend)?;
        tracing::info!(backend = %shared.display_url(), ?on_error, "limits shared through Redis");
        Ok(Self::build(Some(Arc::new(shared)), on_error))
    }

    /// Shared through an already-built Redis backend.
    pub fn shared(backend: RedisBackend, on_error: OnBackendError) -> Self {
        Self::build(Some(Arc::new(backend)), on_error)
    }

    fn build(shared: Option<Arc<RedisBackend>>, on_error: OnBackendError) -> Self {
        Limits {
            inner: Arc::new(Inner {
                memory: MemoryBackend::default(),
                shared,
                on_error,
                observed: DashMap::new(),
                last_backend_log: AtomicU64::new(0),
                on_backend_error: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Checks the pathway's limits for one more request or tunnel and, if it may
    /// start, takes its concurrency slot and its place in the rate limit.
    pub async fn admit(&self, agent: &str, pathway: &Pathway) -> Result<Admission, LimitHit> {
        let key = Key {
            agent: agent.into(),
            pathway: pathway.name.as_str().into(),
        };
        let l = &pathway.limits;
        let budgets = Budgets {
            rpm: l.requests_per_minute,
            bytes: l.bytes_per_hour,
            tokens: l.llm_tokens_per_hour,
        };
        let max = l.max_concurrent;
        if max.is_none() && !budgets.any() {
            return Ok(self.admission(key, budgets, false, Slot::None));
        }
        let (verdict, slot, local) = match &self.inner.shared {
            None => {
                let (verdict, slot) = self.admit_locally(&key, budgets, max)?;
                (verdict, slot, false)
            }
            Some(shared) => match shared.admit(&key, budgets, max).await {
                Ok((verdict, lease)) => {
                    let slot = match (lease, max) {
                        (Some(lease), Some(max)) => Slot::Shared(SharedSlot {
                            lease: Some(lease),
                            inner: self.inner.clone(),
                            key: key.clone(),
                            max: max.into(),
                        }),
                        _ => Slot::None,
                    };
                    (verdict, slot, false)
                }
                Err(e) => {
                    self.inner.backend_error(&e, self.inner.on_error);
                    match self.inner.on_error {
                        OnBackendError::Deny => {
                            return Err(LimitHit {
                                kind: LimitKind::Backend,
                                retry_after: 1,
                                reason: "the shared limits backend is unreachable; \
                                         refusing (on_backend_error: deny)"
                                    .into(),
                            })
                        }
                        OnBackendError::AllowLocal => {
                            let (verdict, slot) = self.admit_locally(&key, budgets, max)?;
                            (verdict, slot, true)
                        }
                    }
                }
            },
        };
        match verdict {
            Verdict::Refuse(hit) => Err(hit),
            Verdict::Admit {
                bytes_used,
                tokens_used,
                in_flight,
            } => {
                if let Some(b) = budgets.bytes {
                    self.observe(&key, LimitKind::BytesPerHour, bytes_used, b);
                }
                if let Some(t) = budgets.tokens {
                    self.observe(&key, LimitKind::LlmTokensPerHour, tokens_used, t);
                }
                if let (Some(n), Some(max)) = (in_flight, max) {
                    self.observe(&key, LimitKind::MaxConcurrent, n, max.into());
                }
                Ok(self.admission(key, budgets, local, slot))
            }
        }
    }

    /// Admission against this process's own counts: the concurrency slot first, then
    /// budgets and rate.
    fn admit_locally(
        &self,
        key: &Key,
        budgets: Budgets,
        max: Option<u32>,
    ) -> Result<(Verdict, Slot), LimitHit> {
        let slot = match max {
            Some(max) => {
                Slot::Local(
                    self.inner
                        .memory
                        .acquire(key, max)
                        .ok_or_else(|| LimitHit {
                            kind: LimitKind::MaxConcurrent,
                            retry_after: 1,
                            reason: format!(
                                "{max} requests already in flight on pathway `{}`",
                                key.pathway
                            ),
                        })?,
                )
            }
            None => Slot::None,
        };
        let verdict = if budgets.any() {
            self.inner.memory.admit(key, budgets)
        } else {
            Verdict::Admit {
                bytes_used: 0,
                tokens_used: 0,
                in_flight: None,
            }
        };
        Ok((verdict, slot))
    }

    fn admission(&self, key: Key, budgets: Budgets, local: bool, slot: Slot) -> Admission {
        Admission {
            limits: self.inner.clone(),
            key,
            budgets,
            local,
            charged: AtomicU64::new(0),
            _slot: slot,
        }
    }

    /// Consumption per agent, pathway and limit, for `/metrics`. Budgets show the last
    /// value this replica saw (with Redis, the shared total as of its last exchange).
    pub fn snapshot(&self) -> Vec<LimitUsage> {
        let mut out: Vec<LimitUsage> = self
            .inner
            .observed
            .iter()
            .map(|e| {
                let ((key, kind), (used, limit)) = (e.key(), *e.value());
                LimitUsage {
                    agent: key.agent.to_string(),
                    pathway: key.pathway.to_string(),
                    kind,
                    used,
                    limit,
                }
            })
            .collect();
        // With Redis the shared in-flight count (in `observed`) is the one that counts;
        // local slots only show for keys that never reached Redis.
        let shared_rows: std::collections::HashSet<(String, String)> = out
            .iter()
            .filter(|u| u.kind == LimitKind::MaxConcurrent.as_str())
            .map(|u| (u.agent.clone(), u.pathway.clone()))
            .collect();
        out.extend(
            self.inner
                .memory
                .concurrency_snapshot()
                .into_iter()
                .filter(|u| !shared_rows.contains(&(u.agent.clone(), u.pathway.clone()))),
        );
        out.sort_by(|a, b| (&a.agent, &a.pathway, a.kind).cmp(&(&b.agent, &b.pathway, b.kind)));
        out
    }

    fn observe(&self, key: &Key, kind: LimitKind, used: u64, limit: u64) {
        self.inner.observe(key, kind, used, limit);
    }

    /// Called with what the gateway did each time the shared backend fails (for
    /// metrics); set once, at start-up.
    pub fn on_backend_error(&self, hook: BackendErrorHook) {
        let _ = self.inner.on_backend_error.set(hook);
    }
}

impl Inner {
    fn observe(&self, key: &Key, kind: LimitKind, used: u64, limit: u64) {
        self.observed
            .insert((key.clone(), kind.as_str()), (used, limit));
    }

    /// Reports a backend failure to the hook, and logs it at most once every ten
    /// seconds. `handled` is what the gateway did about it.
    fn backend_error(&self, e: &LimitsError, handled: OnBackendError) {
        if let Some(hook) = self.on_backend_error.get() {
            hook(match handled {
                OnBackendError::Deny => "denied",
                OnBackendError::AllowLocal => "counted_locally",
            });
        }
        let (w, left) = window_now();
        let now = w * WINDOW.as_secs() + (WINDOW.as_secs() - left);
        let last = self.last_backend_log.load(Ordering::Relaxed);
        if now >= last + 10
            && self
                .last_backend_log
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            match handled {
                OnBackendError::Deny => {
                    tracing::error!(error = %e, "limits backend unreachable: refusing limited requests (on_backend_error: deny)")
                }
                OnBackendError::AllowLocal => {
                    tracing::warn!(error = %e, "limits backend unreachable: counting in this process only")
                }
            }
        }
    }

    /// Adds to a budget; returns the total after the charge when known.
    async fn charge(&self, key: &Key, kind: LimitKind, n: u64, limit: u64, local: bool) -> u64 {
        let total = match (&self.shared, local) {
            (Some(shared), false) => match shared.charge(key, kind, n).await {
                Ok(total) => total,
                Err(e) => {
                    // What was moved is charged somewhere, whatever on_backend_error says.
                    self.backend_error(&e, OnBackendError::AllowLocal);
                    self.memory.charge(key, kind, n)
                }
            },
            _ => self.memory.charge(key, kind, n),
        };
        self.observe(key, kind, total, limit);
        total
    }
}

/// An admitted request or tunnel: holds its concurrency slot until dropped and
/// charges the budgets for what it moved.
pub struct Admission {
    limits: Arc<Inner>,
    key: Key,
    budgets: Budgets,
    local: bool,
    /// Bytes already charged (tunnels charge as they go).
    charged: AtomicU64,
    _slot: Slot,
}

/// The `max_concurrent` slot an admission holds until it is dropped (the fields
/// are only ever dropped, which is what gives the slot back).
enum Slot {
    None,
    Local(#[allow(dead_code)] memory::Permit),
    Shared(#[allow(dead_code)] SharedSlot),
}

/// A slot leased in Redis. Dropping it gives the lease back in the background and
/// records the in-flight count that is left, for `/metrics`.
struct SharedSlot {
    lease: Option<redis::Lease>,
    inner: Arc<Inner>,
    key: Key,
    max: u64,
}

impl Drop for SharedSlot {
    fn drop(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return; // the lease expires on its own
        };
        let (inner, key, max) = (self.inner.clone(), self.key.clone(), self.max);
        rt.spawn(async move {
            if let Some(left) = lease.release().await {
                inner.observe(&key, LimitKind::MaxConcurrent, left, max);
            }
        });
    }
}

/// How often an open tunnel charges what it moved and checks its byte budget.
const TUNNEL_CHARGE_EVERY: Duration = Duration::from_millis(200);

impl Admission {
    /// For a tunnel: charges the bytes it moves as it goes; resolves (with the reason)
    /// once the pathway's `bytes_per_hour` is spent, so the tunnel can be closed.
    /// Never resolves without a byte budget.
    pub async fn watch_tunnel(&self, total: impl Fn() -> u64) -> String {
        let Some(limit) = self.budgets.bytes else {
            return std::future::pending().await;
        };
        let mut tick = tokio::time::interval(TUNNEL_CHARGE_EVERY);
        loop {
            tick.tick().await;
            let now = total();
            let delta = now.saturating_sub(self.charged.swap(now, Ordering::Relaxed));
            if delta > 0 && !self.charge_bytes(delta).await {
                return format!(
                    "bytes_per_hour budget ({limit} bytes) of pathway `{}` spent",
                    self.key.pathway
                );
            }
        }
    }

    /// For a tunnel that ended: charges what it moved since the last charge.
    pub fn finish_tunnel(self, total: u64) {
        let rest = total.saturating_sub(self.charged.load(Ordering::Relaxed));
        self.finish(rest, None);
    }

    pub fn counts_bytes(&self) -> bool {
        self.budgets.bytes.is_some()
    }

    pub fn counts_tokens(&self) -> bool {
        self.budgets.tokens.is_some()
    }

    /// Charges `n` bytes; returns true while the budget is not spent.
    pub async fn charge_bytes(&self, n: u64) -> bool {
        match self.budgets.bytes {
            Some(limit) if n > 0 => {
                let total = self
                    .limits
                    .charge(&self.key, LimitKind::BytesPerHour, n, limit, self.local)
                    .await;
                total < limit
            }
            Some(_) => true,
            None => true,
        }
    }

    /// Charges LLM tokens reported by the upstream's `usage`.
    pub async fn charge_tokens(&self, n: u64) {
        if let (Some(limit), true) = (self.budgets.tokens, n > 0) {
            self.limits
                .charge(&self.key, LimitKind::LlmTokensPerHour, n, limit, self.local)
                .await;
        }
    }

    /// Charges what a finished request moved, in the background (the response has
    /// already been delivered; nothing waits for the backend). Keeps the concurrency
    /// slot until then.
    pub fn finish(self, bytes: u64, tokens: Option<u64>) {
        if (bytes == 0 || !self.counts_bytes()) && (tokens.is_none() || !self.counts_tokens()) {
            return;
        }
        // Counts in this process take no I/O: charged here, without a task per request.
        if self.limits.shared.is_none() || self.local {
            if let (Some(limit), true) = (self.budgets.bytes, bytes > 0) {
                let total = self
                    .limits
                    .memory
                    .charge(&self.key, LimitKind::BytesPerHour, bytes);
                self.limits
                    .observe(&self.key, LimitKind::BytesPerHour, total, limit);
            }
            if let (Some(limit), Some(n)) = (self.budgets.tokens, tokens.filter(|n| *n > 0)) {
                let total = self
                    .limits
                    .memory
                    .charge(&self.key, LimitKind::LlmTokensPerHour, n);
                self.limits
                    .observe(&self.key, LimitKind::LlmTokensPerHour, total, limit);
            }
            return;
        }
        tokio::spawn(async move {
            self.charge_bytes(bytes).await;
            if let Some(t) = tokens {
                self.charge_tokens(t).await;
            }
        });
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    #[error("limits_backend `{url}`: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("redis: {0}")]
    Redis(String),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
}
