//! Host-side support for running confidential VMs on real TEE hardware.
//!
//! - [`detect`]: what the host offers (SEV, SEV-ES, SEV-SNP, TDX), read from sysfs, procfs,
//!   the misc cgroup and CPUID under a configurable root, with a reason for every feature
//!   that is off.
//! - [`qemu`]: QEMU command lines per TEE, an async QMP client and a process wrapper that
//!   turns an early QEMU exit into an error carrying QEMU's own last stderr lines.
//! - [`agent_proto`] and [`agent_client`]: the versioned, length-limited messages between
//!   the node plugin and the guest agent (`cvm-agent`), and the node plugin's client.
//!
//! No Kubernetes calls happen here; the node plugin wires these into its platform trait.

pub mod agent_client;
pub mod agent_proto;
#[cfg(feature = "host")]
pub mod detect;
#[cfg(feature = "host")]
pub mod qemu;
