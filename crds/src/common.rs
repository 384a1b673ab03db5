//! Types shared by `ConfidentialVM`, `AttestationPolicy` and the migration resource.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::fmt;

/// API group of every resource in this crate.
pub const GROUP: &str = "cvmp.io";
/// API version of every resource in this crate.
pub const VERSION: &str = "v1alpha1";

/// Schema pattern for lowercase hex. Lowercase only so that reference values compare
/// byte-for-byte as strings, in CEL and in the verifier alike.
pub(crate) const HEX_PATTERN: &str = "^[0-9a-f]*$";
/// Schema pattern for a Go-style duration (`90s`, `5m`, `1h30m`), as `kubectl` users write them.
///
/// At most five parts of at most five digits each: whatever matches fits in a Go
/// `time.Duration` (under 500000h), so the API server's CEL `duration()` never fails to
/// convert a value that passed the pattern. The CEL duration rules repeat this pattern as a
/// guard (the server evaluates CEL rules even on a value that failed its pattern, and would
/// otherwise add a "type conversion error" to the pattern's message).
pub const DURATION_PATTERN: &str = "^([0-9]{1,5}(ms|s|m|h)){1,5}$";
/// Schema pattern for a DNS-1123 subdomain (object names).
pub(crate) const DNS_SUBDOMAIN_PATTERN: &str =
    "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// Schema pattern for a DNS-1123 label (disk names, node names' parts).
pub(crate) const DNS_LABEL_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// Schema transform for enums: drops the type's own description so that the field's doc
/// comment stays the description (kube's Option<enum> rewrite would otherwise replace the
/// field's text with the enum's).
pub(crate) fn drop_description(schema: &mut schemars::Schema) {
    if let Some(obj) = schema.as_object_mut() {
        obj.remove("description");
    }
}

/// The confidential-computing technology a guest runs under.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[schemars(transform = crate::common::drop_description)]
pub enum TeeType {
    /// AMD Secure Encrypted Virtualization: memory encryption only, launch measurement via QMP.
    #[serde(rename = "SEV")]
    Sev,
    /// AMD SEV with Encrypted State: also encrypts vCPU register state.
    #[serde(rename = "SEV-ES")]
    SevEs,
    /// AMD SEV with Secure Nested Paging: integrity protection and signed attestation reports.
    #[serde(rename = "SEV-SNP")]
    SevSnp,
    /// Intel Trust Domain Extensions: trust domains with signed quotes.
    #[serde(rename = "TDX")]
    Tdx,
}

impl TeeType {
    /// The spelling used on the wire and in CEL rules.
    pub fn as_str(self) -> &'static str {
        match self {
            TeeType::Sev => "SEV",
            TeeType::SevEs => "SEV-ES",
            TeeType::SevSnp => "SEV-SNP",
            TeeType::Tdx => "TDX",
        }
    }

    /// SEV, SEV-ES and SEV-SNP all run on AMD EPYC hosts and share the CPU model knob.
    pub fn is_amd(self) -> bool {
        !matches!(self, TeeType::Tdx)
    }

    /// Hex characters of a launch measurement for this TEE: SNP MEASUREMENT and TDX
    /// MRTD are 48 bytes; the SEV/SEV-ES launch digest is a 32-byte SHA-256.
    pub fn measurement_hex_len(self) -> usize {
        match self {
            TeeType::Sev | TeeType::SevEs => 64,
            TeeType::SevSnp | TeeType::Tdx => 96,
        }
    }

    /// Hex characters of host data for this TEE (SNP HOST_DATA is 32 bytes, TDX
    /// MRCONFIGID 48); `None` where the TEE has no such field.
    pub fn host_data_hex_len(self) -> Option<usize> {
        match self {
            TeeType::SevSnp => Some(64),
            TeeType::Tdx => Some(96),
            TeeType::Sev | TeeType::SevEs => None,
        }
    }

    /// The evidence format a node plugin reports for this TEE.
    pub fn evidence_format(self) -> EvidenceFormat {
        match self {
            TeeType::Sev | TeeType::SevEs => EvidenceFormat::SevLaunchMeasure,
            TeeType::SevSnp => EvidenceFormat::SevSnpReport,
            TeeType::Tdx => EvidenceFormat::TdxQuote,
        }
    }
}

impl fmt::Display for TeeType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Encoding of the evidence a node plugin reports.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "kebab-case")]
#[schemars(transform = crate::common::drop_description)]
pub enum EvidenceFormat {
    /// An AMD SEV-SNP ATTESTATION_REPORT (v2, v3 or v5 layout), signed by a VCEK or VLEK.
    SevSnpReport,
    /// An Intel TDX quote (v4 or v5), signed by the quoting enclave with a PCK chain.
    TdxQuote,
    /// An SEV/SEV-ES LAUNCH_MEASURE result (HMAC-SHA-256 measurement and nonce), unsigned by hardware keys.
    SevLaunchMeasure,
    /// No evidence: the guest agent's own words that its guest has no TEE (no configfs-tsm
    /// provider, no SEV-SNP or TDX guest device). Never verifies.
    NoTee,
}

/// AMD SEV-SNP TCB version components (each an SVN, higher is newer).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnpTcbVersion {
    /// Security version number of the PSP bootloader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootloader: Option<u8>,
    /// Security version number of the PSP operating system (TEE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tee: Option<u8>,
    /// Security version number of the SNP firmware.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snp: Option<u8>,
    /// Lowest current patch level of all cores (CPU microcode SVN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub microcode: Option<u8>,
    /// Security version number of the firmware mailbox controller (Turin and later only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fmc: Option<u8>,
}

