//! The local cluster harness of cvm-operator: a real kube-apiserver, etcd and
//! kube-controller-manager built from the Kubernetes Go modules (see `e2e/tools`),
//! simulated TEE nodes kept Ready, CRDs installed, and a kubeconfig for tests.
//!
//! ```no_run
//! let cp = cvm_e2e::ControlPlane::start(cvm_e2e::Options::default())?;
//! println!("export KUBECONFIG={}", cp.kubeconfig().display());
//! # Ok::<(), cvm_e2e::HarnessError>(())
//! ```

pub mod cluster;
pub mod demo;
pub mod error;
pub mod gitops;
pub mod identity;
pub mod kind;
pub mod nodes;
pub mod pki;
pub mod process;
pub mod shared;
pub mod suite;
pub mod system;
pub mod tokens;
pub mod tools;
pub mod wait;

pub use cluster::{ControlPlane, Options};
pub use error::HarnessError;
pub use nodes::{SimNode, Tee};
