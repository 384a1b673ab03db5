//! Test support: where the third-party evidence vectors are (`../shared/vectors` beside
//! the checkout, or `$CVM_VECTORS`). Under `CI=true` a missing vector fails the test
//! (here, by panicking in the test that asked); elsewhere the test is skipped with a note.
//! Only tests call this module.

use std::path::PathBuf;

/// `$CVM_VECTORS`, else `<checkout>/../shared/vectors`.
pub fn dir() -> PathBuf {
    std::env::var_os("CVM_VECTORS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/vectors"))
}

fn missing(what: String) -> Option<()> {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{what} (vectors are required under CI=true)"
    );
    eprintln!("note: skipping: {what}");
    None
}

/// The path of vector `rel`, or `None` (skip) when it is absent outside CI.
pub fn path(rel: &str) -> Option<PathBuf> {
    let p = dir().join(rel);
    if p.exists() {
        return Some(p);
    }
    missing(format!("vector {} is missing", p.display()))?;
    None
}

/// The bytes of vector `rel`, or `None` (skip) when it is unreadable outside CI.
pub fn read(rel: &str) -> Option<Vec<u8>> {
    let p = dir().join(rel);
    match std::fs::read(&p) {
        Ok(b) => Some(b),
        Err(e) => {
            missing(format!("vector {} is not readable: {e}", p.display()))?;
            None
        }
    }
}
