//! What a CVM's evidence is bound to: the 64 bytes of SEV-SNP `REPORT_DATA` / TDX
//! `REPORTDATA`, computed here for every party (operator, node plugin, guest agent,
//! simulator and `kubectl cvm`), so that a third-party verifier can recompute it from
//! `docs/evidence-binding.md` alone.
//!
//! `REPORT_DATA = SHA-512(preimage)` with
//!
//! ```text
//! preimage = "cvmp.io/report-data/v1" 0x00
//!            field(purpose)              "cvm" or "migration"
//!            field(subject UID)          the CVM's (or the migration's) metadata.uid
//!            field(nonce)                the owner's challenge bytes, empty when none
//!            field(epoch)                UID of the live migration that last moved the CVM, empty when none
//!            field(SHA-256(instance key)) the guest instance's public key, as the agent made it
//! field(x)  = u32 big-endian length of x, then x
//! ```
//!
//! The length prefixes make the encoding injective: no two different inputs share a
//! preimage. The subject UID says which CVM the report was *requested for*; the instance
//! key, which the guest agent generates at boot and never lets out, says which guest
//! *produced* it. Neither the host nor the operator chooses the key hash: the agent puts
//! its own, so one guest cannot answer for another instance. The epoch makes evidence from
//! before a migration's switch unable to answer after it.

use ring::rand::SecureRandom;
use ring::signature::KeyPair;
use sha2::{Digest, Sha256, Sha512};

/// Domain separator: no other protocol's hash input starts with it.
pub const DOMAIN: &[u8] = b"cvmp.io/report-data/v1";

/// Longest owner nonce, in bytes (the CRD allows 64).
pub const MAX_NONCE_BYTES: usize = 1024;

/// What a report is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Purpose {
    /// A CVM's own evidence; the subject is the CVM's UID.
    Cvm,
    /// A live migration's receiving guest; the subject is the migration's UID.
    Migration,
}

impl Purpose {
    /// Wire spelling (also the agent protocol's `purpose`).
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Cvm => "cvm",
            Purpose::Migration => "migration",
        }
    }

    /// Parses the wire spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cvm" => Some(Purpose::Cvm),
            "migration" => Some(Purpose::Migration),
            _ => None,
        }
    }
}

/// The challenge a guest answers, before its instance key is added: chosen by whoever asks.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Challenge {
    pub purpose: Purpose,
    /// UID of the CVM (or migration) the report is for.
    pub subject_uid: String,
    /// The owner's nonce bytes (empty when none is set).
    pub nonce: Vec<u8>,
    /// UID of the live migration that last moved the CVM (empty when none, and for a
    /// migration's own challenge).
    pub epoch: String,
}

impl Challenge {
    /// A CVM's challenge.
    pub fn cvm(uid: &str, nonce: Option<&[u8]>) -> Self {
        Challenge {
            purpose: Purpose::Cvm,
            subject_uid: uid.to_string(),
            nonce: nonce.map(<[u8]>::to_vec).unwrap_or_default(),
            epoch: String::new(),
        }
    }

    /// The same challenge after live migration `migration_uid` moved the CVM (`None`: never
    /// moved).
    pub fn after_migration(mut self, migration_uid: Option<&str>) -> Self {
        self.epoch = migration_uid.unwrap_or_default().to_string();
        self
    }

    /// A migration's challenge (no owner nonce: the migration's UID is fresh per migration).
    pub fn migration(migration_uid: &str) -> Self {
        Challenge {
            purpose: Purpose::Migration,
            subject_uid: migration_uid.to_string(),
            nonce: Vec::new(),
            epoch: String::new(),
        }
    }

    /// The hash preimage for a guest whose instance key hashes to `key_id`.
    pub fn preimage(&self, key_id: &[u8; 32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            DOMAIN.len()
                + 1
                + 20
                + self.subject_uid.len()
                + self.nonce.len()
                + self.epoch.len()
                + 41,
        );
        out.extend_from_slice(DOMAIN);
        out.push(0);
        for part in [
            self.purpose.as_str().as_bytes(),
            self.subject_uid.as_bytes(),
            &self.nonce,
            self.epoch.as_bytes(),
            key_id,
        ] {
            // Lengths are bounded by the API server's object size, far below 4 GiB.
            out.extend_from_slice(&(part.len() as u32).to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    /// The 64 bytes of report data a guest with this instance key puts in its report.
    pub fn report_data(&self, instance_key: &[u8]) -> [u8; 64] {
        Sha512::digest(self.preimage(&key_id(instance_key))).into()
    }
}

/// SHA-256 of an instance's public key: the identity the operator pins.
pub fn key_id(instance_key: &[u8]) -> [u8; 32] {
    Sha256::digest(instance_key).into()
}

/// Errors making or loading an instance key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("the system random number generator failed")]
    Random,
    #[error("the instance key file is not a PKCS#8 Ed25519 key: {0}")]
    Invalid(String),
}

/// A guest instance's key pair (Ed25519), made once per boot. Its public half travels with
/// every report; its private half stays in the guest (for a channel bound to the report,
/// e.g. attested TLS).
pub struct InstanceKey {
    pair: ring::signature::Ed25519KeyPair,
    pkcs8: Vec<u8>,
}

impl std::fmt::Debug for InstanceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstanceKey")
            .field("key_id", &hex::encode(key_id(self.public())))
            .finish_non_exhaustive()
    }
}

