//! Fuzz the TDX quote decoder and the full verification path. No input may panic,
//! and no edit of a genuine (simulated) quote may verify with a changed TD report.
#![no_main]

use std::sync::OnceLock;

use cvm_attest::tdx::{
    AppraisalContext, DecodedTdQuote, SimTdxPlatform, TdQuoteRequest, TdxTcbStatus, TdxVerifier,
};
use libfuzzer_sys::fuzz_target;

const NOW: u64 = 1_790_000_000;

/// A verifier trusting a simulated platform (collateral valid at `NOW`) and one
/// genuine quote from it, so that edited quotes reach dcap-qvl's signature, QE and
/// TCB checks rather than stopping at the root check.
fn fixture() -> &'static (TdxVerifier, Vec<u8>) {
    static F: OnceLock<(TdxVerifier, Vec<u8>)> = OnceLock::new();
    F.get_or_init(|| {
        let p = SimTdxPlatform::generate_at(NOW).expect("sim platform");
        let ev = p
            .issue_quote_at(&TdQuoteRequest::default(), NOW)
            .expect("sim quote");
        let c = p
            .collateral_json(TdxTcbStatus::UpToDate, &[], NOW)
            .expect("sim collateral");
        (TdxVerifier::new(p.policy(), &c).expect("verifier"), ev.quote)
    })
}

fuzz_target!(|data: &[u8]| {
    let (verifier, genuine) = fixture();
    let ctx = AppraisalContext::at(NOW);

    // 1. The input as a quote of its own: decode, print, verify; errors are fine.
    if let Ok(q) = DecodedTdQuote::parse(data) {
        let _ = serde_json::to_string(&q);
    }
    let _ = verifier.verify(data, &ctx);

    // 2. The input as edits (offset, xor) of the genuine quote.
    let mut edited = genuine.clone();
    for e in data.chunks_exact(3) {
        let pos = usize::from(u16::from_le_bytes([e[0], e[1]])) % edited.len();
        edited[pos] ^= e[2];
    }
    if let Ok(a) = verifier.verify(&edited, &ctx) {
        if a.verified {
            let signed = a.decoded.signed_len;
            assert_eq!(
                edited[..signed],
                genuine[..signed],
                "an edited TD report verified"
            );
        }
    }
});
