//! Live migration through the real API server, the operator and simulated node plugins
//! as processes: a verified guest moves only to a target whose evidence passes the CVM's
//! own policy; refusals and a failed target attestation leave it where it was.

mod common_cvm;

use common_cvm::*;
use cvm_crds::wellknown::{ANNOTATION_MIGRATED_AT, LABEL_NODE};
use cvm_crds::{ConfidentialVM, ConfidentialVMMigration, MigrationPhase};
use cvm_e2e::wait;
use cvm_e2e::{SimNode, Tee};
use kube::api::Api;
use serde_json::{json, Value};

fn migration(name: &str, ns: &str, cvm: &str, target: Option<&str>) -> Value {
    let mut v = json!({
        "apiVersion": "cvmp.io/v1alpha1", "kind": "ConfidentialVMMigration",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"cvmName": cvm},
    });
    if let Some(t) = target {
        v["spec"]["targetNode"] = t.into();
    }
    v
}

/// A migratable SNP CVM confined to one node pool.
fn migratable_cvm(name: &str, ns: &str, pool: &str, policy: &str) -> Value {
    let mut m = cvm(name, ns, "SEV-SNP");
    m["spec"]["nodeSelector"] = json!({"cvmp.io/pool": pool});
    m["spec"]["tee"]["policy"] = json!({"migratable": true});
    m["spec"]["attestation"]["policyRef"] = policy.into();
    set_expected_to_simulated(&mut m);
    m
}

fn pool_node(name: &str, pool: &str) -> SimNode {
    let mut n = SimNode::new(name, Some(Tee::SevSnp));
    n.extra_labels.insert("cvmp.io/pool".into(), pool.into());
    n
}

async fn wait_finished(
    api: &Api<ConfidentialVMMigration>,
    name: &str,
) -> Result<ConfidentialVMMigration, String> {
    wait::until(api, name, WAIT, "phase Succeeded or Failed", |m| {
        m.status
            .as_ref()
            .and_then(|s| s.phase)
            .is_some_and(MigrationPhase::is_terminal)
    })
    .await
}

fn message(m: &ConfidentialVMMigration) -> String {
    m.status
        .as_ref()
        .and_then(|s| s.message.clone())
        .unwrap_or_default()
}

fn phase(m: &ConfidentialVMMigration) -> Option<MigrationPhase> {
    m.status.as_ref().and_then(|s| s.phase)
}

