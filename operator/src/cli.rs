//! The operator's command line (also reachable as `cvm-dev operator …`).

use crate::leader::Elector;
use crate::metrics::Metrics;
use crate::runtime;
use clap::Parser;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "cvm-operator",
    about = "Reconciles ConfidentialVM resources: schedules, verifies evidence, writes status"
)]
pub struct Cli {
    /// kubeconfig to use (default: in-cluster config, then $KUBECONFIG, then ~/.kube/config).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<std::path::PathBuf>,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: String,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "cvm-operator-leader")]
    lease_name: String,
    /// This replica's identity in the Lease (default: host name and pid).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
    /// How long a live migration may take to switch the guest to its target, counted from
    /// the ConfidentialVMMigration's creation (and again from the switch until the guest is
    /// verified there), e.g. 90s, 5m or 1h30m; plain numbers are seconds.
    #[arg(long, env = "CVM_MIGRATION_TIMEOUT", default_value = "5m", value_parser = parse_timeout)]
    migration_timeout: Duration,
    /// Give each placed CVM a launcher Pod of this image, pinned to its node and requesting
    /// its cpu, memory, TEE key and /dev/kvm share, so kubelet counts them (the node
    /// plugin's device plugin serves the keys). Unset: no pods (clusters without kubelets).
    #[arg(long, value_name = "IMAGE")]
    launcher_image: Option<String>,
    /// The launcher image's pull policy.
    #[arg(long, default_value = "IfNotPresent")]
    launcher_pull_policy: String,
    /// CPU a launcher pod requests per vCPU, in millicores (KubeVirt's 1/10 ratio: 100).
    #[arg(long, default_value_t = 100)]
    launcher_cpu_milli_per_vcpu: u32,
    /// Memory a launcher pod requests beyond the guest's, in MiB (QEMU and the launcher).
    #[arg(long, default_value_t = 256)]
    launcher_memory_overhead_mib: u32,
}

/// A positive duration: Go-style (`90s`, `5m`, `1h30m`, `500ms`) or whole seconds (`300`).
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let ms = if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse::<u64>().ok().and_then(|n| n.checked_mul(1000))
    } else {
        cvm_crds::validate::parse_duration_ms(s)
    };
    match ms {
        Some(0) => Err(format!(
            "{s:?} is zero: give a positive duration such as 5m"
        )),
        Some(ms) => Ok(Duration::from_millis(ms)),
        None => Err(format!(
            "{s:?} is not a duration: use e.g. 90s, 5m or 1h30m, or a number of seconds"
        )),
    }
}

async fn client(cli: &Cli) -> Result<kube::Client, String> {
    let cfg = match &cli.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("reading kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| format!("no cluster configuration found ({e}); pass --kubeconfig"))?,
    };
    kube::Client::try_from(cfg).map_err(|e| format!("building the client: {e}"))
}

async fn run(cli: Cli) -> Result<(), String> {
    let client = client(&cli).await?;
    let metrics = Metrics::new().map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(&cli.metrics_addr)
        .await
        .map_err(|e| {
            format!(
                "cannot listen on {} ({e}); pick another --metrics-addr",
                cli.metrics_addr
            )
        })?;
    tokio::spawn(metrics.clone().serve(listener));

    let identity = cli.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let leases: Api<Lease> = Api::namespaced(client.clone(), &cli.lease_namespace);
    let elector = Elector::new(leases, &cli.lease_name, &identity, Duration::from_secs(15))
        .with_ready(metrics.ready.clone());
    let signals = async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return std::future::pending::<()>().await;
        };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    };
    tokio::pin!(signals);
    // Lead, and on losing the Lease (another replica took it, or the API server was
    // unreachable until the renew deadline) stop the controllers and wait to lead again:
    // a replica that still holds the Lease leads again as soon as the server answers.
    loop {
        tracing::info!(identity = %identity, lease = %cli.lease_name, "waiting to lead");
        let renewed = tokio::select! {
            r = elector.acquire() => r.map_err(|e| e.to_string())?,
            _ = &mut signals => {
                tracing::info!("signal received; shutting down");
                return Ok(());
            }
        };
        tracing::info!(identity = %identity, migration_timeout = ?cli.migration_timeout, "leading; starting the controllers");

        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let stop = async move {
            let _ = stop_rx.await;
        };
        let launcher = cli
            .launcher_image
            .clone()
            .map(|image| crate::launcher::LauncherOptions {
                image,
                pull_policy: cli.launcher_pull_policy.clone(),
                cpu_milli_per_vcpu: cli.launcher_cpu_milli_per_vcpu,
                memory_overhead_mib: cli.launcher_memory_overhead_mib,
            });
        let ctrl = runtime::run(
            client.clone(),
            metrics.clone(),
            &identity,
            cli.migration_timeout,
            launcher,
            stop,
        );
        tokio::select! {
            _ = ctrl => return Ok(()),
            e = elector.keep(renewed) => {
                // Leaving this arm drops the controllers, aborting their reconciles.
                let _ = stop_tx.send(());
                // Not ready until the Lease is reachable again (acquire sets it back).
                metrics.ready.store(false, std::sync::atomic::Ordering::SeqCst);
                tracing::warn!(
                    identity = %identity,
                    lease = %cli.lease_name,
                    error = %e,
                    "stopped leading; the controllers stay stopped until this replica leads again"
                );
            }
            _ = &mut signals => {
                // The controllers are dropped (stopped) by now: hand the Lease over so a
                // standby leads at its next attempt, not after the Lease expires.
                let _ = stop_tx.send(());
                let handed = elector.release().await;
                tracing::info!(identity = %identity, released_lease = handed, "signal received; shutting down");
                return Ok(());
            }
        }
    }
}

/// Parses `args` (the first is the program name) and runs the operator to completion.
pub fn main_with_args<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli: Cli = match cvm_telemetry::cli::parse(args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube_runtime=warn"));
    if cli.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
    }
    cvm_telemetry::cli::run_daemon("cvm-operator", run(cli))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_timeout_takes_durations_or_seconds() {
        assert_eq!(parse_timeout("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_timeout("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_timeout("300"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_timeout("1500ms"), Ok(Duration::from_millis(1500)));
        assert!(parse_timeout("0s").unwrap_err().contains("positive"));
        assert!(parse_timeout("soon")
            .unwrap_err()
            .contains("not a duration"));
        assert!(parse_timeout("").is_err());
    }

    #[test]
    fn migration_timeout_defaults_to_five_minutes() {
        let cli = Cli::try_parse_from(["cvm-operator"]).unwrap();
        assert_eq!(cli.migration_timeout, Duration::from_secs(300));
        let cli = Cli::try_parse_from(["cvm-operator", "--migration-timeout=20s"]).unwrap();
        assert_eq!(cli.migration_timeout, Duration::from_secs(20));
        assert!(Cli::try_parse_from(["cvm-operator", "--migration-timeout=x"]).is_err());
    }
}
