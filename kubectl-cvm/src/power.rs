//! `kubectl cvm start|stop|restart`: what KubeVirt's `virtctl start|stop|restart` do for
//! a VirtualMachine, through the one knob a ConfidentialVM has for it, `spec.runStrategy`.
//!
//! - `stop` sets `Halted` (the operator and the node plugin stop the guest, and the
//!   operator deletes its launcher pod) and keeps the strategy it replaced in the
//!   annotation [`ANNOTATION_BEFORE_STOP`];
//! - `start` puts that strategy back (`Always` when none was kept) and drops the annotation;
//! - `restart` stops, waits until the status shows the guest stopped, then starts.
//!
//! Each change is a JSON merge patch that carries the `resourceVersion` it was decided
//! on, so it applies to exactly the object that was read (a concurrent writer makes it
//! fail with 409 Conflict, and the command reads again and decides again). A merge patch
//! touches only `spec.runStrategy` and the annotation, so a GitOps tool that owns the
//! other fields keeps them; one that owns `spec.runStrategy` itself will set it back on
//! its next sync, as it would after `virtctl stop`.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use clap::Args;
use cvm_crds::conditions::STATUS_TRUE;
use cvm_crds::cvm::RunStrategy;
use cvm_crds::{ConditionType, ConfidentialVM, CvmPhase};
use kube::api::{Api, Patch, PatchParams};
use serde_json::{json, Value};
use thiserror::Error;

use crate::cli::{Done, KubeArgs};
use crate::cluster::{block_on, parse_timeout, ClusterError, Ctx};

/// Annotation `stop` sets to the run strategy it replaced with `Halted`; `start` restores
/// it and removes the annotation.
pub const ANNOTATION_BEFORE_STOP: &str = "cvmp.io/run-strategy-before-stop";
/// Field manager of the patches (what `managedFields` shows as the writer).
pub const FIELD_MANAGER: &str = "kubectl-cvm";
/// The Ready reason the operator gives a guest stopped as `Halted` asks.
pub const READY_HALTED: &str = "Halted";

const RESOURCE: &str = "confidentialvms.cvmp.io";
/// How often a patch is decided again after a conflict before giving up.
const ATTEMPTS: u32 = 5;
/// Bounds of the status polling interval while waiting.
const POLL_MIN: Duration = Duration::from_millis(200);
const POLL_MAX: Duration = Duration::from_secs(2);

pub const STOP_EXAMPLES: &str = "Examples:
  kubectl cvm stop my-vm
  kubectl cvm stop my-vm -n prod --wait --timeout 5m

spec.runStrategy becomes Halted; the strategy it had is kept in the annotation
cvmp.io/run-strategy-before-stop for `kubectl cvm start`. A GitOps tool that owns
spec.runStrategy sets it back on its next sync: change it in Git instead.";

pub const START_EXAMPLES: &str = "Examples:
  kubectl cvm start my-vm
  kubectl cvm start my-vm -n prod --wait

spec.runStrategy gets back the strategy `kubectl cvm stop` replaced (from the annotation
cvmp.io/run-strategy-before-stop), or Always when none was kept.";

pub const RESTART_EXAMPLES: &str = "Examples:
  kubectl cvm restart my-vm
  kubectl cvm restart my-vm -n prod --wait --timeout 5m

Stops the guest (spec.runStrategy Halted), waits until the status shows it stopped, then
starts it again with the strategy it had: the guest is launched anew and must be verified
again. A stopped CVM is refused: start it with `kubectl cvm start`.";

#[derive(Debug, Args)]
pub struct StopArgs {
    /// The ConfidentialVM.
    pub name: String,
    /// Wait until the status shows the guest stopped (Ready reason Halted, phase Stopped).
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits (e.g. 90s, 5m).
    #[arg(long, default_value = "120s", value_parser = parse_timeout)]
    pub timeout: Duration,
}

#[derive(Debug, Args)]
pub struct StartArgs {
    /// The ConfidentialVM.
    pub name: String,
    /// Wait until the guest runs and its evidence is verified (phase Verified).
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits (e.g. 90s, 5m).
    #[arg(long, default_value = "120s", value_parser = parse_timeout)]
    pub timeout: Duration,
}

#[derive(Debug, Args)]
pub struct RestartArgs {
    /// The ConfidentialVM.
    pub name: String,
    /// After the start, also wait until the new guest is verified (phase Verified).
    #[arg(long)]
    pub wait: bool,
    /// How long each wait may take: for the guest to stop (always awaited), and with
    /// --wait for the new guest to be verified (e.g. 90s, 5m).
    #[arg(long, default_value = "120s", value_parser = parse_timeout)]
    pub timeout: Duration,
}

