//! `cvm-dev`: a local cvm-operator cluster on a real Kubernetes control plane.
//!
//!   cvm-dev up [--dir DIR] [--nodes N] [--tee sev-snp,tdx] [--no-examples]
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
    /// Build or reuse the binaries, start the control plane, the operator and one
    /// simulated node plugin per node, apply the examples, and run in the foreground
    /// until SIGINT/SIGTERM.
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
        /// The API server's port (default: a free one).
        #[arg(long)]
        port: Option<u16>,
        /// Do not apply examples/ (just the cluster, operator and plugins).
        #[arg(long)]
        no_examples: bool,
        /// Only the control plane and nodes: no operator, no node plugins.
        #[arg(long)]
        bare: bool,
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
            port,
            no_examples,
            bare,
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
    if let Some(pid) = running_pid(&dir) {
        return Err(format!(
            "a cvm-dev (pid {pid}) already runs with --dir {}; stop it with `cvm-dev down --dir {}`",
            dir.display(),
            dir.display()
        ));
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
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
            if let Err(e) = demo(s) {
                eprintln!(
                    "cvm-dev: {e}; the cluster keeps running (logs in {})",
                    s.dir().join("logs").display()
                );
            }
        }
    }
    // Signal handlers first: a Ctrl-C right after the export line must still shut down
    // cleanly (without them, SIGINT's default action would end the process at once).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let (mut term, mut int) = rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        Ok::<_, String>((
            signal(SignalKind::terminate()).map_err(|e| e.to_string())?,
            signal(SignalKind::interrupt()).map_err(|e| e.to_string())?,
        ))
    })?;
    eprintln!("cvm-dev: ready in {:.1} s", started.elapsed().as_secs_f64());
    println!("export KUBECONFIG={}", sys.cp().kubeconfig().display());
    eprintln!(
        "cvm-dev: running; Ctrl-C (or `cvm-dev down --dir {}`) stops it",
        dir.display()
    );
    let sig = rt.block_on(async {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    });
    eprintln!("cvm-dev: {sig}: shutting down");
    sys.shutdown();
    let _ = std::fs::remove_file(pid_file(&dir));
    eprintln!("cvm-dev: stopped");
    Ok(())
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
fn demo(sys: &System) -> Result<(), String> {
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
    cvm_e2e::demo::wait_verified(sys, &names, 120)?;
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
