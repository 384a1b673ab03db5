//! A simulated SEV-SNP platform: its own ARK → ASK → VCEK chain and reports in the
//! exact ABI layout, signed like the firmware signs them.
//!
//! The certificates have AMD's X.509 shape and VCEK extensions (TCB SPLs, hwID,
//! product name), so the real verifier walks them unchanged. One deliberate
//! difference: AMD signs ARK and ASK with RSA-4096 RSASSA-PSS; the simulator uses
//! ECDSA P-384 for all three (the VCEK is EC P-384 like AMD's), which keeps key
//! generation instant and deterministic. The verifier accepts both algorithms.
//!
//! Everything derives from a 32-byte seed (and the config), so persisting the seed
//! reproduces the same root, whose fingerprint a policy can list. The root is never
//! trusted unless a policy names it.

use std::str::FromStr;
use std::time::Duration;

use der::asn1::{BitString, GeneralizedTime, OctetString, UtcTime};
use der::{Decode, Encode};
use p384::ecdsa::signature::Signer;
use p384::ecdsa::{Signature, SigningKey};
use p384::pkcs8::EncodePublicKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256, Sha512};
use thiserror::Error;
use x509_cert::certificate::{TbsCertificate, Version};
use x509_cert::ext::Extension;
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::time::{Time, Validity};
use x509_cert::Certificate;

use crate::snp::certs::oid;
use crate::snp::policy::{report_data_for_nonce, SnpPolicy, SnpTrustedRoot};
use crate::snp::report::{self as r, Generation, TcbVersion, REPORT_LEN, SIGNED_LEN};

/// Errors of the simulated platform.
#[derive(Debug, Error)]
pub enum SimError {
    #[error("simulator key derivation failed: {0}")]
    Key(String),
    #[error("simulator certificate encoding failed: {0}")]
    Cert(String),
    #[error("simulator state is unreadable: {0}")]
    State(String),
    #[error("invalid report request: {0}")]
    Request(String),
}

fn cert_err(e: impl std::fmt::Display) -> SimError {
    SimError::Cert(e.to_string())
}

/// Platform facts the simulator reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SimSnpConfig {
    /// Milan, Genoa or Turin (decides TCB layout, CPUID, chip ID length).
    #[serde(with = "gen_serde")]
    pub generation: Generation,
    /// Report version written: 2, 3 or 5.
    pub report_version: u32,
    /// TCB (reported = current = committed = launch).
    pub bootloader: u8,
    pub tee: u8,
    pub snp: u8,
    pub microcode: u8,
    pub fmc: u8,
    /// Certificate validity, unix seconds.
    pub not_before: u64,
    pub not_after: u64,
}

mod gen_serde {
    use super::Generation;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(g: &Generation, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(g.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Generation, D::Error> {
        let t = String::deserialize(d)?;
        Generation::from_product_name(&t)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown generation {t:?}")))
    }
}

impl Default for SimSnpConfig {
    fn default() -> Self {
        SimSnpConfig {
            generation: Generation::Milan,
            report_version: 3,
            bootloader: 4,
            tee: 0,
            snp: 22,
            microcode: 213,
            fmc: 1,
            // 2024-01-01 .. 2049-12-31: UTCTime covers it, like AMD's certificates.
            not_before: 1_704_067_200,
            not_after: 2_524_607_999,
        }
    }
}

impl SimSnpConfig {
    pub fn tcb(&self) -> TcbVersion {
        TcbVersion {
            bootloader: self.bootloader,
            tee: self.tee,
            snp: self.snp,
            microcode: self.microcode,
            fmc: (self.generation == Generation::Turin).then_some(self.fmc),
        }
    }
}

/// What the guest asks for and the host fixed at launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportRequest {
    pub report_data: [u8; 64],
    pub measurement: [u8; 48],
    /// Guest policy; the default allows SMT and nothing else (bit 17 is reserved, 1).
    pub policy: u64,
    pub vmpl: u32,
    pub host_data: [u8; 32],
    pub family_id: [u8; 16],
    pub image_id: [u8; 16],
    pub guest_svn: u32,
    /// Override the platform's chip ID (default: derived from the seed).
    pub chip_id: Option<[u8; 64]>,
    /// Override the platform's TCB (a VCEK for it is issued to match).
    pub tcb: Option<TcbVersion>,
    /// REPORT_ID, which the firmware chooses once per launch (default: derived from the
    /// seed, measurement and host data, so one per image on this chip).
    pub report_id: Option<[u8; 32]>,
}

impl Default for ReportRequest {
    fn default() -> Self {
        ReportRequest {
            report_data: [0; 64],
            measurement: [0; 48],
            policy: r::GuestPolicy::RESERVED_ONE | r::GuestPolicy::SMT,
            vmpl: 0,
            host_data: [0; 32],
            family_id: [0; 16],
            image_id: [0; 16],
            guest_svn: 0,
            chip_id: None,
            tcb: None,
            report_id: None,
        }
    }
}

impl ReportRequest {
    /// Bind the report to a verifier nonce (report_data = SHA-512(nonce)).
    pub fn with_nonce(mut self, nonce: &[u8]) -> Self {
        self.report_data = report_data_for_nonce(nonce);
        self
    }
}

/// A report and the certificates a host would hand out with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimSnpEvidence {
    /// 0x4A0 bytes.
    pub report: Vec<u8>,
    /// DER: VCEK, ASK, ARK.
    pub cert_chain: Vec<Vec<u8>>,
}