#[derive(Debug, Error)]
pub enum PowerError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("ConfidentialVM {name} not found in namespace {namespace}")]
    NotFound { name: String, namespace: String },
    #[error(
        "forbidden: your account may not {verb} {RESOURCE} in namespace {namespace} \
         (kubectl cvm {command} needs get and patch on them): {message}"
    )]
    Forbidden {
        verb: &'static str,
        command: &'static str,
        namespace: String,
        message: String,
    },
    #[error(
        "ConfidentialVM {namespace}/{name} is stopped (runStrategy Halted); use kubectl cvm start {name}"
    )]
    Stopped { name: String, namespace: String },
    #[error("ConfidentialVM {namespace}/{name} is being deleted: there is nothing to {command}")]
    Deleting {
        name: String,
        namespace: String,
        command: &'static str,
    },
    #[error(transparent)]
    Timeout(Box<TimedOut>),
    #[error(
        "ConfidentialVM {namespace}/{name} changed under kubectl cvm {command} {ATTEMPTS} times \
         in a row (409 Conflict each time); nothing was changed, try again"
    )]
    Conflict {
        name: String,
        namespace: String,
        command: &'static str,
    },
    #[error("{message} ({code})")]
    Api { message: String, code: u16 },
    #[error("cannot reach the cluster: {0}")]
    Unreachable(String),
}

/// A wait that ran out, with where the CVM was left.
#[derive(Debug, Error)]
#[error(
    "timed out after {after:?} waiting for ConfidentialVM {namespace}/{name} {what}: it is in \
     phase {phase}, Ready {ready}{hint}"
)]
pub struct TimedOut {
    pub name: String,
    pub namespace: String,
    pub what: &'static str,
    /// How long it waited.
    pub after: Duration,
    pub phase: String,
    pub ready: String,
    pub hint: String,
}

/// Which command decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Start,
    Stop,
    /// The stop half of a restart (the start half decides as [`Verb::Start`]).
    Restart,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Start => "start",
            Verb::Stop => "stop",
            Verb::Restart => "restart",
        }
    }
}

/// What to do with the annotation that remembers the strategy before the stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnnotationChange {
    /// Set it to this strategy.
    Set(RunStrategy),
    /// Remove it.
    Remove,
    /// Leave it as it is (absent).
    Keep,
}

/// A change of `spec.runStrategy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub from: RunStrategy,
    pub to: RunStrategy,
    pub annotation: AnnotationChange,
    /// Why `to` is not the strategy the annotation held, when it is not.
    pub note: Option<String>,
}

/// What a command does to a CVM, given its run strategy and the annotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Patch(Change),
    /// `stop` of a Halted CVM.
    AlreadyStopped,
    /// `start` of a CVM that is not Halted, with its strategy.
    AlreadyRunning(RunStrategy),
    /// `restart` of a Halted CVM.
    RefuseStopped,
    /// Any command on a CVM being deleted.
    RefuseDeleting,
}

/// The wire spelling of a run strategy.
pub fn strategy_str(s: RunStrategy) -> &'static str {
    match s {
        RunStrategy::Always => "Always",
        RunStrategy::RerunOnFailure => "RerunOnFailure",
        RunStrategy::Manual => "Manual",
        RunStrategy::Halted => "Halted",
    }
}

fn parse_strategy(s: &str) -> Option<RunStrategy> {
    serde_json::from_value(Value::String(s.trim().to_string())).ok()
}

/// The pure decision: `strategy` is `spec.runStrategy`, `remembered` the value of
/// [`ANNOTATION_BEFORE_STOP`] if present.
pub fn decide(
    verb: Verb,
    strategy: RunStrategy,
    remembered: Option<&str>,
    deleting: bool,
) -> Decision {
    if deleting {
        return Decision::RefuseDeleting;
    }
    let halted = strategy == RunStrategy::Halted;
    match verb {
        Verb::Stop if halted => Decision::AlreadyStopped,
        Verb::Restart if halted => Decision::RefuseStopped,
        Verb::Stop | Verb::Restart => Decision::Patch(Change {
            from: strategy,
            to: RunStrategy::Halted,
            annotation: AnnotationChange::Set(strategy),
            note: None,
        }),
        Verb::Start if !halted => Decision::AlreadyRunning(strategy),
        Verb::Start => {
            let (to, note) = match remembered {
                None => (RunStrategy::Always, None),
                Some(v) => match parse_strategy(v) {
                    Some(s) if s != RunStrategy::Halted => (s, None),
                    _ => (
                        RunStrategy::Always,
                        Some(format!(
                            "annotation {ANNOTATION_BEFORE_STOP} held {v:?}, not a strategy \
                             that runs the guest; starting with Always"
                        )),
                    ),
                },
            };
            Decision::Patch(Change {
                from: strategy,
                to,
                annotation: if remembered.is_some() {
                    AnnotationChange::Remove
                } else {
                    AnnotationChange::Keep
                },
                note,
            })
        }
    }
}

