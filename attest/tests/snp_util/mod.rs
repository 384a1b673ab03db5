//! Shared helpers for the SNP integration tests: real vectors read in place.
#![allow(dead_code)]

use std::path::PathBuf;

/// A time inside every vector certificate's validity (the VLEK expires 2025-12-10,
/// the Genoa VCEK starts 2025-01-24).
pub const AT: &str = "2025-06-01T00:00:00Z";

pub fn at() -> u64 {
    cvm_attest::snp::time::parse_rfc3339(AT).unwrap()
}

/// See `cvm_attest::testvectors`.
pub fn vectors_dir() -> PathBuf {
    cvm_attest::testvectors::dir()
}

/// A vector's bytes; see `cvm_attest::testvectors`.
pub fn vector(rel: &str) -> Option<Vec<u8>> {
    cvm_attest::testvectors::read(rel)
}

/// Certificates of a DER or PEM file, as DER blobs.
pub fn cert_ders(file: &[u8]) -> Vec<Vec<u8>> {
    cvm_attest::snp::parse_certs(file)
        .unwrap()
        .into_iter()
        .map(|c| c.der().to_vec())
        .collect()
}

/// One genuine report with its certificate files.
pub struct Genuine {
    pub name: &'static str,
    pub report: &'static str,
    pub certs: &'static [&'static str],
    pub generation: &'static str,
    pub kind: &'static str,
    /// The guest policy allows debugging (go-sev-guest's sample does).
    pub debug: bool,
}

pub const GENUINE: &[Genuine] = &[
    Genuine {
        name: "virtee-sev milan",
        report: "snp/virtee-sev/report_milan.hex",
        certs: &["snp/virtee-sev/vcek_milan.der"],
        generation: "Milan",
        kind: "VCEK",
        debug: false,
    },
    Genuine {
        name: "go-sev-guest",
        report: "snp/go-sev-guest/attestation.bin",
        certs: &["snp/go-sev-guest/vcek.testcer"],
        generation: "Milan",
        kind: "VCEK",
        debug: true,
    },
    Genuine {
        name: "trustee",
        report: "snp/trustee/test-report.bin",
        certs: &["snp/trustee/test-vcek.der"],
        generation: "Milan",
        kind: "VCEK",
        debug: false,
    },
    Genuine {
        name: "trustee VLEK",
        report: "snp/trustee/test-vlek-report.bin",
        certs: &[
            "snp/trustee/test-vlek.der",
            "snp/trustee/milan_ask_ark_asvk.pem",
        ],
        generation: "Milan",
        kind: "VLEK",
        debug: false,
    },
    Genuine {
        name: "trustee-az HCL milan",
        report: "snp/trustee-az/hcl-report.bin",
        certs: &["snp/trustee-az/vcek.pem"],
        generation: "Milan",
        kind: "VCEK",
        debug: false,
    },
    Genuine {
        name: "trustee-az HCL genoa",
        report: "snp/trustee-az/hcl-report-genoa.bin",
        certs: &["snp/trustee-az/vcek-genoa.pem"],
        generation: "Genoa",
        kind: "VCEK",
        debug: false,
    },
];

/// A policy that accepts the vector's guest policy (debug only where the sample has it).
pub fn policy_for(g: &Genuine) -> cvm_attest::snp::SnpPolicy {
    cvm_attest::snp::SnpPolicy {
        allow_debug: g.debug,
        ..Default::default()
    }
}

/// The report bytes and DER certificates of a genuine vector, or None when skipped.
pub fn load(g: &Genuine) -> Option<(Vec<u8>, Vec<Vec<u8>>)> {
    let file = vector(g.report)?;
    let report = cvm_attest::snp::extract_report_bytes(&file).unwrap();
    let mut certs = Vec::new();
    for c in g.certs {
        certs.extend(cert_ders(&vector(c)?));
    }
    Some((report, certs))
}
