//! Quota arithmetic with the clock passed in.
//!
//! - **Rolling** windows use GCRA (the generic cell rate algorithm): one timestamp per key.
//!   A quota of `requests` per `period` with `burst` lets `requests + burst` requests through
//!   at once and then one every `period / requests`. "100 per minute" therefore lets a quiet
//!   client send 100 at once and the 101st is refused until the window slides.
//! - **Calendar** windows count requests per fixed UTC window (second, minute, hour, day,
//!   month) and reset on the boundary.
//!
//! `Delay` reserves the next free slot and says how long to wait, if that is within the
//! quota's maximum delay; otherwise the request is rejected and nothing is reserved.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::config::{CalendarUnit, OnExceed, QuotaConfig, Window};
use crate::time::{civil_from_days, days_from_civil};

/// The stored state of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaState {
    /// GCRA theoretical arrival time, Unix µs (an emission interval finer than a
    /// millisecond is kept exactly: 1,000,000 per second is 1 µs apart).
    Rolling {
        /// Theoretical arrival time.
        tat_us: u64,
    },
    /// Requests counted in the window `[window_start_ms, window_end_ms)`.
    Calendar {
        /// Window start, Unix ms.
        window_start_ms: u64,
        /// Window end, Unix ms (the state says by itself when it stops limiting).
        window_end_ms: u64,
        /// Requests counted.
        count: u64,
    },
}

/// The answer for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaVerdict {
    /// The request may proceed (possibly after `delay_ms`).
    pub allowed: bool,
    /// Wait this long before forwarding (Delay mode), in ms.
    pub delay_ms: u64,
    /// Requests allowed per window (including burst).
    pub limit: u64,
    /// Requests left right now.
    pub remaining: u64,
    /// Until the budget is fully restored (Rolling) or the window resets (Calendar), ms.
    pub reset_ms: u64,
    /// When refused: how long until a request would pass, ms.
    pub retry_after_ms: u64,
}

/// Start and length of the calendar window containing `now_ms`.
pub fn calendar_window(unit: CalendarUnit, now_ms: u64) -> (u64, u64) {
    let fixed = |len: u64| (now_ms - now_ms % len, len);
    match unit {
        CalendarUnit::Second => fixed(1_000),
        CalendarUnit::Minute => fixed(60_000),
        CalendarUnit::Hour => fixed(3_600_000),
        CalendarUnit::Day => fixed(86_400_000),
        CalendarUnit::Month => {
            let days = (now_ms / 86_400_000) as i64;
            let (y, m, _) = civil_from_days(days);
            let start = days_from_civil(y, m, 1);
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            let end = days_from_civil(ny, nm, 1);
            (start as u64 * 86_400_000, (end - start) as u64 * 86_400_000)
        }
    }
}

/// A Rolling quota's emission interval — the time one request uses up — in µs (at least 1).
pub fn emission_interval_us(q: &QuotaConfig) -> u64 {
    (q.period_ms.saturating_mul(1000) / q.requests.max(1)).max(1)
}

