//! cvm-operator: reconciles `ConfidentialVM`s. It places each on a TEE-capable node,
//! verifies the evidence that node's plugin reports, and writes the verdict to status.
//! It also carries out `ConfidentialVMMigration`s (docs/migration.md).
//!
//! Pure decisions live in [`schedule`], [`state`], [`verify`], [`migrate`] and
//! [`leader::decide`]; [`controller`] and [`migration_controller`] read snapshots and
//! write results; [`runtime`] starts both.

pub mod cli;
pub mod controller;
pub mod error;
pub mod launcher;
pub mod leader;
pub mod metrics;
pub mod migrate;
pub mod migration_controller;
pub mod runtime;
pub mod schedule;
pub mod state;
pub mod verify;
