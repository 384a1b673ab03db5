//! The plugin's loop: watch the CVMs bound to this node and every
//! `ConfidentialVMMigration`, plan ([`crate::plan`], [`crate::migrate_plan`]) against the
//! guests the platform holds, carry out the actions, write status. Level-triggered: every
//! pass recomputes the whole plan from the reflectors' view and the platform's list, so a
//! lost event, a restart or a crash mid-action converge on the next pass.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cvm_crds::cvm::{ConfidentialVM, GuestState};
use cvm_crds::migration::{
    ConfidentialVMMigration, CONDITION_TARGET_PREPARED, CONDITION_TRANSFERRED,
};
use cvm_crds::wellknown::{LAUNCHER_COMPONENT, LAUNCHER_SOCKET_VOLUME, MANAGER_NODE_PLUGIN};
use cvm_crds::wire;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::migrate_plan::{self, CondState, MigrationAction, MigrationView};
use crate::node;
use crate::plan::{self, Action, BoundCvm, EvidenceKey, HeldGuest, StopCause};
use crate::platform::{GuestInfo, GuestRequest, Platform, PlatformError};
use crate::status;
use crate::store;
use cvm_telemetry::watch::{WatchRetry, PLUGIN_RETRY_MAX};

/// File (in `--state-dir`) recording which nonce / re-attest request each guest's latest
/// evidence answered, so a restarted plugin does not re-issue evidence needlessly.
pub const ANSWERED_FILE: &str = "evidence.json";

/// How the loop runs.
#[derive(Debug, Clone)]
pub struct Options {
    pub node: String,
    pub state_dir: PathBuf,
    /// Full re-plan (and retry of failed actions, node advertisement) at least this often.
    pub resync: Duration,
    /// kubelet advertises and counts the TEE keys (the device plugin serves it): the
    /// plugin writes no capacity into Node status.
    pub kubelet_counts_keys: bool,
    /// Guests live in their CVMs' launcher pods: kubelet's pod directory on the host
    /// (`/var/lib/kubelet/pods`), where each pod's command socket is. A guest runs only
    /// while its pod runs and its launcher answers. `None`: no launcher pods.
    pub launcher_pods: Option<PathBuf>,
}

/// Errors that end the loop (an action that fails is logged, counted and retried instead).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot set up metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    Store(#[from] store::StoreError),
}

/// Why one action failed; the variant names label the error metric.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error(transparent)]
    Platform(#[from] PlatformError),
    #[error("cannot build a launch request: {0}")]
    Request(#[from] crate::platform::RequestError),
    #[error("spec.attestation.nonce {0:?} is not hex")]
    BadNonce(String),
    #[error("writing status: {0}")]
    Status(#[source] kube::Error),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("reading {what}: {source}")]
    Read {
        what: String,
        #[source]
        source: kube::Error,
    },
    /// A migration step this node cannot carry out; the migration's status says why.
    #[error("{message}")]
    Refused {
        reason: &'static str,
        message: String,
    },
}

impl ActionError {
    fn reason(&self) -> &'static str {
        match self {
            ActionError::Platform(p) => p.reason(),
            ActionError::Request(_) => "InvalidSpec",
            ActionError::BadNonce(_) => "BadNonce",
            ActionError::Status(_) => "StatusWrite",
            ActionError::Store(_) => "StateStore",
            ActionError::Read { .. } => "ApiRead",
            ActionError::Refused { reason, .. } => reason,
        }
    }
}

/// What one pass saw that decides when the next runs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pass {
    /// The CVMs (UIDs) whose launcher pod runs and whose launcher does not answer yet.
    pub launchers_starting: Vec<String>,
    /// An action failed (it is retried on the next pass).
    pub failed: bool,
}

/// A migration step that did not run because the fresh object no longer asks for it.
const SKIPPED: bool = false;

/// One node plugin over a platform backend.
pub struct NodePlugin<P: Platform> {
    client: Client,
    platform: Arc<P>,
    opts: Options,
    metrics: Metrics,
    answered: Mutex<BTreeMap<String, EvidenceKey>>,
    /// Launches that failed in a row per CVM UID, and when the latest did: the relaunch
    /// back-off ([`plan::relaunch_backoff`]). In memory: a plugin restart retries at once.
    failures: Mutex<BTreeMap<String, (u32, Instant)>>,
}

/// How often a pass is repeated while a launcher pod runs but its launcher does not
/// answer yet: nothing else wakes the loop when the launcher comes up (the pod is Running
/// already and Ready only once its guest runs).
pub const LAUNCHER_POLL: Duration = Duration::from_millis(500);

/// What a pass saw of a CVM's launcher.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LauncherSeen {
    /// No running launcher pod of the CVM's on this node.
    NoPod,
    /// Its pod runs; the launcher in it does not answer yet.
    Starting,
    /// The launcher answers, through the socket in this directory.
    Up(PathBuf),
}

