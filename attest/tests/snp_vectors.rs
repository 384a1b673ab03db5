//! Conformance against real AMD evidence in `shared/vectors` (read in place).

mod snp_util;

use cvm_attest::snp::{
    parse_certs, Cert, ChainError, Generation, SnpContext, SnpEvidence, SnpPolicy, SnpReport,
    SnpVerifier, TrustAnchors,
};
use cvm_attest::Severity;
use snp_util::{at, cert_ders, load, policy_for, vector, GENUINE};

fn verify(report: &[u8], certs: &[Vec<u8>]) -> cvm_attest::snp::SnpAppraisal {
    verify_with(SnpPolicy::default(), report, certs)
}

fn verify_with(
    policy: SnpPolicy,
    report: &[u8],
    certs: &[Vec<u8>],
) -> cvm_attest::snp::SnpAppraisal {
    let v = SnpVerifier::new(policy).unwrap();
    let ev = SnpEvidence {
        report,
        certs,
        crls: &[],
    };
    v.verify(&ev, &SnpContext::default(), at())
}

#[test]
fn every_genuine_report_verifies_with_its_chain() {
    for g in GENUINE {
        let Some((report, certs)) = load(g) else {
            continue;
        };
        let a = verify_with(policy_for(g), &report, &certs);
        let bad: Vec<_> = a
            .findings()
            .iter()
            .filter(|f| f.severity != Severity::Info)
            .collect();
        assert!(a.is_affirmed(), "{}: {bad:#?}", g.name);
        assert!(a.signature_verified, "{}", g.name);
        if g.debug {
            // Accepted by policy, but still a warning that the host can read memory.
            assert_eq!(bad.len(), 1, "{}: {bad:#?}", g.name);
            assert_eq!(bad[0].check, "debug-enabled");
            assert_eq!(bad[0].severity, Severity::Warning);
            let strict = verify(&report, &certs);
            assert!(
                !strict.is_affirmed(),
                "{}: default policy must refuse debug",
                g.name
            );
        } else {
            assert!(bad.is_empty(), "{}: {bad:#?}", g.name);
        }
        let chain = a.chain.as_ref().unwrap();
        assert_eq!(
            chain.generation.as_deref(),
            Some(g.generation),
            "{}",
            g.name
        );
        assert_eq!(chain.vek_kind, g.kind, "{}", g.name);
        assert!(chain.root.starts_with("AMD "), "{}: {}", g.name, chain.root);
        let ear = a.to_ear(1, Default::default(), None);
        let want = if g.debug { "warning" } else { "affirming" };
        assert_eq!(ear.status().to_string(), want, "{}", g.name);
    }
}

#[test]
fn report_versions_are_parsed() {
    let mut seen = Vec::new();
    for g in GENUINE {
        let Some((report, _)) = load(g) else { continue };
        let r = SnpReport::parse(&report).unwrap();
        assert_eq!(r.sig_algo, 1, "{}", g.name);
        seen.push((g.name, r.version));
    }
    if seen.len() == GENUINE.len() {
        assert!(seen.iter().any(|(_, v)| *v == 2), "{seen:?}");
        assert!(seen.iter().any(|(_, v)| *v == 3), "{seen:?}");
    }
}

#[test]
fn vlek_report_verifies_only_through_the_asvk() {
    let (Some(report), Some(vlek), Some(asvk)) = (
        vector("snp/trustee/test-vlek-report.bin"),
        vector("snp/trustee/test-vlek.der"),
        vector("snp/trustee/milan_ask_ark_asvk.pem"),
    ) else {
        return;
    };
    // Without the ASVK only AMD's builtin ASK is at hand: no path.
    let a = verify(&report, &cert_ders(&vlek));
    assert!(!a.is_affirmed());
    assert!(
        a.findings()
            .iter()
            .any(|f| f.check == "chain-issuer-missing"),
        "{:#?}",
        a.findings()
    );
    // With the ASVK: verified, as a VLEK.
    let mut certs = cert_ders(&vlek);
    certs.extend(cert_ders(&asvk));
    let a = verify(&report, &certs);
    assert!(a.is_affirmed(), "{:#?}", a.findings());
    assert_eq!(a.chain.unwrap().intermediate_subject, "SEV-VLEK-Milan");
    // The ASK alone (no ASVK) does not sign the VLEK.
    let ask_only: Vec<Vec<u8>> = parse_certs(&asvk)
        .unwrap()
        .into_iter()
        .filter(|c| !c.subject_cn.contains("VLEK"))
        .map(|c| c.der().to_vec())
        .collect();
    let mut certs = cert_ders(&vlek);
    certs.extend(ask_only);
    assert!(!verify(&report, &certs).is_affirmed());
}

