//! The evidence wire format: how a guest's evidence travels in `status.evidence` (and a
//! migration's `status.targetEvidence`), for the node plugin that writes it and for every
//! reader (the operator's verifier, `kubectl cvm attest` and `report`).
//!
//! It lives in one place so that writer and readers cannot drift apart: the collateral
//! names, base64 fields, the certificate-chain parser and the challenge a report must
//! answer are defined here only, and a status one reader accepts the others accept too.
//!
//! It sits in `cvm-crds` rather than `cvm-attest` because it reads and writes the API's
//! [`Evidence`] type, while `cvm-attest` stays free of Kubernetes types (the guest agent
//! links it).
//!
//! Error messages name the field inside the evidence object (`report`, `certChain`, …);
//! each reader prefixes where that object sits (`evidence.`, `status.evidence.`).

use std::collections::BTreeMap;

use base64::Engine as _;
use cvm_attest::binding;
use cvm_attest::snp::certs::{self, CertError};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::cvm::Evidence;
use crate::EvidenceFormat;

/// Collateral key of a TDX quote: dcap-qvl `QuoteCollateralV3` JSON, the input of
/// `cvm_attest::tdx::verify_quote`.
pub const COLLATERAL_TDX_QUOTE_V3: &str = "quoteCollateralV3";

/// Why a field of the evidence object cannot be read. Each names the field, so a user
/// knows which part of the status to look at.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum WireError {
    #[error("report is not valid base64: {0}")]
    Report(base64::DecodeError),
    #[error("instanceKey is not valid base64: {0}")]
    InstanceKey(base64::DecodeError),
    #[error("certChain: {0}")]
    CertChain(CertError),
    #[error(
        "collateral has no {COLLATERAL_TDX_QUOTE_V3}: a TDX quote cannot be verified \
         without its collateral, which the node plugin must supply"
    )]
    MissingTdxCollateral,
    #[error("certificate table ends inside an entry (a table is 24-byte entries ending in a zero entry)")]
    CertTableTruncated,
    #[error("certificate table entry {offset}+{len} is out of bounds")]
    CertTableOutOfBounds { offset: usize, len: usize },
}

/// What the evidence must answer. The guest, not the plugin, turns it into report data:
/// it adds its own instance key (`cvm_attest::binding`), so the host cannot make one guest
/// answer as another. `nonce` is the user's hex nonce to echo in the status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub binding: binding::Challenge,
    pub nonce: Option<String>,
}

impl Challenge {
    /// The hash preimage a verifier expects the report data to be SHA-512 of, for the
    /// instance key the evidence names (docs/evidence-binding.md).
    pub fn preimage_for(&self, instance_key: &[u8]) -> Vec<u8> {
        self.binding.preimage(&binding::key_id(instance_key))
    }
}

/// Evidence as a platform produced it, before it is encoded into the CVM status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEvidence {
    pub format: EvidenceFormat,
    /// Report, quote or launch measurement bytes.
    pub report: Vec<u8>,
    /// PEM certificates (VCEK, ASK, ARK; or the PCK chain).
    pub cert_chain: Option<String>,
    /// Named collateral texts (see [`COLLATERAL_TDX_QUOTE_V3`]).
    pub collateral: Vec<(String, String)>,
    /// The measurement the signed evidence states.
    pub measurement: Vec<u8>,
    /// Public key of the guest instance that produced the report (bound in its report data).
    pub instance_key: Option<Vec<u8>>,
}

/// The challenge a CVM's evidence must answer: the CVM's UID, the owner's nonce and the
/// live migration that last moved it (`cvm_attest::binding`). `None` when the nonce is not
/// hex (the API server's schema refuses that, so only a hand-made object gets here).
pub fn challenge_for(nonce: Option<&str>, uid: &str, epoch: Option<&str>) -> Option<Challenge> {
    let bytes = match nonce {
        Some(n) => Some(crate::wellknown::decode_hex(n)?),
        None => None,
    };
    Some(Challenge {
        binding: binding::Challenge::cvm(uid, bytes.as_deref()).after_migration(epoch),
        nonce: nonce.map(str::to_string),
    })
}

/// The challenge a receiving guest's evidence answers in a live migration: the
/// migration's UID, and no nonce to echo.
pub fn migration_challenge_for(migration_uid: &str) -> Challenge {
    Challenge {
        binding: binding::Challenge::migration(migration_uid),
        nonce: None,
    }
}

