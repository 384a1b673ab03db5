//! Configuration of the simulated platform: a YAML/JSON file (`--sim-config`) or flags.
//!
//! ```yaml
//! tees: [SEV-SNP]          # SEV, SEV-ES, SEV-SNP or TDX; SNP implies SEV-ES and SEV
//! slots: 16                # SEV-ES/SNP ASIDs on AMD, TDX keys on Intel
//! sevAsids: 16             # legacy SEV ASIDs (AMD; default: slots)
//! firmwareVersion: 1.55.21 # default per vendor
//! snpTcb: {bootloader: 4, tee: 0, snp: 23, microcode: 213}
//! tdxTcbStatus: UpToDate
//! launchDelayMs: 0
//! failSends: false         # live migration: every transfer from this host fails (tests)
//! ```

use std::path::Path;
use std::time::Duration;

use cvm_crds::{SnpTcbVersion, TdxTcbStatus, TeeType};
use serde::{Deserialize, Serialize};

use crate::platform::HostCapabilities;

/// Default pool size (ASIDs or TDX keys).
pub const DEFAULT_SLOTS: u32 = 16;

/// The simulated host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SimConfig {
    /// TEEs the host offers; implied ones are added (SNP ⇒ SEV-ES ⇒ SEV).
    pub tees: Vec<TeeType>,
    /// SEV-ES/SNP ASIDs on an AMD host, TDX keys on an Intel host.
    #[serde(default = "default_slots")]
    pub slots: u32,
    /// Legacy SEV ASIDs (AMD only); defaults to `slots`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sev_asids: Option<u32>,
    /// SEV firmware or TDX module version; a vendor-typical default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware_version: Option<String>,
    /// The host's SEV-SNP TCB (reported in SNP evidence and platform facts).
    #[serde(default = "default_snp_tcb")]
    pub snp_tcb: SnpTcbVersion,
    /// The TCB status the simulated TDX collateral assigns to this host.
    #[serde(default = "default_tdx_tcb_status")]
    pub tdx_tcb_status: TdxTcbStatus,
    /// Time a launch takes, so that `Launching` is observable.
    #[serde(default)]
    pub launch_delay_ms: u64,
    /// Make every live-migration transfer from this host fail (`Transferred=False`), so
    /// that tests can watch a migration roll back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fail_sends: bool,
}

fn default_slots() -> u32 {
    DEFAULT_SLOTS
}

/// A Milan-like current TCB.
pub fn default_snp_tcb() -> SnpTcbVersion {
    SnpTcbVersion {
        bootloader: Some(4),
        tee: Some(0),
        snp: Some(23),
        microcode: Some(213),
        fmc: None,
    }
}

fn default_tdx_tcb_status() -> TdxTcbStatus {
    TdxTcbStatus::UpToDate
}

/// A configuration that cannot describe a host.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read simulator config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("simulator config {path} is not valid YAML/JSON for a SimConfig: {source}")]
    Parse {
        path: String,
        source: serde_yaml::Error,
    },
    #[error("unknown TEE {0:?}: use sev, sev-es, sev-snp or tdx")]
    UnknownTee(String),
    #[error("a host is AMD or Intel: {0} cannot be combined with TDX")]
    MixedVendors(TeeType),
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            tees: vec![TeeType::SevSnp],
            slots: DEFAULT_SLOTS,
            sev_asids: None,
            firmware_version: None,
            snp_tcb: default_snp_tcb(),
            tdx_tcb_status: TdxTcbStatus::UpToDate,
            launch_delay_ms: 0,
            fail_sends: false,
        }
    }
}

/// Parses a TEE as users type it on the command line (`sev-snp`, `snp`, `SEV-SNP`, …).
pub fn parse_tee(s: &str) -> Result<TeeType, ConfigError> {
    match s.trim().to_ascii_lowercase().as_str() {
        "sev" => Ok(TeeType::Sev),
        "sev-es" | "seves" => Ok(TeeType::SevEs),
        "sev-snp" | "snp" => Ok(TeeType::SevSnp),
        "tdx" => Ok(TeeType::Tdx),
        _ => Err(ConfigError::UnknownTee(s.to_string())),
    }
}

/// The TEEs a host with `tee` enabled can run.
pub fn implied(tee: TeeType) -> &'static [TeeType] {
    match tee {
        TeeType::Sev => &[TeeType::Sev],
        TeeType::SevEs => &[TeeType::Sev, TeeType::SevEs],
        TeeType::SevSnp => &[TeeType::Sev, TeeType::SevEs, TeeType::SevSnp],
        TeeType::Tdx => &[TeeType::Tdx],
    }
}