#[test]
fn turin_vcek_does_not_chain_to_genoa_roots() {
    let (Some(vcek), Some(genoa), Some(turin)) = (
        vector("snp/virtee-sev/vcek_turin.der"),
        vector("snp/go-sev-guest/ask_ark_genoa.pem"),
        vector("snp/virtee-sev/cert_chain_turin"),
    ) else {
        return;
    };
    let vcek = Cert::from_der(&vcek).unwrap();
    assert_eq!(
        vcek.amd.hw_id.as_ref().map(Vec::len),
        Some(8),
        "Turin chip IDs are 8 bytes"
    );
    assert!(vcek.amd.fmc.is_some(), "Turin VCEKs carry an FMC SPL");

    let mut genoa_only = TrustAnchors::default();
    genoa_only.add_builtin(Some(Generation::Genoa));
    let mut supplied = vec![vcek.clone()];
    supplied.extend(parse_certs(&genoa).unwrap());
    let err = genoa_only.verify_chain(&supplied).unwrap_err();
    assert!(matches!(err, ChainError::IssuerMissing { .. }), "{err}");
    // Even forced, the Genoa ASK's key does not verify the Turin VCEK.
    let genoa_ask = parse_certs(&genoa)
        .unwrap()
        .into_iter()
        .find(|c| !c.is_self_issued())
        .unwrap();
    assert!(matches!(
        vcek.verify_signed_by(&genoa_ask),
        Err(ChainError::Signature { .. })
    ));

    // The builtin Turin roots do verify it, and the supplied PEM chain is the same.
    let chain = TrustAnchors::builtin_amd()
        .verify_chain(std::slice::from_ref(&vcek))
        .unwrap();
    assert_eq!(chain.generation, Some(Generation::Turin));
    let mut with_pem = vec![vcek];
    with_pem.extend(parse_certs(&turin).unwrap());
    assert_eq!(
        TrustAnchors::builtin_amd()
            .verify_chain(&with_pem)
            .unwrap()
            .root
            .fingerprint,
        chain.root.fingerprint
    );
}

#[test]
fn builtin_roots_match_published_ones() {
    for (file, gen) in [
        ("snp/go-sev-guest/ask_ark_milan.pem", Generation::Milan),
        ("snp/go-sev-guest/ask_ark_genoa.pem", Generation::Genoa),
        ("snp/go-sev-guest/ask_ark_turin_vcek.pem", Generation::Turin),
    ] {
        let Some(pem) = vector(file) else { continue };
        let mut t = TrustAnchors::default();
        t.add_builtin(Some(gen));
        for c in parse_certs(&pem).unwrap() {
            let known = t
                .roots
                .iter()
                .map(|r| &r.cert)
                .chain(t.intermediates.iter());
            assert!(
                known.into_iter().any(|k| k.fingerprint == c.fingerprint),
                "{file}: {}",
                c.subject_cn
            );
        }
    }
}

#[test]
fn malformed_vceks_are_refused_with_a_reason() {
    let Some(report) = vector("snp/trustee/test-report.bin") else {
        return;
    };
    for name in [
        "snp/trustee/test-vcek-invalid-legacy.der",
        "snp/trustee/test-vcek-invalid-new.der",
    ] {
        let Some(der) = vector(name) else { continue };
        // Both extension encodings of the hardware ID parse ...
        let c = Cert::from_der(&der).unwrap();
        assert_eq!(
            c.amd.hw_id.as_deref(),
            Some(&(0u8..64).collect::<Vec<_>>()[..]),
            "{name}"
        );
        // ... but the certificate was altered after AMD signed it.
        let a = verify(&report, &[der]);
        assert!(!a.is_affirmed(), "{name}");
        let f = a
            .findings()
            .iter()
            .find(|f| f.check == "chain-signature-invalid");
        let f = f.unwrap_or_else(|| panic!("{name}: {:#?}", a.findings()));
        assert!(
            f.message.contains("SEV-VCEK") && f.message.contains("SEV-Milan"),
            "{}",
            f.message
        );
    }
}

