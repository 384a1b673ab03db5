//! The launcher Pod of a placed CVM (DESIGN §5): one Pod owned by the CVM, pinned to its
//! node, requesting what the guest uses (cpu, memory, one TEE key, one `/dev/kvm` share),
//! so kube-scheduler and kubelet check and count them like any workload's. The placement
//! (TEE, key capacity, TCB, selectors) stays the operator's; the Pod only makes kubelet
//! the accountant of the node's keys. Pure builders and readings; the controller does the
//! I/O.

use cvm_crds::cvm::{RefusedNode, RunStrategy};
use cvm_crds::wellknown::{
    tee_resource, LAUNCHER_COMPONENT as COMPONENT, LAUNCHER_SOCKET_VOLUME as SOCKET_VOLUME,
    RESOURCE_KVM,
};
use cvm_crds::ConfidentialVM;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use serde_json::json;

/// Label naming a launcher pod's CVM (in the CVM's namespace).
pub const LABEL_CVM: &str = "cvmp.io/cvm";
use cvm_crds::wellknown::LAUNCHER_DIR as SOCKET_DIR;
/// The launcher's readiness port (`cvm_node_plugin::launcher::HEALTH_PORT`); no guest
/// port may take it (spec.network.ports).
pub use cvm_crds::wellknown::LAUNCHER_HEALTH_PORT as HEALTH_PORT;

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

pub use cvm_crds::wellknown::launcher_pod_name as pod_name;

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
    let ports: Vec<serde_json::Value> = cvm
        .spec
        .network
        .iter()
        .flat_map(|n| n.ports.iter())
        .map(|p| json!({"name": p.name, "containerPort": p.port, "protocol": p.protocol.as_str()}))
        .collect();
    let mut volumes = vec![json!({"name": SOCKET_VOLUME, "emptyDir": {}})];
    if !boot_images(cvm).is_empty() {
        volumes.push(json!({"name": TOOLS_VOLUME, "emptyDir": {}}));
    }
    let mut pod = json!({
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
                // QEMU, unprivileged, forwards the guest's ports (80 too) from the pod's
                // address; a safe sysctl, scoped to the pod's network namespace.
                "sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}],
            },
            "containers": [{
                "name": "launcher",
                "image": o.image,
                "imagePullPolicy": o.pull_policy,
                "command": ["/usr/local/bin/cvm-launcher"],
                "args": [
                    format!("--socket-dir={SOCKET_DIR}"),
                    format!("--cvm={ns}/{name}"),
                    format!("--health-port={HEALTH_PORT}"),
                ],
                // Ready only while the guest runs: a Service that selects the CVM sends
                // traffic to its guest, and follows it when it moves.
                "readinessProbe": {
                    "httpGet": {"path": "/ready", "port": HEALTH_PORT},
                    "periodSeconds": 2,
                    "failureThreshold": 1,
                },
                "resources": {
                    "requests": {"cpu": cpu, "memory": memory, key: "1", RESOURCE_KVM: "1"},
                    "limits": {"memory": memory, key: "1", RESOURCE_KVM: "1"},
                },
                "securityContext": container_security(),
                "volumeMounts": [{"name": SOCKET_VOLUME, "mountPath": SOCKET_DIR}],
                // The guest's ports (spec.network.ports), named as a Service's
                // targetPort names them; QEMU's user-mode network forwards them into the
                // guest once QEMU runs in the pod.
                "ports": ports,
            }],
            "volumes": volumes,
        },
    });
    let inits = init_containers(cvm, o);
    if !inits.is_empty() {
        pod["spec"]["initContainers"] = serde_json::Value::Array(inits);
    }
    serde_json::from_value(pod).ok()
}

/// Every launcher pod container's: no privilege, nothing written outside its volumes.
fn container_security() -> serde_json::Value {
    json!({
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": {"drop": ["ALL"]},
    })
}

/// The emptyDir that carries the static `cvm-launcher` into boot-image init containers.
const TOOLS_VOLUME: &str = "cvm-tools";
const TOOLS_DIR: &str = "/var/run/cvm-tools";

