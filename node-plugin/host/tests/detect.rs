//! Detection on fake host trees (tempdirs laid out like `/`) and on this machine's `/`.

use std::path::Path;

use cvm_crds::TeeType;
use cvm_host::detect::{self, FixedCpuid, NoCpuid, ReadOutcome, SevCpuid};

const AMD_FLAGS: &str = "fpu vme de pse svm sev sev_es sev_snp";
const INTEL_FLAGS: &str = "fpu vme de pse vmx tdx_host_platform";

fn put(root: &Path, rel: &str, content: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
}

fn cpuinfo(vendor: &str, flags: &str) -> String {
    // Two processors, as on a real host; only the first block is used.
    format!(
        "processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: {flags}\n\nprocessor\t: 1\nvendor_id\t: {vendor}\nflags\t\t: {flags}\n"
    )
}

/// An EPYC host with SEV, SEV-ES and SEV-SNP all enabled.
fn amd_all_on(root: &Path) {
    put(root, "proc/cpuinfo", &cpuinfo("AuthenticAMD", AMD_FLAGS));
    put(root, "sys/module/kvm_amd/parameters/sev", "Y\n");
    put(root, "sys/module/kvm_amd/parameters/sev_es", "Y\n");
    put(root, "sys/module/kvm_amd/parameters/sev_snp", "Y\n");
    put(root, "dev/sev", "");
    put(root, "sys/fs/cgroup/misc.capacity", "sev 410\nsev_es 99\n");
    put(root, "sys/fs/cgroup/misc.current", "sev 0\nsev_es 3\n");
}

fn milan_cpuid() -> SevCpuid {
    // EAX: SME|SEV|SEV-ES|SNP; EBX: cbitpos 51, reduced phys bits 1; 509 ASIDs, min SEV 100.
    SevCpuid::from_registers(0b1_1011, 51 | (1 << 6), 509, 100)
}

fn feature(r: &detect::DetectReport, tee: TeeType) -> &detect::FeatureReport {
    r.feature(tee).unwrap()
}

#[test]
fn all_amd_features_on() {
    let dir = tempfile::tempdir().unwrap();
    amd_all_on(dir.path());
    let r = detect::report_with(dir.path(), &FixedCpuid(Some(milan_cpuid())));
    assert_eq!(
        r.available_tees(),
        vec![TeeType::Sev, TeeType::SevEs, TeeType::SevSnp]
    );
    assert!(!feature(&r, TeeType::Tdx).available);
    // The misc cgroup wins over CPUID for capacity.
    assert_eq!(r.capacity.sev_asids, Some(410));
    assert_eq!(r.capacity.es_asids, Some(99));
    assert_eq!(r.capacity.es_asids_in_use, Some(3));
    assert_eq!(r.capacity.source, "misc cgroup");
    let caps = r.host_caps();
    assert_eq!(caps.cbitpos, Some(51));
    assert_eq!(caps.reduced_phys_bits, Some(1));
    let text = r.text();
    assert!(text.contains("Available: SEV, SEV-ES, SEV-SNP"), "{text}");
    assert!(text.contains("SEV-ES/SNP ASIDs 99 (3 in use)"), "{text}");
    assert!(text.contains("not an Intel CPU"), "{text}");
    assert!(r.firmware.contains("/dev/sev is present"), "{}", r.firmware);
    // The JSON form is what `detect -o json` prints.
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["features"][2]["tee"], "SEV-SNP");
    assert_eq!(json["features"][2]["available"], true);
}

#[test]
fn cpuid_gives_capacity_when_misc_cgroup_is_absent() {
    let dir = tempfile::tempdir().unwrap();
    amd_all_on(dir.path());
    std::fs::remove_file(dir.path().join("sys/fs/cgroup/misc.capacity")).unwrap();
    let r = detect::report_with(dir.path(), &FixedCpuid(Some(milan_cpuid())));
    // ASIDs 1..99 are SEV-ES/SNP, 100..509 plain SEV.
    assert_eq!(r.capacity.es_asids, Some(99));
    assert_eq!(r.capacity.sev_asids, Some(410));
    assert_eq!(r.capacity.source, "CPUID 0x8000001F");
}

