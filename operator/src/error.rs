//! The operator's error type. Variant names label the `errors` metric.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API call failed while {doing}: {source}")]
    Kube {
        doing: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "the object has no namespace: ConfidentialVM and ConfidentialVMMigration are namespaced"
    )]
    NoNamespace,
    #[error(
        "{kind} {name} has no {field}; the API server sets it, so the object did not come from one"
    )]
    MissingMetadata {
        kind: &'static str,
        name: String,
        field: &'static str,
    },
    #[error("serializing the status patch: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("leader election: {0}")]
    Leader(String),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

impl Error {
    /// Stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "kube",
            Error::NoNamespace => "no_namespace",
            Error::MissingMetadata { .. } => "missing_metadata",
            Error::Serialize(_) => "serialize",
            Error::Leader(_) => "leader",
            Error::Metrics(_) => "metrics",
        }
    }
}

pub(crate) fn kube(doing: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let doing = doing.into();
    move |source| Error::Kube { doing, source }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
