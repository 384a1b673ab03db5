//! SNP verification: report signature, VEK chain, VEK extensions versus the report,
//! then the policy. Every failure is a named [`Finding`]; nothing here panics on input.
//!
//! Chains are cached (keyed by the SHA-256 of the supplied certificates), so verifying
//! a report with a known chain costs one ECDSA P-384 verification plus cheap checks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::certs::{Cert, ChainError, Crl, TrustAnchors, VekKind, VerifiedChain};
use super::policy::{appraise, SnpContext, SnpPolicy, SnpTrustedRoot};
use super::report::{Generation, SigningKey, SnpReport, SIG_ALGO_ECDSA_P384_SHA384};
use super::SnpError;
use crate::ear::{Appraisal, Ear, VerifierId};
use crate::finding::{Claim, Finding, Severity};

/// Name of the EAR submod for SNP evidence.
pub const SUBMOD: &str = "SEV-SNP";

/// Upper bound on cached chains; the cache is cleared when it is reached.
const CACHE_LIMIT: usize = 4096;

/// Evidence as it travels: the report and DER blobs of certificates and CRLs.
#[derive(Debug, Clone, Copy)]
pub struct SnpEvidence<'a> {
    /// The 0x4A0-byte report (see `report::extract_report_bytes` for files).
    pub report: &'a [u8],
    /// DER certificates: at least the VCEK/VLEK; the ASK/ASVK and ARK may be included.
    pub certs: &'a [Vec<u8>],
    /// DER CRLs (optional).
    pub crls: &'a [Vec<u8>],
}

/// What a verifier learned about the chain, for display and for status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChainSummary {
    pub vek_kind: String,
    pub vek_subject: String,
    pub intermediate_subject: String,
    pub root: String,
    pub root_sha256: String,
    pub generation: Option<String>,
}

impl ChainSummary {
    fn of(c: &VerifiedChain) -> Self {
        ChainSummary {
            vek_kind: c.kind.to_string(),
            vek_subject: c.vek.subject_cn.clone(),
            intermediate_subject: c.intermediate.subject_cn.clone(),
            root: c.root_label.clone(),
            root_sha256: c.root.fingerprint_hex(),
            generation: c.generation.map(|g| g.to_string()),
        }
    }
}

/// The outcome of verifying one SNP report.
#[derive(Debug, Clone)]
pub struct SnpAppraisal {
    /// The parsed report (its fields are trustworthy only when affirmed).
    pub report: Option<SnpReport>,
    pub generation: Option<Generation>,
    pub chain: Option<ChainSummary>,
    /// The report signature verified under a VEK that chains to a trusted root.
    pub signature_verified: bool,
    pub appraisal: Appraisal,
}

impl SnpAppraisal {
    pub fn findings(&self) -> &[Finding] {
        &self.appraisal.findings
    }

    /// Genuine and acceptable: no finding contraindicates the evidence.
    pub fn is_affirmed(&self) -> bool {
        self.signature_verified && self.appraisal.is_affirmed()
    }

    /// The EAR for this appraisal with one `SEV-SNP` submod.
    pub fn to_ear(&self, iat: i64, verifier_id: VerifierId, policy_id: Option<String>) -> Ear {
        Ear::new(iat, verifier_id).with_submod(SUBMOD, self.appraisal.to_submod(policy_id))
    }
}

type CachedChain = Result<Arc<VerifiedChain>, Vec<Finding>>;

/// An SNP verifier for one policy. Cheap to share (`Sync`); caches verified chains.
#[derive(Debug)]
pub struct SnpVerifier {
    policy: SnpPolicy,
    anchors: TrustAnchors,
    cache: Mutex<HashMap<[u8; 32], CachedChain>>,
}

fn hw(check: &str, message: impl Into<String>) -> Finding {
    Finding::new(check, Claim::Hardware, Severity::Contraindicated, message)
}

fn chain_finding(e: &ChainError) -> Finding {
    let check = match e {
        ChainError::NoVek => "vek-missing",
        ChainError::VekKey(_) => "vek-key-invalid",
        ChainError::IssuerMissing { .. } => "chain-issuer-missing",
        ChainError::Signature { .. } => "chain-signature-invalid",
        ChainError::UntrustedRoot { .. } => "chain-untrusted-root",
        ChainError::RootMissing { .. } => "chain-root-missing",
    };
    let mut f = hw(check, e.to_string());
    if let ChainError::UntrustedRoot { fingerprint, .. } = e {
        f.expected = "a root listed in the policy's trustedRoots".into();
        f.reported = format!("sha256:{fingerprint}");
    }
    f
}

