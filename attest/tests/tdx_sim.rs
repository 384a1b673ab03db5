//! The simulated TDX platform: its quotes verify through the same path as real ones
//! exactly when the policy trusts its root.

use std::sync::OnceLock;

use cvm_attest::tdx::{
    self, report_data_for_nonce, AppraisalContext, DecodedTdQuote, SimTdxPlatform, TdQuoteRequest,
    TdxPolicy, TdxTcbStatus,
};
use cvm_attest::{Claim, Severity};

const NOW: u64 = 1_790_000_000; // 2026-09-21
const NONCE: &[u8] = b"verifier challenge 42";

/// Key generation is the slow part; share one platform across tests.
fn platform() -> &'static SimTdxPlatform {
    static P: OnceLock<SimTdxPlatform> = OnceLock::new();
    P.get_or_init(|| SimTdxPlatform::generate_at(NOW).unwrap())
}

fn request() -> TdQuoteRequest {
    TdQuoteRequest {
        mr_td: [0x11; 48],
        rtmrs: [[0x20; 48], [0x21; 48], [0x22; 48], [0x23; 48]],
        mr_config_id: [0x33; 48],
        report_data: report_data_for_nonce(NONCE),
        ..TdQuoteRequest::default()
    }
}

/// A policy that trusts the sim and pins the request's reference values.
fn pinned_policy(p: &SimTdxPlatform) -> TdxPolicy {
    TdxPolicy {
        mrtd: vec![vec![0x11; 48]],
        rtmr0: Some(vec![0x20; 48]),
        rtmr3: Some(vec![0x23; 48]),
        mr_config_id: Some(vec![0x33; 48]),
        require_nonce: true,
        ..p.policy()
    }
}

fn ctx() -> AppraisalContext {
    AppraisalContext::at(NOW).with_nonce(NONCE)
}

fn checks(a: &tdx::TdxAppraisal) -> Vec<&str> {
    a.findings.iter().map(|f| f.check.as_str()).collect()
}

#[test]
fn sim_quote_round_trips_under_a_policy_that_trusts_the_sim() {
    let p = platform();
    let ev = p.issue_quote_at(&request(), NOW).unwrap();
    let a = tdx::verify_quote(&ev.quote, &ev.collateral_json, &pinned_policy(p), &ctx()).unwrap();
    assert!(a.verified, "{:#?}", a.findings);
    assert!(a.is_affirmed(), "{:#?}", a.findings);
    assert!(a.findings.is_empty(), "{:#?}", a.findings);
    assert_eq!(a.tcb_status, Some(TdxTcbStatus::UpToDate));
    assert_eq!(
        a.root_fingerprint.as_deref(),
        Some(p.root_fingerprint().as_str())
    );

    let d = &a.decoded;
    assert_eq!((d.version, d.tee_type), (4, 0x81));
    assert_eq!(d.mr_td, vec![0x11; 48]);
    assert_eq!(d.rtmrs[2], vec![0x22; 48]);
    assert_eq!(d.mr_config_id, vec![0x33; 48]);
    assert_eq!(d.report_data, report_data_for_nonce(NONCE).to_vec());
    assert!(d.td_attributes.sept_ve_disable && !d.td_attributes.debug);

    // Every AR4SI claim the checks covered is affirmed for the EAR builder.
    let mut affirmed = a.affirmed.clone();
    affirmed.sort();
    assert_eq!(
        affirmed,
        [
            Claim::Hardware,
            Claim::Executables,
            Claim::Configuration,
            Claim::InstanceIdentity,
            Claim::FileSystem,
            Claim::RuntimeOpaque
        ]
    );
}

#[test]
fn default_policy_rejects_sim_evidence_because_the_root_is_not_intels() {
    let p = platform();
    let ev = p.issue_quote_at(&request(), NOW).unwrap();
    let a = tdx::verify_quote(
        &ev.quote,
        &ev.collateral_json,
        &TdxPolicy::default(),
        &ctx(),
    )
    .unwrap();
    assert!(!a.verified);
    assert!(!a.is_affirmed());
    assert_eq!(a.tcb_status, None);
    let f = &a.findings[0];
    assert_eq!(f.check, "untrusted-root");
    assert_eq!(f.claim, Claim::Hardware);
    assert_eq!(f.severity, Severity::Contraindicated);
    assert!(
        f.message.contains("not Intel's SGX Root CA"),
        "{}",
        f.message
    );
    assert!(f.message.contains(&p.root_fingerprint()), "{}", f.message);
    assert_eq!(f.expected, "intel-sgx-root-ca");
    assert!(
        a.affirmed.is_empty(),
        "nothing is affirmed on unverified evidence"
    );
}

