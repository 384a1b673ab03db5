//! The simulated platform: configured capabilities, guests kept in the plugin with their
//! state persisted in `<state-dir>/guests.json` (so a restarted plugin finds them), and
//! evidence in the vendors' exact formats signed by the simulated roots ([`roots`]).
//!
//! Live migration is simulated step by step: a receiving guest is an ordinary simulated
//! guest launched from the CVM's launch inputs (marked `incoming` in the state file), and a
//! transfer moves no memory: it records which node the guest was sent to (`sentTo`), or
//! fails when the config says `failSends`.

pub mod guest;
pub mod roots;
pub mod snp;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use cvm_attest::tdx::quote::td_attr;
use cvm_attest::tdx::TdQuoteRequest;
use cvm_crds::cvm::GuestState;
use cvm_crds::{EvidenceFormat, TeeType};
use serde::{Deserialize, Serialize};

use crate::config::SimConfig;
use crate::platform::{
    Challenge, GuestInfo, GuestRequest, HostCapabilities, Platform, PlatformError, RawEvidence,
};
use crate::store;
use cvm_crds::wire::COLLATERAL_TDX_QUOTE_V3;
pub use guest::{QemuGuests, SimGuests};
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
    /// Launched to receive a live migration ([`Platform::prepare_incoming`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    incoming: bool,
    /// The node this guest's state was sent to ([`Platform::send`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sent_to: Option<String>,
    /// The instance key this guest's "agent" made at launch (PKCS#8, hex): a relaunch
    /// makes a new one, as a real guest's boot does.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    instance_key: String,
    /// The SEV-SNP REPORT_ID the "firmware" chose at launch (hex).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    report_id: String,
    /// The launcher pod running the stand-in guest process (its socket dir on the host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    launcher: Option<PathBuf>,
}

impl SimGuest {
    fn instance_key(&self) -> Result<cvm_attest::binding::InstanceKey, PlatformError> {
        let der = hex::decode(&self.instance_key).map_err(|e| {
            PlatformError::Evidence(format!(
                "guest {} has no usable instance key in the state file ({e}); stop and relaunch it",
                self.info.uid
            ))
        })?;
        cvm_attest::binding::InstanceKey::from_pkcs8(&der)
            .map_err(|e| PlatformError::Evidence(format!("guest {}: {e}", self.info.uid)))
    }
}

/// A simulated TEE host.
pub struct SimPlatform {
    config: SimConfig,
    caps: HostCapabilities,
    roots: SimRoots,
    path: PathBuf,
    guests: Mutex<GuestsFile>,
    /// Where a send leaves the guest's transferred state for the target (the simulated
    /// wire; `None`: sends move nothing).
    transfers: Option<PathBuf>,
    /// What runs in the launcher pods.
    guest_mode: SimGuests,
}

