//! AMD SEV-SNP evidence: report parsing ([`report`]), the AMD certificate chain
//! ([`certs`]), policy appraisal ([`policy`]) and verification ([`verify`]).
//!
//! Entry points: [`SnpVerifier::new`] with an [`SnpPolicy`], then
//! [`SnpVerifier::verify`] with the report bytes and the certificates, at a time the
//! caller gives. The result holds named findings and converts to an EAR.

pub mod certs;
pub mod crypto;
pub mod policy;
pub mod report;
/// Kept at its old path for callers; the clock helpers serve TDX too.
pub use crate::time;
pub mod verify;

use thiserror::Error;

pub use certs::{
    parse_certs, Cert, CertError, ChainError, Crl, TrustAnchors, VekKind, VerifiedChain,
};
pub use policy::{
    appraise, report_data_for_nonce, Hex, MinimumTcb, SnpContext, SnpPolicy, SnpTrustedRoot,
};
pub use report::{
    extract_report_bytes, Generation, GuestPolicy, ReportError, SnpReport, TcbVersion,
};
pub use verify::{ChainSummary, SnpAppraisal, SnpEvidence, SnpVerifier, SUBMOD};

/// Errors at the SNP module boundary: input that cannot even be appraised. Evidence
/// that parses but fails checks is not an error; it yields findings.
#[derive(Debug, Error)]
pub enum SnpError {
    #[error("invalid SNP policy: {0}")]
    Policy(String),
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error(transparent)]
    Cert(#[from] CertError),
}
