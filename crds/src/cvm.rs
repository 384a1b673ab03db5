//! `ConfidentialVM`: a user's request for a confidential VM, and what the platform and the
//! verifier found.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{
    EvidenceFormat, SnpTcbVersion, TdxTcbStatus, TeeType, TrustClaim, DNS_LABEL_PATTERN,
    DNS_SUBDOMAIN_PATTERN, DURATION_PATTERN, HEX_PATTERN,
};
use crate::conditions::{self, ConditionType};

/// Desired state of a confidential VM.
// clippy reads the repeated `type_ = "string"` of separate printcolumn(...) groups as
// duplicated attributes; they are not.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "cvmp.io",
    version = "v1alpha1",
    kind = "ConfidentialVM",
    plural = "confidentialvms",
    singular = "confidentialvm",
    shortname = "cvm",
    category = "cvmp",
    namespaced,
    status = "ConfidentialVMStatus",
    derive = "PartialEq",
    doc = "A virtual machine whose memory the host cannot read (AMD SEV, SEV-ES, SEV-SNP or Intel TDX), with the evidence that proves it.",
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Life-cycle phase"
    ),
    printcolumn(
        name = "Node",
        type_ = "string",
        json_path = ".status.nodeName",
        description = "Node the guest is placed on"
    ),
    printcolumn(
        name = "TEE",
        type_ = "string",
        json_path = ".spec.tee.type",
        description = "Trusted execution environment"
    ),
    printcolumn(
        name = "Verified",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Verified\")].status",
        description = "Whether the operator verified the guest's evidence"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    selectable = ".status.nodeName",
    selectable = ".spec.tee.type"
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.cpuModel) || self.tee.type != 'TDX'").field_path(".cpuModel").message("spec.cpuModel selects an AMD EPYC model and applies to SEV, SEV-ES and SEV-SNP only: remove it when spec.tee.type is TDX"))]
#[x_kube(validation = Rule::new("!has(self.attestation) || !has(self.attestation.expectedMeasurements) || self.attestation.expectedMeasurements.all(m, size(m) == ((self.tee.type == 'SEV' || self.tee.type == 'SEV-ES') ? 64 : 96))").field_path(".attestation.expectedMeasurements").message("spec.attestation.expectedMeasurements: every entry must be 96 hex characters (48 bytes) for SEV-SNP and TDX, or 64 hex characters (a SHA-256 launch digest) for SEV and SEV-ES"))]
pub struct ConfidentialVMSpec {
    /// The trusted execution environment and its launch-time settings. Immutable: delete and
    /// recreate the ConfidentialVM to change it.
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.tee is immutable: the TEE type, guest policy, minimum TCB and host data are fixed at launch; delete and recreate the ConfidentialVM to change them"))]
    pub tee: TeeSpec,

    /// vCPUs and memory of the guest. Immutable: they enter the launch measurement (SEV-SNP
    /// VMSAs per vCPU) and the node's capacity accounting.
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.resources is immutable: vCPUs and memory are part of the launch measurement and of the node's capacity; delete and recreate the ConfidentialVM to change them"))]
    pub resources: ResourcesSpec,

    /// QEMU CPU model of the guest (SEV family only). It changes the CPUID page and VMSA
    /// contents, hence the SEV-SNP launch digest. When unset, the node plugin uses `EPYC-v4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_model: Option<CpuModel>,

    /// Firmware and (optionally) direct-boot kernel, initrd and command line. The node
    /// plugin computes the expected launch measurement from exactly these inputs.
    pub boot: BootSpec,

    /// Disks attached to the guest, in boot order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub disks: Vec<Disk>,

    /// The guest's network: the ports its services listen on. They are its launcher pod's
    /// named ports, so that a Service selecting the CVM's labels reaches the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkSpec>,

    /// Node labels the chosen node must carry, in addition to the labels for the requested TEE.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub node_selector: BTreeMap<String, String>,

    /// Whether the guest should run: `Always` (restart it when it stops), `RerunOnFailure`
    /// (restart only after a failure), `Manual` (start once; the user stops and starts it),
    /// `Halted` (keep it stopped).
    #[serde(default)]
    pub run_strategy: RunStrategy,

    /// How the guest's evidence is appraised: which policy, which reference values, and an
    /// optional challenge that asks for fresh evidence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation: Option<AttestationSpec>,
}

