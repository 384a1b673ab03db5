//! The SNP guest context's launch digest: SNP_LAUNCH_UPDATE folds each page into it as
//! LD' = SHA-384(LD || PAGE_INFO) (SEV-SNP ABI, "Launch Digest Calculation").

use sha2::{Digest, Sha384};

pub const PAGE: usize = 4096;
/// The VMSA is measured at GPA (u64)-1, page-aligned and cut to 52 bits.
pub const VMSA_GPA: u64 = 0xFFFF_FFFF_F000;

/// PAGE_TYPE values of PAGE_INFO.
#[derive(Debug, Clone, Copy)]
#[repr(u8)]
pub enum PageType {
    Normal = 1,
    Vmsa = 2,
    Zero = 3,
    Secrets = 5,
    Cpuid = 6,
}

pub struct Gctx {
    pub ld: [u8; 48],
}

impl Gctx {
    pub fn new(seed: [u8; 48]) -> Self {
        Gctx { ld: seed }
    }

    /// One PAGE_INFO update: 0x70 bytes, contents is the page's SHA-384 (or zeros for
    /// pages without measured contents).
    pub fn update(&mut self, page_type: PageType, gpa: u64, contents: &[u8; 48]) {
        let mut info = [0u8; 0x70];
        info[..48].copy_from_slice(&self.ld);
        info[48..96].copy_from_slice(contents);
        info[96..98].copy_from_slice(&0x70u16.to_le_bytes());
        info[98] = page_type as u8;
        // is_imi, vmpl3/2/1 permissions and a reserved byte stay zero.
        info[104..112].copy_from_slice(&gpa.to_le_bytes());
        self.ld = Sha384::digest(info).into();
    }

    /// Normal pages whose contents are measured; `data` is a whole number of pages.
    pub fn update_normal(&mut self, gpa: u64, data: &[u8]) {
        for (i, page) in data.chunks_exact(PAGE).enumerate() {
            let h: [u8; 48] = Sha384::digest(page).into();
            self.update(PageType::Normal, gpa + (i * PAGE) as u64, &h);
        }
    }

    /// `len` bytes of pages of a type without contents (zero, secrets, CPUID).
    pub fn update_empty(&mut self, page_type: PageType, gpa: u64, len: usize) {
        for i in 0..len.div_ceil(PAGE) {
            self.update(page_type, gpa + (i * PAGE) as u64, &[0u8; 48]);
        }
    }
}
