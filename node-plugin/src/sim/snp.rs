//! SEV-SNP side of the simulator: the cluster's shared simulated AMD root (ARK/ASK, from
//! the attestation library's SNP simulator) and this node's chip, whose chip ID is derived
//! from the node name, so each node has its own VCEK (AMD derives one per chip and TCB).

use std::path::Path;

use base64::Engine as _;
use cvm_attest::sim::{ReportRequest, SimSnpConfig, SimSnpPlatform};
use cvm_attest::snp::TcbVersion;
use sha2::{Digest, Sha512};

use super::roots::RootsError;
use crate::platform::PlatformError;

/// File holding the SNP simulator's persisted root (seed and config).
pub const SNP_FILE: &str = "snp-sim-platform.pem";

/// What one SNP report needs from the guest and the host.
#[derive(Debug, Clone)]
pub struct SnpReportInput {
    pub measurement: [u8; 48],
    pub policy: u64,
    pub host_data: [u8; 32],
    pub report_data: [u8; 64],
    pub tcb: cvm_crds::SnpTcbVersion,
    /// REPORT_ID chosen at launch (`None`: the simulator's per-image default).
    pub report_id: Option<[u8; 32]>,
}

/// The SNP signing material of one simulated host.
#[derive(Clone)]
pub struct SnpSimHost {
    platform: SimSnpPlatform,
    chip_id: [u8; 64],
}

/// The chip ID of a simulated node: stable per node name, distinct between nodes.
pub fn chip_id_for(node: &str) -> [u8; 64] {
    Sha512::new()
        .chain_update(b"cvm-node-plugin simulated chip\0")
        .chain_update(node.as_bytes())
        .finalize()
        .into()
}

fn load_or_create_platform(dir: &Path) -> Result<SimSnpPlatform, RootsError> {
    super::roots::load_or_create(
        &dir.join(SNP_FILE),
        || {
            SimSnpPlatform::generate(SimSnpConfig::default())
                .map(|p| p.to_pem())
                .map_err(|e| RootsError::Generate {
                    what: "SEV-SNP",
                    message: e.to_string(),
                })
        },
        SimSnpPlatform::from_pem,
    )
}

fn pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

impl SnpSimHost {
    /// The shared root from `dir` (created on first use) and the chip of `node`.
    pub fn load_or_create(dir: &Path, node: &str) -> Result<Self, RootsError> {
        Ok(SnpSimHost {
            platform: load_or_create_platform(dir)?,
            chip_id: chip_id_for(node),
        })
    }

    /// `sha256:<hex>` of the simulated ARK.
    pub fn root_fingerprint(&self) -> String {
        self.platform.root_fingerprint()
    }

    /// The chip ID this node's reports carry.
    pub fn chip_id(&self) -> [u8; 64] {
        self.chip_id
    }

    /// A signed report and its PEM chain (VCEK, ASK, ARK), as a host's extended report
    /// hands them out.
    pub fn issue(&self, input: &SnpReportInput) -> Result<(Vec<u8>, String), PlatformError> {
        let t = input.tcb;
        let req = ReportRequest {
            report_data: input.report_data,
            measurement: input.measurement,
            policy: input.policy,
            host_data: input.host_data,
            chip_id: Some(self.chip_id),
            report_id: input.report_id,
            tcb: Some(TcbVersion {
                bootloader: t.bootloader.unwrap_or(0),
                tee: t.tee.unwrap_or(0),
                snp: t.snp.unwrap_or(0),
                microcode: t.microcode.unwrap_or(0),
                fmc: t.fmc,
            }),
            ..ReportRequest::default()
        };
        let ev = self
            .platform
            .issue_report(&req)
            .map_err(|e| PlatformError::Evidence(format!("simulated SNP report: {e}")))?;
        let chain: String = ev.cert_chain.iter().map(|d| pem(d)).collect();
        Ok((ev.report, chain))
    }
}

/// Fingerprint of the cluster's simulated SNP root in `dir` (created on first use).
pub fn root_fingerprint(dir: &Path) -> Result<String, RootsError> {
    Ok(load_or_create_platform(dir)?.root_fingerprint())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cvm_attest::snp::{SnpContext, SnpEvidence, SnpVerifier};

    #[test]
    fn nodes_share_the_root_but_not_the_chip() {
        let d = tempfile::tempdir().unwrap();
        let a = SnpSimHost::load_or_create(d.path(), "node-a").unwrap();
        let b = SnpSimHost::load_or_create(d.path(), "node-b").unwrap();
        assert_eq!(a.root_fingerprint(), b.root_fingerprint());
        assert_ne!(a.chip_id(), b.chip_id());
        assert_eq!(root_fingerprint(d.path()).unwrap(), a.root_fingerprint());
        // Another directory is another vendor.
        let other = tempfile::tempdir().unwrap();
        assert_ne!(
            root_fingerprint(other.path()).unwrap(),
            a.root_fingerprint()
        );
    }

    #[test]
    fn reports_verify_under_a_policy_trusting_the_root_only() {
        let d = tempfile::tempdir().unwrap();
        let h = SnpSimHost::load_or_create(d.path(), "node-a").unwrap();
        let input = SnpReportInput {
            measurement: [7; 48],
            policy: 0x30000,
            host_data: [9; 32],
            report_data: cvm_attest::snp::report_data_for_nonce(b"n"),
            tcb: crate::config::default_snp_tcb(),
            report_id: None,
        };
        let (report, chain) = h.issue(&input).unwrap();
        let certs: Vec<Vec<u8>> = cvm_attest::snp::parse_certs(chain.as_bytes())
            .unwrap()
            .iter()
            .map(|c| c.der().to_vec())
            .collect();
        assert_eq!(certs.len(), 3);
        let ev = SnpEvidence {
            report: &report,
            certs: &certs,
            crls: &[],
        };
        let ctx = SnpContext {
            nonce: Some(b"n".to_vec()),
        };
        let policy = h.platform.policy();
        let ok = SnpVerifier::new(policy).unwrap().verify(&ev, &ctx, now());
        assert!(ok.is_affirmed(), "{:#?}", ok.findings());
        let refused = SnpVerifier::new(Default::default())
            .unwrap()
            .verify(&ev, &ctx, now());
        assert!(!refused.is_affirmed());
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }
}
