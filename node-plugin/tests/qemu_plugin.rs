//! The QEMU backend against the real `qemu-system-x86_64` (TCG, no TEE here), alone and
//! inside the plugin loop against a real API server. The host is described by a fake
//! detection tree advertising SEV-SNP, so the launch reaches QEMU, which refuses the
//! `sev-snp-guest` object: that refusal must reach the caller, and the CVM, in QEMU's words.
//!
//! Skipped with a note when QEMU is missing, except under `CI=true`, where a missing QEMU
//! is a failure (CI installs it with `e2e/tools/install-host-deps.sh`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cvm_crds::cvm::{ConfidentialVM, GuestState};
use cvm_crds::wellknown::{nfd_label, FINALIZER, LABEL_NODE, MANAGER_OPERATOR};
use cvm_crds::{ConditionType, TeeType};
use cvm_host::qemu::HostCaps;
use cvm_node_plugin::evidence::challenge_for;
use cvm_node_plugin::platform::{GuestRequest, Platform};
use cvm_node_plugin::qemu::{process_alive, QemuOptions, QemuPlatform, GUESTS_FILE};
use cvm_node_plugin::run;
use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::Client;
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);

fn qemu() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("qemu-system-x86_64"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "qemu-system-x86_64 is missing under CI=true: run e2e/tools/install-host-deps.sh"
        );
        eprintln!("SKIP: qemu-system-x86_64 not found (run e2e/tools/install-host-deps.sh)");
    }
    found
}

fn put(root: &Path, rel: &str, content: &[u8]) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
}

/// An EPYC host with SEV, SEV-ES and SEV-SNP on and a few ASIDs, as detection reads it.
fn snp_host_tree(root: &Path) {
    put(
        root,
        "proc/cpuinfo",
        b"processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu svm sev sev_es sev_snp\n",
    );
    for p in ["sev", "sev_es", "sev_snp"] {
        put(root, &format!("sys/module/kvm_amd/parameters/{p}"), b"Y\n");
    }
    put(root, "dev/sev", b"");
    put(root, "sys/fs/cgroup/misc.capacity", b"sev 8\nsev_es 4\n");
}

/// A test host: fake detection tree, artifacts (a 64 KiB firmware: QEMU wants BIOS
/// images in 64 KiB units) and a state dir.
struct Host {
    _dir: tempfile::TempDir,
    opts: QemuOptions,
}

fn host(binary: PathBuf) -> Host {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    snp_host_tree(&root);
    let artifacts = dir.path().join("artifacts");
    put(&artifacts, "ovmf-snp", &vec![0u8; 64 * 1024]);
    let mut opts = QemuOptions::new(&dir.path().join("state"), &artifacts);
    opts.binary = binary;
    opts.host_root = root;
    // Detection on a fake tree reads no CPUID: the C-bit comes from the override.
    opts.host_caps = Some(HostCaps {
        cbitpos: Some(51),
        reduced_phys_bits: Some(1),
    });
    opts.agent_timeout = Duration::from_secs(2);
    Host { _dir: dir, opts }
}

fn snp_request(uid: &str, name: &str) -> GuestRequest {
    let spec: cvm_crds::ConfidentialVMSpec = serde_yaml::from_str(
        "tee: {type: SEV-SNP}\nresources: {vcpus: 1, memoryMiB: 256}\nboot: {firmware: {name: ovmf-snp}}\n",
    )
    .unwrap();
    let mut cvm = ConfidentialVM::new(name, spec);
    cvm.metadata.uid = Some(uid.into());
    cvm.metadata.namespace = Some("ns".into());
    GuestRequest::from_cvm(&cvm).unwrap()
}

