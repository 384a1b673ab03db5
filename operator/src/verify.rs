//! Appraisal of a CVM's evidence: maps the CVM spec and its `AttestationPolicy` onto the
//! attestation library's policies, runs it, and turns the outcome into the status
//! `attestation` record. Pure: evidence, policy and clock come in as values.

use base64::Engine;
use cvm_attest::ear::{Appraisal, TrustTier};
use cvm_attest::snp::policy::{
    Hex, MinimumTcb as SnpMinTcb, SnpContext, SnpPolicy, SnpTrustedRoot,
};
use cvm_attest::snp::verify::{SnpEvidence, SnpVerifier};
use cvm_attest::tdx::{self, AppraisalContext, TdxPolicy};
use cvm_attest::{Claim, Finding as AFinding, Severity};
use cvm_crds::cvm::{
    AttestationResult, EarStatus, Evidence, Finding, FindingSeverity, TrustworthinessVector,
};
use cvm_crds::policy::AttestationPolicySpec;
use cvm_crds::wellknown::challenge_bytes;
use cvm_crds::{ConfidentialVM, EvidenceFormat, TeeType, TrustClaim};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

/// Name this verifier puts in results.
pub const VERIFIER: &str = "cvm-operator";

/// Key under which a node plugin puts TDX collateral (dcap-qvl JSON) in `evidence.collateral`.
pub const TDX_COLLATERAL_KEY: &str = "quoteCollateralV3";

/// The inputs of one appraisal.
pub struct Input<'a> {
    pub cvm: &'a ConfidentialVM,
    /// `(name, spec)` of the referenced policy; `None`: built-in defaults (vendor roots only).
    pub policy: Option<(&'a str, &'a AttestationPolicySpec)>,
    pub evidence: &'a Evidence,
    pub now: Timestamp,
    /// The challenge the evidence must answer, when not the CVM's own (its nonce, else its
    /// UID): a migration's receiving guest answers
    /// [`migration_challenge`](cvm_crds::migration::migration_challenge) instead.
    pub challenge: Option<&'a [u8]>,
}

fn f(check: &str, claim: Claim, msg: impl Into<String>) -> AFinding {
    AFinding::new(check, claim, Severity::Contraindicated, msg)
}

/// Appraises the evidence. Never fails: unusable input becomes a named finding.
pub fn appraise(input: &Input<'_>) -> AttestationResult {
    let mut appraisal = match decode(&input.evidence.report) {
        Err(e) => {
            Appraisal::from_findings(vec![f("evidence-undecodable", Claim::Hardware, e)], vec![])
        }
        Ok(raw) => match (input.cvm.tee_type(), input.evidence.format) {
            (TeeType::SevSnp, EvidenceFormat::SevSnpReport) => snp(input, &raw),
            (TeeType::Tdx, EvidenceFormat::TdxQuote) => tdx_appraise(input, &raw),
            (TeeType::Sev | TeeType::SevEs, EvidenceFormat::SevLaunchMeasure) => sev(input),
            (tee, fmt) => Appraisal::from_findings(
                vec![AFinding::mismatch(
                    "evidence-format-mismatch",
                    Claim::Hardware,
                    "evidence format",
                    format!(
                        "{:?} evidence for a {} guest",
                        tee.evidence_format(),
                        tee.as_str()
                    ),
                    format!("{fmt:?}"),
                )],
                vec![],
            ),
        },
    };
    if let Some(stale) = staleness(input) {
        appraisal.push(stale);
    }
    to_result(input, &appraisal)
}

fn decode(b64: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| format!("evidence.report is not valid base64: {e}"))
}

/// What the report data must be SHA-512 of: the explicit challenge, else the CVM's own.
fn challenge(input: &Input<'_>) -> Option<Vec<u8>> {
    match input.challenge {
        Some(c) => Some(c.to_vec()),
        None => challenge_bytes(
            input.cvm.nonce(),
            input.cvm.metadata.uid.as_deref().unwrap_or_default(),
        ),
    }
}

