//! The node plugin's share of live migration (docs/migration.md), as pure decisions: given
//! this node's name, the `ConfidentialVMMigration`s (reduced to [`MigrationView`]s) and the
//! guests this host holds, what to do for each migration, and which held guests are
//! receiving guests that the orphan rule must leave alone.
//!
//! Every decision is read from the migration's status (phase, nodes and the plugins' own
//! conditions), so that a plugin restarted at any point resumes where the API says it is.
//!
//! Adoption after the switch needs nothing here: the CVM is then bound to this node and
//! [`crate::plan`] treats the receiving guest as the CVM's guest (fresh evidence, because
//! the CVM's `cvmp.io/migration` is not what its evidence and this plugin's last answer
//! are bound to).

use std::collections::BTreeSet;

use cvm_crds::conditions::{STATUS_FALSE, STATUS_TRUE, STATUS_UNKNOWN};
use cvm_crds::migration::{
    ConfidentialVMMigration, MigrationPhase, CONDITION_TARGET_PREPARED, CONDITION_TRANSFERRED,
};

use crate::plan::HeldGuest;

/// Status of a condition a plugin writes on a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CondState {
    True,
    False,
    Unknown,
}

impl CondState {
    fn parse(s: &str) -> Self {
        match s {
            STATUS_TRUE => CondState::True,
            STATUS_FALSE => CondState::False,
            // Anything else is not a verdict either way.
            _ => CondState::Unknown,
        }
    }

    /// The spelling in `status.conditions[].status`.
    pub fn as_str(self) -> &'static str {
        match self {
            CondState::True => STATUS_TRUE,
            CondState::False => STATUS_FALSE,
            CondState::Unknown => STATUS_UNKNOWN,
        }
    }
}

/// A migration, reduced to what the plugin's decisions need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationView {
    /// The migration's UID (its challenge, and the key of its actions).
    pub uid: String,
    pub namespace: String,
    /// The migration's name.
    pub name: String,
    /// `spec.cvmName`: the CVM in the same namespace.
    pub cvm_name: String,
    /// The CVM's UID when the migration names it (an owner reference to the CVM);
    /// `None` when it does not, and only namespace and name identify the CVM.
    pub cvm_uid: Option<String>,
    /// `status.phase`; `Pending` before the operator wrote one.
    pub phase: MigrationPhase,
    pub source_node: Option<String>,
    pub target_node: Option<String>,
    /// `TargetPrepared` as the target's plugin last wrote it.
    pub target_prepared: Option<CondState>,
    /// `Transferred` as the source's plugin last wrote it.
    pub transferred: Option<CondState>,
}

impl MigrationView {
    /// The view of a migration as read from the API server; `None` without a UID.
    pub fn of(m: &ConfidentialVMMigration) -> Option<MigrationView> {
        let uid = m.metadata.uid.clone()?;
        let status = m.status.as_ref();
        let cond = |type_: &str| {
            status
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
                .map(|c| CondState::parse(&c.status))
        };
        let cvm_uid = m
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.kind == "ConfidentialVM" && o.name == m.spec.cvm_name)
            .map(|o| o.uid.clone());
        Some(MigrationView {
            uid,
            namespace: m.metadata.namespace.clone().unwrap_or_default(),
            name: m.metadata.name.clone().unwrap_or_default(),
            cvm_name: m.spec.cvm_name.clone(),
            cvm_uid,
            phase: status.and_then(|s| s.phase).unwrap_or_default(),
            source_node: status.and_then(|s| s.source_node.clone()),
            target_node: status.and_then(|s| s.target_node.clone()),
            target_prepared: cond(CONDITION_TARGET_PREPARED),
            transferred: cond(CONDITION_TRANSFERRED),
        })
    }

    /// `namespace/name` of the migration, for logs.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// `namespace/name` of the CVM, for logs.
    pub fn cvm_key(&self) -> String {
        format!("{}/{}", self.namespace, self.cvm_name)
    }

    fn targets(&self, node: &str) -> bool {
        self.target_node.as_deref() == Some(node)
    }

    fn leaves(&self, node: &str) -> bool {
        self.source_node.as_deref() == Some(node)
    }

    /// Whether `guest` is (or will be) this migration's receiving guest: the CVM's guest,
    /// identified by UID when the migration names it, else by namespace and name.
    fn receives_into(&self, guest: &HeldGuest) -> bool {
        guest.namespace == self.namespace
            && guest.name == self.cvm_name
            && self.cvm_uid.as_ref().is_none_or(|u| *u == guest.uid)
    }
}

