//! The operator's share of a CVM's status, derived by a pure function from what the
//! reconciler observed. Server-side apply then writes exactly these fields, so anything
//! the operator owns is recomputed on every pass (nothing is lost or left stale).

use cvm_crds::conditions::{self, new_condition, unknown_condition};
use cvm_crds::cvm::{AttestationResult, EarStatus, GuestInstancePin, GuestState};
use cvm_crds::{ConditionType, ConfidentialVM, CvmPhase, TeeType};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde::Serialize;

/// Where the CVM stands with respect to placement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Bound to this node (now or earlier).
    Bound(String),
    /// Nothing fits; the scheduler's counted reasons.
    Unschedulable(String),
    /// The spec breaks rules the API server could not check (`cvm_crds::validate`):
    /// what to change. Not placed until it is fixed.
    Invalid(String),
}

/// Health of the bound node as the operator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeHealth {
    Ready,
    NotReady,
    Missing,
}

/// The verification outcome to record.
#[derive(Debug, Clone, PartialEq)]
pub enum Verification {
    /// No evidence yet (or none answering the current challenge).
    Awaiting(String),
    /// The referenced policy cannot be used.
    PolicyProblem {
        reason: VerdictReason,
        message: String,
    },
    /// A result (new or carried over from the last pass) and the guest instance pin it
    /// leaves.
    Result {
        result: Box<AttestationResult>,
        instance: Option<GuestInstancePin>,
    },
}

/// Everything the status derivation needs.
#[derive(Debug, Clone)]
pub struct Observed<'a> {
    pub cvm: &'a ConfidentialVM,
    pub placement: Placement,
    pub node: Option<NodeHealth>,
    pub verification: Verification,
    pub deleting: bool,
    /// The launcher pod, when the operator makes them (`None`: it does not).
    pub launcher: Option<crate::launcher::PodReading>,
    pub now: Time,
}

/// The fields the operator owns (field manager `cvm-operator`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OperatorStatus {
    pub phase: CvmPhase,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    pub observed_generation: Option<i64>,
    pub conditions: Vec<Condition>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attestation: Option<AttestationResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_instance: Option<GuestInstancePin>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub refused_nodes: Vec<cvm_crds::cvm::RefusedNode>,
}

/// The conditions the operator owns on a CVM.
pub const OPERATOR_CONDITIONS: [ConditionType; 6] = [
    ConditionType::Scheduled,
    ConditionType::Verified,
    ConditionType::Ready,
    ConditionType::LiveMigratable,
    ConditionType::Reconciling,
    ConditionType::Stalled,
];

/// The operator's share of a CVM's status as recorded: for a write that changes one field
/// (a migration's rebind) and must keep the rest, since server-side apply drops whatever
/// the field manager leaves out.
pub fn recorded(cvm: &ConfidentialVM) -> OperatorStatus {
    let st = cvm.status.clone().unwrap_or_default();
    OperatorStatus {
        phase: st.phase.unwrap_or_default(),
        node_name: st.node_name,
        observed_generation: st.observed_generation,
        conditions: st
            .conditions
            .into_iter()
            .filter(|c| OPERATOR_CONDITIONS.iter().any(|t| t.as_str() == c.type_))
            .collect(),
        attestation: st.attestation,
        guest_instance: st.guest_instance,
        refused_nodes: st.refused_nodes,
    }
}

fn guest_state(cvm: &ConfidentialVM) -> Option<GuestState> {
    cvm.status.as_ref()?.platform.as_ref()?.guest_state
}

/// How long a node plugin may take to report on a CVM bound to its node before the
/// status says that none did (a plugin pod that cannot start, or no plugin on the node).
pub const PLUGIN_SILENCE_SECS: i64 = 60;

/// Seconds since the CVM was bound when no node plugin has reported anything on it (no
/// platform facts, no Launched condition) for at least [`PLUGIN_SILENCE_SECS`].
fn plugin_silent_for(cvm: &ConfidentialVM, existing: &[Condition], now: &Time) -> Option<i64> {
    let st = cvm.status.as_ref();
    let reported = st.is_some_and(|s| {
        s.platform.is_some()
            || s.conditions
                .iter()
                .any(|c| c.type_ == ConditionType::Launched.as_str())
    });
    if reported {
        return None;
    }
    let bound = existing.iter().find(|c| {
        c.type_ == ConditionType::Scheduled.as_str() && c.status == conditions::STATUS_TRUE
    })?;
    let secs = now.0.as_second() - bound.last_transition_time.0.as_second();
    (secs >= PLUGIN_SILENCE_SECS).then_some(secs)
}

fn launched(cvm: &ConfidentialVM) -> bool {
    cvm.status
        .as_ref()
        .is_some_and(|s| conditions::is_true(&s.conditions, ConditionType::Launched))
}

