//! `cvm-dev`: a local cvm-operator cluster: by default a real kind cluster (one kind node
//! per simulated TEE host, the chart installed with `helm install --wait` from images built
//! here); with `--processes`, a real control plane with the components as local processes.
//!
//!   cvm-dev up [--dir DIR] [--nodes N] [--tee sev-snp,tdx] [--qemu-nodes N]
//!              [--qemu-nodes-without-tee M] [--no-examples] [--processes]
//!   cvm-dev down --dir DIR
//!
//! It is also the multi-call binary the local system runs: `cvm-dev operator …` is the
//! operator and `cvm-dev node-plugin …` a simulated node plugin, each its own process.

use clap::{Parser, Subcommand};
use cvm_e2e::system::{System, SystemOptions};
use cvm_e2e::{SimNode, Tee};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "cvm-dev",
    about = "Run a local cvm-operator cluster with simulated TEE nodes"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build or reuse what is needed, start a kind cluster with one simulated TEE host per
    /// node and the chart installed (or, with --processes, the control plane, the operator
    /// and one node plugin per node as processes), apply the examples, wait for their
    /// verdicts, and run in the foreground until SIGINT/SIGTERM.
    Up {
        /// State, certificates, logs and the kubeconfig.
        #[arg(long, default_value = ".cvm-dev")]
        dir: PathBuf,
        /// How many simulated TEE nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// TEEs handed to the nodes round-robin (sev, sev-es, sev-snp, tdx).
        #[arg(long, value_delimiter = ',', default_value = "sev-snp,sev-snp,tdx")]
        tee: Vec<Tee>,
        /// The API server's port (default: a free one). With --processes.
        #[arg(long, requires = "processes")]
        port: Option<u16>,
        /// Do not apply examples/ (just the cluster, operator and plugins).
        #[arg(long)]
        no_examples: bool,
        /// Only the control plane and nodes: no operator, no node plugins. With --processes.
        #[arg(long, requires = "processes")]
        bare: bool,
        /// Local processes (the API server, the operator and one plugin per simulated node,
        /// no kubelet: seconds to start) instead of a kind cluster.
        #[arg(long)]
        processes: bool,
        /// N more kind nodes (SEV-SNP) whose launcher pods boot real QEMU guests (TCG, the
        /// test guest of e2e/guest) with simulated TEE evidence: all real but the TEE.
        /// Node label sim.cvmp.io/guests=qemu; e2e/guest/plain-guest-cvm.yaml runs there.
        #[arg(long, default_value_t = 0, conflicts_with = "processes")]
        qemu_nodes: usize,
        /// TEST ONLY: M more kind nodes that launch plain QEMU guests without any TEE and
        /// report only what the guest agent says, standing in for a host that lies or is
        /// misconfigured (label sim.cvmp.io/guests=test-only-qemu-without-tee).
        #[arg(long, default_value_t = 0, conflicts_with = "processes")]
        qemu_nodes_without_tee: usize,
    },
    /// Stop a `cvm-dev up` started elsewhere with the same --dir.
    Down {
        #[arg(long, default_value = ".cvm-dev")]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // Multi-call: the components of the local system run from this same binary.
    match args.get(1).and_then(|a| a.to_str()) {
        Some("operator") => {
            return cvm_operator::cli::main_with_args(
                std::iter::once("cvm-operator".into()).chain(args[2..].iter().cloned()),
            )
        }
        Some("node-plugin") => {
            return cvm_node_plugin::cli::main_with_args(
                std::iter::once("cvm-node-plugin".into()).chain(args[2..].iter().cloned()),
            )
        }
        Some("kubectl-cvm") => {
            return kubectl_cvm::cli::main_with_args(
                std::iter::once("kubectl-cvm".into()).chain(args[2..].iter().cloned()),
            )
        }
        _ => {}
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,kube_client::client::builder=off")
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Up {
            dir,
            nodes,
            tee,
            no_examples,
            processes: false,
            qemu_nodes,
            qemu_nodes_without_tee,
            ..
        } => up_kind(
            dir,
            nodes,
            tee,
            (qemu_nodes, qemu_nodes_without_tee),
            !no_examples,
        ),
        Cmd::Up {
            dir,
            nodes,
            tee,
            port,
            no_examples,
            bare,
            ..
        } => up(dir, nodes, tee, port, !no_examples && !bare, bare),
        Cmd::Down { dir } => down(&dir),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cvm-dev: {e}");
            ExitCode::FAILURE
        }
    }
}

fn pid_file(dir: &Path) -> PathBuf {
    dir.join("cvm-dev.pid")
}