/// What this node's plugin does for one migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationAction {
    /// Target: launch the receiving guest and report its evidence (`TargetPrepared`).
    PrepareTarget,
    /// Source: send the guest's state to the target (`Transferred`).
    Send,
}

impl MigrationAction {
    /// Name for logs (`phase`) and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            MigrationAction::PrepareTarget => "prepare-target",
            MigrationAction::Send => "send",
        }
    }
}

/// What `node` does for `m`, if anything.
///
/// - Target: the operator chose this node (phase `Pending`) and `TargetPrepared` has no
///   verdict yet.
/// - Source: the operator found the target's evidence affirming (`TargetAttested`; or
///   `Transferring` already) and `Transferred` has no verdict yet. `Unknown` counts as no
///   verdict: it is what a plugin that stopped mid-transfer left behind, and the backend's
///   `send` is idempotent.
pub fn decide(node: &str, m: &MigrationView) -> Option<MigrationAction> {
    if m.phase.is_terminal() {
        return None;
    }
    let no_verdict = |c: Option<CondState>| matches!(c, None | Some(CondState::Unknown));
    if m.targets(node) && m.phase == MigrationPhase::Pending && no_verdict(m.target_prepared) {
        return Some(MigrationAction::PrepareTarget);
    }
    let sending = matches!(
        m.phase,
        MigrationPhase::TargetAttested | MigrationPhase::Transferring
    );
    if m.leaves(node) && m.target_node.is_some() && sending && no_verdict(m.transferred) {
        return Some(MigrationAction::Send);
    }
    None
}

