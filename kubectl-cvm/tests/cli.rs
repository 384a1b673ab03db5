//! `kubectl-cvm evidence verify` run as a user would: the built binary, real vectors.

use std::path::PathBuf;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_kubectl-cvm");
/// Inside every vector certificate's validity.
const AT: &str = "2025-06-01T00:00:00Z";

/// A vector's path; see `cvm_attest::testvectors`.
fn vector(rel: &str) -> Option<PathBuf> {
    cvm_attest::testvectors::path(rel)
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

/// (report, certs, needs allowDebug)
const GENUINE: &[(&str, &[&str], bool)] = &[
    (
        "snp/virtee-sev/report_milan.hex",
        &["snp/virtee-sev/vcek_milan.der"],
        false,
    ),
    (
        "snp/go-sev-guest/attestation.bin",
        &["snp/go-sev-guest/vcek.testcer"],
        true,
    ),
    (
        "snp/trustee/test-report.bin",
        &["snp/trustee/test-vcek.der"],
        false,
    ),
    (
        "snp/trustee/test-vlek-report.bin",
        &[
            "snp/trustee/test-vlek.der",
            "snp/trustee/milan_ask_ark_asvk.pem",
        ],
        false,
    ),
    (
        "snp/trustee-az/hcl-report.bin",
        &["snp/trustee-az/vcek.pem"],
        false,
    ),
    (
        "snp/trustee-az/hcl-report-genoa.bin",
        &["snp/trustee-az/vcek-genoa.pem"],
        false,
    ),
];

#[test]
fn genuine_vectors_exit_0() {
    let dir = tempfile::tempdir().unwrap();
    let debug_policy = dir.path().join("debug.yaml");
    std::fs::write(&debug_policy, "allowDebug: true\n").unwrap();
    for (report, certs, debug) in GENUINE {
        let Some(report) = vector(report) else {
            continue;
        };
        let mut args = vec!["evidence", "verify", "--snp-report", s(&report), "--at", AT];
        let paths: Vec<PathBuf> = certs.iter().filter_map(|c| vector(c)).collect();
        for p in &paths {
            args.extend(["--certs", s(p)]);
        }
        if *debug {
            args.extend(["--policy", s(&debug_policy)]);
        }
        let o = run(&args);
        assert_eq!(
            code(&o),
            0,
            "{}: {}{}",
            report.display(),
            stdout(&o),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(stdout(&o).contains("result: AFFIRMED"), "{}", stdout(&o));
    }
}

#[test]
fn debug_guest_is_refused_by_default_with_a_named_finding() {
    let (Some(r), Some(c)) = (
        vector("snp/go-sev-guest/attestation.bin"),
        vector("snp/go-sev-guest/vcek.testcer"),
    ) else {
        return;
    };
    let o = run(&[
        "evidence",
        "verify",
        "--snp-report",
        s(&r),
        "--certs",
        s(&c),
        "--at",
        AT,
    ]);
    assert_eq!(code(&o), 1);
    assert!(stdout(&o).contains("[debug-enabled]"), "{}", stdout(&o));
}

#[test]
fn tampered_report_exits_1_naming_the_signature() {
    let (Some(r), Some(c)) = (
        vector("snp/trustee/test-report.bin"),
        vector("snp/trustee/test-vcek.der"),
    ) else {
        return;
    };
    let mut bytes = std::fs::read(&r).unwrap();
    bytes[0x90] ^= 0x01; // first measurement byte
    let dir = tempfile::tempdir().unwrap();
    let tampered = dir.path().join("tampered.hex");
    std::fs::write(&tampered, hex::encode(&bytes)).unwrap();
    let o = run(&[
        "evidence",
        "verify",
        "--snp-report",
        s(&tampered),
        "--certs",
        s(&c),
        "--at",
        AT,
    ]);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    let out = stdout(&o);
    assert!(out.contains("[report-signature-invalid]"), "{out}");
    assert!(out.contains("result: CONTRAINDICATED"), "{out}");
}

#[test]
fn every_finding_is_printed_and_json_is_an_ear() {
    let (Some(r), Some(c)) = (
        vector("snp/trustee/test-report.bin"),
        vector("snp/trustee/test-vcek.der"),
    ) else {
        return;
    };
    let wrong = "ab".repeat(48);
    let o = run(&[
        "evidence",
        "verify",
        "--snp-report",
        s(&r),
        "--certs",
        s(&c),
        "--at",
        AT,
        "--nonce",
        "0011",
        "--expected-measurement",
        &wrong,
        "-o",
        "json",
    ]);
    assert_eq!(code(&o), 1);
    let ear: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(ear["eat_profile"], "tag:github.com,2023:veraison/ear");
    let sub = &ear["submods"]["SEV-SNP"];
    assert_eq!(sub["ear.status"], "contraindicated");
    assert_eq!(sub["ear.trustworthiness-vector"]["executables"], 96);
    assert_eq!(sub["ear.trustworthiness-vector"]["hardware"], 2);
    let checks: Vec<&str> = sub["cvm.findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["check"].as_str().unwrap())
        .collect();
    assert!(checks.contains(&"measurement-mismatch"), "{checks:?}");
    assert!(checks.contains(&"report-data-mismatch"), "{checks:?}");

    // The right measurement affirms.
    let good = "a1f3930413247bb38cfc171579ea3c12d5fe4901f0c792f63fd75d98f1ef827c23500644e0e692e6be917f9050d3d38c";
    let o = run(&[
        "evidence",
        "verify",
        "--snp-report",
        s(&r),
        "--certs",
        s(&c),
        "--at",
        AT,
        "--expected-measurement",
        good,
        "-o",
        "json",
    ]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
    let ear: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        ear["submods"]["SEV-SNP"]["ear.trustworthiness-vector"]["executables"],
        2
    );
}

#[test]
fn vlek_without_asvk_exits_1() {
    let (Some(r), Some(c)) = (
        vector("snp/trustee/test-vlek-report.bin"),
        vector("snp/trustee/test-vlek.der"),
    ) else {
        return;
    };
    let o = run(&[
        "evidence",
        "verify",
        "--snp-report",
        s(&r),
        "--certs",
        s(&c),
        "--at",
        AT,
    ]);
    assert_eq!(code(&o), 1);
    assert!(
        stdout(&o).contains("[chain-issuer-missing]"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn bad_usage_and_unreadable_input_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.bin");
    std::fs::write(&garbage, b"definitely not a report").unwrap();
    let bad_policy = dir.path().join("p.yaml");
    std::fs::write(&bad_policy, "allowDebgu: true\n").unwrap();
    let missing = dir.path().join("missing.bin");
    let report = vector("snp/trustee/test-report.bin");
    let report = report.as_deref().map(s).unwrap_or("unused");
    let cases: Vec<Vec<&str>> = vec![
        vec!["evidence", "verify"],
        vec!["evidence", "verify", "--snp-report", s(&missing)],
        vec!["evidence", "verify", "--snp-report", s(&garbage)],
        vec![
            "evidence",
            "verify",
            "--snp-report",
            report,
            "--nonce",
            "xyz",
        ],
        vec![
            "evidence",
            "verify",
            "--snp-report",
            report,
            "--expected-measurement",
            "abcd",
        ],
        vec![
            "evidence",
            "verify",
            "--snp-report",
            report,
            "--at",
            "yesterday",
        ],
        vec![
            "evidence",
            "verify",
            "--snp-report",
            report,
            "--policy",
            s(&bad_policy),
        ],
        vec![
            "evidence",
            "verify",
            "--snp-report",
            report,
            "--certs",
            s(&garbage),
        ],
        vec!["evidence", "verify", "--snp-report", report, "-o", "xml"],
        vec!["evidence", "verify", "--tdx-quote", report],
        vec!["evidence", "frobnicate"],
    ];
    for args in cases {
        let o = run(&args);
        assert_eq!(
            code(&o),
            2,
            "{args:?}: {}{}",
            stdout(&o),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            !o.stderr.is_empty(),
            "{args:?} must explain itself on stderr"
        );
    }
}

#[test]
fn tdx_quotes_go_through_the_tdx_verifier() {
    let (Some(q), Some(c), Some(oq), Some(oc)) = (
        vector("tdx/dcap-qvl/tdx_quote"),
        vector("tdx/dcap-qvl/tdx_quote_collateral.json"),
        vector("tdx/dcap-qvl/tdx_quote_outdated"),
        vector("tdx/dcap-qvl/tdx_quote_outdated_collateral.json"),
    ) else {
        return;
    };
    // Inside the v4 sample's collateral window: UpToDate, affirmed.
    let o = run(&[
        "evidence",
        "verify",
        "--tdx-quote",
        s(&q),
        "--collateral",
        s(&c),
        "--at",
        "2025-06-20T00:00:00Z",
        "-o",
        "json",
    ]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
    let ear: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(ear["submods"]["TDX"]["ear.status"], "affirming");
    // After the collateral expired: refused with a reason.
    let o = run(&[
        "evidence",
        "verify",
        "--tdx-quote",
        s(&q),
        "--collateral",
        s(&c),
        "--at",
        "2025-08-01T00:00:00Z",
    ]);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    // The outdated sample: refused, naming the TCB check.
    let o = run(&[
        "evidence",
        "verify",
        "--tdx-quote",
        s(&oq),
        "--collateral",
        s(&oc),
        "--at",
        "2026-02-19T00:00:00Z",
    ]);
    assert_eq!(code(&o), 1);
    assert!(
        stdout(&o).contains("[tcb-level-unmatched]"),
        "{}",
        stdout(&o)
    );
    // Collateral that is not JSON is unreadable input.
    let o = run(&[
        "evidence",
        "verify",
        "--tdx-quote",
        s(&q),
        "--collateral",
        s(&q),
    ]);
    assert_eq!(code(&o), 2);
}

#[test]
fn snp_and_tdx_together_give_two_submods() {
    let (Some(r), Some(v), Some(q), Some(c)) = (
        vector("snp/trustee/test-report.bin"),
        vector("snp/trustee/test-vcek.der"),
        vector("tdx/dcap-qvl/tdx_quote"),
        vector("tdx/dcap-qvl/tdx_quote_collateral.json"),
    ) else {
        return;
    };
    let o = run(&[
        "evidence",
        "verify",
        "--snp-report",
        s(&r),
        "--certs",
        s(&v),
        "--tdx-quote",
        s(&q),
        "--collateral",
        s(&c),
        "--at",
        "2025-06-20T00:00:00Z",
        "-o",
        "json",
    ]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
    let ear: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(ear["submods"]["SEV-SNP"]["ear.status"], "affirming");
    assert_eq!(ear["submods"]["TDX"]["ear.status"], "affirming");
}

#[test]
fn simulated_evidence_needs_a_policy_naming_its_root() {
    use cvm_attest::sim::{ReportRequest, SimSnpConfig, SimSnpPlatform};
    let sim = SimSnpPlatform::from_seed([5; 32], SimSnpConfig::default()).unwrap();
    let req = ReportRequest {
        measurement: [0x6D; 48],
        ..Default::default()
    }
    .with_nonce(&[0xC0, 0xFF, 0xEE]);
    let ev = sim.issue_report(&req).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.bin");
    std::fs::write(&report, &ev.report).unwrap();
    // One PEM file holding VCEK, ASK and ARK.
    let certs = dir.path().join("chain.pem");
    std::fs::write(&certs, ev.cert_chain_pem()).unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "snp:\n  trustedRoots: [\"{}\"]\n  requireNonce: true\n",
            sim.root_fingerprint()
        ),
    )
    .unwrap();
    let at = "2026-01-01T00:00:00Z";
    let m = "6d".repeat(48);

    let o = run(&[
        "evidence",
        "verify",
        "--snp-report",
        s(&report),
        "--certs",
        s(&certs),
        "--at",
        at,
    ]);
    assert_eq!(code(&o), 1);
    assert!(
        stdout(&o).contains("[chain-untrusted-root]"),
        "{}",
        stdout(&o)
    );
    assert!(
        stdout(&o).contains(&sim.root_fingerprint()),
        "the fingerprint to list is printed"
    );

    let o = run(&[
        "evidence",
        "verify",
        "--snp-report",
        s(&report),
        "--certs",
        s(&certs),
        "--at",
        at,
        "--policy",
        s(&policy),
        "--nonce",
        "c0ffee",
        "--expected-measurement",
        &m,
    ]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
    assert!(stdout(&o).contains("instance-identity=2"), "{}", stdout(&o));

    let o = run(&[
        "evidence",
        "verify",
        "--snp-report",
        s(&report),
        "--certs",
        s(&certs),
        "--at",
        at,
        "--policy",
        s(&policy),
    ]);
    assert_eq!(code(&o), 1, "policy requires a nonce");
    assert!(stdout(&o).contains("[nonce-missing]"), "{}", stdout(&o));
}
