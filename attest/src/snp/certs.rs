//! AMD SEV-SNP certificates: ARK → ASK (or ASVK) → VCEK (or VLEK).
//!
//! We parse X.509 with `x509-cert`, but sign-check with `ring` over the *raw* TBS bytes
//! cut from the input (never a re-encoding), and read AMD's private extensions
//! (1.3.6.1.4.1.3704.1.x) by hand because their encoding varies between KDS versions.

use std::fmt;
use std::sync::OnceLock;

use der::{Decode, Encode, Reader, SliceReader};
use ring::signature::{self, UnparsedPublicKey};
use sha2::{Digest, Sha256};
use thiserror::Error;
use x509_cert::crl::CertificateList;
use x509_cert::Certificate as X509;

use super::crypto::ReportKey;
use super::report::Generation;

/// Problems with one certificate or CRL, or with building a chain to a trusted root.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CertError {
    #[error("certificate is not valid DER X.509: {0}")]
    Der(String),
    #[error("no certificate found: expected DER or PEM (\"-----BEGIN CERTIFICATE-----\")")]
    Empty,
    #[error("PEM block is not valid base64: {0}")]
    Pem(String),
    #[error("certificate '{cert}': AMD extension {oid} is malformed: {why}")]
    Extension {
        cert: String,
        oid: &'static str,
        why: String,
    },
    #[error("CRL is not valid DER: {0}")]
    Crl(String),
}

/// Why no chain to a trusted root could be built. Each names what to do about it.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ChainError {
    #[error("no VCEK/VLEK among the supplied certificates (supply the VEK with the report, e.g. --certs vcek.der)")]
    NoVek,
    #[error("VEK '{0}' does not hold an EC P-384 public key")]
    VekKey(String),
    #[error("no certificate issued '{cert}': its issuer '{issuer}' is neither supplied nor built in (supply the ASK/ASVK)")]
    IssuerMissing { cert: String, issuer: String },
    #[error("signature of '{cert}' does not verify under the key of '{issuer}'")]
    Signature { cert: String, issuer: String },
    #[error("'{cert}' is issued by root '{root}' (sha256:{fingerprint}), which the policy does not trust")]
    UntrustedRoot {
        cert: String,
        root: String,
        fingerprint: String,
    },
    #[error("no trusted root '{issuer}' for '{cert}' (it does not chain to any AMD root the policy lists)")]
    RootMissing { cert: String, issuer: String },
}

/// Public key of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// The RSAPublicKey DER (what `ring` takes).
    Rsa(Vec<u8>),
    /// Uncompressed SEC1 point (0x04 ‖ x ‖ y).
    EcP384(Vec<u8>),
    /// Any other key type, by algorithm OID.
    Other(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SigAlg {
    RsaPssSha384,
    EcdsaSha384,
    Other,
}

const OID_RSA: &str = "1.2.840.113549.1.1.1";
const OID_RSA_PSS: &str = "1.2.840.113549.1.1.10";
const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_SECP384R1: &str = "1.3.132.0.34";
const OID_ECDSA_SHA384: &str = "1.2.840.10045.4.3.3";

/// AMD VCEK/VLEK extension OIDs.
pub mod oid {
    pub const STRUCT_VERSION: &str = "1.3.6.1.4.1.3704.1.1";
    pub const PRODUCT_NAME: &str = "1.3.6.1.4.1.3704.1.2";
    pub const BL_SPL: &str = "1.3.6.1.4.1.3704.1.3.1";
    pub const TEE_SPL: &str = "1.3.6.1.4.1.3704.1.3.2";
    pub const SNP_SPL: &str = "1.3.6.1.4.1.3704.1.3.3";
    pub const UCODE_SPL: &str = "1.3.6.1.4.1.3704.1.3.8";
    pub const FMC_SPL: &str = "1.3.6.1.4.1.3704.1.3.9";
    pub const HW_ID: &str = "1.3.6.1.4.1.3704.1.4";
    pub const CSP_ID: &str = "1.3.6.1.4.1.3704.1.5";
}

/// The AMD extensions of a VCEK/VLEK (absent on ARK/ASK).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmdExtensions {
    pub product_name: Option<String>,
    pub bootloader: Option<u8>,
    pub tee: Option<u8>,
    pub snp: Option<u8>,
    pub microcode: Option<u8>,
    pub fmc: Option<u8>,
    /// HWID: the chip ID (64 bytes; 8 on Turin). VCEK only.
    pub hw_id: Option<Vec<u8>>,
    /// CSP_ID: the cloud provider a VLEK was issued to. VLEK only.
    pub csp_id: Option<String>,
}

