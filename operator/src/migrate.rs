//! Live migration, the operator's side (docs/migration.md): a pure decision from what the
//! reconciler observed (the migration, its CVM, other migrations of that CVM, the
//! scheduler's choice of target, the appraisal of the target's evidence, the clock) to
//! the share of the migration's status the operator owns. It writes nothing else: the
//! CVM's binding after the switch is its own reconciler's to write, from the `Switched`
//! condition recorded here. [`crate::migration_controller`] reads the inputs and writes
//! the result.
//!
//! Every failure message starts with its reason (`NoTarget: …`), so that `kubectl get`
//! and `kubectl cvm migrate` show why without reading conditions.

use std::time::Duration;

use crate::state::LiveMigratable;
use cvm_crds::conditions::{STATUS_FALSE, STATUS_TRUE};
use cvm_crds::cvm::AttestationResult;
use cvm_crds::migration::{CONDITION_SWITCHED, CONDITION_TARGET_PREPARED, CONDITION_TRANSFERRED};
use cvm_crds::MigrationReason;
use cvm_crds::{
    ConditionType, ConfidentialVM, ConfidentialVMMigration, ConfidentialVMMigrationStatus,
    CvmPhase, MigrationPhase,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use serde::Serialize;

use crate::schedule::{self, Decision, NodeInfo, Placed, Request};
use crate::state;

/// Reason of the `Switched` condition the operator sets.
pub const REASON_REBOUND: &str = "Rebound";

/// Status of a condition as the decision reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tri {
    True,
    False,
    Unknown,
}

/// A condition as the decision reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cond {
    pub status: Tri,
    pub reason: String,
    pub message: String,
}

impl Cond {
    pub fn of(c: &Condition) -> Cond {
        Cond {
            status: match c.status.as_str() {
                STATUS_TRUE => Tri::True,
                STATUS_FALSE => Tri::False,
                _ => Tri::Unknown,
            },
            reason: c.reason.clone(),
            message: c.message.clone(),
        }
    }

    fn find(list: &[Condition], type_: &str) -> Option<Cond> {
        list.iter().find(|c| c.type_ == type_).map(Cond::of)
    }

    /// "Unsupported: QEMU cannot…", or whichever part is set.
    fn text(&self) -> String {
        match (self.reason.is_empty(), self.message.is_empty()) {
            (false, false) => format!("{}: {}", self.reason, self.message),
            (false, true) => self.reason.clone(),
            (true, false) => self.message.clone(),
            (true, true) => "no reason given".into(),
        }
    }
}

/// The migration as the decision reads it.
#[derive(Debug, Clone)]
pub struct MigrationView<'a> {
    pub name: &'a str,
    /// `metadata.uid`: what the CVM's evidence after the switch must be bound to.
    pub uid: &'a str,
    pub cvm_name: &'a str,
    pub generation: Option<i64>,
    pub created: Timestamp,
    /// `spec.targetNode`.
    pub requested_target: Option<&'a str>,
    pub status: &'a ConfidentialVMMigrationStatus,
}

impl MigrationView<'_> {
    fn phase(&self) -> MigrationPhase {
        self.status.phase.unwrap_or_default()
    }
}

/// The CVM as the decision reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct CvmView {
    pub deleting: bool,
    pub phase: CvmPhase,
    pub node: Option<String>,
    pub verified: Option<Cond>,
    /// `(reason, message)`, from [`state::live_migratable`].
    pub live_migratable: (LiveMigratable, String),
    /// The live migration (UID) the appraised evidence was bound to
    /// (`status.attestation.migration`): only evidence bound to a migration tells about
    /// the guest after that migration's switch.
    pub verdict_migration: Option<String>,
    /// The `cvmp.io/migration` annotation: the migration that last moved the CVM, as its
    /// reconciler recorded the binding.
    pub migration: Option<String>,
}

impl CvmView {
    pub fn of(cvm: &ConfidentialVM) -> CvmView {
        let status = cvm.status.as_ref();
        CvmView {
            deleting: cvm.metadata.deletion_timestamp.is_some(),
            phase: cvm.phase(),
            node: cvm.node_name().map(str::to_string),
            verified: cvm.condition(ConditionType::Verified).map(Cond::of),
            live_migratable: {
                let (_, why, text) = state::live_migratable(cvm);
                (why, text)
            },
            verdict_migration: status
                .and_then(|s| s.attestation.as_ref())
                .and_then(|a| a.migration.clone()),
            migration: cvm.migration_epoch().map(str::to_string),
        }
    }
}

/// Another migration of the same CVM that has not ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtherMigration {
    pub name: String,
    pub created: Timestamp,
    /// The operator already accepted it (it has a target).
    pub accepted: bool,
}

/// The scheduler's answer for a target node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Node(String),
    /// Why no node can take the guest.
    None(String),
}

/// The appraisal of `targetEvidence` under the CVM's policy.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetAppraisal {
    Result(Box<AttestationResult>),
    /// The policy cannot be used (e.g. `PolicyNotFound`): nothing was appraised.
    PolicyProblem {
        reason: MigrationReason,
        message: String,
    },
}

/// Everything one decision reads.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    pub migration: MigrationView<'a>,
    /// `None`: the CVM does not exist.
    pub cvm: Option<&'a CvmView>,
    /// Other migrations of the same CVM that have not ended.
    pub others: &'a [OtherMigration],
    /// The target the scheduler picked; computed when [`needs_target`] says so.
    pub target: Option<Target>,
    /// The appraisal of the target's evidence; computed when [`needs_appraisal`] says so.
    pub appraisal: Option<TargetAppraisal>,
    /// `--migration-timeout`.
    pub timeout: Duration,
    pub now: Timestamp,
}

/// The fields of a migration's status the operator owns (field manager `cvm-operator`).
/// Server-side apply writes exactly these, so the plugins' `targetEvidence`,
/// `TargetPrepared` and `Transferred` are never touched.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OperatorStatus {
    pub phase: MigrationPhase,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<MigrationReason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Time>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_attestation: Option<AttestationResult>,
    /// Only `Switched`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

impl OperatorStatus {
    /// The operator's share of a recorded status.
    pub fn recorded(st: &ConfidentialVMMigrationStatus) -> OperatorStatus {
        OperatorStatus {
            phase: st.phase.unwrap_or_default(),
            source_node: st.source_node.clone(),
            target_node: st.target_node.clone(),
            message: st.message.clone(),
            reason: st.reason,
            started_at: st.started_at.clone(),
            completed_at: st.completed_at.clone(),
            target_attestation: st.target_attestation.clone(),
            conditions: st
                .conditions
                .iter()
                .filter(|c| c.type_ == CONDITION_SWITCHED)
                .cloned()
                .collect(),
        }
    }

    /// When the CVM was switched to the target, if it was.
    pub fn switched_at(&self) -> Option<Timestamp> {
        self.conditions
            .iter()
            .find(|c| c.type_ == CONDITION_SWITCHED && c.status == STATUS_TRUE)
            .map(|c| c.last_transition_time.0)
    }
}

/// The decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub status: OperatorStatus,
}

/// Whether the caller should schedule a target for this pass.
pub fn needs_target(m: &MigrationView<'_>) -> bool {
    !m.phase().is_terminal() && m.status.target_node.is_none()
}

