//! Verification throughput. Prints figures; asserts nothing about time.
//!
//!   cargo bench -p cvm-attest --bench verify                    # ring hot path
//!   cargo bench -p cvm-attest --bench verify --features aws-lc  # aws-lc-rs hot path
//!
//! Figures: SNP reports verified per second with the chain cached (the full
//! `SnpVerifier::verify`, cache hit), one bare ECDSA P-384 verification per second with
//! each available backend, the ratio of the two costs (goal ≤ 1.25 against the fastest
//! bare backend), and TDX quotes per second through `tdx::TdxVerifier`.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cvm_attest::sim::{ReportRequest, SimSnpConfig, SimSnpPlatform};
use cvm_attest::snp::crypto::ReportKey;
use cvm_attest::snp::{
    extract_report_bytes, parse_certs, time::parse_rfc3339, SnpContext, SnpEvidence, SnpPolicy,
    SnpReport, SnpVerifier,
};

const RUN: Duration = Duration::from_millis(1500);

/// Operations per second of `f`, run for about `RUN` after a short warm-up.
fn rate(mut f: impl FnMut() -> bool) -> f64 {
    for _ in 0..20 {
        assert!(f(), "benchmark body must succeed");
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < RUN {
        for _ in 0..50 {
            black_box(f());
        }
        n += 50;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn vectors() -> PathBuf {
    std::env::var_os("CVM_VECTORS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/vectors"))
}

/// A genuine Milan report with its VCEK, or simulated evidence when vectors are absent.
fn evidence() -> (String, Vec<u8>, Vec<Vec<u8>>, SnpPolicy, u64) {
    let dir = vectors().join("snp/trustee");
    if let (Ok(r), Ok(c)) = (
        std::fs::read(dir.join("test-report.bin")),
        std::fs::read(dir.join("test-vcek.der")),
    ) {
        let report = extract_report_bytes(&r).expect("report");
        let certs = parse_certs(&c)
            .expect("vcek")
            .into_iter()
            .map(|c| c.der().to_vec())
            .collect();
        let at = parse_rfc3339("2025-06-01T00:00:00Z").expect("time");
        return (
            "trustee Milan report + VCEK".into(),
            report,
            certs,
            SnpPolicy::default(),
            at,
        );
    }
    let sim = SimSnpPlatform::from_seed([1; 32], SimSnpConfig::default()).expect("sim");
    let ev = sim.issue_report(&ReportRequest::default()).expect("report");
    let at = parse_rfc3339("2026-01-01T00:00:00Z").expect("time");
    (
        "simulated Milan report".into(),
        ev.report,
        ev.cert_chain,
        sim.policy(),
        at,
    )
}

fn tdx_rate() -> Option<f64> {
    use cvm_attest::tdx::{AppraisalContext, SimTdxPlatform, TdQuoteRequest, TdxVerifier};
    let sim = SimTdxPlatform::generate().ok()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    let ev = sim.issue_quote_at(&TdQuoteRequest::default(), now).ok()?;
    let verifier = TdxVerifier::new(sim.policy(), &ev.collateral_json).ok()?;
    let ctx = AppraisalContext::at(now);
    let ok = verifier.verify(&ev.quote, &ctx).ok()?.is_affirmed();
    if !ok {
        eprintln!("note: simulated TDX quote did not verify; TDX figure skipped");
        return None;
    }
    Some(rate(|| {
        verifier
            .verify(&ev.quote, &ctx)
            .map(|a| a.is_affirmed())
            .unwrap_or(false)
    }))
}

fn main() {
    let (what, report, certs, policy, at) = evidence();
    let verifier = SnpVerifier::new(policy).expect("policy");
    let ctx = SnpContext::default();
    let ev = SnpEvidence {
        report: &report,
        certs: &certs,
        crls: &[],
    };
    assert!(
        verifier.verify(&ev, &ctx, at).is_affirmed(),
        "evidence must verify"
    );

    let parsed = SnpReport::parse(&report).expect("report");
    let chain = verifier.chain(&certs).expect("chain");
    let point = chain.vek_point().to_vec();
    let mut sig = [0u8; 96];
    sig[..48].copy_from_slice(&parsed.signature_r);
    sig[48..].copy_from_slice(&parsed.signature_s);
    let msg = parsed.signed_bytes().to_vec();

    println!(
        "evidence: {what}; report-signature backend: {}",
        ReportKey::backend()
    );

    let full = rate(|| verifier.verify(&ev, &ctx, at).is_affirmed());
    println!("SNP reports verified/s, chain cached (full verify): {full:>10.0}");
    let hot = rate(|| {
        verifier
            .verify_with_chain(&report, &chain, &[], &ctx, at)
            .is_affirmed()
    });
    println!("SNP reports verified/s, chain in hand:              {hot:>10.0}");

    let ring_key =
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P384_SHA384_FIXED, &point);
    let ring_rate = rate(|| ring_key.verify(&msg, &sig).is_ok());
    println!("bare P-384 verify/s, ring ECDSA_P384_SHA384_FIXED:  {ring_rate:>10.0}");
    #[cfg_attr(not(feature = "aws-lc"), allow(unused_mut))]
    let mut fastest = ("ring", ring_rate);

    #[cfg(feature = "aws-lc")]
    {
        use aws_lc_rs::signature::{ParsedPublicKey, UnparsedPublicKey, ECDSA_P384_SHA384_FIXED};
        let k = UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, &point);
        let r = rate(|| k.verify(&msg, &sig).is_ok());
        println!("bare P-384 verify/s, aws-lc-rs (unparsed key):      {r:>10.0}");
        if r > fastest.1 {
            fastest = ("aws-lc-rs", r);
        }
        let pk = ParsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, &point).expect("key");
        let r = rate(|| pk.verify_sig(&msg, &sig).is_ok());
        println!("bare P-384 verify/s, aws-lc-rs (parsed key):        {r:>10.0}");
        if r > fastest.1 {
            fastest = ("aws-lc-rs parsed", r);
        }
    }
    #[cfg(not(feature = "aws-lc"))]
    println!("bare P-384 verify/s, aws-lc-rs:                     (build with --features aws-lc)");

    match tdx_rate() {
        Some(t) => println!("TDX quotes verified/s (simulated quote + collateral): {t:>7.0}"),
        None => println!("TDX quotes verified/s: not measured"),
    }

    // Cost ratio: time per full verify / time per fastest bare verify.
    let ratio = fastest.1 / full;
    println!(
        "ratio full SNP verify (chain cached) / bare P-384 verify ({}): {ratio:.3} (goal <= 1.25)",
        fastest.0
    );
}
