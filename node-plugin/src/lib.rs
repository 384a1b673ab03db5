//! cvm-node-plugin: the per-host agent. It advertises the host's TEEs on its Node,
//! launches and stops the guests of the ConfidentialVMs bound to its node through a
//! [`platform::Platform`] backend, and reports launch facts and evidence in their status.
//! It also carries out its node's share of live migrations (docs/migration.md): it
//! prepares receiving guests as a target and sends guests as a source.
//!
//! Layout: pure decisions in [`plan`], [`migrate_plan`], [`measure`], [`status`] and [`node`]'s patch
//! builders; I/O at the edges in [`run`] (the loop), [`node::advertise`] and the
//! backends ([`sim`] and [`qemu`]).
//!
//! To run plugins in-process (tests, `cvm-dev`), call [`spawn_sim_plugin`] once per node.

pub mod agent;
pub mod boot_image;
pub mod cli;
pub mod config;
pub mod deviceplugin;
pub mod launcher;
pub mod metrics;
pub mod migrate_plan;
pub mod node;
pub mod plan;
pub mod platform;
pub mod qemu;
pub mod run;
pub mod sim;
pub mod status;
pub mod store;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use config::SimConfig;
/// The simulated launch measurement, kept with the API types so that `kubectl cvm` computes
/// it without this crate; re-exported under its old name for the plugin's own callers.
pub use cvm_crds::sim_measurement as measure;
pub use measure::simulated_measurement;
pub use platform::Platform;
pub use sim::{RootFingerprints, SimPlatform};

/// Default full re-plan interval.
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(30);

/// Everything a simulated node plugin needs.
#[derive(Debug, Clone)]
pub struct SimPluginOptions {
    pub node: String,
    /// Where this plugin keeps its guests (one directory per node).
    pub state_dir: PathBuf,
    /// Shared by every plugin of a cluster: the simulated vendor roots.
    pub sim_root_dir: PathBuf,
    pub config: SimConfig,
    pub resync: Duration,
}

/// Errors starting a plugin.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Sim(#[from] sim::SimOpenError),
    #[error(transparent)]
    Run(#[from] run::RunError),
    #[error("the plugin task panicked or was cancelled: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// A plugin running as a task.
pub struct PluginHandle {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), run::RunError>>,
    /// Roots signing this plugin's evidence (trust them in a policy to verify it).
    pub fingerprints: RootFingerprints,
    pub metrics: metrics::Metrics,
}

impl PluginHandle {
    /// Stops the loop (guests stay held in the state dir, as after a crash) and waits.
    pub async fn shutdown(mut self) -> Result<(), StartError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        Ok((&mut self.task).await??)
    }

    /// Kills the loop abruptly, as a crash would.
    pub fn abort(self) {
        self.task.abort();
    }
}

/// Opens the simulated host for `opts` and starts its loop on the current runtime.
pub async fn spawn_sim_plugin(
    client: Client,
    opts: SimPluginOptions,
) -> Result<PluginHandle, StartError> {
    opts.config.validate()?;
    let platform = SimPlatform::open_with_roots(
        opts.config.clone(),
        &opts.state_dir,
        &opts.sim_root_dir,
        &opts.node,
    )?;
    let fingerprints = platform.root_fingerprints();
    tracing::info!(node = %opts.node, roots = %fingerprints, "simulated platform ready");
    let plugin = run::NodePlugin::new(
        client,
        Arc::new(platform),
        run::Options {
            node: opts.node.clone(),
            state_dir: opts.state_dir.clone(),
            resync: opts.resync,
            kubelet_counts_keys: false,
            launcher_pods: None,
        },
    )?;
    let metrics = plugin.metrics().clone();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        plugin
            .run(async {
                let _ = rx.await;
            })
            .await
    });
    Ok(PluginHandle {
        stop: Some(tx),
        task,
        fingerprints,
        metrics,
    })
}
