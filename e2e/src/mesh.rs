//! Pieces of a mesh in network namespaces, shared by the mesh test and the mesh benchmark:
//! the sidecar binary, its settings, a small app, and an app-side HTTP/1.1 client.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use serde_json::json;

use apiward::identity::{AUDIENCE, Ca, LocalTokens};

use crate::netns::{Lab, Pod};
use crate::{Operator, now, start_operator};

/// The UID sidecars run as (the interception rules exempt it).
pub const SIDECAR_UID: u32 = 1337;
/// The port the apps serve and the policy protects.
pub const APP_PORT: u16 = 8080;
/// A port where pod b's app speaks a non-HTTP protocol (a line echo), tunnelled as opaque TCP.
pub const ECHO_PORT: u16 = 9000;
/// The only SPIFFE ID pod b may present.
pub const ORDERS_ID: &str = "spiffe://cluster.local/ns/shop/sa/orders";

/// The sidecar binary of `profile` (`debug` or `release`), copied into `dir` where the
/// sidecar's UID can run it.
pub fn sidecar_binary(dir: &Path, profile: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let target = exe
        .ancestors()
        .find(|d| d.file_name().is_some_and(|n| n == "target"))
        .map(Path::to_path_buf)
        .expect("the target dir");
    let built = target.join(profile).join("apiward-sidecar");
    assert!(
        built.exists(),
        "{} is missing: build it first (`cargo build{} -p apiward-sidecar`; scripts/test builds the debug one)",
        built.display(),
        if profile == "release" {
            " --release"
        } else {
            ""
        }
    );
    let to = dir.join("apiward-sidecar");
    std::fs::copy(&built, &to).expect("copy the sidecar binary");
    to
}

/// Settings for the sidecar of `pod` (ServiceAccount `sa` in namespace `shop`): identity
/// from the operator at `gateway:15012`, pod `b` at `b` meshed (it must present
/// [`ORDERS_ID`]; HTTP on [`APP_PORT`], opaque TCP on [`ECHO_PORT`]), egress default-deny,
/// `rules` guarding [`APP_PORT`] and only `shop/checkout` allowed on [`ECHO_PORT`], Strict.
pub fn sidecar_settings(
    pod: &str,
    sa: &str,
    gateway: Ipv4Addr,
    dir: &Path,
    b: Ipv4Addr,
    rules: serde_json::Value,
) -> PathBuf {
    let s = json!({
        "inbound": {"listen": "0.0.0.0:15006", "port": APP_PORT, "upstream": format!("127.0.0.1:{APP_PORT}")},
        "admin": {"listen": "0.0.0.0:15020"},
        "identity": {"url": format!("https://{gateway}:15012"), "tokenFile": dir.join(format!("token-{pod}")), "caFile": dir.join("trust-bundle.pem")},
        "outbound": {
            "listen": "127.0.0.1:15001",
            "meshed": [
                {"cidrs": [format!("{b}/32")], "ports": [APP_PORT], "identity": ORDERS_ID},
                {"cidrs": [format!("{b}/32")], "ports": [ECHO_PORT], "identity": ORDERS_ID, "protocol": "Opaque"},
            ],
        },
        "policy": {
            "apiVersion": "apiward.io/sidecar/v1alpha1",
            "version": "mesh-1",
            "workload": {"namespace": "shop", "name": format!("{sa}-0"), "serviceAccount": sa},
            "trustDomain": "cluster.local",
            "ports": [
                {"port": APP_PORT, "policies": ["shop/orders"], "mtls": "Strict", "mode": "Enforce", "rules": rules},
                // Opaque TCP: only checkout, by identity.
                {"port": ECHO_PORT, "policies": ["shop/orders"], "mtls": "Strict", "mode": "Enforce", "rules": [
                    {"policy": "shop/orders", "name": "checkout-echo", "action": "Allow",
                     "from": [{"principals": ["spiffe://cluster.local/ns/shop/sa/checkout"]}]}]},
            ]
        }
    });
    let path = dir.join(format!("sidecar-{pod}.json"));
    std::fs::write(&path, s.to_string()).expect("write the settings");
    path
}

/// Listens in `pod` on every address of the pod, on each of `ports`, and hands each
/// connection to `on_conn` (a task per connection). Returns once listening.
fn serve_in<F, Fut>(pod: &Pod, ports: &[u16], on_conn: F)
where
    F: Fn(tokio::net::TcpStream, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    let ports = ports.to_vec();
    let on_conn = Arc::new(on_conn);
    pod.spawn(async move {
        for port in ports {
            let listener = tokio::net::TcpListener::bind(("0.0.0.0", port))
                .await
                .expect("bind in the pod");
            let on_conn = on_conn.clone();
            tokio::spawn(async move {
                while let Ok((tcp, from)) = listener.accept().await {
                    tokio::spawn(on_conn(tcp, from));
                }
            });
        }
        tx.send(()).expect("started");
        std::future::pending::<()>().await;
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("the server in the pod started");
}

/// An app in `pod` on every address of the pod, on each of `ports`: it answers with the
/// principal its sidecar forwarded and records the address every connection came from.
pub fn start_app(pod: &Pod, ports: &[u16], seen_from: Arc<Mutex<BTreeSet<String>>>) {
    let hits = Arc::new(AtomicUsize::new(0));
    serve_in(pod, ports, move |tcp, from| {
        if let Ok(mut s) = seen_from.lock() {
            s.insert(from.ip().to_string());
        }
        serve_app_conn(tcp, hits.clone())
    });
}

/// A line-echo server (not HTTP) in `pod` on `port`.
pub fn start_echo(pod: &Pod, port: u16) {
    serve_in(pod, &[port], |mut tcp, _| async move {
        let (mut r, mut w) = tcp.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    });
}

/// Sends `line` on a new TCP connection to `to` and returns what came back before the
/// other side closed or 2 s passed.
pub async fn echo(to: SocketAddr, line: &str) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(to)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tcp.write_all(line.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut got = vec![0u8; line.len()];
    let mut n = 0;
    while n < got.len() {
        match tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut got[n..])).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(k)) => n += k,
            Ok(Err(e)) => return Err(format!("read: {e}")),
        }
    }
    Ok(String::from_utf8_lossy(&got[..n]).into_owned())
}

