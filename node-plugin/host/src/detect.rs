//! What TEE features a host offers, and why each missing one is missing.
//!
//! Every file is read under a configurable root (`/` on a real host, a temporary tree in
//! tests), so the same code checks a live host and fake ones. CPUID sits behind
//! [`CpuidSource`] so tests inject values; the real instruction is only used when the root
//! is the host's own `/` (a fake tree's CPUID would be the test machine's).
//!
//! Sources, in the order an administrator usually fixes them:
//! - `/proc/cpuinfo`: vendor and CPU flags (`sev`, `sev_es`, `sev_snp`, `tdx_host_platform`);
//! - `/sys/module/kvm_amd/parameters/{sev,sev_es,sev_snp}` and
//!   `/sys/module/kvm_intel/parameters/tdx` (`Y`/`1` when KVM enabled the feature);
//! - `/dev/sev` (the AMD secure processor driver, which QEMU opens);
//! - `/sys/fs/cgroup/misc.capacity` and `misc.current` (`sev`, `sev_es`, `tdx` lines: the
//!   ASIDs / TDX keys the kernel manages, and how many are in use);
//! - CPUID `0x8000001F` (C-bit position, reduced physical address bits, ASID counts and the
//!   minimum SEV ASID that splits the SEV-ES/SNP pool from the SEV pool).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use cvm_crds::TeeType;
use serde::{Deserialize, Serialize};

use crate::qemu::HostCaps;

/// Paths read, relative to the root.
pub mod paths {
    pub const CPUINFO: &str = "proc/cpuinfo";
    pub const KVM_AMD: &str = "sys/module/kvm_amd";
    pub const KVM_AMD_SEV: &str = "sys/module/kvm_amd/parameters/sev";
    pub const KVM_AMD_SEV_ES: &str = "sys/module/kvm_amd/parameters/sev_es";
    pub const KVM_AMD_SEV_SNP: &str = "sys/module/kvm_amd/parameters/sev_snp";
    pub const KVM_INTEL: &str = "sys/module/kvm_intel";
    pub const KVM_INTEL_TDX: &str = "sys/module/kvm_intel/parameters/tdx";
    pub const DEV_SEV: &str = "dev/sev";
    pub const MISC_CAPACITY: &str = "sys/fs/cgroup/misc.capacity";
    pub const MISC_CURRENT: &str = "sys/fs/cgroup/misc.current";
}

/// Files larger than this are not read whole: sysfs values are tiny and even a
/// many-core `/proc/cpuinfo` stays far below it.
const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// CPUID leaf 0x8000001F as far as SEV is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SevCpuid {
    /// EAX bit 1.
    pub sev: bool,
    /// EAX bit 3.
    pub sev_es: bool,
    /// EAX bit 4.
    pub sev_snp: bool,
    /// EBX bits 5:0: page-table bit that marks a page encrypted.
    pub cbitpos: u8,
    /// EBX bits 11:6: physical address bits lost when memory encryption is on.
    pub reduced_phys_bits: u8,
    /// ECX: encrypted guests supported at once (highest ASID).
    pub max_asid: u32,
    /// EDX: lowest ASID usable by a plain SEV guest; ASIDs below it are SEV-ES/SNP ASIDs.
    pub min_sev_asid: u32,
}

impl SevCpuid {
    /// Decodes the four registers of leaf 0x8000001F.
    pub fn from_registers(eax: u32, ebx: u32, ecx: u32, edx: u32) -> Self {
        SevCpuid {
            sev: eax & (1 << 1) != 0,
            sev_es: eax & (1 << 3) != 0,
            sev_snp: eax & (1 << 4) != 0,
            cbitpos: (ebx & 0x3f) as u8,
            reduced_phys_bits: ((ebx >> 6) & 0x3f) as u8,
            max_asid: ecx,
            min_sev_asid: edx,
        }
    }

    /// SEV-ES/SNP ASIDs: 1 to `min_sev_asid - 1`.
    pub fn es_asids(&self) -> u32 {
        self.min_sev_asid.saturating_sub(1)
    }

