//! Launch digests computed ahead of launch, offline: SEV-SNP (QEMU), SEV-ES and SEV.
//!
//! Our own implementation (OVMF footer table and SEV metadata, VMSA per vCPU, kernel
//! hashes table, GCTX updates) rather than the `sev` crate's: that one reads kernel and
//! initrd whole into memory one after the other, panics on some malformed images, and
//! computes SEV/SEV-ES digests only with OpenSSL. Its expected digests are our tests.

pub mod gctx;
pub mod ovmf;
pub mod vmsa;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use thiserror::Error;

use gctx::{Gctx, PageType, PAGE, VMSA_GPA};
use ovmf::{Ovmf, SectionKind, MAX_OVMF_LEN};

/// Most vCPUs a QEMU x86 guest can have.
pub const MAX_VCPUS: u32 = 4096;

#[derive(Debug, Error)]
pub enum MeasureError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("OVMF image: {0}")]
    Ovmf(String),
    #[error("this OVMF cannot be measured: {0}")]
    NoSevSupport(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Usage(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Snp,
    SevEs,
    Sev,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Snp => "sev-snp",
            Mode::SevEs => "sev-es",
            Mode::Sev => "sev",
        }
    }
}

/// What a launch digest depends on.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub mode: Mode,
    pub ovmf: PathBuf,
    pub vcpus: u32,
    /// CPUID signature QEMU puts in RDX (from `--vcpu-type`).
    pub vcpu_sig: u32,
    /// SEV_FEATURES of the VMSA (SNP only; SEV-ES uses 0).
    pub guest_features: u64,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: Option<String>,
    /// Precomputed GCTX digest over the OVMF pages (SNP only).
    pub ovmf_hash: Option<[u8; 48]>,
}

#[derive(Debug, Clone)]
pub struct FileHash {
    pub path: PathBuf,
    pub size: u64,
    pub sha256: [u8; 32],
}

/// A digest and what went into it.
#[derive(Debug, Clone)]
pub struct Measurement {
    pub digest: Vec<u8>,
    pub ovmf_size: u64,
    /// SNP: the GCTX digest over the OVMF pages (what `--ovmf-hash` takes).
    pub ovmf_hash: Option<[u8; 48]>,
    pub ovmf_hash_given: bool,
    pub kernel: Option<FileHash>,
    pub initrd: Option<FileHash>,
    /// SHA-256 of the command line with its NUL, when a kernel is measured.
    pub cmdline_sha256: Option<[u8; 32]>,
    pub sections: Vec<(String, u32, u32)>,
}

