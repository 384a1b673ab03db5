//! The operator's error type. Variant names label the `errors` metric; the outcomes a
//! reconcile meets on a live API server ([`Expected`]) are not errors and are not counted.

use kube::core::response::reason;
use kube::core::Status;
use std::time::Duration;

/// How soon a reconcile that lost a write conflict tries again: the write that won is on
/// its way through the watch, so the next look sees a fresher view.
pub const CONFLICT_RETRY: Duration = Duration::from_millis(200);

/// How long a reconcile that really failed waits before it tries again.
pub const FAILURE_RETRY: Duration = Duration::from_secs(2);

/// A failed API call that is an expected outcome, not a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// 404 Not Found: the object was deleted while it was reconciled (two views of a
    /// deleted CVM both remove the finalizer; the second finds it gone). Nothing is left
    /// to do for it.
    Gone,
    /// 409 Conflict: another write changed the object first (the finalizer
    /// compare-and-swap lost to a newer resourceVersion). Retried promptly.
    Conflict,
    /// A deletion waits for the node plugin to stop the guest (and for its launcher pod
    /// to go): the finalizer stays, the reconcile comes back soon.
    Waiting,
}

impl Expected {
    /// Label of the `reconciles` metric's `result`.
    pub fn metric_label(self) -> &'static str {
        match self {
            Expected::Gone => "gone",
            Expected::Conflict => "conflict",
            Expected::Waiting => "waiting",
        }
    }
}

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
    #[error("{0}")]
    Waiting(String),
    #[error("the finalizer patch could not be built: {0}")]
    Finalizer(String),
}

impl From<kube::runtime::finalizer::Error<Error>> for Error {
    /// kube's finalizer helper wraps our own errors and its two patches: unwrap ours, and
    /// name the patch (so that a 404 or 409 on it stays an expected outcome).
    fn from(e: kube::runtime::finalizer::Error<Error>) -> Self {
        use kube::runtime::finalizer::Error as F;
        match e {
            F::ApplyFailed(e) | F::CleanupFailed(e) => e,
            F::AddFinalizer(source) => Error::Kube {
                doing: "adding the finalizer".into(),
                source,
            },
            F::RemoveFinalizer(source) => Error::Kube {
                doing: "removing the finalizer".into(),
                source,
            },
            F::UnnamedObject => Error::MissingMetadata {
                kind: "ConfidentialVM",
                name: String::new(),
                field: "metadata.name",
            },
            F::InvalidFinalizer => Error::Finalizer("invalid finalizer path".into()),
        }
    }
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
            Error::Waiting(_) => "waiting",
            Error::Finalizer(_) => "finalizer",
        }
    }

    /// The expected outcome this error stands for, or `None` for a real failure.
    pub fn expected(&self) -> Option<Expected> {
        if let Error::Waiting(_) = self {
            return Some(Expected::Waiting);
        }
        let Error::Kube {
            source: kube::Error::Api(status),
            ..
        } = self
        else {
            return None;
        };
        if reason_or_code(status, reason::NOT_FOUND, 404) {
            Some(Expected::Gone)
        } else if reason_or_code(status, reason::CONFLICT, 409) {
            Some(Expected::Conflict)
        } else {
            None
        }
    }
}

/// The Go client's rule (`apierrors.IsNotFound`, `IsConflict`): a known reason decides;
/// the HTTP code counts only when the reason is unknown or missing (a 409 `AlreadyExists`
/// is not a conflict). kube's own helpers never fall back to the code.
fn reason_or_code(status: &Status, want: &str, code: u16) -> bool {
    status.reason == want || (!reason::is_known(&status.reason) && status.code == code)
}

pub(crate) fn kube(doing: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let doing = doing.into();
    move |source| Error::Kube { doing, source }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A Kubernetes API error with this HTTP code and reason, for tests of error handling.
#[cfg(test)]
pub(crate) fn api_error(doing: &str, code: u16, reason: &str) -> Error {
    kube(doing)(::kube::Error::Api(
        ::kube::core::Status::failure("m", reason)
            .with_code(code)
            .boxed(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16, reason: &str) -> Error {
        api_error("writing status of web", code, reason)
    }

    #[test]
    fn not_found_and_conflict_are_expected_outcomes() {
        assert_eq!(api(404, "NotFound").expected(), Some(Expected::Gone));
        assert_eq!(api(409, "Conflict").expected(), Some(Expected::Conflict));
        // The server's reason decides; the code serves when the reason is unknown.
        assert_eq!(api(404, "").expected(), Some(Expected::Gone));
        assert_eq!(api(409, "").expected(), Some(Expected::Conflict));
    }

    #[test]
    fn everything_else_is_a_failure() {
        for (code, reason) in [
            (409, "AlreadyExists"),
            (403, "Forbidden"),
            (422, "Invalid"),
            (500, "InternalError"),
            (429, "TooManyRequests"),
        ] {
            assert_eq!(api(code, reason).expected(), None, "{code} {reason}");
        }
        assert_eq!(Error::NoNamespace.expected(), None);
        assert_eq!(Error::Leader("lost".into()).expected(), None);
    }
}
