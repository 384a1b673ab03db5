//! The status this plugin writes, built without a client: `status.platform`,
//! `status.evidence` and the `Launched` condition, nothing else. The caller applies it
//! with server-side apply under [`MANAGER_NODE_PLUGIN`], so fields it omits stay with
//! their owners (the operator's conditions, `phase`, `nodeName`, `attestation`).

use cvm_crds::conditions::{self, new_condition};
use cvm_crds::cvm::{ConfidentialVM, Evidence, GuestState, PlatformFacts};
use cvm_crds::wellknown::MANAGER_NODE_PLUGIN;
use cvm_crds::{ConditionType, TeeType};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use serde_json::{json, Value};

use crate::platform::{GuestInfo, HostCapabilities};

/// Field manager of every write (re-exported for callers and tests).
pub const FIELD_MANAGER: &str = MANAGER_NODE_PLUGIN;

/// Condition reason when the guest runs.
pub const REASON_RUNNING: &str = "GuestRunning";
/// Condition reason when the guest was stopped (deletion or `Halted`).
pub const REASON_STOPPED: &str = "GuestStopped";
/// Condition reason when a launched guest died (its QEMU exited).
pub const REASON_FAILED: &str = "GuestFailed";

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
}
