//! `cvm-dev up` as a user runs it: prints the kubeconfig export when ready, serves a
//! real API server with the requested nodes Ready, refuses a second instance on the
//! same dir, and leaves no process behind after Ctrl-C (SIGINT).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn up_serves_ready_nodes_and_ctrl_c_cleans_up() {
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("state");
    let bin = env!("CARGO_BIN_EXE_cvm-dev");
    let mut up = Command::new(bin)
        .args([
            "up",
            "--processes",
            "--nodes",
            "2",
            "--tee",
            "sev-snp,tdx",
            "--dir",
        ])
        .arg(&state)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("cvm-dev starts");
    let stdout = up.stdout.take().expect("piped stdout");
    let line = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find(|l| l.starts_with("export KUBECONFIG="))
        .expect("cvm-dev prints the export line when ready");
    let kubeconfig = line.trim_start_matches("export KUBECONFIG=").to_string();
    assert_eq!(
        kubeconfig,
        state
            .canonicalize()
            .unwrap()
            .join("kubeconfig")
            .display()
            .to_string()
    );

    let kubectl = cvm_e2e::tools::bin_dir().unwrap().join("kubectl");
    let out = Command::new(&kubectl)
        .env("KUBECONFIG", &kubeconfig)
        .args(["get", "nodes", "--no-headers"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let ready: Vec<&str> = text
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("Ready"))
        .collect();
    assert_eq!(ready.len(), 2, "{text}");
    assert!(text.contains("cvm-node-1-tdx"), "{text}");

    // A second `up` on the same dir is refused with a hint.
    let second = Command::new(bin)
        .args(["up", "--processes", "--dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("already runs") && err.contains("cvm-dev down"),
        "{err}"
    );

    // Ctrl-C.
    // SAFETY: signal to the child we spawned.
    unsafe { libc::kill(up.id() as i32, libc::SIGINT) };
    let status = up.wait().unwrap();
    assert!(
        status.success(),
        "cvm-dev exits cleanly on SIGINT: {status}"
    );
    let needle = state.canonicalize().unwrap().display().to_string();
    let orphans: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&needle))
        .collect();
    assert!(orphans.is_empty(), "left behind: {orphans:?}");
    assert!(!state.join("cvm-dev.pid").exists());
}

#[test]
fn a_fleet_without_tdx_skips_the_tdx_example_and_stays_up() {
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("state");
    let bin = env!("CARGO_BIN_EXE_cvm-dev");
    let mut up = Command::new(bin)
        .args([
            "up",
            "--processes",
            "--nodes",
            "1",
            "--tee",
            "sev-snp",
            "--dir",
        ])
        .arg(&state)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cvm-dev starts");
    let stderr = up.stderr.take().expect("piped stderr");
    let errs = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let stdout = up.stdout.take().expect("piped stdout");
    let ready = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.starts_with("export KUBECONFIG="));
    assert!(ready, "cvm-dev prints the export line");
    // SAFETY: signal to the child we spawned.
    unsafe { libc::kill(up.id() as i32, libc::SIGINT) };
    let status = up.wait().unwrap();
    let log = errs.join().unwrap().join("\n");
    assert!(status.success(), "{status}: {log}");
    assert!(
        log.contains("skipped examples/tdx-cvm.yaml: no node of this fleet hosts TDX"),
        "{log}"
    );
    assert!(
        log.contains("every example CVM reached its verdict"),
        "{log}"
    );
}
