//! How Flux (kstatus) and Argo CD (the chart's Lua health script) judge a ConfidentialVM
//! in each state the operator writes, computed by their own code: the kstatus tool built
//! from sigs.k8s.io/cli-utils and the real `lua5.1`. The objects are hand-built as
//! `kubectl get cvm -o json` prints them, with the conditions `operator/src/state.rs`
//! derives for that state.
//!
//! Needs Go (to build the kstatus tool once) and lua5.1 (`e2e/tools/install-host-deps.sh`);
//! without them it is skipped, except under `CI=true`, where that is a failure.

use cvm_e2e::gitops::{self, GitopsError, Health};
use serde_json::{json, Value};
use std::path::Path;

// ---------------------------------------------------------------------------------------
// Helpers

/// Whether the tools are here; outside CI a missing one skips the test with a note.
fn tools_ready() -> bool {
    let missing: Vec<GitopsError> = [
        gitops::kstatus_binary().err(),
        gitops::lua_available().err(),
    ]
    .into_iter()
    .flatten()
    .collect();
    for e in &missing {
        assert!(e.is_missing_tool(), "{e}");
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI must run the GitOps health tests: {e}"
        );
        eprintln!("skipped: {e}");
    }
    missing.is_empty()
}

fn cond(ty: &str, status: &str, reason: &str, message: &str) -> Value {
    json!({
        "type": ty,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-01-01T00:00:00Z",
        "observedGeneration": 1,
    })
}

/// A CVM at `metadata.generation` 1 with `status` (None: the operator has not written one).
fn cvm(status: Option<Value>) -> Value {
    let mut o = json!({
        "apiVersion": "cvmp.io/v1alpha1",
        "kind": "ConfidentialVM",
        "metadata": {
            "name": "snp-demo",
            "namespace": "default",
            "uid": "0b7e8f51-3c2a-4d6e-9f10-2a1b3c4d5e6f",
            "generation": 1,
            "resourceVersion": "4711",
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "finalizers": ["cvmp.io/guest"],
            "managedFields": null,
        },
        "spec": {
            "tee": {"type": "SEV-SNP", "policy": {"migratable": false}},
            "resources": {"vcpus": 2, "memory": "2Gi"},
            "runStrategy": "Always",
        },
    });
    if let Some(s) = status {
        o["status"] = s;
    }
    o
}

/// The operator's status: `phase`, `observedGeneration` 1 and these conditions.
fn status(phase: &str, conditions: Vec<Value>) -> Option<Value> {
    Some(json!({
        "phase": phase,
        "nodeName": "sim-snp-0",
        "observedGeneration": 1,
        "conditions": conditions,
    }))
}

const DONE: [(&str, &str); 2] = [
    ("Done", "the operator's work on this CVM is done"),
    ("Done", "nothing blocks this CVM"),
];

fn done() -> Vec<Value> {
    vec![
        cond("Reconciling", "False", DONE[0].0, DONE[0].1),
        cond("Stalled", "False", DONE[1].0, DONE[1].1),
    ]
}

fn reconciling(reason: &str, message: &str) -> Vec<Value> {
    vec![
        cond("Reconciling", "True", reason, message),
        cond(
            "Stalled",
            "False",
            "Progressing",
            "the operator is making progress",
        ),
    ]
}

fn stalled(reason: &str, message: &str) -> Vec<Value> {
    vec![
        cond("Reconciling", "False", reason, "waiting for someone to act"),
        cond("Stalled", "True", reason, message),
    ]
}

fn placed() -> Value {
    cond("Scheduled", "True", "Bound", "bound to node sim-snp-0")
}

fn launched() -> Value {
    cond("Launched", "True", "GuestRunning", "the guest runs")
}

const VERIFIED_MSG: &str = "the evidence satisfies policy default/snp-baseline";
const AWAITING_MSG: &str = "waiting for the node plugin's evidence";
const REJECTED_MSG: &str =
    "measurement-mismatch: measurement mismatch: expected ab12, reported cd34";
const UNSCHEDULABLE_MSG: &str = "0/3 nodes fit: 2 lack SEV-SNP, 1 has too little memory";