impl Change {
    /// The JSON merge patch; with `resource_version` the server applies it only to that
    /// version of the object (409 Conflict otherwise).
    pub fn patch(&self, resource_version: Option<&str>) -> Value {
        let mut metadata = serde_json::Map::new();
        if let Some(rv) = resource_version {
            metadata.insert("resourceVersion".into(), rv.into());
        }
        match &self.annotation {
            AnnotationChange::Set(s) => {
                metadata.insert(
                    "annotations".into(),
                    json!({ ANNOTATION_BEFORE_STOP: strategy_str(*s) }),
                );
            }
            AnnotationChange::Remove => {
                metadata.insert(
                    "annotations".into(),
                    json!({ ANNOTATION_BEFORE_STOP: Value::Null }),
                );
            }
            AnnotationChange::Keep => {}
        }
        let mut patch = json!({ "spec": { "runStrategy": strategy_str(self.to) } });
        if !metadata.is_empty() {
            patch["metadata"] = Value::Object(metadata);
        }
        patch
    }
}

fn remembered(cvm: &ConfidentialVM) -> Option<&str> {
    cvm.metadata
        .annotations
        .as_ref()?
        .get(ANNOTATION_BEFORE_STOP)
        .map(String::as_str)
}

fn generation(cvm: &ConfidentialVM) -> i64 {
    cvm.metadata.generation.unwrap_or(0)
}

fn observed(cvm: &ConfidentialVM, generation: i64) -> bool {
    cvm.status
        .as_ref()
        .and_then(|s| s.observed_generation)
        .is_some_and(|g| g >= generation)
}

/// Whether the status shows the guest stopped, as the operator judged the spec of
/// `generation` or a later one: Ready True with reason Halted or phase Stopped; or, for a
/// CVM never bound to a node, no guest at all.
pub fn guest_stopped(cvm: &ConfidentialVM, generation: i64) -> bool {
    if cvm.spec.run_strategy != RunStrategy::Halted || !observed(cvm, generation) {
        return false;
    }
    let ready_halted = cvm.condition(ConditionType::Ready).is_some_and(|c| {
        c.status == STATUS_TRUE
            && c.reason == READY_HALTED
            && c.observed_generation.is_none_or(|g| g >= generation)
    });
    let st = cvm.status.as_ref();
    let no_guest = cvm.node_name().is_none()
        && st
            .and_then(|s| s.platform.as_ref())
            .and_then(|p| p.guest_state)
            .is_none();
    ready_halted || cvm.phase() == CvmPhase::Stopped || no_guest
}

/// Which launch of the guest the status describes: `(launchId, launchedAt)`.
pub type LaunchMark = (Option<String>, Option<String>);

pub fn launch_mark(cvm: &ConfidentialVM) -> LaunchMark {
    let p = cvm.status.as_ref().and_then(|s| s.platform.as_ref());
    (
        p.and_then(|p| p.launch_id.clone()),
        p.and_then(|p| p.launched_at.as_ref().map(|t| t.0.to_string())),
    )
}

/// Whether the guest runs verified under the spec of `generation` or later; with
/// `not_launch`, it must also be another launch than that one.
pub fn verified_since(
    cvm: &ConfidentialVM,
    generation: i64,
    not_launch: Option<&LaunchMark>,
) -> bool {
    cvm.spec.run_strategy != RunStrategy::Halted
        && observed(cvm, generation)
        && cvm.phase() == CvmPhase::Verified
        && not_launch.is_none_or(|old| launch_mark(cvm) != *old)
}

/// Phase and Ready, as a progress line and in a timeout.
pub fn reading(cvm: &ConfidentialVM) -> (String, String) {
    let ready = match cvm.condition(ConditionType::Ready) {
        Some(c) if c.message.is_empty() => format!("{} ({})", c.status, c.reason),
        Some(c) => format!("{} ({}: {})", c.status, c.reason, c.message),
        None => "not reported yet".to_string(),
    };
    (cvm.phase().to_string(), ready)
}

