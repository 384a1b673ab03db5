//! A simulated TDX platform: an Intel-shaped PKI and quotes in the exact DCAP layout.
//!
//! It generates its own chain, shaped like Intel's (all ECDSA P-256):
//!
//! ```text
//! sim root CA ──┬── sim PCK Platform CA ── PCK leaf (SGX extension: FMSPC, TCB, PCEID…)
//!               └── sim TCB signing cert (signs TCB info and QE identity)
//! ```
//!
//! plus matching collateral (TCB info, QE identity, root and PCK CRLs) in dcap-qvl's
//! `QuoteCollateralV3` JSON, and issues TDX quote v4 with a QE report signed by the
//! PCK key and the TD report signed by a QE attestation key, as real quotes are.
//!
//! Its quotes go through exactly the same verification as real ones ([`super::verify_quote`]):
//! dcap-qvl accepts a caller-supplied root, and the verifier supplies the sim root only
//! when the policy lists its fingerprint ([`SimTdxPlatform::trusted_root`]). The
//! default policy trusts Intel's root alone, so it refuses every simulated quote with
//! an `untrusted-root` finding.
//!
//! The header carries Intel's QE vendor ID because the quote format and dcap-qvl
//! require it; it identifies a quoting-enclave format, not a key, and trust comes
//! only from the root.

use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CustomExtension, DnType,
    IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING};
use sha2::{Digest, Sha256, Sha384};
use time::OffsetDateTime;

use super::policy::{TdxPolicy, TdxTcbStatus, TrustedRoot};
use super::quote::{
    td10, td_attr, ATTESTATION_KEY_TYPE_ECDSA_P256, ENCLAVE_REPORT_LEN, HEADER_LEN,
    INTEL_QE_VENDOR_ID, TD_REPORT10_LEN, TEE_TYPE_TDX,
};
use super::TdxError;

/// FMSPC of the simulated platform (family-model-stepping-platform-custom SKU).
pub const SIM_FMSPC: [u8; 6] = [0x20, 0xC0, 0xFF, 0xEE, 0x00, 0x00];
const SIM_PCE_ID: [u8; 2] = [0, 0];
const SIM_PCE_SVN: u16 = 13;
const SIM_CPU_SVN: [u8; 16] = [3, 3, 2, 2, 4, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0];
/// TEE_TCB_SVN with module version 0 (byte 1), so the TCB levels judge every byte.
const SIM_TEE_TCB_SVN: [u8; 16] = [6, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
const SIM_QE_PROD_ID: u16 = 2;
const SIM_QE_SVN: u16 = 4;
const TCB_EVALUATION_DATA_NUMBER: u32 = 17;
/// Collateral (TCB info, QE identity, CRLs) is issued valid for this long.
pub const SIM_COLLATERAL_VALIDITY_SECS: u64 = 30 * 86_400;
const DAY: u64 = 86_400;

const SGX_EXT_OID: [u64; 7] = [1, 2, 840, 113741, 1, 13, 1];

const ROOT_CN: &str = "CVM Simulated TDX Root CA";
const PCK_CA_CN: &str = "CVM Simulated TDX PCK Platform CA";
const PCK_CN: &str = "CVM Simulated TDX PCK Certificate";
const TCB_CN: &str = "CVM Simulated TDX TCB Signing";
const ORG: &str = "cvm-operator simulator (not Intel)";

/// A P-256 key kept as PKCS#8 so that both rcgen (certificates, CRLs) and ring (raw
/// r||s signatures for quotes and collateral) can use it, and so it persists as PEM.
#[derive(Clone)]
struct SimKey {
    pkcs8: Vec<u8>,
}

impl SimKey {
    fn generate() -> Result<Self, TdxError> {
        let kp = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(sim_err)?;
        Ok(SimKey {
            pkcs8: kp.serialize_der(),
        })
    }

    fn rcgen(&self) -> Result<KeyPair, TdxError> {
        KeyPair::try_from(self.pkcs8.as_slice()).map_err(sim_err)
    }

    fn ring(&self) -> Result<EcdsaKeyPair, TdxError> {
        EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &self.pkcs8,
            &SystemRandom::new(),
        )
        .map_err(|e| TdxError::Simulator(format!("unusable P-256 key: {e}")))
    }

    /// ECDSA P-256/SHA-256 signature as raw r||s, the DCAP encoding.
    fn sign(&self, msg: &[u8]) -> Result<[u8; 64], TdxError> {
        let sig = self
            .ring()?
            .sign(&SystemRandom::new(), msg)
            .map_err(|_| TdxError::Simulator("ECDSA signing failed".into()))?;
        sig.as_ref()
            .try_into()
            .map_err(|_| TdxError::Simulator("unexpected ECDSA signature size".into()))
    }

    /// Uncompressed public point without the 0x04 prefix (x||y), as quotes carry it.
    fn public_xy(&self) -> Result<[u8; 64], TdxError> {
        let kp = self.ring()?;
        kp.public_key()
            .as_ref()
            .get(1..)
            .and_then(|xy| xy.try_into().ok())
            .ok_or_else(|| TdxError::Simulator("unexpected P-256 public key size".into()))
    }
}