fn verified() -> Value {
    let mut cs = vec![
        placed(),
        launched(),
        cond("Verified", "True", "Affirming", VERIFIED_MSG),
        cond(
            "Ready",
            "True",
            "RunningVerified",
            "the guest runs and its evidence is verified",
        ),
        cond(
            "LiveMigratable",
            "False",
            "PolicyForbids",
            "spec.tee.policy.migratable is false",
        ),
    ];
    cs.extend(done());
    cvm(status("Verified", cs))
}

/// An SEV guest: the operator cannot appraise its evidence, the owner does. `Ready` is
/// what `state.rs` writes for a running guest handed to its owner.
fn owner_verifies() -> Value {
    let mut cs = vec![
        placed(),
        launched(),
        cond(
            "Verified",
            "False",
            "OwnerVerificationRequired",
            "SEV evidence carries no signed report; verify it yourself",
        ),
        cond(
            "Ready",
            "True",
            "OwnerVerificationRequired",
            "the guest runs; its owner verifies it (kubectl cvm attest); Verified stays False",
        ),
    ];
    cs.extend(done());
    let mut o = cvm(status("Running", cs));
    o["spec"]["tee"]["type"] = json!("SEV");
    o
}

fn stopped() -> Value {
    let mut cs = vec![
        placed(),
        cond(
            "Launched",
            "False",
            "GuestStopped",
            "the guest was stopped as asked",
        ),
        cond("Verified", "Unknown", "AwaitingEvidence", AWAITING_MSG),
        cond(
            "Ready",
            "True",
            "Halted",
            "the guest is stopped, as spec.runStrategy Halted asks",
        ),
    ];
    cs.extend(done());
    let mut o = cvm(status("Stopped", cs));
    o["spec"]["runStrategy"] = json!("Halted");
    o
}

/// kstatus's and Argo CD's verdicts on `obj`.
fn judge(obj: &Value) -> (Health, Health) {
    let text = obj.to_string();
    (
        gitops::kstatus(&text).unwrap_or_else(|e| panic!("kstatus: {e}")),
        gitops::argocd_health(&text).unwrap_or_else(|e| panic!("Argo CD health: {e}")),
    )
}

// ---------------------------------------------------------------------------------------
// Tests

