//! The mesh path's cost, in network namespaces (needs root, `ip`, `iptables`, `setpriv`, and
//! the release sidecar: `cargo build --release -p apiward-sidecar`):
//!
//!   mesh:   app in pod a --plain--> a's outbound (iptables) --mTLS--> b's inbound --> app in b
//!   direct: app in pod x --plain--> app in b (a port b's rules leave alone)
//!
//! Reports keep-alive request latency (sequential requests on one connection) and new
//! connections per second (8 concurrent callers, one request per connection: every mesh
//! connection is a new mTLS handshake A → B, resumed after the first).
//!
//! Run: `cargo bench -p apiward-e2e --bench mesh` (as root). Knob: `SECONDS` (default 5).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apiward_e2e::mesh::{
    APP_PORT, AppClient, MeshPod, allow_checkout_get, get, sidecar_binary, start_app, start_mesh,
};
use apiward_e2e::netns::{Lab, Pod, require};
use apiward_e2e::tempdir;

const DIRECT_PORT: u16 = 8081;

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// Sequential requests on one kept-alive connection for `secs`: sorted latencies.
fn keepalive(pod: &Pod, to: SocketAddr, secs: u64) -> Vec<Duration> {
    pod.block_on(async move {
        let mut c = AppClient::connect(to).await.expect("connect");
        let warm = Instant::now() + Duration::from_millis(500);
        while Instant::now() < warm {
            c.get("/warm").await.expect("warm-up request");
        }
        let mut out = Vec::new();
        let until = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < until {
            let t = Instant::now();
            let (status, _) = c.get("/orders").await.expect("request");
            assert_eq!(status, 200);
            out.push(t.elapsed());
        }
        out.sort();
        out
    })
}

/// `callers` concurrent loops of one request per new connection for `secs`:
/// (completed per second, failures, sorted latencies).
fn new_connections(
    pod: &Pod,
    to: SocketAddr,
    callers: usize,
    secs: u64,
) -> (f64, usize, Vec<Duration>) {
    pod.block_on(async move {
        let start = Instant::now();
        let until = start + Duration::from_secs(secs);
        let mut tasks = Vec::new();
        for _ in 0..callers {
            tasks.push(tokio::spawn(async move {
                let (mut lat, mut failed) = (Vec::new(), 0usize);
                while Instant::now() < until {
                    let t = Instant::now();
                    match get(to, "/orders").await {
                        Ok((200, _)) => lat.push(t.elapsed()),
                        _ => failed += 1,
                    }
                }
                (lat, failed)
            }));
        }
        let (mut lat, mut failed) = (Vec::new(), 0);
        for t in tasks {
            let (l, f) = t.await.unwrap();
            lat.extend(l);
            failed += f;
        }
        let rate = lat.len() as f64 / start.elapsed().as_secs_f64();
        lat.sort();
        (rate, failed, lat)
    })
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    require(&["ip", "iptables", "setpriv"]);
    let secs: u64 = std::env::var("SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let dir = tempdir("mesh-bench");
    let bin = sidecar_binary(&dir, "release");
    let mut lab = Lab::new();
    let (a, b, x) = (lab.pod("a", 2), lab.pod("b", 3), lab.pod("x", 5));
    let rt = tokio::runtime::Runtime::new().unwrap();
    start_app(
        &b,
        &[APP_PORT, DIRECT_PORT],
        Arc::new(Mutex::new(BTreeSet::new())),
    );
    let rules = allow_checkout_get();
    let direct = DIRECT_PORT.to_string();
    let pods: [MeshPod<'_>; 2] = [
        (&a, "a", "checkout", &[]),
        (&b, "b", "orders", &["--exclude-inbound-ports", &direct]),
    ];
    let _op = start_mesh(
        &mut lab,
        &rt,
        &dir,
        &bin,
        &pods,
        b.ip,
        &rules,
        Duration::from_secs(24 * 3600),
        &["--log", "warn"],
    );

    let mesh_to = SocketAddr::from((b.ip, APP_PORT));
    let direct_to = SocketAddr::from((b.ip, DIRECT_PORT));
    let ka_direct = keepalive(&x, direct_to, secs);
    let ka_mesh = keepalive(&a, mesh_to, secs);
    let (nc_direct, f_direct, lat_direct) = new_connections(&x, direct_to, 8, secs);
    let (nc_mesh, f_mesh, lat_mesh) = new_connections(&a, mesh_to, 8, secs);
    lab.stop_all();

    println!(
        "\nmesh path vs plaintext direct ({secs} s each; 2 cores shared by both sidecars, the app and the caller)\n"
    );
    println!(
        "| path | keep-alive p50 / p99 ms | keep-alive req/s (1 caller) | new connections/s (8 callers) | new-connection request p50 / p99 ms | failures |"
    );
    println!("|---|---|---|---|---|---|");
    for (name, ka, nc, lat, failed) in [
        (
            "direct (plain HTTP x → b)",
            &ka_direct,
            nc_direct,
            &lat_direct,
            f_direct,
        ),
        (
            "mesh (a → outbound → mTLS → inbound → b)",
            &ka_mesh,
            nc_mesh,
            &lat_mesh,
            f_mesh,
        ),
    ] {
        println!(
            "| {name} | {:.3} / {:.3} | {:.0} | {:.0} | {:.3} / {:.3} | {failed} |",
            pct(ka, 0.5),
            pct(ka, 0.99),
            ka.len() as f64 / secs as f64,
            nc,
            pct(lat, 0.5),
            pct(lat, 0.99),
        );
    }
    println!(
        "\nadded latency (keep-alive p50): {:.3} ms",
        pct(&ka_mesh, 0.5) - pct(&ka_direct, 0.5)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
