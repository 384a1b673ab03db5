//! The node plugin's decisions, as pure functions: given the guests this host holds and
//! the CVMs bound to it, what to do with each. No client, no clock, no I/O; the caller
//! gathers the inputs ([`crate::run`]) and carries out the [`Action`]s.

use std::collections::{BTreeMap, BTreeSet};

use cvm_crds::cvm::{ConfidentialVM, GuestState, RunStrategy};
use cvm_crds::wellknown::ANNOTATION_REATTEST;
use cvm_crds::ConditionType;
use serde::{Deserialize, Serialize};

/// What the latest evidence must answer: the user's nonce, the re-attest annotation and
/// the live migration that moved the CVM (`cvmp.io/migration`). A change of any asks for
/// fresh evidence.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EvidenceKey {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reattest: Option<String>,
    /// The CVM's `cvmp.io/migration` (the live migration that moved it here): evidence
    /// must bind it, so a guest adopted after a migration answers again from this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
}

/// What the CVM's status says about the guest (as last written by this plugin).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reported {
    pub guest_state: Option<GuestState>,
    /// `Launched` condition: `Some(true)` for True, `Some(false)` for False/Unknown.
    pub launched: Option<bool>,
    /// The `Launched` condition's reason.
    pub launched_reason: Option<String>,
    pub has_evidence: bool,
    pub evidence_nonce: Option<String>,
    /// The evidence is older than `spec.attestation.reattestEvery` (judged by the caller's
    /// clock, see [`BoundCvm::of_at`]).
    pub reattest_due: bool,
    /// The migration the reported evidence is bound to (its `epoch`).
    pub evidence_epoch: Option<String>,
}

/// A CVM bound to this node, reduced to what decisions need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundCvm {
    pub uid: String,
    /// `namespace/name`, for logs.
    pub key: String,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
    /// The run strategy asks for the guest to be stopped (`Halted`).
    pub halted: bool,
    /// Its launcher pod does not run (with launcher pods, the guest's life is the pod's).
    pub launcher_down: bool,
    /// Its running launcher's socket directory on the host (the guest is launched there).
    pub launcher_dir: Option<std::path::PathBuf>,
    /// Its last launches failed and the back-off since the latest has not passed
    /// ([`relaunch_backoff`]): no relaunch now.
    pub relaunch_held: bool,
    /// When a guest that ended on its own is started again (from `spec.runStrategy`).
    pub restart: Restart,
    pub wanted: EvidenceKey,
    pub reported: Reported,
}

impl BoundCvm {
    /// The view of `cvm` if it is bound to `node` (label selector *and* `status.nodeName`:
    /// a stale label alone must not start a guest).
    pub fn of(cvm: &ConfidentialVM, node: &str) -> Option<BoundCvm> {
        Self::of_at(cvm, node, None)
    }

    /// Like [`BoundCvm::of`], also judging whether the re-attestation period has passed
    /// at `now_unix` (seconds).
    pub fn of_at(cvm: &ConfidentialVM, node: &str, now_unix: Option<i64>) -> Option<BoundCvm> {
        if cvm.node_name() != Some(node) {
            return None;
        }
        let uid = cvm.metadata.uid.clone()?;
        let status = cvm.status.as_ref();
        let evidence = status.and_then(|s| s.evidence.as_ref());
        Some(BoundCvm {
            uid,
            key: format!(
                "{}/{}",
                cvm.metadata.namespace.as_deref().unwrap_or(""),
                cvm.metadata.name.as_deref().unwrap_or("")
            ),
            deleting: cvm.metadata.deletion_timestamp.is_some(),
            halted: cvm.spec.run_strategy == RunStrategy::Halted,
            launcher_down: false,
            launcher_dir: None,
            relaunch_held: false,
            restart: Restart::of(cvm.spec.run_strategy),
            wanted: EvidenceKey {
                nonce: cvm.nonce().map(str::to_string),
                reattest: annotation(cvm, ANNOTATION_REATTEST),
                epoch: cvm.migration_epoch().map(str::to_string),
            },
            reported: Reported {
                guest_state: status
                    .and_then(|s| s.platform.as_ref())
                    .and_then(|p| p.guest_state),
                launched: cvm
                    .condition(ConditionType::Launched)
                    .map(|c| c.status == cvm_crds::conditions::STATUS_TRUE),
                launched_reason: cvm
                    .condition(ConditionType::Launched)
                    .map(|c| c.reason.clone()),
                has_evidence: evidence.is_some(),
                evidence_nonce: evidence.and_then(|e| e.nonce.clone()),
                reattest_due: reattest_due(cvm, now_unix),
                evidence_epoch: evidence.and_then(|e| e.epoch.clone()),
            },
        })
    }
}