impl AmdExtensions {
    pub fn has_tcb(&self) -> bool {
        self.bootloader.is_some()
            || self.tee.is_some()
            || self.snp.is_some()
            || self.microcode.is_some()
    }
}

/// A parsed certificate with what verification needs, precomputed.
#[derive(Clone, PartialEq, Eq)]
pub struct Cert {
    der: Vec<u8>,
    tbs_range: (usize, usize),
    subject_der: Vec<u8>,
    issuer_der: Vec<u8>,
    pub subject_cn: String,
    pub issuer_cn: String,
    pub serial: Vec<u8>,
    pub not_before: u64,
    pub not_after: u64,
    sig_alg: SigAlg,
    signature: Vec<u8>,
    pub key: PublicKey,
    pub amd: AmdExtensions,
    pub fingerprint: [u8; 32],
}

impl fmt::Debug for Cert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cert")
            .field("subject", &self.subject_cn)
            .field("issuer", &self.issuer_cn)
            .field("sha256", &hex::encode(self.fingerprint))
            .finish_non_exhaustive()
    }
}

fn der_err(e: impl fmt::Display) -> CertError {
    CertError::Der(e.to_string())
}

/// The raw TLV of the first element inside the outer SEQUENCE (the TBS part).
fn first_inner_tlv(der: &[u8]) -> Result<(usize, usize), CertError> {
    let mut reader = SliceReader::new(der).map_err(der_err)?;
    // Step over the outer SEQUENCE header; the reader then sits on the TBS TLV.
    der::Header::decode(&mut reader).map_err(der_err)?;
    let tbs = reader.tlv_bytes().map_err(der_err)?;
    // `tbs` borrows from `der`; turn it back into an offset range.
    let start = (tbs.as_ptr() as usize).wrapping_sub(der.as_ptr() as usize);
    let end = start
        .checked_add(tbs.len())
        .ok_or(CertError::Der("length".into()))?;
    if end > der.len() {
        return Err(CertError::Der("TBS outside certificate".into()));
    }
    Ok((start, end))
}

fn common_name(name: &x509_cert::name::Name) -> String {
    const CN: &str = "2.5.4.3";
    for rdn in name.0.iter() {
        for atv in rdn.0.iter() {
            if atv.oid.to_string() == CN {
                if let Ok(s) = atv.value.decode_as::<der::asn1::Utf8StringRef<'_>>() {
                    return s.as_str().to_string();
                }
                if let Ok(s) = atv.value.decode_as::<der::asn1::PrintableStringRef<'_>>() {
                    return s.as_str().to_string();
                }
                if let Ok(s) = atv.value.decode_as::<der::asn1::Ia5StringRef<'_>>() {
                    return s.as_str().to_string();
                }
            }
        }
    }
    name.to_string()
}

/// A DER INTEGER holding one SPL byte. Accepts the minimal encodings AMD uses
/// (`02 01 xx`, or `02 02 00 xx` for values ≥ 0x80).
fn spl_value(v: &[u8]) -> Result<u8, String> {
    match v {
        [0x02, 0x01, x] if *x < 0x80 => Ok(*x),
        [0x02, 0x02, 0x00, x] if *x >= 0x80 => Ok(*x),
        [0x02, 0x01, x] => Err(format!("negative INTEGER {x:#04x}")),
        _ => Err(format!(
            "expected a DER INTEGER 0..=255, got {}",
            hex::encode(v)
        )),
    }
}

