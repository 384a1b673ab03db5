//! Cryptographic verification through dcap-qvl, and the mapping of its outcome to
//! named findings.
//!
//! dcap-qvl 0.7.1 takes the trust anchor as a parameter (`QuoteVerifier::new(root_der)`),
//! so real and simulated quotes go through the very same code: the only difference is
//! which root certificate we hand it. We hand it a root only when the policy names it:
//! Intel's built-in root, or a certificate whose SHA-256 the policy lists.

use dcap_qvl::verify::QuoteVerifier;
use dcap_qvl::QuoteCollateralV3;
use sha2::{Digest, Sha256};

use super::policy::{appraise, AppraisalContext, TcbVerdict, TdxPolicy, TdxTcbStatus, TrustedRoot};
use super::quote::DecodedTdQuote;
use super::{rfc3339, TdxAppraisal, TdxError, INTEL_SGX_ROOT_CA_DER};
use crate::finding::{Claim, Finding, Severity};

/// A verifier with its policy checked and its collateral parsed once, for callers
/// that verify many quotes against the same collateral (operator, benchmark).
#[derive(Debug, Clone)]
pub struct TdxVerifier {
    policy: TdxPolicy,
    collateral: QuoteCollateralV3,
}

impl TdxVerifier {
    /// `collateral_json` is dcap-qvl's `QuoteCollateralV3` in its serde JSON form
    /// (byte fields as hex), as fetched from a PCCS and stored beside the quote.
    pub fn new(policy: TdxPolicy, collateral_json: &[u8]) -> Result<Self, TdxError> {
        policy.validate()?;
        let collateral: QuoteCollateralV3 = serde_json::from_slice(collateral_json)
            .map_err(|e| TdxError::Collateral(e.to_string()))?;
        Ok(TdxVerifier { policy, collateral })
    }

    pub fn policy(&self) -> &TdxPolicy {
        &self.policy
    }

    /// Verify one quote. `Err` only for input that is not a TDX quote at all; every
    /// verification or policy failure is a contraindicating [`Finding`] instead.
    pub fn verify(&self, quote: &[u8], ctx: &AppraisalContext) -> Result<TdxAppraisal, TdxError> {
        let decoded = DecodedTdQuote::parse(quote)?;
        let mut findings = Vec::new();
        let chain = self.pck_chain(&decoded);
        let chain_root = chain.as_ref().ok().and_then(|c| c.last().cloned());
        let root_fingerprint = chain_root
            .as_deref()
            .map(|der| format!("sha256:{}", hex::encode(Sha256::digest(der))));

        let anchor = match &chain {
            Err(msg) => {
                findings.push(hardware("pck-chain-missing", msg.clone()));
                None
            }
            Ok(_) => self.select_anchor(
                chain_root.as_deref(),
                root_fingerprint.as_deref(),
                &mut findings,
            ),
        };

        let tcb = anchor.and_then(|root_der| {
            match QuoteVerifier::new(root_der)
                // Debug TDs are refused by our policy with a named finding, not by
                // dcap-qvl with a bare error, so let them through the crypto step.
                .allow_debug(true)
                .verify(quote, &self.collateral, ctx.now_unix)
            {
                Ok(report) => match TdxTcbStatus::parse(&report.status) {
                    Some(status) => Some(TcbVerdict {
                        status,
                        advisory_ids: report.advisory_ids,
                    }),
                    None => {
                        findings.push(hardware(
                            "tcb-status-unknown",
                            format!(
                                "dcap-qvl returned an unknown TCB status {:?}",
                                report.status
                            ),
                        ));
                        None
                    }
                },
                Err(e) => {
                    findings.push(classify(&format!("{e:#}"), ctx.now_unix, &root_fingerprint));
                    None
                }
            }
        });

        // Read only once the chain verified: before that the extension is the host's word.
        let platform_id = tcb.as_ref().and_then(|_| {
            let leaf = chain.as_ref().ok()?.first()?;
            let ext = dcap_qvl::intel::parse_pck_extension(leaf).ok()?;
            Some(ext.platform_instance_id.unwrap_or(ext.ppid))
        });
        findings.extend(appraise(&decoded, tcb.as_ref(), &self.policy, ctx));
        let affirmed = if tcb.is_some() {
            affirmed_claims(&decoded, &self.policy, ctx)
        } else {
            Vec::new()
        };
        Ok(TdxAppraisal {
            decoded,
            verified: tcb.is_some(),
            tcb_status: tcb.as_ref().map(|t| t.status),
            advisory_ids: tcb.map(|t| t.advisory_ids).unwrap_or_default(),
            root_fingerprint,
            platform_id,
            findings,
            affirmed,
        })
    }

