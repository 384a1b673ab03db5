//! TDX appraisal policy and the pure appraisal of a decoded, verified quote.
//!
//! Everything here is a plain function over plain structs: no I/O, no clock, no
//! crypto beyond hashing the nonce, so that the operator, the CLI and tests agree.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256, Sha512};

use super::hexser;
use super::quote::{td_attr, DecodedTdQuote};
use super::TdxError;
use crate::finding::{Claim, Finding, Severity};

/// Intel's TCB statuses, as the TCB info and QE identity JSON spell them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TdxTcbStatus {
    UpToDate,
    SWHardeningNeeded,
    ConfigurationNeeded,
    ConfigurationAndSWHardeningNeeded,
    OutOfDate,
    OutOfDateConfigurationNeeded,
    Revoked,
    /// TD 1.5: launched on an out-of-date TCB, current TCB is fine.
    TDRelaunchAdvised,
    TDRelaunchAdvisedConfigurationNeeded,
}

impl TdxTcbStatus {
    pub const ALL: [TdxTcbStatus; 9] = [
        TdxTcbStatus::UpToDate,
        TdxTcbStatus::SWHardeningNeeded,
        TdxTcbStatus::ConfigurationNeeded,
        TdxTcbStatus::ConfigurationAndSWHardeningNeeded,
        TdxTcbStatus::OutOfDate,
        TdxTcbStatus::OutOfDateConfigurationNeeded,
        TdxTcbStatus::Revoked,
        TdxTcbStatus::TDRelaunchAdvised,
        TdxTcbStatus::TDRelaunchAdvisedConfigurationNeeded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TdxTcbStatus::UpToDate => "UpToDate",
            TdxTcbStatus::SWHardeningNeeded => "SWHardeningNeeded",
            TdxTcbStatus::ConfigurationNeeded => "ConfigurationNeeded",
            TdxTcbStatus::ConfigurationAndSWHardeningNeeded => "ConfigurationAndSWHardeningNeeded",
            TdxTcbStatus::OutOfDate => "OutOfDate",
            TdxTcbStatus::OutOfDateConfigurationNeeded => "OutOfDateConfigurationNeeded",
            TdxTcbStatus::Revoked => "Revoked",
            TdxTcbStatus::TDRelaunchAdvised => "TDRelaunchAdvised",
            TdxTcbStatus::TDRelaunchAdvisedConfigurationNeeded => {
                "TDRelaunchAdvisedConfigurationNeeded"
            }
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

impl fmt::Display for TdxTcbStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A root of trust the policy accepts for the PCK and collateral chains.
///
/// Written as a string: `intel-sgx-root-ca` (the built-in Intel SGX Root CA) or
/// `sha256:<64 hex>`, the SHA-256 of a root certificate's DER (how a simulated root
/// is trusted, see [`super::sim::SimTdxPlatform::root_fingerprint`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum TrustedRoot {
    IntelSgxRootCa,
    Sha256([u8; 32]),
}

impl TrustedRoot {
    /// Does this entry name the root certificate `der`?
    pub fn matches(&self, der: &[u8]) -> bool {
        match self {
            TrustedRoot::IntelSgxRootCa => der == super::INTEL_SGX_ROOT_CA_DER,
            TrustedRoot::Sha256(fp) => Sha256::digest(der)[..] == fp[..],
        }
    }

    pub fn fingerprint_of(der: &[u8]) -> TrustedRoot {
        TrustedRoot::Sha256(Sha256::digest(der).into())
    }
}

impl fmt::Display for TrustedRoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrustedRoot::IntelSgxRootCa => f.write_str("intel-sgx-root-ca"),
            TrustedRoot::Sha256(fp) => write!(f, "sha256:{}", hex::encode(fp)),
        }
    }
}

