//! Where backups go, and the names of what is there.
//!
//! ```text
//! <location>/verge-backup.json                          which store writes here
//! <location>/snapshots/<seq:020>-<at_ms:013>.vbk         every row at feed position seq
//! <location>/segments/<from:020>-<to:020>-<at_ms:013>.vbk  documents changed in (from, to]
//! ```
//!
//! Names sort by position, so listing a prefix gives the chain in order; `at_ms` is when the
//! object's view of the store was taken (every change in it committed before then), which is
//! what `verge restore --at` compares.

use std::sync::Arc;

use object_store::ObjectStore;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;

/// The descriptor object, naming the store that writes to a location.
pub const DESCRIPTOR: &str = "verge-backup.json";
/// Folder of snapshots.
pub const SNAPSHOTS: &str = "snapshots";
/// Folder of segments.
pub const SEGMENTS: &str = "segments";
/// Suffix of snapshot and segment objects.
const SUFFIX: &str = ".vbk";
/// Marks a partial segment's name.
const PARTIAL: &str = "-partial";

/// A backup location, opened.
#[derive(Debug, Clone)]
pub struct Target {
    /// The objects, relative to the location.
    pub store: Arc<dyn ObjectStore>,
    /// The location as configured (for messages; no credentials are part of it).
    pub url: String,
}

/// Why a location cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The URL is not one this version understands.
    #[error("backup location {url:?}: {why} (use s3://BUCKET/PREFIX or file:///ABSOLUTE/PATH)")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The object store client could not be built (for example bad `AWS_*` settings).
    #[error("backup location {url}: {source}")]
    Client {
        /// The URL.
        url: String,
        /// The client's error.
        source: object_store::Error,
    },
    /// A local directory could not be created.
    #[error("backup location {url}: creating {path}: {source}")]
    Dir {
        /// The URL.
        url: String,
        /// The directory.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl Target {
    /// Opens `url`: `s3://bucket/prefix` (endpoint, region and credentials from the standard
    /// `AWS_*` variables, as every S3 tool reads them) or `file:///path` (created if missing).
    pub fn open(url: &str) -> Result<Self, TargetError> {
        let bad = |why| TargetError::Url {
            url: url.to_owned(),
            why,
        };
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("no bucket"));
            }
            // reqwest is built without a TLS provider of its own; use the one the node uses.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let s3 = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()
                .map_err(|source| TargetError::Client {
                    url: url.to_owned(),
                    source,
                })?;
            let prefix = prefix.trim_matches('/');
            let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
                Arc::new(s3)
            } else {
                Arc::new(PrefixStore::new(s3, prefix))
            };
            return Ok(Self {
                store,
                url: url.to_owned(),
            });
        }
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(bad("a file location needs an absolute path"));
            }
            std::fs::create_dir_all(path).map_err(|source| TargetError::Dir {
                url: url.to_owned(),
                path: path.to_owned(),
                source,
            })?;
            let local =
                object_store::local::LocalFileSystem::new_with_prefix(path).map_err(|source| {
                    TargetError::Client {
                        url: url.to_owned(),
                        source,
                    }
                })?;
            return Ok(Self {
                store: Arc::new(local),
                url: url.to_owned(),
            });
        }
        Err(bad("unknown scheme"))
    }
}

/// A snapshot object's name fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SnapshotName {
    /// The feed position it stands at.
    pub seq: u64,
    /// When its view was taken, Unix milliseconds.
    pub at_ms: i64,
}

/// A segment object's name fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SegmentName {
    /// The position it continues from.
    pub from: u64,
    /// The position it brings the documents to.
    pub to: u64,
    /// When its view was taken, Unix milliseconds.
    pub at_ms: i64,
    /// It covers only part of what its view held ([`super::SEGMENT_RECORDS_MAX`] records):
    /// documents changed only after `to` wait for the next segment, so a restore ending on it
    /// is complete only up to the previous object's time.
    pub partial: bool,
}

impl SnapshotName {
    /// Its path under the location.
    pub fn path(&self) -> ObjectPath {
        ObjectPath::from(format!(
            "{SNAPSHOTS}/{:020}-{:013}{SUFFIX}",
            self.seq, self.at_ms
        ))
    }

    /// Parses the last part of a path; `None` for anything else.
    pub fn parse(file: &str) -> Option<Self> {
        let stem = file.strip_suffix(SUFFIX)?;
        let (seq, at) = stem.split_once('-')?;
        Some(Self {
            seq: digits(seq, 20)?,
            at_ms: i64::try_from(digits(at, 13)?).ok()?,
        })
    }
}

impl SegmentName {
    /// Its path under the location.
    pub fn path(&self) -> ObjectPath {
        ObjectPath::from(format!(
            "{SEGMENTS}/{:020}-{:020}-{:013}{}{SUFFIX}",
            self.from,
            self.to,
            self.at_ms,
            if self.partial { PARTIAL } else { "" }
        ))
    }

    /// Parses the last part of a path; `None` for anything else.
    pub fn parse(file: &str) -> Option<Self> {
        let stem = file.strip_suffix(SUFFIX)?;
        let (stem, partial) = match stem.strip_suffix(PARTIAL) {
            Some(stem) => (stem, true),
            None => (stem, false),
        };
        let mut parts = stem.split('-');
        let from = digits(parts.next()?, 20)?;
        let to = digits(parts.next()?, 20)?;
        let at_ms = i64::try_from(digits(parts.next()?, 13)?).ok()?;
        if parts.next().is_some() || to <= from {
            return None;
        }
        Some(Self {
            from,
            to,
            at_ms,
            partial,
        })
    }
}

fn digits(s: &str, len: usize) -> Option<u64> {
    if s.len() != len || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_sort_by_position() {
        let a = SegmentName {
            from: 9,
            to: 10,
            at_ms: 1_700_000_000_000,
            partial: false,
        };
        let b = SegmentName {
            from: 10,
            to: 200,
            at_ms: 1_700_000_000_500,
            partial: true,
        };
        let pa = a.path().to_string();
        let pb = b.path().to_string();
        assert!(pa < pb);
        assert_eq!(SegmentName::parse(pa.rsplit('/').next().unwrap()), Some(a));
        assert_eq!(SegmentName::parse(pb.rsplit('/').next().unwrap()), Some(b));
        let s = SnapshotName {
            seq: 42,
            at_ms: 1_700_000_000_000,
        };
        let ps = s.path().to_string();
        assert_eq!(SnapshotName::parse(ps.rsplit('/').next().unwrap()), Some(s));
        for junk in [
            "",
            "x.vbk",
            "1-2.vbk",
            "00000000000000000001-0000000000001",
            ".vbk",
        ] {
            assert_eq!(SnapshotName::parse(junk), None, "{junk}");
            assert_eq!(SegmentName::parse(junk), None, "{junk}");
        }
    }

    #[test]
    fn urls_are_checked() {
        assert!(Target::open("http://x").is_err());
        assert!(Target::open("file://relative/path").is_err());
        assert!(Target::open("s3:///prefix").is_err());
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/nested/backups", dir.path().display());
        Target::open(&url).unwrap();
        assert!(dir.path().join("nested/backups").is_dir());
    }
}