/// Expected launch measurements: the CVM owner's own values when given, else the policy's.
fn expected_measurements(input: &Input<'_>) -> Vec<String> {
    let own = input
        .cvm
        .spec
        .attestation
        .as_ref()
        .map(|a| a.expected_measurements.clone())
        .unwrap_or_default();
    if !own.is_empty() {
        return own;
    }
    input
        .policy
        .map(|(_, p)| p.reference_measurements.clone())
        .unwrap_or_default()
}

fn hex_array<const N: usize>(s: &str) -> Option<[u8; N]> {
    hex::decode(s).ok()?.try_into().ok()
}

fn snp(input: &Input<'_>, raw: &[u8]) -> Appraisal {
    let cvm = input.cvm;
    let spec = input.policy.map(|(_, p)| p);
    let allowed = spec.map(|p| p.effective_guest_policy()).unwrap_or_default();
    let own = cvm.guest_policy();
    let mut bad_config = Vec::new();

    let mut roots = Vec::new();
    for r in spec.map(|p| p.effective_roots()).unwrap_or_default() {
        match (r.name.as_str(), &r.sha256_fingerprint) {
            ("amd", _) => roots.push(SnpTrustedRoot::Amd(None)),
            ("intel", _) => {}
            (_, Some(fp)) => match hex_array::<32>(fp) {
                Some(b) => roots.push(SnpTrustedRoot::Sha256(b)),
                None => bad_config.push(f(
                    "policy-invalid",
                    Claim::Hardware,
                    format!("trusted root {}: fingerprint is not 64 hex digits", r.name),
                )),
            },
            (name, None) => bad_config.push(f(
                "policy-invalid",
                Claim::Hardware,
                format!("trusted root {name} has no sha256Fingerprint"),
            )),
        }
    }
    if spec.is_none() {
        roots.push(SnpTrustedRoot::Amd(None));
    }
    let mut measurements = Vec::new();
    for m in expected_measurements(input) {
        match hex_array::<48>(&m) {
            Some(b) => measurements.push(Hex(b)),
            None => bad_config.push(f(
                "policy-invalid",
                Claim::Executables,
                format!("expected measurement {m} is not 96 hex digits"),
            )),
        }
    }
    let host_data = cvm
        .spec
        .tee
        .host_data
        .as_deref()
        .and_then(hex_array::<32>)
        .map(Hex);
    let mut min = SnpMinTcb::default();
    let mut have_min = false;
    let tcbs = [
        spec.and_then(|p| p.minimum_tcb),
        cvm.spec.tee.minimum_tcb.as_ref().map(|m| m.snp_tcb()),
    ];
    for t in tcbs.iter().flatten() {
        have_min = true;
        min.bootloader = min.bootloader.max(t.bootloader.unwrap_or(0));
        min.tee = min.tee.max(t.tee.unwrap_or(0));
        min.snp = min.snp.max(t.snp.unwrap_or(0));
        min.microcode = min.microcode.max(t.microcode.unwrap_or(0));
        if let Some(fmc) = t.fmc {
            min.fmc = Some(min.fmc.unwrap_or(0).max(fmc));
        }
    }
    let policy = SnpPolicy {
        trusted_roots: roots,
        allow_debug: allowed.debug && own.debug,
        allow_migration_agent: allowed.migratable && own.migratable,
        allow_smt: allowed.smt,
        max_vmpl: None,
        measurements,
        host_data,
        minimum_tcb: have_min.then_some(min),
        require_nonce: true,
    };
    let verifier = match SnpVerifier::new(policy) {
        Ok(v) => v,
        Err(e) => {
            bad_config.push(f("policy-invalid", Claim::Hardware, e.to_string()));
            return Appraisal::from_findings(bad_config, vec![]);
        }
    };
    let certs = match input.evidence.cert_chain.as_deref() {
        Some(pem) => match cvm_attest::snp::certs::parse_certs(pem.as_bytes()) {
            Ok(c) => c.iter().map(|c| c.der().to_vec()).collect(),
            Err(e) => {
                bad_config.push(f(
                    "cert-chain-malformed",
                    Claim::Hardware,
                    format!("evidence.certChain: {e}"),
                ));
                Vec::new()
            }
        },
        None => Vec::new(),
    };
    let ev = SnpEvidence {
        report: raw,
        certs: &certs,
        crls: &[],
    };
    let ctx = SnpContext {
        nonce: challenge(input),
    };
    let at = input.now.as_second().max(0) as u64;
    let mut out = verifier.verify(&ev, &ctx, at).appraisal;
    for b in bad_config {
        out.push(b);
    }
    out
}

