//! `verge restore`: a data directory from a backup location, as of its latest state or a
//! given time.
//!
//! The restore picks the newest snapshot taken at or before the time, then every segment
//! after it up to the time, and checks the chain has no gap before reading anything. It
//! builds the store in a directory beside the target and renames it into place only once
//! every object was read, authenticated and written: a damaged or missing object leaves no
//! half-restored directory behind.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use object_store::ObjectStoreExt;

use super::format::{Entry, Kind, ObjectDecoder};
use super::target::{SegmentName, SnapshotName, Target};
use super::{BackupError, Listing};
use crate::store::{EncryptionKey, FrameCipher, Store, StoreError, StoreOptions};

/// `verge restore` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct RestoreArgs {
    /// The backup location: s3://BUCKET/PREFIX (AWS_* environment) or file:///PATH.
    #[arg(long, value_name = "URL")]
    pub from: String,
    /// The data directory to create (must not exist, or be empty).
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Restore the state as of this time (RFC 3339, e.g. 2026-12-01T10:00:00Z) instead of
    /// the latest: the newest snapshot and segments taken at or before it.
    #[arg(long, value_name = "TIME")]
    pub at: Option<String>,
    /// The store's encryption key, when the backup is of an encrypted store.
    #[arg(long, env = "VERGE_ENCRYPTION_KEY_FILE", value_name = "FILE")]
    pub encryption_key_file: Option<PathBuf>,
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct Restored {
    /// The snapshot it started from.
    pub snapshot: SnapshotName,
    /// Segments applied after it.
    pub segments: usize,
    /// Bytes read.
    pub bytes: u64,
    /// Documents in the restored store.
    pub documents: u64,
    /// The time the restored state is from (the last object's view), Unix milliseconds.
    pub as_of_ms: i64,
    /// How long it took.
    pub elapsed_ms: u128,
}

/// Why a restore failed. Nothing was left in the target directory.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// The location could not be used.
    #[error(transparent)]
    Target(#[from] super::target::TargetError),
    /// Listing or reading failed.
    #[error(transparent)]
    Backup(#[from] BackupError),
    /// No snapshot to start from.
    #[error("{url} holds no snapshot{at}")]
    NoSnapshot {
        /// The location.
        url: String,
        /// " taken at or before TIME", when `--at` was given.
        at: String,
    },
    /// A segment the chain needs is not there.
    #[error(
        "{url} is missing the segment after feed position {after} (the next one starts at {next}); the backup cannot be restored past it{hint}"
    )]
    Gap {
        /// The location.
        url: String,
        /// The position reached.
        after: u64,
        /// Where the next segment starts.
        next: u64,
        /// What to do.
        hint: &'static str,
    },
    /// An object is damaged, or the key is wrong.
    #[error("{object}: {source}")]
    Object {
        /// The object's name.
        object: String,
        /// What is wrong.
        source: super::format::FormatError,
    },
    /// Reading an object failed.
    #[error("{object}: {source}")]
    Read {
        /// The object's name.
        object: String,
        /// The object store's error.
        source: object_store::Error,
    },
    /// Writing the new store failed.
    #[error("writing the restored store: {0}")]
    Store(#[from] StoreError),
    /// A file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
}

/// Parses `--at`.
pub fn parse_at(at: &str) -> Result<i64, RestoreError> {
    chrono::DateTime::parse_from_rfc3339(at)
        .map(|t| t.timestamp_millis())
        .map_err(|e| {
            RestoreError::Usage(format!(
                "--at {at:?} is not an RFC 3339 time like 2026-12-01T10:00:00Z: {e}"
            ))
        })
}

/// Formats Unix milliseconds as RFC 3339.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| ms.to_string())
}

/// What a restore reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The snapshot it starts from.
    pub snapshot: SnapshotName,
    /// The segments after it, in order, without a gap.
    pub segments: Vec<SegmentName>,
    /// Every write acknowledged before this time is in the restored state: the time of the
    /// last object that is not a partial segment.
    pub as_of_ms: i64,
}

