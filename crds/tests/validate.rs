//! Table-driven tests of the pure `validate()` functions.

mod common;

use common::{set, snp_cvm, unset};
use cvm_crds::cvm::ConfidentialVMSpec;
use cvm_crds::policy::AttestationPolicySpec;
use cvm_crds::{ConfidentialVM, Validate, ValidationError};
use serde_json::{json, Value};

fn spec_from(obj: &Value) -> ConfidentialVMSpec {
    serde_json::from_value::<ConfidentialVM>(obj.clone())
        .expect("deserializes")
        .spec
}

fn messages(r: Result<(), Vec<ValidationError>>) -> Vec<String> {
    r.err()
        .unwrap_or_default()
        .iter()
        .map(ToString::to_string)
        .collect()
}

type Mutation = fn(&mut Value);

#[test]
fn cvm_spec_table() {
    let cases: Vec<(&str, Mutation, Option<&str>)> = vec![
        ("valid", |_| {}, None),
        ("0 vCPUs", |o| set(o, "/spec/resources/vcpus", json!(0)), Some("spec.resources.vcpus is 0: it must be between 1 and 512")),
        ("513 vCPUs", |o| set(o, "/spec/resources/vcpus", json!(513)), Some("spec.resources.vcpus is 513")),
        ("128 MiB", |o| set(o, "/spec/resources/memoryMiB", json!(128)), Some("spec.resources.memoryMiB is 128: it must be between 256 and 2097152")),
        ("uppercase hostData", |o| set(o, "/spec/tee/hostData", json!("A".repeat(64))), Some("spec.tee.hostData must be lowercase hex")),
        ("short hostData", |o| set(o, "/spec/tee/hostData", json!("a".repeat(62))), Some("spec.tee.hostData must be 64 hex characters (32 bytes of SNP HOST_DATA); it has 62")),
        ("hostData on SEV", |o| {
            set(o, "/spec/tee/type", json!("SEV"));
            unset(o, "/spec/tee/minimumTcb");
            unset(o, "/spec/tee/policy/smt");
            set(o, "/spec/attestation/expectedMeasurements", json!(["c".repeat(64)]));
        }, Some("spec.tee.hostData applies to SEV-SNP and TDX only, not SEV")),
        ("cpuModel on TDX", |o| {
            set(o, "/spec/tee/type", json!("TDX"));
            set(o, "/spec/tee/hostData", json!("a".repeat(96)));
            unset(o, "/spec/tee/minimumTcb");
            unset(o, "/spec/tee/policy/smt");
        }, Some("spec.cpuModel applies to SEV, SEV-ES and SEV-SNP only, not TDX")),
        ("SNP TCB on TDX", |o| {
            set(o, "/spec/tee/type", json!("TDX"));
            set(o, "/spec/tee/hostData", json!("a".repeat(96)));
            unset(o, "/spec/cpuModel");
            unset(o, "/spec/tee/policy/smt");
        }, Some("spec.tee.minimumTcb.bootloader/tee/snp/microcode/fmc applies to SEV-SNP only")),
        ("smt on SEV-ES", |o| {
            set(o, "/spec/tee/type", json!("SEV-ES"));
            unset(o, "/spec/tee/hostData");
            unset(o, "/spec/tee/minimumTcb");
            set(o, "/spec/attestation/expectedMeasurements", json!(["c".repeat(64)]));
        }, Some("spec.tee.policy.smt applies to SEV-SNP only")),
        ("measurement too short", |o| set(o, "/spec/attestation/expectedMeasurements", json!(["c".repeat(64)])), Some("spec.attestation.expectedMeasurements[0] must be 96 hex characters (48 bytes of SEV-SNP MEASUREMENT)")),
        ("duplicate measurement", |o| set(o, "/spec/attestation/expectedMeasurements", json!(["c".repeat(96), "c".repeat(96)])), Some("spec.attestation.expectedMeasurements lists")),
        ("odd nonce", |o| set(o, "/spec/attestation/nonce", json!("abc")), Some("spec.attestation.nonce must be 2 to 128, an even number of hex characters")),
        ("non-hex nonce", |o| set(o, "/spec/attestation/nonce", json!("zz")), Some("spec.attestation.nonce must be lowercase hex")),
        ("nonce too long", |o| set(o, "/spec/attestation/nonce", json!("ab".repeat(65))), Some("spec.attestation.nonce must be 2 to 128")),
        ("bad duration", |o| set(o, "/spec/attestation/reattestEvery", json!("1d")), Some("spec.attestation.reattestEvery = \"1d\" is invalid")),
        ("duration too short", |o| set(o, "/spec/attestation/reattestEvery", json!("30s")), Some("between 1m and 720h")),
        ("bad policyRef", |o| set(o, "/spec/attestation/policyRef", json!("Bad_Name")), Some("spec.attestation.policyRef = \"Bad_Name\" is invalid")),
        ("cmdline without kernel", |o| unset(o, "/spec/boot/kernel"), Some("spec.boot.cmdline needs spec.boot.kernel")),
        ("url without digest", |o| unset(o, "/spec/boot/kernel/sha256"), Some("spec.boot.kernel.url needs spec.boot.kernel.sha256")),
        ("http url", |o| set(o, "/spec/boot/kernel/url", json!("http://example.com/k")), Some("spec.boot.kernel.url")),
        ("oci url without the file", |o| set(o, "/spec/boot/kernel/url", json!("oci://example.com/guests/debian:13")), Some("oci://IMAGE#/PATH")),
        ("oci url of a directory", |o| set(o, "/spec/boot/kernel/url", json!("oci://example.com/g:1#/boot/")), Some("oci://IMAGE#/PATH")),
        ("oci url with its file", |o| set(o, "/spec/boot/kernel/url", json!("oci://example.com/g:1#/boot/vmlinuz")), None),
        ("firmware name and url", |o| set(o, "/spec/boot/firmware/url", json!("https://x/y")), Some("spec.boot.firmware: set exactly one of name or url")),
        ("disk without source", |o| unset(o, "/spec/disks/0/persistentVolumeClaim"), Some("spec.disks[root]: set exactly one of image or persistentVolumeClaim")),
        ("ports", |o| set(o, "/spec/network", json!({"ports": [{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]})), None),
        ("port 0", |o| set(o, "/spec/network", json!({"ports": [{"name": "http", "port": 0}]})), Some("spec.network.ports[http].port is 0: it must be between 1 and 65535")),
        ("port twice", |o| set(o, "/spec/network", json!({"ports": [{"name": "a", "port": 80}, {"name": "b", "port": 80}]})), Some("spec.network.ports lists \"80/TCP\" more than once")),
        ("port name twice", |o| set(o, "/spec/network", json!({"ports": [{"name": "a", "port": 80}, {"name": "a", "port": 81}]})), Some("spec.network.ports[].name lists \"a\" more than once")),
        ("readiness port", |o| set(o, "/spec/network", json!({"ports": [{"name": "h", "port": 4041}]})), Some("spec.network.ports[h].port = \"4041\" is invalid: port 4041 is the launcher pod's readiness port")),
        ("numeric port name", |o| set(o, "/spec/network", json!({"ports": [{"name": "8080", "port": 80}]})), Some("needs at least one letter")),
        ("duplicate disk", |o| set(o, "/spec/disks", json!([{"name": "a", "persistentVolumeClaim": "x"}, {"name": "a", "persistentVolumeClaim": "y"}])), Some("spec.disks[].name lists \"a\" more than once")),
    ];
    for (name, mutate, want) in cases {
        let mut obj = snp_cvm();
        mutate(&mut obj);
        let msgs = messages(spec_from(&obj).validate());
        match want {
            None => assert!(msgs.is_empty(), "{name}: unexpected {msgs:#?}"),
            Some(w) => assert!(
                msgs.iter().any(|m| m.contains(w)),
                "{name}: expected {w:?} in {msgs:#?}"
            ),
        }
    }
}

#[test]
fn update_rules_mirror_cel() {
    let old = spec_from(&snp_cvm());
    let mut new = old.clone();
    new.resources.vcpus = 8;
    let msgs = messages(new.validate_update(&old));
    assert_eq!(msgs.len(), 1, "{msgs:#?}");
    assert!(msgs[0].starts_with("spec.resources is immutable"));
    assert!(old.validate_update(&old).is_ok());
}

#[test]
fn policy_table() {
    let base = json!({
        "trustedRoots": [{"name": "amd"}, {"name": "sim", "sha256Fingerprint": "a".repeat(64)}],
        "referenceMeasurements": ["b".repeat(96)],
        "tdx": {"mrtd": ["c".repeat(96)], "rtmrs": [{"index": 0, "value": "d".repeat(96)}]},
        "maxEvidenceAge": "10m"
    });
    let cases: Vec<(&str, Mutation, Option<&str>)> = vec![
        ("valid", |_| {}, None),
        (
            "fingerprint missing",
            |o| unset(o, "/trustedRoots/1/sha256Fingerprint"),
            Some("spec.trustedRoots[sim] needs spec.trustedRoots[sim].sha256Fingerprint"),
        ),
        (
            "builtin pinned",
            |o| {
                set(
                    o,
                    "/trustedRoots/0/sha256Fingerprint",
                    json!("e".repeat(64)),
                )
            },
            Some("spec.trustedRoots[amd].sha256Fingerprint"),
        ),
        (
            "duplicate root",
            |o| set(o, "/trustedRoots/1/name", json!("amd")),
            Some("spec.trustedRoots[].name lists \"amd\""),
        ),
        (
            "bad measurement",
            |o| set(o, "/referenceMeasurements/0", json!("b".repeat(80))),
            Some("spec.referenceMeasurements[0] must be 96 or 64 hex characters"),
        ),
        (
            "rtmr index",
            |o| set(o, "/tdx/rtmrs/0/index", json!(4)),
            Some("spec.tdx.rtmrs[].index is 4"),
        ),
        (
            "short mrtd",
            |o| set(o, "/tdx/mrtd/0", json!("c".repeat(64))),
            Some("spec.tdx.mrtd[0] must be 96 hex characters"),
        ),
        (
            "age",
            |o| set(o, "/maxEvidenceAge", json!("5000h")),
            Some("spec.maxEvidenceAge"),
        ),
    ];
    for (name, mutate, want) in cases {
        let mut obj = base.clone();
        mutate(&mut obj);
        let spec: AttestationPolicySpec = serde_json::from_value(obj).expect("deserializes");
        let msgs = messages(spec.validate());
        match want {
            None => assert!(msgs.is_empty(), "{name}: unexpected {msgs:#?}"),
            Some(w) => assert!(
                msgs.iter().any(|m| m.contains(w)),
                "{name}: expected {w:?} in {msgs:#?}"
            ),
        }
    }
}
