//! SEV-SNP attestation report (AMD SEV-SNP ABI spec, table "ATTESTATION_REPORT
//! Structure"): versions 2, 3 and 5, parsed from the raw 0x4A0 bytes.
//!
//! The parser never panics: every field is read from a fixed offset inside a buffer whose
//! length was checked first. The raw bytes are kept because the signature covers them as
//! they are, not a re-encoding.

use std::fmt;

use thiserror::Error;

/// Size of an attestation report.
pub const REPORT_LEN: usize = 0x4A0;
/// The signature covers bytes `[0, SIGNED_LEN)`.
pub const SIGNED_LEN: usize = 0x2A0;
/// Offset of the SNP report inside an Azure HCL report ("HCLA" header).
pub const HCL_REPORT_OFFSET: usize = 0x20;

// Field offsets, named as in the ABI spec.
pub(crate) const OFF_VERSION: usize = 0x00;
pub(crate) const OFF_GUEST_SVN: usize = 0x04;
pub(crate) const OFF_POLICY: usize = 0x08;
pub(crate) const OFF_FAMILY_ID: usize = 0x10;
pub(crate) const OFF_IMAGE_ID: usize = 0x20;
pub(crate) const OFF_VMPL: usize = 0x30;
pub(crate) const OFF_SIG_ALGO: usize = 0x34;
pub(crate) const OFF_CURRENT_TCB: usize = 0x38;
pub(crate) const OFF_PLATFORM_INFO: usize = 0x40;
pub(crate) const OFF_KEY_INFO: usize = 0x48;
pub(crate) const OFF_REPORT_DATA: usize = 0x50;
pub(crate) const OFF_MEASUREMENT: usize = 0x90;
pub(crate) const OFF_HOST_DATA: usize = 0xC0;
pub(crate) const OFF_ID_KEY_DIGEST: usize = 0xE0;
pub(crate) const OFF_AUTHOR_KEY_DIGEST: usize = 0x110;
pub(crate) const OFF_REPORT_ID: usize = 0x140;
pub(crate) const OFF_REPORT_ID_MA: usize = 0x160;
pub(crate) const OFF_REPORTED_TCB: usize = 0x180;
pub(crate) const OFF_CPUID_FAM: usize = 0x188;
pub(crate) const OFF_CPUID_MOD: usize = 0x189;
pub(crate) const OFF_CPUID_STEP: usize = 0x18A;
pub(crate) const OFF_CHIP_ID: usize = 0x1A0;
pub(crate) const OFF_COMMITTED_TCB: usize = 0x1E0;
pub(crate) const OFF_CURRENT_VERSION: usize = 0x1E8;
pub(crate) const OFF_COMMITTED_VERSION: usize = 0x1EC;
pub(crate) const OFF_LAUNCH_TCB: usize = 0x1F0;
pub(crate) const OFF_LAUNCH_MIT: usize = 0x1F8;
pub(crate) const OFF_CURRENT_MIT: usize = 0x200;
pub(crate) const OFF_SIG_R: usize = 0x2A0;
pub(crate) const OFF_SIG_S: usize = 0x2E8;
/// r and s are little-endian in 72-byte fields; P-384 uses the low 48 bytes.
pub(crate) const SIG_COMPONENT_FIELD: usize = 72;

/// SIGNATURE_ALGO value for ECDSA P-384 with SHA-384, the only one defined.
pub const SIG_ALGO_ECDSA_P384_SHA384: u32 = 1;

/// Errors that make a byte string unusable as an SNP report.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ReportError {
    #[error("SNP report must be {REPORT_LEN} bytes, got {0}")]
    Length(usize),
    #[error("SNP report version {0} is not supported (supported: 2, 3, 5)")]
    Version(u32),
    #[error("SNP report file is neither {REPORT_LEN} raw bytes, an HCL report, nor hex of either")]
    Unrecognized,
}

/// AMD EPYC generation: decides the TCB_VERSION layout and the AMD root to chain to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Generation {
    Milan,
    Genoa,
    Turin,
}

impl Generation {
    /// From CPUID family/model as reported in v3+ reports.
    pub fn from_cpuid(family: u8, model: u8) -> Option<Self> {
        match (family, model) {
            (0x19, 0x00..=0x0F) => Some(Self::Milan),
            (0x19, 0x10..=0x1F) | (0x19, 0xA0..=0xAF) => Some(Self::Genoa),
            (0x1A, 0x00..=0x11) => Some(Self::Turin),
            _ => None,
        }
    }