/// Field managers other than ours that server-side applied `spec.runStrategy`: their next
/// apply sets it back (or conflicts).
pub fn appliers_of_run_strategy(cvm: &ConfidentialVM) -> Vec<String> {
    cvm.metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.operation.as_deref() == Some("Apply"))
        .filter(|m| m.manager.as_deref() != Some(FIELD_MANAGER))
        .filter(|m| {
            m.fields_v1
                .as_ref()
                .and_then(|f| f.0.get("f:spec"))
                .and_then(|s| s.get("f:runStrategy"))
                .is_some()
        })
        .filter_map(|m| m.manager.clone())
        .collect()
}

/// The client side of one command.
struct Power<'a> {
    ctx: &'a Ctx,
    name: &'a str,
    command: Verb,
}

/// The object as read, what was decided, and the object after the patch (the read one
/// when nothing was patched).
struct Applied {
    before: ConfidentialVM,
    decision: Decision,
    after: ConfidentialVM,
}

impl Power<'_> {
    fn api(&self) -> Api<ConfidentialVM> {
        self.ctx.cvms()
    }

    fn err(&self, verb: &'static str, e: kube::Error) -> PowerError {
        match e {
            kube::Error::Api(s) if s.code == 404 => PowerError::NotFound {
                name: self.name.into(),
                namespace: self.ctx.namespace.clone(),
            },
            kube::Error::Api(s) if s.code == 403 => PowerError::Forbidden {
                verb,
                command: self.command.as_str(),
                namespace: self.ctx.namespace.clone(),
                message: s.message,
            },
            kube::Error::Api(s) => PowerError::Api {
                message: s.message,
                code: s.code,
            },
            other => PowerError::Unreachable(other.to_string()),
        }
    }

    fn key(&self) -> String {
        format!("{}/{}", self.ctx.namespace, self.name)
    }

    async fn get(&self) -> Result<ConfidentialVM, PowerError> {
        self.api()
            .get(self.name)
            .await
            .map_err(|e| self.err("get", e))
    }

    /// Reads, decides with `verb` and patches, again on a conflict.
    async fn apply(&self, verb: Verb) -> Result<Applied, PowerError> {
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        for _ in 0..ATTEMPTS {
            let before = self.get().await?;
            let decision = decide(
                verb,
                before.spec.run_strategy,
                remembered(&before),
                before.metadata.deletion_timestamp.is_some(),
            );
            let Decision::Patch(change) = &decision else {
                let after = before.clone();
                return Ok(Applied {
                    before,
                    decision,
                    after,
                });
            };
            let body = change.patch(before.metadata.resource_version.as_deref());
            match self
                .api()
                .patch(self.name, &params, &Patch::Merge(&body))
                .await
            {
                Ok(after) => {
                    return Ok(Applied {
                        before,
                        decision,
                        after,
                    })
                }
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(self.err("patch", e)),
            }
        }
        Err(PowerError::Conflict {
            name: self.name.into(),
            namespace: self.ctx.namespace.clone(),
            command: self.command.as_str(),
        })
    }

    /// Polls (bounded backoff) until `done` holds; prints each new phase/Ready reading.
    async fn wait(
        &self,
        timeout: Duration,
        what: &'static str,
        hint: String,
        done: impl Fn(&ConfidentialVM) -> bool,
    ) -> Result<ConfidentialVM, PowerError> {
        let deadline = Instant::now() + timeout;
        let mut interval = POLL_MIN;
        let mut last_seen: Option<(String, String)> = None;
        loop {
            match self.api().get(self.name).await {
                Ok(cvm) => {
                    if done(&cvm) {
                        return Ok(cvm);
                    }
                    let now = reading(&cvm);
                    if last_seen.as_ref() != Some(&now) {
                        println!("  phase {}, Ready {}", now.0, now.1);
                    }
                    last_seen = Some(now);
                }
                // Gone, or no longer allowed: no point in waiting on.
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 403 => {
                    return Err(self.err("get", kube::Error::Api(s)))
                }
                // A blip of the API server: the deadline decides.
                Err(_) => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let (phase, ready) =
                    last_seen.unwrap_or_else(|| ("unknown".into(), "unknown (unreachable)".into()));
                return Err(PowerError::Timeout(Box::new(TimedOut {
                    name: self.name.into(),
                    namespace: self.ctx.namespace.clone(),
                    what,
                    after: timeout,
                    phase,
                    ready,
                    hint,
                })));
            }
            tokio::time::sleep(interval.min(left)).await;
            interval = (interval * 3 / 2).min(POLL_MAX);
        }
    }

    async fn wait_stopped(
        &self,
        timeout: Duration,
        generation: i64,
        hint: String,
    ) -> Result<ConfidentialVM, PowerError> {
        self.wait(timeout, "to stop its guest", hint, |c| {
            guest_stopped(c, generation)
        })
        .await
    }

    async fn wait_verified(
        &self,
        timeout: Duration,
        generation: i64,
        not_launch: Option<LaunchMark>,
    ) -> Result<ConfidentialVM, PowerError> {
        let hint = format!(
            "; the operator goes on: kubectl cvm status {} -n {}",
            self.name, self.ctx.namespace
        );
        self.wait(timeout, "to be Verified", hint, |c| {
            verified_since(c, generation, not_launch.as_ref())
        })
        .await
    }
}

