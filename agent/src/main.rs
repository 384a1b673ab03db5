//! `cvm-agent`: the guest agent binary.
//!
//! Inside a CVM: `cvm-agent` (vsock port 4050, configfs-tsm at /sys/kernel/config/tsm).
//! For tests and debugging: `cvm-agent --unix /tmp/agent.sock --tsm-root DIR`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use cvm_agent::server::{serve_serial, serve_unix, serve_vsock, EvidenceSource, ServerConfig};
use cvm_agent::tsm::{ConfigfsTsm, DEFAULT_TSM_ROOT};
use cvm_host::agent_proto::DEFAULT_VSOCK_PORT;

#[derive(Parser, Debug)]
#[command(
    name = "cvm-agent",
    version,
    about = "Serves fresh TEE evidence to the node plugin"
)]
struct Args {
    /// vsock port to listen on (any CID).
    #[arg(long, default_value_t = DEFAULT_VSOCK_PORT, env = "CVM_AGENT_VSOCK_PORT")]
    vsock_port: u32,
    /// Listen on this unix socket instead of vsock.
    #[arg(long, env = "CVM_AGENT_UNIX")]
    unix: Option<PathBuf>,
    /// Also serve this virtio-serial port (e.g. /dev/virtio-ports/org.cvmp.agent.0): the
    /// channel of hosts without vsock. vsock is served too where the guest has it.
    #[arg(long, env = "CVM_AGENT_SERIAL")]
    serial: Option<PathBuf>,
    /// The configfs-tsm directory.
    #[arg(long, default_value = DEFAULT_TSM_ROOT, env = "CVM_AGENT_TSM_ROOT")]
    tsm_root: PathBuf,
    /// Seconds a connection may stay idle.
    #[arg(long, default_value_t = 60)]
    idle_timeout_secs: u64,
    /// Seconds one report may take.
    #[arg(long, default_value_t = 60)]
    report_timeout_secs: u64,
    /// Where this boot's instance key is kept (PKCS#8), so that an agent restart keeps the
    /// instance's identity; a reboot (tmpfs) or a new guest makes a new one.
    #[arg(
        long,
        default_value = "/run/cvm-agent/instance-key",
        env = "CVM_AGENT_INSTANCE_KEY"
    )]
    instance_key: PathBuf,
}

/// This boot's instance key: read from `path`, else made and saved there (owner-only).
fn instance_key(path: &std::path::Path) -> Result<cvm_attest::binding::InstanceKey, String> {
    use cvm_attest::binding::InstanceKey;
    match std::fs::read(path) {
        Ok(der) => InstanceKey::from_pkcs8(&der).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = InstanceKey::generate().map_err(|e| e.to_string())?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("creating {}: {e}", dir.display()))?;
            }
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| format!("saving the instance key to {}: {e}", path.display()))?;
            std::io::Write::write_all(&mut f, key.pkcs8())
                .map_err(|e| format!("saving the instance key to {}: {e}", path.display()))?;
            Ok(key)
        }
        Err(e) => Err(format!("reading {}: {e}", path.display())),
    }
}

/// vsock and the virtio-serial port, whichever the guest has; fails when it has neither.
async fn serve_guest(
    args: &Args,
    source: Arc<dyn EvidenceSource>,
    cfg: ServerConfig,
) -> std::io::Result<()> {
    let addr = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, args.vsock_port);
    let vsock = match tokio_vsock::VsockListener::bind(addr) {
        Ok(l) => {
            tracing::info!("listening on vsock port {}", args.vsock_port);
            Some(serve_vsock(l, source.clone(), cfg.clone()))
        }
        Err(e) if args.serial.is_some() => {
            tracing::info!("no vsock ({e}): serving the virtio-serial port only");
            None
        }
        Err(e) => return Err(e),
    };
    let serial = args
        .serial
        .clone()
        .map(|path| serve_serial(path, source, cfg));
    match (vsock, serial) {
        (Some(v), Some(s)) => tokio::select! { r = v => r, r = s => r },
        (Some(v), None) => v.await,
        (None, Some(s)) => s.await,
        (None, None) => Ok(()),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let key = match instance_key(&args.instance_key) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("cvm-agent: instance key: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    tracing::info!(
        key_sha256 = %hex::encode(cvm_attest::binding::key_id(key.public())),
        "guest instance key"
    );
    let cfg = ServerConfig {
        idle_timeout: Duration::from_secs(args.idle_timeout_secs),
        report_timeout: Duration::from_secs(args.report_timeout_secs),
        ..ServerConfig::new(key)
    };
    let source: Arc<dyn EvidenceSource> = Arc::new(ConfigfsTsm::new(&args.tsm_root));
    // Say at start whether evidence can be produced at all; keep serving either way so
    // the node plugin gets a `provider-missing` answer rather than a refused connection.
    match source.provider() {
        Ok(p) => tracing::info!("configfs-tsm provider: {p}"),
        Err(e) => tracing::warn!("no evidence available: {e}"),
    }
    let result = match &args.unix {
        Some(path) => {
            let _ = std::fs::remove_file(path);
            match tokio::net::UnixListener::bind(path) {
                Ok(l) => {
                    tracing::info!("listening on unix:{}", path.display());
                    serve_unix(l, source, cfg).await
                }
                Err(e) => Err(e),
            }
        }
        None => serve_guest(&args, source, cfg).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cvm-agent: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