/// Whether the caller should appraise `targetEvidence` for this pass: the target is
/// prepared, the transfer has not begun, and the evidence was not appraised yet.
pub fn needs_appraisal(m: &MigrationView<'_>) -> bool {
    let st = m.status;
    let Some(evidence) = st.target_evidence.as_ref() else {
        return false;
    };
    let prepared = Cond::find(&st.conditions, CONDITION_TARGET_PREPARED)
        .is_some_and(|c| c.status == Tri::True);
    let appraised = st
        .target_attestation
        .as_ref()
        .is_some_and(|a| a.evidence_collected_at.as_ref() == Some(&evidence.collected_at));
    matches!(
        m.phase(),
        MigrationPhase::TargetReady | MigrationPhase::TargetAttested
    ) && prepared
        && !appraised
        && Cond::find(&st.conditions, CONDITION_TRANSFERRED).is_none()
}

/// Picks the target: `requested` (`spec.targetNode`) if it can take the guest, else
/// the node the scheduler would pick among all but `source`.
pub fn choose_target(
    requested: Option<&str>,
    source: &str,
    req: &Request,
    nodes: &[NodeInfo],
    placed: &[Placed],
) -> Target {
    match requested {
        Some(n) if n == source => Target::None(format!(
            "node {n} is where the guest already runs: name another node in spec.targetNode, or leave it out to let the operator choose"
        )),
        Some(n) => match nodes.iter().find(|x| x.name == n) {
            None => Target::None(format!(
                "node {n} does not exist: fix spec.targetNode, or leave it out to let the operator choose"
            )),
            Some(node) => match schedule::schedule(req, std::slice::from_ref(node), placed) {
                Decision::Bind(t) => Target::Node(t),
                Decision::Unschedulable(u) => {
                    Target::None(format!("node {n} cannot take the guest: {u}"))
                }
            },
        },
        None => {
            let candidates: Vec<NodeInfo> =
                nodes.iter().filter(|x| x.name != source).cloned().collect();
            match schedule::schedule(req, &candidates, placed) {
                Decision::Bind(t) => Target::Node(t),
                Decision::Unschedulable(u) => Target::None(format!(
                    "no node besides {source}, where the guest runs, can take it: {u}"
                )),
            }
        }
    }
}

/// The capacity a migration in progress holds on its target, from the moment the target
/// is recorded until the migration ends, so that nothing else takes the slot the guest
/// moves into. `None` once the CVM is bound there (then the CVM itself counts).
pub fn target_hold(m: &ConfidentialVMMigration, cvm: Option<&ConfidentialVM>) -> Option<Placed> {
    let st = m.status.as_ref()?;
    if st.phase.is_some_and(MigrationPhase::is_terminal) {
        return None;
    }
    let target = st.target_node.as_ref()?;
    let cvm = cvm?;
    if cvm.node_name() == Some(target.as_str()) {
        return None;
    }
    Some(Placed::of(cvm, target))
}

/// A CVM's binding after the switch of one of its migrations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Switch {
    /// The migration's target: the CVM's node from the switch on.
    pub node: String,
    /// The migration's UID (annotation `cvmp.io/migration`, the binding's epoch).
    pub migration: String,
    /// When the operator recorded the switch (annotation `cvmp.io/migrated-at`).
    pub at: Timestamp,
}

/// The binding a switched migration gives `cvm`: the one migration of it in progress
/// whose `Switched` condition is True, while the CVM is on its source or target. Pure; the
/// CVM's reconciler, the only writer of a CVM's binding, applies it. A finished migration
/// drives nothing: by then the CVM shows its binding.
pub fn switched_binding(
    cvm: &ConfidentialVM,
    migrations: &[std::sync::Arc<ConfidentialVMMigration>],
) -> Option<Switch> {
    let (ns, name) = (
        cvm.metadata.namespace.as_deref(),
        cvm.metadata.name.as_deref(),
    );
    migrations
        .iter()
        .filter(|m| m.metadata.namespace.as_deref() == ns && Some(m.spec.cvm_name.as_str()) == name)
        .filter_map(|m| {
            let st = m.status.as_ref()?;
            if st.phase.unwrap_or_default().is_terminal() {
                return None;
            }
            let at = OperatorStatus::recorded(st).switched_at()?;
            let (source, target) = (st.source_node.as_deref()?, st.target_node.as_deref()?);
            let on = cvm.node_name();
            (on == Some(source) || on == Some(target)).then(|| Switch {
                node: target.to_string(),
                migration: m.metadata.uid.clone().unwrap_or_default(),
                at,
            })
        })
        .find(|s| !s.migration.is_empty())
}

/// The annotation value for a switch at `t`: RFC 3339 in whole seconds, as status times
/// are written.
pub fn format_migrated_at(t: Timestamp) -> String {
    whole_seconds(t).to_string()
}

fn whole_seconds(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

/// Go-style duration for messages: `5m`, `1m30s`, `250ms`.
pub fn human(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return format!("{}ms", d.as_millis());
    }
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 {
        out.push_str(&format!("{s}s"));
    }
    out
}

fn outcome(status: OperatorStatus) -> Outcome {
    Outcome { status }
}

fn fail(mut st: OperatorStatus, now: &Time, reason: MigrationReason, detail: String) -> Outcome {
    st.phase = MigrationPhase::Failed;
    st.reason = Some(reason);
    st.message = Some(format!("{reason}: {detail}"));
    st.completed_at = Some(now.clone());
    outcome(st)
}

fn progress(mut st: OperatorStatus, phase: MigrationPhase, message: String) -> Outcome {
    st.phase = phase;
    st.message = Some(message);
    outcome(st)
}

