//! SEV-SNP side of the simulator: the shared ARK/ASK and this node's VCEK, and reports in
//! AMD's layout (issued by the attestation library's SNP simulator).

use std::path::Path;

use super::roots::RootsError;
use crate::platform::PlatformError;

/// What one SNP report needs from the guest and the host.
#[derive(Debug, Clone)]
pub struct SnpReportInput {
    pub measurement: [u8; 48],
    pub policy: u64,
    pub host_data: [u8; 32],
    pub report_data: [u8; 64],
    pub tcb: cvm_crds::SnpTcbVersion,
}

/// The SNP signing material of one simulated host.
#[derive(Clone)]
pub struct SnpSimHost {
    _private: (),
}

impl SnpSimHost {
    pub fn load_or_create(_dir: &Path, _node: &str) -> Result<Self, RootsError> {
        Err(RootsError::Generate {
            what: "SEV-SNP",
            message: "the SNP simulator of the attestation library is not available yet".into(),
        })
    }

    pub fn root_fingerprint(&self) -> String {
        String::new()
    }

    /// A signed report and the PEM chain (VCEK, ASK, ARK).
    pub fn issue(&self, _input: &SnpReportInput) -> Result<(Vec<u8>, String), PlatformError> {
        Err(PlatformError::Evidence(
            "the SNP simulator is not available yet".into(),
        ))
    }
}

pub fn root_fingerprint(dir: &Path) -> Result<String, RootsError> {
    SnpSimHost::load_or_create(dir, "").map(|h| h.root_fingerprint())
}