/// The snapshot and segments a restore to `at_ms` reads, checked for gaps.
pub fn plan(listing: &Listing, at_ms: Option<i64>, url: &str) -> Result<Plan, RestoreError> {
    let within = |t: i64| at_ms.is_none_or(|at| t <= at);
    let snapshot = listing
        .snapshots
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| within(n.at_ms))
        .max_by_key(|n| (n.at_ms, n.seq))
        .ok_or_else(|| RestoreError::NoSnapshot {
            url: url.to_owned(),
            at: at_ms.map_or(String::new(), |t| {
                format!(" taken at or before {}", rfc3339(t))
            }),
        })?;
    let mut chain = Vec::new();
    let mut reached = snapshot.seq;
    // Segments written after the snapshot's view, in the order they were written.
    for (name, _) in &listing.segments {
        if name.at_ms < snapshot.at_ms || !within(name.at_ms) || name.to <= reached {
            continue;
        }
        if name.from > reached {
            return Err(RestoreError::Gap {
                url: url.to_owned(),
                after: reached,
                next: name.from,
                hint: if at_ms.is_some() {
                    ""
                } else {
                    "; `--at` a time before the gap restores what precedes it"
                },
            });
        }
        chain.push(*name);
        reached = name.to;
    }
    let as_of_ms = chain
        .iter()
        .rev()
        .find(|s| !s.partial)
        .map_or(snapshot.at_ms, |s| s.at_ms);
    Ok(Plan {
        snapshot,
        segments: chain,
        as_of_ms,
    })
}

/// Runs a restore.
pub async fn restore(args: &RestoreArgs) -> Result<Restored, RestoreError> {
    let started = Instant::now();
    let at_ms = args.at.as_deref().map(parse_at).transpose()?;
    let key = match &args.encryption_key_file {
        Some(file) => Some(
            EncryptionKey::from_file(file)
                .map_err(|e| RestoreError::Usage(format!("{}: {e}", file.display())))?,
        ),
        None => None,
    };
    let target_dir = &args.data_dir;
    check_empty(target_dir)?;
    let target = Target::open(&args.from)?;
    let listing = Listing::read(target.store.as_ref()).await?;
    let Plan {
        snapshot,
        segments,
        as_of_ms,
    } = plan(&listing, at_ms, &target.url)?;
    tracing::info!(
        snapshot = %snapshot.path(),
        segments = segments.len(),
        "restoring"
    );
    // An existing (empty) target may be a mount point: build inside it, on its filesystem,
    // and move the files up at the end. A new one is built beside it and renamed.
    let inside = target_dir.is_dir();
    let building = if inside {
        target_dir.join(BUILDING_INSIDE)
    } else {
        sibling(target_dir, ".restoring")?
    };
    if building.exists() {
        std::fs::remove_dir_all(&building).map_err(|source| RestoreError::Io {
            context: format!(
                "removing an earlier unfinished restore {}",
                building.display()
            ),
            source,
        })?;
    }
    let result = match build(&target, &building, key, snapshot, &segments).await {
        Ok(done) => put_in_place(&building, target_dir, inside).map(|()| done),
        Err(e) => Err(e),
    };
    let (bytes, documents) = match result {
        Ok(done) => done,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&building);
            return Err(e);
        }
    };
    Ok(Restored {
        snapshot,
        segments: segments.len(),
        bytes,
        documents,
        as_of_ms,
        elapsed_ms: started.elapsed().as_millis(),
    })
}

/// Where a restore into an existing directory builds the store.
const BUILDING_INSIDE: &str = ".verge-restoring";

