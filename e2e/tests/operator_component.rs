//! The operator alone against the real API server: no node plugin runs; the harness
//! publishes each node's TEE labels and key capacity (as a plugin would) and the test
//! writes the plugin's share of a CVM's status itself, as a scripted stand-in. Covers
//! placement within capacity, the finalizer, re-placement off a cordoned node, and an
//! invalid or unreadable object as status while the rest keep reconciling, and a policy
//! change alone changing the verdict.

mod common_cvm;

use common_cvm::{api, apply_json, condition, cvm, kubectl, POLICY, WAIT};
use cvm_crds::wellknown::{FINALIZER, MANAGER_NODE_PLUGIN};
use cvm_crds::ConfidentialVM;
use cvm_e2e::system::{System, SystemOptions};
use cvm_e2e::{wait, SimNode, Tee};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::ResourceExt;
use serde_json::json;

fn operator_only(nodes: Vec<SimNode>) -> System {
    let mut opts = SystemOptions::new(env!("CARGO_BIN_EXE_cvm-dev"), nodes);
    opts.plugins = false;
    opts.operator = false;
    System::start(opts).expect("system starts")
}

fn reason<'a>(c: &'a ConfidentialVM, t: &str) -> (&'a str, &'a str) {
    condition(c, t).map_or(("", ""), |x| (x.status.as_str(), x.reason.as_str()))
}

/// What a node plugin reports once it stopped the guest (its field manager, its fields).
async fn plugin_reports_stopped(cvms: &Api<ConfidentialVM>, name: &str) {
    let body = json!({
        "apiVersion": "cvmp.io/v1alpha1", "kind": "ConfidentialVM",
        "status": {
            "platform": {"guestState": "Stopped"},
            "conditions": [{
                "type": "Launched", "status": "False", "reason": "GuestStopped",
                "message": "stopped by the test's stand-in plugin",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            }],
        },
    });
    cvms.patch_status(
        name,
        &PatchParams::apply(MANAGER_NODE_PLUGIN).force(),
        &Patch::Apply(&body),
    )
    .await
    .expect("the stand-in plugin writes its share");
}

/// Applies `obj` once the CVM schema no longer holds the rule at `rule` (a path below
/// `openAPIV3Schema`): an object stored before its CRD had that rule, as an older CRD
/// would have let in. The API server may take a moment to serve the loosened schema.
fn apply_past_removed_rule(sys: &System, rule: &str, obj: &serde_json::Value) {
    let patch = json!([{
        "op": "remove",
        "path": format!("/spec/versions/0/schema/openAPIV3Schema{rule}"),
    }]);
    kubectl(
        sys,
        &[
            "patch",
            "crd",
            "confidentialvms.cvmp.io",
            "--type=json",
            "-p",
            &patch.to_string(),
        ],
    )
    .expect("loosening the CRD");
    let mut applied = apply_json(sys, obj);
    for _ in 0..50 {
        if applied.is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        applied = apply_json(sys, obj);
    }
    applied.expect("the loosened API server takes it");
}

