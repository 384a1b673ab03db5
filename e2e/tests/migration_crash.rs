//! Live migration when its parties die: kill -9 of the operator, the source plugin or the
//! target plugin at each phase, a target that vanishes mid-transfer, a CVM deleted
//! mid-migration. Every migration converges (Succeeded or Failed, never stuck); after
//! Succeeded the guest runs on the target only, after Failed on exactly one node.
//!
//! Its own test binary: it kills the shared system's operator, which other tests' CVMs
//! would otherwise feel.

mod common_cvm;

use common_cvm::*;
use cvm_crds::{ConfidentialVM, ConfidentialVMMigration, MigrationPhase};
use cvm_e2e::system::{plugin_name, System};
use cvm_e2e::{wait, SimNode, Tee};
use kube::api::{Api, DeleteParams};
use serde_json::json;
use std::time::{Duration, Instant};

const OPERATOR: &str = "operator-0";
/// Short enough for a vanished target to fail the migration within the test.
const MIGRATION_TIMEOUT: &str = "--migration-timeout=20s";

fn node(name: &str, pool: &str) -> SimNode {
    let mut n = SimNode::new(name, Some(Tee::SevSnp));
    n.extra_labels.insert("cvmp.io/pool".into(), pool.into());
    n.tee_slots = 32;
    // Slow launches, so that the phase before the target is ready can be caught.
    n.sim_settings = Some(json!({"launchDelayMs": 400}));
    n
}

fn migratable(name: &str, ns: &str, pool: &str) -> serde_json::Value {
    let mut m = cvm(name, ns, "SEV-SNP");
    m["spec"]["nodeSelector"] = json!({"cvmp.io/pool": pool});
    m["spec"]["tee"]["policy"] = json!({"migratable": true});
    set_expected_to_simulated(&mut m);
    m
}

fn phase(m: &ConfidentialVMMigration) -> MigrationPhase {
    m.status.as_ref().and_then(|s| s.phase).unwrap_or_default()
}

fn rank(p: MigrationPhase) -> u8 {
    match p {
        MigrationPhase::Pending => 0,
        MigrationPhase::TargetReady => 1,
        MigrationPhase::TargetAttested => 2,
        MigrationPhase::Transferring => 3,
        MigrationPhase::Succeeded | MigrationPhase::Failed => 4,
    }
}

#[derive(Debug, Clone, Copy)]
enum Victim {
    Operator,
    Source,
    Target,
}

struct Setup {
    sys: std::sync::Arc<System>,
    pool: String,
    nodes: [SimNode; 2],
}

/// The system with two nodes of a pool of this test's own, and (once per binary) the
/// operator restarted with a migration timeout a test can wait out.
async fn setup(pool: &str) -> Setup {
    let sys = system();
    static OPERATOR_READY: std::sync::Once = std::sync::Once::new();
    OPERATOR_READY.call_once(|| {
        sys.kill(OPERATOR);
        sys.start_operator_with(OPERATOR, &[MIGRATION_TIMEOUT])
            .expect("operator restarts");
    });
    let nodes = [
        node(&format!("cvm-node-{pool}-a"), pool),
        node(&format!("cvm-node-{pool}-b"), pool),
    ];
    for n in &nodes {
        sys.add_node(n.clone()).await.expect("node added");
    }
    Setup {
        sys,
        pool: pool.to_string(),
        nodes,
    }
}

impl Setup {
    fn node(&self, name: &str) -> &SimNode {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or(&self.nodes[0])
    }

    fn restart(&self, v: Victim, source: &str, target: &str) {
        match v {
            Victim::Operator => {
                self.sys.kill(OPERATOR);
                self.sys
                    .start_operator_with(OPERATOR, &[MIGRATION_TIMEOUT])
                    .expect("operator restarts");
            }
            Victim::Source | Victim::Target => {
                // At Pending the target may not be chosen yet: in a pool of two it can
                // only be the other node (restarting a node that was never killed would
                // start a second plugin on its state directory).
                let other = self
                    .nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .find(|n| *n != source)
                    .unwrap_or_default();
                let n = match v {
                    Victim::Source => source,
                    _ if target.is_empty() => other,
                    _ => target,
                };
                self.sys.kill(&plugin_name(n));
                self.sys
                    .start_plugin(self.node(n))
                    .expect("plugin restarts");
            }
        }
    }
}

