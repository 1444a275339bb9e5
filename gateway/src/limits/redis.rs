//! Limits shared by every replica through Redis. Each admission is one atomic Lua
//! script (concurrency and budgets checked, then a GCRA rate step on Redis's own
//! clock, the same algorithm `governor` uses in memory), each charge one INCRBY.
//!
//! `max_concurrent` slots are leases in a sorted set scored by their expiry on
//! Redis's clock: a replica renews the leases it holds and removes each when its
//! request or tunnel ends, so a replica that dies frees its slots within [`LEASE_TTL`].

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use dashmap::DashMap;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Script};

use super::{window_now, Budgets, Key, LimitHit, LimitKind, LimitsError, Verdict};

/// How long one Redis round trip (or connection attempt) may take before the
/// request is handled as `on_backend_error` says.
const TIMEOUT: Duration = Duration::from_millis(500);
/// While Redis is down, try to reconnect at most this often; requests in between
/// fail fast instead of each waiting for a connect timeout.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// How long a concurrency lease lives without renewal; held leases are renewed
/// three times per TTL.
pub const LEASE_TTL: Duration = Duration::from_secs(30);

// KEYS: rate, bytes, tokens, leases. ARGV: rpm (0 = none), byte and token limits
// (-1 = none), seconds left in the hour, max_concurrent (0 = none), lease id, lease ttl ms.
// Returns {code, retry_after, bytes, tokens, in_flight}; code 0 admits (and takes the
// lease), 1 rate, 2 bytes, 3 tokens, 4 concurrency.
const ADMIT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local bytes = tonumber(redis.call('GET', KEYS[2]) or '0')
local tokens = tonumber(redis.call('GET', KEYS[3]) or '0')
local left = tonumber(ARGV[4])
local max = tonumber(ARGV[5])
local held = 0
if max > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  held = redis.call('ZCARD', KEYS[4])
  if held >= max then return {4, 1, bytes, tokens, held} end
end
local blim = tonumber(ARGV[2])
if blim >= 0 and bytes >= blim then return {2, left, bytes, tokens, held} end
local tlim = tonumber(ARGV[3])
if tlim >= 0 and tokens >= tlim then return {3, left, bytes, tokens, held} end
local rpm = tonumber(ARGV[1])
if rpm > 0 then
  local interval = 60000 / rpm
  local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
  if tat < now then tat = now end
  local new_tat = tat + interval
  if new_tat - now > 60000 then
    return {1, math.max(1, math.ceil((new_tat - now - 60000) / 1000)), bytes, tokens, held}
  end
  redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', 61000)
end
if max > 0 then
  local ttl = tonumber(ARGV[7])
  redis.call('ZADD', KEYS[4], string.format('%d', now + ttl), ARGV[6])
  redis.call('PEXPIRE', KEYS[4], ttl)
  held = held + 1
end
return {0, 0, bytes, tokens, held}
"#;

// KEYS: lease sets; ARGV: ttl ms, then one lease id per key. Only leases still held
// are extended (XX), so a lease removed meanwhile is not brought back.
const RENEW: &str = r#"
local t = redis.call('TIME')
local until_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', string.format('%d', until_ms), ARGV[i + 1])
  redis.call('PEXPIRE', key, ARGV[1])
end
return #KEYS
"#;

pub struct RedisBackend {
    client: redis::Client,
    url: String,
    conn: ArcSwapOption<MultiplexedConnection>,
    connecting: tokio::sync::Mutex<()>,
    base: Instant,
    /// Milliseconds since `base` before which no reconnect is attempted.
    next_attempt_ms: AtomicU64,
    admit: Script,
    renew: Script,
    /// Leases this replica holds (lease id → lease set), renewed in the background.
    leases: DashMap<String, String>,
    renewing: AtomicBool,
    /// Makes lease ids unique across replicas (pods often all run as PID 1).
    instance: String,
    next_lease: AtomicU64,
    lease_ttl: Duration,
}

impl RedisBackend {
    pub fn new(url: &str) -> Result<Self, LimitsError> {
        let client = redis::Client::open(url).map_err(|e| LimitsError::BadUrl {
            url: redact(url),
            reason: e.to_string(),
        })?;
        Ok(RedisBackend {
            client,
            url: redact(url),
            conn: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
            base: Instant::now(),
            next_attempt_ms: AtomicU64::new(0),
            admit: Script::new(ADMIT),
            renew: Script::new(RENEW),
            leases: DashMap::new(),
            renewing: AtomicBool::new(false),
            instance: instance_id(),
            next_lease: AtomicU64::new(0),
            lease_ttl: LEASE_TTL,
        })
    }

