//! What a simulated host runs in a CVM's launcher pod: a stand-in process (no VM), or a
//! real QEMU guest under TCG whose evidence is simulated ("everything real but the TEE").
//!
//! With QEMU the simulated firmware signs what the guest agent inside *this* guest binds
//! (`get-report-data`: the challenge and the agent's instance key), so a relaunched or
//! another guest shows up as another instance. The test-only mode without a TEE attaches
//! nothing: it reports the agent's own answer, which on a plain VM is that it found no TEE.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cvm_host::agent_proto::ErrorCode;
use cvm_host::qemu::{plain_command_line, GuestDevices, PlainGuest};

use crate::launcher::{AGENT_SOCKET, CONSOLE_SOCKET};
use crate::platform::{GuestRequest, PlatformError};

/// How the launcher pods of a simulated host run their guests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SimGuests {
    /// The launcher's stand-in process: no VM (the default).
    #[default]
    StandIn,
    /// A real QEMU guest, booted from the CVM's kernel and initrd.
    Qemu(QemuGuests),
}

/// The QEMU guests of a simulated host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuGuests {
    /// QEMU in the launcher image.
    pub binary: PathBuf,
    /// Where the plugin finds boot artifacts by name.
    pub artifacts_dir: PathBuf,
    /// The launcher pod's directory as QEMU sees it.
    pub dir_in_pod: PathBuf,
    /// Time for the guest to boot and its agent to answer.
    pub agent_timeout: Duration,
    /// Test only: a host that lies or is misconfigured: no simulated TEE evidence, only
    /// what the agent says.
    pub without_tee: bool,
}

impl QemuGuests {
    /// Defaults for a launcher image with Debian's QEMU.
    pub fn new(artifacts_dir: &Path) -> Self {
        QemuGuests {
            binary: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            artifacts_dir: artifacts_dir.to_path_buf(),
            dir_in_pod: PathBuf::from(cvm_crds::wellknown::LAUNCHER_DIR),
            agent_timeout: Duration::from_secs(90),
            without_tee: false,
        }
    }

    /// QEMU's command line for `req` in the launcher pod whose directory (on the host) is
    /// `pod`: the kernel and initrd checked against their digests and copied into it.
    pub async fn argv(&self, req: &GuestRequest, pod: &Path) -> Result<Vec<String>, PlatformError> {
        let stage = |what: &'static str, a| {
            crate::qemu::stage_artifact(&self.artifacts_dir, what, a, Some(pod), &self.dir_in_pod)
        };
        let kernel = match &req.kernel {
            Some(k) => stage("kernel", k).await?,
            None => {
                return Err(PlatformError::Launch(
                    "a test node boots its guest from a kernel: spec.boot.kernel is required"
                        .into(),
                ))
            }
        };
        let initrd = match &req.initrd {
            Some(i) => Some(stage("initrd", i).await?),
            None => None,
        };
        let guest = PlainGuest {
            name: format!("{}/{}", req.namespace, req.name),
            vcpus: req.vcpus,
            memory_mib: req.memory_mib,
            kernel,
            initrd,
            cmdline: req.cmdline.clone(),
        };
        let devices = GuestDevices {
            ports: req.ports.clone(),
            console_socket: Some(self.dir_in_pod.join(CONSOLE_SOCKET)),
            console_log: Some(PathBuf::from("/dev/stdout")),
            agent_socket: Some(self.dir_in_pod.join(AGENT_SOCKET)),
            vsock_cid: None,
            confidential: false,
        };
        let mut argv = vec![self.binary.display().to_string()];
        argv.extend(
            plain_command_line(&guest, &devices)
                .map_err(|e| PlatformError::Launch(format!("the guest's command line: {e}")))?,
        );
        Ok(argv)
    }
}

/// What the agent of a QEMU guest gave for one challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAnswer {
    /// The binding it computed and its instance key (for the simulated firmware to sign).
    ReportData {
        report_data: [u8; 64],
        instance_key: Vec<u8>,
    },
    /// The guest has no TEE: the agent's words.
    NoTee(String),
}

/// Asks the agent in the guest of launcher directory `pod` (on the host).
pub async fn ask_agent(
    q: &QemuGuests,
    pod: &Path,
    who: &str,
    challenge: &cvm_attest::binding::Challenge,
) -> Result<AgentAnswer, PlatformError> {
    let sock = pod.join(AGENT_SOCKET);
    if q.without_tee {
        // Only what the agent says: on a plain VM it finds no TEE.
        let r = crate::agent::over_serial(&sock, who, q.agent_timeout, |mut c| async move {
            match c.get_evidence(challenge).await {
                Err(cvm_host::agent_client::AgentClientError::Agent {
                    code: ErrorCode::ProviderMissing,
                    message,
                }) => Ok(Err(message)),
                other => other.map(Ok),
            }
        })
        .await?;
        return match r {
            Err(words) => Ok(AgentAnswer::NoTee(words)),
            Ok(ev) => Err(PlatformError::Evidence(format!(
                "the guest agent of {who} produced evidence from provider {} on a host that launched it without a TEE",
                ev.provider
            ))),
        };
    }
    let rd = crate::agent::over_serial(&sock, who, q.agent_timeout, |mut c| async move {
        c.get_report_data(challenge).await
    })
    .await?;
    Ok(AgentAnswer::ReportData {
        report_data: rd.report_data,
        instance_key: rd.instance_key,
    })
}
