//! Every manifest in `examples/` deserializes into the Rust types, passes `validate()`, and
//! passes the CRD's CEL rules.

mod common;

use std::path::PathBuf;

use cvm_crds::{AttestationPolicy, ConfidentialVM, ConfidentialVMMigration, Validate};
use serde::Deserialize;
use serde_json::Value;

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn check<T>(file: &str, doc: &Value)
where
    T: for<'de> Deserialize<'de> + Validate,
{
    let obj: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{file}: does not deserialize: {e}"));
    if let Err(errs) = obj.validate() {
        let msgs: Vec<String> = errs.iter().map(ToString::to_string).collect();
        panic!("{file}: validate() refused it: {msgs:#?}");
    }
}

#[test]
fn examples_are_valid() {
    let mut kinds = Vec::new();
    for name in [
        "sev-snp-cvm.yaml",
        "tdx-cvm.yaml",
        "sev-es-cvm.yaml",
        "attestation-policy.yaml",
        "../e2e/guest/plain-guest-cvm.yaml",
    ] {
        let path = examples_dir().join(name);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for de in serde_yaml::Deserializer::from_str(&text) {
            let doc = Value::deserialize(de).unwrap_or_else(|e| panic!("{name}: {e}"));
            let kind = doc["kind"].as_str().unwrap_or_default().to_string();
            match kind.as_str() {
                "ConfidentialVM" => check::<ConfidentialVM>(name, &doc),
                "AttestationPolicy" => check::<AttestationPolicy>(name, &doc),
                "ConfidentialVMMigration" => check::<ConfidentialVMMigration>(name, &doc),
                other => panic!("{name}: unexpected kind {other:?}"),
            }
            let errs = common::cel_errors(&kind, &doc, None);
            assert!(errs.is_empty(), "{name}: CEL rules refuse it: {errs:#?}");
            kinds.push(kind);
        }
    }
    assert_eq!(kinds.iter().filter(|k| *k == "ConfidentialVM").count(), 4);
    assert_eq!(
        kinds.iter().filter(|k| *k == "AttestationPolicy").count(),
        2
    );
}

#[test]
fn example_policies_trust_the_simulator_only_in_the_demo() {
    let text = std::fs::read_to_string(examples_dir().join("attestation-policy.yaml"))
        .expect("read policy example");
    for de in serde_yaml::Deserializer::from_str(&text) {
        let p = AttestationPolicy::deserialize(de).expect("policy");
        let non_vendor = p
            .spec
            .effective_roots()
            .iter()
            .filter(|r| !r.is_builtin())
            .count();
        match p.metadata.name.as_deref() {
            Some("demo-simulator") => assert_eq!(non_vendor, 2),
            Some("production") => assert_eq!(non_vendor, 0),
            other => panic!("unexpected policy {other:?}"),
        }
    }
}
