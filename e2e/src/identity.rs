//! People, not pods: a user's X.509 client certificate issued the way a real cluster
//! issues one, through the CertificateSigningRequest API (signer
//! `kubernetes.io/kube-apiserver-client`, approved by the admin, signed by the controller
//! manager with the cluster CA), and a kubeconfig carrying it. The API server then knows
//! the caller as user CN in group O, and RBAC judges every request as it would a person's.

use anyhow::{bail, Context, Result};
use base64::Engine;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::Kubeconfig;
use kube::Client;
use rcgen::{CertificateParams, DnType, KeyPair};
use serde_json::json;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long the controller manager may take to sign an approved request.
const SIGNING_TIMEOUT: Duration = Duration::from_secs(30);

/// Issues a client certificate for `user` (in `group`, if any; one group, the subject's
/// O) and writes a kubeconfig for it to `out` (mode 0600: it holds the private key). The
/// server and its CA are those of the current context of `cluster_kubeconfig`; `admin`
/// must be allowed to create and approve CertificateSigningRequests.
pub async fn user_kubeconfig(
    admin: &Client,
    cluster_kubeconfig: &Path,
    user: &str,
    group: Option<&str>,
    out: &Path,
) -> Result<PathBuf> {
    // The name also goes into the CSR's name and the kubeconfig's YAML, unquoted.
    if user.is_empty()
        || !user
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        bail!("user name {user:?}: use lowercase letters, digits and '-' only");
    }
    let (server, ca_data) = current_cluster(cluster_kubeconfig)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, user);
    if let Some(g) = group {
        params.distinguished_name.push(DnType::OrganizationName, g);
    }
    let request = params.serialize_request(&key)?.pem()?;
    let cert_pem = sign(admin, user, &request).await?;

    let text = crate::cluster::kubeconfig_yaml(
        &server,
        &ca_data,
        user,
        user,
        &cert_pem,
        &key.serialize_pem(),
    );
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("writing {user}'s kubeconfig to {}", out.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {user}'s kubeconfig to {}", out.display()))?;
    Ok(out.to_path_buf())
}

/// A client for the identity in `kubeconfig` (e.g. one [`user_kubeconfig`] wrote).
pub async fn client(kubeconfig: &Path) -> Result<Client> {
    crate::cluster::client_from(kubeconfig)
        .await
        .with_context(|| format!("a client from {}", kubeconfig.display()))
}

/// Creates, approves and awaits the signing of a CSR; returns the certificate's PEM.
async fn sign(admin: &Client, user: &str, request_pem: &str) -> Result<String> {
    let csrs: Api<CertificateSigningRequest> = Api::all(admin.clone());
    let csr: CertificateSigningRequest = serde_json::from_value(json!({
        // generateName: issuing twice for one user makes two requests, not a conflict.
        "metadata": {"generateName": format!("user-{user}-")},
        "spec": {
            "request": base64::engine::general_purpose::STANDARD.encode(request_pem),
            "signerName": "kubernetes.io/kube-apiserver-client",
            "usages": ["digital signature", "client auth"],
            "expirationSeconds": 3600,
        },
    }))?;
    let created = csrs
        .create(&PostParams::default(), &csr)
        .await
        .with_context(|| format!("creating a CertificateSigningRequest for {user}"))?;
    let name = created
        .metadata
        .name
        .context("the API server returned a CSR without a name")?;
    let approval = json!({"status": {"conditions": [{
        "type": "Approved", "status": "True", "reason": "CvmE2e",
        "message": "a test identity of the cvm-operator harness",
    }]}});
    csrs.patch_approval(&name, &PatchParams::default(), &Patch::Merge(&approval))
        .await
        .with_context(|| format!("approving CSR {name} for {user}"))?;
    let signed = crate::wait::until(
        &csrs,
        &name,
        SIGNING_TIMEOUT,
        "a certificate (or a Failed condition) from kube-controller-manager's csrsigning controller",
        |c| {
            let st = c.status.as_ref();
            st.is_some_and(|s| s.certificate.is_some())
                || st
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Failed"))
        },
    )
    .await
    .map_err(|e| {
        anyhow::anyhow!("{e}; is kube-controller-manager running with --cluster-signing-cert-file and --cluster-signing-key-file?")
    })?;
    // The certificate is in the object now: the request has served its purpose.
    let _ = csrs.delete(&name, &DeleteParams::default()).await;
    let status = signed.status.unwrap_or_default();
    match status.certificate {
        Some(c) => String::from_utf8(c.0).context("the issued certificate is not UTF-8 PEM"),
        None => bail!(
            "the controller manager refused to sign CSR {name} for {user}: {:?}",
            status.conditions
        ),
    }
}

/// Server URL and base64 CA bundle of the current context's cluster.
fn current_cluster(kubeconfig: &Path) -> Result<(String, String)> {
    let kc = Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    let ctx_name = kc
        .current_context
        .as_deref()
        .with_context(|| format!("{} has no current-context", kubeconfig.display()))?;
    let cluster_name = kc
        .contexts
        .iter()
        .find(|c| c.name == ctx_name)
        .and_then(|c| c.context.as_ref())
        .map(|c| c.cluster.clone())
        .with_context(|| format!("{} has no context {ctx_name}", kubeconfig.display()))?;
    let cluster = kc
        .clusters
        .iter()
        .find(|c| c.name == cluster_name)
        .and_then(|c| c.cluster.as_ref())
        .with_context(|| format!("{} has no cluster {cluster_name}", kubeconfig.display()))?;
    let server = cluster
        .server
        .clone()
        .with_context(|| format!("cluster {cluster_name} has no server"))?;
    let ca = cluster.certificate_authority_data.clone().with_context(|| {
        format!("cluster {cluster_name} has no certificate-authority-data (a file path is not supported)")
    })?;
    Ok((server, ca))
}