/// Derives the operator-owned status. Keeps `lastTransitionTime` of conditions whose
/// status did not change.
pub fn derive(o: &Observed<'_>) -> OperatorStatus {
    let gen = o.cvm.metadata.generation;
    let existing: Vec<Condition> = o
        .cvm
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let mut out: Vec<Condition> = Vec::new();
    let mut set = |c: Condition| {
        // Start from the existing entry so an unchanged status keeps its transition time.
        let mut tmp: Vec<Condition> = existing
            .iter()
            .filter(|e| e.type_ == c.type_)
            .cloned()
            .collect();
        conditions::set_condition(&mut tmp, c);
        out.extend(tmp);
    };
    let now = o.now.clone();

    let node_name = match &o.placement {
        Placement::Bound(n) => {
            set(new_condition(
                ConditionType::Scheduled,
                true,
                "Bound",
                format!("bound to node {n}"),
                gen,
                now.clone(),
            ));
            Some(n.clone())
        }
        Placement::Unschedulable(msg) => {
            set(new_condition(
                ConditionType::Scheduled,
                false,
                "Unschedulable",
                msg.clone(),
                gen,
                now.clone(),
            ));
            None
        }
        Placement::Invalid(msg) => {
            set(new_condition(
                ConditionType::Scheduled,
                false,
                StallReason::InvalidSpec.as_str(),
                msg.clone(),
                gen,
                now.clone(),
            ));
            None
        }
    };

    let kept_instance = o.cvm.status.as_ref().and_then(|s| s.guest_instance.clone());
    let verdict: (VerdictReason, String) = match &o.verification {
        Verification::Awaiting(msg) => (VerdictReason::AwaitingEvidence, msg.clone()),
        Verification::PolicyProblem { reason, message } => (*reason, message.clone()),
        Verification::Result { result, .. } => {
            let (_, reason, msg) = verdict_text(result);
            (reason, msg)
        }
    };
    let (verified, attestation, guest_instance) = match &o.verification {
        Verification::Awaiting(msg) => {
            set(unknown_condition(
                ConditionType::Verified,
                VerdictReason::AwaitingEvidence.as_str(),
                msg.clone(),
                gen,
                now.clone(),
            ));
            (false, None, kept_instance)
        }
        Verification::PolicyProblem { reason, message } => {
            set(new_condition(
                ConditionType::Verified,
                false,
                reason.as_str(),
                message.clone(),
                gen,
                now.clone(),
            ));
            (false, None, kept_instance)
        }
        Verification::Result { result, instance } => {
            let (ok, reason, msg) = verdict_text(result);
            set(new_condition(
                ConditionType::Verified,
                ok,
                reason.as_str(),
                msg,
                gen,
                now.clone(),
            ));
            (ok, Some((**result).clone()), instance.clone())
        }
    };

    let running = guest_state(o.cvm) == Some(GuestState::Running) && launched(o.cvm);
    let silent_for = plugin_silent_for(o.cvm, &existing, &o.now);
    // Done as far as the operator goes, though not Verified: kstatus reads Ready, so
    // these must be True for Flux to see the CVM Current.
    let stopped_as_asked = guest_state(o.cvm) == Some(GuestState::Stopped)
        && o.cvm.spec.run_strategy == cvm_crds::cvm::RunStrategy::Halted;
    let owner_verifies = verdict.0 == VerdictReason::OwnerVerificationRequired;
    // What kube-scheduler or kubelet said of the launcher pod, in their words.
    use crate::launcher::PodReading;
    let launcher_unschedulable = match &o.launcher {
        Some(PodReading::Unschedulable(m)) => Some(m.as_str()),
        _ => None,
    };
    let launcher_refused: Option<(&'static str, &str)> = match &o.launcher {
        Some(PodReading::Refused { reason, message }) => {
            Some((launcher_reason(reason), message.as_str()))
        }
        _ => None,
    };
    let invalid = match &o.placement {
        Placement::Invalid(m) => Some(m.as_str()),
        _ => None,
    };
    let (ready, ready_reason, ready_msg) = match (o.node, running, verified) {
        _ if invalid.is_some() => (
            false,
            StallReason::InvalidSpec.as_str(),
            format!("the spec is invalid: {}", invalid.unwrap_or_default()),
        ),
        (Some(NodeHealth::Missing), ..) => (
            false,
            "NodeLost",
            format!(
                "node {} no longer exists",
                node_name.as_deref().unwrap_or("?")
            ),
        ),
        (Some(NodeHealth::NotReady), ..) => (
            false,
            "NodeNotReady",
            format!("node {} is not Ready", node_name.as_deref().unwrap_or("?")),
        ),
        (_, false, _) if launcher_unschedulable.is_some() => (
            false,
            "LauncherUnschedulable",
            format!(
                "the launcher pod cannot be scheduled on node {}: {}",
                node_name.as_deref().unwrap_or("?"),
                launcher_unschedulable.unwrap_or_default()
            ),
        ),
        (_, _, _) if launcher_refused.is_some() => {
            let (reason, message) = launcher_refused.unwrap_or_default();
            (
                false,
                reason,
                format!("the launcher pod was refused: {message}"),
            )
        }
        (_, false, _)
            if o.cvm.spec.run_strategy == cvm_crds::cvm::RunStrategy::Manual
                && o.launcher == Some(PodReading::Absent)
                && crate::launcher::launcher_gone(o.cvm) =>
        {
            (
                false,
                cvm_crds::wellknown::REASON_LAUNCHER_GONE,
                "the launcher pod went away (deleted, evicted or drained) and runStrategy \
                 Manual does not replace it: kubectl cvm restart NAME starts the guest again"
                    .into(),
            )
        }
        (_, false, _) if stopped_as_asked => (
            true,
            "Halted",
            "the guest is stopped, as spec.runStrategy Halted asks".into(),
        ),
        (_, true, false) if owner_verifies => (
            true,
            "OwnerVerificationRequired",
            "the guest runs; nothing the operator can check signs SEV/SEV-ES evidence, so \
             its owner verifies it (kubectl cvm attest); Verified stays False"
                .into(),
        ),
        (_, false, _) if silent_for.is_some() => (
            false,
            "NodePluginSilent",
            format!(
                "bound to node {node} {} s ago and no node plugin has reported on it: is the \
                 cvm-node-plugin pod on {node} running? (kubectl get pods -A -o wide \
                 -l app.kubernetes.io/component=node-plugin --field-selector spec.nodeName={node})",
                silent_for.unwrap_or_default(),
                node = node_name.as_deref().unwrap_or("?")
            ),
        ),
        (_, false, _) => (
            false,
            "GuestNotRunning",
            "the guest is not running yet".into(),
        ),
        (_, true, false) => (
            false,
            "NotVerified",
            "the guest's evidence is not verified".into(),
        ),
        (_, true, true) => (
            true,
            "RunningVerified",
            "the guest runs and its evidence is verified".into(),
        ),
    };
    let ready_said = (ready_reason, ready_msg.clone());
    set(new_condition(
        ConditionType::Ready,
        ready,
        ready_reason,
        ready_msg,
        gen,
        now.clone(),
    ));

    let (mig, mig_reason, mig_msg) = live_migratable(o.cvm);
    set(new_condition(
        ConditionType::LiveMigratable,
        mig,
        mig_reason.as_str(),
        mig_msg,
        gen,
        now,
    ));

    let phase = if o.deleting {
        CvmPhase::Terminating
    } else if node_name.is_none() {
        CvmPhase::Pending
    } else {
        match guest_state(o.cvm) {
            None => CvmPhase::Scheduled,
            Some(GuestState::Launching) => CvmPhase::Launching,
            Some(GuestState::Stopped) => CvmPhase::Stopped,
            Some(GuestState::Failed) => CvmPhase::Failed,
            Some(GuestState::Running) if verified => CvmPhase::Verified,
            Some(GuestState::Running) => CvmPhase::Running,
        }
    };

    let unschedulable = match &o.placement {
        Placement::Unschedulable(msg) => Some(msg.as_str()),
        Placement::Bound(_) | Placement::Invalid(_) => None,
    };
    let reading = progress(&ProgressInput {
        phase,
        unschedulable,
        invalid,
        node: o.node,
        verdict: (verdict.0, &verdict.1),
        ready: (ready_said.0, &ready_said.1),
        guest_message: o
            .cvm
            .status
            .as_ref()
            .and_then(|s| s.platform.as_ref())
            .and_then(|p| p.message.as_deref()),
    });
    let (reconciling, stalled) = reading.conditions();
    for (ty, (on, reason, message)) in [
        (ConditionType::Reconciling, reconciling),
        (ConditionType::Stalled, stalled),
    ] {
        set(new_condition(ty, on, reason, message, gen, o.now.clone()));
    }

    OperatorStatus {
        phase,
        node_name,
        observed_generation: gen,
        conditions: out,
        attestation,
        guest_instance,
        // Kept as recorded; the controller adds a refusal when a node refuses the pod.
        refused_nodes: o
            .cvm
            .status
            .as_ref()
            .map(|s| s.refused_nodes.clone())
            .unwrap_or_default(),
    }
}

