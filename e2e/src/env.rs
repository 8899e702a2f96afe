//! The end-to-end scenarios talk to the system through [`Environment`], so one scenario
//! runs against the local lab here (network namespaces, real iptables interception, the
//! `apiward local serve` control plane as a process) and, later, against a real cluster
//! (`KUBECONFIG`) without being rewritten.
//!
//! [`LocalLab`] is the local implementation: a pod per workload on a bridge, each with an
//! app on [`APP_PORT`], the sidecar under [`SIDECAR_UID`] with the interception rules of
//! `apiward-sidecar init`, identity and config from the control plane on the bridge's
//! gateway, and every other pod's app port meshed (mTLS with its SPIFFE ID).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use apiward::identity::{AUDIENCE, LocalTokens};
use apiward::local::{StatusFile, status_path};
use apiward_crds::ApiPolicyStatus;
use serde_json::json;

use crate::mesh::{APP_PORT, SIDECAR_UID, get, start_app};
use crate::netns::{Lab, Pod};
use crate::now;

/// A workload of a scenario: one pod named `<name>-0` running as ServiceAccount `name` in
/// namespace `shop`, labelled `app: <name>`.
pub type WorkloadName = &'static str;

/// What a scenario can do to the system under test.
pub trait Environment {
    /// Applies (creates or replaces) a policy from its YAML.
    fn apply_policy(&mut self, name: &str, yaml: &str);
    /// `GET path` from `from`'s pod to `to`'s app, through both sidecars: the status, or
    /// 0 when the connection was refused or reset.
    fn get(&self, from: WorkloadName, to: WorkloadName, path: &str) -> u16;
    /// The status of policy `shop/<name>`, as the control plane wrote it.
    fn status(&self, name: &str) -> Option<ApiPolicyStatus>;
    /// Errors the control plane reported for the policy's source (a malformed file).
    fn source_errors(&self, name: &str) -> Vec<String>;
    /// The config version `workload`'s sidecar enforces, if any.
    fn enforced_version(&self, workload: WorkloadName) -> Option<String>;
    /// Stops the control plane (sidecars keep running).
    fn stop_control_plane(&mut self);
    /// Starts it again.
    fn start_control_plane(&mut self);
    /// Kills `workload`'s sidecar and starts a new one.
    fn restart_sidecar(&mut self, workload: WorkloadName);
    /// `GET` every path from `from` to `to`, `concurrency` connections at once; the
    /// statuses (0 for a failed request).
    fn get_many(
        &self,
        from: WorkloadName,
        to: WorkloadName,
        paths: Vec<String>,
        concurrency: usize,
    ) -> Vec<u16>;
    /// Resident memory of `workload`'s sidecar, KiB.
    fn sidecar_rss_kib(&self, workload: WorkloadName) -> u64;
}

/// The environment the scenarios run in: a real cluster when `KUBECONFIG` is set
/// ([`crate::cluster::KubeCluster`], the chart installed), else the local lab in `dir`
/// (root, network namespaces).
pub fn environment(dir: &Path, workloads: &[WorkloadName]) -> Box<dyn Environment> {
    if std::env::var_os("KUBECONFIG").is_some_and(|k| !k.is_empty()) {
        Box::new(crate::cluster::KubeCluster::start(workloads))
    } else {
        Box::new(LocalLab::start(dir, workloads))
    }
}

/// Waits for `cond`, checking every 50 ms, for at most `limit`; returns how long it took.
pub fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

/// The `apiward` binary the tests run (`target/<profile>/apiward`), copied into `dir`.
pub fn apiward_binary(dir: &Path, name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let debug = exe
        .ancestors()
        .find(|d| {
            d.file_name()
                .is_some_and(|n| n == "debug" || n == "release")
        })
        .map(Path::to_path_buf)
        .expect("the profile dir");
    let built = debug.join(name);
    assert!(
        built.exists(),
        "{} is missing: build the workspace first (scripts/test does)",
        built.display()
    );
    let to = dir.join(name);
    std::fs::copy(&built, &to).expect("copy the binary");
    to
}

/// The local lab: see the module docs.
pub struct LocalLab {
    lab: Lab,
    rt: tokio::runtime::Runtime,
    dir: PathBuf,
    policies: PathBuf,
    apiward: PathBuf,
    sidecar: PathBuf,
    control: Option<Child>,
    pods: BTreeMap<WorkloadName, Pod>,
    sidecars: BTreeMap<WorkloadName, u32>,
}