    /// Leases that expire sooner than [`LEASE_TTL`] (for tests of crash recovery).
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// The URL without a password, for logs.
    pub fn display_url(&self) -> &str {
        &self.url
    }

    async fn connection(&self) -> Result<MultiplexedConnection, LimitsError> {
        if let Some(c) = self.conn.load_full() {
            return Ok((*c).clone());
        }
        let _guard = self.connecting.lock().await;
        if let Some(c) = self.conn.load_full() {
            return Ok((*c).clone());
        }
        let now = self.base.elapsed().as_millis() as u64;
        if now < self.next_attempt_ms.load(Ordering::Relaxed) {
            return Err(LimitsError::Redis("not connected (reconnecting)".into()));
        }
        self.next_attempt_ms
            .store(now + RECONNECT_EVERY.as_millis() as u64, Ordering::Relaxed);
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT));
        let conn = tokio::time::timeout(
            TIMEOUT * 2,
            self.client
                .get_multiplexed_async_connection_with_config(&config),
        )
        .await
        .map_err(|_| LimitsError::Timeout(TIMEOUT * 2))?
        .map_err(|e| LimitsError::Redis(e.to_string()))?;
        tracing::info!(backend = %self.url, "connected to the limits backend");
        self.conn.store(Some(Arc::new(conn.clone())));
        Ok(conn)
    }

    /// Runs one command; a failure drops the connection so the next call reconnects.
    async fn run<T, F, Fut>(&self, f: F) -> Result<T, LimitsError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let conn = self.connection().await?;
        match tokio::time::timeout(TIMEOUT, f(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.conn.store(None);
                Err(LimitsError::Redis(e.to_string()))
            }
            Err(_) => {
                self.conn.store(None);
                Err(LimitsError::Timeout(TIMEOUT))
            }
        }
    }

    /// Checks every limit of the pathway in one script; on admission with
    /// `max_concurrent`, the returned lease holds the slot until dropped.
    pub(crate) async fn admit(
        self: &Arc<Self>,
        key: &Key,
        b: Budgets,
        max_concurrent: Option<u32>,
    ) -> Result<(Verdict, Option<Lease>), LimitsError> {
        let (window, left) = window_now();
        let limit = |l: Option<u64>| l.map_or(-1i64, |v| v.min(i64::MAX as u64) as i64);
        let script = &self.admit;
        let lease_id = format!(
            "{}:{}",
            self.instance,
            self.next_lease.fetch_add(1, Ordering::Relaxed)
        );
        let leases_key = lease_key(key);
        let (lk, id) = (&leases_key, &lease_id);
        let (code, retry, bytes, tokens, in_flight): (i64, u64, u64, u64, u64) = self
            .run(|mut c| async move {
                script
                    .key(rate_key(key))
                    .key(budget_key(key, LimitKind::BytesPerHour, window))
                    .key(budget_key(key, LimitKind::LlmTokensPerHour, window))
                    .key(lk)
                    .arg(b.rpm.unwrap_or(0))
                    .arg(limit(b.bytes))
                    .arg(limit(b.tokens))
                    .arg(left)
                    .arg(max_concurrent.unwrap_or(0))
                    .arg(id)
                    .arg(self.lease_ttl.as_millis() as u64)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        let verdict = self.verdict(
            key,
            b,
            max_concurrent,
            (code, retry, bytes, tokens, in_flight),
        );
        let lease = match (&verdict, max_concurrent) {
            (Verdict::Admit { .. }, Some(_)) => Some(self.hold(leases_key, lease_id)),
            _ => None,
        };
        Ok((verdict, lease))
    }

    fn verdict(
        &self,
        key: &Key,
        b: Budgets,
        max_concurrent: Option<u32>,
        (code, retry, bytes, tokens, in_flight): (i64, u64, u64, u64, u64),
    ) -> Verdict {
        let hit = |kind: LimitKind, reason: String| {
            Verdict::Refuse(LimitHit {
                kind,
                retry_after: retry,
                reason,
            })
        };
        match code {
            0 => Verdict::Admit {
                bytes_used: bytes,
                tokens_used: tokens,
                in_flight: max_concurrent.map(|_| in_flight),
            },
            4 => hit(
                LimitKind::MaxConcurrent,
                format!(
                    "{in_flight} requests already in flight on pathway `{}` (max_concurrent {}, all replicas)",
                    key.pathway,
                    max_concurrent.unwrap_or(0)
                ),
            ),
            1 => hit(
                LimitKind::RequestsPerMinute,
                format!(
                    "more than {} requests per minute on pathway `{}`",
                    b.rpm.unwrap_or(0),
                    key.pathway
                ),
            ),
            2 => hit(
                LimitKind::BytesPerHour,
                format!(
                    "{bytes} of {} bytes this hour used on pathway `{}`",
                    b.bytes.unwrap_or(0),
                    key.pathway
                ),
            ),
            _ => hit(
                LimitKind::LlmTokensPerHour,
                format!(
                    "{tokens} of {} LLM tokens this hour used on pathway `{}`",
                    b.tokens.unwrap_or(0),
                    key.pathway
                ),
            ),
        }
    }

    fn hold(self: &Arc<Self>, leases_key: String, lease_id: String) -> Lease {
        self.leases.insert(lease_id.clone(), leases_key.clone());
        if !self.renewing.swap(true, Ordering::AcqRel) {
            tokio::spawn(renew_leases(Arc::downgrade(self)));
        }
        Lease {
            backend: self.clone(),
            key: leases_key,
            id: lease_id,
        }
    }

    /// Extends every lease this replica holds, in one round trip.
    async fn renew_held(&self) -> Result<(), LimitsError> {
        let held: Vec<(String, String)> = self
            .leases
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        if held.is_empty() {
            return Ok(());
        }
        let script = &self.renew;
        let _: i64 = self
            .run(|mut c| async move {
                let mut call = script.prepare_invoke();
                call.arg(self.lease_ttl.as_millis() as u64);
                for (id, key) in &held {
                    call.key(key).arg(id);
                }
                call.invoke_async(&mut c).await
            })
            .await?;
        Ok(())
    }

    /// Gives a slot back; returns how many remain in flight on all replicas.
    async fn release(&self, key: &str, id: &str) -> Result<u64, LimitsError> {
        let (_, held): (i64, u64) = self
            .run(|mut c| async move {
                redis::pipe()
                    .atomic()
                    .zrem(key, id)
                    .zcard(key)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(held)
    }

    /// Adds `n` to the current hour's budget; returns the shared total.
    pub(crate) async fn charge(
        &self,
        key: &Key,
        kind: LimitKind,
        n: u64,
    ) -> Result<u64, LimitsError> {
        let (window, _) = window_now();
        let k = budget_key(key, kind, window);
        let (total,): (u64,) = self
            .run(|mut c| async move {
                redis::pipe()
                    .atomic()
                    .incr(&k, n)
                    .expire(&k, 2 * super::WINDOW.as_secs() as i64)
                    .ignore()
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(total)
    }
}

/// A `max_concurrent` slot held in Redis; dropping it gives the slot back.
pub(crate) struct Lease {
    backend: Arc<RedisBackend>,
    key: String,
    id: String,
}

impl Lease {
    /// Gives the slot back now; returns the in-flight count left on all replicas.
    /// A failure leaves the lease to expire within [`LEASE_TTL`].
    pub(crate) async fn release(self) -> Option<u64> {
        let held = self.backend.release(&self.key, &self.id).await.ok();
        // Drop then only forgets it locally (the id is already gone from `leases`).
        self.backend.leases.remove(&self.id);
        held
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.backend.leases.remove(&self.id).is_none() {
            return; // released explicitly
        }
        let (backend, key, id) = (self.backend.clone(), self.key.clone(), self.id.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = backend.release(&key, &id).await;
            });
        }
    }
}

/// Renews the backend's leases until the backend is gone. A failed renewal is retried
/// on the next tick; leases it could not renew expire on their own.
async fn renew_leases(backend: Weak<RedisBackend>) {
    let every = match backend.upgrade() {
        Some(b) => b.lease_ttl / 3,
        None => return,
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(b) = backend.upgrade() else { return };
        if let Err(e) = b.renew_held().await {
            tracing::warn!(error = %e, "could not renew concurrency leases in the limits backend");
        }
    }
}

fn instance_id() -> String {
    // A random u64 from the standard library's per-process random hash keys.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

fn lease_key(key: &Key) -> String {
    format!("egress:{}:{}:in_flight", key.agent, key.pathway)
}

fn rate_key(key: &Key) -> String {
    format!("egress:{}:{}:rpm", key.agent, key.pathway)
}

fn budget_key(key: &Key, kind: LimitKind, window: u64) -> String {
    format!(
        "egress:{}:{}:{}:{window}",
        key.agent,
        key.pathway,
        kind.as_str()
    )
}

/// `redis://user:password@host` → `redis://user:***@host`.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(
            super::redact("redis://u:hunter2@h:6379/0"),
            "redis://u:***@h:6379/0"
        );
        assert_eq!(super::redact("redis://h:6379"), "redis://h:6379");
    }
}