#[test]
fn another_sims_root_is_not_trusted_either() {
    let p = platform();
    let other = SimTdxPlatform::generate_at(NOW).unwrap();
    assert_ne!(p.root_fingerprint(), other.root_fingerprint());
    let ev = other.issue_quote_at(&request(), NOW).unwrap();
    let a = tdx::verify_quote(&ev.quote, &ev.collateral_json, &p.policy(), &ctx()).unwrap();
    assert_eq!(checks(&a)[0], "untrusted-root");

    // Its collateral does not vouch for our quote: the chains end at different roots.
    let ours = p.issue_quote_at(&request(), NOW).unwrap();
    let a = tdx::verify_quote(&ours.quote, &ev.collateral_json, &p.policy(), &ctx()).unwrap();
    assert!(!a.verified);
    assert!(a.findings[0].is_contraindicated(), "{:#?}", a.findings);
}

#[test]
fn pem_round_trip_keeps_identity() {
    let p = platform();
    let text = p.to_pem();
    assert!(text.contains("-----BEGIN TDX SIM ROOT CA CERTIFICATE-----"));
    let q = SimTdxPlatform::from_pem(&text).unwrap();
    assert_eq!(q.root_fingerprint(), p.root_fingerprint());
    assert_eq!(q.pck_chain_pem(), p.pck_chain_pem());
    // A reloaded platform issues quotes and collateral the original's policy accepts.
    let ev = q.issue_quote_at(&request(), NOW).unwrap();
    let a = tdx::verify_quote(&ev.quote, &ev.collateral_json, &pinned_policy(p), &ctx()).unwrap();
    assert!(a.is_affirmed(), "{:#?}", a.findings);

    let broken = text.replace("TDX SIM PCK PRIVATE KEY", "SOMETHING ELSE");
    let err = SimTdxPlatform::from_pem(&broken).unwrap_err();
    assert!(err.to_string().contains("TDX SIM PCK PRIVATE KEY"), "{err}");
    assert!(SimTdxPlatform::from_pem("not pem").is_err());
}

#[test]
fn sim_quote_matches_dcap_qvl_decoding() {
    let ev = platform().issue_quote_at(&request(), NOW).unwrap();
    let ours = DecodedTdQuote::parse(&ev.quote).unwrap();
    let theirs = dcap_qvl::quote::Quote::parse(&ev.quote).unwrap();
    let td = theirs.report.as_td10().unwrap();
    assert_eq!(ours.mr_td, td.mr_td);
    assert_eq!(ours.rtmrs[1], td.rt_mr1);
    assert_eq!(ours.xfam, td.xfam);
    assert_eq!(ours.report_data, td.report_data);
    assert_eq!(theirs.header.version, 4);
    assert_eq!(theirs.inner_cert_type(), 5);
}

/// Each TCB status the collateral can give maps to the policy the way Intel's
/// appraisal does: accepted, accepted with a warning, or refused with a named finding.
#[test]
fn tcb_status_mapping_table() {
    use TdxTcbStatus::*;
    let p = platform();
    let warn_ok = TdxPolicy {
        accepted_tcb_statuses: vec![
            UpToDate,
            SWHardeningNeeded,
            ConfigurationAndSWHardeningNeeded,
        ],
        ..p.policy()
    };
    // (collateral status, policy, expected TCB finding, affirmed?)
    let cases: Vec<(TdxTcbStatus, &TdxPolicy, Option<&str>, bool)> = vec![
        (UpToDate, &warn_ok, None, true),
        (
            SWHardeningNeeded,
            &warn_ok,
            Some("tcb-status-warning"),
            true,
        ),
        (
            ConfigurationAndSWHardeningNeeded,
            &warn_ok,
            Some("tcb-status-warning"),
            true,
        ),
        (
            ConfigurationNeeded,
            &warn_ok,
            Some("tcb-status-not-accepted"),
            false,
        ),
        (OutOfDate, &warn_ok, Some("tcb-status-not-accepted"), false),
        (
            OutOfDateConfigurationNeeded,
            &warn_ok,
            Some("tcb-status-not-accepted"),
            false,
        ),
        (Revoked, &warn_ok, Some("tcb-revoked"), false),
    ];
    let default = p.policy();
    let mut all = cases;
    all.push((
        SWHardeningNeeded,
        &default,
        Some("tcb-status-not-accepted"),
        false,
    ));
    for (status, policy, check, affirmed) in all {
        let req = TdQuoteRequest {
            tcb_status: status,
            advisory_ids: vec!["INTEL-SA-00837".into()],
            ..request()
        };
        let ev = p.issue_quote_at(&req, NOW).unwrap();
        let a = tdx::verify_quote(&ev.quote, &ev.collateral_json, policy, &ctx()).unwrap();
        assert_eq!(a.is_affirmed(), affirmed, "{status}: {:#?}", a.findings);
        let tcb: Vec<_> = a
            .findings
            .iter()
            .filter(|f| f.check.starts_with("tcb-"))
            .collect();
        match check {
            None => assert!(tcb.is_empty(), "{status}: {tcb:#?}"),
            Some(c) => {
                assert_eq!(tcb.len(), 1, "{status}: {:#?}", a.findings);
                assert_eq!(tcb[0].check, c, "{status}");
                if c != "tcb-revoked" {
                    assert_eq!(a.tcb_status, Some(status));
                    assert!(tcb[0].message.contains(status.as_str()));
                    assert!(
                        tcb[0].message.contains("INTEL-SA-00837"),
                        "{}",
                        tcb[0].message
                    );
                }
            }
        }
    }
}

