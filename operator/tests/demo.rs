//! `apiward demo`, the README's main job, as a user runs it: the binary, from the
//! repository root, and — when the tests run as root, as CI does — as an unprivileged user
//! (`nobody`, through `setpriv`), since it must need no root.

use std::path::Path;
use std::process::Command;

#[test]
fn the_demo_blocks_or_detects_every_attack_without_root() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let as_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let out = if as_root {
        // The checkout may not be readable by nobody: give it its own copy of the binary
        // and the policies, in a directory it can read.
        let dir = std::env::temp_dir().join(format!("apiward-demo-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("policies")).unwrap();
        let bin = dir.join("apiward");
        std::fs::copy(env!("CARGO_BIN_EXE_apiward"), &bin).unwrap();
        for f in std::fs::read_dir(root.join("examples/shop")).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, dir.join("policies").join(f.file_name().unwrap())).unwrap();
        }
        let open = |p: &Path, mode| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        open(&dir, 0o755);
        open(&dir.join("policies"), 0o755);
        open(&bin, 0o755);
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(&bin)
            .args(["demo", "--requests", "200", "--policies"])
            .arg(dir.join("policies"))
            .current_dir(&dir)
            .env("TMPDIR", "/tmp")
            .output()
            .expect("setpriv (util-linux) runs the demo as nobody; scripts/test installs it");
        let _ = std::fs::remove_dir_all(&dir);
        out
    } else {
        Command::new(env!("CARGO_BIN_EXE_apiward"))
            .args(["demo", "--requests", "200"])
            .current_dir(&root)
            .output()
            .unwrap()
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("Normal traffic: 5 of 5 requests served"),
        "{stdout}"
    );
    let summary = stdout
        .lines()
        .find(|l| l.contains(" attacks: "))
        .unwrap_or_else(|| panic!("no summary line:\n{stdout}"));
    assert!(summary.contains(", 0 missed"), "{summary}");
    for owasp in ["API1", "API2", "API3", "API4", "API5", "API8", "API9"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(owasp) && (l.contains("BLOCKED") || l.contains("DETECTED"))),
            "{owasp} is not shown blocked or detected:\n{stdout}"
        );
    }
    assert!(!stdout.contains("MISSED"), "{stdout}");
    assert!(
        stdout.contains("Ready=True"),
        "the policies' status is shown:\n{stdout}"
    );
    // The inventory the sidecars reported: a zombie, a shadow endpoint (catalog is in
    // Audit, so its undeclared endpoint was served), declared endpoints never called.
    let inventory = stdout.split("Inventory").nth(1).unwrap_or_default();
    for (path, flag) in [
        ("/v1/orders/{orderId}", "zombie"),
        ("/internal/metrics", "shadow"),
        ("/charges/{chargeId}", "unused"),
    ] {
        assert!(
            inventory
                .lines()
                .any(|l| l.contains(path) && l.contains(flag)),
            "{path} is not flagged {flag}:\n{inventory}"
        );
    }
}
