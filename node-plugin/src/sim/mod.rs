//! The simulated platform: configured capabilities, guests kept in the plugin with their
//! state persisted in `<state-dir>/guests.json` (so a restarted plugin finds them), and
//! evidence in the vendors' exact formats signed by the simulated roots ([`roots`]).

pub mod roots;
pub mod snp;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use cvm_attest::tdx::quote::td_attr;
use cvm_attest::tdx::{TdQuoteRequest, TdxTcbStatus as AttestTcbStatus};
use cvm_crds::cvm::GuestState;
use cvm_crds::{EvidenceFormat, TdxTcbStatus, TeeType};
use serde::{Deserialize, Serialize};

use crate::config::SimConfig;
use crate::evidence::COLLATERAL_TDX_QUOTE_V3;
use crate::platform::{
    Challenge, GuestInfo, GuestRequest, HostCapabilities, Platform, PlatformError, RawEvidence,
};
use crate::store;
pub use roots::{RootFingerprints, SimRoots};

/// Name of the guest state file inside `--state-dir`.
pub const GUESTS_FILE: &str = "guests.json";

/// What the state file holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GuestsFile {
    guests: BTreeMap<String, SimGuest>,
}

/// One simulated guest: what it was launched with, for evidence later.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SimGuest {
    info: GuestInfo,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    host_data: Option<Vec<u8>>,
}

/// A simulated TEE host.
pub struct SimPlatform {
    config: SimConfig,
    caps: HostCapabilities,
    roots: SimRoots,
    path: PathBuf,
    guests: Mutex<GuestsFile>,
}

impl std::fmt::Debug for SimPlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimPlatform")
            .field("caps", &self.caps)
            .field("roots", &self.roots)
            .field("state", &self.path)
            .finish()
    }
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn tdx_status(s: TdxTcbStatus) -> AttestTcbStatus {
    match s {
        TdxTcbStatus::UpToDate => AttestTcbStatus::UpToDate,
        TdxTcbStatus::SWHardeningNeeded => AttestTcbStatus::SWHardeningNeeded,
        TdxTcbStatus::ConfigurationNeeded => AttestTcbStatus::ConfigurationNeeded,
        TdxTcbStatus::ConfigurationAndSWHardeningNeeded => {
            AttestTcbStatus::ConfigurationAndSWHardeningNeeded
        }
        TdxTcbStatus::OutOfDate => AttestTcbStatus::OutOfDate,
        TdxTcbStatus::OutOfDateConfigurationNeeded => AttestTcbStatus::OutOfDateConfigurationNeeded,
    }
}

/// Copies `src` into a zeroed array, left-aligned (host data shorter than the field).
fn fixed<const N: usize>(src: Option<&[u8]>) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(s) = src {
        let n = s.len().min(N);
        out[..n].copy_from_slice(&s[..n]);
    }
    out
}