#[test]
fn refused_status_message_names_what_policy_allows() {
    let p = platform();
    let req = TdQuoteRequest {
        tcb_status: TdxTcbStatus::OutOfDate,
        ..request()
    };
    let ev = p.issue_quote_at(&req, NOW).unwrap();
    let a = tdx::verify_quote(&ev.quote, &ev.collateral_json, &p.policy(), &ctx()).unwrap();
    let f = a
        .findings
        .iter()
        .find(|f| f.check == "tcb-status-not-accepted")
        .unwrap();
    assert_eq!(
        f.message,
        "TCB status OutOfDate is not acceptable (allowed: UpToDate)"
    );
}

#[test]
fn rejected_advisory_is_refused_even_when_status_is_accepted() {
    let p = platform();
    let req = TdQuoteRequest {
        tcb_status: TdxTcbStatus::SWHardeningNeeded,
        advisory_ids: vec!["INTEL-SA-00615".into()],
        ..request()
    };
    let policy = TdxPolicy {
        accepted_tcb_statuses: vec![TdxTcbStatus::UpToDate, TdxTcbStatus::SWHardeningNeeded],
        rejected_advisory_ids: vec!["intel-sa-00615".into()],
        ..p.policy()
    };
    let ev = p.issue_quote_at(&req, NOW).unwrap();
    let a = tdx::verify_quote(&ev.quote, &ev.collateral_json, &policy, &ctx()).unwrap();
    assert!(!a.is_affirmed());
    assert!(
        checks(&a).contains(&"tcb-advisory-rejected"),
        "{:#?}",
        a.findings
    );
}

#[test]
fn debug_td_is_refused_unless_policy_allows_it() {
    let p = platform();
    let req = TdQuoteRequest {
        td_attributes: request().td_attributes | 1,
        ..request()
    };
    let ev = p.issue_quote_at(&req, NOW).unwrap();
    let a = tdx::verify_quote(&ev.quote, &ev.collateral_json, &pinned_policy(p), &ctx()).unwrap();
    assert!(
        a.verified,
        "the signature is fine; the policy refuses: {:#?}",
        a.findings
    );
    assert!(!a.is_affirmed());
    assert_eq!(checks(&a), ["td-debug-enabled"]);
    assert_eq!(a.findings[0].claim, Claim::Configuration);

    let lenient = TdxPolicy {
        allow_debug: true,
        ..pinned_policy(p)
    };
    let a = tdx::verify_quote(&ev.quote, &ev.collateral_json, &lenient, &ctx()).unwrap();
    assert!(a.is_affirmed());
    assert_eq!(a.findings[0].severity, Severity::Warning);
    // A debuggable TD's memory is not opaque to the host.
    assert!(!a.affirmed.contains(&Claim::RuntimeOpaque));
    assert!(a.affirmed.contains(&Claim::Hardware));
}

#[test]
fn migratable_td_is_refused_by_the_quote_verifier() {
    let p = platform();
    let req = TdQuoteRequest {
        td_attributes: request().td_attributes | (1 << 29),
        ..request()
    };
    let ev = p.issue_quote_at(&req, NOW).unwrap();
    let a = tdx::verify_quote(&ev.quote, &ev.collateral_json, &pinned_policy(p), &ctx()).unwrap();
    assert!(!a.verified);
    assert_eq!(checks(&a), ["td-attributes-refused"]);
    assert!(
        a.findings[0].message.contains("migration"),
        "{}",
        a.findings[0].message
    );
}

#[test]
fn reference_value_and_binding_mismatches_are_named() {
    let p = platform();
    let req = TdQuoteRequest {
        mr_td: [0x12; 48],
        rtmrs: [[0x20; 48], [0x21; 48], [0x22; 48], [0x99; 48]],
        mr_config_id: [0x34; 48],
        report_data: report_data_for_nonce(b"an old nonce"),
        ..request()
    };
    let ev = p.issue_quote_at(&req, NOW).unwrap();
    let a = tdx::verify_quote(&ev.quote, &ev.collateral_json, &pinned_policy(p), &ctx()).unwrap();
    assert!(a.verified);
    assert_eq!(
        checks(&a),
        [
            "mrtd-mismatch",
            "rtmr3-mismatch",
            "mrconfigid-mismatch",
            "report-data-mismatch"
        ]
    );
    assert_eq!(a.findings[0].expected, "11".repeat(48));
    assert_eq!(a.findings[0].reported, "12".repeat(48));
    assert_eq!(a.findings[2].claim, Claim::InstanceIdentity);
}

