//! The simulated SNP platform: its evidence verifies through the real verifier only
//! when a policy names its root, and its reports have the exact ABI layout.

use cvm_attest::sim::{ReportRequest, SimSnpConfig, SimSnpPlatform};
use cvm_attest::snp::{
    parse_certs, report_data_for_nonce, time::parse_rfc3339, Generation, GuestPolicy, Hex,
    MinimumTcb, SnpAppraisal, SnpContext, SnpEvidence, SnpPolicy, SnpReport, SnpVerifier,
    TcbVersion, TrustAnchors,
};
use cvm_attest::Severity;

const SEED: [u8; 32] = [7; 32];

fn now() -> u64 {
    parse_rfc3339("2026-01-01T00:00:00Z").unwrap()
}

fn platform(generation: Generation, report_version: u32) -> SimSnpPlatform {
    let config = SimSnpConfig {
        generation,
        report_version,
        ..Default::default()
    };
    SimSnpPlatform::from_seed(SEED, config).unwrap()
}

fn request() -> ReportRequest {
    ReportRequest {
        measurement: [0x4D; 48],
        host_data: [0x48; 32],
        vmpl: 0,
        ..Default::default()
    }
    .with_nonce(b"challenge")
}

fn verify_with(
    policy: SnpPolicy,
    report: &[u8],
    certs: &[Vec<u8>],
    crls: &[Vec<u8>],
) -> SnpAppraisal {
    let v = SnpVerifier::new(policy).unwrap();
    let ev = SnpEvidence {
        report,
        certs,
        crls,
    };
    v.verify(
        &ev,
        &SnpContext {
            nonce: Some(b"challenge".to_vec()),
        },
        now(),
    )
}

fn checks(a: &SnpAppraisal) -> Vec<&str> {
    a.findings()
        .iter()
        .filter(|f| f.severity != Severity::Info)
        .map(|f| f.check.as_str())
        .collect()
}

#[test]
fn default_policy_rejects_simulated_evidence_naming_the_root() {
    let sim = platform(Generation::Milan, 3);
    let ev = sim.issue_report(&request()).unwrap();
    let a = verify_with(SnpPolicy::default(), &ev.report, &ev.cert_chain, &[]);
    assert!(!a.is_affirmed());
    let f = a
        .findings()
        .iter()
        .find(|f| f.check == "chain-untrusted-root")
        .expect("named finding");
    assert!(f.is_contraindicated());
    assert_eq!(f.reported, sim.root_fingerprint());
    assert!(f.message.contains("does not trust"), "{}", f.message);
    // Without the ARK supplied it still does not chain anywhere trusted.
    let a = verify_with(SnpPolicy::default(), &ev.report, &ev.cert_chain[..2], &[]);
    assert!(!a.is_affirmed());
    assert!(
        checks(&a).contains(&"chain-root-missing"),
        "{:?}",
        checks(&a)
    );
}

#[test]
fn policy_naming_the_root_affirms_every_generation_and_version() {
    for generation in [Generation::Milan, Generation::Genoa, Generation::Turin] {
        for version in [2, 3, 5] {
            let sim = platform(generation, version);
            let req = ReportRequest {
                policy: GuestPolicy::RESERVED_ONE | GuestPolicy::SMT,
                ..request()
            };
            let ev = sim.issue_report(&req).unwrap();
            let mut policy = sim.policy();
            policy.measurements = vec![Hex([0x4D; 48])];
            policy.host_data = Some(Hex([0x48; 32]));
            policy.require_nonce = true;
            let a = verify_with(policy, &ev.report, &ev.cert_chain, &[]);
            assert!(
                a.is_affirmed(),
                "{generation} v{version}: {:#?}",
                a.findings()
            );
            assert!(
                checks(&a).is_empty(),
                "{generation} v{version}: {:?}",
                checks(&a)
            );
            assert_eq!(a.generation, Some(generation), "v{version}");
            let ear = a.to_ear(0, Default::default(), None);
            let vector = &ear.submods["SEV-SNP"].trust_vector;
            assert_eq!(vector.len(), 5, "{vector:?}");
            assert!(vector.values().all(|v| *v == 2), "{vector:?}");
        }
    }
}

