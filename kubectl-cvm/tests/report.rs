//! `kubectl cvm report` on files: SNP reports and TDX quotes from the vectors.

use std::path::PathBuf;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_kubectl-cvm");

/// A vector's path; see `cvm_attest::testvectors`.
fn vector(rel: &str) -> Option<PathBuf> {
    cvm_attest::testvectors::path(rel)
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn snp_report_fields_are_spelled_out() {
    let Some(p) = vector("snp/virtee-sev/report_milan.hex") else {
        return;
    };
    let o = run(&["report", p.to_str().unwrap()]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let t = out(&o);
    for field in [
        "Version:",
        "Guest policy:",
        "debug not allowed",
        "Reported TCB:",
        "bootloader=",
        "Measurement:",
        "Report data:",
        "Chip ID:",
        "signing key VCEK",
        "ECDSA P-384 with SHA-384",
    ] {
        assert!(t.contains(field), "missing {field}:\n{t}");
    }
    // The same measurement the verifier reads.
    let bytes = cvm_attest::snp::report::extract_report_bytes(&std::fs::read(&p).unwrap()).unwrap();
    let r = cvm_attest::snp::report::SnpReport::parse(&bytes).unwrap();
    assert!(t.contains(&hex::encode(r.measurement)));
    assert!(t.contains(&hex::encode(r.chip_id)));

    let j = run(&["report", p.to_str().unwrap(), "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&j.stdout).unwrap();
    assert_eq!(v["measurement"], hex::encode(r.measurement));
    assert_eq!(v["policy"]["debug"], false);
    assert_eq!(v["version"], r.version);
}

#[test]
fn debug_policy_is_flagged() {
    // go-sev-guest's report has a debug-allowed policy.
    let Some(p) = vector("snp/go-sev-guest/attestation.bin") else {
        return;
    };
    let t = out(&run(&["report", p.to_str().unwrap()]));
    assert!(t.contains("DEBUG ALLOWED"), "{t}");
}

#[test]
fn tdx_quote_fields_and_tcb_status() {
    let Some(q) = vector("tdx/dcap-qvl/tdx_quote") else {
        return;
    };
    let Some(c) = vector("tdx/dcap-qvl/tdx_quote_collateral.json") else {
        return;
    };
    let o = run(&[
        "report",
        q.to_str().unwrap(),
        "--collateral",
        c.to_str().unwrap(),
        "--at",
        "2025-06-20T00:00:00Z",
    ]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let t = out(&o);
    for field in ["MRTD:", "RTMR0:", "RTMR3:", "TD attributes:", "MRCONFIGID:"] {
        assert!(t.contains(field), "missing {field}:\n{t}");
    }
    let status = t.lines().find(|l| l.contains("TCB status:")).unwrap();
    assert!(status.ends_with("UpToDate"), "{status}");
    let d = cvm_attest::tdx::DecodedTdQuote::parse(&std::fs::read(&q).unwrap()).unwrap();
    assert!(t.contains(&hex::encode(&d.mr_td)));
    // Without collateral the status is unknown, and says why.
    let t2 = out(&run(&["report", q.to_str().unwrap()]));
    assert!(t2.contains("no collateral"), "{t2}");
}

#[test]
fn unrecognised_files_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("junk");
    std::fs::write(&p, b"not evidence").unwrap();
    let o = run(&["report", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("neither"));
}
