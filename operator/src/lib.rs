//! cvm-operator: reconciles `ConfidentialVM`s. It places each on a TEE-capable node,
//! verifies the evidence that node's plugin reports, and writes the verdict to status.
//!
//! Pure decisions live in [`schedule`], [`state`], [`verify`] and [`leader::decide`];
//! [`controller`] reads snapshots and writes results.

pub mod cli;
pub mod controller;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod schedule;
pub mod state;
pub mod verify;
