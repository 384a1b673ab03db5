//! The node plugin's command line (also reachable as `cvm-dev node-plugin …`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{parse_tee, SimConfig, DEFAULT_SLOTS};
use crate::qemu::{QemuOptions, QemuPlatform};
use crate::store::StateLock;
use crate::{run, Platform, SimPlatform};
use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

/// Which backend launches the guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PlatformKind {
    /// Simulated host: guests kept in the plugin, evidence signed by simulated roots.
    Sim,
    /// Real host: guests run by QEMU, capabilities detected under --host-root.
    Qemu,
}

/// What a simulated host's launcher pods run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SimGuestKind {
    /// The launcher's stand-in process: no VM.
    StandIn,
    /// Real QEMU guests (TCG) booted from the CVM's kernel and initrd, with simulated
    /// TEE evidence that binds what each guest's agent answers.
    Qemu,
    /// TEST ONLY: real QEMU guests with no TEE and no simulated evidence, standing in for
    /// a host that lies or is misconfigured; only the guest agent's answer is reported.
    TestOnlyQemuWithoutTee,
}

impl SimGuestKind {
    fn parse_label(value: &str) -> anyhow::Result<Self> {
        <SimGuestKind as ValueEnum>::from_str(value, false).map_err(|_| {
            anyhow::anyhow!(
                "{value:?} is not a guest kind: stand-in, qemu or test-only-qemu-without-tee"
            )
        })
    }
}

