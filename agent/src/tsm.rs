//! Evidence from the kernel's configfs-tsm report interface
//! (`Documentation/ABI/testing/configfs-tsm-report`).
//!
//! One report: `mkdir report/<unique>`; write 64 bytes to `inblob`; read `generation`,
//! `outblob`, `auxblob` (SNP certificates) and `provider`; read `generation` again (it
//! counts writes, so a change means someone else wrote to the entry meanwhile and the
//! outblob may answer their inblob); `rmdir` the entry. A unique entry per report keeps
//! concurrent agents (or tools) out of each other's way.
//!
//! File operations go through [`TsmFs`] so tests can run on a plain directory whose fake
//! "kernel" produces `outblob` when `inblob` is written.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use std::io::Read as _;

/// The usual mount point of the interface.
pub const DEFAULT_TSM_ROOT: &str = "/sys/kernel/config/tsm";
/// Largest outblob/auxblob read (the kernel caps outblob at 32 KiB; SNP certificate tables
/// are a few pages).
pub const MAX_BLOB_BYTES: u64 = 512 * 1024;

/// What configfs-tsm returned for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TsmReport {
    pub provider: String,
    pub outblob: Vec<u8>,
    pub auxblob: Option<Vec<u8>>,
    pub generation: u64,
}

/// Why no report could be produced.
#[derive(Debug, thiserror::Error)]
pub enum TsmError {
    #[error("{0}")]
    ProviderMissing(String),
    #[error("{0}")]
    ReportFailed(String),
    #[error("report entry {entry} was written by someone else while being read (generation {before} → {after}); retry")]
    Conflict {
        entry: String,
        before: u64,
        after: u64,
    },
}

/// The file operations the interface needs.
pub trait TsmFs: Send + Sync {
    fn create_dir(&self, path: &Path) -> io::Result<()>;
    fn write(&self, path: &Path, data: &[u8]) -> io::Result<()>;
    /// Reads at most `max` bytes.
    fn read(&self, path: &Path, max: u64) -> io::Result<Vec<u8>>;
    /// Removes a report entry (configfs removes its attribute files with it).
    fn remove_entry(&self, path: &Path) -> io::Result<()>;
}

/// The real filesystem.
pub struct RealFs;

impl TsmFs for RealFs {
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir(path)
    }
    fn write(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        // configfs binary attributes take the whole value in one write.
        std::fs::write(path, data)
    }
    fn read(&self, path: &Path, max: u64) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        std::fs::File::open(path)?.take(max).read_to_end(&mut out)?;
        Ok(out)
    }
    fn remove_entry(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir(path)
    }
}

/// The configfs-tsm backend.
pub struct ConfigfsTsm {
    root: PathBuf,
    fs: Arc<dyn TsmFs>,
    counter: AtomicU64,
    /// The guest TEE devices whose absence a `provider-missing` answer names.
    devices: Vec<PathBuf>,
}

/// The SEV-SNP and TDX guest drivers' devices.
pub const GUEST_DEVICES: [&str; 2] = ["/dev/sev-guest", "/dev/tdx_guest"];

const ENXIO: i32 = 6;
const EOPNOTSUPP: i32 = 95;

/// Removes the report entry however `report` returns.
struct EntryGuard<'a> {
    fs: &'a dyn TsmFs,
    path: PathBuf,
}

impl Drop for EntryGuard<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.fs.remove_entry(&self.path) {
            tracing::warn!("cannot remove report entry {}: {e}", self.path.display());
        }
    }
}

