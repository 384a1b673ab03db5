//! The QEMU backend: command lines per TEE, the QMP client ([`qmp`]) and the process
//! wrapper ([`process`]).
//!
//! Option names follow QEMU's QAPI schema (`qapi/qom.json`): `sev-guest` (policy,
//! cbitpos, reduced-phys-bits, kernel-hashes), `sev-snp-guest` (QEMU 9.1+: policy,
//! host-data, kernel-hashes, cbitpos, reduced-phys-bits), `tdx-guest` (QEMU 10.1+:
//! attributes, mrconfigid, quote-generation-socket, a `SocketAddress` given with dotted
//! keys). SNP and TDX guests take their firmware with `-bios` (private memory cannot be a
//! read-only flash) and their RAM from a `memory-backend-memfd`; SEV and SEV-ES keep the
//! classic pflash firmware. The guest always starts paused (`-S`) so the node plugin can
//! read the launch measurement over QMP before anything runs.

pub mod devices;
pub mod process;
pub mod qmp;

use std::path::{Path, PathBuf};

use base64::Engine as _;
use cvm_crds::{ConfidentialVM, TeeType};
use serde::{Deserialize, Serialize};

pub use devices::{plain_command_line, GuestDevices, PlainGuest, AGENT_PORT_NAME};
pub use process::{QemuProcess, StartOptions};
pub use qmp::{QmpClient, QmpError};

/// The id of the confidential-guest-support object on every command line.
pub const CGS_ID: &str = "cgs0";
/// The id of the memory backend for SNP and TDX.
pub const RAM_ID: &str = "ram0";
/// CPU model when the spec names none (AMD guests).
pub const DEFAULT_AMD_CPU: &str = "EPYC-v4";
/// TD attribute SEPT_VE_DISABLE (bit 28): Linux TD guests refuse to boot without it, and
/// QEMU sets it by default; we pass attributes explicitly, so we set it too.
pub const TDX_ATTR_SEPT_VE_DISABLE: u64 = 1 << 28;

/// What a host contributes to an AMD command line (CPUID 0x8000001F); `None` where unknown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostCaps {
    /// C-bit position (51 on EPYC Milan/Genoa, 47 on Rome).
    pub cbitpos: Option<u8>,
    /// Physical address bits lost to memory encryption (usually 1).
    pub reduced_phys_bits: Option<u8>,
}

/// Everything needed to build one guest's command line. Plain data: no Kubernetes types.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QemuGuestSpec {
    /// Guest name for `-name` (the CVM's namespace/name).
    pub name: String,
    pub tee: TeeType,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// QEMU `-cpu` model; `None` means `EPYC-v4` on AMD. TDX always uses `host`.
    pub cpu_model: Option<String>,
    /// OVMF (AMD) or TDVF (TDX) on the host's disk.
    pub firmware: PathBuf,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    /// SEV policy (32 bits), SNP guest policy, or TD attributes (DEBUG/MIGRATABLE as the
    /// CVM asks; [`TDX_ATTR_SEPT_VE_DISABLE`] is added).
    pub policy: u64,
    /// SNP HOST_DATA (32 bytes) or TDX MRCONFIGID (48 bytes).
    pub host_data: Option<Vec<u8>>,
    /// Have QEMU put the kernel/initrd/cmdline hashes into the measured firmware (AMD,
    /// direct boot only).
    pub kernel_hashes: bool,
    /// TDX Quote Generation Service socket on the host (`qgsd`).
    pub quote_generation_socket: Option<PathBuf>,
    /// Where QEMU listens for QMP.
    pub qmp_socket: PathBuf,
}

/// Where the node plugin keeps a CVM's artifacts and sockets on this host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactPaths {
    pub firmware: PathBuf,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub qmp_socket: PathBuf,
    pub quote_generation_socket: Option<PathBuf>,
}

/// Errors of the QEMU backend.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("invalid guest spec: {0}")]
    Spec(String),
    #[error("{what} is unknown for this host: {hint}")]
    MissingHostCap {
        what: &'static str,
        hint: &'static str,
    },
    #[error("path {0:?} is not valid UTF-8; QEMU options need text")]
    NonUtf8Path(PathBuf),
    #[error("cannot start {binary}: {source}")]
    Spawn {
        binary: String,
        source: std::io::Error,
    },
    #[error("QEMU exited at start ({status}){}", render_stderr(stderr))]
    ExitedEarly { status: String, stderr: Vec<String> },
    #[error("QEMU exited unexpectedly ({status}){}", render_stderr(stderr))]
    Exited { status: String, stderr: Vec<String> },
    #[error(
        "QEMU did not open its QMP socket {socket} within {seconds} s{}",
        render_stderr(stderr)
    )]
    StartTimeout {
        socket: String,
        seconds: u64,
        stderr: Vec<String>,
    },
    #[error("QMP: {0}")]
    Qmp(#[from] QmpError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl QemuError {
    /// Short CamelCase reason for a CVM condition.
    pub fn reason(&self) -> &'static str {
        match self {
            QemuError::Spec(_) | QemuError::NonUtf8Path(_) => "InvalidGuestSpec",
            QemuError::MissingHostCap { .. } => "HostCapabilityUnknown",
            QemuError::Spawn { .. } => "QemuNotStarted",
            QemuError::ExitedEarly { .. } => "QemuExitedAtStart",
            QemuError::Exited { .. } => "QemuExited",
            QemuError::StartTimeout { .. } => "QemuStartTimeout",
            QemuError::Qmp(_) => "QmpError",
            QemuError::Io(_) => "IoError",
        }
    }

    /// QEMU's own stderr lines, when the error carries them.
    pub fn stderr(&self) -> &[String] {
        match self {
            QemuError::ExitedEarly { stderr, .. }
            | QemuError::Exited { stderr, .. }
            | QemuError::StartTimeout { stderr, .. } => stderr,
            _ => &[],
        }
    }
}