impl TryFrom<String> for TrustedRoot {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let t = s.trim();
        if t == "intel-sgx-root-ca" {
            return Ok(TrustedRoot::IntelSgxRootCa);
        }
        let Some(h) = t.strip_prefix("sha256:") else {
            return Err(format!(
                "trusted root {s:?}: expected \"intel-sgx-root-ca\" or \"sha256:<64 hex digits>\""
            ));
        };
        // Accept the colon-separated form openssl prints, too.
        let h: String = h.chars().filter(|c| *c != ':').collect();
        let bytes = hexser::decode(&h)?;
        let fp: [u8; 32] = bytes
            .try_into()
            .map_err(|_| format!("trusted root {s:?}: a SHA-256 fingerprint has 32 bytes"))?;
        Ok(TrustedRoot::Sha256(fp))
    }
}

impl From<TrustedRoot> for String {
    fn from(r: TrustedRoot) -> String {
        r.to_string()
    }
}

/// What a TDX quote must satisfy. Deserializes from JSON/YAML with camelCase keys;
/// every field has a default, so `{}` is the strict default policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct TdxPolicy {
    /// Roots the PCK and collateral chains may end at. Default: Intel's only.
    pub trusted_roots: Vec<TrustedRoot>,
    /// TCB statuses accepted. `UpToDate` affirms; any other listed status is
    /// accepted with a warning. Default: `[UpToDate]`.
    pub accepted_tcb_statuses: Vec<TdxTcbStatus>,
    /// Advisory IDs (e.g. `INTEL-SA-00837`) refused even when the status is accepted.
    pub rejected_advisory_ids: Vec<String>,
    /// Acceptable MRTD values (48 bytes each, hex); empty = MRTD not checked.
    #[serde(with = "hexser::vec")]
    pub mrtd: Vec<Vec<u8>>,
    #[serde(with = "hexser::opt")]
    pub rtmr0: Option<Vec<u8>>,
    #[serde(with = "hexser::opt")]
    pub rtmr1: Option<Vec<u8>>,
    #[serde(with = "hexser::opt")]
    pub rtmr2: Option<Vec<u8>>,
    #[serde(with = "hexser::opt")]
    pub rtmr3: Option<Vec<u8>>,
    /// Expected MRCONFIGID (48 bytes): binds the host-supplied init data.
    #[serde(with = "hexser::opt")]
    pub mr_config_id: Option<Vec<u8>>,
    /// Accept a TD whose DEBUG attribute is set (never in production).
    pub allow_debug: bool,
    /// Refuse evidence that is not bound to a verifier nonce.
    pub require_nonce: bool,
    /// Maximum age of the evidence, from its collection time, in seconds.
    pub max_evidence_age_secs: Option<u64>,
}

impl Default for TdxPolicy {
    fn default() -> Self {
        TdxPolicy {
            trusted_roots: vec![TrustedRoot::IntelSgxRootCa],
            accepted_tcb_statuses: vec![TdxTcbStatus::UpToDate],
            rejected_advisory_ids: Vec::new(),
            mrtd: Vec::new(),
            rtmr0: None,
            rtmr1: None,
            rtmr2: None,
            rtmr3: None,
            mr_config_id: None,
            allow_debug: false,
            require_nonce: false,
            max_evidence_age_secs: None,
        }
    }
}

impl TdxPolicy {
    /// Reject reference values of the wrong size up front: a 32-byte "MRTD" would
    /// otherwise just never match and look like a measurement mismatch.
    pub fn validate(&self) -> Result<(), TdxError> {
        let check = |name: &str, v: &[u8]| {
            if v.len() == 48 {
                Ok(())
            } else {
                Err(TdxError::Policy(format!(
                    "{name} must be 48 bytes (96 hex digits), got {} bytes",
                    v.len()
                )))
            }
        };
        for m in &self.mrtd {
            check("mrtd", m)?;
        }
        for (i, r) in self.rtmrs().iter().enumerate() {
            if let Some(r) = r {
                check(&format!("rtmr{i}"), r)?;
            }
        }
        if let Some(c) = &self.mr_config_id {
            check("mrConfigId", c)?;
        }
        if self.trusted_roots.is_empty() {
            return Err(TdxError::Policy(
                "trustedRoots is empty: no TDX evidence could ever verify".into(),
            ));
        }
        Ok(())
    }

