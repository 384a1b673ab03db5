//! The node plugin against a real API server: each test runs a simulated plugin in-process
//! for its own Node, binds CVMs to it as the operator would (status.nodeName and the
//! `cvmp.io/node` label), and waits on the objects' conditions.

use std::path::Path;
use std::time::{Duration, Instant};

use cvm_attest::snp::{SnpContext, SnpEvidence, SnpPolicy, SnpVerifier};
use cvm_attest::tdx::{AppraisalContext, TdxPolicy};
use cvm_crds::cvm::{ConfidentialVM, GuestState};
use cvm_crds::migration::{
    ConfidentialVMMigration, ConfidentialVMMigrationSpec, CONDITION_TARGET_PREPARED,
    CONDITION_TRANSFERRED,
};
use cvm_crds::wellknown::{
    nfd_label, ANNOTATION_MIGRATED_AT, ANNOTATION_MIGRATION, ANNOTATION_REATTEST, FINALIZER,
    LABEL_NODE, MANAGER_NODE_PLUGIN, MANAGER_OPERATOR, RESOURCE_SNP_ESIDS,
};
use cvm_crds::wire::{cert_chain, decode_report, COLLATERAL_TDX_QUOTE_V3};
use cvm_crds::{ConditionType, EvidenceFormat, TeeType};
use cvm_node_plugin::{
    simulated_measurement, spawn_sim_plugin, PluginHandle, SimConfig, SimPluginOptions,
};
use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::core::object::HasStatus;
use kube::Client;
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);

async fn cluster() -> Client {
    // `shared()` runs its own runtime to start the control plane: keep it off ours.
    let info = tokio::task::spawn_blocking(cvm_e2e::shared::shared)
        .await
        .unwrap();
    info.client().await.unwrap()
}

async fn namespace(client: &Client, name: &str) {
    let ns: Api<Namespace> = Api::all(client.clone());
    let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    match ns.create(&PostParams::default(), &obj).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("creating namespace {name}: {e}"),
    }
}

/// A Node of our own, so no other test's plugin or the harness heartbeat touches it.
async fn node(client: &Client, name: &str) {
    let nodes: Api<Node> = Api::all(client.clone());
    let obj: Node = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    match nodes.create(&PostParams::default(), &obj).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("creating node {name}: {e}"),
    }
}

fn example(file: &str, name: &str, ns: &str) -> ConfidentialVM {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(file);
    let mut cvm: ConfidentialVM =
        serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cvm.metadata.name = Some(name.into());
    cvm.metadata.namespace = Some(ns.into());
    cvm
}

async fn start(
    client: &Client,
    node: &str,
    tee: TeeType,
    state: &Path,
    roots: &Path,
) -> PluginHandle {
    start_with(
        client,
        node,
        SimConfig {
            tees: vec![tee],
            slots: 4,
            launch_delay_ms: 50,
            ..Default::default()
        },
        state,
        roots,
    )
    .await
}

async fn start_with(
    client: &Client,
    node: &str,
    config: SimConfig,
    state: &Path,
    roots: &Path,
) -> PluginHandle {
    spawn_sim_plugin(
        client.clone(),
        SimPluginOptions {
            node: node.into(),
            state_dir: state.into(),
            sim_root_dir: roots.into(),
            config,
            resync: Duration::from_secs(2),
        },
    )
    .await
    .unwrap()
}

/// Creates the CVM and binds it to `node` as the operator does: the finalizer, the label,
/// then status.nodeName, phase and `Scheduled` under the operator's field manager.
async fn create_and_bind(client: &Client, cvm: &ConfidentialVM, node: &str) -> ConfidentialVM {
    let ns = cvm.metadata.namespace.as_deref().unwrap();
    let name = cvm.metadata.name.as_deref().unwrap();
    let api: Api<ConfidentialVM> = Api::namespaced(client.clone(), ns);
    api.create(&PostParams::default(), cvm).await.unwrap();
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {
            "labels": {LABEL_NODE: node},
            "finalizers": [FINALIZER],
        }})),
    )
    .await
    .unwrap();
    let status = json!({
        "apiVersion": "cvmp.io/v1alpha1", "kind": "ConfidentialVM",
        "status": {
            "nodeName": node,
            "phase": "Scheduled",
            "conditions": [{
                "type": "Scheduled", "status": "True", "reason": "Bound",
                "message": format!("bound to {node}"),
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            }],
        },
    });
    api.patch_status(
        name,
        &PatchParams::apply(MANAGER_OPERATOR).force(),
        &Patch::Apply(status),
    )
    .await
    .unwrap()
}