/// Per-host agent: advertises the host's TEEs, launches the guests of the
/// ConfidentialVMs bound to this node, and reports their evidence.
#[derive(Debug, Parser)]
#[command(
    name = "cvm-node-plugin",
    version,
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    cmd: Option<Sub>,
    /// Print the simulated launch measurement of each ConfidentialVM in FILE (YAML, one
    /// or more documents) and exit: the value for spec.attestation.expectedMeasurements.
    /// Takes no other option ($KUBECONFIG and $NODE_NAME are ignored).
    // Not `exclusive`: clap counts values from the environment as given, so any shell with
    // KUBECONFIG set would refuse it. `parse` keeps it alone on the command line instead.
    #[arg(long, value_name = "FILE")]
    measure: Option<PathBuf>,
    /// Name of the Node this plugin serves (the Node must exist).
    #[arg(long, env = "NODE_NAME", required_unless_present = "measure")]
    node_name: Option<String>,
    /// Kubeconfig file; in-cluster config or $KUBECONFIG when unset.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Directory for this host's guest state (survives plugin restarts).
    #[arg(long, required_unless_present = "measure")]
    state_dir: Option<PathBuf>,
    /// Backend: `sim` (simulated host) or `qemu` (guests run by QEMU on a TEE host).
    #[arg(long, value_enum, default_value = "sim")]
    platform: PlatformKind,
    /// QEMU binary for --platform qemu (looked up in PATH unless a path).
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu_binary: PathBuf,
    /// Boot artifacts for --platform qemu: a CVM's artifact name (or URL basename) is a
    /// file in this directory.
    #[arg(long, default_value = "/var/lib/cvm/artifacts")]
    artifacts_dir: PathBuf,
    /// Detection root for --platform qemu (/sys, /dev and /proc are read under it).
    #[arg(long, default_value = "/")]
    host_root: PathBuf,
    /// Host caps JSON for --platform qemu ({"cbitpos":51,"reducedPhysBits":1}); each field
    /// given overrides what detection found.
    #[arg(long)]
    host_caps: Option<PathBuf>,
    /// Simulator configuration file (YAML or JSON); overrides the --sim-* flags.
    #[arg(long)]
    sim_config: Option<PathBuf>,
    /// TEE the simulated host offers (repeat or comma-separate): sev, sev-es, sev-snp, tdx.
    #[arg(long, value_delimiter = ',', default_value = "sev-snp")]
    sim_tee: Vec<String>,
    /// SEV-ES/SNP ASIDs (AMD) or TDX keys (Intel) of the simulated host.
    #[arg(long, default_value_t = DEFAULT_SLOTS)]
    sim_slots: u32,
    /// Firmware version the simulated host reports.
    #[arg(long)]
    sim_firmware_version: Option<String>,
    /// Simulated launch time in milliseconds.
    #[arg(long, default_value_t = 0)]
    sim_launch_delay_ms: u64,
    /// Make every live-migration transfer from the simulated host fail (Transferred=False),
    /// to exercise a migration's roll-back.
    #[arg(long)]
    sim_fail_sends: bool,
    /// Directory of the simulated vendor roots, shared by every plugin of the cluster
    /// (created on first use). Required with --platform sim.
    #[arg(long)]
    sim_root_dir: Option<PathBuf>,
    /// Seed --sim-root-dir from this directory (its shared roots are copied where absent):
    /// how every plugin of a cluster gets one root without a shared file system, e.g. the
    /// chart's published demo root.
    #[arg(long)]
    sim_root_seed: Option<PathBuf>,
    /// Read this node's simulated TEEs from this label of its Node (values joined by
    /// '.', e.g. `sev-snp.tdx`), where set; the --sim-tee flags otherwise. One DaemonSet
    /// can so simulate a mixed fleet.
    #[arg(long)]
    sim_tees_label: Option<String>,
    /// What the simulated host's launcher pods run: stand-in, qemu (real guests under
    /// TCG, simulated evidence) or test-only-qemu-without-tee (real guests, no evidence:
    /// a lying host, for tests).
    #[arg(long, value_enum, default_value = "stand-in")]
    sim_guests: SimGuestKind,
    /// Read the guest kind from this label of the Node, where set (overrides --sim-guests).
    #[arg(long)]
    sim_guests_label: Option<String>,
    /// Seconds a QEMU guest of a simulated host has to boot and its agent to answer.
    #[arg(long, default_value_t = 90)]
    sim_agent_timeout_secs: u64,
    /// Serve kubelet's device-plugin API in this directory (kubelet's, normally
    /// /var/lib/kubelet/device-plugins): kubelet then advertises the TEE keys and
    /// `devices.cvmp.io/kvm` in the Node's capacity and counts them for every pod. Without
    /// it the plugin writes the keys into Node status itself (clusters without kubelets,
    /// such as `cvm-dev up --processes`).
    #[arg(long, value_name = "DIR")]
    device_plugin_dir: Option<PathBuf>,
    /// Guests live in their CVMs' launcher pods (the operator's --launcher-image): this is
    /// kubelet's pod directory as mounted here (normally /var/lib/kubelet/pods), where
    /// each launcher's command socket is. A guest then runs only while its pod runs.
    #[arg(long, value_name = "DIR")]
    launcher_pods_dir: Option<PathBuf>,
    /// Address for /metrics and /healthz, e.g. 127.0.0.1:9102.
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// Full re-plan interval in seconds (also the retry interval of failed launches).
    #[arg(long, default_value_t = 30)]
    resync_secs: u64,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
}

/// Host tools that need no cluster.
#[derive(Debug, Subcommand)]
enum Sub {
    /// Report which TEEs this host offers and why each missing one is off (run it on a
    /// host before joining it to the cluster).
    ///
    /// Example: cvm-node-plugin detect -o json
    Detect {
        /// Read /sys, /dev and /proc under this root (a fake tree in tests).
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// Output format: text or json.
        #[arg(short = 'o', long, default_value = "text")]
        output: String,
    },
    /// Print the QEMU command line the QEMU backend would run for a ConfidentialVM.
    ///
    /// Example: cvm-node-plugin qemu-args --cvm examples/sev-snp-cvm.yaml --host-caps caps.json
    QemuArgs {
        /// A ConfidentialVM manifest (YAML).
        #[arg(long)]
        cvm: PathBuf,
        /// Host capabilities as JSON ({"cbitpos":51,"reducedPhysBits":1}); detected when unset.
        #[arg(long)]
        host_caps: Option<PathBuf>,
        /// Where boot artifacts named in the CVM live (file name = artifact name or URL basename).
        #[arg(long, default_value = "/var/lib/cvm/artifacts")]
        artifacts_dir: PathBuf,
        /// The QMP socket path to put on the command line.
        #[arg(long, default_value = "/run/cvm/guest.qmp")]
        qmp_socket: PathBuf,
    },
    /// Create (where absent) the simulated vendor roots in DIR and print the fingerprints
    /// a policy names to trust them. Simulated evidence proves nothing about hardware.
    ///
    /// Example: cvm-node-plugin sim-roots --dir /var/lib/cvm-node-plugin/sim-root
    SimRoots {
        #[arg(long)]
        dir: PathBuf,
    },
}

