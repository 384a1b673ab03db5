//! `ConfidentialVMMigration`: a request to live-migrate a ConfidentialVM.
//!
//! The protocol, all through this object's status (each party writes only its share):
//! 1. The operator accepts or refuses the request, and picks `targetNode` (phase Pending).
//! 2. The target's node plugin prepares a receiving guest from the same launch inputs and
//!    reports its evidence, bound to the migration's UID (purpose `migration` in
//!    docs/evidence-binding.md)
//!    (`targetEvidence`, condition `TargetPrepared`); the operator moves to TargetReady.
//! 3. The operator verifies that evidence against the CVM's own policy
//!    (`targetAttestation`): TargetAttested, or Failed before any guest state moves.
//! 4. The source's node plugin transfers the guest (condition `Transferred`: Unknown while
//!    it runs, then True or False); the operator shows Transferring.
//! 5. On `Transferred=True` the operator rebinds the CVM to the target (condition
//!    `Switched`); the target's plugin adopts the guest and reports fresh evidence; once
//!    the CVM is Verified on the target with evidence newer than the switch: Succeeded.
//!
//! A failure before the switch leaves the guest running on the source (rolled back): the
//! target's plugin stops its receiving guest when the migration ends.

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::DNS_SUBDOMAIN_PATTERN;
use crate::cvm::{AttestationResult, Evidence};

/// Condition the target's node plugin sets: True once the receiving guest is ready and its
/// evidence is in `targetEvidence`; False (with the reason) when it cannot be prepared.
pub const CONDITION_TARGET_PREPARED: &str = "TargetPrepared";
/// Condition the source's node plugin sets: Unknown while guest state is being sent, True
/// when the transfer completed, False when it failed (the guest keeps running at the source).
pub const CONDITION_TRANSFERRED: &str = "Transferred";
/// Condition the operator sets when it rebinds the CVM to the target node.
pub const CONDITION_SWITCHED: &str = "Switched";

/// A request to live-migrate one ConfidentialVM to another node.
// clippy reads the repeated `type_ = "string"` of separate printcolumn(...) groups as
// duplicated attributes; they are not.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "cvmp.io",
    version = "v1alpha1",
    kind = "ConfidentialVMMigration",
    plural = "confidentialvmmigrations",
    singular = "confidentialvmmigration",
    shortname = "cvmmig",
    category = "cvmp",
    namespaced,
    status = "ConfidentialVMMigrationStatus",
    derive = "PartialEq",
    doc = "A request to live-migrate a ConfidentialVM; refused when the guest's policy forbids migration.",
    printcolumn(
        name = "CVM",
        type_ = "string",
        json_path = ".spec.cvmName",
        description = "ConfidentialVM to migrate"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Migration phase"
    ),
    printcolumn(
        name = "Source",
        type_ = "string",
        json_path = ".status.sourceNode",
        description = "Node the guest leaves"
    ),
    printcolumn(
        name = "Target",
        type_ = "string",
        json_path = ".status.targetNode",
        description = "Node the guest moves to"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("spec is immutable: create a new ConfidentialVMMigration instead"))]
pub struct ConfidentialVMMigrationSpec {
    /// Name of the ConfidentialVM, in this namespace, to migrate.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub cvm_name: String,
    /// Node to migrate to. When unset, the operator picks one the way it schedules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub target_node: Option<String>,
}

/// Progress of a migration.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConfidentialVMMigrationStatus {
    /// Pending → TargetReady → TargetAttested → Transferring → Succeeded, or Failed (rolled back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<MigrationPhase>,
    /// Node the guest ran on when the migration started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_node: Option<String>,
    /// Node chosen to receive the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,
    /// Standard conditions keyed by type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Evidence of the receiving guest on the target node, answering the migration's
    /// challenge (written by the target's node plugin; untrusted until verified).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_evidence: Option<Evidence>,
    /// The operator's appraisal of `targetEvidence` under the CVM's attestation policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_attestation: Option<AttestationResult>,
    /// Why the migration failed or was refused, e.g. "SEVNotLiveMigratable: spec.tee.policy.migratable is false".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Why the migration failed, as a reason word (operator): the first word of `message`
    /// too, and the reason of the Warning event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<MigrationReason>,
    /// When the transfer started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When the migration reached Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Time>,
}