/// HWID is the raw 64-byte (8 on Turin) chip ID in older KDS certificates, and an
/// OCTET STRING wrapping it in newer ones; both occur in the wild.
fn hw_id_value(v: &[u8]) -> Result<Vec<u8>, String> {
    if v.len() == 64 || v.len() == 8 {
        return Ok(v.to_vec());
    }
    match der::asn1::OctetStringRef::from_der(v) {
        Ok(inner) if matches!(inner.as_bytes().len(), 8 | 64) => Ok(inner.as_bytes().to_vec()),
        Ok(inner) => Err(format!(
            "wrapped chip ID has {} bytes (expected 64, or 8 on Turin)",
            inner.as_bytes().len()
        )),
        Err(_) => Err(format!(
            "{} bytes, neither a raw chip ID nor an OCTET STRING",
            v.len()
        )),
    }
}

fn string_value(v: &[u8]) -> Option<String> {
    if let Ok(s) = der::asn1::Ia5StringRef::from_der(v) {
        return Some(s.as_str().to_string());
    }
    if let Ok(s) = der::asn1::Utf8StringRef::from_der(v) {
        return Some(s.as_str().to_string());
    }
    std::str::from_utf8(v).ok().map(str::to_string)
}

impl Cert {
    /// Parse one DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, CertError> {
        let x = X509::from_der(der).map_err(der_err)?;
        let tbs_range = first_inner_tlv(der)?;
        let tbs = &x.tbs_certificate;
        let subject_cn = common_name(&tbs.subject);
        let spki = &tbs.subject_public_key_info;
        let key_bits = spki.subject_public_key.raw_bytes().to_vec();
        let key = match spki.algorithm.oid.to_string().as_str() {
            OID_RSA | OID_RSA_PSS => PublicKey::Rsa(key_bits),
            OID_EC_PUBLIC_KEY => {
                let curve = spki
                    .algorithm
                    .parameters
                    .as_ref()
                    .and_then(|p| p.decode_as::<der::asn1::ObjectIdentifier>().ok())
                    .map(|o| o.to_string());
                if curve.as_deref() == Some(OID_SECP384R1) && key_bits.len() == 97 {
                    PublicKey::EcP384(key_bits)
                } else {
                    PublicKey::Other(format!("EC on {}", curve.unwrap_or_default()))
                }
            }
            other => PublicKey::Other(other.to_string()),
        };
        let sig_alg = match x.signature_algorithm.oid.to_string().as_str() {
            OID_RSA_PSS => SigAlg::RsaPssSha384,
            OID_ECDSA_SHA384 => SigAlg::EcdsaSha384,
            _ => SigAlg::Other,
        };
        let mut amd = AmdExtensions::default();
        for ext in tbs.extensions.iter().flatten() {
            let id = ext.extn_id.to_string();
            let v = ext.extn_value.as_bytes();
            let bad = |oid: &'static str, why: String| CertError::Extension {
                cert: subject_cn.clone(),
                oid,
                why,
            };
            let spl = |oid: &'static str| spl_value(v).map_err(|w| bad(oid, w));
            match id.as_str() {
                oid::PRODUCT_NAME => amd.product_name = string_value(v),
                oid::BL_SPL => amd.bootloader = Some(spl(oid::BL_SPL)?),
                oid::TEE_SPL => amd.tee = Some(spl(oid::TEE_SPL)?),
                oid::SNP_SPL => amd.snp = Some(spl(oid::SNP_SPL)?),
                oid::UCODE_SPL => amd.microcode = Some(spl(oid::UCODE_SPL)?),
                oid::FMC_SPL => amd.fmc = Some(spl(oid::FMC_SPL)?),
                oid::HW_ID => amd.hw_id = Some(hw_id_value(v).map_err(|w| bad(oid::HW_ID, w))?),
                oid::CSP_ID => amd.csp_id = string_value(v),
                _ => {}
            }
        }
        let to_unix = |t: x509_cert::time::Time| t.to_unix_duration().as_secs();
        Ok(Cert {
            tbs_range,
            subject_der: tbs.subject.to_der().map_err(der_err)?,
            issuer_der: tbs.issuer.to_der().map_err(der_err)?,
            issuer_cn: common_name(&tbs.issuer),
            subject_cn,
            serial: tbs.serial_number.as_bytes().to_vec(),
            not_before: to_unix(tbs.validity.not_before),
            not_after: to_unix(tbs.validity.not_after),
            sig_alg,
            signature: x.signature.raw_bytes().to_vec(),
            key,
            amd,
            fingerprint: Sha256::digest(der).into(),
            der: der.to_vec(),
        })
    }

    pub fn der(&self) -> &[u8] {
        &self.der
    }

    fn tbs(&self) -> &[u8] {
        self.der
            .get(self.tbs_range.0..self.tbs_range.1)
            .unwrap_or(&[])
    }

    /// Issuer name equals subject name.
    pub fn is_self_issued(&self) -> bool {
        self.subject_der == self.issuer_der
    }

    /// Does `issuer`'s subject name equal this certificate's issuer name?
    pub fn named_issuer_is(&self, issuer: &Cert) -> bool {
        self.issuer_der == issuer.subject_der
    }

    /// Check this certificate's signature with `issuer`'s key.
    pub fn verify_signed_by(&self, issuer: &Cert) -> Result<(), ChainError> {
        if verify_sig(&issuer.key, self.sig_alg, self.tbs(), &self.signature) {
            Ok(())
        } else {
            Err(ChainError::Signature {
                cert: self.subject_cn.clone(),
                issuer: issuer.subject_cn.clone(),
            })
        }
    }

    pub fn fingerprint_hex(&self) -> String {
        hex::encode(self.fingerprint)
    }

    /// Is `at` (unix seconds) inside [notBefore, notAfter]?
    pub fn valid_at(&self, at: u64) -> bool {
        self.not_before <= at && at <= self.not_after
    }
}

