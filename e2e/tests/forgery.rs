//! Forgeries by a compromised host, written with a node plugin's own bound token through
//! the chart's node restriction, against the running operator and simulated plugins
//! (docs/evidence-binding.md). Each must be refused with a finding that says why.
//!
//! The host here is node A's plugin identity: it may write `status.evidence` and
//! `status.platform` of the CVMs bound to node A, and nothing else. It copies other CVMs'
//! genuine evidence, presents a second genuine instance of the same CVM, and flips the
//! platform flags it reports.

mod common_cvm;

use anyhow::{bail, Context, Result};
use common_cvm::*;
use cvm_crds::cvm::Evidence;
use cvm_crds::ConfidentialVM;
use cvm_e2e::system::System;
use cvm_e2e::{wait, SimNode, Tee};
use cvm_node_plugin::platform::{GuestRequest, Platform};
use cvm_node_plugin::status::FIELD_MANAGER;
use cvm_node_plugin::{SimConfig, SimPlatform};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::Client;
use serde_json::json;
use std::time::{Duration, Instant};

const RELEASE: &str = "forge";
const CHART_NS: &str = "cvm-forge";
const NS: &str = "e2e-forgery";
const NODE_A: &str = "cvm-node-forge-a-sev-snp";
const NODE_B: &str = "cvm-node-forge-b-sev-snp";
const NONCE: &str = "c0ffee01";

/// The system with two dedicated SNP nodes and the chart's node restriction installed.
async fn setup() -> std::sync::Arc<System> {
    let sys = system();
    for node in [NODE_A, NODE_B] {
        let mut n = SimNode::new(node, Some(Tee::SevSnp));
        n.extra_labels.insert("cvmp.io/pool".into(), "forge".into());
        sys.add_node(n).await.expect("node added");
    }
    install_chart(&sys, RELEASE, CHART_NS, &[]);
    sys
}

/// A client with the token kubelet would give node `node`'s plugin pod: bound to a Pod on
/// that node, so it carries the node-name claim the node restriction reads.
async fn plugin_client(sys: &System, admin: &Client, node: &str) -> Result<Client> {
    let sa = format!("{RELEASE}-node-plugin");
    cvm_e2e::tokens::node_bound_client(sys.cp.kubeconfig(), admin, CHART_NS, &sa, node).await
}

/// A CVM pinned to `node`; SNP CVMs are appraised under the policy trusting the simulator.
fn manifest(name: &str, node: &str, tee: &str) -> serde_json::Value {
    let mut v = cvm(name, NS, tee);
    v["spec"]["nodeSelector"] = json!({"kubernetes.io/hostname": node});
    v["spec"]["attestation"]["nonce"] = json!(NONCE);
    if tee != "SEV-SNP" {
        // No policy: the built-in defaults, which trust no simulator root.
        v["spec"]["attestation"]
            .as_object_mut()
            .map(|a| a.remove("policyRef"));
    }
    v
}

async fn verified(cvms: &Api<ConfidentialVM>, name: &str) -> ConfidentialVM {
    wait::until(cvms, name, WAIT, "Verified=True", |c| {
        cond_is(c, "Verified", "True")
    })
    .await
    .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Writes `evidence` (and `platform`, when given) into `name`'s status as the forger, with
/// a distinctive collectedAt so the operator's re-appraisal of exactly this write can be
/// awaited; returns that time.
async fn forge(
    as_plugin: &Api<ConfidentialVM>,
    name: &str,
    mut evidence: Evidence,
    platform: Option<serde_json::Value>,
    tag: i64,
) -> Result<Time> {
    // Whole seconds: the API server keeps no more.
    let at = k8s_openapi::jiff::Timestamp::from_second(
        k8s_openapi::jiff::Timestamp::now().as_second() + tag,
    )?;
    evidence.collected_at = Time(at);
    let mut status = json!({"evidence": evidence});
    if let Some(p) = platform {
        status["platform"] = p;
    }
    // A merge patch changes just these fields and keeps the plugin's others (platform
    // facts, Launched), as a host rewriting only the evidence would.
    as_plugin
        .patch_status(
            name,
            &PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            },
            &Patch::Merge(json!({"status": status})),
        )
        .await
        .with_context(|| format!("the forger's write to {name} was refused by admission"))?;
    Ok(Time(at))
}