    /// The PCK chain (DER, leaf first): collateral first, as dcap-qvl does, then quote.
    fn pck_chain(&self, q: &DecodedTdQuote) -> Result<Vec<Vec<u8>>, String> {
        let pem_text = self
            .collateral
            .pck_certificate_chain
            .as_deref()
            .or(q.pck_chain_pem.as_deref())
            .ok_or_else(|| {
                format!(
                    "the quote carries no PCK certificate chain (certification data type {}) and the collateral has none",
                    q.cert_data_type
                )
            })?;
        let blocks = pem::parse_many(pem_text.as_bytes())
            .map_err(|e| format!("the PCK certificate chain is not valid PEM: {e}"))?;
        let ders: Vec<Vec<u8>> = blocks.into_iter().map(|p| p.into_contents()).collect();
        if ders.is_empty() {
            return Err("the PCK certificate chain is empty".into());
        }
        Ok(ders)
    }

    /// Pick the trust anchor for dcap-qvl, or say why there is none.
    fn select_anchor(
        &self,
        chain_root: Option<&[u8]>,
        fingerprint: Option<&str>,
        findings: &mut Vec<Finding>,
    ) -> Option<Vec<u8>> {
        let trusted = &self.policy.trusted_roots;
        if let Some(root) = chain_root {
            if trusted.iter().any(|t| t.matches(root)) {
                return Some(root.to_vec());
            }
        }
        // A chain may stop below the root; dcap-qvl then anchors it at Intel's root
        // itself, which we allow only when the policy trusts Intel.
        let chain_is_intel = chain_root == Some(INTEL_SGX_ROOT_CA_DER);
        if trusted.contains(&TrustedRoot::IntelSgxRootCa) && !looks_self_signed(chain_root) {
            return Some(INTEL_SGX_ROOT_CA_DER.to_vec());
        }
        let names = trusted
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let seen = fingerprint.unwrap_or("an unknown root");
        let what = if chain_is_intel {
            "Intel's SGX Root CA".to_string()
        } else {
            format!("root {seen} (not Intel's SGX Root CA)")
        };
        let message = format!(
            "the PCK certificate chain ends at {what}, which this policy does not trust (trusted roots: {names})"
        );
        findings.push(hardware("untrusted-root", message).with_values(names, seen.to_string()));
        None
    }
}

/// The claims a verified quote's checks covered. Executables only when the policy
/// pins an MRTD, instance identity only when a nonce or MRCONFIGID was checked,
/// runtime-opaque only for a TD the host cannot debug.
fn affirmed_claims(q: &DecodedTdQuote, policy: &TdxPolicy, ctx: &AppraisalContext) -> Vec<Claim> {
    let mut c = vec![Claim::Hardware, Claim::FileSystem, Claim::Configuration];
    if !policy.mrtd.is_empty() {
        c.push(Claim::Executables);
    }
    if ctx.nonce.is_some() || policy.mr_config_id.is_some() {
        c.push(Claim::InstanceIdentity);
    }
    if !q.td_attributes.debug {
        c.push(Claim::RuntimeOpaque);
    }
    c
}

/// Whether the last certificate of a chain is its own issuer (a root). A cheap DER
/// check: subject and issuer Name encodings are equal. Anything unparsable counts as
/// a root, so that it is judged by fingerprint and never silently re-anchored.
fn looks_self_signed(cert: Option<&[u8]>) -> bool {
    let Some(der) = cert else { return false };
    match tbs_issuer_subject(der) {
        Some((issuer, subject)) => issuer == subject,
        None => true,
    }
}

/// Minimal DER walk to the TBSCertificate's issuer and subject Names.
fn tbs_issuer_subject(der: &[u8]) -> Option<(&[u8], &[u8])> {
    /// (tag, whole TLV, contents, rest)
    type Tlv<'a> = (u8, &'a [u8], &'a [u8], &'a [u8]);
    fn tlv(b: &[u8]) -> Option<Tlv<'_>> {
        let tag = *b.first()?;
        let first = *b.get(1)?;
        let (len, hdr) = if first < 0x80 {
            (first as usize, 2usize)
        } else {
            let n = (first & 0x7f) as usize;
            if n == 0 || n > 4 {
                return None;
            }
            let mut len = 0usize;
            for i in 0..n {
                len = (len << 8) | *b.get(2 + i)? as usize;
            }
            (len, 2 + n)
        };
        let end = hdr.checked_add(len)?;
        Some((tag, b.get(..end)?, b.get(hdr..end)?, b.get(end..)?))
    }
    let (_, _, cert, _) = tlv(der)?;
    let (_, _, tbs, _) = tlv(cert)?;
    let mut rest = tbs;
    // [0] version (optional), serial, signature algorithm, issuer, validity, subject
    let (tag, _, _, r) = tlv(rest)?;
    if tag == 0xa0 {
        rest = r;
    }
    let (_, _, _, r) = tlv(rest)?; // serial
    let (_, _, _, r) = tlv(r)?; // signature algorithm
    let (_, issuer, _, r) = tlv(r)?;
    let (_, _, _, r) = tlv(r)?; // validity
    let (_, subject, _, _) = tlv(r)?;
    Some((issuer, subject))
}

fn hardware(check: &str, message: String) -> Finding {
    Finding::new(check, Claim::Hardware, Severity::Contraindicated, message)
}