fn tdx_appraise(input: &Input<'_>, raw: &[u8]) -> Appraisal {
    let cvm = input.cvm;
    let spec = input.policy.map(|(_, p)| p);
    let mut policy = TdxPolicy::default();
    policy.trusted_roots.clear();
    let mut bad = Vec::new();
    for r in spec.map(|p| p.effective_roots()).unwrap_or_default() {
        match (r.name.as_str(), &r.sha256_fingerprint) {
            ("intel", _) => policy
                .trusted_roots
                .push(tdx::policy::TrustedRoot::IntelSgxRootCa),
            ("amd", _) => {}
            (_, Some(fp)) => match hex_array::<32>(fp) {
                Some(b) => policy
                    .trusted_roots
                    .push(tdx::policy::TrustedRoot::Sha256(b)),
                None => bad.push(f(
                    "policy-invalid",
                    Claim::Hardware,
                    format!("trusted root {}: fingerprint is not 64 hex digits", r.name),
                )),
            },
            (name, None) => bad.push(f(
                "policy-invalid",
                Claim::Hardware,
                format!("trusted root {name} has no sha256Fingerprint"),
            )),
        }
    }
    if spec.is_none() {
        policy
            .trusted_roots
            .push(tdx::policy::TrustedRoot::IntelSgxRootCa);
    }
    let statuses: Vec<cvm_crds::TdxTcbStatus> = match cvm.spec.tee.minimum_tcb.as_ref() {
        Some(m) if !m.tdx_tcb_statuses.is_empty() => m.tdx_tcb_statuses.clone(),
        _ => spec
            .map(|p| p.effective_tdx_statuses())
            .unwrap_or_else(|| vec![cvm_crds::TdxTcbStatus::UpToDate]),
    };
    policy.accepted_tcb_statuses = statuses
        .iter()
        .filter_map(|s| serde_json::to_value(s).ok())
        .filter_map(|v| v.as_str().and_then(tdx::TdxTcbStatus::parse))
        .collect();
    for m in expected_measurements(input) {
        match hex::decode(&m) {
            Ok(b) if b.len() == 48 => policy.mrtd.push(b),
            _ => bad.push(f(
                "policy-invalid",
                Claim::Executables,
                format!("expected MRTD {m} is not 96 hex digits"),
            )),
        }
    }
    if let Some(t) = spec.and_then(|p| p.tdx.as_ref()) {
        if cvm
            .spec
            .attestation
            .as_ref()
            .is_none_or(|a| a.expected_measurements.is_empty())
        {
            for m in &t.mrtd {
                if let Ok(b) = hex::decode(m) {
                    policy.mrtd.push(b);
                }
            }
        }
        for r in &t.rtmrs {
            let v = hex::decode(&r.value).ok();
            match r.index {
                0 => policy.rtmr0 = v,
                1 => policy.rtmr1 = v,
                2 => policy.rtmr2 = v,
                _ => policy.rtmr3 = v,
            }
        }
    }
    policy.mr_config_id = cvm
        .spec
        .tee
        .host_data
        .as_deref()
        .and_then(|h| hex::decode(h).ok());
    policy.allow_debug = cvm.guest_policy().debug
        && spec
            .map(|p| p.effective_guest_policy().debug)
            .unwrap_or(false);
    policy.require_nonce = true;
    let collateral = input
        .evidence
        .collateral
        .get(TDX_COLLATERAL_KEY)
        .or_else(|| input.evidence.collateral.values().next());
    let Some(collateral) = collateral else {
        bad.push(f("collateral-missing", Claim::Hardware, format!("evidence.collateral has no {TDX_COLLATERAL_KEY}: the node plugin must supply the TDX collateral")));
        return Appraisal::from_findings(bad, vec![]);
    };
    let mut ctx = AppraisalContext::at(input.now.as_second().max(0) as u64);
    ctx.nonce = challenge(input);
    match tdx::verify_quote(raw, collateral.as_bytes(), &policy, &ctx) {
        Ok(a) => {
            let mut findings = a.findings;
            findings.extend(bad);
            Appraisal::from_findings(findings, a.affirmed)
        }
        Err(e) => {
            bad.insert(0, f("quote-unverifiable", Claim::Hardware, e.to_string()));
            Appraisal::from_findings(bad, vec![])
        }
    }
}

