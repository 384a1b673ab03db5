//! Names the operator, the node plugin, the CLI and the e2e suite share: labels, field
//! managers, the finalizer and extended resources (the evidence binding rule is
//! `cvm_attest::binding`).
//!
//! The custom resource is the only channel between the operator and the node plugins
//! (KubeVirt's "choreography"), so these names are the protocol.

use crate::TeeType;

/// Label the operator sets on a bound CVM so that a node plugin can watch just its own.
pub const LABEL_NODE: &str = "cvmp.io/node";
/// Label on Node objects of simulated hosts.
pub const LABEL_SIMULATED: &str = "cvmp.io/simulated";
/// Finalizer that keeps a CVM until the node plugin reports its guest stopped.
pub const FINALIZER: &str = "cvmp.io/guest-stopped";
/// Field manager of the operator (spec labels, `Scheduled`/`Verified`/`Ready`, attestation).
pub const MANAGER_OPERATOR: &str = "cvm-operator";
/// Field manager of a node plugin (`platform`, `evidence`, `Launched`).
pub const MANAGER_NODE_PLUGIN: &str = "cvm-node-plugin";
/// Annotation a user (or `kubectl cvm`) may set to ask for evidence again with no new nonce.
pub const ANNOTATION_REATTEST: &str = "cvmp.io/reattest";

/// Annotation the operator sets on a CVM when a live migration rebinds it to the target
/// node (RFC 3339 time of the switch), for display and for repairing a lost rebind; no
/// verdict compares it with evidence times (see [`ANNOTATION_MIGRATION`]).
pub const ANNOTATION_MIGRATED_AT: &str = "cvmp.io/migrated-at";

/// Annotation the operator sets with [`ANNOTATION_MIGRATED_AT`]: the UID of the live
/// migration that moved the CVM. Evidence after the switch must bind it (the binding's
/// epoch, docs/evidence-binding.md), which evidence from before the switch cannot.
pub const ANNOTATION_MIGRATION: &str = "cvmp.io/migration";

/// Extended resource counting SEV (legacy) ASIDs on a host.
pub const RESOURCE_SEV_ASIDS: &str = "sev.amd.com/asids";
/// Extended resource counting SEV-ES / SEV-SNP ASIDs (one shared pool on AMD hosts).
pub const RESOURCE_SNP_ESIDS: &str = "sev-snp.amd.com/esids";
/// Extended resource counting TDX private keys (HKIDs).
pub const RESOURCE_TDX_KEYS: &str = "tdx.intel.com/keys";
/// Extended resource counting `/dev/kvm` shares (KubeVirt's `devices.kubevirt.io/kvm`):
/// one per launcher pod.
pub const RESOURCE_KVM: &str = "devices.cvmp.io/kvm";

/// The `app.kubernetes.io/component` of launcher pods: the operator labels them, the
/// node plugin watches its node's by it.
pub const LAUNCHER_COMPONENT: &str = "cvm-launcher";
/// The emptyDir of a launcher pod holding its command socket: the operator mounts it,
/// the node plugin finds it under kubelet's pod-volume directory by this name.
pub const LAUNCHER_SOCKET_VOLUME: &str = "launcher";
/// Where that emptyDir is mounted in the launcher pod: the guest's QMP socket and boot
/// artifacts live there too, at paths QEMU (in the pod) and the plugin (on the host)
/// both reach.
pub const LAUNCHER_DIR: &str = "/var/run/cvm-launcher";

/// The directory in the launcher's emptyDir where the pod's init containers put the boot
/// artifacts they copy out of container images (`oci://IMAGE#/PATH`), one file per
/// artifact named by what it is (`firmware`, `kernel`, `initrd`); the node plugin checks
/// their digests there.
pub const LAUNCHER_IMAGE_ARTIFACTS: &str = "image-artifacts";

/// The `Launched=False` reason a node plugin gives when a guest stopped because its
/// launcher pod went away (deleted, evicted, drained): the operator does not replace the
/// pod of a `runStrategy: Manual` CVM that stopped so.
pub const REASON_LAUNCHER_GONE: &str = "LauncherPodGone";

/// Node Feature Discovery label that marks a TEE enabled on a host.
pub fn nfd_label(tee: TeeType) -> &'static str {
    match tee {
        TeeType::Sev => "feature.node.kubernetes.io/cpu-security.sev.enabled",
        TeeType::SevEs => "feature.node.kubernetes.io/cpu-security.sev.es.enabled",
        TeeType::SevSnp => "feature.node.kubernetes.io/cpu-security.sev.snp.enabled",
        TeeType::Tdx => "feature.node.kubernetes.io/cpu-security.tdx.enabled",
    }
}

/// The extended resource one guest of this TEE consumes (one ASID or key per guest).
pub fn tee_resource(tee: TeeType) -> &'static str {
    match tee {
        TeeType::Sev => RESOURCE_SEV_ASIDS,
        TeeType::SevEs | TeeType::SevSnp => RESOURCE_SNP_ESIDS,
        TeeType::Tdx => RESOURCE_TDX_KEYS,
    }
}

/// What to call the slot in messages ("no free ASID", "no free TDX key").
pub fn slot_name(tee: TeeType) -> &'static str {
    match tee {
        TeeType::Tdx => "TDX key",
        _ => "ASID",
    }
}

/// Lowercase or uppercase hex to bytes; `None` for odd length or a non-hex digit.
pub fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
        .collect()
}

/// The launcher's readiness endpoint in its pod (HTTP, 200 while the guest runs): a guest
/// port may not take it.
pub const LAUNCHER_HEALTH_PORT: u16 = 4041;

/// The launcher pod's name: deterministic, so a CVM never has two (a create of an
/// existing name fails instead).
pub fn launcher_pod_name(cvm_name: &str) -> String {
    const SUFFIX: &str = "-launcher";
    // Pod names are DNS subdomains (253); CVM names fit with room for the suffix, but
    // keep the result valid whatever the input.
    let keep = 253 - SUFFIX.len();
    let base: String = cvm_name.chars().take(keep).collect();
    format!("{}{SUFFIX}", base.trim_end_matches(['-', '.']))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snp_and_es_share_one_pool_sev_and_tdx_do_not() {
        assert_eq!(tee_resource(TeeType::SevSnp), tee_resource(TeeType::SevEs));
        assert_ne!(tee_resource(TeeType::Sev), tee_resource(TeeType::SevSnp));
        assert_eq!(tee_resource(TeeType::Tdx), RESOURCE_TDX_KEYS);
    }

    #[test]
    fn hex_decoding() {
        assert_eq!(decode_hex("00ff"), Some(vec![0, 255]));
        assert_eq!(decode_hex(""), Some(vec![]));
        assert_eq!(decode_hex("0g"), None);
        assert_eq!(decode_hex("abc"), None);
    }
}