/// Serves HTTP/1.1 on `tcp` as the test app: every request (counted in `hits`) is answered
/// with `{"principal": <the x-apiward-principal header>}`.
pub async fn serve_app_conn(tcp: tokio::net::TcpStream, hits: Arc<AtomicUsize>) {
    let _ = tcp.set_nodelay(true);
    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        hits.fetch_add(1, Ordering::SeqCst);
        let who = req
            .headers()
            .get("x-apiward-principal")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        async move {
            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(
                json!({"principal": who}).to_string(),
            ))))
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(tcp), svc)
        .await;
}

/// An app-side HTTP/1.1 connection (plain HTTP, as an app would open it).
pub struct AppClient {
    send: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    to: SocketAddr,
}

impl std::fmt::Debug for AppClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppClient").field("to", &self.to).finish()
    }
}

impl AppClient {
    /// Connects to `to`.
    pub async fn connect(to: SocketAddr) -> Result<Self, String> {
        let tcp = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(to))
            .await
            .map_err(|_| "connect timed out".to_owned())?
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(Self { send, to })
    }

    /// One GET on this connection: status and body.
    pub async fn get(&mut self, path: &str) -> Result<(u16, String), String> {
        let req = http::Request::get(path)
            .header("host", self.to.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(Duration::from_secs(5), self.send.send_request(req))
            .await
            .map_err(|_| "response timed out".to_owned())?
            .map_err(|e| format!("request: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// One GET on a new connection.
pub async fn get(to: SocketAddr, path: &str) -> Result<(u16, String), String> {
    AppClient::connect(to).await?.get(path).await
}

/// The HTTP rules of pod b in the test and the benchmark: only `shop/checkout`, GET.
pub fn allow_checkout_get() -> serde_json::Value {
    json!([{"policy": "shop/orders", "name": "checkout-reads", "action": "Allow",
        "from": [{"principals": ["spiffe://cluster.local/ns/shop/sa/checkout"]}],
        "to": [{"methods": ["GET"], "paths": ["/**"]}]}])
}

/// One meshed pod: the pod, a short name (for files), its ServiceAccount in `shop`, and
/// extra `apiward-sidecar init` arguments.
pub type MeshPod<'a> = (&'a Pod, &'a str, &'a str, &'a [&'a str]);

/// Starts a mesh in `lab`: the operator's identity endpoint on the lab's gateway (local CA,
/// certificates of `lifetime`), a token per pod, the interception rules (`init`), and the
/// sidecars under [`SIDECAR_UID`] (settings from [`sidecar_settings`] with pod b at `b`,
/// logs in `dir/sidecar-<name>.log`, `run_args` appended). Returns once every sidecar is
/// ready.
#[allow(clippy::too_many_arguments)]
pub fn start_mesh(
    lab: &mut Lab,
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    bin: &Path,
    pods: &[MeshPod<'_>],
    b: Ipv4Addr,
    rules: &serde_json::Value,
    lifetime: Duration,
    run_args: &[&str],
) -> Operator {
    let gateway = lab.gateway();
    let ca = Ca::generate("cluster.local", now()).expect("CA");
    let tokens = LocalTokens::generate().expect("token key");
    std::fs::write(dir.join("trust-bundle.pem"), ca.trust_bundle_pem()).expect("bundle");
    for (_, name, sa, _) in pods {
        let t = tokens
            .mint("shop", sa, None, AUDIENCE, now(), 3600)
            .expect("token");
        std::fs::write(dir.join(format!("token-{name}")), t).expect("token file");
    }
    let gw = gateway.to_string();
    let op = rt.block_on(start_operator(
        ca,
        tokens,
        SocketAddr::from((gateway, 15012)),
        &[&gw],
        lifetime,
    ));
    let bin = bin.to_str().expect("UTF-8 path");
    let uid = SIDECAR_UID.to_string();
    for (pod, name, sa, init_args) in pods {
        pod.exec(&[&[bin, "init", "--proxy-uid", &uid][..], init_args].concat());
        let cfg = sidecar_settings(name, sa, gateway, dir, b, rules.clone());
        let log = dir.join(format!("sidecar-{name}.log"));
        let cfg = cfg.to_str().expect("UTF-8 path");
        lab.spawn(
            pod,
            Some(SIDECAR_UID),
            &[&[bin, "run", "--config", cfg][..], run_args].concat(),
            &log,
        );
    }
    rt.block_on(async {
        for (pod, ..) in pods {
            let ready = SocketAddr::from((pod.ip, 15020));
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            while !matches!(get(ready, "/ready").await, Ok((200, _))) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the sidecar in {} never became ready",
                    pod.ns
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    op
}
