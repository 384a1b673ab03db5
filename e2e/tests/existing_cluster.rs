//! The suite's existing-cluster mode, proven against a cluster this test did not make:
//! `cvm-dev up` runs as a separate process (kind, the chart installed by Helm, the
//! examples applied), and the suite is given only its kubeconfig, as a user gives
//! `CVM_E2E_KUBECONFIG`. Checks that need the harness's internals skip with their reason.

use cvm_e2e::suite::{self, Cluster, ENV_KUBECONFIG};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

/// Ctrl-C to `cvm-dev up` (which deletes its cluster) however the test ends.
struct Up(Child);

impl Drop for Up {
    fn drop(&mut self) {
        // SAFETY: a signal to the child this test spawned.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        match self.0.wait() {
            Ok(s) if s.success() => {}
            other => eprintln!("cvm-dev up ended with {other:?}"),
        }
    }
}

#[test]
fn the_suite_runs_on_an_existing_cluster_started_by_cvm_dev_up() {
    if std::env::var_os(ENV_KUBECONFIG).is_some() {
        eprintln!("skipped: {ENV_KUBECONFIG} is set; the kind test runs the suite on that cluster");
        return;
    }
    if !cvm_e2e::kind::run_or_skip("the existing-cluster mode") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("state");
    let t0 = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cvm-dev"))
        .arg("up")
        .arg("--dir")
        .arg(&state)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("cvm-dev starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let up = Up(child);
    let line = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find(|l| l.starts_with("export KUBECONFIG="))
        .expect("cvm-dev up prints the export line when ready");
    let kubeconfig = line.trim_start_matches("export KUBECONFIG=").to_string();
    println!(
        "figure: cvm-dev up ready (separate process): {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    let c = Cluster::existing(std::path::Path::new(&kubeconfig)).unwrap_or_else(|e| panic!("{e}"));
    assert!(c.kind.is_none(), "the suite sees only a kubeconfig");
    let report = suite::run(&c).unwrap_or_else(|e| panic!("{e}"));
    let skipped: Vec<&str> = report.skipped.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        skipped,
        [
            "capacity-burst",
            "node-restriction-projected-token",
            "kubelet-restart",
            "kill-during-launch",
            "helm-upgrade",
            "helm-uninstall"
        ],
        "only the checks that need the harness's internals skip"
    );
    assert!(report
        .skipped
        .iter()
        .all(|(_, why)| why.starts_with("needs the kind harness: ")));
    println!(
        "figure: full e2e suite on the existing cluster: {:.1} s ({} checks passed, {} skipped)",
        report.took.as_secs_f64(),
        report.passed.len(),
        report.skipped.len()
    );
    drop(up);
}
