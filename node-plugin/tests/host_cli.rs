//! `cvm-node-plugin detect`, `qemu-args` and `--measure` as an administrator runs them.

use std::process::Command;

fn plugin(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cvm-node-plugin"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn detect_on_this_machine_says_no_tee_and_why() {
    let (ok, text, err) = plugin(&["detect"]);
    assert!(ok, "{err}");
    assert!(text.contains("No TEE is available on this host."), "{text}");
    for tee in ["SEV-SNP", "TDX"] {
        assert!(text.contains(tee), "{text}");
    }
    let (ok, json, _) = plugin(&["detect", "-o", "json"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(v.is_object(), "{json}");
    let (ok, _, err) = plugin(&["detect", "-o", "xml"]);
    assert!(!ok && err.contains("text or json"), "{err}");
}

#[test]
fn qemu_args_for_the_snp_example() {
    let dir = tempfile::tempdir().unwrap();
    let caps = dir.path().join("caps.json");
    std::fs::write(&caps, r#"{"cbitpos":51,"reducedPhysBits":1}"#).unwrap();
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/sev-snp-cvm.yaml");
    let (ok, text, err) = plugin(&[
        "qemu-args",
        "--cvm",
        example,
        "--host-caps",
        caps.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(text.starts_with("qemu-system-x86_64"), "{text}");
    assert!(
        text.contains(
            "-object sev-snp-guest,id=cgs0,policy=0x30000,cbitpos=51,reduced-phys-bits=1"
        ),
        "{text}"
    );
    assert!(
        text.contains("-append 'console=ttyS0 root=/dev/vda1 ro'"),
        "{text}"
    );
    let (ok, _, err) = plugin(&["qemu-args", "--cvm", "/nonexistent.yaml"]);
    assert!(!ok && err.contains("/nonexistent.yaml"), "{err}");
}

/// `--measure` in a shell (or pod) where KUBECONFIG and NODE_NAME are set, as they are
/// wherever anyone works with a cluster: the environment does not count as options.
#[test]
fn measure_works_with_kubeconfig_and_node_name_in_the_environment() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/sev-snp-cvm.yaml");
    let run = |args: &[&str], env: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cvm-node-plugin"));
        cmd.args(args)
            .env_remove("KUBECONFIG")
            .env_remove("NODE_NAME");
        if env {
            cmd.env("KUBECONFIG", "/nonexistent/kubeconfig")
                .env("NODE_NAME", "tee-1");
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, with_env, err) = run(&["--measure", example], true);
    assert!(ok, "{err}");
    let fields: Vec<&str> = with_env.trim().split('\t').collect();
    assert_eq!(fields.len(), 3, "{with_env}");
    assert_eq!(fields[1], "SEV-SNP", "{with_env}");
    assert!(
        fields[2].len() == 96 && fields[2].chars().all(|c| c.is_ascii_hexdigit()),
        "a 48-byte launch digest in hex: {with_env}"
    );
    let (ok, without_env, err) = run(&["--measure", example], false);
    assert!(ok, "{err}");
    assert_eq!(with_env, without_env);
    // Given on the command line, another option still conflicts.
    let (ok, _, err) = run(&["--measure", example, "--kubeconfig", "/k"], true);
    assert!(!ok && err.contains("--kubeconfig"), "{err}");
}

/// A second plugin on a state directory another process holds waits (it never opens the
/// guest file), and goes on once the holder is gone.
#[test]
fn a_second_plugin_on_one_state_directory_waits_for_the_first() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let held = cvm_node_plugin::store::StateLock::try_acquire(&state)
        .unwrap()
        .expect("a fresh lock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cvm-node-plugin"))
        .args(["--node-name=n1", "--platform=sim", "--sim-tee=sev-snp"])
        .arg(format!("--state-dir={}", state.display()))
        .arg(format!(
            "--sim-root-dir={}",
            dir.path().join("roots").display()
        ))
        .arg(format!(
            "--kubeconfig={}",
            dir.path().join("no-kubeconfig").display()
        ))
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "plugin exited early");
        if line.contains("another node plugin holds this state directory") {
            break;
        }
    }
    assert!(
        !state.join(cvm_node_plugin::sim::GUESTS_FILE).exists(),
        "the waiting plugin opened no guest file"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "it waits, it does not exit"
    );
    drop(held);
    // With the lock free it goes on, to the missing kubeconfig.
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(err.contains("no-kubeconfig"), "{err}");
}
