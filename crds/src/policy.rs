//! `AttestationPolicy`: reference values and trust anchors, managed apart from workloads.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{
    SnpTcbVersion, TdxTcbStatus, DNS_LABEL_PATTERN, DURATION_PATTERN, HEX_PATTERN,
};

/// Names of the trust anchors compiled into the verifier. Any other root must be listed
/// with its fingerprint, so that a simulator root is trusted only on purpose.
pub const BUILTIN_ROOTS: [&str; 2] = ["amd", "intel"];

/// Reference values and trust anchors against which ConfidentialVM evidence is appraised.
// clippy reads the repeated `type_ = "string"` of separate printcolumn(...) groups as
// duplicated attributes; they are not.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "cvmp.io",
    version = "v1alpha1",
    kind = "AttestationPolicy",
    plural = "attestationpolicies",
    singular = "attestationpolicy",
    shortname = "cvmpolicy",
    category = "cvmp",
    derive = "PartialEq",
    doc = "Reference values, minimum TCB, allowed guest policy and trusted roots for appraising ConfidentialVM evidence (cluster-scoped).",
    printcolumn(
        name = "Roots",
        type_ = "string",
        json_path = ".spec.trustedRoots[*].name",
        description = "Trusted roots"
    ),
    printcolumn(
        name = "MaxAge",
        type_ = "string",
        json_path = ".spec.maxEvidenceAge",
        description = "Maximum evidence age"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct AttestationPolicySpec {
    /// Launch measurements accepted from any guest appraised with this policy, as lowercase
    /// hex: 96 characters (SEV-SNP MEASUREMENT, TDX MRTD) or 64 (SEV/SEV-ES launch digest).
    /// When empty, only each ConfidentialVM's own spec.attestation.expectedMeasurements count.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 64, max = 96), regex(pattern = HEX_PATTERN)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    #[x_kube(validation = Rule::new("self.all(m, size(m) == 64 || size(m) == 96)").message("spec.referenceMeasurements: every entry must be 96 hex characters (SEV-SNP, TDX) or 64 (SEV, SEV-ES)"))]
    pub reference_measurements: Vec<String>,

    /// Oldest acceptable SEV-SNP platform TCB; evidence reporting a lower component fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum_tcb: Option<SnpTcbVersion>,

    /// Guest policy settings a guest may have. A guest asking for more (e.g. debug) fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_guest_policy: Option<AllowedGuestPolicy>,

    /// Roots of trust for evidence signatures. `amd` and `intel` name the vendor roots built
    /// into the verifier; any other entry (such as a simulator's root) must give its SHA-256
    /// fingerprint and is trusted only because it is listed here. When empty, both vendor
    /// roots are trusted and nothing else.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub trusted_roots: Vec<TrustedRoot>,

    /// TDX-specific reference values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tdx: Option<TdxPolicy>,

    /// Oldest evidence accepted, as a duration such as `10m` (1s to 720h). Default: 10m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    #[x_kube(validation = Rule::new("!self.matches('^([0-9]{1,5}(ms|s|m|h)){1,5}$') || (duration(self) >= duration('1s') && duration(self) <= duration('720h'))").message("spec.maxEvidenceAge must be between 1s and 720h, e.g. 10m"))]
    pub max_evidence_age: Option<String>,
}

/// Guest settings a policy allows. Each `true` permits the setting; it does not require it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AllowedGuestPolicy {
    /// Allow debuggable guests (their memory is readable by the host). Default: false.
    #[serde(default)]
    pub debug: bool,
    /// Allow migratable guests. Default: false.
    #[serde(default)]
    pub migratable: bool,
    /// Allow SEV-SNP guests that permit SMT on the host. Default: true.
    #[serde(default = "default_true")]
    pub smt: bool,
}

impl Default for AllowedGuestPolicy {
    fn default() -> Self {
        AllowedGuestPolicy {
            debug: false,
            migratable: false,
            smt: true,
        }
    }
}

fn default_true() -> bool {
    true
}

/// A root of trust for evidence signatures.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(self.name in ['amd', 'intel']) || !has(self.sha256Fingerprint)").field_path(".sha256Fingerprint").message("sha256Fingerprint must not be set for the built-in roots amd and intel: the verifier holds them"))]
#[x_kube(validation = Rule::new("self.name in ['amd', 'intel'] || has(self.sha256Fingerprint)").field_path(".sha256Fingerprint").message("sha256Fingerprint is required for a root other than amd or intel: give the SHA-256 of the root certificate's DER encoding"))]
pub struct TrustedRoot {
    /// `amd` or `intel` for a built-in vendor root, or a name of your choice (e.g.
    /// `cvm-simulator`) for a root identified by `sha256Fingerprint`.
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN))]
    pub name: String,
    /// SHA-256 of the root certificate's DER encoding, 64 lowercase hex characters. Required
    /// for every root other than `amd` and `intel`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 64, max = 64), regex(pattern = HEX_PATTERN))]
    pub sha256_fingerprint: Option<String>,
    /// Why this root is trusted (free text for reviewers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
}

impl TrustedRoot {
    /// Whether the entry names a root built into the verifier.
    pub fn is_builtin(&self) -> bool {
        BUILTIN_ROOTS.contains(&self.name.as_str())
    }
}

/// TDX-specific reference values.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TdxPolicy {
    /// TCB statuses accepted for the platform. When empty, only `UpToDate` is accepted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 6))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub acceptable_tcb_statuses: Vec<TdxTcbStatus>,
    /// Accepted MRTD values (measurement of the initial TD contents, i.e. TDVF), 96 lowercase hex characters each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 96, max = 96), regex(pattern = HEX_PATTERN)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub mrtd: Vec<String>,
    /// Expected runtime measurement registers, by index (0 to 3).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["index".into()]))]
    pub rtmrs: Vec<RtmrValue>,
}

/// The expected value of one TDX runtime measurement register.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RtmrValue {
    /// Register index, 0 to 3.
    #[schemars(range(min = 0, max = 3))]
    pub index: u8,
    /// Expected register value, 96 lowercase hex characters (48 bytes).
    #[schemars(length(min = 96, max = 96), regex(pattern = HEX_PATTERN))]
    pub value: String,
}

impl AttestationPolicySpec {
    /// Roots in force: the listed ones, or both vendor roots when none are listed.
    pub fn effective_roots(&self) -> Vec<TrustedRoot> {
        if !self.trusted_roots.is_empty() {
            return self.trusted_roots.clone();
        }
        BUILTIN_ROOTS
            .iter()
            .map(|name| TrustedRoot {
                name: (*name).to_string(),
                sha256_fingerprint: None,
                description: None,
            })
            .collect()
    }

    /// TDX TCB statuses in force (`UpToDate` when none are listed).
    pub fn effective_tdx_statuses(&self) -> Vec<TdxTcbStatus> {
        match &self.tdx {
            Some(t) if !t.acceptable_tcb_statuses.is_empty() => t.acceptable_tcb_statuses.clone(),
            _ => vec![TdxTcbStatus::UpToDate],
        }
    }

    /// Allowed guest policy in force (defaults applied).
    pub fn effective_guest_policy(&self) -> AllowedGuestPolicy {
        self.allowed_guest_policy.clone().unwrap_or_default()
    }
}

/// Default maximum evidence age, in seconds.
pub const DEFAULT_MAX_EVIDENCE_AGE_SECS: u64 = 600;
