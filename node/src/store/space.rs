//! Free space on the data directory's filesystem, and the read-only mode below a floor.
//!
//! redb latches the first failed I/O call: every later read and write on the database fails
//! until it is reopened, so a commit that runs out of space would take reads down with it (the
//! node used to stop there and could not start again on the full disk). Instead writes are
//! refused, `507 insufficient_storage`, while the filesystem has less than `min_free_bytes`
//! free, before they reach the database: it is never asked to grow into a full disk, and reads
//! go on. A background check every [`SPACE_CHECK_INTERVAL`] lifts the refusal when space
//! returns; the writer checks again right before each commit.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::metrics::Metrics;

/// How often free space is measured in the background.
pub const SPACE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Free space on the data directory's filesystem and whether writes are refused for lack of it.
#[derive(Debug)]
pub struct DiskSpace {
    dir: PathBuf,
    min_free: u64,
    full: AtomicBool,
    free: AtomicU64,
    metrics: Arc<Metrics>,
}

impl DiskSpace {
    /// Watches the filesystem holding `dir`; `min_free` 0 never refuses (and never measures:
    /// the simulator's runs must not depend on the host's disk).
    pub fn new(dir: &Path, min_free: u64, metrics: Arc<Metrics>) -> Self {
        let space = Self {
            dir: dir.to_owned(),
            min_free,
            full: AtomicBool::new(false),
            free: AtomicU64::new(u64::MAX),
            metrics,
        };
        space.check();
        space
    }

    /// Whether writes are refused (as of the last measurement).
    pub fn full(&self) -> bool {
        self.full.load(Ordering::Acquire)
    }

    /// Free bytes as of the last measurement (`u64::MAX` when not measured).
    pub fn free_bytes(&self) -> u64 {
        self.free.load(Ordering::Acquire)
    }

    /// The floor below which writes are refused.
    pub fn min_free_bytes(&self) -> u64 {
        self.min_free
    }

    /// Measures now, updates the mode (logging a change) and returns whether writes are
    /// refused.
    pub fn check(&self) -> bool {
        if self.min_free == 0 {
            return false;
        }
        let free = match free_bytes(&self.dir) {
            Ok(free) => free,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot measure free space");
                return self.full();
            }
        };
        self.free.store(free, Ordering::Release);
        self.metrics
            .storage_free_bytes
            .set(i64::try_from(free).unwrap_or(i64::MAX));
        let full = free < self.min_free;
        let was = self.full.swap(full, Ordering::AcqRel);
        if full != was {
            self.metrics.storage_read_only.set(i64::from(full));
            if full {
                tracing::error!(
                    free_bytes = free,
                    min_free_bytes = self.min_free,
                    dir = %self.dir.display(),
                    "free space below min_free_bytes: refusing writes (read-only) until space returns"
                );
            } else {
                tracing::info!(
                    free_bytes = free,
                    "free space is back above min_free_bytes: taking writes again"
                );
            }
        }
        full
    }
}

/// Free bytes for unprivileged users on the filesystem holding `dir`.
#[cfg(unix)]
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a valid NUL-terminated string and `stat` points to writable memory of
    // the right type; statvfs(3) fills it on success and does not keep either pointer.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it initialised `stat`.
    #[allow(unsafe_code)]
    let stat = unsafe { stat.assume_init() };
    #[allow(clippy::unnecessary_cast)] // The field types differ between platforms.
    Ok((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

/// Elsewhere free space is not measured: writes are never refused for it.
#[cfg(not(unix))]
fn free_bytes(_dir: &Path) -> std::io::Result<u64> {
    Ok(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_floor_above_the_free_space_refuses_and_zero_never_does() {
        let dir = tempfile::tempdir().expect("tempdir");
        let metrics = Arc::new(Metrics::new());
        let never = DiskSpace::new(dir.path(), 0, Arc::clone(&metrics));
        assert!(!never.check());
        assert_eq!(never.free_bytes(), u64::MAX, "not measured");
        let always = DiskSpace::new(dir.path(), u64::MAX, Arc::clone(&metrics));
        assert!(always.full());
        assert!(always.free_bytes() < u64::MAX);
        assert_eq!(metrics.storage_read_only.get(), 1);
        let roomy = DiskSpace::new(dir.path(), 1, Arc::clone(&metrics));
        assert!(!roomy.check());
    }
}
