//! The narrow interface between the node plugin and a host's TEE: what the host offers,
//! launching and stopping guests, listing them, and producing evidence for a challenge.
//!
//! It holds no Kubernetes types: a [`GuestRequest`] is built from the CVM spec once, at the
//! edge ([`GuestRequest::from_cvm`]), so a QEMU backend and the simulator see the same plain
//! data. Implementations keep their own record of guests, so that a restarted plugin finds
//! the guests it launched ([`Platform::list`]): the simulator in a state file, a QEMU backend
//! in its pid files and QMP sockets.
//!
//! Live migration (docs/migration.md) needs two more steps of a backend:
//! [`Platform::prepare_incoming`] on the target (a receiving guest launched from the same
//! launch inputs, so that its measurement equals the source's and its evidence can be
//! appraised before any state moves) and [`Platform::send`] on the source.

use std::future::Future;

use cvm_crds::cvm::{ArtifactRef, ConfidentialVM, CpuModel, Disk, GuestState};
use cvm_crds::{SnpTcbVersion, TdxTcbStatus, TeeType};
use serde::{Deserialize, Serialize};

use crate::measure;

/// What a host offers. `slots` count guests that can still be started per resource pool
/// at full capacity (one ASID or TDX key per guest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostCapabilities {
    /// TEEs the host can launch, implied ones included (an SNP host runs SEV and SEV-ES).
    pub tees: Vec<TeeType>,
    /// Legacy SEV ASIDs.
    pub sev_asids: u32,
    /// SEV-ES / SEV-SNP ASIDs (one pool).
    pub es_asids: u32,
    /// TDX private keys (HKIDs).
    pub tdx_keys: u32,
    /// AMD SEV firmware or Intel TDX module version.
    pub firmware_version: Option<String>,
    /// Current SEV-SNP TCB (SNP hosts only).
    pub snp_tcb: Option<SnpTcbVersion>,
    /// TDX TCB status as the host sees it (TDX hosts only).
    pub tdx_tcb_status: Option<TdxTcbStatus>,
    /// Evidence is signed by a simulator root, not by hardware.
    pub simulated: bool,
}

impl HostCapabilities {
    /// Whether the host can launch guests of `tee`.
    pub fn supports(&self, tee: TeeType) -> bool {
        self.tees.contains(&tee)
    }

    /// Size of the pool a guest of `tee` draws from.
    pub fn pool_size(&self, tee: TeeType) -> u32 {
        match tee {
            TeeType::Sev => self.sev_asids,
            TeeType::SevEs | TeeType::SevSnp => self.es_asids,
            TeeType::Tdx => self.tdx_keys,
        }
    }
}

/// Everything a backend needs to start one guest, taken from the CVM at the edge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GuestRequest {
    /// The CVM's UID: the guest's identity across restarts and renames.
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub tee: TeeType,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Effective CPU model (`None` on TDX).
    pub cpu_model: Option<CpuModel>,
    pub firmware: ArtifactRef,
    pub kernel: Option<ArtifactRef>,
    pub initrd: Option<ArtifactRef>,
    pub cmdline: Option<String>,
    pub disks: Vec<Disk>,
    /// Guest ports forwarded from the launcher pod's address (spec.network.ports).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<(cvm_crds::cvm::PortProtocol, u16)>,
    /// SNP guest policy, SEV policy or TDX attributes (see [`measure::launch_policy`]).
    pub launch_policy: u64,
    /// SNP HOST_DATA (32 bytes) or TDX MRCONFIGID (48 bytes), decoded.
    pub host_data: Option<Vec<u8>>,
    /// The launch measurement the boot inputs give (simulated function; a real backend
    /// compares it with what the firmware reports).
    pub expected_measurement: Vec<u8>,
    /// The socket directory (on the host) of the CVM's launcher pod, which runs the
    /// guest's process; `None`: the backend runs it itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launcher: Option<std::path::PathBuf>,
}

