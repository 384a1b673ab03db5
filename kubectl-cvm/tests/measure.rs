//! `kubectl cvm measure` against the `sev` crate's expected digests (its tests/measurement.rs),
//! against the `sev` crate's implementation on varied inputs, and on the Debian OVMF.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kubectl_cvm::measure::{self, vmsa, Inputs, MeasureError, Mode};
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_kubectl-cvm");

/// A vector's path; see `cvm_attest::testvectors`.
fn vector(rel: &str) -> Option<PathBuf> {
    cvm_attest::testvectors::path(rel)
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

const AMDSEV: &str = "snp-measure/virtee-sev/ovmf_AmdSev_suffix.bin";
const OVMFX64: &str = "snp-measure/virtee-sev/ovmf_OvmfX64_suffix.bin";
const AMDSEV_HASH: &str = "086e2e9149ebf45abdc3445fba5b2da8270bdbb04094d7a2c37faaa4b24af3aa16aff8c374c2a55c467a50da6d466b74";

/// (firmware, extra args, expected digest): every QEMU-mode case of the sev crate's tests.
const SEV_CRATE_CASES: &[(&str, &[&str], &str)] = &[
    (AMDSEV, &["--vcpus", "1", "--guest-features", "0x1", "--kernel", "/dev/null", "--initrd", "/dev/null", "--ovmf-hash", AMDSEV_HASH],
     "ddc5224521617a536ee7ce9dd6224d1b58a8d4fda1c741f3ac99fc4bfa04ba6e9fc98646d4a07a9079397fa3852819b5"),
    (AMDSEV, &["--vcpus", "1", "--guest-features", "0x21", "--kernel", "/dev/null", "--initrd", "/dev/null", "--ovmf-hash", AMDSEV_HASH],
     "329c8ce0972ae52343b64d34a434a86f245dfd74f5ed7aae15d22efc78fb9683632b9b50e4e1d7fa41179ef98a7ef198"),
    (AMDSEV, &["--vcpus", "1", "--guest-features", "0x1", "--kernel", "/dev/null", "--initrd", "/dev/null", "--append", "console=ttyS0 loglevel=7"],
     "6d287813eb5222d770f75005c664e34c204f385ce832cc2ce7d0d6f354454362f390ef83a92046c042e706363b4b08fa"),
    (AMDSEV, &["--vcpus", "1", "--guest-features", "0x21", "--kernel", "/dev/null", "--initrd", "/dev/null", "--append", "console=ttyS0 loglevel=7", "--ovmf-hash", AMDSEV_HASH],
     "803f691094946e42068aaa3a8f9e26a5c89f36f7b73ecfb28c653360fe4b3aba7e534442e7e1e17895dfe778d0228977"),
    (AMDSEV, &["--vcpus", "1", "--guest-features", "0x1"],
     "19358ba9a7615534a9a1e2f0dfc29384dcd4dcb7062ff9c6013b26869a5fc6ecabe033c48dd6f6db5d6d76e7c5df632d"),
    (AMDSEV, &["--vcpus", "1", "--guest-features", "0x21"],
     "e1e1ca029dd7973ab9513295be68198472dcd4fc834bd9af9b63f6e8a1674dbf281a9278a4a2ebe0eed9f22adbcd0e2b"),
    (AMDSEV, &["--vcpus", "4", "--guest-features", "0x1", "--kernel", "/dev/null", "--initrd", "/dev/null"],
     "5061fffb019493a903613d56d54b94912a1a2f9e4502385f5c194616753720a92441310ba6c4933de877c36e23046ad5"),
    (AMDSEV, &["--vcpus", "4", "--guest-features", "0x21", "--kernel", "/dev/null", "--initrd", "/dev/null"],
     "4953b1fb416fa874980e8442b3706d345926d5f38879134e00813c5d7abcbe78eafe7b422907be0b4698e2414a631942"),
    (OVMFX64, &["--vcpus", "1", "--guest-features", "0x1"],
     "da0296de8193586a5512078dcd719eccecbd87e2b825ad4148c44f665dc87df21e5b49e21523a9ad993afdb6a30b4005"),
    (OVMFX64, &["--vcpus", "1", "--guest-features", "0x21"],
     "28797ae0afaba4005a81e629acebfb59e6687949d6be44007cd5506823b0dd66f146aaae26ff291eed7b493d8a64c385"),
    (AMDSEV, &["--mode", "sev-es", "--vcpus", "1", "--kernel", "/dev/null", "--initrd", "/dev/null"],
     "13810ae661ea11e2bb205621f582fee268f0367c8f97bc297b7fadef3e12002c"),
    (AMDSEV, &["--mode", "sev-es", "--vcpus", "4", "--kernel", "/dev/null", "--initrd", "/dev/null"],
     "0dccbcaba8e90b261bd0d2e1863a2f9da714768b7b2a19363cd6ae35aa90de91"),
    (AMDSEV, &["--mode", "sev", "--kernel", "/dev/null", "--initrd", "/dev/null", "--append", "console=ttyS0 loglevel=7"],
     "82a3ee5d537c3620628270c292ae30cb40c3c878666a7890ee7ef2a08fb535ff"),
    (AMDSEV, &["--mode", "sev", "--kernel", "/dev/null"],
     "77f613d7bbcdf12a73782ea9e88b0172aeda50d1a54201cb903594ff52846898"),
    (OVMFX64, &["--mode", "sev"],
     "b4c021e085fb83ceffe6571a3d357b4a98773c83c474e47f76c876708fe316da"),
];

#[test]
fn digests_equal_the_sev_crates_expected_values() {
    for (fw, extra, want) in SEV_CRATE_CASES {
        let Some(ovmf) = vector(fw) else { return };
        let mut args = vec!["measure", "--ovmf", s(&ovmf), "--vcpu-type", "EPYC-v4"];
        args.extend_from_slice(extra);
        let o = run(&args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", err(&o));
        assert_eq!(&out(&o), want, "{args:?}");
    }
}

#[test]
fn ovmf_hash_of_the_amdsev_suffix_is_the_sev_crates() {
    let Some(ovmf) = vector(AMDSEV) else { return };
    let o = run(&["measure", "--ovmf", s(&ovmf), "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out(&o)).unwrap();
    assert_eq!(v["inputs"]["ovmf"]["ovmfHash"], AMDSEV_HASH);
}

#[test]
fn a_kernel_with_firmware_lacking_kernel_hashes_is_refused_by_name() {
    let Some(ovmf) = vector(OVMFX64) else { return };
    for mode in ["sev-snp", "sev-es", "sev"] {
        let o = run(&[
            "measure",
            "--mode",
            mode,
            "--ovmf",
            s(&ovmf),
            "--kernel",
            "/dev/null",
        ]);
        assert_eq!(o.status.code(), Some(2), "{mode}");
        assert!(out(&o).is_empty(), "no digest is printed: {}", out(&o));
        let e = err(&o);
        assert!(e.contains("--kernel given"), "{mode}: {e}");
        if mode == "sev-snp" {
            assert!(e.contains("SNP_KERNEL_HASHES"), "{e}");
        }
    }
}

fn sev_crate_digest(i: &Inputs) -> String {
    use sev::measurement::snp::{snp_calc_launch_digest, SnpMeasurementArgs};
    use sev::measurement::vcpu_types::CpuType;
    use sev::measurement::vmsa::{GuestFeatures, VMMType};
    let name = vmsa::CPU_MODELS
        .iter()
        .find(|(n, (f, m, st))| {
            vmsa::cpu_sig(*f, *m, *st) == i.vcpu_sig && CpuType::try_from(*n).is_ok()
        })
        .map(|m| m.0)
        .unwrap();
    let hash = i.ovmf_hash.map(hex::encode);
    snp_calc_launch_digest(SnpMeasurementArgs {
        vcpus: i.vcpus,
        vcpu_type: CpuType::try_from(name).unwrap(),
        ovmf_file: i.ovmf.clone(),
        guest_features: GuestFeatures(i.guest_features),
        kernel_file: i.kernel.clone(),
        initrd_file: i.initrd.clone(),
        append: i.append.as_deref(),
        ovmf_hash_str: hash.as_deref(),
        vmm_type: Some(VMMType::QEMU),
    })
    .unwrap()
    .get_hex_ld()
}

#[test]
fn agrees_with_the_sev_crate_across_cpus_features_and_kernels() {
    let Some(amdsev) = vector(AMDSEV) else { return };
    let Some(x64) = vector(OVMFX64) else { return };
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinuz");
    let initrd = dir.path().join("initrd");
    // Sizes that are not multiples of the read buffer or of a page.
    std::fs::write(
        &kernel,
        (0..1_000_001u32)
            .map(|i| (i * 7 % 251) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    std::fs::write(
        &initrd,
        (0..300_007u32)
            .map(|i| (i * 13 % 241) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let mut n = 0;
    for (cpu, sig) in [
        ("EPYC", 0x800f12),
        ("EPYC-Rome", 0x830f10),
        ("EPYC-Milan", 0xa00f11),
        ("EPYC-Genoa", 0xa10f10),
        ("EPYC-Turin", 0xb00f00),
    ] {
        assert_eq!(vmsa::sig_for(cpu).map(|x| x.1), Some(sig), "{cpu}");
        for vcpus in [1u32, 64] {
            for features in [0x1u64, 0x21] {
                for (fw, with_kernel) in [(&amdsev, true), (&amdsev, false), (&x64, false)] {
                    let i = Inputs {
                        mode: Mode::Snp,
                        ovmf: fw.clone(),
                        vcpus,
                        vcpu_sig: sig,
                        guest_features: features,
                        kernel: with_kernel.then(|| kernel.clone()),
                        initrd: with_kernel.then(|| initrd.clone()),
                        append: with_kernel.then(|| format!("console=ttyS0 cpus={vcpus}")),
                        ovmf_hash: None,
                    };
                    let ours = hex::encode(measure::measure(&i).unwrap().digest);
                    assert_eq!(
                        ours,
                        sev_crate_digest(&i),
                        "{cpu} {vcpus} {features:#x} {}",
                        fw.display()
                    );
                    n += 1;
                }
            }
        }
    }
    assert_eq!(n, 5 * 2 * 2 * 3);
}

#[test]
fn debian_ovmf_full_image_and_suffix_with_its_hash_agree() {
    let Some(full) = vector("snp-measure/debian-ovmf/OVMF.fd") else {
        return;
    };
    let Some(suffix) = vector("snp-measure/debian-ovmf/OVMF.fd.suffix4k.bin") else {
        return;
    };
    let o = run(&[
        "measure",
        "--ovmf",
        s(&full),
        "--vcpus",
        "16",
        "--vcpu-type",
        "EPYC-Milan",
        "-o",
        "json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    let v: serde_json::Value = serde_json::from_str(&out(&o)).unwrap();
    let hash = v["inputs"]["ovmf"]["ovmfHash"]
        .as_str()
        .unwrap()
        .to_string();
    // The vectors' README gives the full image's OVMF hash as ba2c8115…73c6.
    assert!(
        hash.starts_with("ba2c8115") && hash.ends_with("73c6"),
        "{hash}"
    );
    assert_eq!(v["inputs"]["ovmf"]["size"], 2 * 1024 * 1024);
    let digest = v["measurement"].as_str().unwrap().to_string();
    assert_eq!(digest.len(), 96);

    let o2 = run(&[
        "measure",
        "--ovmf",
        s(&suffix),
        "--vcpus",
        "16",
        "--vcpu-type",
        "EPYC-Milan",
        "--ovmf-hash",
        &hash,
    ]);
    assert_eq!(out(&o2), digest);
    // And the sev crate computes the same for the full image.
    let i = Inputs {
        mode: Mode::Snp,
        ovmf: full.clone(),
        vcpus: 16,
        vcpu_sig: 0xa00f11,
        guest_features: 1,
        kernel: None,
        initrd: None,
        append: None,
        ovmf_hash: None,
    };
    assert_eq!(sev_crate_digest(&i), digest);
    // Each input changes the digest.
    let o3 = run(&[
        "measure",
        "--ovmf",
        s(&full),
        "--vcpus",
        "15",
        "--vcpu-type",
        "EPYC-Milan",
    ]);
    let o4 = run(&[
        "measure",
        "--ovmf",
        s(&full),
        "--vcpus",
        "16",
        "--vcpu-type",
        "EPYC-Genoa",
    ]);
    assert_ne!(out(&o3), digest);
    assert_ne!(out(&o4), digest);

    // Debian's build has no SNP_KERNEL_HASHES section: kernel hashing is refused.
    let o5 = run(&["measure", "--ovmf", s(&full), "--kernel", "/dev/null"]);
    assert_eq!(o5.status.code(), Some(2));
    assert!(err(&o5).contains("SNP_KERNEL_HASHES"), "{}", err(&o5));
}

#[test]
fn json_lists_inputs_with_their_hashes() {
    let Some(ovmf) = vector(AMDSEV) else { return };
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("k");
    let i = dir.path().join("i");
    std::fs::write(&k, b"kernel bytes").unwrap();
    std::fs::write(&i, vec![7u8; 5000]).unwrap();
    let o = run(&[
        "measure",
        "--ovmf",
        s(&ovmf),
        "--vcpus",
        "2",
        "--vcpu-type",
        "epyc-milan",
        "--kernel",
        s(&k),
        "--initrd",
        s(&i),
        "--append",
        "ro quiet",
        "-o",
        "json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    let v: serde_json::Value = serde_json::from_str(&out(&o)).unwrap();
    let inp = &v["inputs"];
    assert_eq!(
        inp["kernel"]["sha256"],
        hex::encode(Sha256::digest(b"kernel bytes"))
    );
    assert_eq!(
        inp["initrd"]["sha256"],
        hex::encode(Sha256::digest(vec![7u8; 5000]))
    );
    assert_eq!(inp["initrd"]["size"], 5000);
    assert_eq!(
        inp["cmdlineSha256"],
        hex::encode(Sha256::digest(b"ro quiet\0"))
    );
    assert_eq!(inp["vcpuType"], "EPYC-Milan");
    assert_eq!(inp["vcpuSig"], "0xa00f11");
    assert_eq!(inp["guestFeatures"], "0x1");
    assert!(inp["ovmf"]["sevMetadata"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["type"] == "SNP_KERNEL_HASHES"));
    let text = run(&[
        "measure",
        "--ovmf",
        s(&ovmf),
        "--vcpus",
        "2",
        "--vcpu-type",
        "EPYC-Milan",
        "--kernel",
        s(&k),
        "--initrd",
        s(&i),
        "--append",
        "ro quiet",
    ]);
    assert_eq!(out(&text), v["measurement"].as_str().unwrap());
}

#[test]
fn firmware_without_sev_support_or_metadata_is_an_error_that_says_so() {
    let Some(ovmf) = vector(AMDSEV) else { return };
    let dir = tempfile::tempdir().unwrap();
    // No footer table at all.
    let plain = dir.path().join("plain.fd");
    std::fs::write(&plain, vec![0u8; 8192]).unwrap();
    let o = run(&["measure", "--ovmf", s(&plain)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(out(&o).is_empty());
    assert!(err(&o).contains("not built for SEV"), "{}", err(&o));

    // A footer table whose SEV metadata entry is gone (its GUID altered).
    let mut data = std::fs::read(&ovmf).unwrap();
    let guid = measure::ovmf::guid_le(
        0xdc886566,
        0x984a,
        0x4798,
        [0xa7, 0x5e, 0x55, 0x85, 0xa7, 0xbf, 0x67, 0xcc],
    );
    let at = data
        .windows(16)
        .position(|w| w == guid)
        .expect("metadata GUID in the image");
    data[at] ^= 0xff;
    let nometa = dir.path().join("nometa.fd");
    std::fs::write(&nometa, &data).unwrap();
    let o = run(&["measure", "--ovmf", s(&nometa)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(err(&o).contains("no SEV metadata"), "{}", err(&o));
    let lib = measure::measure(&Inputs {
        mode: Mode::Snp,
        ovmf: nometa,
        vcpus: 1,
        vcpu_sig: 0x800f12,
        guest_features: 1,
        kernel: None,
        initrd: None,
        append: None,
        ovmf_hash: None,
    });
    assert!(matches!(lib, Err(MeasureError::NoSevSupport(_))), "{lib:?}");

    // Truncated images never panic.
    for cut in [0usize, 17, 50, 600, 4000] {
        let p = dir.path().join(format!("cut{cut}"));
        std::fs::write(&p, &std::fs::read(&ovmf).unwrap()[cut..]).unwrap();
        let o = run(&["measure", "--ovmf", s(&p)]);
        assert_ne!(
            o.status.code(),
            Some(101),
            "panic on cut {cut}: {}",
            err(&o)
        );
    }
}

#[test]
fn usage_errors_exit_2() {
    let Some(ovmf) = vector(AMDSEV) else { return };
    for args in [
        vec!["measure", "--ovmf", s(&ovmf), "--vcpu-type", "Pentium"],
        vec!["measure", "--ovmf", s(&ovmf), "--ovmf-hash", "abcd"],
        vec!["measure", "--ovmf", s(&ovmf), "--initrd", "/dev/null"],
        vec!["measure", "--ovmf", s(&ovmf), "--vcpus", "0"],
        vec!["measure", "--ovmf", s(&ovmf), "--vcpus", "100000"],
        vec!["measure", "--ovmf", "/nonexistent/OVMF.fd"],
        vec!["measure"],
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(!err(&o).is_empty());
    }
}

#[test]
fn simulated_measurement_matches_the_examples_expected_value() {
    for file in [
        "examples/sev-snp-cvm.yaml",
        "e2e/guest/plain-guest-cvm.yaml",
    ] {
        let example = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(file);
        let o = run(&["measure", "--simulated", "--cvm", s(&example)]);
        assert_eq!(o.status.code(), Some(0), "{file}: {}", err(&o));
        let text = std::fs::read_to_string(&example).unwrap();
        let v: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        let want = v["spec"]["attestation"]["expectedMeasurements"][0]
            .as_str()
            .unwrap();
        assert_eq!(out(&o), want, "{file}");
    }
}

#[test]
fn every_subcommand_has_help_with_an_example() {
    for sub in [
        vec!["--help"],
        vec!["measure", "--help"],
        vec!["attest", "--help"],
        vec!["report", "--help"],
        vec!["status", "--help"],
        vec!["console", "--help"],
        vec!["evidence", "verify", "--help"],
    ] {
        let o = run(&sub);
        assert_eq!(o.status.code(), Some(0), "{sub:?}");
        let t = out(&o);
        assert!(
            t.contains("Examples:") && t.contains("kubectl cvm"),
            "{sub:?}: {t}"
        );
    }
    let o = run(&["attest", "--help"]);
    for flag in [
        "--kubeconfig",
        "--context",
        "--namespace",
        "--nonce",
        "--random",
        "--policy",
        "--expected-measurement",
        "--timeout",
        "--trust-root",
    ] {
        assert!(out(&o).contains(flag), "attest --help lacks {flag}");
    }
}