/// What a simulated send moves: in a real migration the guest's memory, and with it the
/// agent's instance key. The receiving guest takes it over once it answers for the CVM.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Transfer {
    instance_key: String,
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
            transfers: None,
            guest_mode: SimGuests::StandIn,
        })
    }

    /// Runs these guests in the launcher pods (the stand-in process by default).
    pub fn with_guests(mut self, mode: SimGuests) -> Self {
        self.guest_mode = mode;
        self
    }

    fn qemu_guests(&self) -> Option<&QemuGuests> {
        match &self.guest_mode {
            SimGuests::Qemu(q) => Some(q),
            SimGuests::StandIn => None,
        }
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
        let mut p = Self::open(config, state_dir, roots)?;
        p.transfers = Some(root_dir.join("transfers"));
        Ok(p)
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

    /// The node the guest `uid` was sent to by a live migration, if any.
    pub fn sent_to(&self, uid: &str) -> Option<String> {
        self.lock().guests.get(uid).and_then(|g| g.sent_to.clone())
    }

    /// After the switch, the receiving guest `uid` takes over the state its source sent
    /// (the instance key): from now on it is the migrated guest, not a new instance.
    fn adopt_transfer(&self, uid: &str) -> Result<(), PlatformError> {
        let Some(dir) = &self.transfers else {
            return Ok(());
        };
        let path = dir.join(format!("{uid}.json"));
        let mut file = self.lock();
        let Some(g) = file.guests.get(uid).filter(|g| g.incoming) else {
            return Ok(());
        };
        if !path.exists() {
            return Ok(());
        }
        let t: Transfer = store::read_json(&path).map_err(|e| PlatformError::State {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let before = g.clone();
        if let Some(held) = file.guests.get_mut(uid) {
            held.instance_key = t.instance_key;
            held.incoming = false;
        }
        if let Err(e) = self.persist(&file) {
            file.guests.insert(uid.to_string(), before);
            return Err(e);
        }
        // Consumed: a later migration brings its own.
        let _ = std::fs::remove_file(&path);
        Ok(())
    }

    /// Whether the guest `uid` was launched to receive a live migration.
    pub fn is_incoming(&self, uid: &str) -> bool {
        self.lock().guests.get(uid).is_some_and(|g| g.incoming)
    }

    /// Launches a guest (`incoming`: to receive a migration), waiting the configured
    /// launch time; a guest already held is returned as is.
    async fn start_guest(
        &self,
        req: &GuestRequest,
        incoming: bool,
    ) -> Result<GuestInfo, PlatformError> {
        if let Some(held) = self.begin_launch(req, incoming)? {
            return Ok(held);
        }
        let delay = self.config.launch_delay();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if let Some(dir) = &req.launcher {
            // The guest's process runs in its launcher pod: a stand-in, as there is no VM.
            let launch_id = self
                .lock()
                .guests
                .get(&req.uid)
                .map(|g| g.info.launch_id.clone())
                .unwrap_or_default();
            let program = match self.qemu_guests() {
                None => Ok(crate::launcher::Program::StandIn),
                Some(q) => q
                    .argv(req, dir)
                    .await
                    .map(|argv| crate::launcher::Program::Exec { argv }),
            };
            let started = match program {
                Ok(p) => crate::launcher::LauncherClient::new(dir)
                    .launch(&launch_id, p, None)
                    .await
                    .map_err(|e| {
                        PlatformError::Launch(format!(
                            "the launcher pod did not start the guest: {e}"
                        ))
                    }),
                Err(e) => Err(e),
            };
            if let Err(e) = started {
                let mut file = self.lock();
                file.guests.remove(&req.uid);
                let _ = self.persist(&file);
                return Err(e);
            }
        }
        self.finish_launch(&req.uid)
    }

    /// Marks Failed the running guests whose process in their launcher pod ended (or is
    /// not the one launched: the pod was replaced while nobody watched).
    async fn check_launchers(&self) -> Result<(), PlatformError> {
        let watched: Vec<(String, String, PathBuf)> = self
            .lock()
            .guests
            .values()
            .filter(|g| g.info.state == GuestState::Running)
            .filter_map(|g| {
                let dir = g.launcher.clone()?;
                Some((g.info.uid.clone(), g.info.launch_id.clone(), dir))
            })
            .collect();
        let mut ended = Vec::new();
        for (uid, launch_id, dir) in watched {
            // An unreachable launcher is the plugin loop's to judge (its pod's state).
            let client = crate::launcher::LauncherClient::new(&dir);
            let Ok(p) = client.status().await else {
                continue;
            };
            if p.state == crate::launcher::ProcState::None && self.qemu_guests().is_some() {
                // The launch request is not kept: the guest is launched again.
                ended.push((
                    uid,
                    "a plugin restart interrupted the launch before QEMU started".into(),
                ));
                continue;
            }
            if p.state == crate::launcher::ProcState::None {
                // A launch a plugin restart interrupted before the pod ran it: finish it.
                if let Err(e) = client
                    .launch(&launch_id, crate::launcher::Program::StandIn, None)
                    .await
                {
                    ended.push((uid, format!("finishing an interrupted launch: {e}")));
                }
                continue;
            }
            if let Some(why) = crate::launcher::ended(&p, &launch_id) {
                ended.push((uid, why));
            }
        }
        if ended.is_empty() {
            return Ok(());
        }
        let mut file = self.lock();
        for (uid, why) in ended {
            if let Some(g) = file.guests.get_mut(&uid) {
                g.info.state = GuestState::Failed;
                g.info.message = Some(why);
            }
        }
        self.persist(&file)
    }

    /// Why the agent of a QEMU guest did not answer: its QEMU ended (the guest is then
    /// Failed, with QEMU's and the console's last words), or it runs silently (with the
    /// console's last lines, which say why: a panic, a missing init).
    async fn agent_failure(&self, g: &SimGuest, dir: &Path, e: PlatformError) -> PlatformError {
        // A channel that broke is most often a QEMU that is exiting: give its launcher a
        // moment to see the exit.
        let client = crate::launcher::LauncherClient::new(dir);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let p = loop {
            let Ok(p) = client.status().await else {
                return e;
            };
            if crate::launcher::ended(&p, &g.info.launch_id).is_some()
                || std::time::Instant::now() >= deadline
            {
                break p;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        };
        if let Some(why) = crate::launcher::ended(&p, &g.info.launch_id) {
            let mut file = self.lock();
            if let Some(held) = file.guests.get_mut(&g.info.uid) {
                held.info.state = GuestState::Failed;
                held.info.message = Some(why.clone());
            }
            let _ = self.persist(&file);
            return PlatformError::Qemu {
                reason: "QemuExited",
                message: why,
            };
        }
        match e {
            PlatformError::AgentSilent(m) => PlatformError::AgentSilent(format!(
                "{m}{}",
                crate::launcher::console_suffix(&p.console_tail)
            )),
            other => other,
        }
    }

    fn begin_launch(
        &self,
        req: &GuestRequest,
        incoming: bool,
    ) -> Result<Option<GuestInfo>, PlatformError> {
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
            launch_id: crate::platform::new_launch_id()?,
            message: None,
        };
        let key = cvm_attest::binding::InstanceKey::generate()
            .map_err(|e| PlatformError::Launch(format!("making the guest's instance key: {e}")))?;
        let report_id = cvm_attest::binding::random_bytes::<32>()
            .map_err(|e| PlatformError::Launch(format!("choosing the REPORT_ID: {e}")))?;
        file.guests.insert(
            req.uid.clone(),
            SimGuest {
                info,
                host_data: req.host_data.clone(),
                incoming,
                sent_to: None,
                instance_key: hex::encode(key.pkcs8()),
                report_id: hex::encode(report_id),
                launcher: req.launcher.clone(),
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
        if matches!(info.tee, TeeType::Sev | TeeType::SevEs) {
            // No report data in an SEV launch measurement: nothing binds a challenge.
            return Ok(RawEvidence {
                format: EvidenceFormat::SevLaunchMeasure,
                report: info.measurement.clone(),
                cert_chain: None,
                collateral: Vec::new(),
                measurement: info.measurement.clone(),
                instance_key: None,
            });
        }
        // As the guest agent does: the guest adds its own key to the challenge.
        let key = g.instance_key()?;
        let report_data = challenge.binding.report_data(key.public());
        self.issue_for(g, report_data, key.public().to_vec())
    }

    /// SNP or TDX evidence whose report data is `report_data`, naming `instance_key`:
    /// what the simulated firmware signs for the guest's agent.
    fn issue_for(
        &self,
        g: &SimGuest,
        report_data: [u8; 64],
        instance_key: Vec<u8>,
    ) -> Result<RawEvidence, PlatformError> {
        let info = &g.info;
        let instance_key = Some(instance_key);
        match info.tee {
            TeeType::Sev | TeeType::SevEs => Err(PlatformError::Evidence(
                "unreachable: SEV evidence handled above".into(),
            )),
            TeeType::SevSnp => {
                let host = self.roots.snp.as_ref().ok_or_else(|| {
                    PlatformError::Evidence("no simulated SNP root loaded".into())
                })?;
                let input = snp::SnpReportInput {
                    measurement: fixed(Some(&info.measurement)),
                    policy: info.launch_policy,
                    host_data: fixed(g.host_data.as_deref()),
                    report_data,
                    tcb: self.config.snp_tcb,
                    report_id: hex::decode(&g.report_id)
                        .ok()
                        .and_then(|b| <[u8; 32]>::try_from(b).ok()),
                };
                let (report, chain) = host.issue(&input)?;
                Ok(RawEvidence {
                    format: EvidenceFormat::SevSnpReport,
                    report,
                    cert_chain: Some(chain),
                    collateral: Vec::new(),
                    measurement: info.measurement.clone(),
                    instance_key,
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
                    report_data,
                    tcb_status: self.config.tdx_tcb_status.into(),
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
                    instance_key,
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
        self.start_guest(req, false).await
    }

    async fn stop(&self, uid: &str) -> Result<Option<GuestInfo>, PlatformError> {
        let launcher = match self.lock().guests.get(uid) {
            None => return Ok(None),
            Some(g) => g.launcher.clone(),
        };
        if let Some(dir) = launcher {
            // A launcher that is gone took its guest process with it.
            if let Err(e) = crate::launcher::LauncherClient::new(&dir)
                .stop(std::time::Duration::from_secs(5))
                .await
            {
                tracing::debug!(uid, error = %e, "stopping the stand-in guest through its launcher");
            }
        }
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
        self.check_launchers().await?;
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
        if !challenge.binding.epoch.is_empty() {
            self.adopt_transfer(uid)?;
        }
        let found = self.lock().guests.get(uid).cloned();
        let g = crate::platform::running_guest(uid, found, |g| &g.info)?;
        // A sent guest runs on its target now (a real source VM is paused after the
        // migration): this host's copy answers for nothing.
        if let Some(target) = &g.sent_to {
            return Err(PlatformError::Transfer(format!(
                "guest {uid} was sent to node {target}: its evidence comes from there"
            )));
        }
        let agent = match (self.qemu_guests(), &g.launcher) {
            (Some(q), Some(dir)) if matches!(g.info.tee, TeeType::SevSnp | TeeType::Tdx) => {
                let who = format!("{}/{}", g.info.namespace, g.info.name);
                // The agent is waited for as long as its guest runs: a QEMU that exits
                // (a kernel that cannot boot, a port it cannot forward) ends the wait.
                let ended = async {
                    let client = crate::launcher::LauncherClient::new(dir);
                    loop {
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                        if let Ok(p) = client.status().await {
                            if crate::launcher::ended(&p, &g.info.launch_id).is_some() {
                                return;
                            }
                        }
                    }
                };
                let asked = tokio::select! {
                    r = guest::ask_agent(q, dir, &who, &challenge.binding) => r,
                    () = ended => Err(PlatformError::AgentSilent(format!(
                        "the guest of {who} ended before its agent answered"
                    ))),
                };
                match asked {
                    Ok(a) => Some(a),
                    Err(e) => return Err(self.agent_failure(&g, dir, e).await),
                }
            }
            _ => None,
        };
        match agent {
            Some(guest::AgentAnswer::NoTee(words)) => Ok(RawEvidence {
                format: EvidenceFormat::NoTee,
                report: words.into_bytes(),
                cert_chain: None,
                collateral: Vec::new(),
                measurement: Vec::new(),
                instance_key: None,
            }),
            Some(guest::AgentAnswer::ReportData {
                report_data,
                instance_key,
            }) => self.issue_for(&g, report_data, instance_key),
            // Signing is CPU work of a few milliseconds; not worth a blocking-pool hop.
            None => self.issue(&g, challenge),
        }
    }

    async fn prepare_incoming(&self, req: &GuestRequest) -> Result<GuestInfo, PlatformError> {
        // The same launch inputs give the same measurement: the receiving guest's evidence
        // is what the source's would be on this host.
        self.start_guest(req, true).await
    }

    async fn send(&self, uid: &str, target_node: &str) -> Result<(), PlatformError> {
        let mut file = self.lock();
        let found = file.guests.get(uid).cloned();
        let g = crate::platform::running_guest(uid, found, |g| &g.info)?;
        if g.sent_to.as_deref() == Some(target_node) {
            return Ok(());
        }
        if self.config.fail_sends {
            return Err(PlatformError::Transfer(format!(
                "simulated failure sending guest {uid} to node {target_node} (the simulator \
                 config sets failSends)"
            )));
        }
        if let Some(dir) = &self.transfers {
            let t = Transfer {
                instance_key: g.instance_key.clone(),
            };
            store::write_json(&dir.join(format!("{uid}.json")), &t).map_err(|e| {
                PlatformError::Transfer(format!("simulated send of guest {uid}: {e}"))
            })?;
        }
        let before = g.sent_to;
        if let Some(held) = file.guests.get_mut(uid) {
            held.sent_to = Some(target_node.to_string());
        }
        if let Err(e) = self.persist(&file) {
            if let Some(held) = file.guests.get_mut(uid) {
                held.sent_to = before;
            }
            return Err(e);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cvm_crds::wire::challenge_for;

    fn request(uid: &str, tee: TeeType) -> GuestRequest {
        let spec: cvm_crds::ConfidentialVMSpec = serde_yaml::from_str(&format!(
            "tee: {{type: {tee}}}\nresources: {{vcpus: 2, memoryMiB: 1024}}\nboot: {{firmware: {{name: fw}}}}\n"
        ))
        .unwrap();
        let mut cvm = cvm_crds::ConfidentialVM::new(uid, spec);
        cvm.metadata.uid = Some(uid.into());
        cvm.metadata.namespace = Some("ns".into());
        GuestRequest::from_cvm(&cvm).unwrap()
    }

    fn config(tee: TeeType, slots: u32) -> SimConfig {
        SimConfig {
            tees: vec![tee],
            slots,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn guests_survive_a_restart_and_launch_only_once() {
        let state = tempfile::tempdir().unwrap();
        let p = SimPlatform::open(config(TeeType::SevEs, 2), state.path(), SimRoots::default())
            .unwrap();
        let g = p.launch(&request("a", TeeType::SevEs)).await.unwrap();
        assert_eq!(g.state, GuestState::Running);
        let again = p.launch(&request("a", TeeType::SevEs)).await.unwrap();
        assert_eq!(again.launched_at, g.launched_at, "no second launch");
        drop(p);

        let p = SimPlatform::open(config(TeeType::SevEs, 2), state.path(), SimRoots::default())
            .unwrap();
        let held = p.list().await.unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].uid, "a");
        assert_eq!(held[0].measurement.len(), 32);
        let stopped = p.stop("a").await.unwrap().unwrap();
        assert_eq!(stopped.state, GuestState::Stopped);
        assert!(p.stop("a").await.unwrap().is_none());
        assert!(p.list().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn capacity_and_tee_support_are_enforced() {
        let state = tempfile::tempdir().unwrap();
        let p = SimPlatform::open(config(TeeType::SevEs, 1), state.path(), SimRoots::default())
            .unwrap();
        p.launch(&request("a", TeeType::SevEs)).await.unwrap();
        let full = p.launch(&request("b", TeeType::SevEs)).await.unwrap_err();
        assert!(
            full.to_string()
                .contains("no free ASID on this host: all 1 are in use"),
            "{full}"
        );
        // Legacy SEV has its own pool.
        p.launch(&request("c", TeeType::Sev)).await.unwrap();
        let tdx = p.launch(&request("d", TeeType::Tdx)).await.unwrap_err();
        assert_eq!(tdx.reason(), "TeeUnsupported");
        assert!(tdx.to_string().contains("offers SEV, SEV-ES"), "{tdx}");
    }

    #[tokio::test]
    async fn receiving_guest_matches_the_source_and_survives_a_restart() {
        let src_state = tempfile::tempdir().unwrap();
        let dst_state = tempfile::tempdir().unwrap();
        let roots = tempfile::tempdir().unwrap();
        let open = |dir: &Path, node: &str| {
            SimPlatform::open_with_roots(config(TeeType::SevSnp, 2), dir, roots.path(), node)
                .unwrap()
        };
        let src = open(src_state.path(), "src");
        let dst = open(dst_state.path(), "dst");
        let req = request("m", TeeType::SevSnp);
        let running = src.launch(&req).await.unwrap();
        let incoming = dst.prepare_incoming(&req).await.unwrap();
        assert_eq!(incoming.state, GuestState::Running);
        assert_eq!(incoming.measurement, running.measurement);
        assert!(dst.is_incoming("m") && !src.is_incoming("m"));
        // Idempotent: no second guest, and it answers a challenge like any guest.
        let again = dst.prepare_incoming(&req).await.unwrap();
        assert_eq!(again.launched_at, incoming.launched_at);
        let c = challenge_for(None, "migration-uid", None).unwrap();
        let ev = dst.evidence("m", &c).await.unwrap();
        assert_eq!(ev.measurement, running.measurement);
        drop(dst);
        let dst = open(dst_state.path(), "dst");
        let held = dst.list().await.unwrap();
        assert_eq!(
            held.len(),
            1,
            "the receiving guest is kept across a restart"
        );
        assert!(dst.is_incoming("m"));

        // The send moves the guest's state, and with it its instance key: once the target
        // answers for the CVM after the switch, it is the same instance, not a new one.
        let before = src
            .evidence("m", &challenge_for(None, "m", None).unwrap())
            .await
            .unwrap();
        let fresh_target = dst.evidence("m", &c).await.unwrap();
        assert_ne!(fresh_target.instance_key, before.instance_key);
        src.send("m", "dst").await.unwrap();
        let after_switch = challenge_for(None, "m", Some("mig-1")).unwrap();
        let moved = dst.evidence("m", &after_switch).await.unwrap();
        assert_eq!(moved.instance_key, before.instance_key);
        assert!(!dst.is_incoming("m"), "adopted");
        // Kept across a restart of the target's plugin.
        drop(dst);
        let dst = open(dst_state.path(), "dst");
        let again = dst.evidence("m", &after_switch).await.unwrap();
        assert_eq!(again.instance_key, before.instance_key);
    }

    #[tokio::test]
    async fn send_records_the_target_and_fails_on_request() {
        let state = tempfile::tempdir().unwrap();
        let p = SimPlatform::open(config(TeeType::SevEs, 2), state.path(), SimRoots::default())
            .unwrap();
        let missing = p.send("nope", "dst").await.unwrap_err();
        assert_eq!(missing.reason(), "NoSuchGuest");
        p.launch(&request("a", TeeType::SevEs)).await.unwrap();
        assert_eq!(p.sent_to("a"), None);
        p.send("a", "dst").await.unwrap();
        p.send("a", "dst").await.unwrap();
        assert_eq!(p.sent_to("a").as_deref(), Some("dst"));
        // The source copy stays held until the plugin stops it.
        assert_eq!(p.list().await.unwrap()[0].state, GuestState::Running);
        drop(p);
        let p = SimPlatform::open(config(TeeType::SevEs, 2), state.path(), SimRoots::default())
            .unwrap();
        assert_eq!(p.sent_to("a").as_deref(), Some("dst"), "recorded on disk");
        // The sent copy answers for nothing: the target's guest gives the evidence now.
        let c = challenge_for(None, "a", None).unwrap();
        let e = p.evidence("a", &c).await.unwrap_err();
        assert!(e.to_string().contains("sent to node dst"), "{e}");

        let failing = tempfile::tempdir().unwrap();
        let cfg = SimConfig {
            fail_sends: true,
            ..config(TeeType::SevEs, 2)
        };
        let f = SimPlatform::open(cfg, failing.path(), SimRoots::default()).unwrap();
        f.launch(&request("b", TeeType::SevEs)).await.unwrap();
        let e = f.send("b", "dst").await.unwrap_err();
        assert_eq!(e.reason(), "TransferFailed");
        assert!(e.to_string().contains("failSends"), "{e}");
        assert_eq!(f.sent_to("b"), None);
        assert_eq!(f.list().await.unwrap()[0].state, GuestState::Running);
    }

    #[tokio::test]
    async fn sev_evidence_is_the_launch_measurement() {
        let state = tempfile::tempdir().unwrap();
        let p =
            SimPlatform::open(config(TeeType::Sev, 1), state.path(), SimRoots::default()).unwrap();
        let req = request("a", TeeType::Sev);
        p.launch(&req).await.unwrap();
        let c = challenge_for(Some("aa"), "a", None).unwrap();
        let ev = p.evidence("a", &c).await.unwrap();
        assert_eq!(ev.format, EvidenceFormat::SevLaunchMeasure);
        assert_eq!(ev.report, req.expected_measurement);
        let missing = p.evidence("zz", &c).await.unwrap_err();
        assert_eq!(missing.reason(), "NoSuchGuest");
    }

    #[tokio::test]
    async fn tdx_quote_carries_measurement_and_challenge() {
        let state = tempfile::tempdir().unwrap();
        let roots = tempfile::tempdir().unwrap();
        let p =
            SimPlatform::open_with_roots(config(TeeType::Tdx, 1), state.path(), roots.path(), "n")
                .unwrap();
        let req = request("t", TeeType::Tdx);
        p.launch(&req).await.unwrap();
        let c = challenge_for(Some("abcd"), "t", None).unwrap();
        let ev = p.evidence("t", &c).await.unwrap();
        assert_eq!(ev.format, EvidenceFormat::TdxQuote);
        let fp = p.root_fingerprints().tdx.unwrap();
        let policy = cvm_attest::tdx::TdxPolicy::trusting(fp.clone().try_into().unwrap());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        // Bound to the CVM's UID, the nonce and the guest's own instance key.
        let key = ev.instance_key.clone().unwrap();
        let preimage = c.binding.preimage(&cvm_attest::binding::key_id(&key));
        let ctx = cvm_attest::tdx::AppraisalContext::at(now).with_nonce(&preimage);
        let collateral = &ev.collateral[0].1;
        let a = cvm_attest::tdx::verify_quote(&ev.report, collateral.as_bytes(), &policy, &ctx)
            .unwrap();
        assert!(a.is_affirmed(), "{:#?}", a.findings);
        assert_eq!(a.decoded.mr_td, req.expected_measurement);
        assert_eq!(a.root_fingerprint.as_deref(), Some(fp.as_str()));
        // This node's own platform identity, distinct from another node's.
        let other_roots = SimRoots::load_or_create(roots.path(), "m", false, true).unwrap();
        let mine = SimRoots::load_or_create(roots.path(), "n", false, true).unwrap();
        assert_ne!(
            other_roots.tdx.unwrap().ppid().unwrap(),
            mine.tdx.as_ref().unwrap().ppid().unwrap()
        );
        assert!(a.platform_id.is_some());
        // The same guest keeps its key; a relaunched guest gets a new one.
        let again = p.evidence("t", &c).await.unwrap();
        assert_eq!(again.instance_key, ev.instance_key);
        let first = p.list().await.unwrap()[0].launch_id.clone();
        p.stop("t").await.unwrap();
        let second = p.launch(&req).await.unwrap().launch_id;
        let relaunched = p.evidence("t", &c).await.unwrap();
        assert_ne!(relaunched.instance_key, ev.instance_key);
        // Within the same second, too, the relaunch shows as a new launch ID.
        assert_eq!(first.len(), 32);
        assert_ne!(second, first);
    }
}
