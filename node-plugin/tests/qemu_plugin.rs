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
use cvm_crds::wire::challenge_for;
use cvm_crds::{ConditionType, TeeType};
use cvm_host::qemu::HostCaps;
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
    // The agent's channel is vsock where the host has vhost-vsock.
    put(root, "dev/vhost-vsock", b"");
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

// ---- QEMU in a launcher pod ----

/// A launcher as its pod runs it, serving in a directory as long as kubelet's pod-volume
/// paths (longer than a socket address holds). Here launcher and QEMU run on this host;
/// a short symlink stands for the pod's mount of that directory (`in_pod`).
struct Pod {
    _root: tempfile::TempDir,
    dir: PathBuf,
    in_pod: PathBuf,
    launcher: std::process::Child,
}

impl Pod {
    async fn start(cvm: &str) -> Pod {
        let root = tempfile::tempdir().unwrap();
        let dir = cvm_node_plugin::launcher::host_dir(
            &root.path().join("var/lib/kubelet/pods"),
            "0d9f3a5e-7c1b-4f6e-9a2d-5b8c7e6f1a23",
            cvm_crds::wellknown::LAUNCHER_SOCKET_VOLUME,
        );
        std::fs::create_dir_all(&dir).unwrap();
        assert!(
            dir.join(cvm_node_plugin::launcher::SOCKET)
                .as_os_str()
                .len()
                > 108
        );
        let in_pod = root.path().join("pod");
        std::os::unix::fs::symlink(&dir, &in_pod).unwrap();
        let launcher = std::process::Command::new(env!("CARGO_BIN_EXE_cvm-launcher"))
            .arg(format!("--socket-dir={}", dir.display()))
            .arg(format!("--cvm={cvm}"))
            .arg("--stop-grace-seconds=5")
            .spawn()
            .unwrap();
        let sock = dir.join(cvm_node_plugin::launcher::SOCKET);
        wait_until("the launcher's socket", || sock.exists()).await;
        Pod {
            _root: root,
            dir,
            in_pod,
            launcher,
        }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = self.launcher.kill();
        let _ = self.launcher.wait();
    }
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid …": comm may hold spaces, so read after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s[s.rfind(')').unwrap_or(0)..].starts_with(") Z"))
        .unwrap_or(false)
}

