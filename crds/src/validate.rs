//! Client-side validation: the same rules as the CRD's schema and CEL, plus those CEL cannot
//! state cheaply (duplicates, duration arithmetic). The operator runs it so that a malformed
//! object becomes a status message instead of a crash, and tests run it on the examples.
//!
//! Messages name the field with its full path and say what to change.

use std::collections::BTreeSet;

use crate::common::TeeType;
use crate::cvm::{
    ArtifactRef, ConfidentialVMSpec, MEMORY_MIB_MAX, MEMORY_MIB_MIN, VCPUS_MAX, VCPUS_MIN,
};
use crate::migration::ConfidentialVMMigrationSpec;
use crate::policy::{AttestationPolicySpec, BUILTIN_ROOTS};
use crate::{AttestationPolicy, ConfidentialVM, ConfidentialVMMigration};

/// One rule a manifest breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// A number outside its bounds.
    #[error("{field} is {value}: it must be between {min} and {max}")]
    OutOfRange {
        /// Full path of the field.
        field: String,
        /// The value given.
        value: u64,
        /// Smallest value allowed.
        min: u64,
        /// Largest value allowed.
        max: u64,
    },
    /// A string that must be lowercase hex is not.
    #[error("{field} must be lowercase hex (0-9, a-f); {value:?} is not")]
    NotHex {
        /// Full path of the field.
        field: String,
        /// The value given.
        value: String,
    },
    /// A hex string of the wrong length.
    #[error("{field} must be {expected} hex characters ({what}); it has {actual}")]
    HexLength {
        /// Full path of the field.
        field: String,
        /// Allowed length(s), e.g. `96` or `2 to 128 (even)`.
        expected: String,
        /// What the value is, e.g. `48 bytes of TDX MRCONFIGID`.
        what: String,
        /// The length given.
        actual: usize,
    },
    /// A field that the chosen TEE does not have.
    #[error("{field} applies to {applies_to} only, not {tee}: remove it or change spec.tee.type")]
    WrongTee {
        /// Full path of the field.
        field: String,
        /// The TEE types the field applies to.
        applies_to: &'static str,
        /// The TEE type requested.
        tee: TeeType,
    },
    /// A field set without the field it depends on.
    #[error("{field} needs {needs}: {why}")]
    Requires {
        /// Full path of the field.
        field: String,
        /// The field it depends on.
        needs: String,
        /// Why.
        why: &'static str,
    },
    /// Two alternatives both or neither set.
    #[error("{field}: set exactly one of {first} or {second}")]
    ExactlyOne {
        /// Full path of the object.
        field: String,
        /// First alternative.
        first: &'static str,
        /// Second alternative.
        second: &'static str,
    },
    /// A list entry given twice.
    #[error("{field} lists {value:?} more than once: remove the duplicate")]
    Duplicate {
        /// Full path of the list.
        field: String,
        /// The repeated entry.
        value: String,
    },
    /// A malformed value with a specific reason.
    #[error("{field} = {value:?} is invalid: {reason}")]
    Invalid {
        /// Full path of the field.
        field: String,
        /// The value given.
        value: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// A field changed that is fixed after creation.
    #[error("{field} is immutable: {why}; delete and recreate the object to change it")]
    Immutable {
        /// Full path of the field.
        field: String,
        /// Why it cannot change.
        why: &'static str,
    },
}

/// Objects that can check themselves without a cluster.
pub trait Validate {
    /// Every rule the object breaks, or `Ok` when none.
    fn validate(&self) -> Result<(), Vec<ValidationError>>;
}

/// Collects errors while walking an object.
#[derive(Default)]
struct Errors(Vec<ValidationError>);

impl Errors {
    fn push(&mut self, e: ValidationError) {
        self.0.push(e);
    }