#[test]
fn truncated_or_garbage_certificates_are_refused() {
    let Some(der) = vector("snp/trustee/test-vcek.der") else {
        return;
    };
    let Some(report) = vector("snp/trustee/test-report.bin") else {
        return;
    };
    for cut in [0, 1, 100, der.len() - 1] {
        assert!(Cert::from_der(&der[..cut]).is_err());
    }
    let a = verify(&report, &[der[..500].to_vec()]);
    assert!(
        a.findings().iter().any(|f| f.check == "cert-malformed"),
        "{:#?}",
        a.findings()
    );
    assert!(a.findings().iter().any(|f| f.check == "vek-missing"));
    assert!(!a.is_affirmed());
}

#[test]
fn chip_id_and_tcb_are_bound_to_the_vcek() {
    // The go-sev-guest report with trustee's VCEK (another chip): the chain is fine,
    // the signature fails, and the binding checks name the differences.
    let (Some(report), Some(other)) = (
        vector("snp/go-sev-guest/attestation.bin"),
        vector("snp/trustee/test-vcek.der"),
    ) else {
        return;
    };
    let a = verify(&report, &[other]);
    let checks: Vec<&str> = a.findings().iter().map(|f| f.check.as_str()).collect();
    assert!(checks.contains(&"report-signature-invalid"), "{checks:?}");
    assert!(checks.contains(&"vek-chip-id-mismatch"), "{checks:?}");
    assert!(!a.is_affirmed());
}

#[test]
fn verification_time_outside_validity_is_named() {
    let Some((report, certs)) = load(&GENUINE[2]) else {
        return;
    };
    let v = SnpVerifier::new(SnpPolicy::default()).unwrap();
    let ev = SnpEvidence {
        report: &report,
        certs: &certs,
        crls: &[],
    };
    let late = cvm_attest::snp::time::parse_rfc3339("2031-01-01T00:00:00Z").unwrap();
    let a = v.verify(&ev, &SnpContext::default(), late);
    let f = a
        .findings()
        .iter()
        .find(|f| f.check == "cert-expired")
        .expect("expired finding");
    assert!(
        f.message.contains("SEV-VCEK") && f.message.contains("2030-01-24"),
        "{}",
        f.message
    );
    assert!(!a.is_affirmed());
    let early = cvm_attest::snp::time::parse_rfc3339("2019-01-01T00:00:00Z").unwrap();
    let a = v.verify(&ev, &SnpContext::default(), early);
    assert!(a.findings().iter().any(|f| f.check == "cert-not-yet-valid"));
}

#[test]
fn flipping_any_signed_byte_is_caught() {
    for g in GENUINE {
        let Some((report, certs)) = load(g) else {
            continue;
        };
        let v = SnpVerifier::new(policy_for(g)).unwrap();
        let chain = v.chain(&certs).unwrap();
        let ctx = SnpContext::default();
        assert!(v
            .verify_with_chain(&report, &chain, &[], &ctx, at())
            .is_affirmed());
        for pos in 0..cvm_attest::snp::report::SIGNED_LEN {
            let mut t = report.clone();
            t[pos] ^= 0xFF;
            let a = v.verify_with_chain(&t, &chain, &[], &ctx, at());
            assert!(!a.is_affirmed(), "{}: flip at {pos:#x} not caught", g.name);
            assert!(
                a.findings().iter().any(|f| f.is_contraindicated()),
                "{}: flip at {pos:#x} has no contraindicating finding",
                g.name
            );
        }
        // And the signature itself.
        for pos in [0x2A0, 0x2A0 + 47, 0x2E8, 0x2E8 + 47, 0x2A0 + 60] {
            let mut t = report.clone();
            t[pos] ^= 0x01;
            assert!(
                !v.verify_with_chain(&t, &chain, &[], &ctx, at())
                    .is_affirmed(),
                "{}: {pos:#x}",
                g.name
            );
        }
    }
}

#[test]
fn a_bundle_without_vek_says_so() {
    let Some(pem) = vector("snp/go-sev-guest/ask_ark_milan.pem") else {
        return;
    };
    let certs = parse_certs(&pem).unwrap();
    let err = TrustAnchors::builtin_amd()
        .verify_chain(&certs)
        .unwrap_err();
    assert_eq!(err, ChainError::NoVek);
    assert!(err.to_string().contains("--certs"), "{err}");
}