#[tokio::test]
async fn a_verified_cvm_moves_to_an_attested_target_and_is_verified_there() {
    let sys = system();
    let ns = "e2e-migrate";
    for n in ["cvm-node-mig-a", "cvm-node-mig-b"] {
        sys.add_node(pool_node(n, "migrate")).await.unwrap();
    }
    let (client, cvms) = api(&sys, ns).await;
    let migs: Api<ConfidentialVMMigration> = Api::namespaced(client, ns);
    apply_json(&sys, &migratable_cvm("mover", ns, "migrate", POLICY)).unwrap();
    let before = wait::until(&cvms, "mover", WAIT, "Verified=True", |c| {
        cond_is(c, "Verified", "True")
    })
    .await
    .unwrap();
    let source = before.node_name().expect("bound").to_string();
    let target = if source == "cvm-node-mig-a" {
        "cvm-node-mig-b"
    } else {
        "cvm-node-mig-a"
    };
    let uid = before.metadata.uid.clone().expect("uid");
    assert!(cond_is(&before, "LiveMigratable", "True"));

    apply_json(&sys, &migration("mover-1", ns, "mover", None)).unwrap();
    let done = wait_finished(&migs, "mover-1").await.unwrap();
    assert_eq!(
        phase(&done),
        Some(MigrationPhase::Succeeded),
        "{}",
        message(&done)
    );
    let st = done.status.clone().unwrap_or_default();
    assert_eq!(st.source_node.as_deref(), Some(source.as_str()));
    // The operator picked the only other node of the pool.
    assert_eq!(st.target_node.as_deref(), Some(target));
    assert!(st.target_evidence.is_some(), "target evidence recorded");
    let appraisal = st.target_attestation.expect("target appraised");
    assert_eq!(
        serde_json::to_value(appraisal.status).unwrap(),
        "affirming",
        "{:?}",
        appraisal.findings
    );
    assert!(st.started_at.is_some() && st.completed_at.is_some());

    // The CVM verifies on the target: only the target's chip counts now (its HostPin), so
    // whatever the source still reports is refused, never taken for the moved guest.
    let after = wait::until(&cvms, "mover", WAIT, "Verified=True on the target", |c| {
        cond_is(c, "Verified", "True") && c.node_name() == Some(target)
    })
    .await
    .unwrap();
    assert_eq!(after.metadata.uid.as_deref(), Some(uid.as_str()));
    assert_eq!(after.node_name(), Some(target));
    assert_eq!(
        after
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_NODE)),
        Some(&target.to_string())
    );
    assert!(
        cond_is(&after, "Verified", "True"),
        "{:?}",
        after
            .status
            .as_ref()
            .map(|s| (&s.conditions, &s.attestation, &s.guest_instance))
    );
    let annotations = after.metadata.annotations.clone().unwrap_or_default();
    assert!(annotations.contains_key(ANNOTATION_MIGRATED_AT));
    // Verified on evidence bound to this migration, from the instance that was moved.
    let st = after.status.as_ref().expect("status");
    let mig_uid = done.metadata.uid.clone().expect("uid");
    assert_eq!(
        annotations.get(cvm_crds::wellknown::ANNOTATION_MIGRATION),
        Some(&mig_uid)
    );
    assert_eq!(
        st.attestation.as_ref().and_then(|a| a.migration.as_deref()),
        Some(mig_uid.as_str())
    );
    let pin = st.guest_instance.as_ref().expect("pinned");
    let pin_before = before
        .status
        .as_ref()
        .and_then(|s| s.guest_instance.as_ref())
        .expect("pinned before");
    assert_eq!(
        pin.key_sha256, pin_before.key_sha256,
        "the same instance, moved"
    );
    assert_eq!(pin.node, target);
    assert_eq!(pin.relaunches, 0);

    // The owner's own check after the move: `kubectl cvm attest` with their nonce and
    // the simulator root binds the moved guest (its report data includes the migration).
    let fps = cvm_e2e::system::sim_root_fingerprints(&sys).unwrap();
    let root = fps
        .iter()
        .find(|(n, _)| n == "cvm-sim-amd")
        .map(|(_, fp)| format!("sha256:{fp}"))
        .expect("simulator root");
    // A migratable guest has a migration agent: the owner's policy must allow one.
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!("snp:\n  trustedRoots: [\"{root}\"]\n  allowMigrationAgent: true\n"),
    )
    .unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_cvm-dev"))
        .arg("kubectl-cvm")
        .env("KUBECONFIG", sys.cp.kubeconfig())
        .args([
            "attest", "mover", "-n", ns, "--nonce", "0a0b0c0d", "--policy",
        ])
        .arg(&policy)
        .args(["--timeout", "60s"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(text.contains("result: AFFIRMED"), "{text}");

    // The guest now lives on the target only.
    wait_guest(&sys, target, &uid, true).await;
    wait_guest(&sys, &source, &uid, false).await;
    let table = kubectl(&sys, &["get", "cvmmig", "-n", ns]).unwrap();
    assert!(
        table.contains("mover-1") && table.contains("Succeeded"),
        "{table}"
    );
}

#[tokio::test]
async fn refused_migrations_say_why_and_leave_the_guest_alone() {
    let sys = system();
    let ns = "e2e-migrate-refused";
    sys.add_node(pool_node("cvm-node-mig-r1", "migrate-refused"))
        .await
        .unwrap();
    sys.add_node(pool_node("cvm-node-mig-r2", "migrate-refused"))
        .await
        .unwrap();
    let (client, cvms) = api(&sys, ns).await;
    let migs: Api<ConfidentialVMMigration> = Api::namespaced(client, ns);
    // Not migratable: the guest policy keeps the default (migration off).
    let mut m = cvm("stay", ns, "SEV-SNP");
    m["spec"]["nodeSelector"] = json!({"cvmp.io/pool": "migrate-refused"});
    apply_json(&sys, &m).unwrap();
    let c = wait::until(&cvms, "stay", WAIT, "Verified=True", |c| {
        cond_is(c, "Verified", "True")
    })
    .await
    .unwrap();
    let node = c.node_name().expect("bound").to_string();

    // Through the user's client: exit 1 and the operator's reason.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cvm-dev"))
        .args(["kubectl-cvm", "--kubeconfig"])
        .arg(sys.cp.kubeconfig())
        .args(["-n", ns, "migrate", "stay", "--wait", "--timeout", "90s"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("created")
            && stdout.contains("Failed")
            && stdout.contains("PolicyForbidsMigration"),
        "{stdout}"
    );

    apply_json(&sys, &migration("ghost-1", ns, "ghost", None)).unwrap();
    let ghost = wait_finished(&migs, "ghost-1").await.unwrap();
    assert_eq!(phase(&ghost), Some(MigrationPhase::Failed));
    assert!(
        message(&ghost).starts_with("CVMNotFound"),
        "{}",
        message(&ghost)
    );

    apply_json(&sys, &migration("self-1", ns, "stay", Some(&node))).unwrap();
    let to_self = wait_finished(&migs, "self-1").await.unwrap();
    assert_eq!(phase(&to_self), Some(MigrationPhase::Failed));

    let still: ConfidentialVM = cvms.get("stay").await.unwrap();
    assert_eq!(still.node_name(), Some(node.as_str()));
    assert!(cond_is(&still, "Verified", "True"));
    assert!(cond_is(&still, "LiveMigratable", "False"));
}

#[tokio::test]
async fn a_target_below_the_minimum_tcb_fails_attestation_and_the_guest_stays() {
    let sys = system();
    let ns = "e2e-migrate-tcb";
    let policy = "e2e-mig-tcb";
    let roots = cvm_e2e::demo::demo_trusted_roots(&sys).unwrap();
    apply_json(
        &sys,
        &json!({
            "apiVersion": "cvmp.io/v1alpha1", "kind": "AttestationPolicy",
            "metadata": {"name": policy},
            "spec": {
                "trustedRoots": roots,
                "allowedGuestPolicy": {"migratable": true},
                "minimumTcb": {"bootloader": 3, "tee": 0, "snp": 20, "microcode": 200},
            },
        }),
    )
    .unwrap();
    sys.add_node(pool_node("cvm-node-mig-current", "migrate-tcb"))
        .await
        .unwrap();
    let (client, cvms) = api(&sys, ns).await;
    let migs: Api<ConfidentialVMMigration> = Api::namespaced(client, ns);
    apply_json(&sys, &migratable_cvm("guarded", ns, "migrate-tcb", policy)).unwrap();
    let c = wait::until(&cvms, "guarded", WAIT, "Verified=True", |c| {
        cond_is(c, "Verified", "True")
    })
    .await
    .unwrap();
    assert_eq!(c.node_name(), Some("cvm-node-mig-current"));
    let uid = c.metadata.uid.clone().expect("uid");

    // A host that joins later with firmware below the policy's minimum.
    let mut old = pool_node("cvm-node-mig-old", "migrate-tcb");
    old.sim_settings = Some(json!({
        "snpTcb": {"bootloader": 1, "tee": 0, "snp": 23, "microcode": 213}
    }));
    sys.add_node(old).await.unwrap();
    // Its plugin publishes the TEE label once it has detected the host; before that an
    // explicit target is refused (NoTarget) as unable to take the guest.
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(sys.cp.client().await.unwrap());
    let snp = cvm_crds::wellknown::nfd_label(cvm_crds::TeeType::SevSnp);
    wait::until(&nodes, "cvm-node-mig-old", WAIT, "SEV-SNP label", |n| {
        n.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(snp))
            .is_some_and(|v| v == "true")
    })
    .await
    .unwrap();
    apply_json(
        &sys,
        &migration("guarded-1", ns, "guarded", Some("cvm-node-mig-old")),
    )
    .unwrap();
    let done = wait_finished(&migs, "guarded-1").await.unwrap();
    assert_eq!(phase(&done), Some(MigrationPhase::Failed));
    let msg = message(&done);
    assert!(
        msg.contains("cvm-node-mig-old") && msg.to_lowercase().contains("tcb"),
        "{msg}"
    );
    let st = done.status.clone().unwrap_or_default();
    let appraisal = st.target_attestation.expect("the target was appraised");
    assert_ne!(serde_json::to_value(appraisal.status).unwrap(), "affirming");

    // Rolled back: still on its node, still verified, and the receiving guest is gone.
    let still: ConfidentialVM = cvms.get("guarded").await.unwrap();
    assert_eq!(still.node_name(), Some("cvm-node-mig-current"));
    assert!(cond_is(&still, "Verified", "True"));
    wait_guest(&sys, "cvm-node-mig-old", &uid, false).await;
    wait_guest(&sys, "cvm-node-mig-current", &uid, true).await;
}
