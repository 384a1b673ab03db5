//! SEV-SNP appraisal policy and the pure checks of a report's contents against it.
//!
//! `appraise` is a plain function over plain structs: no I/O, no clock, no signature
//! work. The signature and chain are checked in `verify`; this decides whether what the
//! (authentic) report says is acceptable.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha512};

use super::report::{Generation, SnpReport, TcbVersion};
use super::SnpError;
use crate::finding::{Claim, Finding, Severity};

/// The `report_data` a guest must put in its report for a verifier `nonce`:
/// SHA-512(nonce), all 64 bytes. TDX uses the same binding, so one nonce serves both.
pub fn report_data_for_nonce(nonce: &[u8]) -> [u8; 64] {
    Sha512::digest(nonce).into()
}

/// A root the policy trusts for SNP chains.
///
/// Written as a string: `amd` (AMD's Milan, Genoa and Turin ARKs, built in),
/// `amd-milan` / `amd-genoa` / `amd-turin` (one generation), or `sha256:<64 hex>`, the
/// SHA-256 of a root certificate's DER supplied with the evidence (how a simulator root
/// is trusted, see `SimSnpPlatform::root_fingerprint`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SnpTrustedRoot {
    Amd(Option<Generation>),
    Sha256([u8; 32]),
}

impl fmt::Display for SnpTrustedRoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnpTrustedRoot::Amd(None) => f.write_str("amd"),
            SnpTrustedRoot::Amd(Some(g)) => write!(f, "amd-{}", g.name().to_ascii_lowercase()),
            SnpTrustedRoot::Sha256(fp) => write!(f, "sha256:{}", hex::encode(fp)),
        }
    }
}

impl std::str::FromStr for SnpTrustedRoot {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        match t {
            "amd" => return Ok(SnpTrustedRoot::Amd(None)),
            "amd-milan" => return Ok(SnpTrustedRoot::Amd(Some(Generation::Milan))),
            "amd-genoa" => return Ok(SnpTrustedRoot::Amd(Some(Generation::Genoa))),
            "amd-turin" => return Ok(SnpTrustedRoot::Amd(Some(Generation::Turin))),
            _ => {}
        }
        let Some(h) = t.strip_prefix("sha256:") else {
            return Err(format!(
                "trusted root {s:?}: expected \"amd\", \"amd-milan\", \"amd-genoa\", \"amd-turin\" or \"sha256:<64 hex digits>\""
            ));
        };
        // Also accept the colon-separated form openssl prints.
        let h: String = h.chars().filter(|c| *c != ':').collect();
        let fp = decode_hex_n::<32>(&h).map_err(|e| format!("trusted root {s:?}: {e}"))?;
        Ok(SnpTrustedRoot::Sha256(fp))
    }
}

impl Serialize for SnpTrustedRoot {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for SnpTrustedRoot {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

fn decode_hex_n<const N: usize>(text: &str) -> Result<[u8; N], String> {
    let t = text.trim();
    let t = t.strip_prefix("0x").unwrap_or(t);
    let v = hex::decode(t).map_err(|e| format!("not hex ({e})"))?;
    let n = v.len();
    v.try_into()
        .map_err(|_| format!("expected {N} bytes ({} hex digits), got {n} bytes", 2 * N))
}

/// Fixed-size bytes written as hex in YAML/JSON.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Hex<const N: usize>(pub [u8; N]);

impl<const N: usize> fmt::Debug for Hex<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl<const N: usize> fmt::Display for Hex<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl<const N: usize> std::str::FromStr for Hex<N> {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        decode_hex_n::<N>(s).map(Hex)
    }
}

impl<const N: usize> Serialize for Hex<N> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(self.0))
    }
}

impl<'de, const N: usize> Deserialize<'de> for Hex<N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Minimum TCB (security patch level) per component; compared with the report's
/// REPORTED_TCB, the TCB the VCEK was derived from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct MinimumTcb {
    pub bootloader: u8,
    pub tee: u8,
    pub snp: u8,
    pub microcode: u8,
    /// Turin and later only; ignored for earlier generations.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fmc: Option<u8>,
}