/// Phase of a migration.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[schemars(transform = crate::common::drop_description)]
pub enum MigrationPhase {
    /// Accepted; checking that the guest may migrate and choosing a target.
    #[default]
    Pending,
    /// A receiving guest is prepared on the target node.
    TargetReady,
    /// The target platform's evidence was verified.
    TargetAttested,
    /// Guest state is being transferred.
    Transferring,
    /// The guest runs on the target node.
    Succeeded,
    /// The migration was refused or failed; the guest stays on the source node.
    Failed,
}

impl MigrationPhase {
    /// Whether the migration is over.
    pub fn is_terminal(self) -> bool {
        matches!(self, MigrationPhase::Succeeded | MigrationPhase::Failed)
    }
}

impl fmt::Display for MigrationPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            MigrationPhase::Pending => "Pending",
            MigrationPhase::TargetReady => "TargetReady",
            MigrationPhase::TargetAttested => "TargetAttested",
            MigrationPhase::Transferring => "Transferring",
            MigrationPhase::Succeeded => "Succeeded",
            MigrationPhase::Failed => "Failed",
        };
        f.write_str(s)
    }
}

/// Why a migration failed.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[schemars(transform = crate::common::drop_description)]
pub enum MigrationReason {
    /// The CVM does not exist (or was deleted after the switch).
    #[serde(rename = "CVMNotFound")]
    CvmNotFound,
    /// The CVM is being deleted.
    #[serde(rename = "CVMDeleting")]
    CvmDeleting,
    /// SEV and SEV-ES guests have no migration agent.
    #[serde(rename = "SEVNotLiveMigratable")]
    SevNotLiveMigratable,
    /// spec.tee.policy.migratable is false.
    PolicyForbidsMigration,
    /// The CVM is not Verified on a node.
    #[serde(rename = "CVMNotVerified")]
    CvmNotVerified,
    /// Another migration of the CVM is in progress.
    MigrationInProgress,
    /// No node can take the CVM (or not the requested one).
    NoTarget,
    /// The CVM's AttestationPolicy does not exist.
    PolicyNotFound,
    /// The target's plugin could not prepare a receiving guest.
    TargetNotPrepared,
    /// The target's evidence did not pass the CVM's policy.
    TargetAttestationFailed,
    /// The source's plugin failed to send the guest.
    TransferFailed,
    /// A transfer was reported before the operator attested the target.
    TransferBeforeAttestation,
    /// The CVM is bound to neither the source nor the target.
    #[serde(rename = "CVMMoved")]
    CvmMoved,
    /// After the switch, the guest's evidence from the target failed verification.
    TargetVerificationFailed,
    /// A step did not happen within the operator's migration timeout.
    Timeout,
}

impl MigrationReason {
    /// The Kubernetes reason string (as serialised).
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationReason::CvmNotFound => "CVMNotFound",
            MigrationReason::CvmDeleting => "CVMDeleting",
            MigrationReason::SevNotLiveMigratable => "SEVNotLiveMigratable",
            MigrationReason::PolicyForbidsMigration => "PolicyForbidsMigration",
            MigrationReason::CvmNotVerified => "CVMNotVerified",
            MigrationReason::MigrationInProgress => "MigrationInProgress",
            MigrationReason::NoTarget => "NoTarget",
            MigrationReason::PolicyNotFound => "PolicyNotFound",
            MigrationReason::TargetNotPrepared => "TargetNotPrepared",
            MigrationReason::TargetAttestationFailed => "TargetAttestationFailed",
            MigrationReason::TransferFailed => "TransferFailed",
            MigrationReason::TransferBeforeAttestation => "TransferBeforeAttestation",
            MigrationReason::CvmMoved => "CVMMoved",
            MigrationReason::TargetVerificationFailed => "TargetVerificationFailed",
            MigrationReason::Timeout => "Timeout",
        }
    }
}

impl fmt::Display for MigrationReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod reason_tests {
    use super::*;

    #[test]
    fn reasons_serialise_to_their_kubernetes_words() {
        for r in [
            MigrationReason::CvmNotFound,
            MigrationReason::SevNotLiveMigratable,
            MigrationReason::TargetAttestationFailed,
            MigrationReason::CvmMoved,
            MigrationReason::Timeout,
        ] {
            assert_eq!(serde_json::to_value(r).unwrap(), r.as_str());
            assert_eq!(
                serde_json::from_value::<MigrationReason>(r.as_str().into()).unwrap(),
                r
            );
        }
    }
}
