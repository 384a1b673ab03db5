//! The QEMU platform backend: real guests on a real TEE host, over `cvm-host`.
//!
//! - Capabilities come from [`cvm_host::detect::report`] under a root (a fake tree in tests).
//! - A launch resolves the boot artifacts under `--artifacts-dir`, builds the command line,
//!   starts QEMU paused (`-S`), checks it over QMP, records the guest (pid, QMP socket) in
//!   `<state-dir>/qemu-guests.json` (written atomically), reads the SEV launch measurement
//!   where there is one, then lets the guest run (`cont`). A QEMU that exits early becomes
//!   [`PlatformError::Qemu`] carrying QEMU's own last stderr lines.
//! - Guests outlive the plugin (as pods outlive a kubelet restart): a restarted plugin
//!   re-reads the state file and re-attaches by pid and QMP socket; a launch that was
//!   interrupted mid-way is cleaned up and retried, never run twice.
//! - Evidence: the QMP launch measurement for SEV/SEV-ES; the guest agent (`cvm-agent`) over
//!   vsock for SEV-SNP and TDX.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use cvm_crds::cvm::{ArtifactRef, GuestState};
use cvm_crds::{EvidenceFormat, TeeType};
use cvm_host::detect::DetectReport;
use cvm_host::qemu::{
    command_line, GuestDevices, HostCaps, QemuError, QemuGuestSpec, QemuProcess, QmpClient,
    StartOptions,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::platform::{
    Challenge, GuestInfo, GuestRequest, HostCapabilities, Platform, PlatformError, RawEvidence,
};
use crate::store;

/// Name of the guest state file inside `--state-dir`.
pub const GUESTS_FILE: &str = "qemu-guests.json";
/// Directory (inside `--state-dir`) of the guests' QMP sockets.
pub const SOCKET_DIR: &str = "qmp";
/// The first vsock context ID given to a guest (0-2 are reserved).
pub const FIRST_GUEST_CID: u32 = 3;
/// Longest unix socket path the kernel accepts (`sun_path` is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// How the backend runs QEMU.
#[derive(Debug, Clone)]
pub struct QemuOptions {
    /// `qemu-system-x86_64` (looked up in `PATH`) or a full path.
    pub binary: PathBuf,
    /// Guest records and QMP sockets.
    pub state_dir: PathBuf,
    /// Boot artifacts: a CVM's `name` (or its URL's last segment) is a file here.
    pub artifacts_dir: PathBuf,
    /// Detection root (`/` on a host).
    pub host_root: PathBuf,
    /// Overrides what detection found for the command line (C-bit position and
    /// reduced-phys-bits), field by field.
    pub host_caps: Option<HostCaps>,
    /// Time for QEMU to open QMP at start.
    pub start_timeout: Duration,
    /// Time for QEMU to exit after `quit` before it is killed.
    pub stop_timeout: Duration,
    /// vsock port of the guest agent.
    pub agent_port: u32,
    /// Time to reach the guest agent and get its answer.
    pub agent_timeout: Duration,
    /// Where a launcher pod's socket directory is mounted in the pod (QEMU's view of the
    /// directory the plugin reaches on the host).
    pub launcher_dir_in_pod: PathBuf,
    /// SEV guests pin all their memory: the launcher's RLIMIT_MEMLOCK is raised to guest
    /// memory + 256 MiB before QEMU starts (off only for tests whose QEMU pins nothing).
    pub lock_guest_memory: bool,
}

impl QemuOptions {
    /// Defaults for everything but the directories.
    pub fn new(state_dir: &Path, artifacts_dir: &Path) -> Self {
        QemuOptions {
            binary: PathBuf::from("qemu-system-x86_64"),
            state_dir: state_dir.to_path_buf(),
            artifacts_dir: artifacts_dir.to_path_buf(),
            host_root: PathBuf::from("/"),
            host_caps: None,
            start_timeout: Duration::from_secs(30),
            stop_timeout: Duration::from_secs(10),
            agent_port: cvm_host::agent_proto::DEFAULT_VSOCK_PORT,
            agent_timeout: Duration::from_secs(10),
            launcher_dir_in_pod: PathBuf::from(cvm_crds::wellknown::LAUNCHER_DIR),
            lock_guest_memory: true,
        }
    }
}

/// Errors opening the QEMU backend.
#[derive(Debug, thiserror::Error)]
pub enum QemuOpenError {
    #[error("cannot read host caps {path}: {source}")]
    HostCapsRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not host-caps JSON (e.g. {{\"cbitpos\":51,\"reducedPhysBits\":1}}): {source}"
    )]
    HostCapsParse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(transparent)]
    Platform(#[from] PlatformError),
}

/// Reads a host-caps override file (the format `cvm-node-plugin qemu-args --host-caps` takes).
pub fn read_host_caps(path: &Path) -> Result<HostCaps, QemuOpenError> {
    let text = std::fs::read_to_string(path).map_err(|source| QemuOpenError::HostCapsRead {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| QemuOpenError::HostCapsParse {
        path: path.to_path_buf(),
        source,
    })
}

/// What the state file holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GuestsFile {
    guests: BTreeMap<String, QemuGuest>,
}

/// One guest as recorded: enough to find its QEMU again after a restart.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct QemuGuest {
    info: GuestInfo,
    /// QEMU's pid; `None` until QEMU answered QMP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pid: Option<u32>,
    qmp_socket: PathBuf,
    /// vsock context ID of the guest agent (SEV-SNP and TDX, hosts with vhost-vsock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vsock_cid: Option<u32>,
    /// The guest agent's virtio-serial socket on the host (SEV-SNP and TDX, hosts without
    /// vhost-vsock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    agent_socket: Option<PathBuf>,
    /// The launcher pod running this QEMU (its socket dir on the host); `None`: QEMU is
    /// this plugin's child. `pid` is then in the pod's PID namespace, for logs only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    launcher: Option<PathBuf>,
}

/// Memory QEMU locks beyond the guest's own (SEV pins all guest memory).
const MEMLOCK_OVERHEAD_MIB: u64 = 256;
/// The QMP socket's name in a launcher's directory.
const LAUNCHER_QMP: &str = "qmp.sock";

/// Connects to QMP at a path of any length (kubelet's pod-volume paths are long).
async fn qmp_connect(
    path: &Path,
    timeout: Duration,
) -> Result<QmpClient, cvm_host::qemu::QmpError> {
    let (short, _dir) =
        crate::launcher::short_path(path).map_err(|source| cvm_host::qemu::QmpError::Connect {
            path: path.display().to_string(),
            source,
        })?;
    QmpClient::connect_with_timeout(&short, timeout).await
}

/// The QEMU of a launch: this plugin's child, or a launcher pod's.
enum Proc<'a> {
    Own(&'a mut QemuProcess),
    Pod {
        client: crate::launcher::LauncherClient,
        launch_id: String,
        tail: Vec<String>,
    },
}

impl Proc<'_> {
    fn stderr_tail(&self) -> Vec<String> {
        match self {
            Proc::Own(p) => p.stderr_tail(),
            Proc::Pod { tail, .. } => tail.clone(),
        }
    }

    /// `at_start`: an exit is QEMU refusing to start (its own words).
    async fn check_running(&mut self, tee: TeeType, at_start: bool) -> Result<(), PlatformError> {
        match self {
            Proc::Own(p) => p.check_running().await.map_err(|e| qemu_error(&e, tee)),
            Proc::Pod {
                client,
                launch_id,
                tail,
            } => {
                let p = client.status().await.map_err(|e| {
                    PlatformError::Launch(format!("the launcher pod does not answer: {e}"))
                })?;
                *tail = p.stderr_tail.clone();
                if crate::launcher::ended(&p, launch_id).is_none() {
                    return Ok(());
                }
                let status = p.exit.unwrap_or_else(|| "not running".into());
                let stderr = p.stderr_tail;
                Err(qemu_error(
                    &if at_start {
                        QemuError::ExitedEarly { status, stderr }
                    } else {
                        QemuError::Exited { status, stderr }
                    },
                    tee,
                ))
            }
        }
    }
}

