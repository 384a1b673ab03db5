//! The product's spine, driven like a user would (kubectl and the API) against the
//! real API server with the operator and simulated node plugins as processes.

mod common_cvm;

use common_cvm::*;
use cvm_e2e::wait;
use cvm_e2e::{SimNode, Tee};
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::json;
use sha2::{Digest, Sha512};

#[tokio::test]
async fn examples_reach_verified_on_nodes_of_their_tee() {
    let sys = system();
    let applied = cvm_e2e::demo::apply_examples(&*sys).expect("examples apply");
    assert!(applied.skipped.is_empty(), "{:?}", applied.skipped);
    let names = applied.names;
    assert_eq!(names.len(), 3, "{names:?}");
    cvm_e2e::demo::wait_verified(&*sys, &names, 90).expect("every example reaches its verdict");
    let (_, cvms) = api(&sys, "default").await;
    for name in &names {
        let c = cvms.get(name).await.unwrap();
        let node = c.node_name().expect("bound");
        let want = match c.tee_type() {
            cvm_crds::TeeType::Tdx => "tdx",
            _ => "sev-snp",
        };
        assert!(
            node.ends_with(want),
            "{name} ({}) landed on {node}",
            c.tee_type()
        );
        let att = c
            .status
            .as_ref()
            .and_then(|s| s.attestation.as_ref())
            .expect("attestation");
        assert_eq!(att.policy.as_deref(), Some("demo-simulator"));
        let verified = condition(&c, "Verified").expect("Verified condition");
        if matches!(
            c.tee_type(),
            cvm_crds::TeeType::Sev | cvm_crds::TeeType::SevEs
        ) {
            // Host-reported evidence: never Verified by the operator, and it says why.
            assert_eq!(verified.status, "False");
            assert_eq!(verified.reason, "OwnerVerificationRequired");
            assert!(verified.message.contains("TIK"), "{}", verified.message);
            assert_eq!(c.phase(), cvm_crds::CvmPhase::Running);
        } else {
            assert_eq!(verified.status, "True", "{name}: {}", verified.message);
            assert_eq!(c.phase(), cvm_crds::CvmPhase::Verified);
            let st = c.status.as_ref().unwrap();
            assert!(st.guest_instance.is_some(), "{name}: instance pinned");
        }
    }
    let table = kubectl(&sys, &["get", "cvm", "-n", "default"]).unwrap();
    assert!(
        table.contains("VERIFIED") && table.contains("Verified"),
        "{table}"
    );
}

#[tokio::test]
async fn pending_with_counted_reason_then_scheduled_when_a_capable_node_arrives() {
    let sys = system();
    let ns = "e2e-pending";
    let (_, cvms) = api(&sys, ns).await;
    let mut m = cvm("late", ns, "TDX");
    m["spec"]["nodeSelector"] = json!({"cvmp.io/pool": "late"});
    apply_json(&sys, &m).unwrap();
    let c = wait::until(&cvms, "late", WAIT, "Scheduled=False", |c| {
        cond_is(c, "Scheduled", "False")
    })
    .await
    .unwrap();
    let msg = &condition(&c, "Scheduled").unwrap().message;
    assert!(
        msg.starts_with("0/") && msg.contains("not matching nodeSelector"),
        "{msg}"
    );
    assert_eq!(c.phase(), cvm_crds::CvmPhase::Pending);

    let mut node = SimNode::new("cvm-node-late-tdx", Some(Tee::Tdx));
    node.extra_labels
        .insert("cvmp.io/pool".into(), "late".into());
    sys.add_node(node).await.unwrap();
    let c = wait::until(&cvms, "late", WAIT, "Verified=True", |c| {
        cond_is(c, "Verified", "True")
    })
    .await
    .unwrap();
    assert_eq!(c.node_name(), Some("cvm-node-late-tdx"));
}

