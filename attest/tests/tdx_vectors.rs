//! TDX conformance against real quotes and collateral in `../shared/vectors/tdx`, read
//! in place. Set `CVM_VECTORS` to another vectors directory; under `CI=true` a
//! missing vector fails the test, elsewhere the test is skipped with a note.

use cvm_attest::tdx::{
    self, report_data_for_nonce, AppraisalContext, DecodedTdQuote, TdReportKind, TdxError,
    TdxPolicy, TdxTcbStatus, TrustedRoot,
};
use cvm_attest::{Claim, Severity};

/// Verification instants inside each vector's collateral window (TCB info, QE identity
/// and both CRLs all valid).
const T_TDX_V4: u64 = 1_750_377_600; // 2025-06-20
const T_TD15EX: u64 = 1_791_504_000; // 2026-10-09
const T_OUTDATED: u64 = 1_771_459_200; // 2026-02-19
const T_SPR_E4: u64 = 1_687_132_800; // 2023-06-19
const T_AFTER_V4_COLLATERAL: u64 = 1_754_006_400; // 2025-08-01, TCB info expired 07-19
const T_BEFORE_V4_COLLATERAL: u64 = 1_748_736_000; // 2025-06-01, TCB info issued 06-19

/// A vector's bytes; see `cvm_attest::testvectors`.
fn vector(rel: &str) -> Option<Vec<u8>> {
    cvm_attest::testvectors::read(rel)
}

/// (quote, collateral JSON) of a dcap-qvl sample.
fn dcap(name: &str) -> Option<(Vec<u8>, Vec<u8>)> {
    Some((
        vector(&format!("tdx/dcap-qvl/{name}"))?,
        vector(&format!("tdx/dcap-qvl/{name}_collateral.json"))?,
    ))
}

fn checks(a: &tdx::TdxAppraisal) -> Vec<&str> {
    a.findings.iter().map(|f| f.check.as_str()).collect()
}

#[test]
fn tdx_v4_quote_verifies_up_to_date() {
    let Some((q, c)) = dcap("tdx_quote") else {
        return;
    };
    let a = tdx::verify_quote(
        &q,
        &c,
        &TdxPolicy::default(),
        &AppraisalContext::at(T_TDX_V4),
    )
    .unwrap();
    assert!(a.verified, "{:#?}", a.findings);
    assert_eq!(a.tcb_status, Some(TdxTcbStatus::UpToDate));
    assert!(a.is_affirmed(), "{:#?}", a.findings);
    assert_eq!(a.decoded.version, 4);
    assert_eq!(a.decoded.report_kind, TdReportKind::Td10);
    assert_eq!(
        a.root_fingerprint.as_deref(),
        Some("sha256:44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3")
    );
    // With no reference MRTD the policy says so, without contraindicating.
    assert_eq!(checks(&a), ["mrtd-not-checked"]);
    assert_eq!(a.findings[0].severity, Severity::Info);
}

#[test]
fn tdx_v5_td15ex_quote_verifies_up_to_date() {
    let Some((q, c)) = dcap("tdx_quote_td15ex") else {
        return;
    };
    let a = tdx::verify_quote(
        &q,
        &c,
        &TdxPolicy::default(),
        &AppraisalContext::at(T_TD15EX),
    )
    .unwrap();
    assert!(a.verified, "{:#?}", a.findings);
    assert_eq!(a.tcb_status, Some(TdxTcbStatus::UpToDate));
    assert!(a.is_affirmed());
    assert_eq!(a.decoded.version, 5);
    assert_eq!(a.decoded.report_kind, TdReportKind::Td15Ex);
    assert!(a.decoded.tee_tcb_svn2.is_some());
}

#[test]
fn outdated_quote_is_refused_with_reason() {
    let Some((q, c)) = dcap("tdx_quote_outdated") else {
        return;
    };
    let a = tdx::verify_quote(
        &q,
        &c,
        &TdxPolicy::default(),
        &AppraisalContext::at(T_OUTDATED),
    )
    .unwrap();
    assert!(!a.verified);
    assert!(!a.is_affirmed());
    let f = a
        .findings
        .iter()
        .find(|f| f.check == "tcb-level-unmatched")
        .unwrap_or_else(|| panic!("{:#?}", a.findings));
    assert_eq!(f.claim, Claim::FileSystem);
    assert!(f.message.contains("No matching TCB level"), "{}", f.message);
}

