//! Global quotas: counters shared by every sidecar of a workload, kept in Redis (or
//! anything speaking its protocol: Valkey, managed Redis).
//!
//! **Leases.** Most requests never wait for Redis. A sidecar leases a batch of a key's
//! budget at a time, in one Lua script that counts the whole batch as spent, and spends it
//! locally. Because a batch is counted before it is spent, the sidecars together never let
//! more than the limit through while Redis answers: the overshoot bound is zero. The price
//! is the other direction: budget leased by one sidecar and not yet spent is unavailable to
//! the others, so a caller can be refused while up to `sidecars × maxLease` requests sit in
//! leases. Three things keep that small:
//! - the batch adapts to the key's traffic (it doubles when a lease is spent before it
//!   expires and halves when one expires unspent, starting at 1), so quiet keys lease one
//!   request at a time;
//! - the script caps a batch at 1/16 of what is left, so near the end of the budget every
//!   sidecar leases one request at a time;
//! - a lease lasts `leaseTtl` (1 s); what is left of it then goes back to Redis (in the
//!   next lease call for the key, or by the sweeper), and all of it on shutdown.
//!
//! A refusal is remembered for the key until the request could pass, and at most
//! `leaseTtl`: a client hammering a spent quota costs Redis one call per key per second.
//!
//! **Windows.** Calendar windows count in one Redis key per window (the window's start is
//! in the key name), which expires a minute after the window's end: a new UTC day or month
//! is a new key. Rolling windows keep a GCRA theoretical arrival time per key, expiring a
//! minute after it is in the past. The clock is the sidecar's; the minute of slack covers
//! clock skew between sidecars and Redis.
//!
//! **Failures.** Every call has a short timeout. Three failures in a row open a circuit
//! breaker for a second, during which Redis is not asked at all. While Redis cannot
//! answer, each quota does what its `onStoreError` says: `FailOpen` counts it in this
//! sidecar alone with the same limit; `FailClosed` refuses with 429. The connection is
//! re-established automatically.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use apiward_policy::config::{OnExceed, OnStoreError, QuotaConfig, QuotaScope, Window};
use apiward_policy::engine::{Decision, Engine};
use apiward_policy::quota::{LocalQuotas, QuotaStore, QuotaVerdict, calendar_window};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

use crate::metrics::ReasonLabels;

/// Keys held at once (leases); more are served as a store error.
pub const MAX_LEASED_KEYS: usize = 100_000;
/// Failures in a row that open the circuit breaker.
const BREAKER_FAILURES: u32 = 3;
/// How long the breaker stays open, ms.
const BREAKER_OPEN_MS: u64 = 1_000;
/// A batch is at most this fraction (1/N) of what is left of the budget.
const BATCH_DIVISOR: u64 = 16;
/// Keys live this long past the end of what they count, so sidecar clocks up to a minute
/// ahead of Redis's do not see a live counter expire.
const EXPIRY_SLACK_MS: u64 = 60_000;
/// Key names longer than this (or with spaces or control characters) are hashed.
const MAX_RAW_KEY: usize = 128;

/// Where Global quotas are counted (`quotaStore` in the settings file). The password is
/// read from a file (a mounted Secret), never from the URL, and is never logged or dumped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QuotaStoreSettings {
    /// `redis://host:port/db` or `rediss://host:port/db` (TLS). A username may be given;
    /// a password may not (use `passwordFile`).
    pub url: String,
    /// File holding the password (trailing newline ignored).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// CA bundle (PEM) for `rediss://`, instead of the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Longest wait for Redis on a request, e.g. `100ms`.
    #[serde(default = "default_timeout")]
    pub timeout: String,
    /// Largest batch a sidecar leases at once.
    #[serde(default = "default_max_lease")]
    pub max_lease: u64,
    /// How long a lease may be spent before what is left goes back, e.g. `1s`.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl: String,
    /// Prefix of every Redis key.
    #[serde(default = "default_prefix")]
    pub key_prefix: String,
    /// Most keys with a lease cached here; a new key beyond them asks Redis for each of
    /// its requests instead (never refused for lack of room).
    #[serde(default = "default_max_leased_keys")]
    pub max_leased_keys: usize,
}