#[tokio::test]
async fn last_asid_is_never_given_twice_even_with_two_operator_replicas() {
    let sys = system();
    let ns = "e2e-asid";
    let (_, cvms) = api(&sys, ns).await;
    let mut node = SimNode::new("cvm-node-tiny-sev-snp", Some(Tee::SevSnp));
    node.tee_slots = 2;
    node.extra_labels
        .insert("cvmp.io/pool".into(), "tiny".into());
    sys.add_node(node).await.unwrap();
    // A second replica: it must wait on the Lease, not schedule beside the first.
    sys.start_operator("operator-1").unwrap();
    // A standby that reaches the Lease is a ready replica (so `helm install --wait` with
    // two replicas succeeds); only the leader acts.
    let standby = sys.metrics_addr("operator-1").expect("standby's port");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let ready = std::net::TcpStream::connect(&standby).is_ok()
            && http_get(&standby, "/readyz").0.contains("200");
        if ready {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the standby replica never became ready"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    let items: Vec<serde_json::Value> = (0..6)
        .map(|i| {
            let mut m = cvm(&format!("tiny-{i}"), ns, "SEV-SNP");
            m["spec"]["nodeSelector"] = json!({"cvmp.io/pool": "tiny"});
            m
        })
        .collect();
    apply_json(
        &sys,
        &json!({"apiVersion": "v1", "kind": "List", "items": items}),
    )
    .unwrap();

    // Wait until every CVM is either bound or refused for want of an ASID.
    let mut bound = Vec::new();
    let mut refused = Vec::new();
    for i in 0..6 {
        let name = format!("tiny-{i}");
        let c = wait::until(&cvms, &name, WAIT, "placed or refused", |c| {
            c.node_name().is_some() || cond_is(c, "Scheduled", "False")
        })
        .await
        .unwrap();
        if c.node_name().is_some() {
            bound.push(name);
        } else {
            let msg = condition(&c, "Scheduled").unwrap().message.clone();
            assert!(msg.contains("no free ASID"), "{msg}");
            refused.push(name);
        }
    }
    assert_eq!(
        bound.len(),
        2,
        "exactly the 2 ASIDs are given: bound={bound:?}"
    );
    assert_eq!(refused.len(), 4);
    for name in &bound {
        wait::until(&cvms, name, WAIT, "Verified", |c| {
            cond_is(c, "Verified", "True")
        })
        .await
        .unwrap();
    }
    // Freeing one ASID lets exactly one pending CVM in.
    cvms.delete(&bound[0], &DeleteParams::default())
        .await
        .unwrap();
    wait::gone(&cvms, &bound[0], WAIT).await.unwrap();
    let mut newly = None;
    let deadline = std::time::Instant::now() + WAIT;
    while newly.is_none() && std::time::Instant::now() < deadline {
        for name in &refused {
            if cvms.get(name).await.unwrap().node_name().is_some() {
                newly = Some(name.clone());
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let newly = newly.expect("a pending CVM takes the freed ASID");
    let all = cvms.list(&Default::default()).await.unwrap();
    let on_tiny = all
        .items
        .iter()
        .filter(|c| c.node_name() == Some("cvm-node-tiny-sev-snp"))
        .count();
    assert_eq!(
        on_tiny, 2,
        "still never more than 2 on the node (new: {newly})"
    );
    sys.kill("operator-1");
}

#[tokio::test]
async fn tampered_measurement_is_refused_with_a_named_finding() {
    let sys = system();
    let ns = "e2e-tamper";
    let (_, cvms) = api(&sys, ns).await;
    let mut m = cvm("tampered", ns, "SEV-SNP");
    let real = m["spec"]["attestation"]["expectedMeasurements"][0]
        .as_str()
        .unwrap()
        .to_string();
    let wrong = "ab".repeat(48);
    m["spec"]["attestation"]["expectedMeasurements"] = json!([wrong]);
    apply_json(&sys, &m).unwrap();
    let c = wait::until(&cvms, "tampered", WAIT, "Verified=False", |c| {
        cond_is(c, "Verified", "False")
    })
    .await
    .unwrap();
    let v = condition(&c, "Verified").unwrap();
    assert_eq!(v.reason, "EvidenceRejected");
    assert!(
        v.message.contains(&wrong) && v.message.contains(&real),
        "{}",
        v.message
    );
    let att = c.status.as_ref().unwrap().attestation.as_ref().unwrap();
    assert_eq!(att.status, cvm_crds::cvm::EarStatus::Contraindicated);
    let f = att
        .findings
        .iter()
        .find(|f| f.expected.as_deref().is_some_and(|e| e.contains(&wrong)))
        .expect("named finding");
    assert_eq!(f.reported.as_deref(), Some(real.as_str()));
    assert_ne!(c.phase(), cvm_crds::CvmPhase::Verified);
    let events = kubectl(
        &sys,
        &[
            "get",
            "events",
            "-n",
            ns,
            "--field-selector",
            "involvedObject.name=tampered,reason=EvidenceRejected",
            "-o",
            "name",
        ],
    )
    .unwrap();
    assert!(!events.trim().is_empty(), "a Warning event is published");
}

#[tokio::test]
async fn a_users_nonce_comes_back_bound_in_fresh_evidence() {
    let sys = system();
    let ns = "e2e-nonce";
    let (_, cvms) = api(&sys, ns).await;
    apply_json(&sys, &cvm("fresh", ns, "SEV-SNP")).unwrap();
    let before = wait::until(&cvms, "fresh", WAIT, "Verified", |c| {
        cond_is(c, "Verified", "True")
    })
    .await
    .unwrap();
    let old_collected = before
        .status
        .as_ref()
        .unwrap()
        .evidence
        .as_ref()
        .unwrap()
        .collected_at
        .clone();

    let nonce = "5eed".to_string() + &format!("{:016x}", std::process::id() as u64 * 7919);
    cvms.patch(
        "fresh",
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"attestation": {"nonce": nonce}}})),
    )
    .await
    .unwrap();
    let c = wait::until(&cvms, "fresh", WAIT, "Verified for the new nonce", |c| {
        let st = c.status.as_ref();
        st.and_then(|s| s.attestation.as_ref())
            .and_then(|a| a.nonce.as_deref())
            == Some(nonce.as_str())
            && cond_is(c, "Verified", "True")
    })
    .await
    .unwrap();
    let ev = c.status.as_ref().unwrap().evidence.as_ref().unwrap();
    assert_eq!(ev.nonce.as_deref(), Some(nonce.as_str()));
    assert!(ev.collected_at.0 >= old_collected.0);
    // Check the binding ourselves, on the raw report, from docs/evidence-binding.md alone:
    // SHA-512 over the domain, purpose, CVM UID, nonce, epoch and the instance key's SHA-256.
    let raw = cvm_crds::wire::decode_report(ev).unwrap();
    let report = cvm_attest::snp::report::SnpReport::parse(&raw).unwrap();
    let key = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(ev.instance_key.as_deref().unwrap())
            .unwrap()
    };
    let field = |b: &[u8]| [&(b.len() as u32).to_be_bytes()[..], b].concat();
    let uid = c.metadata.uid.clone().unwrap();
    let preimage = [
        &b"cvmp.io/report-data/v1\0"[..],
        &field(b"cvm"),
        &field(uid.as_bytes()),
        &field(&hex::decode(&nonce).unwrap()),
        &field(b""), // epoch: never migrated
        &field(&sha2::Sha256::digest(&key)),
    ]
    .concat();
    let want: [u8; 64] = Sha512::digest(&preimage).into();
    assert_eq!(report.report_data, want);
}

