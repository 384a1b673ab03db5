//! Attestation results in EAR form (draft-ietf-rats-ear), built from [`Finding`]s.
//!
//! Any verifier (SNP, TDX, …) reduces its checks to findings plus the set of claims it
//! positively established; [`Appraisal`] turns that into an AR4SI trustworthiness
//! vector and an `ear.status`, and [`Ear`] wraps one or more appraisals as submods.
//!
//! Values follow AR4SI tiers: 0 no claim, 2 affirming, 32 warning, 96 contraindicated.
//! The EAR is produced as an unsigned claims set (JSON); signing it as a JWT/CWT is the
//! caller's business.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::finding::{Claim, Finding, Severity};

/// The EAR profile identifier.
pub const EAR_PROFILE: &str = "tag:github.com,2023:veraison/ear";

/// AR4SI values used for each tier.
pub const AFFIRMING: i8 = 2;
pub const WARNING: i8 = 32;
pub const CONTRAINDICATED: i8 = 96;

/// `ear.status`: the tier of the worst claim in a submod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrustTier {
    None,
    Affirming,
    Warning,
    Contraindicated,
}

impl TrustTier {
    pub fn of_value(v: i8) -> Self {
        match v {
            96..=127 | -128..=-1 => TrustTier::Contraindicated,
            32..=95 => TrustTier::Warning,
            2..=31 => TrustTier::Affirming,
            _ => TrustTier::None,
        }
    }
}

impl fmt::Display for TrustTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TrustTier::None => "none",
            TrustTier::Affirming => "affirming",
            TrustTier::Warning => "warning",
            TrustTier::Contraindicated => "contraindicated",
        })
    }
}

/// `ear.verifier-id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifierId {
    pub developer: String,
    pub build: String,
}

impl Default for VerifierId {
    fn default() -> Self {
        VerifierId {
            developer: "cvmp.io".into(),
            build: format!("cvm-attest {}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// The findings of one verifier run plus the claims it positively established.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Appraisal {
    pub findings: Vec<Finding>,
    pub affirmed: BTreeSet<Claim>,
}

impl Appraisal {
    pub fn new() -> Self {
        Self::default()
    }

    /// Build from findings; `affirmed` lists claims whose checks ran and passed.
    pub fn from_findings(
        findings: impl IntoIterator<Item = Finding>,
        affirmed: impl IntoIterator<Item = Claim>,
    ) -> Self {
        Appraisal {
            findings: findings.into_iter().collect(),
            affirmed: affirmed.into_iter().collect(),
        }
    }

    pub fn push(&mut self, f: Finding) {
        self.findings.push(f);
    }

    pub fn affirm(&mut self, c: Claim) {
        self.affirmed.insert(c);
    }

    /// AR4SI value for one claim: the worst finding on it, else 2 when affirmed, else 0.
    pub fn value(&self, claim: Claim) -> i8 {
        let worst = self
            .findings
            .iter()
            .filter(|f| f.claim == claim)
            .map(|f| f.severity)
            .max();
        match worst {
            Some(Severity::Contraindicated) => CONTRAINDICATED,
            Some(Severity::Warning) => WARNING,
            _ if self.affirmed.contains(&claim) => AFFIRMING,
            _ => 0,
        }
    }

    /// The trustworthiness vector: every claim with a non-zero value.
    pub fn vector(&self) -> BTreeMap<Claim, i8> {
        let claims: BTreeSet<Claim> = self
            .findings
            .iter()
            .map(|f| f.claim)
            .chain(self.affirmed.iter().copied())
            .collect();
        claims
            .into_iter()
            .map(|c| (c, self.value(c)))
            .filter(|(_, v)| *v != 0)
            .collect()
    }

    pub fn status(&self) -> TrustTier {
        self.vector()
            .values()
            .map(|v| TrustTier::of_value(*v))
            .max()
            .unwrap_or(TrustTier::None)
    }

    /// Affirming or warning: usable evidence (warnings are printed, not fatal).
    pub fn is_affirmed(&self) -> bool {
        matches!(self.status(), TrustTier::Affirming | TrustTier::Warning)
    }

    pub fn contraindications(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|f| f.is_contraindicated())
    }

    pub fn to_submod(&self, policy_id: Option<String>) -> Submod {
        Submod {
            status: self.status(),
            trust_vector: self.vector(),
            policy_id,
            findings: self.findings.clone(),
        }
    }
}

/// One submod of an EAR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submod {
    #[serde(rename = "ear.status", alias = "ear_status")]
    pub status: TrustTier,
    #[serde(
        rename = "ear.trustworthiness-vector",
        alias = "ear_trustworthiness_vector",
        default,
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub trust_vector: BTreeMap<Claim, i8>,
    #[serde(
        rename = "ear.appraisal-policy-id",
        alias = "ear_appraisal_policy_id",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub policy_id: Option<String>,
    /// Our extension: every named finding, so a user sees what was expected and seen.
    #[serde(rename = "cvm.findings", default)]
    pub findings: Vec<Finding>,
}

/// An EAR claims set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ear {
    pub eat_profile: String,
    /// Issued-at, unix seconds.
    pub iat: i64,
    #[serde(rename = "ear.verifier-id", alias = "ear_verifier_id")]
    pub verifier_id: VerifierId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eat_nonce: Option<String>,
    pub submods: BTreeMap<String, Submod>,
}