/// SEV and SEV-ES: the launch measurement is an HMAC under a key shared with the guest
/// owner, not a hardware signature, so the operator can only compare digests and says so.
fn sev(input: &Input<'_>) -> Appraisal {
    let reported = input
        .evidence
        .launch_measurement
        .clone()
        .unwrap_or_default();
    let expected = expected_measurements(input);
    let simulated = input
        .cvm
        .status
        .as_ref()
        .and_then(|s| s.platform.as_ref())
        .is_some_and(|p| p.simulated);
    // Nothing signs SEV evidence, so a simulated host is accepted only when the policy
    // explicitly trusts a simulator root, as for signed evidence.
    let trusts_simulator = input
        .policy
        .is_some_and(|(_, p)| p.trusted_roots.iter().any(|r| !r.is_builtin()));
    let mut findings = Vec::new();
    if simulated && !trusts_simulator {
        findings.push(AFinding::new(
            "hardware-simulated",
            Claim::Hardware,
            Severity::Contraindicated,
            "the guest runs on a simulated platform and the policy trusts no simulator root",
        ));
    }
    findings.push(AFinding::new(
        "hardware-not-attestable",
        Claim::Hardware,
        Severity::Warning,
        "SEV/SEV-ES launch measurements carry no AMD signature the operator can check; verify the LAUNCH_MEASURE HMAC with your TIK to prove the hardware",
    ));
    let mut affirmed = vec![];
    if expected.is_empty() {
        findings.push(AFinding::new(
            "measurement-unchecked",
            Claim::Executables,
            Severity::Warning,
            "no expected measurement was given",
        ));
    } else if expected.iter().any(|e| e.eq_ignore_ascii_case(&reported)) {
        affirmed.push(Claim::Executables);
    } else {
        findings.push(AFinding::mismatch(
            "measurement-mismatch",
            Claim::Executables,
            "measurement",
            expected.join(" or "),
            reported,
        ));
    }
    Appraisal::from_findings(findings, affirmed)
}

fn staleness(input: &Input<'_>) -> Option<AFinding> {
    let max = input
        .policy
        .and_then(|(_, p)| p.max_evidence_age.as_deref())?;
    let max_secs = cvm_crds::validate::parse_duration_ms(max)? / 1000;
    let age = input.now.as_second() - input.evidence.collected_at.0.as_second();
    (age > max_secs as i64).then(|| {
        AFinding::new(
            "evidence-stale",
            Claim::InstanceIdentity,
            Severity::Contraindicated,
            format!("evidence is {age} s old; the policy accepts at most {max} ({max_secs} s)"),
        )
        .with_values(format!("<= {max_secs} s"), format!("{age} s"))
    })
}