impl SimSnpEvidence {
    /// The chain as one PEM file (VCEK, ASK, ARK), as `--certs` takes it.
    pub fn cert_chain_pem(&self) -> String {
        self.cert_chain
            .iter()
            .map(|d| crate::snp::certs::der_to_pem(d))
            .collect()
    }
}

/// A simulated SNP platform.
#[derive(Clone)]
pub struct SimSnpPlatform {
    seed: [u8; 32],
    config: SimSnpConfig,
    ark_key: SigningKey,
    ask_key: SigningKey,
    ark_der: Vec<u8>,
    ask_der: Vec<u8>,
    chip_id: [u8; 64],
}

impl std::fmt::Debug for SimSnpPlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimSnpPlatform")
            .field("generation", &self.config.generation)
            .field("root", &self.root_fingerprint())
            .finish_non_exhaustive()
    }
}

/// Deterministic P-384 key from the seed and a label.
fn derive_key(seed: &[u8; 32], label: &[u8]) -> Result<SigningKey, SimError> {
    for counter in 0u8..16 {
        let h = Sha512::new()
            .chain_update(b"cvm-sim-snp")
            .chain_update(seed)
            .chain_update(label)
            .chain_update([counter])
            .finalize();
        // A 48-byte string is a valid scalar unless it is 0 or >= n (odds ~2^-190).
        if let Ok(k) = SigningKey::from_slice(&h[..48]) {
            return Ok(k);
        }
    }
    Err(SimError::Key("no valid scalar".into()))
}

fn name(cn: &str, generation: Generation) -> Result<Name, SimError> {
    // AMD's DN shape with our own organization, so no name collides with AMD's.
    Name::from_str(&format!(
        "CN={cn},O=cvm-operator simulator ({generation}),ST=CA,L=Simulated,C=US,OU=Engineering"
    ))
    .map_err(cert_err)
}

fn time(unix: u64) -> Result<Time, SimError> {
    let d = Duration::from_secs(unix);
    // RFC 5280: UTCTime through 2049, GeneralizedTime after.
    if unix < 2_524_608_000 {
        Ok(Time::UtcTime(
            UtcTime::from_unix_duration(d).map_err(cert_err)?,
        ))
    } else {
        Ok(Time::GeneralTime(
            GeneralizedTime::from_unix_duration(d).map_err(cert_err)?,
        ))
    }
}

fn der_u8_integer(v: u8) -> Vec<u8> {
    if v < 0x80 {
        vec![0x02, 0x01, v]
    } else {
        vec![0x02, 0x02, 0x00, v]
    }
}

fn ext(id: &str, value: Vec<u8>) -> Result<Extension, SimError> {
    Ok(Extension {
        extn_id: der::asn1::ObjectIdentifier::new(id).map_err(cert_err)?,
        critical: false,
        extn_value: OctetString::new(value).map_err(cert_err)?,
    })
}

struct CertSpec<'a> {
    serial: u8,
    subject: Name,
    issuer: Name,
    subject_key: &'a SigningKey,
    issuer_key: &'a SigningKey,
    extensions: Vec<Extension>,
}