/// TEE type and the settings the hardware enforces for the guest's whole life.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.hostData) || self.type == 'SEV-SNP' || self.type == 'TDX'").field_path(".hostData").message("spec.tee.hostData exists only on SEV-SNP (HOST_DATA) and TDX (MRCONFIGID): remove it for SEV and SEV-ES"))]
#[x_kube(validation = Rule::new("!has(self.hostData) || self.type != 'SEV-SNP' || size(self.hostData) == 64").field_path(".hostData").message("spec.tee.hostData must be 64 lowercase hex characters (32 bytes of SNP HOST_DATA) when spec.tee.type is SEV-SNP"))]
#[x_kube(validation = Rule::new("!has(self.hostData) || self.type != 'TDX' || size(self.hostData) == 96").field_path(".hostData").message("spec.tee.hostData must be 96 lowercase hex characters (48 bytes of TDX MRCONFIGID) when spec.tee.type is TDX"))]
#[x_kube(validation = Rule::new("self.type == 'SEV-SNP' || !has(self.minimumTcb) || !(has(self.minimumTcb.bootloader) || has(self.minimumTcb.tee) || has(self.minimumTcb.snp) || has(self.minimumTcb.microcode) || has(self.minimumTcb.fmc))").field_path(".minimumTcb").message("spec.tee.minimumTcb.bootloader/tee/snp/microcode/fmc are SEV-SNP TCB components: remove them or set spec.tee.type to SEV-SNP"))]
#[x_kube(validation = Rule::new("self.type == 'TDX' || !has(self.minimumTcb) || !has(self.minimumTcb.tdxTcbStatuses)").field_path(".minimumTcb.tdxTcbStatuses").message("spec.tee.minimumTcb.tdxTcbStatuses applies to TDX only: remove it or set spec.tee.type to TDX"))]
#[x_kube(validation = Rule::new("self.type == 'SEV-SNP' || !has(self.policy) || !has(self.policy.smt)").field_path(".policy.smt").message("spec.tee.policy.smt is an SEV-SNP guest policy bit: remove it for SEV, SEV-ES and TDX"))]
pub struct TeeSpec {
    /// Which TEE the guest runs under: `SEV`, `SEV-ES`, `SEV-SNP` or `TDX`.
    #[serde(rename = "type")]
    pub tee_type: TeeType,

    /// Guest policy the hardware enforces (SNP guest policy bits, SEV policy, TDX attributes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<GuestPolicy>,

    /// Oldest platform TCB the guest may run on: SEV-SNP components, or acceptable TDX TCB
    /// statuses. Nodes below it are not chosen and evidence below it fails verification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum_tcb: Option<MinimumTcb>,

    /// Data bound into the guest's evidence by the host at launch, as lowercase hex: 64
    /// characters of SNP HOST_DATA or 96 of TDX MRCONFIGID. Use it to bind init data (for
    /// example the SHA-256 of a configuration) to the instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 64, max = 96), regex(pattern = HEX_PATTERN))]
    pub host_data: Option<String>,
}

/// Security-relevant guest settings enforced by the hardware.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GuestPolicy {
    /// Allow the host to debug the guest (SNP DEBUG, SEV clears NODBG, TDX DEBUG attribute).
    /// A debuggable guest's memory is readable by the host: never enable it in production.
    #[serde(default)]
    pub debug: bool,

    /// Allow live migration (SNP MIGRATE_MA, SEV clears NOSEND, TDX MIGRATABLE attribute).
    /// Without it, migration requests for this guest are refused.
    #[serde(default)]
    pub migratable: bool,

    /// Allow the guest on hosts with simultaneous multithreading enabled (SNP SMT policy
    /// bit; SEV-SNP only). Defaults to true, as QEMU does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
}

/// SNP guest policy: SMT allowed (bit 16).
pub const SNP_POLICY_SMT: u64 = 1 << 16;
/// SNP guest policy: reserved bit 17, which must be one.
pub const SNP_POLICY_RESERVED_1: u64 = 1 << 17;
/// SNP guest policy: migration agent allowed (bit 18).
pub const SNP_POLICY_MIGRATE_MA: u64 = 1 << 18;
/// SNP guest policy: debugging allowed (bit 19).
pub const SNP_POLICY_DEBUG: u64 = 1 << 19;
/// TDX TD attribute: DEBUG (bit 0).
pub const TDX_ATTR_DEBUG: u64 = 1;
/// TDX TD attribute: MIGRATABLE (bit 29).
pub const TDX_ATTR_MIGRATABLE: u64 = 1 << 29;
/// SEV policy: debugging disallowed (NODBG, bit 0).
pub const SEV_POLICY_NODBG: u64 = 1;
/// SEV policy: key sharing disallowed (NOKS, bit 1).
pub const SEV_POLICY_NOKS: u64 = 1 << 1;
/// SEV policy: SEV-ES required (ES, bit 2).
pub const SEV_POLICY_ES: u64 = 1 << 2;
/// SEV policy: sending the guest elsewhere disallowed (NOSEND, bit 3).
pub const SEV_POLICY_NOSEND: u64 = 1 << 3;