#[test]
fn collateral_past_its_validity_fails_and_tampering_is_caught() {
    let p = platform();
    let ev = p.issue_quote_at(&request(), NOW).unwrap();
    let later = AppraisalContext::at(NOW + 31 * 86_400).with_nonce(NONCE);
    let a = tdx::verify_quote(&ev.quote, &ev.collateral_json, &pinned_policy(p), &later).unwrap();
    assert_eq!(checks(&a)[0], "collateral-expired", "{:#?}", a.findings);

    // MRTD at body offset 136, report_data at 520 (body starts after the 48-byte header).
    for pos in [48 + 136, 48 + 520, 48 + 583] {
        let mut q = ev.quote.clone();
        q[pos] ^= 0x40;
        let a = tdx::verify_quote(&q, &ev.collateral_json, &pinned_policy(p), &ctx()).unwrap();
        assert!(!a.verified);
        assert_eq!(checks(&a)[0], "quote-signature-invalid", "flip at {pos}");
    }
}

#[test]
fn appraisals_become_ear_submods() {
    use cvm_attest::ear::{Ear, TrustTier, VerifierId, CONTRAINDICATED, WARNING};
    let p = platform();

    let ev = p.issue_quote_at(&request(), NOW).unwrap();
    let good = tdx::verify_quote(&ev.quote, &ev.collateral_json, &pinned_policy(p), &ctx())
        .unwrap()
        .ear_appraisal();
    assert_eq!(good.status(), TrustTier::Affirming);
    assert_eq!(good.vector().len(), 6);

    let refused = tdx::verify_quote(
        &ev.quote,
        &ev.collateral_json,
        &TdxPolicy::default(),
        &ctx(),
    )
    .unwrap()
    .ear_appraisal();
    assert_eq!(refused.status(), TrustTier::Contraindicated);
    assert_eq!(refused.value(Claim::Hardware), CONTRAINDICATED);

    let req = TdQuoteRequest {
        tcb_status: TdxTcbStatus::SWHardeningNeeded,
        ..request()
    };
    let ev = p.issue_quote_at(&req, NOW).unwrap();
    let lenient = TdxPolicy {
        accepted_tcb_statuses: vec![TdxTcbStatus::UpToDate, TdxTcbStatus::SWHardeningNeeded],
        ..pinned_policy(p)
    };
    let warned = tdx::verify_quote(&ev.quote, &ev.collateral_json, &lenient, &ctx())
        .unwrap()
        .ear_appraisal();
    assert_eq!(warned.status(), TrustTier::Warning);
    assert_eq!(warned.value(Claim::FileSystem), WARNING);

    let ear = Ear::new(NOW as i64, VerifierId::default())
        .with_submod("tdx", warned.to_submod(Some("sim".into())));
    let json: serde_json::Value = serde_json::from_str(&ear.to_json()).unwrap();
    assert_eq!(json["submods"]["tdx"]["ear.status"], "warning");
    assert_eq!(
        json["submods"]["tdx"]["cvm.findings"][0]["check"],
        "tcb-status-warning"
    );
}

#[test]
fn each_simulated_host_has_its_own_platform_identity() {
    let p = platform();
    let a = p.with_own_pck_at(b"node-a", NOW).unwrap();
    let b = p.with_own_pck_at(b"node-b", NOW).unwrap();
    assert_eq!(
        a.root_fingerprint(),
        p.root_fingerprint(),
        "one shared root"
    );
    assert_ne!(a.ppid().unwrap(), b.ppid().unwrap());
    let mut ids = Vec::new();
    for host in [&a, &b] {
        let ev = host.issue_quote_at(&request(), NOW).unwrap();
        let v =
            tdx::verify_quote(&ev.quote, &ev.collateral_json, &pinned_policy(p), &ctx()).unwrap();
        assert!(v.is_affirmed(), "{:#?}", v.findings);
        ids.push(v.platform_id.expect("a verified quote names its platform"));
    }
    assert_ne!(ids[0], ids[1]);
    // Unverified evidence names no platform: an untrusting policy learns nothing from it.
    let ev = a.issue_quote_at(&request(), NOW).unwrap();
    let v = tdx::verify_quote(
        &ev.quote,
        &ev.collateral_json,
        &TdxPolicy::default(),
        &ctx(),
    )
    .unwrap();
    assert!(!v.verified);
    assert_eq!(v.platform_id, None);
}
