//! The status this plugin writes, built without a client: `status.platform`,
//! `status.evidence` and the `Launched` condition, nothing else. The caller applies it
//! with server-side apply under [`MANAGER_NODE_PLUGIN`], so fields it omits stay with
//! their owners (the operator's conditions, `phase`, `nodeName`, `attestation`).
//!
//! On a `ConfidentialVMMigration` the plugin writes its share of the protocol
//! (docs/migration.md): the target `targetEvidence` and `TargetPrepared`
//! ([`MIGRATION_TARGET_MANAGER`]), the source `Transferred` ([`MIGRATION_SOURCE_MANAGER`]).

use cvm_crds::conditions::{self, new_condition};
use cvm_crds::cvm::{ConfidentialVM, Evidence, GuestState, PlatformFacts};
use cvm_crds::migration::ConfidentialVMMigration;
use cvm_crds::wellknown::MANAGER_NODE_PLUGIN;
use cvm_crds::{ConditionType, TeeType};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use serde_json::{json, Value};

use crate::migrate_plan::CondState;
use crate::platform::{GuestInfo, HostCapabilities};

/// Field manager of every write (re-exported for callers and tests).
pub const FIELD_MANAGER: &str = MANAGER_NODE_PLUGIN;

/// Condition reason when the guest runs.
pub const REASON_RUNNING: &str = "GuestRunning";
/// Condition reason when the guest was stopped (deletion or `Halted`).
pub const REASON_STOPPED: &str = "GuestStopped";
/// Condition reason when a launched guest died (its QEMU exited).
pub const REASON_FAILED: &str = "GuestFailed";

/// Field manager of the target's writes to a migration's status (`targetEvidence`,
/// `TargetPrepared`).
pub const MIGRATION_TARGET_MANAGER: &str = MANAGER_NODE_PLUGIN;
/// Field manager of the source's writes to a migration's status (`Transferred`). Not the
/// target's: server-side apply removes the fields a manager applied before and omits now,
/// so under one name the source's `Transferred` would delete the target's evidence and
/// `TargetPrepared` from the record.
pub const MIGRATION_SOURCE_MANAGER: &str = "cvm-node-plugin-source";

/// `TargetPrepared=True`: the receiving guest runs and its evidence is in `targetEvidence`.
pub const REASON_TARGET_READY: &str = "ReceivingGuestReady";
/// `TargetPrepared=False`: the migration names a CVM that does not exist.
pub const REASON_CVM_NOT_FOUND: &str = "CVMNotFound";
/// `TargetPrepared=False` / `Transferred=False`: the CVM of that name is another object
/// than the one the migration refers to (deleted and re-created).
pub const REASON_CVM_REPLACED: &str = "CVMReplaced";
/// `TargetPrepared=False`: the CVM's spec cannot make a launch request.
pub const REASON_INVALID_SPEC: &str = "InvalidSpec";
/// `Transferred=Unknown`: the guest's state is being sent.
pub const REASON_TRANSFERRING: &str = "Transferring";
/// `Transferred=True`.
pub const REASON_TRANSFERRED: &str = "Transferred";
/// `Transferred=False`: the guest keeps running at the source.
pub const REASON_TRANSFER_FAILED: &str = "TransferFailed";