fn artifact_path(
    dir: &std::path::Path,
    what: &str,
    a: &cvm_crds::cvm::ArtifactRef,
) -> anyhow::Result<PathBuf> {
    crate::qemu::artifact_path(dir, what, a).map_err(anyhow::Error::msg)
}

fn run_sub(sub: &Sub) -> anyhow::Result<()> {
    match sub {
        Sub::SimRoots { dir } => {
            let fps = crate::sim::roots::cluster_fingerprints(dir)?;
            println!("SEV-SNP ARK:  {}", fps.snp.unwrap_or_default());
            println!("TDX root CA:  {}", fps.tdx.unwrap_or_default());
            Ok(())
        }
        Sub::Detect { root, output } => {
            let report = cvm_host::detect::report(root);
            match output.as_str() {
                "json" => println!("{}", serde_json::to_string_pretty(&report)?),
                "text" => print!("{}", report.text()),
                other => anyhow::bail!("unknown output format {other:?}: use text or json"),
            }
            Ok(())
        }
        Sub::QemuArgs {
            cvm,
            host_caps,
            artifacts_dir,
            qmp_socket,
        } => {
            use serde::Deserialize as _;
            let text = std::fs::read_to_string(cvm)
                .with_context(|| format!("reading {}", cvm.display()))?;
            let doc = serde_yaml::Deserializer::from_str(&text)
                .next()
                .with_context(|| format!("{} is empty", cvm.display()))?;
            let obj = cvm_crds::ConfidentialVM::deserialize(doc)
                .with_context(|| format!("{} is not a ConfidentialVM manifest", cvm.display()))?;
            let caps = match host_caps {
                Some(p) => serde_json::from_str(
                    &std::fs::read_to_string(p)
                        .with_context(|| format!("reading {}", p.display()))?,
                )
                .with_context(|| format!("{} is not host-caps JSON", p.display()))?,
                None => cvm_host::detect::report(std::path::Path::new("/")).host_caps(),
            };
            let boot = &obj.spec.boot;
            let paths = cvm_host::qemu::ArtifactPaths {
                firmware: artifact_path(artifacts_dir, "firmware", &boot.firmware)?,
                kernel: boot
                    .kernel
                    .as_ref()
                    .map(|k| artifact_path(artifacts_dir, "kernel", k))
                    .transpose()?,
                initrd: boot
                    .initrd
                    .as_ref()
                    .map(|k| artifact_path(artifacts_dir, "initrd", k))
                    .transpose()?,
                qmp_socket: qmp_socket.clone(),
                quote_generation_socket: None,
            };
            let spec = cvm_host::qemu::QemuGuestSpec::from_cvm(&obj, &paths)?;
            let args = cvm_host::qemu::command_line(&spec, &caps)?;
            println!("{}", shell_lines(&args));
            Ok(())
        }
    }
}

/// One option per line with its value, shell-quoted, ready to paste.
fn shell_lines(args: &[String]) -> String {
    let quote = |a: &str| {
        if a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=,:+@%".contains(c))
        {
            a.to_string()
        } else {
            format!("'{}'", a.replace('\'', "'\\''"))
        }
    };
    let mut lines = vec!["qemu-system-x86_64".to_string()];
    let mut i = 0;
    while i < args.len() {
        let mut line = quote(&args[i]);
        if args[i].starts_with('-') && args.get(i + 1).is_some_and(|v| !v.starts_with('-')) {
            line.push(' ');
            line.push_str(&quote(&args[i + 1]));
            i += 1;
        }
        lines.push(line);
        i += 1;
    }
    lines.join(" \\\n  ")
}