fn annotation(cvm: &ConfidentialVM, key: &str) -> Option<String> {
    cvm.metadata.annotations.as_ref()?.get(key).cloned()
}

/// Whether the evidence is older than `spec.attestation.reattestEvery` at `now_unix`.
pub fn reattest_due(cvm: &ConfidentialVM, now_unix: Option<i64>) -> bool {
    let (Some(now), Some(period)) = (
        now_unix,
        cvm.spec
            .attestation
            .as_ref()
            .and_then(|a| a.reattest_every.as_deref())
            .and_then(cvm_crds::validate::parse_duration_ms),
    ) else {
        return false;
    };
    let collected = cvm
        .status
        .as_ref()
        .and_then(|s| s.evidence.as_ref())
        .map(|e| e.collected_at.0.as_second());
    collected.is_some_and(|t| now.saturating_sub(t) >= (period / 1000) as i64)
}

/// Restart behaviour of a run strategy (KubeVirt's meanings).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Restart {
    /// `Always`: start it again whenever it stops or fails.
    #[default]
    Always,
    /// `RerunOnFailure`: start it again only when it failed.
    OnFailure,
    /// `Manual` (and `Halted`): never start it again by itself.
    Never,
}

impl Restart {
    pub fn of(s: RunStrategy) -> Self {
        match s {
            RunStrategy::Always => Restart::Always,
            RunStrategy::RerunOnFailure => Restart::OnFailure,
            RunStrategy::Manual | RunStrategy::Halted => Restart::Never,
        }
    }
}

/// A guest the platform holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldGuest {
    pub uid: String,
    /// Namespace and name of the CVM it was launched for (a receiving guest of a live
    /// migration is recognised by them before its CVM is bound here).
    pub namespace: String,
    pub name: String,
    pub state: GuestState,
}

/// Why a guest is stopped; goes into the condition's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopCause {
    /// The CVM is being deleted.
    Deleted,
    /// `runStrategy: Halted`.
    Halted,
    /// Its launcher pod does not run.
    LauncherDown,
}

impl StopCause {
    /// The `Launched=False` reason that reports a stop for this cause.
    pub fn reason(self) -> &'static str {
        match self {
            StopCause::Deleted | StopCause::Halted => crate::status::REASON_STOPPED,
            StopCause::LauncherDown => cvm_crds::wellknown::REASON_LAUNCHER_GONE,
        }
    }
}

/// What to do for one CVM or held guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// No guest is held for a CVM that wants one: launch it, then report evidence.
    Launch,
    /// Forget a held guest that ended and launch it again, as the run strategy asks.
    Relaunch,
    /// The guest runs but the reported evidence does not answer the current nonce or
    /// re-attest request, or the status does not show the running guest.
    RefreshEvidence,
    /// Stop the held guest, then report it stopped.
    Stop(StopCause),
    /// No guest is held and none should run, but the status does not say Stopped yet
    /// (the operator's finalizer waits for it).
    ReportStopped(StopCause),
    /// A held guest whose CVM is no longer bound here: stop it; there is no object to report to.
    StopOrphan,
    /// The held guest failed (e.g. its QEMU exited) and the status does not say so yet.
    ReportFailed,
}