fn default_timeout() -> String {
    "100ms".into()
}
fn default_max_lease() -> u64 {
    32
}
fn default_lease_ttl() -> String {
    "1s".into()
}
fn default_max_leased_keys() -> usize {
    MAX_LEASED_KEYS
}
fn default_prefix() -> String {
    "apiward:".into()
}

impl QuotaStoreSettings {
    /// Checks the settings without connecting; the error names the field.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let f = |n: &str| format!("quotaStore.{n}");
        let info = redis::IntoConnectionInfo::into_connection_info(self.url.as_str())
            .map_err(|e| (f("url"), format!("not a Redis URL: {e}")))?;
        if info.redis_settings().password().is_some() {
            return Err((
                f("url"),
                "must not contain a password: put it in passwordFile".into(),
            ));
        }
        if self.ca_file.is_some() && !self.url.starts_with("rediss://") {
            return Err((f("caFile"), "applies only to rediss:// URLs".into()));
        }
        for (name, v) in [("timeout", &self.timeout), ("leaseTtl", &self.lease_ttl)] {
            let d = apiward_policy::duration::parse_duration(v)
                .map_err(|e| (f(name), e.to_string()))?;
            if d.is_zero() {
                return Err((f(name), "must be longer than 0s".into()));
            }
        }
        if self.max_leased_keys == 0 {
            return Err((f("maxLeasedKeys"), "must be at least 1".into()));
        }
        if !(1..=10_000).contains(&self.max_lease) {
            return Err((f("maxLease"), "must be between 1 and 10000".into()));
        }
        Ok(())
    }

    /// The URL as shown in dumps and logs (it never holds a password).
    pub fn display_url(&self) -> &str {
        &self.url
    }
}

/// Metrics the store updates.
#[derive(Debug, Clone, Default)]
pub struct StoreMetrics {
    /// Redis commands sent.
    pub commands: Counter,
    /// Requests whose Global quota took `onStoreError`, by reason.
    pub errors: Family<ReasonLabels, Counter>,
    /// 1 while Redis answers (breaker closed), 0 otherwise.
    pub up: Gauge,
}

/// Why Redis could not answer for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError {
    /// No `quotaStore` in the settings.
    Unconfigured,
    /// The circuit breaker is open.
    BreakerOpen,
    /// Redis did not answer within the timeout.
    Timeout,
    /// Redis answered with an error, or the connection failed.
    Failed,
    /// Too many keys leased at once.
    Full,
}

impl StoreError {
    /// The metric/log reason.
    pub fn code(self) -> &'static str {
        match self {
            StoreError::Unconfigured => "unconfigured",
            StoreError::BreakerOpen => "breaker_open",
            StoreError::Timeout => "timeout",
            StoreError::Failed => "error",
            StoreError::Full => "full",
        }
    }
}

/// One key's local lease.
#[derive(Debug, Default)]
struct Lease {
    /// Leased and not yet spent.
    left: u64,
    /// The lease may be spent until then (Unix ms).
    expires_ms: u64,
    /// The store's budget left after the last lease.
    store_left: u64,
    /// When the budget is restored (Rolling) or the window resets (Calendar), Unix ms.
    reset_at_ms: u64,
    /// Requests allowed per window (with burst).
    limit: u64,
    /// The next batch to ask for.
    next_batch: u64,
    /// Rolling windows: the emission interval, ms, to the microsecond (0 for Calendar).
    interval_ms: f64,
    /// After a refusal, later requests are refused without asking Redis until then (at
    /// most a lease's lifetime, so budget given back elsewhere is seen soon).
    refused_until_ms: u64,
    /// When the refused request could pass, Unix ms.
    retry_at_ms: u64,
}

