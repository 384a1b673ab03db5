//! Small files written atomically: a reader (or a plugin restarted after a crash) sees the
//! old content or the new one, never a torn write.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Errors reading or writing a state file; each names the path.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is corrupt ({source}); move it aside to start with an empty state")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot encode state for {path}: {source}")]
    Encode {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot lock {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The lock file a node plugin holds on its state directory while it runs.
pub const LOCK_FILE: &str = "plugin.lock";

/// An exclusive `flock(2)` on `<state dir>/plugin.lock`, held for the process's life.
/// Two plugins on one state directory would each launch a guest for the same CVM from
/// their own view of the guest file (two instances, two keys): the second one waits.
/// The kernel drops the lock when the holder dies, kill -9 included.
#[derive(Debug)]
pub struct StateLock {
    _file: fs::File,
    path: PathBuf,
}

impl StateLock {
    /// Takes the lock if it is free; `Ok(None)` when another process holds it.
    pub fn try_acquire(state_dir: &Path) -> Result<Option<StateLock>, StoreError> {
        let path = state_dir.join(LOCK_FILE);
        let err = |source| StoreError::Lock {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(state_dir).map_err(err)?;
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(err)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(StateLock { _file: file, path })),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(err(e)),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Writes `bytes` to `path` via a temp file in the same directory, fsync, then rename
/// (rename is atomic within one file system).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let err = |source| StoreError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(err)?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "state".into());
    let tmp = dir.join(format!(".{file_name}.tmp.{}", std::process::id()));
    let mut f = fs::File::create(&tmp).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    drop(f);
    fs::rename(&tmp, path).map_err(err)?;
    // Persist the rename itself; failure here only weakens durability, not atomicity.
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Creates `path` with `bytes` only if it does not exist yet. Returns false when another
/// writer won the race (the caller then reads theirs). Used for keys that every plugin of
/// a cluster must share.
pub fn create_exclusive(path: &Path, bytes: &[u8]) -> Result<bool, StoreError> {
    let err = |source| StoreError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(err)?;
    let tmp = dir.join(format!(
        ".{}.new.{}",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let mut f = fs::File::create(&tmp).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    drop(f);
    // hard_link fails if the target exists: an atomic "create if absent" with full content.
    let won = match fs::hard_link(&tmp, path) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(err(e));
        }
    };
    let _ = fs::remove_file(&tmp);
    Ok(won)
}

/// Reads a JSON state file; a missing file is the default state.
pub fn read_json<T: DeserializeOwned + Default>(path: &Path) -> Result<T, StoreError> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
            path: path.to_path_buf(),
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(source) => Err(StoreError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Writes a JSON state file atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|source| StoreError::Encode {
        path: path.to_path_buf(),
        source,
    })?;
    write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn json_round_trip_and_missing_is_default() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/state.json");
        let empty: BTreeMap<String, u32> = read_json(&p).unwrap();
        assert!(empty.is_empty());
        let v = BTreeMap::from([("a".to_string(), 1u32)]);
        write_json(&p, &v).unwrap();
        assert_eq!(read_json::<BTreeMap<String, u32>>(&p).unwrap(), v);
        // No temp file is left behind.
        let names: Vec<_> = fs::read_dir(p.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
    }

    #[test]
    fn corrupt_file_names_itself() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.json");
        fs::write(&p, b"{not json").unwrap();
        let e = read_json::<BTreeMap<String, u32>>(&p).unwrap_err();
        assert!(e.to_string().contains("state.json is corrupt"), "{e}");
    }

    #[test]
    fn one_holder_of_the_state_lock_at_a_time() {
        let d = tempfile::tempdir().unwrap();
        let first = StateLock::try_acquire(d.path()).unwrap();
        assert!(first.is_some(), "a free lock is taken");
        assert!(
            StateLock::try_acquire(d.path()).unwrap().is_none(),
            "a second holder is refused while the first lives"
        );
        drop(first);
        assert!(StateLock::try_acquire(d.path()).unwrap().is_some());
    }

    #[test]
    fn create_exclusive_keeps_the_first_writer() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("root.pem");
        assert!(create_exclusive(&p, b"first").unwrap());
        assert!(!create_exclusive(&p, b"second").unwrap());
        assert_eq!(fs::read(&p).unwrap(), b"first");
    }
}