    fn finish(self) -> Result<(), Vec<ValidationError>> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.0)
        }
    }

    fn range(&mut self, field: &str, value: u64, min: u64, max: u64) {
        if value < min || value > max {
            self.push(ValidationError::OutOfRange {
                field: field.into(),
                value,
                min,
                max,
            });
        }
    }

    /// Checks lowercase hex of one of the `lengths`; returns whether it passed.
    fn hex(&mut self, field: &str, value: &str, lengths: &[usize], what: &str) -> bool {
        if !is_lower_hex(value) {
            self.push(ValidationError::NotHex {
                field: field.into(),
                value: value.into(),
            });
            return false;
        }
        if !lengths.contains(&value.len()) {
            let expected = lengths
                .iter()
                .map(|l| l.to_string())
                .collect::<Vec<_>>()
                .join(" or ");
            self.push(ValidationError::HexLength {
                field: field.into(),
                expected,
                what: what.into(),
                actual: value.len(),
            });
            return false;
        }
        true
    }

    fn name(&mut self, field: &str, value: &str, max: usize, label_only: bool) {
        let ok = value.len() <= max
            && if label_only {
                is_dns_label(value)
            } else {
                value.split('.').all(is_dns_label)
            };
        if !ok {
            let kind = if label_only {
                "a DNS label"
            } else {
                "a DNS subdomain"
            };
            self.push(ValidationError::Invalid {
                field: field.into(),
                value: value.into(),
                reason: format!(
                    "use {kind}: lowercase letters, digits and '-', starting and ending with a letter or digit, at most {max} characters"
                ),
            });
        }
    }

    fn duration(&mut self, field: &str, value: &str, min_ms: u64, max_ms: u64, range: &str) {
        match parse_duration_ms(value) {
            None => self.push(ValidationError::Invalid {
                field: field.into(),
                value: value.into(),
                reason: "write a duration such as 90s, 10m or 1h30m (units ms, s, m, h)".into(),
            }),
            Some(ms) if ms < min_ms || ms > max_ms => self.push(ValidationError::Invalid {
                field: field.into(),
                value: value.into(),
                reason: format!("it must be between {range}"),
            }),
            Some(_) => {}
        }
    }

    fn no_duplicates<'a>(&mut self, field: &str, values: impl IntoIterator<Item = &'a str>) {
        let mut seen = BTreeSet::new();
        for v in values {
            if !seen.insert(v) {
                self.push(ValidationError::Duplicate {
                    field: field.into(),
                    value: v.into(),
                });
            }
        }
    }

    fn artifact(&mut self, field: &str, a: &ArtifactRef) {
        if a.name.is_some() == a.url.is_some() {
            self.push(ValidationError::ExactlyOne {
                field: field.into(),
                first: "name",
                second: "url",
            });
        }
        if let Some(name) = &a.name {
            let ok = !name.is_empty()
                && name.len() <= 253
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
                && name.starts_with(|c: char| c.is_ascii_alphanumeric())
                && name.ends_with(|c: char| c.is_ascii_alphanumeric());
            if !ok {
                self.push(ValidationError::Invalid {
                    field: format!("{field}.name"),
                    value: name.clone(),
                    reason: "use lowercase letters, digits, '-', '.' and '_', starting and ending with a letter or digit".into(),
                });
            }
        }
        if let Some(url) = &a.url {
            let scheme_ok = url.starts_with("https://") || url.starts_with("oci://");
            if !scheme_ok || url.len() > 2048 || url.chars().any(char::is_whitespace) {
                self.push(ValidationError::Invalid {
                    field: format!("{field}.url"),
                    value: url.clone(),
                    reason: "use an https:// or oci:// URL without spaces, at most 2048 characters"
                        .into(),
                });
            }
            if url.starts_with("oci://") && a.image_file().is_none() {
                self.push(ValidationError::Invalid {
                    field: format!("{field}.url"),
                    value: url.clone(),
                    reason: "an oci:// url names the image and the file in it: oci://IMAGE#/PATH, e.g. oci://example.com/guests/debian:13#/boot/vmlinuz".into(),
                });
            }
            if a.sha256.is_none() {
                self.push(ValidationError::Requires {
                    field: format!("{field}.url"),
                    needs: format!("{field}.sha256"),
                    why: "the content must be pinned so the measurement is the one you expect",
                });
            }
        }
        if let Some(d) = &a.sha256 {
            self.hex(&format!("{field}.sha256"), d, &[64], "a SHA-256 digest");
        }
    }
}