    /// Plain SEV ASIDs: `min_sev_asid` to `max_asid`.
    pub fn sev_asids(&self) -> u32 {
        if self.min_sev_asid == 0 {
            return self.max_asid;
        }
        (self.max_asid + 1).saturating_sub(self.min_sev_asid)
    }
}

/// Where CPUID values come from.
pub trait CpuidSource {
    /// Leaf 0x8000001F, or `Ok(None)` when the CPU has no such leaf (not AMD, or too old).
    fn sev_leaf(&self) -> Result<Option<SevCpuid>, String>;
    /// A word for the report: "host CPUID", "injected", "not queried".
    fn describe(&self) -> &'static str;
}

/// The CPU this process runs on.
pub struct HostCpuid;

impl CpuidSource for HostCpuid {
    #[cfg(target_arch = "x86_64")]
    fn sev_leaf(&self) -> Result<Option<SevCpuid>, String> {
        use core::arch::x86_64::__cpuid;
        // `__cpuid` is safe on newer toolchains and unsafe on older ones; CPUID exists on
        // every x86_64 CPU, so the call cannot fault.
        #[allow(unused_unsafe)]
        let (vendor, max_ext) = unsafe {
            let v = __cpuid(0);
            let e = __cpuid(0x8000_0000);
            (
                [
                    v.ebx.to_le_bytes(),
                    v.edx.to_le_bytes(),
                    v.ecx.to_le_bytes(),
                ]
                .concat(),
                e.eax,
            )
        };
        if vendor != b"AuthenticAMD" || max_ext < 0x8000_001F {
            return Ok(None);
        }
        #[allow(unused_unsafe)]
        let r = unsafe { __cpuid(0x8000_001F) };
        Ok(Some(SevCpuid::from_registers(r.eax, r.ebx, r.ecx, r.edx)))
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn sev_leaf(&self) -> Result<Option<SevCpuid>, String> {
        Ok(None)
    }

    fn describe(&self) -> &'static str {
        "host CPUID"
    }
}

/// Fixed CPUID values (tests, or a host described by a file).
pub struct FixedCpuid(pub Option<SevCpuid>);

impl CpuidSource for FixedCpuid {
    fn sev_leaf(&self) -> Result<Option<SevCpuid>, String> {
        Ok(self.0)
    }
    fn describe(&self) -> &'static str {
        "injected"
    }
}

/// Used for fake trees: the CPU running the test is not the host described.
pub struct NoCpuid;

impl CpuidSource for NoCpuid {
    fn sev_leaf(&self) -> Result<Option<SevCpuid>, String> {
        Ok(None)
    }
    fn describe(&self) -> &'static str {
        "not queried (root is not this host's /)"
    }
}

/// What reading one path gave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "result", content = "detail")]
pub enum ReadOutcome {
    /// The trimmed content (or `present` for device nodes and directories).
    Value(String),
    /// The path does not exist.
    Absent,
    /// It exists but could not be read.
    Error(String),
}

/// One path and what was found there, so an administrator can see the raw facts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Observation {
    pub path: String,
    #[serde(flatten)]
    pub outcome: ReadOutcome,
}

/// One TEE's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FeatureReport {
    pub tee: TeeType,
    pub available: bool,
    /// Why it is off, each with what to do; empty when available.
    pub reasons: Vec<String>,
    /// Facts worth knowing even when it is on (e.g. no free ASID right now).
    pub notes: Vec<String>,
}

/// Guest slots the kernel manages.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Capacity {
    /// Plain SEV ASIDs (`sev.amd.com/asids`).
    pub sev_asids: Option<u32>,
    /// SEV-ES / SEV-SNP ASIDs, one pool (`sev-snp.amd.com/esids`).
    pub es_asids: Option<u32>,
    /// TDX private keys (`tdx.intel.com/keys`).
    pub tdx_keys: Option<u32>,
    pub sev_asids_in_use: Option<u32>,
    pub es_asids_in_use: Option<u32>,
    pub tdx_keys_in_use: Option<u32>,
    /// `misc cgroup`, `CPUID 0x8000001F` or `unknown`.
    pub source: String,
}

