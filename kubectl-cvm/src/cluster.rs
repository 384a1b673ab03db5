//! The cluster side: a client from the user's kubeconfig (kubectl's rules) and the
//! ConfidentialVM calls the subcommands make.

use std::time::Duration;

use cvm_crds::ConfidentialVM;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;
use thiserror::Error;

use crate::cli::KubeArgs;

#[derive(Debug, Error)]
pub enum ClusterError {
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    #[error("cannot reach the cluster: {0}")]
    Unreachable(String),
    #[error("ConfidentialVM {name} not found in namespace {namespace}")]
    NotFound { name: String, namespace: String },
    #[error("{0}")]
    Api(String),
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Input(String),
}

impl From<crate::evidence::CliError> for ClusterError {
    fn from(e: crate::evidence::CliError) -> Self {
        ClusterError::Input(e.to_string())
    }
}

/// A client and the namespace to work in.
pub struct Ctx {
    pub client: Client,
    pub namespace: String,
}

impl Ctx {
    pub async fn connect(k: &KubeArgs) -> Result<Ctx, ClusterError> {
        let opts = KubeConfigOptions {
            context: k.context.clone(),
            ..Default::default()
        };
        let cfg = match &k.kubeconfig {
            Some(path) => {
                let kc = Kubeconfig::read_from(path)
                    .map_err(|e| ClusterError::Kubeconfig(format!("{}: {e}", path.display())))?;
                kube::Config::from_custom_kubeconfig(kc, &opts).await
            }
            // $KUBECONFIG (several files merged, as kubectl does), else ~/.kube/config.
            None => kube::Config::from_kubeconfig(&opts).await,
        }
        .map_err(|e| ClusterError::Kubeconfig(e.to_string()))?;
        let namespace = k
            .namespace
            .clone()
            .unwrap_or_else(|| cfg.default_namespace.clone());
        let client = Client::try_from(cfg).map_err(|e| ClusterError::Kubeconfig(e.to_string()))?;
        Ok(Ctx { client, namespace })
    }

    pub fn cvms(&self) -> Api<ConfidentialVM> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub async fn get(&self, name: &str) -> Result<ConfidentialVM, ClusterError> {
        self.cvms().get(name).await.map_err(|e| self.err(name, e))
    }

    pub async fn patch_merge(
        &self,
        name: &str,
        patch: &serde_json::Value,
    ) -> Result<ConfidentialVM, ClusterError> {
        self.cvms()
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .map_err(|e| self.err(name, e))
    }

    fn err(&self, name: &str, e: kube::Error) -> ClusterError {
        match e {
            kube::Error::Api(s) if s.code == 404 => ClusterError::NotFound {
                name: name.into(),
                namespace: self.namespace.clone(),
            },
            kube::Error::Api(s) if s.code == 403 => ClusterError::Api(format!(
                "forbidden: {} (your account needs get and patch on confidentialvms.cvmp.io in {})",
                s.message, self.namespace
            )),
            kube::Error::Api(s) => ClusterError::Api(format!("{} ({})", s.message, s.code)),
            other => ClusterError::Unreachable(other.to_string()),
        }
    }
}

/// Runs an async command on a small runtime: the CLI does one thing at a time.
pub fn block_on<F: std::future::Future>(f: F) -> Result<F::Output, ClusterError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ClusterError::Input(format!("cannot start the async runtime: {e}")))?;
    Ok(rt.block_on(f))
}

/// `60s`, `2m`, `1m30s`, `500ms`, or a bare number of seconds.
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if let Ok(secs) = t.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    cvm_crds::validate::parse_duration_ms(t)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("--timeout {s:?}: expected a duration such as 60s, 2m or 1m30s"))
}

/// Unix seconds now.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
