//! The whole system on the local control plane: the operator and one simulated node
//! plugin per node, each a real process (so tests can kill and restart them), all
//! started from one multi-call binary (`cvm-dev operator …`, `cvm-dev node-plugin …`).

use crate::error::{io, HarnessError, Result};
use crate::process::{free_port, Supervisor};
use crate::{ControlPlane, Options, SimNode, Tee};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How to start the system.
#[derive(Debug, Clone)]
pub struct SystemOptions {
    /// The multi-call binary (`cvm-dev`): `CARGO_BIN_EXE_cvm-dev` in tests, the running
    /// executable in `cvm-dev up`.
    pub exe: PathBuf,
    pub dir: Option<PathBuf>,
    pub api_port: Option<u16>,
    pub nodes: Vec<SimNode>,
    /// Start the operator (one replica).
    pub operator: bool,
    /// Start a simulated node plugin per node. Without them (the operator's component
    /// tests) the harness publishes each node's TEE labels and key capacity itself, and
    /// the test writes what a plugin would.
    pub plugins: bool,
    /// Milliseconds a simulated launch takes.
    pub launch_delay_ms: u64,
    /// Seed the simulator roots from the chart's published demo root (what
    /// `examples/attestation-policy.yaml` names); otherwise a root of this run's own.
    pub demo_root: bool,
}

impl SystemOptions {
    pub fn new(exe: impl Into<PathBuf>, nodes: Vec<SimNode>) -> Self {
        SystemOptions {
            exe: exe.into(),
            dir: None,
            api_port: None,
            nodes,
            operator: true,
            plugins: true,
            launch_delay_ms: 0,
            demo_root: true,
        }
    }
}

/// A running system. Dropping it stops every process (operator and plugins first).
pub struct System {
    procs: Supervisor,
    /// Metrics ports of the running components, by process name.
    ports: std::sync::Mutex<std::collections::HashMap<String, u16>>,
    /// Process ids of the operator replicas, by process name (the latest start).
    pids: std::sync::Mutex<std::collections::HashMap<String, u32>>,
    exe: PathBuf,
    launch_delay_ms: u64,
    pub cp: ControlPlane,
}

fn tee_flag(t: Tee) -> &'static str {
    match t {
        Tee::Sev => "SEV",
        Tee::SevEs => "SEV-ES",
        Tee::SevSnp => "SEV-SNP",
        Tee::Tdx => "TDX",
    }
}

impl System {
    pub fn start(opts: SystemOptions) -> Result<System> {
        let nodes: Vec<SimNode> = opts
            .nodes
            .iter()
            .cloned()
            .map(|mut n| {
                n.publish_tee = !opts.plugins;
                n
            })
            .collect();
        let cp = ControlPlane::start(Options {
            dir: opts.dir.clone(),
            api_port: opts.api_port,
            nodes: nodes.clone(),
            crds: None,
        })?;
        let sys = System {
            procs: Supervisor::new()?,
            ports: Default::default(),
            pids: Default::default(),
            exe: opts.exe.clone(),
            launch_delay_ms: opts.launch_delay_ms,
            cp,
        };
        std::fs::create_dir_all(sys.sim_root_dir()).map_err(io("creating", sys.sim_root_dir()))?;
        if opts.demo_root {
            let from = crate::demo::demo_root_dir();
            cvm_node_plugin::sim::roots::seed(&sys.sim_root_dir(), &from)
                .map_err(|e| HarnessError::Thread(format!("seeding the demo root: {e}")))?;
        }
        // Create the shared simulator roots before any plugin starts, so that all agree
        // and the demo policy can name them.
        sim_root_fingerprints(&sys)?;
        for n in nodes.iter().filter(|_| opts.plugins) {
            sys.start_plugin(n)?;
        }
        if opts.operator {
            sys.start_operator("operator-0")?;
        }
        Ok(sys)
    }

    /// Where the simulated vendor roots live (shared by all plugins, like AMD's ARK).
    pub fn sim_root_dir(&self) -> PathBuf {
        self.cp.dir().join("sim-root")
    }

    fn log(&self, name: &str) -> PathBuf {
        self.cp.dir().join("logs").join(format!("{name}.log"))
    }

    /// Starts an operator replica named `name` (its Lease identity).
    pub fn start_operator(&self, name: &str) -> Result<()> {
        self.start_operator_with(name, &[])
    }

