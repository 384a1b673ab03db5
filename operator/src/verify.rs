//! Appraisal of a CVM's evidence: maps the CVM spec and its `AttestationPolicy` onto the
//! attestation library's policies, runs it, checks that the evidence comes from the pinned
//! host and guest instance (docs/evidence-binding.md), and turns the outcome into the
//! status `attestation` record. Pure: evidence, policy, the operator's own records and the
//! clock come in as values.
//!
//! No verdict rests on a fact the node plugin writes: every input is either proven by a
//! signature checked here (report, certificate chain, collateral), or comes from the spec,
//! the policy or the operator's records (pins, when it first saw a report).
//! `status.platform` is shown, never read here.

use cvm_attest::binding;
use cvm_attest::ear::{Appraisal, TrustTier};
use cvm_attest::snp::policy::{
    Hex, MinimumTcb as SnpMinTcb, SnpContext, SnpPolicy, SnpTrustedRoot,
};
use cvm_attest::snp::verify::{SnpEvidence, SnpVerifier};
use cvm_attest::tdx::{self, AppraisalContext, TdxPolicy};
use cvm_attest::{Claim, Finding as AFinding, Severity};
use cvm_crds::cvm::{
    AttestationResult, EarStatus, Evidence, Finding, FindingSeverity, GuestInstancePin,
    TrustworthinessVector,
};
use cvm_crds::policy::AttestationPolicySpec;
use cvm_crds::wire;
use cvm_crds::{ConfidentialVM, EvidenceFormat, HardwareIdKind, TeeType, TrustClaim};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use sha2::{Digest, Sha256};

/// Name this verifier puts in results.
pub const VERIFIER: &str = "cvm-operator";

/// Check name of the finding that SEV and SEV-ES evidence cannot be verified by the operator.
pub const CHECK_OWNER_VERIFICATION: &str = "owner-verification-required";
/// The node reported that its guest has no TEE at all.
pub const CHECK_NOT_CONFIDENTIAL: &str = "not-confidential";

/// What the report data must bind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject<'a> {
    /// The CVM's own evidence (its UID and current nonce).
    Cvm,
    /// A migration's receiving guest (the migration's UID).
    Migration(&'a str),
}

/// A node's pinned hardware identity, as the operator's HostPin records say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPinView {
    pub node: String,
    pub kind: HardwareIdKind,
    /// Lowercase hex.
    pub id: String,
    /// `Admin` or `FirstUse`, for messages.
    pub source: &'static str,
}

/// The operator's own records an appraisal is checked against.
#[derive(Debug, Clone, Copy, Default)]
pub struct Records<'a> {
    /// Every node's pin.
    pub host_pins: &'a [HostPinView],
    /// `(namespace/name, keySha256)` of the instances pinned for *other* CVMs.
    pub other_instances: &'a [(String, String)],
}

/// The inputs of one appraisal.
pub struct Input<'a> {
    pub cvm: &'a ConfidentialVM,
    /// `(name, spec)` of the referenced policy; `None`: built-in defaults (vendor roots only).
    pub policy: Option<(&'a str, &'a AttestationPolicySpec)>,
    pub evidence: &'a Evidence,
    pub now: Timestamp,
    pub subject: Subject<'a>,
    /// The node the evidence must come from: the CVM's (or a migration target's).
    pub node: &'a str,
    pub records: Records<'a>,
    /// The live migration (UID) that last moved this CVM (the operator's own annotation
    /// `cvmp.io/migration`): the CVM's evidence must bind it.
    pub migration: Option<&'a str>,
}

/// The hardware identity signed evidence proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HardwareId {
    pub kind: HardwareIdKind,
    pub id: String,
}

/// What the appraisal asks the caller to record.
#[derive(Debug, Clone, PartialEq)]
pub struct Appraised {
    pub result: AttestationResult,
    /// A first-use pin to create for `node` (only on an affirming verdict).
    pub pin_host: Option<HardwareId>,
    /// Another node already holds the chip this evidence came from: alert.
    pub host_conflict: Option<String>,
    /// The instance pin to record (unchanged, first, or moved by a relaunch/migration).
    pub instance: Option<GuestInstancePin>,
    /// The pin moved to a new instance: `(previous key, why)`.
    pub repinned: Option<(String, Repin)>,
}

/// Why an instance pin moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repin {
    /// The node plugin reported a new launch of the guest.
    Relaunched,
    /// A live migration switched the CVM to another node.
    Migrated,
}

impl Repin {
    /// Event reason.
    pub fn reason(self) -> &'static str {
        match self {
            Repin::Relaunched => "GuestRelaunched",
            Repin::Migrated => "GuestMigrated",
        }
    }
}

/// Identities read from evidence whose signature verified.
#[derive(Debug, Default)]
struct Proven {
    hardware: Option<HardwareId>,
    /// Why the host cannot be pinned (VLEK).
    unpinnable: Option<String>,
    report_id: Option<String>,
}

fn f(check: &str, claim: Claim, msg: impl Into<String>) -> AFinding {
    AFinding::new(check, claim, Severity::Contraindicated, msg)
}