impl GuestPolicy {
    /// Whether SMT is allowed, with the default (true) applied.
    pub fn smt_allowed(&self) -> bool {
        self.smt.unwrap_or(true)
    }

    /// SNP guest policy word (ABI major/minor 0): what the launcher passes to
    /// SNP_LAUNCH_START and what the report's POLICY field must equal.
    pub fn snp_guest_policy(&self) -> u64 {
        let mut bits = SNP_POLICY_RESERVED_1;
        if self.smt_allowed() {
            bits |= SNP_POLICY_SMT;
        }
        if self.migratable {
            bits |= SNP_POLICY_MIGRATE_MA;
        }
        if self.debug {
            bits |= SNP_POLICY_DEBUG;
        }
        bits
    }

    /// SEV / SEV-ES launch policy; `es` sets the ES bit. Key sharing is always refused.
    pub fn sev_policy(&self, es: bool) -> u64 {
        let mut bits = SEV_POLICY_NOKS;
        if !self.debug {
            bits |= SEV_POLICY_NODBG;
        }
        if !self.migratable {
            bits |= SEV_POLICY_NOSEND;
        }
        if es {
            bits |= SEV_POLICY_ES;
        }
        bits
    }

    /// The TD attribute bits this policy decides (DEBUG, MIGRATABLE). Other attributes
    /// (SEPT_VE_DISABLE, PKS, PERFMON) are the launcher's choice; mask with
    /// [`TDX_ATTR_DEBUG`]` | `[`TDX_ATTR_MIGRATABLE`] before comparing.
    pub fn tdx_attributes(&self) -> u64 {
        let mut bits = 0;
        if self.debug {
            bits |= TDX_ATTR_DEBUG;
        }
        if self.migratable {
            bits |= TDX_ATTR_MIGRATABLE;
        }
        bits
    }
}

/// Oldest acceptable platform TCB.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MinimumTcb {
    /// Minimum PSP bootloader SVN (SEV-SNP only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootloader: Option<u8>,
    /// Minimum PSP OS (TEE) SVN (SEV-SNP only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tee: Option<u8>,
    /// Minimum SNP firmware SVN (SEV-SNP only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snp: Option<u8>,
    /// Minimum CPU microcode SVN (SEV-SNP only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub microcode: Option<u8>,
    /// Minimum firmware mailbox controller SVN (SEV-SNP on Turin and later only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fmc: Option<u8>,
    /// TDX TCB statuses the guest accepts (TDX only). When unset, only `UpToDate` is accepted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(min = 1, max = 6))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub tdx_tcb_statuses: Vec<TdxTcbStatus>,
}

impl MinimumTcb {
    /// The SEV-SNP components as a TCB version.
    pub fn snp_tcb(&self) -> SnpTcbVersion {
        SnpTcbVersion {
            bootloader: self.bootloader,
            tee: self.tee,
            snp: self.snp,
            microcode: self.microcode,
            fmc: self.fmc,
        }
    }
}

/// Compute resources of the guest.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourcesSpec {
    /// Number of virtual CPUs, 1 to 512.
    #[schemars(range(min = 1, max = 512))]
    pub vcpus: u32,
    /// Guest memory in MiB, 256 (256 MiB) to 2097152 (2 TiB).
    #[serde(rename = "memoryMiB")]
    #[schemars(range(min = 256, max = 2097152))]
    pub memory_mib: u32,
}

/// Bounds of [`ResourcesSpec`], shared by the schema and [`crate::validate`].
pub const VCPUS_MIN: u32 = 1;
/// Upper bound of vCPUs.
pub const VCPUS_MAX: u32 = 512;
/// Lower bound of guest memory in MiB.
pub const MEMORY_MIB_MIN: u32 = 256;
/// Upper bound of guest memory in MiB (2 TiB).
pub const MEMORY_MIB_MAX: u32 = 2 * 1024 * 1024;

/// QEMU CPU models for AMD guests.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[schemars(transform = crate::common::drop_description)]
pub enum CpuModel {
    /// Generic EPYC (Naples feature set).
    #[serde(rename = "EPYC")]
    Epyc,
    /// EPYC version 4, QEMU's usual choice for SEV-SNP guests.
    #[serde(rename = "EPYC-v4")]
    EpycV4,
    /// EPYC Rome (Zen 2).
    #[serde(rename = "EPYC-Rome")]
    EpycRome,
    /// EPYC Milan (Zen 3).
    #[serde(rename = "EPYC-Milan")]
    EpycMilan,
    /// EPYC Milan version 2.
    #[serde(rename = "EPYC-Milan-v2")]
    EpycMilanV2,
    /// EPYC Genoa (Zen 4).
    #[serde(rename = "EPYC-Genoa")]
    EpycGenoa,
    /// EPYC Turin (Zen 5).
    #[serde(rename = "EPYC-Turin")]
    EpycTurin,
}