/// Labels are the owner's to edit: removing `cvmp.io/node` must neither stop nor relaunch
/// the guest (the plugin watches CVMs by `status.nodeName`, which only the operator
/// writes). The report: the plugin stopped the guest as an orphan and launched it
/// again (runStrategy Manual, launchedAt moved).
#[tokio::test]
async fn an_owner_removing_the_node_label_neither_stops_nor_relaunches_the_guest() {
    let sys = system();
    let ns = "e2e-label";
    let (_, cvms) = api(&sys, ns).await;
    let mut m = cvm("keep", ns, "SEV-SNP");
    m["spec"]["runStrategy"] = json!("Manual");
    apply_json(&sys, &m).unwrap();
    let before = wait::until(&cvms, "keep", WAIT, "Verified", |c| {
        cond_is(c, "Verified", "True")
    })
    .await
    .unwrap();
    let launch = |c: &cvm_crds::ConfidentialVM| {
        c.status
            .as_ref()
            .and_then(|s| s.platform.as_ref())
            .and_then(|p| p.launch_id.clone())
    };
    let first = launch(&before);
    assert!(first.is_some(), "the plugin reports a launch ID");
    cvms.patch(
        "keep",
        &PatchParams::default(),
        &Patch::Merge(&json!({"metadata": {"labels": {"cvmp.io/node": null}}})),
    )
    .await
    .unwrap();
    // Fresh evidence after the edit (a new nonce): by then the plugin has acted on the
    // edit, whatever it did.
    let nonce = format!("ab{:016x}", std::process::id() as u64 * 104729);
    cvms.patch(
        "keep",
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"attestation": {"nonce": nonce}}})),
    )
    .await
    .unwrap();
    let after = wait::until(
        &cvms,
        "keep",
        WAIT,
        "Verified on evidence for the new nonce",
        |c| {
            let st = c.status.as_ref();
            st.and_then(|s| s.evidence.as_ref())
                .and_then(|e| e.nonce.as_deref())
                == Some(nonce.as_str())
                && cond_is(c, "Verified", "True")
        },
    )
    .await
    .unwrap();
    assert_eq!(launch(&after), first, "the guest was not relaunched");
    assert_eq!(
        after
            .status
            .as_ref()
            .and_then(|s| s.guest_instance.as_ref())
            .map(|g| g.relaunches),
        Some(0)
    );
    let node = after.node_name().unwrap_or_default().to_string();
    let uid = after.metadata.uid.clone().unwrap_or_default();
    assert!(
        guests_on(&sys, &node).contains(&uid),
        "the guest still runs on {node}"
    );
}