#[tokio::test]
async fn placement_keys_the_finalizer_and_an_invalid_spec_beside_valid_ones() {
    let mut n = SimNode::new("only", Some(Tee::SevSnp));
    n.tee_slots = 1;
    let sys = operator_only(vec![n]);
    common_cvm::trust_simulator(&sys, POLICY);
    sys.start_operator("operator-0").unwrap();
    let (_, cvms) = api(&sys, "comp").await;

    // One key on the only node: the first CVM is bound, the second waits with the
    // scheduler's count, the invalid one says what to change and is never placed.
    apply_json(&sys, &cvm("a", "comp", "SEV-SNP")).unwrap();
    let a = wait::until(&cvms, "a", WAIT, "a bound", |c| c.node_name().is_some())
        .await
        .unwrap();
    assert_eq!(a.node_name(), Some("only"));
    assert!(a.finalizers().iter().any(|f| f == FINALIZER));
    apply_json(&sys, &cvm("b", "comp", "SEV-SNP")).unwrap();
    // An object stored before its CRD had a rule (here: the API server's rule on
    // reattestEvery removed, as an older CRD would lack it) reaches the operator invalid.
    let mut bad = cvm("bad", "comp", "SEV-SNP");
    bad["spec"]["attestation"]["reattestEvery"] = json!("30s");
    apply_past_removed_rule(
        &sys,
        "/properties/spec/properties/attestation/properties/reattestEvery/x-kubernetes-validations",
        &bad,
    );
    let b = wait::until(&cvms, "b", WAIT, "b waiting for a key", |c| {
        reason(c, "Scheduled") == ("False", "Unschedulable")
    })
    .await
    .unwrap();
    let msg = &condition(&b, "Scheduled").unwrap().message;
    assert!(msg.contains("have no free"), "{msg}");
    let bad = wait::until(&cvms, "bad", WAIT, "bad InvalidSpec", |c| {
        reason(c, "Stalled") == ("True", "InvalidSpec")
    })
    .await
    .unwrap();
    assert_eq!(reason(&bad, "Ready"), ("False", "InvalidSpec"));
    let why = &condition(&bad, "Stalled").unwrap().message;
    assert!(
        why.contains("spec.attestation.reattestEvery") && why.contains("1m and 720h"),
        "{why}"
    );
    assert_eq!(bad.node_name(), None);

    // One the Rust type cannot read at all (the CRD loosened: any TEE name): a status
    // saying so, and the others keep reconciling (b is bound below).
    let mut broken = cvm("broken", "comp", "SEV-SNP");
    broken["spec"]["tee"]["type"] = json!("SEV-QUANTUM");
    apply_past_removed_rule(
        &sys,
        "/properties/spec/properties/tee/properties/type/enum",
        &broken,
    );
    let raw: Api<kube::api::DynamicObject> = Api::namespaced_with(
        sys.cp.client().await.unwrap(),
        "comp",
        &kube::api::ApiResource::erase::<ConfidentialVM>(&()),
    );
    let stalled = wait::until(&raw, "broken", WAIT, "broken InvalidObject", |o| {
        o.data["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Stalled" && c["reason"] == "InvalidObject")
    })
    .await
    .unwrap();
    let text = stalled.data["status"].to_string();
    assert!(
        text.contains("cannot read this ConfidentialVM") && text.contains("SEV-QUANTUM"),
        "{text}"
    );

    // Deleting a: the finalizer holds until the plugin says the guest stopped; then the
    // key is free and b is bound.
    cvms.delete("a", &DeleteParams::default()).await.unwrap();
    let held = wait::until(&cvms, "a", WAIT, "a terminating", |c| {
        c.metadata.deletion_timestamp.is_some()
    })
    .await
    .unwrap();
    assert!(held.finalizers().iter().any(|f| f == FINALIZER));
    assert!(
        cvms.get_opt("b")
            .await
            .unwrap()
            .unwrap()
            .node_name()
            .is_none(),
        "b bound while a still holds the key"
    );
    plugin_reports_stopped(&cvms, "a").await;
    wait::gone(&cvms, "a", WAIT).await.unwrap();
    let b = wait::until(&cvms, "b", WAIT, "b bound once a's key is free", |c| {
        c.node_name().is_some()
    })
    .await
    .unwrap();
    assert_eq!(b.node_name(), Some("only"));
}

#[tokio::test]
async fn a_cordoned_node_lets_the_cvm_go_elsewhere_with_its_pod() {
    let sys = operator_only(vec![
        SimNode::new("node-a", Some(Tee::SevSnp)),
        SimNode::new("node-b", Some(Tee::SevSnp)),
    ]);
    sys.start_operator_with("operator-0", &["--launcher-image=cvm-launcher:test"])
        .unwrap();
    let (client, cvms) = api(&sys, "comp2").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "comp2");
    let nodes: Api<Node> = Api::all(client);

    apply_json(&sys, &cvm("web", "comp2", "SEV-SNP")).unwrap();
    let web = wait::until(&cvms, "web", WAIT, "web bound", |c| c.node_name().is_some())
        .await
        .unwrap();
    let first = web.node_name().unwrap().to_string();
    let pod_name = cvm_operator::launcher::pod_name("web");
    let pinned = |p: &Pod| cvm_operator::launcher::pinned_node(p).map(str::to_string);
    let pod = wait::until(&pods, &pod_name, WAIT, "its launcher pod", |_| true)
        .await
        .unwrap();
    assert_eq!(pinned(&pod).as_deref(), Some(first.as_str()));
    // Cordoned while its pod has not started: the CVM is placed on the other node, the
    // status names the node it left, and the pod follows it.
    nodes
        .patch(
            &first,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": true}})),
        )
        .await
        .unwrap();
    let moved = wait::until(&cvms, "web", WAIT, "web bound to the other node", |c| {
        c.node_name().is_some_and(|n| n != first)
    })
    .await
    .unwrap();
    let refused = &moved.status.as_ref().unwrap().refused_nodes;
    assert_eq!(
        refused
            .iter()
            .map(|r| (r.node.as_str(), r.reason.as_str()))
            .collect::<Vec<_>>(),
        vec![(first.as_str(), "NodeCordoned")]
    );
    let second = moved.node_name().unwrap().to_string();
    wait::until(
        &pods,
        &pod_name,
        WAIT,
        "the pod pinned to the new node",
        |p| pinned(p).as_deref() == Some(second.as_str()),
    )
    .await
    .unwrap();

    let _ = kubectl(
        &sys,
        &["delete", "cvm", "web", "-n", "comp2", "--wait=false"],
    );
}