fn gitops_note(out: &mut String, cvm: &ConfidentialVM) {
    let appliers = appliers_of_run_strategy(cvm);
    if !appliers.is_empty() {
        let _ = writeln!(
            out,
            "note: {} server-side applied spec.runStrategy; its next apply sets it back \
             (change it at the source, e.g. in Git)",
            appliers.join(", ")
        );
    }
}

fn flush(out: &mut String) {
    print!("{out}");
    out.clear();
}

fn stopped_line(key: &str, cvm: &ConfidentialVM) -> String {
    let (phase, ready) = reading(cvm);
    format!("ConfidentialVM {key}: guest stopped (phase {phase}, Ready {ready})\n")
}

fn verified_line(key: &str, cvm: &ConfidentialVM) -> String {
    let node = cvm.node_name().unwrap_or("?");
    let launch = launch_mark(cvm)
        .0
        .map(|id| format!(", launch {id}"))
        .unwrap_or_default();
    format!("ConfidentialVM {key}: Verified on node {node}{launch}\n")
}

pub async fn stop(ctx: &Ctx, a: &StopArgs) -> Result<Done, PowerError> {
    let p = Power {
        ctx,
        name: &a.name,
        command: Verb::Stop,
    };
    let done = p.apply(Verb::Stop).await?;
    let key = p.key();
    let mut out = String::new();
    match &done.decision {
        Decision::AlreadyStopped => {
            let _ = writeln!(
                out,
                "ConfidentialVM {key} is already stopped (runStrategy Halted)"
            );
        }
        Decision::Patch(c) => {
            let _ = writeln!(
                out,
                "confidentialvm.cvmp.io/{} stopping: spec.runStrategy {} -> Halted \
                 (kubectl cvm start {} restores {})",
                a.name,
                strategy_str(c.from),
                a.name,
                strategy_str(c.from)
            );
            gitops_note(&mut out, &done.before);
        }
        Decision::RefuseDeleting => {
            return Err(PowerError::Deleting {
                name: a.name.clone(),
                namespace: ctx.namespace.clone(),
                command: "stop",
            })
        }
        Decision::AlreadyRunning(_) | Decision::RefuseStopped => {}
    }
    if !a.wait {
        if matches!(done.decision, Decision::Patch(_)) {
            let _ = writeln!(
                out,
                "the operator stops the guest; follow it with: kubectl cvm status {} -n {}",
                a.name, ctx.namespace
            );
        }
        return Ok(Done::ok(out));
    }
    flush(&mut out);
    let cvm = p
        .wait_stopped(a.timeout, generation(&done.after), String::new())
        .await?;
    out.push_str(&stopped_line(&key, &cvm));
    Ok(Done::ok(out))
}