impl InstanceKey {
    /// A fresh key from the system's random number generator.
    pub fn generate() -> Result<Self, KeyError> {
        let rng = ring::rand::SystemRandom::new();
        let doc =
            ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| KeyError::Random)?;
        Self::from_pkcs8(doc.as_ref())
    }

    /// Loads a key saved with [`InstanceKey::pkcs8`].
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, KeyError> {
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8)
            .map_err(|e| KeyError::Invalid(e.to_string()))?;
        Ok(InstanceKey {
            pair,
            pkcs8: pkcs8.to_vec(),
        })
    }

    /// The public key (32 bytes), as it travels in `status.evidence.instanceKey`.
    pub fn public(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    /// The private key document, for the guest's own storage only.
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// Signs `msg` (for a channel bound to the report).
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.pair.sign(msg).as_ref().to_vec()
    }
}

/// `N` random bytes from the system's generator (the simulator's per-launch REPORT_ID).
pub fn random_bytes<const N: usize>() -> Result<[u8; N], KeyError> {
    let mut out = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| KeyError::Random)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preimage_layout_is_as_documented() {
        let c = Challenge::cvm("u1", Some(&[0xab, 0xcd]));
        let p = c.preimage(&[7; 32]);
        let mut want = b"cvmp.io/report-data/v1\0".to_vec();
        want.extend_from_slice(&[0, 0, 0, 3]);
        want.extend_from_slice(b"cvm");
        want.extend_from_slice(&[0, 0, 0, 2]);
        want.extend_from_slice(b"u1");
        want.extend_from_slice(&[0, 0, 0, 2, 0xab, 0xcd]);
        want.extend_from_slice(&[0, 0, 0, 0]);
        want.extend_from_slice(&[0, 0, 0, 32]);
        want.extend_from_slice(&[7; 32]);
        assert_eq!(p, want);
    }

    #[test]
    fn known_answer() {
        // Computed independently (Python's hashlib over the documented layout): a change of
        // the construction breaks every third-party verifier, so it must break this test.
        let c = Challenge::cvm("0b6f3b2e-uid", Some(&[1, 2, 3]));
        assert_eq!(
            hex::encode(c.report_data(b"instance-public-key")),
            "d74a2bf64e70789ea57d973d16df7bb5c1694efd85b0e3438d7d46f68f0081b6\
             acd476fa28f0bec6ad76fd7ae2e79e480d514567b07aa0174d28031554d3fc23"
        );
        let moved = c.after_migration(Some("mig-7"));
        assert_eq!(
            hex::encode(moved.report_data(b"instance-public-key")),
            "aff56c075c2b80957219168c302c236aff309cbd95c0c760c67d9392b8eda26a\
             0c47f376a42d339d0429fc3f1e07612b4ad4b3440ba69ffd6da46840fa7050f8"
        );
    }

    #[test]
    fn every_input_changes_the_report_data() {
        let base = Challenge::cvm("a", Some(b"n"));
        let rd = base.report_data(b"k");
        assert_ne!(rd, Challenge::cvm("b", Some(b"n")).report_data(b"k"));
        assert_ne!(rd, Challenge::cvm("a", Some(b"m")).report_data(b"k"));
        assert_ne!(rd, Challenge::cvm("a", None).report_data(b"k"));
        assert_ne!(rd, base.report_data(b"j"));
        assert_ne!(
            rd,
            base.clone().after_migration(Some("m1")).report_data(b"k")
        );
        assert_eq!(rd, base.clone().after_migration(None).report_data(b"k"));
        let mig = Challenge {
            purpose: Purpose::Migration,
            ..base.clone()
        };
        assert_ne!(rd, mig.report_data(b"k"));
        // Lengths keep field boundaries: ("ab", "c") is not ("a", "bc").
        assert_ne!(
            Challenge::cvm("ab", Some(b"c")).report_data(b"k"),
            Challenge::cvm("a", Some(b"bc")).report_data(b"k")
        );
    }

    #[test]
    fn instance_keys_are_distinct_and_round_trip() {
        let a = InstanceKey::generate().unwrap();
        let b = InstanceKey::generate().unwrap();
        assert_ne!(a.public(), b.public());
        assert_eq!(a.public().len(), 32);
        let again = InstanceKey::from_pkcs8(a.pkcs8()).unwrap();
        assert_eq!(again.public(), a.public());
        assert!(InstanceKey::from_pkcs8(b"garbage").is_err());
        let sig = a.sign(b"m");
        let pk = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, a.public());
        assert!(pk.verify(b"m", &sig).is_ok());
        assert_eq!(Purpose::parse("migration"), Some(Purpose::Migration));
        assert_eq!(Purpose::parse("x"), None);
    }
}