impl ConfigfsTsm {
    /// The interface at `root` (normally [`DEFAULT_TSM_ROOT`]).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self::with_fs(root, Arc::new(RealFs))
    }

    pub fn with_fs(root: impl Into<PathBuf>, fs: Arc<dyn TsmFs>) -> Self {
        ConfigfsTsm {
            root: root.into(),
            fs,
            counter: AtomicU64::new(0),
            devices: GUEST_DEVICES.iter().map(PathBuf::from).collect(),
        }
    }

    /// Checks these device paths instead of [`GUEST_DEVICES`] (tests).
    pub fn with_devices(mut self, devices: Vec<PathBuf>) -> Self {
        self.devices = devices;
        self
    }

    /// A missing provider, with what else the guest lacks: the node plugin copies this
    /// into the CVM's condition, so it says what the guest would need.
    fn lacking(&self, e: TsmError) -> TsmError {
        let TsmError::ProviderMissing(m) = e else {
            return e;
        };
        let (present, absent): (Vec<&PathBuf>, Vec<&PathBuf>) =
            self.devices.iter().partition(|d| d.exists());
        let list = |v: &[&PathBuf]| {
            v.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(" or ")
        };
        let mut out = m;
        if !absent.is_empty() {
            out.push_str(&format!(
                "; the guest has no {} (no SEV-SNP or TDX guest device): it does not run in a TEE",
                list(&absent)
            ));
        }
        if !present.is_empty() {
            out.push_str(&format!("; {} exists", list(&present)));
        }
        TsmError::ProviderMissing(out)
    }

    fn report_dir(&self) -> Result<PathBuf, TsmError> {
        let dir = self.root.join("report");
        if dir.is_dir() {
            Ok(dir)
        } else {
            Err(TsmError::ProviderMissing(format!(
                "{} is absent: configfs is not mounted (mount -t configfs none /sys/kernel/config) or the kernel lacks CONFIG_TSM_REPORTS",
                dir.display()
            )))
        }
    }

    fn read_text(&self, path: &Path) -> io::Result<String> {
        let bytes = self.fs.read(path, 4096)?;
        Ok(String::from_utf8_lossy(&bytes).trim().to_string())
    }

    fn generation(&self, entry: &Path) -> Result<u64, TsmError> {
        let p = entry.join("generation");
        let t = self
            .read_text(&p)
            .map_err(|e| TsmError::ReportFailed(format!("reading {}: {e}", p.display())))?;
        t.parse().map_err(|_| {
            TsmError::ReportFailed(format!("{} holds {t:?}, not a number", p.display()))
        })
    }

    fn provider_of(&self, entry: &Path) -> Result<String, TsmError> {
        let p = entry.join("provider");
        let missing = || {
            TsmError::ProviderMissing(
                "no TSM provider is registered: load the sev-guest (SEV-SNP) or tdx-guest (TDX) driver".into(),
            )
        };
        match self.read_text(&p) {
            Ok(t) if t.is_empty() => Err(missing()),
            Ok(t) => Ok(t),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(missing()),
            Err(e) => Err(TsmError::ReportFailed(format!(
                "reading {}: {e}",
                p.display()
            ))),
        }
    }

    /// Creates a fresh entry.
    fn new_entry(&self) -> Result<EntryGuard<'_>, TsmError> {
        let dir = self.report_dir()?;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = dir.join(format!("cvm-agent-{}-{n}-{nanos}", std::process::id()));
        match self.fs.create_dir(&path) {
            Ok(()) => Ok(EntryGuard {
                fs: self.fs.as_ref(),
                path,
            }),
            // The kernel answers ENXIO when no provider has registered.
            Err(e) if e.raw_os_error() == Some(ENXIO) => Err(TsmError::ProviderMissing(
                "no TSM provider is registered (mkdir gave ENXIO): load the sev-guest (SEV-SNP) or tdx-guest (TDX) driver".into(),
            )),
            Err(e) => Err(TsmError::ReportFailed(format!(
                "cannot create report entry {}: {e}",
                path.display()
            ))),
        }
    }

    /// The provider name (`sev_guest`, `tdx_guest`).
    pub fn provider(&self) -> Result<String, TsmError> {
        let entry = self.new_entry().map_err(|e| self.lacking(e))?;
        self.provider_of(&entry.path).map_err(|e| self.lacking(e))
    }

    /// A report whose report data is `report_data`.
    pub fn report(&self, report_data: &[u8; 64]) -> Result<TsmReport, TsmError> {
        self.report_inner(report_data).map_err(|e| self.lacking(e))
    }

    fn report_inner(&self, report_data: &[u8; 64]) -> Result<TsmReport, TsmError> {
        let entry = self.new_entry()?;
        let e = &entry.path;
        let provider = self.provider_of(e)?;
        let inblob = e.join("inblob");
        self.fs.write(&inblob, report_data).map_err(|err| {
            TsmError::ReportFailed(format!("writing {}: {err}", inblob.display()))
        })?;
        let before = self.generation(e)?;
        let out_path = e.join("outblob");
        let outblob = self.fs.read(&out_path, MAX_BLOB_BYTES).map_err(|err| {
            TsmError::ReportFailed(format!(
                "reading {} (the {provider} driver could not get a report from the TEE): {err}",
                out_path.display()
            ))
        })?;
        if outblob.is_empty() {
            return Err(TsmError::ReportFailed(format!(
                "{} is empty",
                out_path.display()
            )));
        }
        let aux_path = e.join("auxblob");
        let auxblob = match self.fs.read(&aux_path, MAX_BLOB_BYTES) {
            Ok(b) if b.is_empty() => None,
            Ok(b) => Some(b),
            // Providers without supplemental data hide or refuse the attribute.
            Err(err)
                if err.kind() == io::ErrorKind::NotFound
                    || err.raw_os_error() == Some(EOPNOTSUPP) =>
            {
                None
            }
            Err(err) => {
                return Err(TsmError::ReportFailed(format!(
                    "reading {}: {err}",
                    aux_path.display()
                )))
            }
        };
        let after = self.generation(e)?;
        if after != before {
            return Err(TsmError::Conflict {
                entry: e.display().to_string(),
                before,
                after,
            });
        }
        Ok(TsmReport {
            provider,
            outblob,
            auxblob,
            generation: before,
        })
    }
}
