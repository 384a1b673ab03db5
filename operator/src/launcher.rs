//! The launcher Pod of a placed CVM (DESIGN §5): one Pod owned by the CVM, pinned to its
//! node, requesting what the guest uses (cpu, memory, one TEE key, one `/dev/kvm` share),
//! so kube-scheduler and kubelet check and count them like any workload's. The placement
//! (TEE, key capacity, TCB, selectors) stays the operator's; the Pod only makes kubelet
//! the accountant of the node's keys. Pure builders and readings; the controller does the
//! I/O.

use cvm_crds::cvm::RunStrategy;
use cvm_crds::wellknown::{
    tee_resource, LAUNCHER_COMPONENT as COMPONENT, LAUNCHER_SOCKET_VOLUME as SOCKET_VOLUME,
    RESOURCE_KVM,
};
use cvm_crds::ConfidentialVM;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use serde_json::json;

/// Label naming a launcher pod's CVM (in the CVM's namespace).
pub const LABEL_CVM: &str = "cvmp.io/cvm";
use cvm_crds::wellknown::LAUNCHER_DIR as SOCKET_DIR;

/// How launcher pods are made (operator flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LauncherOptions {
    /// The launcher image.
    pub image: String,
    /// `IfNotPresent`, `Always` or `Never`.
    pub pull_policy: String,
    /// CPU requested per vCPU, in millicores (KubeVirt's default ratio 1/10: 100).
    pub cpu_milli_per_vcpu: u32,
    /// Memory beyond the guest's for QEMU and the launcher, in MiB.
    pub memory_overhead_mib: u32,
}

/// The launcher pod's name: deterministic, so a CVM never has two (a create of an
/// existing name fails instead).
pub fn pod_name(cvm_name: &str) -> String {
    const SUFFIX: &str = "-launcher";
    // Pod names are DNS subdomains (253); CVM names fit with room for the suffix, but
    // keep the result valid whatever the input.
    let keep = 253 - SUFFIX.len();
    let base: String = cvm_name.chars().take(keep).collect();
    format!("{}{SUFFIX}", base.trim_end_matches(['-', '.']))
}

/// The pod of `cvm` on `node`. `None` when the CVM lacks what an owner reference needs
/// (its UID: never for an object read from the API server).
pub fn launcher_pod(cvm: &ConfidentialVM, node: &str, o: &LauncherOptions) -> Option<Pod> {
    let name = cvm.metadata.name.as_deref()?;
    let uid = cvm.metadata.uid.as_deref()?;
    let ns = cvm.metadata.namespace.as_deref()?;
    let r = &cvm.spec.resources;
    let cpu = format!(
        "{}m",
        u64::from(r.vcpus) * u64::from(o.cpu_milli_per_vcpu.max(1))
    );
    let memory = format!(
        "{}Mi",
        u64::from(r.memory_mib) + u64::from(o.memory_overhead_mib)
    );
    // The CVM's own labels, so Services and selectors that pick CVMs pick their pods.
    let mut labels = cvm.labels().clone();
    labels.retain(|k, _| !k.starts_with("cvmp.io/"));
    labels.insert(LABEL_CVM.into(), name.into());
    labels.insert("app.kubernetes.io/component".into(), COMPONENT.into());
    labels.insert("app.kubernetes.io/managed-by".into(), "cvm-operator".into());
    let key = tee_resource(cvm.tee_type());
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(name),
            "namespace": ns,
            "labels": labels,
            "ownerReferences": [{
                "apiVersion": "cvmp.io/v1alpha1",
                "kind": "ConfidentialVM",
                "name": name,
                "uid": uid,
                "controller": true,
                "blockOwnerDeletion": true,
            }],
        },
        "spec": {
            // kube-scheduler still checks cpu, memory, keys and taints on the node the
            // operator chose; it may not pick another.
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{
                    "key": "kubernetes.io/hostname", "operator": "In", "values": [node],
                }]}],
            }}},
            // The guest's life is the pod's: a failed pod is the CVM's to decide on
            // (runStrategy), not kubelet's to restart.
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "enableServiceLinks": false,
            "terminationGracePeriodSeconds": 30,
            "securityContext": {
                "runAsNonRoot": true,
                "runAsUser": 65532,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [{
                "name": "launcher",
                "image": o.image,
                "imagePullPolicy": o.pull_policy,
                "command": ["/usr/local/bin/cvm-launcher"],
                "args": [format!("--socket-dir={SOCKET_DIR}"), format!("--cvm={ns}/{name}")],
                "resources": {
                    "requests": {"cpu": cpu, "memory": memory, key: "1", RESOURCE_KVM: "1"},
                    "limits": {"memory": memory, key: "1", RESOURCE_KVM: "1"},
                },
                "securityContext": {
                    "allowPrivilegeEscalation": false,
                    "readOnlyRootFilesystem": true,
                    "capabilities": {"drop": ["ALL"]},
                },
                "volumeMounts": [{"name": SOCKET_VOLUME, "mountPath": SOCKET_DIR}],
            }],
            "volumes": [{"name": SOCKET_VOLUME, "emptyDir": {}}],
        },
    }))
    .ok()
}