/// A CVM that cannot become a [`GuestRequest`]: nothing a launch could fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("the ConfidentialVM has no metadata.uid (was it read from the API server?)")]
    MissingUid,
    #[error("spec.tee.hostData is not hex: {0}")]
    HostData(String),
}

impl GuestRequest {
    /// Builds the request from a CVM as read from the API server.
    pub fn from_cvm(cvm: &ConfidentialVM) -> Result<Self, RequestError> {
        let spec = &cvm.spec;
        let uid = cvm.metadata.uid.clone().ok_or(RequestError::MissingUid)?;
        let host_data = match &spec.tee.host_data {
            None => None,
            Some(h) => Some(hex::decode(h).map_err(|e| RequestError::HostData(e.to_string()))?),
        };
        Ok(GuestRequest {
            uid,
            namespace: cvm.metadata.namespace.clone().unwrap_or_default(),
            name: cvm.metadata.name.clone().unwrap_or_default(),
            tee: spec.tee.tee_type,
            vcpus: spec.resources.vcpus,
            memory_mib: spec.resources.memory_mib,
            cpu_model: measure::effective_cpu_model(spec),
            firmware: spec.boot.firmware.clone(),
            kernel: spec.boot.kernel.clone(),
            initrd: spec.boot.initrd.clone(),
            cmdline: spec.boot.cmdline.clone(),
            disks: spec.disks.clone(),
            // The CRD bounds ports to 1-65535; an object past those rules forwards nothing
            // it cannot name.
            ports: spec
                .network
                .iter()
                .flat_map(|n| &n.ports)
                .filter_map(|p| Some((p.protocol, u16::try_from(p.port).ok()?)))
                .collect(),
            launch_policy: measure::launch_policy(spec),
            host_data,
            expected_measurement: measure::simulated_measurement_bytes(spec),
            launcher: None,
        })
    }
}

/// A guest the backend holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GuestInfo {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub tee: TeeType,
    pub state: GuestState,
    /// Launch measurement as the platform reports it.
    pub measurement: Vec<u8>,
    pub launch_policy: u64,
    /// Unix seconds of the launch.
    pub launched_at: i64,
    /// Random per launch (hex), reported so the operator tells a relaunch from a swap.
    /// Empty in state files written before it existed.
    #[serde(default)]
    pub launch_id: String,
    /// Detail of a failure or a stop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A fresh launch ID (16 random bytes, hex).
pub fn new_launch_id() -> Result<String, PlatformError> {
    cvm_attest::binding::random_bytes::<16>()
        .map(hex::encode)
        .map_err(|e| PlatformError::Launch(format!("choosing the launch ID: {e}")))
}

/// A backend answers a [`Challenge`] with [`RawEvidence`]; both belong to the evidence wire
/// format (`cvm_crds::wire`), which encodes the one into `status.evidence` for the other.
pub use cvm_crds::wire::{Challenge, RawEvidence};

/// Errors a backend reports, phrased for the CVM's `Launched` condition.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error("this host does not offer {0}: it offers {1}")]
    Unsupported(TeeType, String),
    #[error("no free {what} on this host: all {total} are in use")]
    NoCapacity { what: &'static str, total: u32 },
    #[error("no guest with UID {0} on this host")]
    NoSuchGuest(String),
    #[error("guest {uid} is {state:?}, not running: cannot produce evidence")]
    NotRunning { uid: String, state: GuestState },
    #[error("guest state store {path}: {message}")]
    State { path: String, message: String },
    #[error("evidence: {0}")]
    Evidence(String),
    /// The guest runs but its agent does not answer (it did not boot, or runs no agent);
    /// the message carries the console's last lines where the backend has them.
    #[error("{0}")]
    AgentSilent(String),
    #[error("launch failed: {0}")]
    Launch(String),
    /// QEMU refused or lost the guest; `reason` is the QEMU backend's own CamelCase word
    /// (`QemuExitedAtStart`, `QemuStartTimeout`, …) and `message` carries QEMU's last
    /// stderr lines.
    #[error("launch failed: {message}")]
    Qemu {
        reason: &'static str,
        message: String,
    },
    /// The backend cannot take part in a live migration; the message says what it lacks.
    #[error("{0}")]
    MigrationUnsupported(String),
    /// Sending the guest's state to the target failed; the guest keeps running here.
    #[error("transfer failed: {0}")]
    Transfer(String),
}