/// Applies one request to a key's state. Returns the verdict and the state to store.
pub fn acquire(
    q: &QuotaConfig,
    state: Option<QuotaState>,
    now_ms: u64,
) -> (QuotaVerdict, Option<QuotaState>) {
    let max_delay = match q.on_exceed {
        OnExceed::Reject => 0,
        OnExceed::Delay { max_delay_ms } => max_delay_ms,
    };
    match q.window {
        Window::Rolling => {
            // GCRA in microseconds; verdict durations are rounded up to milliseconds.
            let ms = |us: u64| us.div_ceil(1000);
            let now = now_ms * 1000;
            let requests = q.requests.max(1);
            let t = emission_interval_us(q);
            let limit = requests + q.burst;
            let tau = t * (limit - 1);
            let tat = match state {
                Some(QuotaState::Rolling { tat_us }) => tat_us.max(now),
                _ => now,
            };
            let new_tat = tat + t;
            let allow_at = new_tat.saturating_sub(tau + t);
            if now >= allow_at || allow_at - now <= max_delay * 1000 {
                let used = new_tat - now;
                let remaining = (tau + t).saturating_sub(used) / t;
                (
                    QuotaVerdict {
                        allowed: true,
                        delay_ms: ms(allow_at.saturating_sub(now)),
                        limit,
                        remaining,
                        reset_ms: ms(used),
                        retry_after_ms: 0,
                    },
                    Some(QuotaState::Rolling { tat_us: new_tat }),
                )
            } else {
                (
                    QuotaVerdict {
                        allowed: false,
                        delay_ms: 0,
                        limit,
                        remaining: 0,
                        reset_ms: ms(tat - now),
                        retry_after_ms: ms(allow_at - now),
                    },
                    state,
                )
            }
        }
        Window::Calendar(unit) => {
            let (start, len) = calendar_window(unit, now_ms);
            let count = match state {
                Some(QuotaState::Calendar {
                    window_start_ms,
                    count,
                    ..
                }) if window_start_ms == start => count,
                _ => 0,
            };
            let reset_ms = start + len - now_ms;
            if count < q.requests {
                (
                    QuotaVerdict {
                        allowed: true,
                        delay_ms: 0,
                        limit: q.requests,
                        remaining: q.requests - count - 1,
                        reset_ms,
                        retry_after_ms: 0,
                    },
                    Some(QuotaState::Calendar {
                        window_start_ms: start,
                        window_end_ms: start + len,
                        count: count + 1,
                    }),
                )
            } else if reset_ms <= max_delay {
                (
                    QuotaVerdict {
                        allowed: true,
                        delay_ms: reset_ms,
                        limit: q.requests,
                        remaining: q.requests.saturating_sub(1),
                        reset_ms: reset_ms + len,
                        retry_after_ms: 0,
                    },
                    Some(QuotaState::Calendar {
                        window_start_ms: start + len,
                        window_end_ms: start + 2 * len,
                        count: 1,
                    }),
                )
            } else {
                (
                    QuotaVerdict {
                        allowed: false,
                        delay_ms: 0,
                        limit: q.requests,
                        remaining: 0,
                        reset_ms,
                        retry_after_ms: reset_ms,
                    },
                    state,
                )
            }
        }
    }
}

/// Whether a stored state no longer limits anything at `now_ms` (safe to forget). Decided
/// from the state alone, so a store can evict keys of every quota, not only the one asking.
pub fn is_idle(state: &QuotaState, now_ms: u64) -> bool {
    match state {
        QuotaState::Rolling { tat_us } => *tat_us <= now_ms * 1000,
        QuotaState::Calendar { window_end_ms, .. } => *window_end_ms <= now_ms,
    }
}

/// Where quota counters live; the engine asks it once per applicable quota.
pub trait QuotaStore {
    /// Counts one request for `key` of quota number `index` of the port.
    fn acquire(
        &self,
        port: u16,
        index: usize,
        q: &QuotaConfig,
        key: &str,
        now_ms: u64,
    ) -> QuotaVerdict;

    /// Like [`QuotaStore::acquire`], but a store that cannot answer without waiting (a
    /// shared store whose local lease is spent) returns `None`; the engine then leaves the
    /// quota pending for the caller to ask asynchronously.
    fn try_acquire(
        &self,
        port: u16,
        index: usize,
        q: &QuotaConfig,
        key: &str,
        now_ms: u64,
    ) -> Option<QuotaVerdict> {
        Some(self.acquire(port, index, q, key, now_ms))
    }
}

/// In-memory counters, bounded per quota so that no caller can lock others out.
///
/// Each quota (port and index) has its own table of at most `max_keys_per_quota` keys: a
/// client spraying distinct keys at one quota never touches another quota's counters. When
/// a table is full, a new key takes the place of the cheapest of a few sampled entries —
/// an idle one if there is one, else the one that has spent the least of its budget (the
/// sprayer's keys, each used once, go first; a busy key is kept). The evicted key starts
/// afresh if it comes back, so being full loosens the limit for the least-used keys by at
/// most what they had spent; it never refuses a key for lack of room. Keys longer than
/// [`MAX_RAW_KEY`] bytes are stored as a 128-bit hash, so each entry is small.
#[derive(Debug)]
pub struct LocalQuotas {
    max_keys_per_quota: usize,
    state: Mutex<HashMap<(u16, usize), Partition>>,
    evictions: std::sync::atomic::AtomicU64,
}

/// Longest key stored as it is.
pub const MAX_RAW_KEY: usize = 64;

/// Entries sampled for one eviction.
const EVICTION_SAMPLE: usize = 8;

