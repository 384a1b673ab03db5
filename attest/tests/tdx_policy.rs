//! Table tests of the pure TDX appraisal: decoded quote + TCB verdict + policy +
//! context in, named findings out. No signatures involved.

use std::sync::OnceLock;

use cvm_attest::tdx::{
    appraise, report_data_for_nonce, AppraisalContext, DecodedTdQuote, SimTdxPlatform, TcbVerdict,
    TdQuoteRequest, TdxPolicy, TdxTcbStatus,
};
use cvm_attest::{Claim, Severity};

const NOW: u64 = 1_790_000_000;

/// A decoded quote with known fields (MRTD 0x11…, RTMRn 0x2n…, MRCONFIGID 0x33…,
/// report_data = SHA-512("n")), with `attrs` as TD attributes.
fn quote(attrs: u64) -> DecodedTdQuote {
    static P: OnceLock<SimTdxPlatform> = OnceLock::new();
    let p = P.get_or_init(|| SimTdxPlatform::generate_at(NOW).unwrap());
    let req = TdQuoteRequest {
        mr_td: [0x11; 48],
        rtmrs: [[0x20; 48], [0x21; 48], [0x22; 48], [0x23; 48]],
        mr_config_id: [0x33; 48],
        report_data: report_data_for_nonce(b"n"),
        td_attributes: attrs,
        ..TdQuoteRequest::default()
    };
    DecodedTdQuote::parse(&p.quote(&req).unwrap()).unwrap()
}

const SEPT: u64 = 1 << 28;

fn up_to_date() -> TcbVerdict {
    TcbVerdict {
        status: TdxTcbStatus::UpToDate,
        advisory_ids: vec![],
    }
}