fn build_cert(spec: CertSpec<'_>, cfg: &SimSnpConfig) -> Result<Vec<u8>, SimError> {
    let ecdsa_sha384 = AlgorithmIdentifierOwned {
        oid: der::asn1::ObjectIdentifier::new("1.2.840.10045.4.3.3").map_err(cert_err)?,
        parameters: None,
    };
    let spki_der = spec
        .subject_key
        .verifying_key()
        .to_public_key_der()
        .map_err(cert_err)?;
    let tbs = TbsCertificate {
        version: Version::V3,
        serial_number: SerialNumber::new(&[spec.serial]).map_err(cert_err)?,
        signature: ecdsa_sha384.clone(),
        issuer: spec.issuer,
        validity: Validity {
            not_before: time(cfg.not_before)?,
            not_after: time(cfg.not_after)?,
        },
        subject: spec.subject,
        subject_public_key_info: SubjectPublicKeyInfoOwned::from_der(spki_der.as_bytes())
            .map_err(cert_err)?,
        issuer_unique_id: None,
        subject_unique_id: None,
        extensions: if spec.extensions.is_empty() {
            None
        } else {
            Some(spec.extensions)
        },
    };
    let tbs_der = tbs.to_der().map_err(cert_err)?;
    let sig: Signature = spec.issuer_key.sign(&tbs_der);
    let cert = Certificate {
        tbs_certificate: tbs,
        signature_algorithm: ecdsa_sha384,
        signature: BitString::from_bytes(sig.to_der().as_bytes()).map_err(cert_err)?,
    };
    cert.to_der().map_err(cert_err)
}

/// Persisted form: the seed and the config.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct State {
    seed: String,
    config: SimSnpConfig,
}

const STATE_LABEL: &str = "CVM SIM SNP PLATFORM";

impl SimSnpPlatform {
    /// A platform derived from `seed`: same seed and config, same root.
    pub fn from_seed(seed: [u8; 32], config: SimSnpConfig) -> Result<Self, SimError> {
        if !matches!(config.report_version, 2 | 3 | 5) {
            return Err(SimError::Request(format!(
                "report version {} (supported: 2, 3, 5)",
                config.report_version
            )));
        }
        let g = config.generation;
        let ark_key = derive_key(&seed, b"ark")?;
        let ask_key = derive_key(&seed, b"ask")?;
        let ark_name = name(&format!("ARK-{g}"), g)?;
        let ask_name = name(&format!("SEV-{g}"), g)?;
        let ark_der = build_cert(
            CertSpec {
                serial: 1,
                subject: ark_name.clone(),
                issuer: ark_name.clone(),
                subject_key: &ark_key,
                issuer_key: &ark_key,
                extensions: Vec::new(),
            },
            &config,
        )?;
        let ask_der = build_cert(
            CertSpec {
                serial: 2,
                subject: ask_name,
                issuer: ark_name,
                subject_key: &ask_key,
                issuer_key: &ark_key,
                extensions: Vec::new(),
            },
            &config,
        )?;
        let mut chip_id = [0u8; 64];
        let h = Sha512::new()
            .chain_update(b"cvm-sim-snp chip")
            .chain_update(seed)
            .finalize();
        // Turin chip IDs are 8 bytes, zero-padded in the report.
        let n = if g == Generation::Turin { 8 } else { 64 };
        chip_id[..n].copy_from_slice(&h[..n]);
        Ok(SimSnpPlatform {
            seed,
            config,
            ark_key,
            ask_key,
            ark_der,
            ask_der,
            chip_id,
        })
    }

    /// A platform with a fresh random seed.
    pub fn generate(config: SimSnpConfig) -> Result<Self, SimError> {
        let mut seed = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
            .map_err(|_| SimError::Key("system random source failed".into()))?;
        Self::from_seed(seed, config)
    }

    pub fn seed(&self) -> [u8; 32] {
        self.seed
    }

    pub fn config(&self) -> &SimSnpConfig {
        &self.config
    }

    pub fn chip_id(&self) -> [u8; 64] {
        self.chip_id
    }

    /// The simulator's ARK (DER). Trusted only where a policy lists its fingerprint.
    pub fn ark_der(&self) -> &[u8] {
        &self.ark_der
    }

    pub fn ask_der(&self) -> &[u8] {
        &self.ask_der
    }

    pub fn ark_pem(&self) -> String {
        der::pem::encode_string("CERTIFICATE", der::pem::LineEnding::LF, &self.ark_der)
            .unwrap_or_default()
    }

    /// `sha256:<hex>` of the ARK: what a policy's `trustedRoots` lists.
    pub fn root_fingerprint(&self) -> String {
        self.trusted_root().to_string()
    }

