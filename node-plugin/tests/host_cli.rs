//! `cvm-node-plugin detect` and `qemu-args` as an administrator runs them.

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