#[test]
fn sgx_quote_is_refused_as_not_tdx_and_its_status_maps() {
    let Some((q, c)) = dcap("sgx_quote") else {
        return;
    };
    let err = tdx::verify_quote(
        &q,
        &c,
        &TdxPolicy::default(),
        &AppraisalContext::at(T_TDX_V4),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            TdxError::NotTdx {
                tee_type: 0,
                version: 3
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("not a TDX quote"));

    // Intel's status for it, through the same dcap-qvl, maps onto our enum.
    let coll: dcap_qvl::QuoteCollateralV3 = serde_json::from_slice(&c).unwrap();
    let report = dcap_qvl::verify::QuoteVerifier::new(tdx::INTEL_SGX_ROOT_CA_DER.to_vec())
        .verify(&q, &coll, 1_750_377_600 + 6 * 3600)
        .unwrap();
    assert_eq!(
        TdxTcbStatus::parse(&report.status),
        Some(TdxTcbStatus::ConfigurationAndSWHardeningNeeded)
    );
    assert!(report.advisory_ids.iter().any(|a| a == "INTEL-SA-00615"));
}

#[test]
fn collateral_outside_its_validity_fails_with_reason() {
    let Some((q, c)) = dcap("tdx_quote") else {
        return;
    };
    for (t, when) in [
        (T_AFTER_V4_COLLATERAL, "2025-08-01T00:00:00Z"),
        (T_BEFORE_V4_COLLATERAL, "2025-06-01T00:00:00Z"),
    ] {
        let a = tdx::verify_quote(&q, &c, &TdxPolicy::default(), &AppraisalContext::at(t)).unwrap();
        assert!(!a.verified);
        assert_eq!(a.tcb_status, None);
        let f = a
            .findings
            .iter()
            .find(|f| f.check == "collateral-expired")
            .unwrap_or_else(|| panic!("{when}: {:#?}", a.findings));
        assert_eq!(f.claim, Claim::Hardware);
        assert!(f.message.contains(when), "{}", f.message);
    }
}

#[test]
fn go_tdx_guest_spr_quote_passes_crypto_but_has_no_tcb_level() {
    let (Some(q), Some(c)) = (
        vector("tdx/go-tdx-guest/tdx_prod_quote_SPR_E4.dat"),
        vector("tdx/go-tdx-guest/tdx_prod_quote_SPR_E4_collateral.assembled.json"),
    ) else {
        return;
    };
    let a = tdx::verify_quote(
        &q,
        &c,
        &TdxPolicy::default(),
        &AppraisalContext::at(T_SPR_E4),
    )
    .unwrap();
    assert!(!a.verified);
    assert_eq!(checks(&a)[0], "tcb-level-unmatched", "{:#?}", a.findings);
}

#[test]
fn go_tdx_guest_v5_collateral_never_valid_names_the_expiry() {
    let (Some(q), Some(c)) = (
        vector("tdx/go-tdx-guest/quote_v5_sample.dat"),
        vector("tdx/go-tdx-guest/quote_v5_sample_collateral.assembled.json"),
    ) else {
        return;
    };
    // Inside the TCB info window (2026-02-01..03-03), long after the CRLs expired.
    let a = tdx::verify_quote(
        &q,
        &c,
        &TdxPolicy::default(),
        &AppraisalContext::at(1_770_000_000),
    )
    .unwrap();
    assert_eq!(a.decoded.version, 5);
    assert!(!a.verified);
    let f = &a.findings[0];
    assert_eq!(f.check, "collateral-expired", "{:#?}", a.findings);
    assert!(f.message.contains("2026-02-02T02:40:00Z"), "{}", f.message);
}

#[test]
fn trustee_quotes_decode() {
    for (name, version) in [
        ("tdx_quote_4.dat", 4),
        ("tdx_quote_5.dat", 5),
        ("tdx_quote_6.dat", 4),
    ] {
        let Some(q) = vector(&format!("tdx/trustee/{name}")) else {
            return;
        };
        let d = DecodedTdQuote::parse(&q).unwrap();
        assert_eq!(d.version, version, "{name}");
        assert_eq!(d.tee_type, 0x81);
        assert_eq!(d.rtmrs.len(), 4);
        assert!(d
            .pck_chain_pem
            .as_deref()
            .unwrap_or("")
            .contains("BEGIN CERTIFICATE"));
        // Our decoder agrees with dcap-qvl's on the fields users read.
        let theirs = dcap_qvl::quote::Quote::parse(&q).unwrap();
        let td = theirs.report.as_td10().unwrap();
        assert_eq!(d.mr_td, td.mr_td);
        assert_eq!(d.report_data, td.report_data);
        assert_eq!(d.rtmrs[3], td.rt_mr3);
        assert_eq!(d.td_attributes.raw.to_le_bytes(), td.td_attributes);
    }
}

#[test]
fn decoded_view_of_dcap_sample_is_readable() {
    let Some((q, _)) = dcap("tdx_quote") else {
        return;
    };
    let d = DecodedTdQuote::parse(&q).unwrap();
    assert!(!d.td_attributes.debug);
    assert!(d.td_attributes.sept_ve_disable);
    assert_eq!(d.signed_len, 48 + 584);
    assert_eq!(d.cert_data_type, 5);
    let json = serde_json::to_value(&d).unwrap();
    assert_eq!(json["mrTd"].as_str().unwrap(), hex::encode(&d.mr_td));
    assert_eq!(json["rtmrs"].as_array().unwrap().len(), 4);
    assert_eq!(json["reportKind"], "td10");
}

#[test]
fn policy_checks_apply_to_a_genuine_quote() {
    let Some((q, c)) = dcap("tdx_quote") else {
        return;
    };
    let d = DecodedTdQuote::parse(&q).unwrap();
    let ctx = AppraisalContext::at(T_TDX_V4);

    // Matching reference values: affirmed, nothing to report.
    let good = TdxPolicy {
        mrtd: vec![vec![0xAA; 48], d.mr_td.clone()],
        rtmr0: Some(d.rtmrs[0].clone()),
        mr_config_id: Some(d.mr_config_id.clone()),
        ..TdxPolicy::default()
    };
    let a = tdx::verify_quote(&q, &c, &good, &ctx).unwrap();
    assert!(a.is_affirmed());
    assert!(a.findings.is_empty(), "{:#?}", a.findings);

    // Wrong MRTD and RTMR2, and a nonce the quote is not bound to.
    let bad = TdxPolicy {
        mrtd: vec![vec![0xAB; 48]],
        rtmr2: Some(vec![0xCD; 48]),
        ..TdxPolicy::default()
    };
    let a = tdx::verify_quote(&q, &c, &bad, &ctx.clone().with_nonce(b"fresh nonce")).unwrap();
    assert!(a.verified && !a.is_affirmed());
    assert_eq!(
        checks(&a),
        ["mrtd-mismatch", "rtmr2-mismatch", "report-data-mismatch"]
    );
    let mrtd = &a.findings[0];
    assert_eq!(
        mrtd.message,
        format!(
            "mrtd mismatch: expected {}, reported {}",
            "ab".repeat(48),
            hex::encode(&d.mr_td)
        )
    );
    assert_eq!(
        a.findings[2].expected,
        hex::encode(report_data_for_nonce(b"fresh nonce"))
    );
}

#[test]
fn genuine_quote_is_refused_when_policy_does_not_trust_intel() {
    let Some((q, c)) = dcap("tdx_quote") else {
        return;
    };
    let policy = TdxPolicy {
        trusted_roots: vec![TrustedRoot::fingerprint_of(b"some other root")],
        ..TdxPolicy::default()
    };
    let a = tdx::verify_quote(&q, &c, &policy, &AppraisalContext::at(T_TDX_V4)).unwrap();
    assert!(!a.verified);
    let f = &a.findings[0];
    assert_eq!(f.check, "untrusted-root");
    assert!(f.message.contains("Intel's SGX Root CA"), "{}", f.message);
}

/// Flip each byte of the signed region (header + TD report) in turn: every flip must
/// be caught, either as undecodable input or as a contraindicating finding.
#[test]
fn every_flip_in_the_signed_region_is_caught() {
    let Some((q, c)) = dcap("tdx_quote") else {
        return;
    };
    let verifier = tdx::TdxVerifier::new(TdxPolicy::default(), &c).unwrap();
    let ctx = AppraisalContext::at(T_TDX_V4);
    let signed_len = DecodedTdQuote::parse(&q).unwrap().signed_len;
    let mut sig_findings = 0;
    for pos in 0..signed_len {
        let mut t = q.clone();
        t[pos] ^= 0x01;
        match verifier.verify(&t, &ctx) {
            Err(_) => {}
            Ok(a) => {
                assert!(!a.is_affirmed(), "flip at {pos} not caught");
                assert!(
                    a.findings
                        .iter()
                        .any(|f| f.is_contraindicated() && f.claim == Claim::Hardware),
                    "flip at {pos}: {:#?}",
                    a.findings
                );
                if a.findings
                    .iter()
                    .any(|f| f.check == "quote-signature-invalid")
                {
                    sig_findings += 1;
                }
            }
        }
    }
    // The TD report body (MRTD, RTMRs, report_data…) is caught by the quote signature.
    assert!(
        sig_findings >= 584,
        "only {sig_findings} flips named the quote signature"
    );
}

#[test]
fn flips_in_signature_key_and_qe_report_are_caught() {
    let Some((q, c)) = dcap("tdx_quote") else {
        return;
    };
    let verifier = tdx::TdxVerifier::new(TdxPolicy::default(), &c).unwrap();
    let ctx = AppraisalContext::at(T_TDX_V4);
    let auth = 48 + 584 + 4;
    // quote signature, attestation key, QE report (after type+size of cert data 6),
    // QE report signature
    let qe_report = auth + 128 + 6;
    let cases = [
        (auth, "quote-signature-invalid"),
        (auth + 63, "quote-signature-invalid"),
        (auth + 64, "attestation-key-unbound"),
        (auth + 127, "attestation-key-unbound"),
        (qe_report + 10, "qe-report-signature-invalid"),
        (qe_report + 320, "qe-report-signature-invalid"),
        (qe_report + 384, "qe-report-signature-invalid"),
    ];
    for (pos, check) in cases {
        let mut t = q.clone();
        t[pos] ^= 0x80;
        let a = verifier.verify(&t, &ctx).unwrap();
        assert!(!a.verified, "flip at {pos}");
        assert_eq!(checks(&a)[0], check, "flip at {pos}: {:#?}", a.findings);
    }
}

#[test]
fn truncations_are_errors_never_panics() {
    let Some((q, c)) = dcap("tdx_quote") else {
        return;
    };
    // The sample is a configfs buffer: zero padding follows the quote's declared end,
    // and cutting padding changes nothing. Cutting the quote itself must.
    let signed = DecodedTdQuote::parse(&q).unwrap().signed_len;
    let auth_len = u32::from_le_bytes(q[signed..signed + 4].try_into().unwrap()) as usize;
    let end = signed + 4 + auth_len;
    assert!(q[end..].iter().all(|b| *b == 0));
    for len in (0..end).step_by(7) {
        let r = tdx::verify_quote(
            &q[..len],
            &c,
            &TdxPolicy::default(),
            &AppraisalContext::at(T_TDX_V4),
        );
        match r {
            Err(_) => {}
            Ok(a) => assert!(!a.is_affirmed(), "truncated to {len} bytes yet affirmed"),
        }
    }
}

#[test]
fn unreadable_collateral_is_an_error_that_says_what_is_expected() {
    let Some((q, _)) = dcap("tdx_quote") else {
        return;
    };
    let err = tdx::verify_quote(
        &q,
        b"{}",
        &TdxPolicy::default(),
        &AppraisalContext::at(T_TDX_V4),
    )
    .unwrap_err();
    assert!(matches!(err, TdxError::Collateral(_)));
    assert!(err.to_string().contains("QuoteCollateralV3"), "{err}");
}
