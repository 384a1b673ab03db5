//! TDX quote fuzz body: the decoder and the whole verification path (dcap-qvl
//! included) on arbitrary input, and on edits of a genuine simulated quote. Nothing
//! may panic, and no edited quote may verify with a changed TD report.

use std::sync::OnceLock;

use cvm_attest::tdx::{
    AppraisalContext, DecodedTdQuote, SimTdxPlatform, TdQuoteRequest, TdxTcbStatus, TdxVerifier,
};

const NOW: u64 = 1_790_000_000;

struct Fixture {
    verifier: TdxVerifier,
    genuine: Vec<u8>,
}

/// A verifier trusting a simulated platform, with collateral valid at `NOW`, and one
/// genuine quote, so that mutated quotes reach the signature, QE and TCB checks
/// rather than stopping at the root check.
fn fixture() -> Option<&'static Fixture> {
    static F: OnceLock<Option<Fixture>> = OnceLock::new();
    F.get_or_init(|| {
        let p = SimTdxPlatform::generate_at(NOW).ok()?;
        let genuine = p.quote(&TdQuoteRequest::default()).ok()?;
        let c = p.collateral_json(TdxTcbStatus::UpToDate, &[], NOW).ok()?;
        let verifier = TdxVerifier::new(p.policy(), &c).ok()?;
        Some(Fixture { verifier, genuine })
    })
    .as_ref()
}

/// Seeds for the plain runner: the genuine simulated quote.
pub fn seeds() -> Vec<Vec<u8>> {
    fixture()
        .map(|f| vec![f.genuine.clone()])
        .unwrap_or_default()
}

fn check(f: &Fixture, quote: &[u8]) {
    if let Ok(a) = f.verifier.verify(quote, &AppraisalContext::at(NOW)) {
        if a.verified {
            let n = a.decoded.signed_len;
            assert_eq!(
                quote.get(..n),
                f.genuine.get(..n),
                "a quote with an altered TD report verified"
            );
        }
    }
}

pub fn tdx_quote(data: &[u8]) {
    let _ = DecodedTdQuote::parse(data);
    let Some(f) = fixture() else { return };
    check(f, data);
    // The input read as (offset, xor) edits of the genuine quote: lets libFuzzer
    // explore near-valid quotes without having to rediscover the whole layout.
    let mut edited = f.genuine.clone();
    for e in data.chunks_exact(3) {
        let pos = usize::from(u16::from_le_bytes([e[0], e[1]])) % edited.len();
        edited[pos] ^= e[2];
    }
    check(f, &edited);
}
