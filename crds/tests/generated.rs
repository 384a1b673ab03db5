//! The committed generated files must match what the code generates.

#[test]
fn crds_yaml_is_fresh() {
    let want = cvm_crds::crds_yaml().expect("render CRDs");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/generated/crds.yaml");
    let have = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        have == want,
        "crds/generated/crds.yaml is stale: run `cargo run -p cvm-crds --bin crdgen -- --write`"
    );
}

#[test]
fn api_docs_are_fresh() {
    let want = cvm_crds::docs::api_markdown().expect("render docs");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api.md");
    let have = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        have == want,
        "docs/api.md is stale: run `cargo run -p cvm-crds --bin crdgen -- --write`"
    );
}

#[test]
fn chart_crds_are_fresh() {
    let want = cvm_crds::schema::chart_crds_yaml().expect("render CRDs");
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/cvm-operator/templates/crds.yaml"
    );
    let have = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        have == want,
        "charts/cvm-operator/templates/crds.yaml is stale: run `cargo run -p cvm-crds --bin crdgen -- --write`"
    );
    // The chart's crds/ folder would be installed once and never upgraded.
    assert!(!std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/cvm-operator/crds"
    ))
    .exists());
}
