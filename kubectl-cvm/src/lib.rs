//! `kubectl cvm`: the CVM owner's own client. It computes launch digests ahead of time,
//! asks a CVM for fresh evidence bound to the user's nonce, and verifies evidence on the
//! user's machine with the user's trust anchors, so a user need not believe the operator.
//!
//! Exit status: 0 affirmed (or success), 1 contraindicated (every finding printed),
//! 2 bad usage, unreadable input or an unreachable cluster.

pub mod attest;
pub mod cli;
pub mod cluster;
pub mod console;
pub mod evidence;
pub mod measure;
pub mod measure_cmd;
pub mod migrate;
pub mod power;
pub mod report;
pub mod status;