/// Whether `s` is non-empty lowercase hex.
pub fn is_lower_hex(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Parses a Go-style duration made of `ms`, `s`, `m` and `h` parts (e.g. `1h30m`) into
/// milliseconds. `None` when malformed: the same strings as the schema's
/// [`DURATION_PATTERN`](crate::common::DURATION_PATTERN) refuses (at most five parts of at
/// most five digits).
pub fn parse_duration_ms(s: &str) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let mut total: u64 = 0;
    let mut rest = s;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        parts += 1;
        if digits == 0 || digits > 5 || parts > 5 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit_ms, len) = if rest.starts_with("ms") {
            (1, 2)
        } else if rest.starts_with('s') {
            (1_000, 1)
        } else if rest.starts_with('m') {
            (60_000, 1)
        } else if rest.starts_with('h') {
            (3_600_000, 1)
        } else {
            return None;
        };
        rest = &rest[len..];
        total = total.checked_add(n.checked_mul(unit_ms)?)?;
    }
    Some(total)
}

const MINUTE_MS: u64 = 60_000;
const HOUR_MS: u64 = 60 * MINUTE_MS;

impl Validate for ConfidentialVMSpec {
    fn validate(&self) -> Result<(), Vec<ValidationError>> {
        let mut e = Errors::default();
        let tee = self.tee.tee_type;

        // spec.tee
        if let Some(hd) = &self.tee.host_data {
            match tee.host_data_hex_len() {
                None => e.push(ValidationError::WrongTee {
                    field: "spec.tee.hostData".into(),
                    applies_to: "SEV-SNP and TDX",
                    tee,
                }),
                Some(len) => {
                    let what = if tee == TeeType::Tdx {
                        "48 bytes of TDX MRCONFIGID"
                    } else {
                        "32 bytes of SNP HOST_DATA"
                    };
                    e.hex("spec.tee.hostData", hd, &[len], what);
                }
            }
        }
        if let Some(min) = &self.tee.minimum_tcb {
            if tee != TeeType::SevSnp && min.snp_tcb().is_set() {
                e.push(ValidationError::WrongTee {
                    field: "spec.tee.minimumTcb.bootloader/tee/snp/microcode/fmc".into(),
                    applies_to: "SEV-SNP",
                    tee,
                });
            }
            if tee != TeeType::Tdx && !min.tdx_tcb_statuses.is_empty() {
                e.push(ValidationError::WrongTee {
                    field: "spec.tee.minimumTcb.tdxTcbStatuses".into(),
                    applies_to: "TDX",
                    tee,
                });
            }
            let mut seen = BTreeSet::new();
            for s in &min.tdx_tcb_statuses {
                if !seen.insert(*s) {
                    e.push(ValidationError::Duplicate {
                        field: "spec.tee.minimumTcb.tdxTcbStatuses".into(),
                        value: format!("{s:?}"),
                    });
                }
            }
        }
        if let Some(p) = &self.tee.policy {
            if p.smt.is_some() && tee != TeeType::SevSnp {
                e.push(ValidationError::WrongTee {
                    field: "spec.tee.policy.smt".into(),
                    applies_to: "SEV-SNP",
                    tee,
                });
            }
        }

        // spec.resources
        e.range(
            "spec.resources.vcpus",
            self.resources.vcpus.into(),
            VCPUS_MIN.into(),
            VCPUS_MAX.into(),
        );
        e.range(
            "spec.resources.memoryMiB",
            self.resources.memory_mib.into(),
            MEMORY_MIB_MIN.into(),
            MEMORY_MIB_MAX.into(),
        );

        // spec.cpuModel
        if self.cpu_model.is_some() && !tee.is_amd() {
            e.push(ValidationError::WrongTee {
                field: "spec.cpuModel".into(),
                applies_to: "SEV, SEV-ES and SEV-SNP",
                tee,
            });
        }

        // spec.boot
        let b = &self.boot;
        e.artifact("spec.boot.firmware", &b.firmware);
        if let Some(k) = &b.kernel {
            e.artifact("spec.boot.kernel", k);
        }
        if let Some(i) = &b.initrd {
            e.artifact("spec.boot.initrd", i);
        }
        for (set, field) in [
            (b.cmdline.is_some(), "spec.boot.cmdline"),
            (b.initrd.is_some(), "spec.boot.initrd"),
        ] {
            if set && b.kernel.is_none() {
                e.push(ValidationError::Requires {
                    field: field.into(),
                    needs: "spec.boot.kernel".into(),
                    why: "it is measured only with direct kernel boot",
                });
            }
        }
        if let Some(c) = &b.cmdline {
            if c.len() > 4096 {
                e.range("spec.boot.cmdline length", c.len() as u64, 0, 4096);
            }
        }

        // spec.disks
        if self.disks.len() > 16 {
            e.range("spec.disks length", self.disks.len() as u64, 0, 16);
        }
        e.no_duplicates(
            "spec.disks[].name",
            self.disks.iter().map(|d| d.name.as_str()),
        );
        for d in &self.disks {
            let field = format!("spec.disks[{}]", d.name);
            e.name(&format!("{field}.name"), &d.name, 63, true);
            if d.image.is_some() == d.persistent_volume_claim.is_some() {
                e.push(ValidationError::ExactlyOne {
                    field: field.clone(),
                    first: "image",
                    second: "persistentVolumeClaim",
                });
            }
            if let Some(img) = &d.image {
                e.artifact(&format!("{field}.image"), img);
            }
            if let Some(pvc) = &d.persistent_volume_claim {
                e.name(&format!("{field}.persistentVolumeClaim"), pvc, 253, false);
            }
        }
        // spec.network
        if let Some(n) = &self.network {
            if n.ports.len() > 16 {
                e.range("spec.network.ports length", n.ports.len() as u64, 0, 16);
            }
            e.no_duplicates(
                "spec.network.ports[].name",
                n.ports.iter().map(|p| p.name.as_str()),
            );
            let forwarded: Vec<String> = n
                .ports
                .iter()
                .map(|p| format!("{}/{}", p.port, p.protocol.as_str()))
                .collect();
            e.no_duplicates("spec.network.ports", forwarded.iter().map(String::as_str));
            for p in &n.ports {
                let field = format!("spec.network.ports[{}]", p.name);
                e.name(&format!("{field}.name"), &p.name, 15, true);
                if !p.name.chars().any(|c| c.is_ascii_lowercase()) {
                    e.push(ValidationError::Invalid {
                        field: format!("{field}.name"),
                        value: p.name.clone(),
                        reason: "a port name needs at least one letter (an IANA service name)"
                            .into(),
                    });
                }
                e.range(&format!("{field}.port"), p.port.into(), 1, 65535);
                if p.port == u32::from(crate::wellknown::LAUNCHER_HEALTH_PORT) {
                    e.push(ValidationError::Invalid {
                        field: format!("{field}.port"),
                        value: p.port.to_string(),
                        reason: "port 4041 is the launcher pod's readiness port; forward another"
                            .into(),
                    });
                }
            }
        }
        if self.node_selector.len() > 32 {
            e.range(
                "spec.nodeSelector entries",
                self.node_selector.len() as u64,
                0,
                32,
            );
        }

        // spec.attestation
        if let Some(a) = &self.attestation {
            if let Some(p) = &a.policy_ref {
                e.name("spec.attestation.policyRef", p, 253, false);
            }
            if a.expected_measurements.len() > 16 {
                e.range(
                    "spec.attestation.expectedMeasurements length",
                    a.expected_measurements.len() as u64,
                    0,
                    16,
                );
            }
            let what = match tee {
                TeeType::Sev | TeeType::SevEs => "a SHA-256 launch digest for SEV and SEV-ES",
                TeeType::SevSnp => "48 bytes of SEV-SNP MEASUREMENT",
                TeeType::Tdx => "48 bytes of TDX MRTD",
            };
            for (i, m) in a.expected_measurements.iter().enumerate() {
                e.hex(
                    &format!("spec.attestation.expectedMeasurements[{i}]"),
                    m,
                    &[tee.measurement_hex_len()],
                    what,
                );
            }
            e.no_duplicates(
                "spec.attestation.expectedMeasurements",
                a.expected_measurements.iter().map(String::as_str),
            );
            if let Some(n) = &a.nonce {
                if !is_lower_hex(n) {
                    e.push(ValidationError::NotHex {
                        field: "spec.attestation.nonce".into(),
                        value: n.clone(),
                    });
                } else if !(2..=128).contains(&n.len()) || n.len() & 1 == 1 {
                    e.push(ValidationError::HexLength {
                        field: "spec.attestation.nonce".into(),
                        expected: "2 to 128, an even number of".into(),
                        what: "1 to 64 bytes".into(),
                        actual: n.len(),
                    });
                }
            }
            if let Some(d) = &a.reattest_every {
                e.duration(
                    "spec.attestation.reattestEvery",
                    d,
                    MINUTE_MS,
                    720 * HOUR_MS,
                    "1m and 720h",
                );
            }
        }
        e.finish()
    }
}