#[test]
fn reports_have_the_exact_abi_layout() {
    use sev::parser::ByteParser;
    for (generation, version) in [
        (Generation::Milan, 3),
        (Generation::Genoa, 5),
        (Generation::Turin, 5),
    ] {
        let sim = platform(generation, version);
        let tcb = TcbVersion {
            bootloader: 9,
            tee: 1,
            snp: 30,
            microcode: 200,
            fmc: Some(2),
        };
        let req = ReportRequest {
            vmpl: 2,
            guest_svn: 5,
            family_id: [1; 16],
            image_id: [2; 16],
            tcb: Some(tcb),
            ..request()
        };
        let ev = sim.issue_report(&req).unwrap();
        assert_eq!(ev.report.len(), 0x4A0);
        // Our parser ...
        let r = SnpReport::parse(&ev.report).unwrap();
        assert_eq!(r.version, version);
        assert_eq!(r.measurement, [0x4D; 48]);
        assert_eq!(r.host_data, [0x48; 32]);
        assert_eq!(r.report_data, report_data_for_nonce(b"challenge"));
        assert_eq!(r.vmpl, 2);
        assert_eq!(r.chip_id, sim.chip_id());
        let want_tcb = TcbVersion {
            fmc: (generation == Generation::Turin).then_some(2),
            ..tcb
        };
        assert_eq!(r.reported_tcb(generation), want_tcb);
        assert_eq!(r.generation_hint(), Some(generation));
        // ... and an independent one (the sev crate) agree on every field we set.
        let s = sev::firmware::guest::AttestationReport::from_bytes(&ev.report).unwrap();
        assert_eq!(s.version, version);
        assert_eq!(s.guest_svn, 5);
        assert_eq!(s.vmpl, 2);
        assert_eq!(s.sig_algo, 1);
        assert_eq!(s.family_id, [1; 16]);
        assert_eq!(s.image_id, [2; 16]);
        assert_eq!(s.measurement, r.measurement);
        assert_eq!(s.host_data, r.host_data);
        assert_eq!(s.report_data, r.report_data);
        assert_eq!(s.chip_id, r.chip_id);
        assert_eq!(s.reported_tcb.bootloader, 9);
        assert_eq!(s.reported_tcb.tee, 1);
        assert_eq!(s.reported_tcb.snp, 30);
        assert_eq!(s.reported_tcb.microcode, 200);
        assert_eq!(s.reported_tcb.fmc, want_tcb.fmc);
    }
}

#[test]
fn root_is_deterministic_and_persists() {
    let a = platform(Generation::Milan, 3);
    let b = platform(Generation::Milan, 3);
    assert_eq!(a.root_fingerprint(), b.root_fingerprint());
    assert!(a.root_fingerprint().starts_with("sha256:"));
    let c = SimSnpPlatform::generate(SimSnpConfig::default()).unwrap();
    assert_ne!(a.root_fingerprint(), c.root_fingerprint());

    let pem = c.to_pem();
    assert!(pem.starts_with("-----BEGIN CVM SIM SNP PLATFORM-----"));
    let restored = SimSnpPlatform::from_pem(&pem).unwrap();
    assert_eq!(restored.root_fingerprint(), c.root_fingerprint());
    assert_eq!(restored.ark_der(), c.ark_der());
    assert!(
        SimSnpPlatform::from_pem(&a.ark_pem()).is_err(),
        "an ARK PEM is not platform state"
    );
    assert!(SimSnpPlatform::from_pem("garbage").is_err());

    // Evidence from the restored platform verifies under a policy listing the root,
    // written as YAML the way a cluster's AttestationPolicy would.
    let yaml = format!("trustedRoots: [amd, \"{}\"]\n", c.root_fingerprint());
    let policy = SnpPolicy::from_yaml(&yaml).unwrap();
    let ev = restored.issue_report(&request()).unwrap();
    assert!(verify_with(policy, &ev.report, &ev.cert_chain, &[]).is_affirmed());
}

#[test]
fn persisted_root_certificate_can_be_loaded_as_an_anchor() {
    let sim = platform(Generation::Genoa, 3);
    let ark = parse_certs(sim.ark_pem().as_bytes()).unwrap().remove(0);
    assert_eq!(ark.der(), sim.ark_der());
    let mut anchors = TrustAnchors::default();
    anchors.add_root(ark);
    let v = SnpVerifier::with_anchors(SnpPolicy::default(), anchors);
    let ev = sim.issue_report(&request()).unwrap();
    // Only VCEK and ASK travel with the report; the root comes from the anchors.
    let certs = &ev.cert_chain[..2];
    let a = v.verify(
        &SnpEvidence {
            report: &ev.report,
            certs,
            crls: &[],
        },
        &SnpContext::default(),
        now(),
    );
    assert!(a.is_affirmed(), "{:#?}", a.findings());
}