    /// Starts an operator replica named `name` with `extra` flags (e.g.
    /// `--migration-timeout=20s`).
    pub fn start_operator_with(&self, name: &str, extra: &[&str]) -> Result<()> {
        let port = free_port()?;
        let mut args = vec![
            "operator".to_string(),
            format!("--kubeconfig={}", self.cp.kubeconfig().display()),
            format!("--metrics-addr=127.0.0.1:{port}"),
            format!("--identity={name}"),
            "--lease-namespace=default".into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let pid = self.procs.spawn(name, &self.exe, &args, &self.log(name))?;
        self.ports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), port);
        self.pids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), pid);
        Ok(())
    }

    /// Process id of the operator replica `name` as last started (e.g. to read its
    /// `/proc/PID/status`); `None` if none was started under that name.
    pub fn operator_pid(&self, name: &str) -> Option<u32> {
        self.pids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .copied()
    }

    /// `127.0.0.1:PORT` of a component's metrics/health endpoint.
    pub fn metrics_addr(&self, name: &str) -> Option<String> {
        self.ports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .map(|p| format!("127.0.0.1:{p}"))
    }

    /// Starts the node plugin of `node` (state survives restarts in its state dir).
    pub fn start_plugin(&self, node: &SimNode) -> Result<()> {
        let name = plugin_name(&node.name);
        let state = self.cp.dir().join("plugins").join(&node.name);
        std::fs::create_dir_all(&state).map_err(io("creating", &state))?;
        let port = free_port()?;
        let mut args = vec![
            "node-plugin".to_string(),
            format!("--node-name={}", node.name),
            format!("--kubeconfig={}", self.cp.kubeconfig().display()),
            format!("--state-dir={}", state.display()),
            format!("--sim-root-dir={}", self.sim_root_dir().display()),
            format!("--sim-slots={}", node.tee_slots),
            format!("--sim-launch-delay-ms={}", self.launch_delay_ms),
            format!("--metrics-addr=127.0.0.1:{port}"),
        ];
        if let Some(t) = node.tee {
            args.push(format!("--sim-tee={}", tee_flag(t)));
        }
        if let Some(extra) = &node.sim_settings {
            // A config file replaces the --sim-* flags: carry them over, then the extras.
            let mut cfg = serde_json::json!({
                "tees": node.tee.map(|t| vec![tee_flag(t)]).unwrap_or_default(),
                "slots": node.tee_slots,
                "launchDelayMs": self.launch_delay_ms,
            });
            if let (Some(base), Some(more)) = (cfg.as_object_mut(), extra.as_object()) {
                for (k, v) in more {
                    base.insert(k.clone(), v.clone());
                }
            }
            let path = state.join("sim-config.json");
            std::fs::write(&path, cfg.to_string()).map_err(io("writing", &path))?;
            args.retain(|a| !a.starts_with("--sim-") || a.starts_with("--sim-root-dir"));
            args.push(format!("--sim-config={}", path.display()));
        }
        self.procs
            .spawn(&name, &self.exe, &args, &self.log(&name))?;
        Ok(())
    }

    /// Adds a node and starts its plugin.
    pub async fn add_node(&self, mut node: SimNode) -> Result<()> {
        node.publish_tee = false;
        self.cp.add_node(node.clone()).await?;
        self.start_plugin(&node)
    }

    /// SIGKILLs a component (`operator-0`, `plugin-<node>`), as a crash would.
    pub fn kill(&self, name: &str) {
        self.procs.kill(name);
    }

    /// Processes still running.
    pub fn running(&self) -> Vec<String> {
        self.procs.running()
    }

    /// An error when a component exited, with its log tail.
    pub fn check_alive(&self, name: &str) -> Result<()> {
        self.procs.check_alive(name)
    }

    pub fn dir(&self) -> &Path {
        self.cp.dir()
    }

    /// Stops operator and plugins, then the control plane.
    pub fn shutdown(&mut self) {
        self.procs.stop_all(Duration::from_secs(5));
        self.cp.shutdown();
    }
}

impl Drop for System {
    fn drop(&mut self) {
        self.procs.stop_all(Duration::from_secs(5));
    }
}

/// `(name, sha256 hex)` of this cluster's simulated vendor roots, created on first use:
/// what a demo AttestationPolicy lists in `trustedRoots`.
pub fn sim_root_fingerprints(sys: &System) -> Result<Vec<(String, String)>> {
    let fps = cvm_node_plugin::sim::roots::cluster_fingerprints(&sys.sim_root_dir())
        .map_err(|e| HarnessError::Thread(format!("simulated roots: {e}")))?;
    let strip = |s: String| s.trim_start_matches("sha256:").to_string();
    let mut out = Vec::new();
    if let Some(s) = fps.snp {
        out.push(("cvm-sim-amd".to_string(), strip(s)));
    }
    if let Some(t) = fps.tdx {
        out.push(("cvm-sim-intel".to_string(), strip(t)));
    }
    Ok(out)
}

/// Process name of a node's plugin.
pub fn plugin_name(node: &str) -> String {
    format!("plugin-{node}")
}

/// Error for callers that need a HarnessError from a message.
pub fn harness_error(msg: impl Into<String>) -> HarnessError {
    HarnessError::Thread(msg.into())
}