impl ConfidentialVMSpec {
    /// The transition rules: `spec.tee` and `spec.resources` never change after creation.
    pub fn validate_update(&self, old: &ConfidentialVMSpec) -> Result<(), Vec<ValidationError>> {
        let mut e = Errors::default();
        if self.tee != old.tee {
            e.push(ValidationError::Immutable {
                field: "spec.tee".into(),
                why: "the TEE type, guest policy, minimum TCB and host data are fixed at launch",
            });
        }
        if self.resources != old.resources {
            e.push(ValidationError::Immutable {
                field: "spec.resources".into(),
                why: "vCPUs and memory are part of the launch measurement and of the node's capacity",
            });
        }
        let _ = self.validate().map_err(|v| e.0.extend(v));
        e.finish()
    }
}

impl Validate for AttestationPolicySpec {
    fn validate(&self) -> Result<(), Vec<ValidationError>> {
        let mut e = Errors::default();
        if self.reference_measurements.len() > 64 {
            e.range(
                "spec.referenceMeasurements length",
                self.reference_measurements.len() as u64,
                0,
                64,
            );
        }
        for (i, m) in self.reference_measurements.iter().enumerate() {
            e.hex(
                &format!("spec.referenceMeasurements[{i}]"),
                m,
                &[96, 64],
                "SEV-SNP or TDX measurement, or SEV launch digest",
            );
        }
        e.no_duplicates(
            "spec.referenceMeasurements",
            self.reference_measurements.iter().map(String::as_str),
        );

        if self.trusted_roots.len() > 8 {
            e.range(
                "spec.trustedRoots length",
                self.trusted_roots.len() as u64,
                0,
                8,
            );
        }
        e.no_duplicates(
            "spec.trustedRoots[].name",
            self.trusted_roots.iter().map(|r| r.name.as_str()),
        );
        for r in &self.trusted_roots {
            let field = format!("spec.trustedRoots[{}]", r.name);
            e.name(&format!("{field}.name"), &r.name, 63, true);
            match (r.is_builtin(), &r.sha256_fingerprint) {
                (true, Some(_)) => e.push(ValidationError::Invalid {
                    field: format!("{field}.sha256Fingerprint"),
                    value: r.sha256_fingerprint.clone().unwrap_or_default(),
                    reason: format!(
                        "remove it: the built-in roots {} are held by the verifier",
                        BUILTIN_ROOTS.join(" and ")
                    ),
                }),
                (false, None) => e.push(ValidationError::Requires {
                    field: field.clone(),
                    needs: format!("{field}.sha256Fingerprint"),
                    why: "a root other than amd or intel is trusted only by the SHA-256 of its DER certificate",
                }),
                (false, Some(fp)) => {
                    e.hex(
                        &format!("{field}.sha256Fingerprint"),
                        fp,
                        &[64],
                        "a SHA-256 fingerprint",
                    );
                }
                (true, None) => {}
            }
        }
        e.no_duplicates(
            "spec.trustedRoots[].sha256Fingerprint",
            self.trusted_roots
                .iter()
                .filter_map(|r| r.sha256_fingerprint.as_deref()),
        );

        if let Some(t) = &self.tdx {
            for (i, m) in t.mrtd.iter().enumerate() {
                e.hex(
                    &format!("spec.tdx.mrtd[{i}]"),
                    m,
                    &[96],
                    "48 bytes of TDX MRTD",
                );
            }
            e.no_duplicates("spec.tdx.mrtd", t.mrtd.iter().map(String::as_str));
            let mut idx = BTreeSet::new();
            for r in &t.rtmrs {
                e.range("spec.tdx.rtmrs[].index", r.index.into(), 0, 3);
                if !idx.insert(r.index) {
                    e.push(ValidationError::Duplicate {
                        field: "spec.tdx.rtmrs[].index".into(),
                        value: r.index.to_string(),
                    });
                }
                e.hex(
                    &format!("spec.tdx.rtmrs[{}].value", r.index),
                    &r.value,
                    &[96],
                    "48 bytes of a TDX RTMR",
                );
            }
        }
        if let Some(d) = &self.max_evidence_age {
            e.duration(
                "spec.maxEvidenceAge",
                d,
                1_000,
                720 * HOUR_MS,
                "1s and 720h",
            );
        }
        e.finish()
    }
}