/// Appraises the evidence. Never fails: unusable input becomes a named finding.
pub fn appraise(input: &Input<'_>) -> Appraised {
    let mut proven = Proven::default();
    let instance_key = match wire::decode_instance_key(input.evidence) {
        Ok(k) => k,
        Err(e) => {
            let a = Appraisal::from_findings(
                vec![f(
                    "instance-key-undecodable",
                    Claim::InstanceIdentity,
                    format!("evidence.{e}"),
                )],
                vec![],
            );
            return unpinned(input, &a);
        }
    };
    let mut appraisal = match wire::decode_report(input.evidence) {
        Err(e) => Appraisal::from_findings(
            vec![f(
                "evidence-undecodable",
                Claim::Hardware,
                format!("evidence.{e}"),
            )],
            vec![],
        ),
        Ok(raw) => match (input.cvm.tee_type(), input.evidence.format) {
            (TeeType::SevSnp, EvidenceFormat::SevSnpReport) => {
                snp(input, &raw, instance_key.as_deref(), &mut proven)
            }
            (TeeType::Tdx, EvidenceFormat::TdxQuote) => {
                tdx_appraise(input, &raw, instance_key.as_deref(), &mut proven)
            }
            (TeeType::Sev | TeeType::SevEs, EvidenceFormat::SevLaunchMeasure) => sev(input),
            (_, EvidenceFormat::NoTee) => Appraisal::from_findings(
                vec![f(
                    CHECK_NOT_CONFIDENTIAL,
                    Claim::Hardware,
                    format!(
                        "the guest is not confidential: its agent found no TEE ({})",
                        String::from_utf8_lossy(&raw)
                            .chars()
                            .take(1024)
                            .collect::<String>()
                    ),
                )],
                vec![],
            ),
            (tee, fmt) => Appraisal::from_findings(
                vec![AFinding::mismatch(
                    "evidence-format-mismatch",
                    Claim::Hardware,
                    "evidence format",
                    format!(
                        "{:?} evidence for a {} guest",
                        tee.evidence_format(),
                        tee.as_str()
                    ),
                    format!("{fmt:?}"),
                )],
                vec![],
            ),
        },
    };
    let is_snp_or_tdx = matches!(input.cvm.tee_type(), TeeType::SevSnp | TeeType::Tdx);
    if is_snp_or_tdx && instance_key.is_none() {
        appraisal.push(f(
            "instance-key-missing",
            Claim::InstanceIdentity,
            "the evidence names no guest instance key (status.evidence.instanceKey): the guest agent binds its key into the report data, so a report without one cannot be tied to a guest instance",
        ));
    }
    if let Some(stale) = staleness(input) {
        appraisal.push(stale);
    }
    // Host binding: the chip the signature proves must be the one pinned for the node.
    let host = check_host(
        input.node,
        proven.hardware.as_ref(),
        input.records.host_pins,
    );
    let mut host_conflict = None;
    match &host {
        HostCheck::Mismatch { pin } => appraisal.push(
            f(
                "hardware-not-pinned",
                Claim::Hardware,
                format!(
                    "the evidence comes from {} {}, but node {} is pinned to {} (HostPin {}, source {}); if the node's hardware really changed, an administrator deletes HostPin {} to re-pin it",
                    pin.kind.as_str(),
                    short(proven.hardware.as_ref().map_or("", |h| h.id.as_str())),
                    input.node,
                    short(&pin.id),
                    pin.node,
                    pin.source,
                    pin.node
                ),
            )
            .with_values(
                pin.id.clone(),
                proven.hardware.as_ref().map(|h| h.id.clone()).unwrap_or_default(),
            ),
        ),
        HostCheck::ClaimedBy { node } => {
            host_conflict = Some(node.clone());
            appraisal.push(f(
                "hardware-pinned-to-other-node",
                Claim::Hardware,
                format!(
                    "the evidence comes from hardware pinned to node {node} (HostPin {node}), not from node {}: one chip serves one node",
                    input.node
                ),
            ));
        }
        HostCheck::Pinned | HostCheck::FirstUse | HostCheck::Unproven => {}
    }
    if let Some(why) = &proven.unpinnable {
        appraisal.push(AFinding::new(
            "hardware-unpinnable",
            Claim::Hardware,
            Severity::Warning,
            why.clone(),
        ));
    }
    // Instance binding (the CVM's own evidence only: a receiving guest is a new instance).
    let reported = instance_key.as_deref().map(|k| InstanceId {
        key_sha256: hex::encode(binding::key_id(k)),
        report_id: proven.report_id.clone(),
    });
    let prior = input
        .cvm
        .status
        .as_ref()
        .and_then(|s| s.guest_instance.as_ref());
    let inst = match (input.subject, &reported) {
        (Subject::Cvm, Some(r)) if is_snp_or_tdx => Some(check_instance(
            prior,
            r,
            &LaunchMark::of(input.cvm),
            input.migration,
            input.records.other_instances,
        )),
        _ => None,
    };
    match &inst {
        Some(InstanceCheck::Changed) => {
            let pin = prior.map(|p| p.key_sha256.clone()).unwrap_or_default();
            let got = reported.as_ref().map(|r| r.key_sha256.clone()).unwrap_or_default();
            appraisal.push(
                f(
                    "instance-changed",
                    Claim::InstanceIdentity,
                    format!(
                        "the evidence comes from guest instance {}, but this CVM's pinned instance is {} and the node plugin reported no relaunch: a host may not present another instance's report",
                        short(&got),
                        short(&pin)
                    ),
                )
                .with_values(pin, got),
            );
        }
        Some(InstanceCheck::NotTheMovedInstance) => {
            let pin = prior.map(|p| p.key_sha256.clone()).unwrap_or_default();
            let got = reported
                .as_ref()
                .map(|r| r.key_sha256.clone())
                .unwrap_or_default();
            appraisal.push(
                f(
                    "instance-not-migrated",
                    Claim::InstanceIdentity,
                    format!(
                        "after live migration {} the evidence comes from guest instance {}, not from the instance {} that was moved: the target runs another guest",
                        input.migration.unwrap_or_default(),
                        short(&got),
                        short(&pin)
                    ),
                )
                .with_values(pin, got),
            );
        }
        Some(InstanceCheck::ServesOther(other)) => appraisal.push(f(
            "instance-serves-other-cvm",
            Claim::InstanceIdentity,
            format!(
                "the evidence comes from the guest instance pinned for ConfidentialVM {other}: one guest cannot answer for two CVMs"
            ),
        )),
        _ => {}
    }
    let result = to_result(input, &appraisal);
    let affirmed = matches!(result.status, EarStatus::Affirming | EarStatus::Warning);
    let pin_host = match (&host, affirmed) {
        (HostCheck::FirstUse, true) => proven.hardware.clone(),
        _ => None,
    };
    let now = Time(input.now);
    let (instance, repinned) = match (inst, reported, affirmed) {
        (Some(InstanceCheck::First), Some(r), true) => {
            (Some(new_pin(input, &r, prior, None, now.clone())), None)
        }
        (Some(InstanceCheck::Repin(why)), Some(r), true) => (
            Some(new_pin(input, &r, prior, Some(why), now.clone())),
            prior.map(|p| (p.key_sha256.clone(), why)),
        ),
        _ => (prior.cloned(), None),
    };
    Appraised {
        result,
        pin_host,
        host_conflict,
        instance,
        repinned,
    }
}

fn unpinned(input: &Input<'_>, a: &Appraisal) -> Appraised {
    Appraised {
        result: to_result(input, a),
        pin_host: None,
        host_conflict: None,
        instance: input
            .cvm
            .status
            .as_ref()
            .and_then(|s| s.guest_instance.clone()),
        repinned: None,
    }
}

fn new_pin(
    input: &Input<'_>,
    r: &InstanceId,
    prior: Option<&GuestInstancePin>,
    why: Option<Repin>,
    now: Time,
) -> GuestInstancePin {
    let (relaunches, previous_key_sha256) = match (prior, why) {
        (None, _) => (0, None),
        // The same instance, moved: its key and relaunch count stay.
        (Some(p), Some(Repin::Migrated)) => (p.relaunches, p.previous_key_sha256.clone()),
        (Some(p), _) => (p.relaunches.saturating_add(1), Some(p.key_sha256.clone())),
    };
    GuestInstancePin {
        key_sha256: r.key_sha256.clone(),
        report_id: r.report_id.clone(),
        node: input.node.to_string(),
        pinned_at: now,
        launched_at: launched_at(input.cvm).map(Time),
        launch_id: LaunchMark::of(input.cvm).id,
        relaunches,
        previous_key_sha256,
        migration: input.migration.map(str::to_string),
    }
}

/// The launch the node plugin reported for the guest: its word, so it only tells a
/// relaunch from a swap (a new pin, visible), it never makes evidence pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaunchMark {
    /// `status.platform.launchId`: new on every launch.
    pub id: Option<String>,
    /// `status.platform.launchedAt` (whole seconds): the fallback where no ID is reported.
    pub at: Option<Timestamp>,
}

impl LaunchMark {
    fn of(cvm: &ConfidentialVM) -> LaunchMark {
        LaunchMark {
            id: cvm
                .status
                .as_ref()
                .and_then(|s| s.platform.as_ref())
                .and_then(|p| p.launch_id.clone()),
            at: launched_at(cvm),
        }
    }
}

/// The launch time the node plugin reported (shown; only tells a relaunch from a swap).
fn launched_at(cvm: &ConfidentialVM) -> Option<Timestamp> {
    cvm.status
        .as_ref()?
        .platform
        .as_ref()?
        .launched_at
        .as_ref()
        .map(|t| t.0)
}

fn short(hex: &str) -> String {
    if hex.len() > 16 {
        format!("{}…", &hex[..16])
    } else {
        hex.to_string()
    }
}

/// How the evidence's hardware relates to the pins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostCheck {
    /// Matches the node's pin.
    Pinned,
    /// The node has no pin and nobody else holds this hardware: pin it on an affirming verdict.
    FirstUse,
    /// The node is pinned to other hardware.
    Mismatch { pin: HostPinView },
    /// Another node is pinned to this hardware.
    ClaimedBy { node: String },
    /// No hardware identity was proven (no verified signature, or a VLEK).
    Unproven,
}

/// Decides the host binding. Pure.
pub fn check_host(node: &str, proven: Option<&HardwareId>, pins: &[HostPinView]) -> HostCheck {
    let Some(hw) = proven else {
        return HostCheck::Unproven;
    };
    if let Some(pin) = pins.iter().find(|p| p.node == node) {
        return if pin.kind == hw.kind && pin.id.eq_ignore_ascii_case(&hw.id) {
            HostCheck::Pinned
        } else {
            HostCheck::Mismatch { pin: pin.clone() }
        };
    }
    match pins
        .iter()
        .find(|p| p.kind == hw.kind && p.id.eq_ignore_ascii_case(&hw.id))
    {
        Some(other) => HostCheck::ClaimedBy {
            node: other.node.clone(),
        },
        None => HostCheck::FirstUse,
    }
}