    pub fn rtmrs(&self) -> [&Option<Vec<u8>>; 4] {
        [&self.rtmr0, &self.rtmr1, &self.rtmr2, &self.rtmr3]
    }

    /// The default policy plus trust in one extra root (e.g. the simulator's).
    pub fn trusting(root: TrustedRoot) -> Self {
        let mut p = TdxPolicy::default();
        p.trusted_roots.push(root);
        p
    }
}

/// What the caller knows besides the evidence: the clock, its nonce, and when the
/// evidence was collected. Time is passed in, never read, to keep appraisal pure.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppraisalContext {
    /// Verification time, unix seconds.
    pub now_unix: u64,
    /// The verifier's challenge; the quote's report_data must be SHA-512(nonce).
    pub nonce: Option<Vec<u8>>,
    /// When the evidence was collected, unix seconds (from the evidence record).
    pub evidence_time_unix: Option<u64>,
}

impl AppraisalContext {
    pub fn at(now_unix: u64) -> Self {
        AppraisalContext {
            now_unix,
            ..Default::default()
        }
    }

    pub fn with_nonce(mut self, nonce: &[u8]) -> Self {
        self.nonce = Some(nonce.to_vec());
        self
    }
}

/// The report_data a quote must carry for `nonce`: SHA-512(nonce), all 64 bytes.
/// The SEV-SNP side uses the same binding, so one nonce serves both.
pub fn report_data_for_nonce(nonce: &[u8]) -> [u8; 64] {
    Sha512::digest(nonce).into()
}

/// The TCB outcome dcap-qvl established for a verified quote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcbVerdict {
    pub status: TdxTcbStatus,
    pub advisory_ids: Vec<String>,
}

/// Allowed clock skew between the evidence's collection time and ours.
const CLOCK_SKEW_SECS: u64 = 300;

/// Appraise a decoded quote against `policy`. `tcb` is `None` when the quote did not
/// verify (the hardware findings then already contraindicate it); the other checks
/// still run so that the user sees every problem at once.
pub fn appraise(
    q: &DecodedTdQuote,
    tcb: Option<&TcbVerdict>,
    policy: &TdxPolicy,
    ctx: &AppraisalContext,
) -> Vec<Finding> {
    let mut out = Vec::new();
    if let Some(tcb) = tcb {
        appraise_tcb(tcb, policy, &mut out);
    }
    appraise_measurements(q, policy, &mut out);
    appraise_attributes(q, policy, &mut out);
    appraise_binding(q, policy, ctx, &mut out);
    out
}

fn list<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn appraise_tcb(tcb: &TcbVerdict, policy: &TdxPolicy, out: &mut Vec<Finding>) {
    let advisories = if tcb.advisory_ids.is_empty() {
        String::new()
    } else {
        format!("; advisories: {}", tcb.advisory_ids.join(", "))
    };
    let accepted = policy.accepted_tcb_statuses.contains(&tcb.status);
    if !accepted {
        let f = Finding::new(
            "tcb-status-not-accepted",
            Claim::FileSystem,
            Severity::Contraindicated,
            format!(
                "TCB status {} is not acceptable (allowed: {}){advisories}",
                tcb.status,
                list(&policy.accepted_tcb_statuses)
            ),
        )
        .with_values(list(&policy.accepted_tcb_statuses), tcb.status.to_string());
        out.push(f);
    } else if tcb.status != TdxTcbStatus::UpToDate {
        let f = Finding::new(
            "tcb-status-warning",
            Claim::FileSystem,
            Severity::Warning,
            format!(
                "TCB status {} is accepted by policy but the platform needs attention{advisories}",
                tcb.status
            ),
        )
        .with_values(TdxTcbStatus::UpToDate.to_string(), tcb.status.to_string());
        out.push(f);
    }
    let rejected: Vec<&String> = tcb
        .advisory_ids
        .iter()
        .filter(|a| {
            policy
                .rejected_advisory_ids
                .iter()
                .any(|r| r.eq_ignore_ascii_case(a))
        })
        .collect();
    if !rejected.is_empty() {
        let mut f = Finding::new(
            "tcb-advisory-rejected",
            Claim::FileSystem,
            Severity::Contraindicated,
            format!(
                "platform is affected by advisories the policy refuses: {}",
                list(&rejected)
            ),
        );
        f.reported = list(&rejected);
        out.push(f);
    }
}