impl CpuModel {
    /// The name QEMU's `-cpu` and `sev-snp-measure --vcpu-type` use.
    pub fn as_str(self) -> &'static str {
        match self {
            CpuModel::Epyc => "EPYC",
            CpuModel::EpycV4 => "EPYC-v4",
            CpuModel::EpycRome => "EPYC-Rome",
            CpuModel::EpycMilan => "EPYC-Milan",
            CpuModel::EpycMilanV2 => "EPYC-Milan-v2",
            CpuModel::EpycGenoa => "EPYC-Genoa",
            CpuModel::EpycTurin => "EPYC-Turin",
        }
    }
}

impl fmt::Display for CpuModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the guest boots. Every input here is measured.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.cmdline) || has(self.kernel)").field_path(".cmdline").message("spec.boot.cmdline needs spec.boot.kernel: a command line is measured only with direct kernel boot"))]
#[x_kube(validation = Rule::new("!has(self.initrd) || has(self.kernel)").field_path(".initrd").message("spec.boot.initrd needs spec.boot.kernel: an initrd is measured only with direct kernel boot"))]
pub struct BootSpec {
    /// Guest firmware (OVMF built for SEV/SNP, or TDVF for TDX).
    pub firmware: ArtifactRef,
    /// Kernel for direct boot; its hash is measured by the firmware.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<ArtifactRef>,
    /// Initial ramdisk for direct boot; requires `kernel`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<ArtifactRef>,
    /// Kernel command line for direct boot; requires `kernel`. Measured byte for byte.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub cmdline: Option<String>,
}

/// A boot artifact or disk image: a name the node plugin provides, or a URL pinned by digest.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.name) != has(self.url)").message("set exactly one of name (an artifact the node plugin provides) or url"))]
#[x_kube(validation = Rule::new("!has(self.url) || has(self.sha256)").field_path(".sha256").message("sha256 is required with url: the content must be pinned so the measurement is the one you expect"))]
#[x_kube(validation = Rule::new("!has(self.url) || !self.url.startsWith('oci://') || self.url.matches('^oci://[^#]+#/[^#]*[^#/]$')").field_path(".url").message("an oci:// url names the image and the file in it: oci://IMAGE#/PATH, e.g. oci://example.com/guests/debian:13#/boot/vmlinuz"))]
pub struct ArtifactRef {
    /// Name of an artifact in the node plugin's catalog, e.g. `ovmf-snp` or `tdvf`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = "^[a-z0-9]([-a-z0-9._]*[a-z0-9])?$")
    )]
    pub name: Option<String>,
    /// Where the artifact comes from; requires `sha256`. `oci://IMAGE#/PATH` is the file
    /// PATH in the container image IMAGE (as KubeVirt's kernel boot and containerDisk
    /// images carry them): the launcher pod copies it out of the image before the guest
    /// starts, and the node plugin checks its digest. An `https://` URL names a file the
    /// node's artifact directory holds by its last path segment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = "^(https|oci)://[^\\s]+$"))]
    pub url: Option<String>,
    /// SHA-256 of the artifact's content as 64 lowercase hex characters. Required with `url`;
    /// with `name`, the node plugin refuses an artifact whose digest differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 64, max = 64), regex(pattern = HEX_PATTERN))]
    pub sha256: Option<String>,
}

impl ArtifactRef {
    /// `(IMAGE, PATH)` of an `oci://IMAGE#/PATH` url: the file PATH in container image
    /// IMAGE. `None` for other artifacts and for an oci url without a path (which the
    /// CRD refuses).
    pub fn image_file(&self) -> Option<(&str, &str)> {
        let rest = self.url.as_deref()?.strip_prefix("oci://")?;
        let (image, path) = rest.split_once('#')?;
        (!image.is_empty()
            && !path.contains('#')
            && path.starts_with('/')
            && path.len() > 1
            && !path.ends_with('/'))
        .then_some((image, path))
    }
}

/// A disk attached to the guest.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.image) != has(self.persistentVolumeClaim)").message("set exactly one of image or persistentVolumeClaim as the disk's source"))]
pub struct Disk {
    /// Name of the disk, unique within the guest (a DNS label).
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN))]
    pub name: String,
    /// Disk image to copy for the guest (not measured at launch; protect it with disk encryption).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ArtifactRef>,
    /// Name of a PersistentVolumeClaim in the ConfidentialVM's namespace to attach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub persistent_volume_claim: Option<String>,
    /// Attach the disk read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// The guest's network.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.ports.all(p, self.ports.exists_one(q, q.port == p.port && q.protocol == p.protocol))").message("spec.network.ports: each port may be forwarded once per protocol"))]