/// The plugin's part, scripted: a simulated host (the harness's shared simulator roots)
/// launches the guest and signs its evidence; the test writes what a plugin writes.
async fn stand_in_reports_running(sys: &System, cvms: &Api<ConfidentialVM>, name: &str) {
    use cvm_node_plugin::platform::{GuestRequest, Platform};
    use cvm_node_plugin::{config::SimConfig, sim::SimPlatform, status};
    let cvm = cvms.get(name).await.unwrap();
    let node = cvm.node_name().unwrap().to_string();
    let state = tempfile::tempdir().unwrap();
    let host = SimPlatform::open_with_roots(
        SimConfig::default(),
        state.path(),
        &sys.sim_root_dir(),
        &node,
    )
    .unwrap();
    let guest = host
        .launch(&GuestRequest::from_cvm(&cvm).unwrap())
        .await
        .unwrap();
    let uid = cvm.metadata.uid.clone().unwrap();
    let challenge = cvm_crds::wire::challenge_for(cvm.nonce(), &uid, None).unwrap();
    let raw = host.evidence(&uid, &challenge).await.unwrap();
    let now =
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    let ev = cvm_crds::wire::encode(&raw, &challenge, now.clone());
    let facts = status::facts(
        &host.capabilities(),
        &guest,
        cvm_crds::cvm::GuestState::Running,
        None,
    );
    let cond = status::launched_condition(
        &cvm,
        true,
        status::REASON_RUNNING,
        "running (the test's stand-in plugin)".into(),
        now,
    );
    cvms.patch_status(
        name,
        &PatchParams::apply(MANAGER_NODE_PLUGIN).force(),
        &Patch::Apply(status::apply_patch(&facts, Some(&ev), &cond)),
    )
    .await
    .expect("the stand-in plugin writes its share");
}

#[tokio::test]
async fn a_policy_change_alone_changes_the_verdict() {
    let sys = operator_only(vec![SimNode::new("n1", Some(Tee::SevSnp))]);
    common_cvm::trust_simulator(&sys, POLICY);
    sys.start_operator("operator-0").unwrap();
    let (_, cvms) = api(&sys, "comp3").await;
    apply_json(&sys, &cvm("web", "comp3", "SEV-SNP")).unwrap();
    wait::until(&cvms, "web", WAIT, "web bound", |c| c.node_name().is_some())
        .await
        .unwrap();
    stand_in_reports_running(&sys, &cvms, "web").await;
    wait::until(&cvms, "web", WAIT, "web Verified", |c| {
        reason(c, "Verified").0 == "True"
    })
    .await
    .unwrap();

    // The policy stops trusting the simulator: the same evidence is refused, and nothing
    // but the policy changed.
    apply_json(
        &sys,
        &json!({"apiVersion": "cvmp.io/v1alpha1", "kind": "AttestationPolicy",
                "metadata": {"name": POLICY},
                "spec": {"trustedRoots": [{"name": "amd"}, {"name": "intel"}]}}),
    )
    .unwrap();
    let refused = wait::until(
        &cvms,
        "web",
        WAIT,
        "web refused under the new policy",
        |c| reason(c, "Verified").0 == "False",
    )
    .await
    .unwrap();
    let msg = &condition(&refused, "Verified").unwrap().message;
    assert!(msg.to_lowercase().contains("root"), "{msg}");
    // Trusted again: Verified again, on the same evidence.
    common_cvm::trust_simulator(&sys, POLICY);
    wait::until(&cvms, "web", WAIT, "web Verified again", |c| {
        reason(c, "Verified").0 == "True"
    })
    .await
    .unwrap();
}