fn appraise_measurements(q: &DecodedTdQuote, policy: &TdxPolicy, out: &mut Vec<Finding>) {
    if policy.mrtd.is_empty() {
        out.push(Finding::new(
            "mrtd-not-checked",
            Claim::Executables,
            Severity::Info,
            format!(
                "policy lists no reference MRTD; reported {}",
                hex::encode(&q.mr_td)
            ),
        ));
    } else if !policy.mrtd.contains(&q.mr_td) {
        let expected = policy
            .mrtd
            .iter()
            .map(hex::encode)
            .collect::<Vec<_>>()
            .join(" or ");
        out.push(Finding::mismatch(
            "mrtd-mismatch",
            Claim::Executables,
            "mrtd",
            expected,
            hex::encode(&q.mr_td),
        ));
    }
    for (i, want) in policy.rtmrs().into_iter().enumerate() {
        let (Some(want), Some(got)) = (want, q.rtmrs.get(i)) else {
            continue;
        };
        if want != got {
            out.push(Finding::mismatch(
                format!("rtmr{i}-mismatch"),
                Claim::Executables,
                &format!("rtmr{i}"),
                hex::encode(want),
                hex::encode(got),
            ));
        }
    }
}

fn appraise_attributes(q: &DecodedTdQuote, policy: &TdxPolicy, out: &mut Vec<Finding>) {
    let raw = q.td_attributes.raw;
    let tud = raw & (td_attr::DEBUG | td_attr::TUD_PROFILING);
    if tud != 0 {
        let what = if raw & td_attr::DEBUG != 0 {
            "DEBUG"
        } else {
            "a TD-under-debug (profiling)"
        };
        let severity = if policy.allow_debug {
            Severity::Warning
        } else {
            Severity::Contraindicated
        };
        let f = Finding::new(
            "td-debug-enabled",
            Claim::Configuration,
            severity,
            format!(
                "TD attributes {raw:#018x} have {what} set: the host can read and change the TD's memory{}",
                if policy.allow_debug { " (allowed by policy)" } else { "" }
            ),
        )
        .with_values("DEBUG off", format!("{raw:#018x}"));
        out.push(f);
    }
}

