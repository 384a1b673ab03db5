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
    /// Launched, verified and running as the run strategy asks (operator).
    Ready,
    /// Whether the guest may be live-migrated (operator).
    LiveMigratable,
}

impl ConditionType {
    /// Every condition type, in life-cycle order.
    pub const ALL: [ConditionType; 5] = [
        ConditionType::Scheduled,
        ConditionType::Launched,
        ConditionType::Verified,
        ConditionType::Ready,
        ConditionType::LiveMigratable,
    ];

    /// The spelling used in `status.conditions[].type`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionType::Scheduled => "Scheduled",
            ConditionType::Launched => "Launched",
            ConditionType::Verified => "Verified",
            ConditionType::Ready => "Ready",
            ConditionType::LiveMigratable => "LiveMigratable",
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