/// Polls the object until `ok` holds; panics with its status when it does not in time.
async fn wait_for<K>(api: &Api<K>, name: &str, what: &str, ok: impl Fn(&K) -> bool) -> K
where
    K: kube::Resource + HasStatus + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    K::Status: std::fmt::Debug,
{
    let start = Instant::now();
    loop {
        let last = api.get_opt(name).await.unwrap();
        if let Some(c) = &last {
            if ok(c) {
                return c.clone();
            }
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "timed out waiting for {what} on {name}; last status: {:#?}",
            last.as_ref().and_then(|c| c.status())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `ok` (a check outside the API, e.g. a counter) until it holds.
async fn wait_until(what: &str, ok: impl Fn() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < TIMEOUT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn launched(c: &ConfidentialVM) -> bool {
    c.condition(ConditionType::Launched)
        .is_some_and(|c| c.status == "True")
}

fn guest_state(c: &ConfidentialVM) -> Option<GuestState> {
    c.status.as_ref()?.platform.as_ref()?.guest_state
}

fn evidence_nonce(c: &ConfidentialVM) -> Option<String> {
    c.status.as_ref()?.evidence.as_ref()?.nonce.clone()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Verifies a CVM's SNP evidence as the operator binds it: the CVM's UID, the nonce the
/// evidence answers and the instance key it names.
fn verify_snp(c: &ConfidentialVM, policy: SnpPolicy) -> cvm_attest::snp::SnpAppraisal {
    let ev = c.status.as_ref().unwrap().evidence.as_ref().unwrap();
    let nonce = ev.nonce.as_deref().map(|n| hex::decode(n).unwrap());
    let uid = c.metadata.uid.clone().unwrap();
    // As the operator reads it: the migration that moved the CVM, from its own annotation.
    let epoch = c.migration_epoch();
    verify_snp_evidence(
        ev,
        policy,
        cvm_attest::binding::Challenge::cvm(&uid, nonce.as_deref()).after_migration(epoch),
    )
}

fn guests_file(state: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(state.join("guests.json")).unwrap_or_default();
    serde_json::from_str(&text).unwrap_or(json!({}))
}

fn guests_in(state: &Path) -> usize {
    guests_file(state)["guests"]
        .as_object()
        .map_or(0, |g| g.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snp_guest_launches_with_verifiable_fresh_evidence_and_stops_on_delete() {
    let client = cluster().await;
    let (ns, node_name) = ("np-snp", "np-node-snp");
    namespace(&client, ns).await;
    node(&client, node_name).await;
    let state = tempfile::tempdir().unwrap();
    let roots = tempfile::tempdir().unwrap();
    let plugin = start(
        &client,
        node_name,
        TeeType::SevSnp,
        state.path(),
        roots.path(),
    )
    .await;
    let snp_root = plugin.fingerprints.snp.clone().unwrap();

    let cvm = example("sev-snp-cvm.yaml", "snp-a", ns);
    create_and_bind(&client, &cvm, node_name).await;
    let api: Api<ConfidentialVM> = Api::namespaced(client.clone(), ns);
    let c = wait_for(&api, "snp-a", "Launched=True", launched).await;

    // Launch facts.
    let st = c.status.clone().unwrap();
    let p = st.platform.clone().unwrap();
    assert_eq!(p.guest_state, Some(GuestState::Running));
    assert!(p.simulated);
    let expected = simulated_measurement(&cvm.spec);
    assert_eq!(p.computed_measurement.as_deref(), Some(expected.as_str()));
    assert_eq!(p.launch_policy.as_deref(), Some("0x30000"));
    assert!(p.snp_tcb.is_some() && p.tdx_tcb_status.is_none());
    // The operator's fields survive the plugin's apply.
    assert_eq!(st.node_name.as_deref(), Some(node_name));
    assert!(c
        .condition(ConditionType::Scheduled)
        .is_some_and(|s| s.status == "True"));
    let fields = c.metadata.managed_fields.clone().unwrap_or_default();
    let ours = fields
        .iter()
        .find(|f| f.manager.as_deref() == Some(MANAGER_NODE_PLUGIN))
        .expect("the plugin's field manager owns status fields");
    let owned = serde_json::to_string(&ours.fields_v1).unwrap();
    assert!(
        owned.contains("f:evidence") && owned.contains(r#"k:{\"type\":\"Launched\"}"#),
        "{owned}"
    );
    assert!(
        !owned.contains("f:nodeName") && !owned.contains("f:phase") && !owned.contains("Scheduled"),
        "{owned}"
    );

    // Evidence: answers the nonce, verifies when the policy trusts the sim root only.
    let ev = st.evidence.clone().unwrap();
    assert_eq!(ev.nonce, cvm.nonce().map(String::from));
    assert_eq!(ev.launch_measurement.as_deref(), Some(expected.as_str()));
    let mut trusting = SnpPolicy::trusting(snp_root.parse().unwrap());
    trusting.measurements = vec![expected.parse().unwrap()];
    trusting.require_nonce = true;
    let ok = verify_snp(&c, trusting.clone());
    assert!(ok.is_affirmed(), "{:#?}", ok.findings());
    let refused = verify_snp(&c, SnpPolicy::default());
    assert!(!refused.is_affirmed());
    assert!(
        refused
            .findings()
            .iter()
            .any(|f| f.check == "chain-untrusted-root"),
        "{:#?}",
        refused.findings()
    );

    // Node advertisement: NFD labels (SNP implies ES and SEV) and capacity.
    let nodes: Api<Node> = Api::all(client.clone());
    let n = nodes.get(node_name).await.unwrap();
    let labels = n.metadata.labels.clone().unwrap_or_default();
    for t in [TeeType::Sev, TeeType::SevEs, TeeType::SevSnp] {
        assert_eq!(
            labels.get(nfd_label(t)).map(String::as_str),
            Some("true"),
            "{t}"
        );
    }
    let cap = n.status.unwrap().capacity.unwrap_or_default();
    assert_eq!(cap.get(RESOURCE_SNP_ESIDS).map(|q| q.0.as_str()), Some("4"));

    // A new nonce gives new evidence that echoes and binds it.
    let new_nonce = "00112233445566778899aabbccddeeff";
    api.patch(
        "snp-a",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"attestation": {"nonce": new_nonce}}})),
    )
    .await
    .unwrap();
    let c = wait_for(&api, "snp-a", "evidence for the new nonce", |c| {
        evidence_nonce(c).as_deref() == Some(new_nonce)
    })
    .await;
    let fresh = verify_snp(&c, trusting);
    assert!(fresh.is_affirmed(), "{:#?}", fresh.findings());

    // The re-attest annotation asks for evidence again with the same nonce.
    let issued = plugin.metrics.evidence_issued.get();
    api.patch(
        "snp-a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {ANNOTATION_REATTEST: "1"}}})),
    )
    .await
    .unwrap();
    let m = plugin.metrics.clone();
    wait_until("evidence after the re-attest annotation", || {
        m.evidence_issued.get() > issued
    })
    .await;
    assert_eq!(plugin.metrics.guests_launched.get(), 1, "one launch in all");

    // Delete: the finalizer holds the object until the plugin reports the guest stopped.
    api.delete("snp-a", &DeleteParams::default()).await.unwrap();
    let c = wait_for(&api, "snp-a", "guestState Stopped", |c| {
        guest_state(c) == Some(GuestState::Stopped)
    })
    .await;
    let l = c.condition(ConditionType::Launched).unwrap();
    assert_eq!(
        (l.status.as_str(), l.reason.as_str()),
        ("False", "GuestStopped")
    );
    assert_eq!(guests_in(state.path()), 0);
    api.patch(
        "snp-a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    plugin.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_one_guest_and_stops_orphans() {
    let client = cluster().await;
    let (ns, node_name) = ("np-restart", "np-node-tdx");
    namespace(&client, ns).await;
    node(&client, node_name).await;
    let state = tempfile::tempdir().unwrap();
    let roots = tempfile::tempdir().unwrap();
    let api: Api<ConfidentialVM> = Api::namespaced(client.clone(), ns);

    let plugin = start(&client, node_name, TeeType::Tdx, state.path(), roots.path()).await;
    let tdx_root = plugin.fingerprints.tdx.clone().unwrap();
    let keep = example("tdx-cvm.yaml", "tdx-keep", ns);
    let gone = example("tdx-cvm.yaml", "tdx-gone", ns);
    create_and_bind(&client, &keep, node_name).await;
    create_and_bind(&client, &gone, node_name).await;
    let c = wait_for(&api, "tdx-keep", "Launched=True", launched).await;
    wait_for(&api, "tdx-gone", "Launched=True", launched).await;
    let launched_at = c
        .status
        .as_ref()
        .unwrap()
        .platform
        .as_ref()
        .unwrap()
        .launched_at
        .clone();

    // The TDX quote verifies with its collateral when the sim root is trusted.
    let ev = c.status.as_ref().unwrap().evidence.clone().unwrap();
    assert_eq!(ev.format, EvidenceFormat::TdxQuote);
    let quote = decode_report(&ev).unwrap();
    let collateral = ev.collateral.get(COLLATERAL_TDX_QUOTE_V3).unwrap();
    let nonce = hex::decode(ev.nonce.as_deref().unwrap()).unwrap();
    let key = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(ev.instance_key.as_deref().unwrap())
            .unwrap()
    };
    let preimage =
        cvm_attest::binding::Challenge::cvm(c.metadata.uid.as_deref().unwrap(), Some(&nonce))
            .preimage(&cvm_attest::binding::key_id(&key));
    let ctx = AppraisalContext::at(now()).with_nonce(&preimage);
    let mut policy = TdxPolicy::trusting(tdx_root.clone().try_into().unwrap());
    policy.mrtd = vec![hex::decode(simulated_measurement(&keep.spec)).unwrap()];
    policy.mr_config_id = Some(hex::decode(keep.spec.tee.host_data.clone().unwrap()).unwrap());
    let a = cvm_attest::tdx::verify_quote(&quote, collateral.as_bytes(), &policy, &ctx).unwrap();
    assert!(a.is_affirmed(), "{:#?}", a.findings);
    let refused =
        cvm_attest::tdx::verify_quote(&quote, collateral.as_bytes(), &TdxPolicy::default(), &ctx)
            .unwrap();
    assert_eq!(refused.findings[0].check, "untrusted-root");

    // Stop the plugin; meanwhile one CVM vanishes for good (no finalizer left to hold it).
    plugin.shutdown().await.unwrap();
    assert_eq!(guests_in(state.path()), 2);
    api.patch(
        "tdx-gone",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    api.delete("tdx-gone", &DeleteParams::default())
        .await
        .unwrap();
    let start_wait = Instant::now();
    while api.get_opt("tdx-gone").await.unwrap().is_some() {
        assert!(start_wait.elapsed() < TIMEOUT, "tdx-gone still exists");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Restart on the same state: the orphan is stopped, the other guest is not relaunched.
    let plugin = start(&client, node_name, TeeType::Tdx, state.path(), roots.path()).await;
    assert_eq!(
        plugin.fingerprints.tdx.as_deref(),
        Some(tdx_root.as_str()),
        "same shared root"
    );
    let m = plugin.metrics.clone();
    wait_until("the orphan guest stopped", || m.guests_stopped.get() == 1).await;
    assert_eq!(guests_in(state.path()), 1);
    // A nonce change after the restart is served by the guest already running.
    api.patch(
        "tdx-keep",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"attestation": {"nonce": "abcdef01"}}})),
    )
    .await
    .unwrap();
    let c = wait_for(&api, "tdx-keep", "evidence for the new nonce", |c| {
        evidence_nonce(c).as_deref() == Some("abcdef01")
    })
    .await;
    assert_eq!(
        plugin.metrics.guests_launched.get(),
        0,
        "no second launch after restart"
    );
    // The evidence answered before the restart was remembered (evidence.json): the only
    // evidence issued since is the one for the new nonce.
    wait_until("the metric catching up with the write", || {
        m.evidence_issued.get() >= 1
    })
    .await;
    assert_eq!(plugin.metrics.evidence_issued.get(), 1);
    assert_eq!(
        c.status
            .as_ref()
            .unwrap()
            .platform
            .as_ref()
            .unwrap()
            .launched_at,
        launched_at
    );
    assert_eq!(guests_in(state.path()), 1);

    api.delete("tdx-keep", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(&api, "tdx-keep", "guestState Stopped", |c| {
        guest_state(c) == Some(GuestState::Stopped)
    })
    .await;
    api.patch(
        "tdx-keep",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    plugin.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sev_es_reports_launch_measure_and_wrong_tee_fails_with_reason() {
    let client = cluster().await;
    let (ns, node_name) = ("np-sev", "np-node-sev-es");
    namespace(&client, ns).await;
    node(&client, node_name).await;
    let state = tempfile::tempdir().unwrap();
    let roots = tempfile::tempdir().unwrap();
    let plugin = start(
        &client,
        node_name,
        TeeType::SevEs,
        state.path(),
        roots.path(),
    )
    .await;
    assert_eq!(
        plugin.fingerprints.snp, None,
        "an SEV-ES host has no SNP root"
    );
    let api: Api<ConfidentialVM> = Api::namespaced(client.clone(), ns);

    let es = example("sev-es-cvm.yaml", "es-a", ns);
    create_and_bind(&client, &es, node_name).await;
    let c = wait_for(&api, "es-a", "Launched=True", launched).await;
    let ev = c.status.as_ref().unwrap().evidence.clone().unwrap();
    assert_eq!(ev.format, EvidenceFormat::SevLaunchMeasure);
    let expected = simulated_measurement(&es.spec);
    assert_eq!(expected.len(), 64);
    assert_eq!(hex::encode(decode_report(&ev).unwrap()), expected);
    assert_eq!(ev.nonce, None, "no nonce asked, none echoed");

    // A TDX guest bound to an AMD host cannot launch: the condition says why.
    let tdx = example("tdx-cvm.yaml", "tdx-misplaced", ns);
    create_and_bind(&client, &tdx, node_name).await;
    let c = wait_for(&api, "tdx-misplaced", "Launched=False", |c| {
        c.condition(ConditionType::Launched)
            .is_some_and(|l| l.reason == "TeeUnsupported")
    })
    .await;
    assert_eq!(guest_state(&c), Some(GuestState::Failed));
    let msg = &c.condition(ConditionType::Launched).unwrap().message;
    assert!(msg.contains("does not offer TDX"), "{msg}");

    for name in ["es-a", "tdx-misplaced"] {
        api.delete(name, &DeleteParams::default()).await.unwrap();
        wait_for(&api, name, "guestState Stopped", |c| {
            guest_state(c) == Some(GuestState::Stopped)
        })
        .await;
        api.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
    }
    assert_eq!(guests_in(state.path()), 0);
    plugin.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_advertises_its_node_prints_roots_and_serves_metrics() {
    let client = cluster().await;
    let info = tokio::task::spawn_blocking(cvm_e2e::shared::shared)
        .await
        .unwrap();
    let node_name = "np-node-bin";
    node(&client, node_name).await;
    let state = tempfile::tempdir().unwrap();
    let roots = tempfile::tempdir().unwrap();
    let cfg = state.path().join("sim.yaml");
    std::fs::write(
        &cfg,
        "tees: [TDX]\nslots: 3\ntdxTcbStatus: SWHardeningNeeded\n",
    )
    .unwrap();
    let port = cvm_e2e::process::free_port().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cvm-node-plugin"))
        .args(["--node-name", node_name, "--kubeconfig"])
        .arg(&info.kubeconfig)
        .arg("--state-dir")
        .arg(state.path().join("state"))
        .arg("--sim-config")
        .arg(&cfg)
        .arg("--sim-root-dir")
        .arg(roots.path())
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();

    let nodes: Api<Node> = Api::all(client.clone());
    let start_wait = Instant::now();
    loop {
        let n = nodes.get(node_name).await.unwrap();
        let keys = n
            .status
            .and_then(|s| s.allocatable)
            .and_then(|a| a.get(cvm_crds::wellknown::RESOURCE_TDX_KEYS).cloned());
        let labelled = n
            .metadata
            .labels
            .unwrap_or_default()
            .contains_key(nfd_label(TeeType::Tdx));
        if labelled && keys.as_ref().map(|q| q.0.as_str()) == Some("3") {
            break;
        }
        assert!(start_wait.elapsed() < TIMEOUT, "node never advertised");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let body = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(body.starts_with("HTTP/1.0 200"), "{body}");
    assert!(
        body.contains("cvm_node_plugin_guests_launched_total{node=\"np-node-bin\"} 0"),
        "{body}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let fp = cvm_node_plugin::sim::roots::cluster_fingerprints(roots.path())
        .unwrap()
        .tdx
        .unwrap();
    assert!(
        stdout.contains(&format!("simulated TDX root CA: {fp}")),
        "{stdout}"
    );
}

// ---- Live migration (docs/migration.md): the test plays the operator's part. ----

/// Creates a migration of `cvm` and accepts it as the operator does: phase Pending with
/// the source and target nodes, under the operator's field manager.
async fn accept_migration(
    client: &Client,
    ns: &str,
    name: &str,
    cvm: &str,
    source: &str,
    target: &str,
) -> ConfidentialVMMigration {
    let api: Api<ConfidentialVMMigration> = Api::namespaced(client.clone(), ns);
    let m = ConfidentialVMMigration::new(
        name,
        ConfidentialVMMigrationSpec {
            cvm_name: cvm.into(),
            target_node: Some(target.into()),
        },
    );
    api.create(&PostParams::default(), &m).await.unwrap();
    operator_phase(client, ns, name, "Pending", source, target).await
}

/// The operator's share of the migration's status.
async fn operator_phase(
    client: &Client,
    ns: &str,
    name: &str,
    phase: &str,
    source: &str,
    target: &str,
) -> ConfidentialVMMigration {
    let api: Api<ConfidentialVMMigration> = Api::namespaced(client.clone(), ns);
    let status = json!({
        "apiVersion": "cvmp.io/v1alpha1", "kind": "ConfidentialVMMigration",
        "status": {"phase": phase, "sourceNode": source, "targetNode": target},
    });
    api.patch_status(
        name,
        &PatchParams::apply(MANAGER_OPERATOR).force(),
        &Patch::Apply(status),
    )
    .await
    .unwrap()
}

fn mig_condition<'a>(
    m: &'a ConfidentialVMMigration,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    m.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// The operator's switch: the CVM is rebound to `target` (label, annotation with the
/// switch time in whole seconds, then status.nodeName).
async fn switch(client: &Client, ns: &str, name: &str, target: &str, migration_uid: &str) {
    let api: Api<ConfidentialVM> = Api::namespaced(client.clone(), ns);
    let at = k8s_openapi::jiff::Timestamp::now();
    let stamp = k8s_openapi::jiff::fmt::strtime::format("%Y-%m-%dT%H:%M:%SZ", at).unwrap();
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {
            "labels": {LABEL_NODE: target},
            "annotations": {ANNOTATION_MIGRATED_AT: stamp, ANNOTATION_MIGRATION: migration_uid},
        }})),
    )
    .await
    .unwrap();
    let status = json!({
        "apiVersion": "cvmp.io/v1alpha1", "kind": "ConfidentialVM",
        "status": {
            "nodeName": target,
            "phase": "Scheduled",
            "conditions": [{
                "type": "Scheduled", "status": "True", "reason": "Migrated",
                "message": format!("rebound to {target} by a live migration"),
                "lastTransitionTime": stamp,
            }],
        },
    });
    api.patch_status(
        name,
        &PatchParams::apply(MANAGER_OPERATOR).force(),
        &Patch::Apply(status),
    )
    .await
    .unwrap();
}

/// Verifies SNP evidence (from a CVM or a migration) against `policy` and `challenge`,
/// bound to the instance key the evidence names.
fn verify_snp_evidence(
    ev: &cvm_crds::cvm::Evidence,
    policy: SnpPolicy,
    challenge: cvm_attest::binding::Challenge,
) -> cvm_attest::snp::SnpAppraisal {
    use base64::Engine as _;
    assert_eq!(ev.format, EvidenceFormat::SevSnpReport);
    let key = base64::engine::general_purpose::STANDARD
        .decode(ev.instance_key.as_deref().unwrap())
        .unwrap();
    let challenge = challenge.preimage(&cvm_attest::binding::key_id(&key));
    let report = decode_report(ev).unwrap();
    let certs = cert_chain(ev).unwrap();
    SnpVerifier::new(policy).unwrap().verify(
        &SnpEvidence {
            report: &report,
            certs: &certs,
            crls: &[],
        },
        &SnpContext {
            nonce: Some(challenge),
        },
        now(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_migration_prepares_attests_sends_and_adopts() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let client = cluster().await;
    let (ns, src, dst) = ("np-mig", "np-node-mig-src", "np-node-mig-dst");
    namespace(&client, ns).await;
    node(&client, src).await;
    node(&client, dst).await;
    let roots = tempfile::tempdir().unwrap();
    let src_state = tempfile::tempdir().unwrap();
    let dst_state = tempfile::tempdir().unwrap();
    let source = start(
        &client,
        src,
        TeeType::SevSnp,
        src_state.path(),
        roots.path(),
    )
    .await;
    let target = start(
        &client,
        dst,
        TeeType::SevSnp,
        dst_state.path(),
        roots.path(),
    )
    .await;
    let snp_root = source.fingerprints.snp.clone().unwrap();
    assert_eq!(target.fingerprints.snp.as_deref(), Some(snp_root.as_str()));

    let cvm = example("sev-snp-cvm.yaml", "web", ns);
    let expected = simulated_measurement(&cvm.spec);
    let mut policy = SnpPolicy::trusting(snp_root.parse().unwrap());
    policy.measurements = vec![expected.parse().unwrap()];
    policy.require_nonce = true;
    create_and_bind(&client, &cvm, src).await;
    let cvms: Api<ConfidentialVM> = Api::namespaced(client.clone(), ns);
    let c = wait_for(&cvms, "web", "Launched=True on the source", launched).await;
    let cvm_uid = c.metadata.uid.clone().unwrap();
    assert!(c
        .condition(ConditionType::Launched)
        .unwrap()
        .message
        .contains(src));

    // 1. Pending: the target prepares a receiving guest and reports its evidence.
    let migs: Api<ConfidentialVMMigration> = Api::namespaced(client.clone(), ns);
    let m = accept_migration(&client, ns, "move-web", "web", src, dst).await;
    let mig_uid = m.metadata.uid.clone().unwrap();
    let m = wait_for(&migs, "move-web", "TargetPrepared=True", |m| {
        mig_condition(m, CONDITION_TARGET_PREPARED).is_some_and(|c| c.status == "True")
    })
    .await;
    let prepared = mig_condition(&m, CONDITION_TARGET_PREPARED).unwrap();
    assert_eq!(prepared.reason, "ReceivingGuestReady");
    assert!(prepared.message.contains(dst), "{}", prepared.message);
    let ev = m.status.as_ref().unwrap().target_evidence.clone().unwrap();
    assert_eq!(ev.launch_measurement.as_deref(), Some(expected.as_str()));
    let a = verify_snp_evidence(
        &ev,
        policy.clone(),
        cvm_attest::binding::Challenge::migration(&mig_uid),
    );
    assert!(a.is_affirmed(), "{:#?}", a.findings());
    // Bound to the migration: the CVM's own challenge does not verify it.
    let replay = verify_snp_evidence(
        &ev,
        policy.clone(),
        cvm_attest::binding::Challenge::cvm(&cvm_uid, None),
    );
    assert!(!replay.is_affirmed());
    let guests = guests_file(dst_state.path());
    assert_eq!(
        guests["guests"][&cvm_uid]["incoming"],
        json!(true),
        "{guests}"
    );
    assert_eq!(target.metrics.migrations_prepared.get(), 1);
    // The operator's fields are left alone, and the plugin owns only its share.
    let st = m.status.clone().unwrap();
    assert_eq!(
        (st.phase, st.source_node.as_deref()),
        (Some(cvm_crds::MigrationPhase::Pending), Some(src))
    );
    let fields = m.metadata.managed_fields.clone().unwrap_or_default();
    let ours = fields
        .iter()
        .find(|f| f.manager.as_deref() == Some(MANAGER_NODE_PLUGIN))
        .expect("the target's field manager owns its share");
    let owned = serde_json::to_string(&ours.fields_v1).unwrap();
    assert!(owned.contains("f:targetEvidence"), "{owned}");
    assert!(
        !owned.contains("f:phase") && !owned.contains("f:sourceNode"),
        "{owned}"
    );

    // A restarted target keeps the receiving guest: its CVM is not bound there, but the
    // migration is still in progress.
    target.shutdown().await.unwrap();
    let target = start(
        &client,
        dst,
        TeeType::SevSnp,
        dst_state.path(),
        roots.path(),
    )
    .await;

    // 2. The operator found the evidence affirming: the source sends.
    operator_phase(&client, ns, "move-web", "TargetReady", src, dst).await;
    operator_phase(&client, ns, "move-web", "TargetAttested", src, dst).await;
    let m = wait_for(&migs, "move-web", "Transferred=True", |m| {
        mig_condition(m, CONDITION_TRANSFERRED).is_some_and(|c| c.status == "True")
    })
    .await;
    assert_eq!(
        mig_condition(&m, CONDITION_TRANSFERRED).unwrap().reason,
        "Transferred"
    );
    // The source's apply did not take the target's share away.
    assert!(m.status.as_ref().unwrap().target_evidence.is_some());
    assert!(mig_condition(&m, CONDITION_TARGET_PREPARED).is_some());
    assert_eq!(source.metrics.migrations_sent.get(), 1);
    assert_eq!(
        guests_file(src_state.path())["guests"][&cvm_uid]["sentTo"],
        json!(dst)
    );
    assert_eq!(
        guests_in(src_state.path()),
        1,
        "the source copy waits for the switch"
    );

    // 3. The switch: the target adopts the guest with fresh evidence, the source stops
    // its copy.
    operator_phase(&client, ns, "move-web", "Transferring", src, dst).await;
    let key_before = cvms
        .get("web")
        .await
        .unwrap()
        .status
        .and_then(|s| s.evidence)
        .and_then(|e| e.instance_key);
    switch(&client, ns, "web", dst, &mig_uid).await;
    let c = wait_for(
        &cvms,
        "web",
        "evidence from the target bound to the migration",
        |c| {
            c.status
                .as_ref()
                .and_then(|s| s.evidence.as_ref())
                .is_some_and(|e| e.epoch.as_deref() == Some(mig_uid.as_str()))
                && c.condition(ConditionType::Launched)
                    .is_some_and(|l| l.status == "True" && l.message.contains(dst))
        },
    )
    .await;
    // The moved guest answers with the instance key it had on the source (its memory,
    // the agent's key with it, moved); a fresh receiving guest would not.
    let key_after = c
        .status
        .as_ref()
        .and_then(|s| s.evidence.as_ref())
        .and_then(|e| e.instance_key.clone());
    assert!(key_before.is_some());
    assert_eq!(key_after, key_before);
    let facts = c.status.as_ref().unwrap().platform.clone().unwrap();
    assert_eq!(facts.guest_state, Some(GuestState::Running));
    assert_eq!(
        facts.computed_measurement.as_deref(),
        Some(expected.as_str())
    );
    let fresh = verify_snp(&c, policy.clone());
    assert!(fresh.is_affirmed(), "{:#?}", fresh.findings());
    let m = source.metrics.clone();
    wait_until("the source stopping its copy", || {
        m.guests_stopped.get() == 1
    })
    .await;
    assert_eq!(guests_in(src_state.path()), 0);
    assert_eq!(guests_in(dst_state.path()), 1);
    // Adopted, never launched anew nor stopped (also across the target's restart).
    assert_eq!(target.metrics.guests_launched.get(), 0);
    assert_eq!(target.metrics.guests_stopped.get(), 0);

    // The migration is over; the CVM lives on at the target.
    operator_phase(&client, ns, "move-web", "Succeeded", src, dst).await;
    cvms.delete("web", &DeleteParams::default()).await.unwrap();
    wait_for(&cvms, "web", "guestState Stopped", |c| {
        guest_state(c) == Some(GuestState::Stopped)
    })
    .await;
    assert_eq!(guests_in(dst_state.path()), 0);
    cvms.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    source.shutdown().await.unwrap();
    target.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_transfer_and_refused_target_roll_back() {
    let client = cluster().await;
    let (ns, src, dst, tdx) = (
        "np-mig-fail",
        "np-node-migf-src",
        "np-node-migf-dst",
        "np-node-migf-tdx",
    );
    namespace(&client, ns).await;
    for n in [src, dst, tdx] {
        node(&client, n).await;
    }
    let roots = tempfile::tempdir().unwrap();
    let (src_state, dst_state, tdx_state) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let failing = SimConfig {
        tees: vec![TeeType::SevSnp],
        slots: 4,
        fail_sends: true,
        ..Default::default()
    };
    let source = start_with(&client, src, failing, src_state.path(), roots.path()).await;
    let target = start(
        &client,
        dst,
        TeeType::SevSnp,
        dst_state.path(),
        roots.path(),
    )
    .await;
    let intel = start(&client, tdx, TeeType::Tdx, tdx_state.path(), roots.path()).await;
    let cvms: Api<ConfidentialVM> = Api::namespaced(client.clone(), ns);
    let migs: Api<ConfidentialVMMigration> = Api::namespaced(client.clone(), ns);
    create_and_bind(&client, &example("sev-snp-cvm.yaml", "db", ns), src).await;
    wait_for(&cvms, "db", "Launched=True on the source", launched).await;

    // A target that cannot run the guest says why, and holds nothing.
    accept_migration(&client, ns, "to-intel", "db", src, tdx).await;
    let m = wait_for(&migs, "to-intel", "TargetPrepared=False", |m| {
        mig_condition(m, CONDITION_TARGET_PREPARED).is_some_and(|c| c.status == "False")
    })
    .await;
    let refused = mig_condition(&m, CONDITION_TARGET_PREPARED).unwrap();
    assert_eq!(refused.reason, "TeeUnsupported");
    assert!(
        refused.message.contains("does not offer SEV-SNP") && refused.message.contains(tdx),
        "{}",
        refused.message
    );
    assert!(m.status.as_ref().unwrap().target_evidence.is_none());
    assert_eq!(guests_in(tdx_state.path()), 0);
    operator_phase(&client, ns, "to-intel", "Failed", src, tdx).await;

    // A transfer that fails: Transferred=False, the guest keeps running at the source,
    // and once the operator fails the migration the receiving guest is stopped.
    accept_migration(&client, ns, "to-dst", "db", src, dst).await;
    wait_for(&migs, "to-dst", "TargetPrepared=True", |m| {
        mig_condition(m, CONDITION_TARGET_PREPARED).is_some_and(|c| c.status == "True")
    })
    .await;
    assert_eq!(guests_in(dst_state.path()), 1);
    operator_phase(&client, ns, "to-dst", "TargetAttested", src, dst).await;
    let m = wait_for(&migs, "to-dst", "Transferred=False", |m| {
        mig_condition(m, CONDITION_TRANSFERRED).is_some_and(|c| c.status == "False")
    })
    .await;
    let failed = mig_condition(&m, CONDITION_TRANSFERRED).unwrap();
    assert_eq!(failed.reason, "TransferFailed");
    assert!(
        failed.message.contains("failSends") && failed.message.contains("keeps running"),
        "{}",
        failed.message
    );
    assert_eq!(source.metrics.migrations_sent.get(), 0);
    let errors = source.metrics.render();
    assert!(
        errors.contains(r#"action="send""#) && errors.contains(r#"reason="TransferFailed""#),
        "{errors}"
    );
    operator_phase(&client, ns, "to-dst", "Failed", src, dst).await;
    let m = target.metrics.clone();
    wait_until("the receiving guest stopped after the roll-back", || {
        m.guests_stopped.get() == 1
    })
    .await;
    assert_eq!(guests_in(dst_state.path()), 0);
    assert_eq!(guests_in(src_state.path()), 1);
    let c = cvms.get("db").await.unwrap();
    assert!(
        launched(&c)
            && c.condition(ConditionType::Launched)
                .unwrap()
                .message
                .contains(src)
    );
    assert_eq!(source.metrics.guests_stopped.get(), 0);

    cvms.delete("db", &DeleteParams::default()).await.unwrap();
    wait_for(&cvms, "db", "guestState Stopped", |c| {
        guest_state(c) == Some(GuestState::Stopped)
    })
    .await;
    cvms.patch(
        "db",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    for p in [source, target, intel] {
        p.shutdown().await.unwrap();
    }
}