/// Everything detection found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DetectReport {
    pub root: String,
    /// `vendor_id` from `/proc/cpuinfo`.
    pub cpu_vendor: Option<String>,
    /// The TEE-related CPU flags seen.
    pub cpu_flags: Vec<String>,
    /// SEV, SEV-ES, SEV-SNP, TDX, in that order.
    pub features: Vec<FeatureReport>,
    pub capacity: Capacity,
    pub cpuid: Option<SevCpuid>,
    /// Where `cpuid` came from.
    pub cpuid_source: String,
    /// Firmware / TCB versions, or why they were not read.
    pub firmware: String,
    pub observations: Vec<Observation>,
}

const TEE_FLAGS: &[&str] = &[
    "sev",
    "sev_es",
    "sev_snp",
    "tdx_host_platform",
    "svm",
    "vmx",
];

/// Detects on `root`, using the real CPUID only when `root` is this host's `/`.
pub fn report(root: &Path) -> DetectReport {
    let is_host_root = std::fs::canonicalize(root)
        .map(|p| p == Path::new("/"))
        .unwrap_or(false);
    if is_host_root {
        report_with(root, &HostCpuid)
    } else {
        report_with(root, &NoCpuid)
    }
}

/// Detects on `root` with the given CPUID source.
pub fn report_with(root: &Path, cpuid: &dyn CpuidSource) -> DetectReport {
    Detector::new(root).run(cpuid)
}

struct Detector {
    root: PathBuf,
    observations: Vec<Observation>,
}

/// A module parameter's state.
enum Param {
    On,
    Off(String),
    Absent,
    Unreadable(String),
}

impl Detector {
    fn new(root: &Path) -> Self {
        Detector {
            root: root.to_path_buf(),
            observations: Vec::new(),
        }
    }

    fn shown(&self, rel: &str) -> String {
        format!("/{rel}")
    }

    fn read(&mut self, rel: &str) -> ReadOutcome {
        let path = self.root.join(rel);
        let outcome = match std::fs::File::open(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ReadOutcome::Absent,
            Err(e) => ReadOutcome::Error(e.to_string()),
            Ok(f) => {
                let mut s = String::new();
                match f.take(MAX_FILE_BYTES).read_to_string(&mut s) {
                    Ok(_) => ReadOutcome::Value(s.trim().to_string()),
                    Err(e) => ReadOutcome::Error(e.to_string()),
                }
            }
        };
        // Keep cpuinfo out of the observations: it is long and summarised as flags.
        let recorded = match (&outcome, rel) {
            (ReadOutcome::Value(_), paths::CPUINFO) => ReadOutcome::Value("(read)".into()),
            _ => outcome.clone(),
        };
        self.observations.push(Observation {
            path: self.shown(rel),
            outcome: recorded,
        });
        outcome
    }