fn verify_sig(key: &PublicKey, alg: SigAlg, msg: &[u8], sig: &[u8]) -> bool {
    match (key, alg) {
        (PublicKey::Rsa(k), SigAlg::RsaPssSha384) => {
            UnparsedPublicKey::new(&signature::RSA_PSS_2048_8192_SHA384, k)
                .verify(msg, sig)
                .is_ok()
        }
        (PublicKey::EcP384(k), SigAlg::EcdsaSha384) => {
            UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_ASN1, k)
                .verify(msg, sig)
                .is_ok()
        }
        _ => false,
    }
}

/// Split a file into DER blobs of one PEM label, or take it whole as DER.
pub(crate) fn pem_or_der_blobs(input: &[u8], label: &str) -> Result<Vec<Vec<u8>>, CertError> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let text = match std::str::from_utf8(input) {
        Ok(t) if t.contains("-----BEGIN ") => t,
        _ => {
            return if input.is_empty() {
                Err(CertError::Empty)
            } else {
                Ok(vec![input.to_vec()])
            }
        }
    };
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(b) = rest.find(&begin) {
        let after = &rest[b..];
        let Some(e) = after.find(&end) else {
            return Err(CertError::Pem(format!("unterminated {begin}")));
        };
        let block = &after[..e + end.len()];
        let (_, der) = der::pem::decode_vec(block.as_bytes())
            .map_err(|err| CertError::Pem(err.to_string()))?;
        out.push(der);
        rest = &after[e + end.len()..];
    }
    Ok(out)
}

/// The DER certificates in a file (one DER certificate, or PEM with one or more),
/// without parsing them: the verifier refuses malformed ones with a finding.
pub fn pem_or_der(input: &[u8]) -> Result<Vec<Vec<u8>>, CertError> {
    let blobs = pem_or_der_blobs(input, "CERTIFICATE")?;
    if blobs.is_empty() {
        return Err(CertError::Empty);
    }
    Ok(blobs)
}

