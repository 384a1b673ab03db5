//! `HostPin`: the hardware identity of one node, so that evidence counts only from the chip
//! the CVM is bound to (docs/evidence-binding.md).
//!
//! One object per node, named after the node. The operator creates it from the first
//! verified evidence on that node ("first use"); an administrator may create it beforehand
//! from their inventory, which then takes precedence (the operator never writes an existing
//! pin). The spec is immutable: re-pinning after a real hardware change is an administrator
//! deleting the object. Node plugins may not write it (chart RBAC).

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::HEX_PATTERN;

/// Hardware identity of one node, pinned by the operator on first verified evidence or by
/// an administrator (cluster-scoped, named after the node).
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "cvmp.io",
    version = "v1alpha1",
    kind = "HostPin",
    plural = "hostpins",
    singular = "hostpin",
    shortname = "hpin",
    category = "cvmp",
    derive = "PartialEq",
    doc = "The hardware identity (SEV-SNP chip ID, TDX platform ID) pinned for the node of the same name (cluster-scoped). Evidence from a CVM bound to this node counts only when it comes from this hardware; delete the object to re-pin after a real hardware change.",
    printcolumn(
        name = "Kind",
        type_ = "string",
        json_path = ".spec.kind",
        description = "Kind of hardware identity"
    ),
    printcolumn(
        name = "Source",
        type_ = "string",
        json_path = ".spec.source",
        description = "Who pinned it"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("spec is immutable: delete the HostPin to re-pin the node after a real hardware change"))]
#[serde(rename_all = "camelCase")]
pub struct HostPinSpec {
    /// What `id` is: `SnpChipId` (CHIP_ID of the VCEK and the report, 64 bytes) or
    /// `TdxPlatformId` (platform instance ID, else PPID, from the PCK certificate).
    pub kind: HardwareIdKind,
    /// The identity as lowercase hex.
    #[schemars(length(min = 2, max = 128), regex(pattern = HEX_PATTERN))]
    pub id: String,
    /// `Admin` (from an inventory, created before use) or `FirstUse` (created by the
    /// operator from the first verified evidence).
    #[serde(default)]
    pub source: PinSource,
    /// The CVM (`namespace/name`) whose evidence pinned the node on first use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 317))]
    pub first_seen_from: Option<String>,
}

/// Kinds of hardware identity.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
#[schemars(transform = crate::common::drop_description)]
pub enum HardwareIdKind {
    /// SEV-SNP CHIP_ID, certified by the VCEK's hardware-ID extension.
    SnpChipId,
    /// TDX platform identity from Intel's PCK certificate (platform instance ID or PPID).
    TdxPlatformId,
}

impl HardwareIdKind {
    /// Display name.
    pub fn as_str(self) -> &'static str {
        match self {
            HardwareIdKind::SnpChipId => "SnpChipId",
            HardwareIdKind::TdxPlatformId => "TdxPlatformId",
        }
    }
}

/// Who created a pin.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, schemars::JsonSchema,
)]
#[schemars(transform = crate::common::drop_description)]
pub enum PinSource {
    /// An administrator, from an inventory (takes precedence over first use).
    #[default]
    Admin,
    /// The operator, from the first verified evidence on the node.
    FirstUse,
}

impl PinSource {
    /// Display name (as serialised).
    pub fn as_str(self) -> &'static str {
        match self {
            PinSource::Admin => "Admin",
            PinSource::FirstUse => "FirstUse",
        }
    }
}