/// Name a dcap-qvl failure. Its errors are `anyhow` chains of fixed sentences (the
/// version is pinned exactly and tests cover each class we name), plus webpki error
/// names for certificate problems.
fn classify(chain: &str, now_unix: u64, root: &Option<String>) -> Finding {
    let has = |needles: &[&str]| needles.iter().any(|n| chain.contains(n));
    let (check, claim, lead) = if has(&["TCB status is invalid: Revoked"]) {
        (
            "tcb-revoked",
            Claim::FileSystem,
            "the platform's TCB is revoked".to_string(),
        )
    } else if has(&["CertRevoked"]) {
        (
            "certificate-revoked",
            Claim::Hardware,
            "a certificate in the chain is on its issuer's CRL".to_string(),
        )
    } else if has(&[
        "expired",
        "Expired",
        "issue date is in the future",
        "CertNotValidYet",
        "CrlNotValidYet",
    ]) {
        (
            "collateral-expired",
            Claim::Hardware,
            format!(
                "the collateral or a certificate is not valid at {}",
                rfc3339(now_unix)
            ),
        )
    } else if has(&["No matching TCB level", "below minimum required"]) {
        (
            "tcb-level-unmatched",
            Claim::FileSystem,
            "the platform's TCB is below every level in Intel's TCB info".to_string(),
        )
    } else if has(&["ISV enclave report signature is invalid"]) {
        (
            "quote-signature-invalid",
            Claim::Hardware,
            "the attestation key's signature over the TD report does not verify (quote altered?)"
                .to_string(),
        )
    } else if has(&["Signature is invalid for qe_report"]) {
        (
            "qe-report-signature-invalid",
            Claim::Hardware,
            "the PCK key's signature over the QE report does not verify".to_string(),
        )
    } else if has(&["QE report hash mismatch"]) {
        (
            "attestation-key-unbound",
            Claim::Hardware,
            "the QE report does not vouch for this attestation key".to_string(),
        )
    } else if has(&[
        "Signature is invalid for tcb_info",
        "Signature is invalid for qe_identity",
    ]) {
        (
            "collateral-signature-invalid",
            Claim::Hardware,
            "the TCB info or QE identity signature does not verify".to_string(),
        )
    } else if has(&[
        "UnknownIssuer",
        "BadSignature",
        "Failed to verify certificate chain",
    ]) {
        (
            "certificate-chain-invalid",
            Claim::Hardware,
            format!(
                "a certificate chain does not verify up to the trusted root {}",
                root.as_deref().unwrap_or("")
            ),
        )
    } else if has(&[
        "Debug mode",
        "TD profiling",
        "TD migration",
        "SEPT_VE_DISABLE",
        "Reserved bits in TD attributes",
        "SERVTD_EXT",
        "MR service TD",
    ]) {
        (
            "td-attributes-refused",
            Claim::Configuration,
            "the TD attributes are refused by the quote verifier".to_string(),
        )
    } else if has(&[
        "QE MRSIGNER",
        "QE ISVPRODID",
        "QE MISCSELECT",
        "QE ATTRIBUTES",
        "TDX module",
    ]) {
        (
            "quoting-enclave-untrusted",
            Claim::Hardware,
            "the quoting enclave or TDX module identity does not match Intel's collateral"
                .to_string(),
        )
    } else if has(&[
        "Fmspc mismatch",
        "non-TDX TCB info",
        "QE Identity id/version",
    ]) {
        (
            "collateral-mismatch",
            Claim::Hardware,
            "the collateral is for a different platform or TEE".to_string(),
        )
    } else {
        (
            "quote-verification-failed",
            Claim::Hardware,
            "the quote does not verify".to_string(),
        )
    };
    let mut f = Finding::new(
        check,
        claim,
        Severity::Contraindicated,
        format!("{lead}: {chain}"),
    );
    f.reported = chain.to_string();
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_names_known_failures() {
        let cases = [
            ("TCBInfo expired", "collateral-expired"),
            (
                "Failed to verify certificate chain: UnknownIssuer",
                "certificate-chain-invalid",
            ),
            (
                "ISV enclave report signature is invalid",
                "quote-signature-invalid",
            ),
            ("No matching TCB level found", "tcb-level-unmatched"),
            ("TCB status is invalid: Revoked", "tcb-revoked"),
            ("Debug mode is enabled", "td-attributes-refused"),
            ("something new", "quote-verification-failed"),
        ];
        for (msg, check) in cases {
            let f = classify(msg, 0, &None);
            assert_eq!(f.check, check, "{msg}");
            assert!(f.is_contraindicated());
            assert!(f.message.contains(msg));
        }
    }

    #[test]
    fn intel_root_is_self_signed_by_der_walk() {
        assert!(looks_self_signed(Some(INTEL_SGX_ROOT_CA_DER)));
        assert!(looks_self_signed(Some(b"garbage")));
        assert!(!looks_self_signed(None));
    }
}