fn sim_err(e: rcgen::Error) -> TdxError {
    TdxError::Simulator(e.to_string())
}

/// What the simulated TD reports. Defaults: zero measurements, SEPT_VE_DISABLE set
/// (as every production TD), debug off, Linux-typical XFAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TdQuoteRequest {
    pub mr_td: [u8; 48],
    pub rtmrs: [[u8; 48]; 4],
    pub td_attributes: u64,
    pub xfam: u64,
    /// MRCONFIGID: the host-data equivalent.
    pub mr_config_id: [u8; 48],
    pub mr_owner: [u8; 48],
    pub mr_owner_config: [u8; 48],
    /// Usually [`super::report_data_for_nonce`] of the verifier's nonce.
    pub report_data: [u8; 64],
    /// TCB status the collateral assigns to this platform.
    pub tcb_status: TdxTcbStatus,
    pub advisory_ids: Vec<String>,
}

impl Default for TdQuoteRequest {
    fn default() -> Self {
        TdQuoteRequest {
            mr_td: [0; 48],
            rtmrs: [[0; 48]; 4],
            td_attributes: td_attr::SEPT_VE_DISABLE,
            xfam: 0x0006_02e7,
            mr_config_id: [0; 48],
            mr_owner: [0; 48],
            mr_owner_config: [0; 48],
            report_data: [0; 64],
            tcb_status: TdxTcbStatus::UpToDate,
            advisory_ids: Vec::new(),
        }
    }
}

/// A simulated quote and the collateral that verifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimTdxEvidence {
    pub quote: Vec<u8>,
    /// dcap-qvl `QuoteCollateralV3` JSON, the format [`super::verify_quote`] reads.
    pub collateral_json: Vec<u8>,
}

/// A simulated TDX host: its PKI and its quoting enclave's attestation key.
#[derive(Clone)]
pub struct SimTdxPlatform {
    root_key: SimKey,
    root_der: Vec<u8>,
    pck_ca_key: SimKey,
    pck_ca_der: Vec<u8>,
    pck_key: SimKey,
    pck_der: Vec<u8>,
    tcb_key: SimKey,
    tcb_der: Vec<u8>,
    attestation_key: SimKey,
}

impl std::fmt::Debug for SimTdxPlatform {
    // Never print private keys.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimTdxPlatform")
            .field("root", &self.root_fingerprint())
            .finish_non_exhaustive()
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn datetime(unix: u64) -> Result<OffsetDateTime, TdxError> {
    let secs = i64::try_from(unix).map_err(|_| TdxError::Simulator("time out of range".into()))?;
    OffsetDateTime::from_unix_timestamp(secs)
        .map_err(|e| TdxError::Simulator(format!("time out of range: {e}")))
}

fn dn_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.distinguished_name.push(DnType::OrganizationName, ORG);
    p.distinguished_name.push(DnType::CountryName, "ZZ");
    p.key_identifier_method = KeyIdMethod::Sha256;
    p
}