#[tokio::test]
async fn qemu_runs_in_its_launcher_pod_and_lives_as_long_as_the_pod() {
    use cvm_node_plugin::launcher::{LauncherClient, ProcState};
    let Some(bin) = qemu() else { return };
    let wrap_dir = tempfile::tempdir().unwrap();
    let mut h = host(tcg_wrapper(wrap_dir.path(), &bin));
    let pod = Pod::start("ns/a").await;
    h.opts.launcher_dir_in_pod = pod.in_pod.clone();
    // TCG pins no guest memory (the locked-memory path has its own test below).
    h.opts.lock_guest_memory = false;
    let uid = "cccccccc-0000-0000-0000-000000000003";
    let req = GuestRequest {
        launcher: Some(pod.dir.clone()),
        ..snp_request(uid, "a")
    };

    let p = QemuPlatform::open(h.opts.clone()).await.unwrap();
    let g = p.launch(&req).await.unwrap();
    assert_eq!(g.state, GuestState::Running);
    // QEMU is the launcher's child, not the plugin's; it reads the checked copy of the
    // firmware in the pod's directory and answers QMP there.
    let client = LauncherClient::new(&pod.dir);
    let proc = client.status().await.unwrap();
    assert_eq!(proc.state, ProcState::Running);
    let qemu_pid = proc.pid.unwrap();
    let _guard = KillOnDrop(vec![qemu_pid]);
    assert_eq!(parent_of(qemu_pid), Some(pod.launcher.id()));
    assert_eq!(
        std::fs::read(pod.dir.join("artifacts/firmware")).unwrap(),
        vec![0u8; 64 * 1024]
    );
    let cmdline = std::fs::read_to_string(format!("/proc/{qemu_pid}/cmdline")).unwrap();
    assert!(
        cmdline.contains(&format!("{}/artifacts/firmware", pod.in_pod.display())),
        "{cmdline}"
    );
    assert!(pod.dir.join("qmp.sock").exists());

    // The plugin restarts: the guest is held, nothing is launched again.
    drop(p);
    assert!(running(qemu_pid), "QEMU must outlive the plugin");
    let p = QemuPlatform::open(h.opts.clone()).await.unwrap();
    let held = p.list().await.unwrap();
    assert_eq!(
        held.iter()
            .map(|g| (g.uid.as_str(), g.state))
            .collect::<Vec<_>>(),
        vec![(uid, GuestState::Running)]
    );
    assert_eq!(p.launch(&req).await.unwrap().launch_id, g.launch_id);
    assert_eq!(client.status().await.unwrap().pid, Some(qemu_pid));

    // QEMU dies in the pod: the guest is Failed, with how.
    std::process::Command::new("kill")
        .args(["-9", &qemu_pid.to_string()])
        .status()
        .unwrap();
    let start = Instant::now();
    let failed = loop {
        let l = p.list().await.unwrap();
        if let Some(g) = l.iter().find(|g| g.state == GuestState::Failed) {
            break g.clone();
        }
        assert!(start.elapsed() < TIMEOUT, "{l:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let why = failed.message.unwrap();
    assert!(why.contains("killed by signal 9"), "{why}");

    // Stop and launch again in the same pod: a new QEMU; stop goes through the launcher.
    assert_eq!(
        p.stop(uid).await.unwrap().unwrap().state,
        GuestState::Stopped
    );
    let again = p.launch(&req).await.unwrap();
    assert_ne!(again.launch_id, g.launch_id);
    let second = client.status().await.unwrap().pid.unwrap();
    let _guard2 = KillOnDrop(vec![second]);
    assert_ne!(second, qemu_pid);
    let stopped = p.stop(uid).await.unwrap().unwrap();
    assert_eq!(stopped.state, GuestState::Stopped);
    assert_eq!(client.status().await.unwrap().state, ProcState::Exited);
    assert!(!running(second));
    assert_eq!(recorded_guests(&h.opts.state_dir), 0);

    // The pod ends (kubelet's SIGTERM to the launcher): its QEMU ends with it.
    p.launch(&req).await.unwrap();
    let third = client.status().await.unwrap().pid.unwrap();
    let _guard3 = KillOnDrop(vec![third]);
    let mut pod = pod;
    std::process::Command::new("kill")
        .args(["-TERM", &pod.launcher.id().to_string()])
        .status()
        .unwrap();
    let _ = pod.launcher.wait();
    assert!(!running(third), "QEMU outlived its launcher pod");
}

#[tokio::test]
async fn snp_refused_by_the_pods_qemu_reaches_the_caller_in_qemus_words() {
    let Some(bin) = qemu() else { return };
    let mut h = host(bin);
    let pod = Pod::start("ns/snp").await;
    h.opts.launcher_dir_in_pod = pod.in_pod.clone();
    h.opts.lock_guest_memory = false;
    let uid = "dddddddd-0000-0000-0000-000000000004";
    let req = GuestRequest {
        launcher: Some(pod.dir.clone()),
        ..snp_request(uid, "snp")
    };
    let p = QemuPlatform::open(h.opts.clone()).await.unwrap();
    let e = p.launch(&req).await.expect_err("SNP started without SNP");
    let msg = e.to_string();
    assert_eq!(e.reason(), "QemuExitedAtStart", "{msg}");
    assert!(
        msg.split(" | ").any(|l| l.contains("sev-snp-guest")),
        "no QEMU line about sev-snp-guest in {msg}"
    );
    assert!(p.list().await.unwrap().is_empty());
    assert_eq!(recorded_guests(&h.opts.state_dir), 0);
}

/// SEV guests pin their memory: before QEMU starts, the plugin sets the launcher's
/// RLIMIT_MEMLOCK (by its pid, read from the socket's peer credentials), and a launcher
/// whose limit is still too low refuses, naming both numbers, instead of letting QEMU fail
/// later. (Raising a limit needs CAP_SYS_RESOURCE, which this sandbox lacks; lowering one
/// does not, so the mechanism is checked by lowering it.)
#[tokio::test]
async fn the_launchers_locked_memory_limit_is_set_by_the_plugin_or_the_launch_refused() {
    use cvm_node_plugin::launcher::{LauncherClient, ProcState, Program};
    let Some(bin) = qemu() else { return };
    let pod = Pod::start("ns/mem").await;
    let client = LauncherClient::new(&pod.dir);
    let want = 4u64 << 20;
    let p = client
        .launch("l1", Program::StandIn, Some(want))
        .await
        .unwrap();
    assert_eq!(p.state, ProcState::Running);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", pod.launcher.id())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max locked memory"))
        .unwrap();
    assert_eq!(
        line.split_whitespace().skip(3).take(2).collect::<Vec<_>>(),
        vec!["4194304", "4194304"],
        "{line}"
    );
    client.stop(Duration::from_secs(2)).await.unwrap();

    // A guest needing more than the plugin could grant: refused before QEMU runs.
    let mut h = host(bin);
    h.opts.launcher_dir_in_pod = pod.in_pod.clone();
    let req = GuestRequest {
        launcher: Some(pod.dir.clone()),
        ..snp_request("eeeeeeee-0000-0000-0000-000000000005", "mem")
    };
    let p = QemuPlatform::open(h.opts.clone()).await.unwrap();
    match p.launch(&req).await {
        Err(e) => {
            let msg = e.to_string();
            assert_eq!(e.reason(), "LaunchFailed", "{msg}");
            assert!(
                msg.contains(
                    "the guest pins 536870912 bytes of memory, RLIMIT_MEMLOCK here is 4194304"
                ),
                "{msg}"
            );
        }
        // Where the plugin may raise limits (CAP_SYS_RESOURCE), it did: QEMU then refuses SNP.
        Ok(g) => panic!("an SNP guest started without SNP: {g:?}"),
    }
}