fn read_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> MeasureError + 'a {
    move |source| MeasureError::Read {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// SHA-256 of a file, streamed (kernels and initrds can be large). `sha2` picks the
/// CPU's SHA extensions at run time.
pub fn sha256_file(what: &'static str, path: &Path) -> Result<FileHash, MeasureError> {
    let mut f = File::open(path).map_err(read_err(what, path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_err(what, path)(e)),
        };
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok(FileHash {
        path: path.to_path_buf(),
        size,
        sha256: h.finalize().into(),
    })
}

fn read_ovmf(path: &Path) -> Result<Ovmf, MeasureError> {
    let mut f = File::open(path).map_err(read_err("OVMF", path))?;
    let len = f.metadata().map_err(read_err("OVMF", path))?.len();
    if len > MAX_OVMF_LEN {
        return Err(MeasureError::Ovmf(format!(
            "{} is {len} bytes; firmware images are at most {MAX_OVMF_LEN} (is this a disk image?)",
            path.display()
        )));
    }
    let mut data = Vec::with_capacity(len as usize);
    f.read_to_end(&mut data).map_err(read_err("OVMF", path))?;
    Ovmf::parse(data)
}

/// QEMU's kernel hashes table: header GUID and length, then cmdline, initrd and kernel
/// entries (GUID, length 50, SHA-256), 168 bytes, padded to 16 (176).
fn hashes_table(cmdline: &[u8; 32], initrd: &[u8; 32], kernel: &[u8; 32]) -> [u8; 176] {
    use ovmf::guid_le;
    const HEADER: [u8; 16] = guid_le(
        0x9438d606,
        0x4f22,
        0x4cc9,
        [0xb4, 0x79, 0xa7, 0x93, 0xd4, 0x11, 0xfd, 0x21],
    );
    const CMDLINE: [u8; 16] = guid_le(
        0x97d02dd8,
        0xbd20,
        0x4c94,
        [0xaa, 0x78, 0xe7, 0x71, 0x4d, 0x36, 0xab, 0x2a],
    );
    const INITRD: [u8; 16] = guid_le(
        0x44baf731,
        0x3a2f,
        0x4bd7,
        [0x9a, 0xf1, 0x41, 0xe2, 0x91, 0x69, 0x78, 0x1d],
    );
    const KERNEL: [u8; 16] = guid_le(
        0x4de79437,
        0xabd2,
        0x427f,
        [0xb8, 0x35, 0xd5, 0xb1, 0x72, 0xd2, 0x04, 0x5b],
    );
    let mut t = [0u8; 176];
    t[..16].copy_from_slice(&HEADER);
    t[16..18].copy_from_slice(&168u16.to_le_bytes());
    for (i, (g, h)) in [(CMDLINE, cmdline), (INITRD, initrd), (KERNEL, kernel)]
        .iter()
        .enumerate()
    {
        let at = 18 + i * 50;
        t[at..at + 16].copy_from_slice(g);
        t[at + 16..at + 18].copy_from_slice(&50u16.to_le_bytes());
        t[at + 18..at + 50].copy_from_slice(*h);
    }
    t
}

struct KernelHashes {
    kernel: FileHash,
    initrd: Option<FileHash>,
    initrd_sha256: [u8; 32],
    cmdline_sha256: [u8; 32],
}

impl KernelHashes {
    fn table(&self) -> [u8; 176] {
        hashes_table(
            &self.cmdline_sha256,
            &self.initrd_sha256,
            &self.kernel.sha256,
        )
    }
}

/// Computes the launch digest. Kernel and initrd are hashed on their own threads while
/// the firmware is read and measured.
pub fn measure(inp: &Inputs) -> Result<Measurement, MeasureError> {
    if inp.kernel.is_none() && (inp.initrd.is_some() || inp.append.is_some()) {
        return Err(MeasureError::Usage(
            "--initrd and --append are measured only with --kernel".into(),
        ));
    }
    if inp.mode != Mode::Sev && inp.vcpus == 0 {
        return Err(MeasureError::Usage("--vcpus must be at least 1".into()));
    }
    // QEMU's x86 limit; also keeps a typo from hashing for minutes.
    if inp.vcpus > MAX_VCPUS {
        return Err(MeasureError::Usage(format!(
            "--vcpus {} is more than QEMU's {MAX_VCPUS}",
            inp.vcpus
        )));
    }
    if inp.ovmf_hash.is_some() && inp.mode != Mode::Snp {
        return Err(MeasureError::Usage(
            "--ovmf-hash applies to --mode sev-snp only".into(),
        ));
    }
    std::thread::scope(|s| {
        let kernel = inp
            .kernel
            .as_deref()
            .map(|k| s.spawn(move || sha256_file("kernel", k)));
        let initrd = inp
            .initrd
            .as_deref()
            .map(|i| s.spawn(move || sha256_file("initrd", i)));
        let ovmf = read_ovmf(&inp.ovmf);
        let join = |h: std::thread::ScopedJoinHandle<'_, Result<FileHash, MeasureError>>| {
            h.join()
                .unwrap_or_else(|_| Err(MeasureError::Usage("a hashing thread failed".into())))
        };
        let kernel = kernel.map(join).transpose();
        let initrd = initrd.map(join).transpose();
        let ovmf = ovmf?;
        let hashes = match kernel? {
            None => None,
            Some(kernel) => {
                let initrd = initrd?;
                let initrd_sha256 = initrd
                    .as_ref()
                    .map(|i| i.sha256)
                    .unwrap_or_else(|| Sha256::digest([]).into());
                // QEMU hashes the command line as given, with its terminating NUL.
                let mut cmd = inp.append.clone().unwrap_or_default().into_bytes();
                cmd.push(0);
                Some(KernelHashes {
                    kernel,
                    initrd,
                    initrd_sha256,
                    cmdline_sha256: Sha256::digest(&cmd).into(),
                })
            }
        };
        compute(inp, &ovmf, hashes)
    })
}

