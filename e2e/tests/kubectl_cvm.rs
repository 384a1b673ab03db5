//! `kubectl cvm` against the local cluster, run as a user would: the binary (here the
//! `cvm-dev kubectl-cvm` multi-call arm), a kubeconfig, and the simulated TEE hosts.
//! The verdicts are the CLI's own, with its own trust anchors; the operator's is only
//! reported.

mod common_cvm;

use common_cvm::*;
use cvm_e2e::system::System;
use cvm_e2e::wait;
use std::process::{Command, Output};

fn cli(sys: &System) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cvm-dev"));
    c.arg("kubectl-cvm").env("KUBECONFIG", sys.cp.kubeconfig());
    c
}

fn run(sys: &System, args: &[&str]) -> Output {
    cli(sys).args(args).output().unwrap()
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn sim_root(sys: &System, name: &str) -> String {
    let fps = cvm_e2e::system::sim_root_fingerprints(sys).unwrap();
    let fp = fps
        .iter()
        .find(|(n, _)| n == name)
        .expect("simulator root")
        .1
        .clone();
    format!("sha256:{fp}")
}

/// A running, operator-verified CVM and its simulated launch measurement.
async fn verified(sys: &System, ns: &str, name: &str, tee: &str) -> String {
    let (_, cvms) = api(sys, ns).await;
    let m = cvm(name, ns, tee);
    let measurement = m["spec"]["attestation"]["expectedMeasurements"][0]
        .as_str()
        .unwrap()
        .to_string();
    apply_json(sys, &m).unwrap();
    wait::until(&cvms, name, WAIT, "Verified", |c| {
        cond_is(c, "Verified", "True")
    })
    .await
    .unwrap();
    measurement
}

#[tokio::test]
async fn attest_snp_with_own_nonce_and_anchors_is_affirmed_and_bound() {
    let sys = system();
    let ns = "e2e-kcvm-snp";
    let m = verified(&sys, ns, "mine", "SEV-SNP").await;
    let nonce = format!("c0ffee{:08x}", std::process::id());
    let root = sim_root(&sys, "cvm-sim-amd");
    let o = run(
        &sys,
        &[
            "attest",
            "mine",
            "-n",
            ns,
            "--nonce",
            &nonce,
            "--trust-root",
            &root,
            "--expected-measurement",
            &m,
            "--timeout",
            "60s",
        ],
    );
    let text = out(&o);
    assert_eq!(o.status.code(), Some(0), "{text}\n{}", err(&o));
    assert!(text.contains(&format!("nonce {nonce}")), "{text}");
    assert!(text.contains(&format!("measurement {m}")), "{text}");
    assert!(text.contains("result: AFFIRMED"), "{text}");
    assert!(
        text.contains("operator (for information): affirming"),
        "{text}"
    );
    assert!(text.contains("agrees"), "{text}");

    // The challenge went on the CVM and the evidence answers it.
    let (_, cvms) = api(&sys, ns).await;
    let c = cvms.get("mine").await.unwrap();
    assert_eq!(c.nonce(), Some(nonce.as_str()));
    let ev = c.status.as_ref().unwrap().evidence.as_ref().unwrap();
    assert_eq!(ev.nonce.as_deref(), Some(nonce.as_str()));

    // -o json prints the EAR, with a fresh random nonce this time.
    let o = run(
        &sys,
        &[
            "attest",
            "mine",
            "-n",
            ns,
            "--random",
            "--trust-root",
            &root,
            "--expected-measurement",
            &m,
            "-o",
            "json",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    let ear: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let sent = ear["eat_nonce"].as_str().unwrap().to_string();
    assert_eq!(sent.len(), 64, "32 random bytes");
    assert_ne!(sent, nonce);
    assert_eq!(
        ear["submods"]["SEV-SNP"]["ear.status"], "affirming",
        "{ear}"
    );
    let c = cvms.get("mine").await.unwrap();
    assert_eq!(
        c.status.unwrap().evidence.unwrap().nonce.as_deref(),
        Some(sent.as_str())
    );
}

#[tokio::test]
async fn attest_does_not_take_the_operators_word() {
    let sys = system();
    let ns = "e2e-kcvm-distrust";
    let m = verified(&sys, ns, "theirs", "SEV-SNP").await;
    // The operator's policy trusts the simulator root; the user's default anchors (AMD
    // only) do not: the user's verdict is contraindicated although the operator affirms.
    let o = run(
        &sys,
        &[
            "attest",
            "theirs",
            "-n",
            ns,
            "--random",
            "--expected-measurement",
            &m,
        ],
    );
    let text = out(&o);
    assert_eq!(o.status.code(), Some(1), "{text}\n{}", err(&o));
    assert!(text.contains("result: CONTRAINDICATED"), "{text}");
    assert!(
        text.contains("CONTRAINDICATED:"),
        "a finding is printed: {text}"
    );
    assert!(text.contains("DISAGREES"), "{text}");

    // A wrong reference measurement is a named finding with both values.
    let root = sim_root(&sys, "cvm-sim-amd");
    let wrong = "ab".repeat(48);
    let o = run(
        &sys,
        &[
            "attest",
            "theirs",
            "-n",
            ns,
            "--random",
            "--trust-root",
            &root,
            "--expected-measurement",
            &wrong,
        ],
    );
    let text = out(&o);
    assert_eq!(o.status.code(), Some(1), "{text}\n{}", err(&o));
    assert!(
        text.contains(&wrong) && text.contains(&m),
        "expected and reported: {text}"
    );

    // The same via a policy file in the `evidence verify` format.
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!("snp:\n  trustedRoots: [amd, \"{root}\"]\n  measurements: [\"{m}\"]\n  allowMigrationAgent: true\n"),
    )
    .unwrap();
    let o = run(
        &sys,
        &[
            "attest",
            "theirs",
            "-n",
            ns,
            "--policy",
            policy.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}\n{}", out(&o), err(&o));
}

#[tokio::test]
async fn attest_tdx_with_the_intel_simulator_root() {
    let sys = system();
    let ns = "e2e-kcvm-tdx";
    let m = verified(&sys, ns, "td", "TDX").await;
    let root = sim_root(&sys, "cvm-sim-intel");
    let o = run(
        &sys,
        &[
            "attest",
            "td",
            "-n",
            ns,
            "--random",
            "--trust-root",
            &root,
            "--expected-measurement",
            &m,
        ],
    );
    let text = out(&o);
    assert_eq!(o.status.code(), Some(0), "{text}\n{}", err(&o));
    assert!(text.contains(&format!("MRTD {m}")), "{text}");

    // report decodes the quote in the status, TCB status included once the root is trusted.
    let o = run(&sys, &["report", "td", "-n", ns, "--trust-root", &root]);
    let text = out(&o);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert!(
        text.contains(&format!("MRTD:                  {m}")),
        "{text}"
    );
    for f in ["RTMR0:", "TD attributes:", "TCB status:"] {
        assert!(text.contains(f), "{f}: {text}");
    }
}

#[tokio::test]
async fn status_and_report_show_what_the_cluster_holds() {
    let sys = system();
    let ns = "e2e-kcvm-status";
    let m = verified(&sys, ns, "shown", "SEV-SNP").await;
    let (_, cvms) = api(&sys, ns).await;
    let c = cvms.get("shown").await.unwrap();
    let node = c.node_name().unwrap().to_string();

    let o = run(&sys, &["status", "shown", "-n", ns]);
    let text = out(&o);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert!(text.contains("Phase:           Verified"), "{text}");
    assert!(text.contains(&format!("Node:            {node}")), "{text}");
    assert!(
        text.contains("TEE:             SEV-SNP (the host says: simulated"),
        "{text}"
    );
    assert!(
        text.contains("Verified:        affirming by cvm-operator"),
        "{text}"
    );
    assert!(text.contains("under policy e2e-sim"), "{text}");
    assert!(text.contains("Findings:"), "{text}");
    let o = run(&sys, &["status", "shown", "-n", ns, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["phase"], "Verified");

    let o = run(&sys, &["report", "shown", "-n", ns]);
    let text = out(&o);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert!(
        text.contains(&format!("Measurement:           {m}")),
        "{text}"
    );
    assert!(text.contains("Guest policy:"), "{text}");

    // A saved object decodes the same way, offline.
    let yaml = kubectl(&sys, &["get", "cvm", "shown", "-n", ns, "-o", "yaml"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("shown.yaml");
    std::fs::write(&f, yaml).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_cvm-dev"))
        .args(["kubectl-cvm", "report", f.to_str().unwrap()])
        .env_remove("KUBECONFIG")
        .output()
        .unwrap();
    assert!(out(&o).contains(&m), "{}", err(&o));
}

#[tokio::test]
async fn kubeconfig_context_and_namespace_flags_are_honoured() {
    let sys = system();
    let ns = "e2e-kcvm-flags";
    verified(&sys, ns, "flagged", "SEV-SNP").await;
    let kc = sys.cp.kubeconfig().to_str().unwrap().to_string();
    // --kubeconfig without $KUBECONFIG.
    let o = Command::new(env!("CARGO_BIN_EXE_cvm-dev"))
        .args([
            "kubectl-cvm",
            "status",
            "flagged",
            "--kubeconfig",
            &kc,
            "--namespace",
            ns,
        ])
        .env_remove("KUBECONFIG")
        .env("HOME", "/nonexistent")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    // The wrong namespace: not found, exit 2, saying where it looked.
    let o = run(&sys, &["status", "flagged", "-n", "default"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        err(&o).contains("not found in namespace default"),
        "{}",
        err(&o)
    );
    // An unknown context is refused by name.
    let o = run(
        &sys,
        &[
            "status",
            "flagged",
            "-n",
            ns,
            "--context",
            "no-such-context",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(err(&o).contains("no-such-context"), "{}", err(&o));
}

#[tokio::test]
async fn attest_gives_up_after_its_timeout_when_no_guest_answers() {
    let sys = system();
    let ns = "e2e-kcvm-timeout";
    let (_, cvms) = api(&sys, ns).await;
    let mut m = cvm("nowhere", ns, "SEV-SNP");
    m["spec"]["nodeSelector"] = serde_json::json!({"cvmp.io/pool": "absent"});
    apply_json(&sys, &m).unwrap();
    wait::until(&cvms, "nowhere", WAIT, "Scheduled=False", |c| {
        cond_is(c, "Scheduled", "False")
    })
    .await
    .unwrap();
    let t = std::time::Instant::now();
    let o = run(
        &sys,
        &["attest", "nowhere", "-n", ns, "--random", "--timeout", "3s"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", out(&o));
    assert!(err(&o).contains("no evidence for nonce"), "{}", err(&o));
    assert!(err(&o).contains("phase Pending"), "{}", err(&o));
    let took = t.elapsed();
    assert!(
        took >= std::time::Duration::from_secs(3) && took < std::time::Duration::from_secs(20),
        "{took:?}"
    );
}

/// `launchId` and `launchedAt` of the guest the status describes.
fn launch_of(c: &cvm_crds::ConfidentialVM) -> (Option<String>, Option<String>) {
    kubectl_cvm::power::launch_mark(c)
}

fn before_stop(c: &cvm_crds::ConfidentialVM) -> Option<String> {
    c.metadata
        .annotations
        .as_ref()?
        .get(kubectl_cvm::power::ANNOTATION_BEFORE_STOP)
        .cloned()
}

fn stopped_as_halted(c: &cvm_crds::ConfidentialVM) -> bool {
    c.phase() == cvm_crds::CvmPhase::Stopped
        && condition(c, "Ready").is_some_and(|r| r.status == "True" && r.reason == "Halted")
}

#[tokio::test]
async fn stop_start_and_restart_drive_the_run_strategy() {
    use cvm_crds::cvm::RunStrategy;
    use cvm_crds::CvmPhase;

    let sys = system();
    let ns = "e2e-kcvm-power";
    let name = "power";
    let (admin, cvms) = api(&sys, ns).await;
    // Not the default strategy, so that restoring it is seen.
    let mut m = cvm(name, ns, "SEV-SNP");
    m["spec"]["runStrategy"] = serde_json::json!("RerunOnFailure");
    apply_json(&sys, &m).unwrap();
    let first = wait::until(&cvms, name, WAIT, "Verified", |c| {
        cond_is(c, "Verified", "True")
    })
    .await
    .unwrap();
    let node = first.node_name().unwrap().to_string();
    let uid = first.metadata.uid.clone().unwrap();
    let launch1 = launch_of(&first);
    assert!(launch1.0.is_some(), "the simulator reports a launch id");
    wait_guest(&sys, &node, &uid, true).await;

    // stop: Halted, the old strategy remembered; the command does not wait by default.
    let o = run(&sys, &["stop", name, "-n", ns]);
    let text = out(&o);
    assert_eq!(o.status.code(), Some(0), "{text}\n{}", err(&o));
    assert!(
        text.contains("spec.runStrategy RerunOnFailure -> Halted"),
        "{text}"
    );
    let c = cvms.get(name).await.unwrap();
    assert_eq!(c.spec.run_strategy, RunStrategy::Halted);
    assert_eq!(before_stop(&c).as_deref(), Some("RerunOnFailure"));
    // The guest stops: the operator says so, and the simulated host no longer holds it.
    // (This harness's operator runs without --launcher-image, so there is no launcher pod
    // whose deletion could be checked here.)
    wait::until(&cvms, name, WAIT, "Stopped, Ready=True Halted", |c| {
        stopped_as_halted(c)
    })
    .await
    .unwrap();
    wait_guest(&sys, &node, &uid, false).await;

    // stop again: already stopped, nothing changes.
    let generation = cvms.get(name).await.unwrap().metadata.generation;
    let o = run(&sys, &["stop", name, "-n", ns]);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert!(out(&o).contains("already stopped"), "{}", out(&o));
    let c = cvms.get(name).await.unwrap();
    assert_eq!(before_stop(&c).as_deref(), Some("RerunOnFailure"));
    assert_eq!(c.metadata.generation, generation, "the spec is left alone");

    // restart of a stopped CVM is refused, pointing at start.
    let o = run(&sys, &["restart", name, "-n", ns]);
    assert_eq!(o.status.code(), Some(2), "{}", out(&o));
    assert!(
        err(&o).contains("is stopped") && err(&o).contains("use kubectl cvm start"),
        "{}",
        err(&o)
    );

    // start --wait: the remembered strategy back, the annotation gone, a new guest verified.
    let o = run(
        &sys,
        &["start", name, "-n", ns, "--wait", "--timeout", "90s"],
    );
    let text = out(&o);
    assert_eq!(o.status.code(), Some(0), "{text}\n{}", err(&o));
    assert!(
        text.contains("spec.runStrategy Halted -> RerunOnFailure"),
        "{text}"
    );
    assert!(text.contains("Verified on node"), "{text}");
    let c = cvms.get(name).await.unwrap();
    assert_eq!(c.spec.run_strategy, RunStrategy::RerunOnFailure);
    assert_eq!(before_stop(&c), None);
    assert_eq!(
        c.phase(),
        CvmPhase::Verified,
        "--wait returned before Verified"
    );
    let launch2 = launch_of(&c);
    assert!(launch2.0.is_some());
    assert_ne!(launch2, launch1, "start launches a new guest");
    wait_guest(&sys, &node, &uid, true).await;

    // start again: already running.
    let o = run(&sys, &["start", name, "-n", ns]);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert!(
        out(&o).contains("already running (runStrategy RerunOnFailure"),
        "{}",
        out(&o)
    );

    // restart --wait of the running CVM: stopped, started, a new launch verified, and
    // the strategy as it was.
    let o = run(
        &sys,
        &["restart", name, "-n", ns, "--wait", "--timeout", "90s"],
    );
    let text = out(&o);
    assert_eq!(o.status.code(), Some(0), "{text}\n{}", err(&o));
    for want in [
        "spec.runStrategy RerunOnFailure -> Halted",
        "guest stopped (phase Stopped",
        "spec.runStrategy Halted -> RerunOnFailure",
        "Verified on node",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }
    let c = cvms.get(name).await.unwrap();
    assert_eq!(c.spec.run_strategy, RunStrategy::RerunOnFailure);
    assert_eq!(before_stop(&c), None);
    assert_eq!(c.phase(), CvmPhase::Verified);
    let launch3 = launch_of(&c);
    assert!(launch3.0.is_some());
    assert_ne!(launch3, launch2, "restart launches a new guest");
    assert!(
        c.status
            .as_ref()
            .and_then(|s| s.guest_instance.as_ref())
            .is_some_and(|g| g.relaunches >= 2),
        "the operator pinned each new instance: {:?}",
        c.status.as_ref().map(|s| &s.guest_instance)
    );

    // stop --wait returns once the status shows the guest stopped.
    let o = run(
        &sys,
        &["stop", name, "-n", ns, "--wait", "--timeout", "90s"],
    );
    assert_eq!(o.status.code(), Some(0), "{}\n{}", out(&o), err(&o));
    assert!(out(&o).contains("guest stopped"), "{}", out(&o));
    let c = cvms.get(name).await.unwrap();
    assert!(stopped_as_halted(&c), "{:?}", c.status);

    // A CVM no node can host: stopped at once (there is no guest), and a start --wait
    // gives up after its timeout, saying where the CVM was left.
    let mut m = cvm("unplaced", ns, "SEV-SNP");
    m["spec"]["nodeSelector"] = serde_json::json!({"cvmp.io/pool": "absent"});
    apply_json(&sys, &m).unwrap();
    wait::until(&cvms, "unplaced", WAIT, "Scheduled=False", |c| {
        cond_is(c, "Scheduled", "False")
    })
    .await
    .unwrap();
    let o = run(
        &sys,
        &["stop", "unplaced", "-n", ns, "--wait", "--timeout", "60s"],
    );
    assert_eq!(o.status.code(), Some(0), "{}\n{}", out(&o), err(&o));
    assert!(
        out(&o).contains("guest stopped (phase Pending"),
        "{}",
        out(&o)
    );
    let o = run(
        &sys,
        &["start", "unplaced", "-n", ns, "--wait", "--timeout", "3s"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", out(&o));
    for want in [
        "timed out after 3s waiting for ConfidentialVM",
        "to be Verified",
        "phase Pending, Ready False (",
    ] {
        assert!(err(&o).contains(want), "{want}: {}", err(&o));
    }

    // A missing CVM is named, with the namespace looked in.
    let o = run(&sys, &["stop", "no-such-vm", "-n", ns]);
    assert_eq!(o.status.code(), Some(2), "{}", out(&o));
    assert!(
        err(&o).contains(&format!(
            "ConfidentialVM no-such-vm not found in namespace {ns}"
        )),
        "{}",
        err(&o)
    );

    // A user who may read but not patch CVMs is told which verb is missing.
    let dir = tempfile::tempdir().unwrap();
    let kc = cvm_e2e::identity::user_kubeconfig(
        &admin,
        sys.cp.kubeconfig(),
        "power-reader",
        None,
        &dir.path().join("reader.kubeconfig"),
    )
    .await
    .unwrap();
    apply_json(
        &sys,
        &serde_json::json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "cvm-reader", "namespace": ns},
            "rules": [{"apiGroups": ["cvmp.io"], "resources": ["confidentialvms"],
                       "verbs": ["get"]}],
        }),
    )
    .unwrap();
    apply_json(
        &sys,
        &serde_json::json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "cvm-reader", "namespace": ns},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                        "name": "cvm-reader"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                          "name": "power-reader"}],
        }),
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_cvm-dev"))
        .args(["kubectl-cvm", "start", name, "-n", ns, "--kubeconfig"])
        .arg(&kc)
        .env_remove("KUBECONFIG")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", out(&o));
    assert!(
        err(&o).contains("may not patch confidentialvms.cvmp.io in namespace"),
        "{}",
        err(&o)
    );
    let c = cvms.get(name).await.unwrap();
    assert_eq!(c.spec.run_strategy, RunStrategy::Halted, "nothing changed");
}