// ---- a real guest on a simulated host ----

/// The test guest (e2e/guest/build.sh: Debian's 6.12 kernel, busybox, cvm-agent), built
/// or taken from the cache.
fn test_guest() -> Option<PathBuf> {
    qemu()?;
    Some(repo_script_dir("e2e/guest/build.sh"))
}

/// Runs the repository's script (progress on stderr) and returns the directory it
/// printed last: where it built or cached what it makes.
fn repo_script_dir(script: &str) -> PathBuf {
    let out = std::process::Command::new("bash")
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join(script),
        )
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("running {script}: {e}"));
    assert!(out.status.success(), "{script} failed");
    let text = String::from_utf8(out.stdout).unwrap();
    PathBuf::from(text.trim().lines().last().unwrap())
}

fn guest_request(uid: &str, name: &str, pod: &Pod) -> GuestRequest {
    let spec: cvm_crds::ConfidentialVMSpec = serde_yaml::from_str(
        "tee: {type: SEV-SNP}\nresources: {vcpus: 1, memoryMiB: 256}\nboot: {firmware: {name: ovmf-snp}, kernel: {name: vmlinuz}, initrd: {name: initrd.img}, cmdline: console=ttyS0 panic=-1}\n",
    )
    .unwrap();
    let mut cvm = ConfidentialVM::new(name, spec);
    cvm.metadata.uid = Some(uid.into());
    cvm.metadata.namespace = Some("ns".into());
    GuestRequest {
        launcher: Some(pod.dir.clone()),
        ..GuestRequest::from_cvm(&cvm).unwrap()
    }
}

