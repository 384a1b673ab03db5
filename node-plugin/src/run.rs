//! The plugin's loop: watch the CVMs bound to this node, plan ([`crate::plan`]) against the
//! guests the platform holds, carry out the actions, write status. Level-triggered: every
//! pass recomputes the whole plan from the reflector's view and the platform's list, so a
//! lost event, a restart or a crash mid-action converge on the next pass.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cvm_crds::cvm::{ConfidentialVM, GuestState};
use cvm_crds::wellknown::{LABEL_NODE, MANAGER_NODE_PLUGIN};
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::evidence;
use crate::metrics::Metrics;
use crate::node;
use crate::plan::{self, Action, BoundCvm, EvidenceKey, HeldGuest, StopCause};
use crate::platform::{GuestInfo, GuestRequest, Platform, PlatformError};
use crate::status;
use crate::store;

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
}

impl ActionError {
    fn reason(&self) -> &'static str {
        match self {
            ActionError::Platform(p) => p.reason(),
            ActionError::Request(_) => "InvalidSpec",
            ActionError::BadNonce(_) => "BadNonce",
            ActionError::Status(_) => "StatusWrite",
            ActionError::Store(_) => "StateStore",
        }
    }
}

/// One node plugin over a platform backend.
pub struct NodePlugin<P: Platform> {
    client: Client,
    platform: Arc<P>,
    opts: Options,
    metrics: Metrics,
    answered: Mutex<BTreeMap<String, EvidenceKey>>,
}

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
        let cfg = watcher::Config::default().labels(&format!("{LABEL_NODE}={node}"));
        let (reader, writer) = reflector::store();
        let notify = Arc::new(Notify::new());
        let stream = reflector::reflector(writer, watcher(api, cfg)).default_backoff();
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
        let caps = self.platform.capabilities();
        info!(node = %node, tees = ?caps.tees, simulated = caps.simulated, "node plugin starting");

        tokio::pin!(shutdown);
        // Planning before the first full list would take every held guest for an orphan.
        tokio::select! {
            r = reader.wait_until_ready() => {
                if r.is_err() {
                    warn!(node = %node, "watch ended before the first list");
                }
            }
            _ = &mut shutdown => { watch.abort(); return Ok(()); }
        }
        let mut advertised: Option<Instant> = None;
        let mut retry = true;
        loop {
            if advertised.is_none_or(|t| t.elapsed() >= self.opts.resync) {
                match node::advertise(&self.client, &node, &caps).await {
                    Ok(()) => advertised = Some(Instant::now()),
                    Err(e) => warn!(node = %node, error = %e, "advertising the node"),
                }
            }
            self.sync(&reader, retry).await;
            retry = tokio::select! {
                _ = notify.notified() => false,
                _ = tokio::time::sleep(self.opts.resync) => true,
                _ = &mut shutdown => break,
            };
        }
        watch.abort();
        info!(node = %node, "node plugin stopped");
        Ok(())
    }

    /// One pass: plan against the reflector's view and carry out every action.
    /// `retry_failed` lets failed launches be retried (on resync ticks only, so that a
    /// launch that keeps failing is not retried on its own status writes).
    pub async fn sync(&self, reader: &Store<ConfidentialVM>, retry_failed: bool) {
        let node = &self.opts.node;
        let cvms: Vec<Arc<ConfidentialVM>> = reader.state();
        let held: Vec<GuestInfo> = match self.platform.list().await {
            Ok(h) => h,
            Err(e) => {
                warn!(node = %node, error = %e, "listing guests");
                return;
            }
        };
        let held_plain: Vec<HeldGuest> = held
            .iter()
            .map(|g| HeldGuest {
                uid: g.uid.clone(),
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
        let bound: Vec<BoundCvm> = by_uid.values().map(|(_, b)| b.clone()).collect();
        let answered = self.lock_answered().clone();
        let actions = plan::plan(&held_plain, &bound, &answered, retry_failed);
        let guests: BTreeMap<&str, &GuestInfo> = held.iter().map(|g| (g.uid.as_str(), g)).collect();
        let runs = actions.into_iter().map(|(uid, action)| {
            let cvm = by_uid.get(&uid).map(|(c, b)| (c.clone(), b.clone()));
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
            }
        });
        futures::future::join_all(runs).await;
    }

    fn lock_answered(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, EvidenceKey>> {
        // Each update is one insert or remove: a poisoned lock holds consistent data.
        self.answered.lock().unwrap_or_else(|p| p.into_inner())
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
            Ok(r) => r,
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
        let challenge = evidence::challenge_for(nonce, &bound.uid)
            .ok_or_else(|| ActionError::BadNonce(nonce.unwrap_or_default().to_string()))?;
        let raw = self.platform.evidence(&bound.uid, &challenge).await?;
        let ev = evidence::encode(&raw, &challenge, now());
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
        };
        let msg = format!("guest stopped on node {}: {why}", self.opts.node);
        let facts = match guest {
            Some(g) => status::facts(&caps, g, GuestState::Stopped, Some(msg.clone())),
            None => status::facts_without_guest(&caps, GuestState::Stopped, Some(msg.clone())),
        };
        let cond = status::launched_condition(cvm, false, status::REASON_STOPPED, msg, now());
        self.write_status(cvm, &status::apply_patch(&facts, None, &cond))
            .await
    }

    async fn report_failed(
        &self,
        cvm: &ConfidentialVM,
        reason: &str,
        message: String,
    ) -> Result<(), ActionError> {
        let caps = self.platform.capabilities();
        let facts = status::facts_without_guest(&caps, GuestState::Failed, Some(message.clone()));
        let cond = status::launched_condition(cvm, false, reason, message, now());
        self.write_status(cvm, &status::apply_patch(&facts, None, &cond))
            .await
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
