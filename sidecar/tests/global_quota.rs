//! Global quotas against a real `redis-server` (the Debian package; `scripts/test` installs
//! it) started by each test on a loopback port: several sidecars sharing one budget, UTC
//! window boundaries, Redis dying and coming back, and a sidecar restart.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apiward_policy::config::{
    CalendarUnit, OnExceed, OnStoreError, QuotaConfig, QuotaKey, QuotaScope, Window,
};
use apiward_policy::time::parse_rfc3339;
use apiward_sidecar::quota_store::{GlobalQuotas, QuotaStoreSettings, StoreMetrics};
use common::*;
use serde_json::{Value, json};

/// A `redis-server` on a loopback port, killed on drop.
struct Redis {
    port: u16,
    child: Option<Child>,
    /// Extra `redis-server` arguments (password, TLS).
    args: Vec<String>,
    scheme: &'static str,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Redis {
    fn start() -> Self {
        Self::start_with(&[], false)
    }

    /// With extra arguments; `tls` serves TLS only, on the same port.
    fn start_with(args: &[&str], tls: bool) -> Self {
        let port = free_port();
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        if tls {
            args.extend([
                "--tls-port".into(),
                port.to_string(),
                "--port".into(),
                "0".into(),
            ]);
        } else {
            args.extend(["--port".into(), port.to_string()]);
        }
        let mut r = Redis {
            port,
            child: None,
            args,
            scheme: if tls { "rediss" } else { "redis" },
        };
        r.restart();
        r
    }

