//! Our own decoder for Intel DCAP TDX quotes (v4 and v5), independent of dcap-qvl.
//!
//! dcap-qvl decodes too, but keeps the TD report behind its verification result; the
//! CLI must show a quote's fields even when verification fails, and the fuzz target
//! needs a decoder whose every path returns an error instead of panicking.
//!
//! Layout (Intel TDX DCAP Quote Generation Library and Quote Verification Library API,
//! appendix "Quote Format"): a 48-byte header, for v5 a 6-byte body descriptor, the TD
//! report body, then a u32-prefixed signature data section. All integers are
//! little-endian.

use serde::{Deserialize, Serialize};

use super::hexser;
use super::TdxError;

/// TEE type of a TDX quote header (SGX is 0).
pub const TEE_TYPE_TDX: u32 = 0x81;
/// Attestation key type: ECDSA-256 with P-256, the only one Intel's QE uses.
pub const ATTESTATION_KEY_TYPE_ECDSA_P256: u16 = 2;
/// Intel's QE vendor ID (939A7233-F79C-4CA9-940A-0DB3957F0607).
pub const INTEL_QE_VENDOR_ID: [u8; 16] = [
    0x93, 0x9A, 0x72, 0x33, 0xF7, 0x9C, 0x4C, 0xA9, 0x94, 0x0A, 0x0D, 0xB3, 0x95, 0x7F, 0x06, 0x07,
];

pub(crate) const HEADER_LEN: usize = 48;
pub(crate) const TD_REPORT10_LEN: usize = 584;
const TD_REPORT15_LEN: usize = 648;
const TD_REPORT15_EX_LEN: usize = 885;
pub(crate) const ENCLAVE_REPORT_LEN: usize = 384;

/// Offsets inside the TD report body, shared with the simulator and the tamper tests.
pub(crate) mod td10 {
    pub const TEE_TCB_SVN: usize = 0;
    pub const MR_SEAM: usize = 16;
    pub const MR_SIGNER_SEAM: usize = 64;
    pub const SEAM_ATTRIBUTES: usize = 112;
    pub const TD_ATTRIBUTES: usize = 120;
    pub const XFAM: usize = 128;
    pub const MR_TD: usize = 136;
    pub const MR_CONFIG_ID: usize = 184;
    pub const MR_OWNER: usize = 232;
    pub const MR_OWNER_CONFIG: usize = 280;
    pub const RTMR0: usize = 328;
    pub const REPORT_DATA: usize = 520;
}

/// TD attribute bits (Intel TDX Module ABI spec, TD_ATTRIBUTES).
pub mod td_attr {
    /// TUD.DEBUG: the host VMM can read and write the TD's state and memory.
    pub const DEBUG: u64 = 1 << 0;
    /// TUD bits 4..6: performance profiling, as untrusting as DEBUG for a verifier.
    pub const TUD_PROFILING: u64 = 0x70;
    pub const SEPT_VE_DISABLE: u64 = 1 << 28;
    pub const MIGRATABLE: u64 = 1 << 29;
    pub const PKS: u64 = 1 << 30;
    pub const KL: u64 = 1 << 31;
    pub const PERFMON: u64 = 1 << 63;
}

/// Which TD report structure the quote carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TdReportKind {
    /// TDX 1.0 TD report (quote v4, or v5 body type 2).
    Td10,
    /// TDX 1.5 TD report (v5 body type 3): adds TEE_TCB_SVN2 and MRSERVICETD.
    Td15,
    /// TDX 1.5 "ex" TD report (v5 body type 4).
    Td15Ex,
}

/// TD attributes, split into the flags a reader cares about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TdAttributes {
    /// Raw 64-bit value (little-endian in the quote).
    pub raw: u64,
    pub debug: bool,
    pub sept_ve_disable: bool,
    pub migratable: bool,
    pub pks: bool,
    pub key_locker: bool,
    pub perfmon: bool,
}

impl TdAttributes {
    pub fn from_raw(raw: u64) -> Self {
        TdAttributes {
            raw,
            debug: raw & td_attr::DEBUG != 0,
            sept_ve_disable: raw & td_attr::SEPT_VE_DISABLE != 0,
            migratable: raw & td_attr::MIGRATABLE != 0,
            pks: raw & td_attr::PKS != 0,
            key_locker: raw & td_attr::KL != 0,
            perfmon: raw & td_attr::PERFMON != 0,
        }
    }
}