fn sim_host(
    dir: &Path,
    guest: &Path,
    pod: &Pod,
    without_tee: bool,
) -> cvm_node_plugin::sim::SimPlatform {
    use cvm_node_plugin::sim::{QemuGuests, SimGuests, SimPlatform};
    let cfg: cvm_node_plugin::config::SimConfig = serde_yaml::from_str("tees: [SEV-SNP]").unwrap();
    let mut q = QemuGuests::new(guest);
    q.binary = qemu().unwrap();
    q.dir_in_pod = pod.in_pod.clone();
    q.without_tee = without_tee;
    SimPlatform::open_with_roots(cfg, &dir.join("state"), &dir.join("roots"), "node-a")
        .unwrap()
        .with_guests(SimGuests::Qemu(q))
}

#[tokio::test]
async fn a_real_guest_on_a_simulated_host_is_attested_as_the_instance_its_agent_names() {
    use cvm_attest::snp::report::SnpReport;
    let Some(guest) = test_guest() else { return };
    let dir = tempfile::tempdir().unwrap();
    let pod = Pod::start("ns/g").await;
    let p = sim_host(dir.path(), &guest, &pod, false);
    let uid = "dddddddd-0000-0000-0000-000000000004";
    let g = p.launch(&guest_request(uid, "g", &pod)).await.unwrap();
    assert_eq!(g.state, GuestState::Running);
    let client = cvm_node_plugin::launcher::LauncherClient::new(&pod.dir);
    let qemu_pid = client.status().await.unwrap().pid.unwrap();
    let _guard = KillOnDrop(vec![qemu_pid]);
    // The kernel and initrd QEMU boots are the checked copies in the pod's directory.
    assert_eq!(
        std::fs::read(pod.dir.join("artifacts/kernel")).unwrap(),
        std::fs::read(guest.join("vmlinuz")).unwrap()
    );

    // The first evidence waits for the boot; the report binds the agent's own key.
    let c = challenge_for(Some("c0ffee"), uid, None).unwrap();
    let ev = p.evidence(uid, &c).await.unwrap();
    let key = ev.instance_key.clone().unwrap();
    assert_eq!(key.len(), 32);
    let report = SnpReport::parse(&ev.report).unwrap();
    assert_eq!(report.report_data, c.binding.report_data(&key));
    // The guest's console is the launcher's: its boot is there, up to the init's words.
    let console = client.status().await.unwrap().console_tail.join("\n");
    assert!(console.contains("cvm-guest: ready"), "{console}");
    // The same running guest answers with the same key.
    let again = p.evidence(uid, &c).await.unwrap();
    assert_eq!(again.instance_key.as_deref(), Some(&key[..]));

    // A relaunch boots another instance: another key.
    p.stop(uid).await.unwrap();
    let g2 = p.launch(&guest_request(uid, "g", &pod)).await.unwrap();
    assert_ne!(g2.launch_id, g.launch_id);
    let relaunched = p.evidence(uid, &c).await.unwrap();
    assert_ne!(relaunched.instance_key.as_deref(), Some(&key[..]));
    p.stop(uid).await.unwrap();
}

#[tokio::test]
async fn a_host_without_a_tee_reports_what_the_guest_agent_found_and_nothing_signed() {
    let Some(guest) = test_guest() else { return };
    let dir = tempfile::tempdir().unwrap();
    let pod = Pod::start("ns/plain").await;
    let p = sim_host(dir.path(), &guest, &pod, true);
    let uid = "eeeeeeee-0000-0000-0000-000000000005";
    p.launch(&guest_request(uid, "plain", &pod)).await.unwrap();
    let client = cvm_node_plugin::launcher::LauncherClient::new(&pod.dir);
    let _guard = KillOnDrop(vec![client.status().await.unwrap().pid.unwrap()]);
    let c = challenge_for(Some("c0ffee"), uid, None).unwrap();
    let ev = p.evidence(uid, &c).await.unwrap();
    assert_eq!(ev.format, cvm_crds::EvidenceFormat::NoTee);
    assert!(ev.cert_chain.is_none() && ev.instance_key.is_none());
    let words = String::from_utf8(ev.report).unwrap();
    // The 6.12 guest has configfs-tsm but no provider, and no SEV or TDX guest device.
    assert!(words.contains("no TSM provider is registered"), "{words}");
    assert!(words.contains("/dev/sev-guest"), "{words}");
    p.stop(uid).await.unwrap();
}