impl SimPlatform {
    /// Opens the simulated host: loads its guests from `state_dir` and its roots.
    /// Guests that were mid-launch when the plugin stopped finish their launch now (a
    /// simulated launch has no outside effect that could have been lost).
    pub fn open(
        config: SimConfig,
        state_dir: &Path,
        roots: SimRoots,
    ) -> Result<Self, PlatformError> {
        let path = state_dir.join(GUESTS_FILE);
        let mut file: GuestsFile = store::read_json(&path).map_err(|e| PlatformError::State {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        for g in file.guests.values_mut() {
            if g.info.state == GuestState::Launching {
                g.info.state = GuestState::Running;
            }
        }
        let caps = config.capabilities();
        Ok(SimPlatform {
            config,
            caps,
            roots,
            path,
            guests: Mutex::new(file),
        })
    }

    /// Loads roots for `config` from `root_dir` (creating them on first use) and opens
    /// the host: the one call `main` and `cvm-dev` need.
    pub fn open_with_roots(
        config: SimConfig,
        state_dir: &Path,
        root_dir: &Path,
        node: &str,
    ) -> Result<Self, SimOpenError> {
        let caps = config.capabilities();
        let roots = SimRoots::load_or_create(
            root_dir,
            node,
            caps.supports(TeeType::SevSnp),
            caps.supports(TeeType::Tdx),
        )?;
        Ok(Self::open(config, state_dir, roots)?)
    }

    /// Fingerprints of the roots signing this host's evidence.
    pub fn root_fingerprints(&self) -> RootFingerprints {
        self.roots.fingerprints()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GuestsFile> {
        // A panic while holding the lock cannot leave the map half-updated (each update is
        // one insert or remove), so a poisoned lock is safe to keep using.
        self.guests.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist(&self, file: &GuestsFile) -> Result<(), PlatformError> {
        store::write_json(&self.path, file).map_err(|e| PlatformError::State {
            path: self.path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// Guests drawing from the same pool (ASIDs or TDX keys) as a guest of `tee`.
    fn in_use(file: &GuestsFile, tee: TeeType) -> u32 {
        let pool = cvm_crds::wellknown::tee_resource(tee);
        let n = file
            .guests
            .values()
            .filter(|g| cvm_crds::wellknown::tee_resource(g.info.tee) == pool)
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    fn begin_launch(&self, req: &GuestRequest) -> Result<Option<GuestInfo>, PlatformError> {
        let mut file = self.lock();
        if let Some(g) = file.guests.get(&req.uid) {
            return Ok(Some(g.info.clone()));
        }
        if !self.caps.supports(req.tee) {
            let offered: Vec<&str> = self.caps.tees.iter().map(|t| t.as_str()).collect();
            return Err(PlatformError::Unsupported(
                req.tee,
                if offered.is_empty() {
                    "no TEE".into()
                } else {
                    offered.join(", ")
                },
            ));
        }
        let total = self.caps.pool_size(req.tee);
        if Self::in_use(&file, req.tee) >= total {
            return Err(PlatformError::NoCapacity {
                what: cvm_crds::wellknown::slot_name(req.tee),
                total,
            });
        }
        let info = GuestInfo {
            uid: req.uid.clone(),
            namespace: req.namespace.clone(),
            name: req.name.clone(),
            tee: req.tee,
            state: GuestState::Launching,
            measurement: req.expected_measurement.clone(),
            launch_policy: req.launch_policy,
            launched_at: now_unix(),
            message: None,
        };
        file.guests.insert(
            req.uid.clone(),
            SimGuest {
                info,
                host_data: req.host_data.clone(),
            },
        );
        if let Err(e) = self.persist(&file) {
            file.guests.remove(&req.uid);
            return Err(e);
        }
        Ok(None)
    }

    fn finish_launch(&self, uid: &str) -> Result<GuestInfo, PlatformError> {
        let mut file = self.lock();
        let info = {
            let g = file.guests.get_mut(uid).ok_or_else(|| {
                PlatformError::Launch(format!("guest {uid} was stopped while launching"))
            })?;
            g.info.state = GuestState::Running;
            g.info.launched_at = now_unix();
            g.info.clone()
        };
        self.persist(&file)?;
        Ok(info)
    }

    fn issue(&self, g: &SimGuest, challenge: &Challenge) -> Result<RawEvidence, PlatformError> {
        let info = &g.info;
        match info.tee {
            TeeType::Sev | TeeType::SevEs => Ok(RawEvidence {
                format: EvidenceFormat::SevLaunchMeasure,
                report: info.measurement.clone(),
                cert_chain: None,
                collateral: Vec::new(),
                measurement: info.measurement.clone(),
            }),
            TeeType::SevSnp => {
                let host = self.roots.snp.as_ref().ok_or_else(|| {
                    PlatformError::Evidence("no simulated SNP root loaded".into())
                })?;
                let input = snp::SnpReportInput {
                    measurement: fixed(Some(&info.measurement)),
                    policy: info.launch_policy,
                    host_data: fixed(g.host_data.as_deref()),
                    report_data: challenge.report_data,
                    tcb: self.config.snp_tcb,
                };
                let (report, chain) = host.issue(&input)?;
                Ok(RawEvidence {
                    format: EvidenceFormat::SevSnpReport,
                    report,
                    cert_chain: Some(chain),
                    collateral: Vec::new(),
                    measurement: info.measurement.clone(),
                })
            }
            TeeType::Tdx => {
                let p = self.roots.tdx.as_ref().ok_or_else(|| {
                    PlatformError::Evidence("no simulated TDX root loaded".into())
                })?;
                let req = TdQuoteRequest {
                    mr_td: fixed(Some(&info.measurement)),
                    td_attributes: td_attr::SEPT_VE_DISABLE | info.launch_policy,
                    mr_config_id: fixed(g.host_data.as_deref()),
                    report_data: challenge.report_data,
                    tcb_status: tdx_status(self.config.tdx_tcb_status),
                    ..TdQuoteRequest::default()
                };
                let ev = p
                    .issue_quote(&req)
                    .map_err(|e| PlatformError::Evidence(e.to_string()))?;
                let collateral = String::from_utf8(ev.collateral_json).map_err(|e| {
                    PlatformError::Evidence(format!("collateral is not UTF-8: {e}"))
                })?;
                Ok(RawEvidence {
                    format: EvidenceFormat::TdxQuote,
                    report: ev.quote,
                    cert_chain: Some(p.pck_chain_pem()),
                    collateral: vec![(COLLATERAL_TDX_QUOTE_V3.to_string(), collateral)],
                    measurement: info.measurement.clone(),
                })
            }
        }
    }
}

/// Errors opening a simulated host.
#[derive(Debug, thiserror::Error)]
pub enum SimOpenError {
    #[error(transparent)]
    Roots(#[from] roots::RootsError),
    #[error(transparent)]
    Platform(#[from] PlatformError),
}

impl Platform for SimPlatform {
    fn capabilities(&self) -> HostCapabilities {
        self.caps.clone()
    }

    async fn launch(&self, req: &GuestRequest) -> Result<GuestInfo, PlatformError> {
        if let Some(held) = self.begin_launch(req)? {
            return Ok(held);
        }
        let delay = self.config.launch_delay();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        self.finish_launch(&req.uid)
    }

    async fn stop(&self, uid: &str) -> Result<Option<GuestInfo>, PlatformError> {
        let mut file = self.lock();
        let Some(mut g) = file.guests.remove(uid) else {
            return Ok(None);
        };
        if let Err(e) = self.persist(&file) {
            file.guests.insert(uid.to_string(), g);
            return Err(e);
        }
        g.info.state = GuestState::Stopped;
        Ok(Some(g.info))
    }

    async fn list(&self) -> Result<Vec<GuestInfo>, PlatformError> {
        Ok(self
            .lock()
            .guests
            .values()
            .map(|g| g.info.clone())
            .collect())
    }

    async fn evidence(
        &self,
        uid: &str,
        challenge: &Challenge,
    ) -> Result<RawEvidence, PlatformError> {
        let g = self
            .lock()
            .guests
            .get(uid)
            .cloned()
            .ok_or_else(|| PlatformError::NoSuchGuest(uid.to_string()))?;
        if g.info.state != GuestState::Running {
            return Err(PlatformError::NotRunning {
                uid: uid.to_string(),
                state: g.info.state,
            });
        }
        // Signing is CPU work of a few milliseconds; not worth a blocking-pool hop.
        self.issue(&g, challenge)
    }
}
