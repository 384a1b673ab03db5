//! Errors of the local control-plane harness. Each says what to do next.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("the Go toolchain is missing: install Go 1.24 or newer and put `go` on PATH, then run again (it builds the Kubernetes binaries once)")]
    GoMissing,
    #[error("building the control-plane binaries failed; see the log: {log}")]
    BuildFailed { log: String },
    #[error("cannot run {script}: {source}")]
    BuildScript {
        script: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("generating TLS material failed: {0}")]
    Pki(#[from] rcgen::Error),
    #[error("port {port} is in use ({component}); stop what holds it (another `cvm-dev up`? try `cvm-dev down --dir DIR`) or pick another with --port")]
    PortInUse { component: &'static str, port: u16 },
    #[error("{component} exited during start-up ({status}); last lines of {log}:\n{tail}")]
    Exited {
        component: String,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("{component} was not ready after {secs} s; see {log}")]
    NotReady {
        component: String,
        secs: u64,
        log: PathBuf,
    },
    #[error("Kubernetes API call failed while {doing}: {source}")]
    Kube { doing: String, source: kube::Error },
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    #[error("manifest {path}: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error("the harness background thread could not start: {0}")]
    Thread(String),
}

pub type Result<T, E = HarnessError> = std::result::Result<T, E>;

pub(crate) fn io(
    what: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> HarnessError {
    let path = path.into();
    move |source| HarnessError::Io { what, path, source }
}

pub(crate) fn kube(doing: impl Into<String>) -> impl FnOnce(kube::Error) -> HarnessError {
    let doing = doing.into();
    move |source| HarnessError::Kube { doing, source }
}