pub async fn start(ctx: &Ctx, a: &StartArgs) -> Result<Done, PowerError> {
    let p = Power {
        ctx,
        name: &a.name,
        command: Verb::Start,
    };
    let done = p.apply(Verb::Start).await?;
    let key = p.key();
    let mut out = String::new();
    match &done.decision {
        Decision::AlreadyRunning(s) => {
            let phase = done.before.phase();
            let _ = write!(
                out,
                "ConfidentialVM {key} is already running (runStrategy {}; phase {phase})",
                strategy_str(*s)
            );
            let idle = matches!(phase, CvmPhase::Stopped | CvmPhase::Failed);
            if idle && *s != RunStrategy::Always {
                let _ = write!(
                    out,
                    "; its guest is not running and runStrategy {} does not start it again: \
                     kubectl cvm restart {} does",
                    strategy_str(*s),
                    a.name
                );
            }
            out.push('\n');
            if !a.wait {
                return Ok(Done::ok(out));
            }
        }
        Decision::Patch(c) => {
            let _ = writeln!(
                out,
                "confidentialvm.cvmp.io/{} starting: spec.runStrategy {} -> {}",
                a.name,
                strategy_str(c.from),
                strategy_str(c.to)
            );
            if let Some(n) = &c.note {
                let _ = writeln!(out, "note: {n}");
            }
            gitops_note(&mut out, &done.before);
            if !a.wait {
                let _ = writeln!(
                    out,
                    "the node plugin launches the guest and the operator verifies it; follow it with: \
                     kubectl cvm status {} -n {}",
                    a.name, ctx.namespace
                );
                return Ok(Done::ok(out));
            }
        }
        Decision::RefuseDeleting => {
            return Err(PowerError::Deleting {
                name: a.name.clone(),
                namespace: ctx.namespace.clone(),
                command: "start",
            })
        }
        Decision::AlreadyStopped | Decision::RefuseStopped => {}
    }
    flush(&mut out);
    let cvm = p
        .wait_verified(a.timeout, generation(&done.after), None)
        .await?;
    out.push_str(&verified_line(&key, &cvm));
    Ok(Done::ok(out))
}

pub async fn restart(ctx: &Ctx, a: &RestartArgs) -> Result<Done, PowerError> {
    let p = Power {
        ctx,
        name: &a.name,
        command: Verb::Restart,
    };
    let stopped = p.apply(Verb::Restart).await?;
    let key = p.key();
    let change = match &stopped.decision {
        Decision::Patch(c) => c.clone(),
        Decision::RefuseDeleting => {
            return Err(PowerError::Deleting {
                name: a.name.clone(),
                namespace: ctx.namespace.clone(),
                command: "restart",
            })
        }
        _ => {
            return Err(PowerError::Stopped {
                name: a.name.clone(),
                namespace: ctx.namespace.clone(),
            })
        }
    };
    let old_launch = launch_mark(&stopped.before);
    let mut out = format!(
        "confidentialvm.cvmp.io/{} stopping: spec.runStrategy {} -> Halted\n",
        a.name,
        strategy_str(change.from)
    );
    gitops_note(&mut out, &stopped.before);
    flush(&mut out);
    let hint = format!(
        "; it stays Halted: kubectl cvm start {} -n {} runs it again",
        a.name, ctx.namespace
    );
    let cvm = p
        .wait_stopped(a.timeout, generation(&stopped.after), hint)
        .await?;
    out.push_str(&stopped_line(&key, &cvm));
    let started = p.apply(Verb::Start).await?;
    match &started.decision {
        Decision::Patch(c) => {
            let _ = writeln!(
                out,
                "confidentialvm.cvmp.io/{} starting: spec.runStrategy Halted -> {}",
                a.name,
                strategy_str(c.to)
            );
            if let Some(n) = &c.note {
                let _ = writeln!(out, "note: {n}");
            }
        }
        // Someone started it in between: it runs as they asked.
        Decision::AlreadyRunning(s) => {
            let _ = writeln!(
                out,
                "ConfidentialVM {key} was started meanwhile (runStrategy {})",
                strategy_str(*s)
            );
        }
        Decision::RefuseDeleting => {
            return Err(PowerError::Deleting {
                name: a.name.clone(),
                namespace: ctx.namespace.clone(),
                command: "restart",
            })
        }
        Decision::AlreadyStopped | Decision::RefuseStopped => {}
    }
    if !a.wait {
        let _ = writeln!(
            out,
            "the node plugin launches a new guest and the operator verifies it; follow it with: \
             kubectl cvm status {} -n {}",
            a.name, ctx.namespace
        );
        return Ok(Done::ok(out));
    }
    flush(&mut out);
    let cvm = p
        .wait_verified(a.timeout, generation(&started.after), Some(old_launch))
        .await?;
    out.push_str(&verified_line(&key, &cvm));
    Ok(Done::ok(out))
}

pub fn run_stop(k: &KubeArgs, a: &StopArgs) -> Result<Done, PowerError> {
    block_on(async {
        let ctx = Ctx::connect(k).await?;
        stop(&ctx, a).await
    })?
}

pub fn run_start(k: &KubeArgs, a: &StartArgs) -> Result<Done, PowerError> {
    block_on(async {
        let ctx = Ctx::connect(k).await?;
        start(&ctx, a).await
    })?
}

