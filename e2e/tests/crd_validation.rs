//! The cvmp.io CRDs on a real API server (kube-apiserver v1.34, the CRDs from
//! `crds/generated/`): malformed manifests are refused with HTTP 422 and the server's own
//! message naming the field; `spec.tee` and `spec.resources` cannot change; every example
//! is accepted as written; `kubectl explain` and `kubectl get cvm` show what the CRD says.
//!
//! The offline twin is `crds/tests/cel.rs` (kube-cel); this file is the server's word.

use anyhow::{bail, Context, Result};
use cvm_e2e::shared::{shared, ClusterInfo};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind, Status};
use kube::Client;
use serde_json::{json, Value};
use std::path::PathBuf;

// ---------------------------------------------------------------------------------------
// Helpers

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Cvm,
    Policy,
    Migration,
}

impl Kind {
    fn resource(self) -> ApiResource {
        let (kind, plural) = match self {
            Kind::Cvm => ("ConfidentialVM", "confidentialvms"),
            Kind::Policy => ("AttestationPolicy", "attestationpolicies"),
            Kind::Migration => ("ConfidentialVMMigration", "confidentialvmmigrations"),
        };
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("cvmp.io", "v1alpha1", kind),
            plural,
        )
    }

    fn of(kind: &str) -> Option<Kind> {
        match kind {
            "ConfidentialVM" => Some(Kind::Cvm),
            "AttestationPolicy" => Some(Kind::Policy),
            "ConfidentialVMMigration" => Some(Kind::Migration),
            _ => None,
        }
    }

    /// The API for this kind: namespaced kinds in `ns`, AttestationPolicy cluster-wide.
    fn api(self, client: &Client, ns: &str) -> Api<DynamicObject> {
        match self {
            Kind::Policy => Api::all_with(client.clone(), &self.resource()),
            _ => Api::namespaced_with(client.clone(), ns, &self.resource()),
        }
    }
}

async fn namespace(client: &Client, name: &str) -> Result<()> {
    let ns: Api<Namespace> = Api::all(client.clone());
    let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
    match ns.create(&PostParams::default(), &obj).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// A client for the shared cluster and a fresh namespace for one test.
async fn setup(ns: &str) -> Result<(ClusterInfo, Client)> {
    let c = shared();
    let client = c.client().await?;
    namespace(&client, ns).await?;
    Ok((c, client))
}

fn dynamic(v: Value) -> Result<DynamicObject> {
    Ok(serde_json::from_value(v)?)
}

/// The server's refusal; fails the test when the call succeeded or failed otherwise.
fn refusal(r: Result<DynamicObject, kube::Error>) -> Result<Status> {
    match r {
        Err(kube::Error::Api(s)) => Ok(*s),
        Err(e) => bail!("expected the API server to refuse it, got a client error: {e}"),
        Ok(o) => bail!(
            "the API server accepted {:?}, which it must refuse",
            o.metadata.name
        ),
    }
}

/// Field paths of the causes the server lists under `details`.
fn cause_fields(s: &Status) -> Vec<String> {
    s.details
        .as_ref()
        .map(|d| d.causes.iter().map(|c| c.field.clone()).collect())
        .unwrap_or_default()
}

/// Sets `value` at the JSON pointer `ptr`, creating objects on the way.
fn set(obj: &mut Value, ptr: &str, value: Value) {
    let (parent, key) = ptr.rsplit_once('/').expect("a JSON pointer");
    let mut cur = obj;
    for part in parent.split('/').filter(|p| !p.is_empty()) {
        cur = match cur {
            Value::Array(a) => &mut a[part.parse::<usize>().expect("array index")],
            other => {
                if !other.is_object() {
                    *other = json!({});
                }
                other
                    .as_object_mut()
                    .expect("an object")
                    .entry(part)
                    .or_insert_with(|| json!({}))
            }
        };
    }
    match cur {
        Value::Array(a) => a[key.parse::<usize>().expect("array index")] = value,
        Value::Object(m) => {
            m.insert(key.to_string(), value);
        }
        other => panic!("cannot set {ptr} inside {other}"),
    }
}

/// Removes the member at `ptr` (nothing when absent).
fn unset(obj: &mut Value, ptr: &str) {
    let (parent, key) = ptr.rsplit_once('/').expect("a JSON pointer");
    if let Some(Value::Object(m)) = obj.pointer_mut(parent) {
        m.remove(key);
    }
}

fn with(mut obj: Value, f: impl FnOnce(&mut Value)) -> Value {
    f(&mut obj);
    obj
}

/// A valid SEV-SNP ConfidentialVM using most of the spec.
fn snp_cvm() -> Value {
    json!({
        "apiVersion": "cvmp.io/v1alpha1",
        "kind": "ConfidentialVM",
        "metadata": {"name": "placeholder"},
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

/// A valid TDX ConfidentialVM.
fn tdx_cvm() -> Value {
    json!({
        "apiVersion": "cvmp.io/v1alpha1",
        "kind": "ConfidentialVM",
        "metadata": {"name": "placeholder"},
        "spec": {
            "tee": {
                "type": "TDX",
                "policy": {"debug": false, "migratable": false},
                "minimumTcb": {"tdxTcbStatuses": ["UpToDate"]},
                "hostData": "d".repeat(96)
            },
            "resources": {"vcpus": 4, "memoryMiB": 4096},
            "boot": {"firmware": {"name": "tdvf"}},
            "attestation": {"expectedMeasurements": ["e".repeat(96)]}
        }
    })
}

/// A valid SEV-ES ConfidentialVM (no host data, no TCB, 64-character measurements).
fn sev_es_cvm() -> Value {
    json!({
        "apiVersion": "cvmp.io/v1alpha1",
        "kind": "ConfidentialVM",
        "metadata": {"name": "placeholder"},
        "spec": {
            "tee": {"type": "SEV-ES", "policy": {"debug": false, "migratable": false}},
            "resources": {"vcpus": 1, "memoryMiB": 1024},
            "cpuModel": "EPYC-Milan",
            "boot": {"firmware": {"name": "ovmf-sev"}},
            "attestation": {"expectedMeasurements": ["f".repeat(64)]}
        }
    })
}

/// The smallest valid SEV-SNP ConfidentialVM: changing only its TEE type to SEV-ES breaks
/// no rule other than immutability.
fn minimal_snp_cvm(name: &str) -> Value {
    json!({
        "apiVersion": "cvmp.io/v1alpha1",
        "kind": "ConfidentialVM",
        "metadata": {"name": name},
        "spec": {
            "tee": {"type": "SEV-SNP"},
            "resources": {"vcpus": 2, "memoryMiB": 2048},
            "boot": {"firmware": {"name": "ovmf-snp"}}
        }
    })
}

fn policy(spec: Value) -> Value {
    json!({
        "apiVersion": "cvmp.io/v1alpha1",
        "kind": "AttestationPolicy",
        "metadata": {"name": "placeholder"},
        "spec": spec
    })
}

fn migration(spec: Value) -> Value {
    json!({
        "apiVersion": "cvmp.io/v1alpha1",
        "kind": "ConfidentialVMMigration",
        "metadata": {"name": "placeholder"},
        "spec": spec
    })
}

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Every document of every YAML file in `examples/`, with its file name.
fn examples() -> Result<Vec<(String, Value)>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(examples_dir())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for f in files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let text = std::fs::read_to_string(&f)?;
        for de in serde_yaml::Deserializer::from_str(&text) {
            let v: Value =
                serde::Deserialize::deserialize(de).with_context(|| format!("{name}: not YAML"))?;
            if !v.is_null() {
                docs.push((name.clone(), v));
            }
        }
    }
    Ok(docs)
}

/// Every leaf of `want` is present with the same value in `got` (the server may add
/// defaults, but must not have pruned or changed anything the manifest says).
fn missing_leaves(path: &str, want: &Value, got: &Value, out: &mut Vec<String>) {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            for (k, v) in w {
                let p = format!("{path}.{k}");
                match g.get(k) {
                    Some(gv) => missing_leaves(&p, v, gv, out),
                    None => out.push(format!("{p}: pruned")),
                }
            }
        }
        (Value::Array(w), Value::Array(g)) if w.len() == g.len() => {
            for (i, (wv, gv)) in w.iter().zip(g).enumerate() {
                missing_leaves(&format!("{path}[{i}]"), wv, gv, out);
            }
        }
        (w, g) if w == g => {}
        (w, g) => out.push(format!("{path}: sent {w}, stored {g}")),
    }
}