impl SimConfig {
    /// Reads a YAML or JSON file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let cfg: SimConfig = serde_yaml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let tdx = self.tees.contains(&TeeType::Tdx);
        if let Some(amd) = self.tees.iter().find(|t| t.is_amd()) {
            if tdx {
                return Err(ConfigError::MixedVendors(*amd));
            }
        }
        Ok(())
    }

    /// Enabled TEEs with the implied ones, in a stable order.
    pub fn all_tees(&self) -> Vec<TeeType> {
        let mut out: Vec<TeeType> = Vec::new();
        for t in &self.tees {
            for i in implied(*t) {
                if !out.contains(i) {
                    out.push(*i);
                }
            }
        }
        out.sort_by_key(|t| t.as_str());
        out
    }

    pub fn launch_delay(&self) -> Duration {
        Duration::from_millis(self.launch_delay_ms)
    }

    /// What the simulated host reports.
    pub fn capabilities(&self) -> HostCapabilities {
        let tees = self.all_tees();
        let amd = tees.iter().any(|t| t.is_amd());
        let snp = tees.contains(&TeeType::SevSnp);
        let es = tees.contains(&TeeType::SevEs);
        let tdx = tees.contains(&TeeType::Tdx);
        let default_fw = if tdx { "1.5.06.00" } else { "1.55.21" };
        HostCapabilities {
            sev_asids: if amd {
                self.sev_asids.unwrap_or(self.slots)
            } else {
                0
            },
            es_asids: if es { self.slots } else { 0 },
            tdx_keys: if tdx { self.slots } else { 0 },
            firmware_version: (amd || tdx).then(|| {
                self.firmware_version
                    .clone()
                    .unwrap_or_else(|| default_fw.to_string())
            }),
            snp_tcb: snp.then_some(self.snp_tcb),
            tdx_tcb_status: tdx.then_some(self.tdx_tcb_status),
            simulated: true,
            tees,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_with_defaults() {
        let c: SimConfig = serde_yaml::from_str("tees: [SEV-SNP]\nslots: 4\n").unwrap();
        c.validate().unwrap();
        let caps = c.capabilities();
        assert_eq!(
            caps.tees,
            vec![TeeType::Sev, TeeType::SevEs, TeeType::SevSnp]
        );
        assert_eq!((caps.sev_asids, caps.es_asids, caps.tdx_keys), (4, 4, 0));
        assert_eq!(caps.firmware_version.as_deref(), Some("1.55.21"));
        assert_eq!(caps.snp_tcb, Some(default_snp_tcb()));
        assert_eq!(caps.tdx_tcb_status, None);
        assert!(caps.simulated);
        assert!(!c.fail_sends, "transfers succeed unless asked otherwise");
        let failing: SimConfig = serde_yaml::from_str("tees: [TDX]\nfailSends: true\n").unwrap();
        assert!(failing.fail_sends);
    }

    #[test]
    fn tdx_host() {
        let c: SimConfig = serde_json::from_str(
            r#"{"tees":["TDX"],"slots":2,"tdxTcbStatus":"OutOfDate","firmwareVersion":"1.5.1"}"#,
        )
        .unwrap();
        let caps = c.capabilities();
        assert_eq!(caps.tees, vec![TeeType::Tdx]);
        assert_eq!((caps.sev_asids, caps.es_asids, caps.tdx_keys), (0, 0, 2));
        assert_eq!(caps.tdx_tcb_status, Some(TdxTcbStatus::OutOfDate));
        assert_eq!(caps.snp_tcb, None);
        assert_eq!(caps.firmware_version.as_deref(), Some("1.5.1"));
    }

    #[test]
    fn sev_only_host_has_no_es_pool() {
        let c = SimConfig {
            tees: vec![TeeType::Sev],
            sev_asids: Some(7),
            ..Default::default()
        };
        let caps = c.capabilities();
        assert_eq!(caps.tees, vec![TeeType::Sev]);
        assert_eq!((caps.sev_asids, caps.es_asids), (7, 0));
    }

    #[test]
    fn refusals_say_why() {
        let c = SimConfig {
            tees: vec![TeeType::SevSnp, TeeType::Tdx],
            ..Default::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("AMD or Intel"));
        assert!(serde_yaml::from_str::<SimConfig>("tees: [SEV]\nslotz: 3\n").is_err());
        assert!(parse_tee("sgx").unwrap_err().to_string().contains("sgx"));
        assert_eq!(parse_tee("SNP").unwrap(), TeeType::SevSnp);
        assert_eq!(parse_tee("SEV-ES").unwrap(), TeeType::SevEs);
    }
}