#[derive(Debug, Default)]
struct Slot {
    lease: Mutex<Lease>,
    fetch: tokio::sync::Mutex<()>,
    removed: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Spends one request of a live lease, or repeats a recent refusal; `None`: ask Redis.
fn spend(lease: &mut Lease, now_ms: u64) -> Option<QuotaVerdict> {
    if now_ms < lease.refused_until_ms {
        return Some(QuotaVerdict {
            allowed: false,
            delay_ms: 0,
            limit: lease.limit,
            remaining: 0,
            reset_ms: lease.reset_at_ms.saturating_sub(now_ms),
            retry_after_ms: lease.retry_at_ms.saturating_sub(now_ms).max(1),
        });
    }
    if lease.left == 0 || now_ms >= lease.expires_ms {
        return None;
    }
    lease.left -= 1;
    Some(QuotaVerdict {
        allowed: true,
        delay_ms: 0,
        limit: lease.limit,
        remaining: lease.store_left + lease.left,
        reset_ms: lease.reset_at_ms.saturating_sub(now_ms),
        retry_after_ms: 0,
    })
}

struct Breaker {
    failures: AtomicU32,
    open_until_ms: AtomicU64,
}

/// Leases a batch. Calendar: KEYS[1] counts requests of one window.
/// ARGV: limit, want, divisor, window end (ms), give back, expiry slack (ms).
/// Returns {granted, left after, retry after ms}.
const CALENDAR_LEASE: &str = r"
local limit = tonumber(ARGV[1])
local used = tonumber(redis.call('GET', KEYS[1]) or '0') - tonumber(ARGV[5])
if used < 0 then used = 0 end
local left = limit - used
local n = 0
if left > 0 then
  n = math.min(tonumber(ARGV[2]), math.max(1, math.floor(left / tonumber(ARGV[3]))))
end
redis.call('SET', KEYS[1], used + n, 'PXAT', tonumber(ARGV[4]) + tonumber(ARGV[6]))
return {n, left - n}
";

/// Rolling (GCRA): KEYS[1] holds the theoretical arrival time, Unix ms with three decimals
/// (an emission interval below a millisecond is kept: 1,000,000 per second is 0.001 ms).
/// Sidecars that wrote whole milliseconds read and write the same key.
/// ARGV: now, interval, capacity (interval × limit), want, divisor, give back, expiry slack.
/// Returns {granted, left after, ms until the budget is full again, retry after ms}.
const ROLLING_LEASE: &str = r"
local now = tonumber(ARGV[1])
local t = tonumber(ARGV[2])
local cap = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') - tonumber(ARGV[6]) * t
if tat < now then tat = now end
local left = math.floor((cap - (tat - now)) / t + 1e-9)
if left <= 0 then
  return {0, 0, math.ceil(tat - now), math.ceil(tat + t - cap - now)}
end
local n = math.min(tonumber(ARGV[4]), math.max(1, math.floor(left / tonumber(ARGV[5]))))
tat = tat + n * t
redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PXAT', math.ceil(tat + tonumber(ARGV[7])))
return {n, left - n, math.ceil(tat - now), 0}
";

/// Gives back unspent requests. KEYS[1]; ARGV: count, interval (0 for Calendar), now, slack.
const GIVE_BACK: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local t = tonumber(ARGV[2])
if t == 0 then
  local used = tonumber(v) - tonumber(ARGV[1])
  if used < 0 then used = 0 end
  redis.call('SET', KEYS[1], used, 'KEEPTTL')
else
  local tat = tonumber(v) - tonumber(ARGV[1]) * t
  local now = tonumber(ARGV[3])
  if tat <= now then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PXAT', math.ceil(tat + tonumber(ARGV[4]))) end
end
return 1
";

/// A Rolling quota's emission interval in ms, to the microsecond (as the local GCRA counts).
fn rolling_interval_ms(q: &apiward_policy::config::QuotaConfig) -> f64 {
    apiward_policy::quota::emission_interval_us(q) as f64 / 1000.0
}

/// Global quota counters in Redis, with local leases.
pub struct GlobalQuotas {
    settings: QuotaStoreSettings,
    conn: ConnectionManager,
    timeout: Duration,
    lease_ttl_ms: u64,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    breaker: Breaker,
    calendar: redis::Script,
    rolling: redis::Script,
    give_back: redis::Script,
    metrics: StoreMetrics,
}

impl std::fmt::Debug for GlobalQuotas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GlobalQuotas")
            .field("url", &self.settings.display_url())
            .finish_non_exhaustive()
    }
}

