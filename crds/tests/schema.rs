//! Shape of the generated CRDs: descriptions everywhere, structural, CEL rules bounded.

mod common;

use common::schema_of;
use serde_json::Value;

const KINDS: [&str; 3] = [
    "ConfidentialVM",
    "AttestationPolicy",
    "ConfidentialVMMigration",
];

fn walk(path: &str, s: &Value, f: &mut dyn FnMut(&str, &Value)) {
    f(path, s);
    if let Some(props) = s.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            walk(&format!("{path}.{k}"), v, f);
        }
    }
    if let Some(items) = s.get("items") {
        walk(&format!("{path}[]"), items, f);
    }
    if let Some(ap) = s.get("additionalProperties").filter(|v| v.is_object()) {
        walk(&format!("{path}{{}}"), ap, f);
    }
}

#[test]
fn every_property_has_a_description() {
    let mut missing = Vec::new();
    for kind in KINDS {
        let schema = schema_of(kind);
        let props = schema["properties"].as_object().expect("properties");
        for (k, v) in props {
            walk(&format!("{kind}.{k}"), v, &mut |path, s| {
                // Array items and map values are described by their field.
                if path.ends_with("[]") || path.ends_with("{}") {
                    return;
                }
                let d = s.get("description").and_then(Value::as_str).unwrap_or("");
                if d.trim().is_empty() {
                    missing.push(path.to_string());
                }
            });
        }
    }
    assert!(
        missing.is_empty(),
        "properties without a description: {missing:#?}"
    );
}