fn kubectl(c: &ClusterInfo, args: &[&str]) -> Result<String> {
    let out = c.kubectl().args(args).output()?;
    if !out.status.success() {
        bail!(
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// A `kubectl get` table as rows of cells, cut at the header's column starts (cells may
/// be empty, so splitting on whitespace would shift them).
fn table(text: &str) -> Vec<Vec<String>> {
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    let mut starts = Vec::new();
    let mut prev = ' ';
    for (i, ch) in header.char_indices() {
        if ch != ' ' && prev == ' ' {
            starts.push(i);
        }
        prev = ch;
    }
    let cut = |line: &str| -> Vec<String> {
        starts
            .iter()
            .enumerate()
            .map(|(n, &s)| {
                let end = starts.get(n + 1).copied().unwrap_or(line.len());
                line.get(s.min(line.len())..end.min(line.len()))
                    .unwrap_or_default()
                    .trim()
                    .to_string()
            })
            .collect()
    };
    std::iter::once(header).chain(lines).map(cut).collect()
}

// ---------------------------------------------------------------------------------------
// Malformed manifests

/// One malformed manifest: what is wrong, the field the server must name (as the path
/// in its message and as a cause's field), and text its message must contain.
struct Case {
    name: &'static str,
    kind: Kind,
    manifest: Value,
    field: &'static str,
    want: &'static str,
}

fn case(
    name: &'static str,
    kind: Kind,
    manifest: Value,
    field: &'static str,
    want: &'static str,
) -> Case {
    Case {
        name,
        kind,
        manifest,
        field,
        want,
    }
}

fn malformed_cvms() -> Vec<Case> {
    use Kind::Cvm;
    let hex96 = "a".repeat(96);
    vec![
        // Schema types and enums.
        case(
            "unknown TEE type",
            Cvm,
            with(snp_cvm(), |o| set(o, "/spec/tee/type", json!("SEV-TNP"))),
            "spec.tee.type",
            r#"Unsupported value: "SEV-TNP": supported values: "SEV", "SEV-ES", "SEV-SNP", "TDX""#,
        ),
        case(
            "vCPUs as a string",
            Cvm,
            with(snp_cvm(), |o| set(o, "/spec/resources/vcpus", json!("two"))),
            "spec.resources.vcpus",
            "must be of type integer",
        ),
        case(
            "resources missing",
            Cvm,
            with(snp_cvm(), |o| unset(o, "/spec/resources")),
            "spec.resources",
            "Required value",
        ),
        case(
            "unknown CPU model",
            Cvm,
            with(snp_cvm(), |o| set(o, "/spec/cpuModel", json!("EPYC-Zen9"))),
            "spec.cpuModel",
            r#"Unsupported value: "EPYC-Zen9""#,
        ),
        case(
            "unknown run strategy",
            Cvm,
            with(snp_cvm(), |o| {
                set(o, "/spec/runStrategy", json!("Sometimes"))
            }),
            "spec.runStrategy",
            r#"Unsupported value: "Sometimes""#,
        ),
        case(
            "unknown TDX TCB status",
            Cvm,
            with(tdx_cvm(), |o| {
                set(o, "/spec/tee/minimumTcb/tdxTcbStatuses", json!(["Revoked"]))
            }),
            "spec.tee.minimumTcb.tdxTcbStatuses[0]",
            r#"Unsupported value: "Revoked""#,
        ),
        // Ranges.
        case(
            "zero vCPUs",
            Cvm,
            with(snp_cvm(), |o| set(o, "/spec/resources/vcpus", json!(0))),
            "spec.resources.vcpus",
            "should be greater than or equal to 1",
        ),
        case(
            "too many vCPUs",
            Cvm,
            with(snp_cvm(), |o| set(o, "/spec/resources/vcpus", json!(513))),
            "spec.resources.vcpus",
            "should be less than or equal to 512",
        ),
        case(
            "too little memory",
            Cvm,
            with(snp_cvm(), |o| {
                set(o, "/spec/resources/memoryMiB", json!(128))
            }),
            "spec.resources.memoryMiB",
            "should be greater than or equal to 256",
        ),
        case(
            "too much memory",
            Cvm,
            with(snp_cvm(), |o| {
                set(o, "/spec/resources/memoryMiB", json!(4 * 1024 * 1024))
            }),
            "spec.resources.memoryMiB",
            "should be less than or equal to 2097152",
        ),
        case(
            "TCB component above 255",
            Cvm,
            with(snp_cvm(), |o| {
                set(o, "/spec/tee/minimumTcb/snp", json!(300))
            }),
            "spec.tee.minimumTcb.snp",
            "should be less than or equal to 255",
        ),
        // Hex patterns and lengths per TEE.
        case(
            "uppercase measurement",
            Cvm,
            with(snp_cvm(), |o| {
                set(
                    o,
                    "/spec/attestation/expectedMeasurements",
                    json!(["C".repeat(96)]),
                )
            }),
            "spec.attestation.expectedMeasurements[0]",
            "should match '^[0-9a-f]*$'",
        ),
        case(
            "SEV-length measurement on SEV-SNP",
            Cvm,
            with(snp_cvm(), |o| {
                set(
                    o,
                    "/spec/attestation/expectedMeasurements",
                    json!(["c".repeat(64)]),
                )
            }),
            "spec.attestation.expectedMeasurements",
            "every entry must be 96 hex characters (48 bytes) for SEV-SNP and TDX",
        ),
        case(
            "SNP-length measurement on SEV-ES",
            Cvm,
            with(sev_es_cvm(), |o| {
                set(
                    o,
                    "/spec/attestation/expectedMeasurements",
                    json!([hex96.clone()]),
                )
            }),
            "spec.attestation.expectedMeasurements",
            "or 64 hex characters (a SHA-256 launch digest) for SEV and SEV-ES",
        ),
        case(
            "nonce of odd length",
            Cvm,
            with(snp_cvm(), |o| {
                set(o, "/spec/attestation/nonce", json!("abc"))
            }),
            "spec.attestation.nonce",
            "should match '^([0-9a-f]{2})+$'",
        ),
        case(
            "uppercase nonce",
            Cvm,
            with(snp_cvm(), |o| {
                set(o, "/spec/attestation/nonce", json!("ABCD"))
            }),
            "spec.attestation.nonce",
            "should match '^([0-9a-f]{2})+$'",
        ),
        case(
            "non-hex host data",
            Cvm,
            with(snp_cvm(), |o| {
                set(o, "/spec/tee/hostData", json!("g".repeat(64)))
            }),
            "spec.tee.hostData",
            "should match '^[0-9a-f]*$'",
        ),
        case(
            "short host data",
            Cvm,
            with(snp_cvm(), |o| set(o, "/spec/tee/hostData", json!("ab"))),
            "spec.tee.hostData",
            "should be at least 64 chars long",
        ),
        case(
            "TDX-length host data on SEV-SNP",
            Cvm,
            with(snp_cvm(), |o| {
                set(o, "/spec/tee/hostData", json!(hex96.clone()))
            }),
            "spec.tee.hostData",
            "spec.tee.hostData must be 64 lowercase hex characters (32 bytes of SNP HOST_DATA)",
        ),
        case(
            "SNP-length host data on TDX",
            Cvm,
            with(tdx_cvm(), |o| {
                set(o, "/spec/tee/hostData", json!("d".repeat(64)))
            }),
            "spec.tee.hostData",
            "spec.tee.hostData must be 96 lowercase hex characters (48 bytes of TDX MRCONFIGID)",
        ),
        // TEE-specific fields on the wrong TEE.
        case(
            "host data on SEV-ES",
            Cvm,
            with(sev_es_cvm(), |o| {
                set(o, "/spec/tee/hostData", json!("a".repeat(64)))
            }),
            "spec.tee.hostData",
            "spec.tee.hostData exists only on SEV-SNP (HOST_DATA) and TDX (MRCONFIGID)",
        ),
        case(
            "CPU model on TDX",
            Cvm,
            with(tdx_cvm(), |o| set(o, "/spec/cpuModel", json!("EPYC-v4"))),
            "spec.cpuModel",
            "applies to SEV, SEV-ES and SEV-SNP only",
        ),
        case(
            "SMT policy bit on TDX",
            Cvm,
            with(tdx_cvm(), |o| set(o, "/spec/tee/policy/smt", json!(true))),
            "spec.tee.policy.smt",
            "spec.tee.policy.smt is an SEV-SNP guest policy bit",
        ),
        case(
            "SNP TCB components on TDX",
            Cvm,
            with(tdx_cvm(), |o| {
                set(o, "/spec/tee/minimumTcb/microcode", json!(115))
            }),
            "spec.tee.minimumTcb",
            "spec.tee.minimumTcb.bootloader/tee/snp/microcode/fmc are SEV-SNP TCB components",
        ),
        case(
            "TDX TCB statuses on SEV-SNP",
            Cvm,
            with(snp_cvm(), |o| {
                set(
                    o,
                    "/spec/tee/minimumTcb/tdxTcbStatuses",
                    json!(["UpToDate"]),
                )
            }),
            "spec.tee.minimumTcb.tdxTcbStatuses",
            "spec.tee.minimumTcb.tdxTcbStatuses applies to TDX only",
        ),
        // CEL rules on boot artifacts and disks.
        case(
            "firmware with both name and url",
            Cvm,
            with(snp_cvm(), |o| {
                set(o, "/spec/boot/firmware/url", json!("https://example.com/f"));
                set(o, "/spec/boot/firmware/sha256", json!("b".repeat(64)));
            }),
            "spec.boot.firmware",
            "set exactly one of name (an artifact the node plugin provides) or url",
        ),
        case(
            "firmware with neither name nor url",
            Cvm,
            with(snp_cvm(), |o| set(o, "/spec/boot/firmware", json!({}))),
            "spec.boot.firmware",
            "set exactly one of name",
        ),
        case(
            "kernel url without sha256",
            Cvm,
            with(snp_cvm(), |o| unset(o, "/spec/boot/kernel/sha256")),
            "spec.boot.kernel.sha256",
            "sha256 is required with url",
        ),
        case(
            "oci kernel url without the file in the image",
            Cvm,
            with(snp_cvm(), |o| {
                set(
                    o,
                    "/spec/boot/kernel/url",
                    json!("oci://example.com/guests/debian:13"),
                )
            }),
            "spec.boot.kernel.url",
            "oci://IMAGE#/PATH",
        ),
        case(
            "plain-http kernel url",
            Cvm,
            with(snp_cvm(), |o| {
                set(o, "/spec/boot/kernel/url", json!("http://example.com/k"))
            }),
            "spec.boot.kernel.url",
            r"should match '^(https|oci)://[^\s]+$'",
        ),
        case(
            "cmdline without kernel",
            Cvm,
            with(snp_cvm(), |o| unset(o, "/spec/boot/kernel")),
            "spec.boot.cmdline",
            "spec.boot.cmdline needs spec.boot.kernel",
        ),
        case(
            "initrd without kernel",
            Cvm,
            with(snp_cvm(), |o| {
                unset(o, "/spec/boot/kernel");
                unset(o, "/spec/boot/cmdline");
                set(o, "/spec/boot/initrd", json!({"name": "initrd"}));
            }),
            "spec.boot.initrd",
            "spec.boot.initrd needs spec.boot.kernel",
        ),
        case(
            "disk with two sources",
            Cvm,
            with(snp_cvm(), |o| {
                set(o, "/spec/disks/0/image", json!({"name": "img"}))
            }),
            "spec.disks[0]",
            "set exactly one of image or persistentVolumeClaim",
        ),
        case(
            "two disks with one name",
            Cvm,
            with(snp_cvm(), |o| {
                set(
                    o,
                    "/spec/disks",
                    json!([
                        {"name": "root", "persistentVolumeClaim": "a"},
                        {"name": "root", "persistentVolumeClaim": "b"}
                    ]),
                )
            }),
            "spec.disks[1]",
            r#"Duplicate value: {"name":"root"}"#,
        ),
        case(
            "one port forwarded twice",
            Cvm,
            with(snp_cvm(), |o| {
                set(
                    o,
                    "/spec/network",
                    json!({"ports": [
                        {"name": "http", "port": 80},
                        {"name": "web", "port": 80}
                    ]}),
                )
            }),
            "spec.network",
            "each port may be forwarded once per protocol",
        ),
        case(
            "port out of range",
            Cvm,
            with(snp_cvm(), |o| {
                set(
                    o,
                    "/spec/network",
                    json!({"ports": [{"name": "http", "port": 70000}]}),
                )
            }),
            "spec.network.ports[0].port",
            "should be less than or equal to 65535",
        ),
        case(
            "the launcher's readiness port",
            Cvm,
            with(snp_cvm(), |o| {
                set(
                    o,
                    "/spec/network",
                    json!({"ports": [{"name": "health", "port": 4041}]}),
                )
            }),
            "spec.network.ports[0]",
            "port 4041 is the launcher pod's readiness port",
        ),
        case(
            "disk name not a DNS label",
            Cvm,
            with(snp_cvm(), |o| {
                set(o, "/spec/disks/0/name", json!("Root_Disk"))
            }),
            "spec.disks[0].name",
            "should match",
        ),
        case(
            "policyRef not an object name",
            Cvm,
            with(snp_cvm(), |o| {
                set(o, "/spec/attestation/policyRef", json!("Demo_Policy"))
            }),
            "spec.attestation.policyRef",
            "should match",
        ),
        // Durations.
        case(
            "re-attestation too often",
            Cvm,
            with(snp_cvm(), |o| {
                set(o, "/spec/attestation/reattestEvery", json!("10s"))
            }),
            "spec.attestation.reattestEvery",
            "spec.attestation.reattestEvery must be between 1m and 720h",
        ),
        case(
            "re-attestation too rarely",
            Cvm,
            with(snp_cvm(), |o| {
                set(o, "/spec/attestation/reattestEvery", json!("721h"))
            }),
            "spec.attestation.reattestEvery",
            "spec.attestation.reattestEvery must be between 1m and 720h",
        ),
        case(
            "re-attestation in days",
            Cvm,
            with(snp_cvm(), |o| {
                set(o, "/spec/attestation/reattestEvery", json!("1d"))
            }),
            "spec.attestation.reattestEvery",
            r#"Invalid value: "1d": spec.attestation.reattestEvery in body should match"#,
        ),
        case(
            "re-attestation period overflowing a duration",
            Cvm,
            with(snp_cvm(), |o| {
                set(
                    o,
                    "/spec/attestation/reattestEvery",
                    json!("99999999999999999999h"),
                )
            }),
            "spec.attestation.reattestEvery",
            "should match",
        ),
    ]
}

fn malformed_policies_and_migrations() -> Vec<Case> {
    use Kind::{Migration, Policy};
    vec![
        case(
            "private root without fingerprint",
            Policy,
            policy(json!({"trustedRoots": [{"name": "amd"}, {"name": "cvm-simulator"}]})),
            "spec.trustedRoots[1].sha256Fingerprint",
            "sha256Fingerprint is required for a root other than amd or intel",
        ),
        case(
            "built-in root with fingerprint",
            Policy,
            policy(
                json!({"trustedRoots": [{"name": "intel", "sha256Fingerprint": "a".repeat(64)}]}),
            ),
            "spec.trustedRoots[0].sha256Fingerprint",
            "sha256Fingerprint must not be set for the built-in roots amd and intel",
        ),
        case(
            "short fingerprint",
            Policy,
            policy(json!({"trustedRoots": [{"name": "sim", "sha256Fingerprint": "abcd"}]})),
            "spec.trustedRoots[0].sha256Fingerprint",
            "should be at least 64 chars long",
        ),
        case(
            "root listed twice",
            Policy,
            policy(json!({"trustedRoots": [{"name": "amd"}, {"name": "amd"}]})),
            "spec.trustedRoots[1]",
            r#"Duplicate value: {"name":"amd"}"#,
        ),
        case(
            "evidence age below a second",
            Policy,
            policy(json!({"maxEvidenceAge": "500ms"})),
            "spec.maxEvidenceAge",
            "spec.maxEvidenceAge must be between 1s and 720h",
        ),
        case(
            "evidence age in words",
            Policy,
            policy(json!({"maxEvidenceAge": "ten minutes"})),
            "spec.maxEvidenceAge",
            "should match",
        ),
        case(
            "reference measurement of 80 characters",
            Policy,
            policy(json!({"referenceMeasurements": ["a".repeat(80)]})),
            "spec.referenceMeasurements",
            "every entry must be 96 hex characters (SEV-SNP, TDX) or 64 (SEV, SEV-ES)",
        ),
        case(
            "RTMR index 4",
            Policy,
            policy(json!({"tdx": {"rtmrs": [{"index": 4, "value": "0".repeat(96)}]}})),
            "spec.tdx.rtmrs[0].index",
            "should be less than or equal to 3",
        ),
        case(
            "uppercase MRTD",
            Policy,
            policy(json!({"tdx": {"mrtd": ["A".repeat(96)]}})),
            "spec.tdx.mrtd[0]",
            "should match '^[0-9a-f]*$'",
        ),
        case(
            "unknown acceptable TCB status",
            Policy,
            policy(json!({"tdx": {"acceptableTcbStatuses": ["Revoked"]}})),
            "spec.tdx.acceptableTcbStatuses[0]",
            r#"Unsupported value: "Revoked""#,
        ),
        case(
            "allowed debug as a string",
            Policy,
            policy(json!({"allowedGuestPolicy": {"debug": "yes"}})),
            "spec.allowedGuestPolicy.debug",
            "must be of type boolean",
        ),
        case(
            "migration without a CVM",
            Migration,
            migration(json!({"targetNode": "sim-node-1"})),
            "spec.cvmName",
            "Required value",
        ),
        case(
            "migration of an invalid CVM name",
            Migration,
            migration(json!({"cvmName": "My_VM"})),
            "spec.cvmName",
            "should match",
        ),
        case(
            "migration to an empty node name",
            Migration,
            migration(json!({"cvmName": "vm", "targetNode": ""})),
            "spec.targetNode",
            "should be at least 1 chars long",
        ),
    ]
}

/// Creates each case and checks the server's refusal: 422 Invalid, the field in the message
/// and among the causes, the expected text, no CEL evaluation error, nothing stored.
async fn refuse_all(client: &Client, ns: &str, prefix: &str, cases: Vec<Case>) -> Result<usize> {
    let mut failures = Vec::new();
    let n = cases.len();
    for (i, c) in cases.into_iter().enumerate() {
        let name = format!("{prefix}-{i}");
        let mut manifest = c.manifest;
        set(&mut manifest, "/metadata/name", json!(name));
        let api = c.kind.api(client, ns);
        let s = match refusal(
            api.create(&PostParams::default(), &dynamic(manifest)?)
                .await,
        ) {
            Ok(s) => s,
            Err(e) => {
                failures.push(format!("{}: {e}", c.name));
                continue;
            }
        };
        let fields = cause_fields(&s);
        let problems: Vec<&str> = [
            (s.code != 422, "status code is not 422"),
            (s.reason != "Invalid", "reason is not Invalid"),
            (
                !s.message.contains(&format!("{}: ", c.field)),
                "message does not name the field",
            ),
            (
                !s.message.contains(c.want),
                "message lacks the expected text",
            ),
            (
                !fields.iter().any(|f| f == c.field),
                "no cause names the field",
            ),
            // A rule that fails to evaluate is a CRD bug, even when the object is refused.
            (
                s.message.contains("evaluating rule") || s.message.contains("conversion error"),
                "a CEL rule failed to evaluate",
            ),
        ]
        .into_iter()
        .filter_map(|(bad, what)| bad.then_some(what))
        .collect();
        if !problems.is_empty() {
            failures.push(format!(
                "{} (want field {:?} and {:?}): {}\n    code {} reason {:?} causes {fields:?}\n    message: {}",
                c.name,
                c.field,
                c.want,
                problems.join(", "),
                s.code,
                s.reason,
                s.message
            ));
        }
        // Refused means not stored.
        if api.get_opt(&name).await?.is_some() {
            failures.push(format!("{}: refused, yet {name} exists", c.name));
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of {n} malformed manifests were not refused as expected:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    Ok(n)
}

#[tokio::test]
async fn malformed_confidential_vms_are_refused_naming_the_field() -> Result<()> {
    let ns = "crdv-malformed-cvm";
    let (_c, client) = setup(ns).await?;
    // The well-formed bases are accepted, so each refusal is the mutation's doing.
    let api = Kind::Cvm.api(&client, ns);
    for (name, base) in [
        ("base-snp", snp_cvm()),
        ("base-tdx", tdx_cvm()),
        ("base-sev-es", sev_es_cvm()),
    ] {
        let obj = with(base, |o| set(o, "/metadata/name", json!(name)));
        api.create(&PostParams::default(), &dynamic(obj)?)
            .await
            .with_context(|| format!("the valid {name} must be accepted"))?;
    }
    let n = refuse_all(&client, ns, "bad", malformed_cvms()).await?;
    assert!(n >= 30, "only {n} cases");
    Ok(())
}

#[tokio::test]
async fn malformed_policies_and_migrations_are_refused_naming_the_field() -> Result<()> {
    let ns = "crdv-malformed-other";
    let (_c, client) = setup(ns).await?;
    // Valid twins, created for real, so the refusals below are the mutations' doing.
    let ok_policy = with(
        policy(json!({
            "trustedRoots": [{"name": "amd"}, {"name": "sim", "sha256Fingerprint": "a".repeat(64)}],
            "maxEvidenceAge": "10m",
            "referenceMeasurements": ["a".repeat(96), "b".repeat(64)],
            "tdx": {"rtmrs": [{"index": 3, "value": "0".repeat(96)}], "mrtd": ["c".repeat(96)]}
        })),
        |o| set(o, "/metadata/name", json!("crdv-valid-policy")),
    );
    Kind::Policy
        .api(&client, ns)
        .create(&PostParams::default(), &dynamic(ok_policy)?)
        .await
        .context("the valid policy must be accepted")?;
    let ok_mig = with(
        migration(json!({"cvmName": "vm", "targetNode": "sim-node-1"})),
        |o| set(o, "/metadata/name", json!("valid")),
    );
    Kind::Migration
        .api(&client, ns)
        .create(&PostParams::default(), &dynamic(ok_mig)?)
        .await
        .context("the valid migration must be accepted")?;

    let n = refuse_all(&client, ns, "crdv-bad", malformed_policies_and_migrations()).await?;
    assert!(n >= 12, "only {n} cases");
    Ok(())
}

/// `kubectl` asks for strict field validation: a misspelt field is an error naming it,
/// not a silently pruned value.
#[tokio::test]
async fn kubectl_refuses_unknown_fields_by_name() -> Result<()> {
    let ns = "crdv-unknown-field";
    let (c, _client) = setup(ns).await?;
    let obj = with(snp_cvm(), |o| {
        set(o, "/metadata/name", json!("typo"));
        set(o, "/metadata/namespace", json!(ns));
        set(o, "/spec/tee/hostDate", json!("a".repeat(64)));
    });
    let dir = tempfile::tempdir()?;
    let f = dir.path().join("typo.json");
    std::fs::write(&f, serde_json::to_vec(&obj)?)?;
    let path = f.to_string_lossy().to_string();
    let out = c.kubectl().args(["create", "-f", &path]).output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "created with a misspelt field: {err}"
    );
    assert!(
        err.contains(r#"unknown field "spec.tee.hostDate""#),
        "{err}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Updates

async fn update_refusal(api: &Api<DynamicObject>, name: &str, patch: Value) -> Result<Status> {
    refusal(
        api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await,
    )
}

#[tokio::test]
async fn tee_and_resources_cannot_change_after_creation() -> Result<()> {
    let ns = "crdv-immutable";
    let (_c, client) = setup(ns).await?;
    let api = Kind::Cvm.api(&client, ns);
    let created = api
        .create(&PostParams::default(), &dynamic(minimal_snp_cvm("vm"))?)
        .await?;
    let generation = created.metadata.generation.context("no generation")?;

    // The new TEE type alone would be valid at creation: only immutability refuses it.
    let tee_changes = [
        ("type", json!({"spec": {"tee": {"type": "SEV-ES"}}})),
        (
            "policy",
            json!({"spec": {"tee": {"policy": {"debug": true}}}}),
        ),
        (
            "hostData",
            json!({"spec": {"tee": {"hostData": "a".repeat(64)}}}),
        ),
    ];
    for (what, patch) in tee_changes {
        let s = update_refusal(&api, "vm", patch).await?;
        assert_eq!(s.code, 422, "tee.{what}: {s:?}");
        assert_eq!(
            cause_fields(&s),
            vec!["spec.tee".to_string()],
            "tee.{what}: {}",
            s.message
        );
        assert!(
            s.message
                .contains("spec.tee: Invalid value: \"object\": spec.tee is immutable"),
            "tee.{what}: {}",
            s.message
        );
    }
    for (what, patch) in [
        ("vcpus", json!({"spec": {"resources": {"vcpus": 4}}})),
        (
            "memory",
            json!({"spec": {"resources": {"memoryMiB": 4096}}}),
        ),
    ] {
        let s = update_refusal(&api, "vm", patch).await?;
        assert_eq!(s.code, 422, "{what}: {s:?}");
        assert_eq!(
            cause_fields(&s),
            vec!["spec.resources".to_string()],
            "{what}: {}",
            s.message
        );
        assert!(
            s.message.contains("spec.resources is immutable"),
            "{what}: {}",
            s.message
        );
    }

    // Nothing changed, and the rest of the spec stays mutable.
    let now = api.get("vm").await?;
    assert_eq!(now.data["spec"]["tee"]["type"], "SEV-SNP");
    assert_eq!(now.data["spec"]["resources"]["vcpus"], 2);
    assert_eq!(now.metadata.generation, Some(generation));
    let patched = api
        .patch(
            "vm",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {
                "runStrategy": "Halted",
                "attestation": {"nonce": "c0ffee", "reattestEvery": "30m"}
            }})),
        )
        .await
        .context("runStrategy and attestation are mutable")?;
    assert_eq!(patched.data["spec"]["runStrategy"], "Halted");
    assert_eq!(patched.data["spec"]["attestation"]["nonce"], "c0ffee");
    assert_eq!(patched.metadata.generation, Some(generation + 1));

    // A server-side apply that changes the TEE is refused the same way.
    let mut applied = minimal_snp_cvm("vm");
    set(&mut applied, "/spec/tee/type", json!("TDX"));
    let s = refusal(
        api.patch(
            "vm",
            &PatchParams::apply("crdv-test").force(),
            &Patch::Apply(applied),
        )
        .await,
    )?;
    assert_eq!(s.code, 422, "{s:?}");
    assert!(s.message.contains("spec.tee is immutable"), "{}", s.message);
    Ok(())
}

#[tokio::test]
async fn migration_spec_cannot_change() -> Result<()> {
    let ns = "crdv-migration-immutable";
    let (_c, client) = setup(ns).await?;
    let api = Kind::Migration.api(&client, ns);
    let mig = with(migration(json!({"cvmName": "vm-a"})), |o| {
        set(o, "/metadata/name", json!("move"))
    });
    api.create(&PostParams::default(), &dynamic(mig)?).await?;
    let s = update_refusal(&api, "move", json!({"spec": {"cvmName": "vm-b"}})).await?;
    assert_eq!(s.code, 422, "{s:?}");
    assert!(
        s.message
            .contains("spec: Invalid value: \"object\": spec is immutable"),
        "{}",
        s.message
    );
    assert_eq!(api.get("move").await?.data["spec"]["cvmName"], "vm-a");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Examples

/// Every example is stored as written: created in a test namespace (policies with a
/// server-side dry run, as they are cluster-scoped), nothing pruned or altered.
#[tokio::test]
async fn every_example_is_accepted_as_written() -> Result<()> {
    let ns = "crdv-examples";
    let (_c, client) = setup(ns).await?;
    let docs = examples()?;
    let mut seen = Vec::new();
    for (file, mut doc) in docs {
        let kind_name = doc["kind"].as_str().unwrap_or_default().to_string();
        let kind = Kind::of(&kind_name).with_context(|| format!("{file}: kind {kind_name:?}"))?;
        let dry_run = kind == Kind::Policy;
        if kind != Kind::Policy {
            set(&mut doc, "/metadata/namespace", json!(ns));
        }
        let api = kind.api(&client, ns);
        let pp = PostParams {
            dry_run,
            ..Default::default()
        };
        let stored = api
            .create(&pp, &dynamic(doc.clone())?)
            .await
            .with_context(|| format!("{file}: the API server refused {kind_name}"))?;
        let mut diff = Vec::new();
        missing_leaves("spec", &doc["spec"], &stored.data["spec"], &mut diff);
        assert!(diff.is_empty(), "{file}: {diff:#?}");
        seen.push(format!(
            "{kind_name}/{}",
            stored.metadata.name.unwrap_or_default()
        ));
    }
    seen.sort();
    assert_eq!(
        seen,
        vec![
            "AttestationPolicy/demo-simulator",
            "AttestationPolicy/production",
            "ConfidentialVM/sev-es-demo",
            "ConfidentialVM/snp-demo",
            "ConfidentialVM/tdx-demo",
        ]
    );
    Ok(())
}

/// The user's own command from the examples' comments, as a server-side dry run.
#[tokio::test]
async fn kubectl_applies_the_examples_directory() -> Result<()> {
    let c = shared();
    let dir = examples_dir().to_string_lossy().to_string();
    let out = kubectl(&c, &["apply", "--dry-run=server", "-o", "name", "-f", &dir])?;
    let mut names: Vec<&str> = out.lines().collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            "attestationpolicy.cvmp.io/demo-simulator",
            "attestationpolicy.cvmp.io/production",
            "confidentialvm.cvmp.io/sev-es-demo",
            "confidentialvm.cvmp.io/snp-demo",
            "confidentialvm.cvmp.io/tdx-demo",
        ],
        "{out}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// kubectl explain and get

#[tokio::test]
async fn kubectl_explain_teaches_the_tee_fields() -> Result<()> {
    let c = shared();
    let raw = kubectl(&c, &["explain", "confidentialvm.spec.tee"])?;
    // kubectl wraps at its own width; compare word sequences.
    let text = raw.split_whitespace().collect::<Vec<_>>().join(" ");
    for want in [
        "GROUP: cvmp.io",
        "KIND: ConfidentialVM",
        "VERSION: v1alpha1",
        "FIELD: tee <Object>",
        "The trusted execution environment and its launch-time settings. Immutable: delete and recreate the ConfidentialVM to change it.",
        "hostData <string> Data bound into the guest's evidence by the host at launch, as lowercase hex: 64 characters of SNP HOST_DATA or 96 of TDX MRCONFIGID.",
        "minimumTcb <Object> Oldest platform TCB the guest may run on",
        "policy <Object> Guest policy the hardware enforces",
        "type <string> -required- enum: SEV, SEV-ES, SEV-SNP, TDX Which TEE the guest runs under",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{raw}");
    }

    // Descriptions are re-flowed by crds(): a doc comment's own line break after "delete
    // and" would otherwise split the phrase inside kubectl's wrapping.
    assert!(
        raw.lines().any(|l| l.contains("delete and recreate")),
        "source line breaks leak into explain:\n{raw}"
    );

    let raw = kubectl(&c, &["explain", "confidentialvm.spec.tee.policy.smt"])?;
    let text = raw.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        text.contains("FIELD: smt <boolean> DESCRIPTION: Allow the guest on hosts with simultaneous multithreading enabled"),
        "{raw}"
    );

    let raw = kubectl(&c, &["explain", "attestationpolicy.spec.trustedRoots"])?;
    let text = raw.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        text.contains("sha256Fingerprint <string> SHA-256 of the root certificate's DER encoding"),
        "{raw}"
    );
    Ok(())
}

#[tokio::test]
async fn kubectl_get_cvm_prints_phase_node_tee_verified_age() -> Result<()> {
    let ns = "crdv-columns";
    let (c, client) = setup(ns).await?;
    let api = Kind::Cvm.api(&client, ns);
    let snp = with(snp_cvm(), |o| {
        set(o, "/metadata/name", json!("snp-verified"))
    });
    api.create(&PostParams::default(), &dynamic(snp)?).await?;
    let tdx = with(tdx_cvm(), |o| {
        set(o, "/metadata/name", json!("tdx-pending"))
    });
    api.create(&PostParams::default(), &dynamic(tdx)?).await?;
    // A policy exists too: `kubectl get cvm` must not list it (short name, not category).
    let p = with(policy(json!({"maxEvidenceAge": "5m"})), |o| {
        set(o, "/metadata/name", json!("crdv-columns-policy"))
    });
    Kind::Policy
        .api(&client, ns)
        .create(&PostParams::default(), &dynamic(p)?)
        .await?;

    // Status goes through the status subresource, as the operator writes it.
    let status = json!({"status": {
        "phase": "Verified",
        "nodeName": "sim-node-0",
        "observedGeneration": 1,
        "conditions": [{
            "type": "Verified",
            "status": "True",
            "reason": "EvidenceVerified",
            "message": "SEV-SNP report verified against policy demo",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
            "observedGeneration": 1
        }]
    }});
    let got = api
        .patch_status(
            "snp-verified",
            &PatchParams::default(),
            &Patch::Merge(status),
        )
        .await?;
    assert_eq!(got.data["status"]["phase"], "Verified");
    // ... and not through the main resource: a spec write leaves status alone.
    let again = api
        .patch(
            "snp-verified",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Failed"}})),
        )
        .await?;
    assert_eq!(again.data["status"]["phase"], "Verified");

    let out = kubectl(&c, &["get", "cvm", "-n", ns])?;
    let rows = table(&out);
    assert_eq!(
        rows[0],
        vec!["NAME", "PHASE", "NODE", "TEE", "VERIFIED", "AGE"],
        "{out}"
    );
    assert_eq!(rows.len(), 3, "only the two ConfidentialVMs:\n{out}");
    let row = |name: &str| {
        rows.iter()
            .find(|r| r[0] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no row {name} in\n{out}"))
    };
    let v = row("snp-verified");
    assert_eq!(
        v[1..5],
        ["Verified", "sim-node-0", "SEV-SNP", "True"],
        "{out}"
    );
    assert!(!v[5].is_empty(), "{out}");
    let p = row("tdx-pending");
    assert_eq!(p[1..5], ["", "", "TDX", ""], "{out}");

    // The category lists every kind of the group.
    let out = kubectl(&c, &["get", "cvmp", "-n", ns, "-o", "name"])?;
    for want in [
        "confidentialvm.cvmp.io/snp-verified",
        "confidentialvm.cvmp.io/tdx-pending",
        "attestationpolicy.cvmp.io/crdv-columns-policy",
    ] {
        assert!(out.lines().any(|l| l == want), "{want} missing from\n{out}");
    }
    Ok(())
}
