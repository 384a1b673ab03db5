//! Locates the control-plane binaries built from the pinned Go modules in `e2e/tools`.

use crate::error::{HarnessError, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The Kubernetes release the harness runs (kept in step with `e2e/tools/kube/go.mod`).
pub const KUBERNETES_VERSION: &str = "v1.34.4";

/// The directory holding `kube-apiserver`, `kube-controller-manager`, `kubectl`, `etcd` and
/// `helm`. `CVM_TOOLS_BIN` overrides; otherwise `e2e/tools/build.sh` builds them into the
/// cache (once; later calls return at once).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CVM_TOOLS_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|source| HarnessError::BuildScript {
            script: script.clone(),
            source,
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    match out.status.code() {
        Some(0) => stdout
            .lines()
            .last()
            .map(|l| PathBuf::from(l.trim()))
            .ok_or_else(|| HarnessError::BuildFailed {
                log: "build.sh printed no bin directory".into(),
            }),
        Some(3) => Err(HarnessError::GoMissing),
        _ => Err(HarnessError::BuildFailed {
            log: find_log_hint(&stdout).unwrap_or_else(|| "the output above".into()),
        }),
    }
}

fn find_log_hint(stdout: &str) -> Option<String> {
    stdout
        .lines()
        .find_map(|l| l.split("log: ").nth(1))
        .map(|s| s.trim_end_matches(')').to_string())
}

/// The repository's Helm chart.
pub fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/cvm-operator")
}

/// `helm --kubeconfig KUBECONFIG` with its cache, config and data in temp directories of
/// the harness's own (never the user's); the caller adds the arguments.
pub fn helm_cmd(helm: &Path, kubeconfig: &Path) -> Command {
    let tmp = std::env::temp_dir();
    let mut c = Command::new(helm);
    c.arg("--kubeconfig")
        .arg(kubeconfig)
        .env("HELM_CACHE_HOME", tmp.join("cvm-helm-cache"))
        .env("HELM_CONFIG_HOME", tmp.join("cvm-helm-config"))
        .env("HELM_DATA_HOME", tmp.join("cvm-helm-data"))
        .stdin(Stdio::null());
    c
}

/// Path of one tool inside [`bin_dir`].
pub fn tool(bin: &Path, name: &str) -> PathBuf {
    bin.join(name)
}
