//! Helpers shared by the test files that drive the Python test tools (`charts/tests/`).

use std::path::{Path, PathBuf};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The Python that has the test tools' packages (helm-python-sdk, lupa): the venv
/// `./scripts/test` makes, `APIWARD_HELM_PYTHON`, or else `python3`.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("APIWARD_HELM_PYTHON") {
        return p.into();
    }
    let venv = repo().join("target/helm-venv/bin/python");
    if venv.exists() {
        venv
    } else {
        "python3".into()
    }
}