/// The TEEs `label` of Node `node` names (`None`: no such label).
async fn node_label(
    client: &kube::Client,
    node: &str,
    label: &str,
) -> anyhow::Result<Option<String>> {
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client.clone());
    let n = nodes
        .get(node)
        .await
        .with_context(|| format!("reading Node {node} for its {label} label"))?;
    Ok(n.metadata.labels.and_then(|mut l| l.remove(label)))
}

async fn node_sim_tees(
    client: &kube::Client,
    node: &str,
    label: &str,
) -> anyhow::Result<Option<Vec<cvm_crds::TeeType>>> {
    let Some(value) = node_label(client, node, label).await? else {
        return Ok(None);
    };
    parse_tee_list(&value)
        .map(Some)
        .with_context(|| format!("label {label}={value} of Node {node}"))
}

/// The simulated host's guests, from --sim-guests or the Node's label.
async fn sim_guests(
    cli: &Cli,
    client: &kube::Client,
    node: &str,
) -> anyhow::Result<crate::sim::SimGuests> {
    let mut kind = cli.sim_guests;
    if let Some(label) = &cli.sim_guests_label {
        if let Some(v) = node_label(client, node, label).await? {
            kind = SimGuestKind::parse_label(&v)
                .with_context(|| format!("label {label}={v} of Node {node}"))?;
        }
    }
    let mut q = crate::sim::QemuGuests::new(&cli.artifacts_dir);
    q.binary = cli.qemu_binary.clone();
    q.agent_timeout = Duration::from_secs(cli.sim_agent_timeout_secs.max(1));
    Ok(match kind {
        SimGuestKind::StandIn => crate::sim::SimGuests::StandIn,
        SimGuestKind::Qemu => crate::sim::SimGuests::Qemu(q),
        SimGuestKind::TestOnlyQemuWithoutTee => {
            tracing::warn!(node = %node, "TEST ONLY: this simulated host launches plain guests without any TEE and reports only what their agents say (a lying host); never use this outside a test cluster");
            crate::sim::SimGuests::Qemu(crate::sim::QemuGuests {
                without_tee: true,
                ..q
            })
        }
    })
}

/// `sev-snp.tdx` → [SEV-SNP, TDX].
fn parse_tee_list(value: &str) -> anyhow::Result<Vec<cvm_crds::TeeType>> {
    value
        .split('.')
        .filter(|t| !t.is_empty())
        .map(|t| parse_tee(t).map_err(anyhow::Error::from))
        .collect()
}

fn sim_config(cli: &Cli) -> anyhow::Result<SimConfig> {
    if let Some(p) = &cli.sim_config {
        return Ok(SimConfig::from_file(p)?);
    }
    let tees = cli
        .sim_tee
        .iter()
        .map(|t| parse_tee(t))
        .collect::<Result<Vec<_>, _>>()?;
    let cfg = SimConfig {
        tees,
        slots: cli.sim_slots,
        firmware_version: cli.sim_firmware_version.clone(),
        launch_delay_ms: cli.sim_launch_delay_ms,
        fail_sends: cli.sim_fail_sends,
        ..SimConfig::default()
    };
    cfg.validate()?;
    Ok(cfg)
}

async fn client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p)
                .with_context(|| format!("reading kubeconfig {}", p.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("using kubeconfig {}", p.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no kubeconfig given and none inferred (in-cluster or $KUBECONFIG)")?,
    };
    Ok(kube::Client::try_from(config)?)
}

fn print_measurements(file: &PathBuf) -> anyhow::Result<()> {
    use serde::Deserialize as _;
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let cvm = cvm_crds::ConfidentialVM::deserialize(doc)
            .with_context(|| format!("{} is not a ConfidentialVM manifest", file.display()))?;
        println!(
            "{}\t{}\t{}",
            cvm.metadata.name.as_deref().unwrap_or("-"),
            cvm.spec.tee.tee_type,
            crate::simulated_measurement(&cvm.spec)
        );
    }
    Ok(())
}