/// A kubelet reason as a condition reason: the ones kubelet gives for refusing or
/// ending a launcher pod, verbatim; anything else as `LauncherRefused`.
fn launcher_reason(r: &str) -> &'static str {
    const KNOWN: [&str; 10] = [
        "OutOfmemory",
        "OutOfcpu",
        "Evicted",
        "UnexpectedAdmissionError",
        "NodeAffinity",
        "ErrImagePull",
        "ImagePullBackOff",
        "ErrImageNeverPull",
        "CreateContainerError",
        "LauncherExited",
    ];
    KNOWN
        .iter()
        .find(|k| **k == r)
        .copied()
        .unwrap_or("LauncherRefused")
}

/// Why a CVM cannot progress until someone acts (`Stalled=True`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StallReason {
    /// No node can host it.
    Unschedulable,
    /// Its evidence failed a check of its policy.
    EvidenceRejected,
    /// The policy it names does not exist.
    PolicyNotFound,
    /// The guest failed and its run strategy does not relaunch it.
    GuestFailed,
    /// The node it is bound to is gone.
    NodeLost,
    /// Its spec breaks a rule only the operator checks.
    InvalidSpec,
}

impl StallReason {
    /// The Kubernetes reason string.
    pub fn as_str(self) -> &'static str {
        match self {
            StallReason::Unschedulable => "Unschedulable",
            StallReason::EvidenceRejected => "EvidenceRejected",
            StallReason::PolicyNotFound => "PolicyNotFound",
            StallReason::GuestFailed => "GuestFailed",
            StallReason::NodeLost => "NodeLost",
            StallReason::InvalidSpec => "InvalidSpec",
        }
    }
}

/// A CVM as kstatus (Flux, kpt, cli-utils) and Argo CD read it: still in progress, done
/// as far as the operator goes, or stuck until someone acts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The operator is still working toward the verdict (`Reconciling=True`).
    Reconciling {
        reason: &'static str,
        message: String,
    },
    /// Nothing changes until someone acts (`Stalled=True`).
    Stalled {
        reason: StallReason,
        message: String,
    },
    /// Verified, handed to the owner (SEV, SEV-ES) or stopped as asked.
    Done,
}