fn up(
    dir: PathBuf,
    count: usize,
    tees: Vec<Tee>,
    port: Option<u16>,
    examples: bool,
    bare: bool,
) -> Result<(), String> {
    claim_dir(&dir)?;
    let started = Instant::now();
    let exe = std::env::current_exe().map_err(|e| format!("locating cvm-dev itself: {e}"))?;
    let mut opts = SystemOptions::new(exe, SimNode::fleet(count, &tees));
    opts.dir = Some(dir.clone());
    opts.api_port = port;
    opts.operator = !bare;
    let mut sys = if bare {
        let cp = cvm_e2e::ControlPlane::start(cvm_e2e::Options {
            dir: Some(dir.clone()),
            api_port: port,
            nodes: SimNode::fleet(count, &tees),
            crds: None,
        })
        .map_err(|e| e.to_string())?;
        Running::Bare(cp)
    } else {
        Running::System(System::start(opts).map_err(|e| e.to_string())?)
    };
    std::fs::write(pid_file(&dir), std::process::id().to_string())
        .map_err(|e| format!("writing {}: {e}", pid_file(&dir).display()))?;
    let cp = sys.cp();
    eprintln!(
        "cvm-dev: control plane ready in {:.1} s, {} node(s){}; logs in {}",
        cp.startup.as_secs_f64(),
        count,
        if bare {
            ""
        } else {
            ", operator and node plugins started"
        },
        cp.dir().join("logs").display()
    );
    if examples {
        if let Running::System(s) = &sys {
            // A demo that does not settle is reported, and the cluster keeps running as
            // said: the user can look at it.
            if let Err(e) = cvm_e2e::demo::check_demo_root(s).and_then(|()| demo(s)) {
                eprintln!(
                    "cvm-dev: {e}; the cluster keeps running (logs in {})",
                    s.dir().join("logs").display()
                );
            }
        }
    }
    // Signal handlers first: a Ctrl-C right after the export line must still shut down
    // cleanly (without them, SIGINT's default action would end the process at once).
    let signals = Signals::install()?;
    eprintln!("cvm-dev: ready in {:.1} s", started.elapsed().as_secs_f64());
    println!("export KUBECONFIG={}", sys.cp().kubeconfig().display());
    eprintln!(
        "cvm-dev: running; Ctrl-C (or `cvm-dev down --dir {}`) stops it",
        dir.display()
    );
    let sig = signals.wait();
    eprintln!("cvm-dev: {sig}: shutting down");
    sys.shutdown();
    let _ = std::fs::remove_file(pid_file(&dir));
    eprintln!("cvm-dev: stopped");
    Ok(())
}

/// `cvm-dev up`: the fleet as kind nodes, the chart installed from local images.
fn up_kind(
    dir: PathBuf,
    count: usize,
    tees: Vec<Tee>,
    (qemu, without_tee): (usize, usize),
    examples: bool,
) -> Result<(), String> {
    use cvm_e2e::kind::{GuestKind, Kind, KindOptions};
    cvm_e2e::kind::available()?;
    claim_dir(&dir)?;
    let dir = dir
        .canonicalize()
        .map_err(|e| format!("resolving {}: {e}", dir.display()))?;
    let started = Instant::now();
    // One cluster per --dir; one left by a cvm-dev that died is stale: start afresh.
    let name = cluster_name(&dir);
    cvm_e2e::kind::delete_cluster(&name).map_err(|e| e.to_string())?;
    let mut opts = KindOptions::demo(&name, &dir);
    if count == 0 || tees.is_empty() {
        return Err("--nodes and --tee must name at least one node and one TEE".into());
    }
    opts.fleet = (0..count).map(|i| vec![tees[i % tees.len()]]).collect();
    // The QEMU nodes come after the simulated ones, all SEV-SNP (what the test guest's CVM
    // asks for).
    opts.guests = std::iter::repeat_n(GuestKind::StandIn, count)
        .chain(std::iter::repeat_n(GuestKind::Qemu, qemu))
        .chain(std::iter::repeat_n(GuestKind::QemuWithoutTee, without_tee))
        .collect();
    opts.fleet
        .extend(std::iter::repeat_n(vec![Tee::SevSnp], qemu + without_tee));
    let kind = Kind::up(&opts).map_err(|e| e.to_string())?;
    std::fs::write(pid_file(&dir), std::process::id().to_string())
        .map_err(|e| format!("writing {}: {e}", pid_file(&dir).display()))?;
    for (step, took) in &kind.timings {
        eprintln!("cvm-dev: {step}: {:.1} s", took.as_secs_f64());
    }
    if examples {
        if let Err(e) = demo(&kind) {
            eprintln!("cvm-dev: {e}; the cluster keeps running");
        }
        if qemu > 0 {
            if let Err(e) = demo_guest(&kind) {
                eprintln!("cvm-dev: {e}; the cluster keeps running");
            }
        }
    }
    let signals = Signals::install()?;
    eprintln!("cvm-dev: ready in {:.1} s", started.elapsed().as_secs_f64());
    println!("export KUBECONFIG={}", kind.kubeconfig.display());
    eprintln!(
        "cvm-dev: kind cluster {} running; Ctrl-C (or `cvm-dev down --dir {}`) deletes it",
        kind.name,
        dir.display()
    );
    let sig = signals.wait();
    eprintln!("cvm-dev: {sig}: deleting the kind cluster");
    let deleted = kind.delete();
    let _ = std::fs::remove_file(pid_file(&dir));
    deleted.map_err(|e| e.to_string())?;
    eprintln!("cvm-dev: stopped (the docker daemon keeps its cached images; `bash e2e/tools/docker.sh stop` stops it)");
    Ok(())
}