/// What the CVM's launcher pod on this node shows, pinging its launcher if it runs.
async fn launcher_up(kubelet_pods: &Path, pods: &[Arc<Pod>], b: &BoundCvm) -> LauncherSeen {
    let Some((ns, name)) = b.key.split_once('/') else {
        return LauncherSeen::NoPod;
    };
    let pod = pods.iter().find(|p| {
        p.metadata.namespace.as_deref() == Some(ns)
            && p.metadata.deletion_timestamp.is_none()
            && p.owner_references()
                .iter()
                .any(|o| o.controller == Some(true) && o.uid == b.uid)
            && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
    });
    let Some(uid) = pod.and_then(|p| p.metadata.uid.as_deref()) else {
        return LauncherSeen::NoPod;
    };
    let dir = crate::launcher::host_dir(kubelet_pods, uid, LAUNCHER_SOCKET_VOLUME);
    match crate::launcher::LauncherClient::new(&dir)
        .ping(&format!("{ns}/{name}"))
        .await
    {
        Ok(()) => LauncherSeen::Up(dir),
        Err(e) => {
            debug!(cvm = %b.key, error = %e, "launcher pod runs, its launcher does not answer yet");
            LauncherSeen::Starting
        }
    }
}

/// When the loop runs its next pass, unless an event comes first: at the next resync
/// tick, or sooner while a launcher is starting (every 0.5 s at first, then half the time
/// the youngest starting launcher has been silent: one that stays silent is not polled in
/// a tight loop, one that just started is seen at once) or after passes whose actions
/// failed (`failed_passes` in a row: 1 s doubled per further one). The tick is a deadline
/// kept across passes: events that keep waking the loop do not put off the retries it
/// brings.
fn next_pass(
    now: Instant,
    next_resync: Instant,
    youngest_starting: Option<Duration>,
    failed_passes: u32,
) -> Instant {
    let poll = youngest_starting.map(|age| now + (age / 2).max(LAUNCHER_POLL));
    // The relaunches' doubling; the tick caps it below that back-off's ten minutes.
    let retry =
        (failed_passes > 0).then(|| now + plan::relaunch_backoff(failed_passes, ACTION_RETRY));
    [Some(next_resync), poll, retry]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(next_resync)
}

/// The first retry of a pass whose actions failed.
pub const ACTION_RETRY: Duration = Duration::from_secs(1);

fn now() -> Time {
    Time(Timestamp::now())
}

