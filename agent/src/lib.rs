//! The guest agent: runs inside a confidential VM and answers the node plugin's requests
//! for fresh evidence (see `docs/agent-protocol.md`), produced by the kernel's configfs-tsm
//! interface, which covers SEV-SNP (`sev_guest`) and TDX (`tdx_guest`).

pub mod server;
pub mod tsm;