/// Parses the command line. `--measure` stands alone on it, but values that options take
/// from the environment (`KUBECONFIG`, `NODE_NAME`, set in many shells and every plugin
/// pod) do not count against it.
fn parse<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::parser::ValueSource;
    use clap::{CommandFactory, FromArgMatches};
    let mut cmd = Cli::command();
    let matches = cmd.try_get_matches_from_mut(args)?;
    let given = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
    if given("measure") {
        let other = cmd
            .get_arguments()
            .filter(|a| a.get_id() != "measure" && given(a.get_id().as_str()))
            .find_map(|a| a.get_long());
        if let Some(other) = other {
            return Err(cmd.error(
                clap::error::ErrorKind::ArgumentConflict,
                format!("--measure takes no other option, but --{other} was given"),
            ));
        }
    }
    Cli::from_arg_matches(&matches).map_err(|e| e.format(&mut cmd))
}

/// Parses `args` (the first is the program name) and runs the plugin to completion.
pub fn main_with_args<I, T>(args: I) -> std::process::ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    match parse(args) {
        Ok(cli) => cvm_telemetry::cli::run_daemon("cvm-node-plugin", run_cli(cli)),
        Err(e) => cvm_telemetry::cli::clap_exit(&e),
    }
}

async fn run_cli(cli: Cli) -> anyhow::Result<()> {
    if let Some(sub) = &cli.cmd {
        return run_sub(sub);
    }
    if let Some(f) = &cli.measure {
        return print_measurements(f);
    }
    let (Some(node_name), Some(state_dir)) = (cli.node_name.clone(), cli.state_dir.clone()) else {
        anyhow::bail!("--node-name and --state-dir are required");
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,kube=warn".into());
    if cli.log_json {
        let _ = tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .try_init();
    } else {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
    }

    // Held until the process exits: the platform's guest file has one writer.
    let Some(_lock) = state_lock(&state_dir).await? else {
        return Ok(());
    };
    let client = client(cli.kubeconfig.as_ref()).await?;
    match cli.platform {
        PlatformKind::Sim => {
            let Some(sim_root_dir) = cli.sim_root_dir.clone() else {
                anyhow::bail!("--sim-root-dir is required with --platform sim");
            };
            let mut cfg = sim_config(&cli)?;
            if let Some(label) = &cli.sim_tees_label {
                if let Some(tees) = node_sim_tees(&client, &node_name, label).await? {
                    cfg.tees = tees;
                    cfg.validate()?;
                }
            }
            if let Some(seed) = &cli.sim_root_seed {
                crate::sim::roots::seed(&sim_root_dir, seed)?;
            }
            let guests = sim_guests(&cli, &client, &node_name).await?;
            if guests != crate::sim::SimGuests::StandIn && cli.launcher_pods_dir.is_none() {
                anyhow::bail!(
                    "this node's QEMU guests run in launcher pods: give --launcher-pods-dir (kubelet's pod directory), or --sim-guests stand-in"
                );
            }
            let platform =
                SimPlatform::open_with_roots(cfg, &state_dir, &sim_root_dir, &node_name)?
                    .with_guests(guests);
            let fps = platform.root_fingerprints();
            // Printed on stdout so scripts can pick it up to write a policy that trusts the sim.
            if let Some(s) = &fps.snp {
                println!("simulated SEV-SNP root (ARK): {s}");
            }
            if let Some(t) = &fps.tdx {
                println!("simulated TDX root CA: {t}");
            }
            tracing::info!(node = %node_name, roots = %fps, "simulated platform ready");
            serve(&cli, client, platform, node_name, state_dir).await
        }
        PlatformKind::Qemu => {
            let mut opts = QemuOptions::new(&state_dir, &cli.artifacts_dir);
            opts.binary = cli.qemu_binary.clone();
            opts.host_root = cli.host_root.clone();
            opts.host_caps = match &cli.host_caps {
                Some(p) => Some(crate::qemu::read_host_caps(p)?),
                None => None,
            };
            let platform = QemuPlatform::open(opts).await?;
            let caps = platform.capabilities();
            tracing::info!(node = %node_name, tees = ?caps.tees, host_caps = ?platform.host_caps(), "QEMU platform ready");
            serve(&cli, client, platform, node_name, state_dir).await
        }
    }
}

/// Waits for the state directory's lock (a plugin being replaced may still hold it);
/// `None` when a signal asks to stop first.
async fn state_lock(state_dir: &std::path::Path) -> anyhow::Result<Option<StateLock>> {
    let mut told = false;
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        if let Some(lock) = StateLock::try_acquire(state_dir)? {
            if told {
                tracing::info!(lock = %lock.path().display(), "took the state directory's lock");
            }
            return Ok(Some(lock));
        }
        if !told {
            tracing::warn!(
                lock = %state_dir.join(crate::store::LOCK_FILE).display(),
                "another node plugin holds this state directory; waiting until it exits \
                 (two plugins on one node would each launch the same guests)"
            );
            told = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = &mut stop => return Ok(None),
        }
    }
}