impl PlatformError {
    /// Short CamelCase reason for conditions and metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            PlatformError::Unsupported(..) => "TeeUnsupported",
            PlatformError::NoCapacity { .. } => "NoCapacity",
            PlatformError::NoSuchGuest(_) => "NoSuchGuest",
            PlatformError::NotRunning { .. } => "GuestNotRunning",
            PlatformError::State { .. } => "StateStoreError",
            PlatformError::Evidence(_) => "EvidenceError",
            PlatformError::AgentSilent(_) => "GuestAgentSilent",
            PlatformError::Launch(_) => "LaunchFailed",
            PlatformError::Qemu { reason, .. } => reason,
            PlatformError::MigrationUnsupported(_) => "Unsupported",
            PlatformError::Transfer(_) => "TransferFailed",
        }
    }
}

/// A host's TEE backend. Methods are async because real backends talk to QEMU over QMP
/// and to a guest agent over vsock; the futures are `Send` so the plugin can run them on
/// any worker.
pub trait Platform: Send + Sync + 'static {
    /// What the host offers (detected once at start for real hosts, configured for the sim).
    fn capabilities(&self) -> HostCapabilities;

    /// Launches a guest; idempotent per UID (a guest already held is returned as is, never
    /// launched twice).
    fn launch(
        &self,
        req: &GuestRequest,
    ) -> impl Future<Output = Result<GuestInfo, PlatformError>> + Send;

    /// Stops a guest and forgets it; stopping an unknown UID is not an error (returns `None`).
    fn stop(
        &self,
        uid: &str,
    ) -> impl Future<Output = Result<Option<GuestInfo>, PlatformError>> + Send;

    /// The guests the backend holds, including those launched before a restart.
    fn list(&self) -> impl Future<Output = Result<Vec<GuestInfo>, PlatformError>> + Send;

    /// Fresh evidence of a running guest bound to `challenge`.
    fn evidence(
        &self,
        uid: &str,
        challenge: &Challenge,
    ) -> impl Future<Output = Result<RawEvidence, PlatformError>> + Send;

    /// Live migration, target side: launches a guest ready to receive the state of the
    /// CVM's guest running on another host, from the same launch inputs (so its launch
    /// measurement equals the source's). It is held like any guest under the CVM's UID
    /// (listed, kept across restarts, stopped with [`Platform::stop`]) and answers
    /// [`Platform::evidence`]. Idempotent per UID: a guest already held is returned as is.
    fn prepare_incoming(
        &self,
        req: &GuestRequest,
    ) -> impl Future<Output = Result<GuestInfo, PlatformError>> + Send;

    /// Live migration, source side: transfers the state of the running guest `uid` to
    /// the receiving guest prepared on `target_node`. The guest stays held here (the
    /// plugin stops it as an orphan once the operator has rebound the CVM to the target);
    /// on an error it keeps running here. Idempotent: a guest the backend's own records
    /// show as already sent to `target_node` returns `Ok` without sending again, so a
    /// plugin restarted mid-transfer can finish the step.
    fn send(
        &self,
        uid: &str,
        target_node: &str,
    ) -> impl Future<Output = Result<(), PlatformError>> + Send;
}

/// The held guest `uid`, if it is running: what every backend checks before it produces
/// evidence.
pub fn running_guest<G>(
    uid: &str,
    guest: Option<G>,
    info: impl Fn(&G) -> &GuestInfo,
) -> Result<G, PlatformError> {
    let g = guest.ok_or_else(|| PlatformError::NoSuchGuest(uid.to_string()))?;
    let state = info(&g).state;
    if state != GuestState::Running {
        return Err(PlatformError::NotRunning {
            uid: uid.to_string(),
            state,
        });
    }
    Ok(g)
}