/// What [`progress`] reads: the rest of the derived status.
#[derive(Debug, Clone)]
pub struct ProgressInput<'a> {
    pub phase: CvmPhase,
    /// The scheduler's reasons when nothing fits.
    pub unschedulable: Option<&'a str>,
    /// What is wrong with the spec, when it is invalid.
    pub invalid: Option<&'a str>,
    pub node: Option<NodeHealth>,
    /// The `Verified` condition's reason and message.
    pub verdict: (VerdictReason, &'a str),
    /// The `Ready` condition's reason and message.
    pub ready: (&'static str, &'a str),
    /// The node plugin's word on the guest (`status.platform.message`).
    pub guest_message: Option<&'a str>,
}

/// kstatus's reading of the derived status.
pub fn progress(i: &ProgressInput<'_>) -> Progress {
    let stalled = |reason, message: &str| Progress::Stalled {
        reason,
        message: message.to_string(),
    };
    if i.phase == CvmPhase::Terminating {
        return Progress::Reconciling {
            reason: "Deleting",
            message: "the node plugin is stopping the guest before the CVM goes".into(),
        };
    }
    if let Some(msg) = i.invalid {
        return stalled(StallReason::InvalidSpec, msg);
    }
    if let Some(msg) = i.unschedulable {
        return stalled(StallReason::Unschedulable, msg);
    }
    if i.node == Some(NodeHealth::Missing) {
        return stalled(StallReason::NodeLost, i.ready.1);
    }
    if i.phase == CvmPhase::Failed {
        return stalled(
            StallReason::GuestFailed,
            i.guest_message.unwrap_or(
                "the guest failed and its run strategy does not relaunch it; see the Launched condition",
            ),
        );
    }
    match i.verdict.0 {
        VerdictReason::EvidenceRejected => {
            return stalled(StallReason::EvidenceRejected, i.verdict.1)
        }
        VerdictReason::PolicyNotFound => return stalled(StallReason::PolicyNotFound, i.verdict.1),
        _ => {}
    }
    match (i.phase, i.verdict.0) {
        (CvmPhase::Verified | CvmPhase::Stopped, _) => Progress::Done,
        (CvmPhase::Running, VerdictReason::OwnerVerificationRequired) => Progress::Done,
        (CvmPhase::Running, reason) => Progress::Reconciling {
            reason: reason.as_str(),
            message: i.verdict.1.to_string(),
        },
        _ => Progress::Reconciling {
            reason: i.ready.0,
            message: i.ready.1.to_string(),
        },
    }
}

impl Progress {
    /// `(status, reason, message)` of `Reconciling` and of `Stalled`: both always written,
    /// False when they do not hold, so a reader never sees a stale True.
    pub fn conditions(&self) -> ((bool, &'static str, String), (bool, &'static str, String)) {
        match self {
            Progress::Reconciling { reason, message } => (
                (true, reason, message.clone()),
                (
                    false,
                    "Progressing",
                    "the operator is making progress".into(),
                ),
            ),
            Progress::Stalled { reason, message } => (
                (false, reason.as_str(), "waiting for someone to act".into()),
                (true, reason.as_str(), message.clone()),
            ),
            Progress::Done => (
                (
                    false,
                    "Done",
                    "the operator's work on this CVM is done".into(),
                ),
                (false, "Done", "nothing blocks this CVM".into()),
            ),
        }
    }
}

/// Reasons of the `Verified` condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerdictReason {
    /// Every check passed.
    Affirming,
    /// Verified, with warnings in the findings.
    AffirmingWithWarnings,
    /// A check failed; the message names each.
    EvidenceRejected,
    /// SEV / SEV-ES: nothing the operator can check signs the evidence; the owner must.
    OwnerVerificationRequired,
    /// No evidence yet, or none answering the current challenge.
    AwaitingEvidence,
    /// spec.attestation.policyRef names no AttestationPolicy.
    PolicyNotFound,
    /// The guest runs without any TEE (its agent says so): a plain VM, never a pass.
    NotConfidential,
}

impl VerdictReason {
    /// The Kubernetes reason string.
    pub fn as_str(self) -> &'static str {
        match self {
            VerdictReason::Affirming => "Affirming",
            VerdictReason::AffirmingWithWarnings => "AffirmingWithWarnings",
            VerdictReason::EvidenceRejected => "EvidenceRejected",
            VerdictReason::OwnerVerificationRequired => "OwnerVerificationRequired",
            VerdictReason::AwaitingEvidence => "AwaitingEvidence",
            VerdictReason::PolicyNotFound => "PolicyNotFound",
            VerdictReason::NotConfidential => "NotConfidential",
        }
    }
}

