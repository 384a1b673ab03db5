//! Benchmark: the operator's memory (RSS) with 300 ConfidentialVMs and their 300 launcher
//! pods, on 30 fake SEV-SNP nodes that kwok keeps Ready (and whose pods kwok moves to
//! Running, as a kubelet would), with a real kube-scheduler binding the launcher pods.
//! Prints the figures; asserts only correctness (every CVM placed, every launcher pod
//! Running on its CVM's node), never times or memory: see the benchmark rule.
//!
//! No node plugin runs, so no guest starts and no CVM reaches Verified: the CVMs stay
//! Scheduled, their launcher pods Running. kwok and kube-scheduler come from
//! `e2e/tools/kwok.sh` (built once into ~/.cache/cvm-operator, a few minutes).
//!
//! ```text
//! cargo test -p cvm-e2e --test bench_kwok -- --ignored --nocapture
//! CVM_BENCH_OPERATOR=target/x86_64-unknown-linux-gnu/release/cvm-operator cargo test …
//! ```
//!
//! By default the operator is the harness's `cvm-dev operator` (this profile's build);
//! `CVM_BENCH_OPERATOR` names another operator binary to measure instead (relative to the
//! workspace root, or absolute), e.g. the release `cvm-operator` the images ship
//! (`e2e/tools/images.sh` builds it). `CVM_BENCH_STEADY_SECS` (default 15) is how long
//! the operator is sampled once every pod runs.

mod common_cvm;

use common_cvm::{apply_json, cvm, POLICY};
use cvm_crds::ConfidentialVM;
use cvm_e2e::process::{free_port, Supervisor};
use cvm_e2e::system::{System, SystemOptions};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CVMS: usize = 300;
const NODES: usize = 30;
/// SEV-ES/SNP ASIDs per node: room for 480, so placement never runs out.
const SLOTS_PER_NODE: u32 = 16;
const NS: &str = "bench-kwok";
const OPERATOR: &str = "operator-0";
const LAUNCHER_SELECTOR: &str = "app.kubernetes.io/component=cvm-launcher";
/// How long the operator is sampled idle (before the apply) and steady (after).
const IDLE: Duration = Duration::from_secs(5);
/// Default of `CVM_BENCH_STEADY_SECS`. The operator re-reconciles a Scheduled CVM every
/// 60 s: 75 or more takes that wave in.
const STEADY_SECS: u64 = 15;
const TIMEOUT: Duration = Duration::from_secs(300);

/// The bin dir `e2e/tools/kwok.sh` prints (kwok and kube-scheduler; `../stages.yaml`).
fn kwok_bin() -> PathBuf {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tools/kwok.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("bash runs e2e/tools/kwok.sh");
    assert!(
        out.status.success(),
        "e2e/tools/kwok.sh failed ({}); see its words above",
        out.status
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(
        stdout
            .lines()
            .last()
            .expect("kwok.sh prints its bin dir")
            .trim(),
    )
}

/// A fake SEV-SNP host for kwok: the NFD labels, and the capacity kubelet and the node
/// plugin's device plugin would report (cpu, memory, pods, ASIDs, `/dev/kvm` shares).
fn kwok_node(name: &str) -> serde_json::Value {
    let mut labels = BTreeMap::new();
    labels.insert("kubernetes.io/hostname".to_string(), name.to_string());
    labels.insert("kubernetes.io/os".into(), "linux".into());
    labels.insert("kubernetes.io/arch".into(), "amd64".into());
    labels.insert("type".into(), "kwok".into());
    for t in [cvm_e2e::Tee::Sev, cvm_e2e::Tee::SevEs, cvm_e2e::Tee::SevSnp] {
        labels.insert(t.nfd_label().into(), "true".into());
    }
    let slots = SLOTS_PER_NODE.to_string();
    let capacity = json!({
        "cpu": "64", "memory": "256Gi", "pods": "110",
        cvm_crds::wellknown::RESOURCE_SNP_ESIDS: slots,
        cvm_crds::wellknown::RESOURCE_SEV_ASIDS: slots,
        cvm_crds::wellknown::RESOURCE_KVM: "110",
    });
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
        },
        "status": {"capacity": capacity, "allocatable": capacity},
    })
}