/// (name, attributes, policy, context, expected (check, severity) list)
type Case = (
    &'static str,
    u64,
    TdxPolicy,
    AppraisalContext,
    Vec<(&'static str, Severity)>,
);

#[test]
fn appraisal_table() {
    use Severity::*;
    let base = TdxPolicy {
        mrtd: vec![vec![0x11; 48]],
        ..TdxPolicy::default()
    };
    let at = AppraisalContext::at(NOW);
    let with_nonce = |n: &[u8]| at.clone().with_nonce(n);
    let aged = |t: u64| AppraisalContext {
        evidence_time_unix: Some(t),
        ..at.clone()
    };
    let max_age = TdxPolicy {
        max_evidence_age_secs: Some(600),
        ..base.clone()
    };
    let cases: Vec<Case> = vec![
        ("all good", SEPT, base.clone(), with_nonce(b"n"), vec![]),
        (
            "debug on",
            SEPT | 1,
            base.clone(),
            at.clone(),
            vec![("td-debug-enabled", Contraindicated)],
        ),
        (
            "debug on, allowed",
            SEPT | 1,
            TdxPolicy {
                allow_debug: true,
                ..base.clone()
            },
            at.clone(),
            vec![("td-debug-enabled", Warning)],
        ),
        (
            "profiling bit",
            SEPT | 0x10,
            base.clone(),
            at.clone(),
            vec![("td-debug-enabled", Contraindicated)],
        ),
        (
            "mrtd mismatch",
            SEPT,
            TdxPolicy {
                mrtd: vec![vec![0x10; 48]],
                ..base.clone()
            },
            at.clone(),
            vec![("mrtd-mismatch", Contraindicated)],
        ),
        (
            "second of two mrtds matches",
            SEPT,
            TdxPolicy {
                mrtd: vec![vec![0x10; 48], vec![0x11; 48]],
                ..base.clone()
            },
            at.clone(),
            vec![],
        ),
        (
            "no mrtd listed",
            SEPT,
            TdxPolicy::default(),
            at.clone(),
            vec![("mrtd-not-checked", Info)],
        ),
        (
            "rtmr0 and rtmr2 mismatch, rtmr1 matches",
            SEPT,
            TdxPolicy {
                rtmr0: Some(vec![0; 48]),
                rtmr1: Some(vec![0x21; 48]),
                rtmr2: Some(vec![0; 48]),
                ..base.clone()
            },
            at.clone(),
            vec![
                ("rtmr0-mismatch", Contraindicated),
                ("rtmr2-mismatch", Contraindicated),
            ],
        ),
        (
            "mrconfigid mismatch",
            SEPT,
            TdxPolicy {
                mr_config_id: Some(vec![0x34; 48]),
                ..base.clone()
            },
            at.clone(),
            vec![("mrconfigid-mismatch", Contraindicated)],
        ),
        (
            "wrong nonce",
            SEPT,
            base.clone(),
            with_nonce(b"m"),
            vec![("report-data-mismatch", Contraindicated)],
        ),
        (
            "nonce required but missing",
            SEPT,
            TdxPolicy {
                require_nonce: true,
                ..base.clone()
            },
            at.clone(),
            vec![("nonce-missing", Contraindicated)],
        ),
        (
            "fresh enough",
            SEPT,
            max_age.clone(),
            aged(NOW - 599),
            vec![],
        ),
        (
            "too old",
            SEPT,
            max_age.clone(),
            aged(NOW - 601),
            vec![("evidence-too-old", Contraindicated)],
        ),
        (
            "from the future",
            SEPT,
            max_age.clone(),
            aged(NOW + 3600),
            vec![("evidence-from-future", Contraindicated)],
        ),
        (
            "age unknown",
            SEPT,
            max_age.clone(),
            at.clone(),
            vec![("evidence-age-unknown", Warning)],
        ),
        (
            "nonce proves freshness",
            SEPT,
            max_age.clone(),
            with_nonce(b"n"),
            vec![],
        ),
    ];
    for (name, attrs, policy, ctx, want) in cases {
        policy.validate().unwrap();
        let findings = appraise(&quote(attrs), Some(&up_to_date()), &policy, &ctx);
        let got: Vec<(&str, Severity)> = findings
            .iter()
            .map(|f| (f.check.as_str(), f.severity))
            .collect();
        assert_eq!(got, want, "case {name:?}");
    }
}

#[test]
fn tcb_status_table_under_default_and_lenient_policies() {
    use TdxTcbStatus::*;
    let q = quote(SEPT);
    let ctx = AppraisalContext::at(NOW);
    let lenient = TdxPolicy {
        accepted_tcb_statuses: vec![UpToDate, SWHardeningNeeded, TDRelaunchAdvised],
        mrtd: vec![vec![0x11; 48]],
        ..TdxPolicy::default()
    };
    let strict = TdxPolicy {
        mrtd: vec![vec![0x11; 48]],
        ..TdxPolicy::default()
    };
    for status in TdxTcbStatus::ALL {
        let v = TcbVerdict {
            status,
            advisory_ids: vec!["INTEL-SA-01036".into()],
        };
        for (policy, name) in [(&strict, "default"), (&lenient, "lenient")] {
            let f = appraise(&q, Some(&v), policy, &ctx);
            let accepted = policy.accepted_tcb_statuses.contains(&status);
            let expected = match (status, accepted) {
                (UpToDate, _) => vec![],
                (_, true) => vec![("tcb-status-warning", Severity::Warning)],
                (_, false) => vec![("tcb-status-not-accepted", Severity::Contraindicated)],
            };
            let got: Vec<_> = f.iter().map(|f| (f.check.as_str(), f.severity)).collect();
            assert_eq!(got, expected, "{status} under {name}");
            if let Some(f) = f.first() {
                assert_eq!(f.claim, Claim::FileSystem);
                assert!(f.message.contains("INTEL-SA-01036"), "{}", f.message);
                assert_eq!(f.reported, status.as_str());
            }
        }
    }
}

#[test]
fn unverified_quote_gets_no_tcb_finding_but_still_measurement_findings() {
    let policy = TdxPolicy {
        mrtd: vec![vec![0x10; 48]],
        ..TdxPolicy::default()
    };
    let f = appraise(&quote(SEPT | 1), None, &policy, &AppraisalContext::at(NOW));
    let names: Vec<_> = f.iter().map(|f| f.check.as_str()).collect();
    assert_eq!(names, ["mrtd-mismatch", "td-debug-enabled"]);
}

#[test]
fn nonce_binding_is_sha512_of_the_nonce() {
    // SHA-512("abc"), FIPS 180-2 test vector.
    assert_eq!(
        hex::encode(report_data_for_nonce(b"abc")),
        "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a\
         2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f"
    );
}

#[test]
fn policy_yaml_and_json_forms() {
    let json = r#"{
        "trustedRoots": ["intel-sgx-root-ca", "sha256:44A0196B2B99F889B8E149E95B807A350E7424964399E885A7CBB8CCFAB674D3"],
        "acceptedTcbStatuses": ["UpToDate", "SWHardeningNeeded"],
        "mrtd": ["0x1111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111ab"],
        "allowDebug": false,
        "maxEvidenceAgeSecs": 300
    }"#;
    let p: TdxPolicy = serde_json::from_str(json).unwrap();
    p.validate().unwrap();
    assert_eq!(p.trusted_roots.len(), 2);
    assert!(p.trusted_roots[1].matches(cvm_attest::tdx::INTEL_SGX_ROOT_CA_DER));
    assert_eq!(p.mrtd[0][47], 0xab);
    let back: TdxPolicy = serde_json::from_value(serde_json::to_value(&p).unwrap()).unwrap();
    assert_eq!(back, p);
    assert!(serde_json::from_str::<TdxPolicy>(r#"{"acceptedTcbStatuses": ["Fine"]}"#).is_err());
}
