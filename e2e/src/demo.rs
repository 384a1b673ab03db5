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

/// What the demo waits for on one CVM: `Verified=True` for SEV-SNP and TDX, whose
/// evidence the operator can check; for SEV and SEV-ES, `Verified=False` with reason
/// `OwnerVerificationRequired`, since only the guest owner can check their evidence.
pub fn expected_verdict(tee: &str) -> (&'static str, &'static str) {
    match tee {
        "SEV" | "SEV-ES" => ("False", "OwnerVerificationRequired"),
        _ => ("True", "Affirming"),
    }
}

/// Waits until each CVM (namespace `default`) shows its TEE's [`expected_verdict`].
pub fn wait_verified(sys: &System, names: &[String], timeout_secs: u64) -> Result<(), String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(timeout_secs);
    for name in names {
        let cvm = format!("cvm/{name}");
        let get = |jsonpath: &str| kubectl(sys, &["get", "-n", "default", &cvm, "-o", jsonpath]);
        let tee = get("jsonpath={.spec.tee.type}")?;
        let (want_status, want_reason) = expected_verdict(tee.trim());
        let mut delay = std::time::Duration::from_millis(100);
        loop {
            let got = get(
                r#"jsonpath={.status.conditions[?(@.type=="Verified")].status} {.status.conditions[?(@.type=="Verified")].reason}"#,
            )?;
            let mut parts = got.split_whitespace();
            let (status, reason) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            if status == want_status && (want_status == "True" || reason == want_reason) {
                break;
            }
            if std::time::Instant::now() >= deadline {
                return Err(format!(
                    "cvm/{name} ({}) shows Verified={status} ({reason}) after {timeout_secs} s; expected Verified={want_status} ({want_reason})",
                    tee.trim()
                ));
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(std::time::Duration::from_secs(1));
        }
    }
    Ok(())
}
