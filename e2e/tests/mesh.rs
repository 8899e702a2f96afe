//! The mesh in network namespaces: four "pods" on a bridge, with the iptables rules that
//! `apiward-sidecar init` installs, real sidecars running under their own UID, the
//! operator's identity endpoint in the root namespace, and small apps that know nothing
//! of TLS.
//!
//! - a: `shop/checkout`, a client app; b: `shop/orders`, the app being protected (only
//!   `shop/checkout` may call it, Strict mTLS); c: `shop/other`, a client app with another
//!   ServiceAccount; x: not meshed at all (no sidecar, no rules).
//!
//! Needs root, `ip`, `iptables`, `tcpdump` and `setpriv` (scripts/test installs them).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apiward_e2e::mesh::{
    APP_PORT, ECHO_PORT, MeshPod, SIDECAR_UID, allow_checkout_get, echo, get, sidecar_binary,
    start_app, start_echo, start_mesh,
};
use apiward_e2e::netns::{Lab, Pod, require};
use apiward_e2e::tempdir;

/// Runs `requests` GETs (one per new connection) from inside `pod`.
fn get_from(
    pod: &Pod,
    to: SocketAddr,
    path: &'static str,
    requests: usize,
) -> Vec<Result<(u16, String), String>> {
    pod.block_on(async move {
        let mut out = Vec::new();
        for _ in 0..requests {
            out.push(get(to, path).await);
        }
        out
    })
}