    pub fn trusted_root(&self) -> SnpTrustedRoot {
        SnpTrustedRoot::Sha256(Sha256::digest(&self.ark_der).into())
    }

    /// The default policy plus trust in this simulator's root.
    pub fn policy(&self) -> SnpPolicy {
        SnpPolicy::trusting(self.trusted_root())
    }

    /// The VCEK for a chip and TCB (AMD derives one per chip and TCB, so do we).
    pub fn vcek_der(&self, chip_id: &[u8; 64], tcb: TcbVersion) -> Result<Vec<u8>, SimError> {
        let g = self.config.generation;
        let raw = tcb.to_raw(g).to_le_bytes();
        let mut label = b"vcek".to_vec();
        label.extend_from_slice(chip_id);
        label.extend_from_slice(&raw);
        let vcek_key = derive_key(&self.seed, &label)?;
        let product = match g {
            Generation::Milan => "Milan-B0",
            Generation::Genoa => "Genoa-B1",
            Generation::Turin => "Turin-C1",
        };
        let mut product_der = vec![0x16, product.len() as u8];
        product_der.extend_from_slice(product.as_bytes());
        let hw_id = if g == Generation::Turin {
            chip_id[..8].to_vec()
        } else {
            chip_id.to_vec()
        };
        let mut exts = vec![
            ext(oid::STRUCT_VERSION, der_u8_integer(1))?,
            ext(oid::PRODUCT_NAME, product_der)?,
            ext(oid::BL_SPL, der_u8_integer(tcb.bootloader))?,
            ext(oid::TEE_SPL, der_u8_integer(tcb.tee))?,
            ext(oid::SNP_SPL, der_u8_integer(tcb.snp))?,
            ext(oid::UCODE_SPL, der_u8_integer(tcb.microcode))?,
            ext(oid::HW_ID, hw_id)?,
        ];
        if let Some(fmc) = tcb.fmc {
            exts.push(ext(oid::FMC_SPL, der_u8_integer(fmc))?);
        }
        build_cert(
            CertSpec {
                serial: 3,
                subject: name("SEV-VCEK", g)?,
                issuer: name(&format!("SEV-{g}"), g)?,
                subject_key: &vcek_key,
                issuer_key: &self.ask_key,
                extensions: exts,
            },
            &self.config,
        )
    }

    /// Issue a signed report and the chain that verifies it.
    pub fn issue_report(&self, req: &ReportRequest) -> Result<SimSnpEvidence, SimError> {
        let g = self.config.generation;
        let tcb = req.tcb.unwrap_or_else(|| self.config.tcb());
        let tcb = TcbVersion {
            fmc: (g == Generation::Turin).then(|| tcb.fmc.unwrap_or(0)),
            ..tcb
        };
        let chip_id = req.chip_id.unwrap_or(self.chip_id);
        let tcb_raw = tcb.to_raw(g).to_le_bytes();

        let mut b = vec![0u8; REPORT_LEN];
        let mut put = |off: usize, v: &[u8]| b[off..off + v.len()].copy_from_slice(v);
        put(r::OFF_VERSION, &self.config.report_version.to_le_bytes());
        put(r::OFF_GUEST_SVN, &req.guest_svn.to_le_bytes());
        put(r::OFF_POLICY, &req.policy.to_le_bytes());
        put(r::OFF_FAMILY_ID, &req.family_id);
        put(r::OFF_IMAGE_ID, &req.image_id);
        put(r::OFF_VMPL, &req.vmpl.to_le_bytes());
        put(
            r::OFF_SIG_ALGO,
            &r::SIG_ALGO_ECDSA_P384_SHA384.to_le_bytes(),
        );
        put(r::OFF_CURRENT_TCB, &tcb_raw);
        // PLATFORM_INFO: SMT enabled, TSME enabled.
        put(r::OFF_PLATFORM_INFO, &0x3u64.to_le_bytes());
        // KEY_INFO: signed with the VCEK (SIGNING_KEY = 0).
        put(r::OFF_KEY_INFO, &0u32.to_le_bytes());
        put(r::OFF_REPORT_DATA, &req.report_data);
        put(r::OFF_MEASUREMENT, &req.measurement);
        put(r::OFF_HOST_DATA, &req.host_data);
        let report_id: [u8; 32] = req.report_id.unwrap_or_else(|| {
            Sha256::new()
                .chain_update(self.seed)
                .chain_update(req.measurement)
                .chain_update(req.host_data)
                .finalize()
                .into()
        });
        put(r::OFF_REPORT_ID, &report_id);
        put(r::OFF_REPORT_ID_MA, &[0xFF; 32]);
        put(r::OFF_REPORTED_TCB, &tcb_raw);
        if self.config.report_version >= 3 {
            let (fam, model, step) = g.cpuid();
            put(r::OFF_CPUID_FAM, &[fam, model, step]);
        }
        put(r::OFF_CHIP_ID, &chip_id);
        put(r::OFF_COMMITTED_TCB, &tcb_raw);
        put(r::OFF_CURRENT_VERSION, &[3, 55, 1]);
        put(r::OFF_COMMITTED_VERSION, &[3, 55, 1]);
        put(r::OFF_LAUNCH_TCB, &tcb_raw);

        let vcek = self.vcek_der(&chip_id, tcb)?;
        let mut label = b"vcek".to_vec();
        label.extend_from_slice(&chip_id);
        label.extend_from_slice(&tcb_raw);
        let vcek_key = derive_key(&self.seed, &label)?;
        let sig: Signature = vcek_key.sign(&b[..SIGNED_LEN]);
        let rs = sig.to_bytes();
        // The ABI stores r and s little-endian in 72-byte fields.
        for i in 0..48 {
            b[r::OFF_SIG_R + i] = rs[47 - i];
            b[r::OFF_SIG_S + i] = rs[95 - i];
        }
        Ok(SimSnpEvidence {
            report: b,
            cert_chain: vec![vcek, self.ask_der.clone(), self.ark_der.clone()],
        })
    }