pub struct NetworkSpec {
    /// Ports of the guest forwarded from its launcher pod (at most 16, names unique).
    #[serde(default)]
    #[schemars(length(max = 16))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub ports: Vec<GuestPort>,
}

/// One port of the guest.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.port != 4041").message("spec.network.ports: port 4041 is the launcher pod's readiness port; forward another"))]
pub struct GuestPort {
    /// Name of the port, as a Service's `targetPort` names it (an IANA service name:
    /// lowercase letters, digits and '-', at most 15 characters, at least one letter).
    #[schemars(length(min = 1, max = 15), regex(pattern = PORT_NAME_PATTERN))]
    pub name: String,
    /// The port the guest listens on, 1 to 65535.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u32,
    /// `TCP` (the default) or `UDP`.
    #[serde(default)]
    pub protocol: PortProtocol,
}

/// A port's protocol.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[schemars(transform = crate::common::drop_description)]
pub enum PortProtocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

impl PortProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            PortProtocol::Tcp => "TCP",
            PortProtocol::Udp => "UDP",
        }
    }
}

/// An IANA service name, as Kubernetes checks a named port.
pub(crate) const PORT_NAME_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// When the guest should run.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[schemars(transform = crate::common::drop_description)]
pub enum RunStrategy {
    /// Keep the guest running; restart it whenever it stops.
    #[default]
    Always,
    /// Restart the guest only when it failed.
    RerunOnFailure,
    /// Start the guest once; the user stops and starts it.
    Manual,
    /// Keep the guest stopped (the object and its placement stay).
    Halted,
}

/// How the guest's evidence is appraised.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AttestationSpec {
    /// Name of the cluster-scoped AttestationPolicy to appraise against. When unset, the
    /// operator's default policy applies (vendor roots only, debug refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub policy_ref: Option<String>,

    /// Launch measurements this guest may report, as lowercase hex: 96 characters (48 bytes)
    /// for SEV-SNP MEASUREMENT and TDX MRTD, 64 for an SEV/SEV-ES launch digest. Evidence
    /// must match one of them (in addition to the policy's reference values).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 64, max = 96), regex(pattern = HEX_PATTERN)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub expected_measurements: Vec<String>,

    /// A challenge, as lowercase hex (1 to 64 bytes: 2 to 128 characters, even length).
    /// Setting or changing it asks the node plugin for fresh evidence bound to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 128), regex(pattern = "^([0-9a-f]{2})+$"))]
    pub nonce: Option<String>,

    /// How often to collect and verify fresh evidence, as a duration such as `10m` or `1h`
    /// (1m to 720h). When unset, evidence is verified at launch and on nonce changes only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    #[x_kube(validation = Rule::new("!self.matches('^([0-9]{1,5}(ms|s|m|h)){1,5}$') || (duration(self) >= duration('1m') && duration(self) <= duration('720h'))").message("spec.attestation.reattestEvery must be between 1m and 720h, e.g. 15m or 1h"))]
    pub reattest_every: Option<String>,
}

/// Observed state of a confidential VM. The operator writes `phase`, `nodeName`,
/// `observedGeneration`, `attestation` and the `Scheduled`, `Verified`, `Ready`,
/// `LiveMigratable`, `Reconciling` and `Stalled` conditions; the node plugin writes
/// `platform`, `evidence` and the `Launched` condition. Each writes with server-side apply under its own field manager.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConfidentialVMStatus {
    /// Life-cycle phase, a summary of the conditions (operator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<CvmPhase>,

    /// Node the guest is bound to (operator). Set once when scheduled; the node plugin of
    /// that node launches the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,

    /// The metadata.generation of the spec the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Standard conditions keyed by type: `Scheduled`, `Launched`, `Verified`, `Ready`,
    /// `LiveMigratable`, and kstatus's `Reconciling` (True while the operator works toward
    /// the verdict) and `Stalled` (True when it cannot progress until someone acts).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// Launch facts reported by the node plugin of the node the guest runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<PlatformFacts>,

    /// The latest evidence, reported by the node plugin. Untrusted until the operator has
    /// verified it: see `attestation`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<Evidence>,

    /// The operator's appraisal of `evidence`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation: Option<AttestationResult>,

    /// The guest instance the operator pinned for this CVM (operator): the first verified
    /// evidence pins it, later evidence must come from the same instance. A relaunch shows
    /// here as a new pin with `relaunches` counted up, and as an event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_instance: Option<GuestInstancePin>,

    /// Nodes that refused this CVM's launcher pod recently (operator): kube-scheduler
    /// kept it Unschedulable, kubelet rejected or evicted it, or the node was cordoned
    /// under it. The CVM is placed again without them for a while (10 minutes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub refused_nodes: Vec<RefusedNode>,
}