impl Validate for ConfidentialVMMigrationSpec {
    fn validate(&self) -> Result<(), Vec<ValidationError>> {
        let mut e = Errors::default();
        e.name("spec.cvmName", &self.cvm_name, 253, false);
        if let Some(t) = &self.target_node {
            e.name("spec.targetNode", t, 253, false);
        }
        e.finish()
    }
}

impl Validate for ConfidentialVM {
    fn validate(&self) -> Result<(), Vec<ValidationError>> {
        self.spec.validate()
    }
}

impl Validate for AttestationPolicy {
    fn validate(&self) -> Result<(), Vec<ValidationError>> {
        self.spec.validate()
    }
}

impl Validate for ConfidentialVMMigration {
    fn validate(&self) -> Result<(), Vec<ValidationError>> {
        self.spec.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("90s"), Some(90_000));
        assert_eq!(parse_duration_ms("1h30m"), Some(5_400_000));
        assert_eq!(parse_duration_ms("250ms"), Some(250));
        assert_eq!(parse_duration_ms("99999h1m1s1ms1s"), Some(359_996_462_001));
        for bad in [
            "",
            "10",
            "m",
            "1d",
            "1.5h",
            "-1s",
            "1h 2m",
            "100000ms",
            "1s1s1s1s1s1s",
        ] {
            assert_eq!(parse_duration_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn hex_helper() {
        assert!(is_lower_hex("00ff"));
        assert!(!is_lower_hex("00FF"));
        assert!(!is_lower_hex(""));
        assert!(!is_lower_hex("0x00"));
    }
}