impl<P: Platform> NodePlugin<P> {
    pub fn new(client: Client, platform: Arc<P>, opts: Options) -> Result<Self, RunError> {
        let metrics = Metrics::new(&opts.node)?;
        let answered = store::read_json(&opts.state_dir.join(ANSWERED_FILE))?;
        Ok(NodePlugin {
            client,
            platform,
            opts,
            metrics,
            answered: Mutex::new(answered),
            failures: Mutex::new(BTreeMap::new()),
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Runs until `shutdown` completes. Guests keep running when the loop stops (as a
    /// kubelet restart leaves pods running); the next start picks them up from the platform.
    pub async fn run(&self, shutdown: impl Future<Output = ()> + Send) -> Result<(), RunError> {
        let node = self.opts.node.clone();
        let api: Api<ConfidentialVM> = Api::all(self.client.clone());
        // By status.nodeName (which only the operator writes), never by a label: the owner
        // can edit labels, and a CVM missing from this watch would look like an orphan.
        let cfg = watcher::Config::default().fields(&format!("status.nodeName={node}"));
        let (reader, writer) = reflector::store();
        let notify = Arc::new(Notify::new());
        let stream = reflector::reflector(writer, watcher(api, cfg)).backoff(WatchRetry::new(
            "ConfidentialVM (this node)",
            PLUGIN_RETRY_MAX,
        ));
        let wake = notify.clone();
        let watch_node = node.clone();
        let watch = tokio::spawn(async move {
            futures::pin_mut!(stream);
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(_) => wake.notify_one(),
                    Err(e) => warn!(node = %watch_node, error = %e, "watching ConfidentialVMs"),
                }
            }
        });
        // Every migration: this node may be the target of one whose CVM is bound elsewhere.
        let mig_api: Api<ConfidentialVMMigration> = Api::all(self.client.clone());
        let (migrations, mig_writer) = reflector::store();
        let mig_stream =
            reflector::reflector(mig_writer, watcher(mig_api, watcher::Config::default()))
                .backoff(WatchRetry::new("ConfidentialVMMigration", PLUGIN_RETRY_MAX));
        let wake = notify.clone();
        let watch_node = node.clone();
        let mig_watch = tokio::spawn(async move {
            futures::pin_mut!(mig_stream);
            while let Some(ev) = mig_stream.next().await {
                match ev {
                    Ok(_) => wake.notify_one(),
                    Err(e) => warn!(
                        node = %watch_node,
                        error = %e,
                        "watching ConfidentialVMMigrations (is the CRD installed, and may this \
                         plugin list them?)"
                    ),
                }
            }
        });
        // The launcher pods on this node, as kubelet watches its pods (a field selector;
        // RBAC cannot narrow a list to one node, so the plugin's token can read every pod).
        let (pods, pod_writer) = reflector::store::<Pod>();
        let pod_watch = self.opts.launcher_pods.is_some().then(|| {
            let api: Api<Pod> = Api::all(self.client.clone());
            let cfg = watcher::Config::default()
                .fields(&format!("spec.nodeName={node}"))
                .labels(&format!("app.kubernetes.io/component={LAUNCHER_COMPONENT}"));
            let stream = reflector::reflector(pod_writer, watcher(api, cfg)).backoff(
                WatchRetry::new("Pod (launchers on this node)", PLUGIN_RETRY_MAX),
            );
            let wake = notify.clone();
            let watch_node = node.clone();
            tokio::spawn(async move {
                futures::pin_mut!(stream);
                while let Some(ev) = stream.next().await {
                    match ev {
                        Ok(_) => wake.notify_one(),
                        Err(e) => warn!(node = %watch_node, error = %e, "watching launcher pods"),
                    }
                }
            })
        });
        let stop_watches = || {
            watch.abort();
            mig_watch.abort();
            if let Some(w) = &pod_watch {
                w.abort();
            }
        };
        let caps = self.platform.capabilities();
        info!(node = %node, tees = ?caps.tees, simulated = caps.simulated, "node plugin starting");

        tokio::pin!(shutdown);
        // Planning before the first full lists would take every held guest (or receiving
        // guest of a migration) for an orphan.
        let ready = async {
            let pods_ready = async {
                if self.opts.launcher_pods.is_some() {
                    pods.wait_until_ready().await.is_ok()
                } else {
                    true
                }
            };
            let (c, m, p) = tokio::join!(
                reader.wait_until_ready(),
                migrations.wait_until_ready(),
                pods_ready
            );
            c.is_ok() && m.is_ok() && p
        };
        tokio::select! {
            ok = ready => {
                if !ok {
                    warn!(node = %node, "watch ended before the first list");
                }
            }
            _ = &mut shutdown => { stop_watches(); return Ok(()); }
        }
        let mut advertised: Option<Instant> = None;
        let mut retry = true;
        let mut next_resync = Instant::now() + self.opts.resync;
        let mut failed_passes = 0u32;
        // Since when each starting launcher (by CVM UID) has been seen not answering.
        let mut starting_since: BTreeMap<String, Instant> = BTreeMap::new();
        loop {
            if advertised.is_none_or(|t| t.elapsed() >= self.opts.resync) {
                match node::advertise(&self.client, &node, &caps, !self.opts.kubelet_counts_keys)
                    .await
                {
                    Ok(()) => advertised = Some(Instant::now()),
                    Err(e) => warn!(node = %node, error = %e, "advertising the node"),
                }
            }
            let pass = self.sync(&reader, &migrations, &pods, retry).await;
            let now = Instant::now();
            starting_since.retain(|uid, _| pass.launchers_starting.contains(uid));
            for uid in &pass.launchers_starting {
                starting_since.entry(uid.clone()).or_insert(now);
            }
            let youngest = starting_since.values().map(|t| now - *t).min();
            failed_passes = if pass.failed {
                failed_passes.saturating_add(1)
            } else {
                0
            };
            let wake_at = next_pass(now, next_resync, youngest, failed_passes);
            tokio::select! {
                _ = notify.notified() => {},
                _ = tokio::time::sleep_until(wake_at.into()) => {},
                _ = &mut shutdown => break,
            }
            retry = Instant::now() >= next_resync;
            if retry {
                next_resync = Instant::now() + self.opts.resync;
            }
        }
        stop_watches();
        info!(node = %node, "node plugin stopped");
        Ok(())
    }

    /// One pass: plan against the reflectors' view and carry out every action.
    /// `retry_failed` lets failed launches be retried (on resync ticks only, so that a
    /// launch that keeps failing is not retried on its own status writes).
    pub async fn sync(
        &self,
        reader: &Store<ConfidentialVM>,
        migrations: &Store<ConfidentialVMMigration>,
        pods: &Store<Pod>,
        retry_failed: bool,
    ) -> Pass {
        let node = &self.opts.node;
        let cvms: Vec<Arc<ConfidentialVM>> = reader.state();
        let migrations: Vec<MigrationView> = migrations
            .state()
            .iter()
            .filter_map(|m| MigrationView::of(m))
            .collect();
        let held: Vec<GuestInfo> = match self.platform.list().await {
            Ok(h) => h,
            Err(e) => {
                warn!(node = %node, error = %e, "listing guests");
                return Pass::default();
            }
        };
        let held_plain: Vec<HeldGuest> = held
            .iter()
            .map(|g| HeldGuest {
                uid: g.uid.clone(),
                namespace: g.namespace.clone(),
                name: g.name.clone(),
                state: g.state,
            })
            .collect();
        let by_uid: BTreeMap<String, (Arc<ConfidentialVM>, BoundCvm)> = cvms
            .iter()
            .filter_map(|c| {
                BoundCvm::of_at(c, node, Some(Timestamp::now().as_second()))
                    .map(|b| (b.uid.clone(), (c.clone(), b)))
            })
            .collect();
        let mut bound: Vec<BoundCvm> = by_uid.values().map(|(_, b)| b.clone()).collect();
        let mut pass = Pass::default();
        if let Some(dir) = &self.opts.launcher_pods {
            let pods = pods.state();
            // One ping per launcher, all at once: a pass waits for the slowest only.
            let up =
                futures::future::join_all(bound.iter().map(|b| launcher_up(dir, &pods, b))).await;
            for (b, seen) in bound.iter_mut().zip(up) {
                b.launcher_dir = match seen {
                    LauncherSeen::Up(dir) => Some(dir),
                    LauncherSeen::Starting => {
                        pass.launchers_starting.push(b.uid.clone());
                        None
                    }
                    LauncherSeen::NoPod => None,
                };
                b.launcher_down = b.launcher_dir.is_none();
            }
        }
        {
            let failures = self.lock_failures();
            for b in bound.iter_mut() {
                if let Some((n, at)) = failures.get(&b.uid) {
                    b.relaunch_held = at.elapsed() < plan::relaunch_backoff(*n, self.opts.resync);
                }
            }
        }
        let answered = self.lock_answered().clone();
        let receiving = migrate_plan::receiving(node, &migrations, &held_plain);
        let owned = held
            .iter()
            .filter(|g| by_uid.contains_key(&g.uid) || receiving.contains(&g.uid))
            .count();
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.metrics
            .guests_held
            .with_label_values(&["true"])
            .set(count(owned));
        self.metrics
            .guests_held
            .with_label_values(&["false"])
            .set(count(held.len() - owned));
        let actions = plan::plan(&held_plain, &bound, &answered, retry_failed, &receiving);
        let guests: BTreeMap<&str, &GuestInfo> = held.iter().map(|g| (g.uid.as_str(), g)).collect();
        // The views with what this pass learnt (the launcher's directory): a launch goes
        // to the pod the plan saw running.
        let seen: BTreeMap<&str, &BoundCvm> = bound.iter().map(|b| (b.uid.as_str(), b)).collect();
        let runs = actions.into_iter().map(|(uid, action)| {
            let cvm = by_uid.get(&uid).map(|(c, b)| {
                let b = seen.get(uid.as_str()).map_or_else(|| b.clone(), |s| (*s).clone());
                (c.clone(), b)
            });
            let guest = guests.get(uid.as_str()).map(|g| (*g).clone());
            async move {
                let who = cvm
                    .as_ref()
                    .map(|(_, b)| b.key.clone())
                    .or_else(|| guest.as_ref().map(|g| format!("{}/{}", g.namespace, g.name)))
                    .unwrap_or_else(|| uid.clone());
                let r = self.execute(&uid, &action, cvm, guest).await;
                match &r {
                    Ok(()) => info!(cvm = %who, node = %node, phase = action.name(), "done"),
                    Err(e) => {
                        self.metrics
                            .errors
                            .with_label_values(&[action.name(), e.reason()])
                            .inc();
                        warn!(cvm = %who, node = %node, phase = action.name(), error = %e, "failed; retrying on the next pass");
                    }
                }
                r.is_err()
            }
        });
        let by_mig: BTreeMap<&str, &MigrationView> =
            migrations.iter().map(|m| (m.uid.as_str(), m)).collect();
        let mig_runs = migrate_plan::plan(node, &migrations)
            .into_iter()
            .filter_map(|(uid, action)| by_mig.get(uid.as_str()).map(|m| (*m, action)))
            .map(|(m, action)| async move {
                let r = self.execute_migration(m, action).await;
                let (cvm, migration) = (m.cvm_key(), m.key());
                match &r {
                    Ok(true) => {
                        info!(cvm = %cvm, node = %node, phase = action.name(), migration = %migration, "done")
                    }
                    Ok(false) => {
                        debug!(cvm = %cvm, node = %node, phase = action.name(), migration = %migration, "already done")
                    }
                    Err(e) => {
                        self.metrics
                            .errors
                            .with_label_values(&[action.name(), e.reason()])
                            .inc();
                        warn!(cvm = %cvm, node = %node, phase = action.name(), migration = %migration, error = %e, "migration step failed");
                    }
                }
                r.is_err()
            });
        let (failed, mig_failed) = futures::future::join(
            futures::future::join_all(runs),
            futures::future::join_all(mig_runs),
        )
        .await;
        pass.failed = failed.into_iter().chain(mig_failed).any(|f| f);
        pass
    }

    fn lock_answered(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, EvidenceKey>> {
        // Each update is one insert or remove: a poisoned lock holds consistent data.
        self.answered.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_failures(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (u32, Instant)>> {
        // Each update is one insert or remove: a poisoned lock holds consistent data.
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record_answered(&self, uid: &str, key: Option<EvidenceKey>) -> Result<(), ActionError> {
        let mut a = self.lock_answered();
        match key {
            Some(k) => a.insert(uid.to_string(), k),
            None => a.remove(uid),
        };
        store::write_json(&self.opts.state_dir.join(ANSWERED_FILE), &*a)?;
        Ok(())
    }

    async fn execute(
        &self,
        uid: &str,
        action: &Action,
        cvm: Option<(Arc<ConfidentialVM>, BoundCvm)>,
        guest: Option<GuestInfo>,
    ) -> Result<(), ActionError> {
        match (action, cvm) {
            (Action::StopOrphan, _) | (_, None) => {
                if self.platform.stop(uid).await?.is_some() {
                    self.metrics.guests_stopped.inc();
                }
                self.record_answered(uid, None)
            }
            (Action::Launch, Some((cvm, bound))) => self.launch(&cvm, &bound).await,
            (Action::Relaunch, Some((cvm, bound))) => {
                if self.platform.stop(uid).await?.is_some() {
                    self.metrics.guests_stopped.inc();
                }
                self.record_answered(uid, None)?;
                info!(cvm = %bound.key, node = %self.opts.node, phase = "relaunch", "restarting the guest as its run strategy asks");
                self.launch(&cvm, &bound).await
            }
            (Action::RefreshEvidence, Some((cvm, bound))) => {
                let guest = match guest {
                    Some(g) => g,
                    None => return Err(PlatformError::NoSuchGuest(uid.to_string()).into()),
                };
                self.refresh(&cvm, &bound, &guest).await
            }
            (Action::Stop(cause), Some((cvm, _))) => {
                let stopped = self.platform.stop(uid).await?;
                if stopped.is_some() {
                    self.metrics.guests_stopped.inc();
                }
                self.record_answered(uid, None)?;
                self.report_stopped(&cvm, *cause, stopped.as_ref()).await
            }
            (Action::ReportStopped(cause), Some((cvm, _))) => {
                self.report_stopped(&cvm, *cause, None).await
            }
            (Action::ReportFailed, Some((cvm, _))) => {
                let why = guest
                    .and_then(|g| g.message)
                    .unwrap_or_else(|| "the guest failed".into());
                let msg = format!("guest failed on node {}: {why}", self.opts.node);
                self.report_failed(&cvm, status::REASON_FAILED, msg).await
            }
        }
    }

    async fn launch(&self, cvm: &ConfidentialVM, bound: &BoundCvm) -> Result<(), ActionError> {
        let caps = self.platform.capabilities();
        let req = match GuestRequest::from_cvm(cvm) {
            Ok(r) => GuestRequest {
                launcher: bound.launcher_dir.clone(),
                ..r
            },
            Err(e) => {
                let msg = e.to_string();
                self.report_failed(cvm, "InvalidSpec", msg).await?;
                return Err(e.into());
            }
        };
        let launching = status::facts_without_guest(&caps, GuestState::Launching, None);
        let cond = status::launched_condition(
            cvm,
            false,
            "Launching",
            format!("launching the guest on node {}", self.opts.node),
            now(),
        );
        self.write_status(cvm, &status::apply_patch(&launching, None, &cond))
            .await?;
        match self.platform.launch(&req).await {
            Ok(guest) => {
                self.metrics.guests_launched.inc();
                info!(cvm = %bound.key, node = %self.opts.node, phase = "launch", tee = %guest.tee, measurement = %hex::encode(&guest.measurement), "guest launched");
                self.refresh(cvm, bound, &guest).await
            }
            Err(e) => {
                self.report_failed(cvm, e.reason(), e.to_string()).await?;
                Err(e.into())
            }
        }
    }

    async fn refresh(
        &self,
        cvm: &ConfidentialVM,
        bound: &BoundCvm,
        guest: &GuestInfo,
    ) -> Result<(), ActionError> {
        let nonce = bound.wanted.nonce.as_deref();
        let epoch = bound.wanted.epoch.as_deref();
        let challenge = wire::challenge_for(nonce, &bound.uid, epoch)
            .ok_or_else(|| ActionError::BadNonce(nonce.unwrap_or_default().to_string()))?;
        if let Some(migration) = epoch {
            let before = self.lock_answered().get(&bound.uid).cloned();
            if before.and_then(|k| k.epoch).as_deref() != Some(migration) {
                info!(cvm = %bound.key, node = %self.opts.node, phase = "adopt", migration, "adopting the guest received by live migration: reporting this node's evidence, bound to the migration");
            }
        }
        let raw = match self.platform.evidence(&bound.uid, &challenge).await {
            Ok(r) => r,
            // The guest's own failures are the owner's to read in its conditions: a QEMU
            // that ended (the guest failed), an agent that does not answer.
            Err(e @ PlatformError::Qemu { .. }) => {
                self.report_failed(cvm, e.reason(), e.to_string()).await?;
                return Err(e.into());
            }
            Err(e @ PlatformError::AgentSilent(_)) => {
                let caps = self.platform.capabilities();
                let facts = status::facts(&caps, guest, GuestState::Running, None);
                let cond = status::launched_condition(cvm, false, e.reason(), e.to_string(), now());
                self.write_status(cvm, &status::apply_patch(&facts, None, &cond))
                    .await?;
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        let ev = wire::encode(&raw, &challenge, now());
        let caps = self.platform.capabilities();
        let facts = status::facts(&caps, guest, GuestState::Running, None);
        let what = if caps.simulated { "simulated " } else { "" };
        let cond = status::launched_condition(
            cvm,
            true,
            status::REASON_RUNNING,
            format!(
                "{what}{} guest running on node {}",
                guest.tee, self.opts.node
            ),
            now(),
        );
        self.write_status(cvm, &status::apply_patch(&facts, Some(&ev), &cond))
            .await?;
        self.metrics.evidence_issued.inc();
        self.lock_failures().remove(&bound.uid);
        self.record_answered(&bound.uid, Some(bound.wanted.clone()))
    }

    async fn report_stopped(
        &self,
        cvm: &ConfidentialVM,
        cause: StopCause,
        guest: Option<&GuestInfo>,
    ) -> Result<(), ActionError> {
        let caps = self.platform.capabilities();
        let why = match cause {
            StopCause::Deleted => "the ConfidentialVM is being deleted",
            StopCause::Halted => "runStrategy is Halted",
            StopCause::LauncherDown => {
                "its launcher pod is not running (the guest's life is the pod's)"
            }
        };
        let msg = format!("guest stopped on node {}: {why}", self.opts.node);
        let facts = match guest {
            Some(g) => status::facts(&caps, g, GuestState::Stopped, Some(msg.clone())),
            None => status::facts_without_guest(&caps, GuestState::Stopped, Some(msg.clone())),
        };
        let cond = status::launched_condition(cvm, false, cause.reason(), msg, now());
        self.write_status(cvm, &status::apply_patch(&facts, None, &cond))
            .await
    }

    async fn report_failed(
        &self,
        cvm: &ConfidentialVM,
        reason: &str,
        message: String,
    ) -> Result<(), ActionError> {
        if let Some(uid) = &cvm.metadata.uid {
            let mut f = self.lock_failures();
            let n = f.get(uid).map_or(0, |(n, _)| *n).saturating_add(1);
            f.insert(uid.clone(), (n, Instant::now()));
            let wait = plan::relaunch_backoff(n, self.opts.resync);
            info!(cvm = %cvm.name_any(), node = %self.opts.node, phase = "backoff", failures = n, wait_secs = wait.as_secs(), "launch failed; the next attempt waits");
        }
        let caps = self.platform.capabilities();
        let facts = status::facts_without_guest(&caps, GuestState::Failed, Some(message.clone()));
        let cond = status::launched_condition(cvm, false, reason, message, now());
        self.write_status(cvm, &status::apply_patch(&facts, None, &cond))
            .await
    }

    /// Carries out one migration step after re-reading the migration (the reflector may
    /// not show this plugin's own last write yet); `Ok(false)` when it asks for nothing now.
    async fn execute_migration(
        &self,
        view: &MigrationView,
        action: MigrationAction,
    ) -> Result<bool, ActionError> {
        let api: Api<ConfidentialVMMigration> =
            Api::namespaced(self.client.clone(), &view.namespace);
        let m = match api.get_opt(&view.name).await {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(SKIPPED),
            Err(source) => {
                return Err(ActionError::Read {
                    what: format!("ConfidentialVMMigration {}", view.key()),
                    source,
                })
            }
        };
        let Some(fresh) = MigrationView::of(&m) else {
            return Ok(SKIPPED);
        };
        if fresh.uid != view.uid || migrate_plan::decide(&self.opts.node, &fresh) != Some(action) {
            return Ok(SKIPPED);
        }
        match action {
            MigrationAction::PrepareTarget => self.prepare_target(&m, &fresh).await?,
            MigrationAction::Send => self.send(&m, &fresh).await?,
        }
        Ok(true)
    }

    /// The migration's CVM, read from the API server (on the target it is not bound here,
    /// so not in the label-selected store), checked against the UID the migration names.
    /// `Err(Ok((reason, message)))`: the migration cannot go on; `Err(Err(_))`: retry.
    async fn migration_cvm(
        &self,
        view: &MigrationView,
    ) -> Result<ConfidentialVM, Result<(&'static str, String), ActionError>> {
        let api: Api<ConfidentialVM> = Api::namespaced(self.client.clone(), &view.namespace);
        let cvm = match api.get_opt(&view.cvm_name).await {
            Ok(Some(c)) => c,
            Ok(None) => {
                return Err(Ok((
                    status::REASON_CVM_NOT_FOUND,
                    format!(
                        "ConfidentialVM {} does not exist (deleted during the migration?)",
                        view.cvm_key()
                    ),
                )))
            }
            Err(source) => {
                return Err(Err(ActionError::Read {
                    what: format!("ConfidentialVM {}", view.cvm_key()),
                    source,
                }))
            }
        };
        let uid = cvm.metadata.uid.as_deref().unwrap_or_default();
        if let Some(want) = &view.cvm_uid {
            if want != uid {
                return Err(Ok((
                    status::REASON_CVM_REPLACED,
                    format!(
                        "ConfidentialVM {} has UID {uid}, but the migration refers to UID {want}: \
                         it was deleted and re-created; create a new migration for it",
                        view.cvm_key()
                    ),
                )));
            }
        }
        Ok(cvm)
    }

    /// Target: launch the receiving guest and report its evidence, or why it cannot be.
    async fn prepare_target(
        &self,
        m: &ConfidentialVMMigration,
        view: &MigrationView,
    ) -> Result<(), ActionError> {
        let node = &self.opts.node;
        let cvm_key = view.cvm_key();
        let cvm = match self.migration_cvm(view).await {
            Ok(c) => c,
            Err(Ok((reason, message))) => return self.refuse_prepare(m, reason, message).await,
            Err(Err(e)) => return Err(e),
        };
        let req = match GuestRequest::from_cvm(&cvm) {
            Ok(r) => r,
            Err(e) => {
                let msg = format!("ConfidentialVM {cvm_key} cannot be launched here: {e}");
                return self
                    .refuse_prepare(m, status::REASON_INVALID_SPEC, msg)
                    .await;
            }
        };
        info!(cvm = %cvm_key, node = %node, phase = "prepare-target", migration = %view.key(), source = ?view.source_node, "preparing a receiving guest");
        let guest = match self.platform.prepare_incoming(&req).await {
            Ok(g) => g,
            Err(e) => {
                let msg =
                    format!("cannot prepare a receiving guest for {cvm_key} on node {node}: {e}");
                return self.refuse_prepare(m, e.reason(), msg).await;
            }
        };
        let challenge = wire::migration_challenge_for(&view.uid);
        let raw = match self.platform.evidence(&req.uid, &challenge).await {
            Ok(r) => r,
            Err(e) => {
                let msg = format!(
                    "the receiving guest for {cvm_key} on node {node} gave no evidence: {e}"
                );
                return self.refuse_prepare(m, e.reason(), msg).await;
            }
        };
        let ev = wire::encode(&raw, &challenge, now());
        let what = if self.platform.capabilities().simulated {
            "simulated "
        } else {
            ""
        };
        let cond = status::migration_condition(
            m,
            CONDITION_TARGET_PREPARED,
            CondState::True,
            status::REASON_TARGET_READY,
            format!(
                "{what}{} receiving guest for {cvm_key} ready on node {node} (measurement {}); \
                 targetEvidence answers the migration's challenge",
                guest.tee,
                hex::encode(&guest.measurement)
            ),
            now(),
        );
        self.write_migration(
            m,
            status::MIGRATION_TARGET_MANAGER,
            &status::migration_patch(&cond, Some(&ev)),
        )
        .await?;
        self.metrics.migrations_prepared.inc();
        Ok(())
    }

    /// `TargetPrepared=False` with the reason (the operator fails the migration with it).
    async fn refuse_prepare(
        &self,
        m: &ConfidentialVMMigration,
        reason: &'static str,
        message: String,
    ) -> Result<(), ActionError> {
        let cond = status::migration_condition(
            m,
            CONDITION_TARGET_PREPARED,
            CondState::False,
            reason,
            message.clone(),
            now(),
        );
        self.write_migration(
            m,
            status::MIGRATION_TARGET_MANAGER,
            &status::migration_patch(&cond, None),
        )
        .await?;
        Err(ActionError::Refused { reason, message })
    }

    /// Source: send the guest (`Transferred` Unknown, then True or False).
    async fn send(
        &self,
        m: &ConfidentialVMMigration,
        view: &MigrationView,
    ) -> Result<(), ActionError> {
        let node = &self.opts.node;
        let cvm_key = view.cvm_key();
        let target = view.target_node.clone().unwrap_or_default();
        let write = |state: CondState, reason: &'static str, message: String| {
            let cond = status::migration_condition(
                m,
                CONDITION_TRANSFERRED,
                state,
                reason,
                message,
                now(),
            );
            async move {
                self.write_migration(
                    m,
                    status::MIGRATION_SOURCE_MANAGER,
                    &status::migration_patch(&cond, None),
                )
                .await
            }
        };
        let cvm = match self.migration_cvm(view).await {
            Ok(c) => c,
            Err(Ok((reason, message))) => {
                write(CondState::False, reason, message.clone()).await?;
                return Err(ActionError::Refused { reason, message });
            }
            Err(Err(e)) => return Err(e),
        };
        let uid = cvm.metadata.uid.clone().unwrap_or_default();
        if view.transferred != Some(CondState::Unknown) {
            write(
                CondState::Unknown,
                status::REASON_TRANSFERRING,
                format!("sending the guest of {cvm_key} from node {node} to node {target}"),
            )
            .await?;
        }
        info!(cvm = %cvm_key, node = %node, phase = "send", migration = %view.key(), target = %target, "sending the guest");
        match self.platform.send(&uid, &target).await {
            Ok(()) => {
                write(
                    CondState::True,
                    status::REASON_TRANSFERRED,
                    format!(
                        "guest of {cvm_key} sent from node {node} to node {target}; node {node} \
                         stops its copy once the ConfidentialVM is rebound to {target}"
                    ),
                )
                .await?;
                self.metrics.migrations_sent.inc();
                Ok(())
            }
            Err(e) => {
                let message = format!(
                    "sending the guest of {cvm_key} from node {node} to node {target} failed: \
                     {e}; the guest keeps running on node {node}"
                );
                write(
                    CondState::False,
                    status::REASON_TRANSFER_FAILED,
                    message.clone(),
                )
                .await?;
                Err(ActionError::Refused {
                    reason: e.reason(),
                    message,
                })
            }
        }
    }

    async fn write_migration(
        &self,
        m: &ConfidentialVMMigration,
        manager: &str,
        patch: &serde_json::Value,
    ) -> Result<(), ActionError> {
        let ns = m.metadata.namespace.as_deref().unwrap_or("default");
        let name = m.metadata.name.as_deref().unwrap_or_default();
        let api: Api<ConfidentialVMMigration> = Api::namespaced(self.client.clone(), ns);
        let pp = PatchParams::apply(manager).force();
        match api.patch_status(name, &pp, &Patch::Apply(patch)).await {
            Ok(_) => Ok(()),
            // Deleted meanwhile: nothing left to report to.
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(ActionError::Status(e)),
        }
    }

    async fn write_status(
        &self,
        cvm: &ConfidentialVM,
        patch: &serde_json::Value,
    ) -> Result<(), ActionError> {
        let ns = cvm.metadata.namespace.as_deref().unwrap_or("default");
        let name = cvm.metadata.name.as_deref().unwrap_or_default();
        let api: Api<ConfidentialVM> = Api::namespaced(self.client.clone(), ns);
        let pp = PatchParams::apply(MANAGER_NODE_PLUGIN).force();
        match api.patch_status(name, &pp, &Patch::Apply(patch)).await {
            Ok(_) => Ok(()),
            // Gone already (no finalizer held it): nothing left to report to.
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(ActionError::Status(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_pass_is_the_resync_tick_unless_a_launcher_is_starting() {
        let now = Instant::now();
        let tick = now + Duration::from_secs(30);
        let secs = Duration::from_secs;
        assert_eq!(next_pass(now, tick, None, 0), tick);
        // Just seen starting: polled every 0.5 s.
        assert_eq!(next_pass(now, tick, Some(secs(0)), 0), now + LAUNCHER_POLL);
        // Silent for a while: polled at half its silence, never past the tick.
        assert_eq!(next_pass(now, tick, Some(secs(10)), 0), now + secs(5));
        assert_eq!(next_pass(now, tick, Some(secs(600)), 0), tick);
        // A tick due sooner than the poll still comes first.
        let soon = now + Duration::from_millis(100);
        assert_eq!(next_pass(now, soon, Some(secs(0)), 0), soon);
        // A poll and a failure retry at once: the sooner.
        assert_eq!(next_pass(now, tick, Some(secs(0)), 3), now + LAUNCHER_POLL);
    }

    #[test]
    fn failed_passes_are_retried_after_one_second_doubled_up_to_the_tick() {
        let now = Instant::now();
        let tick = now + Duration::from_secs(30);
        let waits: Vec<u64> = (1..=7)
            .map(|n| (next_pass(now, tick, None, n) - now).as_secs())
            .collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(next_pass(now, tick, None, u32::MAX), tick);
    }

    #[test]
    fn a_tick_already_due_runs_at_once_however_many_events_came_before() {
        // The deadline is kept across passes: after 30 s of passes woken by events, the
        // tick is in the past and the next pass is a retrying one.
        let start = Instant::now();
        let tick = start + Duration::from_secs(30);
        let later = start + Duration::from_secs(31);
        assert!(next_pass(later, tick, None, 0) <= later);
    }
}