#[tokio::test]
async fn delete_stops_the_guest_then_removes_the_object() {
    let sys = system();
    let ns = "e2e-delete";
    let (_, cvms) = api(&sys, ns).await;
    apply_json(&sys, &cvm("doomed", ns, "TDX")).unwrap();
    let c = wait::until(&cvms, "doomed", WAIT, "Verified", |c| {
        cond_is(c, "Verified", "True")
    })
    .await
    .unwrap();
    let uid = c.metadata.uid.clone().unwrap();
    let node = c.node_name().unwrap().to_string();
    assert!(
        guests_on(&sys, &node).contains(&uid),
        "the plugin holds the guest"
    );
    assert!(c
        .metadata
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|x| x == cvm_crds::wellknown::FINALIZER)));

    kubectl(
        &sys,
        &[
            "delete",
            "cvm",
            "doomed",
            "-n",
            ns,
            "--wait=true",
            "--timeout=60s",
        ],
    )
    .unwrap();
    wait::gone(&cvms, "doomed", WAIT).await.unwrap();
    assert!(
        !guests_on(&sys, &node).contains(&uid),
        "the guest was stopped before the object went"
    );
}

#[tokio::test]
async fn a_vanished_node_shows_on_the_cvm_and_does_not_block_deletion() {
    let sys = system();
    let ns = "e2e-vanish";
    let (client, cvms) = api(&sys, ns).await;
    let mut node = SimNode::new("cvm-node-vanish-tdx", Some(Tee::Tdx));
    node.extra_labels
        .insert("cvmp.io/pool".into(), "vanish".into());
    // One key only: the scheduler prefers nodes with more free keys, so other tests'
    // CVMs never land on this node that is about to vanish.
    node.tee_slots = 1;
    sys.add_node(node).await.unwrap();
    let mut m = cvm("stranded", ns, "TDX");
    m["spec"]["nodeSelector"] = json!({"cvmp.io/pool": "vanish"});
    apply_json(&sys, &m).unwrap();
    wait::until(&cvms, "stranded", WAIT, "Verified", |c| {
        cond_is(c, "Verified", "True")
    })
    .await
    .unwrap();

    // The host disappears: its plugin dies and its Node object is removed.
    sys.kill(&cvm_e2e::system::plugin_name("cvm-node-vanish-tdx"));
    sys.cp.stop_heartbeat("cvm-node-vanish-tdx");
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client);
    nodes
        .delete("cvm-node-vanish-tdx", &DeleteParams::default())
        .await
        .unwrap();
    let c = wait::until(&cvms, "stranded", WAIT, "Ready=False NodeLost", |c| {
        condition(c, "Ready").is_some_and(|r| r.status == "False" && r.reason == "NodeLost")
    })
    .await
    .unwrap();
    assert!(condition(&c, "Ready")
        .unwrap()
        .message
        .contains("cvm-node-vanish-tdx"));
    // No plugin can confirm the stop, and none is needed: the host is gone.
    cvms.delete("stranded", &DeleteParams::default())
        .await
        .unwrap();
    wait::gone(&cvms, "stranded", WAIT).await.unwrap();
}

/// A plain HTTP GET on loopback: (status line, body).
fn http_get(addr: &str, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

#[tokio::test]
async fn operator_serves_metrics_and_health() {
    let sys = system();
    let ns = "e2e-metrics";
    let (_, cvms) = api(&sys, ns).await;
    apply_json(&sys, &cvm("counted", ns, "SEV-SNP")).unwrap();
    wait::until(&cvms, "counted", WAIT, "Verified", |c| {
        cond_is(c, "Verified", "True")
    })
    .await
    .unwrap();
    let addr = sys
        .metrics_addr("operator-0")
        .expect("operator metrics port");
    assert!(http_get(&addr, "/healthz").0.contains("200"));
    assert!(http_get(&addr, "/readyz").0.contains("200"));
    // The phase gauge refreshes every 5 s: wait for it rather than assume.
    let deadline = std::time::Instant::now() + WAIT;
    let body = loop {
        let (status, body) = http_get(&addr, "/metrics");
        assert!(status.contains("200"), "{status}");
        let verified_gauge = body
            .lines()
            .find(|l| l.starts_with("cvm_operator_cvms{phase=\"Verified\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if verified_gauge >= 1.0 || std::time::Instant::now() > deadline {
            break body;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    for needle in [
        "cvm_operator_reconciles_total{result=\"ok\"}",
        "cvm_operator_time_to_verified_seconds_count",
        "cvm_operator_verifications_total{status=\"affirming\"}",
        "cvm_operator_cvms{phase=\"Verified\"}",
    ] {
        assert!(body.contains(needle), "{needle} missing from:\n{body}");
    }
    let count: f64 = body
        .lines()
        .find(|l| l.starts_with("cvm_operator_time_to_verified_seconds_count"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(count >= 1.0, "the histogram observed at least this CVM");
    assert!(http_get(&addr, "/nope").0.contains("404"));
}
