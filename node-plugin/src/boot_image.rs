//! Boot artifacts out of container images (`oci://IMAGE#/PATH`, KubeVirt's kernel boot):
//! the launcher pod's init containers run `cvm-launcher install` (the static launcher into
//! an emptyDir) and then, in each boot image, `cvm-launcher copy-artifacts` (its files
//! into the launcher's directory). An image needs no shell or tools of its own. The node
//! plugin checks the copies' digests before QEMU reads them ([`crate::qemu::stage_artifact`]).

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

/// What a boot artifact may be called in the launcher's directory.
pub const ARTIFACTS: [&str; 3] = ["firmware", "kernel", "initrd"];

#[derive(Debug, thiserror::Error)]
pub enum BootImageError {
    #[error("{arg:?} is not WHAT=/PATH with WHAT one of firmware, kernel, initrd")]
    Argument { arg: String },
    #[error(
        "{what}: {path} is not in the image ({source}): check the #/PATH of spec.boot.{what}.url"
    )]
    Missing {
        what: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{what}: {path} in the image is not a regular file: spec.boot.{what}.url must name a file"
    )]
    NotAFile { what: String, path: PathBuf },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Parses `WHAT=/PATH`.
pub fn parse_file_arg(arg: &str) -> Result<(String, PathBuf), BootImageError> {
    let bad = || BootImageError::Argument { arg: arg.into() };
    let (what, path) = arg.split_once('=').ok_or_else(bad)?;
    if !ARTIFACTS.contains(&what) || !path.starts_with('/') {
        return Err(bad());
    }
    Ok((what.to_string(), PathBuf::from(path)))
}

/// Copies this executable to `to/cvm-launcher`, executable by all.
pub fn install(to: &Path) -> Result<PathBuf, BootImageError> {
    let dest = to.join("cvm-launcher");
    let write = |source| BootImageError::Write {
        path: dest.clone(),
        source,
    };
    let me = std::env::current_exe().map_err(write)?;
    std::fs::copy(&me, &dest).map_err(write)?;
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755)).map_err(write)?;
    Ok(dest)
}

/// Copies each `(what, path)` to `into/what`, readable by all (the plugin reads it from
/// the host). A partial copy never carries the final name.
pub fn copy_artifacts(into: &Path, files: &[(String, PathBuf)]) -> Result<(), BootImageError> {
    std::fs::create_dir_all(into).map_err(|source| BootImageError::Write {
        path: into.to_path_buf(),
        source,
    })?;
    for (what, path) in files {
        let meta = std::fs::metadata(path).map_err(|source| BootImageError::Missing {
            what: what.clone(),
            path: path.clone(),
            source,
        })?;
        if !meta.is_file() {
            return Err(BootImageError::NotAFile {
                what: what.clone(),
                path: path.clone(),
            });
        }
        let dest = into.join(what);
        let partial = into.join(format!(".{what}.partial"));
        let write = |source| BootImageError::Write {
            path: dest.clone(),
            source,
        };
        let mut from = std::fs::File::open(path).map_err(|source| BootImageError::Missing {
            what: what.clone(),
            path: path.clone(),
            source,
        })?;
        let mut to = std::fs::File::create(&partial).map_err(write)?;
        std::io::copy(&mut from, &mut to).map_err(write)?;
        to.flush().map_err(write)?;
        to.sync_all().map_err(write)?;
        std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o644))
            .map_err(write)?;
        std::fs::rename(&partial, &dest).map_err(write)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_name_a_known_artifact_and_an_absolute_path() {
        assert_eq!(
            parse_file_arg("kernel=/disk/vmlinuz").unwrap(),
            ("kernel".to_string(), PathBuf::from("/disk/vmlinuz"))
        );
        for bad in [
            "kernel",
            "kernel=disk/vmlinuz",
            "../x=/a",
            "rootfs=/a",
            "=/a",
        ] {
            assert!(parse_file_arg(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn copies_are_complete_and_readable_and_a_missing_file_is_named() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("vmlinuz");
        std::fs::write(&src, b"kernel bytes").unwrap();
        let into = d.path().join("out");
        copy_artifacts(&into, &[("kernel".into(), src.clone())]).unwrap();
        assert_eq!(std::fs::read(into.join("kernel")).unwrap(), b"kernel bytes");
        let mode = std::fs::metadata(into.join("kernel"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
        assert!(!into.join(".kernel.partial").exists());

        let e = copy_artifacts(&into, &[("initrd".into(), d.path().join("nope"))]).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("initrd:") && msg.contains("nope") && msg.contains("spec.boot.initrd.url"),
            "{msg}"
        );
        let e = copy_artifacts(&into, &[("kernel".into(), d.path().to_path_buf())]).unwrap_err();
        assert!(matches!(e, BootImageError::NotAFile { .. }), "{e}");
    }
}