/// (verified?, reason, message) for a recorded result; the message names every finding.
pub fn verdict_text(r: &AttestationResult) -> (bool, VerdictReason, String) {
    let contra: Vec<&str> = r
        .findings
        .iter()
        .filter(|f| f.severity == Some(cvm_crds::cvm::FindingSeverity::Contraindicated))
        .map(|f| f.message.as_str())
        .collect();
    if let Some(f) = r
        .findings
        .iter()
        .find(|f| f.check == crate::verify::CHECK_NOT_CONFIDENTIAL)
    {
        return (false, VerdictReason::NotConfidential, f.message.clone());
    }
    if r.findings
        .iter()
        .any(|f| f.check == crate::verify::CHECK_OWNER_VERIFICATION)
    {
        return (
            false,
            VerdictReason::OwnerVerificationRequired,
            contra.join("; "),
        );
    }
    match r.status {
        EarStatus::Affirming => (
            true,
            VerdictReason::Affirming,
            "evidence verified against the policy".into(),
        ),
        EarStatus::Warning => (
            true,
            VerdictReason::AffirmingWithWarnings,
            format!(
                "evidence verified with warnings: {}",
                r.findings
                    .iter()
                    .map(|f| f.message.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        ),
        EarStatus::Contraindicated | EarStatus::None => (
            false,
            VerdictReason::EvidenceRejected,
            if contra.is_empty() {
                "evidence was not affirmed".to_string()
            } else {
                contra.join("; ")
            },
        ),
    }
}

/// Reasons of the `LiveMigratable` condition (KubeVirt's convention).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveMigratable {
    /// The guest may move.
    Allowed,
    /// SEV and SEV-ES guests have no migration agent.
    SevNotLiveMigratable,
    /// spec.tee.policy.migratable is false.
    PolicyForbidsMigration,
}

impl LiveMigratable {
    /// The Kubernetes reason string.
    pub fn as_str(self) -> &'static str {
        match self {
            LiveMigratable::Allowed => "MigrationAllowed",
            LiveMigratable::SevNotLiveMigratable => "SEVNotLiveMigratable",
            LiveMigratable::PolicyForbidsMigration => "PolicyForbidsMigration",
        }
    }

    /// The reason a migration request is refused with, when the guest may not move.
    pub fn refusal(self) -> Option<cvm_crds::MigrationReason> {
        match self {
            LiveMigratable::Allowed => None,
            LiveMigratable::SevNotLiveMigratable => {
                Some(cvm_crds::MigrationReason::SevNotLiveMigratable)
            }
            LiveMigratable::PolicyForbidsMigration => {
                Some(cvm_crds::MigrationReason::PolicyForbidsMigration)
            }
        }
    }
}