    /// From the VCEK's productName extension ("Milan-B0", "Genoa-…", "Turin-…").
    pub fn from_product_name(name: &str) -> Option<Self> {
        let lower = name.to_ascii_lowercase();
        [Self::Milan, Self::Genoa, Self::Turin]
            .into_iter()
            .find(|g| lower.starts_with(&g.name().to_ascii_lowercase()))
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Milan => "Milan",
            Self::Genoa => "Genoa",
            Self::Turin => "Turin",
        }
    }

    /// CPUID family/model the simulator writes into v3+ reports.
    pub fn cpuid(self) -> (u8, u8, u8) {
        match self {
            Self::Milan => (0x19, 0x01, 0x01),
            Self::Genoa => (0x19, 0x11, 0x01),
            Self::Turin => (0x1A, 0x02, 0x00),
        }
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// TCB_VERSION decoded for a generation. Turin adds FMC and moves the other fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcbVersion {
    pub bootloader: u8,
    pub tee: u8,
    pub snp: u8,
    pub microcode: u8,
    /// Only on Turin and later.
    pub fmc: Option<u8>,
}

impl TcbVersion {
    pub fn from_raw(raw: u64, gen: Generation) -> Self {
        let b = raw.to_le_bytes();
        match gen {
            Generation::Milan | Generation::Genoa => TcbVersion {
                bootloader: b[0],
                tee: b[1],
                snp: b[6],
                microcode: b[7],
                fmc: None,
            },
            Generation::Turin => TcbVersion {
                fmc: Some(b[0]),
                bootloader: b[1],
                tee: b[2],
                snp: b[3],
                microcode: b[7],
            },
        }
    }

    pub fn to_raw(self, gen: Generation) -> u64 {
        let mut b = [0u8; 8];
        match gen {
            Generation::Milan | Generation::Genoa => {
                b[0] = self.bootloader;
                b[1] = self.tee;
                b[6] = self.snp;
                b[7] = self.microcode;
            }
            Generation::Turin => {
                b[0] = self.fmc.unwrap_or(0);
                b[1] = self.bootloader;
                b[2] = self.tee;
                b[3] = self.snp;
                b[7] = self.microcode;
            }
        }
        u64::from_le_bytes(b)
    }
}

impl fmt::Display for TcbVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bootloader={} tee={} snp={} microcode={}",
            self.bootloader, self.tee, self.snp, self.microcode
        )?;
        if let Some(fmc) = self.fmc {
            write!(f, " fmc={fmc}")?;
        }
        Ok(())
    }
}

/// Guest policy bits (ABI spec, GUEST_POLICY).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestPolicy(pub u64);

impl GuestPolicy {
    pub const SMT: u64 = 1 << 16;
    pub const RESERVED_ONE: u64 = 1 << 17;
    pub const MIGRATE_MA: u64 = 1 << 18;
    pub const DEBUG: u64 = 1 << 19;
    pub const SINGLE_SOCKET: u64 = 1 << 20;

    pub fn abi_minor(self) -> u8 {
        (self.0 & 0xFF) as u8
    }
    pub fn abi_major(self) -> u8 {
        ((self.0 >> 8) & 0xFF) as u8
    }
    pub fn smt_allowed(self) -> bool {
        self.0 & Self::SMT != 0
    }
    pub fn migrate_ma_allowed(self) -> bool {
        self.0 & Self::MIGRATE_MA != 0
    }
    pub fn debug_allowed(self) -> bool {
        self.0 & Self::DEBUG != 0
    }
    pub fn single_socket(self) -> bool {
        self.0 & Self::SINGLE_SOCKET != 0
    }
}

/// Which key signed the report (KEY_INFO.SIGNING_KEY).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigningKey {
    Vcek,
    Vlek,
    /// 7: the report is unsigned.
    None,
    Reserved(u8),
}

impl fmt::Display for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Vcek => f.write_str("VCEK"),
            Self::Vlek => f.write_str("VLEK"),
            Self::None => f.write_str("none"),
            Self::Reserved(v) => write!(f, "reserved({v})"),
        }
    }
}

/// Firmware version triple (build, minor, major in the report).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FirmwareVersion {
    pub major: u8,
    pub minor: u8,
    pub build: u8,
}

impl fmt::Display for FirmwareVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.build)
    }
}