/// Unix seconds as a Kubernetes time.
pub fn time_from_unix(secs: i64) -> Time {
    Time(Timestamp::from_second(secs).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// The `Launched` condition, keeping the existing transition time when the status does
/// not change (a transition time that moved on every write would make each write a change).
pub fn launched_condition(
    cvm: &ConfidentialVM,
    status: bool,
    reason: &str,
    message: String,
    now: Time,
) -> Condition {
    let mut existing: Vec<Condition> = cvm
        .condition(ConditionType::Launched)
        .cloned()
        .into_iter()
        .collect();
    let new = new_condition(
        ConditionType::Launched,
        status,
        reason,
        message,
        cvm.metadata.generation,
        now,
    );
    conditions::set_condition(&mut existing, new.clone());
    existing.pop().unwrap_or(new)
}

/// Platform facts for a guest on a host with `caps`.
pub fn facts(
    caps: &HostCapabilities,
    guest: &GuestInfo,
    state: GuestState,
    message: Option<String>,
) -> PlatformFacts {
    PlatformFacts {
        guest_state: Some(state),
        simulated: caps.simulated,
        firmware_version: caps.firmware_version.clone(),
        snp_tcb: if guest.tee == TeeType::SevSnp {
            caps.snp_tcb
        } else {
            None
        },
        tdx_tcb_status: if guest.tee == TeeType::Tdx {
            caps.tdx_tcb_status
        } else {
            None
        },
        launch_policy: Some(format!("{:#x}", guest.launch_policy)),
        computed_measurement: (!guest.measurement.is_empty())
            .then(|| hex::encode(&guest.measurement)),
        launched_at: Some(time_from_unix(guest.launched_at)),
        launch_id: (!guest.launch_id.is_empty()).then(|| guest.launch_id.clone()),
        message,
    }
}

/// Facts when no guest is held (a stop reported after the guest was already gone, or a
/// launch that failed before a guest existed).
pub fn facts_without_guest(
    caps: &HostCapabilities,
    state: GuestState,
    message: Option<String>,
) -> PlatformFacts {
    PlatformFacts {
        guest_state: Some(state),
        simulated: caps.simulated,
        firmware_version: caps.firmware_version.clone(),
        message,
        ..Default::default()
    }
}

/// A condition of type `type_` for the migration `m`, keeping the existing transition
/// time when the status does not change (as [`launched_condition`] does).
pub fn migration_condition(
    m: &ConfidentialVMMigration,
    type_: &str,
    status: CondState,
    reason: &str,
    message: String,
    now: Time,
) -> Condition {
    let existing = m
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_));
    let last_transition_time = match existing {
        Some(c) if c.status == status.as_str() => c.last_transition_time.clone(),
        _ => now,
    };
    Condition {
        type_: type_.to_string(),
        status: status.as_str().to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: m.metadata.generation,
        last_transition_time,
    }
}

/// The apply patch of a migration's status: one condition, and the receiving guest's
/// evidence when the target reports it; nothing of the operator's.
pub fn migration_patch(condition: &Condition, target_evidence: Option<&Evidence>) -> Value {
    let mut status = json!({ "conditions": [condition] });
    if let Some(e) = target_evidence {
        status["targetEvidence"] = json!(e);
    }
    json!({
        "apiVersion": format!("{}/{}", cvm_crds::GROUP, cvm_crds::VERSION),
        "kind": "ConfidentialVMMigration",
        "status": status,
    })
}