/// A node that refused a CVM's launcher pod.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RefusedNode {
    /// The node's name.
    #[schemars(length(max = 253))]
    pub node: String,
    /// kube-scheduler's or kubelet's reason (`Unschedulable`, `Evicted`, `OutOfmemory`,
    /// `ErrImageNeverPull`…), or `NodeCordoned`.
    #[schemars(length(max = 128))]
    pub reason: String,
    /// Their words.
    #[schemars(length(max = 1024))]
    pub message: String,
    /// When the operator moved the CVM off the node.
    pub at: Time,
}

/// The identity of the guest instance whose evidence counts for a CVM.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GuestInstancePin {
    /// SHA-256 of the instance key the guest agent made at boot (hex); its hash is bound
    /// into every report the instance produces.
    #[schemars(length(min = 64, max = 64), regex(pattern = HEX_PATTERN))]
    pub key_sha256: String,
    /// SEV-SNP REPORT_ID (hex): chosen by the firmware at launch, unique per guest, signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 64, max = 64), regex(pattern = HEX_PATTERN))]
    pub report_id: Option<String>,
    /// Node the instance ran on when it was pinned.
    #[schemars(length(max = 253))]
    pub node: String,
    /// When the operator pinned it.
    pub pinned_at: Time,
    /// `status.platform.launchedAt` the node plugin reported for this instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launched_at: Option<Time>,
    /// `status.platform.launchId` the node plugin reported for this instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub launch_id: Option<String>,
    /// How many times the CVM's pin moved to a new instance (relaunches; a live migration
    /// keeps the instance).
    #[serde(default)]
    pub relaunches: u32,
    /// The key_sha256 of the instance pinned before the last relaunch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 64, max = 64), regex(pattern = HEX_PATTERN))]
    pub previous_key_sha256: Option<String>,
    /// The live migration (UID) whose switch the pinned evidence answered, if any: after a
    /// later migration the same instance key must answer again, from the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub migration: Option<String>,
}

/// Life-cycle phase of a confidential VM.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[schemars(transform = crate::common::drop_description)]
pub enum CvmPhase {
    /// Accepted, waiting for a node that can host it.
    #[default]
    Pending,
    /// Bound to a node; the node plugin has not started it yet.
    Scheduled,
    /// The node plugin is launching the guest.
    Launching,
    /// The guest runs; its evidence is not verified yet (or verification failed).
    Running,
    /// The guest runs and its latest evidence passed verification.
    Verified,
    /// The guest is stopped as the run strategy asks.
    Stopped,
    /// Launching or verification failed for good; see the conditions.
    Failed,
    /// Deletion requested; waiting for the node plugin to stop the guest.
    Terminating,
}

impl CvmPhase {
    /// The spelling used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            CvmPhase::Pending => "Pending",
            CvmPhase::Scheduled => "Scheduled",
            CvmPhase::Launching => "Launching",
            CvmPhase::Running => "Running",
            CvmPhase::Verified => "Verified",
            CvmPhase::Stopped => "Stopped",
            CvmPhase::Failed => "Failed",
            CvmPhase::Terminating => "Terminating",
        }
    }
}

impl fmt::Display for CvmPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Launch facts the node plugin reports about the host and the guest. Shown, never used
/// by the verdict (docs/evidence-binding.md).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlatformFacts {
    /// State of the guest on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_state: Option<GuestState>,
    /// Whether the platform is simulated (evidence signed by a simulator root, not by
    /// hardware). The host's word: shown, never trusted; only a policy that names the
    /// simulator's root accepts simulated evidence.
    #[serde(default)]
    pub simulated: bool,
    /// Version of the TEE firmware (AMD SEV firmware or Intel TDX module), e.g. `1.55.21`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware_version: Option<String>,
    /// Current SEV-SNP TCB of the host (SEV-SNP only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snp_tcb: Option<SnpTcbVersion>,
    /// TDX TCB status of the host, as the host sees it (TDX only; the verifier decides).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tdx_tcb_status: Option<TdxTcbStatus>,
    /// Guest policy word or TD attributes the guest was launched with, as hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch_policy: Option<String>,
    /// Launch measurement the node plugin computed from spec.boot, spec.resources and
    /// spec.cpuModel (hex); the verifier compares the signed one against references.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub computed_measurement: Option<String>,
    /// When the guest was launched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launched_at: Option<Time>,
    /// An ID the node plugin chose for this launch: a new one marks a relaunch, even one
    /// within the second of the last (`launchedAt` has whole seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub launch_id: Option<String>,
    /// Human-readable detail of the last launch or stop, e.g. an error from the launcher.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// State of a guest as its node plugin sees it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[schemars(transform = crate::common::drop_description)]