fn recorded_pid(state: &Path, uid: &str) -> Option<u32> {
    let text = std::fs::read_to_string(state.join(GUESTS_FILE)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["guests"][uid]["pid"].as_u64().map(|p| p as u32)
}

fn recorded_state(state: &Path, uid: &str) -> Option<String> {
    let text = std::fs::read_to_string(state.join(GUESTS_FILE)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["guests"][uid]["info"]["state"].as_str().map(String::from)
}

fn recorded_guests(state: &Path) -> usize {
    let text = std::fs::read_to_string(state.join(GUESTS_FILE)).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or(json!({}));
    v["guests"].as_object().map_or(0, |g| g.len())
}

async fn wait_until(what: &str, ok: impl Fn() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < TIMEOUT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn snp_launch_on_this_qemu_fails_with_qemus_own_line() {
    let Some(bin) = qemu() else { return };
    let h = host(bin);
    let p = QemuPlatform::open(h.opts.clone()).await.unwrap();
    assert!(p.capabilities().supports(TeeType::SevSnp));
    assert!(!p.capabilities().simulated);

    let e = p
        .launch(&snp_request("11111111-2222-3333-4444-555555555555", "snp"))
        .await
        .expect_err("an SNP guest started on a host without SNP");
    let msg = e.to_string();
    println!("{msg}");
    assert_eq!(e.reason(), "QemuExitedAtStart", "{msg}");
    // QEMU's own line names the object it refused (7.2: "Parameter 'qom-type' does not
    // accept value 'sev-snp-guest'"); newer QEMUs refuse it for want of KVM/SNP instead.
    let line = msg
        .split(" | ")
        .find(|l| l.contains("sev-snp-guest"))
        .unwrap_or_else(|| panic!("no QEMU line about sev-snp-guest in {msg}"));
    assert!(line.contains("qemu-system-x86_64"), "{line}");
    // Nothing is held after a failed launch: the loop reports it and retries later.
    assert!(p.list().await.unwrap().is_empty());
    assert_eq!(recorded_guests(&h.opts.state_dir), 0);
}

#[tokio::test]
async fn missing_firmware_is_named_before_qemu_runs() {
    let h = host(PathBuf::from("/nonexistent/qemu"));
    std::fs::remove_file(h.opts.artifacts_dir.join("ovmf-snp")).unwrap();
    let p = QemuPlatform::open(h.opts.clone()).await.unwrap();
    let e = p
        .launch(&snp_request("11111111-2222-3333-4444-666666666666", "nofw"))
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "LaunchFailed", "{e}");
    assert!(
        e.to_string().contains("firmware artifact") && e.to_string().contains("ovmf-snp"),
        "{e}"
    );
    // A TEE the host lacks is refused up front.
    let mut tdx = snp_request("11111111-2222-3333-4444-777777777777", "tdx");
    tdx.tee = TeeType::Tdx;
    assert_eq!(p.launch(&tdx).await.unwrap_err().reason(), "TeeUnsupported");
}

#[tokio::test]
async fn live_migration_is_refused_with_reason_unsupported() {
    let h = host(PathBuf::from("/nonexistent/qemu"));
    let p = QemuPlatform::open(h.opts.clone()).await.unwrap();
    let req = snp_request("11111111-2222-3333-4444-888888888888", "mig");
    let e = p.prepare_incoming(&req).await.unwrap_err();
    assert_eq!(e.reason(), "Unsupported", "{e}");
    assert!(
        e.to_string()
            .contains("live migration is not supported by the QEMU backend yet")
            && e.to_string().contains("migrate-incoming"),
        "{e}"
    );
    // Nothing was launched for it.
    assert!(p.list().await.unwrap().is_empty());
    let e = p.send(&req.uid, "other-node").await.unwrap_err();
    assert_eq!(e.reason(), "Unsupported", "{e}");
}

/// A stand-in for a TEE host's QEMU on this plain machine: drops the TEE object and the
/// vsock device, and runs the rest under TCG, so the launch, restart and stop paths run
/// against the real binary.
fn tcg_wrapper(dir: &Path, real: &Path) -> PathBuf {
    let script = format!(
        r#"#!/bin/bash
out=()
while [ $# -gt 0 ]; do
  case "$1" in
    -object) case "$2" in sev*|tdx*) shift 2; continue;; esac;;
    -device) case "$2" in vhost-vsock*) shift 2; continue;; esac;;
    -accel) out+=(-accel tcg); shift 2; continue;;
    -cpu) out+=(-cpu qemu64); shift 2; continue;;
    -machine) out+=(-machine "${{2/confidential-guest-support=cgs0,/}}"); shift 2; continue;;
  esac
  out+=("$1"); shift
done
exec {} "${{out[@]}}" -display none
"#,
        real.display()
    );
    let p = dir.join("qemu-tcg");
    std::fs::write(&p, script).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// Kills QEMUs a failed assertion would leave behind.
struct KillOnDrop(Vec<u32>);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

