//! Pure attestation library for cvm-operator.
//!
//! No Kubernetes types and no async: evidence formats (SEV-SNP reports, TDX quotes),
//! verification against vendor roots, policy appraisal, EAR results and a simulated
//! platform that emits evidence in the vendor binary layouts.
//!
//! Every check that fails produces a [`Finding`] that names itself and says what was
//! expected and what was seen, so that a user can act on it.

pub mod binding;
pub mod ear;
pub mod finding;
pub mod sim;
pub mod snp;
pub mod tdx;
#[doc(hidden)]
pub mod testvectors;
pub mod time;

pub use finding::{Claim, Finding, Severity};