    fn exists(&mut self, rel: &str) -> ReadOutcome {
        let outcome = match std::fs::symlink_metadata(self.root.join(rel)) {
            Ok(_) => ReadOutcome::Value("present".into()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ReadOutcome::Absent,
            Err(e) => ReadOutcome::Error(e.to_string()),
        };
        self.observations.push(Observation {
            path: self.shown(rel),
            outcome: outcome.clone(),
        });
        outcome
    }

    fn param(&mut self, rel: &str) -> Param {
        match self.read(rel) {
            ReadOutcome::Value(v) => match v.as_str() {
                "Y" | "y" | "1" => Param::On,
                "N" | "n" | "0" => Param::Off(v),
                other => Param::Unreadable(format!("unexpected value {other:?}")),
            },
            ReadOutcome::Absent => Param::Absent,
            ReadOutcome::Error(e) => Param::Unreadable(e),
        }
    }

    /// Parses a flat-keyed misc cgroup file (`sev 509`).
    fn misc(&mut self, rel: &str) -> Result<Option<BTreeMap<String, u32>>, String> {
        match self.read(rel) {
            ReadOutcome::Absent => Ok(None),
            ReadOutcome::Error(e) => Err(e),
            ReadOutcome::Value(v) => {
                let mut out = BTreeMap::new();
                for line in v.lines() {
                    let mut it = line.split_whitespace();
                    if let (Some(k), Some(n)) = (it.next(), it.next()) {
                        // "max" appears in misc.max; capacities are numbers.
                        if let Ok(n) = n.parse::<u32>() {
                            out.insert(k.to_string(), n);
                        }
                    }
                }
                Ok(Some(out))
            }
        }
    }

    fn run(mut self, cpuid_src: &dyn CpuidSource) -> DetectReport {
        // CPU vendor and flags.
        let mut vendor = None;
        let mut flags = BTreeSet::new();
        let cpuinfo = self.read(paths::CPUINFO);
        let cpuinfo_problem = match &cpuinfo {
            ReadOutcome::Value(text) => {
                for line in text.lines() {
                    let Some((k, v)) = line.split_once(':') else {
                        continue;
                    };
                    let k = k.trim();
                    if k == "vendor_id" && vendor.is_none() {
                        vendor = Some(v.trim().to_string());
                    }
                    if k == "flags" && flags.is_empty() {
                        flags = v.split_whitespace().map(str::to_string).collect();
                    }
                }
                None
            }
            ReadOutcome::Absent => Some(format!("{} is absent", self.shown(paths::CPUINFO))),
            ReadOutcome::Error(e) => {
                Some(format!("cannot read {}: {e}", self.shown(paths::CPUINFO)))
            }
        };
        let has_flag = |f: &str| flags.contains(f);
        let flag_reason = |flag: &str, what: &str| -> Option<String> {
            match &cpuinfo_problem {
                Some(p) => Some(format!("CPU flags unknown ({p}), so {what} cannot be confirmed")),
                None if !flags.contains(flag) => Some(format!(
                    "CPU flag {flag} is missing from /proc/cpuinfo: the CPU lacks {what} or the BIOS has it turned off"
                )),
                None => None,
            }
        };

        // CPUID.
        let (cpuid, cpuid_note) = match cpuid_src.sev_leaf() {
            Ok(c) => (c, None),
            Err(e) => (
                None,
                Some(format!("CPUID 0x8000001F could not be read: {e}")),
            ),
        };

        // Capacity: the misc cgroup is what KVM enforces; CPUID is the fallback.
        let mut capacity = Capacity {
            source: "unknown".into(),
            ..Capacity::default()
        };
        let mut capacity_problem = None;
        match self.misc(paths::MISC_CAPACITY) {
            Ok(Some(cap)) => {
                capacity.sev_asids = cap.get("sev").copied();
                capacity.es_asids = cap.get("sev_es").copied();
                capacity.tdx_keys = cap.get("tdx").copied();
                capacity.source = "misc cgroup".into();
            }
            Ok(None) => {}
            Err(e) => {
                capacity_problem = Some(format!(
                    "cannot read {}: {e}",
                    self.shown(paths::MISC_CAPACITY)
                ))
            }
        }
        if capacity.sev_asids.is_none() && capacity.es_asids.is_none() {
            if let Some(c) = cpuid.filter(|c| c.sev) {
                capacity.sev_asids = Some(c.sev_asids());
                capacity.es_asids = Some(c.es_asids());
                capacity.source = "CPUID 0x8000001F".into();
            }
        }
        if let Ok(Some(cur)) = self.misc(paths::MISC_CURRENT) {
            capacity.sev_asids_in_use = cur.get("sev").copied();
            capacity.es_asids_in_use = cur.get("sev_es").copied();
            capacity.tdx_keys_in_use = cur.get("tdx").copied();
        }

        let is_amd = vendor.as_deref() == Some("AuthenticAMD");
        let is_intel = vendor.as_deref() == Some("GenuineIntel");
        let vendor_word = vendor.clone().unwrap_or_else(|| "unknown".into());

        // --- AMD ---
        let kvm_amd = self.exists(paths::KVM_AMD);
        let kvm_amd_reason = match &kvm_amd {
            ReadOutcome::Value(_) => None,
            ReadOutcome::Absent if !is_amd && cpuinfo_problem.is_none() => Some(format!(
                "this is not an AMD CPU (vendor_id {vendor_word}); SEV needs AMD EPYC"
            )),
            ReadOutcome::Absent => Some(
                "kvm_amd is not loaded (/sys/module/kvm_amd is absent): load it with `modprobe kvm_amd`".into(),
            ),
            ReadOutcome::Error(e) => Some(format!("cannot inspect /sys/module/kvm_amd: {e}")),
        };
        let dev_sev = self.exists(paths::DEV_SEV);

        let mut sev = FeatureReport::new(TeeType::Sev);
        let mut es = FeatureReport::new(TeeType::SevEs);
        let mut snp = FeatureReport::new(TeeType::SevSnp);

        // Per-feature module parameter checks, each with its own remedy.
        let specs: [(&mut FeatureReport, &str, &str, &str, &str); 3] = [
            (&mut sev, paths::KVM_AMD_SEV, "sev", "SEV", "sev=1"),
            (
                &mut es,
                paths::KVM_AMD_SEV_ES,
                "sev_es",
                "SEV-ES",
                "sev_es=1",
            ),
            (
                &mut snp,
                paths::KVM_AMD_SEV_SNP,
                "sev_snp",
                "SEV-SNP",
                "sev_snp=1",
            ),
        ];
        for (report, param_path, flag, name, modparam) in specs {
            if let Some(r) = &kvm_amd_reason {
                report.reasons.push(r.clone());
            } else {
                match self.param(param_path) {
                    Param::On => {}
                    Param::Off(v) => report.reasons.push(format!(
                        "{name} disabled: /{param_path} is {v}; enable {name} in BIOS and load kvm_amd with {modparam}"
                    )),
                    Param::Absent => report.reasons.push(format!(
                        "/{param_path} is absent: this kernel's KVM has no {name} support (build with CONFIG_KVM_AMD_SEV; SEV-SNP needs Linux 6.11 or later)"
                    )),
                    Param::Unreadable(e) => {
                        report.reasons.push(format!("cannot read /{param_path}: {e}"))
                    }
                }
            }
            if is_amd || cpuinfo_problem.is_some() {
                if let Some(r) = flag_reason(flag, name) {
                    report.reasons.push(r);
                }
            }
            if let Some(c) = cpuid {
                let bit = match flag {
                    "sev" => c.sev,
                    "sev_es" => c.sev_es,
                    _ => c.sev_snp,
                };
                if !bit {
                    report.reasons.push(format!(
                        "CPUID 0x8000001F does not report {name}: the CPU or BIOS does not offer it"
                    ));
                }
            }
        }

        // /dev/sev: QEMU opens it for every SEV-family guest.
        if kvm_amd_reason.is_none() {
            let why = match &dev_sev {
                ReadOutcome::Value(_) => None,
                ReadOutcome::Absent => Some(
                    "/dev/sev is absent: the ccp driver did not initialise the AMD secure processor (check `dmesg | grep -i sev`; load ccp)"
                        .to_string(),
                ),
                ReadOutcome::Error(e) => Some(format!("cannot inspect /dev/sev: {e}")),
            };
            if let Some(w) = why {
                for r in [&mut sev, &mut es, &mut snp] {
                    r.reasons.push(w.clone());
                }
            }
        }

        // ASIDs.
        if let Some(p) = &capacity_problem {
            for r in [&mut sev, &mut es, &mut snp] {
                r.notes.push(format!("{p}; ASID count unknown"));
            }
        }
        match capacity.sev_asids {
            Some(0) => sev.reasons.push(format!(
                "0 SEV ASIDs ({} sev 0): every ASID is reserved for SEV-ES/SNP; lower the BIOS 'SEV-ES ASID space limit' to leave some for SEV",
                capacity.source
            )),
            Some(n) if capacity.sev_asids_in_use.is_some_and(|u| u >= n) => {
                sev.notes.push(format!("all {n} SEV ASIDs are in use right now"));
            }
            _ => {}
        }
        match capacity.es_asids {
            Some(0) => {
                let why = format!(
                    "0 SEV-ES/SEV-SNP ASIDs ({} sev_es 0): raise the BIOS 'SEV-ES ASID space limit' (minimum SEV non-ES ASID) above 1",
                    capacity.source
                );
                es.reasons.push(why.clone());
                snp.reasons.push(why);
            }
            Some(n) if capacity.es_asids_in_use.is_some_and(|u| u >= n) => {
                let note = format!(
                    "all {n} SEV-ES/SEV-SNP ASIDs are in use right now: new guests wait for one to be freed"
                );
                es.notes.push(note.clone());
                snp.notes.push(note);
            }
            _ => {}
        }

        // Dependencies: SEV-ES builds on SEV, SEV-SNP on SEV-ES.
        // When kvm_amd itself is missing, that one reason already covers all three.
        if kvm_amd_reason.is_none() {
            if !sev.reasons.is_empty() {
                es.reasons.push("SEV-ES needs SEV, which is off".into());
            }
            if !es.reasons.is_empty() {
                snp.reasons
                    .push("SEV-SNP needs SEV-ES, which is off".into());
            }
        }

        // --- Intel TDX ---
        let mut tdx = FeatureReport::new(TeeType::Tdx);
        let kvm_intel = self.exists(paths::KVM_INTEL);
        match &kvm_intel {
            ReadOutcome::Value(_) => match self.param(paths::KVM_INTEL_TDX) {
                Param::On => {}
                Param::Off(v) => tdx.reasons.push(format!(
                    "TDX disabled: /{} is {v}; enable TME, TME-MT and TDX (with the SEAM loader) in BIOS and load kvm_intel with tdx=1",
                    paths::KVM_INTEL_TDX
                )),
                Param::Absent => tdx.reasons.push(format!(
                    "/{} is absent: this kernel's KVM has no TDX support (Linux 6.16 or later with CONFIG_KVM_INTEL_TDX)",
                    paths::KVM_INTEL_TDX
                )),
                Param::Unreadable(e) => tdx
                    .reasons
                    .push(format!("cannot read /{}: {e}", paths::KVM_INTEL_TDX)),
            },
            ReadOutcome::Absent if !is_intel && cpuinfo_problem.is_none() => tdx.reasons.push(
                format!("this is not an Intel CPU (vendor_id {vendor_word}); TDX needs Intel Xeon (4th gen or later)"),
            ),
            ReadOutcome::Absent => tdx.reasons.push(
                "kvm_intel is not loaded (/sys/module/kvm_intel is absent): load it with `modprobe kvm_intel tdx=1`".into(),
            ),
            ReadOutcome::Error(e) => tdx
                .reasons
                .push(format!("cannot inspect /sys/module/kvm_intel: {e}")),
        }
        if is_intel || cpuinfo_problem.is_some() {
            match &cpuinfo_problem {
                Some(p) => tdx
                    .reasons
                    .push(format!("CPU flags unknown ({p}), so the TDX module cannot be confirmed")),
                None if !has_flag("tdx_host_platform") => tdx.reasons.push(
                    "TDX module absent: CPU flag tdx_host_platform is missing from /proc/cpuinfo; the BIOS did not load the TDX module (enable TDX and the SEAM loader) or the kernel did not initialise it (see `dmesg | grep -i tdx`)"
                        .into(),
                ),
                None => {}
            }
        }
        match capacity.tdx_keys {
            Some(0) => tdx.reasons.push(format!(
                "0 TDX keys ({} tdx 0): raise the number of TDX private KeyIDs in BIOS",
                capacity.source
            )),
            Some(n) if capacity.tdx_keys_in_use.is_some_and(|u| u >= n) => tdx
                .notes
                .push(format!("all {n} TDX keys are in use right now")),
            _ => {}
        }

        let mut features = vec![sev, es, snp, tdx];
        for f in &mut features {
            f.available = f.reasons.is_empty();
        }

        let firmware = match &dev_sev {
            ReadOutcome::Value(_) => "not read: /dev/sev is present, but reading the SEV firmware and TCB versions (SEV_PLATFORM_STATUS / SNP_PLATFORM_STATUS) is not implemented yet".to_string(),
            ReadOutcome::Absent if is_intel => "not read: the TDX module version has no stable sysfs file (see `dmesg | grep 'TDX module'`)".to_string(),
            ReadOutcome::Absent => "not read: /dev/sev absent".to_string(),
            ReadOutcome::Error(e) => format!("not read: /dev/sev: {e}"),
        };

        let cpuid_source = match cpuid_note {
            Some(n) => n,
            None if cpuid.is_none() => format!("{} (no SEV leaf)", cpuid_src.describe()),
            None => cpuid_src.describe().to_string(),
        };

        DetectReport {
            root: self.root.display().to_string(),
            cpu_vendor: vendor,
            cpu_flags: TEE_FLAGS
                .iter()
                .filter(|f| flags.contains(**f))
                .map(|f| f.to_string())
                .collect(),
            features,
            capacity,
            cpuid,
            cpuid_source,
            firmware,
            observations: self.observations,
        }
    }
}

impl FeatureReport {
    fn new(tee: TeeType) -> Self {
        FeatureReport {
            tee,
            available: false,
            reasons: Vec::new(),
            notes: Vec::new(),
        }
    }
}

fn count(n: Option<u32>, used: Option<u32>) -> String {
    match (n, used) {
        (Some(n), Some(u)) => format!("{n} ({u} in use)"),
        (Some(n), None) => n.to_string(),
        (None, _) => "unknown".into(),
    }
}

impl DetectReport {
    /// The TEEs this host can launch.
    pub fn available_tees(&self) -> Vec<TeeType> {
        self.features
            .iter()
            .filter(|f| f.available)
            .map(|f| f.tee)
            .collect()
    }

