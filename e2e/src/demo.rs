//! The demo flow shared by `cvm-dev up` and the e2e suite: apply `examples/`, let the
//! demo policy trust this cluster's simulator roots, wait for the examples to verify.

use crate::system::{sim_root_fingerprints, System};
use std::path::{Path, PathBuf};

/// The repository's `examples/` folder.
pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Runs `kubectl ARGS` against the system; stdout on success, stderr in the error.
pub fn kubectl(sys: &System, args: &[&str]) -> Result<String, String> {
    let out = sys
        .cp
        .kubectl_cmd()
        .args(args)
        .output()
        .map_err(|e| format!("running kubectl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `trustedRoots` for a demo policy: the vendors' roots plus this cluster's simulator
/// roots (named explicitly, as a policy must to trust simulated evidence).
pub fn demo_trusted_roots(sys: &System) -> Result<serde_json::Value, String> {
    let fps = sim_root_fingerprints(sys).map_err(|e| e.to_string())?;
    let mut roots = vec![
        serde_json::json!({"name": "amd"}),
        serde_json::json!({"name": "intel"}),
    ];
    for (name, fp) in fps {
        roots.push(serde_json::json!({
            "name": name, "sha256Fingerprint": fp,
            "description": "cvm-dev simulator root (demo only)",
        }));
    }
    Ok(serde_json::Value::Array(roots))
}

/// Applies `examples/` and points the `demo-simulator` policy at the simulator roots.
/// Returns the names of the example CVMs.
pub fn apply_examples(sys: &System) -> Result<Vec<String>, String> {
    let roots = demo_trusted_roots(sys)?;
    kubectl(sys, &["apply", "-f", &examples_dir().display().to_string()])?;
    let patch = serde_json::json!({"spec": {"trustedRoots": roots}}).to_string();
    kubectl(
        sys,
        &[
            "patch",
            "attestationpolicy",
            "demo-simulator",
            "--type=merge",
            "-p",
            &patch,
        ],
    )?;
    let names = kubectl(
        sys,
        &[
            "get",
            "cvm",
            "-n",
            "default",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ],
    )?;
    Ok(names.split_whitespace().map(String::from).collect())
}

/// `kubectl wait --for=condition=Verified` on each CVM (namespace `default`).
pub fn wait_verified(sys: &System, names: &[String], timeout_secs: u64) -> Result<(), String> {
    for name in names {
        kubectl(
            sys,
            &[
                "wait",
                "-n",
                "default",
                "--for=condition=Verified",
                &format!("cvm/{name}"),
                &format!("--timeout={timeout_secs}s"),
            ],
        )?;
    }
    Ok(())
}