fn claim(c: Claim) -> TrustClaim {
    match c {
        Claim::Hardware => TrustClaim::Hardware,
        Claim::Executables => TrustClaim::Executables,
        Claim::Configuration => TrustClaim::Configuration,
        Claim::InstanceIdentity => TrustClaim::InstanceIdentity,
        Claim::FileSystem => TrustClaim::FileSystem,
        Claim::RuntimeOpaque => TrustClaim::RuntimeOpaque,
    }
}

fn to_result(input: &Input<'_>, a: &Appraisal) -> AttestationResult {
    let mut v = TrustworthinessVector::default();
    for (c, val) in a.vector() {
        let slot = match c {
            Claim::Hardware => &mut v.hardware,
            Claim::Executables => &mut v.executables,
            Claim::Configuration => &mut v.configuration,
            Claim::InstanceIdentity => &mut v.instance_identity,
            Claim::FileSystem => &mut v.file_system,
            Claim::RuntimeOpaque => &mut v.runtime_opaque,
        };
        *slot = Some(val);
    }
    let status = match a.status() {
        TrustTier::Affirming => EarStatus::Affirming,
        TrustTier::Warning => EarStatus::Warning,
        TrustTier::Contraindicated => EarStatus::Contraindicated,
        TrustTier::None => EarStatus::None,
    };
    let findings = a
        .findings
        .iter()
        .filter(|x| x.severity != Severity::Info)
        .map(|x| Finding {
            check: x.check.clone(),
            claim: Some(claim(x.claim)),
            severity: Some(match x.severity {
                Severity::Info => FindingSeverity::Info,
                Severity::Warning => FindingSeverity::Warning,
                Severity::Contraindicated => FindingSeverity::Contraindicated,
            }),
            expected: (!x.expected.is_empty()).then(|| x.expected.clone()),
            reported: (!x.reported.is_empty()).then(|| x.reported.clone()),
            message: x.message.clone(),
        })
        .collect();
    AttestationResult {
        status,
        trustworthiness_vector: v,
        policy: Some(
            input
                .policy
                .map(|(n, _)| n.to_string())
                .unwrap_or_else(|| "(built-in defaults)".into()),
        ),
        findings,
        verified_at: Time(input.now),
        verifier: VERIFIER.into(),
        evidence_collected_at: Some(input.evidence.collected_at.clone()),
        nonce: input.evidence.nonce.clone(),
    }
}

/// Same verdict, ignoring when it was computed: keeps `verifiedAt` stable when nothing
/// changed, so the operator does not rewrite status on every pass.
pub fn same_verdict(a: &AttestationResult, b: &AttestationResult) -> bool {
    a.status == b.status
        && a.findings == b.findings
        && a.policy == b.policy
        && a.evidence_collected_at == b.evidence_collected_at
        && a.nonce == b.nonce
        && a.trustworthiness_vector == b.trustworthiness_vector
}

#[cfg(test)]
mod tests {
    use super::*;
    use cvm_attest::sim::{ReportRequest, SimSnpConfig, SimSnpPlatform};
    use cvm_crds::migration::migration_challenge;
    use cvm_crds::policy::TrustedRoot;
    use cvm_crds::SnpTcbVersion;
    use sha2::{Digest, Sha256};

    // Inside the simulator's certificate validity (2024 to 2049).
    fn now() -> Timestamp {
        Timestamp::from_second(1_750_000_000).unwrap()
    }

    fn platform(bootloader: u8) -> SimSnpPlatform {
        let config = SimSnpConfig {
            bootloader,
            ..Default::default()
        };
        SimSnpPlatform::from_seed([7; 32], config).unwrap()
    }