fn yes() -> bool {
    true
}

fn default_roots() -> Vec<SnpTrustedRoot> {
    vec![SnpTrustedRoot::Amd(None)]
}

/// What an SNP report must satisfy. Deserializes from YAML or JSON with camelCase keys;
/// every field has a default, so `{}` is the default policy: AMD roots only, debug and
/// migration agent refused, SMT allowed, any VMPL, measurement not checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnpPolicy {
    /// Roots the VEK chain may end at. Default: `[amd]`.
    #[serde(default = "default_roots")]
    pub trusted_roots: Vec<SnpTrustedRoot>,
    /// Accept a guest whose policy allows debugging (the host can then read its memory).
    #[serde(default)]
    pub allow_debug: bool,
    /// Accept a guest that may be migrated by a migration agent.
    #[serde(default)]
    pub allow_migration_agent: bool,
    /// Accept a guest whose policy allows SMT.
    #[serde(default = "yes")]
    pub allow_smt: bool,
    /// Highest VMPL the report may come from (0 = only the most privileged level).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vmpl: Option<u32>,
    /// Accepted launch measurements (48 bytes each); empty = not checked.
    #[serde(default)]
    pub measurements: Vec<Hex<48>>,
    /// Expected HOST_DATA (32 bytes), binding the host-supplied init data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_data: Option<Hex<32>>,
    /// Minimum reported TCB per component.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum_tcb: Option<MinimumTcb>,
    /// Refuse evidence that is not bound to a verifier nonce.
    #[serde(default)]
    pub require_nonce: bool,
}

impl Default for SnpPolicy {
    fn default() -> Self {
        SnpPolicy {
            trusted_roots: default_roots(),
            allow_debug: false,
            allow_migration_agent: false,
            allow_smt: true,
            max_vmpl: None,
            measurements: Vec::new(),
            host_data: None,
            minimum_tcb: None,
            require_nonce: false,
        }
    }
}

impl SnpPolicy {
    /// Parse YAML or JSON (JSON is YAML).
    pub fn from_yaml(text: &str) -> Result<Self, SnpError> {
        let p: SnpPolicy =
            serde_yaml::from_str(text).map_err(|e| SnpError::Policy(e.to_string()))?;
        p.validate()?;
        Ok(p)
    }

    pub fn validate(&self) -> Result<(), SnpError> {
        if self.trusted_roots.is_empty() {
            return Err(SnpError::Policy(
                "trustedRoots is empty: no SNP evidence could ever verify".into(),
            ));
        }
        Ok(())
    }

    /// The default policy plus trust in one more root (e.g. the simulator's).
    pub fn trusting(root: SnpTrustedRoot) -> Self {
        let mut p = SnpPolicy::default();
        p.trusted_roots.push(root);
        p
    }
}

/// What the verifier knows besides the evidence.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnpContext {
    /// The verifier's challenge; the report's report_data must be SHA-512(nonce).
    pub nonce: Option<Vec<u8>>,
}

fn hex_list<const N: usize>(v: &[Hex<N>]) -> String {
    v.iter()
        .map(|h| h.to_string())
        .collect::<Vec<_>>()
        .join(" or ")
}