#[test]
fn snp_disabled_in_bios() {
    let dir = tempfile::tempdir().unwrap();
    amd_all_on(dir.path());
    put(dir.path(), "sys/module/kvm_amd/parameters/sev_snp", "N\n");
    put(
        dir.path(),
        "proc/cpuinfo",
        &cpuinfo("AuthenticAMD", "fpu svm sev sev_es"),
    );
    let r = detect::report_with(dir.path(), &NoCpuid);
    assert_eq!(r.available_tees(), vec![TeeType::Sev, TeeType::SevEs]);
    let snp = feature(&r, TeeType::SevSnp);
    assert!(
        snp.reasons.iter().any(|x| x
            == "SEV-SNP disabled: /sys/module/kvm_amd/parameters/sev_snp is N; enable SEV-SNP in BIOS and load kvm_amd with sev_snp=1"),
        "{:?}",
        snp.reasons
    );
    assert!(
        snp.reasons
            .iter()
            .any(|x| x.contains("CPU flag sev_snp is missing")),
        "{:?}",
        snp.reasons
    );
    assert!(r.text().contains("SEV-SNP  off:"), "{}", r.text());
}

#[test]
fn snp_on_but_zero_es_asids() {
    let dir = tempfile::tempdir().unwrap();
    amd_all_on(dir.path());
    put(
        dir.path(),
        "sys/fs/cgroup/misc.capacity",
        "sev 509\nsev_es 0\n",
    );
    let r = detect::report_with(dir.path(), &NoCpuid);
    assert_eq!(r.available_tees(), vec![TeeType::Sev]);
    for tee in [TeeType::SevEs, TeeType::SevSnp] {
        let f = feature(&r, tee);
        assert!(
            f.reasons
                .iter()
                .any(|x| x.contains("0 SEV-ES/SEV-SNP ASIDs") && x.contains("BIOS")),
            "{tee}: {:?}",
            f.reasons
        );
    }
}

#[test]
fn all_es_asids_in_use_is_a_note_not_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    amd_all_on(dir.path());
    put(
        dir.path(),
        "sys/fs/cgroup/misc.current",
        "sev 0\nsev_es 99\n",
    );
    let r = detect::report_with(dir.path(), &NoCpuid);
    let snp = feature(&r, TeeType::SevSnp);
    assert!(snp.available);
    assert!(
        snp.notes.iter().any(|n| n.contains("all 99")),
        "{:?}",
        snp.notes
    );
}

#[test]
fn intel_tdx_host_on() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    put(root, "proc/cpuinfo", &cpuinfo("GenuineIntel", INTEL_FLAGS));
    put(root, "sys/module/kvm_intel/parameters/tdx", "Y\n");
    put(root, "sys/fs/cgroup/misc.capacity", "tdx 63\n");
    let r = detect::report_with(root, &NoCpuid);
    assert_eq!(r.available_tees(), vec![TeeType::Tdx]);
    assert_eq!(r.capacity.tdx_keys, Some(63));
    let sev = feature(&r, TeeType::Sev);
    assert!(
        sev.reasons[0].contains("not an AMD CPU (vendor_id GenuineIntel)"),
        "{:?}",
        sev.reasons
    );
    assert!(r.text().contains("Available: TDX"), "{}", r.text());
    assert!(r.firmware.contains("TDX module"), "{}", r.firmware);
}

#[test]
fn tdx_module_absent() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // The BIOS did not load the TDX module: no CPU flag, and KVM turned tdx off.
    put(root, "proc/cpuinfo", &cpuinfo("GenuineIntel", "fpu vmx"));
    put(root, "sys/module/kvm_intel/parameters/tdx", "N\n");
    let r = detect::report_with(root, &NoCpuid);
    assert!(r.available_tees().is_empty());
    let tdx = feature(&r, TeeType::Tdx);
    assert!(
        tdx.reasons
            .iter()
            .any(|x| x.starts_with("TDX module absent: CPU flag tdx_host_platform is missing")),
        "{:?}",
        tdx.reasons
    );
    assert!(
        tdx.reasons
            .iter()
            .any(|x| x.starts_with("TDX disabled: /sys/module/kvm_intel/parameters/tdx is N")),
        "{:?}",
        tdx.reasons
    );
    assert!(r.text().contains("No TEE is available on this host."));
}

