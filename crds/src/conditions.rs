//! Standard condition helpers (pure: the caller passes the clock).

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// `status` value of a condition that holds.
pub const STATUS_TRUE: &str = "True";
/// `status` value of a condition that does not hold.
pub const STATUS_FALSE: &str = "False";
/// `status` value of a condition whose state is not known.
pub const STATUS_UNKNOWN: &str = "Unknown";

/// Condition types on a ConfidentialVM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConditionType {
    /// The operator bound the guest to a node (operator).
    Scheduled,
    /// The node plugin launched the guest (node plugin).
    Launched,
    /// The operator verified the guest's latest evidence (operator only).
    Verified,
    /// As the spec asks, with the operator's checks done (operator): running and
    /// verified; running and handed to its owner for verification (SEV, SEV-ES, whose
    /// Verified stays False); or stopped as runStrategy Halted asks.
    Ready,
    /// Whether the guest may be live-migrated (operator).
    LiveMigratable,
    /// kstatus convention: the operator is still working toward the CVM's verdict
    /// (operator). GitOps tools read True as "in progress".
    Reconciling,
    /// kstatus convention: the CVM cannot progress until someone acts, e.g. its evidence
    /// was rejected or no node can host it (operator). GitOps tools read True as "failed".
    Stalled,
}

impl ConditionType {
    /// Every condition type, in life-cycle order.
    pub const ALL: [ConditionType; 7] = [
        ConditionType::Scheduled,
        ConditionType::Launched,
        ConditionType::Verified,
        ConditionType::Ready,
        ConditionType::LiveMigratable,
        ConditionType::Reconciling,
        ConditionType::Stalled,
    ];

    /// The spelling used in `status.conditions[].type`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionType::Scheduled => "Scheduled",
            ConditionType::Launched => "Launched",
            ConditionType::Verified => "Verified",
            ConditionType::Ready => "Ready",
            ConditionType::LiveMigratable => "LiveMigratable",
            ConditionType::Reconciling => "Reconciling",
            ConditionType::Stalled => "Stalled",
        }
    }
}

impl fmt::Display for ConditionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Builds a condition; `status` is a bool because callers decide True/False, and Unknown
/// is spelled out with [`unknown_condition`].
pub fn new_condition(
    type_: ConditionType,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: Time,
) -> Condition {
    Condition {
        type_: type_.as_str().to_string(),
        status: if status { STATUS_TRUE } else { STATUS_FALSE }.to_string(),
        reason: reason.to_string(),
        message: message.into(),
        observed_generation,
        last_transition_time: now,
    }
}

/// Builds a condition whose state is not known yet.
pub fn unknown_condition(
    type_: ConditionType,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: Time,
) -> Condition {
    let mut c = new_condition(type_, false, reason, message, observed_generation, now);
    c.status = STATUS_UNKNOWN.to_string();
    c
}

/// The condition of the given type.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of the given type is present with status `True`.
pub fn is_true(conditions: &[Condition], type_: ConditionType) -> bool {
    find(conditions, type_.as_str()).is_some_and(|c| c.status == STATUS_TRUE)
}

/// Inserts or updates `new` by type. When the status is unchanged the existing
/// `lastTransitionTime` is kept, because it marks the last *transition*, not the last write
/// (and rewriting it would make every reconcile a status change). Returns whether anything
/// changed, so callers can skip a no-op write.
pub fn set_condition(conditions: &mut Vec<Condition>, new: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        None => {
            conditions.push(new);
            true
        }
        Some(existing) => {
            let mut merged = new;
            if merged.status == existing.status {
                merged.last_transition_time = existing.last_transition_time.clone();
            }
            if *existing == merged {
                false
            } else {
                *existing = merged;
                true
            }
        }
    }
}

/// Removes the condition of the given type; returns whether one was present.
pub fn remove_condition(conditions: &mut Vec<Condition>, type_: ConditionType) -> bool {
    let before = conditions.len();
    conditions.retain(|c| c.type_ != type_.as_str());
    conditions.len() != before
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn t(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn set_condition_keeps_transition_time_when_status_unchanged() {
        let mut cs = Vec::new();
        let c1 = new_condition(
            ConditionType::Verified,
            false,
            "Pending",
            "waiting",
            Some(1),
            t(100),
        );
        assert!(set_condition(&mut cs, c1));
        // Same status, new message: updated, but the transition time stays.
        let c2 = new_condition(
            ConditionType::Verified,
            false,
            "MeasurementMismatch",
            "expected ab, reported cd",
            Some(2),
            t(200),
        );
        assert!(set_condition(&mut cs, c2));
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0].last_transition_time, t(100));
        assert_eq!(cs[0].reason, "MeasurementMismatch");
        assert_eq!(cs[0].observed_generation, Some(2));
        // Identical write: no change reported.
        let c3 = new_condition(
            ConditionType::Verified,
            false,
            "MeasurementMismatch",
            "expected ab, reported cd",
            Some(2),
            t(300),
        );
        assert!(!set_condition(&mut cs, c3));
        assert_eq!(cs[0].last_transition_time, t(100));
        // Status flips: transition time moves.
        let c4 = new_condition(
            ConditionType::Verified,
            true,
            "Affirming",
            "all checks passed",
            Some(2),
            t(400),
        );
        assert!(set_condition(&mut cs, c4));
        assert_eq!(cs[0].last_transition_time, t(400));
        assert!(is_true(&cs, ConditionType::Verified));
    }

    #[test]
    fn conditions_are_keyed_by_type() {
        let mut cs = Vec::new();
        for ty in ConditionType::ALL {
            set_condition(&mut cs, unknown_condition(ty, "Init", "", None, t(1)));
        }
        assert_eq!(cs.len(), ConditionType::ALL.len());
        assert_eq!(
            find(&cs, "LiveMigratable").map(|c| c.status.as_str()),
            Some(STATUS_UNKNOWN)
        );
        assert!(!is_true(&cs, ConditionType::Ready));
        assert!(remove_condition(&mut cs, ConditionType::Ready));
        assert!(!remove_condition(&mut cs, ConditionType::Ready));
        assert_eq!(cs.len(), ConditionType::ALL.len() - 1);
    }
}