/// A parsed SNP attestation report, with its raw bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct SnpReport {
    raw: Box<[u8; REPORT_LEN]>,
    pub version: u32,
    pub guest_svn: u32,
    pub policy: GuestPolicy,
    pub family_id: [u8; 16],
    pub image_id: [u8; 16],
    pub vmpl: u32,
    pub sig_algo: u32,
    pub current_tcb_raw: u64,
    pub platform_info: u64,
    pub key_info: u32,
    pub report_data: [u8; 64],
    pub measurement: [u8; 48],
    pub host_data: [u8; 32],
    pub id_key_digest: [u8; 48],
    pub author_key_digest: [u8; 48],
    pub report_id: [u8; 32],
    pub report_id_ma: [u8; 32],
    pub reported_tcb_raw: u64,
    /// CPUID family, model, stepping (v3 and later).
    pub cpuid: Option<(u8, u8, u8)>,
    pub chip_id: [u8; 64],
    pub committed_tcb_raw: u64,
    pub current_version: FirmwareVersion,
    pub committed_version: FirmwareVersion,
    pub launch_tcb_raw: u64,
    /// Mitigation vectors (v5 and later).
    pub launch_mit_vector: Option<u64>,
    pub current_mit_vector: Option<u64>,
    /// Signature r and s as big-endian 48-byte integers, ready for a verifier.
    pub signature_r: [u8; 48],
    pub signature_s: [u8; 48],
    /// True when the upper 24 bytes of the r/s fields are zero, as they must be for P-384.
    pub signature_well_formed: bool,
}

impl fmt::Debug for SnpReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnpReport")
            .field("version", &self.version)
            .field("policy", &format_args!("{:#x}", self.policy.0))
            .field("vmpl", &self.vmpl)
            .field("signing_key", &self.signing_key())
            .field("measurement", &hex::encode(self.measurement))
            .field("cpuid", &self.cpuid)
            .finish_non_exhaustive()
    }
}

fn arr<const N: usize>(b: &[u8; REPORT_LEN], off: usize) -> [u8; N] {
    let mut out = [0u8; N];
    // Offsets are compile-time constants inside REPORT_LEN; `get` keeps this panic-free
    // even if a constant were ever wrong.
    if let Some(src) = b.get(off..off + N) {
        out.copy_from_slice(src);
    }
    out
}

fn u32_at(b: &[u8; REPORT_LEN], off: usize) -> u32 {
    u32::from_le_bytes(arr::<4>(b, off))
}

fn u64_at(b: &[u8; REPORT_LEN], off: usize) -> u64 {
    u64::from_le_bytes(arr::<8>(b, off))
}

/// Little-endian 72-byte field to big-endian 48-byte scalar; reports whether the
/// unused high bytes were zero.
fn sig_component(b: &[u8; REPORT_LEN], off: usize) -> ([u8; 48], bool) {
    let field = arr::<SIG_COMPONENT_FIELD>(b, off);
    let mut out = [0u8; 48];
    for (i, byte) in field[..48].iter().enumerate() {
        out[47 - i] = *byte;
    }
    (out, field[48..].iter().all(|&x| x == 0))
}

