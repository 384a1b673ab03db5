//! The CRD's CEL rules, evaluated client-side with kube-cel, on manifests a user can get
//! wrong. (Schema-level checks such as patterns and ranges are the API server's; the same
//! cases are covered by `validate.rs`, and e2e applies them to a real API server.)

mod common;

use common::{cel_errors, set, snp_cvm, unset};
use serde_json::{json, Value};

#[test]
fn valid_snp_manifest_passes() {
    assert_eq!(
        cel_errors("ConfidentialVM", &snp_cvm(), None),
        Vec::<String>::new()
    );
}

type Mutation = fn(&mut Value);

#[test]
fn malformed_manifests_are_refused_with_the_field_named() {
    let cases: Vec<(&str, Mutation, &str)> = vec![
        (
            "hostData on SEV",
            |o| set(o, "/spec/tee/type", json!("SEV")),
            "spec.tee.hostData exists only on SEV-SNP",
        ),
        (
            "short SNP hostData",
            |o| set(o, "/spec/tee/hostData", json!("ab".repeat(20))),
            "spec.tee.hostData must be 64",
        ),
        (
            "SNP-length hostData on TDX",
            |o| {
                set(o, "/spec/tee/type", json!("TDX"));
                unset(o, "/spec/cpuModel");
                unset(o, "/spec/tee/minimumTcb");
                unset(o, "/spec/tee/policy/smt");
            },
            "spec.tee.hostData must be 96",
        ),
        (
            "cpuModel on TDX",
            |o| {
                set(o, "/spec/tee/type", json!("TDX"));
                set(o, "/spec/tee/hostData", json!("a".repeat(96)));
                unset(o, "/spec/tee/minimumTcb");
                unset(o, "/spec/tee/policy/smt");
            },
            "spec.cpuModel",
        ),
        (
            "SNP TCB on SEV-ES",
            |o| {
                set(o, "/spec/tee/type", json!("SEV-ES"));
                unset(o, "/spec/tee/hostData");
                unset(o, "/spec/tee/policy/smt");
                set(
                    o,
                    "/spec/attestation/expectedMeasurements",
                    json!(["c".repeat(64)]),
                );
            },
            "spec.tee.minimumTcb.bootloader/tee/snp/microcode/fmc",
        ),
        (
            "TDX statuses on SNP",
            |o| {
                set(
                    o,
                    "/spec/tee/minimumTcb/tdxTcbStatuses",
                    json!(["UpToDate"]),
                )
            },
            "spec.tee.minimumTcb.tdxTcbStatuses",
        ),
        (
            "smt on TDX",
            |o| {
                set(o, "/spec/tee/type", json!("TDX"));
                set(o, "/spec/tee/hostData", json!("a".repeat(96)));
                unset(o, "/spec/tee/minimumTcb");
                unset(o, "/spec/cpuModel");
            },
            "spec.tee.policy.smt",
        ),
        (
            "SEV-length measurement on SNP",
            |o| {
                set(
                    o,
                    "/spec/attestation/expectedMeasurements",
                    json!(["c".repeat(64)]),
                )
            },
            "spec.attestation.expectedMeasurements",
        ),
        (
            "cmdline without kernel",
            |o| unset(o, "/spec/boot/kernel"),
            "spec.boot.cmdline needs spec.boot.kernel",
        ),
        (
            "firmware with name and url",
            |o| set(o, "/spec/boot/firmware/url", json!("https://example.com/f")),
            "exactly one of name",
        ),
        (
            "url without digest",
            |o| unset(o, "/spec/boot/kernel/sha256"),
            "sha256 is required with url",
        ),
        (
            "oci url without the file in the image",
            |o| {
                set(
                    o,
                    "/spec/boot/kernel/url",
                    json!("oci://example.com/guests/debian:13"),
                )
            },
            "oci://IMAGE#/PATH",
        ),
        (
            "disk with two sources",
            |o| set(o, "/spec/disks/0/image", json!({"name": "img"})),
            "exactly one of image or persistentVolumeClaim",
        ),
        (
            "the same port forwarded twice",
            |o| {
                set(
                    o,
                    "/spec/network",
                    json!({"ports": [
                        {"name": "http", "port": 80, "protocol": "TCP"},
                        {"name": "web", "port": 80, "protocol": "TCP"}]}),
                )
            },
            "each port may be forwarded once per protocol",
        ),
        (
            "the launcher's readiness port",
            |o| {
                set(
                    o,
                    "/spec/network",
                    json!({"ports": [{"name": "health", "port": 4041}]}),
                )
            },
            "port 4041 is the launcher pod's readiness port",
        ),
        (
            "reattest too often",
            |o| set(o, "/spec/attestation/reattestEvery", json!("10s")),
            "spec.attestation.reattestEvery",
        ),
    ];
    assert!(cases.len() >= 10);
    for (name, mutate, want) in cases {
        let mut obj = snp_cvm();
        mutate(&mut obj);
        let errs = cel_errors("ConfidentialVM", &obj, None);
        assert!(
            errs.iter()
                .any(|e| e.contains(want) && e.contains("ValidationFailure")),
            "{name}: expected a failure containing {want:?}, got {errs:#?}"
        );
    }
}