pub enum GuestState {
    /// Being launched.
    Launching,
    /// Running.
    Running,
    /// Stopped (also after deletion: the finalizer waits for this).
    Stopped,
    /// The launch or the guest failed.
    Failed,
}

/// Evidence collected by the node plugin. Untrusted until verified.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Evidence {
    /// Encoding of `report`: `sev-snp-report`, `tdx-quote` or `sev-launch-measure`.
    pub format: EvidenceFormat,
    /// The raw attestation report, quote or launch measurement, base64-encoded (at most
    /// 48 KiB of text: an SNP report is 1.2 KiB, a TDX quote 5 to 8 KiB).
    #[schemars(length(max = 49152))]
    pub report: String,
    /// PEM certificates that sign the report (VCEK/VLEK, ASK, ARK or the PCK chain), as the
    /// host provided them; the verifier checks them against trusted roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32768))]
    pub cert_chain: Option<String>,
    /// Further verification collateral by name (e.g. `tcbInfo`, `qeIdentity`, `pckCrl`), each PEM or JSON text.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 8), inner(length(max = 131072)))]
    pub collateral: BTreeMap<String, String>,
    /// The challenge (spec.attestation.nonce) this evidence answers, as hex; the report data
    /// binds it (docs/evidence-binding.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub nonce: Option<String>,
    /// Public key of the guest instance that produced the report, base64: the guest agent
    /// makes it at boot and binds its SHA-256 into the report data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub instance_key: Option<String>,
    /// The live migration (UID, `cvmp.io/migration`) this evidence is bound to, if the CVM
    /// was moved; echoed for display, the report data binds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub epoch: Option<String>,
    /// When the node plugin collected the evidence.
    pub collected_at: Time,
    /// Launch measurement as the report states it (hex); informative, the verifier reads the signed report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub launch_measurement: Option<String>,
}

/// The operator's appraisal of evidence, shaped after an EAR (draft-ietf-rats-ear).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttestationResult {
    /// Overall EAR status: `affirming`, `warning`, `contraindicated` or `none`.
    pub status: EarStatus,
    /// AR4SI trustworthiness claims, each a value from -128 to 127 (0 none, 2 affirming,
    /// 32-95 warning, 96-127 contraindicated).
    #[serde(default)]
    pub trustworthiness_vector: TrustworthinessVector,
    /// Name of the AttestationPolicy the evidence was appraised against (empty for the default policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Every check that did not pass, by name, with expected and reported values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub findings: Vec<Finding>,
    /// When the verification ran.
    pub verified_at: Time,
    /// Identity and version of the verifier, e.g. `cvm-operator/0.1.0`.
    pub verifier: String,
    /// collectedAt of the evidence that was appraised, so stale results are recognisable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence_collected_at: Option<Time>,
    /// The nonce the appraised evidence was bound to, as hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    /// SHA-256 of the appraised report bytes (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence_sha256: Option<String>,
    /// The live migration (UID) the appraised evidence was bound to: set once the guest's
    /// evidence from a migration's target has been appraised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<String>,
    /// When the operator first saw the appraised report: the age `maxEvidenceAge` limits is
    /// counted from here, on the operator's clock (the node plugin's `collectedAt` is shown,
    /// never trusted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence_seen_at: Option<Time>,
}

/// EAR overall status tiers.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
#[schemars(transform = crate::common::drop_description)]
pub enum EarStatus {
    /// No claim was made.
    None,
    /// The evidence is trustworthy.
    Affirming,
    /// Trustworthy with reservations (see findings).
    Warning,
    /// The evidence must not be trusted (see findings).
    Contraindicated,
}

/// AR4SI trustworthiness vector: one value per claim that was appraised.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrustworthinessVector {
    /// Evidence is bound to this instance and fresh (nonce, host data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_identity: Option<i8>,
    /// Guest policy / TD attributes are acceptable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configuration: Option<i8>,
    /// Launch measurement / MRTD / RTMRs match reference values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executables: Option<i8>,
    /// Platform TCB and firmware are acceptable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_system: Option<i8>,
    /// Evidence is signed by genuine hardware chaining to a trusted root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware: Option<i8>,
    /// Memory is encrypted against the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_opaque: Option<i8>,
    /// Storage is encrypted against the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_opaque: Option<i8>,
    /// Inputs the guest relies on come from trusted sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sourced_data: Option<i8>,
}