/// Appraise an SNP report's contents against `policy`. Returns the findings and the
/// claims that checks positively established. `gen` decides the TCB layout.
pub fn appraise(
    report: &SnpReport,
    gen: Generation,
    policy: &SnpPolicy,
    ctx: &SnpContext,
) -> (Vec<Finding>, Vec<Claim>) {
    let mut out = Vec::new();
    let mut affirmed = Vec::new();
    let config_before = out.len();
    appraise_guest_policy(report, policy, &mut out);
    if !out[config_before..]
        .iter()
        .any(|f: &Finding| f.claim == Claim::Configuration && f.is_contraindicated())
    {
        affirmed.push(Claim::Configuration);
    }

    // Executables: the launch measurement.
    if policy.measurements.is_empty() {
        out.push(Finding::new(
            "measurement-not-checked",
            Claim::Executables,
            Severity::Info,
            format!(
                "policy lists no reference measurement; reported {}",
                hex::encode(report.measurement)
            ),
        ));
    } else if policy
        .measurements
        .iter()
        .any(|m| m.0 == report.measurement)
    {
        affirmed.push(Claim::Executables);
    } else {
        out.push(Finding::mismatch(
            "measurement-mismatch",
            Claim::Executables,
            "measurement",
            hex_list(&policy.measurements),
            hex::encode(report.measurement),
        ));
    }

    // Instance identity: nonce binding and host data.
    let mut identity_ok = false;
    match &ctx.nonce {
        Some(nonce) => {
            let want = report_data_for_nonce(nonce);
            if want == report.report_data {
                identity_ok = true;
            } else {
                out.push(Finding::mismatch(
                    "report-data-mismatch",
                    Claim::InstanceIdentity,
                    "report_data (SHA-512 of the challenge)",
                    hex::encode(want),
                    hex::encode(report.report_data),
                ));
            }
        }
        None if policy.require_nonce => out.push(Finding::new(
            "nonce-missing",
            Claim::InstanceIdentity,
            Severity::Contraindicated,
            "policy requires fresh evidence but no nonce was given to bind report_data to",
        )),
        None => out.push(Finding::new(
            "nonce-not-checked",
            Claim::InstanceIdentity,
            Severity::Info,
            "no nonce given: freshness of the report is not established",
        )),
    }
    if let Some(h) = &policy.host_data {
        if h.0 == report.host_data {
            identity_ok = true;
        } else {
            out.push(Finding::mismatch(
                "host-data-mismatch",
                Claim::InstanceIdentity,
                "host_data",
                h.to_string(),
                hex::encode(report.host_data),
            ));
        }
    }
    if identity_ok {
        affirmed.push(Claim::InstanceIdentity);
    }

    if let Some(min) = &policy.minimum_tcb {
        appraise_tcb(report.reported_tcb(gen), min, &mut out);
    }
    (out, affirmed)
}

fn appraise_guest_policy(report: &SnpReport, policy: &SnpPolicy, out: &mut Vec<Finding>) {
    let gp = report.policy;
    if gp.debug_allowed() {
        if policy.allow_debug {
            out.push(Finding::new(
                "debug-enabled",
                Claim::RuntimeOpaque,
                Severity::Warning,
                "guest policy allows debugging (accepted by policy): the host can read guest memory",
            ));
        } else {
            let f = Finding::new(
                "debug-enabled",
                Claim::Configuration,
                Severity::Contraindicated,
                format!(
                    "guest policy {:#x} allows debugging (bit 19), which the policy forbids",
                    gp.0
                ),
            )
            .with_values("debug off", "debug allowed");
            out.push(f);
        }
    }
    if gp.migrate_ma_allowed() && !policy.allow_migration_agent {
        let f = Finding::new(
            "migration-agent-allowed",
            Claim::Configuration,
            Severity::Contraindicated,
            format!(
                "guest policy {:#x} allows a migration agent (bit 18), which the policy forbids",
                gp.0
            ),
        )
        .with_values("no migration agent", "migration agent allowed");
        out.push(f);
    }
    if gp.smt_allowed() && !policy.allow_smt {
        let f = Finding::new(
            "smt-allowed",
            Claim::Configuration,
            Severity::Contraindicated,
            format!(
                "guest policy {:#x} allows SMT (bit 16), which the policy forbids",
                gp.0
            ),
        )
        .with_values("SMT disallowed", "SMT allowed");
        out.push(f);
    }
    if let Some(max) = policy.max_vmpl {
        if report.vmpl > max {
            out.push(Finding::mismatch(
                "vmpl-not-allowed",
                Claim::Configuration,
                "VMPL",
                format!("<= {max}"),
                report.vmpl.to_string(),
            ));
        }
    }
}