#[tokio::test]
async fn an_unbootable_guest_ends_its_launch_with_the_console_s_words() {
    let Some(guest) = test_guest() else { return };
    let dir = tempfile::tempdir().unwrap();
    // A kernel that boots into an initrd without init: the kernel panics (panic=-1 and
    // -no-reboot end QEMU), and the launch ends with the panic on the console.
    let arts = dir.path().join("arts");
    std::fs::create_dir_all(&arts).unwrap();
    std::fs::copy(guest.join("vmlinuz"), arts.join("vmlinuz")).unwrap();
    std::fs::write(arts.join("initrd.img"), b"not an initramfs").unwrap();
    let pod = Pod::start("ns/bad").await;
    let p = sim_host(dir.path(), &arts, &pod, false);
    let uid = "ffffffff-0000-0000-0000-000000000006";
    p.launch(&guest_request(uid, "bad", &pod)).await.unwrap();
    let c = challenge_for(None, uid, None).unwrap();
    // The agent never answers: the error ends, naming the console's last lines.
    let e = p.evidence(uid, &c).await.unwrap_err();
    assert_eq!(e.reason(), "QemuExited", "{e}");
    assert!(e.to_string().contains("Kernel panic"), "{e}");
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let listed = p.list().await.unwrap();
        if let Some(g) = listed
            .iter()
            .find(|g| g.uid == uid && g.state == GuestState::Failed)
        {
            let m = g.message.clone().unwrap_or_default();
            assert!(m.contains("exited"), "{m}");
            assert!(m.contains("Kernel panic") || m.contains("VFS"), "{m}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the guest never failed: {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_silent_guest_and_a_port_clash_are_named_with_the_guest_s_and_qemu_s_words() {
    let Some(guest) = test_guest() else { return };
    let dir = tempfile::tempdir().unwrap();
    let pod = Pod::start("ns/silent").await;
    let mut p = sim_host(dir.path(), &guest, &pod, false);
    // A guest whose init runs no agent: it boots and stays silent.
    let mut q = cvm_node_plugin::sim::QemuGuests::new(&guest);
    q.binary = qemu().unwrap();
    q.dir_in_pod = pod.in_pod.clone();
    q.agent_timeout = Duration::from_secs(10);
    p = p.with_guests(cvm_node_plugin::sim::SimGuests::Qemu(q));
    let uid = "abababab-0000-0000-0000-000000000007";
    let req = GuestRequest {
        cmdline: Some("console=ttyS0 panic=-1 rdinit=/bin/busybox sleep 3600".into()),
        ..guest_request(uid, "silent", &pod)
    };
    p.launch(&req).await.unwrap();
    let client = cvm_node_plugin::launcher::LauncherClient::new(&pod.dir);
    let _guard = KillOnDrop(vec![client.status().await.unwrap().pid.unwrap()]);
    let c = challenge_for(None, uid, None).unwrap();
    let e = p.evidence(uid, &c).await.unwrap_err();
    assert_eq!(e.reason(), "GuestAgentSilent", "{e}");
    let m = e.to_string();
    assert!(
        m.contains("did not answer") && m.contains("within 10s"),
        "{m}"
    );
    assert!(m.contains("the console's last lines"), "{m}");
    p.stop(uid).await.unwrap();

    // A guest port another process holds: QEMU refuses to start, in its own words.
    let held = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let pod2 = Pod::start("ns/clash").await;
    let p2 = sim_host(dir.path().join("2").as_path(), &guest, &pod2, false);
    let uid2 = "abababab-0000-0000-0000-000000000008";
    let req2 = GuestRequest {
        ports: vec![(cvm_crds::cvm::PortProtocol::Tcp, port)],
        ..guest_request(uid2, "clash", &pod2)
    };
    p2.launch(&req2).await.unwrap();
    let e = p2.evidence(uid2, &c).await.unwrap_err();
    assert_eq!(e.reason(), "QemuExited", "{e}");
    assert!(
        e.to_string()
            .contains(&format!("hostfwd=tcp::{port}-:{port}")),
        "{e}"
    );
    drop(held);
}

// ---- the QEMU that knows SEV-SNP ----

/// bookworm-backports' QEMU 10.0 (e2e/tools/qemu-backports.sh), unpacked in the cache.
fn backports_qemu() -> Option<PathBuf> {
    qemu()?;
    Some(repo_script_dir("e2e/tools/qemu-backports.sh").join("qemu-system-x86_64"))
}

/// Our SEV-SNP command line (with the devices a launcher pod's guest gets), as QEMU runs it.
fn snp_command_line(dir: &Path) -> Vec<String> {
    use cvm_host::qemu::{command_line, GuestDevices, QemuGuestSpec};
    for f in ["ovmf-snp.fd", "vmlinuz", "initrd.img"] {
        std::fs::write(dir.join(f), [0u8; 4096]).unwrap();
    }
    let spec = QemuGuestSpec {
        name: "ns/snp".into(),
        tee: TeeType::SevSnp,
        vcpus: 1,
        memory_mib: 256,
        cpu_model: None,
        firmware: dir.join("ovmf-snp.fd"),
        kernel: Some(dir.join("vmlinuz")),
        initrd: Some(dir.join("initrd.img")),
        cmdline: Some("console=ttyS0".into()),
        policy: 0x30000,
        host_data: Some(vec![0xab; 32]),
        kernel_hashes: true,
        quote_generation_socket: None,
        qmp_socket: dir.join("qmp.sock"),
    };
    let caps = HostCaps {
        cbitpos: Some(51),
        reduced_phys_bits: Some(1),
    };
    let mut args = command_line(&spec, &caps).unwrap();
    let devices = GuestDevices {
        ports: vec![(cvm_crds::cvm::PortProtocol::Tcp, 8080)],
        console_socket: Some(dir.join("console.sock")),
        console_log: None,
        agent_socket: Some(dir.join("agent.sock")),
        vsock_cid: None,
        confidential: true,
    };
    args.extend(devices.args().unwrap());
    args
}

fn qemu_stderr(bin: &Path, args: &[String]) -> String {
    let out = std::process::Command::new(bin)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running QEMU");
    assert!(!out.status.success(), "no KVM here: QEMU must stop");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn qemu_10_takes_our_sev_snp_command_line_and_stops_only_for_lack_of_kvm() {
    let Some(bin) = backports_qemu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let args = snp_command_line(dir.path());
    let version = std::process::Command::new(&bin)
        .arg("--version")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).contains("version 10.0"));
    let err = qemu_stderr(&bin, &args);
    // Every option parsed (the sev-snp-guest object with host-data and kernel-hashes, the
    // memfd backend, the virtio devices with iommu_platform): KVM is all it lacks.
    assert!(
        err.contains("-accel kvm") && err.contains("SEV-SNP not supported by KVM")
            || err.contains("Could not access KVM kernel module"),
        "{err}"
    );
    assert!(!err.contains("invalid object type"), "{err}");
    assert!(
        !err.contains("Property") && !err.contains("not found"),
        "{err}"
    );
}

#[test]
fn debian_stable_s_qemu_is_told_too_old_for_sev_snp_in_words_that_say_so() {
    let Some(bin) = qemu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let err = qemu_stderr(&bin, &snp_command_line(dir.path()));
    assert!(err.contains("sev-snp-guest"), "{err}");
    let e = cvm_host::qemu::QemuError::ExitedEarly {
        status: "exit code 1".into(),
        stderr: err.lines().map(String::from).collect(),
    };
    let words = cvm_node_plugin::qemu::explain(&e, TeeType::SevSnp);
    assert!(words.contains("SEV-SNP needs QEMU 9.1 or newer"), "{words}");
}