/// Decides the operator's status of a migration. Terminal migrations are left as they are.
pub fn decide(i: &Input<'_>) -> Outcome {
    let m = &i.migration;
    let mut st = OperatorStatus::recorded(m.status);
    if st.phase.is_terminal() {
        return outcome(st);
    }
    let now = Time(whole_seconds(i.now));
    let name = m.cvm_name;
    let Some(cvm) = i.cvm else {
        let detail = if st.switched_at().is_some() {
            format!("ConfidentialVM {name} was deleted after it was switched to the target")
        } else {
            format!("ConfidentialVM {name} does not exist in this namespace: check spec.cvmName")
        };
        return fail(st, &now, MigrationReason::CvmNotFound, detail);
    };
    if cvm.deleting {
        return fail(
            st,
            &now,
            MigrationReason::CvmDeleting,
            format!("ConfidentialVM {name} is being deleted"),
        );
    }
    let (source, target) = match (st.source_node.clone(), st.target_node.clone()) {
        (Some(s), Some(t)) => (s, t),
        _ => return accept(i, st, cvm, &now),
    };
    if let Some(at) = st.switched_at() {
        return after_switch(i, st, cvm, &target, at, &now);
    }

    let conds = &m.status.conditions;
    let prepared = Cond::find(conds, CONDITION_TARGET_PREPARED);
    let transferred = Cond::find(conds, CONDITION_TRANSFERRED);
    if let Some(c) = prepared.as_ref().filter(|c| c.status == Tri::False) {
        return fail(
            st,
            &now,
            MigrationReason::TargetNotPrepared,
            format!(
                "target node {target} could not prepare a receiving guest: {}; the guest keeps running on {source}",
                c.text()
            ),
        );
    }
    if let Some(c) = transferred.as_ref() {
        if c.status == Tri::False {
            return fail(
                st,
                &now,
                MigrationReason::TransferFailed,
                format!(
                    "transfer failed; the guest keeps running on {source}: {}",
                    c.text()
                ),
            );
        }
        if !matches!(
            st.phase,
            MigrationPhase::TargetAttested | MigrationPhase::Transferring
        ) {
            // The guest must never be sent to a host the operator did not attest: the
            // CVM stays bound to the source, whatever the plugin did.
            let phase = st.phase;
            return fail(
                st,
                &now,
                MigrationReason::TransferBeforeAttestation,
                format!(
                    "node {source} reported Transferred={} while the migration was {}, before the target was attested; ConfidentialVM {name} stays bound to {source}",
                    match c.status {
                        Tri::True => "True",
                        _ => "Unknown",
                    },
                    phase
                ),
            );
        }
        if c.status == Tri::True {
            return switch(i, st, cvm, &source, &target, &now);
        }
        st.started_at.get_or_insert_with(|| now.clone());
        st.phase = MigrationPhase::Transferring;
        st.message = Some(format!("node {source} is sending the guest to {target}"));
        return timeout_before_switch(i, st, &now, &source, || {
            format!("node {source} did not finish sending the guest to {target} (Transferred is still Unknown)")
        });
    }

    let has_evidence = m.status.target_evidence.is_some();
    let prepared_true = prepared.as_ref().is_some_and(|c| c.status == Tri::True);
    match st.phase {
        MigrationPhase::Pending if prepared_true && has_evidence => {
            st = progress(
                st,
                MigrationPhase::TargetReady,
                format!("node {target} prepared a receiving guest; appraising its evidence"),
            )
            .status;
        }
        MigrationPhase::TargetReady | MigrationPhase::TargetAttested => match i.appraisal.clone() {
            Some(TargetAppraisal::PolicyProblem { reason, message }) => {
                let detail = format!(
                    "{message}; target node {target} could not be appraised and the guest keeps running on {source}"
                );
                return fail(st, &now, reason, detail);
            }
            Some(TargetAppraisal::Result(r)) => {
                let (ok, _, text) = state::verdict_text(&r);
                let policy = r
                    .policy
                    .clone()
                    .unwrap_or_else(|| "(built-in defaults)".into());
                st.target_attestation = Some(*r);
                if !ok {
                    let detail = format!(
                        "target node {target} failed attestation: {text}; the guest keeps running on {source}"
                    );
                    return fail(st, &now, MigrationReason::TargetAttestationFailed, detail);
                }
                let message = format!(
                    "node {target} passed attestation under policy {policy}; waiting for node {source} to send the guest"
                );
                st = progress(st, MigrationPhase::TargetAttested, message).status;
            }
            None => {}
        },
        _ => {}
    }
    let waited_for = match st.phase {
        MigrationPhase::Pending => match prepared {
            None => format!("node {target} did not prepare a receiving guest (no TargetPrepared condition)"),
            Some(c) if c.status == Tri::Unknown => format!(
                "node {target} did not finish preparing a receiving guest (TargetPrepared is Unknown: {})",
                c.text()
            ),
            Some(_) => format!("node {target} reported TargetPrepared but no targetEvidence"),
        },
        MigrationPhase::TargetReady => format!(
            "the operator did not appraise the evidence of node {target} (see the operator's log)"
        ),
        _ => format!("node {source} did not start sending the guest (no Transferred condition)"),
    };
    timeout_before_switch(i, st, &now, &source, || waited_for)
}

/// The checks before the operator accepts a request, then the choice of target.
fn accept(i: &Input<'_>, st: OperatorStatus, cvm: &CvmView, now: &Time) -> Outcome {
    let name = i.migration.cvm_name;
    let (why, detail) = &cvm.live_migratable;
    if let Some(refusal) = why.refusal() {
        let hint = match refusal {
            MigrationReason::SevNotLiveMigratable => {
                "; use SEV-SNP or TDX for a guest that must move"
            }
            MigrationReason::PolicyForbidsMigration => {
                "; the guest policy is fixed at launch: recreate the ConfidentialVM with spec.tee.policy.migratable: true to allow it"
            }
            _ => "",
        };
        return fail(
            st,
            now,
            refusal,
            format!("ConfidentialVM {name} cannot be live-migrated: {detail}{hint}"),
        );
    }
    let source = match (&cvm.node, cvm.phase) {
        (Some(n), CvmPhase::Verified) => n.clone(),
        (node, phase) => {
            let on = node
                .as_ref()
                .map(|n| format!(" on node {n}"))
                .unwrap_or_default();
            let verified = cvm
                .verified
                .as_ref()
                .map(|c| format!(" (Verified: {})", c.text()))
                .unwrap_or_default();
            return fail(
                st,
                now,
                MigrationReason::CvmNotVerified,
                format!("ConfidentialVM {name} is {phase}{on}, not Verified{verified}: only a running guest whose evidence is verified can move; retry once it is"),
            );
        }
    };
    let me = (i.migration.created, i.migration.name);
    if let Some(o) = i
        .others
        .iter()
        .filter(|o| o.accepted || (o.created, o.name.as_str()) < me)
        .min_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)))
    {
        return fail(
            st,
            now,
            MigrationReason::MigrationInProgress,
            format!("migration {} of ConfidentialVM {name} is already in progress: wait for it to end, or delete it, then try again", o.name),
        );
    }
    match &i.target {
        // The caller did not schedule (it could not read the nodes): try again.
        None => progress(st, MigrationPhase::Pending, "choosing a target node".into()),
        Some(Target::None(why)) => fail(st, now, MigrationReason::NoTarget, why.clone()),
        Some(Target::Node(t)) => {
            let mut st = st;
            st.source_node = Some(source.clone());
            st.target_node = Some(t.clone());
            progress(
                st,
                MigrationPhase::Pending,
                format!("moving from {source} to {t}; waiting for node {t} to prepare a receiving guest"),
            )
        }
    }
}

/// `Transferred=True`: record `Switched`. The CVM's own reconciler then binds it to the
/// target (the one writer of a CVM's binding), reading this migration's switch.
fn switch(
    i: &Input<'_>,
    mut st: OperatorStatus,
    cvm: &CvmView,
    source: &str,
    target: &str,
    now: &Time,
) -> Outcome {
    let name = i.migration.cvm_name;
    let node = cvm.node.as_deref();
    if node != Some(source) && node != Some(target) {
        return fail(
            st,
            now,
            MigrationReason::CvmMoved,
            format!(
                "ConfidentialVM {name} is bound to {}, not to the migration's source {source}: not switching it",
                node.unwrap_or("no node")
            ),
        );
    }
    st.conditions = vec![Condition {
        type_: CONDITION_SWITCHED.into(),
        status: STATUS_TRUE.into(),
        reason: REASON_REBOUND.into(),
        message: format!("ConfidentialVM {name} switched from {source} to {target}"),
        observed_generation: i.migration.generation,
        last_transition_time: now.clone(),
    }];
    st.started_at.get_or_insert(now.clone());
    st.phase = MigrationPhase::Transferring;
    st.message = Some(awaiting_target_evidence(target));
    Outcome { status: st }
}

/// The message from the switch until the verdict (one text: no status write in between).
fn awaiting_target_evidence(target: &str) -> String {
    format!("transfer complete; switched to {target}; waiting for the guest's evidence from {target} to be verified")
}