impl Action {
    /// Name for logs (`phase`) and metrics labels.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Launch => "launch",
            Action::Relaunch => "relaunch",
            Action::RefreshEvidence => "refresh-evidence",
            Action::Stop(_) => "stop",
            Action::ReportStopped(_) => "report-stopped",
            Action::StopOrphan => "stop-orphan",
            Action::ReportFailed => "report-failed",
        }
    }
}

/// How long a guest whose last `failures` launches failed in a row waits before the next:
/// `base` (the resync interval) doubled per further failure, at most 10 minutes, so a
/// guest that cannot boot is not relaunched in a tight loop.
pub fn relaunch_backoff(failures: u32, base: std::time::Duration) -> std::time::Duration {
    let cap = std::time::Duration::from_secs(600);
    let doublings = failures.saturating_sub(1).min(16);
    base.saturating_mul(1 << doublings)
        .min(cap)
        .max(base.min(cap))
}

/// What one bound CVM needs, given the guest held for it (if any) and the evidence key
/// its latest evidence answered. `None`: nothing to do.
pub fn decide(
    cvm: &BoundCvm,
    held: Option<&HeldGuest>,
    answered: Option<&EvidenceKey>,
    retry_failed: bool,
) -> Option<Action> {
    let stop_cause = if cvm.deleting {
        Some(StopCause::Deleted)
    } else if cvm.halted {
        Some(StopCause::Halted)
    } else if cvm.launcher_down {
        Some(StopCause::LauncherDown)
    } else {
        None
    };
    if let Some(cause) = stop_cause {
        return match held {
            Some(_) => Some(Action::Stop(cause)),
            None => {
                // Reported stopped, and for this cause: the operator reads the reason (it
                // does not replace a Manual CVM's pod that went under a running guest). A
                // guest already stopped did not stop because its pod went.
                let shows_stopped = cvm.reported.guest_state == Some(GuestState::Stopped)
                    && cvm.reported.launched == Some(false)
                    && (cause == StopCause::LauncherDown
                        || cvm.reported.launched_reason.as_deref() == Some(cause.reason()));
                // A guest waiting for its first launcher pod never ran: nothing to report
                // (it would read as stopped before it ever started).
                let never_ran =
                    cause == StopCause::LauncherDown && cvm.reported.guest_state.is_none();
                (!shows_stopped && !never_ran).then_some(Action::ReportStopped(cause))
            }
        };
    }
    let Some(held) = held else {
        // A launch that failed is retried only when the caller says so (on a timer), so
        // that the failure's own status write does not trigger the next attempt.
        let failed = cvm.reported.guest_state == Some(GuestState::Failed);
        let retry = retry_failed && !cvm.relaunch_held && cvm.restart != Restart::Never;
        return (!failed || retry).then_some(Action::Launch);
    };
    match held.state {
        // A launch in flight finishes on its own.
        GuestState::Launching => None,
        // A guest that ended is restarted as the run strategy says, on the retry timer
        // (so the failure's own status write does not trigger it); a failure is
        // reported first.
        GuestState::Stopped => {
            (retry_failed && cvm.restart == Restart::Always).then_some(Action::Relaunch)
        }
        GuestState::Failed => {
            if cvm.reported.guest_state != Some(GuestState::Failed) {
                Some(Action::ReportFailed)
            } else {
                (retry_failed && !cvm.relaunch_held && cvm.restart != Restart::Never)
                    .then_some(Action::Relaunch)
            }
        }
        GuestState::Running => {
            let r = &cvm.reported;
            let status_current = r.guest_state == Some(GuestState::Running)
                && r.launched == Some(true)
                && r.has_evidence
                && !r.reattest_due
                && r.evidence_epoch == cvm.wanted.epoch
                && r.evidence_nonce == cvm.wanted.nonce;
            let answered_current = answered == Some(&cvm.wanted);
            (!(status_current && answered_current)).then_some(Action::RefreshEvidence)
        }
    }
}