    /// The verdict for one TEE.
    pub fn feature(&self, tee: TeeType) -> Option<&FeatureReport> {
        self.features.iter().find(|f| f.tee == tee)
    }

    /// What the QEMU command line needs from the host (C-bit position and reduced
    /// physical bits come from CPUID).
    pub fn host_caps(&self) -> HostCaps {
        // Without SEV the leaf's C-bit fields are zero, not a position.
        let c = self.cpuid.filter(|c| c.sev);
        HostCaps {
            cbitpos: c.map(|c| c.cbitpos),
            reduced_phys_bits: c.map(|c| c.reduced_phys_bits),
        }
    }

    /// A plain-text rendering for administrators.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "TEE host detection (root {})", self.root);
        let _ = writeln!(
            s,
            "CPU: {}; TEE flags: {}",
            self.cpu_vendor.as_deref().unwrap_or("unknown vendor"),
            if self.cpu_flags.is_empty() {
                "none".to_string()
            } else {
                self.cpu_flags.join(" ")
            }
        );
        if self.cpu_flags.iter().any(|f| f == "hypervisor") {
            let _ = writeln!(
                s,
                "This system is itself a virtual machine (CPU flag hypervisor): TEE hosts are bare-metal machines."
            );
        }
        let on = self.available_tees();
        if on.is_empty() {
            let _ = writeln!(s, "No TEE is available on this host.");
        } else {
            let names: Vec<&str> = on.iter().map(|t| t.as_str()).collect();
            let _ = writeln!(s, "Available: {}", names.join(", "));
        }
        for f in &self.features {
            if f.available {
                let _ = writeln!(s, "  {:<8} on", f.tee.as_str());
            } else {
                let _ = writeln!(s, "  {:<8} off:", f.tee.as_str());
                for r in &f.reasons {
                    let _ = writeln!(s, "    - {r}");
                }
            }
            for n in &f.notes {
                let _ = writeln!(s, "    note: {n}");
            }
        }
        let c = &self.capacity;
        let _ = writeln!(
            s,
            "Capacity ({}): SEV ASIDs {}, SEV-ES/SNP ASIDs {}, TDX keys {}",
            c.source,
            count(c.sev_asids, c.sev_asids_in_use),
            count(c.es_asids, c.es_asids_in_use),
            count(c.tdx_keys, c.tdx_keys_in_use)
        );
        match &self.cpuid {
            Some(c) => {
                let _ = writeln!(
                    s,
                    "CPUID 0x8000001F ({}): sev={} sev_es={} sev_snp={} cbitpos={} reduced-phys-bits={} ASIDs={} min SEV ASID={}",
                    self.cpuid_source, c.sev, c.sev_es, c.sev_snp, c.cbitpos, c.reduced_phys_bits, c.max_asid, c.min_sev_asid
                );
            }
            None => {
                let _ = writeln!(s, "CPUID 0x8000001F: {}", self.cpuid_source);
            }
        }
        let _ = writeln!(s, "Firmware: {}", self.firmware);
        s
    }
}
