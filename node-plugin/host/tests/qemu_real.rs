//! The QMP client and the process wrapper against the real `qemu-system-x86_64` (TCG: no
//! TEE here). Skipped with a note when QEMU is missing, except under `CI=true`, where a
//! missing QEMU is a failure (CI installs it with `e2e/tools/install-host-deps.sh`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cvm_crds::TeeType;
use cvm_host::qemu::{
    command_line, HostCaps, QemuError, QemuGuestSpec, QemuProcess, QmpError, StartOptions,
};

fn qemu() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("qemu-system-x86_64"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "qemu-system-x86_64 is missing under CI=true: run e2e/tools/install-host-deps.sh"
        );
        eprintln!("SKIP: qemu-system-x86_64 not found (run e2e/tools/install-host-deps.sh)");
    }
    found
}

/// A plain paused q35 guest under TCG with QMP on `sock`.
fn plain_args(sock: &Path) -> Vec<String> {
    [
        "-machine",
        "q35",
        "-accel",
        "tcg",
        "-S",
        "-nodefaults",
        "-nographic",
        "-display",
        "none",
        "-m",
        "128M",
        "-qmp",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("unix:{},server=on,wait=off", sock.display())])
    .collect()
}

fn opts(bin: PathBuf, args: Vec<String>, sock: &Path) -> StartOptions {
    StartOptions {
        binary: bin,
        args,
        qmp_socket: sock.to_path_buf(),
        start_timeout: Duration::from_secs(30),
    }
}

#[tokio::test]
async fn plain_guest_starts_paused_answers_qmp_and_quits() {
    let Some(bin) = qemu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let (mut proc, mut qmp) = QemuProcess::start(&opts(bin, plain_args(&sock), &sock))
        .await
        .unwrap();
    let v = qmp.version().clone();
    println!("QEMU {}.{}.{} ({})", v.major, v.minor, v.micro, v.package);
    assert!(v.major >= 7, "{v:?}");

    let st = qmp.query_status().await.unwrap();
    assert!(!st.running);
    assert!(st.status == "prelaunch" || st.status == "paused", "{st:?}");

    // No SEV here: QEMU < 9.1 answers enabled=false, newer ones an error; both must come
    // out as a clear error.
    match qmp.query_sev_enabled().await {
        Err(QmpError::SevNotEnabled { state }) => {
            assert_eq!(state, "uninit");
        }
        Err(QmpError::Command { class, desc, .. }) => {
            assert_eq!(class, "GenericError");
            assert!(desc.contains("SEV"), "{desc}");
        }
        other => panic!("query-sev on a non-SEV guest gave {other:?}"),
    }

    // Commands that need SEV fail with QMP's own class and text.
    let e = qmp.query_sev_launch_measure().await.unwrap_err();
    match &e {
        QmpError::Command {
            command,
            class,
            desc,
        } => {
            assert_eq!(command, "query-sev-launch-measure");
            assert_eq!(class, "GenericError");
            assert!(desc.contains("SEV"), "{desc}");
        }
        other => panic!("{other}"),
    }
    assert!(e.to_string().contains("(GenericError)"), "{e}");
    let e = qmp.query_sev_capabilities().await.unwrap_err();
    assert!(
        matches!(e, QmpError::Command { ref class, .. } if class == "GenericError"),
        "{e}"
    );
    let e = qmp
        .query_sev_attestation_report("AAAAAAAAAAAAAAAAAAAAAA==")
        .await
        .unwrap_err();
    assert!(matches!(e, QmpError::Command { .. }), "{e}");

    // Still running between commands.
    proc.check_running().await.unwrap();

    qmp.quit().await.unwrap();
    let status = proc
        .wait_exit(Duration::from_secs(20))
        .await
        .unwrap()
        .expect("QEMU did not exit after quit");
    assert!(status.success(), "{status:?}");
    // After the exit, the wrapper reports it rather than pretending QEMU runs.
    let e = proc.check_running().await.unwrap_err();
    assert!(matches!(e, QemuError::Exited { .. }), "{e}");
    // The SHUTDOWN event arrived with or before quit's reply.
    let events = qmp.take_events();
    assert!(
        events
            .iter()
            .all(|e| e.event == "SHUTDOWN" || e.event == "STOP"),
        "{events:?}"
    );
}