fn compute(
    inp: &Inputs,
    ovmf: &Ovmf,
    hashes: Option<KernelHashes>,
) -> Result<Measurement, MeasureError> {
    let mut m = Measurement {
        digest: Vec::new(),
        ovmf_size: ovmf.data.len() as u64,
        ovmf_hash: None,
        ovmf_hash_given: inp.ovmf_hash.is_some(),
        kernel: None,
        initrd: None,
        cmdline_sha256: hashes.as_ref().map(|h| h.cmdline_sha256),
        sections: ovmf
            .sections
            .iter()
            .flatten()
            .map(|s| (s.kind.name().to_string(), s.gpa, s.size))
            .collect(),
    };
    let reset_eip = || {
        ovmf.reset_eip.ok_or_else(|| {
            MeasureError::NoSevSupport(
                "the footer table has no SEV-ES reset block (GUID 00f771de-…), so the \
                 application processors' start address is unknown"
                    .into(),
            )
        })
    };
    match inp.mode {
        Mode::Snp => {
            let Some(sections) = &ovmf.sections else {
                return Err(MeasureError::NoSevSupport(
                    "it has no SEV metadata (footer table entry dc886566-…, \"ASEV\"), which \
                     SEV-SNP needs to know which pages to pre-validate; use an SNP-capable \
                     OVMF (edk2 AmdSevX64 or OvmfPkgX64 from 2022 on)"
                        .into(),
                ));
            };
            if !ovmf.data.len().is_multiple_of(PAGE) {
                return Err(MeasureError::Ovmf(format!(
                    "{} bytes is not a whole number of 4 KiB pages",
                    ovmf.data.len()
                )));
            }
            if hashes.is_some() && !ovmf.has_section(SectionKind::SnpKernelHashes) {
                return Err(MeasureError::Unsupported(
                    "--kernel given, but this OVMF's SEV metadata has no SNP_KERNEL_HASHES \
                     section: it cannot measure a kernel, initrd or command line (QEMU would \
                     refuse kernel-hashes=on). Use the edk2 AmdSevX64 build, or measure \
                     without --kernel"
                        .into(),
                ));
            }
            let mut g = match inp.ovmf_hash {
                Some(seed) => {
                    m.ovmf_hash = Some(seed);
                    Gctx::new(seed)
                }
                None => {
                    let mut g = Gctx::new([0; 48]);
                    g.update_normal(ovmf.gpa(), &ovmf.data);
                    m.ovmf_hash = Some(g.ld);
                    g
                }
            };
            for s in sections {
                let gpa = u64::from(s.gpa);
                let size = s.size as usize;
                match s.kind {
                    SectionKind::SnpSecMemory | SectionKind::SvsmCaa => {
                        g.update_empty(PageType::Zero, gpa, size)
                    }
                    SectionKind::SnpSecrets => g.update(PageType::Secrets, gpa, &[0; 48]),
                    SectionKind::Cpuid => g.update(PageType::Cpuid, gpa, &[0; 48]),
                    SectionKind::SnpKernelHashes => match &hashes {
                        None => g.update_empty(PageType::Zero, gpa, size),
                        Some(h) => {
                            let table_gpa = ovmf.hashes_table_gpa.unwrap_or(0);
                            if table_gpa == 0 || size != PAGE {
                                return Err(MeasureError::Ovmf(format!(
                                    "SNP_KERNEL_HASHES section of {size} bytes with hashes table \
                                     at {table_gpa:#x}: expected one page holding the table"
                                )));
                            }
                            let off = (table_gpa as usize) & (PAGE - 1);
                            let mut page = vec![0u8; PAGE];
                            let t = h.table();
                            if off + t.len() > PAGE {
                                return Err(MeasureError::Ovmf(format!(
                                    "hashes table at page offset {off:#x} crosses its page"
                                )));
                            }
                            page[off..off + t.len()].copy_from_slice(&t);
                            g.update_normal(gpa, &page);
                        }
                    },
                }
            }
            let eip = reset_eip()?;
            let bsp = vmsa::page(vmsa::BSP_EIP, inp.vcpu_sig, inp.guest_features);
            let ap = vmsa::page(eip, inp.vcpu_sig, inp.guest_features);
            let bsp_h: [u8; 48] = sha2::Sha384::digest(&bsp).into();
            let ap_h: [u8; 48] = sha2::Sha384::digest(&ap).into();
            for i in 0..inp.vcpus {
                let h = if i == 0 { &bsp_h } else { &ap_h };
                g.update(PageType::Vmsa, VMSA_GPA, h);
            }
            m.digest = g.ld.to_vec();
        }
        Mode::SevEs | Mode::Sev => {
            let mut h = Sha256::new();
            h.update(&ovmf.data);
            if let Some(k) = &hashes {
                if ovmf.hashes_table_gpa.unwrap_or(0) == 0 {
                    return Err(MeasureError::Unsupported(
                        "--kernel given, but this OVMF has no SEV hashes table (footer entry \
                         7255371f-…): it cannot measure a kernel, initrd or command line"
                            .into(),
                    ));
                }
                h.update(k.table());
            }
            if inp.mode == Mode::SevEs {
                let eip = reset_eip()?;
                // SEV-ES has no SEV_FEATURES; each vCPU's VMSA is encrypted in turn.
                let bsp = vmsa::page(vmsa::BSP_EIP, inp.vcpu_sig, 0);
                let ap = vmsa::page(eip, inp.vcpu_sig, 0);
                for i in 0..inp.vcpus {
                    h.update(if i == 0 { &bsp } else { &ap });
                }
            } else if ovmf.hashes_table_gpa.is_none()
                && ovmf.reset_eip.is_none()
                && ovmf.sections.is_none()
            {
                return Err(MeasureError::NoSevSupport(
                    "its footer table has no SEV entries".into(),
                ));
            }
            m.digest = h.finalize().to_vec();
        }
    }
    if let Some(h) = hashes {
        m.kernel = Some(h.kernel);
        m.initrd = h.initrd;
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_table_layout() {
        let t = hashes_table(&[1; 32], &[2; 32], &[3; 32]);
        assert_eq!(&t[16..18], &168u16.to_le_bytes());
        assert_eq!(&t[18 + 18..18 + 50], &[1u8; 32]);
        assert_eq!(&t[118 + 18..118 + 50], &[3u8; 32]);
        assert!(t[168..].iter().all(|&b| b == 0));
    }

    #[test]
    fn tiny_or_foreign_images_are_errors_not_panics() {
        for data in [vec![], vec![0u8; 49], vec![0xffu8; 4096]] {
            assert!(Ovmf::parse(data).is_err());
        }
    }
}
