//! Evidence on the wire: how [`RawEvidence`] is encoded into `status.evidence`, and how a
//! verifier reads it back. The operator and `kubectl cvm` decode with [`decode_report`] and
//! the collateral names below.

use std::collections::BTreeMap;

use base64::Engine as _;
use cvm_attest::binding;
use cvm_crds::cvm::Evidence;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::platform::{Challenge, RawEvidence};

/// Collateral key of a TDX quote: dcap-qvl `QuoteCollateralV3` JSON, the input of
/// `cvm_attest::tdx::verify_quote`.
pub const COLLATERAL_TDX_QUOTE_V3: &str = "quoteCollateralV3";

/// The challenge a CVM's evidence must answer: the CVM's UID, the owner's nonce and the
/// live migration that last moved it (`cvm_attest::binding`). `None` when the nonce is not
/// hex (the API server's schema refuses that, so only a hand-made object gets here).
pub fn challenge_for(nonce: Option<&str>, uid: &str, epoch: Option<&str>) -> Option<Challenge> {
    let bytes = match nonce {
        Some(n) => Some(cvm_crds::wellknown::decode_hex(n)?),
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

/// The raw report bytes of `status.evidence.report`.
pub fn decode_report(e: &Evidence) -> Result<Vec<u8>, base64::DecodeError> {
    base64::engine::general_purpose::STANDARD.decode(e.report.trim())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cvm_crds::EvidenceFormat;

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
    }

    #[test]
    fn encode_round_trips() {
        let raw = RawEvidence {
            format: EvidenceFormat::TdxQuote,
            report: vec![1, 2, 3, 250],
            cert_chain: None,
            collateral: vec![(COLLATERAL_TDX_QUOTE_V3.into(), "{}".into())],
            measurement: vec![0xab; 48],
            instance_key: Some(vec![9; 32]),
        };
        let c = challenge_for(Some("01"), "u", Some("m-2")).unwrap();
        let e = encode(&raw, &c, Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        assert_eq!(e.epoch.as_deref(), Some("m-2"));
        assert_eq!(decode_report(&e).unwrap(), raw.report);
        assert_eq!(e.nonce.as_deref(), Some("01"));
        assert_eq!(e.collateral[COLLATERAL_TDX_QUOTE_V3], "{}");
        assert_eq!(e.launch_measurement, Some("ab".repeat(48)));
        assert_eq!(
            e.instance_key,
            Some(base64::engine::general_purpose::STANDARD.encode([9u8; 32]))
        );
    }
}