/// `status.evidence` for raw evidence collected at `now`.
pub fn encode(raw: &RawEvidence, challenge: &Challenge, now: Time) -> Evidence {
    Evidence {
        format: raw.format,
        report: base64::engine::general_purpose::STANDARD.encode(&raw.report),
        cert_chain: raw.cert_chain.clone(),
        collateral: raw
            .collateral
            .iter()
            .cloned()
            .collect::<BTreeMap<String, String>>(),
        nonce: challenge.nonce.clone(),
        collected_at: now,
        launch_measurement: (!raw.measurement.is_empty()).then(|| hex::encode(&raw.measurement)),
        instance_key: raw
            .instance_key
            .as_ref()
            .map(|k| base64::engine::general_purpose::STANDARD.encode(k)),
        epoch: (!challenge.binding.epoch.is_empty()).then(|| challenge.binding.epoch.clone()),
    }
}

/// The raw report, quote or launch measurement bytes of `report`.
pub fn decode_report(e: &Evidence) -> Result<Vec<u8>, WireError> {
    base64::engine::general_purpose::STANDARD
        .decode(e.report.trim())
        .map_err(WireError::Report)
}

/// The guest instance's public key (`instanceKey`), `None` when the evidence names none.
pub fn decode_instance_key(e: &Evidence) -> Result<Option<Vec<u8>>, WireError> {
    e.instance_key
        .as_deref()
        .map(|k| {
            base64::engine::general_purpose::STANDARD
                .decode(k.trim())
                .map_err(WireError::InstanceKey)
        })
        .transpose()
}

/// The DER certificates of `certChain` (empty when absent), each checked to be X.509
/// (see [`parse_cert_chain`]).
pub fn cert_chain(e: &Evidence) -> Result<Vec<Vec<u8>>, WireError> {
    match e.cert_chain.as_deref() {
        Some(pem) => parse_cert_chain(pem.as_bytes()).map_err(WireError::CertChain),
        None => Ok(Vec::new()),
    }
}

/// The one certificate-chain parser of every reader: one DER certificate, or PEM text
/// with one or more `CERTIFICATE` blocks (text around them is ignored). Every certificate
/// must parse as X.509: a chain with one bad certificate is refused whole, so no reader
/// goes on to verify a chain another would have refused.
pub fn parse_cert_chain(input: &[u8]) -> Result<Vec<Vec<u8>>, CertError> {
    Ok(certs::parse_certs(input)?
        .iter()
        .map(|c| c.der().to_vec())
        .collect())
}

/// The TDX quote's collateral (dcap-qvl `QuoteCollateralV3` JSON), under
/// [`COLLATERAL_TDX_QUOTE_V3`] only.
pub fn tdx_collateral(e: &Evidence) -> Result<&str, WireError> {
    e.collateral
        .get(COLLATERAL_TDX_QUOTE_V3)
        .map(String::as_str)
        .ok_or(WireError::MissingTdxCollateral)
}

/// The SEV certificate table GUIDs of VCEK, ASK and ARK (GHCB spec, extended guest
/// request), in the order a PEM chain lists them.
const SNP_CERT_GUIDS: [&str; 3] = [
    "63da758d-e664-4564-adc5-f4b93be8accd",
    "4ab7b379-bbac-4fe4-a02f-05aef327c782",
    "c0b406a4-a803-4952-9743-3fb6014cd0ae",
];

fn guid_bytes(text: &str, mixed_endian: bool) -> Option<[u8; 16]> {
    let hex_text: String = text.chars().filter(|c| *c != '-').collect();
    let mut b: [u8; 16] = hex::decode(hex_text).ok()?.try_into().ok()?;
    if mixed_endian {
        b[0..4].reverse();
        b[4..6].reverse();
        b[6..8].reverse();
    }
    Some(b)
}