/// Every migration action of `node`, keyed by migration UID, ordered by UID.
pub fn plan(node: &str, migrations: &[MigrationView]) -> Vec<(String, MigrationAction)> {
    let mut out: Vec<(String, MigrationAction)> = migrations
        .iter()
        .filter_map(|m| decide(node, m).map(|a| (m.uid.clone(), a)))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// UIDs of the held guests that receive a migration to `node` still in progress: their
/// CVM is not bound here until the operator switches it, yet they must not be stopped as
/// orphans. Once the migration is Failed (or deleted) they are orphans like any other.
pub fn receiving(node: &str, migrations: &[MigrationView], held: &[HeldGuest]) -> BTreeSet<String> {
    held.iter()
        .filter(|g| {
            migrations
                .iter()
                .any(|m| !m.phase.is_terminal() && m.targets(node) && m.receives_into(g))
        })
        .map(|g| g.uid.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{self, Action, BoundCvm, EvidenceKey, Restart};
    use cvm_crds::cvm::GuestState;
    use std::collections::BTreeMap;

    const ME: &str = "n-target";
    const SRC: &str = "n-source";

    fn mig(phase: MigrationPhase) -> MigrationView {
        MigrationView {
            uid: "m1".into(),
            namespace: "ns".into(),
            name: "move-web".into(),
            cvm_name: "web".into(),
            cvm_uid: None,
            phase,
            source_node: Some(SRC.into()),
            target_node: Some(ME.into()),
            target_prepared: None,
            transferred: None,
        }
    }

    fn guest(uid: &str, name: &str) -> HeldGuest {
        HeldGuest {
            uid: uid.into(),
            namespace: "ns".into(),
            name: name.into(),
            state: GuestState::Running,
        }
    }

    #[test]
    fn target_prepares_once_per_migration() {
        use MigrationPhase::*;
        let m = mig(Pending);
        assert_eq!(decide(ME, &m), Some(MigrationAction::PrepareTarget));
        assert_eq!(decide(SRC, &m), None, "the source waits for the target");
        assert_eq!(decide("n-other", &m), None);
        let mut done = m.clone();
        done.target_prepared = Some(CondState::True);
        assert_eq!(decide(ME, &done), None, "already reported");
        done.target_prepared = Some(CondState::False);
        assert_eq!(decide(ME, &done), None, "a refusal is final");
        let mut no_target = m.clone();
        no_target.target_node = None;
        assert_eq!(decide(ME, &no_target), None, "not chosen yet");
        for phase in [TargetReady, TargetAttested, Succeeded, Failed] {
            assert_eq!(decide(ME, &mig(phase)), None, "{phase}");
        }
        // A restart after a crash mid-prepare (nothing written yet) prepares again.
        assert_eq!(
            plan(ME, &[m]),
            vec![("m1".into(), MigrationAction::PrepareTarget)]
        );
    }

    #[test]
    fn source_sends_after_attestation_and_resumes_an_interrupted_send() {
        use MigrationPhase::*;
        let m = mig(TargetAttested);
        assert_eq!(decide(SRC, &m), Some(MigrationAction::Send));
        assert_eq!(decide(ME, &m), None, "the target does not send");
        let mut started = mig(Transferring);
        started.transferred = Some(CondState::Unknown);
        assert_eq!(
            decide(SRC, &started),
            Some(MigrationAction::Send),
            "a plugin restarted mid-transfer finishes it"
        );
        for verdict in [CondState::True, CondState::False] {
            started.transferred = Some(verdict);
            assert_eq!(decide(SRC, &started), None, "{verdict:?}");
        }
        for phase in [Pending, TargetReady, Succeeded, Failed] {
            assert_eq!(decide(SRC, &mig(phase)), None, "{phase}");
        }
        let mut failed_unknown = mig(Failed);
        failed_unknown.transferred = Some(CondState::Unknown);
        assert_eq!(
            decide(SRC, &failed_unknown),
            None,
            "over: nothing to resume"
        );
    }

    #[test]
    fn view_reads_status_conditions_and_owner() {
        let m: ConfidentialVMMigration = serde_json::from_value(serde_json::json!({
            "apiVersion": "cvmp.io/v1alpha1", "kind": "ConfidentialVMMigration",
            "metadata": {"name": "mv", "namespace": "ns", "uid": "mu",
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "web", "uid": "not-it"},
                    {"apiVersion": "cvmp.io/v1alpha1", "kind": "ConfidentialVM", "name": "web", "uid": "cu"}]},
            "spec": {"cvmName": "web"},
            "status": {"phase": "Transferring", "sourceNode": "a", "targetNode": "b",
                "conditions": [
                    {"type": "TargetPrepared", "status": "True", "reason": "R", "message": "",
                     "lastTransitionTime": "2026-01-01T00:00:00Z"},
                    {"type": "Transferred", "status": "Unknown", "reason": "Transferring", "message": "",
                     "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        }))
        .unwrap();
        let v = MigrationView::of(&m).unwrap();
        assert_eq!(v.cvm_uid.as_deref(), Some("cu"));
        assert_eq!(v.phase, MigrationPhase::Transferring);
        assert_eq!(v.target_prepared, Some(CondState::True));
        assert_eq!(v.transferred, Some(CondState::Unknown));
        assert_eq!((v.key(), v.cvm_key()), ("ns/mv".into(), "ns/web".into()));
        let mut bare = m.clone();
        bare.status = None;
        bare.metadata.owner_references = None;
        let v = MigrationView::of(&bare).unwrap();
        assert_eq!(v.phase, MigrationPhase::Pending);
        assert_eq!(
            (v.cvm_uid, v.target_node, v.transferred),
            (None, None, None)
        );
        bare.metadata.uid = None;
        assert_eq!(MigrationView::of(&bare), None);
    }

    #[test]
    fn receiving_guest_is_kept_while_the_migration_runs_then_stopped() {
        use MigrationPhase::*;
        let held = vec![guest("cvm-uid", "web"), guest("stray", "old")];
        let answered = BTreeMap::new();
        for phase in [Pending, TargetReady, TargetAttested, Transferring] {
            let keep = receiving(ME, &[mig(phase)], &held);
            assert_eq!(keep, BTreeSet::from(["cvm-uid".to_string()]), "{phase}");
            let p = plan::plan(&held, &[], &answered, false, &keep);
            assert_eq!(
                p,
                vec![("stray".to_string(), Action::StopOrphan)],
                "only the stray guest is an orphan during {phase}"
            );
        }
        // Rolled back, or the migration deleted: the receiving guest is an orphan.
        for migrations in [vec![mig(Failed)], vec![]] {
            let keep = receiving(ME, &migrations, &held);
            assert!(keep.is_empty());
            let p = plan::plan(&held, &[], &answered, false, &keep);
            assert_eq!(
                p,
                vec![
                    ("cvm-uid".to_string(), Action::StopOrphan),
                    ("stray".to_string(), Action::StopOrphan)
                ]
            );
        }
        // Only the target keeps it: on the source the CVM's guest is bound, or an orphan
        // once the CVM has been switched away.
        assert!(receiving(SRC, &[mig(Transferring)], &held).is_empty());
        // Another CVM of the same name (re-created: another UID) is not protected when the
        // migration names its CVM's UID.
        let mut named = mig(Transferring);
        named.cvm_uid = Some("new-uid".into());
        assert!(receiving(ME, &[named.clone()], &held).is_empty());
        named.cvm_uid = Some("cvm-uid".into());
        assert_eq!(receiving(ME, &[named], &held).len(), 1);
        // Another namespace is another CVM.
        let mut elsewhere = mig(Pending);
        elsewhere.namespace = "other".into();
        assert!(receiving(ME, &[elsewhere], &held).is_empty());
    }

    #[test]
    fn after_the_switch_the_receiving_guest_is_adopted_with_fresh_evidence() {
        // The CVM is now bound here; its status still shows the source's guest and
        // evidence (not bound to the migration), and this plugin never answered for it.
        let held = vec![guest("cvm-uid", "web")];
        let wanted = EvidenceKey {
            nonce: Some("aa".into()),
            reattest: None,
            epoch: Some("mig-1".into()),
        };
        let cvm = BoundCvm {
            uid: "cvm-uid".into(),
            key: "ns/web".into(),
            deleting: false,
            halted: false,
            launcher_down: false,
            launcher_dir: None,
            relaunch_held: false,
            restart: Restart::Always,
            wanted: wanted.clone(),
            reported: plan::Reported {
                guest_state: Some(GuestState::Running),
                launched: Some(true),
                launched_reason: None,
                has_evidence: true,
                evidence_nonce: Some("aa".into()),
                reattest_due: false,
                evidence_epoch: None,
            },
        };
        let keep = receiving(ME, &[mig(MigrationPhase::Transferring)], &held);
        let p = plan::plan(
            &held,
            std::slice::from_ref(&cvm),
            &BTreeMap::new(),
            false,
            &keep,
        );
        assert_eq!(
            p,
            vec![("cvm-uid".to_string(), Action::RefreshEvidence)],
            "adopted: no launch, no stop, fresh evidence"
        );
        // Even if this plugin remembers an answer (e.g. the CVM lived here before), the
        // source's evidence is stale.
        let answered = BTreeMap::from([("cvm-uid".to_string(), wanted.clone())]);
        let p = plan::plan(&held, std::slice::from_ref(&cvm), &answered, false, &keep);
        assert_eq!(p, vec![("cvm-uid".to_string(), Action::RefreshEvidence)]);
        // Once the fresh evidence is written and remembered: nothing more to do, also
        // after the migration is over.
        let mut fresh = cvm.clone();
        fresh.reported.evidence_epoch = Some("mig-1".into());
        let p = plan::plan(&held, &[fresh.clone()], &answered, false, &BTreeSet::new());
        assert!(p.is_empty(), "{p:?}");
        // A restart that lost the answered file asks again, as for any CVM.
        let p = plan::plan(&held, &[fresh], &BTreeMap::new(), false, &BTreeSet::new());
        assert_eq!(p, vec![("cvm-uid".to_string(), Action::RefreshEvidence)]);
    }
}