/// After the switch: Succeeded once the CVM is Verified on the target with evidence bound
/// to this migration; Failed if that evidence is rejected.
fn after_switch(
    i: &Input<'_>,
    st: OperatorStatus,
    cvm: &CvmView,
    target: &str,
    at: Timestamp,
    now: &Time,
) -> Outcome {
    let name = i.migration.cvm_name;
    // The CVM's reconciler binds it to the target from the switch on; until the CVM shows
    // that, wait (no timeout: the guest now lives on the target only).
    let bound =
        cvm.node.as_deref() == Some(target) && cvm.migration.as_deref() == Some(i.migration.uid);
    if !bound {
        return progress(
            st,
            MigrationPhase::Transferring,
            awaiting_target_evidence(target),
        );
    }
    // Only a verdict on evidence bound to this migration speaks of the moved guest: its
    // report data binds the migration's UID, which no evidence from before the switch can
    // (and the operator checked it came from the target's pinned chip, from the instance
    // that was moved). No clock is compared.
    let fresh = cvm.verdict_migration.as_deref() == Some(i.migration.uid);
    match cvm.verified.as_ref() {
        Some(v) if fresh && v.status == Tri::True => {
            let mut st = st;
            st.completed_at = Some(now.clone());
            progress(
                st,
                MigrationPhase::Succeeded,
                format!("ConfidentialVM {name} runs on {target}, verified with evidence from there bound to this migration"),
            )
        }
        Some(v) if fresh && v.status == Tri::False => fail(
            st,
            now,
            MigrationReason::TargetVerificationFailed,
            format!(
                "the guest now runs on {target} (it was switched at {at}), but its evidence there failed verification: {}; see the ConfidentialVM's Verified condition",
                v.text()
            ),
        ),
        v => {
            let elapsed = now.0.as_second() - at.as_second();
            if elapsed > i.timeout.as_secs() as i64 {
                let last = v
                    .map(|c| format!(": Verified is {}", c.text()))
                    .unwrap_or_default();
                return fail(
                    st,
                    now,
                    MigrationReason::Timeout,
                    format!(
                        "the guest was switched to {target} at {at} but was not verified there within {}{last}",
                        human(i.timeout)
                    ),
                );
            }
            progress(
                st,
                MigrationPhase::Transferring,
                awaiting_target_evidence(target),
            )
        }
    }
}

/// Fails the migration when it has not switched within the timeout of its creation.
fn timeout_before_switch(
    i: &Input<'_>,
    st: OperatorStatus,
    now: &Time,
    source: &str,
    waited_for: impl FnOnce() -> String,
) -> Outcome {
    let age = now.0.as_second() - i.migration.created.as_second();
    if age > i.timeout.as_secs() as i64 {
        return fail(
            st,
            now,
            MigrationReason::Timeout,
            format!(
                "{} within {} of the migration's creation; the guest keeps running on {source}",
                waited_for(),
                human(i.timeout)
            ),
        );
    }
    outcome(st)
}

/// An event to publish on the migration for one transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    pub reason: String,
    pub message: String,
}