    /// Starts (again) on the same port, with no persistence.
    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(&self.args)
            .stdout(Stdio::null())
            .spawn()
            .expect(
                "redis-server is needed (Debian package redis-server; scripts/test installs it)",
            );
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("{}://127.0.0.1:{}/0", self.scheme, self.port)
    }

    async fn get(&self, key: &str) -> Option<i64> {
        let client = redis::Client::open(self.url()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("GET")
            .arg(key)
            .query_async(&mut c)
            .await
            .unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

const POLICY: &str = "shop/orders";

/// A plaintext policy (mTLS Disabled) with Global quotas keyed by the `x-account` header.
fn policy(app_port: u16, quotas: Value) -> Value {
    json!({
        "apiVersion": "apiward.io/sidecar/v1alpha1",
        "version": "global-1",
        "workload": {"namespace": "shop", "name": "orders-0", "serviceAccount": "orders"},
        "trustDomain": "cluster.local",
        "ports": [{
            "port": app_port, "policies": [POLICY], "mtls": "Disabled", "mode": "Enforce",
            "rules": [{"policy": POLICY, "name": "anyone", "action": "Allow",
                       "to": [{"methods": ["GET"], "paths": ["/**"]}]}],
            "quotas": quotas,
        }],
    })
}

fn quota(name: &str, path: &str, requests: u64, window: Value, on_store_error: &str) -> Value {
    json!({"policy": POLICY, "name": name, "key": {"header": "x-account"},
           "requests": requests, "periodMs": 86_400_000, "window": window, "scope": "Global",
           "onStoreError": on_store_error, "matches": [{"paths": [path]}]})
}

fn settings(app: SocketAddr, redis: &Redis, max_lease: u64, quotas: Value) -> Value {
    json!({
        "inbound": {"listen": "127.0.0.1:0", "port": app.port(), "upstream": app.to_string()},
        "admin": {"listen": "127.0.0.1:0"},
        "quotaStore": {"url": redis.url(), "maxLease": max_lease, "timeout": "100ms"},
        "policy": policy(app.port(), quotas),
    })
}

async fn start_sidecar(dir: &Path, name: &str, s: &Value) -> (String, String) {
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, s.to_string()).unwrap();
    let (_, bound) = apiward_sidecar::start(&path).await.unwrap();
    (
        format!("http://{}", bound.inbound),
        format!("http://{}", bound.admin),
    )
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .http1_only()
        .pool_max_idle_per_host(32)
        .build()
        .unwrap()
}

async fn metric(admin: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `GET url` for an account.
async fn call(c: &reqwest::Client, url: String, account: &str) -> reqwest::Response {
    c.get(url)
        .header("x-account", account)
        .send()
        .await
        .unwrap()
}

/// The status of `GET base + path` for `acme`.
async fn status(c: &reqwest::Client, base: &str, path: &str) -> u16 {
    call(c, format!("{base}{path}"), "acme")
        .await
        .status()
        .as_u16()
}

/// `r=` of the `RateLimit` header.
fn remaining(r: &reqwest::Response) -> u64 {
    let h = r.headers()["ratelimit"].to_str().unwrap();
    let r = h.split(";r=").nth(1).unwrap();
    r.split(';').next().unwrap().parse().unwrap()
}

/// Sends `n` requests spread over `bases`, `concurrency` at a time; returns statuses.
async fn load(
    bases: &[String],
    path: &str,
    account: &str,
    n: usize,
    concurrency: usize,
) -> Vec<u16> {
    let c = http();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (c, next, bases) = (c.clone(), next.clone(), bases.to_vec());
        let (path, account) = (path.to_owned(), account.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= n {
                    return out;
                }
                let url = format!("{}{path}", bases[i % bases.len()]);
                let r = call(&c, url, &account).await;
                out.push(r.status().as_u16());
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_sharing_a_quota_never_let_more_than_the_limit_through() {
    const LIMIT: u64 = 300;
    const MAX_LEASE: u64 = 32;
    let redis = Redis::start();
    let dir = tempdir("global-share");
    let (app, hits) = start_app().await;
    let quotas = json!([
        quota(
            "daily",
            "/daily/**",
            LIMIT,
            json!({"calendar": "Day"}),
            "FailClosed"
        ),
        quota(
            "rolling",
            "/rolling/**",
            LIMIT,
            json!("rolling"),
            "FailClosed"
        ),
    ]);
    let s = settings(app, &redis, MAX_LEASE, quotas);
    let mut sidecars = Vec::new();
    for i in 0..3 {
        sidecars.push(start_sidecar(&dir, &format!("sidecar-{i}"), &s).await);
    }
    let bases: Vec<String> = sidecars.iter().map(|(b, _)| b.clone()).collect();

    // The headers reflect the shared budget: what one sidecar spent, another reports.
    let c = http();
    for _ in 0..20 {
        let r = call(&c, format!("{}/daily/a", bases[0]), "acme").await;
        assert_eq!(r.status(), 200);
    }
    let r = call(&c, format!("{}/daily/a", bases[1]), "acme").await;
    assert_eq!(r.status(), 200);
    let left = remaining(&r);
    assert!(
        (LIMIT - 21 - 2 * MAX_LEASE..=LIMIT - 21).contains(&left),
        "another sidecar's remaining budget is the global one: {left}"
    );

    // Concurrent load through three sidecars, three times the budget, on both windows.
    for (path, spent_before) in [("/daily/a", 21), ("/rolling/a", 0)] {
        let statuses = load(&bases, path, "acme", 3 * LIMIT as usize, 24).await;
        let ok = statuses.iter().filter(|s| **s == 200).count() as u64 + spent_before;
        let refused = statuses.iter().filter(|s| **s == 429).count();
        assert_eq!(
            ok as usize - spent_before as usize + refused,
            statuses.len()
        );
        println!("{path}: {ok} of {LIMIT} allowed across 3 sidecars");
        assert!(
            ok <= LIMIT,
            "{path}: the limit was overshot: {ok} > {LIMIT}"
        );
        assert!(
            ok >= LIMIT - 3 * MAX_LEASE,
            "{path}: more budget than the lease bound went unused: {ok}"
        );
    }
    // Another account has its own budget.
    let r = call(&c, format!("{}/daily/a", bases[2]), "globex").await;
    assert_eq!(r.status(), 200);

    // A refusal carries the headers, and the app saw only what was allowed.
    let r = call(&c, format!("{}/daily/a", bases[2]), "acme").await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(remaining(&r), 0);
    assert!(hits.load(std::sync::atomic::Ordering::SeqCst) as u64 <= 2 * LIMIT + 1);

    let mut commands = 0.0;
    for (_, admin) in &sidecars {
        commands += metric(admin, "apiward_sidecar_quota_store_commands_total").await;
    }
    let requests = 20 + 1 + 2 * 3 * LIMIT + 2;
    println!(
        "Redis commands: {commands} for {requests} requests ({:.0} per 1,000)",
        commands * 1000.0 / requests as f64
    );
    assert!(commands < requests as f64, "leases must save round trips");
}

fn store_quota(window: Window, requests: u64, on_store_error: OnStoreError) -> QuotaConfig {
    QuotaConfig {
        policy: POLICY.into(),
        name: "monthly".into(),
        matches: vec![],
        key: QuotaKey::Principal,
        requests,
        period_ms: 86_400_000,
        burst: 0,
        window,
        scope: QuotaScope::Global,
        on_exceed: OnExceed::Reject,
        on_store_error,
        audit: false,
    }
}

fn store(redis: &Redis, max_lease: u64) -> Arc<GlobalQuotas> {
    let s: QuotaStoreSettings =
        serde_json::from_value(json!({"url": redis.url(), "maxLease": max_lease})).unwrap();
    GlobalQuotas::new(&s, StoreMetrics::default()).unwrap()
}

#[tokio::test]
async fn calendar_windows_reset_on_the_utc_boundary() {
    let redis = Redis::start();
    let g = store(&redis, 8);
    let ms = |s: &str| parse_rfc3339(s).unwrap() as u64 * 1000;
    // A day window on a leap day: the budget lasts until 2028-03-01T00:00:00Z. (Future
    // dates: Redis expires keys by its own clock.)
    let day = store_quota(
        Window::Calendar(CalendarUnit::Day),
        3,
        OnStoreError::FailClosed,
    );
    let before = ms("2028-02-29T23:59:59Z") + 500;
    for i in 0..3 {
        let v = g.acquire(&day, "acme", &|| before).await.unwrap();
        assert!(v.allowed, "request {i}");
        assert_eq!(v.remaining, 2 - i);
    }
    let v = g.acquire(&day, "acme", &|| before).await.unwrap();
    assert!(!v.allowed);
    assert_eq!(v.retry_after_ms, 500, "until midnight UTC");
    let after = ms("2028-03-01T00:00:00Z");
    assert!(g.acquire(&day, "acme", &|| after).await.unwrap().allowed);
    // The old window's key expires on its own, a minute (of clock-skew slack) after its end.
    let key = g.redis_key(&day, "acme", before);
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let expires: i64 = redis::cmd("PEXPIRETIME")
        .arg(&key)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(expires as u64, after + 60_000);

    // A month window in a 31-day month resets on the 1st of the next, not after 30 days.
    let month = store_quota(
        Window::Calendar(CalendarUnit::Month),
        1,
        OnStoreError::FailClosed,
    );
    let jan31 = ms("2027-01-31T12:00:00Z");
    assert!(
        g.acquire(&month, "acme", &|| ms("2027-01-01T00:00:00Z"))
            .await
            .unwrap()
            .allowed
    );
    let v = g.acquire(&month, "acme", &|| jan31).await.unwrap();
    assert!(!v.allowed, "still January");
    assert_eq!(v.retry_after_ms, ms("2027-02-01T00:00:00Z") - jan31);
    assert!(
        g.acquire(&month, "acme", &|| ms("2027-02-01T00:00:00Z"))
            .await
            .unwrap()
            .allowed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_follows_on_store_error_then_recovers() {
    let mut redis = Redis::start();
    let dir = tempdir("global-down");
    let (app, _) = start_app().await;
    let quotas = json!([
        quota(
            "critical",
            "/critical/**",
            1_000,
            json!({"calendar": "Day"}),
            "FailClosed"
        ),
        quota(
            "best-effort",
            "/open/**",
            5,
            json!({"calendar": "Day"}),
            "FailOpen"
        ),
    ]);
    // maxLease 1: no request is served from a lease taken before Redis died.
    let (base, admin) = start_sidecar(&dir, "sidecar", &settings(app, &redis, 1, quotas)).await;
    let c = http();
    let get = |path: &'static str| status(&c, &base, path);
    assert_eq!(get("/critical/a").await, 200);
    assert_eq!(get("/open/a").await, 200);
    assert_eq!(metric(&admin, "apiward_sidecar_quota_store_up").await, 1.0);

    redis.kill();
    let t = Instant::now();
    assert_eq!(get("/critical/a").await, 429, "FailClosed refuses");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "a short timeout, not a hang"
    );
    // FailOpen counts locally with the same limit: 5 per day in this sidecar alone.
    let open: Vec<u16> = repeat(8, || get("/open/a")).await;
    assert_eq!(open.iter().filter(|s| **s == 200).count(), 5, "{open:?}");
    for _ in 0..3 {
        get("/critical/a").await;
    }
    assert_eq!(metric(&admin, "apiward_sidecar_quota_store_up").await, 0.0);
    assert!(metric(&admin, "apiward_sidecar_quota_store_errors_total").await >= 4.0);
    let dump: Value = reqwest::get(format!("{admin}/config_dump"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(dump["quotaStore"]["available"], false);

    redis.restart();
    let restarted = Instant::now();
    let deadline = restarted + Duration::from_secs(10);
    loop {
        if get("/critical/a").await == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no recovery after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("recovered {:?} after Redis restarted", restarted.elapsed());
    assert_eq!(metric(&admin, "apiward_sidecar_quota_store_up").await, 1.0);
}

/// Runs a request `n` times, one after another.
async fn repeat<F, Fut>(n: usize, f: F) -> Vec<u16>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = u16>,
{
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(f().await);
    }
    out
}

/// The sidecar binary as a child process, stopped with SIGTERM on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run_binary(config: &Path) -> Process {
    Process(
        Command::new(env!("CARGO_BIN_EXE_apiward-sidecar"))
            .args(["run", "--config"])
            .arg(config)
            .args(["--log", "warn"])
            .spawn()
            .unwrap(),
    )
}

fn terminate(p: &mut Process) {
    let pid = p.0.id().to_string();
    let ok = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(ok.success());
    let status = p.0.wait().unwrap();
    assert!(status.success(), "graceful exit: {status}");
}

async fn wait_ready(admin: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while reqwest::get(format!("http://{admin}/ready"))
        .await
        .map_or(true, |r| r.status() != 200)
    {
        assert!(Instant::now() < deadline, "sidecar not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_survives_a_sidecar_restart_and_leases_go_back() {
    let redis = Redis::start();
    let dir = tempdir("global-restart");
    let (app, _) = start_app().await;
    let (inbound, admin) = (
        SocketAddr::from(([127, 0, 0, 1], free_port())),
        SocketAddr::from(([127, 0, 0, 1], free_port())),
    );
    let quotas = json!([quota(
        "daily",
        "/**",
        10,
        json!({"calendar": "Day"}),
        "FailClosed"
    )]);
    let mut s = settings(app, &redis, 8, quotas);
    s["inbound"]["listen"] = json!(inbound.to_string());
    s["admin"]["listen"] = json!(admin.to_string());
    let config: PathBuf = dir.join("sidecar.json");
    std::fs::write(&config, s.to_string()).unwrap();
    let c = http();
    let base = format!("http://{inbound}");
    let get = || status(&c, &base, "/a");

    let mut p = run_binary(&config);
    wait_ready(admin).await;
    for i in 0..6 {
        assert_eq!(get().await, 200, "request {i}");
    }
    terminate(&mut p);
    // What the sidecar leased and did not spend went back: Redis counts exactly 6.
    let day_start = {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        now - now % 86_400_000
    };
    let key = format!("apiward:{POLICY}/daily:c{day_start}:acme");
    assert_eq!(redis.get(&key).await, Some(6));

    let _p = run_binary(&config);
    wait_ready(admin).await;
    for i in 0..4 {
        assert_eq!(get().await, 200, "request {} after the restart", 6 + i);
    }
    assert_eq!(get().await, 429, "the 11th request of the day");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_comes_from_a_file_and_is_never_shown() {
    const PASSWORD: &str = "s3cr3t-redis-pw";
    let redis = Redis::start_with(&["--requirepass", PASSWORD], false);
    let dir = tempdir("global-auth");
    let (app, _) = start_app().await;
    let quotas = json!([quota(
        "daily",
        "/**",
        100,
        json!({"calendar": "Day"}),
        "FailClosed"
    )]);
    let with_password = |name: &str, pw: &str| {
        let file = dir.join(format!("{name}.password"));
        std::fs::write(&file, format!("{pw}\n")).unwrap();
        let mut s = settings(app, &redis, 4, quotas.clone());
        s["quotaStore"]["passwordFile"] = json!(file);
        s
    };
    let (base, admin) = start_sidecar(&dir, "right", &with_password("right", PASSWORD)).await;
    let (wrong, _) = start_sidecar(&dir, "wrong", &with_password("wrong", "guess")).await;
    let c = http();
    let get = |base: String| {
        let c = c.clone();
        async move { status(&c, &base, "/a").await }
    };
    assert_eq!(
        get(base.clone()).await,
        200,
        "authenticated with the file's password"
    );
    assert_eq!(
        get(wrong).await,
        429,
        "a wrong password is a store error: FailClosed"
    );
    for path in ["/config_dump", "/metrics"] {
        let text = reqwest::get(format!("{admin}{path}"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(!text.contains(PASSWORD), "{path} shows the password");
    }
    // The URL may not carry a password at all.
    let mut s = settings(app, &redis, 4, quotas.clone());
    s["quotaStore"]["url"] = json!(format!("redis://:{PASSWORD}@127.0.0.1:{}/0", redis.port));
    let path = dir.join("inline.json");
    std::fs::write(&path, s.to_string()).unwrap();
    let err = apiward_sidecar::start(&path).await.unwrap_err().to_string();
    assert!(
        err.contains("quotaStore.url") && err.contains("passwordFile"),
        "{err}"
    );
    assert!(
        !err.contains(PASSWORD),
        "the refusal repeats the password: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_with_a_private_ca() {
    let dir = tempdir("global-tls");
    let _pki = Pki::new(&dir); // writes ca.crt, server.crt (127.0.0.1) and server.key
    let (cert, key, ca) = (
        dir.join("server.crt"),
        dir.join("server.key"),
        dir.join("ca.crt"),
    );
    let redis = Redis::start_with(
        &[
            "--tls-cert-file",
            cert.to_str().unwrap(),
            "--tls-key-file",
            key.to_str().unwrap(),
            "--tls-ca-cert-file",
            ca.to_str().unwrap(),
            "--tls-auth-clients",
            "no",
        ],
        true,
    );
    let (app, _) = start_app().await;
    let quotas = json!([quota(
        "daily",
        "/**",
        2,
        json!({"calendar": "Day"}),
        "FailClosed"
    )]);
    let mut s = settings(app, &redis, 4, quotas.clone());
    s["quotaStore"]["caFile"] = json!(ca);
    let (base, _) = start_sidecar(&dir, "tls", &s).await;
    let c = http();
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let r = call(&c, format!("{base}/a"), "acme").await;
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 429], "counted in Redis over TLS");
    // Without the private CA the server is not trusted: a store error, FailClosed.
    let (untrusted, _) = start_sidecar(&dir, "untrusted", &settings(app, &redis, 4, quotas)).await;
    let r = call(&c, format!("{untrusted}/a"), "globex").await;
    assert_eq!(r.status(), 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_delay_quota_waits_instead_of_refusing() {
    let redis = Redis::start();
    let dir = tempdir("global-delay");
    let (app, _) = start_app().await;
    let mut q = quota("paced", "/**", 2, json!("rolling"), "FailClosed");
    q["periodMs"] = json!(1000);
    q["onExceed"] = json!({"delay": {"maxDelayMs": 1200}});
    let (base, _) = start_sidecar(&dir, "delay", &settings(app, &redis, 8, json!([q]))).await;
    let c = http();
    let get = || {
        let (c, base) = (c.clone(), base.clone());
        async move { status(&c, &base, "/a").await }
    };
    let started = Instant::now();
    assert_eq!(
        (get().await, get().await),
        (200, 200),
        "2 per second, at once"
    );
    // The 3rd waits ~0.5 s for the next slot. The 4th arrives while the sidecar remembers
    // the refusal that made the 3rd wait: it waits too (for ~1 s), it is not refused.
    let third = tokio::spawn(get());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let fourth = get().await;
    assert_eq!((third.await.unwrap(), fourth), (200, 200));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "they waited: {waited:?}"
    );
    // A wait longer than maxDelay is refused at once.
    let statuses = load(std::slice::from_ref(&base), "/a", "acme", 6, 6).await;
    assert!(statuses.contains(&429), "{statuses:?}");
}

/// A spray of distinct keys fills the table of cached leases; afterwards new keys are
/// still counted exactly (each request asks Redis) instead of failing with a store error
/// that `FailClosed` would turn into a 429 for everyone new.
#[tokio::test]
async fn a_full_lease_table_still_serves_new_keys_exactly() {
    let redis = Redis::start();
    let s: QuotaStoreSettings =
        serde_json::from_value(json!({"url": redis.url(), "maxLease": 8, "maxLeasedKeys": 50}))
            .unwrap();
    let g = GlobalQuotas::new(&s, StoreMetrics::default()).unwrap();
    let day = store_quota(
        Window::Calendar(CalendarUnit::Day),
        3,
        OnStoreError::FailClosed,
    );
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let now = move || t;
    for i in 0..200 {
        let v = g.acquire(&day, &format!("spray-{i}"), &now).await.unwrap();
        assert!(v.allowed, "spray {i}");
    }
    assert_eq!(g.leased_keys(), 50, "the table is full");
    // A new key beyond the table: allowed exactly 3 times, then refused by the quota (not
    // by a store error).
    for i in 0..3 {
        let v = g.acquire(&day, "newcomer", &now).await;
        assert!(v.as_ref().is_ok_and(|v| v.allowed), "newcomer {i}: {v:?}");
    }
    let v = g.acquire(&day, "newcomer", &now).await.unwrap();
    assert!(!v.allowed);
    assert_eq!(v.remaining, 0);
}

/// A Global Rolling quota above 1,000 per second keeps its rate after the burst: Redis holds
/// the theoretical arrival time to the microsecond (the emission interval is not rounded up
/// to a millisecond, which made 2,000 per second behave as 1,000).
#[tokio::test]
async fn a_global_rate_above_a_thousand_per_second_is_kept() {
    let redis = Redis::start();
    let g = store(&redis, 1);
    let mut q = store_quota(Window::Rolling, 2_000, OnStoreError::FailClosed);
    q.period_ms = 1_000; // 2,000 per second: 0.5 ms apart
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let now = move || t0;
    let mut passed = 0;
    while g.acquire(&q, "fast", &now).await.unwrap().allowed {
        passed += 1;
        assert!(passed <= 2_000, "more than the limit at one instant");
    }
    assert_eq!(passed, 2_000);
    // 10 ms later, 20 requests' worth has come back (10 at a millisecond per request).
    let later = move || t0 + 10;
    let mut back = 0;
    while g.acquire(&q, "fast", &later).await.unwrap().allowed {
        back += 1;
        assert!(back <= 20);
    }
    assert_eq!(back, 20);
}
