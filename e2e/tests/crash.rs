//! Crashes mid-flight: SIGKILL the operator and a node plugin while guests launch, and
//! while a deletion waits on a plugin. After restart: no second launch, no orphan guest.

mod common_cvm;

use common_cvm::{apply_json, cond_is, cvm, guests_on, wait_guest, POLICY, WAIT};
use cvm_crds::cvm::GuestState;
use cvm_crds::ConfidentialVM;
use cvm_e2e::system::{plugin_name, System, SystemOptions};
use cvm_e2e::{wait, SimNode, Tee};
use kube::api::{Api, DeleteParams};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};

fn guest_state(c: &ConfidentialVM) -> Option<GuestState> {
    c.status.as_ref()?.platform.as_ref()?.guest_state
}

#[tokio::test]
async fn crashes_leave_no_duplicate_or_orphan_guest() {
    let nodes = SimNode::fleet(2, &[Tee::SevSnp]);
    let mut opts = SystemOptions::new(env!("CARGO_BIN_EXE_cvm-dev"), nodes.clone());
    // Slow launches, so that a crash lands while guests are Launching.
    opts.launch_delay_ms = 1500;
    let sys = System::start(opts).expect("system starts");
    common_cvm::trust_simulator(&sys, POLICY);
    let client = sys.cp.client().await.unwrap();
    common_cvm::namespace(&client, "crash").await;
    let cvms: Api<ConfidentialVM> = Api::namespaced(client, "crash");
    let items: Vec<_> = (0..6)
        .map(|i| cvm(&format!("c{i}"), "crash", "SEV-SNP"))
        .collect();
    apply_json(
        &sys,
        &json!({"apiVersion": "v1", "kind": "List", "items": items}),
    )
    .unwrap();

    // Crash both while a launch is in flight.
    let launching = wait::until(&cvms, "c0", WAIT, "c0 launching or running", |c| {
        matches!(
            guest_state(c),
            Some(GuestState::Launching | GuestState::Running)
        )
    })
    .await
    .unwrap();
    let node = launching.node_name().unwrap().to_string();
    sys.kill("operator-0");
    sys.kill(&plugin_name(&node));
    assert!(!sys.running().contains(&"operator-0".to_string()));

    // What had launched before the crash must not launch again.
    let before: BTreeMap<String, String> = cvms
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter(|c| guest_state(c) == Some(GuestState::Running))
        .filter_map(|c| {
            let at = c.status.as_ref()?.platform.as_ref()?.launched_at.as_ref()?;
            Some((c.metadata.name.clone()?, at.0.to_string()))
        })
        .collect();

    sys.start_operator("operator-0").unwrap();
    let sim = nodes.iter().find(|n| n.name == node).unwrap();
    sys.start_plugin(sim).unwrap();
    for i in 0..6 {
        wait::until(&cvms, &format!("c{i}"), WAIT, "Verified", |c| {
            cond_is(c, "Verified", "True")
        })
        .await
        .unwrap();
    }
    let after = cvms.list(&Default::default()).await.unwrap().items;
    for c in &after {
        let name = c.metadata.name.clone().unwrap();
        if let Some(at) = before.get(&name) {
            let now = c
                .status
                .as_ref()
                .unwrap()
                .platform
                .as_ref()
                .unwrap()
                .launched_at
                .as_ref()
                .unwrap();
            assert_eq!(&now.0.to_string(), at, "{name} was launched a second time");
        }
    }
    assert_guests_match(&sys, &nodes, &after);

    // Delete while the plugin is down: the object waits (finalizer), then the restarted
    // plugin stops the guest and the object goes; no orphan remains.
    let victim = after
        .iter()
        .find(|c| c.node_name() == Some(node.as_str()))
        .unwrap();
    let victim_name = victim.metadata.name.clone().unwrap();
    let victim_uid = victim.metadata.uid.clone().unwrap();
    sys.kill(&plugin_name(&node));
    cvms.delete(&victim_name, &DeleteParams::default())
        .await
        .unwrap();
    let t = wait::until(&cvms, &victim_name, WAIT, "Terminating", |c| {
        c.phase() == cvm_crds::CvmPhase::Terminating
    })
    .await
    .unwrap();
    assert!(t.metadata.deletion_timestamp.is_some());
    assert!(
        guests_on(&sys, &node).contains(&victim_uid),
        "the guest still runs while its plugin is down"
    );
    sys.start_plugin(sim).unwrap();
    wait::gone(&cvms, &victim_name, WAIT).await.unwrap();
    wait_guest(&sys, &node, &victim_uid, false).await;
    let remaining = cvms.list(&Default::default()).await.unwrap().items;
    assert_guests_match(&sys, &nodes, &remaining);
}

/// Each node's plugin holds exactly the guests of the CVMs bound to it.
fn assert_guests_match(sys: &System, nodes: &[SimNode], cvms: &[ConfidentialVM]) {
    for n in nodes {
        let held: BTreeSet<String> = guests_on(sys, &n.name).into_iter().collect();
        let bound: BTreeSet<String> = cvms
            .iter()
            .filter(|c| c.node_name() == Some(n.name.as_str()))
            .filter_map(|c| c.metadata.uid.clone())
            .collect();
        assert_eq!(
            held, bound,
            "guests on {} differ from the CVMs bound to it",
            n.name
        );
    }
}