pub fn run_restart(k: &KubeArgs, a: &RestartArgs) -> Result<Done, PowerError> {
    block_on(async {
        let ctx = Ctx::connect(k).await?;
        restart(&ctx, a).await
    })?
}

#[cfg(test)]
mod tests {
    use super::*;
    use RunStrategy::*;

    const RUNNING: [RunStrategy; 3] = [Always, RerunOnFailure, Manual];

    fn change(from: RunStrategy, to: RunStrategy, annotation: AnnotationChange) -> Decision {
        Decision::Patch(Change {
            from,
            to,
            annotation,
            note: None,
        })
    }

    #[test]
    fn stop_halts_and_remembers_the_strategy_it_replaces() {
        for s in RUNNING {
            // A stale annotation (a start by hand) is overwritten with the current strategy.
            for ann in [None, Some("Manual"), Some("junk")] {
                assert_eq!(
                    decide(Verb::Stop, s, ann, false),
                    change(s, Halted, AnnotationChange::Set(s)),
                    "{s:?} {ann:?}"
                );
                assert_eq!(
                    decide(Verb::Restart, s, ann, false),
                    change(s, Halted, AnnotationChange::Set(s))
                );
            }
        }
        assert_eq!(
            decide(Verb::Stop, Halted, None, false),
            Decision::AlreadyStopped
        );
        assert_eq!(
            decide(Verb::Stop, Halted, Some("Manual"), false),
            Decision::AlreadyStopped
        );
        assert_eq!(
            decide(Verb::Restart, Halted, Some("Always"), false),
            Decision::RefuseStopped
        );
    }

    #[test]
    fn start_restores_the_remembered_strategy_else_always() {
        for s in RUNNING {
            assert_eq!(
                decide(Verb::Start, Halted, Some(strategy_str(s)), false),
                change(Halted, s, AnnotationChange::Remove)
            );
            // Not Halted: nothing to do, whatever the annotation says.
            assert_eq!(
                decide(Verb::Start, s, Some("Manual"), false),
                Decision::AlreadyRunning(s)
            );
            assert_eq!(
                decide(Verb::Start, s, None, false),
                Decision::AlreadyRunning(s)
            );
        }
        assert_eq!(
            decide(Verb::Start, Halted, None, false),
            change(Halted, Always, AnnotationChange::Keep)
        );
        for bad in ["Halted", "sometimes", ""] {
            let Decision::Patch(c) = decide(Verb::Start, Halted, Some(bad), false) else {
                panic!("{bad:?}: a start patch");
            };
            assert_eq!((c.to, c.annotation), (Always, AnnotationChange::Remove));
            assert!(c.note.is_some_and(|n| n.contains(ANNOTATION_BEFORE_STOP)));
        }
    }

    #[test]
    fn nothing_is_patched_on_a_cvm_being_deleted() {
        for verb in [Verb::Start, Verb::Stop, Verb::Restart] {
            for s in [Always, Halted] {
                assert_eq!(decide(verb, s, None, true), Decision::RefuseDeleting);
            }
        }
    }

    #[test]
    fn patches_carry_the_resource_version_and_touch_only_strategy_and_annotation() {
        let Decision::Patch(stop) = decide(Verb::Stop, RerunOnFailure, None, false) else {
            panic!("a stop patch");
        };
        assert_eq!(
            stop.patch(Some("42")),
            json!({
                "metadata": {
                    "resourceVersion": "42",
                    "annotations": {ANNOTATION_BEFORE_STOP: "RerunOnFailure"},
                },
                "spec": {"runStrategy": "Halted"},
            })
        );
        let Decision::Patch(start) = decide(Verb::Start, Halted, Some("RerunOnFailure"), false)
        else {
            panic!("a start patch");
        };
        assert_eq!(
            start.patch(Some("43")),
            json!({
                "metadata": {
                    "resourceVersion": "43",
                    "annotations": {ANNOTATION_BEFORE_STOP: null},
                },
                "spec": {"runStrategy": "RerunOnFailure"},
            })
        );
        let Decision::Patch(bare) = decide(Verb::Start, Halted, None, false) else {
            panic!("a start patch");
        };
        assert_eq!(bare.patch(None), json!({"spec": {"runStrategy": "Always"}}));
        // The spelling is the CRD's.
        for s in [Always, RerunOnFailure, Manual, Halted] {
            assert_eq!(json!(s), json!(strategy_str(s)));
            assert_eq!(parse_strategy(strategy_str(s)), Some(s));
        }
    }

