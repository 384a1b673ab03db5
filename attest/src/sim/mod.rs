//! Simulated platforms that emit evidence in the vendors' exact binary layouts, signed
//! by their own generated roots (never trusted unless a policy lists them).
//!
//! SEV-SNP lives here ([`snp`]); the TDX simulator is `crate::tdx::sim`.

pub mod snp;

pub use snp::{ReportRequest, SimError, SimSnpConfig, SimSnpEvidence, SimSnpPlatform};