fn node_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_running(p: &Pod) -> bool {
    p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

/// A `/proc/PID/status` field in KiB (`VmRSS`, `VmHWM`, `RssAnon`, `RssFile`).
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Samples VmRSS every 50 ms on a thread of its own, stamped with time since `t0`.
struct Sampler {
    samples: Arc<Mutex<Vec<(Duration, u64)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(pid: u32, t0: Instant) -> Sampler {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (samples.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                if let Some(kib) = status_kib(pid, "VmRSS") {
                    s.lock().unwrap().push((t0.elapsed(), kib));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Sampler {
            samples,
            stop,
            thread: Some(thread),
        }
    }

    /// (min, mean, max, last) VmRSS in KiB over `[from, to)`.
    fn window(&self, from: Duration, to: Duration) -> (u64, u64, u64, u64) {
        let s = self.samples.lock().unwrap();
        let v: Vec<u64> = s
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .map(|(_, k)| *k)
            .collect();
        assert!(!v.is_empty(), "no RSS sample in {from:?}..{to:?}");
        let mean = v.iter().sum::<u64>() / v.len() as u64;
        (
            *v.iter().min().unwrap(),
            mean,
            *v.iter().max().unwrap(),
            *v.last().unwrap(),
        )
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether the operator's `/readyz` answers 200 (it leads and its controllers run).
fn operator_ready(addr: &str) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(s, "GET /readyz HTTP/1.0\r\nHost: {addr}\r\n\r\n").is_err() {
        return false;
    }
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    reply.lines().next().is_some_and(|l| l.contains(" 200 "))
}

#[tokio::test]
#[ignore = "benchmark (about a minute, builds kwok once): run with --ignored --nocapture"]
async fn operator_rss_with_300_cvms_and_launcher_pods_on_kwok_nodes() {
    // An operator binary to measure instead of `cvm-dev operator`: relative to the
    // workspace root (tests run in e2e/) or absolute.
    let operator_exe = std::env::var_os("CVM_BENCH_OPERATOR").map(|p| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let p = root.join(p);
        p.canonicalize()
            .unwrap_or_else(|e| panic!("CVM_BENCH_OPERATOR={}: {e}", p.display()))
    });
    let steady_for = Duration::from_secs(
        std::env::var("CVM_BENCH_STEADY_SECS")
            .map(|v| v.parse().expect("CVM_BENCH_STEADY_SECS is whole seconds"))
            .unwrap_or(STEADY_SECS),
    );
    let kwok = kwok_bin();
    let stages = kwok.parent().unwrap().join("stages.yaml");
    let mut opts = SystemOptions::new(env!("CARGO_BIN_EXE_cvm-dev"), Vec::new());
    opts.operator = false;
    let sys = System::start(opts).expect("system");
    common_cvm::trust_simulator(&sys, POLICY);
    let client = sys.cp.client().await.unwrap();
    common_cvm::namespace(&client, NS).await;
    let logs = sys.dir().join("logs");
    let kc = sys.cp.kubeconfig().display().to_string();
    // kwok, kube-scheduler and (with CVM_BENCH_OPERATOR) the operator: stopped on drop.
    let extra = Supervisor::new().expect("supervisor");

    // The fake nodes, kube-scheduler to bind pods, kwok to keep the nodes Ready and run
    // the pods bound to them.
    let nodes: Api<Node> = Api::all(client.clone());
    for i in 0..NODES {
        let n: Node = serde_json::from_value(kwok_node(&format!("kwok-snp-{i:02}"))).unwrap();
        nodes
            .create(&PostParams::default(), &n)
            .await
            .expect("node");
    }
    let sched_port = free_port().unwrap();
    extra
        .spawn(
            "kube-scheduler",
            &kwok.join("kube-scheduler"),
            &[
                format!("--kubeconfig={kc}"),
                format!("--authentication-kubeconfig={kc}"),
                format!("--authorization-kubeconfig={kc}"),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={sched_port}"),
                "--v=1".into(),
            ],
            &logs.join("kube-scheduler.log"),
        )
        .expect("kube-scheduler starts");
    extra
        .spawn(
            "kwok",
            &kwok.join("kwok"),
            &[
                format!("--kubeconfig={kc}"),
                format!("--config={}", stages.display()),
                "--manage-all-nodes=false".into(),
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake".into(),
                "--node-lease-duration-seconds=40".into(),
                // 300 pod IPs: more than the default /24 holds.
                "--cidr=10.0.0.0/16".into(),
            ],
            &logs.join("kwok.log"),
        )
        .expect("kwok starts");
    let t0 = Instant::now();
    loop {
        let ready = nodes
            .list(&ListParams::default().labels("type=kwok"))
            .await
            .unwrap()
            .items
            .iter()
            .filter(|n| node_ready(n))
            .count();
        if ready == NODES {
            break;
        }
        extra.check_alive("kwok").expect("kwok runs");
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "kwok made only {ready}/{NODES} nodes Ready in 60 s (log: {})",
            logs.join("kwok.log").display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let nodes_ready = t0.elapsed();
    extra
        .check_alive("kube-scheduler")
        .expect("kube-scheduler runs");

    // The operator, with launcher pods.
    let launcher = ["--launcher-image=cvm-launcher:bench"];
    let (pid, addr, which) = match operator_exe {
        None => {
            sys.start_operator_with(OPERATOR, &launcher).unwrap();
            let exe = env!("CARGO_BIN_EXE_cvm-dev");
            (
                sys.operator_pid(OPERATOR).unwrap(),
                sys.metrics_addr(OPERATOR).unwrap(),
                format!("{exe} operator"),
            )
        }
        Some(exe) => {
            let port = free_port().unwrap();
            let mut args = vec![
                format!("--kubeconfig={kc}"),
                format!("--metrics-addr=127.0.0.1:{port}"),
                format!("--identity={OPERATOR}"),
                "--lease-namespace=default".into(),
            ];
            args.extend(launcher.iter().map(|a| a.to_string()));
            let pid = extra
                .spawn(OPERATOR, &exe, &args, &logs.join(format!("{OPERATOR}.log")))
                .unwrap();
            (pid, format!("127.0.0.1:{port}"), exe.display().to_string())
        }
    };
    let alive = || {
        if let Err(e) = sys.check_alive(OPERATOR).and(extra.check_alive(OPERATOR)) {
            panic!("the operator exited: {e}");
        }
    };
    let t0 = Instant::now();
    while !operator_ready(&addr) {
        alive();
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "operator not ready in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let operator_ready = t0.elapsed();
    let sampler = Sampler::start(pid, t0);
    let idle_from = t0.elapsed();
    tokio::time::sleep(IDLE).await;

    // 300 CVMs in one kubectl apply.
    let items: Vec<_> = (0..CVMS)
        .map(|i| cvm(&format!("b{i:03}"), NS, "SEV-SNP"))
        .collect();
    let apply_at = t0.elapsed();
    let ta = Instant::now();
    apply_json(
        &sys,
        &json!({"apiVersion": "v1", "kind": "List", "items": items}),
    )
    .unwrap();
    let applied = ta.elapsed();
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let (mut all_created, mut all_running) = (None, None);
    while all_running.is_none() {
        let list = pods
            .list(&ListParams::default().labels(LAUNCHER_SELECTOR))
            .await
            .unwrap();
        let created = list.items.len();
        let running = list.items.iter().filter(|p| pod_running(p)).count();
        if created >= CVMS && all_created.is_none() {
            all_created = Some(ta.elapsed());
        }
        if running >= CVMS {
            all_running = Some(ta.elapsed());
        }
        alive();
        assert!(
            ta.elapsed() < TIMEOUT,
            "after {TIMEOUT:?}: {created}/{CVMS} launcher pods, {running} Running"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let running_at = t0.elapsed();
    tokio::time::sleep(steady_for).await;
    let steady_to = t0.elapsed();
    alive();
    let hwm = status_kib(pid, "VmHWM").unwrap();
    let (anon, file) = (
        status_kib(pid, "RssAnon").unwrap(),
        status_kib(pid, "RssFile").unwrap(),
    );

    // Correctness: every CVM placed, its launcher pod Running on that node, no node over
    // its ASIDs.
    let cvms: Api<ConfidentialVM> = Api::namespaced(client.clone(), NS);
    let cvm_list = cvms.list(&Default::default()).await.unwrap().items;
    assert_eq!(cvm_list.len(), CVMS);
    let pod_list = pods
        .list(&ListParams::default().labels(LAUNCHER_SELECTOR))
        .await
        .unwrap()
        .items;
    let pod_node: BTreeMap<String, String> = pod_list
        .iter()
        .map(|p| {
            let name = p.metadata.name.clone().unwrap();
            let node = p.spec.as_ref().and_then(|s| s.node_name.clone());
            (name, node.expect("a Running pod is bound"))
        })
        .collect();
    let mut per_node = BTreeMap::<String, usize>::new();
    let mut phases = BTreeMap::<String, usize>::new();
    for c in &cvm_list {
        let name = c.metadata.name.as_deref().unwrap();
        let node = c
            .node_name()
            .unwrap_or_else(|| panic!("CVM {name} is not placed"));
        let pod = cvm_operator::launcher::pod_name(name);
        assert_eq!(
            pod_node.get(&pod).map(String::as_str),
            Some(node),
            "launcher pod {pod} runs on its CVM's node"
        );
        *per_node.entry(node.to_string()).or_insert(0) += 1;
        *phases.entry(format!("{:?}", c.phase())).or_insert(0) += 1;
    }
    assert!(
        per_node.values().all(|&n| n <= SLOTS_PER_NODE as usize),
        "no node over its {SLOTS_PER_NODE} ASIDs: {per_node:?}"
    );

    let idle = sampler.window(idle_from, apply_at);
    let load = sampler.window(apply_at, running_at);
    let steady = sampler.window(running_at, steady_to);
    let (lo, hi) = (
        per_node.values().min().unwrap(),
        per_node.values().max().unwrap(),
    );
    // Who bound the pods: kube-scheduler's Scheduled events on pods (printed, not asserted:
    // events are best-effort).
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), NS);
    let scheduled = events
        .list(&ListParams::default().fields("reason=Scheduled,involvedObject.kind=Pod"))
        .await
        .unwrap()
        .items
        .len();

    let fig = |label: &str, value: String| println!("{label:<38} {value}");
    let secs = |d: Duration| format!("{:.2} s", d.as_secs_f64());
    println!("== operator RSS, {CVMS} CVMs + {CVMS} launcher pods on {NODES} kwok nodes ==");
    fig("operator:", which);
    fig(
        "pods bound by:",
        format!(
            "kube-scheduler {} ({scheduled} Scheduled events)",
            cvm_e2e::tools::KUBERNETES_VERSION
        ),
    );
    fig(
        "pods Running by:",
        "kwok (fake kubelet); no node plugin runs, so no CVM reaches Verified".into(),
    );
    fig("kwok nodes Ready:", secs(nodes_ready));
    fig("operator ready (leading):", secs(operator_ready));
    fig(&format!("kubectl apply of {CVMS} CVMs:"), secs(applied));
    fig(
        &format!("apply -> {CVMS} launcher pods exist:"),
        secs(all_created.unwrap()),
    );
    fig(
        &format!("apply -> {CVMS} launcher pods Running:"),
        secs(all_running.unwrap()),
    );
    fig(
        "kubectl apply done -> all Running:",
        secs(all_running.unwrap().saturating_sub(applied)),
    );
    fig("CVM phases:", format!("{phases:?}"));
    fig(
        "CVMs per node:",
        format!("{lo}..{hi} over {} nodes", per_node.len()),
    );
    let row = |label: String, (min, mean, max, last): (u64, u64, u64, u64)| {
        fig(
            &label,
            format!(
                "min {:5.1} MiB  mean {:5.1} MiB  max {:5.1} MiB  last {:5.1} MiB",
                mib(min),
                mib(mean),
                mib(max),
                mib(last)
            ),
        )
    };
    row(
        format!("RSS before apply ({} s idle):", IDLE.as_secs()),
        idle,
    );
    row("RSS apply -> all Running:".into(), load);
    row(
        format!("RSS steady ({} s after):", steady_for.as_secs()),
        steady,
    );
    fig(
        "RSS peak (VmHWM):",
        format!(
            "{:.1} MiB; at the end RssAnon {:.1} MiB + RssFile {:.1} MiB",
            mib(hwm),
            mib(anon),
            mib(file)
        ),
    );
    let goal = 64.0;
    fig(
        &format!("goal: operator RSS <= {goal} MiB:"),
        format!(
            "peak {:.1} MiB, steady max {:.1} MiB: {}",
            mib(hwm),
            mib(steady.2),
            if mib(hwm) <= goal { "met" } else { "NOT met" }
        ),
    );
}