impl GlobalQuotas {
    /// A store for these settings. Connects lazily (Redis may be down at start); needs a
    /// Tokio runtime. Starts the sweeper that returns expired leases.
    pub fn new(settings: &QuotaStoreSettings, metrics: StoreMetrics) -> Result<Arc<Self>, String> {
        settings.validate().map_err(|(f, m)| format!("{f}: {m}"))?;
        let parse = |v: &str| apiward_policy::duration::parse_duration(v).unwrap_or_default();
        let timeout = parse(&settings.timeout);
        let lease_ttl = parse(&settings.lease_ttl);
        let mut info = redis::IntoConnectionInfo::into_connection_info(settings.url.as_str())
            .map_err(|e| format!("quotaStore.url: {e}"))?;
        if let Some(file) = &settings.password_file {
            let pw = std::fs::read_to_string(file).map_err(|e| {
                format!(
                    "quotaStore.passwordFile: cannot read {}: {e}",
                    file.display()
                )
            })?;
            let redis = info
                .redis_settings()
                .clone()
                .set_password(pw.trim_end_matches(['\r', '\n']));
            info = info.set_redis_settings(redis);
        }
        let client = match &settings.ca_file {
            Some(ca) => {
                let pem = std::fs::read(ca)
                    .map_err(|e| format!("quotaStore.caFile: cannot read {}: {e}", ca.display()))?;
                redis::Client::build_with_tls(
                    info,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem),
                    },
                )
            }
            None => redis::Client::open(info),
        }
        .map_err(|e| format!("quotaStore.url: {e}"))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("quotaStore.url: {e}"))?;
        metrics.up.set(1);
        let store = Arc::new(Self {
            settings: settings.clone(),
            conn,
            timeout,
            lease_ttl_ms: lease_ttl.as_millis().max(1) as u64,
            slots: Mutex::new(HashMap::new()),
            breaker: Breaker {
                failures: AtomicU32::new(0),
                open_until_ms: AtomicU64::new(0),
            },
            calendar: redis::Script::new(CALENDAR_LEASE),
            rolling: redis::Script::new(ROLLING_LEASE),
            give_back: redis::Script::new(GIVE_BACK),
            metrics,
        });
        tokio::spawn(sweep(Arc::downgrade(&store), lease_ttl));
        Ok(store)
    }

    /// The settings it was built from.
    pub fn settings(&self) -> &QuotaStoreSettings {
        &self.settings
    }

    /// Keys with a lease held now.
    pub fn leased_keys(&self) -> usize {
        lock(&self.slots).len()
    }

    /// True while Redis answers (the breaker is closed).
    pub fn available(&self, now_ms: u64) -> bool {
        now_ms >= self.breaker.open_until_ms.load(Ordering::Relaxed)
            && self.breaker.failures.load(Ordering::Relaxed) < BREAKER_FAILURES
    }

    /// The Redis key a quota counts `key` in at `now_ms`.
    pub fn redis_key(&self, q: &QuotaConfig, key: &str, now_ms: u64) -> String {
        redis_key(&self.settings.key_prefix, q, key, now_ms)
    }

    /// Spends from the key's local lease, if it has budget; `None` means ask Redis.
    pub fn try_spend(&self, q: &QuotaConfig, key: &str, now_ms: u64) -> Option<QuotaVerdict> {
        let id = self.redis_key(q, key, now_ms);
        let slot = lock(&self.slots).get(&id).cloned()?;
        spend(&mut lock(&slot.lease), now_ms)
    }

    /// Counts one request, asking Redis when the local lease is spent. Waits for a free
    /// slot within `maxDelay` for `Delay` quotas. The clock is read through `now`.
    pub async fn acquire(
        &self,
        q: &QuotaConfig,
        key: &str,
        now: &(dyn Fn() -> u64 + Sync),
    ) -> Result<QuotaVerdict, StoreError> {
        let started = now();
        let max_delay = match q.on_exceed {
            OnExceed::Reject => 0,
            OnExceed::Delay { max_delay_ms } => max_delay_ms,
        };
        loop {
            let t = now();
            let v = self.acquire_once(q, key, t).await?;
            let waited = t.saturating_sub(started);
            if v.allowed || v.retry_after_ms + waited > max_delay {
                return Ok(v);
            }
            tokio::time::sleep(Duration::from_millis(v.retry_after_ms.max(1))).await;
        }
    }

    async fn acquire_once(
        &self,
        q: &QuotaConfig,
        key: &str,
        now_ms: u64,
    ) -> Result<QuotaVerdict, StoreError> {
        if now_ms < self.breaker.open_until_ms.load(Ordering::Relaxed) {
            return Err(StoreError::BreakerOpen);
        }
        let id = self.redis_key(q, key, now_ms);
        loop {
            let slot = match self.slot(&id) {
                Ok(s) => s,
                // No room to cache a lease for another key: this one request asks the
                // store itself (slower for new keys while the table is full, counted
                // exactly, never refused for lack of room).
                Err(StoreError::Full) => {
                    return match self.lease(q, &id, 1, 0, now_ms).await {
                        Ok((granted, v)) => {
                            self.succeeded();
                            Ok(QuotaVerdict {
                                allowed: granted > 0 && v.allowed,
                                ..v
                            })
                        }
                        Err(e) => {
                            self.failed(now_ms);
                            Err(e)
                        }
                    };
                }
                Err(e) => return Err(e),
            };
            let _fetching = slot.fetch.lock().await;
            if slot.removed.load(Ordering::Acquire) {
                continue; // swept while we waited: take the new slot
            }
            let (want, give_back) = {
                let mut l = lock(&slot.lease);
                if let Some(v) = spend(&mut l, now_ms) {
                    return Ok(v); // another request refilled it while we waited
                }
                let unspent = std::mem::take(&mut l.left);
                l.next_batch = if l.next_batch == 0 {
                    1
                } else if unspent == 0 {
                    (l.next_batch * 2).min(self.settings.max_lease)
                } else {
                    (l.next_batch / 2).max(1)
                };
                (l.next_batch, unspent)
            };
            let answer = self.lease(q, &id, want, give_back, now_ms).await;
            let mut l = lock(&slot.lease);
            let (granted, verdict) = match answer {
                Ok(a) => {
                    self.succeeded();
                    a
                }
                Err(e) => {
                    // What was given back in the failed call is lost: that only undercounts
                    // the budget (never lets more through).
                    self.failed(now_ms);
                    return Err(e);
                }
            };
            l.limit = verdict.limit;
            l.store_left = verdict.remaining;
            l.reset_at_ms = now_ms + verdict.reset_ms;
            l.interval_ms = match q.window {
                Window::Rolling => rolling_interval_ms(q),
                Window::Calendar(_) => 0.0,
            };
            if granted == 0 {
                l.retry_at_ms = now_ms + verdict.retry_after_ms;
                l.refused_until_ms = l.retry_at_ms.min(now_ms + self.lease_ttl_ms);
                return Ok(verdict);
            }
            l.left = granted;
            l.expires_ms = now_ms + self.lease_ttl_ms;
            if let Window::Calendar(unit) = q.window {
                let (start, len) = calendar_window(unit, now_ms);
                l.expires_ms = l.expires_ms.min(start + len);
            }
            return Ok(spend(&mut l, now_ms).unwrap_or(verdict));
        }
    }

    /// The slot for a key, created if missing (bounded).
    fn slot(&self, id: &str) -> Result<Arc<Slot>, StoreError> {
        let mut slots = lock(&self.slots);
        if let Some(s) = slots.get(id) {
            return Ok(s.clone());
        }
        if slots.len() >= self.settings.max_leased_keys {
            return Err(StoreError::Full);
        }
        let s = Arc::new(Slot::default());
        slots.insert(id.to_owned(), s.clone());
        Ok(s)
    }

    /// One lease call. Returns the batch granted and the verdict for the request.
    async fn lease(
        &self,
        q: &QuotaConfig,
        id: &str,
        want: u64,
        give_back: u64,
        now_ms: u64,
    ) -> Result<(u64, QuotaVerdict), StoreError> {
        let mut conn = self.conn.clone();
        self.metrics.commands.inc();
        match q.window {
            Window::Calendar(unit) => {
                let (start, len) = calendar_window(unit, now_ms);
                let end = start + len;
                let mut inv = self.calendar.key(id);
                inv.arg(q.requests)
                    .arg(want)
                    .arg(BATCH_DIVISOR)
                    .arg(end)
                    .arg(give_back)
                    .arg(EXPIRY_SLACK_MS);
                let (granted, left): (u64, i64) = self.run(inv.invoke_async(&mut conn)).await?;
                let reset_ms = end - now_ms;
                Ok((
                    granted,
                    QuotaVerdict {
                        allowed: granted > 0,
                        delay_ms: 0,
                        limit: q.requests,
                        remaining: left.max(0) as u64,
                        reset_ms,
                        retry_after_ms: if granted > 0 { 0 } else { reset_ms },
                    },
                ))
            }
            Window::Rolling => {
                let limit = q.requests + q.burst;
                let t = rolling_interval_ms(q);
                let mut inv = self.rolling.key(id);
                inv.arg(now_ms)
                    .arg(t)
                    .arg(t * limit as f64)
                    .arg(want)
                    .arg(BATCH_DIVISOR)
                    .arg(give_back)
                    .arg(EXPIRY_SLACK_MS);
                let (granted, left, reset_ms, retry_after_ms): (u64, i64, i64, i64) =
                    self.run(inv.invoke_async(&mut conn)).await?;
                Ok((
                    granted,
                    QuotaVerdict {
                        allowed: granted > 0,
                        delay_ms: 0,
                        limit,
                        remaining: left.max(0) as u64,
                        reset_ms: reset_ms.max(0) as u64,
                        retry_after_ms: retry_after_ms.max(0) as u64,
                    },
                ))
            }
        }
    }

    async fn run<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                tracing::warn!(url = self.settings.display_url(), error = %e, "quota store error");
                Err(StoreError::Failed)
            }
            Err(_) => Err(StoreError::Timeout),
        }
    }

    fn succeeded(&self) {
        if self.breaker.failures.swap(0, Ordering::Relaxed) >= BREAKER_FAILURES {
            tracing::info!(url = self.settings.display_url(), "quota store is back");
        }
        self.metrics.up.set(1);
    }

    fn failed(&self, now_ms: u64) {
        let n = self.breaker.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= BREAKER_FAILURES {
            if n == BREAKER_FAILURES {
                tracing::warn!(
                    url = self.settings.display_url(),
                    "quota store unavailable; Global quotas follow onStoreError"
                );
            }
            self.breaker
                .open_until_ms
                .store(now_ms + BREAKER_OPEN_MS, Ordering::Relaxed);
            self.metrics.up.set(0);
        }
    }

    /// Gives back what is left of leases that expired before `now_ms` (all of them with
    /// `u64::MAX`) and forgets keys idle since. Returns how many requests went back.
    pub async fn give_back_expired(&self, now_ms: u64) -> u64 {
        let mut back = Vec::new();
        {
            let mut slots = lock(&self.slots);
            slots.retain(|id, slot| {
                let Ok(_fetching) = slot.fetch.try_lock() else {
                    return true;
                };
                let mut l = lock(&slot.lease);
                if now_ms < l.expires_ms {
                    return true;
                }
                if l.left > 0 {
                    back.push((id.clone(), std::mem::take(&mut l.left), l.interval_ms));
                }
                slot.removed.store(true, Ordering::Release);
                false
            });
        }
        let mut total = 0;
        let clock = if now_ms == u64::MAX {
            unix_ms()
        } else {
            now_ms
        };
        for (id, n, interval) in back {
            let mut conn = self.conn.clone();
            self.metrics.commands.inc();
            let mut inv = self.give_back.key(&id);
            inv.arg(n).arg(interval).arg(clock).arg(EXPIRY_SLACK_MS);
            if self.run::<i64>(inv.invoke_async(&mut conn)).await.is_ok() {
                total += n;
            }
        }
        total
    }
}