/// The capabilities a detection report gives. Pools whose size the host does not publish
/// count as 0 (the node then advertises no capacity for them rather than a guess).
pub fn capabilities_from(report: &DetectReport) -> HostCapabilities {
    HostCapabilities {
        tees: report.available_tees(),
        sev_asids: report.capacity.sev_asids.unwrap_or(0),
        es_asids: report.capacity.es_asids.unwrap_or(0),
        tdx_keys: report.capacity.tdx_keys.unwrap_or(0),
        firmware_version: None,
        snp_tcb: None,
        tdx_tcb_status: None,
        simulated: false,
    }
}

/// Detected values, each replaced by the override's when it has one.
pub fn merge_host_caps(detected: HostCaps, over: Option<HostCaps>) -> HostCaps {
    let Some(o) = over else { return detected };
    HostCaps {
        cbitpos: o.cbitpos.or(detected.cbitpos),
        reduced_phys_bits: o.reduced_phys_bits.or(detected.reduced_phys_bits),
    }
}

/// The file of an artifact under `dir`: its catalog name, or the last segment of its URL.
/// Refuses names that would leave `dir` (the URL is user input).
pub fn artifact_path(dir: &Path, what: &str, a: &ArtifactRef) -> Result<PathBuf, String> {
    let name = a
        .name
        .as_deref()
        .or_else(|| a.url.as_deref().and_then(|u| u.rsplit('/').next()))
        .unwrap_or_default();
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\\', '\0']) {
        return Err(format!(
            "{what}: cannot derive a file name from {a:?}: give the artifact a name"
        ));
    }
    Ok(dir.join(name))
}

/// QEMU's error with a hint when it is the well-known "this QEMU is too old" case.
pub fn explain(e: &QemuError, tee: TeeType) -> String {
    let object = match tee {
        TeeType::SevSnp => "sev-snp-guest",
        TeeType::Tdx => "tdx-guest",
        _ => return e.to_string(),
    };
    let unknown = e.stderr().iter().any(|l| {
        l.contains(object)
            && (l.contains("does not accept value") || l.contains("invalid object type"))
    });
    if unknown {
        let version = if tee == TeeType::Tdx { "10.1" } else { "9.1" };
        format!(
            "{e} (this QEMU has no {object} object: {tee} needs QEMU {version} or newer, see docs/host-guide.md)"
        )
    } else {
        e.to_string()
    }
}

fn qemu_error(e: &QemuError, tee: TeeType) -> PlatformError {
    PlatformError::Qemu {
        reason: e.reason(),
        message: explain(e, tee),
    }
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// UIDs become file names: allow what the API server issues (UUIDs) and nothing that
/// could name another path.
fn check_uid(uid: &str) -> Result<(), PlatformError> {
    if uid.is_empty()
        || uid.len() > 64
        || !uid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(PlatformError::Launch(format!(
            "UID {uid:?} is not usable as a file name (expected a UUID)"
        )));
    }
    Ok(())
}

/// Whether `pid` is a live (not zombie) process whose command line names `qmp_socket`:
/// the socket path is unique per guest, so a reused pid is not taken for our QEMU.
pub fn process_alive(pid: u32, qmp_socket: &Path) -> bool {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let Ok(stat) = std::fs::read_to_string(proc_dir.join("stat")) else {
        return false;
    };
    // The state letter follows the command name, which may itself hold ") ".
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next());
    if matches!(state, None | Some('Z') | Some('X')) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(proc_dir.join("cmdline")) else {
        return false;
    };
    let sock = qmp_socket.to_string_lossy();
    cmdline
        .split(|b| *b == 0)
        .any(|arg| String::from_utf8_lossy(arg).contains(sock.as_ref()))
}

fn send_kill(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) takes plain integers and touches no memory of ours; the pid was
    // just checked to be our QEMU (process_alive), so no other process is signalled.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

/// A host's guests run by QEMU.
pub struct QemuPlatform {
    opts: QemuOptions,
    caps: HostCapabilities,
    host_caps: HostCaps,
    path: PathBuf,
    guests: Mutex<GuestsFile>,
    /// QEMU processes this instance started: their exit status and stderr. Guests found
    /// again after a restart are watched by pid instead.
    procs: tokio::sync::Mutex<HashMap<String, QemuProcess>>,
}