impl std::fmt::Debug for LocalLab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalLab")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl LocalLab {
    /// Starts the control plane and a pod per workload; returns once every sidecar has its
    /// certificate (its config arrives once a policy selects it... or an empty one now).
    pub fn start(dir: &Path, workloads: &[WorkloadName]) -> Self {
        crate::netns::require(&["ip", "iptables", "setpriv"]);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let policies = dir.join("policies");
        std::fs::create_dir_all(&policies).expect("policies dir");
        let mut lab = Lab::new();
        let mut pods = BTreeMap::new();
        for (i, w) in workloads.iter().enumerate() {
            pods.insert(*w, lab.pod(w, 10 + i as u8));
        }
        let mesh: Vec<_> = workloads
            .iter()
            .map(|w| {
                json!({"namespace": "shop", "name": format!("{w}-0"), "labels": {"app": w},
                            "serviceAccount": w, "ports": [APP_PORT]})
            })
            .collect();
        std::fs::write(
            dir.join("mesh.yaml"),
            serde_json::to_string(&json!({ "workloads": mesh })).expect("JSON"),
        )
        .expect("mesh file");
        let mut me = Self {
            apiward: apiward_binary(dir, "apiward"),
            sidecar: apiward_binary(dir, "apiward-sidecar"),
            lab,
            rt,
            dir: dir.to_owned(),
            policies,
            control: None,
            pods,
            sidecars: BTreeMap::new(),
        };
        me.start_control_plane();
        // Tokens, signed by the control plane's key (in a cluster: the kubelet's).
        let key = std::fs::read_to_string(dir.join("state/token-signing.key")).expect("token key");
        let tokens = LocalTokens::from_pem(&key).expect("token key");
        for w in workloads {
            let t = tokens
                .mint("shop", w, Some(&format!("{w}-0")), AUDIENCE, now(), 3600)
                .expect("token");
            std::fs::write(dir.join(format!("token-{w}")), t).expect("token file");
        }
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Default::default()));
        let names: Vec<WorkloadName> = me.pods.keys().copied().collect();
        for w in &names {
            let pod = me.pods[w].clone();
            start_app(&pod, &[APP_PORT], seen.clone());
            let bin = me.sidecar.to_str().expect("UTF-8").to_owned();
            pod.exec(&[&bin, "init", "--proxy-uid", &SIDECAR_UID.to_string()]);
            me.settings(w);
            me.spawn_sidecar(w);
        }
        me
    }

    fn gateway(&self) -> std::net::Ipv4Addr {
        self.lab.gateway()
    }

    /// The sidecar settings of `w`: identity and config from the control plane, every other
    /// pod's app port meshed.
    fn settings(&self, w: WorkloadName) -> PathBuf {
        let meshed: Vec<_> = self
            .pods
            .iter()
            .filter(|(o, _)| **o != w)
            .map(|(o, p)| {
                json!({"cidrs": [format!("{}/32", p.ip)], "ports": [APP_PORT],
                                 "identity": format!("spiffe://cluster.local/ns/shop/sa/{o}")})
            })
            .collect();
        let s = json!({
            "inbound": {"listen": "0.0.0.0:15006", "port": APP_PORT, "upstream": format!("127.0.0.1:{APP_PORT}")},
            "admin": {"listen": "0.0.0.0:15020"},
            "identity": {"url": format!("https://{}:15012", self.gateway()),
                         "tokenFile": self.dir.join(format!("token-{w}")),
                         "caFile": self.dir.join("state/trust-bundle.pem")},
            "control": {"pod": format!("{w}-0"), "reportInterval": "500ms"},
            "outbound": {"listen": "127.0.0.1:15001", "meshed": meshed},
        });
        let path = self.dir.join(format!("sidecar-{w}.json"));
        std::fs::write(&path, s.to_string()).expect("settings");
        path
    }

    fn spawn_sidecar(&mut self, w: WorkloadName) {
        let pod = self.pods[w].clone();
        let cfg = self.dir.join(format!("sidecar-{w}.json"));
        let log = self.dir.join(format!("sidecar-{w}.log"));
        let pid = self.lab.spawn(
            &pod,
            Some(SIDECAR_UID),
            &[
                self.sidecar.to_str().expect("UTF-8"),
                "run",
                "--config",
                cfg.to_str().expect("UTF-8"),
            ],
            &log,
        );
        self.sidecars.insert(w, pid);
        // Up once its admin port answers (ready or not).
        let admin = SocketAddr::from((pod.ip, 15020));
        let rt = &self.rt;
        wait_for(Duration::from_secs(15), "the sidecar's admin port", || {
            rt.block_on(get(admin, "/live")).is_ok()
        });
    }

    fn admin(&self, w: WorkloadName, path: &str) -> Option<String> {
        let admin = SocketAddr::from((self.pods[w].ip, 15020));
        self.rt.block_on(get(admin, path)).ok().map(|(_, b)| b)
    }

    fn status_file(&self, name: &str) -> Option<StatusFile> {
        let text =
            std::fs::read_to_string(status_path(&self.policies.join(format!("{name}.yaml"))))
                .ok()?;
        serde_norway::from_str(&text).ok()
    }

    /// Where the lab keeps its files (logs, settings, status).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Environment for LocalLab {
    fn apply_policy(&mut self, name: &str, yaml: &str) {
        let path = self.policies.join(format!("{name}.yaml"));
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, yaml).expect("policy file");
        std::fs::rename(tmp, path).expect("policy file");
    }

    fn get(&self, from: WorkloadName, to: WorkloadName, path: &str) -> u16 {
        let target = SocketAddr::from((self.pods[to].ip, APP_PORT));
        let path = path.to_owned();
        self.pods[from].block_on(async move { get(target, &path).await.map_or(0, |(s, _)| s) })
    }

    fn status(&self, name: &str) -> Option<ApiPolicyStatus> {
        self.status_file(name)?
            .policies
            .get(&format!("shop/{name}"))
            .cloned()
    }

    fn source_errors(&self, name: &str) -> Vec<String> {
        self.status_file(name).map(|s| s.errors).unwrap_or_default()
    }

    fn enforced_version(&self, w: WorkloadName) -> Option<String> {
        let dump: serde_json::Value = serde_json::from_str(&self.admin(w, "/config_dump")?).ok()?;
        dump["version"].as_str().map(str::to_owned)
    }

    fn stop_control_plane(&mut self) {
        if let Some(mut c) = self.control.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn start_control_plane(&mut self) {
        let gw = self.gateway().to_string();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("control-plane.log"))
            .expect("log");
        let child = Command::new(&self.apiward)
            .args([
                "local",
                "serve",
                "--listen",
                &format!("{gw}:15012"),
                "--server-name",
                &gw,
            ])
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--policies")
            .arg(&self.policies)
            .arg("--mesh")
            .arg(self.dir.join("mesh.yaml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start apiward local serve");
        self.control = Some(child);
        let addr = SocketAddr::from((self.gateway(), 15012));
        wait_for(Duration::from_secs(15), "the control plane's port", || {
            std::net::TcpStream::connect(addr).is_ok()
        });
    }

    fn get_many(
        &self,
        from: WorkloadName,
        to: WorkloadName,
        paths: Vec<String>,
        concurrency: usize,
    ) -> Vec<u16> {
        let target = SocketAddr::from((self.pods[to].ip, APP_PORT));
        let queue = std::sync::Arc::new(std::sync::Mutex::new(paths));
        self.pods[from].block_on(async move {
            let mut tasks = Vec::new();
            for _ in 0..concurrency.max(1) {
                let queue = queue.clone();
                tasks.push(tokio::spawn(async move {
                    let mut out = Vec::new();
                    let mut conn: Option<crate::mesh::AppClient> = None;
                    loop {
                        let next = queue.lock().ok().and_then(|mut q| q.pop());
                        let Some(path) = next else { return out };
                        if conn.is_none() {
                            conn = crate::mesh::AppClient::connect(target).await.ok();
                        }
                        let status = match conn.as_mut() {
                            Some(c) => c.get(&path).await.map_or(0, |(s, _)| s),
                            None => 0,
                        };
                        if status == 0 {
                            conn = None; // reconnect after a failure
                        }
                        out.push(status);
                    }
                }));
            }
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await.unwrap_or_default());
            }
            all
        })
    }

    fn sidecar_rss_kib(&self, w: WorkloadName) -> u64 {
        let pid = self.sidecars[w];
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0)
    }

    fn restart_sidecar(&mut self, w: WorkloadName) {
        if let Some(pid) = self.sidecars.remove(w) {
            self.lab.kill(pid);
        }
        self.spawn_sidecar(w);
    }
}

impl Drop for LocalLab {
    fn drop(&mut self) {
        self.stop_control_plane();
        self.lab.stop_all();
        // The copied binaries are large; logs, settings and status stay for a post-mortem.
        let _ = std::fs::remove_file(&self.apiward);
        let _ = std::fs::remove_file(&self.sidecar);
    }
}