/// The node a launcher pod is pinned to (its required hostname affinity).
pub fn pinned_node(pod: &Pod) -> Option<&str> {
    let terms = &pod
        .spec
        .as_ref()?
        .affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms;
    terms
        .iter()
        .flat_map(|t| t.match_expressions.iter().flatten())
        .find(|e| e.key == "kubernetes.io/hostname" && e.operator == "In")
        .and_then(|e| e.values.as_ref()?.first())
        .map(String::as_str)
}

/// What a launcher pod says about the CVM's guest host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodReading {
    /// Not created yet, or gone.
    Absent,
    /// Being deleted.
    Terminating,
    /// Waiting for the scheduler or kubelet.
    Pending,
    /// The scheduler refused it; its words.
    Unschedulable(String),
    /// kubelet refused or ended it (OutOfmemory, UnexpectedAdmissionError, Evicted, an
    /// image error…): reason and message, verbatim.
    Refused { reason: String, message: String },
    /// Its container runs.
    Running,
}

/// What to do with a CVM's launcher pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodAction {
    Create,
    Delete,
    Keep,
}

/// Decides from the pod as it stands, the node the CVM is bound to and its run strategy.
/// A pod pinned to another node (the CVM moved) goes, and so does a Halted CVM's, and a
/// refused one that Always or RerunOnFailure replace; a new pod is created only once the
/// old is gone, so a CVM never has two. Returns what the status should read too.
pub fn pod_action(pod: Option<&Pod>, node: &str, strategy: RunStrategy) -> (PodAction, PodReading) {
    let halted = strategy == RunStrategy::Halted;
    let Some(pod) = pod else {
        return if halted {
            (PodAction::Keep, PodReading::Absent)
        } else {
            (PodAction::Create, PodReading::Pending)
        };
    };
    let reading = read_pod(Some(pod));
    if reading == PodReading::Terminating {
        return (PodAction::Keep, reading);
    }
    if pinned_node(pod) != Some(node) || halted {
        return (PodAction::Delete, PodReading::Terminating);
    }
    let replaced = matches!(strategy, RunStrategy::Always | RunStrategy::RerunOnFailure);
    match reading {
        PodReading::Refused { .. } if replaced => (PodAction::Delete, reading),
        _ => (PodAction::Keep, reading),
    }
}