/// Parameters of a CA: also what rebuilds its [`Issuer`] after loading from PEM
/// (an issuer needs only the name, key usages and key-id method).
fn ca_params(cn: &str, path_len: u8) -> CertificateParams {
    let mut p = dn_params(cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

fn validity(p: &mut CertificateParams, from: u64, years: u64) -> Result<(), TdxError> {
    p.not_before = datetime(from)?;
    p.not_after = datetime(from.saturating_add(years * 365 * DAY))?;
    Ok(())
}

impl SimTdxPlatform {
    /// A fresh platform with certificates valid from now (minus a day of skew).
    pub fn generate() -> Result<Self, TdxError> {
        Self::generate_at(now_unix())
    }

    /// A fresh platform whose certificates are valid from `unix` - 1 day, the root
    /// for 20 years, the others for 10.
    pub fn generate_at(unix: u64) -> Result<Self, TdxError> {
        let start = unix.saturating_sub(DAY);
        let root_key = SimKey::generate()?;
        let pck_ca_key = SimKey::generate()?;
        let pck_key = SimKey::generate()?;
        let tcb_key = SimKey::generate()?;
        let attestation_key = SimKey::generate()?;

        let root_kp = root_key.rcgen()?;
        let mut root_p = ca_params(ROOT_CN, 1);
        validity(&mut root_p, start, 20)?;
        root_p.serial_number = Some(SerialNumber::from_slice(&[0x01]));
        let root_der = root_p
            .self_signed(&root_kp)
            .map_err(sim_err)?
            .der()
            .to_vec();
        let root_issuer = Issuer::new(ca_params(ROOT_CN, 1), &root_kp);

        let pck_ca_kp = pck_ca_key.rcgen()?;
        let mut pck_ca_p = ca_params(PCK_CA_CN, 0);
        validity(&mut pck_ca_p, start, 10)?;
        pck_ca_p.serial_number = Some(SerialNumber::from_slice(&[0x02]));
        let pck_ca_der = pck_ca_p
            .signed_by(&pck_ca_kp, &root_issuer)
            .map_err(sim_err)?
            .der()
            .to_vec();

        let tcb_kp = tcb_key.rcgen()?;
        let mut tcb_p = dn_params(TCB_CN);
        tcb_p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::ContentCommitment,
        ];
        validity(&mut tcb_p, start, 10)?;
        tcb_p.serial_number = Some(SerialNumber::from_slice(&[0x03]));
        let tcb_der = tcb_p
            .signed_by(&tcb_kp, &root_issuer)
            .map_err(sim_err)?
            .der()
            .to_vec();

        let ppid: [u8; 16] = Sha256::digest(root_key.public_xy()?)[..16]
            .try_into()
            .map_err(|_| TdxError::Simulator("ppid".into()))?;
        let pck_der = pck_cert(&pck_key, &pck_ca_key, &ppid, start)?;

        Ok(SimTdxPlatform {
            root_key,
            root_der,
            pck_ca_key,
            pck_ca_der,
            pck_key,
            pck_der,
            tcb_key,
            tcb_der,
            attestation_key,
        })
    }

    /// The same platform (root, PCK CA, TCB signer) with a PCK key and certificate of its
    /// own, whose PPID is derived from `platform_seed`: one simulated TDX host per node,
    /// each with its own hardware identity, as real hosts have.
    pub fn with_own_pck(&self, platform_seed: &[u8]) -> Result<Self, TdxError> {
        self.with_own_pck_at(platform_seed, now_unix())
    }

    /// [`Self::with_own_pck`] with a PCK certificate valid from `unix` - 1 day.
    pub fn with_own_pck_at(&self, platform_seed: &[u8], unix: u64) -> Result<Self, TdxError> {
        let pck_key = SimKey::generate()?;
        let ppid: [u8; 16] = Sha256::new()
            .chain_update(b"cvm simulated TDX PPID\0")
            .chain_update(platform_seed)
            .finalize()[..16]
            .try_into()
            .map_err(|_| TdxError::Simulator("ppid".into()))?;
        let pck_der = pck_cert(&pck_key, &self.pck_ca_key, &ppid, unix.saturating_sub(DAY))?;
        Ok(SimTdxPlatform {
            root_key: self.root_key.clone(),
            root_der: self.root_der.clone(),
            pck_ca_key: self.pck_ca_key.clone(),
            pck_ca_der: self.pck_ca_der.clone(),
            pck_key,
            pck_der,
            tcb_key: self.tcb_key.clone(),
            tcb_der: self.tcb_der.clone(),
            attestation_key: self.attestation_key.clone(),
        })
    }

    /// The PPID in this platform's PCK certificate.
    pub fn ppid(&self) -> Result<Vec<u8>, TdxError> {
        dcap_qvl::intel::parse_pck_extension(&self.pck_der)
            .map(|e| e.ppid)
            .map_err(|e| TdxError::Simulator(format!("PCK extension: {e}")))
    }

    /// The simulated root certificate (DER).
    pub fn root_der(&self) -> &[u8] {
        &self.root_der
    }

    /// `sha256:<hex>` of the root certificate: what a policy lists to trust this sim.
    pub fn root_fingerprint(&self) -> String {
        self.trusted_root().to_string()
    }

    pub fn trusted_root(&self) -> TrustedRoot {
        TrustedRoot::fingerprint_of(&self.root_der)
    }

    /// The default policy plus trust in this simulator's root.
    pub fn policy(&self) -> TdxPolicy {
        TdxPolicy::trusting(self.trusted_root())
    }

    /// PCK chain as PEM, leaf first, as quotes carry it.
    pub fn pck_chain_pem(&self) -> String {
        [&self.pck_der, &self.pck_ca_der, &self.root_der]
            .iter()
            .map(|d| pem_block("CERTIFICATE", d))
            .collect()
    }

    /// Issue a quote with collateral dated `now`, valid for 30 days.
    pub fn issue_quote(&self, req: &TdQuoteRequest) -> Result<SimTdxEvidence, TdxError> {
        self.issue_quote_at(req, now_unix())
    }

    pub fn issue_quote_at(
        &self,
        req: &TdQuoteRequest,
        now_unix: u64,
    ) -> Result<SimTdxEvidence, TdxError> {
        Ok(SimTdxEvidence {
            quote: self.quote(req)?,
            collateral_json: self.collateral_json(req.tcb_status, &req.advisory_ids, now_unix)?,
        })
    }

    /// The TDX quote v4 bytes for `req`.
    pub fn quote(&self, req: &TdQuoteRequest) -> Result<Vec<u8>, TdxError> {
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(&4u16.to_le_bytes());
        header.extend_from_slice(&ATTESTATION_KEY_TYPE_ECDSA_P256.to_le_bytes());
        header.extend_from_slice(&TEE_TYPE_TDX.to_le_bytes());
        header.extend_from_slice(&SIM_QE_SVN.to_le_bytes());
        header.extend_from_slice(&SIM_PCE_SVN.to_le_bytes());
        header.extend_from_slice(&INTEL_QE_VENDOR_ID);
        // User data: the QE ID (16 bytes, a platform-unique value) and 4 zero bytes.
        header.extend_from_slice(&Sha256::digest(self.attestation_key.public_xy()?)[..16]);
        header.extend_from_slice(&[0; 4]);

        let mut body = vec![0u8; TD_REPORT10_LEN];
        let mut put =
            |off: usize, bytes: &[u8]| body[off..off + bytes.len()].copy_from_slice(bytes);
        put(td10::TEE_TCB_SVN, &SIM_TEE_TCB_SVN);
        put(
            td10::MR_SEAM,
            &Sha384::digest(b"cvm-operator simulated TDX module"),
        );
        // MR_SIGNER_SEAM and SEAM attributes stay zero: Intel-signed module, as the
        // TCB info's tdxModule entry expects.
        put(td10::TD_ATTRIBUTES, &req.td_attributes.to_le_bytes());
        put(td10::XFAM, &req.xfam.to_le_bytes());
        put(td10::MR_TD, &req.mr_td);
        put(td10::MR_CONFIG_ID, &req.mr_config_id);
        put(td10::MR_OWNER, &req.mr_owner);
        put(td10::MR_OWNER_CONFIG, &req.mr_owner_config);
        for (i, r) in req.rtmrs.iter().enumerate() {
            put(td10::RTMR0 + 48 * i, r);
        }
        put(td10::REPORT_DATA, &req.report_data);

        let mut signed = header;
        signed.extend_from_slice(&body);
        let quote_sig = self.attestation_key.sign(&signed)?;
        let att_pub = self.attestation_key.public_xy()?;

        // QE report: the QE vouches for the attestation key by putting
        // SHA-256(attestation key || QE auth data) in its report data.
        let qe_auth: Vec<u8> = (0u8..32).collect();
        let mut qe_report = [0u8; ENCLAVE_REPORT_LEN];
        qe_report[..16].copy_from_slice(&SIM_CPU_SVN);
        qe_report[48] = 0x11; // attributes: INIT | MODE64BIT, not DEBUG
        qe_report[128..160].copy_from_slice(&sim_qe_mrsigner());
        qe_report[256..258].copy_from_slice(&SIM_QE_PROD_ID.to_le_bytes());
        qe_report[258..260].copy_from_slice(&SIM_QE_SVN.to_le_bytes());
        let mut h = Sha256::new();
        h.update(att_pub);
        h.update(&qe_auth);
        qe_report[320..352].copy_from_slice(&h.finalize());
        let qe_report_sig = self.pck_key.sign(&qe_report)?;

        let mut chain = self.pck_chain_pem().into_bytes();
        chain.push(0); // real quotes NUL-terminate the PEM chain
        let mut qe_cert_data = Vec::new();
        qe_cert_data.extend_from_slice(&qe_report);
        qe_cert_data.extend_from_slice(&qe_report_sig);
        qe_cert_data.extend_from_slice(&(qe_auth.len() as u16).to_le_bytes());
        qe_cert_data.extend_from_slice(&qe_auth);
        qe_cert_data.extend_from_slice(&5u16.to_le_bytes());
        qe_cert_data.extend_from_slice(&len_u32(chain.len())?.to_le_bytes());
        qe_cert_data.extend_from_slice(&chain);

        let mut auth = Vec::new();
        auth.extend_from_slice(&quote_sig);
        auth.extend_from_slice(&att_pub);
        auth.extend_from_slice(&6u16.to_le_bytes());
        auth.extend_from_slice(&len_u32(qe_cert_data.len())?.to_le_bytes());
        auth.extend_from_slice(&qe_cert_data);

        let mut quote = signed;
        quote.extend_from_slice(&len_u32(auth.len())?.to_le_bytes());
        quote.extend_from_slice(&auth);
        Ok(quote)
    }

    /// Collateral for this platform, issued at `now_unix` and valid for 30 days,
    /// giving the platform's TCB level the status `status`.
    pub fn collateral_json(
        &self,
        status: TdxTcbStatus,
        advisory_ids: &[String],
        now_unix: u64,
    ) -> Result<Vec<u8>, TdxError> {
        let issue = now_unix.saturating_sub(3600);
        let next = now_unix.saturating_add(SIM_COLLATERAL_VALIDITY_SECS);
        let (issue_s, next_s) = (super::rfc3339(issue), super::rfc3339(next));

        let comps = |svns: &[u8]| -> Vec<serde_json::Value> {
            svns.iter()
                .map(|s| serde_json::json!({ "svn": s }))
                .collect()
        };
        let tcb_info = serde_json::json!({
            "id": "TDX",
            "version": 3,
            "issueDate": issue_s,
            "nextUpdate": next_s,
            "fmspc": hex::encode_upper(SIM_FMSPC),
            "pceId": hex::encode_upper(SIM_PCE_ID),
            "tcbType": 0,
            "tcbEvaluationDataNumber": TCB_EVALUATION_DATA_NUMBER,
            "tdxModule": {
                "mrsigner": "0".repeat(96),
                "attributes": "0000000000000000",
                "attributesMask": "FFFFFFFFFFFFFFFF"
            },
            "tcbLevels": [{
                "tcb": {
                    "sgxtcbcomponents": comps(&SIM_CPU_SVN),
                    "pcesvn": SIM_PCE_SVN,
                    "tdxtcbcomponents": comps(&SIM_TEE_TCB_SVN)
                },
                "tcbDate": super::rfc3339(issue - issue % DAY),
                "tcbStatus": status.as_str(),
                "advisoryIDs": advisory_ids
            }]
        })
        .to_string();
        let qe_identity = serde_json::json!({
            "id": "TD_QE",
            "version": 2,
            "issueDate": issue_s,
            "nextUpdate": next_s,
            "tcbEvaluationDataNumber": TCB_EVALUATION_DATA_NUMBER,
            "miscselect": "00000000",
            "miscselectMask": "FFFFFFFF",
            "attributes": "11000000000000000000000000000000",
            "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
            "mrsigner": hex::encode_upper(sim_qe_mrsigner()),
            "isvprodid": SIM_QE_PROD_ID,
            "tcbLevels": [{
                "tcb": { "isvsvn": SIM_QE_SVN },
                "tcbDate": super::rfc3339(issue - issue % DAY),
                "tcbStatus": "UpToDate"
            }]
        })
        .to_string();

        let root_kp = self.root_key.rcgen()?;
        let pck_ca_kp = self.pck_ca_key.rcgen()?;
        let root_crl = crl(&Issuer::new(ca_params(ROOT_CN, 1), &root_kp), issue, next)?;
        let pck_crl = crl(
            &Issuer::new(ca_params(PCK_CA_CN, 0), &pck_ca_kp),
            issue,
            next,
        )?;
        let tcb_chain =
            pem_block("CERTIFICATE", &self.tcb_der) + &pem_block("CERTIFICATE", &self.root_der);
        let pck_crl_chain =
            pem_block("CERTIFICATE", &self.pck_ca_der) + &pem_block("CERTIFICATE", &self.root_der);

        let collateral = dcap_qvl::QuoteCollateralV3 {
            pck_crl_issuer_chain: pck_crl_chain,
            root_ca_crl: root_crl,
            pck_crl,
            tcb_info_issuer_chain: tcb_chain.clone(),
            tcb_info_signature: self.tcb_key.sign(tcb_info.as_bytes())?.to_vec(),
            tcb_info,
            qe_identity_issuer_chain: tcb_chain,
            qe_identity_signature: self.tcb_key.sign(qe_identity.as_bytes())?.to_vec(),
            qe_identity,
            pck_certificate_chain: None,
        };
        serde_json::to_vec(&collateral).map_err(|e| TdxError::Simulator(e.to_string()))
    }

    /// Persist the platform (certificates and private keys) as one PEM bundle.
    pub fn to_pem(&self) -> String {
        let mut out = String::new();
        for (tag, bytes) in self.sections() {
            out += &pem_block(tag, bytes);
        }
        out
    }

    /// Load a platform written by [`Self::to_pem`].
    pub fn from_pem(text: &str) -> Result<Self, TdxError> {
        let blocks = pem::parse_many(text.as_bytes())
            .map_err(|e| TdxError::Simulator(format!("not a PEM bundle: {e}")))?;
        let get = |tag: &str| -> Result<Vec<u8>, TdxError> {
            blocks
                .iter()
                .find(|b| b.tag() == tag)
                .map(|b| b.contents().to_vec())
                .ok_or_else(|| TdxError::Simulator(format!("PEM bundle lacks a {tag} block")))
        };
        let key = |tag: &str| -> Result<SimKey, TdxError> {
            let k = SimKey { pkcs8: get(tag)? };
            k.ring()?; // fail at load time, not at the first quote
            Ok(k)
        };
        Ok(SimTdxPlatform {
            root_key: key(TAG_ROOT_KEY)?,
            root_der: get(TAG_ROOT_CERT)?,
            pck_ca_key: key(TAG_PCK_CA_KEY)?,
            pck_ca_der: get(TAG_PCK_CA_CERT)?,
            pck_key: key(TAG_PCK_KEY)?,
            pck_der: get(TAG_PCK_CERT)?,
            tcb_key: key(TAG_TCB_KEY)?,
            tcb_der: get(TAG_TCB_CERT)?,
            attestation_key: key(TAG_ATT_KEY)?,
        })
    }

    fn sections(&self) -> [(&'static str, &[u8]); 9] {
        [
            (TAG_ROOT_CERT, &self.root_der),
            (TAG_ROOT_KEY, &self.root_key.pkcs8),
            (TAG_PCK_CA_CERT, &self.pck_ca_der),
            (TAG_PCK_CA_KEY, &self.pck_ca_key.pkcs8),
            (TAG_PCK_CERT, &self.pck_der),
            (TAG_PCK_KEY, &self.pck_key.pkcs8),
            (TAG_TCB_CERT, &self.tcb_der),
            (TAG_TCB_KEY, &self.tcb_key.pkcs8),
            (TAG_ATT_KEY, &self.attestation_key.pkcs8),
        ]
    }
}

const TAG_ROOT_CERT: &str = "TDX SIM ROOT CA CERTIFICATE";
const TAG_ROOT_KEY: &str = "TDX SIM ROOT CA PRIVATE KEY";
const TAG_PCK_CA_CERT: &str = "TDX SIM PCK CA CERTIFICATE";
const TAG_PCK_CA_KEY: &str = "TDX SIM PCK CA PRIVATE KEY";
const TAG_PCK_CERT: &str = "TDX SIM PCK CERTIFICATE";
const TAG_PCK_KEY: &str = "TDX SIM PCK PRIVATE KEY";
const TAG_TCB_CERT: &str = "TDX SIM TCB SIGNING CERTIFICATE";
const TAG_TCB_KEY: &str = "TDX SIM TCB SIGNING PRIVATE KEY";
const TAG_ATT_KEY: &str = "TDX SIM ATTESTATION PRIVATE KEY";

fn sim_qe_mrsigner() -> [u8; 32] {
    Sha256::digest(b"cvm-operator simulated TD quoting enclave").into()
}

fn len_u32(n: usize) -> Result<u32, TdxError> {
    u32::try_from(n).map_err(|_| TdxError::Simulator("quote section too large".into()))
}

fn pem_block(tag: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(tag, der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

fn crl(issuer: &Issuer<'_, &KeyPair>, issue: u64, next: u64) -> Result<Vec<u8>, TdxError> {
    let params = CertificateRevocationListParams {
        this_update: datetime(issue)?,
        next_update: datetime(next)?,
        crl_number: SerialNumber::from_slice(&[0x01]),
        issuing_distribution_point: None,
        revoked_certs: Vec::new(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    Ok(params.signed_by(issuer).map_err(sim_err)?.der().to_vec())
}

// --- A few DER encoders for the SGX extension (rcgen takes its content as DER). ---

fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes: Vec<u8> = n
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend_from_slice(&bytes);
    }
    out.extend_from_slice(content);
    out
}

fn der_oid(arcs: &[u64]) -> Vec<u8> {
    let mut body = Vec::new();
    let mut push_arc = |mut v: u64| {
        let mut tmp = vec![(v & 0x7f) as u8];
        v >>= 7;
        while v > 0 {
            tmp.push(0x80 | (v & 0x7f) as u8);
            v >>= 7;
        }
        tmp.reverse();
        body.extend_from_slice(&tmp);
    };
    if let [a, b, rest @ ..] = arcs {
        push_arc(a * 40 + b);
        for &arc in rest {
            push_arc(arc);
        }
    }
    der_tlv(0x06, &body)
}

fn der_uint(v: u64) -> Vec<u8> {
    let mut bytes: Vec<u8> = v
        .to_be_bytes()
        .into_iter()
        .skip_while(|b| *b == 0)
        .collect();
    if bytes.first().is_none_or(|b| b & 0x80 != 0) {
        bytes.insert(0, 0);
    }
    der_tlv(0x02, &bytes)
}

fn der_seq(items: &[Vec<u8>]) -> Vec<u8> {
    der_tlv(0x30, &items.concat())
}

fn sgx_oid(suffix: &[u64]) -> Vec<u8> {
    der_oid(&[&SGX_EXT_OID[..], suffix].concat())
}

/// Intel's SGX extension (OID 1.2.840.113741.1.13.1) as a Platform CA PCK cert has it:
/// PPID, TCB (16 component SVNs, PCESVN, CPUSVN), PCE-ID, FMSPC, SGX type,
/// platform instance ID and configuration.
/// A PCK leaf for `pck_key` under the PCK CA, carrying Intel's SGX extension with `ppid`.
fn pck_cert(
    pck_key: &SimKey,
    pck_ca_key: &SimKey,
    ppid: &[u8; 16],
    start: u64,
) -> Result<Vec<u8>, TdxError> {
    let pck_kp = pck_key.rcgen()?;
    let pck_ca_kp = pck_ca_key.rcgen()?;
    let pck_ca_issuer = Issuer::new(ca_params(PCK_CA_CN, 0), &pck_ca_kp);
    let mut pck_p = dn_params(PCK_CN);
    pck_p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::ContentCommitment,
    ];
    validity(&mut pck_p, start, 10)?;
    pck_p.serial_number = Some(SerialNumber::from_slice(
        &Sha256::digest(&pck_key.pkcs8)[..16],
    ));
    pck_p.custom_extensions = vec![CustomExtension::from_oid_content(
        &SGX_EXT_OID,
        sgx_extension(ppid),
    )];
    let der = pck_p
        .signed_by(&pck_kp, &pck_ca_issuer)
        .map_err(sim_err)?
        .der()
        .to_vec();

    Ok(der)
}

fn sgx_extension(ppid: &[u8; 16]) -> Vec<u8> {
    let entry = |suffix: &[u64], value: Vec<u8>| der_seq(&[sgx_oid(suffix), value]);
    let mut tcb: Vec<Vec<u8>> = SIM_CPU_SVN
        .iter()
        .zip(1u64..)
        .map(|(svn, i)| entry(&[2, i], der_uint(u64::from(*svn))))
        .collect();
    tcb.push(entry(&[2, 17], der_uint(u64::from(SIM_PCE_SVN))));
    tcb.push(entry(&[2, 18], der_tlv(0x04, &SIM_CPU_SVN)));
    let config = der_seq(&[
        entry(&[7, 1], der_tlv(0x01, &[0x00])), // dynamic platform: false
        entry(&[7, 2], der_tlv(0x01, &[0xff])), // cached keys: true
        entry(&[7, 3], der_tlv(0x01, &[0xff])), // SMT enabled: true
    ]);
    der_seq(&[
        entry(&[1], der_tlv(0x04, ppid)),
        entry(&[2], der_seq(&tcb)),
        entry(&[3], der_tlv(0x04, &SIM_PCE_ID)),
        entry(&[4], der_tlv(0x04, &SIM_FMSPC)),
        entry(&[5], der_tlv(0x0a, &[0x01])), // SGX type: Scalable
        entry(&[6], der_tlv(0x04, &ppid.map(|b| b ^ 0x5a))), // platform instance ID
        entry(&[7], config),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_encoders_match_known_encodings() {
        // 1.2.840.113741.1.13.1 as Intel's certificates encode it.
        assert_eq!(hex::encode(der_oid(&SGX_EXT_OID)), "06092a864886f84d010d01");
        assert_eq!(der_uint(0), vec![0x02, 0x01, 0x00]);
        assert_eq!(der_uint(13), vec![0x02, 0x01, 0x0d]);
        assert_eq!(der_uint(200), vec![0x02, 0x02, 0x00, 0xc8]);
        assert_eq!(der_tlv(0x04, &[0u8; 200])[..3], [0x04, 0x81, 200]);
    }

    #[test]
    fn absurd_times_are_errors_not_panics() {
        assert!(SimTdxPlatform::generate_at(u64::MAX).is_err());
        let p = SimTdxPlatform::generate_at(1_750_000_000).unwrap();
        assert!(p
            .collateral_json(TdxTcbStatus::UpToDate, &[], u64::MAX)
            .is_err());
    }

    #[test]
    fn pck_extension_parses_with_dcap_qvl() {
        let p = SimTdxPlatform::generate_at(1_750_000_000).unwrap();
        let ext = dcap_qvl::intel::parse_pck_extension(&p.pck_der).unwrap();
        assert_eq!(ext.fmspc, SIM_FMSPC);
        assert_eq!(ext.cpu_svn, SIM_CPU_SVN);
        assert_eq!(ext.pce_svn, SIM_PCE_SVN);
        assert_eq!(ext.pce_id, SIM_PCE_ID.to_vec());
        assert_eq!(ext.smt_enabled, Some(true));
    }
}