impl Ear {
    /// An EAR with the standard profile and no submods yet.
    pub fn new(iat: i64, verifier_id: VerifierId) -> Self {
        Ear {
            eat_profile: EAR_PROFILE.to_string(),
            iat,
            verifier_id,
            eat_nonce: None,
            submods: BTreeMap::new(),
        }
    }

    pub fn with_submod(mut self, name: impl Into<String>, submod: Submod) -> Self {
        self.submods.insert(name.into(), submod);
        self
    }

    /// Worst status over all submods.
    pub fn status(&self) -> TrustTier {
        self.submods
            .values()
            .map(|s| s.status)
            .max()
            .unwrap_or(TrustTier::None)
    }

    pub fn to_json(&self) -> String {
        // Serializing plain maps/strings cannot fail; fall back to an empty object.
        serde_json::to_string_pretty(self).unwrap_or_else(|_| "{}".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(claim: Claim, sev: Severity) -> Finding {
        Finding::new("x", claim, sev, "m")
    }

    #[test]
    fn worst_finding_sets_the_tier() {
        let a = Appraisal::from_findings(
            [
                f(Claim::Hardware, Severity::Warning),
                f(Claim::Executables, Severity::Contraindicated),
                f(Claim::Configuration, Severity::Info),
            ],
            [
                Claim::Hardware,
                Claim::Configuration,
                Claim::InstanceIdentity,
            ],
        );
        assert_eq!(a.value(Claim::Hardware), WARNING);
        assert_eq!(a.value(Claim::Executables), CONTRAINDICATED);
        assert_eq!(a.value(Claim::Configuration), AFFIRMING);
        assert_eq!(a.value(Claim::RuntimeOpaque), 0);
        assert_eq!(a.status(), TrustTier::Contraindicated);
        assert!(!a.is_affirmed());
        assert!(!a.vector().contains_key(&Claim::RuntimeOpaque));
    }

    #[test]
    fn nothing_checked_is_none_and_info_only_is_not_a_claim() {
        let a = Appraisal::from_findings([f(Claim::Executables, Severity::Info)], []);
        assert_eq!(a.status(), TrustTier::None);
        assert!(a.vector().is_empty());
    }

    #[test]
    fn ear_json_uses_draft_names() {
        let a = Appraisal::from_findings([], [Claim::Hardware, Claim::InstanceIdentity]);
        let ear = Ear::new(1_700_000_000, VerifierId::default())
            .with_submod("SEV-SNP", a.to_submod(Some("p".into())));
        let v: serde_json::Value = serde_json::from_str(&ear.to_json()).unwrap();
        assert_eq!(v["eat_profile"], EAR_PROFILE);
        assert_eq!(v["iat"], 1_700_000_000);
        assert_eq!(v["ear.verifier-id"]["developer"], "cvmp.io");
        let s = &v["submods"]["SEV-SNP"];
        assert_eq!(s["ear.status"], "affirming");
        assert_eq!(s["ear.trustworthiness-vector"]["hardware"], 2);
        assert_eq!(s["ear.trustworthiness-vector"]["instance-identity"], 2);
        assert_eq!(s["ear.appraisal-policy-id"], "p");
        let back: Ear = serde_json::from_value(v).unwrap();
        assert_eq!(back, ear);
        assert_eq!(back.status(), TrustTier::Affirming);
    }

    #[test]
    fn accepts_underscore_spelling() {
        let j = r#"{"eat_profile":"tag:github.com,2023:veraison/ear","iat":1,
            "ear_verifier_id":{"developer":"d","build":"b"},
            "submods":{"a":{"ear_status":"warning","ear_trustworthiness_vector":{"hardware":32}}}}"#;
        let e: Ear = serde_json::from_str(j).unwrap();
        assert_eq!(e.status(), TrustTier::Warning);
        assert_eq!(e.submods["a"].trust_vector[&Claim::Hardware], 32);
    }
}