/// A verified CVM in its own namespace: `(cvms, migrations, uid, source node)`.
async fn verified_cvm(
    s: &Setup,
    ns: &str,
) -> (
    Api<ConfidentialVM>,
    Api<ConfidentialVMMigration>,
    String,
    String,
) {
    let sys = &s.sys;
    let (client, cvms) = api(sys, ns).await;
    apply_json(sys, &migratable("g", ns, &s.pool)).expect("CVM applies");
    let c = wait::until(&cvms, "g", WAIT, "Verified=True", |c| {
        cond_is(c, "Verified", "True")
    })
    .await
    .expect("verified before the migration");
    let uid = c.metadata.uid.clone().expect("uid");
    let source = c.node_name().expect("bound").to_string();
    (cvms, Api::namespaced(client, ns), uid, source)
}

fn migrate(sys: &System, ns: &str) {
    apply_json(
        sys,
        &json!({"apiVersion": "cvmp.io/v1alpha1", "kind": "ConfidentialVMMigration",
                "metadata": {"name": "mv", "namespace": ns}, "spec": {"cvmName": "g"}}),
    )
    .expect("migration applies");
}

/// Polls until the migration is at `at` or later; returns the phase seen.
async fn reach(migs: &Api<ConfidentialVMMigration>, at: MigrationPhase) -> MigrationPhase {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(m) = migs.get("mv").await {
            if rank(phase(&m)) >= rank(at) {
                return phase(&m);
            }
        }
        assert!(Instant::now() < deadline, "never reached {at:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn finished(migs: &Api<ConfidentialVMMigration>) -> ConfidentialVMMigration {
    wait::until(migs, "mv", WAIT, "Succeeded or Failed", |m| {
        rank(phase(m)) == 4
    })
    .await
    .expect("the migration converges")
}

/// After the end: Succeeded leaves the guest on the target only, Failed on exactly one
/// node (the source before the switch, the target after it).
async fn exactly_one_copy(
    sys: &System,
    cvms: &Api<ConfidentialVM>,
    m: &ConfidentialVMMigration,
    uid: &str,
    source: &str,
) -> String {
    let st = m.status.clone().unwrap_or_default();
    let target = st.target_node.clone().unwrap_or_default();
    let c = cvms.get("g").await.expect("CVM");
    let home = c.node_name().unwrap_or_default().to_string();
    if phase(m) == MigrationPhase::Succeeded {
        assert_eq!(
            home, target,
            "a Succeeded migration leaves the CVM on its target"
        );
    }
    assert!(home == source || home == target, "the CVM is on {home}");
    let other = if home == source { &target } else { source };
    wait_guest(sys, &home, uid, true).await;
    if !other.is_empty() {
        wait_guest(sys, other, uid, false).await;
    }
    home
}

#[tokio::test]
async fn kill_9_at_each_phase_converges_with_one_copy_of_the_guest() {
    let s = setup("crash-kill").await;
    let sys = s.sys.clone();
    let cases = [
        (Victim::Operator, MigrationPhase::Pending),
        (Victim::Operator, MigrationPhase::TargetAttested),
        (Victim::Operator, MigrationPhase::Transferring),
        (Victim::Source, MigrationPhase::Pending),
        (Victim::Source, MigrationPhase::TargetAttested),
        (Victim::Source, MigrationPhase::Transferring),
        (Victim::Target, MigrationPhase::Pending),
        (Victim::Target, MigrationPhase::TargetAttested),
        (Victim::Target, MigrationPhase::Transferring),
    ];
    for (i, (victim, at)) in cases.into_iter().enumerate() {
        let ns = format!("crash-mig-{i}");
        let (cvms, migs, uid, source) = verified_cvm(&s, &ns).await;
        let t0 = Instant::now();
        migrate(&sys, &ns);
        let seen = reach(&migs, at).await;
        let m = migs.get("mv").await.expect("migration");
        let target = m
            .status
            .as_ref()
            .and_then(|s| s.target_node.clone())
            .unwrap_or_default();
        s.restart(victim, &source, &target);
        let done = finished(&migs).await;
        if phase(&done) == MigrationPhase::Failed {
            println!(
                "  failed: {}",
                done.status
                    .as_ref()
                    .and_then(|s| s.message.clone())
                    .unwrap_or_default()
            );
        }
        let home = exactly_one_copy(&sys, &cvms, &done, &uid, &source).await;
        println!(
            "kill -9 {victim:?} at {seen:?} (asked {at:?}): {:?} in {:.1} s; guest on {home}{}",
            phase(&done),
            t0.elapsed().as_secs_f64(),
            done.status
                .as_ref()
                .and_then(|s| s.reason)
                .map(|r| format!(", reason {r}"))
                .unwrap_or_default()
        );
        if phase(&done) == MigrationPhase::Succeeded {
            wait::until(&cvms, "g", WAIT, "Verified on the target", |c| {
                cond_is(c, "Verified", "True") && c.node_name() == Some(home.as_str())
            })
            .await
            .expect("verified on the target");
        }
    }
}

#[tokio::test]
async fn a_cvm_deleted_mid_migration_fails_it_and_leaves_no_guest() {
    let s = setup("crash-del").await;
    let sys = s.sys.clone();
    let ns = "crash-mig-deleted";
    let (cvms, migs, uid, source) = verified_cvm(&s, ns).await;
    migrate(&sys, ns);
    reach(&migs, MigrationPhase::Pending).await;
    let target = migs
        .get("mv")
        .await
        .ok()
        .and_then(|m| m.status.and_then(|s| s.target_node));
    cvms.delete("g", &DeleteParams::default())
        .await
        .expect("CVM deleted");
    let done = finished(&migs).await;
    assert_eq!(phase(&done), MigrationPhase::Failed);
    let reason = done.status.as_ref().and_then(|s| s.reason);
    assert!(
        matches!(
            reason,
            Some(cvm_crds::MigrationReason::CvmDeleting | cvm_crds::MigrationReason::CvmNotFound)
        ),
        "{reason:?}"
    );
    wait_guest(&sys, &source, &uid, false).await;
    if let Some(t) = target {
        wait_guest(&sys, &t, &uid, false).await;
    }
    println!("CVM deleted mid-migration: Failed, reason {reason:?}, no guest left");
}

#[tokio::test]
async fn a_target_that_vanishes_mid_transfer_fails_the_migration() {
    let s = setup("crash-gone").await;
    let sys = s.sys.clone();
    let ns = "crash-mig-vanish";
    let (cvms, migs, uid, source) = verified_cvm(&s, ns).await;
    migrate(&sys, ns);
    reach(&migs, MigrationPhase::TargetAttested).await;
    let m = migs.get("mv").await.expect("migration");
    let target = m
        .status
        .as_ref()
        .and_then(|s| s.target_node.clone())
        .expect("target chosen");
    // The target host dies: its plugin is gone and its Node object is deleted.
    sys.kill(&plugin_name(&target));
    let client = sys.cp.client().await.expect("client");
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client);
    sys.cp.stop_heartbeat(&target);
    nodes
        .delete(&target, &DeleteParams::default())
        .await
        .expect("node deleted");
    let t0 = Instant::now();
    let done = finished(&migs).await;
    assert_eq!(phase(&done), MigrationPhase::Failed, "{:?}", done.status);
    let reason = done.status.as_ref().and_then(|s| s.reason);
    println!(
        "target {target} vanished mid-transfer: Failed ({reason:?}) {:.1} s later",
        t0.elapsed().as_secs_f64()
    );
    // Failed before the switch: the guest stays on the source; after it, the CVM says
    // where its guest was lost.
    let c = cvms.get("g").await.expect("CVM");
    if c.node_name() == Some(source.as_str()) {
        wait_guest(&sys, &source, &uid, true).await;
        assert!(cond_is(&c, "Ready", "True") || cond_is(&c, "Verified", "True"));
    } else {
        assert_eq!(c.node_name(), Some(target.as_str()));
        let ready = condition(&c, "Ready").expect("Ready");
        assert_eq!(ready.reason, "NodeLost", "{}", ready.message);
    }
}
