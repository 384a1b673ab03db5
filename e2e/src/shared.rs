//! One control plane shared by all tests of a test binary: starting one takes seconds,
//! so tests share it and keep apart by namespacing their objects.
//!
//! It is stopped, and its temp dir removed, when the test process exits (an `atexit`
//! hook); if the process is killed, its children die with it (see [`crate::process`]).

use crate::{ControlPlane, Options, SimNode, Tee};
use std::sync::{Mutex, OnceLock};

static SHARED: OnceLock<Mutex<Option<ControlPlane>>> = OnceLock::new();

extern "C" fn stop_shared() {
    if let Some(m) = SHARED.get() {
        let taken = m.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(taken);
    }
}

/// The default fleet for tests: two SEV-SNP hosts and one TDX host.
pub fn default_nodes() -> Vec<SimNode> {
    SimNode::fleet(3, &[Tee::SevSnp, Tee::SevSnp, Tee::Tdx])
}

/// Runs `f` with the shared control plane, starting it on first use.
///
/// # Panics
/// When the control plane cannot start: a test cannot go on without it, and the
/// message says why (missing Go, build failure with its log path, …).
pub fn with_shared<R>(f: impl FnOnce(&ControlPlane) -> R) -> R {
    let m = SHARED.get_or_init(|| {
        let cp = ControlPlane::start(Options {
            nodes: default_nodes(),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("cannot start the local control plane: {e}"));
        eprintln!(
            "control plane ready in {:.2} s (etcd + kube-apiserver + kube-controller-manager, CRDs, {} nodes)",
            cp.startup.as_secs_f64(),
            default_nodes().len()
        );
        // SAFETY: registering a plain extern "C" fn with no captured state.
        unsafe { libc::atexit(stop_shared) };
        Mutex::new(Some(cp))
    });
    let guard = m.lock().unwrap_or_else(|p| p.into_inner());
    match guard.as_ref() {
        Some(cp) => f(cp),
        None => panic!("the shared control plane was already stopped"),
    }
}

/// What tests need from the shared cluster without holding its lock.
#[derive(Debug, Clone)]
pub struct ClusterInfo {
    pub kubeconfig: std::path::PathBuf,
    pub kubectl: std::path::PathBuf,
    pub helm: std::path::PathBuf,
    pub bin: std::path::PathBuf,
}

/// Starts (or reuses) the shared control plane and returns its paths.
pub fn shared() -> ClusterInfo {
    with_shared(|cp| ClusterInfo {
        kubeconfig: cp.kubeconfig().to_path_buf(),
        kubectl: cp.kubectl(),
        helm: cp.helm(),
        bin: cp.bin_dir().to_path_buf(),
    })
}

impl ClusterInfo {
    pub async fn client(&self) -> crate::error::Result<kube::Client> {
        crate::cluster::client_from(&self.kubeconfig).await
    }

    pub fn kubectl(&self) -> std::process::Command {
        let mut c = std::process::Command::new(&self.kubectl);
        c.env("KUBECONFIG", &self.kubeconfig);
        c
    }
}

static SHARED_SYSTEM: OnceLock<Mutex<Option<std::sync::Arc<crate::system::System>>>> =
    OnceLock::new();

extern "C" fn stop_shared_system() {
    if let Some(m) = SHARED_SYSTEM.get() {
        let taken = m.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(taken);
    }
}

/// The whole system (control plane, operator, one plugin per default node) shared by the
/// tests of one test binary; `exe` is the `cvm-dev` binary (`env!("CARGO_BIN_EXE_cvm-dev")`).
///
/// # Panics
/// When the system cannot start; the message says why.
pub fn shared_system(exe: &std::path::Path) -> std::sync::Arc<crate::system::System> {
    let m = SHARED_SYSTEM.get_or_init(|| {
        let sys =
            crate::system::System::start(crate::system::SystemOptions::new(exe, default_nodes()))
                .unwrap_or_else(|e| panic!("cannot start the local system: {e}"));
        eprintln!(
            "system ready: control plane in {:.2} s, operator and {} node plugins started",
            sys.cp.startup.as_secs_f64(),
            default_nodes().len()
        );
        // SAFETY: registering a plain extern "C" fn with no captured state.
        unsafe { libc::atexit(stop_shared_system) };
        Mutex::new(Some(std::sync::Arc::new(sys)))
    });
    let guard = m.lock().unwrap_or_else(|p| p.into_inner());
    match guard.as_ref() {
        Some(s) => s.clone(),
        None => panic!("the shared system was already stopped"),
    }
}
