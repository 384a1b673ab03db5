//! Shared helpers for the system tests (included with `mod common_cvm;`).
#![allow(dead_code)]

use cvm_crds::ConfidentialVM;
use cvm_e2e::system::System;
use kube::api::{Api, PostParams};
use kube::Client;
use serde_json::{json, Value};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

pub const POLICY: &str = "e2e-sim";
pub const WAIT: Duration = Duration::from_secs(90);

pub fn system() -> Arc<System> {
    let sys = cvm_e2e::shared::shared_system(std::path::Path::new(env!("CARGO_BIN_EXE_cvm-dev")));
    static POLICY_READY: OnceLock<()> = OnceLock::new();
    POLICY_READY.get_or_init(|| {
        let roots = cvm_e2e::demo::demo_trusted_roots(&sys).expect("simulator roots");
        let policy = json!({
            "apiVersion": "cvmp.io/v1alpha1", "kind": "AttestationPolicy",
            "metadata": {"name": POLICY},
            "spec": {"trustedRoots": roots, "allowedGuestPolicy": {"migratable": true}},
        });
        apply_json(&sys, &policy).expect("e2e policy applies");
    });
    sys
}

/// Applies AttestationPolicy `name`, trusting this system's simulator roots (as a demo
/// or test policy must, to accept simulated evidence).
pub fn trust_simulator(sys: &System, name: &str) {
    let roots = cvm_e2e::demo::demo_trusted_roots(sys).expect("simulator roots");
    apply_json(
        sys,
        &json!({"apiVersion": "cvmp.io/v1alpha1", "kind": "AttestationPolicy",
                "metadata": {"name": name}, "spec": {"trustedRoots": roots}}),
    )
    .expect("the policy applies");
}

/// `kubectl apply -f -` of one JSON object.
pub fn apply_json(sys: &System, v: &Value) -> Result<String, String> {
    use std::io::Write;
    let mut child = sys
        .cp
        .kubectl_cmd()
        .args(["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(v.to_string().as_bytes())
            .map_err(|e| e.to_string())?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `helm install RELEASE` of the chart into `ns` on the shared system, which installed the
/// CRDs itself; `sets` are more `--set` values. Panics with helm's words when it fails.
pub fn install_chart(sys: &System, release: &str, ns: &str, sets: &[&str]) {
    let mut cmd = cvm_e2e::tools::helm_cmd(&sys.cp.helm(), sys.cp.kubeconfig());
    cmd.args(["install", release])
        .arg(cvm_e2e::tools::chart_dir())
        .args([
            "-n",
            ns,
            "--create-namespace",
            "--set",
            "crds.install=false",
        ]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().expect("helm runs");
    assert!(
        out.status.success(),
        "helm install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn kubectl(sys: &System, args: &[&str]) -> Result<String, String> {
    cvm_e2e::demo::kubectl(sys, args)
}

pub async fn namespace(client: &Client, name: &str) {
    let ns: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let obj = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    match ns.create(&PostParams::default(), &obj).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("creating namespace {name}: {e}"),
    }
}

/// A CVM manifest whose expected measurement is what the simulator will report.
pub fn cvm(name: &str, ns: &str, tee: &str) -> Value {
    let mut v = json!({
        "apiVersion": "cvmp.io/v1alpha1", "kind": "ConfidentialVM",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "tee": {"type": tee},
            "resources": {"vcpus": 1, "memoryMiB": 512},
            "boot": {"firmware": {"name": if tee == "TDX" { "tdvf" } else { "ovmf-snp" }}},
            "attestation": {"policyRef": POLICY},
        }
    });
    set_expected_to_simulated(&mut v);
    v
}

pub fn set_expected_to_simulated(v: &mut Value) {
    let parsed: ConfidentialVM = serde_json::from_value(v.clone()).expect("valid CVM manifest");
    let m = cvm_node_plugin::simulated_measurement(&parsed.spec);
    v["spec"]["attestation"]["expectedMeasurements"] = json!([m]);
}

pub fn condition<'a>(
    c: &'a ConfidentialVM,
    t: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    c.status.as_ref()?.conditions.iter().find(|x| x.type_ == t)
}

pub fn cond_is(c: &ConfidentialVM, t: &str, status: &str) -> bool {
    condition(c, t).is_some_and(|x| x.status == status)
}

pub async fn api(sys: &System, ns: &str) -> (Client, Api<ConfidentialVM>) {
    let client = sys.cp.client().await.expect("client");
    namespace(&client, ns).await;
    (client.clone(), Api::namespaced(client, ns))
}

/// UIDs of the guests a node's simulated plugin holds (its `guests.json`).
pub fn guests_on(sys: &System, node: &str) -> Vec<String> {
    let path = sys.dir().join("plugins").join(node).join("guests.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Vec::new();
    };
    let v: Value = serde_json::from_str(&text).expect("guests.json is JSON");
    v["guests"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

/// Waits until `node`'s simulated plugin holds (or no longer holds) `uid`.
pub async fn wait_guest(sys: &System, node: &str, uid: &str, held: bool) {
    let deadline = Instant::now() + WAIT;
    while guests_on(sys, node).iter().any(|g| g == uid) != held {
        assert!(
            Instant::now() < deadline,
            "node {node} should {}hold guest {uid}; it holds {:?}",
            if held { "" } else { "no longer " },
            guests_on(sys, node)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