/// The DER CRLs in a file (DER, or PEM "X509 CRL" blocks).
pub fn pem_or_der_crls(input: &[u8]) -> Result<Vec<Vec<u8>>, CertError> {
    let blobs = pem_or_der_blobs(input, "X509 CRL")?;
    if blobs.is_empty() {
        return Err(CertError::Crl(
            "no CRL found: expected DER or PEM (\"-----BEGIN X509 CRL-----\")".into(),
        ));
    }
    Ok(blobs)
}

/// One DER certificate as a PEM block.
pub fn der_to_pem(der: &[u8]) -> String {
    der::pem::encode_string("CERTIFICATE", der::pem::LineEnding::LF, der).unwrap_or_default()
}

/// Parse a file of certificates: one DER certificate, or PEM with one or more.
pub fn parse_certs(input: &[u8]) -> Result<Vec<Cert>, CertError> {
    let blobs = pem_or_der_blobs(input, "CERTIFICATE")?;
    if blobs.is_empty() {
        return Err(CertError::Empty);
    }
    blobs.iter().map(|b| Cert::from_der(b)).collect()
}

/// A certificate revocation list (AMD publishes one per generation, signed by the ARK).
#[derive(Debug, Clone)]
pub struct Crl {
    tbs: Vec<u8>,
    issuer_der: Vec<u8>,
    pub issuer_cn: String,
    sig_alg: SigAlg,
    signature: Vec<u8>,
    pub this_update: u64,
    pub next_update: Option<u64>,
    pub revoked_serials: Vec<Vec<u8>>,
}

impl Crl {
    pub fn from_der(der: &[u8]) -> Result<Self, CertError> {
        let crl_err = |e: der::Error| CertError::Crl(e.to_string());
        let list = CertificateList::from_der(der).map_err(crl_err)?;
        let (s, e) = first_inner_tlv(der).map_err(|e| CertError::Crl(e.to_string()))?;
        let tbs = &list.tbs_cert_list;
        Ok(Crl {
            tbs: der.get(s..e).unwrap_or(&[]).to_vec(),
            issuer_der: tbs.issuer.to_der().map_err(crl_err)?,
            issuer_cn: common_name(&tbs.issuer),
            sig_alg: match list.signature_algorithm.oid.to_string().as_str() {
                OID_RSA_PSS => SigAlg::RsaPssSha384,
                OID_ECDSA_SHA384 => SigAlg::EcdsaSha384,
                _ => SigAlg::Other,
            },
            signature: list.signature.raw_bytes().to_vec(),
            this_update: tbs.this_update.to_unix_duration().as_secs(),
            next_update: tbs.next_update.map(|t| t.to_unix_duration().as_secs()),
            revoked_serials: tbs
                .revoked_certificates
                .iter()
                .flatten()
                .map(|r| r.serial_number.as_bytes().to_vec())
                .collect(),
        })
    }

    /// Parse a CRL file (DER, or PEM "X509 CRL").
    pub fn parse_file(input: &[u8]) -> Result<Vec<Crl>, CertError> {
        pem_or_der_blobs(input, "X509 CRL")?
            .iter()
            .map(|b| Crl::from_der(b))
            .collect()
    }

    /// Was this CRL issued (and signed) by `issuer`?
    pub fn issued_by(&self, issuer: &Cert) -> bool {
        self.issuer_der == issuer.subject_der
            && verify_sig(&issuer.key, self.sig_alg, &self.tbs, &self.signature)
    }

    pub fn revokes(&self, cert: &Cert) -> bool {
        self.revoked_serials.contains(&cert.serial)
    }
}

/// Is the VEK a VCEK (per-chip) or a VLEK (per cloud provider, issued via the ASVK)?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VekKind {
    Vcek,
    Vlek,
}

impl fmt::Display for VekKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VekKind::Vcek => "VCEK",
            VekKind::Vlek => "VLEK",
        })
    }
}