fn appraise_tcb(reported: TcbVersion, min: &MinimumTcb, out: &mut Vec<Finding>) {
    let mut parts = vec![
        ("bootloader", min.bootloader, reported.bootloader),
        ("tee", min.tee, reported.tee),
        ("snp", min.snp, reported.snp),
        ("microcode", min.microcode, reported.microcode),
    ];
    if let (Some(want), Some(got)) = (min.fmc, reported.fmc) {
        parts.push(("fmc", want, got));
    }
    for (name, want, got) in parts {
        if got < want {
            let f = Finding::new(
                format!("tcb-{name}-below-minimum"),
                Claim::FileSystem,
                Severity::Contraindicated,
                format!("reported TCB {name} SPL {got} is below the minimum {want}"),
            )
            .with_values(format!(">= {want}"), got.to_string());
            out.push(f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snp::report::{GuestPolicy, REPORT_LEN};

    fn report(policy: u64, vmpl: u32, tcb: u64) -> SnpReport {
        let mut b = vec![0u8; REPORT_LEN];
        b[..4].copy_from_slice(&2u32.to_le_bytes());
        b[0x08..0x10].copy_from_slice(&policy.to_le_bytes());
        b[0x30..0x34].copy_from_slice(&vmpl.to_le_bytes());
        b[0x50..0x90].copy_from_slice(&report_data_for_nonce(b"n"));
        b[0x90..0xC0].copy_from_slice(&[0xAA; 48]);
        b[0xC0..0xE0].copy_from_slice(&[0xBB; 32]);
        b[0x180..0x188].copy_from_slice(&tcb.to_le_bytes());
        SnpReport::parse(&b).unwrap()
    }

    fn checks(f: &[Finding]) -> Vec<&str> {
        f.iter()
            .filter(|f| f.severity != Severity::Info)
            .map(|f| f.check.as_str())
            .collect()
    }

    const BASE: u64 = GuestPolicy::RESERVED_ONE | GuestPolicy::SMT;

    #[test]
    fn guest_policy_table() {
        let cases: &[(u64, SnpPolicy, &[&str])] = &[
            (BASE, SnpPolicy::default(), &[]),
            (
                BASE | GuestPolicy::DEBUG,
                SnpPolicy::default(),
                &["debug-enabled"],
            ),
            (
                BASE | GuestPolicy::DEBUG,
                SnpPolicy {
                    allow_debug: true,
                    ..Default::default()
                },
                &["debug-enabled"], // still a warning on runtime-opaque
            ),
            (
                BASE | GuestPolicy::MIGRATE_MA,
                SnpPolicy::default(),
                &["migration-agent-allowed"],
            ),
            (
                BASE | GuestPolicy::MIGRATE_MA,
                SnpPolicy {
                    allow_migration_agent: true,
                    ..Default::default()
                },
                &[],
            ),
            (
                BASE,
                SnpPolicy {
                    allow_smt: false,
                    ..Default::default()
                },
                &["smt-allowed"],
            ),
            (
                GuestPolicy::RESERVED_ONE,
                SnpPolicy {
                    allow_smt: false,
                    ..Default::default()
                },
                &[],
            ),
        ];
        for (gp, pol, want) in cases {
            let (f, _) = appraise(
                &report(*gp, 0, 0),
                Generation::Milan,
                pol,
                &SnpContext::default(),
            );
            assert_eq!(checks(&f), *want, "policy {gp:#x} {pol:?}");
        }
        let (f, _) = appraise(
            &report(BASE | GuestPolicy::DEBUG, 0, 0),
            Generation::Milan,
            &SnpPolicy {
                allow_debug: true,
                ..Default::default()
            },
            &SnpContext::default(),
        );
        assert_eq!(f[0].severity, Severity::Warning);
        assert_eq!(f[0].claim, Claim::RuntimeOpaque);
    }

    #[test]
    fn vmpl_measurement_nonce_hostdata() {
        let r = report(BASE, 2, 0);
        let pol = SnpPolicy {
            max_vmpl: Some(1),
            measurements: vec![Hex([0x11; 48]), Hex([0x22; 48])],
            host_data: Some(Hex([0xCC; 32])),
            ..Default::default()
        };
        let ctx = SnpContext {
            nonce: Some(b"other".to_vec()),
        };
        let (f, aff) = appraise(&r, Generation::Milan, &pol, &ctx);
        assert_eq!(
            checks(&f),
            [
                "vmpl-not-allowed",
                "measurement-mismatch",
                "report-data-mismatch",
                "host-data-mismatch"
            ]
        );
        assert!(f[1].message.contains(&"11".repeat(48)));
        assert!(f[1].message.contains(&"22".repeat(48)));
        assert!(f[1].message.contains(&"aa".repeat(48)));
        assert!(aff.is_empty());

        let pol = SnpPolicy {
            max_vmpl: Some(2),
            measurements: vec![Hex([0xAA; 48])],
            host_data: Some(Hex([0xBB; 32])),
            ..Default::default()
        };
        let ctx = SnpContext {
            nonce: Some(b"n".to_vec()),
        };
        let (f, aff) = appraise(&r, Generation::Milan, &pol, &ctx);
        assert!(checks(&f).is_empty(), "{f:?}");
        assert!(aff.contains(&Claim::Executables));
        assert!(aff.contains(&Claim::InstanceIdentity));
        assert!(aff.contains(&Claim::Configuration));
    }

    #[test]
    fn require_nonce() {
        let pol = SnpPolicy {
            require_nonce: true,
            ..Default::default()
        };
        let (f, _) = appraise(
            &report(BASE, 0, 0),
            Generation::Milan,
            &pol,
            &SnpContext::default(),
        );
        assert_eq!(checks(&f), ["nonce-missing"]);
    }

    #[test]
    fn minimum_tcb_per_component_and_generation() {
        // Milan layout: bl=3 tee=0 snp=8 ucode=115.
        let milan = u64::from_le_bytes([3, 0, 0, 0, 0, 0, 8, 115]);
        let pol = SnpPolicy {
            minimum_tcb: Some(MinimumTcb {
                bootloader: 3,
                tee: 1,
                snp: 8,
                microcode: 200,
                fmc: Some(9),
            }),
            ..Default::default()
        };
        let (f, _) = appraise(
            &report(BASE, 0, milan),
            Generation::Milan,
            &pol,
            &SnpContext::default(),
        );
        assert_eq!(
            checks(&f),
            ["tcb-tee-below-minimum", "tcb-microcode-below-minimum"]
        );
        // The same raw value read as Turin puts fmc in byte 0 (=3 < 9).
        let (f, _) = appraise(
            &report(BASE, 0, milan),
            Generation::Turin,
            &pol,
            &SnpContext::default(),
        );
        assert!(checks(&f).contains(&"tcb-fmc-below-minimum"));
    }

    #[test]
    fn policy_yaml_round_trip_and_errors() {
        let y = r#"
trustedRoots: [amd-milan, "sha256:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"]
allowDebug: false
allowSmt: false
maxVmpl: 0
measurements: ["0xAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"]
hostData: bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb
minimumTcb: {bootloader: 3, tee: 0, snp: 8, microcode: 115}
"#;
        let p = SnpPolicy::from_yaml(y).unwrap();
        assert_eq!(
            p.trusted_roots[0],
            SnpTrustedRoot::Amd(Some(Generation::Milan))
        );
        assert!(matches!(p.trusted_roots[1], SnpTrustedRoot::Sha256(fp) if fp[1] == 0x11));
        assert_eq!(p.measurements[0].0, [0xAA; 48]);
        assert_eq!(p.max_vmpl, Some(0));
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(SnpPolicy::from_yaml(&json).unwrap(), p);

        assert_eq!(SnpPolicy::from_yaml("{}").unwrap(), SnpPolicy::default());
        let e = SnpPolicy::from_yaml("measurements: [abcd]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("48 bytes"), "{e}");
        let e = SnpPolicy::from_yaml("trustedRoots: [intel]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("amd"), "{e}");
        let e = SnpPolicy::from_yaml("allowDebgu: true")
            .unwrap_err()
            .to_string();
        assert!(e.contains("allowDebgu"), "{e}");
        assert!(SnpPolicy::from_yaml("trustedRoots: []").is_err());
    }
}