/// The VCEK, ASK and ARK of an SNP certificate table (configfs-tsm `auxblob`) as the PEM
/// `certChain`, in that order; certificates the table does not hold are left out.
pub fn snp_cert_table_pem(table: &[u8]) -> Result<String, WireError> {
    let mut found: BTreeMap<usize, Vec<u8>> = BTreeMap::new();
    for entry in table.chunks(24) {
        if entry.len() < 24 {
            return Err(WireError::CertTableTruncated);
        }
        if entry.iter().all(|b| *b == 0) {
            break;
        }
        let guid = &entry[..16];
        let offset = u32::from_le_bytes([entry[16], entry[17], entry[18], entry[19]]) as usize;
        let len = u32::from_le_bytes([entry[20], entry[21], entry[22], entry[23]]) as usize;
        // EFI GUIDs are stored mixed-endian; accept the plain byte order too.
        let slot = SNP_CERT_GUIDS.iter().position(|g| {
            [true, false]
                .iter()
                .any(|m| guid_bytes(g, *m).is_some_and(|b| b == guid))
        });
        let Some(slot) = slot else { continue };
        let cert = offset
            .checked_add(len)
            .and_then(|end| table.get(offset..end))
            .ok_or(WireError::CertTableOutOfBounds { offset, len })?;
        if !cert.is_empty() {
            found.insert(slot, cert.to_vec());
        }
    }
    Ok(found.values().map(|der| certs::der_to_pem(der)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cvm_attest::sim::snp::{SimSnpConfig, SimSnpPlatform};

    #[test]
    fn the_challenge_carries_uid_and_nonce() {
        let c = challenge_for(Some("00ff"), "uid-1", None).unwrap();
        assert_eq!(c.binding, binding::Challenge::cvm("uid-1", Some(&[0, 255])));
        assert_eq!(c.nonce.as_deref(), Some("00ff"));
        let u = challenge_for(None, "uid-1", Some("m-1")).unwrap();
        assert_eq!(
            u.binding,
            binding::Challenge::cvm("uid-1", None).after_migration(Some("m-1"))
        );
        assert_eq!(u.nonce, None);
        assert!(challenge_for(Some("xyz"), "uid-1", None).is_none());
        let m = migration_challenge_for("mig-1");
        assert_eq!(m.binding, binding::Challenge::migration("mig-1"));
        assert_eq!(m.nonce, None);
        assert_eq!(
            c.preimage_for(b"key"),
            c.binding.preimage(&binding::key_id(b"key"))
        );
    }

    fn raw() -> RawEvidence {
        RawEvidence {
            format: EvidenceFormat::TdxQuote,
            report: vec![1, 2, 3, 250],
            cert_chain: None,
            collateral: vec![(COLLATERAL_TDX_QUOTE_V3.into(), "{}".into())],
            measurement: vec![0xab; 48],
            instance_key: Some(vec![9; 32]),
        }
    }

    fn epoch0() -> Time {
        Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
    }

    #[test]
    fn encode_round_trips() {
        let raw = raw();
        let c = challenge_for(Some("01"), "u", Some("m-2")).unwrap();
        let e = encode(&raw, &c, epoch0());
        assert_eq!(e.epoch.as_deref(), Some("m-2"));
        assert_eq!(decode_report(&e).unwrap(), raw.report);
        assert_eq!(e.nonce.as_deref(), Some("01"));
        assert_eq!(tdx_collateral(&e), Ok("{}"));
        assert_eq!(e.launch_measurement, Some("ab".repeat(48)));
        assert_eq!(
            e.instance_key,
            Some(base64::engine::general_purpose::STANDARD.encode([9u8; 32]))
        );
        assert_eq!(decode_instance_key(&e), Ok(Some(vec![9; 32])));
        assert_eq!(cert_chain(&e), Ok(Vec::new()));
    }

    #[test]
    fn undecodable_fields_are_named() {
        let c = challenge_for(None, "u", None).unwrap();
        let mut e = encode(&raw(), &c, epoch0());
        e.report = "not base64!".into();
        e.instance_key = Some("nor this!".into());
        e.collateral.clear();
        e.cert_chain = Some("no certificate here".into());
        fn msg<T: std::fmt::Debug>(r: Result<T, WireError>) -> String {
            r.unwrap_err().to_string()
        }
        assert!(msg(decode_report(&e)).starts_with("report is not valid base64"));
        assert!(msg(decode_instance_key(&e)).starts_with("instanceKey is not valid base64"));
        assert!(msg(tdx_collateral(&e)).contains(COLLATERAL_TDX_QUOTE_V3));
        // Text without a PEM block is taken as DER, and is not X.509.
        assert!(matches!(
            cert_chain(&e),
            Err(WireError::CertChain(CertError::Der(_)))
        ));
        e.cert_chain = Some(String::new());
        assert_eq!(cert_chain(&e), Err(WireError::CertChain(CertError::Empty)));
        // Whitespace around base64 (a hand-edited status) is not an error.
        e.report = " AQID+g==\n".into();
        assert_eq!(decode_report(&e), Ok(vec![1, 2, 3, 250]));
        e.instance_key = None;
        assert_eq!(decode_instance_key(&e), Ok(None));
    }

    /// The one parser on PEM, DER and their concatenations; where it is stricter than
    /// `certs::pem_or_der` (which `kubectl cvm attest` used), that is asserted too.
    #[test]
    fn the_chain_parser_on_pem_der_and_concatenations() {
        let p = SimSnpPlatform::generate(SimSnpConfig::default()).unwrap();
        let (ark, ask) = (p.ark_der().to_vec(), p.ask_der().to_vec());
        let pem = |d: &[u8]| certs::der_to_pem(d);

        // One DER certificate; one PEM block; several PEM blocks, with text around them.
        assert_eq!(parse_cert_chain(&ark), Ok(vec![ark.clone()]));
        assert_eq!(
            parse_cert_chain(pem(&ark).as_bytes()),
            Ok(vec![ark.clone()])
        );
        let two = format!("# ASK\n{}\n# ARK\n{}trailer\n", pem(&ask), pem(&ark));
        assert_eq!(
            parse_cert_chain(two.as_bytes()),
            Ok(vec![ask.clone(), ark.clone()])
        );

        // Two DER certificates back to back are not one DER certificate.
        let der_cat = [ask.clone(), ark.clone()].concat();
        assert!(matches!(parse_cert_chain(&der_cat), Err(CertError::Der(_))));
        // PEM followed by DER is not text, so it is read as one DER blob, and refused.
        let mut mixed = pem(&ask).into_bytes();
        mixed.extend_from_slice(&ark);
        assert!(matches!(parse_cert_chain(&mixed), Err(CertError::Der(_))));

        // Nothing, or no CERTIFICATE block, is no chain; broken PEM is refused.
        assert_eq!(parse_cert_chain(b""), Err(CertError::Empty));
        let key = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert_eq!(parse_cert_chain(key), Err(CertError::Empty));
        let unterminated = b"-----BEGIN CERTIFICATE-----\nMIIB\n";
        assert!(matches!(
            parse_cert_chain(unterminated),
            Err(CertError::Pem(_))
        ));

        // Stricter than splitting alone: a well-formed PEM block that is not X.509
        // refuses the whole chain, good certificates around it notwithstanding.
        let not_x509 = [0x30, 0x03, 0x02, 0x01, 0x01];
        let with_bad = format!("{}{}", pem(&ask), pem(&not_x509));
        assert_eq!(
            certs::pem_or_der(with_bad.as_bytes()).map(|v| v.len()),
            Ok(2)
        );
        assert!(matches!(
            parse_cert_chain(with_bad.as_bytes()),
            Err(CertError::Der(_))
        ));
        assert!(certs::pem_or_der(&not_x509).is_ok());
        assert!(parse_cert_chain(&not_x509).is_err());
    }

    #[test]
    fn cert_table_gives_vcek_ask_ark_in_order() {
        // Entries listed ARK, VCEK (mixed-endian GUIDs), then the terminator; ASK absent.
        let ark = vec![0x30, 0x03, 0x02, 0x01, 0x0a];
        let vcek = vec![0x30, 0x03, 0x02, 0x01, 0x0b];
        let header = 3 * 24;
        let mut t = Vec::new();
        for (guid, off, len) in [
            (SNP_CERT_GUIDS[2], header, ark.len()),
            (SNP_CERT_GUIDS[0], header + ark.len(), vcek.len()),
        ] {
            t.extend(guid_bytes(guid, true).unwrap());
            t.extend((off as u32).to_le_bytes());
            t.extend((len as u32).to_le_bytes());
        }
        t.extend([0u8; 24]);
        t.extend(&ark);
        t.extend(&vcek);
        let pem = snp_cert_table_pem(&t).unwrap();
        let blocks: Vec<&str> = pem.matches("BEGIN CERTIFICATE").collect();
        assert_eq!(blocks.len(), 2, "{pem}");
        // VCEK (…0b) comes before ARK (…0a).
        assert!(pem.starts_with(&certs::der_to_pem(&vcek)), "{pem}");
        assert!(pem.ends_with(&certs::der_to_pem(&ark)), "{pem}");

        let mut bad = t.clone();
        bad[16..20].copy_from_slice(&10_000u32.to_le_bytes());
        assert!(snp_cert_table_pem(&bad)
            .unwrap_err()
            .to_string()
            .contains("out of bounds"));
        assert_eq!(
            snp_cert_table_pem(&t[..20]),
            Err(WireError::CertTableTruncated)
        );
        assert!(snp_cert_table_pem(&t[..30]).is_err());
        // Plain (not mixed-endian) GUID byte order is read too.
        let mut plain = t.clone();
        plain[24..40].copy_from_slice(&guid_bytes(SNP_CERT_GUIDS[0], false).unwrap());
        assert_eq!(snp_cert_table_pem(&plain), Ok(pem));
    }
}