/// A trusted ARK.
#[derive(Debug, Clone)]
pub struct TrustedArk {
    pub cert: Cert,
    /// Known for AMD's builtin roots; taken from the VEK's product name otherwise.
    pub generation: Option<Generation>,
    /// For messages: "AMD Milan ARK", "listed root sha256:…".
    pub label: String,
    pub builtin: bool,
}

/// The roots a verifier trusts, plus known intermediates (AMD's builtin ASKs).
#[derive(Debug, Clone, Default)]
pub struct TrustAnchors {
    pub roots: Vec<TrustedArk>,
    pub intermediates: Vec<Cert>,
    /// Self-signed roots supplied with evidence are trusted if their SHA-256 is here.
    pub fingerprints: Vec<[u8; 32]>,
}

struct Builtin {
    gen: Generation,
    ark: Cert,
    ask: Cert,
}

fn builtin_amd() -> &'static [Builtin] {
    static CELL: OnceLock<Vec<Builtin>> = OnceLock::new();
    CELL.get_or_init(|| {
        use sev::certs::snp::builtin::{genoa, milan, turin};
        let sets = [
            (Generation::Milan, milan::ARK, milan::ASK),
            (Generation::Genoa, genoa::ARK, genoa::ASK),
            (Generation::Turin, turin::ARK, turin::ASK),
        ];
        // The builtin PEMs ship inside the sev crate and are tested there and in our
        // tests; one failing to parse would drop that generation, not panic.
        sets.into_iter()
            .filter_map(|(gen, ark, ask)| {
                let ark = parse_certs(ark).ok()?.into_iter().next()?;
                let ask = parse_certs(ask).ok()?.into_iter().next()?;
                Some(Builtin { gen, ark, ask })
            })
            .collect()
    })
}

impl TrustAnchors {
    /// AMD's Milan, Genoa and Turin ARKs (with their ASKs as known intermediates).
    pub fn builtin_amd() -> Self {
        let mut t = TrustAnchors::default();
        t.add_builtin(None);
        t
    }

    /// Add AMD's builtin ARK/ASK for one generation, or all when `None`.
    pub fn add_builtin(&mut self, only: Option<Generation>) {
        for b in builtin_amd() {
            if only.is_some_and(|g| g != b.gen) {
                continue;
            }
            self.roots.push(TrustedArk {
                cert: b.ark.clone(),
                generation: Some(b.gen),
                label: format!("AMD {} ARK", b.gen),
                builtin: true,
            });
            self.intermediates.push(b.ask.clone());
        }
    }

    /// Trust a root given by certificate (e.g. a persisted simulator root).
    pub fn add_root(&mut self, cert: Cert) {
        let label = format!(
            "listed root '{}' sha256:{}",
            cert.subject_cn,
            cert.fingerprint_hex()
        );
        self.roots.push(TrustedArk {
            cert,
            generation: None,
            label,
            builtin: false,
        });
    }

    /// Trust a self-signed root supplied with the evidence when its DER hashes to `fp`.
    pub fn allow_fingerprint(&mut self, fp: [u8; 32]) {
        self.fingerprints.push(fp);
    }

