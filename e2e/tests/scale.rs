//! Time from `kubectl apply` to `Verified=True`, for one CVM and for 100 applied at once.
//! Prints the figures; asserts only that every CVM verifies (times are measured, not
//! asserted: see the benchmark rule).

mod common_cvm;

use common_cvm::{apply_json, cond_is, cvm, POLICY};
use cvm_crds::ConfidentialVM;
use cvm_e2e::system::{System, SystemOptions};
use cvm_e2e::{SimNode, Tee};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use std::time::{Duration, Instant};

async fn until_verified(cvms: &Api<ConfidentialVM>, n: usize, timeout: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let list = cvms.list(&Default::default()).await.expect("list");
        let done = list
            .items
            .iter()
            .filter(|c| cond_is(c, "Verified", "True"))
            .count();
        if done >= n {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < timeout,
            "only {done}/{n} verified after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn apply_to_verified_for_one_and_for_a_hundred() {
    let nodes: Vec<SimNode> = (0..4)
        .map(|i| {
            let mut n = SimNode::new(format!("scale-{i}"), Some(Tee::SevSnp));
            n.tee_slots = 32;
            n
        })
        .collect();
    let sys =
        System::start(SystemOptions::new(env!("CARGO_BIN_EXE_cvm-dev"), nodes)).expect("system");
    common_cvm::trust_simulator(&sys, POLICY);
    let client = sys.cp.client().await.unwrap();
    for ns in ["scale-one", "scale-many"] {
        common_cvm::namespace(&client, ns).await;
    }

    let one: Api<ConfidentialVM> = Api::namespaced(client.clone(), "scale-one");
    let t0 = Instant::now();
    apply_json(&sys, &cvm("solo", "scale-one", "SEV-SNP")).unwrap();
    until_verified(&one, 1, Duration::from_secs(60)).await;
    let single = t0.elapsed();

    let many: Api<ConfidentialVM> = Api::namespaced(client, "scale-many");
    let items: Vec<_> = (0..100)
        .map(|i| cvm(&format!("m{i:03}"), "scale-many", "SEV-SNP"))
        .collect();
    let t0 = Instant::now();
    apply_json(
        &sys,
        &json!({"apiVersion": "v1", "kind": "List", "items": items}),
    )
    .unwrap();
    let applied = t0.elapsed();
    until_verified(&many, 100, Duration::from_secs(300)).await;
    let hundred = t0.elapsed();

    println!(
        "apply -> Verified=True, 1 CVM: {:.2} s",
        single.as_secs_f64()
    );
    println!(
        "apply -> Verified=True, 100 CVMs at once: {:.2} s for all (kubectl apply itself {:.2} s), {:.1} CVMs/s",
        hundred.as_secs_f64(),
        applied.as_secs_f64(),
        100.0 / hundred.as_secs_f64()
    );
    let list = many.list(&Default::default()).await.unwrap();
    let mut per_node = std::collections::BTreeMap::new();
    for c in &list.items {
        *per_node
            .entry(c.node_name().unwrap_or("-").to_string())
            .or_insert(0) += 1;
    }
    println!("placement: {per_node:?}");
    assert!(
        per_node.values().all(|&n| n <= 32),
        "no node over its 32 ASIDs: {per_node:?}"
    );
}

/// A burst of deletes, then more watch events than any buffer between the watch and the
/// controllers holds: a CVM applied after that is still reconciled from its watch event.
/// (With kube's shared streams a subscriber stalled on the reference of a deleted object,
/// the buffer filled and the operator saw no new CVM until its requeue timers fired.)
#[tokio::test]
async fn the_operator_keeps_watching_after_a_delete_burst() {
    let nodes: Vec<SimNode> = (0..2)
        .map(|i| {
            let mut n = SimNode::new(format!("burst-{i}"), Some(Tee::SevSnp));
            n.tee_slots = 32;
            n
        })
        .collect();
    let sys =
        System::start(SystemOptions::new(env!("CARGO_BIN_EXE_cvm-dev"), nodes)).expect("system");
    common_cvm::trust_simulator(&sys, POLICY);
    let client = sys.cp.client().await.unwrap();
    let ns = "delete-burst";
    common_cvm::namespace(&client, ns).await;
    let cvms: Api<ConfidentialVM> = Api::namespaced(client, ns);

    for round in 0..2 {
        let items: Vec<_> = (0..30)
            .map(|i| cvm(&format!("r{round}-{i:02}"), ns, "SEV-SNP"))
            .collect();
        apply_json(
            &sys,
            &json!({"apiVersion": "v1", "kind": "List", "items": items}),
        )
        .unwrap();
        until_verified(&cvms, 30, Duration::from_secs(180)).await;
        common_cvm::kubectl(&sys, &["delete", "cvm", "--all", "-n", ns, "--wait=false"]).unwrap();
        let t0 = Instant::now();
        loop {
            let left = cvms
                .list(&Default::default())
                .await
                .expect("list")
                .items
                .len();
            if left == 0 {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "{left} CVMs of round {round} still there 120 s after the delete"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // 1,500 watch events on one CVM: more than a shared stream's buffer (1,024).
    apply_json(&sys, &cvm("churn", ns, "SEV-SNP")).unwrap();
    until_verified(&cvms, 1, Duration::from_secs(60)).await;
    for i in 0..1500 {
        let patch = json!({"metadata": {"annotations": {"e2e.cvmp.io/churn": i.to_string()}}});
        cvms.patch("churn", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }

    let t0 = Instant::now();
    apply_json(&sys, &cvm("after", ns, "SEV-SNP")).unwrap();
    // Well under the operator's 60 s requeue: only the watch event can bring it in time.
    until_verified(&cvms, 2, Duration::from_secs(40)).await;
    println!(
        "after a delete burst and 1,500 watch events: apply -> Verified=True {:.2} s",
        t0.elapsed().as_secs_f64()
    );
}