/// A guest instance as its evidence names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceId {
    pub key_sha256: String,
    pub report_id: Option<String>,
}

/// How the evidence's guest instance relates to the CVM's pin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceCheck {
    /// No pin yet: this one becomes the pin.
    First,
    /// The pinned instance.
    Same,
    /// A new instance after a relaunch or a migration: re-pin, visibly.
    Repin(Repin),
    /// Another instance with no relaunch reported: refuse.
    Changed,
    /// The first evidence after a migration's switch comes from another instance than the
    /// one that was moved: refuse (the target runs another guest).
    NotTheMovedInstance,
    /// The instance is pinned for another CVM (`namespace/name`): refuse.
    ServesOther(String),
}

/// Decides the instance binding. Pure. `launch` is the plugin's word, so it can only make
/// a change *visible* as a relaunch (new pin, counter, event); it cannot make evidence from
/// another chip, CVM or image pass.
pub fn check_instance(
    pin: Option<&GuestInstancePin>,
    reported: &InstanceId,
    launch: &LaunchMark,
    migration: Option<&str>,
    others: &[(String, String)],
) -> InstanceCheck {
    if let Some((cvm, _)) = others
        .iter()
        .find(|(_, k)| k.eq_ignore_ascii_case(&reported.key_sha256))
    {
        return InstanceCheck::ServesOther(cvm.clone());
    }
    let Some(pin) = pin else {
        return InstanceCheck::First;
    };
    let same_key = pin.key_sha256.eq_ignore_ascii_case(&reported.key_sha256);
    let same_report_id = match (&pin.report_id, &reported.report_id) {
        (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
        _ => true,
    };
    if migration.is_some() && migration != pin.migration.as_deref() {
        // The first evidence since the switch: the moved guest keeps its key (its memory
        // moved), its REPORT_ID may be the target's.
        return if same_key {
            InstanceCheck::Repin(Repin::Migrated)
        } else {
            InstanceCheck::NotTheMovedInstance
        };
    }
    if same_key && same_report_id {
        return InstanceCheck::Same;
    }
    // A launch ID settles it; two launches within one second share a launchedAt.
    if let (Some(now), Some(then)) = (&launch.id, &pin.launch_id) {
        return if now != then {
            InstanceCheck::Repin(Repin::Relaunched)
        } else {
            InstanceCheck::Changed
        };
    }
    let pinned_launch = pin.launched_at.as_ref().map(|t| t.0);
    match (launch.at, pinned_launch) {
        (Some(now), Some(then)) if now > then => InstanceCheck::Repin(Repin::Relaunched),
        (Some(_), None) => InstanceCheck::Repin(Repin::Relaunched),
        _ => InstanceCheck::Changed,
    }
}

/// The hash preimage the report data must be SHA-512 of (docs/evidence-binding.md): the
/// CVM's UID and nonce, or the migration's UID, with the reported instance key's hash.
/// `None` when the nonce is not hex (the schema refuses that).
fn challenge(input: &Input<'_>, instance_key: Option<&[u8]>) -> Option<Vec<u8>> {
    let c = match input.subject {
        Subject::Migration(uid) => wire::migration_challenge_for(uid),
        Subject::Cvm => wire::challenge_for(
            input.cvm.nonce(),
            input.cvm.metadata.uid.as_deref().unwrap_or_default(),
            input.migration,
        )?,
    };
    Some(c.preimage_for(instance_key.unwrap_or_default()))
}

/// Expected launch measurements: the CVM owner's own values when given, else the policy's.
fn expected_measurements(input: &Input<'_>) -> Vec<String> {
    let own = input
        .cvm
        .spec
        .attestation
        .as_ref()
        .map(|a| a.expected_measurements.clone())
        .unwrap_or_default();
    if !own.is_empty() {
        return own;
    }
    input
        .policy
        .map(|(_, p)| p.reference_measurements.clone())
        .unwrap_or_default()
}

fn hex_array<const N: usize>(s: &str) -> Option<[u8; N]> {
    hex::decode(s).ok()?.try_into().ok()
}

fn snp(
    input: &Input<'_>,
    raw: &[u8],
    instance_key: Option<&[u8]>,
    proven: &mut Proven,
) -> Appraisal {
    let cvm = input.cvm;
    let spec = input.policy.map(|(_, p)| p);
    let allowed = spec.map(|p| p.effective_guest_policy()).unwrap_or_default();
    let own = cvm.guest_policy();
    let mut bad_config = Vec::new();

    let mut roots = Vec::new();
    for r in spec.map(|p| p.effective_roots()).unwrap_or_default() {
        match (r.name.as_str(), &r.sha256_fingerprint) {
            ("amd", _) => roots.push(SnpTrustedRoot::Amd(None)),
            ("intel", _) => {}
            (_, Some(fp)) => match hex_array::<32>(fp) {
                Some(b) => roots.push(SnpTrustedRoot::Sha256(b)),
                None => bad_config.push(f(
                    "policy-invalid",
                    Claim::Hardware,
                    format!("trusted root {}: fingerprint is not 64 hex digits", r.name),
                )),
            },
            (name, None) => bad_config.push(f(
                "policy-invalid",
                Claim::Hardware,
                format!("trusted root {name} has no sha256Fingerprint"),
            )),
        }
    }
    if spec.is_none() {
        roots.push(SnpTrustedRoot::Amd(None));
    }
    let mut measurements = Vec::new();
    for m in expected_measurements(input) {
        match hex_array::<48>(&m) {
            Some(b) => measurements.push(Hex(b)),
            None => bad_config.push(f(
                "policy-invalid",
                Claim::Executables,
                format!("expected measurement {m} is not 96 hex digits"),
            )),
        }
    }
    let host_data = cvm
        .spec
        .tee
        .host_data
        .as_deref()
        .and_then(hex_array::<32>)
        .map(Hex);
    let mut min = SnpMinTcb::default();
    let mut have_min = false;
    let tcbs = [
        spec.and_then(|p| p.minimum_tcb),
        cvm.spec.tee.minimum_tcb.as_ref().map(|m| m.snp_tcb()),
    ];
    for t in tcbs.iter().flatten() {
        have_min = true;
        min.bootloader = min.bootloader.max(t.bootloader.unwrap_or(0));
        min.tee = min.tee.max(t.tee.unwrap_or(0));
        min.snp = min.snp.max(t.snp.unwrap_or(0));
        min.microcode = min.microcode.max(t.microcode.unwrap_or(0));
        if let Some(fmc) = t.fmc {
            min.fmc = Some(min.fmc.unwrap_or(0).max(fmc));
        }
    }
    let policy = SnpPolicy {
        trusted_roots: roots,
        allow_debug: allowed.debug && own.debug,
        allow_migration_agent: allowed.migratable && own.migratable,
        allow_smt: allowed.smt,
        max_vmpl: None,
        measurements,
        host_data,
        minimum_tcb: have_min.then_some(min),
        require_nonce: true,
    };
    let verifier = match SnpVerifier::new(policy) {
        Ok(v) => v,
        Err(e) => {
            bad_config.push(f("policy-invalid", Claim::Hardware, e.to_string()));
            return Appraisal::from_findings(bad_config, vec![]);
        }
    };
    let certs = match wire::cert_chain(input.evidence) {
        Ok(c) => c,
        Err(e) => {
            bad_config.push(f(
                "cert-chain-malformed",
                Claim::Hardware,
                format!("evidence.{e}"),
            ));
            Vec::new()
        }
    };
    let ev = SnpEvidence {
        report: raw,
        certs: &certs,
        crls: &[],
    };
    let ctx = SnpContext {
        nonce: challenge(input, instance_key),
    };
    let at = input.now.as_second().max(0) as u64;
    let verified = verifier.verify(&ev, &ctx, at);
    if verified.signature_verified {
        if let Some(r) = &verified.report {
            proven.report_id = Some(hex::encode(r.report_id));
            let vlek = verified
                .chain
                .as_ref()
                .is_some_and(|c| c.vek_kind.eq_ignore_ascii_case("VLEK"));
            if vlek {
                proven.unpinnable = Some(
                    "the report is signed with a VLEK (one key per cloud provider, CHIP_ID possibly masked): the host's chip cannot be pinned, so the evidence is bound to the provider, not to this node's hardware".into(),
                );
            } else {
                proven.hardware = Some(HardwareId {
                    kind: HardwareIdKind::SnpChipId,
                    id: hex::encode(r.chip_id),
                });
            }
        }
    }
    let mut out = verified.appraisal;
    for b in bad_config {
        out.push(b);
    }
    out
}

fn tdx_appraise(
    input: &Input<'_>,
    raw: &[u8],
    instance_key: Option<&[u8]>,
    proven: &mut Proven,
) -> Appraisal {
    let cvm = input.cvm;
    let spec = input.policy.map(|(_, p)| p);
    let mut policy = TdxPolicy::default();
    policy.trusted_roots.clear();
    let mut bad = Vec::new();
    for r in spec.map(|p| p.effective_roots()).unwrap_or_default() {
        match (r.name.as_str(), &r.sha256_fingerprint) {
            ("intel", _) => policy
                .trusted_roots
                .push(tdx::policy::TrustedRoot::IntelSgxRootCa),
            ("amd", _) => {}
            (_, Some(fp)) => match hex_array::<32>(fp) {
                Some(b) => policy
                    .trusted_roots
                    .push(tdx::policy::TrustedRoot::Sha256(b)),
                None => bad.push(f(
                    "policy-invalid",
                    Claim::Hardware,
                    format!("trusted root {}: fingerprint is not 64 hex digits", r.name),
                )),
            },
            (name, None) => bad.push(f(
                "policy-invalid",
                Claim::Hardware,
                format!("trusted root {name} has no sha256Fingerprint"),
            )),
        }
    }
    if spec.is_none() {
        policy
            .trusted_roots
            .push(tdx::policy::TrustedRoot::IntelSgxRootCa);
    }
    let statuses: Vec<cvm_crds::TdxTcbStatus> = match cvm.spec.tee.minimum_tcb.as_ref() {
        Some(m) if !m.tdx_tcb_statuses.is_empty() => m.tdx_tcb_statuses.clone(),
        _ => spec
            .map(|p| p.effective_tdx_statuses())
            .unwrap_or_else(|| vec![cvm_crds::TdxTcbStatus::UpToDate]),
    };
    policy.accepted_tcb_statuses = statuses.into_iter().map(Into::into).collect();
    for m in expected_measurements(input) {
        match hex::decode(&m) {
            Ok(b) if b.len() == 48 => policy.mrtd.push(b),
            _ => bad.push(f(
                "policy-invalid",
                Claim::Executables,
                format!("expected MRTD {m} is not 96 hex digits"),
            )),
        }
    }
    if let Some(t) = spec.and_then(|p| p.tdx.as_ref()) {
        if cvm
            .spec
            .attestation
            .as_ref()
            .is_none_or(|a| a.expected_measurements.is_empty())
        {
            for m in &t.mrtd {
                if let Ok(b) = hex::decode(m) {
                    policy.mrtd.push(b);
                }
            }
        }
        for r in &t.rtmrs {
            let v = hex::decode(&r.value).ok();
            match r.index {
                0 => policy.rtmr0 = v,
                1 => policy.rtmr1 = v,
                2 => policy.rtmr2 = v,
                _ => policy.rtmr3 = v,
            }
        }
    }
    policy.mr_config_id = cvm
        .spec
        .tee
        .host_data
        .as_deref()
        .and_then(|h| hex::decode(h).ok());
    policy.allow_debug = cvm.guest_policy().debug
        && spec
            .map(|p| p.effective_guest_policy().debug)
            .unwrap_or(false);
    policy.require_nonce = true;
    let collateral = match wire::tdx_collateral(input.evidence) {
        Ok(c) => c,
        Err(e) => {
            bad.push(f(
                "collateral-missing",
                Claim::Hardware,
                format!("evidence.{e}"),
            ));
            return Appraisal::from_findings(bad, vec![]);
        }
    };
    let mut ctx = AppraisalContext::at(input.now.as_second().max(0) as u64);
    ctx.nonce = challenge(input, instance_key);
    match tdx::verify_quote(raw, collateral.as_bytes(), &policy, &ctx) {
        Ok(a) => {
            if let Some(id) = a.platform_id.as_ref().filter(|_| a.verified) {
                proven.hardware = Some(HardwareId {
                    kind: HardwareIdKind::TdxPlatformId,
                    id: hex::encode(id),
                });
            }
            let mut findings = a.findings;
            findings.extend(bad);
            Appraisal::from_findings(findings, a.affirmed)
        }
        Err(e) => {
            bad.insert(0, f("quote-unverifiable", Claim::Hardware, e.to_string()));
            Appraisal::from_findings(bad, vec![])
        }
    }
}

/// SEV and SEV-ES: the launch measurement is an HMAC under a key shared with the guest
/// owner, not a hardware signature, and the host reports it: the operator cannot prove
/// anything, so it never affirms. It still compares digests, as information for the owner.
fn sev(input: &Input<'_>) -> Appraisal {
    let reported = input
        .evidence
        .launch_measurement
        .clone()
        .unwrap_or_default();
    let expected = expected_measurements(input);
    let mut findings = vec![AFinding::new(
        CHECK_OWNER_VERIFICATION,
        Claim::Hardware,
        Severity::Contraindicated,
        "SEV and SEV-ES launch measurements are reported by the host and carry no AMD signature the operator can check: the guest owner must verify the LAUNCH_MEASURE HMAC with their TIK (or use SEV-SNP)",
    )];
    if expected.is_empty() {
        findings.push(AFinding::new(
            "measurement-unchecked",
            Claim::Executables,
            Severity::Warning,
            "no expected measurement was given",
        ));
    } else if !expected.iter().any(|e| e.eq_ignore_ascii_case(&reported)) {
        findings.push(AFinding::mismatch(
            "measurement-mismatch",
            Claim::Executables,
            "measurement (host-reported)",
            expected.join(" or "),
            reported,
        ));
    }
    Appraisal::from_findings(findings, vec![])
}

fn staleness(input: &Input<'_>) -> Option<AFinding> {
    let max = input
        .policy
        .and_then(|(_, p)| p.max_evidence_age.as_deref())?;
    let max_secs = cvm_crds::validate::parse_duration_ms(max)? / 1000;
    // Counted from when the operator first saw this report, on its own clock: the plugin's
    // collectedAt is its word, and a host could call old evidence new.
    let seen = seen_at(input).unwrap_or(input.now);
    let age = input.now.as_second() - seen.as_second();
    (age > max_secs as i64).then(|| {
        AFinding::new(
            "evidence-stale",
            Claim::InstanceIdentity,
            Severity::Contraindicated,
            format!("evidence is {age} s old; the policy accepts at most {max} ({max_secs} s)"),
        )
        .with_values(format!("<= {max_secs} s"), format!("{age} s"))
    })
}

fn report_sha256(e: &Evidence) -> String {
    hex::encode(Sha256::digest(e.report.trim().as_bytes()))
}

/// When the operator first saw this very report: kept from its last result while the
/// report is unchanged.
fn seen_at(input: &Input<'_>) -> Option<Timestamp> {
    if input.subject != Subject::Cvm {
        return None;
    }
    let old = input.cvm.status.as_ref()?.attestation.as_ref()?;
    (old.evidence_sha256.as_deref() == Some(report_sha256(input.evidence).as_str()))
        .then(|| old.evidence_seen_at.as_ref().map(|t| t.0))
        .flatten()
}

fn claim(c: Claim) -> TrustClaim {
    match c {
        Claim::Hardware => TrustClaim::Hardware,
        Claim::Executables => TrustClaim::Executables,
        Claim::Configuration => TrustClaim::Configuration,
        Claim::InstanceIdentity => TrustClaim::InstanceIdentity,
        Claim::FileSystem => TrustClaim::FileSystem,
        Claim::RuntimeOpaque => TrustClaim::RuntimeOpaque,
    }
}

fn to_result(input: &Input<'_>, a: &Appraisal) -> AttestationResult {
    let mut v = TrustworthinessVector::default();
    for (c, val) in a.vector() {
        let slot = match c {
            Claim::Hardware => &mut v.hardware,
            Claim::Executables => &mut v.executables,
            Claim::Configuration => &mut v.configuration,
            Claim::InstanceIdentity => &mut v.instance_identity,
            Claim::FileSystem => &mut v.file_system,
            Claim::RuntimeOpaque => &mut v.runtime_opaque,
        };
        *slot = Some(val);
    }
    let status = match a.status() {
        TrustTier::Affirming => EarStatus::Affirming,
        TrustTier::Warning => EarStatus::Warning,
        TrustTier::Contraindicated => EarStatus::Contraindicated,
        TrustTier::None => EarStatus::None,
    };
    let findings = a
        .findings
        .iter()
        .filter(|x| x.severity != Severity::Info)
        .map(|x| Finding {
            check: x.check.clone(),
            claim: Some(claim(x.claim)),
            severity: Some(match x.severity {
                Severity::Info => FindingSeverity::Info,
                Severity::Warning => FindingSeverity::Warning,
                Severity::Contraindicated => FindingSeverity::Contraindicated,
            }),
            expected: (!x.expected.is_empty()).then(|| x.expected.clone()),
            reported: (!x.reported.is_empty()).then(|| x.reported.clone()),
            message: x.message.clone(),
        })
        .collect();
    AttestationResult {
        status,
        trustworthiness_vector: v,
        policy: Some(
            input
                .policy
                .map(|(n, _)| n.to_string())
                .unwrap_or_else(|| "(built-in defaults)".into()),
        ),
        findings,
        verified_at: Time(input.now),
        verifier: VERIFIER.into(),
        evidence_collected_at: Some(input.evidence.collected_at.clone()),
        nonce: input.evidence.nonce.clone(),
        evidence_sha256: Some(report_sha256(input.evidence)),
        migration: match input.subject {
            Subject::Cvm => input.migration.map(str::to_string),
            Subject::Migration(_) => None,
        },
        evidence_seen_at: Some(Time(seen_at(input).unwrap_or(input.now))),
    }
}

/// Same verdict, ignoring when it was computed: keeps `verifiedAt` stable when nothing
/// changed, so the operator does not rewrite status on every pass.
pub fn same_verdict(a: &AttestationResult, b: &AttestationResult) -> bool {
    a.status == b.status
        && a.findings == b.findings
        && a.policy == b.policy
        && a.evidence_collected_at == b.evidence_collected_at
        && a.nonce == b.nonce
        && a.trustworthiness_vector == b.trustworthiness_vector
        && a.evidence_sha256 == b.evidence_sha256
        && a.migration == b.migration
        && a.evidence_seen_at == b.evidence_seen_at
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use cvm_attest::binding::Challenge;
    use cvm_attest::sim::{ReportRequest, SimSnpConfig, SimSnpPlatform};
    use cvm_crds::cvm::PlatformFacts;
    use cvm_crds::policy::TrustedRoot;
    use cvm_crds::SnpTcbVersion;

    // Inside the simulator's certificate validity (2024 to 2049).
    fn now() -> Timestamp {
        Timestamp::from_second(1_750_000_000).unwrap()
    }

    fn platform(bootloader: u8) -> SimSnpPlatform {
        let config = SimSnpConfig {
            bootloader,
            ..Default::default()
        };
        SimSnpPlatform::from_seed([7; 32], config).unwrap()
    }

    fn policy(p: &SimSnpPlatform, min_bootloader: Option<u8>) -> AttestationPolicySpec {
        AttestationPolicySpec {
            trusted_roots: vec![TrustedRoot {
                name: "sim".into(),
                sha256_fingerprint: Some(hex::encode(Sha256::digest(p.ark_der()))),
                description: None,
            }],
            minimum_tcb: min_bootloader.map(|b| SnpTcbVersion {
                bootloader: Some(b),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A guest instance: its key and its launch's REPORT_ID.
    struct Guest {
        key: Vec<u8>,
        report_id: [u8; 32],
        chip: [u8; 64],
    }

    fn guest(tag: u8, chip: u8) -> Guest {
        Guest {
            key: vec![tag; 32],
            report_id: [tag; 32],
            chip: [chip; 64],
        }
    }

    /// Evidence as that guest's agent produces it for `challenge`.
    fn evidence_of(p: &SimSnpPlatform, g: &Guest, challenge: &Challenge) -> Evidence {
        let req = ReportRequest {
            report_data: challenge.report_data(&g.key),
            report_id: Some(g.report_id),
            chip_id: Some(g.chip),
            ..ReportRequest::default()
        };
        let e = p.issue_report(&req).unwrap();
        Evidence {
            format: EvidenceFormat::SevSnpReport,
            report: base64::engine::general_purpose::STANDARD.encode(&e.report),
            cert_chain: Some(e.cert_chain_pem()),
            collateral: Default::default(),
            nonce: None,
            collected_at: Time(now()),
            launch_measurement: None,
            instance_key: Some(base64::engine::general_purpose::STANDARD.encode(&g.key)),
            epoch: None,
        }
    }

    fn cvm_named(name: &str, uid: &str, nonce: Option<&str>) -> ConfidentialVM {
        let mut att = serde_json::json!({});
        if let Some(n) = nonce {
            att = serde_json::json!({"nonce": n});
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "cvmp.io/v1alpha1", "kind": "ConfidentialVM",
            "metadata": {"name": name, "namespace": "d", "uid": uid},
            "spec": {"tee": {"type": "SEV-SNP", "policy": {"migratable": true}},
                     "resources": {"vcpus": 2, "memoryMiB": 2048},
                     "boot": {"firmware": {"name": "ovmf"}},
                     "attestation": att},
            "status": {"nodeName": "node-a"}
        }))
        .unwrap()
    }

    fn cvm() -> ConfidentialVM {
        cvm_named("web", "cvm-uid", None)
    }

    fn pin(node: &str, chip: u8) -> HostPinView {
        HostPinView {
            node: node.into(),
            kind: HardwareIdKind::SnpChipId,
            id: hex::encode([chip; 64]),
            source: "FirstUse",
        }
    }

    fn run(
        c: &ConfidentialVM,
        spec: &AttestationPolicySpec,
        ev: &Evidence,
        pins: &[HostPinView],
        others: &[(String, String)],
    ) -> Appraised {
        appraise(&Input {
            cvm: c,
            policy: Some(("sim-policy", spec)),
            evidence: ev,
            now: now(),
            subject: Subject::Cvm,
            node: c.node_name().unwrap_or_default(),
            records: Records {
                host_pins: pins,
                other_instances: others,
            },
            migration: None,
        })
    }

    fn checks(r: &AttestationResult) -> Vec<&str> {
        r.findings.iter().map(|f| f.check.as_str()).collect()
    }

    fn verified(a: &Appraised) -> bool {
        crate::state::verdict_text(&a.result).0
    }

    #[test]
    fn first_verified_evidence_pins_host_and_instance() {
        let p = platform(4);
        let spec = policy(&p, None);
        let c = cvm();
        let g = guest(1, 0xA0);
        let ev = evidence_of(&p, &g, &Challenge::cvm("cvm-uid", None));
        let a = run(&c, &spec, &ev, &[], &[]);
        assert_eq!(
            a.result.status,
            EarStatus::Affirming,
            "{:?}",
            a.result.findings
        );
        assert_eq!(
            a.pin_host,
            Some(HardwareId {
                kind: HardwareIdKind::SnpChipId,
                id: hex::encode([0xA0; 64])
            })
        );
        let inst = a.instance.unwrap();
        assert_eq!(inst.key_sha256, hex::encode(binding::key_id(&g.key)));
        assert_eq!(inst.report_id, Some(hex::encode([1u8; 32])));
        assert_eq!(inst.node, "node-a");
        assert_eq!(inst.relaunches, 0);
        assert_eq!(a.repinned, None);
        // Once pinned, nothing new is asked.
        let a = run(&c, &spec, &ev, &[pin("node-a", 0xA0)], &[]);
        assert!(verified(&a));
        assert_eq!(a.pin_host, None);
    }

    #[test]
    fn another_cvms_evidence_with_the_same_nonce_is_refused() {
        // The replay the adversarial test found: same spec, same nonce, another CVM.
        let p = platform(4);
        let spec = policy(&p, None);
        let victim = cvm_named("rp-c", "uid-c", Some("abcd"));
        let thief = cvm_named("rp-a", "uid-a", Some("abcd"));
        let g = guest(3, 0xA0);
        let ev = evidence_of(&p, &g, &Challenge::cvm("uid-c", Some(&[0xab, 0xcd])));
        assert!(verified(&run(&victim, &spec, &ev, &[], &[])));
        let a = run(&thief, &spec, &ev, &[], &[]);
        assert!(!verified(&a));
        assert!(
            checks(&a.result).contains(&"report-data-mismatch"),
            "{:?}",
            a.result.findings
        );
        assert_eq!(a.pin_host, None, "a refused verdict pins nothing");
    }

    #[test]
    fn evidence_from_another_nodes_chip_is_refused() {
        let p = platform(4);
        let spec = policy(&p, None);
        let c = cvm();
        // A genuine report for this very CVM, but produced on node-b's chip.
        let g = guest(1, 0xB0);
        let ev = evidence_of(&p, &g, &Challenge::cvm("cvm-uid", None));
        // node-a is pinned to its own chip: mismatch.
        let a = run(&c, &spec, &ev, &[pin("node-a", 0xA0)], &[]);
        assert!(!verified(&a));
        assert_eq!(checks(&a.result), vec!["hardware-not-pinned"]);
        let msg = &a.result.findings[0].message;
        assert!(msg.contains("node node-a is pinned to"), "{msg}");
        assert!(msg.contains("deletes HostPin node-a"), "{msg}");
        // node-a has no pin yet, but node-b holds that chip: a conflict, never a re-pin.
        let a = run(&c, &spec, &ev, &[pin("node-b", 0xB0)], &[]);
        assert!(!verified(&a));
        assert_eq!(checks(&a.result), vec!["hardware-pinned-to-other-node"]);
        assert_eq!(a.host_conflict.as_deref(), Some("node-b"));
        assert_eq!(a.pin_host, None);
    }

    #[test]
    fn an_admin_pin_decides_before_first_use() {
        let p = platform(4);
        let spec = policy(&p, None);
        let c = cvm();
        let ev = evidence_of(&p, &guest(1, 0xA0), &Challenge::cvm("cvm-uid", None));
        let admin = HostPinView {
            source: "Admin",
            ..pin("node-a", 0xEE)
        };
        let a = run(&c, &spec, &ev, &[admin], &[]);
        assert!(!verified(&a));
        assert!(a.result.findings[0].message.contains("source Admin"));
    }

    fn pinned(c: &mut ConfidentialVM, g: &Guest, launched: i64) {
        let st = c.status.get_or_insert_with(Default::default);
        st.guest_instance = Some(GuestInstancePin {
            key_sha256: hex::encode(binding::key_id(&g.key)),
            report_id: Some(hex::encode(g.report_id)),
            node: "node-a".into(),
            pinned_at: Time(Timestamp::from_second(1_749_000_000).unwrap()),
            launched_at: Some(Time(Timestamp::from_second(launched).unwrap())),
            launch_id: None,
            relaunches: 0,
            previous_key_sha256: None,
            migration: None,
        });
        st.platform = Some(PlatformFacts {
            launched_at: Some(Time(Timestamp::from_second(launched).unwrap())),
            ..Default::default()
        });
    }

    #[test]
    fn another_instance_is_refused_unless_a_relaunch_shows() {
        let p = platform(4);
        let spec = policy(&p, None);
        let mut c = cvm();
        let first = guest(1, 0xA0);
        pinned(&mut c, &first, 100);
        let pins = [pin("node-a", 0xA0)];
        let second = guest(2, 0xA0);
        let ev = evidence_of(&p, &second, &Challenge::cvm("cvm-uid", None));
        let a = run(&c, &spec, &ev, &pins, &[]);
        assert!(!verified(&a));
        assert_eq!(checks(&a.result), vec!["instance-changed"]);
        assert_eq!(
            a.instance,
            c.status.as_ref().unwrap().guest_instance,
            "pin kept"
        );
        // The same instance with another REPORT_ID is another launch too.
        let replayed_key = Guest {
            report_id: [9; 32],
            ..guest(1, 0xA0)
        };
        let ev2 = evidence_of(&p, &replayed_key, &Challenge::cvm("cvm-uid", None));
        assert_eq!(
            checks(&run(&c, &spec, &ev2, &pins, &[]).result),
            vec!["instance-changed"]
        );
        // A reported relaunch moves the pin, visibly.
        c.status
            .as_mut()
            .unwrap()
            .platform
            .as_mut()
            .unwrap()
            .launched_at = Some(Time(Timestamp::from_second(200).unwrap()));
        let a = run(&c, &spec, &ev, &pins, &[]);
        assert!(verified(&a), "{:?}", a.result.findings);
        let inst = a.instance.unwrap();
        assert_eq!(inst.relaunches, 1);
        assert_eq!(
            inst.previous_key_sha256,
            Some(hex::encode(binding::key_id(&first.key)))
        );
        assert_eq!(a.repinned.map(|(_, why)| why), Some(Repin::Relaunched));
    }

    /// Regression (docs/migration.md): after a live migration's switch, the source can see
    /// the new challenge too, so evidence counts only from the target's chip, bound to the
    /// migration, from the instance that was moved; no clock decides.
    #[test]
    fn after_a_migration_only_the_moved_guest_on_the_target_counts() {
        let p = platform(4);
        let spec = policy(&p, None);
        let mut c = cvm();
        let moved = guest(1, 0xA0);
        pinned(&mut c, &moved, 100);
        c.status.as_mut().unwrap().node_name = Some("node-b".into());
        let pins = [pin("node-a", 0xA0)];
        let run_moved = |c: &ConfidentialVM, ev: &Evidence| {
            appraise(&Input {
                cvm: c,
                policy: Some(("sim-policy", &spec)),
                evidence: ev,
                now: now(),
                subject: Subject::Cvm,
                node: "node-b",
                records: Records {
                    host_pins: &pins,
                    other_instances: &[],
                },
                migration: Some("m1"),
            })
        };
        // The source's evidence from the second of the switch (not bound to the migration).
        let stale = evidence_of(&p, &moved, &Challenge::cvm("cvm-uid", None));
        let a = run_moved(&c, &stale);
        assert!(!verified(&a));
        assert!(checks(&a.result).contains(&"report-data-mismatch"));
        assert!(checks(&a.result).contains(&"hardware-pinned-to-other-node"));
        // The source answering the new challenge from its own chip.
        let after = Challenge::cvm("cvm-uid", None).after_migration(Some("m1"));
        let a = run_moved(&c, &evidence_of(&p, &moved, &after));
        assert!(!verified(&a));
        assert_eq!(checks(&a.result), vec!["hardware-pinned-to-other-node"]);
        // The target running another guest.
        let other = evidence_of(&p, &guest(2, 0xB0), &after);
        let a = run_moved(&c, &other);
        assert!(!verified(&a));
        assert_eq!(checks(&a.result), vec!["instance-not-migrated"]);
        // The moved guest on the target's chip, bound to the migration: verified.
        let on_target = Guest {
            report_id: [5; 32],
            ..guest(1, 0xB0)
        };
        let a = run_moved(&c, &evidence_of(&p, &on_target, &after));
        assert!(verified(&a), "{:?}", a.result.findings);
        assert_eq!(a.result.migration.as_deref(), Some("m1"));
        let inst = a.instance.unwrap();
        assert_eq!(inst.node, "node-b");
        assert_eq!(inst.migration.as_deref(), Some("m1"));
        assert_eq!(inst.relaunches, 0, "the same instance, moved");
        assert_eq!(a.repinned.map(|(_, w)| w), Some(Repin::Migrated));
        assert_eq!(
            a.pin_host.map(|h| h.id),
            Some(hex::encode([0xB0; 64])),
            "the target's chip is pinned on first use"
        );
    }

    #[test]
    fn one_instance_cannot_answer_for_two_cvms() {
        let p = platform(4);
        let spec = policy(&p, None);
        let c = cvm();
        let g = guest(5, 0xA0);
        // The host asks a guest it runs for another CVM to answer with this CVM's UID.
        let ev = evidence_of(&p, &g, &Challenge::cvm("cvm-uid", None));
        let others = [("d/other".to_string(), hex::encode(binding::key_id(&g.key)))];
        let a = run(&c, &spec, &ev, &[], &others);
        assert!(!verified(&a));
        assert_eq!(checks(&a.result), vec!["instance-serves-other-cvm"]);
        assert!(a.result.findings[0].message.contains("d/other"));
    }

    #[test]
    fn evidence_without_an_instance_key_is_refused() {
        let p = platform(4);
        let spec = policy(&p, None);
        let c = cvm();
        let mut ev = evidence_of(&p, &guest(1, 0xA0), &Challenge::cvm("cvm-uid", None));
        ev.instance_key = None;
        let a = run(&c, &spec, &ev, &[], &[]);
        assert!(!verified(&a));
        assert!(checks(&a.result).contains(&"instance-key-missing"));
        ev.instance_key = Some("not base64!".into());
        let a = run(&c, &spec, &ev, &[], &[]);
        assert_eq!(checks(&a.result), vec!["instance-key-undecodable"]);
    }

    #[test]
    fn a_guest_without_a_tee_is_not_confidential_whatever_the_policy_trusts() {
        let c = cvm();
        let words = "no TSM provider is registered; the guest has no /dev/sev-guest";
        let ev = Evidence {
            format: EvidenceFormat::NoTee,
            report: base64::engine::general_purpose::STANDARD.encode(words),
            cert_chain: None,
            collateral: Default::default(),
            nonce: None,
            collected_at: Time(now()),
            launch_measurement: None,
            instance_key: None,
            epoch: None,
        };
        for spec in [AttestationPolicySpec::default(), policy(&platform(4), None)] {
            let a = run(&c, &spec, &ev, &[], &[]);
            assert!(!verified(&a));
            let (ok, reason, msg) = crate::state::verdict_text(&a.result);
            assert!(!ok, "{msg}");
            assert_eq!(reason, crate::state::VerdictReason::NotConfidential);
            assert!(
                msg.contains("not confidential") && msg.contains(words),
                "{msg}"
            );
        }
    }

    #[test]
    fn sev_and_sev_es_are_never_verified_by_the_operator() {
        for tee in ["SEV", "SEV-ES"] {
            let mut c: ConfidentialVM = serde_json::from_value(serde_json::json!({
                "apiVersion": "cvmp.io/v1alpha1", "kind": "ConfidentialVM",
                "metadata": {"name": "es", "namespace": "d", "uid": "u"},
                "spec": {"tee": {"type": tee}, "resources": {"vcpus": 1, "memoryMiB": 512},
                         "boot": {"firmware": {"name": "ovmf"}},
                         "attestation": {"expectedMeasurements": ["ab".repeat(32)]}},
                "status": {"nodeName": "node-a"}
            }))
            .unwrap();
            let ev = Evidence {
                format: EvidenceFormat::SevLaunchMeasure,
                report: "AAAA".into(),
                cert_chain: None,
                collateral: Default::default(),
                nonce: None,
                collected_at: Time(now()),
                launch_measurement: Some("ab".repeat(32)),
                instance_key: None,
                epoch: None,
            };
            // Every value the host could write for its platform facts: no verdict moves.
            for simulated in [false, true] {
                c.status.as_mut().unwrap().platform = Some(PlatformFacts {
                    simulated,
                    ..Default::default()
                });
                let spec = AttestationPolicySpec::default();
                let a = run(&c, &spec, &ev, &[], &[]);
                let (ok, reason, msg) = crate::state::verdict_text(&a.result);
                assert!(!ok, "{tee}: {msg}");
                assert_eq!(
                    reason,
                    crate::state::VerdictReason::OwnerVerificationRequired
                );
                assert!(msg.contains("TIK"), "{msg}");
            }
        }
    }

    #[test]
    fn staleness_counts_from_when_the_operator_first_saw_the_report() {
        let p = platform(4);
        let mut spec = policy(&p, None);
        spec.max_evidence_age = Some("1h".into());
        let mut c = cvm();
        let mut ev = evidence_of(&p, &guest(1, 0xA0), &Challenge::cvm("cvm-uid", None));
        let first = run(&c, &spec, &ev, &[], &[]).result;
        assert_eq!(first.evidence_seen_at, Some(Time(now())));
        c.status.as_mut().unwrap().attestation = Some(AttestationResult {
            evidence_seen_at: Some(Time(
                Timestamp::from_second(now().as_second() - 7200).unwrap(),
            )),
            ..first
        });
        // The host claims the same report is brand new: the operator's record wins.
        ev.collected_at = Time(now());
        let a = run(&c, &spec, &ev, &[], &[]);
        assert!(!verified(&a));
        assert_eq!(checks(&a.result), vec!["evidence-stale"]);
    }

    /// Every field a node plugin may write (status.platform, status.evidence, the Launched
    /// condition): none of them turns a refused CVM Verified.
    #[test]
    fn no_plugin_writable_field_turns_a_refused_cvm_verified() {
        let p = platform(4);
        let spec = policy(&p, None);
        let g = guest(1, 0xA0);
        let good = evidence_of(&p, &g, &Challenge::cvm("cvm-uid", None));
        let foreign = evidence_of(&p, &guest(7, 0xB0), &Challenge::cvm("other-uid", None));
        let pins = [pin("node-a", 0xA0), pin("node-b", 0xB0)];
        // Refused states: another CVM's evidence from another node; and good evidence
        // under a policy that does not trust the simulator root.
        let untrusting = AttestationPolicySpec::default();
        let states: Vec<(&AttestationPolicySpec, &Evidence)> =
            vec![(&spec, &foreign), (&untrusting, &good)];
        let facts = [
            PlatformFacts::default(),
            PlatformFacts {
                simulated: false,
                guest_state: Some(cvm_crds::cvm::GuestState::Running),
                computed_measurement: Some("00".repeat(48)),
                launch_policy: Some("30000".into()),
                firmware_version: Some("1.55.21".into()),
                launched_at: Some(Time(now())),
                ..Default::default()
            },
            PlatformFacts {
                simulated: true,
                ..Default::default()
            },
        ];
        for (pol, base) in states {
            for fact in &facts {
                let evs = [
                    base.clone(),
                    Evidence {
                        nonce: Some("abcd".into()),
                        ..base.clone()
                    },
                    Evidence {
                        collected_at: Time(Timestamp::from_second(now().as_second() + 5).unwrap()),
                        ..base.clone()
                    },
                    Evidence {
                        launch_measurement: Some("00".repeat(48)),
                        ..base.clone()
                    },
                    Evidence {
                        instance_key: good.instance_key.clone(),
                        ..base.clone()
                    },
                ];
                for ev in &evs {
                    let mut c = cvm();
                    let st = c.status.as_mut().unwrap();
                    st.platform = Some(fact.clone());
                    st.conditions = vec![cvm_crds::conditions::new_condition(
                        cvm_crds::ConditionType::Launched,
                        true,
                        "Launched",
                        "",
                        None,
                        Time(now()),
                    )];
                    let a = run(&c, pol, ev, &pins, &[]);
                    assert!(
                        !verified(&a),
                        "plugin-written {fact:?} / {ev:?} turned it Verified"
                    );
                }
            }
        }
    }

    #[test]
    fn target_evidence_answers_the_migration_challenge_not_the_cvms() {
        let p = platform(4);
        let spec = policy(&p, None);
        let c = cvm();
        let g = guest(1, 0xA0);
        let ev = evidence_of(&p, &g, &Challenge::migration("migration-uid"));
        let with = appraise(&Input {
            cvm: &c,
            policy: Some(("sim-policy", &spec)),
            evidence: &ev,
            now: now(),
            subject: Subject::Migration("migration-uid"),
            node: "node-b",
            records: Records::default(),
            migration: None,
        });
        assert_eq!(
            with.result.status,
            EarStatus::Affirming,
            "{:?}",
            with.result.findings
        );
        assert_eq!(with.result.policy.as_deref(), Some("sim-policy"));
        // The same report read as the CVM's own evidence does not answer its UID: a
        // receiving guest's report cannot stand in for the running guest's, nor the reverse.
        let without = run(&c, &spec, &ev, &[], &[]);
        assert_eq!(without.result.status, EarStatus::Contraindicated);
        assert!(
            checks(&without.result).contains(&"report-data-mismatch"),
            "{:?}",
            without.result.findings
        );
        // Evidence for another migration is refused too.
        let other = evidence_of(&p, &g, &Challenge::migration("other-migration"));
        let r = appraise(&Input {
            cvm: &c,
            policy: Some(("sim-policy", &spec)),
            evidence: &other,
            now: now(),
            subject: Subject::Migration("migration-uid"),
            node: "node-b",
            records: Records::default(),
            migration: None,
        });
        assert!(checks(&r.result).contains(&"report-data-mismatch"));
    }

    #[test]
    fn a_target_below_the_minimum_tcb_is_named() {
        let p = platform(1);
        let spec = policy(&p, Some(3));
        let c = cvm();
        let ev = evidence_of(&p, &guest(1, 0xA0), &Challenge::migration("migration-uid"));
        let r = appraise(&Input {
            cvm: &c,
            policy: Some(("sim-policy", &spec)),
            evidence: &ev,
            now: now(),
            subject: Subject::Migration("migration-uid"),
            node: "node-b",
            records: Records::default(),
            migration: None,
        })
        .result;
        assert_eq!(r.status, EarStatus::Contraindicated);
        assert_eq!(checks(&r), vec!["tcb-bootloader-below-minimum"]);
        let (ok, _, msg) = crate::state::verdict_text(&r);
        assert!(!ok);
        assert!(
            msg.contains("bootloader SPL 1 is below the minimum 3"),
            "{msg}"
        );
    }

    #[test]
    fn host_and_instance_decisions() {
        let hw = HardwareId {
            kind: HardwareIdKind::SnpChipId,
            id: "aa".into(),
        };
        let p = |n: &str, id: &str| HostPinView {
            node: n.into(),
            kind: HardwareIdKind::SnpChipId,
            id: id.into(),
            source: "Admin",
        };
        assert_eq!(check_host("n1", None, &[]), HostCheck::Unproven);
        assert_eq!(check_host("n1", Some(&hw), &[]), HostCheck::FirstUse);
        assert_eq!(
            check_host("n1", Some(&hw), &[p("n1", "AA")]),
            HostCheck::Pinned
        );
        assert!(matches!(
            check_host("n1", Some(&hw), &[p("n1", "bb")]),
            HostCheck::Mismatch { .. }
        ));
        assert_eq!(
            check_host("n1", Some(&hw), &[p("n2", "aa")]),
            HostCheck::ClaimedBy { node: "n2".into() }
        );
        let tdx = HardwareId {
            kind: HardwareIdKind::TdxPlatformId,
            id: "aa".into(),
        };
        assert_eq!(
            check_host("n1", Some(&tdx), &[p("n2", "aa")]),
            HostCheck::FirstUse
        );

        let t = |s: i64| Timestamp::from_second(s).unwrap();
        let pin = GuestInstancePin {
            key_sha256: "k1".into(),
            report_id: Some("r1".into()),
            node: "n1".into(),
            pinned_at: Time(t(100)),
            launched_at: Some(Time(t(90))),
            launch_id: None,
            relaunches: 0,
            previous_key_sha256: None,
            migration: None,
        };
        let at = |s: i64| LaunchMark {
            id: None,
            at: Some(t(s)),
        };
        let none = LaunchMark::default();
        let id = |k: &str, r: &str| InstanceId {
            key_sha256: k.into(),
            report_id: Some(r.into()),
        };
        assert_eq!(
            check_instance(None, &id("k1", "r1"), &none, None, &[]),
            InstanceCheck::First
        );
        assert_eq!(
            check_instance(Some(&pin), &id("k1", "r1"), &at(90), None, &[]),
            InstanceCheck::Same
        );
        assert_eq!(
            check_instance(Some(&pin), &id("k2", "r2"), &at(90), None, &[]),
            InstanceCheck::Changed
        );
        assert_eq!(
            check_instance(Some(&pin), &id("k2", "r2"), &at(95), None, &[]),
            InstanceCheck::Repin(Repin::Relaunched)
        );
        // After a migration's switch: the moved instance keeps its key (its REPORT_ID may
        // be the target's); another key is not the moved guest, relaunch or not.
        assert_eq!(
            check_instance(Some(&pin), &id("k1", "r2"), &at(90), Some("m1"), &[]),
            InstanceCheck::Repin(Repin::Migrated)
        );
        assert_eq!(
            check_instance(Some(&pin), &id("k2", "r2"), &at(95), Some("m1"), &[]),
            InstanceCheck::NotTheMovedInstance
        );
        let moved = GuestInstancePin {
            migration: Some("m1".into()),
            ..pin.clone()
        };
        assert_eq!(
            check_instance(Some(&moved), &id("k1", "r1"), &at(90), Some("m1"), &[]),
            InstanceCheck::Same
        );
        assert_eq!(
            check_instance(
                Some(&pin),
                &id("k1", "r1"),
                &none,
                None,
                &[("d/x".into(), "K1".into())]
            ),
            InstanceCheck::ServesOther("d/x".into())
        );
        // A launch ID tells a relaunch within the pinned second from a swap.
        let with_id = GuestInstancePin {
            launch_id: Some("l1".into()),
            ..pin.clone()
        };
        let launch = |l: &str| LaunchMark {
            id: Some(l.into()),
            at: Some(t(90)),
        };
        assert_eq!(
            check_instance(Some(&with_id), &id("k2", "r2"), &launch("l2"), None, &[]),
            InstanceCheck::Repin(Repin::Relaunched)
        );
        assert_eq!(
            check_instance(
                Some(&with_id),
                &id("k2", "r2"),
                &LaunchMark {
                    id: Some("l1".into()),
                    at: Some(t(95)),
                },
                None,
                &[]
            ),
            InstanceCheck::Changed,
            "another key under the pinned launch is a swap, even with a later launchedAt"
        );
        assert_eq!(
            check_instance(Some(&with_id), &id("k1", "r1"), &launch("l1"), None, &[]),
            InstanceCheck::Same
        );
    }
}