impl SnpVerifier {
    /// A verifier trusting the roots `policy.trusted_roots` lists.
    pub fn new(policy: SnpPolicy) -> Result<Self, SnpError> {
        policy.validate()?;
        let mut anchors = TrustAnchors::default();
        for r in &policy.trusted_roots {
            match r {
                SnpTrustedRoot::Amd(gen) => anchors.add_builtin(*gen),
                SnpTrustedRoot::Sha256(fp) => anchors.allow_fingerprint(*fp),
            }
        }
        Ok(Self::with_anchors(policy, anchors))
    }

    /// A verifier with explicit anchors (the policy's `trustedRoots` are not consulted).
    pub fn with_anchors(policy: SnpPolicy, anchors: TrustAnchors) -> Self {
        SnpVerifier {
            policy,
            anchors,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub fn policy(&self) -> &SnpPolicy {
        &self.policy
    }

    pub fn anchors(&self) -> &TrustAnchors {
        &self.anchors
    }

    /// Parse and verify a certificate set up to a trusted root (signatures only),
    /// using the cache. Errors come back as findings.
    pub fn chain(&self, certs: &[Vec<u8>]) -> Result<Arc<VerifiedChain>, Vec<Finding>> {
        let mut h = Sha256::new();
        for c in certs {
            h.update((c.len() as u64).to_le_bytes());
            h.update(c);
        }
        let key: [u8; 32] = h.finalize().into();
        if let Some(hit) = self.cache.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return hit;
        }
        let result = self.build_chain(certs);
        if let Ok(mut m) = self.cache.lock() {
            if m.len() >= CACHE_LIMIT {
                m.clear();
            }
            m.insert(key, result.clone());
        }
        result
    }

    fn build_chain(&self, certs: &[Vec<u8>]) -> CachedChain {
        let mut parsed = Vec::new();
        let mut findings = Vec::new();
        for (i, der) in certs.iter().enumerate() {
            match Cert::from_der(der) {
                Ok(c) => parsed.push(c),
                Err(e) => findings.push(hw(
                    "cert-malformed",
                    format!("certificate #{} refused: {e}", i + 1),
                )),
            }
        }
        match self.anchors.verify_chain(&parsed) {
            Ok(c) => Ok(Arc::new(c)),
            Err(e) => {
                findings.push(chain_finding(&e));
                Err(findings)
            }
        }
    }

    /// Verify a report with its certificates at `at_unix` (seconds).
    pub fn verify(&self, ev: &SnpEvidence<'_>, ctx: &SnpContext, at_unix: u64) -> SnpAppraisal {
        let mut crls = Vec::new();
        let mut crl_findings = Vec::new();
        for (i, der) in ev.crls.iter().enumerate() {
            match Crl::from_der(der) {
                Ok(c) => crls.push(c),
                Err(e) => {
                    crl_findings.push(hw("crl-malformed", format!("CRL #{} refused: {e}", i + 1)))
                }
            }
        }
        let mut out = match self.chain(ev.certs) {
            Ok(chain) => self.verify_with_chain(ev.report, &chain, &crls, ctx, at_unix),
            Err(chain_findings) => {
                let mut a = self.verify_report_only(ev.report, ctx);
                // Chain problems first: they explain everything after.
                let rest = std::mem::take(&mut a.appraisal.findings);
                a.appraisal.findings = chain_findings;
                a.appraisal.findings.extend(rest);
                a
            }
        };
        out.appraisal.findings.extend(crl_findings);
        out
    }

    /// Without a chain: parse and appraise contents so the user sees every problem.
    fn verify_report_only(&self, report: &[u8], ctx: &SnpContext) -> SnpAppraisal {
        let mut a = Appraisal::new();
        let report = match SnpReport::parse(report) {
            Ok(r) => r,
            Err(e) => {
                a.push(hw("report-malformed", e.to_string()));
                return SnpAppraisal {
                    report: None,
                    generation: None,
                    chain: None,
                    signature_verified: false,
                    appraisal: a,
                };
            }
        };
        let gen = report.generation_hint();
        let (findings, _affirmed) =
            appraise(&report, gen.unwrap_or(Generation::Milan), &self.policy, ctx);
        // Without a verified signature nothing in the report can be affirmed.
        a.findings.extend(findings);
        SnpAppraisal {
            report: Some(report),
            generation: gen,
            chain: None,
            signature_verified: false,
            appraisal: a,
        }
    }

    /// The hot path: a report checked against an already-verified chain.
    pub fn verify_with_chain(
        &self,
        report_bytes: &[u8],
        chain: &VerifiedChain,
        crls: &[Crl],
        ctx: &SnpContext,
        at_unix: u64,
    ) -> SnpAppraisal {
        let mut a = Appraisal::new();
        let summary = Some(ChainSummary::of(chain));
        let report = match SnpReport::parse(report_bytes) {
            Ok(r) => r,
            Err(e) => {
                a.push(hw("report-malformed", e.to_string()));
                return SnpAppraisal {
                    report: None,
                    generation: chain.generation,
                    chain: summary,
                    signature_verified: false,
                    appraisal: a,
                };
            }
        };

        check_time(chain, at_unix, &mut a);
        check_crls(chain, crls, at_unix, &mut a);

        // Generation: the root says it for AMD's roots; the report's CPUID must agree.
        let hint = report.generation_hint();
        if let (Some(c), Some(r)) = (chain.generation, hint) {
            if c != r {
                a.push(Finding::mismatch(
                    "generation-mismatch",
                    Claim::Hardware,
                    "processor generation",
                    format!("{c} (from the certificate chain)"),
                    format!("{r} (from the report)"),
                ));
            }
        }
        let gen = chain.generation.or(hint).unwrap_or(Generation::Milan);

        let signature_verified = check_signature(&report, chain, &mut a);
        check_vek_binding(&report, chain, gen, &mut a);

        let (findings, affirmed) = appraise(&report, gen, &self.policy, ctx);
        a.findings.extend(findings);
        for c in affirmed {
            a.affirm(c);
        }
        if signature_verified
            && !a
                .findings
                .iter()
                .any(|f| f.claim == Claim::Hardware && f.is_contraindicated())
        {
            a.affirm(Claim::Hardware);
            // A genuine SNP report means the guest's memory is encrypted and integrity
            // protected by the hardware.
            a.affirm(Claim::RuntimeOpaque);
        } else {
            // Nothing the report says can be trusted without a genuine signature.
            a.affirmed.clear();
        }
        SnpAppraisal {
            report: Some(report),
            generation: Some(gen),
            chain: summary,
            signature_verified,
            appraisal: a,
        }
    }
}

fn check_time(chain: &VerifiedChain, at: u64, a: &mut Appraisal) {
    for c in chain.certs() {
        if at < c.not_before {
            a.push(hw(
                "cert-not-yet-valid",
                format!(
                    "certificate '{}' is not valid before {} (verification time {})",
                    c.subject_cn,
                    super::time::rfc3339(c.not_before),
                    super::time::rfc3339(at)
                ),
            ));
        } else if at > c.not_after {
            a.push(hw(
                "cert-expired",
                format!(
                    "certificate '{}' expired at {} (verification time {})",
                    c.subject_cn,
                    super::time::rfc3339(c.not_after),
                    super::time::rfc3339(at)
                ),
            ));
        }
    }
}

fn check_crls(chain: &VerifiedChain, crls: &[Crl], at: u64, a: &mut Appraisal) {
    for crl in crls {
        if !crl.issued_by(&chain.root) {
            a.push(Finding::new(
                "crl-not-applicable",
                Claim::Hardware,
                Severity::Info,
                format!(
                    "CRL issued by '{}' is not signed by this chain's root '{}'; ignored",
                    crl.issuer_cn, chain.root.subject_cn
                ),
            ));
            continue;
        }
        for c in [&chain.intermediate, &chain.vek] {
            if crl.revokes(c) {
                a.push(hw(
                    "cert-revoked",
                    format!(
                        "certificate '{}' (serial {}) is revoked by the CRL of '{}'",
                        c.subject_cn,
                        hex::encode(&c.serial),
                        crl.issuer_cn
                    ),
                ));
            }
        }
        if crl.next_update.is_some_and(|n| n < at) {
            a.push(Finding::new(
                "crl-stale",
                Claim::Hardware,
                Severity::Warning,
                format!(
                    "CRL of '{}' was due for renewal before the verification time",
                    crl.issuer_cn
                ),
            ));
        }
    }
}

fn check_signature(report: &SnpReport, chain: &VerifiedChain, a: &mut Appraisal) -> bool {
    if report.sig_algo != SIG_ALGO_ECDSA_P384_SHA384 {
        a.push(Finding::mismatch(
            "signature-algorithm-unsupported",
            Claim::Hardware,
            "signature algorithm",
            "1 (ECDSA P-384 with SHA-384)",
            report.sig_algo.to_string(),
        ));
        return false;
    }
    let want = match chain.kind {
        VekKind::Vcek => SigningKey::Vcek,
        VekKind::Vlek => SigningKey::Vlek,
    };
    let key = report.signing_key();
    if key != want {
        a.push(Finding::mismatch(
            "signing-key-mismatch",
            Claim::Hardware,
            "signing key",
            format!("{want} (the supplied certificate)"),
            format!("{key} (the report's KEY_INFO)"),
        ));
        return false;
    }
    let mut sig = [0u8; 96];
    sig[..48].copy_from_slice(&report.signature_r);
    sig[48..].copy_from_slice(&report.signature_s);
    let ok = report.signature_well_formed && chain.report_key.verify(report.signed_bytes(), &sig);
    if !ok {
        a.push(hw(
            "report-signature-invalid",
            format!(
                "report signature does not verify under the {} '{}' (sha256:{}): the report was altered or signed by another key",
                chain.kind,
                chain.vek.subject_cn,
                chain.vek.fingerprint_hex()
            ),
        ));
    }
    ok
}

/// The VEK's TCB and hardware-ID extensions must describe the report.
fn check_vek_binding(
    report: &SnpReport,
    chain: &VerifiedChain,
    gen: Generation,
    a: &mut Appraisal,
) {
    let ext = &chain.vek.amd;
    let tcb = report.reported_tcb(gen);
    if !ext.has_tcb() {
        a.push(hw(
            "vek-tcb-missing",
            format!(
                "{} '{}' carries no TCB extensions (1.3.6.1.4.1.3704.1.3.x)",
                chain.kind, chain.vek.subject_cn
            ),
        ));
    } else {
        let mut parts = vec![
            ("bootloader", ext.bootloader, tcb.bootloader),
            ("tee", ext.tee, tcb.tee),
            ("snp", ext.snp, tcb.snp),
            ("microcode", ext.microcode, tcb.microcode),
        ];
        if gen == Generation::Turin {
            parts.push(("fmc", ext.fmc, tcb.fmc.unwrap_or(0)));
        }
        for (name, cert, rep) in parts {
            if cert != Some(rep) {
                a.push(Finding::mismatch(
                    format!("vek-tcb-{name}-mismatch"),
                    Claim::Hardware,
                    &format!("{} {name} SPL", chain.kind),
                    cert.map_or("absent".into(), |v| v.to_string()),
                    rep.to_string(),
                ));
            }
        }
    }
    if chain.kind == VekKind::Vcek {
        match &ext.hw_id {
            None => a.push(hw(
                "vek-hwid-missing",
                format!(
                    "VCEK '{}' carries no hardware ID (1.3.6.1.4.1.3704.1.4)",
                    chain.vek.subject_cn
                ),
            )),
            Some(_) if report.chip_id_masked() => a.push(Finding::new(
                "chip-id-masked",
                Claim::Hardware,
                Severity::Warning,
                "report's CHIP_ID is masked: the VCEK cannot be tied to this chip",
            )),
            Some(id) => {
                // Turin VCEKs carry the 8-byte chip ID; the report pads it with zeros.
                let n = id.len().min(report.chip_id.len());
                let rest_zero = report.chip_id[n..].iter().all(|&b| b == 0);
                if report.chip_id[..n] != id[..] || !rest_zero {
                    a.push(Finding::mismatch(
                        "vek-chip-id-mismatch",
                        Claim::Hardware,
                        "chip ID",
                        format!("{} (VCEK hwID)", hex::encode(id)),
                        hex::encode(report.chip_id),
                    ));
                }
            }
        }
    }
}