/// One quota's keys: a vector (for O(1) random sampling) indexed by key.
#[derive(Debug, Default)]
struct Partition {
    index: HashMap<Box<str>, usize>,
    entries: Vec<(Box<str>, QuotaState)>,
    rng: u64,
}

impl Partition {
    fn remove_at(&mut self, i: usize) {
        let (key, _) = self.entries.swap_remove(i);
        self.index.remove(&key);
        if let Some((moved, _)) = self.entries.get(i) {
            self.index.insert(moved.clone(), i);
        }
    }

    /// xorshift64*: cheap, and only needs to be unpredictable enough to spread samples.
    fn next(&mut self) -> u64 {
        if self.rng == 0 {
            self.rng = 0x9E37_79B9_7F4A_7C15 ^ (self.entries.len() as u64);
        }
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// The index of the entry to give up: idle first, else the least spent.
    fn victim(&mut self, now_ms: u64) -> usize {
        let n = self.entries.len();
        let mut best = (u64::MAX, 0);
        for _ in 0..EVICTION_SAMPLE.min(n) {
            let i = (self.next() % n as u64) as usize;
            let state = &self.entries[i].1;
            if is_idle(state, now_ms) {
                return i;
            }
            let spent = match state {
                QuotaState::Rolling { tat_us } => (tat_us / 1000).saturating_sub(now_ms),
                QuotaState::Calendar { count, .. } => *count,
            };
            if spent < best.0 {
                best = (spent, i);
            }
        }
        best.1
    }
}

/// The key as stored: itself, or a 128-bit hash of it when it is long.
fn stored_key(key: &str) -> std::borrow::Cow<'_, str> {
    use std::hash::{BuildHasher, Hasher};
    if key.len() <= MAX_RAW_KEY {
        return std::borrow::Cow::Borrowed(key);
    }
    // Two independently keyed SipHashes (keys chosen at process start).
    static SEEDS: std::sync::OnceLock<[std::collections::hash_map::RandomState; 2]> =
        std::sync::OnceLock::new();
    let seeds = SEEDS.get_or_init(Default::default);
    let mut out = String::with_capacity(34);
    out.push('#');
    for s in seeds {
        let mut h = s.build_hasher();
        h.write(key.as_bytes());
        out.push_str(&format!("{:016x}", h.finish()));
    }
    std::borrow::Cow::Owned(out)
}

impl LocalQuotas {
    /// A store holding at most `max_keys_per_quota` keys for each quota.
    pub fn new(max_keys_per_quota: usize) -> Self {
        Self {
            max_keys_per_quota: max_keys_per_quota.max(1),
            state: Mutex::new(HashMap::new()),
            evictions: Default::default(),
        }
    }

    /// Keys held now, over every quota.
    pub fn len(&self) -> usize {
        self.state
            .lock()
            .map(|s| s.values().map(|p| p.entries.len()).sum())
            .unwrap_or(0)
    }

