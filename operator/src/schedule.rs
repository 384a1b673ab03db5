//! Placement: a pure function from (what the CVM asks, what the nodes offer, what is
//! already placed) to a decision. No client, no clock; the controller feeds it snapshots.

use cvm_crds::wellknown::{nfd_label, slot_name, tee_resource};
use cvm_crds::TeeType;
use std::collections::BTreeMap;
use std::fmt;

/// What a CVM asks of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub tee: TeeType,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub node_selector: BTreeMap<String, String>,
    /// Nodes that refused its launcher pod recently: not chosen again for now.
    pub avoid: std::collections::BTreeSet<String>,
}

/// What a node offers, read from its Node object.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeInfo {
    pub name: String,
    pub ready: bool,
    pub unschedulable: bool,
    pub labels: BTreeMap<String, String>,
    /// Allocatable CPU in whole CPUs.
    pub cpus: u64,
    pub memory_mib: u64,
    /// Allocatable extended resources (ASIDs, TDX keys) by resource name.
    pub slots: BTreeMap<String, u64>,
}

/// A CVM already bound to a node (or assumed bound: decided but not yet seen in the cache).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub node: String,
    pub tee: TeeType,
    pub vcpus: u32,
    pub memory_mib: u64,
}

impl Placed {
    /// What `cvm` holds on `node` (its binding, or a migration's target).
    pub fn of(cvm: &cvm_crds::ConfidentialVM, node: &str) -> Placed {
        Placed {
            node: node.to_string(),
            tee: cvm.tee_type(),
            vcpus: cvm.spec.resources.vcpus,
            memory_mib: u64::from(cvm.spec.resources.memory_mib),
        }
    }
}

/// Why a node cannot take the CVM; ordered so messages list the most basic reason first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Misfit {
    RefusedLauncher,
    NotReady,
    Unschedulable,
    SelectorMismatch,
    LacksTee,
    NoFreeSlot,
    InsufficientCpu,
    InsufficientMemory,
}

impl Misfit {
    fn phrase(self, n: usize, t: TeeType) -> String {
        let nodes = if n == 1 { "node" } else { "nodes" };
        match self {
            Misfit::RefusedLauncher => {
                format!("{n} refused its launcher pod recently (status.refusedNodes)")
            }
            Misfit::NotReady => format!("{n} {nodes} not ready"),
            Misfit::Unschedulable => format!("{n} {nodes} cordoned"),
            Misfit::SelectorMismatch => format!("{n} {nodes} not matching nodeSelector"),
            Misfit::LacksTee => format!("{n} lack {}", t.as_str()),
            Misfit::NoFreeSlot => format!("{n} have no free {}", slot_name(t)),
            Misfit::InsufficientCpu => format!("{n} have too few free vCPUs"),
            Misfit::InsufficientMemory => format!("{n} have too little free memory"),
        }
    }
}

/// The outcome of one scheduling attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Bind(String),
    /// Nothing fits; the message counts why, as kube-scheduler does.
    Unschedulable(Unfit),
}

/// Per-reason counts for "0/5 nodes are available: 3 lack SEV-SNP, 2 have no free ASID".
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Unfit {
    pub total: usize,
    pub tee: Option<TeeType>,
    pub reasons: BTreeMap<Misfit, usize>,
}

impl fmt::Display for Unfit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.total == 0 {
            return f.write_str("0/0 nodes are available: the cluster has no nodes");
        }
        let tee = self.tee.unwrap_or(TeeType::SevSnp);
        let parts: Vec<String> = self
            .reasons
            .iter()
            .map(|(m, n)| m.phrase(*n, tee))
            .collect();
        write!(
            f,
            "0/{} nodes are available: {}",
            self.total,
            parts.join(", ")
        )
    }
}

/// Free capacity of one node after what is placed on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Free {
    cpus: i64,
    memory_mib: i64,
    slots: i64,
}

fn free_on(node: &NodeInfo, tee: TeeType, placed: &[Placed]) -> Free {
    let resource = tee_resource(tee);
    let mut f = Free {
        cpus: node.cpus as i64,
        memory_mib: node.memory_mib as i64,
        slots: node.slots.get(resource).copied().unwrap_or(0) as i64,
    };
    for p in placed.iter().filter(|p| p.node == node.name) {
        f.cpus -= i64::from(p.vcpus);
        f.memory_mib -= p.memory_mib as i64;
        if tee_resource(p.tee) == resource {
            f.slots -= 1;
        }
    }
    f
}