/// The wall clock, Unix ms.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Returns expired leases every `period` while the store lives.
async fn sweep(store: Weak<GlobalQuotas>, period: Duration) {
    let mut tick = tokio::time::interval(period.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(store) = store.upgrade() else { return };
        store.give_back_expired(unix_ms()).await;
    }
}

/// The Redis key for a quota's key: `<prefix><policy>/<quota>:<window>:<key>`. Calendar
/// windows put the window's start in the name, so a new window is a new key. Keys that are
/// long or not plain text are hashed (SHA-256, first 128 bits).
pub fn redis_key(prefix: &str, q: &QuotaConfig, key: &str, now_ms: u64) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(prefix.len() + q.policy.len() + q.name.len() + 64);
    s.push_str(prefix);
    s.push_str(&q.policy);
    s.push('/');
    s.push_str(&q.name);
    match q.window {
        Window::Rolling => s.push_str(":r:"),
        Window::Calendar(unit) => {
            let _ = write!(s, ":c{}:", calendar_window(unit, now_ms).0);
        }
    }
    if key.len() <= MAX_RAW_KEY && key.chars().all(|c| c.is_ascii_graphic()) {
        s.push_str(key);
    } else {
        use sha2::Digest as _;
        let h = sha2::Sha256::digest(key.as_bytes());
        s.push('#');
        for b in &h[..16] {
            let _ = write!(s, "{b:02x}");
        }
    }
    s
}