    /// True when no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys given up to make room for new ones, since start.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl QuotaStore for LocalQuotas {
    fn acquire(
        &self,
        port: u16,
        index: usize,
        q: &QuotaConfig,
        key: &str,
        now_ms: u64,
    ) -> QuotaVerdict {
        let mut map = match self.state.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        let part = map.entry((port, index)).or_default();
        let key = stored_key(key);
        let at = part.index.get(key.as_ref()).copied();
        let prev = at.map(|i| part.entries[i].1);
        let (verdict, next) = acquire(q, prev, now_ms);
        match (at, next) {
            (Some(i), Some(s)) => part.entries[i].1 = s,
            (Some(_), None) => {}
            (None, Some(s)) => {
                if part.entries.len() >= self.max_keys_per_quota {
                    let v = part.victim(now_ms);
                    part.remove_at(v);
                    self.evictions
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let key: Box<str> = key.into();
                part.index.insert(key.clone(), part.entries.len());
                part.entries.push((key, s));
            }
            (None, None) => {}
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{QuotaKey, QuotaScope};
    use crate::time::parse_rfc3339;

    fn quota(
        requests: u64,
        period_ms: u64,
        burst: u64,
        window: Window,
        on_exceed: OnExceed,
    ) -> QuotaConfig {
        QuotaConfig {
            policy: "ns/p".into(),
            name: "q".into(),
            matches: vec![],
            key: QuotaKey::SourceIp,
            requests,
            period_ms,
            burst,
            window,
            scope: QuotaScope::Local,
            on_exceed,
            on_store_error: Default::default(),
            audit: false,
        }
    }

    #[test]
    fn rolling_allows_the_limit_then_refuses_with_retry_after() {
        let q = quota(100, 60_000, 0, Window::Rolling, OnExceed::Reject);
        let store = LocalQuotas::new(10);
        let now = 1_000_000;
        for i in 0..100 {
            let v = store.acquire(80, 0, &q, "k", now);
            assert!(v.allowed, "request {i}");
            assert_eq!(v.remaining, 99 - i);
        }
        let v = store.acquire(80, 0, &q, "k", now);
        assert!(!v.allowed);
        assert_eq!(v.retry_after_ms, 600);
        // Another key is unaffected.
        assert!(store.acquire(80, 0, &q, "other", now).allowed);
        // After one emission interval, one more passes.
        assert!(store.acquire(80, 0, &q, "k", now + 600).allowed);
        assert!(!store.acquire(80, 0, &q, "k", now + 600).allowed);
    }

    #[test]
    fn a_rate_above_a_thousand_per_second_is_kept_after_the_burst() {
        // 1,000,000 per second: one request every microsecond, not one per millisecond.
        let q = quota(100_000, 100, 0, Window::Rolling, OnExceed::Reject);
        let mut state = None;
        let now = 1_000_000;
        for _ in 0..100_000 {
            let (v, s) = acquire(&q, state, now);
            assert!(v.allowed);
            state = s;
        }
        assert!(!acquire(&q, state, now).0.allowed, "the limit is spent");
        // A millisecond later, a thousand requests' worth has come back.
        let later = now + 1;
        let mut passed = 0;
        loop {
            let (v, s) = acquire(&q, state, later);
            if !v.allowed {
                assert_eq!(
                    v.retry_after_ms, 1,
                    "the next one is a microsecond away, rounded up"
                );
                break;
            }
            state = s;
            passed += 1;
        }
        assert_eq!(passed, 1000);
    }

    #[test]
    fn burst_adds_to_the_instant_capacity() {
        let q = quota(10, 1_000, 5, Window::Rolling, OnExceed::Reject);
        let mut s = None;
        let mut passed = 0;
        for _ in 0..20 {
            let (v, n) = acquire(&q, s, 0);
            s = n;
            passed += u64::from(v.allowed);
        }
        assert_eq!(passed, 15);
    }

    #[test]
    fn delay_reserves_a_slot_within_the_maximum() {
        let q = quota(
            1,
            1_000,
            0,
            Window::Rolling,
            OnExceed::Delay {
                max_delay_ms: 1_500,
            },
        );
        let (v1, s) = acquire(&q, None, 0);
        assert!(v1.allowed && v1.delay_ms == 0);
        let (v2, s) = acquire(&q, s, 0);
        assert!(v2.allowed);
        assert_eq!(v2.delay_ms, 1_000);
        let (v3, _) = acquire(&q, s, 0);
        assert!(!v3.allowed, "a third request would wait 2s > 1.5s");
        assert_eq!(v3.retry_after_ms, 2_000);
    }

    #[test]
    fn calendar_day_resets_at_utc_midnight() {
        let q = quota(
            2,
            86_400_000,
            0,
            Window::Calendar(CalendarUnit::Day),
            OnExceed::Reject,
        );
        let before = parse_rfc3339("2026-03-31T23:59:59Z").unwrap() as u64 * 1000;
        let (_, s) = acquire(&q, None, before);
        let (_, s) = acquire(&q, s, before);
        let (v, s) = acquire(&q, s, before);
        assert!(!v.allowed);
        assert_eq!(v.retry_after_ms, 1_000);
        let (v, _) = acquire(&q, s, before + 1_000);
        assert!(v.allowed, "a new UTC day");
    }

    #[test]
    fn calendar_months_have_their_real_length() {
        let ms = |s: &str| parse_rfc3339(s).unwrap() as u64 * 1000;
        let (start, len) = calendar_window(CalendarUnit::Month, ms("2024-02-15T12:00:00Z"));
        assert_eq!(start, ms("2024-02-01T00:00:00Z"));
        assert_eq!(len, 29 * 86_400_000);
        let (start, len) = calendar_window(CalendarUnit::Month, ms("2026-12-31T23:59:59Z"));
        assert_eq!(start, ms("2026-12-01T00:00:00Z"));
        assert_eq!(start + len, ms("2027-01-01T00:00:00Z"));
        assert_eq!(
            calendar_window(CalendarUnit::Month, ms("2025-02-10T00:00:00Z")).1,
            28 * 86_400_000
        );
    }

    #[test]
    fn a_full_store_never_evicts_another_quotas_live_calendar_counter() {
        let daily = quota(
            2,
            86_400_000,
            0,
            Window::Calendar(CalendarUnit::Day),
            OnExceed::Reject,
        );
        let rolling = quota(1, 1_000, 0, Window::Rolling, OnExceed::Reject);
        let store = LocalQuotas::new(2);
        let noon = parse_rfc3339("2026-03-31T12:00:00Z").unwrap() as u64 * 1000;
        assert!(store.acquire(80, 0, &daily, "acme", noon).allowed);
        assert!(store.acquire(80, 0, &daily, "acme", noon).allowed);
        // A rolling key fills the store; once idle, a new rolling key forces an eviction.
        store.acquire(80, 1, &rolling, "spray-1", noon);
        assert!(
            store
                .acquire(80, 1, &rolling, "spray-2", noon + 5_000)
                .allowed
        );
        // The daily counter survived: acme is still over its quota.
        assert!(!store.acquire(80, 0, &daily, "acme", noon + 6_000).allowed);
    }

    /// The lockout the adversarial suite found: 100,000 distinct keys sprayed at one daily
    /// quota filled the store, and afterwards new callers of every quota got 429 until
    /// midnight. Now the sprayer's quota keeps its busy keys, and no other quota notices.
    #[test]
    fn a_key_spray_locks_out_nobody_on_its_quota_or_any_other() {
        let daily = quota(
            100,
            86_400_000,
            0,
            Window::Calendar(CalendarUnit::Day),
            OnExceed::Reject,
        );
        let per_ip = quota(10, 60_000, 0, Window::Rolling, OnExceed::Reject);
        let store = LocalQuotas::new(1_000);
        let noon = parse_rfc3339("2026-03-31T12:00:00Z").unwrap() as u64 * 1000;
        // A real user of the sprayed quota, busy before the spray.
        for _ in 0..50 {
            assert!(store.acquire(80, 0, &daily, "alice", noon).allowed);
        }
        // 100,000 distinct header values, each used once.
        for i in 0..100_000u64 {
            store.acquire(80, 0, &daily, &format!("spray-{i}"), noon + i / 100);
        }
        assert!(store.len() <= 1_000, "bounded: {}", store.len());
        assert!(store.evictions() >= 99_000);
        let later = noon + 1_000_000;
        // New users of the same quota and of another quota are served...
        assert!(store.acquire(80, 0, &daily, "bob", later).allowed);
        assert!(store.acquire(80, 1, &per_ip, "10.0.0.7", later).allowed);
        assert!(store.acquire(81, 0, &daily, "carol", later).allowed);
        // ...and the busy user kept her count: 50 more, then refused.
        for i in 0..50 {
            assert!(
                store.acquire(80, 0, &daily, "alice", later).allowed,
                "alice {i}"
            );
        }
        assert!(!store.acquire(80, 0, &daily, "alice", later).allowed);
    }

    #[test]
    fn long_keys_are_stored_as_a_hash_and_still_counted_apart() {
        let q = quota(1, 60_000, 0, Window::Rolling, OnExceed::Reject);
        let store = LocalQuotas::new(10);
        let a = "a".repeat(10_000);
        let b = format!("{}b", "a".repeat(9_999));
        assert!(store.acquire(80, 0, &q, &a, 0).allowed);
        assert!(
            !store.acquire(80, 0, &q, &a, 0).allowed,
            "the same long key counts"
        );
        assert!(
            store.acquire(80, 0, &q, &b, 0).allowed,
            "another long key is its own"
        );
        assert_eq!(stored_key(&a).len(), 33);
    }

    #[test]
    fn local_store_is_bounded() {
        let q = quota(1, 60_000, 0, Window::Rolling, OnExceed::Reject);
        let store = LocalQuotas::new(100);
        for i in 0..1_000 {
            store.acquire(80, 0, &q, &format!("spray-{i}"), 0);
        }
        assert_eq!(store.len(), 100);
        // Once their windows pass, idle keys make room again.
        assert!(store.acquire(80, 0, &q, "late", 60_000).allowed);
        assert!(store.len() <= 100);
    }
}