/// KubeVirt's convention: `LiveMigratable=False` with a reason that says why.
pub fn live_migratable(cvm: &ConfidentialVM) -> (bool, LiveMigratable, String) {
    match cvm.tee_type() {
        TeeType::Sev | TeeType::SevEs => (
            false,
            LiveMigratable::SevNotLiveMigratable,
            "SEV and SEV-ES guests cannot be live-migrated (no migration agent)".into(),
        ),
        _ if !cvm.guest_policy().migratable => (
            false,
            LiveMigratable::PolicyForbidsMigration,
            "spec.tee.policy.migratable is false".into(),
        ),
        _ => (
            true,
            LiveMigratable::Allowed,
            "the guest policy allows migration".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cvm_crds::cvm::{Finding, FindingSeverity, PlatformFacts, TrustworthinessVector};
    use cvm_crds::ConfidentialVMStatus;
    use k8s_openapi::jiff::Timestamp;

    fn t(s: i64) -> Time {
        Time(Timestamp::from_second(s).unwrap())
    }

    fn cvm(tee: &str) -> ConfidentialVM {
        let mut c: ConfidentialVM = serde_json::from_value(serde_json::json!({
            "apiVersion": "cvmp.io/v1alpha1", "kind": "ConfidentialVM",
            "metadata": {"name": "x", "namespace": "d", "generation": 3},
            "spec": {"tee": {"type": tee}, "resources": {"vcpus": 2, "memoryMiB": 2048},
                     "boot": {"firmware": {"name": "ovmf"}}}
        }))
        .unwrap();
        c.status = Some(ConfidentialVMStatus::default());
        c
    }

    fn running(mut c: ConfidentialVM) -> ConfidentialVM {
        let st = c.status.get_or_insert_with(Default::default);
        st.platform = Some(PlatformFacts {
            guest_state: Some(GuestState::Running),
            ..Default::default()
        });
        st.conditions.push(new_condition(
            ConditionType::Launched,
            true,
            "Launched",
            "",
            Some(3),
            t(1),
        ));
        c
    }

    fn result(status: EarStatus, findings: Vec<Finding>) -> AttestationResult {
        AttestationResult {
            status,
            trustworthiness_vector: TrustworthinessVector::default(),
            policy: Some("p".into()),
            findings,
            verified_at: t(5),
            verifier: "cvm-operator".into(),
            evidence_collected_at: None,
            nonce: None,
            evidence_sha256: None,
            evidence_seen_at: None,
            migration: None,
        }
    }

    fn obs(c: &ConfidentialVM, placement: Placement, v: Verification) -> OperatorStatus {
        derive(&Observed {
            cvm: c,
            placement,
            node: Some(NodeHealth::Ready),
            verification: v,
            deleting: false,
            launcher: None,
            now: t(10),
        })
    }

    fn cond(s: &OperatorStatus, t: ConditionType) -> &Condition {
        s.conditions.iter().find(|c| c.type_ == t.as_str()).unwrap()
    }

    #[test]
    fn a_bound_cvm_no_plugin_reports_on_says_so_after_a_minute() {
        let mut c = cvm("SEV-SNP");
        let bound_at = |secs: i64| Condition {
            type_: ConditionType::Scheduled.as_str().into(),
            status: "True".into(),
            reason: "Bound".into(),
            message: "bound to node n1".into(),
            observed_generation: Some(3),
            last_transition_time: t(secs),
        };
        let at = |c: &ConfidentialVM, now: i64| {
            derive(&Observed {
                cvm: c,
                placement: Placement::Bound("n1".into()),
                node: Some(NodeHealth::Ready),
                verification: Verification::Awaiting("no evidence".into()),
                deleting: false,
                launcher: None,
                now: t(now),
            })
        };
        c.status.get_or_insert_with(Default::default).conditions = vec![bound_at(0)];
        let early = at(&c, 59);
        assert_eq!(cond(&early, ConditionType::Ready).reason, "GuestNotRunning");
        let late = at(&c, 75);
        let rd = cond(&late, ConditionType::Ready);
        assert_eq!(rd.reason, "NodePluginSilent");
        assert!(rd.message.contains("75 s ago"), "{}", rd.message);
        assert!(rd.message.contains("spec.nodeName=n1"), "{}", rd.message);
        // Once the plugin reports anything, the guest's own state speaks.
        let mut heard = c.clone();
        heard.status.as_mut().unwrap().platform = Some(Default::default());
        assert_eq!(
            cond(&at(&heard, 75), ConditionType::Ready).reason,
            "GuestNotRunning"
        );
    }

    #[test]
    fn unschedulable_stays_pending_with_the_reason() {
        let c = cvm("SEV-SNP");
        let s = obs(
            &c,
            Placement::Unschedulable("0/2 nodes are available: 2 lack SEV-SNP".into()),
            Verification::Awaiting("no evidence".into()),
        );
        assert_eq!(s.phase, CvmPhase::Pending);
        assert_eq!(s.node_name, None);
        let sc = cond(&s, ConditionType::Scheduled);
        assert_eq!(
            (sc.status.as_str(), sc.reason.as_str()),
            ("False", "Unschedulable")
        );
        assert!(sc.message.contains("2 lack SEV-SNP"));
        assert_eq!(s.observed_generation, Some(3));
    }

    #[test]
    fn phases_follow_the_guest_and_the_verdict() {
        let c = cvm("SEV-SNP");
        let bound = || Placement::Bound("n1".into());
        assert_eq!(
            obs(&c, bound(), Verification::Awaiting("".into())).phase,
            CvmPhase::Scheduled
        );
        let r = running(c);
        let s = obs(&r, bound(), Verification::Awaiting("waiting".into()));
        assert_eq!(s.phase, CvmPhase::Running);
        assert_eq!(cond(&s, ConditionType::Verified).status, "Unknown");
        let s = obs(
            &r,
            bound(),
            Verification::Result {
                result: Box::new(result(EarStatus::Affirming, vec![])),
                instance: None,
            },
        );
        assert_eq!(s.phase, CvmPhase::Verified);
        assert_eq!(cond(&s, ConditionType::Ready).status, "True");
        assert_eq!(cond(&s, ConditionType::Verified).reason, "Affirming");
    }

    #[test]
    fn rejected_evidence_names_its_findings() {
        let r = running(cvm("TDX"));
        let f = Finding {
            check: "measurement-mismatch".into(),
            claim: None,
            severity: Some(FindingSeverity::Contraindicated),
            expected: Some("ab12".into()),
            reported: Some("cd34".into()),
            message: "measurement mismatch: expected ab12, reported cd34".into(),
        };
        let s = obs(
            &r,
            Placement::Bound("n".into()),
            Verification::Result {
                result: Box::new(result(EarStatus::Contraindicated, vec![f])),
                instance: None,
            },
        );
        assert_eq!(s.phase, CvmPhase::Running);
        let v = cond(&s, ConditionType::Verified);
        assert_eq!(
            (v.status.as_str(), v.reason.as_str()),
            ("False", "EvidenceRejected")
        );
        assert!(
            v.message.contains("expected ab12, reported cd34"),
            "{}",
            v.message
        );
        assert_eq!(cond(&s, ConditionType::Ready).reason, "NotVerified");
    }

    #[test]
    fn lost_node_shows_on_ready_and_deletion_is_terminating() {
        let r = running(cvm("SEV-SNP"));
        let s = derive(&Observed {
            cvm: &r,
            placement: Placement::Bound("gone".into()),
            node: Some(NodeHealth::Missing),
            verification: Verification::Awaiting("".into()),
            deleting: true,
            launcher: None,
            now: t(10),
        });
        assert_eq!(s.phase, CvmPhase::Terminating);
        let rd = cond(&s, ConditionType::Ready);
        assert_eq!(rd.reason, "NodeLost");
        assert!(rd.message.contains("gone"));
    }

    #[test]
    fn transition_time_is_kept_when_status_is_unchanged() {
        let mut c = cvm("SEV-SNP");
        let first = obs(
            &c,
            Placement::Bound("n".into()),
            Verification::Awaiting("".into()),
        );
        c.status.as_mut().unwrap().conditions = first.conditions.clone();
        let later = derive(&Observed {
            cvm: &c,
            placement: Placement::Bound("n".into()),
            node: Some(NodeHealth::Ready),
            verification: Verification::Awaiting("".into()),
            deleting: false,
            launcher: None,
            now: t(99),
        });
        assert_eq!(
            cond(&later, ConditionType::Scheduled).last_transition_time,
            t(10)
        );
    }

    #[test]
    fn sev_is_never_live_migratable() {
        let c = cvm("SEV");
        let (ok, reason, _) = live_migratable(&c);
        assert!(!ok);
        assert_eq!(reason.as_str(), "SEVNotLiveMigratable");
        assert_eq!(
            reason.refusal(),
            Some(cvm_crds::MigrationReason::SevNotLiveMigratable)
        );
        let (ok, reason, _) = live_migratable(&cvm("SEV-SNP"));
        assert_eq!(
            (ok, reason),
            (false, LiveMigratable::PolicyForbidsMigration)
        );
        assert_eq!(reason.as_str(), "PolicyForbidsMigration");
        assert_eq!(LiveMigratable::Allowed.refusal(), None);
    }

    #[test]
    fn recorded_keeps_only_the_operators_share() {
        let mut c = running(cvm("SEV-SNP"));
        let derived = obs(
            &c,
            Placement::Bound("n1".into()),
            Verification::Result {
                result: Box::new(result(EarStatus::Affirming, vec![])),
                instance: None,
            },
        );
        let st = c.status.get_or_insert_with(Default::default);
        st.phase = Some(derived.phase);
        st.node_name = derived.node_name.clone();
        st.observed_generation = derived.observed_generation;
        st.attestation = derived.attestation.clone();
        st.conditions.extend(derived.conditions.clone());
        let r = recorded(&c);
        assert_eq!(r.node_name.as_deref(), Some("n1"));
        assert_eq!(r.phase, CvmPhase::Verified);
        // Launched belongs to the node plugin.
        assert!(r.conditions.iter().all(|c| c.type_ != "Launched"));
        assert_eq!(r.conditions.len(), OPERATOR_CONDITIONS.len());
        assert_eq!(r, derived);
    }

    fn input(phase: CvmPhase, verdict: VerdictReason) -> ProgressInput<'static> {
        ProgressInput {
            phase,
            unschedulable: None,
            invalid: None,
            node: Some(NodeHealth::Ready),
            verdict: (verdict, "verdict says"),
            ready: ("GuestNotRunning", "ready says"),
            guest_message: None,
        }
    }

    #[test]
    fn an_invalid_spec_is_stalled_with_what_to_change_and_never_placed() {
        let c = cvm("SEV-SNP");
        let why = "spec.tee.hostData must be lowercase hex (0-9, a-f); \"XY\" is not";
        let s = obs(
            &c,
            Placement::Invalid(why.into()),
            Verification::Awaiting("no evidence".into()),
        );
        assert_eq!(s.node_name, None);
        assert_eq!(s.phase, CvmPhase::Pending);
        let get = |t: &str| s.conditions.iter().find(|x| x.type_ == t).unwrap();
        assert_eq!(
            (
                get("Scheduled").status.as_str(),
                get("Scheduled").reason.as_str()
            ),
            ("False", "InvalidSpec")
        );
        assert_eq!(get("Ready").reason, "InvalidSpec");
        assert!(
            get("Ready").message.contains(why),
            "{}",
            get("Ready").message
        );
        assert_eq!(
            (
                get("Stalled").status.as_str(),
                get("Stalled").reason.as_str()
            ),
            ("True", "InvalidSpec")
        );
        assert_eq!(get("Stalled").message, why);
    }

    #[test]
    fn kstatus_reads_in_progress_until_verified_and_stalled_when_someone_must_act() {
        use VerdictReason as V;
        let r = |i: &ProgressInput<'_>| progress(i);
        assert_eq!(
            r(&input(CvmPhase::Scheduled, V::AwaitingEvidence)),
            Progress::Reconciling {
                reason: "GuestNotRunning",
                message: "ready says".into()
            }
        );
        assert_eq!(
            r(&input(CvmPhase::Running, V::AwaitingEvidence)),
            Progress::Reconciling {
                reason: "AwaitingEvidence",
                message: "verdict says".into()
            }
        );
        assert_eq!(r(&input(CvmPhase::Verified, V::Affirming)), Progress::Done);
        assert_eq!(
            r(&input(CvmPhase::Running, V::OwnerVerificationRequired)),
            Progress::Done
        );
        assert_eq!(
            r(&input(CvmPhase::Stopped, V::AwaitingEvidence)),
            Progress::Done
        );
        for (v, want) in [
            (V::EvidenceRejected, StallReason::EvidenceRejected),
            (V::PolicyNotFound, StallReason::PolicyNotFound),
        ] {
            assert_eq!(
                r(&input(CvmPhase::Running, v)),
                Progress::Stalled {
                    reason: want,
                    message: "verdict says".into()
                }
            );
        }
        let mut i = input(CvmPhase::Pending, V::AwaitingEvidence);
        i.unschedulable = Some("0/2 nodes lack TDX");
        assert_eq!(
            r(&i),
            Progress::Stalled {
                reason: StallReason::Unschedulable,
                message: "0/2 nodes lack TDX".into()
            }
        );
        let mut i = input(CvmPhase::Running, V::Affirming);
        i.node = Some(NodeHealth::Missing);
        assert!(matches!(
            r(&i),
            Progress::Stalled {
                reason: StallReason::NodeLost,
                ..
            }
        ));
        let mut i = input(CvmPhase::Failed, V::AwaitingEvidence);
        i.guest_message = Some("qemu exited 1");
        assert_eq!(
            r(&i),
            Progress::Stalled {
                reason: StallReason::GuestFailed,
                message: "qemu exited 1".into()
            }
        );
        // Deleting wins over everything: kstatus itself says Terminating.
        let mut i = input(CvmPhase::Terminating, V::EvidenceRejected);
        i.unschedulable = Some("x");
        assert!(matches!(
            r(&i),
            Progress::Reconciling {
                reason: "Deleting",
                ..
            }
        ));
    }

    #[test]
    fn derived_status_carries_both_kstatus_conditions() {
        let c = cvm("SEV-SNP");
        let pending = obs(
            &c,
            Placement::Unschedulable("0/2 nodes lack SEV-SNP".into()),
            Verification::Awaiting("no evidence".into()),
        );
        assert_eq!(cond(&pending, ConditionType::Stalled).status, "True");
        assert_eq!(
            cond(&pending, ConditionType::Stalled).reason,
            "Unschedulable"
        );
        assert_eq!(cond(&pending, ConditionType::Reconciling).status, "False");
        assert_eq!(pending.observed_generation, Some(3));
        let c = running(cvm("SEV-SNP"));
        let ok = obs(
            &c,
            Placement::Bound("n1".into()),
            Verification::Result {
                result: Box::new(result(EarStatus::Affirming, vec![])),
                instance: None,
            },
        );
        assert_eq!(ok.phase, CvmPhase::Verified);
        assert_eq!(cond(&ok, ConditionType::Reconciling).status, "False");
        assert_eq!(cond(&ok, ConditionType::Stalled).status, "False");
        let awaiting = obs(
            &c,
            Placement::Bound("n1".into()),
            Verification::Awaiting("no evidence answers the challenge yet".into()),
        );
        let rc = cond(&awaiting, ConditionType::Reconciling);
        assert_eq!(
            (rc.status.as_str(), rc.reason.as_str()),
            ("True", "AwaitingEvidence")
        );
        assert_eq!(cond(&awaiting, ConditionType::Stalled).status, "False");
    }

    #[test]
    fn ready_is_true_once_the_operators_share_is_done_though_not_verified() {
        // SEV-ES: running, evidence the owner must check.
        let c = running(cvm("SEV-ES"));
        let owner = obs(
            &c,
            Placement::Bound("n1".into()),
            Verification::Result {
                result: Box::new(result(
                    EarStatus::None,
                    vec![Finding {
                        check: crate::verify::CHECK_OWNER_VERIFICATION.into(),
                        claim: None,
                        severity: Some(FindingSeverity::Contraindicated),
                        message: "only the owner can verify SEV-ES evidence".into(),
                        expected: None,
                        reported: None,
                    }],
                )),
                instance: None,
            },
        );
        assert_eq!(cond(&owner, ConditionType::Verified).status, "False");
        let rd = cond(&owner, ConditionType::Ready);
        assert_eq!(
            (rd.status.as_str(), rd.reason.as_str()),
            ("True", "OwnerVerificationRequired")
        );
        // Stopped as runStrategy Halted asks.
        let mut c = cvm("SEV-SNP");
        c.spec.run_strategy = cvm_crds::cvm::RunStrategy::Halted;
        c.status.get_or_insert_with(Default::default).platform = Some(PlatformFacts {
            guest_state: Some(GuestState::Stopped),
            ..Default::default()
        });
        let halted = obs(
            &c,
            Placement::Bound("n1".into()),
            Verification::Awaiting("x".into()),
        );
        assert_eq!(halted.phase, CvmPhase::Stopped);
        let rd = cond(&halted, ConditionType::Ready);
        assert_eq!((rd.status.as_str(), rd.reason.as_str()), ("True", "Halted"));
        // Stopped although it should run: not Ready.
        c.spec.run_strategy = cvm_crds::cvm::RunStrategy::Always;
        let down = obs(
            &c,
            Placement::Bound("n1".into()),
            Verification::Awaiting("x".into()),
        );
        assert_eq!(cond(&down, ConditionType::Ready).status, "False");
    }

    #[test]
    fn the_launcher_pods_refusal_is_the_cvms_reason_in_the_schedulers_words() {
        use crate::launcher::PodReading;
        let c = cvm("SEV-SNP");
        let at = |launcher: PodReading| {
            derive(&Observed {
                cvm: &c,
                placement: Placement::Bound("n1".into()),
                node: Some(NodeHealth::Ready),
                verification: Verification::Awaiting("no evidence".into()),
                deleting: false,
                launcher: Some(launcher),
                now: t(10),
            })
        };
        let s = at(PodReading::Unschedulable(
            "0/3 nodes are available: 1 Insufficient sev-snp.amd.com/esids.".into(),
        ));
        let rd = cond(&s, ConditionType::Ready);
        assert_eq!(rd.reason, "LauncherUnschedulable");
        assert!(
            rd.message.contains("1 Insufficient sev-snp.amd.com/esids"),
            "{}",
            rd.message
        );
        let s = at(PodReading::Refused {
            reason: "OutOfmemory".into(),
            message: "Node didn't have enough resource: memory".into(),
        });
        let rd = cond(&s, ConditionType::Ready);
        assert_eq!(rd.reason, "OutOfmemory");
        assert!(
            rd.message.contains("enough resource: memory"),
            "{}",
            rd.message
        );
        let s = at(PodReading::Refused {
            reason: "something new".into(),
            message: "m".into(),
        });
        assert_eq!(cond(&s, ConditionType::Ready).reason, "LauncherRefused");
    }
}
