//! Intel TDX evidence: DCAP quote v4/v5 decoding, offline verification through
//! `dcap-qvl` with caller-supplied collateral, policy appraisal into named
//! [`Finding`]s, and a simulated TDX platform ([`sim`]).
//!
//! The entry point is [`verify_quote`] (or [`TdxVerifier`] to reuse parsed
//! collateral). It is pure and synchronous: the time is an argument.
//!
//! Trust: the PCK chain and the collateral must end at a root the policy lists.
//! The default policy lists only Intel's SGX Root CA (built in); a simulated root is
//! trusted only when a policy names its SHA-256 fingerprint.

use serde::{Deserialize, Serialize};

use crate::finding::{Claim, Finding};

mod hexser;
pub mod policy;
pub mod quote;
pub mod sim;
mod verify;

pub use policy::{
    appraise, report_data_for_nonce, AppraisalContext, TcbVerdict, TdxPolicy, TdxTcbStatus,
    TrustedRoot,
};
pub use quote::{DecodedTdQuote, TdAttributes, TdReportKind};
pub use sim::{SimTdxEvidence, SimTdxPlatform, TdQuoteRequest};
pub use verify::TdxVerifier;

/// Intel SGX Root CA (DER), the anchor of every genuine PCK chain. SHA-256
/// 44a0196b…74d3; the same certificate dcap-qvl embeds (which it does not export).
pub const INTEL_SGX_ROOT_CA_DER: &[u8] = include_bytes!("intel_sgx_root_ca.der");

/// Errors at the TDX module boundary: input we cannot even appraise. A quote that
/// parses but fails verification is not an error; it yields findings.
#[derive(Debug, thiserror::Error)]
pub enum TdxError {
    #[error("malformed TDX quote: {0}")]
    MalformedQuote(String),
    #[error("not a TDX quote: TEE type {tee_type:#x} in a v{version} quote (TDX is 0x81); SGX enclave quotes are not appraised as TDX evidence")]
    NotTdx { tee_type: u32, version: u16 },
    #[error("unsupported TDX quote version {0}: only v4 and v5 exist")]
    UnsupportedVersion(u16),
    #[error(
        "unreadable TDX collateral (expected the QuoteCollateralV3 JSON a PCCS client writes): {0}"
    )]
    Collateral(String),
    #[error("invalid TDX policy: {0}")]
    Policy(String),
    #[error("TDX simulator: {0}")]
    Simulator(String),
}

/// The outcome of verifying and appraising one TDX quote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TdxAppraisal {
    /// The quote's fields (as decoded; trustworthy only when `verified`).
    pub decoded: DecodedTdQuote,
    /// Signatures, chains, CRLs and collateral all verified up to a trusted root.
    pub verified: bool,
    /// Intel's TCB status for this platform; `None` when not verified.
    pub tcb_status: Option<TdxTcbStatus>,
    pub advisory_ids: Vec<String>,
    /// `sha256:<hex>` of the last certificate of the PCK chain.
    pub root_fingerprint: Option<String>,
    /// The platform's hardware identity from the verified PCK certificate's SGX extension:
    /// the platform instance ID on multi-package platforms, else the PPID. `None` unless
    /// `verified`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform_id: Option<Vec<u8>>,
    pub findings: Vec<Finding>,
    /// AR4SI claims whose checks ran on verified evidence (a finding on the same
    /// claim still outranks this): feed both to the EAR builder,
    /// `ear::Appraisal::from_findings(a.findings, a.affirmed)`.
    pub affirmed: Vec<Claim>,
}

impl TdxAppraisal {
    /// Verified, and no finding contraindicates the evidence.
    pub fn is_affirmed(&self) -> bool {
        self.verified && !self.findings.iter().any(Finding::is_contraindicated)
    }

    /// The EAR appraisal (AR4SI vector and status) of this outcome; wrap it with
    /// `to_submod` into an [`crate::ear::Ear`].
    pub fn ear_appraisal(&self) -> crate::ear::Appraisal {
        crate::ear::Appraisal::from_findings(self.findings.clone(), self.affirmed.iter().copied())
    }

    /// The findings that are not merely informational.
    pub fn problems(&self) -> impl Iterator<Item = &Finding> {
        self.findings
            .iter()
            .filter(|f| f.severity != crate::finding::Severity::Info)
    }
}

/// Verify a TDX quote offline against `collateral_json` (dcap-qvl `QuoteCollateralV3`
/// JSON) and appraise it under `policy` at `ctx.now_unix`.
pub fn verify_quote(
    quote: &[u8],
    collateral_json: &[u8],
    policy: &TdxPolicy,
    ctx: &AppraisalContext,
) -> Result<TdxAppraisal, TdxError> {
    TdxVerifier::new(policy.clone(), collateral_json)?.verify(quote, ctx)
}

pub(crate) use crate::time::rfc3339;