    /// A CRL signed by the simulator's ARK, as AMD publishes one per generation.
    /// Serials: the ASK is 2, every VCEK is 3.
    pub fn issue_crl(
        &self,
        revoked_serials: &[u8],
        this_update: u64,
        next_update: u64,
    ) -> Result<Vec<u8>, SimError> {
        use x509_cert::crl::{CertificateList, RevokedCert, TbsCertList};
        let g = self.config.generation;
        let alg = AlgorithmIdentifierOwned {
            oid: der::asn1::ObjectIdentifier::new("1.2.840.10045.4.3.3").map_err(cert_err)?,
            parameters: None,
        };
        let revoked = revoked_serials
            .iter()
            .map(|s| {
                Ok(RevokedCert {
                    serial_number: SerialNumber::new(&[*s]).map_err(cert_err)?,
                    revocation_date: time(this_update)?,
                    crl_entry_extensions: None,
                })
            })
            .collect::<Result<Vec<_>, SimError>>()?;
        let tbs = TbsCertList {
            version: Version::V2,
            signature: alg.clone(),
            issuer: name(&format!("ARK-{g}"), g)?,
            this_update: time(this_update)?,
            next_update: Some(time(next_update)?),
            revoked_certificates: (!revoked.is_empty()).then_some(revoked),
            crl_extensions: None,
        };
        let tbs_der = tbs.to_der().map_err(cert_err)?;
        let sig: Signature = self.ark_key.sign(&tbs_der);
        CertificateList {
            tbs_cert_list: tbs,
            signature_algorithm: alg,
            signature: BitString::from_bytes(sig.to_der().as_bytes()).map_err(cert_err)?,
        }
        .to_der()
        .map_err(cert_err)
    }

    /// Persist the platform (seed and config) as PEM; keep it secret like a key.
    pub fn to_pem(&self) -> String {
        let state = State {
            seed: hex::encode(self.seed),
            config: self.config.clone(),
        };
        let json = serde_json::to_vec(&state).unwrap_or_default();
        der::pem::encode_string(STATE_LABEL, der::pem::LineEnding::LF, &json).unwrap_or_default()
    }

    /// Load a platform persisted with [`Self::to_pem`].
    pub fn from_pem(text: &str) -> Result<Self, SimError> {
        let (label, json) =
            der::pem::decode_vec(text.as_bytes()).map_err(|e| SimError::State(e.to_string()))?;
        if label != STATE_LABEL {
            return Err(SimError::State(format!(
                "PEM label {label:?}, expected {STATE_LABEL:?}"
            )));
        }
        let state: State =
            serde_json::from_slice(&json).map_err(|e| SimError::State(e.to_string()))?;
        let seed: [u8; 32] = hex::decode(&state.seed)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| SimError::State("seed must be 32 bytes of hex".into()))?;
        Self::from_seed(seed, state.config)
    }
}