    fn policy(p: &SimSnpPlatform, min_bootloader: Option<u8>) -> AttestationPolicySpec {
        AttestationPolicySpec {
            trusted_roots: vec![TrustedRoot {
                name: "sim".into(),
                sha256_fingerprint: Some(hex::encode(Sha256::digest(p.ark_der()))),
                description: None,
            }],
            minimum_tcb: min_bootloader.map(|b| SnpTcbVersion {
                bootloader: Some(b),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn evidence(p: &SimSnpPlatform, challenge: &[u8]) -> Evidence {
        let e = p
            .issue_report(&ReportRequest::default().with_nonce(challenge))
            .unwrap();
        Evidence {
            format: EvidenceFormat::SevSnpReport,
            report: base64::engine::general_purpose::STANDARD.encode(&e.report),
            cert_chain: Some(e.cert_chain_pem()),
            collateral: Default::default(),
            nonce: None,
            collected_at: Time(now()),
            launch_measurement: None,
        }
    }

    fn cvm() -> ConfidentialVM {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "cvmp.io/v1alpha1", "kind": "ConfidentialVM",
            "metadata": {"name": "web", "namespace": "d", "uid": "cvm-uid"},
            "spec": {"tee": {"type": "SEV-SNP", "policy": {"migratable": true}},
                     "resources": {"vcpus": 2, "memoryMiB": 2048},
                     "boot": {"firmware": {"name": "ovmf"}}}
        }))
        .unwrap()
    }

    fn checks(r: &AttestationResult) -> Vec<&str> {
        r.findings.iter().map(|f| f.check.as_str()).collect()
    }

    #[test]
    fn target_evidence_answers_the_migration_challenge_not_the_cvms() {
        let p = platform(4);
        let spec = policy(&p, None);
        let c = cvm();
        let challenge = migration_challenge("migration-uid");
        let ev = evidence(&p, &challenge);
        let with = appraise(&Input {
            cvm: &c,
            policy: Some(("sim-policy", &spec)),
            evidence: &ev,
            now: now(),
            challenge: Some(&challenge),
        });
        assert_eq!(with.status, EarStatus::Affirming, "{:?}", with.findings);
        assert_eq!(with.policy.as_deref(), Some("sim-policy"));
        // The same report read as the CVM's own evidence does not answer its UID: a
        // receiving guest's report cannot stand in for the running guest's, nor the reverse.
        let without = appraise(&Input {
            cvm: &c,
            policy: Some(("sim-policy", &spec)),
            evidence: &ev,
            now: now(),
            challenge: None,
        });
        assert_eq!(without.status, EarStatus::Contraindicated);
        assert!(
            checks(&without).contains(&"report-data-mismatch"),
            "{:?}",
            without.findings
        );
    }

    #[test]
    fn evidence_for_another_migration_is_rejected() {
        let p = platform(4);
        let spec = policy(&p, None);
        let c = cvm();
        let ev = evidence(&p, &migration_challenge("other-migration"));
        let mine = migration_challenge("migration-uid");
        let r = appraise(&Input {
            cvm: &c,
            policy: Some(("sim-policy", &spec)),
            evidence: &ev,
            now: now(),
            challenge: Some(&mine),
        });
        assert_eq!(r.status, EarStatus::Contraindicated);
        assert!(
            checks(&r).contains(&"report-data-mismatch"),
            "{:?}",
            r.findings
        );
    }

    #[test]
    fn a_target_below_the_minimum_tcb_is_named() {
        let p = platform(1);
        let spec = policy(&p, Some(3));
        let c = cvm();
        let challenge = migration_challenge("migration-uid");
        let ev = evidence(&p, &challenge);
        let r = appraise(&Input {
            cvm: &c,
            policy: Some(("sim-policy", &spec)),
            evidence: &ev,
            now: now(),
            challenge: Some(&challenge),
        });
        assert_eq!(r.status, EarStatus::Contraindicated);
        assert_eq!(checks(&r), vec!["tcb-bootloader-below-minimum"]);
        let (ok, _, msg) = crate::state::verdict_text(&r);
        assert!(!ok);
        assert!(
            msg.contains("bootloader SPL 1 is below the minimum 3"),
            "{msg}"
        );
    }
}