    /// Build and check VEK → ASK/ASVK → ARK from `supplied` certificates (any order,
    /// may include the ASK and ARK). Time and revocation are checked separately, so the
    /// result can be cached.
    pub fn verify_chain(&self, supplied: &[Cert]) -> Result<VerifiedChain, ChainError> {
        let vek = find_vek(supplied)?;
        if !matches!(vek.key, PublicKey::EcP384(_)) {
            return Err(ChainError::VekKey(vek.subject_cn.clone()));
        }
        // Roots: trusted ones, plus supplied self-issued ones listed by fingerprint.
        let mut roots: Vec<TrustedArk> = self.roots.clone();
        let mut untrusted_roots: Vec<&Cert> = Vec::new();
        for c in supplied.iter().filter(|c| c.is_self_issued()) {
            if roots.iter().any(|r| r.cert.der == c.der) {
                continue;
            }
            if self.fingerprints.contains(&c.fingerprint) {
                roots.push(TrustedArk {
                    cert: c.clone(),
                    generation: None,
                    label: format!(
                        "listed root '{}' sha256:{}",
                        c.subject_cn,
                        c.fingerprint_hex()
                    ),
                    builtin: false,
                });
            } else {
                untrusted_roots.push(c);
            }
        }
        let intermediates = supplied
            .iter()
            .filter(|c| !c.is_self_issued() && c.der != vek.der)
            .chain(self.intermediates.iter());

        // Several candidate paths may fail; report the most telling reason.
        let rank = |e: &ChainError| match e {
            ChainError::Signature { .. } => 3,
            ChainError::UntrustedRoot { .. } => 2,
            ChainError::RootMissing { .. } => 1,
            _ => 0,
        };
        let mut first_error: Option<ChainError> = None;
        let mut keep = |e: ChainError| {
            if first_error.as_ref().is_none_or(|f| rank(&e) > rank(f)) {
                first_error = Some(e);
            }
        };
        for inter in intermediates.filter(|i| vek.named_issuer_is(i)) {
            if let Err(e) = vek.verify_signed_by(inter) {
                keep(e);
                continue;
            }
            let mut found_root = false;
            for root in roots.iter().filter(|r| inter.named_issuer_is(&r.cert)) {
                found_root = true;
                if let Err(e) = inter.verify_signed_by(&root.cert) {
                    keep(e);
                    continue;
                }
                if let Err(e) = root.cert.verify_signed_by(&root.cert) {
                    keep(e);
                    continue;
                }
                let generation = root.generation.or_else(|| {
                    vek.amd
                        .product_name
                        .as_deref()
                        .and_then(Generation::from_product_name)
                });
                let kind = if vek.amd.csp_id.is_some()
                    || vek.subject_cn.contains("VLEK")
                    || inter.subject_cn.contains("VLEK")
                {
                    VekKind::Vlek
                } else {
                    VekKind::Vcek
                };
                let report_key = match &vek.key {
                    PublicKey::EcP384(point) => ReportKey::new(point),
                    _ => return Err(ChainError::VekKey(vek.subject_cn.clone())),
                };
                return Ok(VerifiedChain {
                    report_key,
                    vek: vek.clone(),
                    intermediate: inter.clone(),
                    root: root.cert.clone(),
                    root_label: root.label.clone(),
                    root_builtin: root.builtin,
                    generation,
                    kind,
                });
            }
            if !found_root {
                if let Some(r) = untrusted_roots.iter().find(|r| inter.named_issuer_is(r)) {
                    keep(ChainError::UntrustedRoot {
                        cert: inter.subject_cn.clone(),
                        root: r.subject_cn.clone(),
                        fingerprint: r.fingerprint_hex(),
                    });
                } else {
                    keep(ChainError::RootMissing {
                        cert: inter.subject_cn.clone(),
                        issuer: inter.issuer_cn.clone(),
                    });
                }
            }
        }
        Err(first_error.unwrap_or_else(|| ChainError::IssuerMissing {
            cert: vek.subject_cn.clone(),
            issuer: vek.issuer_cn.clone(),
        }))
    }
}

/// The leaf: not self-issued, and not the issuer of another supplied certificate.
/// Among several, prefer one that carries AMD's VEK extensions.
fn find_vek(supplied: &[Cert]) -> Result<&Cert, ChainError> {
    let leaves: Vec<&Cert> = supplied
        .iter()
        .filter(|c| !c.is_self_issued())
        .filter(|c| {
            !supplied
                .iter()
                .any(|o| o.der != c.der && o.named_issuer_is(c) && !o.is_self_issued())
        })
        .collect();
    // An ASK/ARK-only bundle has RSA leaves without AMD's extensions: that is "no VEK",
    // not "a VEK with the wrong key".
    leaves
        .iter()
        .find(|c| c.amd.has_tcb() || c.amd.hw_id.is_some())
        .or_else(|| {
            leaves
                .iter()
                .find(|c| matches!(c.key, PublicKey::EcP384(_)))
        })
        .copied()
        .ok_or(ChainError::NoVek)
}