/// The events a change from `old` to `new` deserves, in order.
pub fn notes(old: &OperatorStatus, new: &OperatorStatus) -> Vec<Note> {
    let msg = new.message.clone().unwrap_or_default();
    let normal = |reason: &str| Note {
        warning: false,
        reason: reason.into(),
        message: msg.clone(),
    };
    let mut out = Vec::new();
    if old.target_node.is_none() && new.target_node.is_some() {
        out.push(normal("TargetChosen"));
    }
    if new.phase != old.phase {
        match new.phase {
            MigrationPhase::TargetReady => out.push(normal("TargetPrepared")),
            MigrationPhase::TargetAttested => out.push(normal("TargetAttested")),
            MigrationPhase::Transferring if new.switched_at().is_none() => {
                out.push(normal("Transferring"))
            }
            _ => {}
        }
    }
    if old.switched_at().is_none() && new.switched_at().is_some() {
        out.push(normal("Switched"));
    }
    if new.phase != old.phase {
        match new.phase {
            MigrationPhase::Succeeded => out.push(normal("Succeeded")),
            MigrationPhase::Failed => out.push(Note {
                warning: true,
                reason: new
                    .reason
                    .map_or("MigrationFailed", MigrationReason::as_str)
                    .to_string(),
                message: msg.clone(),
            }),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use cvm_crds::cvm::{EarStatus, Evidence, Finding, FindingSeverity, TrustworthinessVector};
    use cvm_crds::{EvidenceFormat, TeeType};
    use std::collections::BTreeMap;

    const MIN: Duration = Duration::from_secs(300);

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn cond(type_: &str, status: &str, reason: &str, message: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: None,
            last_transition_time: Time(ts(1000)),
        }
    }

    fn verified_cvm() -> CvmView {
        CvmView {
            deleting: false,
            phase: CvmPhase::Verified,
            node: Some("n1".into()),
            verified: Some(Cond {
                status: Tri::True,
                reason: "Affirming".into(),
                message: "evidence verified against the policy".into(),
            }),
            live_migratable: (LiveMigratable::Allowed, "allowed".into()),
            verdict_migration: None,
            migration: None,
        }
    }

    fn evidence(at: i64) -> Evidence {
        Evidence {
            format: EvidenceFormat::SevSnpReport,
            report: "AAAA".into(),
            cert_chain: None,
            collateral: BTreeMap::new(),
            nonce: None,
            collected_at: Time(ts(at)),
            launch_measurement: None,
            instance_key: None,
            epoch: None,
        }
    }

    fn result(status: EarStatus, findings: Vec<Finding>, collected: i64) -> AttestationResult {
        AttestationResult {
            status,
            trustworthiness_vector: TrustworthinessVector::default(),
            policy: Some("p".into()),
            findings,
            verified_at: Time(ts(1010)),
            verifier: "cvm-operator".into(),
            evidence_collected_at: Some(Time(ts(collected))),
            nonce: None,
            evidence_sha256: None,
            evidence_seen_at: None,
            migration: None,
        }
    }

    /// An accepted migration n1 → n2, created at 1000.
    fn accepted(phase: MigrationPhase) -> ConfidentialVMMigrationStatus {
        ConfidentialVMMigrationStatus {
            phase: Some(phase),
            source_node: Some("n1".into()),
            target_node: Some("n2".into()),
            ..Default::default()
        }
    }

    struct Case {
        status: ConfidentialVMMigrationStatus,
        cvm: Option<CvmView>,
        others: Vec<OtherMigration>,
        target: Option<Target>,
        appraisal: Option<TargetAppraisal>,
        requested: Option<&'static str>,
        now: i64,
    }

    impl Case {
        fn new(status: ConfidentialVMMigrationStatus) -> Case {
            Case {
                status,
                cvm: Some(verified_cvm()),
                others: vec![],
                target: None,
                appraisal: None,
                requested: None,
                now: 1010,
            }
        }

        fn view(&self) -> MigrationView<'_> {
            MigrationView {
                name: "move-1",
                uid: "mig-uid-1",
                cvm_name: "web",
                generation: Some(1),
                created: ts(1000),
                requested_target: self.requested,
                status: &self.status,
            }
        }

        fn run(&self) -> Outcome {
            decide(&Input {
                migration: self.view(),
                cvm: self.cvm.as_ref(),
                others: &self.others,
                target: self.target.clone(),
                appraisal: self.appraisal.clone(),
                timeout: MIN,
                now: ts(self.now),
            })
        }
    }

    fn message(o: &Outcome) -> &str {
        o.status.message.as_deref().unwrap_or_default()
    }

    fn assert_failed(o: &Outcome, reason: &str) {
        assert_eq!(o.status.phase, MigrationPhase::Failed, "{}", message(o));
        assert_eq!(
            o.status.reason.map(MigrationReason::as_str),
            Some(reason),
            "the typed reason"
        );
        assert!(
            message(o).starts_with(&format!("{reason}: ")),
            "expected {reason}: {}",
            message(o)
        );
        assert!(
            o.status.completed_at.is_some(),
            "a failed migration records its end"
        );
    }

    #[test]
    fn a_valid_request_records_source_and_target() {
        let mut c = Case::new(Default::default());
        c.target = Some(Target::Node("n2".into()));
        let o = c.run();
        assert_eq!(o.status.phase, MigrationPhase::Pending);
        assert_eq!(o.status.source_node.as_deref(), Some("n1"));
        assert_eq!(o.status.target_node.as_deref(), Some("n2"));
        assert!(
            message(&o).contains("waiting for node n2"),
            "{}",
            message(&o)
        );
        assert_eq!(o.status.completed_at, None);
    }

    #[test]
    fn a_missing_or_deleting_cvm_is_refused() {
        let mut c = Case::new(Default::default());
        c.cvm = None;
        let o = c.run();
        assert_failed(&o, "CVMNotFound");
        assert!(message(&o).contains("web") && message(&o).contains("spec.cvmName"));

        let mut c = Case::new(accepted(MigrationPhase::TargetReady));
        let mut cvm = verified_cvm();
        cvm.deleting = true;
        c.cvm = Some(cvm);
        assert_failed(&c.run(), "CVMDeleting");
    }

    #[test]
    fn a_guest_that_may_not_move_is_refused_with_the_cvms_reason() {
        let mut c = Case::new(Default::default());
        c.target = Some(Target::Node("n2".into()));
        let mut cvm = verified_cvm();
        cvm.live_migratable = (
            LiveMigratable::SevNotLiveMigratable,
            "SEV and SEV-ES guests cannot be live-migrated (no migration agent)".into(),
        );
        c.cvm = Some(cvm.clone());
        let o = c.run();
        assert_failed(&o, "SEVNotLiveMigratable");
        assert!(message(&o).contains("SEV-SNP or TDX"), "{}", message(&o));

        cvm.live_migratable = (
            LiveMigratable::PolicyForbidsMigration,
            "spec.tee.policy.migratable is false".into(),
        );
        c.cvm = Some(cvm);
        let o = c.run();
        assert_failed(&o, "PolicyForbidsMigration");
        assert!(message(&o).contains("spec.tee.policy.migratable is false"));
        assert_eq!(o.status.target_node, None, "a refusal holds no target");
    }

    #[test]
    fn an_unverified_guest_is_refused_with_its_verified_condition() {
        let mut c = Case::new(Default::default());
        c.target = Some(Target::Node("n2".into()));
        let mut cvm = verified_cvm();
        cvm.phase = CvmPhase::Running;
        cvm.verified = Some(Cond {
            status: Tri::False,
            reason: "EvidenceRejected".into(),
            message: "measurement mismatch".into(),
        });
        c.cvm = Some(cvm.clone());
        let o = c.run();
        assert_failed(&o, "CVMNotVerified");
        assert!(
            message(&o).contains("is Running on node n1")
                && message(&o).contains("EvidenceRejected: measurement mismatch"),
            "{}",
            message(&o)
        );
        cvm.phase = CvmPhase::Pending;
        cvm.node = None;
        cvm.verified = None;
        c.cvm = Some(cvm);
        let o = c.run();
        assert_failed(&o, "CVMNotVerified");
        assert!(
            message(&o).contains("is Pending, not Verified"),
            "{}",
            message(&o)
        );
    }

    #[test]
    fn the_younger_of_two_migrations_is_refused() {
        let mut c = Case::new(Default::default());
        c.target = Some(Target::Node("n2".into()));
        c.others = vec![OtherMigration {
            name: "move-0".into(),
            created: ts(999),
            accepted: false,
        }];
        let o = c.run();
        assert_failed(&o, "MigrationInProgress");
        assert!(message(&o).contains("move-0"));

        // Same second: the name breaks the tie, so exactly one of the two proceeds.
        c.others[0].created = ts(1000);
        c.others[0].name = "move-2".into();
        assert_eq!(c.run().status.phase, MigrationPhase::Pending);
        // …unless the other one was accepted already.
        c.others[0].accepted = true;
        assert_failed(&c.run(), "MigrationInProgress");
    }

    #[test]
    fn no_target_is_refused_with_the_schedulers_reasons() {
        let mut c = Case::new(Default::default());
        c.target = Some(Target::None(
            "no node besides n1, where the guest runs, can take it: 0/1 nodes are available: 1 lack SEV-SNP".into(),
        ));
        let o = c.run();
        assert_failed(&o, "NoTarget");
        assert!(message(&o).contains("1 lack SEV-SNP"));
        // Without a scheduling answer nothing is decided yet.
        c.target = None;
        let o = c.run();
        assert_eq!(o.status.phase, MigrationPhase::Pending);
        assert_eq!(o.status.target_node, None);
    }

    #[test]
    fn refusal_checks_run_in_the_documented_order() {
        // Not migratable and not verified and another in progress: the TEE/policy wins.
        let mut c = Case::new(Default::default());
        let mut cvm = verified_cvm();
        cvm.live_migratable = (LiveMigratable::PolicyForbidsMigration, "no".into());
        cvm.phase = CvmPhase::Running;
        c.cvm = Some(cvm);
        c.others = vec![OtherMigration {
            name: "old".into(),
            created: ts(1),
            accepted: true,
        }];
        assert_failed(&c.run(), "PolicyForbidsMigration");
    }

    #[test]
    fn prepared_target_moves_to_target_ready_then_attested() {
        let mut st = accepted(MigrationPhase::Pending);
        st.conditions = vec![cond(CONDITION_TARGET_PREPARED, "True", "Prepared", "")];
        // Prepared without evidence yet: keep waiting.
        let o = Case::new(st.clone()).run();
        assert_eq!(o.status.phase, MigrationPhase::Pending);
        st.target_evidence = Some(evidence(1005));
        let view_st = st.clone();
        let c = Case::new(view_st);
        assert!(
            !needs_appraisal(&c.view()),
            "appraise once TargetReady is recorded"
        );
        let o = c.run();
        assert_eq!(o.status.phase, MigrationPhase::TargetReady);

        st.phase = Some(MigrationPhase::TargetReady);
        let mut c = Case::new(st);
        assert!(needs_appraisal(&c.view()));
        c.appraisal = Some(TargetAppraisal::Result(Box::new(result(
            EarStatus::Affirming,
            vec![],
            1005,
        ))));
        let o = c.run();
        assert_eq!(o.status.phase, MigrationPhase::TargetAttested);
        assert_eq!(
            o.status.target_attestation.as_ref().map(|a| a.status),
            Some(EarStatus::Affirming)
        );
        assert!(
            message(&o).contains("waiting for node n1 to send"),
            "{}",
            message(&o)
        );
    }

    #[test]
    fn an_appraised_target_is_not_appraised_again() {
        let mut st = accepted(MigrationPhase::TargetAttested);
        st.conditions = vec![cond(CONDITION_TARGET_PREPARED, "True", "Prepared", "")];
        st.target_evidence = Some(evidence(1005));
        st.target_attestation = Some(result(EarStatus::Affirming, vec![], 1005));
        let c = Case::new(st.clone());
        assert!(!needs_appraisal(&c.view()));
        // New evidence before the transfer: appraise it.
        st.target_evidence = Some(evidence(1007));
        assert!(needs_appraisal(&Case::new(st.clone()).view()));
        // Once the transfer started, never.
        st.conditions
            .push(cond(CONDITION_TRANSFERRED, "Unknown", "Sending", ""));
        assert!(!needs_appraisal(&Case::new(st).view()));
    }

    #[test]
    fn a_target_that_fails_attestation_fails_the_migration_naming_findings() {
        let mut st = accepted(MigrationPhase::TargetReady);
        st.conditions = vec![cond(CONDITION_TARGET_PREPARED, "True", "Prepared", "")];
        st.target_evidence = Some(evidence(1005));
        let mut c = Case::new(st);
        let finding = Finding {
            check: "tcb-bootloader-below-minimum".into(),
            claim: None,
            severity: Some(FindingSeverity::Contraindicated),
            expected: Some(">= 3".into()),
            reported: Some("1".into()),
            message: "reported TCB bootloader SPL 1 is below the minimum 3".into(),
        };
        c.appraisal = Some(TargetAppraisal::Result(Box::new(result(
            EarStatus::Contraindicated,
            vec![finding],
            1005,
        ))));
        let o = c.run();
        assert_failed(&o, "TargetAttestationFailed");
        assert_eq!(
            message(&o),
            "TargetAttestationFailed: target node n2 failed attestation: reported TCB bootloader SPL 1 is below the minimum 3; the guest keeps running on n1"
        );
        // The appraisal is kept as the record of why.
        assert_eq!(
            o.status.target_attestation.map(|a| a.status),
            Some(EarStatus::Contraindicated)
        );
    }

    #[test]
    fn a_missing_policy_fails_like_the_cvm_path() {
        let mut st = accepted(MigrationPhase::TargetReady);
        st.conditions = vec![cond(CONDITION_TARGET_PREPARED, "True", "Prepared", "")];
        st.target_evidence = Some(evidence(1005));
        let mut c = Case::new(st);
        c.appraisal = Some(TargetAppraisal::PolicyProblem {
            reason: MigrationReason::PolicyNotFound,
            message:
                "AttestationPolicy p does not exist: create it or fix spec.attestation.policyRef"
                    .into(),
        });
        let o = c.run();
        assert_failed(&o, "PolicyNotFound");
        assert!(message(&o).contains("AttestationPolicy p does not exist"));
        assert!(message(&o).contains("keeps running on n1"));
    }

    #[test]
    fn target_not_prepared_fails_with_the_plugins_message() {
        let mut st = accepted(MigrationPhase::Pending);
        st.conditions = vec![cond(
            CONDITION_TARGET_PREPARED,
            "False",
            "Unsupported",
            "the QEMU backend cannot receive a migrating guest yet",
        )];
        let o = Case::new(st).run();
        assert_failed(&o, "TargetNotPrepared");
        assert!(
            message(&o).contains("n2")
                && message(&o)
                    .contains("Unsupported: the QEMU backend cannot receive a migrating guest yet"),
            "{}",
            message(&o)
        );
    }

    #[test]
    fn transfer_in_progress_sets_started_at_once() {
        let mut st = accepted(MigrationPhase::TargetAttested);
        st.conditions = vec![
            cond(CONDITION_TARGET_PREPARED, "True", "Prepared", ""),
            cond(CONDITION_TRANSFERRED, "Unknown", "Sending", ""),
        ];
        let o = Case::new(st.clone()).run();
        assert_eq!(o.status.phase, MigrationPhase::Transferring);
        assert_eq!(o.status.started_at, Some(Time(ts(1010))));
        st.phase = Some(MigrationPhase::Transferring);
        st.started_at = Some(Time(ts(1008)));
        let mut c = Case::new(st);
        c.now = 1020;
        assert_eq!(c.run().status.started_at, Some(Time(ts(1008))));
    }

    #[test]
    fn a_failed_transfer_leaves_the_guest_on_the_source() {
        let mut st = accepted(MigrationPhase::Transferring);
        st.conditions = vec![cond(
            CONDITION_TRANSFERRED,
            "False",
            "SendFailed",
            "connection reset",
        )];
        let o = Case::new(st).run();
        assert_failed(&o, "TransferFailed");
        assert_eq!(
            message(&o),
            "TransferFailed: transfer failed; the guest keeps running on n1: SendFailed: connection reset"
        );
    }

    #[test]
    fn a_transfer_before_attestation_is_never_switched() {
        let mut st = accepted(MigrationPhase::TargetReady);
        st.conditions = vec![cond(CONDITION_TRANSFERRED, "True", "Sent", "")];
        let o = Case::new(st).run();
        assert_failed(&o, "TransferBeforeAttestation");
        assert!(o.status.switched_at().is_none());
    }

    #[test]
    fn transferred_records_switched_and_writes_nothing_else() {
        let mut st = accepted(MigrationPhase::Transferring);
        st.conditions = vec![cond(CONDITION_TRANSFERRED, "True", "Sent", "")];
        st.started_at = Some(Time(ts(1005)));
        let o = Case::new(st).run();
        assert_eq!(o.status.phase, MigrationPhase::Transferring);
        assert_eq!(o.status.switched_at(), Some(ts(1010)));
        let sw = &o.status.conditions[0];
        assert_eq!(
            (sw.type_.as_str(), sw.reason.as_str()),
            ("Switched", "Rebound")
        );
        assert!(sw.message.contains("from n1 to n2"));
        // Only the operator's own condition is in its status.
        assert_eq!(o.status.conditions.len(), 1);
    }

    #[test]
    fn a_cvm_bound_elsewhere_is_not_rebound() {
        let mut st = accepted(MigrationPhase::Transferring);
        st.conditions = vec![cond(CONDITION_TRANSFERRED, "True", "Sent", "")];
        let mut c = Case::new(st);
        let mut cvm = verified_cvm();
        cvm.node = Some("n9".into());
        c.cvm = Some(cvm);
        assert_failed(&c.run(), "CVMMoved");
    }

    fn switched(at: i64) -> ConfidentialVMMigrationStatus {
        let mut st = accepted(MigrationPhase::Transferring);
        let mut sw = cond(CONDITION_SWITCHED, "True", REASON_REBOUND, "");
        sw.last_transition_time = Time(ts(at));
        st.conditions = vec![cond(CONDITION_TRANSFERRED, "True", "Sent", ""), sw];
        st.started_at = Some(Time(ts(1003)));
        st
    }

    /// The CVM bound to the target after the switch, its verdict on evidence bound to this
    /// migration (`bound`) or not (the source's, from before the switch).
    fn on_target(verified: Tri, bound: bool) -> CvmView {
        let mut cvm = verified_cvm();
        cvm.node = Some("n2".into());
        cvm.migration = Some("mig-uid-1".to_string());
        cvm.verdict_migration = bound.then(|| "mig-uid-1".to_string());
        cvm.verified = Some(Cond {
            status: verified,
            reason: match verified {
                Tri::True => "Affirming",
                Tri::False => "EvidenceRejected",
                Tri::Unknown => "AwaitingEvidence",
            }
            .into(),
            message: "details".into(),
        });
        cvm
    }

    #[test]
    fn succeeded_needs_evidence_bound_to_the_migration() {
        let mut c = Case::new(switched(1005));
        // Still the source's verdict (evidence not bound to this migration, even if it was
        // collected in the very second of the switch): wait.
        c.cvm = Some(on_target(Tri::True, false));
        let o = c.run();
        assert_eq!(o.status.phase, MigrationPhase::Transferring);
        assert!(message(&o).contains("waiting for the guest's evidence from n2"));
        // A verdict bound to another (earlier) migration of this CVM is not this one's.
        let mut earlier = on_target(Tri::True, false);
        earlier.verdict_migration = Some("mig-uid-0".into());
        c.cvm = Some(earlier);
        assert_eq!(c.run().status.phase, MigrationPhase::Transferring);
        // Evidence bound to this migration, verified on the target.
        c.cvm = Some(on_target(Tri::True, true));
        let o = c.run();
        assert_eq!(o.status.phase, MigrationPhase::Succeeded);
        assert_eq!(o.status.completed_at, Some(Time(ts(1010))));
        assert!(message(&o).contains("runs on n2"), "{}", message(&o));
        // The Switched condition is carried along (SSA would drop it otherwise).
        assert_eq!(o.status.switched_at(), Some(ts(1005)));
    }

    #[test]
    fn waiting_after_the_switch_rewrites_nothing() {
        let mut st = accepted(MigrationPhase::Transferring);
        st.conditions = vec![cond(CONDITION_TRANSFERRED, "True", "Sent", "")];
        let first = Case::new(st.clone()).run();
        // What the next pass reads: the operator's status as written, the CVM rebound.
        st.phase = Some(first.status.phase);
        st.message = first.status.message.clone();
        st.started_at = first.status.started_at.clone();
        st.conditions.extend(first.status.conditions.clone());
        let mut c = Case::new(st);
        c.now = 1012;
        c.cvm = Some(on_target(Tri::True, false));
        let next = c.run();
        assert_eq!(next.status, first.status);
    }

    #[test]
    fn rejected_evidence_on_the_target_fails_and_says_where_the_guest_is() {
        let mut c = Case::new(switched(1005));
        c.cvm = Some(on_target(Tri::False, true));
        let o = c.run();
        assert_failed(&o, "TargetVerificationFailed");
        assert!(
            message(&o).contains("now runs on n2")
                && message(&o).contains("EvidenceRejected: details"),
            "{}",
            message(&o)
        );
        // A stale rejection (evidence not bound to this migration) is not the target's.
        c.cvm = Some(on_target(Tri::False, false));
        assert_eq!(c.run().status.phase, MigrationPhase::Transferring);
    }

    #[test]
    fn after_the_switch_it_waits_for_the_cvms_own_binding_without_timing_out() {
        let mut c = Case::new(switched(1005));
        // The CVM's reconciler has not bound it to the target yet.
        let mut cvm = on_target(Tri::True, true);
        cvm.node = Some("n1".into());
        cvm.migration = None;
        c.cvm = Some(cvm.clone());
        c.now = 99_999;
        let o = c.run();
        assert_eq!(
            o.status.phase,
            MigrationPhase::Transferring,
            "{}",
            message(&o)
        );
        // Bound to the target by an earlier migration: not this one's binding either.
        cvm.node = Some("n2".into());
        cvm.migration = Some("mig-uid-0".into());
        c.cvm = Some(cvm);
        assert_eq!(c.run().status.phase, MigrationPhase::Transferring);
    }

    #[test]
    fn timeout_names_the_step_it_waited_for() {
        let mut st = accepted(MigrationPhase::Pending);
        let mut c = Case::new(st.clone());
        c.now = 1300;
        assert_eq!(
            c.run().status.phase,
            MigrationPhase::Pending,
            "not past 5m yet"
        );
        c.now = 1301;
        let o = c.run();
        assert_eq!(o.status.phase, MigrationPhase::Failed);
        assert_eq!(
            message(&o),
            "Timeout: node n2 did not prepare a receiving guest (no TargetPrepared condition) within 5m of the migration's creation; the guest keeps running on n1"
        );

        st.phase = Some(MigrationPhase::TargetAttested);
        let mut c = Case::new(st.clone());
        c.now = 1400;
        assert!(message(&c.run()).contains("node n1 did not start sending the guest"));

        st.conditions = vec![cond(CONDITION_TRANSFERRED, "Unknown", "Sending", "")];
        let mut c = Case::new(st.clone());
        c.now = 1400;
        let o = c.run();
        assert!(
            o.status.reason == Some(MigrationReason::Timeout)
                && message(&o).contains("still Unknown")
        );

        // Once the guest was sent, the operator never gives up on the switch.
        st.conditions = vec![cond(CONDITION_TRANSFERRED, "True", "Sent", "")];
        let mut c = Case::new(st);
        c.now = 1400;
        let o = c.run();
        assert_eq!(o.status.switched_at(), Some(ts(1400)));
        assert_ne!(o.status.phase, MigrationPhase::Failed);
    }

    #[test]
    fn after_the_switch_the_timeout_counts_from_the_switch() {
        let mut c = Case::new(switched(1200));
        c.cvm = Some(on_target(Tri::Unknown, false));
        c.now = 1450; // 7.5 min after creation, 4 min after the switch
        assert_eq!(c.run().status.phase, MigrationPhase::Transferring);
        c.now = 1501;
        let o = c.run();
        assert_failed(&o, "Timeout");
        assert!(message(&o).contains("switched to n2") && message(&o).contains("AwaitingEvidence"));
    }

    #[test]
    fn terminal_migrations_are_left_alone() {
        let mut st = accepted(MigrationPhase::Failed);
        st.message = Some("NoTarget: x".into());
        let mut c = Case::new(st.clone());
        c.cvm = None;
        c.now = 99999;
        let o = c.run();
        assert_eq!(o.status, OperatorStatus::recorded(&st));
        assert!(!needs_target(&c.view()));
    }

    #[test]
    fn the_operators_share_leaves_plugin_fields_out() {
        let mut st = accepted(MigrationPhase::TargetReady);
        st.conditions = vec![
            cond(CONDITION_TARGET_PREPARED, "True", "Prepared", ""),
            cond(CONDITION_TRANSFERRED, "Unknown", "Sending", ""),
        ];
        st.target_evidence = Some(evidence(1005));
        let mine = OperatorStatus::recorded(&st);
        assert!(mine.conditions.is_empty());
        let json = serde_json::to_value(&mine).unwrap();
        assert!(json.get("targetEvidence").is_none());
        assert!(json.get("conditions").is_none());
        assert_eq!(json["phase"], "TargetReady");
        assert_eq!(json["targetNode"], "n2");
    }

    #[test]
    fn events_follow_the_transitions() {
        let old = OperatorStatus::default();
        let new = OperatorStatus {
            phase: MigrationPhase::Pending,
            target_node: Some("n2".into()),
            message: Some("moving".into()),
            ..Default::default()
        };
        let n = notes(&old, &new);
        assert_eq!(n.len(), 1);
        assert_eq!(
            (n[0].reason.as_str(), n[0].warning),
            ("TargetChosen", false)
        );
        assert!(notes(&new, &new).is_empty(), "no event without a change");

        // The event's reason is the typed one, never parsed from the message.
        let failed = OperatorStatus {
            phase: MigrationPhase::Failed,
            reason: Some(MigrationReason::NoTarget),
            message: Some("NoTarget: 0/1 nodes are available".into()),
            ..Default::default()
        };
        let n = notes(&old, &failed);
        assert_eq!(n.len(), 1);
        assert!(n[0].warning);
        assert_eq!(n[0].reason, "NoTarget");
        let misleading = OperatorStatus {
            reason: Some(MigrationReason::Timeout),
            message: Some("NoTarget: a message that looks like another reason".into()),
            ..failed.clone()
        };
        assert_eq!(notes(&old, &misleading)[0].reason, "Timeout");

        let mut sw = new.clone();
        sw.phase = MigrationPhase::Transferring;
        sw.conditions = vec![cond(CONDITION_SWITCHED, "True", REASON_REBOUND, "")];
        let reasons: Vec<String> = notes(&new, &sw).into_iter().map(|n| n.reason).collect();
        assert_eq!(reasons, vec!["Switched"]);
    }

    fn node(name: &str, tee: TeeType, slots: u64) -> NodeInfo {
        let mut n = NodeInfo {
            name: name.into(),
            ready: true,
            cpus: 16,
            memory_mib: 32768,
            ..Default::default()
        };
        n.labels
            .insert(cvm_crds::wellknown::nfd_label(tee).into(), "true".into());
        n.slots
            .insert(cvm_crds::wellknown::tee_resource(tee).into(), slots);
        n
    }

    fn req() -> Request {
        Request {
            tee: TeeType::SevSnp,
            vcpus: 2,
            memory_mib: 2048,
            node_selector: BTreeMap::new(),
            avoid: Default::default(),
        }
    }

    #[test]
    fn the_target_is_never_the_source() {
        // n1 has the most free slots, but the guest is there already.
        let nodes = [
            node("n1", TeeType::SevSnp, 8),
            node("n2", TeeType::SevSnp, 2),
        ];
        assert_eq!(
            choose_target(None, "n1", &req(), &nodes, &[]),
            Target::Node("n2".into())
        );
        match choose_target(None, "n1", &req(), &nodes[..1], &[]) {
            Target::None(m) => assert_eq!(
                m,
                "no node besides n1, where the guest runs, can take it: 0/0 nodes are available: the cluster has no nodes"
            ),
            t => panic!("{t:?}"),
        }
        match choose_target(Some("n1"), "n1", &req(), &nodes, &[]) {
            Target::None(m) => assert!(m.contains("already runs"), "{m}"),
            t => panic!("{t:?}"),
        }
    }

    #[test]
    fn a_requested_target_must_exist_and_fit() {
        let nodes = [
            node("n1", TeeType::SevSnp, 8),
            node("n2", TeeType::SevSnp, 1),
            node("t", TeeType::Tdx, 8),
        ];
        assert_eq!(
            choose_target(Some("n2"), "n1", &req(), &nodes, &[]),
            Target::Node("n2".into())
        );
        let full = [Placed {
            node: "n2".into(),
            tee: TeeType::SevSnp,
            vcpus: 1,
            memory_mib: 1,
        }];
        match choose_target(Some("n2"), "n1", &req(), &nodes, &full) {
            Target::None(m) => assert_eq!(
                m,
                "node n2 cannot take the guest: 0/1 nodes are available: 1 have no free ASID"
            ),
            t => panic!("{t:?}"),
        }
        match choose_target(Some("t"), "n1", &req(), &nodes, &[]) {
            Target::None(m) => assert!(m.contains("1 lack SEV-SNP"), "{m}"),
            t => panic!("{t:?}"),
        }
        match choose_target(Some("nope"), "n1", &req(), &nodes, &[]) {
            Target::None(m) => assert!(m.starts_with("node nope does not exist"), "{m}"),
            t => panic!("{t:?}"),
        }
    }

    fn migration(status: serde_json::Value) -> ConfidentialVMMigration {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "cvmp.io/v1alpha1", "kind": "ConfidentialVMMigration",
            "metadata": {"name": "m", "namespace": "d"},
            "spec": {"cvmName": "web"},
            "status": status,
        }))
        .unwrap()
    }

    fn cvm_on(node: &str) -> ConfidentialVM {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "cvmp.io/v1alpha1", "kind": "ConfidentialVM",
            "metadata": {"name": "web", "namespace": "d"},
            "spec": {"tee": {"type": "SEV-SNP"}, "resources": {"vcpus": 3, "memoryMiB": 4096},
                     "boot": {"firmware": {"name": "ovmf"}}},
            "status": {"nodeName": node},
        }))
        .unwrap()
    }

    #[test]
    fn a_switched_migration_in_progress_gives_its_cvm_the_target() {
        let switched = |phase: &str| {
            let mut m = migration(serde_json::json!({
                "phase": phase, "sourceNode": "n1", "targetNode": "n2",
                "conditions": [{"type": "Switched", "status": "True", "reason": "Rebound",
                                "message": "", "lastTransitionTime": "2023-11-14T22:13:20Z"}],
            }));
            m.metadata.uid = Some("mig-1".into());
            std::sync::Arc::new(m)
        };
        let want = Switch {
            node: "n2".into(),
            migration: "mig-1".into(),
            at: ts(1_700_000_000),
        };
        assert_eq!(
            switched_binding(&cvm_on("n1"), &[switched("Transferring")]),
            Some(want.clone())
        );
        // Already on the target (the labels may still be missing): the same binding.
        assert_eq!(
            switched_binding(&cvm_on("n2"), &[switched("Transferring")]),
            Some(want)
        );
        // Not switched yet, finished, another CVM, or a CVM that is elsewhere: nothing.
        let mut unswitched = (*switched("Transferring")).clone();
        if let Some(st) = unswitched.status.as_mut() {
            st.conditions.clear();
        }
        assert_eq!(
            switched_binding(&cvm_on("n1"), &[std::sync::Arc::new(unswitched)]),
            None
        );
        assert_eq!(
            switched_binding(&cvm_on("n1"), &[switched("Succeeded")]),
            None
        );
        assert_eq!(switched_binding(&cvm_on("n1"), &[switched("Failed")]), None);
        let mut other = (*switched("Transferring")).clone();
        other.spec.cvm_name = "db".into();
        assert_eq!(
            switched_binding(&cvm_on("n1"), &[std::sync::Arc::new(other)]),
            None
        );
        assert_eq!(
            switched_binding(&cvm_on("n3"), &[switched("Transferring")]),
            None
        );
    }

    #[test]
    fn a_migration_holds_the_targets_capacity_until_the_cvm_is_there() {
        let m = migration(serde_json::json!({"phase": "TargetReady", "targetNode": "n2"}));
        let hold = target_hold(&m, Some(&cvm_on("n1"))).expect("held");
        assert_eq!(
            hold,
            Placed {
                node: "n2".into(),
                tee: TeeType::SevSnp,
                vcpus: 3,
                memory_mib: 4096
            }
        );
        // Once bound there the CVM itself counts: no double booking.
        assert_eq!(target_hold(&m, Some(&cvm_on("n2"))), None);
        assert_eq!(target_hold(&m, None), None);
        let done = migration(serde_json::json!({"phase": "Failed", "targetNode": "n2"}));
        assert_eq!(target_hold(&done, Some(&cvm_on("n1"))), None);
        let fresh = migration(serde_json::json!({"phase": "Pending"}));
        assert_eq!(target_hold(&fresh, Some(&cvm_on("n1"))), None);
    }

    #[test]
    fn migrated_at_is_written_in_whole_seconds() {
        let t = Timestamp::from_second(1_700_000_000)
            .unwrap()
            .checked_add(k8s_openapi::jiff::SignedDuration::from_millis(700))
            .unwrap();
        assert_eq!(format_migrated_at(t), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn durations_read_like_flags() {
        assert_eq!(human(Duration::from_secs(300)), "5m");
        assert_eq!(human(Duration::from_secs(90)), "1m30s");
        assert_eq!(human(Duration::from_secs(3601)), "1h1s");
        assert_eq!(human(Duration::from_millis(250)), "250ms");
    }

    #[test]
    fn cvm_view_reads_the_verdicts_migration_and_the_annotation() {
        let mut c = cvm_on("n2");
        c.metadata.annotations = Some(
            [(
                cvm_crds::wellknown::ANNOTATION_MIGRATION.to_string(),
                "m-9".to_string(),
            )]
            .into(),
        );
        let st = c.status.get_or_insert_with(Default::default);
        st.evidence = Some(evidence(2000));
        let v = CvmView::of(&c);
        assert_eq!(v.migration.as_deref(), Some("m-9"));
        assert_eq!(v.verdict_migration, None, "no appraisal, no migration");
        assert_eq!(v.node.as_deref(), Some("n2"));
        let st = c.status.get_or_insert_with(Default::default);
        let mut r = result(EarStatus::Affirming, vec![], 1500);
        r.migration = Some("mig-uid-1".into());
        st.attestation = Some(r);
        assert_eq!(
            CvmView::of(&c).verdict_migration.as_deref(),
            Some("mig-uid-1")
        );
        // SNP with the default guest policy may not move.
        assert_eq!(
            CvmView::of(&c).live_migratable.0,
            LiveMigratable::PolicyForbidsMigration
        );
    }
}
