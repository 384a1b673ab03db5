//! Node objects that stand for TEE hosts, kept Ready through their Lease and status
//! heartbeats (as kwok does), so that controllers treat them as live.

use crate::error::{kube as kerr, Result};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, NodeCondition, NodeStatus};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Client;
use std::collections::BTreeMap;
use std::str::FromStr;

/// A TEE a simulated host offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tee {
    Sev,
    SevEs,
    SevSnp,
    Tdx,
}

impl Tee {
    /// The Node Feature Discovery label that marks the feature enabled.
    pub fn nfd_label(self) -> &'static str {
        match self {
            Tee::Sev => "feature.node.kubernetes.io/cpu-security.sev.enabled",
            Tee::SevEs => "feature.node.kubernetes.io/cpu-security.sev.es.enabled",
            Tee::SevSnp => "feature.node.kubernetes.io/cpu-security.sev.snp.enabled",
            Tee::Tdx => "feature.node.kubernetes.io/cpu-security.tdx.enabled",
        }
    }

    /// The features a host with this TEE has too (an SNP host runs SEV and SEV-ES guests).
    pub fn implied(self) -> &'static [Tee] {
        match self {
            Tee::Sev => &[Tee::Sev],
            Tee::SevEs => &[Tee::Sev, Tee::SevEs],
            Tee::SevSnp => &[Tee::Sev, Tee::SevEs, Tee::SevSnp],
            Tee::Tdx => &[Tee::Tdx],
        }
    }
}

impl std::fmt::Display for Tee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tee::Sev => "sev",
            Tee::SevEs => "sev-es",
            Tee::SevSnp => "sev-snp",
            Tee::Tdx => "tdx",
        })
    }
}

impl FromStr for Tee {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "sev" => Ok(Tee::Sev),
            "sev-es" => Ok(Tee::SevEs),
            "sev-snp" | "snp" => Ok(Tee::SevSnp),
            "tdx" => Ok(Tee::Tdx),
            other => Err(format!(
                "unknown TEE {other:?}: use sev, sev-es, sev-snp or tdx"
            )),
        }
    }
}

/// Extended resource counting SEV (legacy) ASIDs.
pub const RESOURCE_SEV_ASIDS: &str = "sev.amd.com/asids";
/// Extended resource counting SEV-ES/SNP ASIDs (they share one pool).
pub const RESOURCE_SNP_ESIDS: &str = "sev-snp.amd.com/esids";
/// Extended resource counting TDX private keys (HKIDs).
pub const RESOURCE_TDX_KEYS: &str = "tdx.intel.com/keys";

/// One simulated host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimNode {
    pub name: String,
    pub tee: Option<Tee>,
    pub cpus: u32,
    pub memory_gib: u32,
    /// ASIDs (AMD) or keys (TDX) this host can give out.
    pub tee_slots: u32,
    pub extra_labels: BTreeMap<String, String>,
    /// Publish TEE labels and extended resources from the harness. Off when a node
    /// plugin runs for this node: then the plugin detects and publishes them, as on a
    /// real host.
    pub publish_tee: bool,
    /// Further simulator settings for its plugin (`--sim-config` fields, camelCase), e.g.
    /// `{"snpTcb": {"bootloader": 1}}` for a host with an old TCB.
    pub sim_settings: Option<serde_json::Value>,
}

impl SimNode {
    pub fn new(name: impl Into<String>, tee: Option<Tee>) -> Self {
        SimNode {
            name: name.into(),
            tee,
            cpus: 64,
            memory_gib: 256,
            tee_slots: 16,
            extra_labels: BTreeMap::new(),
            publish_tee: true,
            sim_settings: None,
        }
    }

    /// Nodes for `cvm-dev up --nodes N --tee a,b`: TEEs given round-robin.
    pub fn fleet(count: usize, tees: &[Tee]) -> Vec<SimNode> {
        (0..count)
            .map(|i| {
                let tee = if tees.is_empty() {
                    None
                } else {
                    Some(tees[i % tees.len()])
                };
                let kind = tee.map(|t| t.to_string()).unwrap_or_else(|| "plain".into());
                let mut n = SimNode::new(format!("cvm-node-{i}-{kind}"), tee);
                // One zone, so that the examples' nodeSelector matches the demo fleet.
                n.extra_labels
                    .insert("topology.kubernetes.io/zone".into(), "zone-a".into());
                n
            })
            .collect()
    }

    pub fn labels(&self) -> BTreeMap<String, String> {
        let mut l = BTreeMap::new();
        l.insert("kubernetes.io/hostname".into(), self.name.clone());
        l.insert("kubernetes.io/os".into(), "linux".into());
        l.insert("kubernetes.io/arch".into(), "amd64".into());
        l.insert("cvmp.io/simulated".into(), "true".into());
        if let Some(t) = self.tee.filter(|_| self.publish_tee) {
            for f in t.implied() {
                l.insert(f.nfd_label().into(), "true".into());
            }
        }
        l.extend(self.extra_labels.clone());
        l
    }