/// Moves the built store into place and makes the move durable.
fn put_in_place(building: &Path, target_dir: &Path, inside: bool) -> Result<(), RestoreError> {
    let io = |context: String| move |source| RestoreError::Io { context, source };
    if inside {
        let entries =
            std::fs::read_dir(building).map_err(io(format!("reading {}", building.display())))?;
        for entry in entries {
            let entry = entry.map_err(io(format!("reading {}", building.display())))?;
            let to = target_dir.join(entry.file_name());
            std::fs::rename(entry.path(), &to).map_err(io(format!(
                "moving {} to {}",
                entry.path().display(),
                to.display()
            )))?;
        }
        std::fs::remove_dir(building).map_err(io(format!("removing {}", building.display())))?;
        sync_dir(target_dir);
    } else {
        std::fs::rename(building, target_dir).map_err(io(format!(
            "moving {} to {}",
            building.display(),
            target_dir.display()
        )))?;
        if let Some(parent) = target_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent);
        }
    }
    Ok(())
}

/// Best effort: the move is done; a failure to make it durable now is not worth undoing it.
fn sync_dir(dir: &Path) {
    let _ = crate::store::sync_dir(dir);
}

fn check_empty(dir: &Path) -> Result<(), RestoreError> {
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            // A fresh filesystem's lost+found, and an interrupted restore's work, do not count.
            let mut others = entries.filter_map(Result::ok).filter(|e| {
                let name = e.file_name();
                name != "lost+found" && name != BUILDING_INSIDE
            });
            if others.next().is_some() {
                return Err(RestoreError::Usage(format!(
                    "{} exists and is not empty: restore into a new directory",
                    dir.display()
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RestoreError::Io {
            context: format!("reading {}", dir.display()),
            source,
        }),
    }
}

fn sibling(dir: &Path, suffix: &str) -> Result<PathBuf, RestoreError> {
    let name = dir
        .file_name()
        .ok_or_else(|| RestoreError::Usage(format!("{} names no directory", dir.display())))?;
    let mut sibling = name.to_os_string();
    sibling.push(suffix);
    Ok(dir.with_file_name(sibling))
}

async fn build(
    target: &Target,
    dir: &Path,
    key: Option<EncryptionKey>,
    snapshot: SnapshotName,
    segments: &[SegmentName],
) -> Result<(u64, u64), RestoreError> {
    let mut nonce_seed = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut nonce_seed);
    let cipher = key
        .as_ref()
        .map(|k| Arc::new(FrameCipher::new(k, nonce_seed)));
    let store = Store::open(
        dir,
        StoreOptions {
            encryption_key: key,
            nonce_seed,
        },
    )?;
    let mut writer = store.restore_writer();
    let mut bytes = read_object(
        target,
        snapshot.path().as_ref(),
        Kind::Snapshot,
        cipher.as_deref(),
        &mut writer,
    )
    .await?;
    for (i, segment) in segments.iter().enumerate() {
        bytes += read_object(
            target,
            segment.path().as_ref(),
            Kind::Segment,
            cipher.as_deref(),
            &mut writer,
        )
        .await?;
        if (i + 1) % 1000 == 0 {
            tracing::info!(applied = i + 1, of = segments.len(), "restoring segments");
        }
    }
    writer.finish()?;
    let documents = crate::store::backup::RestoreWriter::verify(&store)?;
    Ok((bytes, documents))
}

/// Streams one object into the writer; an entry is written only once its frame is whole and
/// authentic.
async fn read_object(
    target: &Target,
    name: &str,
    kind: Kind,
    cipher: Option<&FrameCipher>,
    writer: &mut crate::store::backup::RestoreWriter<'_>,
) -> Result<u64, RestoreError> {
    let read_err = |source| RestoreError::Read {
        object: name.to_owned(),
        source,
    };
    let found = target
        .store
        .get(&object_store::path::Path::from(name))
        .await
        .map_err(read_err)?;
    let mut stream = found.into_stream();
    let mut decoder = ObjectDecoder::new(name, kind, cipher);
    let mut bytes = 0u64;
    let mut failed: Option<StoreError> = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(read_err)?;
        bytes += chunk.len() as u64;
        decoder
            .push(&chunk, &mut |entry| {
                if failed.is_some() {
                    return;
                }
                let result = match &entry {
                    Entry::Clear(id) => writer.clear(id),
                    Entry::Row(row) => writer.put(row),
                };
                if let Err(e) = result {
                    failed = Some(e);
                }
            })
            .map_err(|source| RestoreError::Object {
                object: name.to_owned(),
                source,
            })?;
        if let Some(e) = failed.take() {
            return Err(e.into());
        }
    }
    decoder.finish().map_err(|source| RestoreError::Object {
        object: name.to_owned(),
        source,
    })?;
    Ok(bytes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn snap(seq: u64, at_ms: i64) -> (SnapshotName, u64) {
        (SnapshotName { seq, at_ms }, 1)
    }

    fn seg(from: u64, to: u64, at_ms: i64) -> (SegmentName, u64) {
        (
            SegmentName {
                from,
                to,
                at_ms,
                partial: false,
            },
            1,
        )
    }

    fn tos(plan: &Plan) -> Vec<u64> {
        plan.segments.iter().map(|c| c.to).collect()
    }

    #[test]
    fn plans_the_newest_chain_up_to_the_time() {
        let listing = Listing {
            snapshots: vec![snap(0, 100), snap(50, 1000)],
            segments: vec![
                seg(0, 10, 200),
                seg(10, 50, 300),
                seg(50, 60, 1100),
                seg(60, 70, 1200),
            ],
        };
        let p = plan(&listing, None, "u").unwrap();
        assert_eq!(
            (p.snapshot.seq, tos(&p), p.as_of_ms),
            (50, vec![60, 70], 1200)
        );
        let p = plan(&listing, Some(250), "u").unwrap();
        assert_eq!((p.snapshot.seq, tos(&p), p.as_of_ms), (0, vec![10], 200));
        let p = plan(&listing, Some(1150), "u").unwrap();
        assert_eq!(tos(&p), [60]);
        let p = plan(&listing, Some(1000), "u").unwrap();
        assert_eq!((tos(&p), p.as_of_ms), (vec![], 1000));
        assert!(matches!(
            plan(&listing, Some(50), "u"),
            Err(RestoreError::NoSnapshot { .. })
        ));
    }

    #[test]
    fn a_missing_segment_is_a_gap() {
        let listing = Listing {
            snapshots: vec![snap(0, 100)],
            segments: vec![seg(0, 10, 200), seg(20, 30, 400)],
        };
        match plan(&listing, None, "u") {
            Err(RestoreError::Gap { after, next, .. }) => assert_eq!((after, next), (10, 20)),
            other => panic!("{other:?}"),
        }
        // Before the gap, the chain is whole.
        assert_eq!(plan(&listing, Some(300), "u").unwrap().segments.len(), 1);
    }

    #[test]
    fn a_chain_ending_on_a_partial_segment_is_whole_only_up_to_the_object_before() {
        let mut partial = seg(10, 20, 300);
        partial.0.partial = true;
        let listing = Listing {
            snapshots: vec![snap(0, 100)],
            segments: vec![seg(0, 10, 200), partial, seg(20, 30, 400)],
        };
        assert_eq!(plan(&listing, Some(350), "u").unwrap().as_of_ms, 200);
        assert_eq!(plan(&listing, None, "u").unwrap().as_of_ms, 400);
    }

    #[test]
    fn times_parse_and_print() {
        assert_eq!(parse_at("1970-01-01T00:00:01Z").unwrap(), 1000);
        assert_eq!(parse_at("1970-01-01T01:00:01+01:00").unwrap(), 1000);
        assert!(parse_at("yesterday").is_err());
        assert_eq!(rfc3339(1000), "1970-01-01T00:00:01.000Z");
    }
}