#[test]
fn flux_and_argo_cd_read_each_state_of_a_cvm() {
    if !tools_ready() {
        return;
    }
    let mut stale = verified();
    stale["metadata"]["generation"] = json!(2);
    let mut deleting = cvm(status(
        "Terminating",
        [placed(), launched()]
            .into_iter()
            .chain(reconciling(
                "Deleting",
                "the node plugin is stopping the guest before the CVM goes",
            ))
            .collect(),
    ));
    deleting["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:05:00Z");
    deleting["metadata"]["deletionGracePeriodSeconds"] = json!(0);

    // (state, object, kstatus status, a piece of its message, Argo status, a piece of its message)
    let rows: Vec<(&str, Value, &str, &str, &str, String)> = vec![
        // Before the operator's first write the API server serves the CRD's default
        // status, observedGeneration 0: kstatus waits (without it, it would say Current).
        (
            "no status yet (as served)",
            cvm(Some(json!({"observedGeneration": 0}))),
            "InProgress",
            "latest observed generation is 0",
            "Progressing",
            "waiting for the operator to observe generation 1".into(),
        ),
        (
            "no status at all",
            cvm(None),
            "Current",
            "Resource is current",
            "Progressing",
            "waiting for the operator to observe generation 1".into(),
        ),
        (
            "stale observedGeneration",
            stale,
            "InProgress",
            "generation is 2, but latest observed generation is 1",
            "Progressing",
            "waiting for the operator to observe generation 2".into(),
        ),
        (
            "Reconciling AwaitingEvidence",
            cvm(status(
                "Running",
                [
                    placed(),
                    launched(),
                    cond("Verified", "Unknown", "AwaitingEvidence", AWAITING_MSG),
                    cond(
                        "Ready",
                        "False",
                        "NotVerified",
                        "the guest's evidence is not verified",
                    ),
                ]
                .into_iter()
                .chain(reconciling("AwaitingEvidence", AWAITING_MSG))
                .collect(),
            )),
            "InProgress",
            AWAITING_MSG,
            "Progressing",
            format!("AwaitingEvidence: {AWAITING_MSG}"),
        ),
        (
            "Verified",
            verified(),
            "Current",
            "Resource is Ready",
            "Healthy",
            format!("Affirming: {VERIFIED_MSG}"),
        ),
        // kstatus reads Ready when neither Reconciling nor Stalled is True: the operator
        // writes Ready=True once its share is done (see ready_decides_kstatus_once_the_operator_is_done).
        (
            "OwnerVerificationRequired",
            owner_verifies(),
            "Current",
            "Resource is Ready",
            "Healthy",
            "the owner must verify the evidence: kubectl cvm attest snp-demo".into(),
        ),
        (
            "Stalled EvidenceRejected",
            cvm(status(
                "Running",
                [
                    placed(),
                    launched(),
                    cond("Verified", "False", "EvidenceRejected", REJECTED_MSG),
                    cond(
                        "Ready",
                        "False",
                        "NotVerified",
                        "the guest's evidence is not verified",
                    ),
                ]
                .into_iter()
                .chain(stalled("EvidenceRejected", REJECTED_MSG))
                .collect(),
            )),
            "Failed",
            REJECTED_MSG,
            "Degraded",
            format!("EvidenceRejected: {REJECTED_MSG}"),
        ),
        (
            "Stalled Unschedulable",
            {
                let mut o = cvm(status(
                    "Pending",
                    [
                        cond("Scheduled", "False", "Unschedulable", UNSCHEDULABLE_MSG),
                        cond("Verified", "Unknown", "AwaitingEvidence", AWAITING_MSG),
                        cond(
                            "Ready",
                            "False",
                            "GuestNotRunning",
                            "the guest is not running yet",
                        ),
                    ]
                    .into_iter()
                    .chain(stalled("Unschedulable", UNSCHEDULABLE_MSG))
                    .collect(),
                ));
                if let Some(s) = o["status"].as_object_mut() {
                    s.remove("nodeName");
                }
                o
            },
            "Failed",
            UNSCHEDULABLE_MSG,
            "Degraded",
            format!("Unschedulable: {UNSCHEDULABLE_MSG}"),
        ),
        (
            "Stopped",
            stopped(),
            "Current",
            "Resource is Ready",
            "Suspended",
            "stopped".into(),
        ),
        (
            "deleting",
            deleting,
            "Terminating",
            "Resource scheduled for deletion",
            "Progressing",
            "being deleted".into(),
        ),
    ];

    let mut wrong = Vec::new();
    for (state, obj, ks, ks_msg, argo, argo_msg) in &rows {
        let (k, a) = judge(obj);
        println!(
            "{state:<30} kstatus {:<11} {:?}\n{:<30} Argo CD {:<11} {:?}",
            k.status, k.message, "", a.status, a.message
        );
        if k.status != *ks || !k.message.contains(ks_msg) {
            wrong.push(format!(
                "{state}: kstatus said {k:?}, want {ks} with {ks_msg:?}"
            ));
        }
        if a.status != *argo || !a.message.contains(argo_msg) {
            wrong.push(format!(
                "{state}: Argo CD said {a:?}, want {argo} with {argo_msg:?}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// kstatus's rule for a CVM whose Reconciling and Stalled are both False: the `Ready`
/// condition decides (True: Current, False or Unknown: InProgress). Why the operator
/// writes Ready=True for an SEV guest handed to its owner and for a stopped CVM: with
/// False, Flux would wait on them forever.
#[test]
fn ready_decides_kstatus_once_the_operator_is_done() {
    if !tools_ready() {
        return;
    }
    for mut obj in [owner_verifies(), stopped()] {
        let name = obj["status"]["phase"].to_string();
        let argo_before = judge(&obj).1;
        assert_eq!(judge(&obj).0.status, "Current", "{name} as written");
        let Some(conditions) = obj["status"]["conditions"].as_array_mut() else {
            panic!("the fixture has no conditions");
        };
        for c in conditions.iter_mut().filter(|c| c["type"] == "Ready") {
            c["status"] = json!("False");
        }
        let (k, a) = judge(&obj);
        assert_eq!(k.status, "InProgress", "{name} with Ready=False: {k:?}");
        // The Argo CD script never reads Ready.
        assert_eq!(a, argo_before, "{name}");
    }
}

/// A message with Lua's string delimiters and escapes, control bytes and UTF-8 reaches
/// both tools and comes back byte for byte.
#[test]
fn messages_survive_the_trip_through_lua_and_kstatus() {
    if !tools_ready() {
        return;
    }
    let nasty = "quote \" apostrophe ' back\\slash \\\" \\n not-a-newline\nnewline\r\n\
                 ]] ]=] [[long]] [==[ -- comment \0 NUL \t tab \u{7f} ünïcödé 🔐 \\0659 end\\";
    let obj = cvm(status(
        "Running",
        [placed(), launched()]
            .into_iter()
            .chain(stalled("EvidenceRejected", nasty))
            .collect(),
    ));
    let (k, a) = judge(&obj);
    assert_eq!(k.status, "Failed");
    assert_eq!(k.message, nasty);
    assert_eq!(a.status, "Degraded");
    assert_eq!(a.message, format!("EvidenceRejected: {nasty}"));

    // Keys and the name are escaped as well as values.
    let mut odd = owner_verifies();
    odd["metadata"]["name"] = json!("a\"]]\n\\b");
    odd["metadata"]["annotations"] = json!({"\"]] = nil --": "x", "": "empty key"});
    let a = judge(&odd).1;
    assert_eq!(a.status, "Healthy");
    assert!(
        a.message.ends_with("kubectl cvm attest a\"]]\n\\b"),
        "{a:?}"
    );
}

/// Argo CD gives a user's health script only the base and table libraries; the driver
/// does the same, so a script that would fail in Argo CD fails here.
#[test]
fn the_lua_environment_is_as_bare_as_argo_cds() {
    if !tools_ready() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let obj = verified().to_string();
    for (what, body) in [
        (
            "string library",
            "return { status = string.upper('healthy') }",
        ),
        ("string methods", "return { status = ('Healthy'):lower() }"),
        ("io", "io.write('x') return { status = 'Healthy' }"),
        ("os", "return { status = os.getenv('HOME') }"),
    ] {
        let script = dir.path().join("health.lua");
        std::fs::write(&script, body).expect("write script");
        match gitops::argocd_health_with(&script, &obj) {
            Err(GitopsError::Failed { stderr, .. }) => {
                assert!(stderr.contains("raised an error"), "{what}: {stderr}")
            }
            other => panic!("{what} should be unavailable, got {other:?}"),
        }
    }
    let script = dir.path().join("ok.lua");
    std::fs::write(
        &script,
        "local hs = {} hs.status = 'Healthy' hs.message = obj.metadata.name .. tostring(#obj.spec.tee.type) return hs",
    )
    .expect("write script");
    let h = gitops::argocd_health_with(&script, &obj).expect("a base-library script runs");
    assert_eq!(
        (h.status.as_str(), h.message.as_str()),
        ("Healthy", "snp-demo7")
    );
    std::fs::write(&script, "return { status = 'Fine' }").expect("write script");
    let h = gitops::argocd_health_with(&script, &obj).expect("runs");
    assert_eq!(
        h.status, "Unknown",
        "Argo CD reads a status outside its set as Unknown"
    );
}

#[test]
fn bad_input_is_refused_with_a_hint() {
    for input in ["", "[]", "null", "{\"kind\":"] {
        let e = gitops::argocd_health(input).expect_err(input);
        assert!(e.to_string().contains("kubectl get"), "{input:?}: {e}");
    }
}

/// docs/gitops.md embeds the script for copying into argocd-cm; it must be the one the
/// chart ships.
#[test]
fn the_documented_health_script_is_the_shipped_one() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let doc = std::fs::read_to_string(root.join("docs/gitops.md")).expect("docs/gitops.md");
    let shipped = std::fs::read_to_string(gitops::health_script()).expect("the health script");
    let Some(start) = doc.find("```lua\n") else {
        panic!("docs/gitops.md has no ```lua block");
    };
    let body = &doc[start + "```lua\n".len()..];
    let Some(end) = body.find("\n```") else {
        panic!("docs/gitops.md: the ```lua block is not closed");
    };
    let embedded = &body[..=end];
    assert!(
        embedded == shipped,
        "docs/gitops.md's ```lua block differs from charts/cvm-operator/files/argocd-health.lua; \
         copy the file into the block verbatim"
    );
}