#[tokio::test]
async fn snp_object_makes_qemu_exit_at_start_with_its_stderr() {
    let Some(bin) = qemu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let mut args = plain_args(&sock);
    args[1] = "q35,confidential-guest-support=cgs0".into();
    args.extend([
        "-object".to_string(),
        "sev-snp-guest,id=cgs0,policy=0x30000,cbitpos=51,reduced-phys-bits=1".to_string(),
    ]);
    let started = Instant::now();
    let e = QemuProcess::start(&opts(bin, args, &sock))
        .await
        .err()
        .expect("QEMU started an SNP guest on a host without SNP");
    assert!(started.elapsed() < Duration::from_secs(30));
    let QemuError::ExitedEarly { status, stderr } = &e else {
        panic!("{e}")
    };
    println!("QEMU said: {stderr:?} ({status})");
    assert!(
        status.starts_with("exit code") || status.starts_with("killed"),
        "{status}"
    );
    // QEMU's own words reach the error (and so the CVM condition): older QEMUs do not
    // know the object type, newer ones cannot enable SNP without KVM and /dev/sev.
    assert!(!stderr.is_empty());
    assert!(
        stderr
            .iter()
            .any(|l| l.contains("sev-snp-guest") || l.contains("SEV") || l.contains("sev")),
        "{stderr:?}"
    );
    assert!(e.to_string().contains(&stderr[0]), "{e}");
    assert_eq!(e.reason(), "QemuExitedAtStart");
}

#[tokio::test]
async fn generated_snp_command_line_fails_clearly_on_this_host() {
    let Some(bin) = qemu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let fw = dir.path().join("OVMF.fd");
    std::fs::write(&fw, vec![0u8; 4096]).unwrap();
    let spec = QemuGuestSpec {
        name: "default/snp".into(),
        tee: TeeType::SevSnp,
        vcpus: 1,
        memory_mib: 256,
        cpu_model: None,
        firmware: fw,
        kernel: None,
        initrd: None,
        cmdline: None,
        policy: 0x30000,
        host_data: Some(vec![7; 32]),
        kernel_hashes: false,
        quote_generation_socket: None,
        qmp_socket: sock.clone(),
    };
    let caps = HostCaps {
        cbitpos: Some(51),
        reduced_phys_bits: Some(1),
    };
    let args = command_line(&spec, &caps).unwrap();
    let e = QemuProcess::start(&opts(bin, args, &sock))
        .await
        .err()
        .expect("an SNP guest started on a host without SNP");
    println!("{e}");
    assert!(matches!(e, QemuError::ExitedEarly { .. }), "{e}");
    assert!(!e.stderr().is_empty(), "{e}");
}

#[tokio::test]
async fn sev_guest_under_tcg_is_reported_with_qemus_words() {
    // QEMU 7.2 aborts (SIGABRT) on this; newer ones exit with an error. Either way the
    // wrapper must say how it ended and what QEMU printed.
    let Some(bin) = qemu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let mut args = plain_args(&sock);
    args[1] = "q35,confidential-guest-support=cgs0".into();
    args.extend([
        "-object".to_string(),
        "sev-guest,id=cgs0,policy=0x1,cbitpos=51,reduced-phys-bits=1".to_string(),
    ]);
    let e = QemuProcess::start(&opts(bin, args, &sock))
        .await
        .err()
        .unwrap();
    println!("{e}");
    let QemuError::ExitedEarly { status, stderr } = &e else {
        panic!("{e}")
    };
    assert!(!status.is_empty());
    assert!(!stderr.is_empty(), "{e}");
}

#[tokio::test]
async fn memfd_backend_of_snp_and_tdx_lines_is_accepted_by_qemu() {
    // The private-memory part of the SNP/TDX command lines, checked on the real parser.
    let Some(bin) = qemu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let mut args = plain_args(&sock);
    args[1] = "q35,memory-backend=ram0".into();
    let m = args.iter().position(|a| a == "128M").unwrap();
    args[m] = "256M".into();
    args.extend([
        "-object".to_string(),
        "memory-backend-memfd,id=ram0,size=256M,share=on".to_string(),
    ]);
    let (mut proc, mut qmp) = QemuProcess::start(&opts(bin, args, &sock)).await.unwrap();
    assert!(!qmp.query_status().await.unwrap().running);
    proc.kill().await.unwrap();
    let e = proc.check_running().await.unwrap_err();
    assert!(e.to_string().contains("killed by signal 9"), "{e}");
}

#[tokio::test]
async fn missing_qmp_socket_times_out_and_kills_qemu() {
    let Some(bin) = qemu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real.sock");
    let wrong = dir.path().join("never.sock");
    let mut o = opts(bin, plain_args(&real), &wrong);
    o.start_timeout = Duration::from_millis(700);
    let e = QemuProcess::start(&o).await.err().unwrap();
    assert!(matches!(e, QemuError::StartTimeout { .. }), "{e}");
    assert!(e.to_string().contains("never.sock"), "{e}");
}

#[tokio::test]
async fn missing_binary_is_a_spawn_error() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let o = opts(dir.path().join("no-such-qemu"), plain_args(&sock), &sock);
    let e = QemuProcess::start(&o).await.err().unwrap();
    assert!(matches!(e, QemuError::Spawn { .. }), "{e}");
    assert_eq!(e.reason(), "QemuNotStarted");
}
