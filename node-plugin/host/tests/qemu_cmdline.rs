//! Golden command lines per TEE, and the CVM → spec mapping on the repository's examples.

use std::path::{Path, PathBuf};

use cvm_crds::{ConfidentialVM, TeeType};
use cvm_host::qemu::{command_line, ArtifactPaths, HostCaps, QemuError, QemuGuestSpec};

const MILAN: HostCaps = HostCaps {
    cbitpos: Some(51),
    reduced_phys_bits: Some(1),
};

fn base(tee: TeeType) -> QemuGuestSpec {
    QemuGuestSpec {
        name: "default/demo".into(),
        tee,
        vcpus: 2,
        memory_mib: 2048,
        cpu_model: None,
        firmware: PathBuf::from("/var/lib/cvm/fw/OVMF.fd"),
        kernel: None,
        initrd: None,
        cmdline: None,
        policy: 0,
        host_data: None,
        kernel_hashes: false,
        quote_generation_socket: None,
        qmp_socket: PathBuf::from("/run/cvm/uid-1/qmp.sock"),
    }
}

/// One argument per line, so a golden diff shows exactly which option moved.
fn lines(args: &[String]) -> String {
    args.join("\n")
}

#[test]
fn sev_golden() {
    let mut s = base(TeeType::Sev);
    s.policy = 0x0b; // NODBG | NOKS | NOSEND
    let got = lines(&command_line(&s, &MILAN).unwrap());
    assert_eq!(
        got,
        "-name
guest=default/demo
-machine
q35,confidential-guest-support=cgs0
-accel
kvm
-object
sev-guest,id=cgs0,policy=0xb,cbitpos=51,reduced-phys-bits=1
-cpu
EPYC-v4
-smp
2
-m
2048M
-drive
if=pflash,format=raw,unit=0,readonly=on,file=/var/lib/cvm/fw/OVMF.fd
-qmp
unix:/run/cvm/uid-1/qmp.sock,server=on,wait=off
-nographic
-nodefaults
-S"
    );
}

#[test]
fn sev_es_golden_with_direct_boot_and_kernel_hashes() {
    let mut s = base(TeeType::SevEs);
    s.policy = 0x0f; // ES bit set
    s.cpu_model = Some("EPYC-Milan".into());
    s.kernel = Some("/var/lib/cvm/k/vmlinuz".into());
    s.initrd = Some("/var/lib/cvm/k/initrd.img".into());
    s.cmdline = Some("console=ttyS0 root=/dev/vda1 ro".into());
    s.kernel_hashes = true;
    let got = lines(&command_line(&s, &MILAN).unwrap());
    assert_eq!(
        got,
        "-name
guest=default/demo
-machine
q35,confidential-guest-support=cgs0
-accel
kvm
-object
sev-guest,id=cgs0,policy=0xf,cbitpos=51,reduced-phys-bits=1,kernel-hashes=on
-cpu
EPYC-Milan
-smp
2
-m
2048M
-drive
if=pflash,format=raw,unit=0,readonly=on,file=/var/lib/cvm/fw/OVMF.fd
-kernel
/var/lib/cvm/k/vmlinuz
-initrd
/var/lib/cvm/k/initrd.img
-append
console=ttyS0 root=/dev/vda1 ro
-qmp
unix:/run/cvm/uid-1/qmp.sock,server=on,wait=off
-nographic
-nodefaults
-S"
    );
}

#[test]
fn snp_golden() {
    let mut s = base(TeeType::SevSnp);
    s.policy = 0x30000; // reserved bit 17 | SMT
    s.host_data = Some(vec![0xab; 32]);
    s.kernel = Some("/k/vmlinuz".into());
    s.kernel_hashes = true;
    let got = lines(&command_line(&s, &MILAN).unwrap());
    assert_eq!(
        got,
        "-name
guest=default/demo
-machine
q35,confidential-guest-support=cgs0,memory-backend=ram0
-accel
kvm
-object
sev-snp-guest,id=cgs0,policy=0x30000,cbitpos=51,reduced-phys-bits=1,host-data=q6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=,kernel-hashes=on
-object
memory-backend-memfd,id=ram0,size=2048M,share=on
-cpu
EPYC-v4
-smp
2
-m
2048M
-bios
/var/lib/cvm/fw/OVMF.fd
-kernel
/k/vmlinuz
-qmp
unix:/run/cvm/uid-1/qmp.sock,server=on,wait=off
-nographic
-nodefaults
-S"
    );
}

#[test]
fn tdx_golden() {
    let mut s = base(TeeType::Tdx);
    s.policy = 0; // neither DEBUG nor MIGRATABLE
    s.host_data = Some(vec![0x01; 48]);
    s.firmware = "/usr/share/ovmf/OVMF.tdx.fd".into();
    s.quote_generation_socket = Some("/var/run/tdx-qgs/qgs.socket".into());
    let got = lines(&command_line(&s, &HostCaps::default()).unwrap());
    assert_eq!(
        got,
        "-name
guest=default/demo
-machine
q35,confidential-guest-support=cgs0,memory-backend=ram0,kernel-irqchip=split
-accel
kvm
-object
tdx-guest,id=cgs0,attributes=0x10000000,mrconfigid=AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEB,quote-generation-socket.type=unix,quote-generation-socket.path=/var/run/tdx-qgs/qgs.socket
-object
memory-backend-memfd,id=ram0,size=2048M,share=on
-cpu
host
-smp
2
-m
2048M
-bios
/usr/share/ovmf/OVMF.tdx.fd
-qmp
unix:/run/cvm/uid-1/qmp.sock,server=on,wait=off
-nographic
-nodefaults
-S"
    );
}