impl SnpReport {
    /// Parse exactly [`REPORT_LEN`] bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, ReportError> {
        let raw: Box<[u8; REPORT_LEN]> = match <[u8; REPORT_LEN]>::try_from(bytes) {
            Ok(a) => Box::new(a),
            Err(_) => return Err(ReportError::Length(bytes.len())),
        };
        let version = u32_at(&raw, OFF_VERSION);
        let (has_cpuid, has_mit) = match version {
            2 => (false, false),
            // Version 4 never shipped; treat it with the v3 layout like AMD's tools do.
            3 | 4 => (true, false),
            5 => (true, true),
            v => return Err(ReportError::Version(v)),
        };
        let (signature_r, r_ok) = sig_component(&raw, OFF_SIG_R);
        let (signature_s, s_ok) = sig_component(&raw, OFF_SIG_S);
        let vb = |off: usize| FirmwareVersion {
            build: raw[off],
            minor: raw[off + 1],
            major: raw[off + 2],
        };
        Ok(SnpReport {
            version,
            guest_svn: u32_at(&raw, OFF_GUEST_SVN),
            policy: GuestPolicy(u64_at(&raw, OFF_POLICY)),
            family_id: arr(&raw, OFF_FAMILY_ID),
            image_id: arr(&raw, OFF_IMAGE_ID),
            vmpl: u32_at(&raw, OFF_VMPL),
            sig_algo: u32_at(&raw, OFF_SIG_ALGO),
            current_tcb_raw: u64_at(&raw, OFF_CURRENT_TCB),
            platform_info: u64_at(&raw, OFF_PLATFORM_INFO),
            key_info: u32_at(&raw, OFF_KEY_INFO),
            report_data: arr(&raw, OFF_REPORT_DATA),
            measurement: arr(&raw, OFF_MEASUREMENT),
            host_data: arr(&raw, OFF_HOST_DATA),
            id_key_digest: arr(&raw, OFF_ID_KEY_DIGEST),
            author_key_digest: arr(&raw, OFF_AUTHOR_KEY_DIGEST),
            report_id: arr(&raw, OFF_REPORT_ID),
            report_id_ma: arr(&raw, OFF_REPORT_ID_MA),
            reported_tcb_raw: u64_at(&raw, OFF_REPORTED_TCB),
            cpuid: has_cpuid.then(|| (raw[OFF_CPUID_FAM], raw[OFF_CPUID_MOD], raw[OFF_CPUID_STEP])),
            chip_id: arr(&raw, OFF_CHIP_ID),
            committed_tcb_raw: u64_at(&raw, OFF_COMMITTED_TCB),
            current_version: vb(OFF_CURRENT_VERSION),
            committed_version: vb(OFF_COMMITTED_VERSION),
            launch_tcb_raw: u64_at(&raw, OFF_LAUNCH_TCB),
            launch_mit_vector: has_mit.then(|| u64_at(&raw, OFF_LAUNCH_MIT)),
            current_mit_vector: has_mit.then(|| u64_at(&raw, OFF_CURRENT_MIT)),
            signature_r,
            signature_s,
            signature_well_formed: r_ok && s_ok,
            raw,
        })
    }

    /// Parse the SNP report embedded in an Azure HCL report (at offset 0x20).
    pub fn parse_hcl(bytes: &[u8]) -> Result<Self, ReportError> {
        let inner = bytes
            .get(HCL_REPORT_OFFSET..HCL_REPORT_OFFSET + REPORT_LEN)
            .ok_or(ReportError::Length(
                bytes.len().saturating_sub(HCL_REPORT_OFFSET),
            ))?;
        Self::parse(inner)
    }

    /// The raw report bytes.
    pub fn raw(&self) -> &[u8; REPORT_LEN] {
        &self.raw
    }

    /// The bytes covered by the signature.
    pub fn signed_bytes(&self) -> &[u8] {
        &self.raw[..SIGNED_LEN]
    }

    pub fn signing_key(&self) -> SigningKey {
        match (self.key_info >> 2) & 0x7 {
            0 => SigningKey::Vcek,
            1 => SigningKey::Vlek,
            7 => SigningKey::None,
            v => SigningKey::Reserved(v as u8),
        }
    }

    /// KEY_INFO.MASK_CHIP_KEY / a zeroed CHIP_ID: the report cannot be tied to a chip.
    pub fn chip_id_masked(&self) -> bool {
        self.chip_id.iter().all(|&b| b == 0)
    }

    /// Generation as far as the report alone tells: CPUID in v3+, else the CHIP_ID shape
    /// (Turin chip IDs are 8 bytes, zero-padded).
    pub fn generation_hint(&self) -> Option<Generation> {
        if let Some((fam, model, _)) = self.cpuid {
            return Generation::from_cpuid(fam, model);
        }
        if self.chip_id_masked() {
            None
        } else if self.chip_id[8..].iter().all(|&b| b == 0) {
            Some(Generation::Turin)
        } else {
            None
        }
    }

    pub fn reported_tcb(&self, gen: Generation) -> TcbVersion {
        TcbVersion::from_raw(self.reported_tcb_raw, gen)
    }

    pub fn current_tcb(&self, gen: Generation) -> TcbVersion {
        TcbVersion::from_raw(self.current_tcb_raw, gen)
    }

    pub fn committed_tcb(&self, gen: Generation) -> TcbVersion {
        TcbVersion::from_raw(self.committed_tcb_raw, gen)
    }

    pub fn launch_tcb(&self, gen: Generation) -> TcbVersion {
        TcbVersion::from_raw(self.launch_tcb_raw, gen)
    }
}