impl std::fmt::Debug for QemuPlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuPlatform")
            .field("binary", &self.opts.binary)
            .field("caps", &self.caps)
            .field("host_caps", &self.host_caps)
            .field("state", &self.path)
            .finish()
    }
}

impl Drop for QemuPlatform {
    fn drop(&mut self) {
        // A QemuProcess kills QEMU when dropped; guests must outlive the plugin (as after
        // a crash) so that a restarted plugin re-attaches instead of relaunching. Forgetting
        // leaves the child unreaped, which only matters for a process that keeps running
        // after dropping its platform (tests); the state file keeps what a restart needs.
        let procs = std::mem::take(self.procs.get_mut());
        for (_, p) in procs {
            std::mem::forget(p);
        }
    }
}

impl QemuPlatform {
    /// Detects the host under `opts.host_root` and loads the recorded guests. Launches that
    /// a previous run left half-done are stopped and forgotten, so they are retried.
    pub async fn open(opts: QemuOptions) -> Result<Self, QemuOpenError> {
        let report = cvm_host::detect::report(&opts.host_root);
        let caps = capabilities_from(&report);
        for tee in &caps.tees {
            if caps.pool_size(*tee) == 0 {
                warn!(tee = %tee, "the host publishes no capacity for this TEE: advertising 0 slots");
            }
        }
        let host_caps = merge_host_caps(report.host_caps(), opts.host_caps);
        let path = opts.state_dir.join(GUESTS_FILE);
        let mut file: GuestsFile = store::read_json(&path).map_err(|e| PlatformError::State {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let interrupted: Vec<QemuGuest> = file
            .guests
            .values()
            .filter(|g| g.info.state == GuestState::Launching)
            .cloned()
            .collect();
        let platform_caps = caps.clone();
        for g in &interrupted {
            warn!(uid = %g.info.uid, "a launch was interrupted by a plugin restart: stopping its QEMU, it will be launched again");
            stop_external(g, opts.stop_timeout).await;
            file.guests.remove(&g.info.uid);
        }
        let p = QemuPlatform {
            opts,
            caps: platform_caps,
            host_caps,
            path,
            guests: Mutex::new(file),
            procs: tokio::sync::Mutex::new(HashMap::new()),
        };
        if !interrupted.is_empty() {
            let file = p.lock().clone();
            p.persist(&file)?;
        }
        Ok(p)
    }

    /// What the command line gets from the host.
    pub fn host_caps(&self) -> HostCaps {
        self.host_caps
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GuestsFile> {
        // Each update is one insert, remove or field change: a poisoned lock holds
        // consistent data.
        self.guests.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist(&self, file: &GuestsFile) -> Result<(), PlatformError> {
        store::write_json(&self.path, file).map_err(|e| PlatformError::State {
            path: self.path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// Applies `f` to the record of `uid` (if any) and persists.
    fn update(&self, uid: &str, f: impl FnOnce(&mut QemuGuest)) -> Result<(), PlatformError> {
        let mut file = self.lock();
        if let Some(g) = file.guests.get_mut(uid) {
            f(g);
        }
        let snapshot = file.clone();
        drop(file);
        self.persist(&snapshot)
    }

    fn forget(&self, uid: &str) -> Result<Option<QemuGuest>, PlatformError> {
        let mut file = self.lock();
        let g = file.guests.remove(uid);
        let snapshot = file.clone();
        drop(file);
        self.persist(&snapshot)?;
        Ok(g)
    }

    fn socket_for(&self, uid: &str) -> Result<PathBuf, PlatformError> {
        let sock = self
            .opts
            .state_dir
            .join(SOCKET_DIR)
            .join(format!("{uid}.sock"));
        if sock.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(PlatformError::Launch(format!(
                "QMP socket path {} is longer than {MAX_SOCKET_PATH} bytes: choose a shorter --state-dir",
                sock.display()
            )));
        }
        Ok(sock)
    }

    /// Reserves the guest under lock: returns the held record, or records a new
    /// `Launching` one (so a concurrent or restarted launch never starts a second QEMU).
    fn begin_launch(
        &self,
        req: &GuestRequest,
    ) -> Result<Result<GuestInfo, QemuGuest>, PlatformError> {
        check_uid(&req.uid)?;
        let qmp_socket = match &req.launcher {
            Some(dir) => dir.join(LAUNCHER_QMP),
            None => self.socket_for(&req.uid)?,
        };
        let mut file = self.lock();
        if let Some(g) = file.guests.get(&req.uid) {
            return Ok(Ok(g.info.clone()));
        }
        if !self.caps.supports(req.tee) {
            let offered: Vec<&str> = self.caps.tees.iter().map(|t| t.as_str()).collect();
            return Err(PlatformError::Unsupported(
                req.tee,
                if offered.is_empty() {
                    "no TEE (run `cvm-node-plugin detect` for the reasons)".into()
                } else {
                    offered.join(", ")
                },
            ));
        }
        let pool = cvm_crds::wellknown::tee_resource(req.tee);
        let in_use = file
            .guests
            .values()
            .filter(|g| cvm_crds::wellknown::tee_resource(g.info.tee) == pool)
            .count();
        let total = self.caps.pool_size(req.tee);
        if u32::try_from(in_use).unwrap_or(u32::MAX) >= total {
            return Err(PlatformError::NoCapacity {
                what: cvm_crds::wellknown::slot_name(req.tee),
                total,
            });
        }
        let agent = matches!(req.tee, TeeType::SevSnp | TeeType::Tdx);
        let vsock = agent && self.opts.host_root.join("dev/vhost-vsock").exists();
        let agent_socket = (agent && !vsock).then(|| match &req.launcher {
            Some(dir) => dir.join(crate::launcher::AGENT_SOCKET),
            None => self
                .opts
                .state_dir
                .join(SOCKET_DIR)
                .join(format!("{}.agent.sock", req.uid)),
        });
        let vsock_cid = vsock.then(|| {
            let used: std::collections::BTreeSet<u32> =
                file.guests.values().filter_map(|g| g.vsock_cid).collect();
            (FIRST_GUEST_CID..)
                .find(|c| !used.contains(c))
                .unwrap_or(FIRST_GUEST_CID)
        });
        let g = QemuGuest {
            info: GuestInfo {
                uid: req.uid.clone(),
                namespace: req.namespace.clone(),
                name: req.name.clone(),
                tee: req.tee,
                state: GuestState::Launching,
                measurement: Vec::new(),
                launch_policy: req.launch_policy,
                launched_at: now_unix(),
                launch_id: crate::platform::new_launch_id()?,
                message: None,
            },
            pid: None,
            qmp_socket,
            vsock_cid,
            agent_socket,
            launcher: req.launcher.clone(),
        };
        file.guests.insert(req.uid.clone(), g.clone());
        let snapshot = file.clone();
        drop(file);
        if let Err(e) = self.persist(&snapshot) {
            self.lock().guests.remove(&req.uid);
            return Err(e);
        }
        Ok(Err(g))
    }

    /// The QEMU arguments for `req`, with its artifacts checked on disk.
    async fn arguments(
        &self,
        req: &GuestRequest,
        g: &QemuGuest,
    ) -> Result<Vec<String>, PlatformError> {
        let dir = &self.opts.artifacts_dir;
        let pod = g.launcher.as_deref();
        let firmware = self.artifact(dir, "firmware", &req.firmware, pod).await?;
        let kernel = match &req.kernel {
            Some(k) => Some(self.artifact(dir, "kernel", k, pod).await?),
            None => None,
        };
        let initrd = match &req.initrd {
            Some(i) => Some(self.artifact(dir, "initrd", i, pod).await?),
            None => None,
        };
        let qmp_socket = match pod {
            Some(_) => self.opts.launcher_dir_in_pod.join(LAUNCHER_QMP),
            None => g.qmp_socket.clone(),
        };
        let spec = QemuGuestSpec {
            name: format!("{}/{}", req.namespace, req.name),
            tee: req.tee,
            vcpus: req.vcpus,
            memory_mib: req.memory_mib,
            cpu_model: req.cpu_model.map(|m| m.as_str().to_string()),
            firmware,
            kernel_hashes: req.tee.is_amd() && kernel.is_some(),
            kernel,
            initrd,
            cmdline: req.cmdline.clone(),
            policy: req.launch_policy,
            host_data: req.host_data.clone(),
            quote_generation_socket: None,
            qmp_socket,
        };
        let mut args = command_line(&spec, &self.host_caps).map_err(|e| qemu_error(&e, req.tee))?;
        // In a launcher pod the console is the pod's log and `kubectl cvm console`'s; the
        // agent's serial socket is QEMU's view of the pod directory the plugin reaches.
        let in_pod = |name: &str| self.opts.launcher_dir_in_pod.join(name);
        let devices = GuestDevices {
            ports: req.ports.clone(),
            console_socket: pod.map(|_| in_pod(crate::launcher::CONSOLE_SOCKET)),
            console_log: pod.map(|_| PathBuf::from("/dev/stdout")),
            agent_socket: match (&g.agent_socket, pod) {
                (Some(_), Some(_)) => Some(in_pod(crate::launcher::AGENT_SOCKET)),
                (s, None) => s.clone(),
                (None, Some(_)) => None,
            },
            vsock_cid: g.vsock_cid,
            confidential: true,
        };
        args.extend(devices.args().map_err(|e| qemu_error(&e, req.tee))?);
        Ok(args)
    }

    async fn artifact(
        &self,
        dir: &Path,
        what: &str,
        a: &ArtifactRef,
        pod: Option<&Path>,
    ) -> Result<PathBuf, PlatformError> {
        stage_artifact(dir, what, a, pod, &self.opts.launcher_dir_in_pod).await
    }

    /// Starts QEMU paused, checks it, records its pid, reads the SEV measurement, lets it
    /// run. On error the caller forgets the record; QEMU is gone by then.
    async fn start(&self, req: &GuestRequest, g: &QemuGuest) -> Result<GuestInfo, PlatformError> {
        let args = self.arguments(req, g).await?;
        if let Some(dir) = &g.launcher {
            return self.start_in_pod(req, g, dir, args).await;
        }
        if let Some(dir) = g.qmp_socket.parent() {
            std::fs::create_dir_all(dir).map_err(|e| PlatformError::State {
                path: dir.display().to_string(),
                message: e.to_string(),
            })?;
        }
        let start = StartOptions {
            binary: self.opts.binary.clone(),
            args,
            qmp_socket: g.qmp_socket.clone(),
            start_timeout: self.opts.start_timeout,
        };
        let (mut proc, mut qmp) = QemuProcess::start(&start)
            .await
            .map_err(|e| qemu_error(&e, req.tee))?;
        let pid = proc.id();
        self.update(&req.uid, |g| g.pid = pid)?;
        match self
            .bring_up(req, &mut Proc::Own(&mut proc), &mut qmp)
            .await
        {
            Ok(info) => {
                self.procs.lock().await.insert(req.uid.clone(), proc);
                Ok(info)
            }
            Err(e) => {
                let _ = proc.kill().await;
                Err(e)
            }
        }
    }

    /// QEMU in the CVM's launcher pod: the launcher starts it (paused, as here), the
    /// plugin checks and resumes it over QMP in the pod's directory.
    async fn start_in_pod(
        &self,
        req: &GuestRequest,
        g: &QemuGuest,
        dir: &Path,
        args: Vec<String>,
    ) -> Result<GuestInfo, PlatformError> {
        let client = crate::launcher::LauncherClient::new(dir);
        let _ = std::fs::remove_file(&g.qmp_socket);
        let mut argv = vec![self.opts.binary.display().to_string()];
        argv.extend(args);
        let memlock = (self.opts.lock_guest_memory && req.tee.is_amd())
            .then(|| (u64::from(req.memory_mib) + MEMLOCK_OVERHEAD_MIB) << 20);
        let launch_id = g.info.launch_id.clone();
        let started = client
            .launch(&launch_id, crate::launcher::Program::Exec { argv }, memlock)
            .await
            .map_err(|e| {
                PlatformError::Launch(format!("the launcher pod did not start QEMU: {e}"))
            })?;
        self.update(&req.uid, |r| r.pid = started.pid)?;
        let mut proc = Proc::Pod {
            client: client.clone(),
            launch_id,
            tail: Vec::new(),
        };
        let result = async {
            let mut qmp = self.wait_qmp(&mut proc, &g.qmp_socket, req.tee).await?;
            self.bring_up(req, &mut proc, &mut qmp).await
        }
        .await;
        if result.is_err() {
            let _ = client.stop(self.opts.stop_timeout).await;
        }
        result
    }

    /// Waits for the pod's QEMU to open QMP, or to exit (with its words), or the timeout.
    async fn wait_qmp(
        &self,
        proc: &mut Proc<'_>,
        sock: &Path,
        tee: TeeType,
    ) -> Result<QmpClient, PlatformError> {
        let deadline = Instant::now() + self.opts.start_timeout;
        loop {
            proc.check_running(tee, true).await?;
            if sock.exists() {
                if let Ok(q) = qmp_connect(sock, Duration::from_secs(2)).await {
                    return Ok(q);
                }
            }
            if Instant::now() >= deadline {
                return Err(qemu_error(
                    &QemuError::StartTimeout {
                        socket: sock.display().to_string(),
                        seconds: self.opts.start_timeout.as_secs(),
                        stderr: proc.stderr_tail(),
                    },
                    tee,
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn bring_up(
        &self,
        req: &GuestRequest,
        proc: &mut Proc<'_>,
        qmp: &mut QmpClient,
    ) -> Result<GuestInfo, PlatformError> {
        let tee = req.tee;
        let lost = |e: cvm_host::qemu::QmpError, proc: &Proc<'_>| PlatformError::Qemu {
            reason: "QmpError",
            message: format!("QMP: {e}{}", stderr_suffix(&proc.stderr_tail())),
        };
        let status = qmp.query_status().await.map_err(|e| lost(e, proc))?;
        if status.running {
            return Err(PlatformError::Launch(format!(
                "QEMU runs the guest before the launch was checked (status {}): is -S missing?",
                status.status
            )));
        }
        let measurement = match tee {
            TeeType::Sev | TeeType::SevEs => {
                let b64 = qmp
                    .query_sev_launch_measure()
                    .await
                    .map_err(|e| lost(e, proc))?;
                decode_launch_measure(&b64)?.0
            }
            // SNP and TDX measurements are read from the guest's signed evidence.
            TeeType::SevSnp | TeeType::Tdx => Vec::new(),
        };
        qmp.cont().await.map_err(|e| lost(e, proc))?;
        proc.check_running(tee, false).await?;
        let mut info = None;
        self.update(&req.uid, |g| {
            g.info.state = GuestState::Running;
            g.info.measurement = measurement;
            g.info.launched_at = now_unix();
            info = Some(g.info.clone());
        })?;
        info.ok_or_else(|| {
            PlatformError::Launch(format!("guest {} was stopped while launching", req.uid))
        })
    }

    /// Whether the guest's QEMU still runs; `Err` holds why not (with its stderr when this
    /// instance started it).
    async fn check(&self, g: &QemuGuest) -> Result<(), String> {
        if let Some(dir) = &g.launcher {
            return match crate::launcher::LauncherClient::new(dir).status().await {
                Ok(p) => crate::launcher::ended(&p, &g.info.launch_id).map_or(Ok(()), Err),
                // An unreachable launcher is the plugin loop's to judge (its pod's state).
                Err(_) => Ok(()),
            };
        }
        let mut procs = self.procs.lock().await;
        if let Some(p) = procs.get_mut(&g.info.uid) {
            return match p.check_running().await {
                Ok(()) => Ok(()),
                Err(e) => {
                    procs.remove(&g.info.uid);
                    Err(e.to_string())
                }
            };
        }
        drop(procs);
        match g.pid {
            Some(pid) if process_alive(pid, &g.qmp_socket) => Ok(()),
            Some(pid) => Err(format!(
                "QEMU (pid {pid}) exited while the plugin was not running; its stderr was not kept"
            )),
            None => Err("QEMU's pid was never recorded".into()),
        }
    }

    async fn qmp(&self, g: &QemuGuest) -> Result<QmpClient, PlatformError> {
        qmp_connect(&g.qmp_socket, Duration::from_secs(5))
            .await
            .map_err(|e| {
                PlatformError::Evidence(format!(
                    "cannot reach QEMU's QMP socket {}: {e}",
                    g.qmp_socket.display()
                ))
            })
    }

    async fn agent_evidence(
        &self,
        g: &QemuGuest,
        challenge: &Challenge,
    ) -> Result<RawEvidence, PlatformError> {
        let tee = g.info.tee;
        let who = format!("{}/{}", g.info.namespace, g.info.name);
        let timeout = self.opts.agent_timeout;
        let ev = if let Some(sock) = &g.agent_socket {
            crate::agent::over_serial(sock, &who, timeout, |mut c| async move {
                c.get_evidence(&challenge.binding).await
            })
            .await?
        } else {
            let cid = g.vsock_cid.ok_or_else(|| {
                PlatformError::Evidence(format!("guest {} has no agent channel", g.info.uid))
            })?;
            let port = self.opts.agent_port;
            let unreachable = |detail: String| {
                PlatformError::Evidence(format!(
                    "the guest agent of {who} is unreachable at vsock:{cid}:{port} ({detail}): is cvm-agent running in the guest?"
                ))
            };
            let client = tokio::time::timeout(
                timeout,
                cvm_host::agent_client::AgentClient::connect_vsock(cid, port),
            )
            .await
            .map_err(|_| unreachable(format!("no connection within {timeout:?}")))?
            .map_err(|e| unreachable(e.to_string()))?;
            client
                .with_timeout(timeout)
                .get_evidence(&challenge.binding)
                .await
                .map_err(|e| PlatformError::Evidence(format!("guest agent of {who}: {e}")))?
        };
        match tee {
            TeeType::SevSnp => {
                let report = cvm_attest::snp::report::SnpReport::parse(&ev.outblob)
                    .map_err(|e| PlatformError::Evidence(format!("SNP report from {who}: {e}")))?;
                let cert_chain = match &ev.auxblob {
                    Some(aux) => {
                        let pem = cvm_crds::wire::snp_cert_table_pem(aux).map_err(|e| {
                            PlatformError::Evidence(format!("SNP certificates from {who}: {e}"))
                        })?;
                        (!pem.is_empty()).then_some(pem)
                    }
                    None => None,
                };
                Ok(RawEvidence {
                    format: EvidenceFormat::SevSnpReport,
                    measurement: report.measurement.to_vec(),
                    report: ev.outblob,
                    cert_chain,
                    collateral: Vec::new(),
                    instance_key: Some(ev.instance_key),
                })
            }
            TeeType::Tdx => {
                let quote = cvm_attest::tdx::DecodedTdQuote::parse(&ev.outblob)
                    .map_err(|e| PlatformError::Evidence(format!("TDX quote from {who}: {e}")))?;
                Ok(RawEvidence {
                    format: EvidenceFormat::TdxQuote,
                    measurement: quote.mr_td.clone(),
                    report: ev.outblob,
                    cert_chain: None,
                    collateral: Vec::new(),
                    instance_key: Some(ev.instance_key),
                })
            }
            TeeType::Sev | TeeType::SevEs => Err(PlatformError::Evidence(format!(
                "{tee} guests have no agent evidence"
            ))),
        }
    }
}

/// Resolves an artifact and checks its digest when the spec gives one. With a launcher
/// pod (`pod`: its directory on the host) the checked bytes are copied into the pod's
/// directory, and the path returned is QEMU's view of the copy: QEMU reads exactly
/// what was checked, and the pod needs no hostPath. An artifact from a container image
/// (`oci://IMAGE#/PATH`) is already in the pod, where its init container copied it: it is
/// checked there and not copied again.
pub async fn stage_artifact(
    dir: &Path,
    what: &str,
    a: &ArtifactRef,
    pod: Option<&Path>,
    dir_in_pod: &Path,
) -> Result<PathBuf, PlatformError> {
    let want = a.sha256.clone();
    let (path, staged, stage_to) = match (a.image_file(), pod) {
        // Copied out of its image by the pod's init container (boot_image): checked where
        // it lies, and QEMU reads it there.
        (Some(_), Some(pod)) => {
            let name = Path::new(cvm_crds::wellknown::LAUNCHER_IMAGE_ARTIFACTS).join(what);
            (pod.join(&name), Some(dir_in_pod.join(&name)), None)
        }
        (Some((image, file)), None) => {
            return Err(PlatformError::Launch(format!(
                "the {what} comes from image {image} ({file}), which only a launcher pod copies out: run this node's plugin with --launcher-pods-dir"
            )))
        }
        (None, _) => (
            artifact_path(dir, what, a).map_err(PlatformError::Launch)?,
            pod.map(|_| dir_in_pod.join("artifacts").join(what)),
            pod.map(|d| d.join("artifacts").join(what)),
        ),
    };
    let p = path.clone();
    let from_image = a.image_file().map(|(i, f)| format!("{f} of image {i}"));
    let what = what.to_string();
    // Hashing a kernel or initrd is disk and CPU work: keep it off the async workers.
    tokio::task::spawn_blocking(move || -> Result<(), PlatformError> {
        let bytes = std::fs::read(&p).map_err(|e| {
            PlatformError::Launch(match &from_image {
                Some(src) => format!(
                    "the {what} ({src}) is not in the launcher pod at {} ({e}): its boot-image init container did not copy it",
                    p.display()
                ),
                None => format!(
                    "{what} artifact {} is not readable ({e}): put it in --artifacts-dir",
                    p.display()
                ),
            })
        })?;
        if let Some(want) = want {
            let got = hex::encode(Sha256::digest(&bytes));
            if !got.eq_ignore_ascii_case(&want) {
                let src = from_image.unwrap_or_else(|| p.display().to_string());
                return Err(PlatformError::Launch(format!(
                    "{what} artifact {src} has SHA-256 {got}, the spec asks for {want}"
                )));
            }
        }
        if let Some(to) = stage_to {
            let write = |r: std::io::Result<()>| {
                r.map_err(|e| {
                    PlatformError::Launch(format!(
                        "cannot copy the {what} into the launcher pod ({}): {e}",
                        to.display()
                    ))
                })
            };
            if let Some(parent) = to.parent() {
                write(std::fs::create_dir_all(parent))?;
            }
            write(std::fs::write(&to, &bytes))?;
        }
        Ok(())
    })
    .await
    .map_err(|e| PlatformError::Launch(format!("checking the {}: {e}", path.display())))??;
    Ok(staged.unwrap_or(path))
}

fn stderr_suffix(lines: &[String]) -> String {
    if lines.is_empty() {
        String::new()
    } else {
        format!("; QEMU said: {}", lines.join(" | "))
    }
}

/// QMP's LAUNCH_MEASURE blob (base64 of MEASURE(32) || MNONCE(16)) as (measure, whole blob).
pub fn decode_launch_measure(b64: &str) -> Result<(Vec<u8>, Vec<u8>), PlatformError> {
    let blob = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| PlatformError::Evidence(format!("LAUNCH_MEASURE is not base64: {e}")))?;
    if blob.len() < 32 {
        return Err(PlatformError::Evidence(format!(
            "LAUNCH_MEASURE is {} bytes, expected 48 (measure and nonce)",
            blob.len()
        )));
    }
    Ok((blob[..32].to_vec(), blob))
}

/// Stops a QEMU this instance did not start: `quit` over QMP, then SIGKILL if it lingers.
async fn stop_external(g: &QemuGuest, timeout: Duration) {
    if let Ok(mut q) = qmp_connect(&g.qmp_socket, Duration::from_secs(2)).await {
        let _ = q.quit().await;
    }
    if let Some(dir) = &g.launcher {
        // The launcher waits for its QEMU (and kills it after `timeout`); a launcher that
        // is gone took its QEMU with it.
        if let Err(e) = crate::launcher::LauncherClient::new(dir)
            .stop(timeout)
            .await
        {
            tracing::debug!(uid = %g.info.uid, error = %e, "stopping QEMU through its launcher");
        }
        let _ = std::fs::remove_file(&g.qmp_socket);
        return;
    }
    if let Some(pid) = g.pid {
        let deadline = Instant::now() + timeout;
        while process_alive(pid, &g.qmp_socket) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if process_alive(pid, &g.qmp_socket) {
            warn!(pid, "QEMU ignored quit: killing it");
            send_kill(pid);
        }
    }
    let _ = std::fs::remove_file(&g.qmp_socket);
}

impl Platform for QemuPlatform {
    fn capabilities(&self) -> HostCapabilities {
        self.caps.clone()
    }

    async fn launch(&self, req: &GuestRequest) -> Result<GuestInfo, PlatformError> {
        let g = match self.begin_launch(req)? {
            Ok(held) => return Ok(held),
            Err(new) => new,
        };
        match self.start(req, &g).await {
            Ok(info) => {
                info!(uid = %req.uid, pid = ?self.lock().guests.get(&req.uid).and_then(|g| g.pid), "QEMU guest running");
                Ok(info)
            }
            Err(e) => {
                // No guest is held after a failed launch: the loop reports the failure and
                // retries on a later resync.
                if let Err(se) = self.forget(&req.uid) {
                    warn!(uid = %req.uid, error = %se, "forgetting a failed launch");
                }
                let _ = std::fs::remove_file(&g.qmp_socket);
                Err(e)
            }
        }
    }

    async fn stop(&self, uid: &str) -> Result<Option<GuestInfo>, PlatformError> {
        let Some(g) = self.lock().guests.get(uid).cloned() else {
            return Ok(None);
        };
        let own = self.procs.lock().await.remove(uid);
        match own {
            Some(mut p) => {
                if let Ok(mut q) =
                    QmpClient::connect_with_timeout(&g.qmp_socket, Duration::from_secs(2)).await
                {
                    let _ = q.quit().await;
                }
                match p.wait_exit(self.opts.stop_timeout).await {
                    Ok(Some(_)) => {}
                    _ => {
                        warn!(uid, "QEMU ignored quit: killing it");
                        let _ = p.kill().await;
                    }
                }
            }
            None => stop_external(&g, self.opts.stop_timeout).await,
        }
        let _ = std::fs::remove_file(&g.qmp_socket);
        let mut gone = self.forget(uid)?.unwrap_or(g).info;
        gone.state = GuestState::Stopped;
        Ok(Some(gone))
    }

    async fn list(&self) -> Result<Vec<GuestInfo>, PlatformError> {
        let held: Vec<QemuGuest> = self.lock().guests.values().cloned().collect();
        let mut out = Vec::with_capacity(held.len());
        for mut g in held {
            if g.info.state == GuestState::Running {
                if let Err(why) = self.check(&g).await {
                    warn!(uid = %g.info.uid, %why, "guest's QEMU is gone");
                    self.update(&g.info.uid, |r| {
                        r.info.state = GuestState::Failed;
                        r.info.message = Some(why.clone());
                    })?;
                    g.info.state = GuestState::Failed;
                    g.info.message = Some(why);
                }
            }
            out.push(g.info);
        }
        Ok(out)
    }

    async fn evidence(
        &self,
        uid: &str,
        challenge: &Challenge,
    ) -> Result<RawEvidence, PlatformError> {
        let found = self.lock().guests.get(uid).cloned();
        let g = crate::platform::running_guest(uid, found, |g| &g.info)?;
        match g.info.tee {
            TeeType::Sev | TeeType::SevEs => {
                // Unsigned: the guest owner checks the HMAC with their TIK; report the blob
                // QEMU gives, and the measure part as the measurement.
                let mut q = self.qmp(&g).await?;
                let b64 = q.query_sev_launch_measure().await.map_err(|e| {
                    PlatformError::Evidence(format!("query-sev-launch-measure: {e}"))
                })?;
                let (measure, blob) = decode_launch_measure(&b64)?;
                Ok(RawEvidence {
                    format: EvidenceFormat::SevLaunchMeasure,
                    report: blob,
                    cert_chain: None,
                    collateral: Vec::new(),
                    measurement: measure,
                    instance_key: None,
                })
            }
            TeeType::SevSnp | TeeType::Tdx => self.agent_evidence(&g, challenge).await,
        }
    }

    async fn prepare_incoming(&self, _req: &GuestRequest) -> Result<GuestInfo, PlatformError> {
        Err(PlatformError::MigrationUnsupported(
            MIGRATION_UNSUPPORTED.to_string(),
        ))
    }

    async fn send(&self, _uid: &str, _target_node: &str) -> Result<(), PlatformError> {
        Err(PlatformError::MigrationUnsupported(
            MIGRATION_UNSUPPORTED.to_string(),
        ))
    }
}

/// Why the QEMU backend refuses both steps of a live migration.
pub const MIGRATION_UNSUPPORTED: &str = "live migration is not supported by the QEMU backend \
     yet: it would need QMP migrate-incoming/migrate, so this host can neither receive nor \
     send a migrating guest";

#[cfg(test)]
mod tests {
    use super::*;
    use cvm_host::qemu::QemuError;

    fn art(name: Option<&str>, url: Option<&str>) -> ArtifactRef {
        serde_json::from_value(serde_json::json!({"name": name, "url": url})).unwrap()
    }

    #[test]
    fn artifacts_resolve_by_name_or_url_and_never_leave_the_dir() {
        let d = Path::new("/a");
        assert_eq!(
            artifact_path(d, "firmware", &art(Some("ovmf-snp"), None)).unwrap(),
            Path::new("/a/ovmf-snp")
        );
        assert_eq!(
            artifact_path(
                d,
                "kernel",
                &art(None, Some("https://x/guest/vmlinuz-6.12"))
            )
            .unwrap(),
            Path::new("/a/vmlinuz-6.12")
        );
        for bad in ["https://x/..", "https://x/", "oci://x/."] {
            let e = artifact_path(d, "kernel", &art(None, Some(bad))).unwrap_err();
            assert!(e.contains("give the artifact a name"), "{bad}: {e}");
        }
        assert!(artifact_path(d, "firmware", &art(None, None)).is_err());
    }

    fn pinned(name: Option<&str>, url: Option<&str>, sha: &str) -> ArtifactRef {
        serde_json::from_value(serde_json::json!({"name": name, "url": url, "sha256": sha}))
            .unwrap()
    }

    #[tokio::test]
    async fn artifacts_are_checked_against_their_digests_wherever_they_come_from() {
        let d = tempfile::tempdir().unwrap();
        let (node_dir, pod) = (d.path().join("artifacts"), d.path().join("pod"));
        std::fs::create_dir_all(&node_dir).unwrap();
        std::fs::write(node_dir.join("vmlinuz"), b"kernel").unwrap();
        let good = hex::encode(Sha256::digest(b"kernel"));
        let bad = "0".repeat(64);
        let in_pod = Path::new("/var/run/cvm-launcher");
        let stage = |a: ArtifactRef, pod: Option<PathBuf>| {
            let node_dir = node_dir.clone();
            async move { stage_artifact(&node_dir, "kernel", &a, pod.as_deref(), in_pod).await }
        };
        let refused = |r: Result<PathBuf, PlatformError>| r.unwrap_err().to_string();

        // From the node's artifact directory, copied into the pod.
        let p = stage(pinned(Some("vmlinuz"), None, &good), Some(pod.clone()))
            .await
            .unwrap();
        assert_eq!(p, in_pod.join("artifacts/kernel"));
        assert_eq!(
            std::fs::read(pod.join("artifacts/kernel")).unwrap(),
            b"kernel"
        );
        let e = refused(stage(pinned(Some("vmlinuz"), None, &bad), Some(pod.clone())).await);
        assert!(e.contains(&good) && e.contains(&bad), "both digests: {e}");

        // From a container image: what the init container copied, checked in place.
        let url = "oci://guests/test:1#/disk/vmlinuz";
        let e = refused(stage(pinned(None, Some(url), &good), Some(pod.clone())).await);
        assert!(
            e.contains("did not copy it") && e.contains("/disk/vmlinuz of image guests/test:1"),
            "{e}"
        );
        std::fs::create_dir_all(pod.join("image-artifacts")).unwrap();
        std::fs::write(pod.join("image-artifacts/kernel"), b"kernel").unwrap();
        let p = stage(pinned(None, Some(url), &good), Some(pod.clone()))
            .await
            .unwrap();
        assert_eq!(p, in_pod.join("image-artifacts/kernel"));
        let e = refused(stage(pinned(None, Some(url), &bad), Some(pod.clone())).await);
        assert!(
            e.contains("/disk/vmlinuz of image guests/test:1")
                && e.contains(&good)
                && e.contains(&bad),
            "{e}"
        );
        // Without a launcher pod nothing copies it out.
        let e = refused(stage(pinned(None, Some(url), &good), None).await);
        assert!(e.contains("--launcher-pods-dir"), "{e}");
    }

    #[test]
    fn host_caps_override_wins_field_by_field() {
        let detected = HostCaps {
            cbitpos: Some(47),
            reduced_phys_bits: None,
        };
        let over = HostCaps {
            cbitpos: None,
            reduced_phys_bits: Some(1),
        };
        assert_eq!(
            merge_host_caps(detected, Some(over)),
            HostCaps {
                cbitpos: Some(47),
                reduced_phys_bits: Some(1)
            }
        );
        assert_eq!(merge_host_caps(detected, None), detected);
    }

    #[test]
    fn unknown_tee_object_gets_a_version_hint() {
        let e = QemuError::ExitedEarly {
            status: "exit code 1".into(),
            stderr: vec!["qemu-system-x86_64: -object sev-snp-guest,id=cgs0: Parameter 'qom-type' does not accept value 'sev-snp-guest'".into()],
        };
        let m = explain(&e, TeeType::SevSnp);
        assert!(m.contains("does not accept value 'sev-snp-guest'"), "{m}");
        assert!(m.contains("needs QEMU 9.1 or newer"), "{m}");
        // Other failures are passed through unchanged.
        assert_eq!(explain(&e, TeeType::Sev), e.to_string());
        let other = QemuError::ExitedEarly {
            status: "exit code 1".into(),
            stderr: vec!["sev-snp-guest: KVM is not available".into()],
        };
        assert_eq!(explain(&other, TeeType::SevSnp), other.to_string());
        let p = qemu_error(&e, TeeType::SevSnp);
        assert_eq!(p.reason(), "QemuExitedAtStart");
        assert!(
            p.to_string()
                .starts_with("launch failed: QEMU exited at start"),
            "{p}"
        );
    }

    #[test]
    fn uids_must_be_plain() {
        assert!(check_uid("0b5f6c1e-1d2a-4f1e-9b7a-1c2d3e4f5a6b").is_ok());
        for bad in ["", "../x", "a/b", "a b", &"a".repeat(65)] {
            assert!(check_uid(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn launch_measure_splits_measure_and_nonce() {
        let blob: Vec<u8> = (0u8..48).collect();
        let b64 = base64::engine::general_purpose::STANDARD.encode(&blob);
        let (m, all) = decode_launch_measure(&b64).unwrap();
        assert_eq!(m, blob[..32]);
        assert_eq!(all, blob);
        assert_eq!(
            decode_launch_measure("AAAA").unwrap_err().reason(),
            "EvidenceError"
        );
        assert!(decode_launch_measure("*").is_err());
    }

    #[test]
    fn capabilities_follow_detection() {
        let dir = tempfile::tempdir().unwrap();
        let put = |rel: &str, s: &str| {
            let p = dir.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, s).unwrap();
        };
        put(
            "proc/cpuinfo",
            "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: svm sev sev_es sev_snp\n",
        );
        for p in ["sev", "sev_es", "sev_snp"] {
            put(&format!("sys/module/kvm_amd/parameters/{p}"), "Y\n");
        }
        put("dev/sev", "");
        put("sys/fs/cgroup/misc.capacity", "sev 10\nsev_es 5\n");
        let caps = capabilities_from(&cvm_host::detect::report(dir.path()));
        assert_eq!(
            caps.tees,
            vec![TeeType::Sev, TeeType::SevEs, TeeType::SevSnp]
        );
        assert_eq!((caps.sev_asids, caps.es_asids, caps.tdx_keys), (10, 5, 0));
        assert!(!caps.simulated);
    }

    #[test]
    fn a_process_is_ours_only_if_it_names_our_socket() {
        let me = std::process::id();
        assert!(!process_alive(me, Path::new("/no/such/guest.sock")));
        // Our own command line names the test binary: a path it contains is "ours".
        let exe = std::env::args().next().unwrap();
        assert!(process_alive(me, Path::new(&exe)));
        assert!(!process_alive(u32::MAX, Path::new(&exe)));
    }
}