/// The verdict for a Global quota whose store cannot answer: `FailOpen` counts it in this
/// sidecar alone; `FailClosed` refuses for a second.
pub fn on_store_error(
    local: &LocalQuotas,
    port: u16,
    index: usize,
    q: &QuotaConfig,
    key: &str,
    now_ms: u64,
) -> QuotaVerdict {
    match q.on_store_error {
        OnStoreError::FailOpen => local.acquire(port, index, q, key, now_ms),
        OnStoreError::FailClosed => QuotaVerdict {
            allowed: false,
            delay_ms: 0,
            limit: q.requests + q.burst,
            remaining: 0,
            reset_ms: BREAKER_OPEN_MS,
            retry_after_ms: BREAKER_OPEN_MS,
        },
    }
}

/// Counts the Global quotas the engine left pending (their leases were spent), asking
/// Redis, and folds the verdicts into the decision. Stops at the first refusal.
pub async fn settle_pending<'e>(
    engine: &'e Engine,
    d: &mut Decision<'e>,
    local: &LocalQuotas,
    global: Option<&GlobalQuotas>,
    errors: &Family<ReasonLabels, Counter>,
) {
    for p in std::mem::take(&mut d.pending) {
        if !d.allowed() {
            return;
        }
        let Some(q) = engine.quota(&p) else { continue };
        let answer = match global {
            Some(g) => g.acquire(q, &p.key, &unix_ms).await,
            None => Err(StoreError::Unconfigured),
        };
        let verdict = answer.unwrap_or_else(|e| {
            errors
                .get_or_create(&ReasonLabels { reason: e.code() })
                .inc();
            on_store_error(local, p.port, p.index, q, &p.key, unix_ms())
        });
        if !engine.settle_quota(d, p, verdict) {
            return;
        }
    }
}