#[test]
fn tee_and_resources_are_immutable() {
    let old = snp_cvm();
    let mut new = old.clone();
    set(&mut new, "/spec/tee/policy/debug", json!(true));
    set(&mut new, "/spec/resources/vcpus", json!(4));
    let errs = cel_errors("ConfidentialVM", &new, Some(&old));
    assert!(
        errs.iter().any(|e| e.contains("spec.tee is immutable")),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("spec.resources is immutable")),
        "{errs:#?}"
    );

    // Other fields may change.
    let mut ok = old.clone();
    set(&mut ok, "/spec/attestation/nonce", json!("abcd"));
    set(&mut ok, "/spec/runStrategy", json!("Halted"));
    assert_eq!(
        cel_errors("ConfidentialVM", &ok, Some(&old)),
        Vec::<String>::new()
    );
}

/// A duration the schema pattern refuses (or one that would overflow Go's duration) must
/// not reach `duration()`: the API server runs CEL rules even on a value that failed its
/// pattern, and reports a conversion error next to the pattern's message.
#[test]
fn malformed_durations_are_left_to_the_pattern() {
    for bad in ["soon", "1d", "", "99999999999999999999h", "100000s"] {
        let mut obj = snp_cvm();
        set(&mut obj, "/spec/attestation/reattestEvery", json!(bad));
        assert_eq!(
            cel_errors("ConfidentialVM", &obj, None),
            Vec::<String>::new(),
            "{bad:?}"
        );
    }
    for (good, ok) in [
        ("1m", true),
        ("1h30m", true),
        ("720h", true),
        ("721h", false),
    ] {
        let mut obj = snp_cvm();
        set(&mut obj, "/spec/attestation/reattestEvery", json!(good));
        assert_eq!(
            cel_errors("ConfidentialVM", &obj, None).is_empty(),
            ok,
            "{good:?}"
        );
    }
}

#[test]
fn trusted_roots_need_fingerprints_unless_builtin() {
    let policy = |roots: Value| {
        json!({"apiVersion": "cvmp.io/v1alpha1", "kind": "AttestationPolicy",
               "metadata": {"name": "p"}, "spec": {"trustedRoots": roots}})
    };
    let ok = policy(json!([{"name": "amd"}, {"name": "sim", "sha256Fingerprint": "a".repeat(64)}]));
    assert_eq!(
        cel_errors("AttestationPolicy", &ok, None),
        Vec::<String>::new()
    );

    let unlisted = policy(json!([{"name": "sim"}]));
    let errs = cel_errors("AttestationPolicy", &unlisted, None);
    assert!(
        errs.iter()
            .any(|e| e.contains("sha256Fingerprint is required")),
        "{errs:#?}"
    );

    let pinned_builtin = policy(json!([{"name": "amd", "sha256Fingerprint": "a".repeat(64)}]));
    let errs = cel_errors("AttestationPolicy", &pinned_builtin, None);
    assert!(
        errs.iter()
            .any(|e| e.contains("must not be set for the built-in roots")),
        "{errs:#?}"
    );
}

#[test]
fn migration_spec_is_immutable() {
    let old = json!({"apiVersion": "cvmp.io/v1alpha1", "kind": "ConfidentialVMMigration",
                     "metadata": {"name": "m", "namespace": "default"},
                     "spec": {"cvmName": "a"}});
    let mut new = old.clone();
    set(&mut new, "/spec/cvmName", json!("b"));
    let errs = cel_errors("ConfidentialVMMigration", &new, Some(&old));
    assert!(
        errs.iter().any(|e| e.contains("spec is immutable")),
        "{errs:#?}"
    );
}
