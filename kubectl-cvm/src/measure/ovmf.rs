//! OVMF image parsing: the GUIDed footer table at the end of the image and the SEV
//! metadata it points to. Everything is bounds-checked: a firmware file is outside input.

use super::MeasureError;

/// Largest firmware image we accept. Real OVMF builds are 2-8 MiB; the limit keeps a
/// wrong file (a disk image) from being read into memory whole.
pub const MAX_OVMF_LEN: u64 = 128 << 20;

/// A GUID as EFI stores it: the first three fields little-endian.
pub const fn guid_le(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> [u8; 16] {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

/// 96b582de-1fb2-45f7-baea-a366c55a082d: marks the footer table.
const FOOTER_TABLE: [u8; 16] = guid_le(
    0x96b582de,
    0x1fb2,
    0x45f7,
    [0xba, 0xea, 0xa3, 0x66, 0xc5, 0x5a, 0x08, 0x2d],
);
/// 7255371f-3a3b-4b04-927b-1da6efa8d454: where QEMU puts the kernel hashes table.
const SEV_HASH_TABLE_RV: [u8; 16] = guid_le(
    0x7255371f,
    0x3a3b,
    0x4b04,
    [0x92, 0x7b, 0x1d, 0xa6, 0xef, 0xa8, 0xd4, 0x54],
);
/// 00f771de-1a7e-4fcb-890e-68c77e2fb44e: the SEV-ES AP reset vector.
const SEV_ES_RESET_BLOCK: [u8; 16] = guid_le(
    0x00f771de,
    0x1a7e,
    0x4fcb,
    [0x89, 0x0e, 0x68, 0xc7, 0x7e, 0x2f, 0xb4, 0x4e],
);
/// dc886566-984a-4798-a75e-5585a7bf67cc: offset of the SEV metadata ("ASEV").
const SEV_METADATA: [u8; 16] = guid_le(
    0xdc886566,
    0x984a,
    0x4798,
    [0xa7, 0x5e, 0x55, 0x85, 0xa7, 0xbf, 0x67, 0xcc],
);

/// Footer entry header: u16 size then the GUID; data precede it.
const ENTRY_HEADER: usize = 18;
/// The footer table's own entry ends 32 bytes before the end of the image (the reset vector).
const FOOTER_END_GAP: usize = 32;

/// Kind of an SEV metadata section (OVMF's `OvmfSevMetadataSectionDesc.Type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectionKind {
    /// Pre-validated zeroed memory.
    SnpSecMemory,
    /// The secrets page the PSP fills.
    SnpSecrets,
    /// The CPUID page the PSP checks.
    Cpuid,
    /// SVSM calling area, zeroed.
    SvsmCaa,
    /// The page that holds the kernel/initrd/cmdline hashes table.
    SnpKernelHashes,
}

impl SectionKind {
    fn from_raw(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::SnpSecMemory,
            2 => Self::SnpSecrets,
            3 => Self::Cpuid,
            4 => Self::SvsmCaa,
            0x10 => Self::SnpKernelHashes,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::SnpSecMemory => "SNP_SEC_MEM",
            Self::SnpSecrets => "SNP_SECRETS",
            Self::Cpuid => "CPUID",
            Self::SvsmCaa => "SVSM_CAA",
            Self::SnpKernelHashes => "SNP_KERNEL_HASHES",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Section {
    pub gpa: u32,
    pub size: u32,
    pub kind: SectionKind,
}

/// What measurement needs from a firmware image.
#[derive(Debug, Clone)]
pub struct Ovmf {
    pub data: Vec<u8>,
    /// SEV metadata sections in image order; `None` when the image has no SEV metadata.
    pub sections: Option<Vec<Section>>,
    /// GPA of the kernel hashes table (`None`, or 0 in the image: not supported).
    pub hashes_table_gpa: Option<u32>,
    /// SEV-ES AP reset EIP.
    pub reset_eip: Option<u32>,
}

fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

impl Ovmf {
    /// The image is mapped so that it ends at 4 GiB.
    pub fn gpa(&self) -> u64 {
        (1u64 << 32) - self.data.len() as u64
    }

    pub fn has_section(&self, kind: SectionKind) -> bool {
        self.sections
            .as_ref()
            .is_some_and(|s| s.iter().any(|x| x.kind == kind))
    }

    /// Parses an image. An image with no footer table at all is an error (it cannot
    /// launch any SEV guest); missing metadata is recorded and refused by the modes that
    /// need it, with a message naming what is missing.
    pub fn parse(data: Vec<u8>) -> Result<Self, MeasureError> {
        let bad = |why: String| MeasureError::Ovmf(why);
        let len = data.len();
        if len < FOOTER_END_GAP + ENTRY_HEADER {
            return Err(bad(format!("{len} bytes is too small for an OVMF image")));
        }
        let footer_at = len - FOOTER_END_GAP - ENTRY_HEADER;
        if data[footer_at + 2..footer_at + ENTRY_HEADER] != FOOTER_TABLE {
            return Err(MeasureError::NoSevSupport(
                "no OVMF footer table (GUID 96b582de-…) 32 bytes before the end of the image; \
                 this firmware was not built for SEV (use an SEV-capable OVMF, e.g. AmdSevX64 \
                 or a distribution's OVMF.fd)"
                    .into(),
            ));
        }
        let table_len = le_u16(&data, footer_at).unwrap_or(0) as usize;
        if table_len < ENTRY_HEADER || table_len - ENTRY_HEADER > footer_at {
            return Err(bad(format!(
                "footer table size {table_len} does not fit the image"
            )));
        }
        let table = &data[footer_at - (table_len - ENTRY_HEADER)..footer_at];
        let mut hashes_table_gpa = None;
        let mut reset_eip = None;
        let mut metadata_offset = None;
        // Entries are laid out back to front: each entry's header sits after its data.
        let mut end = table.len();
        while end >= ENTRY_HEADER {
            let size = le_u16(table, end - ENTRY_HEADER).unwrap_or(0) as usize;
            if size < ENTRY_HEADER || size > end {
                return Err(bad(format!(
                    "footer table entry of size {size} at table offset {} is malformed",
                    end - ENTRY_HEADER
                )));
            }
            let guid = &table[end - 16..end];
            let body = &table[end - size..end - ENTRY_HEADER];
            if guid == SEV_HASH_TABLE_RV {
                hashes_table_gpa = le_u32(body, 0);
            } else if guid == SEV_ES_RESET_BLOCK {
                reset_eip = le_u32(body, 0);
            } else if guid == SEV_METADATA {
                metadata_offset = le_u32(body, 0);
            }
            end -= size;
        }
        let sections = match metadata_offset {
            None => None,
            Some(off) => Some(parse_metadata(&data, off as usize)?),
        };
        Ok(Ovmf {
            data,
            sections,
            hashes_table_gpa,
            reset_eip,
        })
    }
}

/// The SEV metadata: "ASEV", size, version 1, item count, then 12-byte items
/// (base, size, type, each u32).
fn parse_metadata(data: &[u8], offset_from_end: usize) -> Result<Vec<Section>, MeasureError> {
    let bad = |why: String| MeasureError::Ovmf(format!("SEV metadata: {why}"));
    let start = data
        .len()
        .checked_sub(offset_from_end)
        .ok_or_else(|| bad(format!("offset {offset_from_end} lies before the image")))?;
    let header = data
        .get(start..start + 16)
        .ok_or_else(|| bad("header runs past the image".into()))?;
    if &header[..4] != b"ASEV" {
        return Err(bad("signature is not \"ASEV\"".into()));
    }
    let size = le_u32(header, 4).unwrap_or(0) as usize;
    let version = le_u32(header, 8).unwrap_or(0);
    let count = le_u32(header, 12).unwrap_or(0) as usize;
    if version != 1 {
        return Err(bad(format!("version {version}, only 1 is known")));
    }
    if size < 16 + count * 12 {
        return Err(bad(format!(
            "size {size} is too small for {count} sections"
        )));
    }
    let items = data
        .get(start + 16..start + 16 + count * 12)
        .ok_or_else(|| bad("sections run past the image".into()))?;
    let mut out = Vec::with_capacity(count);
    for (i, it) in items.chunks_exact(12).enumerate() {
        let raw = le_u32(it, 8).unwrap_or(0);
        let kind = SectionKind::from_raw(raw)
            .ok_or_else(|| bad(format!("section {i} has unknown type {raw:#x}")))?;
        out.push(Section {
            gpa: le_u32(it, 0).unwrap_or(0),
            size: le_u32(it, 4).unwrap_or(0),
            kind,
        });
    }
    Ok(out)
}
