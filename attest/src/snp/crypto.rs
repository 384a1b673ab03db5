//! The report-signature hot path: ECDSA P-384/SHA-384 over the signed bytes.
//!
//! The VEK key is parsed once per cached chain. With the `aws-lc` feature the check
//! uses aws-lc-rs with a pre-parsed key (measured faster for P-384, see
//! `benches/verify.rs`); otherwise ring. Certificates (cold path) always use ring.

use std::fmt;

/// A VEK public key ready for repeated report-signature checks.
#[derive(Clone)]
pub struct ReportKey {
    point: Vec<u8>,
    #[cfg(feature = "aws-lc")]
    parsed: Option<aws_lc_rs::signature::ParsedPublicKey>,
}

impl fmt::Debug for ReportKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReportKey")
            .field("point", &hex::encode(&self.point))
            .finish()
    }
}

impl ReportKey {
    /// `point`: uncompressed SEC1 P-384 point (0x04 ‖ x ‖ y).
    pub fn new(point: &[u8]) -> Self {
        ReportKey {
            point: point.to_vec(),
            #[cfg(feature = "aws-lc")]
            parsed: aws_lc_rs::signature::ParsedPublicKey::new(
                &aws_lc_rs::signature::ECDSA_P384_SHA384_FIXED,
                point,
            )
            .ok(),
        }
    }

    /// Which implementation [`Self::verify`] uses.
    pub fn backend() -> &'static str {
        if cfg!(feature = "aws-lc") {
            "aws-lc-rs (pre-parsed key)"
        } else {
            "ring"
        }
    }

    /// Verify a fixed-size (r ‖ s, big-endian) signature over `msg`.
    pub fn verify(&self, msg: &[u8], sig: &[u8; 96]) -> bool {
        #[cfg(feature = "aws-lc")]
        {
            match &self.parsed {
                Some(k) => k.verify_sig(msg, sig).is_ok(),
                None => false,
            }
        }
        #[cfg(not(feature = "aws-lc"))]
        {
            ring::signature::UnparsedPublicKey::new(
                &ring::signature::ECDSA_P384_SHA384_FIXED,
                &self.point,
            )
            .verify(msg, sig)
            .is_ok()
        }
    }
}
