//! Network-namespace "pods" for end-to-end tests: each pod is a namespace with a veth pair
//! into a bridge in the root namespace (which holds the gateway address, where the test's
//! operator listens). Needs root and `ip`; everything is removed when the [`Lab`] drops.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

/// Fails loudly (this is a test) unless we are root and every tool is installed.
pub fn require(tools: &[&str]) {
    let uid = Command::new("id").arg("-u").output().map(|o| o.stdout);
    assert_eq!(
        uid.as_deref()
            .map(|u| String::from_utf8_lossy(u).trim().to_owned())
            .ok()
            .as_deref(),
        Some("0"),
        "this test creates network namespaces and iptables rules: run it as root (scripts/test does)"
    );
    for t in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "this test needs `{t}`: scripts/test installs it with apt-get"
        );
    }
}

/// Runs a command, panicking with its stderr if it fails.
pub fn run(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", args[0]));
    assert!(
        out.status.success(),
        "`{}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A bridge in the root namespace and the pods attached to it.
#[derive(Debug)]
pub struct Lab {
    tag: String,
    bridge: String,
    net: [u8; 3],
    pods: Vec<String>,
    children: Vec<Child>,
}

/// One pod: a network namespace with one address on the lab's bridge.
#[derive(Debug, Clone)]
pub struct Pod {
    /// Namespace name (`ip netns`).
    pub ns: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Its interface inside the namespace.
    pub dev: String,
}

impl Lab {
    /// A new bridge on its own /24 (picked from this process id).
    pub fn new() -> Self {
        let pid = std::process::id();
        let tag = format!("{}", pid % 100_000);
        let bridge = format!("awbr{tag}");
        let net = [10, 211, (pid % 250) as u8];
        run(&["ip", "link", "add", &bridge, "type", "bridge"]);
        let lab = Lab {
            tag,
            bridge,
            net,
            pods: Vec::new(),
            children: Vec::new(),
        };
        let gw = format!("{}/24", lab.gateway());
        run(&["ip", "addr", "add", &gw, "dev", &lab.bridge]);
        run(&["ip", "link", "set", &lab.bridge, "up"]);
        lab
    }

    /// The root namespace's address on the bridge.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.net[0], self.net[1], self.net[2], 1)
    }

    /// Adds a pod with address `.host` on the bridge.
    pub fn pod(&mut self, name: &str, host: u8) -> Pod {
        let ns = format!("aw-{}-{name}", self.tag);
        let outer = format!("aw{}{name}", self.tag);
        let ip = Ipv4Addr::new(self.net[0], self.net[1], self.net[2], host);
        run(&["ip", "netns", "add", &ns]);
        self.pods.push(ns.clone());
        run(&[
            "ip", "link", "add", &outer, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        run(&["ip", "link", "set", &outer, "master", &self.bridge, "up"]);
        let cidr = format!("{ip}/24");
        let gw = self.gateway().to_string();
        for cmd in [
            vec!["ip", "addr", "add", &cidr, "dev", "eth0"],
            vec!["ip", "link", "set", "eth0", "up"],
            vec!["ip", "link", "set", "lo", "up"],
            vec!["ip", "route", "add", "default", "via", &gw],
        ] {
            run(&[&["ip", "netns", "exec", &ns][..], &cmd[..]].concat());
        }
        Pod {
            ns,
            ip,
            dev: "eth0".into(),
        }
    }

    /// Starts a process inside `pod` (optionally as `uid`), output appended to `log`; it is
    /// killed when the lab drops. Returns its pid (for [`Lab::kill`]).
    pub fn spawn(&mut self, pod: &Pod, uid: Option<u32>, args: &[&str], log: &Path) -> u32 {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &pod.ns]);
        if let Some(uid) = uid {
            let id = uid.to_string();
            cmd.args([
                "setpriv",
                "--reuid",
                &id,
                "--regid",
                &id,
                "--clear-groups",
                "--",
            ]);
        }
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open the log file");
        let err = out.try_clone().expect("clone the log file");
        let child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {args:?} in {}: {e}", pod.ns));
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Kills a process started with [`Lab::spawn`] (SIGKILL: no goodbye) and waits for it.
    pub fn kill(&mut self, pid: u32) {
        if let Some(i) = self.children.iter().position(|c| c.id() == pid) {
            let mut c = self.children.remove(i);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the processes started with [`Lab::spawn`] (politely, so captures flush).
    pub fn stop_all(&mut self) {
        for c in &mut self.children {
            let _ = Command::new("kill")
                .args(["-INT", &c.id().to_string()])
                .status();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        for c in &mut self.children {
            while std::time::Instant::now() < deadline {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
    }
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_all();
        for ns in &self.pods {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}

impl Pod {
    /// Runs `args` inside the pod and returns its output (panics if it fails).
    pub fn exec(&self, args: &[&str]) -> Output {
        run(&[&["ip", "netns", "exec", &self.ns][..], args].concat())
    }

    /// Runs `f` on a new thread that has entered the pod's network namespace: every socket
    /// it opens (for example through a current-thread tokio runtime it builds) is the pod's.
    pub fn thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.ns);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {path}: {e}"));
            f()
        })
    }

    /// Runs `fut` inside the pod on a new thread (in its namespace, with a current-thread
    /// tokio runtime); join the handle for its output.
    pub fn spawn<F>(&self, fut: F) -> std::thread::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.thread(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(fut)
        })
    }

    /// Runs `fut` to completion inside the pod and returns its output.
    pub fn block_on<F>(&self, fut: F) -> F::Output
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.spawn(fut).join().expect("the pod's thread panicked")
    }
}