impl SnpTcbVersion {
    /// True when at least one component is set.
    pub fn is_set(&self) -> bool {
        self.bootloader.is_some()
            || self.tee.is_some()
            || self.snp.is_some()
            || self.microcode.is_some()
            || self.fmc.is_some()
    }

    /// Components of `reported` below this minimum, as `(name, minimum, reported)`.
    /// A component missing from `reported` counts as 0, so an unset FMC fails a set minimum.
    pub fn shortfalls(&self, reported: &SnpTcbVersion) -> Vec<(&'static str, u8, u8)> {
        let pairs = [
            ("bootloader", self.bootloader, reported.bootloader),
            ("tee", self.tee, reported.tee),
            ("snp", self.snp, reported.snp),
            ("microcode", self.microcode, reported.microcode),
            ("fmc", self.fmc, reported.fmc),
        ];
        pairs
            .into_iter()
            .filter_map(|(name, min, got)| {
                let min = min?;
                let got = got.unwrap_or(0);
                (got < min).then_some((name, min, got))
            })
            .collect()
    }
}

/// Intel TDX TCB status as reported by the TCB info collateral for a platform.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
#[schemars(transform = crate::common::drop_description)]
pub enum TdxTcbStatus {
    /// The platform is patched to the latest TCB level.
    UpToDate,
    /// Up to date, but software hardening (mitigations in the guest) is needed.
    SWHardeningNeeded,
    /// Up to date, but the platform configuration needs attention.
    ConfigurationNeeded,
    /// Configuration and software hardening are both needed.
    ConfigurationAndSWHardeningNeeded,
    /// A newer TCB level exists; the platform should be patched.
    OutOfDate,
    /// Out of date and the configuration needs attention.
    OutOfDateConfigurationNeeded,
}

/// The verifier's status of the same name. Spelled out, not a serde round trip, so a
/// status added to the API is a compile error here rather than silently dropped from a
/// TDX policy.
impl From<TdxTcbStatus> for cvm_attest::tdx::TdxTcbStatus {
    fn from(s: TdxTcbStatus) -> Self {
        use cvm_attest::tdx::TdxTcbStatus as A;
        match s {
            TdxTcbStatus::UpToDate => A::UpToDate,
            TdxTcbStatus::SWHardeningNeeded => A::SWHardeningNeeded,
            TdxTcbStatus::ConfigurationNeeded => A::ConfigurationNeeded,
            TdxTcbStatus::ConfigurationAndSWHardeningNeeded => A::ConfigurationAndSWHardeningNeeded,
            TdxTcbStatus::OutOfDate => A::OutOfDate,
            TdxTcbStatus::OutOfDateConfigurationNeeded => A::OutOfDateConfigurationNeeded,
        }
    }
}

/// AR4SI trustworthiness claims (draft-ietf-rats-ar4si) that a finding bears on.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "kebab-case")]
#[schemars(transform = crate::common::drop_description)]
pub enum TrustClaim {
    /// The evidence comes from genuine TEE hardware (chain to a trusted root).
    Hardware,
    /// The launch measurement, MRTD or RTMRs match reference values.
    Executables,
    /// Guest policy, TD attributes, debug, SMT and migration settings.
    Configuration,
    /// The evidence is fresh and bound to this instance (nonce, host data).
    InstanceIdentity,
    /// The platform TCB and firmware are recent enough.
    FileSystem,
    /// Memory encryption is in force.
    RuntimeOpaque,
    /// Storage is encrypted and bound to the instance.
    StorageOpaque,
    /// Data the attester relies on comes from trusted sources.
    SourcedData,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tee_type_wire_names_round_trip() {
        for (tee, s) in [
            (TeeType::Sev, "\"SEV\""),
            (TeeType::SevEs, "\"SEV-ES\""),
            (TeeType::SevSnp, "\"SEV-SNP\""),
            (TeeType::Tdx, "\"TDX\""),
        ] {
            assert_eq!(serde_json::to_string(&tee).unwrap(), s);
            assert_eq!(serde_json::from_str::<TeeType>(s).unwrap(), tee);
            assert_eq!(format!("\"{tee}\""), s);
        }
    }

    #[test]
    fn tdx_tcb_statuses_convert_to_the_verifiers_of_the_same_name() {
        use TdxTcbStatus::*;
        for s in [
            UpToDate,
            SWHardeningNeeded,
            ConfigurationNeeded,
            ConfigurationAndSWHardeningNeeded,
            OutOfDate,
            OutOfDateConfigurationNeeded,
        ] {
            let wire = serde_json::to_value(s).unwrap();
            assert_eq!(
                Some(cvm_attest::tdx::TdxTcbStatus::from(s).as_str()),
                wire.as_str(),
            );
        }
    }

    #[test]
    fn tcb_shortfalls_name_components() {
        let min = SnpTcbVersion {
            bootloader: Some(3),
            snp: Some(20),
            fmc: Some(1),
            ..Default::default()
        };
        let got = SnpTcbVersion {
            bootloader: Some(4),
            snp: Some(19),
            ..Default::default()
        };
        assert_eq!(min.shortfalls(&got), vec![("snp", 20, 19), ("fmc", 1, 0)]);
        assert!(min.is_set());
        assert!(!SnpTcbVersion::default().is_set());
    }
}