/// Reads a launcher pod's status.
pub fn read_pod(pod: Option<&Pod>) -> PodReading {
    let Some(pod) = pod else {
        return PodReading::Absent;
    };
    if pod.metadata.deletion_timestamp.is_some() {
        return PodReading::Terminating;
    }
    let Some(st) = pod.status.as_ref() else {
        return PodReading::Pending;
    };
    let phase = st.phase.as_deref().unwrap_or("Pending");
    if phase == "Failed" {
        return PodReading::Refused {
            reason: st.reason.clone().unwrap_or_else(|| "Failed".into()),
            message: st
                .message
                .clone()
                .unwrap_or_else(|| "the launcher pod failed; kubectl describe pod says why".into()),
        };
    }
    if phase == "Succeeded" {
        return PodReading::Refused {
            reason: "LauncherExited".into(),
            message: "the launcher pod's container exited".into(),
        };
    }
    // An image kubelet cannot pull or run: its waiting reason.
    let waiting = st
        .container_statuses
        .iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.waiting.as_ref())
        .find(|w| {
            matches!(
                w.reason.as_deref(),
                Some(
                    "ErrImagePull"
                        | "ImagePullBackOff"
                        | "ErrImageNeverPull"
                        | "InvalidImageName"
                        | "CreateContainerError"
                        | "CreateContainerConfigError"
                )
            )
        });
    if let Some(w) = waiting {
        return PodReading::Refused {
            reason: w.reason.clone().unwrap_or_default(),
            message: w.message.clone().unwrap_or_default(),
        };
    }
    let unschedulable = st.conditions.iter().flatten().find(|c| {
        c.type_ == "PodScheduled"
            && c.status == "False"
            && c.reason.as_deref() == Some("Unschedulable")
    });
    if let Some(c) = unschedulable {
        return PodReading::Unschedulable(c.message.clone().unwrap_or_default());
    }
    if phase == "Running" {
        return PodReading::Running;
    }
    PodReading::Pending
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cvm() -> ConfidentialVM {
        serde_json::from_value(json!({
            "apiVersion": "cvmp.io/v1alpha1", "kind": "ConfidentialVM",
            "metadata": {"name": "web", "namespace": "team-a", "uid": "u-1",
                         "labels": {"app": "web", "cvmp.io/node": "n1"}},
            "spec": {"tee": {"type": "SEV-SNP"}, "resources": {"vcpus": 4, "memoryMiB": 2048},
                     "boot": {"firmware": {"name": "ovmf"}}}
        }))
        .unwrap()
    }

    fn opts() -> LauncherOptions {
        LauncherOptions {
            image: "cvm-launcher:dev".into(),
            pull_policy: "IfNotPresent".into(),
            cpu_milli_per_vcpu: 100,
            memory_overhead_mib: 256,
        }
    }

    #[test]
    fn the_pod_requests_what_the_guest_uses_on_the_chosen_node() {
        let pod = launcher_pod(&cvm(), "n1", &opts()).unwrap();
        assert_eq!(pod.metadata.name.as_deref(), Some("web-launcher"));
        assert_eq!(pinned_node(&pod), Some("n1"));
        let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.uid.as_str(), owner.controller), ("u-1", Some(true)));
        let labels = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(labels.get(LABEL_CVM).map(String::as_str), Some("web"));
        assert_eq!(labels.get("app").map(String::as_str), Some("web"));
        assert!(
            !labels.contains_key("cvmp.io/node"),
            "the operator's labels stay on the CVM"
        );
        let c = &pod.spec.as_ref().unwrap().containers[0];
        let req = c.resources.as_ref().unwrap().requests.as_ref().unwrap();
        assert_eq!(req["cpu"].0, "400m");
        assert_eq!(req["memory"].0, "2304Mi");
        assert_eq!(req["sev-snp.amd.com/esids"].0, "1");
        assert_eq!(req[RESOURCE_KVM].0, "1");
        let lim = c.resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert_eq!(
            lim["sev-snp.amd.com/esids"].0, "1",
            "extended resources need limits"
        );
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.privileged, None);
        assert_eq!(sc.allow_privilege_escalation, Some(false));
    }

    #[test]
    fn pod_names_are_deterministic_and_valid() {
        assert_eq!(pod_name("a"), "a-launcher");
        let long = "x".repeat(253);
        let n = pod_name(&long);
        assert!(n.len() <= 253 && n.ends_with("-launcher"), "{n}");
        assert_eq!(pod_name(&long), n);
    }

    #[test]
    fn a_cvm_has_one_pod_on_its_node_as_its_run_strategy_says() {
        use RunStrategy::*;
        let mine = launcher_pod(&cvm(), "n1", &opts()).unwrap();
        let act = |p: Option<&Pod>, node: &str, s: RunStrategy| pod_action(p, node, s).0;
        assert_eq!(act(None, "n1", Always), PodAction::Create);
        assert_eq!(
            pod_action(None, "n1", Halted),
            (PodAction::Keep, PodReading::Absent)
        );
        assert_eq!(act(Some(&mine), "n1", Always), PodAction::Keep);
        // Moved, or Halted: the pod goes (and only once).
        assert_eq!(
            pod_action(Some(&mine), "n2", Always),
            (PodAction::Delete, PodReading::Terminating)
        );
        assert_eq!(act(Some(&mine), "n1", Halted), PodAction::Delete);
        let mut going = mine.clone();
        going.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        assert_eq!(
            pod_action(Some(&going), "n2", Always),
            (PodAction::Keep, PodReading::Terminating)
        );
        // Refused: replaced by Always and RerunOnFailure, kept by Manual.
        let mut refused = mine.clone();
        refused.status = Some(
            serde_json::from_value(json!({"phase": "Failed", "reason": "Evicted", "message": "m"}))
                .unwrap(),
        );
        let (a, r) = pod_action(Some(&refused), "n1", RerunOnFailure);
        assert_eq!(a, PodAction::Delete);
        assert!(matches!(r, PodReading::Refused { reason, .. } if reason == "Evicted"));
        assert_eq!(act(Some(&refused), "n1", Manual), PodAction::Keep);
    }

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p"}, "status": status})).unwrap()
    }

    #[test]
    fn what_the_scheduler_and_kubelet_said_is_read_verbatim() {
        assert_eq!(read_pod(None), PodReading::Absent);
        assert_eq!(
            read_pod(Some(&pod(json!({"phase": "Pending"})))),
            PodReading::Pending
        );
        assert_eq!(
            read_pod(Some(&pod(json!({"phase": "Running"})))),
            PodReading::Running
        );
        let refused = pod(json!({"phase": "Pending", "conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 Insufficient sev-snp.amd.com/esids."}]}));
        assert_eq!(
            read_pod(Some(&refused)),
            PodReading::Unschedulable(
                "0/3 nodes are available: 3 Insufficient sev-snp.amd.com/esids.".into()
            )
        );
        let oom = pod(json!({"phase": "Failed", "reason": "OutOfmemory",
            "message": "Pod was rejected: Node didn't have enough resource: memory"}));
        assert_eq!(
            read_pod(Some(&oom)),
            PodReading::Refused {
                reason: "OutOfmemory".into(),
                message: "Pod was rejected: Node didn't have enough resource: memory".into()
            }
        );
        let image = pod(json!({"phase": "Pending", "containerStatuses": [{
            "name": "launcher", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ErrImageNeverPull", "message": "image not present"}}}]}));
        assert!(
            matches!(read_pod(Some(&image)), PodReading::Refused { reason, .. } if reason == "ErrImageNeverPull")
        );
        let mut gone = pod(json!({"phase": "Running"}));
        gone.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        assert_eq!(read_pod(Some(&gone)), PodReading::Terminating);
    }
}