/// Runs the loop over `platform` until SIGINT/SIGTERM.
async fn serve<P: Platform>(
    cli: &Cli,
    client: kube::Client,
    platform: P,
    node_name: String,
    state_dir: PathBuf,
) -> anyhow::Result<()> {
    if let Some(dir) = &cli.device_plugin_dir {
        let resources = crate::deviceplugin::resources(&platform.capabilities());
        let host = crate::deviceplugin::HostDevices::detect(&cli.host_root);
        tracing::info!(node = %node_name, dir = %dir.display(), resources = ?resources, devices = ?host, "serving kubelet's device-plugin API");
        tokio::spawn(crate::deviceplugin::run(
            dir.clone(),
            node_name.clone(),
            resources,
            cli.host_root.clone(),
            shutdown_signal(),
        ));
    }
    let plugin = run::NodePlugin::new(
        client,
        Arc::new(platform),
        run::Options {
            node: node_name.clone(),
            state_dir: state_dir.clone(),
            resync: Duration::from_secs(cli.resync_secs.max(1)),
            kubelet_counts_keys: cli.device_plugin_dir.is_some(),
            launcher_pods: cli.launcher_pods_dir.clone(),
        },
    )?;
    if let Some(addr) = cli.metrics_addr {
        let m = plugin.metrics().clone();
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(addr, m).await {
                tracing::error!(%addr, error = %e, "metrics server stopped");
            }
        });
    }
    plugin
        .run(async {
            shutdown_signal().await;
        })
        .await?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Cli {
        let mut args = vec!["cvm-node-plugin", "--node-name", "n", "--state-dir", "/s"];
        args.extend_from_slice(extra);
        Cli::try_parse_from(args).unwrap()
    }

    #[test]
    fn sim_flags_make_the_config() {
        let cfg = sim_config(&parse(&["--sim-tee", "tdx", "--sim-fail-sends"])).unwrap();
        assert_eq!(cfg.tees, vec![cvm_crds::TeeType::Tdx]);
        assert!(cfg.fail_sends);
        assert!(!sim_config(&parse(&[])).unwrap().fail_sends);
    }

    #[test]
    fn a_node_label_names_its_simulated_tees() {
        use cvm_crds::TeeType;
        assert_eq!(
            parse_tee_list("sev-snp.tdx").unwrap(),
            vec![TeeType::SevSnp, TeeType::Tdx]
        );
        assert_eq!(parse_tee_list("sev-es").unwrap(), vec![TeeType::SevEs]);
        let e = parse_tee_list("sev-snp.sgx").unwrap_err().to_string();
        assert!(e.contains("sgx"), "{e}");
    }

    #[test]
    fn measure_stands_alone_on_the_command_line() {
        let cli = super::parse(["cvm-node-plugin", "--measure", "cvm.yaml"]).unwrap();
        assert_eq!(cli.measure, Some(PathBuf::from("cvm.yaml")));
        for other in [
            &["--kubeconfig", "/k"][..],
            &["--node-name", "n"],
            &["--state-dir", "/s"],
            &["--log-json"],
            &["--platform", "sim"],
        ] {
            let mut args = vec!["cvm-node-plugin", "--measure", "cvm.yaml"];
            args.extend_from_slice(other);
            let e = super::parse(args).unwrap_err();
            assert_eq!(
                e.kind(),
                clap::error::ErrorKind::ArgumentConflict,
                "{other:?}"
            );
            assert!(e.to_string().contains(other[0]), "{other:?}: {e}");
        }
        // A subcommand and --measure do not mix either.
        assert!(super::parse(["cvm-node-plugin", "--measure", "f", "detect"]).is_err());
    }
}
