//! Advertising the host on its Node: NFD labels for each TEE it offers and its capacity as
//! extended resources, both by server-side apply under the plugin's field manager, so
//! only these keys are owned (the kubelet or the harness keep everything else).

use std::collections::BTreeMap;

use cvm_crds::wellknown::{
    nfd_label, LABEL_SIMULATED, MANAGER_NODE_PLUGIN, RESOURCE_SEV_ASIDS, RESOURCE_SNP_ESIDS,
    RESOURCE_TDX_KEYS,
};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use kube::Client;
use serde_json::{json, Value};

use crate::platform::HostCapabilities;

/// Errors advertising the node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("Node {0} does not exist: register the node (kubelet, or cvm-dev) before starting its plugin, or fix --node-name")]
    Missing(String),
    #[error("{doing} Node {node}: {source}")]
    Api {
        doing: &'static str,
        node: String,
        source: kube::Error,
    },
}

/// Labels the host earns: one NFD label per TEE (implied ones included), and the
/// simulated marker.
pub fn labels(caps: &HostCapabilities) -> BTreeMap<String, String> {
    let mut l: BTreeMap<String, String> = caps
        .tees
        .iter()
        .map(|t| (nfd_label(*t).to_string(), "true".to_string()))
        .collect();
    if caps.simulated {
        l.insert(LABEL_SIMULATED.to_string(), "true".to_string());
    }
    l
}

/// Extended resources: one unit per ASID or TDX key.
pub fn resources(caps: &HostCapabilities) -> BTreeMap<String, String> {
    let mut r = BTreeMap::new();
    if caps.sev_asids > 0 {
        r.insert(RESOURCE_SEV_ASIDS.to_string(), caps.sev_asids.to_string());
    }
    if caps.es_asids > 0 {
        r.insert(RESOURCE_SNP_ESIDS.to_string(), caps.es_asids.to_string());
    }
    if caps.tdx_keys > 0 {
        r.insert(RESOURCE_TDX_KEYS.to_string(), caps.tdx_keys.to_string());
    }
    r
}

/// The metadata apply patch.
pub fn labels_patch(node: &str, caps: &HostCapabilities) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": node, "labels": labels(caps) },
    })
}

/// The status apply patch (capacity and allocatable alike: no other consumer of these
/// resources exists on the host).
pub fn capacity_patch(node: &str, caps: &HostCapabilities) -> Value {
    let r = resources(caps);
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": node },
        "status": { "capacity": r, "allocatable": r },
    })
}

/// Applies labels and, unless kubelet counts them (`capacity`: false, the device plugin
/// serves it), capacity. Applying unchanged content is a no-op on the server, so this is
/// safe to repeat on every resync.
pub async fn advertise(
    client: &Client,
    node: &str,
    caps: &HostCapabilities,
    capacity: bool,
) -> Result<(), NodeError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let api = |doing| {
        move |source| NodeError::Api {
            doing,
            node: node.to_string(),
            source,
        }
    };
    // Apply would create a missing Node; a plugin must never invent one.
    if nodes.get_opt(node).await.map_err(api("reading"))?.is_none() {
        return Err(NodeError::Missing(node.to_string()));
    }
    let pp = PatchParams::apply(MANAGER_NODE_PLUGIN).force();
    nodes
        .patch(node, &pp, &Patch::Apply(labels_patch(node, caps)))
        .await
        .map_err(api("labelling"))?;
    if capacity {
        nodes
            .patch_status(node, &pp, &Patch::Apply(capacity_patch(node, caps)))
            .await
            .map_err(api("advertising capacity on"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SimConfig;
    use cvm_crds::TeeType;

    #[test]
    fn snp_host_labels_imply_sev_and_es() {
        let caps = SimConfig {
            tees: vec![TeeType::SevSnp],
            slots: 9,
            sev_asids: Some(3),
            ..Default::default()
        }
        .capabilities();
        let l = labels(&caps);
        for t in [TeeType::Sev, TeeType::SevEs, TeeType::SevSnp] {
            assert_eq!(l.get(nfd_label(t)).map(String::as_str), Some("true"), "{t}");
        }
        assert!(!l.contains_key(nfd_label(TeeType::Tdx)));
        assert_eq!(l.get(LABEL_SIMULATED).map(String::as_str), Some("true"));
        let r = resources(&caps);
        assert_eq!(r[RESOURCE_SNP_ESIDS], "9");
        assert_eq!(r[RESOURCE_SEV_ASIDS], "3");
        assert!(!r.contains_key(RESOURCE_TDX_KEYS));
        let p = capacity_patch("n", &caps);
        assert_eq!(p["status"]["allocatable"][RESOURCE_SNP_ESIDS], "9");
    }

    #[test]
    fn tdx_host_advertises_keys_only() {
        let caps = SimConfig {
            tees: vec![TeeType::Tdx],
            slots: 4,
            ..Default::default()
        }
        .capabilities();
        assert_eq!(
            labels(&caps).keys().cloned().collect::<Vec<_>>(),
            vec![
                LABEL_SIMULATED.to_string(),
                nfd_label(TeeType::Tdx).to_string()
            ]
        );
        assert_eq!(
            resources(&caps),
            BTreeMap::from([(RESOURCE_TDX_KEYS.to_string(), "4".to_string())])
        );
    }
}