#[test]
fn kernel_without_tdx_support() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    put(root, "proc/cpuinfo", &cpuinfo("GenuineIntel", INTEL_FLAGS));
    std::fs::create_dir_all(root.join("sys/module/kvm_intel/parameters")).unwrap();
    let r = detect::report_with(root, &NoCpuid);
    let tdx = feature(&r, TeeType::Tdx);
    assert!(
        tdx.reasons[0].contains("kernel's KVM has no TDX support"),
        "{:?}",
        tdx.reasons
    );
}

#[test]
fn read_errors_are_reported_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    amd_all_on(dir.path());
    // A directory where a file is expected: reading it fails with EISDIR.
    let p = dir.path().join("sys/module/kvm_amd/parameters/sev_es");
    std::fs::remove_file(&p).unwrap();
    std::fs::create_dir(&p).unwrap();
    let cap = dir.path().join("sys/fs/cgroup/misc.capacity");
    std::fs::remove_file(&cap).unwrap();
    std::fs::create_dir(&cap).unwrap();
    // Garbage in a parameter.
    put(dir.path(), "sys/module/kvm_amd/parameters/sev", "maybe\n");

    let r = detect::report_with(dir.path(), &NoCpuid);
    let sev = feature(&r, TeeType::Sev);
    assert!(
        sev.reasons.iter().any(|x| x.contains(
            "cannot read /sys/module/kvm_amd/parameters/sev: unexpected value \"maybe\""
        )),
        "{:?}",
        sev.reasons
    );
    let es = feature(&r, TeeType::SevEs);
    assert!(
        es.reasons
            .iter()
            .any(|x| x.starts_with("cannot read /sys/module/kvm_amd/parameters/sev_es:")),
        "{:?}",
        es.reasons
    );
    assert!(
        sev.notes
            .iter()
            .any(|n| n.starts_with("cannot read /sys/fs/cgroup/misc.capacity")),
        "{:?}",
        sev.notes
    );
    assert!(r.available_tees().is_empty());
    // The raw outcome is kept for the administrator.
    let obs = r
        .observations
        .iter()
        .find(|o| o.path == "/sys/module/kvm_amd/parameters/sev_es")
        .unwrap();
    assert!(matches!(obs.outcome, ReadOutcome::Error(_)), "{obs:?}");
}

#[test]
fn kvm_amd_not_loaded_and_cpuinfo_unreadable() {
    let dir = tempfile::tempdir().unwrap();
    // An empty tree: nothing at all.
    let r = detect::report_with(dir.path(), &NoCpuid);
    assert!(r.available_tees().is_empty());
    let sev = feature(&r, TeeType::Sev);
    assert!(
        sev.reasons
            .iter()
            .any(|x| x.contains("kvm_amd is not loaded")),
        "{:?}",
        sev.reasons
    );
    assert!(
        sev.reasons
            .iter()
            .any(|x| x.contains("CPU flags unknown (/proc/cpuinfo is absent)")),
        "{:?}",
        sev.reasons
    );
}

#[test]
fn sev_missing_dev_sev() {
    let dir = tempfile::tempdir().unwrap();
    amd_all_on(dir.path());
    std::fs::remove_file(dir.path().join("dev/sev")).unwrap();
    let r = detect::report_with(dir.path(), &NoCpuid);
    assert!(r.available_tees().is_empty());
    assert!(feature(&r, TeeType::SevSnp)
        .reasons
        .iter()
        .any(|x| x.starts_with("/dev/sev is absent")));
    assert_eq!(r.firmware, "not read: /dev/sev absent");
}

#[test]
fn this_machine_has_no_tee_and_says_why() {
    // This machine (and CI's) is not a TEE host. If it ever is, the test says so rather
    // than failing on a true statement.
    let r = detect::report(Path::new("/"));
    let text = r.text();
    println!("{text}");
    if !r.available_tees().is_empty() {
        eprintln!("note: this machine offers a TEE; the no-TEE assertions are skipped");
        return;
    }
    assert!(text.contains("No TEE is available on this host."), "{text}");
    for f in &r.features {
        assert!(!f.reasons.is_empty(), "{:?} is off without a reason", f.tee);
        assert!(text.contains(&f.reasons[0]), "{text}");
    }
    assert!(text.contains("Firmware: not read"), "{text}");
    // CPUID is only consulted for the real root, and a leaf without SEV gives no C-bit.
    assert_ne!(r.cpuid_source, "not queried (root is not this host's /)");
    assert_eq!(r.host_caps().cbitpos, None);
}