/// One named check that did not pass.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Finding {
    /// Stable name of the check, e.g. `measurement-mismatch` or `signature-invalid`.
    pub check: String,
    /// AR4SI claim the check bears on, e.g. `executables` or `hardware`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<TrustClaim>,
    /// How the finding affects the verdict: `info`, `warning` or `contraindicated`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<FindingSeverity>,
    /// What the policy expected (hex, version or text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<String>,
    /// What the evidence reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported: Option<String>,
    /// Sentence for humans, e.g. "measurement mismatch: expected ab12…, reported cd34…".
    pub message: String,
}

/// Severity of a finding.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
#[schemars(transform = crate::common::drop_description)]
pub enum FindingSeverity {
    /// Does not change the verdict.
    Info,
    /// AR4SI warning tier: affirmed with reservations.
    Warning,
    /// AR4SI contraindicated tier: the evidence must not be trusted.
    Contraindicated,
}

impl ConfidentialVM {
    /// The requested TEE type.
    pub fn tee_type(&self) -> TeeType {
        self.spec.tee.tee_type
    }

    /// The node the guest is bound to, if scheduled.
    pub fn node_name(&self) -> Option<&str> {
        self.status.as_ref()?.node_name.as_deref()
    }

    /// The current phase (`Pending` when no status was written yet).
    pub fn phase(&self) -> CvmPhase {
        self.status
            .as_ref()
            .and_then(|s| s.phase)
            .unwrap_or_default()
    }

    /// The condition of the given type, if present.
    pub fn condition(&self, type_: ConditionType) -> Option<&Condition> {
        conditions::find(&self.status.as_ref()?.conditions, type_.as_str())
    }

    /// Whether the operator verified the latest evidence (`Verified=True`).
    pub fn is_verified(&self) -> bool {
        self.condition(ConditionType::Verified)
            .is_some_and(|c| c.status == conditions::STATUS_TRUE)
    }

    /// The AttestationPolicy name to appraise against, if any.
    pub fn policy_ref(&self) -> Option<&str> {
        self.spec.attestation.as_ref()?.policy_ref.as_deref()
    }

    /// The guest policy with defaults applied.
    pub fn guest_policy(&self) -> GuestPolicy {
        self.spec.tee.policy.clone().unwrap_or_default()
    }

    /// The CPU model the node plugin launches with (the documented default when unset).
    /// `None` for TDX, where the knob does not apply.
    pub fn effective_cpu_model(&self) -> Option<CpuModel> {
        self.tee_type()
            .is_amd()
            .then(|| self.spec.cpu_model.unwrap_or(CpuModel::EpycV4))
    }

    /// The live migration (UID) that last moved this CVM, as the operator recorded it
    /// (`cvmp.io/migration`): the epoch its evidence must bind (docs/evidence-binding.md).
    pub fn migration_epoch(&self) -> Option<&str> {
        self.metadata
            .annotations
            .as_ref()?
            .get(crate::wellknown::ANNOTATION_MIGRATION)
            .map(String::as_str)
    }

    /// The user's current challenge, if any.
    pub fn nonce(&self) -> Option<&str> {
        self.spec.attestation.as_ref()?.nonce.as_deref()
    }

    /// Whether the reported evidence answers the current challenge. Without a challenge any
    /// evidence answers.
    pub fn evidence_answers_nonce(&self) -> bool {
        let reported = self
            .status
            .as_ref()
            .and_then(|s| s.evidence.as_ref())
            .and_then(|e| e.nonce.as_deref());
        match self.nonce() {
            None => true,
            Some(want) => reported == Some(want),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snp_policy_defaults_match_qemu() {
        // QEMU's default SNP policy is 0x30000: SMT allowed plus reserved bit 17.
        assert_eq!(GuestPolicy::default().snp_guest_policy(), 0x30000);
        let p = GuestPolicy {
            debug: true,
            migratable: true,
            smt: Some(false),
        };
        assert_eq!(p.snp_guest_policy(), 0x20000 | (1 << 18) | (1 << 19));
    }

    #[test]
    fn sev_and_tdx_policy_bits() {
        let p = GuestPolicy::default();
        // NODBG | NOKS | NOSEND, plus ES for SEV-ES.
        assert_eq!(p.sev_policy(false), 0b1011);
        assert_eq!(p.sev_policy(true), 0b1111);
        assert_eq!(p.tdx_attributes(), 0);
        let d = GuestPolicy {
            debug: true,
            migratable: true,
            smt: None,
        };
        assert_eq!(d.tdx_attributes(), 1 | (1 << 29));
        assert_eq!(d.sev_policy(false), SEV_POLICY_NOKS);
    }

    #[test]
    fn phase_display() {
        assert_eq!(CvmPhase::Verified.to_string(), "Verified");
        assert_eq!(
            serde_json::to_string(&CvmPhase::Terminating).unwrap(),
            "\"Terminating\""
        );
    }
}
