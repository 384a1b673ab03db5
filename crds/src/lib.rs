//! cvmp.io API types: `ConfidentialVM`, `AttestationPolicy`, `ConfidentialVMMigration` and
//! `HostPin`.
//!
//! The CRDs served to the API server come from [`crds`], never from `T::crd()` directly:
//! [`crds`] post-processes the derived schemas (see [`schema`]).
//!
//! [`wire`] is the evidence wire format of `status.evidence`, for its writer and every
//! reader; [`sim_measurement`] the simulated hosts' launch digest of a spec.

pub mod common;
pub mod conditions;
pub mod cvm;
pub mod docs;
pub mod hostpin;
pub mod migration;
pub mod policy;
pub mod schema;
pub mod sim_measurement;
pub mod validate;
pub mod wellknown;
pub mod wire;

pub use common::{
    EvidenceFormat, SnpTcbVersion, TdxTcbStatus, TeeType, TrustClaim, GROUP, VERSION,
};
pub use conditions::{set_condition, ConditionType};
pub use cvm::{ConfidentialVM, ConfidentialVMSpec, ConfidentialVMStatus, CvmPhase};
pub use hostpin::{HardwareIdKind, HostPin, HostPinSpec, PinSource};
pub use migration::{
    ConfidentialVMMigration, ConfidentialVMMigrationSpec, ConfidentialVMMigrationStatus,
    MigrationPhase, MigrationReason,
};
pub use policy::{AttestationPolicy, AttestationPolicySpec};
pub use schema::{crds, crds_yaml};
pub use validate::{Validate, ValidationError};
