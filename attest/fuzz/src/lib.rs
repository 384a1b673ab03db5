//! Fuzz target bodies, shared by the libFuzzer targets (`cargo fuzz`) and the plain
//! runner (`plain-fuzz`) used where no nightly toolchain is available. A body must
//! never panic, whatever the input.

use std::sync::OnceLock;

mod tdx;
pub use tdx::tdx_quote;

use cvm_attest::sim::{ReportRequest, SimSnpConfig, SimSnpPlatform};
use cvm_attest::snp::{
    extract_report_bytes, parse_certs, Cert, Crl, SnpContext, SnpReport, SnpVerifier, TrustAnchors,
    VerifiedChain,
};

/// Names of the targets, for the plain runner and run.sh.
pub const TARGETS: &[&str] = &["snp_report", "snp_cert", "tdx_quote"];

struct Fixture {
    verifier: SnpVerifier,
    chain: std::sync::Arc<VerifiedChain>,
    seed_report: Vec<u8>,
    seed_chain: Vec<Vec<u8>>,
}

fn fixture() -> Option<&'static Fixture> {
    static F: OnceLock<Option<Fixture>> = OnceLock::new();
    F.get_or_init(|| {
        let sim = SimSnpPlatform::from_seed([3; 32], SimSnpConfig::default()).ok()?;
        let ev = sim.issue_report(&ReportRequest::default()).ok()?;
        let verifier = SnpVerifier::new(sim.policy()).ok()?;
        let chain = verifier.chain(&ev.cert_chain).ok()?;
        Some(Fixture {
            verifier,
            chain,
            seed_report: ev.report,
            seed_chain: ev.cert_chain,
        })
    })
    .as_ref()
}

/// Seeds for the plain runner: a valid report and its certificates.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    if target == "tdx_quote" {
        return tdx::seeds();
    }
    let Some(f) = fixture() else {
        return Vec::new();
    };
    match target {
        "snp_report" => vec![f.seed_report.clone()],
        "snp_cert" => f.seed_chain.clone(),
        _ => Vec::new(),
    }
}

/// The SNP report parser and everything downstream of it on a cached chain.
pub fn snp_report(data: &[u8]) {
    let _ = extract_report_bytes(data);
    if let Ok(r) = SnpReport::parse(data) {
        let _ = r.generation_hint();
        let _ = r.signing_key();
    }
    if let Some(f) = fixture() {
        let ctx = SnpContext {
            nonce: Some(b"fuzz".to_vec()),
        };
        let a = f
            .verifier
            .verify_with_chain(data, &f.chain, &[], &ctx, 1_800_000_000);
        let _ = a.appraisal.status();
    }
}

/// The certificate, PEM and CRL parsers, and chain building on what they accept.
pub fn snp_cert(data: &[u8]) {
    if let Ok(c) = Cert::from_der(data) {
        let _ = TrustAnchors::builtin_amd().verify_chain(std::slice::from_ref(&c));
        if let Some(f) = fixture() {
            let mut certs = f.seed_chain.clone();
            certs[0] = data.to_vec();
            let _ = f.verifier.chain(&certs);
        }
    }
    let _ = parse_certs(data);
    let _ = Crl::from_der(data);
    let _ = Crl::parse_file(data);
}

/// Dispatch by target name (plain runner).
pub fn run(target: &str, data: &[u8]) -> bool {
    match target {
        "snp_report" => snp_report(data),
        "snp_cert" => snp_cert(data),
        "tdx_quote" => tdx_quote(data),
        _ => return false,
    }
    true
}