/// Waits for the operator's appraisal of the evidence collected at `at`; returns the CVM.
async fn appraised(cvms: &Api<ConfidentialVM>, name: &str, at: &Time) -> ConfidentialVM {
    wait::until(cvms, name, WAIT, "appraisal of the forged evidence", |c| {
        c.status
            .as_ref()
            .and_then(|s| s.attestation.as_ref())
            .is_some_and(|a| a.evidence_collected_at.as_ref() == Some(at))
    })
    .await
    .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn checks(c: &ConfidentialVM) -> Vec<String> {
    c.status
        .as_ref()
        .and_then(|s| s.attestation.as_ref())
        .map(|a| a.findings.iter().map(|f| f.check.clone()).collect())
        .unwrap_or_default()
}

fn evidence(c: &ConfidentialVM) -> Evidence {
    c.status
        .as_ref()
        .and_then(|s| s.evidence.clone())
        .expect("evidence")
}

async fn write_allowed(as_plugin: &Api<ConfidentialVM>, name: &str) -> Result<()> {
    // The node restriction is loaded by admission asynchronously: wait until it denies a
    // write of the verdict, so that the forgeries below go through the real boundary.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = as_plugin
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"attestation": null}})),
            )
            .await;
        match r {
            Err(kube::Error::Api(e)) if e.code == 403 || e.code == 422 => return Ok(()),
            _ if Instant::now() > deadline => {
                bail!("the node restriction never denied the forger a write of the verdict")
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

#[tokio::test]
async fn a_host_cannot_pass_off_other_evidence_or_flip_its_flags() -> Result<()> {
    let sys = setup().await;
    let (admin, cvms) = api(&sys, NS).await;
    // rp-c on node B; rp-a and rp-b on node A; same spec, same nonce.
    for (name, node) in [("rp-c", NODE_B), ("rp-a", NODE_A), ("rp-b", NODE_A)] {
        apply_json(&sys, &manifest(name, node, "SEV-SNP")).map_err(anyhow::Error::msg)?;
    }
    apply_json(&sys, &manifest("es-a", NODE_A, "SEV-ES")).map_err(anyhow::Error::msg)?;
    let mut m = manifest("snp-default", NODE_A, "SEV-SNP");
    m["spec"]["attestation"]
        .as_object_mut()
        .map(|a| a.remove("policyRef"));
    apply_json(&sys, &m).map_err(anyhow::Error::msg)?;
    let rp_c = verified(&cvms, "rp-c").await;
    let rp_a = verified(&cvms, "rp-a").await;
    let rp_b = verified(&cvms, "rp-b").await;
    assert_eq!(rp_a.node_name(), Some(NODE_A));
    assert_eq!(rp_c.node_name(), Some(NODE_B));
    // Same image, same nonce: the reports still differ (UID and instance are bound).
    assert_ne!(evidence(&rp_a).report, evidence(&rp_c).report);
    let pins: Api<cvm_crds::HostPin> = Api::all(admin.clone());
    let pin_a = pins
        .get(NODE_A)
        .await
        .context("node A pinned on first use")?;
    assert_eq!(pin_a.spec.source, cvm_crds::PinSource::FirstUse);
    assert_ne!(pin_a.spec.id, pins.get(NODE_B).await?.spec.id);

    let mut refused = Vec::new();
    for name in ["es-a", "snp-default"] {
        refused.push(
            wait::until(&cvms, name, WAIT, "Verified=False", |c| {
                cond_is(c, "Verified", "False")
            })
            .await
            .map_err(anyhow::Error::msg)?,
        );
    }

    // From here on node A's host is the attacker: its honest plugin process is gone (it
    // would re-assert its own evidence), and its identity writes what the host chooses.
    sys.kill(&cvm_e2e::system::plugin_name(NODE_A));
    let forger = plugin_client(&sys, &admin, NODE_A).await?;
    let as_plugin: Api<ConfidentialVM> = Api::namespaced(forger, NS);
    write_allowed(&as_plugin, "rp-a").await?;

    // 1. Another CVM's evidence, same nonce, from another node (another chip).
    let at = forge(&as_plugin, "rp-a", evidence(&rp_c), None, 1).await?;
    let c = appraised(&cvms, "rp-a", &at).await;
    assert!(cond_is(&c, "Verified", "False"), "{:?}", checks(&c));
    let found = checks(&c);
    assert!(
        found.contains(&"report-data-mismatch".to_string()),
        "{found:?}"
    );
    assert!(
        found.contains(&"hardware-not-pinned".to_string()),
        "{found:?}"
    );
    println!("forgery 1 (rp-c's evidence from node B into rp-a): refused with {found:?}");

    // 2. Another CVM's evidence, same nonce, from the same node.
    let at = forge(&as_plugin, "rp-a", evidence(&rp_b), None, 2).await?;
    let c = appraised(&cvms, "rp-a", &at).await;
    assert!(cond_is(&c, "Verified", "False"));
    let found = checks(&c);
    assert!(
        found.contains(&"report-data-mismatch".to_string()),
        "{found:?}"
    );
    assert!(
        found.contains(&"instance-serves-other-cvm".to_string()),
        "{found:?}"
    );
    println!(
        "forgery 2 (rp-b's evidence from node A into rp-a): refused with {:?}",
        checks(&c)
    );

    // 3. A second genuine instance of rp-a, launched by the host on node A's chip outside
    //    the plugin, answering rp-a's UID and nonce.
    let state = tempfile::tempdir()?;
    let config = SimConfig {
        tees: vec![cvm_crds::TeeType::SevSnp],
        ..Default::default()
    };
    let host = SimPlatform::open_with_roots(config, state.path(), &sys.sim_root_dir(), NODE_A)?;
    let req = GuestRequest::from_cvm(&rp_a)?;
    host.launch(&req).await?;
    let uid = rp_a.metadata.uid.clone().context("uid")?;
    let challenge = cvm_crds::wire::challenge_for(Some(NONCE), &uid, None).context("challenge")?;
    let raw = host.evidence(&uid, &challenge).await?;
    let second =
        cvm_crds::wire::encode(&raw, &challenge, Time(k8s_openapi::jiff::Timestamp::now()));
    assert_ne!(second.instance_key, evidence(&rp_a).instance_key);
    let at = forge(&as_plugin, "rp-a", second, None, 3).await?;
    let c = appraised(&cvms, "rp-a", &at).await;
    assert!(cond_is(&c, "Verified", "False"));
    assert_eq!(checks(&c), vec!["instance-changed"], "{:?}", c.status);
    let pinned = c.status.as_ref().and_then(|s| s.guest_instance.clone());
    assert_eq!(
        pinned,
        rp_a.status.as_ref().and_then(|s| s.guest_instance.clone()),
        "the pin did not move"
    );
    println!(
        "forgery 3 (a second instance of rp-a): refused with {:?}",
        checks(&c)
    );

    // The genuine evidence is still accepted: nothing was spoiled for the real guest.
    let at = forge(&as_plugin, "rp-a", evidence(&rp_a), None, 4).await?;
    let c = appraised(&cvms, "rp-a", &at).await;
    assert!(cond_is(&c, "Verified", "True"), "{:?}", checks(&c));

    // 4. The platform flag flip on CVMs the operator cannot affirm: an SEV-ES guest and an
    //    SNP guest under the built-in policy (which trusts no simulator root).
    // 5. An oversized report (1.33 MB, as the adversarial test stored) is refused by the
    //    API server's schema before any component reads it.
    let mut huge = evidence(&rp_a);
    huge.report = "A".repeat(1_330_000);
    let e = forge(&as_plugin, "rp-a", huge, None, 6)
        .await
        .expect_err("a 1.33 MB report must be refused");
    let text = format!("{e:#}");
    assert!(
        text.contains("status.evidence.report") && text.contains("49152"),
        "{text}"
    );
    println!("forgery 5 (1.33 MB report): refused by the schema");

    for c in refused {
        let name = c.metadata.name.clone().context("name")?;
        let name = name.as_str();
        let ev = evidence(&c);
        let flip = json!({"simulated": false, "guestState": "Running",
                          "firmwareVersion": "1.55.21"});
        let at = forge(&as_plugin, name, ev, Some(flip), 5).await?;
        let c = appraised(&cvms, name, &at).await;
        let v = condition(&c, "Verified").context("Verified")?;
        assert_eq!(v.status, "False", "{name}: {}", v.message);
        assert!(
            !c.status
                .as_ref()
                .and_then(|s| s.platform.as_ref())
                .is_some_and(|p| p.simulated),
            "the flip was written"
        );
        println!(
            "forgery 4 (simulated=false on {name}): {} — {}",
            v.reason, v.message
        );
        if name == "es-a" {
            assert_eq!(v.reason, "OwnerVerificationRequired");
        } else {
            assert!(
                checks(&c).contains(&"chain-untrusted-root".to_string()),
                "{:?}",
                checks(&c)
            );
        }
    }
    Ok(())
}