fn appraise_binding(
    q: &DecodedTdQuote,
    policy: &TdxPolicy,
    ctx: &AppraisalContext,
    out: &mut Vec<Finding>,
) {
    if let Some(want) = &policy.mr_config_id {
        if *want != q.mr_config_id {
            out.push(Finding::mismatch(
                "mrconfigid-mismatch",
                Claim::InstanceIdentity,
                "mrconfigid",
                hex::encode(want),
                hex::encode(&q.mr_config_id),
            ));
        }
    }
    match &ctx.nonce {
        Some(nonce) => {
            let want = report_data_for_nonce(nonce);
            if want.as_slice() != q.report_data.as_slice() {
                let mut f = Finding::mismatch(
                    "report-data-mismatch",
                    Claim::InstanceIdentity,
                    "report_data",
                    hex::encode(want),
                    hex::encode(&q.report_data),
                );
                f.message = format!(
                    "report_data mismatch: expected SHA-512 of the challenge = {}, reported {} (evidence for another CVM, nonce or guest instance, or replayed?)",
                    f.expected, f.reported
                );
                out.push(f);
            }
        }
        None if policy.require_nonce => out.push(Finding::new(
            "nonce-missing",
            Claim::InstanceIdentity,
            Severity::Contraindicated,
            "policy requires evidence bound to a verifier nonce, but no nonce was given",
        )),
        None => {}
    }
    if let Some(max) = policy.max_evidence_age_secs {
        match ctx.evidence_time_unix {
            Some(t) if t > ctx.now_unix.saturating_add(CLOCK_SKEW_SECS) => {
                out.push(Finding::new(
                    "evidence-from-future",
                    Claim::InstanceIdentity,
                    Severity::Contraindicated,
                    format!(
                        "evidence is dated {}, after the verification time {}",
                        super::rfc3339(t),
                        super::rfc3339(ctx.now_unix)
                    ),
                ));
            }
            Some(t) if ctx.now_unix.saturating_sub(t) > max => {
                let f = Finding::new(
                    "evidence-too-old",
                    Claim::InstanceIdentity,
                    Severity::Contraindicated,
                    format!(
                        "evidence is {} s old (collected {}), more than the policy's maximum of {max} s",
                        ctx.now_unix - t,
                        super::rfc3339(t)
                    ),
                )
                .with_values(format!("<= {max} s"), format!("{} s", ctx.now_unix - t));
                out.push(f);
            }
            Some(_) => {}
            // A matching nonce proves freshness by itself.
            None if ctx.nonce.is_some() => {}
            None => out.push(Finding::new(
                "evidence-age-unknown",
                Claim::InstanceIdentity,
                Severity::Warning,
                format!(
                    "policy limits evidence age to {max} s, but neither a collection time nor a nonce was given"
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trusted_root_round_trips_through_strings() {
        let fp = TrustedRoot::fingerprint_of(b"x");
        let s: String = fp.clone().into();
        assert!(s.starts_with("sha256:"));
        assert_eq!(TrustedRoot::try_from(s).unwrap(), fp);
        assert_eq!(
            TrustedRoot::try_from("intel-sgx-root-ca".to_string()).unwrap(),
            TrustedRoot::IntelSgxRootCa
        );
        assert!(TrustedRoot::try_from("sha256:abcd".to_string()).is_err());
        assert!(TrustedRoot::try_from("amd".to_string()).is_err());
    }

    #[test]
    fn intel_root_matches_only_its_own_der() {
        assert!(TrustedRoot::IntelSgxRootCa.matches(super::super::INTEL_SGX_ROOT_CA_DER));
        assert!(!TrustedRoot::IntelSgxRootCa.matches(b"not a cert"));
        let fp = TrustedRoot::fingerprint_of(super::super::INTEL_SGX_ROOT_CA_DER);
        assert_eq!(
            fp.to_string(),
            "sha256:44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
        );
    }

    #[test]
    fn empty_policy_json_is_the_strict_default() {
        let p: TdxPolicy = serde_json::from_str("{}").unwrap();
        assert_eq!(p, TdxPolicy::default());
        assert_eq!(p.accepted_tcb_statuses, vec![TdxTcbStatus::UpToDate]);
        assert!(!p.allow_debug);
    }

    #[test]
    fn policy_rejects_unknown_fields_and_bad_lengths() {
        assert!(serde_json::from_str::<TdxPolicy>(r#"{"allowDebugg": true}"#).is_err());
        let p: TdxPolicy = serde_json::from_str(r#"{"mrtd": ["abcd"]}"#).unwrap();
        assert!(matches!(p.validate(), Err(TdxError::Policy(_))));
        let p: TdxPolicy = serde_json::from_str(r#"{"trustedRoots": []}"#).unwrap();
        assert!(p.validate().is_err());
    }

    #[test]
    fn status_names_round_trip() {
        for s in TdxTcbStatus::ALL {
            assert_eq!(TdxTcbStatus::parse(s.as_str()), Some(s));
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
        }
    }
}