/// The store the engine asks: Local quotas in memory, Global ones from their lease (or
/// left pending for [`GlobalQuotas::acquire`]).
#[derive(Debug)]
pub struct Quotas<'a> {
    /// This sidecar's counters.
    pub local: &'a LocalQuotas,
    /// The shared store, when configured.
    pub global: Option<&'a GlobalQuotas>,
    /// Counts requests that took `onStoreError` when the decision is made synchronously.
    pub errors: &'a Family<ReasonLabels, Counter>,
}

impl QuotaStore for Quotas<'_> {
    fn acquire(
        &self,
        port: u16,
        index: usize,
        q: &QuotaConfig,
        key: &str,
        now_ms: u64,
    ) -> QuotaVerdict {
        self.local.acquire(port, index, q, key, now_ms)
    }

    fn try_acquire(
        &self,
        port: u16,
        index: usize,
        q: &QuotaConfig,
        key: &str,
        now_ms: u64,
    ) -> Option<QuotaVerdict> {
        if q.scope == QuotaScope::Local {
            return Some(self.local.acquire(port, index, q, key, now_ms));
        }
        let error = match self.global {
            None => StoreError::Unconfigured,
            Some(g) if g.available(now_ms) => {
                // A remembered refusal of a Delay quota is waited out asynchronously.
                return g
                    .try_spend(q, key, now_ms)
                    .filter(|v| v.allowed || q.on_exceed == OnExceed::Reject);
            }
            Some(g) => match g.try_spend(q, key, now_ms) {
                Some(v) => return Some(v),
                None if now_ms < g.breaker.open_until_ms.load(Ordering::Relaxed) => {
                    StoreError::BreakerOpen
                }
                None => return None, // half-open: let this one try Redis
            },
        };
        self.errors
            .get_or_create(&ReasonLabels {
                reason: error.code(),
            })
            .inc();
        Some(on_store_error(self.local, port, index, q, key, now_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apiward_policy::config::{CalendarUnit, QuotaKey};

    fn quota(window: Window) -> QuotaConfig {
        QuotaConfig {
            policy: "shop/orders".into(),
            name: "daily".into(),
            matches: vec![],
            key: QuotaKey::Principal,
            requests: 10,
            period_ms: 86_400_000,
            burst: 0,
            window,
            scope: QuotaScope::Global,
            on_exceed: OnExceed::Reject,
            on_store_error: OnStoreError::FailClosed,
            audit: false,
        }
    }

    #[test]
    fn keys_name_the_window_and_hash_what_is_not_plain() {
        let day = quota(Window::Calendar(CalendarUnit::Day));
        let t = 1_700_000_000_000;
        assert_eq!(
            redis_key("apiward:", &day, "acme", t),
            format!("apiward:shop/orders/daily:c{}:acme", t - t % 86_400_000)
        );
        let next_day = redis_key("apiward:", &day, "acme", t + 86_400_000);
        assert_ne!(redis_key("apiward:", &day, "acme", t), next_day);
        let rolling = quota(Window::Rolling);
        assert_eq!(
            redis_key("p:", &rolling, "acme", t),
            "p:shop/orders/daily:r:acme"
        );
        let spaced = redis_key("p:", &rolling, "a b", t);
        assert!(spaced.starts_with("p:shop/orders/daily:r:#"), "{spaced}");
        assert_eq!(spaced.len(), "p:shop/orders/daily:r:#".len() + 32);
        assert_ne!(spaced, redis_key("p:", &rolling, "a  b", t));
        let long = "x".repeat(500);
        assert!(redis_key("p:", &rolling, &long, t).len() < 80);
    }

    #[test]
    fn settings_refuse_a_password_in_the_url_and_bad_durations() {
        let s = |v: serde_json::Value| serde_json::from_value::<QuotaStoreSettings>(v).unwrap();
        let ok = s(serde_json::json!({"url": "redis://127.0.0.1:6379/0"}));
        assert!(ok.validate().is_ok());
        let pw = s(serde_json::json!({"url": "redis://:hunter2@127.0.0.1:6379"}));
        let (field, why) = pw.validate().unwrap_err();
        assert_eq!(field, "quotaStore.url");
        assert!(
            why.contains("passwordFile") && !why.contains("hunter2"),
            "{why}"
        );
        let t = s(serde_json::json!({"url": "redis://h", "timeout": "0s"}));
        assert_eq!(t.validate().unwrap_err().0, "quotaStore.timeout");
        let ca = s(serde_json::json!({"url": "redis://h", "caFile": "/ca.pem"}));
        assert_eq!(ca.validate().unwrap_err().0, "quotaStore.caFile");
        let lease = s(serde_json::json!({"url": "redis://h", "maxLease": 0}));
        assert_eq!(lease.validate().unwrap_err().0, "quotaStore.maxLease");
    }

    #[test]
    fn a_lease_is_spent_until_empty_or_expired() {
        let mut l = Lease {
            left: 2,
            expires_ms: 1_000,
            store_left: 5,
            reset_at_ms: 2_000,
            limit: 10,
            next_batch: 2,
            interval_ms: 0.0,
            refused_until_ms: 0,
            retry_at_ms: 0,
        };
        let v = spend(&mut l, 100).unwrap();
        assert!(v.allowed);
        assert_eq!((v.remaining, v.reset_ms), (6, 1_900));
        assert!(spend(&mut l, 1_000).is_none(), "expired");
        assert!(spend(&mut l, 200).is_some());
        assert!(spend(&mut l, 300).is_none(), "empty");
        l.refused_until_ms = 900;
        l.retry_at_ms = 1_500;
        let v = spend(&mut l, 400).unwrap();
        assert!(!v.allowed, "a recent refusal is repeated");
        assert_eq!(v.retry_after_ms, 1_100);
        assert!(spend(&mut l, 900).is_none(), "then Redis is asked again");
    }
}