#[test]
fn schemas_are_structural() {
    let mut problems = Vec::new();
    for kind in KINDS {
        walk(kind, &schema_of(kind), &mut |path, s| {
            for bad in ["nullable", "anyOf", "oneOf", "allOf", "$ref", "not"] {
                if s.get(bad).is_some() {
                    problems.push(format!("{path}: has {bad}"));
                }
            }
            if s.get("type").is_none() && s.get("x-kubernetes-int-or-string").is_none() {
                problems.push(format!("{path}: no type"));
            }
            if s.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("map") {
                let keys: Vec<&str> = s["x-kubernetes-list-map-keys"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let req: Vec<&str> = s["items"]["required"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                for k in keys {
                    if !req.contains(&k) {
                        problems.push(format!("{path}: list-map key {k} is not required"));
                    }
                }
            }
        });
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

/// The API server estimates CEL cost from maxLength/maxItems: unbounded strings and lists
/// in spec would make rules exceed the budget (and unbounded input is a bad idea anyway).
#[test]
fn spec_strings_and_lists_are_bounded() {
    let mut unbounded = Vec::new();
    for kind in KINDS {
        let schema = schema_of(kind);
        walk(
            &format!("{kind}.spec"),
            &schema["properties"]["spec"],
            &mut |path, s| {
                match s.get("type").and_then(Value::as_str) {
                    // nodeSelector values (`{}`) are never used in CEL.
                    Some("string")
                        if s.get("maxLength").is_none()
                            && s.get("enum").is_none()
                            && !path.ends_with("{}") =>
                    {
                        unbounded.push(path.to_string())
                    }
                    Some("array") if s.get("maxItems").is_none() => {
                        unbounded.push(path.to_string())
                    }
                    Some("object")
                        if s.get("additionalProperties").is_some()
                            && s.get("maxProperties").is_none() =>
                    {
                        unbounded.push(path.to_string())
                    }
                    _ => {}
                }
            },
        );
    }
    assert!(
        unbounded.is_empty(),
        "unbounded spec fields: {unbounded:#?}"
    );
}

fn rules_at(kind: &str, ptr: &str) -> Vec<(String, String)> {
    schema_of(kind)
        .pointer(ptr)
        .and_then(|s| s.get("x-kubernetes-validations"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|r| {
                    (
                        r["rule"].as_str().unwrap_or_default().to_string(),
                        r["message"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn cel_rules_are_present_and_name_their_field() {
    let spec = "/properties/spec";
    let cases = [
        (
            "ConfidentialVM",
            format!("{spec}/properties/tee"),
            "self == oldSelf",
            "spec.tee is immutable",
        ),
        (
            "ConfidentialVM",
            format!("{spec}/properties/resources"),
            "self == oldSelf",
            "spec.resources is immutable",
        ),
        (
            "ConfidentialVM",
            format!("{spec}/properties/tee"),
            "size(self.hostData) == 64",
            "spec.tee.hostData",
        ),
        (
            "ConfidentialVM",
            format!("{spec}/properties/tee"),
            "size(self.hostData) == 96",
            "spec.tee.hostData",
        ),
        (
            "ConfidentialVM",
            format!("{spec}/properties/tee"),
            "has(self.minimumTcb.bootloader)",
            "spec.tee.minimumTcb",
        ),
        (
            "ConfidentialVM",
            format!("{spec}/properties/tee"),
            "has(self.minimumTcb.tdxTcbStatuses)",
            "spec.tee.minimumTcb.tdxTcbStatuses",
        ),
        (
            "ConfidentialVM",
            format!("{spec}/properties/tee"),
            "has(self.policy.smt)",
            "spec.tee.policy.smt",
        ),
        (
            "ConfidentialVM",
            spec.to_string(),
            "self.tee.type != 'TDX'",
            "spec.cpuModel",
        ),
        (
            "ConfidentialVM",
            spec.to_string(),
            "expectedMeasurements.all",
            "spec.attestation.expectedMeasurements",
        ),
        (
            "ConfidentialVM",
            format!("{spec}/properties/boot"),
            "has(self.kernel)",
            "spec.boot.cmdline",
        ),
        (
            "ConfidentialVM",
            format!("{spec}/properties/attestation/properties/reattestEvery"),
            "duration(self)",
            "spec.attestation.reattestEvery",
        ),
        (
            "AttestationPolicy",
            format!("{spec}/properties/trustedRoots/items"),
            "has(self.sha256Fingerprint)",
            "sha256Fingerprint",
        ),
        (
            "ConfidentialVMMigration",
            spec.to_string(),
            "self == oldSelf",
            "spec is immutable",
        ),
    ];
    for (kind, ptr, rule, msg) in cases {
        let rules = rules_at(kind, &ptr);
        assert!(
            rules.iter().any(|(r, m)| r.contains(rule) && m.contains(msg)),
            "{kind} {ptr}: no rule containing {rule:?} with message naming {msg:?}; have {rules:#?}"
        );
    }
}

#[test]
fn conditions_are_a_list_map_keyed_by_type() {
    for kind in ["ConfidentialVM", "ConfidentialVMMigration"] {
        let c = schema_of(kind)["properties"]["status"]["properties"]["conditions"].clone();
        assert_eq!(c["x-kubernetes-list-type"], "map", "{kind}");
        assert_eq!(
            c["x-kubernetes-list-map-keys"],
            serde_json::json!(["type"]),
            "{kind}"
        );
    }
}

#[test]
fn crd_names_scope_and_columns() {
    let crds = cvm_crds::crds().expect("crds");
    let cvm = crds
        .iter()
        .find(|c| c.spec.names.kind == "ConfidentialVM")
        .expect("cvm");
    assert_eq!(
        cvm.metadata.name.as_deref(),
        Some("confidentialvms.cvmp.io")
    );
    assert_eq!(cvm.spec.scope, "Namespaced");
    assert_eq!(cvm.spec.names.short_names, Some(vec!["cvm".to_string()]));
    let v = &cvm.spec.versions[0];
    assert_eq!(v.name, "v1alpha1");
    assert!(v
        .subresources
        .as_ref()
        .and_then(|s| s.status.as_ref())
        .is_some());
    let cols: Vec<(&str, &str)> = v
        .additional_printer_columns
        .as_ref()
        .expect("columns")
        .iter()
        .map(|c| (c.name.as_str(), c.json_path.as_str()))
        .collect();
    assert_eq!(
        cols,
        vec![
            ("Phase", ".status.phase"),
            ("Node", ".status.nodeName"),
            ("TEE", ".spec.tee.type"),
            (
                "Verified",
                ".status.conditions[?(@.type==\"Verified\")].status"
            ),
            ("Age", ".metadata.creationTimestamp"),
        ]
    );
    let policy = crds
        .iter()
        .find(|c| c.spec.names.kind == "AttestationPolicy")
        .expect("policy");
    assert_eq!(policy.spec.scope, "Cluster");
}

/// `kubectl get X` resolves a category before a short name: a category spelled like a
/// short name would make `kubectl get cvm` list policies and migrations too.
#[test]
fn categories_do_not_shadow_short_names() {
    let crds = cvm_crds::crds().expect("crds");
    let short: Vec<String> = crds
        .iter()
        .flat_map(|c| c.spec.names.short_names.clone().unwrap_or_default())
        .collect();
    for crd in &crds {
        let cats = crd.spec.names.categories.clone().unwrap_or_default();
        assert_eq!(cats, vec!["cvmp".to_string()], "{}", crd.spec.names.kind);
        for cat in cats {
            assert!(!short.contains(&cat), "category {cat} shadows a short name");
            assert_ne!(cat, crd.spec.names.plural);
            assert_ne!(Some(&cat), crd.spec.names.singular.as_ref());
        }
    }
}

/// Doc comments' source line breaks would show up inside `kubectl explain`'s own wrapping.
#[test]
fn descriptions_are_reflowed() {
    let mut broken = Vec::new();
    for kind in KINDS {
        walk(kind, &schema_of(kind), &mut |path, s| {
            let d = s.get("description").and_then(Value::as_str).unwrap_or("");
            if d.replace("\n\n", "").contains('\n') || d != d.trim() {
                broken.push(format!("{path}: {d:?}"));
            }
        });
    }
    assert!(broken.is_empty(), "{broken:#?}");
    let tee = schema_of("ConfidentialVM")["properties"]["spec"]["properties"]["tee"]["description"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(tee.contains("Immutable: delete and recreate"), "{tee}");
    assert_eq!(cvm_crds::schema::reflow("a\nb\n\n c  d \n"), "a b\n\nc d");
}

/// The duration rules repeat the schema pattern as a guard, so that a value the pattern
/// refuses is not also a CEL conversion error on the API server.
#[test]
fn duration_rules_are_guarded_by_the_pattern() {
    let spec = "/properties/spec";
    for (kind, ptr) in [
        (
            "ConfidentialVM",
            format!("{spec}/properties/attestation/properties/reattestEvery"),
        ),
        (
            "AttestationPolicy",
            format!("{spec}/properties/maxEvidenceAge"),
        ),
    ] {
        let field = schema_of(kind).pointer(&ptr).cloned().expect("field");
        assert_eq!(
            field["pattern"],
            cvm_crds::common::DURATION_PATTERN,
            "{kind}"
        );
        let rules = rules_at(kind, &ptr);
        assert_eq!(rules.len(), 1, "{kind}");
        let guard = format!(
            "!self.matches('{}') || ",
            cvm_crds::common::DURATION_PATTERN
        );
        assert!(rules[0].0.starts_with(&guard), "{kind}: {}", rules[0].0);
    }
}