/// A chain that verified up to a trusted ARK (signatures only; see `check_time`).
#[derive(Debug, Clone)]
pub struct VerifiedChain {
    /// The VEK's key, parsed once for the report-signature hot path.
    pub report_key: ReportKey,
    pub vek: Cert,
    /// ASK for a VCEK, ASVK for a VLEK.
    pub intermediate: Cert,
    pub root: Cert,
    pub root_label: String,
    pub root_builtin: bool,
    pub generation: Option<Generation>,
    pub kind: VekKind,
}

impl VerifiedChain {
    pub fn certs(&self) -> [&Cert; 3] {
        [&self.vek, &self.intermediate, &self.root]
    }

    /// The VEK's uncompressed P-384 point.
    pub fn vek_point(&self) -> &[u8] {
        match &self.vek.key {
            PublicKey::EcP384(k) => k,
            _ => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spl_values_accept_amd_encodings_only() {
        assert_eq!(spl_value(&[0x02, 0x01, 0x08]), Ok(8));
        assert_eq!(spl_value(&[0x02, 0x02, 0x00, 0xA9]), Ok(0xA9));
        assert!(spl_value(&[0x02, 0x01, 0x80]).is_err(), "negative");
        assert!(spl_value(&[0x02, 0x02, 0x01, 0x00]).is_err(), "> 255");
        assert!(spl_value(&[0x04, 0x01, 0x08]).is_err(), "not an INTEGER");
        assert!(spl_value(&[]).is_err());
    }

    #[test]
    fn hw_id_raw_or_wrapped() {
        let raw: Vec<u8> = (0..64).collect();
        assert_eq!(hw_id_value(&raw).unwrap(), raw);
        let mut wrapped = vec![0x04, 0x40];
        wrapped.extend_from_slice(&raw);
        assert_eq!(hw_id_value(&wrapped).unwrap(), raw);
        assert_eq!(hw_id_value(&[1; 8]).unwrap(), vec![1; 8]);
        assert!(hw_id_value(&[0x04, 0x03, 1, 2, 3])
            .unwrap_err()
            .contains("3 bytes"));
        assert!(hw_id_value(&[0xFF; 20]).is_err());
    }

    #[test]
    fn pem_and_der_inputs() {
        assert_eq!(pem_or_der(b""), Err(CertError::Empty));
        assert_eq!(pem_or_der(b"\x30\x03\x02\x01\x01").unwrap().len(), 1);
        let unterminated = b"-----BEGIN CERTIFICATE-----\nMIIB\n";
        assert!(matches!(pem_or_der(unterminated), Err(CertError::Pem(_))));
        let other_label = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert_eq!(pem_or_der(other_label), Err(CertError::Empty));
        assert!(matches!(
            pem_or_der_crls(other_label),
            Err(CertError::Crl(_))
        ));
        assert!(parse_certs(b"\x30\x03\x02\x01\x01").is_err());
    }

    #[test]
    fn builtin_roots_are_self_signed_and_sign_their_asks() {
        let t = TrustAnchors::builtin_amd();
        assert_eq!(t.roots.len(), 3);
        for (root, ask) in t.roots.iter().zip(&t.intermediates) {
            assert!(
                root.cert.verify_signed_by(&root.cert).is_ok(),
                "{}",
                root.label
            );
            assert!(
                ask.verify_signed_by(&root.cert).is_ok(),
                "{}",
                ask.subject_cn
            );
            assert!(ask.named_issuer_is(&root.cert));
            assert!(matches!(root.cert.key, PublicKey::Rsa(_)));
        }
        // Cross-generation signatures never verify.
        assert!(t.intermediates[0]
            .verify_signed_by(&t.roots[1].cert)
            .is_err());
    }
}
