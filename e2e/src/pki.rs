//! TLS material for a throwaway cluster: one CA, the API server's serving certificate,
//! client certificates for the admin and the controller manager, and the service-account
//! signing key (bound tokens need it).

use crate::error::{io, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

/// PEM files written under `DIR/pki`.
#[derive(Debug, Clone)]
pub struct Pki {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub sa_key: PathBuf,
    pub sa_pub: PathBuf,
    pub admin: ClientCert,
    pub controller_manager: ClientCert,
    pub ca_pem: String,
}

#[derive(Debug, Clone)]
pub struct ClientCert {
    pub cert_pem: String,
    pub key_pem: String,
}

fn write(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).map_err(io("writing", path))
}

fn client(issuer: &Issuer<'_, KeyPair>, cn: &str, org: Option<&str>) -> Result<ClientCert> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, cn);
    if let Some(o) = org {
        p.distinguished_name.push(DnType::OrganizationName, o);
    }
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let cert = p.signed_by(&key, issuer)?;
    Ok(ClientCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

impl Pki {
    /// Generates everything afresh under `dir/pki` (ECDSA P-256 keys: fast to make).
    pub fn generate(dir: &Path) -> Result<Self> {
        let pki = dir.join("pki");
        std::fs::create_dir_all(&pki).map_err(io("creating", &pki))?;

        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.distinguished_name
            .push(DnType::CommonName, "cvm-dev local cluster CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key)?;
        let ca_pem = ca_cert.pem();
        let ca_key_pem = ca_key.serialize_pem();
        let issuer = Issuer::new(ca, ca_key);

        let server_key = KeyPair::generate()?;
        let mut s = CertificateParams::new(vec![
            "localhost".to_string(),
            "kubernetes".to_string(),
            "kubernetes.default".to_string(),
            "kubernetes.default.svc".to_string(),
            "kubernetes.default.svc.cluster.local".to_string(),
        ])?;
        s.subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        s.subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1))));
        s.distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        s.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        s.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let server_cert = s.signed_by(&server_key, &issuer)?;

        let admin = client(&issuer, "cvm-dev-admin", Some("system:masters"))?;
        let controller_manager = client(&issuer, "system:kube-controller-manager", None)?;

        let sa = KeyPair::generate()?;

        let out = Pki {
            ca_cert: pki.join("ca.crt"),
            ca_key: pki.join("ca.key"),
            server_cert: pki.join("apiserver.crt"),
            server_key: pki.join("apiserver.key"),
            sa_key: pki.join("sa.key"),
            sa_pub: pki.join("sa.pub"),
            dir: pki,
            admin,
            controller_manager,
            ca_pem: ca_pem.clone(),
        };
        write(&out.ca_cert, &ca_pem)?;
        write(&out.ca_key, &ca_key_pem)?;
        write(&out.server_cert, &server_cert.pem())?;
        write(&out.server_key, &server_key.serialize_pem())?;
        write(&out.sa_key, &sa.serialize_pem())?;
        write(&out.sa_pub, &sa.public_key_pem())?;
        Ok(out)
    }
}