/// The first reason `node` cannot take `req`, or its free capacity when it can.
fn fit(node: &NodeInfo, req: &Request, placed: &[Placed]) -> Result<Free, Misfit> {
    if req.avoid.contains(&node.name) {
        return Err(Misfit::RefusedLauncher);
    }
    if !node.ready {
        return Err(Misfit::NotReady);
    }
    if node.unschedulable {
        return Err(Misfit::Unschedulable);
    }
    if req
        .node_selector
        .iter()
        .any(|(k, v)| node.labels.get(k) != Some(v))
    {
        return Err(Misfit::SelectorMismatch);
    }
    if node.labels.get(nfd_label(req.tee)).map(String::as_str) != Some("true") {
        return Err(Misfit::LacksTee);
    }
    let free = free_on(node, req.tee, placed);
    if free.slots < 1 {
        return Err(Misfit::NoFreeSlot);
    }
    if free.cpus < i64::from(req.vcpus) {
        return Err(Misfit::InsufficientCpu);
    }
    if free.memory_mib < req.memory_mib as i64 {
        return Err(Misfit::InsufficientMemory);
    }
    Ok(free)
}

/// Picks a node: among those that fit, the one with the most free TEE slots (spreads
/// guests and keeps ASIDs available everywhere), then the most free memory, then by name
/// so the choice is deterministic.
pub fn schedule(req: &Request, nodes: &[NodeInfo], placed: &[Placed]) -> Decision {
    let mut unfit = Unfit {
        total: nodes.len(),
        tee: Some(req.tee),
        ..Default::default()
    };
    let mut best: Option<(&NodeInfo, Free)> = None;
    for node in nodes {
        match fit(node, req, placed) {
            Err(m) => *unfit.reasons.entry(m).or_insert(0) += 1,
            Ok(free) => {
                let better = match &best {
                    None => true,
                    Some((b, bf)) => {
                        (free.slots, free.memory_mib, std::cmp::Reverse(&node.name))
                            > (bf.slots, bf.memory_mib, std::cmp::Reverse(&b.name))
                    }
                };
                if better {
                    best = Some((node, free));
                }
            }
        }
    }
    match best {
        Some((n, _)) => Decision::Bind(n.name.clone()),
        None => Decision::Unschedulable(unfit),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cvm_crds::wellknown::{RESOURCE_SNP_ESIDS, RESOURCE_TDX_KEYS};

    fn node(name: &str, tee: Option<TeeType>, slots: u64) -> NodeInfo {
        let mut n = NodeInfo {
            name: name.into(),
            ready: true,
            cpus: 16,
            memory_mib: 32768,
            ..Default::default()
        };
        if let Some(t) = tee {
            n.labels.insert(nfd_label(t).into(), "true".into());
            n.slots.insert(tee_resource(t).into(), slots);
        }
        n
    }

    fn req(tee: TeeType) -> Request {
        Request {
            tee,
            vcpus: 2,
            memory_mib: 2048,
            node_selector: BTreeMap::new(),
            avoid: Default::default(),
        }
    }

    fn placed(node: &str, tee: TeeType) -> Placed {
        Placed {
            node: node.into(),
            tee,
            vcpus: 2,
            memory_mib: 2048,
        }
    }

    #[test]
    fn binds_to_a_node_with_the_tee() {
        let nodes = [
            node("a", Some(TeeType::Tdx), 4),
            node("b", Some(TeeType::SevSnp), 4),
        ];
        assert_eq!(
            schedule(&req(TeeType::SevSnp), &nodes, &[]),
            Decision::Bind("b".into())
        );
        assert_eq!(
            schedule(&req(TeeType::Tdx), &nodes, &[]),
            Decision::Bind("a".into())
        );
    }

    #[test]
    fn a_node_that_refused_the_launcher_pod_is_not_chosen_again() {
        let nodes = [
            node("a", Some(TeeType::SevSnp), 4),
            node("b", Some(TeeType::SevSnp), 1),
        ];
        let mut r = req(TeeType::SevSnp);
        r.avoid.insert("a".into());
        assert_eq!(schedule(&r, &nodes, &[]), Decision::Bind("b".into()));
        r.avoid.insert("b".into());
        let Decision::Unschedulable(why) = schedule(&r, &nodes, &[]) else {
            panic!("placed on a node that refused it");
        };
        assert_eq!(
            why.to_string(),
            "0/2 nodes are available: 2 refused its launcher pod recently (status.refusedNodes)"
        );
    }

    #[test]
    fn spreads_to_the_node_with_most_free_slots() {
        let nodes = [
            node("a", Some(TeeType::SevSnp), 4),
            node("b", Some(TeeType::SevSnp), 4),
        ];
        let on_a = [placed("a", TeeType::SevSnp)];
        assert_eq!(
            schedule(&req(TeeType::SevSnp), &nodes, &on_a),
            Decision::Bind("b".into())
        );
        // Ties break by name: deterministic across replicas and restarts.
        assert_eq!(
            schedule(&req(TeeType::SevSnp), &nodes, &[]),
            Decision::Bind("a".into())
        );
    }

    #[test]
    fn never_gives_the_last_asid_twice() {
        let nodes = [node("a", Some(TeeType::SevSnp), 1)];
        let first = schedule(&req(TeeType::SevSnp), &nodes, &[]);
        assert_eq!(first, Decision::Bind("a".into()));
        let taken = [placed("a", TeeType::SevSnp)];
        match schedule(&req(TeeType::SevSnp), &nodes, &taken) {
            Decision::Unschedulable(u) => {
                assert_eq!(
                    u.to_string(),
                    "0/1 nodes are available: 1 have no free ASID"
                )
            }
            d => panic!("expected Unschedulable, got {d:?}"),
        }
    }

    #[test]
    fn sev_es_and_snp_share_the_pool() {
        let nodes = [node("a", Some(TeeType::SevSnp), 1)];
        let mut n = nodes[0].clone();
        n.labels
            .insert(nfd_label(TeeType::SevEs).into(), "true".into());
        let taken = [placed("a", TeeType::SevSnp)];
        assert!(matches!(
            schedule(&req(TeeType::SevEs), &[n], &taken),
            Decision::Unschedulable(_)
        ));
    }

    #[test]
    fn message_counts_every_reason() {
        let mut not_ready = node("nr", Some(TeeType::SevSnp), 4);
        not_ready.ready = false;
        let mut cordoned = node("c", Some(TeeType::SevSnp), 4);
        cordoned.unschedulable = true;
        let nodes = [
            node("t1", Some(TeeType::Tdx), 4),
            node("t2", Some(TeeType::Tdx), 4),
            node("t3", Some(TeeType::Tdx), 4),
            node("full", Some(TeeType::SevSnp), 0),
            not_ready,
            cordoned,
        ];
        match schedule(&req(TeeType::SevSnp), &nodes, &[]) {
            Decision::Unschedulable(u) => assert_eq!(
                u.to_string(),
                "0/6 nodes are available: 1 node not ready, 1 node cordoned, 3 lack SEV-SNP, 1 have no free ASID"
            ),
            d => panic!("expected Unschedulable, got {d:?}"),
        }
        match schedule(&req(TeeType::SevSnp), &[], &[]) {
            Decision::Unschedulable(u) => assert!(u.to_string().contains("no nodes")),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn honours_node_selector_and_capacity() {
        let mut a = node("a", Some(TeeType::Tdx), 4);
        a.labels.insert("zone".into(), "x".into());
        let b = node("b", Some(TeeType::Tdx), 4);
        let mut r = req(TeeType::Tdx);
        r.node_selector.insert("zone".into(), "x".into());
        assert_eq!(
            schedule(&r, &[a.clone(), b.clone()], &[]),
            Decision::Bind("a".into())
        );

        let mut big = req(TeeType::Tdx);
        big.vcpus = 17;
        match schedule(&big, std::slice::from_ref(&b), &[]) {
            Decision::Unschedulable(u) => {
                assert_eq!(u.reasons.get(&Misfit::InsufficientCpu), Some(&1))
            }
            d => panic!("{d:?}"),
        }
        let mut huge = req(TeeType::Tdx);
        huge.memory_mib = 40000;
        match schedule(&huge, &[b], &[]) {
            Decision::Unschedulable(u) => {
                assert_eq!(u.reasons.get(&Misfit::InsufficientMemory), Some(&1))
            }
            d => panic!("{d:?}"),
        }
        assert_eq!(RESOURCE_TDX_KEYS, tee_resource(TeeType::Tdx));
        assert_eq!(RESOURCE_SNP_ESIDS, tee_resource(TeeType::SevSnp));
    }
}