/// The boot artifacts that come from container images, grouped by image in spec order:
/// `(image, [(what, path in the image)])`.
pub fn boot_images(cvm: &ConfidentialVM) -> Vec<(String, Vec<(&'static str, String)>)> {
    let b = &cvm.spec.boot;
    let mut out: Vec<(String, Vec<(&'static str, String)>)> = Vec::new();
    let arts = [
        ("firmware", Some(&b.firmware)),
        ("kernel", b.kernel.as_ref()),
        ("initrd", b.initrd.as_ref()),
    ];
    for (what, a) in arts {
        let Some((image, path)) = a.and_then(|a| a.image_file()) else {
            continue;
        };
        match out.iter_mut().find(|(i, _)| i == image) {
            Some((_, files)) => files.push((what, path.to_string())),
            None => out.push((image.to_string(), vec![(what, path.to_string())])),
        }
    }
    out
}

/// Init containers that copy the boot artifacts out of their images (KubeVirt's kernel
/// boot): the first puts the static launcher in an emptyDir, then each image runs it to
/// copy its files into the launcher's directory, where the node plugin checks their
/// digests before QEMU reads them. An image needs no shell, only the files.
fn init_containers(cvm: &ConfidentialVM, o: &LauncherOptions) -> Vec<serde_json::Value> {
    let images = boot_images(cvm);
    if images.is_empty() {
        return Vec::new();
    }
    let security = container_security();
    let mut out = vec![json!({
        "name": "install-launcher",
        "image": o.image,
        "imagePullPolicy": o.pull_policy,
        "command": ["/usr/local/bin/cvm-launcher", "install", format!("--to={TOOLS_DIR}")],
        "securityContext": security,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"name": TOOLS_VOLUME, "mountPath": TOOLS_DIR}],
    })];
    let into = format!(
        "--into={SOCKET_DIR}/{}",
        cvm_crds::wellknown::LAUNCHER_IMAGE_ARTIFACTS
    );
    for (i, (image, files)) in images.iter().enumerate() {
        let mut command = vec![
            format!("{TOOLS_DIR}/cvm-launcher"),
            "copy-artifacts".to_string(),
            into.clone(),
        ];
        command.extend(files.iter().map(|(what, path)| format!("{what}={path}")));
        out.push(json!({
            "name": format!("boot-image-{i}"),
            "image": image,
            // A boot image is pinned by the digests of its files: a tag is enough.
            "imagePullPolicy": "IfNotPresent",
            "command": command,
            "securityContext": security,
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "volumeMounts": [
                {"name": TOOLS_VOLUME, "mountPath": TOOLS_DIR, "readOnly": true},
                {"name": SOCKET_VOLUME, "mountPath": SOCKET_DIR},
            ],
        }));
    }
    out
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
///
/// `gone`: the node plugin reported the guest stopped because its pod went away
/// ([`cvm_crds::wellknown::REASON_LAUNCHER_GONE`]); `Manual` then does not replace it.
pub fn pod_action(
    pod: Option<&Pod>,
    node: &str,
    strategy: RunStrategy,
    gone: bool,
) -> (PodAction, PodReading) {
    let halted = strategy == RunStrategy::Halted;
    let Some(pod) = pod else {
        return if halted || gone && strategy == RunStrategy::Manual {
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

/// Whether the CVM's guest ran in a pod that went away: the node plugin reported it
/// stopped for that reason, or (before it could) still reports it launched, which a guest
/// with no pod cannot be.
pub fn launcher_gone(cvm: &ConfidentialVM) -> bool {
    cvm.condition(cvm_crds::ConditionType::Launched)
        .is_some_and(|c| {
            c.status == "True"
                || c.status == "False" && c.reason == cvm_crds::wellknown::REASON_LAUNCHER_GONE
        })
}

/// How long a node that refused a CVM's launcher pod is left out of its placement.
pub const REFUSAL_TTL_SECS: i64 = 600;
/// How long kube-scheduler may keep a launcher pod Unschedulable on the chosen node
/// before the CVM is placed elsewhere.
pub const UNSCHEDULABLE_GRACE_SECS: i64 = 30;
/// The most refusals a status keeps.
const MAX_REFUSED: usize = 8;

/// Why the CVM should leave its node, as `(reason, message)`: kube-scheduler kept its pod
/// Unschedulable past [`UNSCHEDULABLE_GRACE_SECS`], kubelet refused or ended it and the
/// run strategy replaces it, or the node is cordoned (drained) while no pod runs there.
/// `None`: it stays.
pub fn refusal(
    pod: Option<&Pod>,
    reading: &PodReading,
    strategy: RunStrategy,
    node: &str,
    cordoned: bool,
    now_unix: i64,
) -> Option<(String, String)> {
    if strategy == RunStrategy::Halted {
        return None;
    }
    let replaced = matches!(strategy, RunStrategy::Always | RunStrategy::RerunOnFailure);
    match reading {
        PodReading::Refused { reason, message } if replaced => {
            Some((reason.clone(), message.clone()))
        }
        PodReading::Unschedulable(m) => {
            let since = pod
                .and_then(|p| p.status.as_ref()?.conditions.as_ref())
                .and_then(|cs| cs.iter().find(|c| c.type_ == "PodScheduled"))
                .and_then(|c| c.last_transition_time.as_ref())
                .map(|t| t.0.as_second());
            since
                .is_some_and(|s| now_unix - s >= UNSCHEDULABLE_GRACE_SECS)
                .then(|| ("Unschedulable".to_string(), m.clone()))
        }
        PodReading::Absent | PodReading::Pending if cordoned => Some((
            "NodeCordoned".to_string(),
            format!(
                "node {node} is cordoned (kubectl cordon or drain) and no launcher pod runs there"
            ),
        )),
        _ => None,
    }
}

/// The refusals to keep after `node` refused the CVM now: those still in force, without
/// an older one for the same node, then the new one; at most the last eight.
pub fn refused_after(
    existing: &[RefusedNode],
    node: &str,
    reason: &str,
    message: &str,
    now: &Time,
) -> Vec<RefusedNode> {
    let mut out: Vec<RefusedNode> = existing
        .iter()
        .filter(|r| r.node != node && now.0.as_second() - r.at.0.as_second() < REFUSAL_TTL_SECS)
        .cloned()
        .collect();
    out.push(RefusedNode {
        node: node.to_string(),
        reason: reason.chars().take(128).collect(),
        message: message.chars().take(1024).collect(),
        at: now.clone(),
    });
    let skip = out.len().saturating_sub(MAX_REFUSED);
    out.split_off(skip)
}

/// The nodes placement leaves out for `cvm` at `now_unix`.
pub fn avoided(cvm: &ConfidentialVM, now_unix: i64) -> std::collections::BTreeSet<String> {
    cvm.status
        .iter()
        .flat_map(|s| s.refused_nodes.iter())
        .filter(|r| now_unix - r.at.0.as_second() < REFUSAL_TTL_SECS)
        .map(|r| r.node.clone())
        .collect()
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
        // A boot image whose files could not be copied: its own words.
        let init_failed = st.init_container_statuses.iter().flatten().find_map(|c| {
            let t = c.state.as_ref()?.terminated.as_ref()?;
            (t.exit_code != 0).then(|| PodReading::Refused {
                reason: "BootImageFailed".into(),
                message: format!(
                    "init container {} ({}) exited {}: {}",
                    c.name,
                    c.image,
                    t.exit_code,
                    t.message.as_deref().unwrap_or("no message").trim()
                ),
            })
        });
        if let Some(r) = init_failed {
            return r;
        }
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
        .init_container_statuses
        .iter()
        .flatten()
        .chain(st.container_statuses.iter().flatten())
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
        assert_eq!(c.ports, Some(vec![]), "no network: no ports");
        let mut with_ports = cvm();
        with_ports.spec.network = serde_json::from_value(
            json!({"ports": [{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]}),
        )
        .unwrap();
        let p = launcher_pod(&with_ports, "n1", &opts()).unwrap();
        let ports: Vec<(String, i32, String)> = p.spec.unwrap().containers[0]
            .ports
            .iter()
            .flatten()
            .map(|p| {
                (
                    p.name.clone().unwrap_or_default(),
                    p.container_port,
                    p.protocol.clone().unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(
            ports,
            vec![
                ("http".into(), 80, "TCP".into()),
                ("dns".into(), 53, "UDP".into())
            ]
        );
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.privileged, None);
        assert_eq!(sc.allow_privilege_escalation, Some(false));
    }

    #[test]
    fn boot_artifacts_from_an_image_are_copied_by_init_containers() {
        let plain = launcher_pod(&cvm(), "n1", &opts()).unwrap();
        assert_eq!(plain.spec.as_ref().unwrap().init_containers, None);
        let mut c = cvm();
        c.spec.boot = serde_json::from_value(json!({
            "firmware": {"name": "ovmf"},
            "kernel": {"url": "oci://guests/debian:13#/boot/vmlinuz", "sha256": "a".repeat(64)},
            "initrd": {"url": "oci://guests/debian:13#/boot/initrd.img", "sha256": "b".repeat(64)},
        }))
        .unwrap();
        let pod = launcher_pod(&c, "n1", &opts()).unwrap();
        let spec = pod.spec.unwrap();
        let inits = spec.init_containers.unwrap();
        let names: Vec<&str> = inits.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["install-launcher", "boot-image-0"], "one per image");
        assert_eq!(inits[0].image.as_deref(), Some("cvm-launcher:dev"));
        assert_eq!(inits[1].image.as_deref(), Some("guests/debian:13"));
        assert_eq!(
            inits[1].command.as_deref().unwrap(),
            [
                "/var/run/cvm-tools/cvm-launcher",
                "copy-artifacts",
                "--into=/var/run/cvm-launcher/image-artifacts",
                "kernel=/boot/vmlinuz",
                "initrd=/boot/initrd.img",
            ]
        );
        let vols: Vec<&str> = spec
            .volumes
            .iter()
            .flatten()
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(vols, [SOCKET_VOLUME, TOOLS_VOLUME]);
        // The boot image's copy writes where the plugin reads: the launcher's emptyDir.
        let mounts = inits[1].volume_mounts.as_ref().unwrap();
        assert!(mounts
            .iter()
            .any(|m| m.name == SOCKET_VOLUME && m.mount_path == SOCKET_DIR));
    }

    #[test]
    fn a_boot_image_that_fails_is_the_reason_in_its_own_words() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web-launcher"},
            "status": {"phase": "Failed", "initContainerStatuses": [
                {"name": "install-launcher", "image": "cvm-launcher:dev", "imageID": "", "ready": false,
                 "restartCount": 0, "state": {"terminated": {"exitCode": 0}}},
                {"name": "boot-image-0", "image": "guests/debian:13", "imageID": "", "ready": false,
                 "restartCount": 0, "state": {"terminated": {"exitCode": 1,
                 "message": "kernel: /boot/vmlinuz is not in the image\n"}}}]}
        }))
        .unwrap();
        assert_eq!(
            read_pod(Some(&pod)),
            PodReading::Refused {
                reason: "BootImageFailed".into(),
                message: "init container boot-image-0 (guests/debian:13) exited 1: kernel: /boot/vmlinuz is not in the image".into()
            }
        );
        let pulling: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web-launcher"},
            "status": {"phase": "Pending", "initContainerStatuses": [
                {"name": "boot-image-0", "image": "guests/debian:13", "imageID": "", "ready": false,
                 "restartCount": 0, "state": {"waiting": {"reason": "ErrImageNeverPull", "message": "not present"}}}]}
        }))
        .unwrap();
        assert!(
            matches!(read_pod(Some(&pulling)), PodReading::Refused { reason, .. } if reason == "ErrImageNeverPull")
        );
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
        let act = |p: Option<&Pod>, node: &str, s: RunStrategy| pod_action(p, node, s, false).0;
        assert_eq!(act(None, "n1", Always), PodAction::Create);
        assert_eq!(
            pod_action(None, "n1", Halted, false),
            (PodAction::Keep, PodReading::Absent)
        );
        assert_eq!(act(Some(&mine), "n1", Always), PodAction::Keep);
        // Moved, or Halted: the pod goes (and only once).
        assert_eq!(
            pod_action(Some(&mine), "n2", Always, false),
            (PodAction::Delete, PodReading::Terminating)
        );
        assert_eq!(act(Some(&mine), "n1", Halted), PodAction::Delete);
        let mut going = mine.clone();
        going.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        assert_eq!(
            pod_action(Some(&going), "n2", Always, false),
            (PodAction::Keep, PodReading::Terminating)
        );
        // Refused: replaced by Always and RerunOnFailure, kept by Manual.
        let mut refused = mine.clone();
        refused.status = Some(
            serde_json::from_value(json!({"phase": "Failed", "reason": "Evicted", "message": "m"}))
                .unwrap(),
        );
        let (a, r) = pod_action(Some(&refused), "n1", RerunOnFailure, false);
        assert_eq!(a, PodAction::Delete);
        assert!(matches!(r, PodReading::Refused { reason, .. } if reason == "Evicted"));
        assert_eq!(act(Some(&refused), "n1", Manual), PodAction::Keep);
        // Its pod went under a running guest: Manual does not replace it, the others do.
        assert_eq!(
            pod_action(None, "n1", Manual, true),
            (PodAction::Keep, PodReading::Absent)
        );
        assert_eq!(pod_action(None, "n1", Manual, false).0, PodAction::Create);
        assert_eq!(pod_action(None, "n1", Always, true).0, PodAction::Create);
    }

    fn at(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn a_refusing_or_drained_node_lets_the_cvm_go_as_its_run_strategy_says() {
        use RunStrategy::*;
        let evicted = PodReading::Refused {
            reason: "Evicted".into(),
            message: "The node was low on resource: memory.".into(),
        };
        let r = |reading: &PodReading, s: RunStrategy, cordoned: bool| {
            refusal(None, reading, s, "n1", cordoned, 1000)
        };
        assert_eq!(
            r(&evicted, Always, false),
            Some((
                "Evicted".into(),
                "The node was low on resource: memory.".into()
            ))
        );
        assert!(r(&evicted, RerunOnFailure, false).is_some());
        assert_eq!(
            r(&evicted, Manual, false),
            None,
            "Manual keeps it where it failed"
        );
        assert_eq!(r(&evicted, Halted, true), None);
        // Drained: the pod went and the node takes no new one.
        let (reason, msg) = r(&PodReading::Absent, Manual, true).unwrap();
        assert_eq!(reason, "NodeCordoned");
        assert!(msg.contains("node n1 is cordoned"), "{msg}");
        assert!(r(&PodReading::Pending, Always, true).is_some());
        assert_eq!(
            r(&PodReading::Running, Always, true),
            None,
            "cordon alone moves nothing"
        );
        assert_eq!(r(&PodReading::Absent, Always, false), None);
        // Unschedulable: only once kube-scheduler has said so for the grace period.
        let mut p = pod(json!({"phase": "Pending", "conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/3 nodes are available: 1 Insufficient cpu.",
            "lastTransitionTime": "1970-01-01T00:16:20Z"}]}));
        let unsched = read_pod(Some(&p));
        assert_eq!(refusal(Some(&p), &unsched, Manual, "n1", false, 985), None);
        assert_eq!(
            refusal(
                Some(&p),
                &unsched,
                Manual,
                "n1",
                false,
                980 + UNSCHEDULABLE_GRACE_SECS
            ),
            Some((
                "Unschedulable".into(),
                "0/3 nodes are available: 1 Insufficient cpu.".into()
            ))
        );
        p.status = None;
        assert_eq!(refusal(Some(&p), &unsched, Always, "n1", false, 5000), None);
    }

    #[test]
    fn refusals_expire_and_the_newest_eight_are_kept() {
        let mut list = Vec::new();
        for i in 0..10 {
            list = refused_after(&list, &format!("n{i}"), "Evicted", "m", &at(100 + i));
        }
        assert_eq!(list.len(), 8);
        assert_eq!(list[0].node, "n2");
        // The same node again: one entry, the newest.
        let again = refused_after(&list, "n5", "Unschedulable", "x", &at(200));
        assert_eq!(again.iter().filter(|r| r.node == "n5").count(), 1);
        assert_eq!(
            again.last().map(|r| r.reason.as_str()),
            Some("Unschedulable")
        );
        // Past the TTL a refusal is dropped, and placement no longer avoids the node.
        let later = refused_after(&list, "m", "Evicted", "m", &at(100 + REFUSAL_TTL_SECS + 5));
        assert_eq!(
            later.iter().map(|r| r.node.as_str()).collect::<Vec<_>>(),
            vec!["n6", "n7", "n8", "n9", "m"]
        );
        let mut c = cvm();
        c.status = Some(cvm_crds::cvm::ConfidentialVMStatus {
            refused_nodes: later,
            ..Default::default()
        });
        let now = 100 + REFUSAL_TTL_SECS + 5;
        assert!(avoided(&c, now).contains("n9") && avoided(&c, now).contains("m"));
        assert!(!avoided(&c, now + REFUSAL_TTL_SECS).contains("m"));
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