/// Turn the contents of a report file into the 0x4A0 report bytes: raw binary, an Azure
/// HCL report ("HCLA" magic, report at 0x20), or hex of either (whitespace ignored).
pub fn extract_report_bytes(file: &[u8]) -> Result<Vec<u8>, ReportError> {
    if file.len() == REPORT_LEN {
        return Ok(file.to_vec());
    }
    if file.starts_with(b"HCLA") && file.len() >= HCL_REPORT_OFFSET + REPORT_LEN {
        return Ok(file[HCL_REPORT_OFFSET..HCL_REPORT_OFFSET + REPORT_LEN].to_vec());
    }
    let text: Vec<u8> = file
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let text = text.strip_prefix(b"0x").map(<[u8]>::to_vec).unwrap_or(text);
    if !text.is_empty() && text.iter().all(u8::is_ascii_hexdigit) {
        if let Ok(decoded) = hex::decode(&text) {
            if decoded.len() != file.len() {
                return extract_report_bytes(&decoded);
            }
        }
    }
    Err(ReportError::Unrecognized)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blank(version: u32) -> Vec<u8> {
        let mut b = vec![0u8; REPORT_LEN];
        b[..4].copy_from_slice(&version.to_le_bytes());
        b
    }

    #[test]
    fn rejects_wrong_lengths_and_versions() {
        assert_eq!(SnpReport::parse(&[0; 10]), Err(ReportError::Length(10)));
        assert_eq!(
            SnpReport::parse(&vec![0; REPORT_LEN + 1]),
            Err(ReportError::Length(REPORT_LEN + 1))
        );
        for v in [0u32, 1, 6, u32::MAX] {
            assert_eq!(SnpReport::parse(&blank(v)), Err(ReportError::Version(v)));
        }
    }

    #[test]
    fn version_gates_optional_fields() {
        let mut b = blank(2);
        b[OFF_CPUID_FAM] = 0x19;
        b[OFF_LAUNCH_MIT] = 7;
        let r2 = SnpReport::parse(&b).unwrap();
        assert_eq!(r2.cpuid, None);
        assert_eq!(r2.launch_mit_vector, None);
        b[..4].copy_from_slice(&5u32.to_le_bytes());
        let r5 = SnpReport::parse(&b).unwrap();
        assert_eq!(r5.cpuid, Some((0x19, 0, 0)));
        assert_eq!(r5.launch_mit_vector, Some(7));
        assert_eq!(r5.generation_hint(), Some(Generation::Milan));
    }

    #[test]
    fn signature_is_little_endian_and_checks_padding() {
        let mut b = blank(2);
        b[OFF_SIG_R] = 0xAB; // least significant byte of r
        b[OFF_SIG_S + 47] = 0xCD; // most significant byte of s
        let r = SnpReport::parse(&b).unwrap();
        assert_eq!(r.signature_r[47], 0xAB);
        assert_eq!(r.signature_s[0], 0xCD);
        assert!(r.signature_well_formed);
        b[OFF_SIG_S + 60] = 1;
        assert!(!SnpReport::parse(&b).unwrap().signature_well_formed);
    }

    #[test]
    fn tcb_layouts_round_trip() {
        let t = TcbVersion {
            bootloader: 1,
            tee: 2,
            snp: 3,
            microcode: 4,
            fmc: Some(5),
        };
        let raw = t.to_raw(Generation::Turin);
        assert_eq!(raw.to_le_bytes(), [5, 1, 2, 3, 0, 0, 0, 4]);
        assert_eq!(TcbVersion::from_raw(raw, Generation::Turin), t);
        let m = TcbVersion { fmc: None, ..t };
        let raw = m.to_raw(Generation::Milan);
        assert_eq!(raw.to_le_bytes(), [1, 2, 0, 0, 0, 0, 3, 4]);
        assert_eq!(TcbVersion::from_raw(raw, Generation::Milan), m);
    }

    #[test]
    fn extract_accepts_raw_hex_and_hcl() {
        let b = blank(2);
        assert_eq!(extract_report_bytes(&b).unwrap(), b);
        let hexed = hex::encode(&b);
        assert_eq!(extract_report_bytes(hexed.as_bytes()).unwrap(), b);
        let mut hcl = b"HCLA".to_vec();
        hcl.resize(HCL_REPORT_OFFSET, 0);
        hcl.extend_from_slice(&b);
        hcl.extend_from_slice(&[9; 100]);
        assert_eq!(extract_report_bytes(&hcl).unwrap(), b);
        assert_eq!(
            extract_report_bytes(b"not a report"),
            Err(ReportError::Unrecognized)
        );
    }
}
