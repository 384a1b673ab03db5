//! Named findings shared by every verifier in this crate.
//!
//! A finding is one check's outcome that a user must see: which check, which AR4SI
//! trustworthiness claim it bears on, how bad it is, and what was expected versus seen.

use serde::{Deserialize, Serialize};
use std::fmt;

/// AR4SI trustworthiness claims (draft-ietf-rats-ar4si) a finding bears on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum Claim {
    /// The evidence is signed by genuine TEE hardware (chain to a trusted root).
    Hardware,
    /// The launch measurement / MRTD / RTMRs match reference values.
    Executables,
    /// Guest policy, TD attributes, debug, SMT, migration settings.
    Configuration,
    /// The evidence is fresh and bound to this instance (nonce, host data).
    InstanceIdentity,
    /// Platform TCB / firmware is recent enough.
    FileSystem,
    /// Runtime opaque: memory encryption is in force.
    RuntimeOpaque,
}

/// How a finding affects the verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Informational; does not change the verdict.
    Info,
    /// AR4SI "warning" tier (32..=95): affirmed with reservations.
    Warning,
    /// AR4SI "contraindicated" tier (96..=127): the evidence must not be trusted.
    Contraindicated,
}

/// One named check outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// Stable machine name of the check, e.g. `measurement-mismatch`, `signature-invalid`.
    pub check: String,
    pub claim: Claim,
    pub severity: Severity,
    /// What the policy expected (hex, version, text); empty when not applicable.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub expected: String,
    /// What the evidence reported; empty when not applicable.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reported: String,
    /// Human sentence: "measurement mismatch: expected ab12…, reported cd34…".
    pub message: String,
}

impl Finding {
    pub fn new(
        check: impl Into<String>,
        claim: Claim,
        severity: Severity,
        message: impl Into<String>,
    ) -> Self {
        Finding {
            check: check.into(),
            claim,
            severity,
            expected: String::new(),
            reported: String::new(),
            message: message.into(),
        }
    }

    /// A contraindicating mismatch between an expected and a reported value.
    pub fn mismatch(
        check: impl Into<String>,
        claim: Claim,
        what: &str,
        expected: impl Into<String>,
        reported: impl Into<String>,
    ) -> Self {
        let (expected, reported) = (expected.into(), reported.into());
        Finding {
            message: format!("{what} mismatch: expected {expected}, reported {reported}"),
            check: check.into(),
            claim,
            severity: Severity::Contraindicated,
            expected,
            reported,
        }
    }

    /// The same finding, naming what was expected and what was reported.
    pub fn with_values(mut self, expected: impl Into<String>, reported: impl Into<String>) -> Self {
        self.expected = expected.into();
        self.reported = reported.into();
        self
    }

    pub fn is_contraindicated(&self) -> bool {
        self.severity == Severity::Contraindicated
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {}", self.check, self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatch_names_both_values() {
        let f = Finding::mismatch(
            "measurement-mismatch",
            Claim::Executables,
            "measurement",
            "ab12",
            "cd34",
        );
        assert_eq!(
            f.message,
            "measurement mismatch: expected ab12, reported cd34"
        );
        assert!(f.is_contraindicated());
        assert_eq!(
            f.to_string(),
            "[measurement-mismatch] measurement mismatch: expected ab12, reported cd34"
        );
    }
}