/// The apply patch: exactly the fields this plugin owns.
pub fn apply_patch(
    platform: &PlatformFacts,
    evidence: Option<&Evidence>,
    launched: &Condition,
) -> Value {
    let mut status = json!({
        "platform": platform,
        "conditions": [launched],
    });
    if let Some(e) = evidence {
        status["evidence"] = json!(e);
    }
    json!({
        "apiVersion": format!("{}/{}", cvm_crds::GROUP, cvm_crds::VERSION),
        "kind": "ConfidentialVM",
        "status": status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cvm_crds::cvm::ConfidentialVMStatus;

    fn cvm_with(conds: Vec<Condition>) -> ConfidentialVM {
        let spec: cvm_crds::ConfidentialVMSpec = serde_yaml::from_str(
            "tee: {type: TDX}\nresources: {vcpus: 1, memoryMiB: 512}\nboot: {firmware: {name: tdvf}}\n",
        )
        .unwrap();
        let mut c = ConfidentialVM::new("x", spec);
        c.metadata.generation = Some(3);
        c.status = Some(ConfidentialVMStatus {
            conditions: conds,
            ..Default::default()
        });
        c
    }

    #[test]
    fn condition_keeps_transition_time_while_status_holds() {
        let old = new_condition(
            ConditionType::Launched,
            true,
            REASON_RUNNING,
            "m",
            Some(1),
            time_from_unix(100),
        );
        let c = cvm_with(vec![old]);
        let same = launched_condition(&c, true, REASON_RUNNING, "m2".into(), time_from_unix(200));
        assert_eq!(same.last_transition_time, time_from_unix(100));
        assert_eq!(same.observed_generation, Some(3));
        assert_eq!(same.message, "m2");
        let flipped = launched_condition(
            &c,
            false,
            REASON_STOPPED,
            "stopped".into(),
            time_from_unix(300),
        );
        assert_eq!(flipped.last_transition_time, time_from_unix(300));
        assert_eq!(flipped.status, "False");
        let first = launched_condition(
            &cvm_with(vec![]),
            true,
            REASON_RUNNING,
            "m".into(),
            time_from_unix(5),
        );
        assert_eq!(first.last_transition_time, time_from_unix(5));
    }

    #[test]
    fn patch_holds_only_owned_fields() {
        let caps = crate::config::SimConfig {
            tees: vec![TeeType::Tdx],
            ..Default::default()
        }
        .capabilities();
        let g = GuestInfo {
            uid: "u".into(),
            namespace: "ns".into(),
            name: "x".into(),
            tee: TeeType::Tdx,
            state: GuestState::Running,
            measurement: vec![1; 48],
            launch_policy: 1 << 29,
            launched_at: 10,
            launch_id: "a1".into(),
            message: None,
        };
        let f = facts(&caps, &g, GuestState::Running, None);
        assert_eq!(f.launch_policy.as_deref(), Some("0x20000000"));
        assert_eq!(f.tdx_tcb_status, Some(cvm_crds::TdxTcbStatus::UpToDate));
        assert_eq!(f.snp_tcb, None);
        let cond = launched_condition(
            &cvm_with(vec![]),
            true,
            REASON_RUNNING,
            "m".into(),
            time_from_unix(1),
        );
        let p = apply_patch(&f, None, &cond);
        let status = p["status"].as_object().unwrap();
        let mut keys: Vec<&str> = status.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["conditions", "platform"]);
        assert_eq!(p["status"]["conditions"][0]["type"], "Launched");
        assert_eq!(p["status"]["platform"]["guestState"], "Running");
        assert_eq!(p["kind"], "ConfidentialVM");
    }

    #[test]
    fn migration_patch_holds_one_condition_and_the_target_evidence_only() {
        let mut m: ConfidentialVMMigration = serde_json::from_value(json!({
            "apiVersion": "cvmp.io/v1alpha1", "kind": "ConfidentialVMMigration",
            "metadata": {"name": "mv", "namespace": "ns", "uid": "mu", "generation": 2},
            "spec": {"cvmName": "web"},
            "status": {"phase": "Transferring", "sourceNode": "a", "targetNode": "b",
                "conditions": [{"type": "Transferred", "status": "Unknown", "reason": "Transferring",
                    "message": "sending", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        }))
        .unwrap();
        let still = migration_condition(
            &m,
            "Transferred",
            CondState::Unknown,
            REASON_TRANSFERRING,
            "still sending".into(),
            time_from_unix(1_800_000_000),
        );
        assert_eq!(still.last_transition_time, time_from_unix(1_767_225_600));
        assert_eq!(still.observed_generation, Some(2));
        let done = migration_condition(
            &m,
            "Transferred",
            CondState::True,
            REASON_TRANSFERRED,
            "sent".into(),
            time_from_unix(1_800_000_000),
        );
        assert_eq!(done.last_transition_time, time_from_unix(1_800_000_000));
        assert_eq!(done.status, "True");
        let p = migration_patch(&done, None);
        assert_eq!(p["kind"], "ConfidentialVMMigration");
        assert_eq!(p["apiVersion"], "cvmp.io/v1alpha1");
        let keys: Vec<&String> = p["status"].as_object().unwrap().keys().collect();
        assert_eq!(keys, ["conditions"]);
        assert_eq!(p["status"]["conditions"].as_array().unwrap().len(), 1);

        m.status = None;
        let ready = migration_condition(
            &m,
            "TargetPrepared",
            CondState::True,
            REASON_TARGET_READY,
            "ready".into(),
            time_from_unix(5),
        );
        let ev = Evidence {
            format: cvm_crds::EvidenceFormat::SevSnpReport,
            report: "AA==".into(),
            cert_chain: None,
            collateral: Default::default(),
            nonce: None,
            collected_at: time_from_unix(5),
            launch_measurement: None,
            instance_key: None,
            epoch: None,
        };
        let p = migration_patch(&ready, Some(&ev));
        let mut keys: Vec<&String> = p["status"].as_object().unwrap().keys().collect();
        keys.sort();
        assert_eq!(keys, ["conditions", "targetEvidence"]);
        assert_eq!(p["status"]["targetEvidence"]["format"], "sev-snp-report");
        assert_ne!(MIGRATION_SOURCE_MANAGER, MIGRATION_TARGET_MANAGER);
    }
}
