//! The demo flow shared by `cvm-dev up` and the e2e suite: apply `examples/` as their
//! headers say (the demo policy names the chart's published demo root, which the
//! simulated hosts are seeded from), wait for the examples to verify.

use crate::system::{sim_root_fingerprints, System};
use serde::Deserialize as _;
use std::path::{Path, PathBuf};

/// The repository's `examples/` folder.
pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// The chart's published simulator demo root (its private keys are public on purpose:
/// evidence under it proves nothing).
pub fn demo_root_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/cvm-operator/files/sim-demo-root")
}

/// A cluster `kubectl` can talk to: the process harness or a kind cluster.
pub trait KubectlCmd {
    /// `kubectl` with the cluster's kubeconfig set.
    fn kubectl_cmd(&self) -> std::process::Command;
}

impl KubectlCmd for System {
    fn kubectl_cmd(&self) -> std::process::Command {
        self.cp.kubectl_cmd()
    }
}

/// Runs `kubectl ARGS` against the cluster; stdout on success, stderr in the error.
pub fn kubectl(sys: &impl KubectlCmd, args: &[&str]) -> Result<String, String> {
    let out = sys
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

/// The examples applied and the ones skipped because no node of the fleet hosts their TEE.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Names of the example CVMs applied (namespace `default`).
    pub names: Vec<String>,
    /// `(file, TEE)` of the examples no node can host.
    pub skipped: Vec<(String, String)>,
}

/// The simulator fingerprints (hex) that `examples/attestation-policy.yaml`'s
/// `demo-simulator` policy trusts.
pub fn example_policy_fingerprints() -> Result<Vec<String>, String> {
    let path = examples_dir().join("attestation-policy.yaml");
    let text =
        std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = serde_yaml::Value::deserialize(doc)
            .map_err(|e| format!("{} is not YAML: {e}", path.display()))?;
        if v.get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            != Some("demo-simulator")
        {
            continue;
        }
        let roots = v
            .get("spec")
            .and_then(|s| s.get("trustedRoots"))
            .and_then(|r| r.as_sequence())
            .cloned()
            .unwrap_or_default();
        out.extend(roots.iter().filter_map(|r| {
            r.get("sha256Fingerprint")
                .and_then(|f| f.as_str())
                .map(str::to_string)
        }));
    }
    Ok(out)
}

/// The TEE a manifest's ConfidentialVM asks for (`None`: not a ConfidentialVM).
fn example_tee(text: &str) -> Option<String> {
    let v: serde_yaml::Value = serde_yaml::from_str(text).ok()?;
    if v.get("kind")?.as_str()? != "ConfidentialVM" {
        return None;
    }
    Some(
        v.get("spec")?
            .get("tee")?
            .get("type")?
            .as_str()?
            .to_string(),
    )
}

/// Whether some node advertises `tee` (its NFD label, which node plugins publish for
/// every TEE the host can launch, implied ones included).
fn fleet_hosts(sys: &impl KubectlCmd, tee: &str) -> Result<bool, String> {
    let label = match tee {
        "SEV" => "feature.node.kubernetes.io/cpu-security.sev.enabled",
        "SEV-ES" => "feature.node.kubernetes.io/cpu-security.sev.es.enabled",
        "SEV-SNP" => "feature.node.kubernetes.io/cpu-security.sev.snp.enabled",
        "TDX" => "feature.node.kubernetes.io/cpu-security.tdx.enabled",
        _ => return Ok(false),
    };
    let names = kubectl(
        sys,
        &["get", "nodes", "-l", &format!("{label}=true"), "-o", "name"],
    )?;
    Ok(!names.trim().is_empty())
}

/// Whether the system's simulated hosts use the demo root the example policy names.
pub fn check_demo_root(sys: &System) -> Result<(), String> {
    let theirs = sim_root_fingerprints(sys).map_err(|e| e.to_string())?;
    let named = example_policy_fingerprints()?;
    if let Some((_, fp)) = theirs.iter().find(|(_, fp)| !named.contains(fp)) {
        return Err(format!(
            "this system's simulator root {fp} is not the demo root that examples/attestation-policy.yaml names; start it with the demo root (SystemOptions::demo_root)"
        ));
    }
    Ok(())
}

/// Applies the `examples/` this fleet can host, as they are: the `demo-simulator` policy
/// names the demo root, which the cluster's simulated hosts must be seeded from.
pub fn apply_examples(sys: &impl KubectlCmd) -> Result<Applied, String> {
    let dir = examples_dir();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .map_err(|e| format!("reading {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    let mut applied = Applied::default();
    for f in files {
        let text =
            std::fs::read_to_string(&f).map_err(|e| format!("reading {}: {e}", f.display()))?;
        if let Some(tee) = example_tee(&text) {
            if !fleet_hosts(sys, &tee)? {
                let file = f.file_name().map(|n| n.to_string_lossy().into_owned());
                applied.skipped.push((file.unwrap_or_default(), tee));
                continue;
            }
        }
        kubectl(sys, &["apply", "-f", &f.display().to_string()])?;
    }
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
    applied.names = names.split_whitespace().map(String::from).collect();
    Ok(applied)
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
pub fn wait_verified(
    sys: &impl KubectlCmd,
    names: &[String],
    timeout_secs: u64,
) -> Result<(), String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The demo policy names exactly the published demo root, and no other policy in
    /// `examples/` names a simulator root.
    #[test]
    fn the_example_policy_names_the_published_demo_root() {
        let fps = cvm_node_plugin::sim::roots::cluster_fingerprints(&demo_root_dir())
            .expect("the demo root loads");
        let mut want: Vec<String> = [fps.snp, fps.tdx]
            .into_iter()
            .flatten()
            .map(|f| f.trim_start_matches("sha256:").to_string())
            .collect();
        want.sort();
        let mut named = example_policy_fingerprints().expect("the example policy reads");
        named.sort();
        assert_eq!(named, want, "regenerate with `cvm-node-plugin sim-roots`");
        let text = std::fs::read_to_string(examples_dir().join("attestation-policy.yaml"))
            .expect("policy file");
        assert_eq!(
            text.matches("sha256Fingerprint").count(),
            want.len(),
            "only demo-simulator names a simulator root"
        );
    }
}