/// A readable view of a TDX quote. Nothing here is verified: see [`super::verify_quote`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DecodedTdQuote {
    pub version: u16,
    pub attestation_key_type: u16,
    pub tee_type: u32,
    pub qe_svn: u16,
    pub pce_svn: u16,
    #[serde(with = "hexser")]
    pub qe_vendor_id: Vec<u8>,
    /// First 16 bytes of the header's user data: the QE's platform identifier.
    #[serde(with = "hexser")]
    pub user_data: Vec<u8>,
    pub report_kind: TdReportKind,
    #[serde(with = "hexser")]
    pub tee_tcb_svn: Vec<u8>,
    /// TDX 1.5: the TCB after a TD-preserving module update.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "hexser::opt")]
    pub tee_tcb_svn2: Option<Vec<u8>>,
    #[serde(with = "hexser")]
    pub mr_seam: Vec<u8>,
    #[serde(with = "hexser")]
    pub mr_signer_seam: Vec<u8>,
    #[serde(with = "hexser")]
    pub seam_attributes: Vec<u8>,
    pub td_attributes: TdAttributes,
    #[serde(with = "hexser")]
    pub xfam: Vec<u8>,
    #[serde(with = "hexser")]
    pub mr_td: Vec<u8>,
    /// MRCONFIGID: set by the host at TD creation (our host-data equivalent).
    #[serde(with = "hexser")]
    pub mr_config_id: Vec<u8>,
    #[serde(with = "hexser")]
    pub mr_owner: Vec<u8>,
    #[serde(with = "hexser")]
    pub mr_owner_config: Vec<u8>,
    /// RTMR0..RTMR3.
    #[serde(with = "hexser::vec")]
    pub rtmrs: Vec<Vec<u8>>,
    #[serde(with = "hexser")]
    pub report_data: Vec<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "hexser::opt")]
    pub mr_service_td: Option<Vec<u8>>,
    /// Bytes covered by the attestation key's signature (header + body).
    pub signed_len: usize,
    /// Certification data type of the innermost block (5 = PCK chain in PEM).
    pub cert_data_type: u16,
    /// The PCK certificate chain (PEM, leaf first) when the quote carries one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pck_chain_pem: Option<String>,
}

/// A bounds-checked little-endian reader: every read is fallible, none can panic.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], TdxError> {
        let end = self.pos.checked_add(n).ok_or_else(|| truncated(what))?;
        let out = self.buf.get(self.pos..end).ok_or_else(|| truncated(what))?;
        self.pos = end;
        Ok(out)
    }

    fn u16(&mut self, what: &str) -> Result<u16, TdxError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &str) -> Result<u32, TdxError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn vec(&mut self, n: usize, what: &str) -> Result<Vec<u8>, TdxError> {
        self.take(n, what).map(<[u8]>::to_vec)
    }
}

fn truncated(what: &str) -> TdxError {
    TdxError::MalformedQuote(format!("quote ends inside {what}"))
}

fn malformed(msg: impl Into<String>) -> TdxError {
    TdxError::MalformedQuote(msg.into())
}