/// The full plan: one action per bound CVM that needs one, and a stop for every held
/// guest with no bound CVM, except the guests in `receiving` (receiving guests of live
/// migrations to this node still in progress, see [`crate::migrate_plan::receiving`]).
/// Ordered by UID for stable logs and tests.
pub fn plan(
    held: &[HeldGuest],
    bound: &[BoundCvm],
    answered: &BTreeMap<String, EvidenceKey>,
    retry_failed: bool,
    receiving: &BTreeSet<String>,
) -> Vec<(String, Action)> {
    let held_by_uid: BTreeMap<&str, &HeldGuest> =
        held.iter().map(|g| (g.uid.as_str(), g)).collect();
    let bound_uids: BTreeSet<&str> = bound.iter().map(|c| c.uid.as_str()).collect();
    let mut out: Vec<(String, Action)> = bound
        .iter()
        .filter_map(|c| {
            decide(
                c,
                held_by_uid.get(c.uid.as_str()).copied(),
                answered.get(&c.uid),
                retry_failed,
            )
            .map(|a| (c.uid.clone(), a))
        })
        .collect();
    out.extend(
        held.iter()
            .filter(|g| !bound_uids.contains(g.uid.as_str()) && !receiving.contains(&g.uid))
            .map(|g| (g.uid.clone(), Action::StopOrphan)),
    );
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn relaunches_back_off_exponentially_up_to_ten_minutes() {
        let base = Duration::from_secs(30);
        let waits: Vec<u64> = (1..=7)
            .map(|n| relaunch_backoff(n, base).as_secs())
            .collect();
        assert_eq!(waits, vec![30, 60, 120, 240, 480, 600, 600]);
        assert_eq!(relaunch_backoff(u32::MAX, base).as_secs(), 600);
    }

    #[test]
    fn a_held_back_failed_guest_is_not_relaunched_even_on_the_timer() {
        let mut cvm = cvm("u");
        cvm.reported.guest_state = Some(GuestState::Failed);
        let failed = HeldGuest {
            uid: "u".into(),
            namespace: "ns".into(),
            name: "u".into(),
            state: GuestState::Failed,
        };
        assert_eq!(
            decide(&cvm, Some(&failed), None, true),
            Some(Action::Relaunch)
        );
        assert_eq!(decide(&cvm, None, None, true), Some(Action::Launch));
        cvm.relaunch_held = true;
        assert_eq!(decide(&cvm, Some(&failed), None, true), None);
        assert_eq!(decide(&cvm, None, None, true), None);
    }

    use super::*;

    fn key(nonce: Option<&str>, reattest: Option<&str>) -> EvidenceKey {
        EvidenceKey {
            nonce: nonce.map(Into::into),
            reattest: reattest.map(Into::into),
            epoch: None,
        }
    }

    fn running_status(nonce: Option<&str>) -> Reported {
        Reported {
            guest_state: Some(GuestState::Running),
            launched: Some(true),
            launched_reason: None,
            has_evidence: true,
            evidence_nonce: nonce.map(Into::into),
            reattest_due: false,
            evidence_epoch: None,
        }
    }

    #[test]
    fn evidence_older_than_the_reattest_period_is_refreshed() {
        let mut c = cvm("u1");
        c.reported = running_status(Some("aa"));
        let g = held("u1", GuestState::Running);
        let answered = key(Some("aa"), None);
        assert_eq!(decide(&c, Some(&g), Some(&answered), false), None);
        c.reported.reattest_due = true;
        assert_eq!(
            decide(&c, Some(&g), Some(&answered), false),
            Some(Action::RefreshEvidence)
        );
    }

    #[test]
    fn reattest_due_compares_evidence_age_with_the_period() {
        let mut obj: ConfidentialVM = serde_json::from_value(serde_json::json!({
            "apiVersion": "cvmp.io/v1alpha1", "kind": "ConfidentialVM",
            "metadata": {"name": "x", "uid": "u"},
            "spec": {"tee": {"type": "SEV-SNP"}, "resources": {"vcpus": 1, "memoryMiB": 512},
                     "boot": {"firmware": {"name": "f"}},
                     "attestation": {"reattestEvery": "1h"}},
            "status": {"evidence": {"format": "sev-snp-report", "report": "",
                       "collectedAt": "2026-01-01T00:00:00Z"}}
        }))
        .unwrap();
        let t0 = 1_767_225_600; // 2026-01-01T00:00:00Z
        assert!(!reattest_due(&obj, Some(t0 + 3599)));
        assert!(reattest_due(&obj, Some(t0 + 3600)));
        assert!(!reattest_due(&obj, None), "no clock, no judgement");
        obj.spec.attestation = None;
        assert!(
            !reattest_due(&obj, Some(t0 + 99_999)),
            "no period, never due"
        );
    }

    /// A CVM the operator switched to `node` by live migration `m-1`, whose evidence is
    /// bound to migration `epoch` (`None`: the source's, from before the switch).
    fn migrated_cvm(node: &str, epoch: Option<&str>) -> ConfidentialVM {
        let mut evidence = serde_json::json!({"format": "sev-snp-report", "report": "", "nonce": "aa",
                                              "collectedAt": "2026-01-01T00:10:00Z"});
        if let Some(e) = epoch {
            evidence["epoch"] = serde_json::json!(e);
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "cvmp.io/v1alpha1", "kind": "ConfidentialVM",
            "metadata": {"name": "web", "namespace": "ns", "uid": "u",
                         "labels": {"cvmp.io/node": node},
                         "annotations": {cvm_crds::wellknown::ANNOTATION_MIGRATION: "m-1"}},
            "spec": {"tee": {"type": "SEV-SNP"}, "resources": {"vcpus": 1, "memoryMiB": 512},
                     "boot": {"firmware": {"name": "f"}}, "attestation": {"nonce": "aa"}},
            "status": {"nodeName": node, "platform": {"guestState": "Running", "simulated": true},
                       "conditions": [{"type": "Launched", "status": "True", "reason": "GuestRunning",
                                       "message": "running on the source", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
                       "evidence": evidence}
        }))
        .unwrap()
    }

    #[test]
    fn adopted_guest_reports_fresh_evidence_once() {
        // Just switched: the status is the source's (Running, Launched, evidence for the
        // same nonce) and this node holds the receiving guest, running.
        let obj = migrated_cvm("n2", None);
        let c = BoundCvm::of(&obj, "n2").unwrap();
        assert_eq!(c.wanted.epoch.as_deref(), Some("m-1"));
        assert_eq!(c.reported.evidence_epoch, None);
        let g = held("u", GuestState::Running);
        // Whether or not this plugin remembers an answer for the UID (it does not, after
        // a migration; the answered file may be stale), the source's evidence is replaced,
        // together with the platform facts and Launched condition of this node.
        assert_eq!(
            decide(&c, Some(&g), None, false),
            Some(Action::RefreshEvidence)
        );
        assert_eq!(
            decide(&c, Some(&g), Some(&c.wanted), false),
            Some(Action::RefreshEvidence)
        );
        // Evidence bound to an earlier migration is not this one's either, whatever its time.
        let older = BoundCvm::of(&migrated_cvm("n2", Some("m-0")), "n2").unwrap();
        assert_eq!(
            decide(&older, Some(&g), Some(&older.wanted), false),
            Some(Action::RefreshEvidence)
        );
        // Evidence bound to this migration, answered by this plugin: done.
        let fresh = BoundCvm::of(&migrated_cvm("n2", Some("m-1")), "n2").unwrap();
        assert_eq!(decide(&fresh, Some(&g), Some(&fresh.wanted), false), None);
        // An answer recorded before the migration (no epoch) does not count.
        let before = key(Some("aa"), None);
        assert_eq!(
            decide(&fresh, Some(&g), Some(&before), false),
            Some(Action::RefreshEvidence)
        );
        // The receiving guest still launching: wait for it, never launch a second one.
        let launching = held("u", GuestState::Launching);
        assert_eq!(decide(&c, Some(&launching), None, true), None);
        // A CVM that never migrated asks for no epoch.
        let mut plain = migrated_cvm("n2", None);
        plain.metadata.annotations = None;
        let plain = BoundCvm::of(&plain, "n2").unwrap();
        assert_eq!(plain.wanted.epoch, None);
        assert_eq!(decide(&plain, Some(&g), Some(&plain.wanted), false), None);
        // The source no longer has it bound: its copy is an orphan.
        assert_eq!(BoundCvm::of(&obj, "n1"), None);
        let p = plan(
            &[held("u", GuestState::Running)],
            &[],
            &BTreeMap::new(),
            false,
            &BTreeSet::new(),
        );
        assert_eq!(p, vec![("u".to_string(), Action::StopOrphan)]);
    }

    fn cvm(uid: &str) -> BoundCvm {
        BoundCvm {
            uid: uid.into(),
            key: format!("ns/{uid}"),
            deleting: false,
            halted: false,
            launcher_down: false,
            launcher_dir: None,
            relaunch_held: false,
            restart: Restart::Always,
            wanted: key(Some("aa"), None),
            reported: Reported::default(),
        }
    }

    fn held(uid: &str, state: GuestState) -> HeldGuest {
        HeldGuest {
            uid: uid.into(),
            namespace: "ns".into(),
            name: uid.into(),
            state,
        }
    }

    /// name, CVM, held guest, answered key, expected action.
    type Case<'a> = (
        &'a str,
        &'a BoundCvm,
        Option<HeldGuest>,
        Option<&'a EvidenceKey>,
        Option<Action>,
    );

    #[test]
    fn decide_table() {
        use GuestState::*;
        let fresh = cvm("u");
        let mut current = cvm("u");
        current.reported = running_status(Some("aa"));
        let mut new_nonce = current.clone();
        new_nonce.wanted = key(Some("bb"), None);
        let mut reattest = current.clone();
        reattest.wanted = key(Some("aa"), Some("2"));
        let mut lost_status = current.clone();
        lost_status.reported = Reported::default();
        let mut deleting = current.clone();
        deleting.deleting = true;
        let mut deleted_reported = deleting.clone();
        deleted_reported.reported = Reported {
            guest_state: Some(Stopped),
            launched: Some(false),
            launched_reason: Some(crate::status::REASON_STOPPED.into()),
            ..Default::default()
        };
        let mut halted = current.clone();
        halted.halted = true;

        let mut deleting_fresh = fresh.clone();
        deleting_fresh.deleting = true;
        let mut halted_deleting = halted.clone();
        halted_deleting.deleting = true;
        let aa = key(Some("aa"), None);
        let cases: Vec<Case> = vec![
            ("new CVM: launch", &fresh, None, None, Some(Action::Launch)),
            (
                "running, status current: nothing",
                &current,
                Some(held("u", Running)),
                Some(&aa),
                None,
            ),
            (
                "launch in flight: nothing",
                &fresh,
                Some(held("u", Launching)),
                None,
                None,
            ),
            (
                "held but never reported: evidence",
                &fresh,
                Some(held("u", Running)),
                None,
                Some(Action::RefreshEvidence),
            ),
            (
                "nonce changed: evidence",
                &new_nonce,
                Some(held("u", Running)),
                Some(&aa),
                Some(Action::RefreshEvidence),
            ),
            (
                "reattest annotation changed: evidence",
                &reattest,
                Some(held("u", Running)),
                Some(&aa),
                Some(Action::RefreshEvidence),
            ),
            (
                "status lost: evidence again",
                &lost_status,
                Some(held("u", Running)),
                Some(&aa),
                Some(Action::RefreshEvidence),
            ),
            (
                "plugin restarted, answered unknown: evidence",
                &current,
                Some(held("u", Running)),
                None,
                Some(Action::RefreshEvidence),
            ),
            (
                "deleting with guest: stop",
                &deleting,
                Some(held("u", Running)),
                Some(&aa),
                Some(Action::Stop(StopCause::Deleted)),
            ),
            (
                "deleting, guest gone, status old: report",
                &deleting,
                None,
                None,
                Some(Action::ReportStopped(StopCause::Deleted)),
            ),
            (
                "deleting, already reported: nothing",
                &deleted_reported,
                None,
                None,
                None,
            ),
            (
                "deleting, never launched: report so the finalizer can go",
                &deleting_fresh,
                None,
                None,
                Some(Action::ReportStopped(StopCause::Deleted)),
            ),
            (
                "halted: stop",
                &halted,
                Some(held("u", Running)),
                Some(&aa),
                Some(Action::Stop(StopCause::Halted)),
            ),
            (
                "deleting wins over halted",
                &halted_deleting,
                Some(held("u", Running)),
                None,
                Some(Action::Stop(StopCause::Deleted)),
            ),
        ];
        for (name, c, h, answered, want) in cases {
            assert_eq!(decide(c, h.as_ref(), answered, false), want, "{name}");
        }
        // A failed launch waits for the timer.
        let mut failed = fresh.clone();
        failed.reported.guest_state = Some(Failed);
        assert_eq!(decide(&failed, None, None, false), None);
        assert_eq!(decide(&failed, None, None, true), Some(Action::Launch));
        // A guest that died after its launch is reported once, and not relaunched.
        let mut running = fresh.clone();
        running.reported = running_status(None);
        let dead = held("u", GuestState::Failed);
        assert_eq!(
            decide(&running, Some(&dead), None, true),
            Some(Action::ReportFailed)
        );
        // Once reported, the run strategy decides, on the retry timer.
        assert_eq!(decide(&failed, Some(&dead), None, false), None);
        assert_eq!(
            decide(&failed, Some(&dead), None, true),
            Some(Action::Relaunch)
        );
        let mut manual = failed.clone();
        manual.restart = Restart::Never;
        assert_eq!(decide(&manual, Some(&dead), None, true), None);
        assert_eq!(decide(&manual, None, None, true), None, "Manual: no retry");
        let mut on_failure = failed.clone();
        on_failure.restart = Restart::OnFailure;
        assert_eq!(
            decide(&on_failure, Some(&dead), None, true),
            Some(Action::Relaunch)
        );
        // A guest that stopped cleanly: only Always starts it again.
        let ended = held("u", GuestState::Stopped);
        assert_eq!(
            decide(&running, Some(&ended), None, true),
            Some(Action::Relaunch)
        );
        let mut rerun = running.clone();
        rerun.restart = Restart::OnFailure;
        assert_eq!(decide(&rerun, Some(&ended), None, true), None);
        assert_eq!(Restart::of(RunStrategy::Manual), Restart::Never);
        assert_eq!(Restart::of(RunStrategy::RerunOnFailure), Restart::OnFailure);
    }

    #[test]
    fn plan_stops_orphans_and_never_launches_a_held_guest_twice() {
        let mut a = cvm("a");
        a.reported = running_status(Some("aa"));
        let b = cvm("b");
        let held_guests = vec![
            held("a", GuestState::Running),
            held("orphan", GuestState::Running),
        ];
        let answered = BTreeMap::from([("a".to_string(), key(Some("aa"), None))]);
        let none = BTreeSet::new();
        let p = plan(
            &held_guests,
            &[a.clone(), b.clone()],
            &answered,
            false,
            &none,
        );
        assert_eq!(
            p,
            vec![
                ("b".to_string(), Action::Launch),
                ("orphan".to_string(), Action::StopOrphan),
            ]
        );
        // After a restart the same inputs give the same plan: no launch for "a".
        assert_eq!(plan(&held_guests, &[a, b], &answered, true, &none), p);
    }

    #[test]
    fn plan_with_nothing_bound_stops_everything_held() {
        let p = plan(
            &[
                held("x", GuestState::Launching),
                held("y", GuestState::Running),
            ],
            &[],
            &BTreeMap::new(),
            false,
            &BTreeSet::new(),
        );
        assert_eq!(
            p.iter().map(|(_, a)| a.clone()).collect::<Vec<_>>(),
            vec![Action::StopOrphan, Action::StopOrphan]
        );
        assert!(plan(&[], &[], &BTreeMap::new(), true, &BTreeSet::new()).is_empty());
    }

    #[test]
    fn bound_view_requires_node_name_and_uid() {
        use cvm_crds::cvm::ConfidentialVMStatus;
        let spec: cvm_crds::ConfidentialVMSpec = serde_yaml::from_str(
            "tee: {type: SEV-SNP}\nresources: {vcpus: 1, memoryMiB: 512}\nboot: {firmware: {name: ovmf}}\nattestation: {nonce: 'abcd'}\n",
        )
        .unwrap();
        let mut c = ConfidentialVM::new("x", spec);
        c.metadata.namespace = Some("ns".into());
        c.metadata.uid = Some("uid-x".into());
        c.metadata.annotations = Some(BTreeMap::from([(
            ANNOTATION_REATTEST.to_string(),
            "7".to_string(),
        )]));
        assert_eq!(BoundCvm::of(&c, "n1"), None, "not scheduled yet");
        c.status = Some(ConfidentialVMStatus {
            node_name: Some("n2".into()),
            ..Default::default()
        });
        assert_eq!(BoundCvm::of(&c, "n1"), None, "bound elsewhere");
        c.status.as_mut().unwrap().node_name = Some("n1".into());
        let v = BoundCvm::of(&c, "n1").unwrap();
        assert_eq!(v.key, "ns/x");
        assert_eq!(v.wanted, key(Some("abcd"), Some("7")));
        assert!(!v.deleting && !v.halted);
        assert_eq!(v.reported, Reported::default());
        c.metadata.uid = None;
        assert_eq!(BoundCvm::of(&c, "n1"), None);
    }

    #[test]
    fn a_guest_lives_only_while_its_launcher_pod_runs() {
        let mut c = cvm("u");
        c.launcher_down = true;
        let run = |c: &BoundCvm, held: Option<&HeldGuest>| decide(c, held, None, true);
        // No pod yet: nothing is launched, and nothing reported (it never ran).
        assert_eq!(run(&c, None), None);
        // Its pod went after the guest ran: the status says stopped, once.
        c.reported.guest_state = Some(GuestState::Running);
        assert_eq!(
            run(&c, None),
            Some(Action::ReportStopped(StopCause::LauncherDown))
        );
        c.reported.guest_state = Some(GuestState::Stopped);
        c.reported.launched = Some(false);
        c.reported.launched_reason = Some(cvm_crds::wellknown::REASON_LAUNCHER_GONE.into());
        assert_eq!(run(&c, None), None);
        // Stopped as Halted asked, then Manual (no pod yet): it did not stop because its
        // pod went, so that is not reported.
        c.reported.launched_reason = Some(crate::status::REASON_STOPPED.into());
        assert_eq!(run(&c, None), None);
        // Halted after the pod went: the stop is reported as Halted's, so a later Manual
        // gets its pod again.
        c.reported.launched_reason = Some(cvm_crds::wellknown::REASON_LAUNCHER_GONE.into());
        c.halted = true;
        assert_eq!(
            run(&c, None),
            Some(Action::ReportStopped(StopCause::Halted))
        );
        c.halted = false;
        // Its pod went while the guest ran: the guest stops with it.
        let g = held("u", GuestState::Running);
        assert_eq!(
            run(&c, Some(&g)),
            Some(Action::Stop(StopCause::LauncherDown))
        );
        // The pod runs and its launcher answers: launch.
        c.launcher_down = false;
        assert_eq!(run(&c, None), Some(Action::Launch));
        // Deletion and Halted still say why they stop.
        c.launcher_down = true;
        c.deleting = true;
        assert_eq!(run(&c, Some(&g)), Some(Action::Stop(StopCause::Deleted)));
    }
}
