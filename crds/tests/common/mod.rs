//! Helpers shared by the integration tests (included with `mod common;`).
#![allow(dead_code)]

use serde_json::{json, Value};

/// The openAPIV3Schema of the CRD for `kind`.
pub fn schema_of(kind: &str) -> Value {
    let crds = cvm_crds::crds().expect("crds");
    let crd = crds
        .iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no CRD for {kind}"));
    cvm_crds::schema::openapi_schema(crd).expect("schema")
}

/// Runs the CRD's CEL rules on `obj` (and `old` for transition rules), as the API server
/// would after schema validation. Returns the failure messages with their field paths.
pub fn cel_errors(kind: &str, obj: &Value, old: Option<&Value>) -> Vec<String> {
    let schema = schema_of(kind);
    match kube::core::cel::Validator::new().validate(&schema, obj, old) {
        Ok(()) => vec![],
        Err(errs) => errs
            .into_vec()
            .into_iter()
            .map(|e| format!("{}: {} [{:?}]", e.field_path, e.message, e.kind))
            .collect(),
    }
}

/// A valid SEV-SNP ConfidentialVM, as JSON, to mutate in tests.
pub fn snp_cvm() -> Value {
    json!({
        "apiVersion": "cvmp.io/v1alpha1",
        "kind": "ConfidentialVM",
        "metadata": {"name": "t", "namespace": "default"},
        "spec": {
            "tee": {
                "type": "SEV-SNP",
                "policy": {"debug": false, "migratable": false, "smt": true},
                "minimumTcb": {"bootloader": 3, "snp": 8},
                "hostData": "a".repeat(64)
            },
            "resources": {"vcpus": 2, "memoryMiB": 2048},
            "cpuModel": "EPYC-v4",
            "boot": {
                "firmware": {"name": "ovmf-snp"},
                "kernel": {"url": "https://example.com/k", "sha256": "b".repeat(64)},
                "cmdline": "console=ttyS0"
            },
            "disks": [{"name": "root", "persistentVolumeClaim": "root"}],
            "attestation": {
                "policyRef": "demo",
                "expectedMeasurements": ["c".repeat(96)],
                "nonce": "00ff",
                "reattestEvery": "1h"
            }
        }
    })
}

/// Sets `value` at the JSON pointer `ptr`, creating objects on the way.
pub fn set(obj: &mut Value, ptr: &str, value: Value) {
    let mut cur = obj;
    let parts: Vec<&str> = ptr.trim_start_matches('/').split('/').collect();
    for (i, p) in parts.iter().enumerate() {
        let last = i == parts.len() - 1;
        cur = match cur {
            Value::Object(m) => {
                if last {
                    m.insert((*p).to_string(), value);
                    return;
                }
                m.entry((*p).to_string()).or_insert_with(|| json!({}))
            }
            Value::Array(a) => {
                let idx: usize = p.parse().expect("array index");
                if last {
                    a[idx] = value;
                    return;
                }
                &mut a[idx]
            }
            _ => panic!("cannot descend into {p}"),
        };
    }
}

/// Removes the key at the JSON pointer `ptr`.
pub fn unset(obj: &mut Value, ptr: &str) {
    let (parent, key) = ptr.rsplit_once('/').expect("pointer");
    if let Some(Value::Object(m)) = obj.pointer_mut(parent) {
        m.remove(key);
    }
}
