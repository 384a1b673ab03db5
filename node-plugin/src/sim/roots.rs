//! The simulated vendor roots, shared by every plugin of a cluster like AMD's ARK or
//! Intel's SGX root: generated once into `--sim-root-dir`, then loaded by every plugin.
//! A policy trusts simulated evidence only when it lists these fingerprints.
//!
//! Layout of the directory:
//!
//! ```text
//! tdx-sim-platform.pem       TDX sim root CA, PCK chain, TCB signing and QE keys (attest's bundle)
//! snp-sim-platform.pem       SNP sim ARK/ASK (attest's bundle)
//! nodes/<node>/snp-vcek.pem  per-node chip key (VCEK) under the shared ASK
//! ```
//!
//! Files are created with create-if-absent semantics, so plugins that start at the same
//! time agree on one root.

use std::path::{Path, PathBuf};

use cvm_attest::tdx::SimTdxPlatform;

use crate::store::{self, StoreError};

/// File holding the TDX simulator bundle.
pub const TDX_FILE: &str = "tdx-sim-platform.pem";

/// Errors loading or creating simulated roots.
#[derive(Debug, thiserror::Error)]
pub enum RootsError {
    #[error("cannot read simulated root {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("simulated root {path} is unusable ({message}); delete the directory to generate a new root (every policy trusting the old one must then be updated)")]
    Invalid { path: PathBuf, message: String },
    #[error("cannot generate a simulated {what} root: {message}")]
    Generate { what: &'static str, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Fingerprints a policy lists to trust the simulator (`sha256:<hex>` of the root DER).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RootFingerprints {
    pub snp: Option<String>,
    pub tdx: Option<String>,
}

impl std::fmt::Display for RootFingerprints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if let Some(s) = &self.snp {
            parts.push(format!("SEV-SNP ARK {s}"));
        }
        if let Some(t) = &self.tdx {
            parts.push(format!("TDX root CA {t}"));
        }
        if parts.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// The simulated signing material this plugin uses.
#[derive(Clone, Default)]
pub struct SimRoots {
    pub tdx: Option<SimTdxPlatform>,
    pub snp: Option<super::snp::SnpSimHost>,
}

impl std::fmt::Debug for SimRoots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SimRoots({})", self.fingerprints())
    }
}

impl SimRoots {
    /// Loads (or creates on first use) what a host of these TEEs needs: the shared TDX
    /// root with this node's own PCK for TDX hosts; the shared SNP root and this node's
    /// chip key for SNP hosts. Each node thus has its own hardware identity.
    pub fn load_or_create(
        dir: &Path,
        node: &str,
        want_snp: bool,
        want_tdx: bool,
    ) -> Result<Self, RootsError> {
        Ok(SimRoots {
            tdx: if want_tdx {
                Some(load_or_create_node_tdx(dir, node)?)
            } else {
                None
            },
            snp: if want_snp {
                Some(super::snp::SnpSimHost::load_or_create(dir, node)?)
            } else {
                None
            },
        })
    }

    pub fn fingerprints(&self) -> RootFingerprints {
        RootFingerprints {
            snp: self.snp.as_ref().map(|s| s.root_fingerprint()),
            tdx: self.tdx.as_ref().map(|t| t.root_fingerprint()),
        }
    }
}

/// Copies the shared roots from `from` into `dir` where `dir` has none yet (a root once
/// there is never replaced: policies trust it). `from` must hold both.
pub fn seed(dir: &Path, from: &Path) -> Result<(), RootsError> {
    for name in [super::snp::SNP_FILE, TDX_FILE] {
        let target = dir.join(name);
        if target.exists() {
            continue;
        }
        let text = read(&from.join(name))?;
        store::create_exclusive(&target, text.as_bytes())?;
    }
    Ok(())
}

/// Loads or creates both roots in `dir` and returns their fingerprints: what `cvm-dev` calls
/// before starting plugins, to write an AttestationPolicy that trusts the simulator.
pub fn cluster_fingerprints(dir: &Path) -> Result<RootFingerprints, RootsError> {
    Ok(RootFingerprints {
        snp: Some(super::snp::root_fingerprint(dir)?),
        tdx: Some(load_or_create_tdx(dir)?.root_fingerprint()),
    })
}

/// Reads the PEM bundle at `path`, first creating it with `make` (PEM text) when absent.
/// Losing a creation race to another plugin is fine: the winner's bundle is read.
pub(crate) fn load_or_create<T, E: std::fmt::Display>(
    path: &Path,
    make: impl FnOnce() -> Result<String, RootsError>,
    parse: impl FnOnce(&str) -> Result<T, E>,
) -> Result<T, RootsError> {
    if !path.exists() {
        store::create_exclusive(path, make()?.as_bytes())?;
    }
    let text = read(path)?;
    parse(&text).map_err(|e| RootsError::Invalid {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn generate_err(what: &'static str) -> impl FnOnce(cvm_attest::tdx::TdxError) -> RootsError {
    move |e| RootsError::Generate {
        what,
        message: e.to_string(),
    }
}

fn load_or_create_tdx(dir: &Path) -> Result<SimTdxPlatform, RootsError> {
    load_or_create(
        &dir.join(TDX_FILE),
        || {
            SimTdxPlatform::generate()
                .map(|p| p.to_pem())
                .map_err(generate_err("TDX"))
        },
        SimTdxPlatform::from_pem,
    )
}

/// The shared TDX bundle with a PCK of `node`'s own (kept in `nodes/<node>/`), so that each
/// simulated TDX host has its own platform identity (PPID), as real hosts do.
fn load_or_create_node_tdx(dir: &Path, node: &str) -> Result<SimTdxPlatform, RootsError> {
    load_or_create(
        &dir.join("nodes").join(node).join(TDX_FILE),
        || {
            load_or_create_tdx(dir)?
                .with_own_pck(node.as_bytes())
                .map(|p| p.to_pem())
                .map_err(generate_err("TDX PCK"))
        },
        SimTdxPlatform::from_pem,
    )
}

pub(crate) fn read(path: &Path) -> Result<String, RootsError> {
    std::fs::read_to_string(path).map_err(|source| RootsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeding_copies_the_shared_roots_once_and_never_replaces_one() {
        let from = tempfile::tempdir().unwrap();
        let want = cluster_fingerprints(from.path()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        seed(dir.path(), from.path()).unwrap();
        assert_eq!(cluster_fingerprints(dir.path()).unwrap(), want);
        // Another seed does not replace the root a policy already trusts.
        let other = tempfile::tempdir().unwrap();
        let theirs = cluster_fingerprints(other.path()).unwrap();
        assert_ne!(theirs, want);
        seed(dir.path(), other.path()).unwrap();
        assert_eq!(cluster_fingerprints(dir.path()).unwrap(), want);
        // A seed without the roots names the missing file.
        let empty = tempfile::tempdir().unwrap();
        let fresh = tempfile::tempdir().unwrap();
        let e = seed(fresh.path(), empty.path()).unwrap_err().to_string();
        assert!(e.contains("snp-sim-platform.pem"), "{e}");
    }
}