    fn cvm(strategy: &str, generation: i64, status: Value) -> ConfidentialVM {
        let r = serde_json::from_value(json!({
            "apiVersion": "cvmp.io/v1alpha1", "kind": "ConfidentialVM",
            "metadata": {"name": "vm", "namespace": "ns", "generation": generation},
            "spec": {
                "tee": {"type": "SEV-SNP"},
                "resources": {"vcpus": 1, "memoryMiB": 512},
                "boot": {"firmware": {"name": "ovmf-snp"}},
                "runStrategy": strategy,
            },
            "status": status,
        }));
        match r {
            Ok(c) => c,
            Err(e) => panic!("test CVM: {e}"),
        }
    }

    fn ready(status: &str, reason: &str, generation: i64) -> Value {
        json!({"type": "Ready", "status": status, "reason": reason, "message": "m",
               "observedGeneration": generation, "lastTransitionTime": "2026-01-01T00:00:00Z"})
    }

    #[test]
    fn stopped_means_the_operator_saw_halted_and_the_guest_stopped() {
        let halted = cvm(
            "Halted",
            3,
            json!({"phase": "Stopped", "observedGeneration": 3, "nodeName": "n1",
                   "platform": {"guestState": "Stopped"},
                   "conditions": [ready("True", "Halted", 3)]}),
        );
        assert!(guest_stopped(&halted, 3));
        // The operator has not judged the Halted spec yet: its word is stale.
        assert!(!guest_stopped(&halted, 4));
        // Still running under the new generation.
        let running = cvm(
            "Halted",
            3,
            json!({"phase": "Verified", "observedGeneration": 3, "nodeName": "n1",
                   "platform": {"guestState": "Running"},
                   "conditions": [ready("True", "RunningVerified", 3)]}),
        );
        assert!(!guest_stopped(&running, 3));
        // Never placed: no guest to stop.
        let unplaced = cvm(
            "Halted",
            2,
            json!({"phase": "Pending", "observedGeneration": 2,
                   "conditions": [ready("False", "GuestNotRunning", 2)]}),
        );
        assert!(guest_stopped(&unplaced, 2));
        // Started again meanwhile.
        let started = cvm(
            "Always",
            3,
            json!({"phase": "Stopped", "observedGeneration": 3, "nodeName": "n1",
                   "platform": {"guestState": "Stopped"}}),
        );
        assert!(!guest_stopped(&started, 3));
        assert_eq!(
            reading(&halted),
            ("Stopped".to_string(), "True (Halted: m)".to_string())
        );
    }

    #[test]
    fn verified_needs_the_new_generation_and_on_restart_a_new_launch() {
        let v = cvm(
            "Always",
            5,
            json!({"phase": "Verified", "observedGeneration": 5, "nodeName": "n1",
                   "platform": {"guestState": "Running", "launchId": "b",
                                "launchedAt": "2026-01-01T00:00:09Z"}}),
        );
        assert!(verified_since(&v, 5, None));
        assert!(!verified_since(&v, 6, None));
        let old: LaunchMark = (Some("a".into()), Some("2026-01-01T00:00:01Z".into()));
        assert!(verified_since(&v, 5, Some(&old)));
        assert!(!verified_since(&v, 5, Some(&launch_mark(&v))));
        let stopped = cvm(
            "Always",
            5,
            json!({"phase": "Stopped", "observedGeneration": 5}),
        );
        assert!(!verified_since(&stopped, 5, None));
    }

    #[test]
    fn a_server_side_applier_of_run_strategy_is_named() {
        let mut c = cvm("Always", 1, json!({}));
        c.metadata.managed_fields = Some(
            serde_json::from_value(json!([
                {"manager": "flux", "operation": "Apply",
                 "fieldsV1": {"f:spec": {"f:runStrategy": {}, "f:tee": {}}}},
                {"manager": "helm", "operation": "Apply", "fieldsV1": {"f:spec": {"f:tee": {}}}},
                {"manager": "kubectl-edit", "operation": "Update",
                 "fieldsV1": {"f:spec": {"f:runStrategy": {}}}},
                {"manager": FIELD_MANAGER, "operation": "Apply",
                 "fieldsV1": {"f:spec": {"f:runStrategy": {}}}},
            ]))
            .expect("managed fields"),
        );
        assert_eq!(appliers_of_run_strategy(&c), vec!["flux".to_string()]);
    }
}