/// SIGTERM and SIGINT handlers, installed before the export line is printed.
struct Signals {
    rt: tokio::runtime::Runtime,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals, String> {
        use tokio::signal::unix::{signal, SignalKind};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let (term, int) = rt.block_on(async {
            Ok::<_, String>((
                signal(SignalKind::terminate()).map_err(|e| e.to_string())?,
                signal(SignalKind::interrupt()).map_err(|e| e.to_string())?,
            ))
        })?;
        Ok(Signals { rt, term, int })
    }

    /// Blocks until one arrives; its name.
    fn wait(mut self) -> &'static str {
        self.rt.block_on(async {
            tokio::select! {
                _ = self.term.recv() => "SIGTERM",
                _ = self.int.recv() => "SIGINT",
            }
        })
    }
}

enum Running {
    Bare(cvm_e2e::ControlPlane),
    System(System),
}

impl Running {
    fn cp(&self) -> &cvm_e2e::ControlPlane {
        match self {
            Running::Bare(cp) => cp,
            Running::System(s) => &s.cp,
        }
    }
    fn shutdown(&mut self) {
        match self {
            Running::Bare(cp) => cp.shutdown(),
            Running::System(s) => s.shutdown(),
        }
    }
}

/// Applies the examples, waits for every example CVM's verdict (Verified for SEV-SNP and
/// TDX; OwnerVerificationRequired for SEV-ES, which only its owner can check) and shows
/// `kubectl get cvm`.
fn demo(sys: &impl cvm_e2e::demo::KubectlCmd) -> Result<(), String> {
    let applied = cvm_e2e::demo::apply_examples(sys)?;
    for (file, tee) in &applied.skipped {
        eprintln!(
            "cvm-dev: skipped examples/{file}: no node of this fleet hosts {tee} (see --tee)"
        );
    }
    let names = applied.names;
    eprintln!(
        "cvm-dev: applied examples/; waiting for the SEV-SNP and TDX examples to be Verified \
         (SEV-ES evidence is host-reported: it shows OwnerVerificationRequired)"
    );
    let t0 = Instant::now();
    cvm_e2e::demo::wait_verified(sys, &names, 180)?;
    eprintln!(
        "cvm-dev: every example CVM reached its verdict in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    eprint!(
        "{}",
        cvm_e2e::demo::kubectl(sys, &["get", "cvm", "-o", "wide"])?
    );
    Ok(())
}

/// The test guest's CVM on a QEMU node: apply e2e/guest/plain-guest-cvm.yaml and wait
/// for its verdict.
fn demo_guest(sys: &impl cvm_e2e::demo::KubectlCmd) -> Result<(), String> {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/plain-guest-cvm.yaml");
    cvm_e2e::demo::kubectl(sys, &["apply", "-f", &file.display().to_string()])?;
    eprintln!("cvm-dev: applied e2e/guest/plain-guest-cvm.yaml; waiting for its real guest to boot and be Verified");
    let t0 = Instant::now();
    cvm_e2e::demo::wait_verified(sys, &["plain-guest".to_string()], 240)?;
    eprintln!(
        "cvm-dev: plain-guest Verified in {:.1} s (`kubectl logs plain-guest-launcher` shows its boot)",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The kind cluster of a --dir: `cvm-dev-XXXX` from a hash of its path.
fn cluster_name(dir: &Path) -> String {
    // FNV-1a: stable across builds, so a later cvm-dev finds the same cluster.
    let h = dir
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        });
    format!("cvm-dev-{:04x}", h & 0xffff)
}

/// Refuses a --dir another `cvm-dev up` runs with; creates it otherwise.
fn claim_dir(dir: &Path) -> Result<(), String> {
    if let Some(pid) = running_pid(dir) {
        return Err(format!(
            "a cvm-dev (pid {pid}) already runs with --dir {}; stop it with `cvm-dev down --dir {}`",
            dir.display(),
            dir.display()
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))
}

fn running_pid(dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_file(dir))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: signal 0 only checks that the process exists.
    (pid > 0 && unsafe { libc::kill(pid, 0) } == 0).then_some(pid)
}

fn down(dir: &Path) -> Result<(), String> {
    let Some(pid) = running_pid(dir) else {
        let _ = std::fs::remove_file(pid_file(dir));
        eprintln!("cvm-dev: nothing runs with --dir {}", dir.display());
        return Ok(());
    };
    // SAFETY: plain signal to the pid recorded by `cvm-dev up`.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        // SAFETY: as above, signal 0 only probes.
        if unsafe { libc::kill(pid, 0) } != 0 {
            eprintln!("cvm-dev: stopped pid {pid}");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!(
        "pid {pid} did not stop within 30 s; kill it with `kill -9 {pid}`"
    ))
}
