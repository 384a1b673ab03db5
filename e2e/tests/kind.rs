//! The cluster e2e suite (`cvm_e2e::suite`) as users run it: on a real kind cluster the
//! harness makes (images built here from static binaries, `helm install --wait` with the
//! defaults plus the simulated platform, pods with in-cluster config and the tokens
//! kubelet projects), or, given `CVM_E2E_KUBECONFIG`, on that existing cluster with the
//! chart installed (checks that need the harness's internals are then skipped, each with
//! its reason). Prints the figures the issues ask for.
//!
//! Needs Debian's docker.io and debootstrap (`e2e/tools/install-host-deps.sh`) for kind;
//! without them it is skipped, except under `CI=true`, where that is a failure.

use cvm_e2e::kind::{Kind, KindOptions};
use cvm_e2e::suite::{self, Cluster, ENV_KUBECONFIG};
use std::time::Instant;

/// Deletes the kind cluster however the test ends.
struct Owned(Cluster);

impl Drop for Owned {
    fn drop(&mut self) {
        if let Some(kind) = &self.0.kind {
            if let Err(e) = kind.delete() {
                eprintln!("deleting the kind cluster: {e}");
            }
        }
    }
}

#[test]
fn the_suite_runs_on_kind_or_on_the_given_cluster() {
    if let Some(kubeconfig) = std::env::var_os(ENV_KUBECONFIG) {
        let c =
            Cluster::existing(std::path::Path::new(&kubeconfig)).unwrap_or_else(|e| panic!("{e}"));
        let report = suite::run(&c).unwrap_or_else(|e| panic!("{e}"));
        println!(
            "figure: full e2e suite on the existing cluster: {:.1} s ({} checks passed, {} skipped)",
            report.took.as_secs_f64(),
            report.passed.len(),
            report.skipped.len()
        );
        return;
    }
    if !cvm_e2e::kind::run_or_skip("the kind suite") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let t0 = Instant::now();
    let kind = Kind::up(&KindOptions::demo("cvm-e2e", dir.path())).expect("kind up");
    for (step, took) in &kind.timings {
        println!("figure: {step}: {:.1} s", took.as_secs_f64());
    }
    println!(
        "figure: kind cluster with the chart installed: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let c = Owned(Cluster::from_kind(kind));
    let report = suite::run(&c.0).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        report.skipped.is_empty(),
        "on its own kind cluster the suite skips nothing: {:?}",
        report.skipped
    );
    assert_eq!(report.passed.len(), suite::CHECKS.len());
    println!(
        "figure: full e2e suite on kind: {:.1} s with the cluster, {:.1} s for the checks",
        t0.elapsed().as_secs_f64(),
        report.took.as_secs_f64()
    );
}