#[test]
fn commas_in_paths_are_escaped_for_qemu_options() {
    let mut s = base(TeeType::Sev);
    s.firmware = "/fw/a,b.fd".into();
    s.qmp_socket = "/run/x,y/qmp.sock".into();
    let args = command_line(&s, &MILAN).unwrap();
    assert!(args.contains(&"if=pflash,format=raw,unit=0,readonly=on,file=/fw/a,,b.fd".to_string()));
    assert!(args.contains(&"unix:/run/x,,y/qmp.sock,server=on,wait=off".to_string()));
}

#[test]
fn amd_without_cbitpos_is_refused_with_a_hint() {
    let e = command_line(&base(TeeType::SevSnp), &HostCaps::default()).unwrap_err();
    assert!(matches!(e, QemuError::MissingHostCap { .. }), "{e}");
    assert!(e.to_string().contains("cbitpos"), "{e}");
    assert_eq!(e.reason(), "HostCapabilityUnknown");
}

#[test]
fn inconsistent_specs_are_refused() {
    let mut s = base(TeeType::SevSnp);
    s.kernel_hashes = true;
    assert!(command_line(&s, &MILAN)
        .unwrap_err()
        .to_string()
        .contains("kernel-hashes needs a kernel"));

    let mut s = base(TeeType::SevSnp);
    s.host_data = Some(vec![0; 48]);
    assert!(command_line(&s, &MILAN)
        .unwrap_err()
        .to_string()
        .contains("HOST_DATA must be 32 bytes"));

    let mut s = base(TeeType::Tdx);
    s.host_data = Some(vec![0; 32]);
    assert!(command_line(&s, &MILAN)
        .unwrap_err()
        .to_string()
        .contains("MRCONFIGID must be 48 bytes"));

    let mut s = base(TeeType::Sev);
    s.host_data = Some(vec![0; 32]);
    assert!(command_line(&s, &MILAN).is_err());

    let mut s = base(TeeType::Sev);
    s.cmdline = Some("quiet".into());
    assert!(command_line(&s, &MILAN)
        .unwrap_err()
        .to_string()
        .contains("need a kernel"));
}

fn example(name: &str) -> ConfidentialVM {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name);
    let text = std::fs::read_to_string(&p).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

#[test]
fn snp_example_maps_policy_host_data_and_kernel_hashes() {
    let cvm = example("sev-snp-cvm.yaml");
    let paths = ArtifactPaths {
        firmware: "/fw/ovmf-snp.fd".into(),
        kernel: Some("/a/vmlinuz".into()),
        initrd: Some("/a/initrd".into()),
        qmp_socket: "/run/q.sock".into(),
        quote_generation_socket: Some("/ignored/for/amd".into()),
    };
    let spec = QemuGuestSpec::from_cvm(&cvm, &paths).unwrap();
    assert_eq!(spec.name, "default/snp-demo");
    assert_eq!(spec.tee, TeeType::SevSnp);
    assert_eq!(spec.policy, 0x30000);
    assert_eq!(spec.cpu_model.as_deref(), Some("EPYC-v4"));
    assert_eq!(spec.host_data.as_ref().map(Vec::len), Some(32));
    assert!(spec.kernel_hashes);
    assert_eq!(spec.quote_generation_socket, None);
    assert_eq!(
        spec.cmdline.as_deref(),
        Some("console=ttyS0 root=/dev/vda1 ro")
    );
    let args = command_line(&spec, &MILAN).unwrap();
    // HOST_DATA 9f86d081… is SHA-256("test"), base64 n4bQgYhM….
    assert!(
        args.iter().any(|a| a.starts_with("sev-snp-guest,")
            && a.contains(",host-data=n4bQgYhMfWWaL+qgxVrQFaO/TxsrC4Is0V1sFbDwCgg=,")),
        "{args:?}"
    );

    // A kernel the spec names must have a resolved path.
    let missing = ArtifactPaths {
        kernel: None,
        ..paths
    };
    assert!(QemuGuestSpec::from_cvm(&cvm, &missing).is_err());
}

#[test]
fn tdx_example_has_no_cpu_model_and_keeps_the_qgs_socket() {
    let cvm = example("tdx-cvm.yaml");
    let paths = ArtifactPaths {
        firmware: "/fw/tdvf.fd".into(),
        qmp_socket: "/run/q.sock".into(),
        quote_generation_socket: Some("/var/run/tdx-qgs/qgs.socket".into()),
        ..ArtifactPaths::default()
    };
    let spec = QemuGuestSpec::from_cvm(&cvm, &paths).unwrap();
    assert_eq!(spec.cpu_model, None);
    assert_eq!(spec.policy, 0);
    assert!(!spec.kernel_hashes);
    assert_eq!(spec.host_data.as_ref().map(Vec::len), Some(48));
    let args = command_line(&spec, &HostCaps::default()).unwrap();
    assert!(args
        .iter()
        .any(|a| a.starts_with("tdx-guest,id=cgs0,attributes=0x10000000,mrconfigid=")));
    assert!(args
        .iter()
        .any(|a| a.ends_with("quote-generation-socket.path=/var/run/tdx-qgs/qgs.socket")));
    assert!(args.windows(2).any(|w| w[0] == "-m" && w[1] == "8192M"));
}
