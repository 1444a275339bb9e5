//! Limits shared by every replica through Redis. Each admission is one atomic Lua
//! script (budgets checked, then a GCRA rate step on Redis's own clock, the same
//! algorithm `governor` uses in memory), each charge one INCRBY.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Script};

use super::{window_now, Budgets, Key, LimitHit, LimitKind, LimitsError, Verdict};

/// How long one Redis round trip (or connection attempt) may take before the
/// request is handled as `on_backend_error` says.
const TIMEOUT: Duration = Duration::from_millis(500);
/// While Redis is down, try to reconnect at most this often; requests in between
/// fail fast instead of each waiting for a connect timeout.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

const ADMIT: &str = r#"
local bytes = tonumber(redis.call('GET', KEYS[2]) or '0')
local tokens = tonumber(redis.call('GET', KEYS[3]) or '0')
local left = tonumber(ARGV[4])
local blim = tonumber(ARGV[2])
if blim >= 0 and bytes >= blim then return {2, left, bytes, tokens} end
local tlim = tonumber(ARGV[3])
if tlim >= 0 and tokens >= tlim then return {3, left, bytes, tokens} end
local rpm = tonumber(ARGV[1])
if rpm > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local interval = 60000 / rpm
  local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
  if tat < now then tat = now end
  local new_tat = tat + interval
  if new_tat - now > 60000 then
    return {1, math.max(1, math.ceil((new_tat - now - 60000) / 1000)), bytes, tokens}
  end
  redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', 61000)
end
return {0, 0, bytes, tokens}
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
        })
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

    pub(crate) async fn admit(&self, key: &Key, b: Budgets) -> Result<Verdict, LimitsError> {
        let (window, left) = window_now();
        let limit = |l: Option<u64>| l.map_or(-1i64, |v| v.min(i64::MAX as u64) as i64);
        let script = &self.admit;
        let (code, retry, bytes, tokens): (i64, u64, u64, u64) = self
            .run(|mut c| async move {
                script
                    .key(rate_key(key))
                    .key(budget_key(key, LimitKind::BytesPerHour, window))
                    .key(budget_key(key, LimitKind::LlmTokensPerHour, window))
                    .arg(b.rpm.unwrap_or(0))
                    .arg(limit(b.bytes))
                    .arg(limit(b.tokens))
                    .arg(left)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        let hit = |kind: LimitKind, reason: String| {
            Ok(Verdict::Refuse(LimitHit {
                kind,
                retry_after: retry,
                reason,
            }))
        };
        match code {
            0 => Ok(Verdict::Admit {
                bytes_used: bytes,
                tokens_used: tokens,
            }),
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
