//! Clients with the token kubelet gives a pod: bound to a Pod on a node, so that it
//! carries the node-name claim the chart's node restriction reads. Tests use it to act as
//! a node plugin of a given node, through the real admission chain.

use anyhow::{Context, Result};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::Client;
use serde_json::json;
use std::path::Path;

/// A client for service account `ns/sa` with a token bound to a (never running) Pod on
/// `node`. `kubeconfig` gives the server and its CA.
pub async fn node_bound_client(
    kubeconfig: &Path,
    admin: &Client,
    ns: &str,
    sa: &str,
    node: &str,
) -> Result<Client> {
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let name = format!("token-holder-{node}");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"nodeName": node, "serviceAccountName": sa,
                 "containers": [{"name": "p", "image": "cvm-operator:test"}]},
    }))?;
    let pod = match pods.create(&PostParams::default(), &pod).await {
        Ok(p) => p,
        Err(kube::Error::Api(e)) if e.code == 409 => pods.get(&name).await?,
        Err(e) => return Err(e.into()),
    };
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), ns);
    let tr: TokenRequest = serde_json::from_value(json!({"spec": {
        "audiences": [], "expirationSeconds": 600,
        "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod.metadata.name, "uid": pod.metadata.uid},
    }}))?;
    let tr = sas
        .create_subresource::<TokenRequest, TokenRequest>("token", sa, &PostParams::default(), &tr)
        .await?;
    let token = tr.status.context("the TokenRequest has no status")?.token;
    token_client(kubeconfig, &token).await
}

/// A client that presents only `token` (no client certificate beside it) to the server
/// of `kubeconfig`, trusting its CA.
pub async fn token_client(kubeconfig: &Path, token: &str) -> Result<Client> {
    let mut cfg = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(kubeconfig)?,
        &Default::default(),
    )
    .await?;
    cfg.auth_info = kube::config::AuthInfo {
        token: Some(token.to_string().into()),
        ..Default::default()
    };
    Ok(Client::try_from(cfg)?)
}