impl DecodedTdQuote {
    /// Decode a TDX quote. Returns [`TdxError::NotTdx`] for SGX quotes and
    /// [`TdxError::MalformedQuote`] for anything that does not follow the layout.
    pub fn parse(quote: &[u8]) -> Result<Self, TdxError> {
        let mut r = Reader::new(quote);
        let version = r.u16("header.version")?;
        let attestation_key_type = r.u16("header.attestation_key_type")?;
        let tee_type = r.u32("header.tee_type")?;
        let qe_svn = r.u16("header.qe_svn")?;
        let pce_svn = r.u16("header.pce_svn")?;
        let qe_vendor_id = r.vec(16, "header.qe_vendor_id")?;
        let user_data = r.vec(20, "header.user_data")?;
        if tee_type != TEE_TYPE_TDX {
            return Err(TdxError::NotTdx { tee_type, version });
        }
        let report_kind = match version {
            4 => TdReportKind::Td10,
            5 => {
                let body_type = r.u16("body.type")?;
                let body_size = r.u32("body.size")?;
                let (kind, len) = match body_type {
                    2 => (TdReportKind::Td10, TD_REPORT10_LEN),
                    3 => (TdReportKind::Td15, TD_REPORT15_LEN),
                    4 => (TdReportKind::Td15Ex, TD_REPORT15_EX_LEN),
                    other => {
                        return Err(malformed(format!(
                            "quote v5 body type {other} is not a TD report (expected 2, 3 or 4)"
                        )))
                    }
                };
                if body_size as usize != len {
                    return Err(malformed(format!(
                        "quote v5 body size {body_size} does not match body type {body_type} ({len} bytes)"
                    )));
                }
                kind
            }
            other => {
                return Err(TdxError::UnsupportedVersion(other));
            }
        };
        let body_len = match report_kind {
            TdReportKind::Td10 => TD_REPORT10_LEN,
            TdReportKind::Td15 => TD_REPORT15_LEN,
            TdReportKind::Td15Ex => TD_REPORT15_EX_LEN,
        };
        let body = r.take(body_len, "TD report body")?;
        let signed_len = r.pos;
        let field = |off: usize, len: usize| -> Vec<u8> { body[off..off + len].to_vec() };
        let td_attributes = u64::from_le_bytes(
            body[td10::TD_ATTRIBUTES..td10::TD_ATTRIBUTES + 8]
                .try_into()
                .map_err(|_| malformed("TD attributes"))?,
        );
        let rtmrs = (0..4).map(|i| field(td10::RTMR0 + 48 * i, 48)).collect();
        let (tee_tcb_svn2, mr_service_td) = match report_kind {
            TdReportKind::Td10 => (None, None),
            TdReportKind::Td15 | TdReportKind::Td15Ex => (
                Some(field(TD_REPORT10_LEN, 16)),
                Some(field(TD_REPORT10_LEN + 16, 48)),
            ),
        };

        // Signature data: ECDSA signature, attestation key, then certification data.
        let auth_len = r.u32("signature data length")? as usize;
        let auth = r.take(auth_len, "signature data")?;
        let mut a = Reader::new(auth);
        a.take(64, "quote signature")?;
        a.take(64, "attestation public key")?;
        let mut cert_type = a.u16("certification data type")?;
        let cert_len = a.u32("certification data size")? as usize;
        let mut cert = a.take(cert_len, "certification data")?;
        if cert_type == 6 {
            // QE report certification data: the QE report, its PCK signature, QE
            // authentication data, then the inner certification data.
            let mut q = Reader::new(cert);
            q.take(ENCLAVE_REPORT_LEN, "QE report")?;
            q.take(64, "QE report signature")?;
            let qe_auth_len = q.u16("QE authentication data size")? as usize;
            q.take(qe_auth_len, "QE authentication data")?;
            cert_type = q.u16("inner certification data type")?;
            let inner_len = q.u32("inner certification data size")? as usize;
            cert = q.take(inner_len, "inner certification data")?;
        }
        let pck_chain_pem = if cert_type == 5 {
            // Real quotes end the PEM chain with a NUL byte.
            let text = std::str::from_utf8(cert)
                .map_err(|_| malformed("PCK certificate chain is not UTF-8 PEM"))?;
            Some(text.trim_end_matches('\0').to_string())
        } else {
            None
        };

        Ok(DecodedTdQuote {
            version,
            attestation_key_type,
            tee_type,
            qe_svn,
            pce_svn,
            qe_vendor_id,
            user_data,
            report_kind,
            tee_tcb_svn: field(td10::TEE_TCB_SVN, 16),
            tee_tcb_svn2,
            mr_seam: field(td10::MR_SEAM, 48),
            mr_signer_seam: field(td10::MR_SIGNER_SEAM, 48),
            seam_attributes: field(td10::SEAM_ATTRIBUTES, 8),
            td_attributes: TdAttributes::from_raw(td_attributes),
            xfam: field(td10::XFAM, 8),
            mr_td: field(td10::MR_TD, 48),
            mr_config_id: field(td10::MR_CONFIG_ID, 48),
            mr_owner: field(td10::MR_OWNER, 48),
            mr_owner_config: field(td10::MR_OWNER_CONFIG, 48),
            rtmrs,
            report_data: field(td10::REPORT_DATA, 64),
            mr_service_td,
            signed_len,
            cert_data_type: cert_type,
            pck_chain_pem,
        })
    }

    /// Byte offset of the TD report body inside the raw quote.
    pub fn body_offset(&self) -> usize {
        if self.version == 5 {
            HEADER_LEN + 6
        } else {
            HEADER_LEN
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_short_inputs_are_errors() {
        for len in [0usize, 1, 47, 48, 100, 631] {
            let mut q = vec![0u8; len];
            if len >= 8 {
                q[0] = 4;
                q[4] = 0x81;
            }
            assert!(
                matches!(DecodedTdQuote::parse(&q), Err(TdxError::MalformedQuote(_))),
                "len {len}"
            );
        }
    }

    #[test]
    fn sgx_header_is_not_tdx() {
        let mut q = vec![0u8; 1200];
        q[0] = 3;
        assert!(matches!(
            DecodedTdQuote::parse(&q),
            Err(TdxError::NotTdx { tee_type: 0, .. })
        ));
    }

    #[test]
    fn huge_length_fields_do_not_panic() {
        let mut q = vec![0u8; HEADER_LEN + TD_REPORT10_LEN + 4];
        q[0] = 4;
        q[4] = 0x81;
        let n = q.len();
        q[n - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(DecodedTdQuote::parse(&q).is_err());
    }
}