fn render_stderr(lines: &[String]) -> String {
    if lines.is_empty() {
        String::new()
    } else {
        format!(": {}", lines.join(" | "))
    }
}

/// A path as UTF-8 text.
fn text(p: &Path) -> Result<&str, QemuError> {
    p.to_str()
        .ok_or_else(|| QemuError::NonUtf8Path(p.to_path_buf()))
}

/// Escapes a value inside a QEMU `key=value,…` option: a comma is written twice.
fn opt_value(s: &str) -> String {
    s.replace(',', ",,")
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

impl QemuGuestSpec {
    /// Builds the spec from a CVM, with the host paths the node plugin resolved for its
    /// artifacts.
    pub fn from_cvm(cvm: &ConfidentialVM, paths: &ArtifactPaths) -> Result<Self, QemuError> {
        let spec = &cvm.spec;
        let tee = spec.tee.tee_type;
        let policy = spec.tee.policy.clone().unwrap_or_default();
        let policy_word = match tee {
            TeeType::Sev => policy.sev_policy(false),
            TeeType::SevEs => policy.sev_policy(true),
            TeeType::SevSnp => policy.snp_guest_policy(),
            TeeType::Tdx => policy.tdx_attributes(),
        };
        let host_data = match &spec.tee.host_data {
            None => None,
            Some(h) => Some(
                hex::decode(h)
                    .map_err(|e| QemuError::Spec(format!("spec.tee.hostData is not hex: {e}")))?,
            ),
        };
        if spec.boot.kernel.is_some() != paths.kernel.is_some() {
            return Err(QemuError::Spec(
                "spec.boot.kernel and the resolved kernel path disagree: resolve every boot artifact the spec names".into(),
            ));
        }
        if spec.boot.initrd.is_some() != paths.initrd.is_some() {
            return Err(QemuError::Spec(
                "spec.boot.initrd and the resolved initrd path disagree: resolve every boot artifact the spec names".into(),
            ));
        }
        let name = format!(
            "{}/{}",
            cvm.metadata.namespace.as_deref().unwrap_or("default"),
            cvm.metadata.name.as_deref().unwrap_or("cvm")
        );
        Ok(QemuGuestSpec {
            name,
            tee,
            vcpus: spec.resources.vcpus,
            memory_mib: spec.resources.memory_mib,
            cpu_model: match tee {
                TeeType::Tdx => None,
                _ => Some(
                    cvm.effective_cpu_model()
                        .map_or_else(|| DEFAULT_AMD_CPU.to_string(), |m| m.as_str().to_string()),
                ),
            },
            firmware: paths.firmware.clone(),
            kernel: paths.kernel.clone(),
            initrd: paths.initrd.clone(),
            cmdline: spec.boot.cmdline.clone(),
            policy: policy_word,
            host_data,
            // AMD firmware measures direct-boot artifacts only through the hash table.
            kernel_hashes: tee.is_amd() && paths.kernel.is_some(),
            quote_generation_socket: match tee {
                TeeType::Tdx => paths.quote_generation_socket.clone(),
                _ => None,
            },
            qmp_socket: paths.qmp_socket.clone(),
        })
    }

    fn check(&self) -> Result<(), QemuError> {
        if self.vcpus == 0 {
            return Err(QemuError::Spec("vcpus must be at least 1".into()));
        }
        if self.memory_mib == 0 {
            return Err(QemuError::Spec("memory must be at least 1 MiB".into()));
        }
        if self.kernel_hashes && self.kernel.is_none() {
            return Err(QemuError::Spec(
                "kernel-hashes needs a kernel (direct boot): set kernel or turn kernel hashes off"
                    .into(),
            ));
        }
        if (self.initrd.is_some() || self.cmdline.is_some()) && self.kernel.is_none() {
            return Err(QemuError::Spec(
                "initrd and cmdline need a kernel (direct boot)".into(),
            ));
        }
        if self.kernel_hashes && self.tee == TeeType::Tdx {
            return Err(QemuError::Spec(
                "kernel-hashes is an AMD SEV option; TDX measures the kernel into RTMRs".into(),
            ));
        }
        match (self.tee, &self.host_data) {
            (TeeType::Sev | TeeType::SevEs, Some(_)) => Err(QemuError::Spec(
                "host data exists only on SEV-SNP (HOST_DATA) and TDX (MRCONFIGID)".into(),
            )),
            (TeeType::SevSnp, Some(h)) if h.len() != 32 => Err(QemuError::Spec(format!(
                "SEV-SNP HOST_DATA must be 32 bytes, got {}",
                h.len()
            ))),
            (TeeType::Tdx, Some(h)) if h.len() != 48 => Err(QemuError::Spec(format!(
                "TDX MRCONFIGID must be 48 bytes, got {}",
                h.len()
            ))),
            (TeeType::Sev | TeeType::SevEs, _) if self.policy > u64::from(u32::MAX) => {
                Err(QemuError::Spec(format!(
                    "SEV policy {:#x} does not fit QEMU's 32-bit policy property",
                    self.policy
                )))
            }
            _ => Ok(()),
        }
    }
}

/// The QEMU arguments (without the binary) for this guest on this host.
pub fn command_line(spec: &QemuGuestSpec, caps: &HostCaps) -> Result<Vec<String>, QemuError> {
    spec.check()?;
    let mut a: Vec<String> = Vec::new();
    let mut push = |k: &str, v: String| {
        a.push(k.to_string());
        a.push(v);
    };
    let private_memory = matches!(spec.tee, TeeType::SevSnp | TeeType::Tdx);

    push("-name", format!("guest={}", opt_value(&spec.name)));
    let mut machine = format!("q35,confidential-guest-support={CGS_ID}");
    if private_memory {
        machine.push_str(&format!(",memory-backend={RAM_ID}"));
    }
    if spec.tee == TeeType::Tdx {
        // TDX requires the split irqchip (QEMU picks it for `auto`; say it so the command
        // line is explicit and stable across QEMU versions).
        machine.push_str(",kernel-irqchip=split");
    }
    push("-machine", machine);
    push("-accel", "kvm".into());

    let amd_object = |kind: &str| -> Result<String, QemuError> {
        let cbitpos = caps.cbitpos.ok_or(QemuError::MissingHostCap {
            what: "the C-bit position (cbitpos)",
            hint: "run detection on the AMD host (CPUID 0x8000001F) or pass host caps with cbitpos",
        })?;
        let rpb = caps.reduced_phys_bits.ok_or(QemuError::MissingHostCap {
            what: "reduced-phys-bits",
            hint: "run detection on the AMD host (CPUID 0x8000001F) or pass host caps with reducedPhysBits",
        })?;
        Ok(format!(
            "{kind},id={CGS_ID},policy={:#x},cbitpos={cbitpos},reduced-phys-bits={rpb}",
            spec.policy
        ))
    };
    let object = match spec.tee {
        TeeType::Sev | TeeType::SevEs => {
            let mut o = amd_object("sev-guest")?;
            if spec.kernel_hashes {
                o.push_str(",kernel-hashes=on");
            }
            o
        }
        TeeType::SevSnp => {
            let mut o = amd_object("sev-snp-guest")?;
            if let Some(h) = &spec.host_data {
                o.push_str(&format!(",host-data={}", b64(h)));
            }
            if spec.kernel_hashes {
                o.push_str(",kernel-hashes=on");
            }
            o
        }
        TeeType::Tdx => {
            let mut o = format!(
                "tdx-guest,id={CGS_ID},attributes={:#x}",
                spec.policy | TDX_ATTR_SEPT_VE_DISABLE
            );
            if let Some(h) = &spec.host_data {
                o.push_str(&format!(",mrconfigid={}", b64(h)));
            }
            if let Some(q) = &spec.quote_generation_socket {
                o.push_str(&format!(
                    ",quote-generation-socket.type=unix,quote-generation-socket.path={}",
                    opt_value(text(q)?)
                ));
            }
            o
        }
    };
    push("-object", object);
    if private_memory {
        push(
            "-object",
            format!(
                "memory-backend-memfd,id={RAM_ID},size={}M,share=on",
                spec.memory_mib
            ),
        );
    }

    let cpu = match spec.tee {
        // QEMU refuses named CPU models for TDs.
        TeeType::Tdx => "host".to_string(),
        _ => spec
            .cpu_model
            .clone()
            .unwrap_or_else(|| DEFAULT_AMD_CPU.to_string()),
    };
    push("-cpu", cpu);
    push("-smp", spec.vcpus.to_string());
    push("-m", format!("{}M", spec.memory_mib));

    let fw = text(&spec.firmware)?;
    if private_memory {
        push("-bios", fw.to_string());
    } else {
        push(
            "-drive",
            format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={}",
                opt_value(fw)
            ),
        );
    }
    if let Some(k) = &spec.kernel {
        push("-kernel", text(k)?.to_string());
    }
    if let Some(i) = &spec.initrd {
        push("-initrd", text(i)?.to_string());
    }
    if let Some(c) = &spec.cmdline {
        push("-append", c.clone());
    }
    push(
        "-qmp",
        format!(
            "unix:{},server=on,wait=off",
            opt_value(text(&spec.qmp_socket)?)
        ),
    );
    a.push("-nographic".into());
    a.push("-nodefaults".into());
    a.push("-S".into());
    Ok(a)
}