    pub fn capacity(&self) -> BTreeMap<String, Quantity> {
        let mut c = BTreeMap::new();
        c.insert("cpu".into(), Quantity(self.cpus.to_string()));
        c.insert("memory".into(), Quantity(format!("{}Gi", self.memory_gib)));
        c.insert("pods".into(), Quantity("110".into()));
        if !self.publish_tee {
            return c;
        }
        match self.tee {
            Some(Tee::Tdx) => {
                c.insert(
                    RESOURCE_TDX_KEYS.into(),
                    Quantity(self.tee_slots.to_string()),
                );
            }
            Some(Tee::Sev) => {
                c.insert(
                    RESOURCE_SEV_ASIDS.into(),
                    Quantity(self.tee_slots.to_string()),
                );
            }
            Some(Tee::SevEs | Tee::SevSnp) => {
                c.insert(
                    RESOURCE_SNP_ESIDS.into(),
                    Quantity(self.tee_slots.to_string()),
                );
                c.insert(
                    RESOURCE_SEV_ASIDS.into(),
                    Quantity(self.tee_slots.to_string()),
                );
            }
            None => {}
        }
        c
    }

    /// The Node object (metadata and spec; status goes through the status subresource).
    pub fn node(&self) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some(self.name.clone());
        n.metadata.labels = Some(self.labels());
        n
    }

    pub fn status(&self, now: &Time) -> NodeStatus {
        let cap = self.capacity();
        NodeStatus {
            capacity: Some(cap.clone()),
            allocatable: Some(cap),
            conditions: Some(vec![ready_condition(now)]),
            ..Default::default()
        }
    }
}

fn ready_condition(now: &Time) -> NodeCondition {
    NodeCondition {
        type_: "Ready".into(),
        status: "True".into(),
        reason: Some("SimulatedHostReady".into()),
        message: Some("simulated TEE host heartbeat from cvm-dev".into()),
        last_heartbeat_time: Some(now.clone()),
        last_transition_time: Some(now.clone()),
    }
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

const FIELD_MANAGER: &str = "cvm-dev-node-sim";

/// Creates the Node, its status and its Lease.
pub async fn create(client: &Client, sim: &SimNode) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let doing = format!("creating Node {}", sim.name);
    match nodes.create(&PostParams::default(), &sim.node()).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(kerr(doing)(e)),
    }
    heartbeat(client, sim).await
}

/// Renews the Lease and the Ready condition's heartbeat for one node.
pub async fn heartbeat(client: &Client, sim: &SimNode) -> Result<()> {
    let t = now();
    let nodes: Api<Node> = Api::all(client.clone());
    let status = serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "status": sim.status(&t),
    });
    nodes
        .patch_status(
            &sim.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&status),
        )
        .await
        .map_err(kerr(format!("updating status of Node {}", sim.name)))?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let lease = Lease {
        metadata: kube::api::ObjectMeta {
            name: Some(sim.name.clone()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(sim.name.clone()),
            lease_duration_seconds: Some(40),
            renew_time: Some(MicroTime(t.0)),
            ..Default::default()
        }),
    };
    let body = serde_json::json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": lease.metadata, "spec": lease.spec,
    });
    leases
        .patch(
            &sim.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(kerr(format!("renewing Lease of Node {}", sim.name)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snp_host_advertises_all_amd_features_and_esids() {
        let n = SimNode::new("a", Some(Tee::SevSnp));
        let l = n.labels();
        for t in [Tee::Sev, Tee::SevEs, Tee::SevSnp] {
            assert_eq!(l.get(t.nfd_label()).map(String::as_str), Some("true"));
        }
        assert!(!l.contains_key(Tee::Tdx.nfd_label()));
        assert_eq!(n.capacity()[RESOURCE_SNP_ESIDS].0, "16");
        assert!(!n.capacity().contains_key(RESOURCE_TDX_KEYS));
    }

    #[test]
    fn fleet_assigns_tees_round_robin() {
        let f = SimNode::fleet(3, &[Tee::SevSnp, Tee::Tdx]);
        let tees: Vec<_> = f.iter().map(|n| n.tee).collect();
        assert_eq!(
            tees,
            vec![Some(Tee::SevSnp), Some(Tee::Tdx), Some(Tee::SevSnp)]
        );
        assert_eq!(f[1].name, "cvm-node-1-tdx");
        assert_eq!(SimNode::fleet(1, &[])[0].tee, None);
    }

    #[test]
    fn tee_names_parse_and_reject_unknown() {
        assert_eq!("SEV-SNP".parse::<Tee>(), Ok(Tee::SevSnp));
        let err = "sgx".parse::<Tee>().unwrap_err();
        assert!(err.contains("sgx") && err.contains("sev-snp"), "{err}");
    }
}