/// A counter's value in a sidecar's `/metrics` (0 when absent).
async fn metric(pod: &Pod, line_prefix: &str) -> f64 {
    let text = reqwest::get(format!("http://{}:15020/metrics", pod.ip))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn the_mesh_encrypts_authenticates_authorizes_and_polices_egress() {
    require(&["ip", "iptables", "tcpdump", "setpriv"]);
    let dir = tempdir("mesh");
    let bin = sidecar_binary(&dir, "debug");
    let _remove = apiward_e2e::RemoveOnDrop(bin.clone());
    let mut lab = Lab::new();
    let (a, b, c, x) = (
        lab.pod("a", 2),
        lab.pod("b", 3),
        lab.pod("c", 4),
        lab.pod("x", 5),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();

    // Pod b's app, listening on every address of the pod (not just loopback), so the
    // sidecar is the only thing that can keep callers from reaching it directly.
    let seen_from = Arc::new(Mutex::new(BTreeSet::new()));
    start_app(&b, &[APP_PORT], seen_from.clone());
    start_echo(&b, ECHO_PORT);

    // The operator's identity endpoint on the bridge (5-second certificates), the
    // interception rules, and the sidecars under their own UID (which the rules exempt).
    let allow_checkout = allow_checkout_get();
    let pods: [MeshPod<'_>; 3] = [
        (&a, "a", "checkout", &[]),
        (&b, "b", "orders", &[]),
        (&c, "c", "other", &[]),
    ];
    let op = start_mesh(
        &mut lab,
        &rt,
        &dir,
        &bin,
        &pods,
        b.ip,
        &allow_checkout,
        Duration::from_secs(5),
        &[],
    );

    // init is idempotent: running it again leaves the same rules.
    let bin_s = bin.to_str().unwrap();
    let before = String::from_utf8(b.exec(&["iptables-save", "-t", "nat"]).stdout).unwrap();
    b.exec(&[bin_s, "init", "--proxy-uid", &SIDECAR_UID.to_string()]);
    let after = String::from_utf8(b.exec(&["iptables-save", "-t", "nat"]).stdout).unwrap();
    let rules = |s: &str| {
        s.lines()
            .filter(|l| l.starts_with('-'))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        rules(&before),
        rules(&after),
        "a second init changed the rules"
    );
    assert!(after.contains("-A APIWARD_OUTPUT -m owner --uid-owner 1337 -j RETURN"));

    // Capture everything on pod b's wire while the apps talk.
    let pcap = dir.join("b.pcap");
    lab.spawn(
        &b,
        None,
        &[
            "tcpdump",
            "-i",
            &b.dev,
            "-U",
            "-n",
            "-w",
            pcap.to_str().unwrap(),
            "tcp",
        ],
        &dir.join("tcpdump.log"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(dir.join("tcpdump.log"))
        .unwrap_or_default()
        .contains("listening on")
    {
        assert!(Instant::now() < deadline, "tcpdump did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let to_b = SocketAddr::from((b.ip, APP_PORT));

    // A (checkout) → B over plain HTTP from the app's point of view: allowed, and B's app
    // sees the caller's verified SPIFFE ID.
    let r = get_from(&a, to_b, "/orders/mesh-probe", 3);
    for res in &r {
        let (status, body) = res.as_ref().expect("a → b");
        assert_eq!(*status, 200, "{body}");
        assert!(
            body.contains("spiffe://cluster.local/ns/shop/sa/checkout"),
            "{body}"
        );
    }
    // C (another ServiceAccount) → B: refused by B's sidecar.
    for res in get_from(&c, to_b, "/orders/from-c", 2) {
        assert_eq!(res.expect("c → b").0, 403);
    }
    // X (no sidecar) → B in Strict mode: the plaintext connection is refused.
    for res in get_from(&x, to_b, "/orders/plaintext-probe", 2) {
        assert!(res.is_err(), "a non-meshed caller got an answer: {res:?}");
    }
    // Non-HTTP TCP inside mTLS: checkout's line comes back from b's echo server; another
    // ServiceAccount's connection is closed before it reaches the app.
    let to_echo = SocketAddr::from((b.ip, ECHO_PORT));
    let from_a = a.block_on(echo(to_echo, "ping-opaque-from-a\n"));
    assert_eq!(from_a.as_deref(), Ok("ping-opaque-from-a\n"));
    let from_c = c.block_on(echo(to_echo, "ping-opaque-from-c\n"));
    assert!(
        from_c.as_deref().map_or(true, str::is_empty),
        "c got an echo: {from_c:?}"
    );
    // A → the cloud metadata address: refused by A's egress policy, and logged.
    let metadata = SocketAddr::from(([169, 254, 169, 254], 80));
    for res in get_from(&a, metadata, "/latest/meta-data/", 1) {
        assert!(res.is_err(), "the metadata address answered: {res:?}");
    }

    // Rotation under load: 5 s certificates, 12 s of requests from a, each on a new
    // connection (a fresh mTLS handshake A → B), none may fail.
    let (ok, failed) = a.block_on(async move {
        let (mut ok, mut failed) = (0usize, Vec::new());
        let until = Instant::now() + Duration::from_secs(12);
        while Instant::now() < until {
            match get(to_b, "/orders/load").await {
                Ok((200, _)) => ok += 1,
                other => failed.push(format!("{other:?}")),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (ok, failed)
    });
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during rotation: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 100, "only {ok} requests ran");
    rt.block_on(async {
        for pod in [&a, &b] {
            let n = metric(pod, "apiward_sidecar_identity_certificates_total").await;
            assert!(n >= 3.0, "{} received {n} certificates in ~20 s of 5 s certificates", pod.ns);
        }
        let refused = metric(&a, "apiward_sidecar_outbound_connections_total{route=\"egress\",result=\"metadata_address\"}").await;
        assert_eq!(refused, 1.0);
        let plaintext = metric(&b, "apiward_sidecar_handshake_failures_total{reason=\"plaintext_refused\"}").await;
        assert_eq!(plaintext, 2.0);
    });
    assert!(
        op.counters
            .issued
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 9
    );

    lab.stop_all();
    // B's app only ever saw connections from its own sidecar, on loopback.
    assert_eq!(
        *seen_from.lock().unwrap(),
        BTreeSet::from(["127.0.0.1".to_owned()])
    );
    // On the wire: TLS handshakes, and none of the request lines the apps sent in clear,
    // except the non-meshed caller's (which shows the capture does see plaintext).
    let wire = std::fs::read(&pcap).unwrap();
    assert!(
        contains(&wire, b"GET /orders/plaintext-probe"),
        "the capture missed the plaintext probe"
    );
    assert!(
        contains(&wire, &[0x16, 0x03, 0x01]),
        "no TLS ClientHello on the wire"
    );
    for clear in [
        &b"GET /orders/mesh-probe"[..],
        b"ping-opaque",
        b"GET /orders/from-c",
        b"GET /orders/load",
        b"x-apiward-principal",
    ] {
        assert!(
            !contains(&wire, clear),
            "{} appears in clear on the wire",
            String::from_utf8_lossy(clear)
        );
    }
    // The refused egress is in A's log with its destination and reason.
    let log_a = std::fs::read_to_string(dir.join("sidecar-a.log")).unwrap();
    let line = log_a
        .lines()
        .find(|l| l.contains("outbound connection refused") && l.contains("169.254.169.254:80"))
        .unwrap_or_else(|| panic!("no refusal logged for the metadata address:\n{log_a}"));
    assert!(line.contains("metadata_address"), "{line}");
    let _ = std::fs::remove_dir_all(&dir);
}