#[tokio::test]
async fn guests_survive_a_restart_launch_once_and_stop() {
    let Some(bin) = qemu() else { return };
    let wrap_dir = tempfile::tempdir().unwrap();
    let h = host(tcg_wrapper(wrap_dir.path(), &bin));
    let state = h.opts.state_dir.clone();
    let (a, b) = (
        "aaaaaaaa-0000-0000-0000-000000000001",
        "bbbbbbbb-0000-0000-0000-000000000002",
    );

    let p = QemuPlatform::open(h.opts.clone()).await.unwrap();
    let g = p.launch(&snp_request(a, "a")).await.unwrap();
    assert_eq!(g.state, GuestState::Running);
    let pid = recorded_pid(&state, a).expect("pid recorded");
    let mut guard = KillOnDrop(vec![pid]);
    let sock = state.join("qmp").join(format!("{a}.sock"));
    assert!(process_alive(pid, &sock));
    // Launching again returns the held guest; no second QEMU.
    let again = p.launch(&snp_request(a, "a")).await.unwrap();
    assert_eq!(again.launched_at, g.launched_at);
    assert_eq!(recorded_pid(&state, a), Some(pid));

    // No agent in this guest (and no vsock): evidence says so plainly.
    let c = challenge_for(Some("00ff"), a, None).unwrap();
    let e = p.evidence(a, &c).await.unwrap_err();
    assert_eq!(e.reason(), "EvidenceError");
    assert!(
        e.to_string()
            .contains("guest agent of ns/a is unreachable at vsock:3:"),
        "{e}"
    );

    // "Restart": a new instance on the same state re-attaches by pid, launches nothing.
    drop(p);
    assert!(process_alive(pid, &sock), "QEMU must outlive the plugin");
    let p = QemuPlatform::open(h.opts.clone()).await.unwrap();
    let held = p.list().await.unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!(
        (held[0].uid.as_str(), held[0].state),
        (a, GuestState::Running)
    );
    p.launch(&snp_request(a, "a")).await.unwrap();
    assert_eq!(recorded_pid(&state, a), Some(pid));

    // A second guest gets the next vsock CID; its QEMU dies under it: Failed, with how.
    p.launch(&snp_request(b, "b")).await.unwrap();
    let pid_b = recorded_pid(&state, b).unwrap();
    guard.0.push(pid_b);
    std::process::Command::new("kill")
        .args(["-9", &pid_b.to_string()])
        .status()
        .unwrap();
    let start = Instant::now();
    let failed = loop {
        let l = p.list().await.unwrap();
        if let Some(g) = l
            .iter()
            .find(|g| g.uid == b && g.state == GuestState::Failed)
        {
            break g.clone();
        }
        assert!(start.elapsed() < TIMEOUT, "{l:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let why = failed.message.unwrap();
    assert!(
        why.contains("QEMU exited unexpectedly (killed by signal 9)"),
        "{why}"
    );

    // Stop: QEMU quits, the record and socket are gone; stopping again is a no-op.
    let stopped = p.stop(a).await.unwrap().unwrap();
    assert_eq!(stopped.state, GuestState::Stopped);
    wait_until("QEMU to exit after stop", || !process_alive(pid, &sock)).await;
    assert!(!sock.exists());
    assert!(p.stop(a).await.unwrap().is_none());
    p.stop(b).await.unwrap();
    assert_eq!(recorded_guests(&state), 0);
}

// ---- In the plugin loop, against the real API server ----

async fn cluster() -> Client {
    // `shared()` runs its own runtime to start the control plane: keep it off ours.
    let info = tokio::task::spawn_blocking(cvm_e2e::shared::shared)
        .await
        .unwrap();
    info.client().await.unwrap()
}

async fn create_ok<K>(api: &Api<K>, obj: serde_json::Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let obj: K = serde_json::from_value(obj).unwrap();
    match api.create(&PostParams::default(), &obj).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("creating {obj:?}: {e}"),
    }
}

/// The SNP example without direct boot (this host has no kernel to give it).
fn snp_cvm(name: &str, ns: &str) -> ConfidentialVM {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sev-snp-cvm.yaml");
    let mut cvm: ConfidentialVM =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    cvm.metadata.name = Some(name.into());
    cvm.metadata.namespace = Some(ns.into());
    cvm.spec.boot.kernel = None;
    cvm.spec.boot.initrd = None;
    cvm.spec.boot.cmdline = None;
    cvm
}

/// Binds the CVM to `node` as the operator does (label, finalizer, status.nodeName).
async fn create_and_bind(api: &Api<ConfidentialVM>, cvm: &ConfidentialVM, node: &str) {
    let name = cvm.metadata.name.as_deref().unwrap();
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
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snp_cvm_on_a_host_whose_qemu_refuses_snp_says_so_in_its_condition() {
    let Some(bin) = qemu() else { return };
    let client = cluster().await;
    let (ns, node_name) = ("np-qemu", "np-node-qemu-snp");
    create_ok::<Namespace>(&Api::all(client.clone()), json!({"metadata": {"name": ns}})).await;
    create_ok::<Node>(
        &Api::all(client.clone()),
        json!({"metadata": {"name": node_name}}),
    )
    .await;

    let h = host(bin);
    let platform = QemuPlatform::open(h.opts.clone()).await.unwrap();
    let plugin = run::NodePlugin::new(
        client.clone(),
        Arc::new(platform),
        run::Options {
            node: node_name.into(),
            state_dir: h.opts.state_dir.clone(),
            resync: Duration::from_secs(2),
            kubelet_counts_keys: false,
            launcher_pods: None,
        },
    )
    .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        plugin
            .run(async {
                let _ = stop_rx.await;
            })
            .await
    });

    let api: Api<ConfidentialVM> = Api::namespaced(client.clone(), ns);
    create_and_bind(&api, &snp_cvm("snp-qemu", ns), node_name).await;

    let start = Instant::now();
    let (cond, c) = loop {
        let c = api.get("snp-qemu").await.unwrap();
        if let Some(l) = c.condition(ConditionType::Launched) {
            if l.status == "False" && l.reason == "QemuExitedAtStart" {
                break (l.clone(), c);
            }
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "no Launched=False/QemuExitedAtStart; last status: {:#?}",
            c.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("{}", cond.message);
    assert!(
        cond.message.contains("QEMU exited at start"),
        "{}",
        cond.message
    );
    assert!(
        cond.message
            .split(" | ")
            .any(|l| l.contains("qemu-system-x86_64") && l.contains("sev-snp-guest")),
        "{}",
        cond.message
    );
    let p = c.status.unwrap().platform.unwrap();
    assert_eq!(p.guest_state, Some(GuestState::Failed));
    assert!(!p.simulated);
    assert_eq!(p.message.as_deref(), Some(cond.message.as_str()));

    // The node advertises what the (fake) detection tree offers.
    let n = Api::<Node>::all(client.clone())
        .get(node_name)
        .await
        .unwrap();
    let labels = n.metadata.labels.unwrap_or_default();
    assert_eq!(
        labels.get(nfd_label(TeeType::SevSnp)).map(String::as_str),
        Some("true")
    );
    assert_eq!(
        labels.get(nfd_label(TeeType::Tdx)).map(String::as_str),
        None::<&str>
    );

    api.patch(
        "snp-qemu",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    api.delete("snp-qemu", &DeleteParams::default())
        .await
        .unwrap();
    let _ = stop_tx.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_whose_qemu_dies_after_launch_is_reported_failed_with_how() {
    let Some(bin) = qemu() else { return };
    let client = cluster().await;
    let (ns, node_name) = ("np-qemu-dies", "np-node-qemu-dies");
    create_ok::<Namespace>(&Api::all(client.clone()), json!({"metadata": {"name": ns}})).await;
    create_ok::<Node>(
        &Api::all(client.clone()),
        json!({"metadata": {"name": node_name}}),
    )
    .await;

    let wrap_dir = tempfile::tempdir().unwrap();
    let h = host(tcg_wrapper(wrap_dir.path(), &bin));
    let state = h.opts.state_dir.clone();
    let platform = QemuPlatform::open(h.opts.clone()).await.unwrap();
    let plugin = run::NodePlugin::new(
        client.clone(),
        Arc::new(platform),
        run::Options {
            node: node_name.into(),
            state_dir: state.clone(),
            resync: Duration::from_secs(2),
            kubelet_counts_keys: false,
            launcher_pods: None,
        },
    )
    .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        plugin
            .run(async {
                let _ = stop_rx.await;
            })
            .await
    });

    let api: Api<ConfidentialVM> = Api::namespaced(client.clone(), ns);
    create_and_bind(&api, &snp_cvm("snp-dies", ns), node_name).await;
    let uid = api.get("snp-dies").await.unwrap().metadata.uid.unwrap();
    let st = state.clone();
    let u = uid.clone();
    // Running, not just started: a kill before `cont` would be a failed launch instead.
    wait_until("the guest to be recorded running", move || {
        recorded_state(&st, &u).as_deref() == Some("Running")
    })
    .await;
    let pid = recorded_pid(&state, &uid).unwrap();
    let _guard = KillOnDrop(vec![pid]);
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();

    let start = Instant::now();
    let cond = loop {
        let c = api.get("snp-dies").await.unwrap();
        if let Some(l) = c.condition(ConditionType::Launched) {
            if l.reason == "GuestFailed" {
                break l.clone();
            }
        }
        assert!(start.elapsed() < TIMEOUT, "last status: {:#?}", c.status);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(cond.status, "False");
    assert!(
        cond.message
            .contains("QEMU exited unexpectedly (killed by signal 9)"),
        "{}",
        cond.message
    );
    // Reported, not relaunched: the record stays Failed with the same pid.
    assert_eq!(recorded_pid(&state, &uid), Some(pid));

    // Deleting the CVM clears the dead guest's record and reports it stopped.
    api.delete("snp-dies", &DeleteParams::default())
        .await
        .unwrap();
    let st = state.clone();
    wait_until("the record to go", move || recorded_guests(&st) == 0).await;
    api.patch(
        "snp-dies",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    let _ = stop_tx.send(());
    task.await.unwrap().unwrap();
}