#[test]
fn policy_violations_are_named() {
    let sim = platform(Generation::Milan, 3);
    let req = ReportRequest {
        policy: GuestPolicy::RESERVED_ONE
            | GuestPolicy::SMT
            | GuestPolicy::DEBUG
            | GuestPolicy::MIGRATE_MA,
        vmpl: 1,
        tcb: Some(TcbVersion {
            bootloader: 1,
            tee: 0,
            snp: 5,
            microcode: 100,
            fmc: None,
        }),
        ..request()
    };
    let ev = sim.issue_report(&req).unwrap();
    let mut policy = sim.policy();
    policy.allow_smt = false;
    policy.max_vmpl = Some(0);
    policy.measurements = vec![Hex([0x11; 48])];
    policy.host_data = Some(Hex([0x22; 32]));
    policy.minimum_tcb = Some(MinimumTcb {
        bootloader: 2,
        tee: 0,
        snp: 5,
        microcode: 101,
        fmc: None,
    });
    let v = SnpVerifier::new(policy).unwrap();
    let a = v.verify(
        &SnpEvidence {
            report: &ev.report,
            certs: &ev.cert_chain,
            crls: &[],
        },
        &SnpContext {
            nonce: Some(b"stale".to_vec()),
        },
        now(),
    );
    assert!(a.signature_verified, "genuine (simulated) signature");
    assert!(!a.is_affirmed());
    assert_eq!(
        checks(&a),
        [
            "debug-enabled",
            "migration-agent-allowed",
            "smt-allowed",
            "vmpl-not-allowed",
            "measurement-mismatch",
            "report-data-mismatch",
            "host-data-mismatch",
            "tcb-bootloader-below-minimum",
            "tcb-microcode-below-minimum",
        ]
    );
}

#[test]
fn vcek_must_belong_to_the_chip_and_tcb() {
    let sim = platform(Generation::Milan, 3);
    let ev = sim.issue_report(&request()).unwrap();
    // A VCEK of another chip from the same (trusted) ASK.
    let other = sim.vcek_der(&[0xEE; 64], sim.config().tcb()).unwrap();
    let mut certs = ev.cert_chain.clone();
    certs[0] = other;
    let a = verify_with(sim.policy(), &ev.report, &certs, &[]);
    let c = checks(&a);
    assert!(c.contains(&"vek-chip-id-mismatch"), "{c:?}");
    assert!(c.contains(&"report-signature-invalid"), "{c:?}");
    // A VCEK of this chip at another TCB.
    let tcb = TcbVersion {
        snp: 99,
        ..sim.config().tcb()
    };
    certs[0] = sim.vcek_der(&sim.chip_id(), tcb).unwrap();
    let c = checks(&verify_with(sim.policy(), &ev.report, &certs, &[])).join(",");
    assert!(c.contains("vek-tcb-snp-mismatch"), "{c}");
}

#[test]
fn crl_revocation_is_enforced() {
    let sim = platform(Generation::Milan, 3);
    let ev = sim.issue_report(&request()).unwrap();
    let t = now();
    let clean = sim.issue_crl(&[], t - 86_400, t + 86_400).unwrap();
    let a = verify_with(sim.policy(), &ev.report, &ev.cert_chain, &[clean]);
    assert!(a.is_affirmed(), "{:#?}", a.findings());

    let revoking = sim.issue_crl(&[2], t - 86_400, t + 86_400).unwrap();
    let a = verify_with(sim.policy(), &ev.report, &ev.cert_chain, &[revoking]);
    assert!(!a.is_affirmed());
    let f = a
        .findings()
        .iter()
        .find(|f| f.check == "cert-revoked")
        .expect("revoked");
    assert!(f.message.contains("SEV-Milan"), "{}", f.message);

    let stale = sim.issue_crl(&[], t - 2 * 86_400, t - 86_400).unwrap();
    let a = verify_with(sim.policy(), &ev.report, &ev.cert_chain, &[stale]);
    assert_eq!(checks(&a), ["crl-stale"]);
    assert!(a.is_affirmed(), "a stale CRL is a warning");

    // A CRL from another root (another simulator) does not apply and cannot revoke.
    let other = SimSnpPlatform::from_seed([9; 32], SimSnpConfig::default()).unwrap();
    let foreign = other.issue_crl(&[2, 3], t - 86_400, t + 86_400).unwrap();
    let a = verify_with(sim.policy(), &ev.report, &ev.cert_chain, &[foreign]);
    assert!(a.is_affirmed());
    assert!(a.findings().iter().any(|f| f.check == "crl-not-applicable"));

    let a = verify_with(
        sim.policy(),
        &ev.report,
        &ev.cert_chain,
        &[b"junk".to_vec()],
    );
    assert!(checks(&a).contains(&"crl-malformed"));
}

#[test]
fn tampering_with_simulated_reports_is_caught() {
    let sim = platform(Generation::Turin, 5);
    let ev = sim.issue_report(&request()).unwrap();
    let v = SnpVerifier::new(sim.policy()).unwrap();
    let chain = v.chain(&ev.cert_chain).unwrap();
    let ctx = SnpContext::default();
    assert!(v
        .verify_with_chain(&ev.report, &chain, &[], &ctx, now())
        .is_affirmed());
    for pos in (0..0x2A0).step_by(7) {
        let mut t = ev.report.clone();
        t[pos] ^= 0x80;
        assert!(
            !v.verify_with_chain(&t, &chain, &[], &ctx, now())
                .is_affirmed(),
            "{pos:#x}"
        );
    }
}
