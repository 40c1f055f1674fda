//! redb storage on turmoil's simulated file system, with power cuts and injected disk errors.
//!
//! Requires turmoil's `unstable-fs` feature (enabled by the workspace dependency). Each turmoil
//! host has its own file system; files live in memory and are shared by the host's restarts.
//!
//! # What turmoil models, and what [`Disk`] adds
//!
//! turmoil's file system keeps writes, truncations, file creations and directory changes
//! *pending* until they are synced: `sync_data`/`sync_all` make a file's data durable,
//! `sync_dir` makes the entries of a directory durable. `Sim::crash` discards everything
//! pending, and deletes files whose directory entry was never synced (hence
//! [`SimBackend::open`] syncs the directories on the way to the database file). Pending data
//! stays readable until then, as from a page cache. turmoil's `FsConfig`
//! (`turmoil::Builder::fs()`) adds, all driven by the simulation's seed:
//!
//! - torn writes: with `block_size(n)`, each pending write survives a crash as a random
//!   prefix of whole `n`-byte blocks (0 to all) instead of being lost whole;
//! - `sync_probability(p)`: each write or truncation may make the file's pending data durable
//!   early, as an OS flushing dirty pages would;
//! - `io_error_probability(p)` (reads and writes fail with an I/O error),
//!   `corruption_probability(p)` (a read returns a flipped byte, silently), `capacity(bytes)`
//!   (writes beyond it fail with "no space left").
//!
//! What turmoil does not model is the moment of the crash. `Sim::crash` drops the host's
//! tasks, so destructors run, and redb's `Database` destructor writes: it makes pending
//! non-durable commits durable and records a clean shutdown. A real power cut runs no code.
//! [`Disk::power_cut`] makes every storage call fail from that moment, so destructors cannot
//! write; [`Disk::crash_host`] cuts, crashes and restores in one call.
//!
//! [`Disk::power_cut_after_writes`] cuts the power at a chosen write instead, to crash a host in
//! the middle of a commit (or of the database's creation).
//!
//! [`Disk`] also injects errors precisely: the next `n` syncs or writes fail
//! ([`Disk::fail_next_syncs`], [`Disk::fail_next_writes`]), or each write, truncation and sync
//! fails with a probability drawn from a seeded generator ([`Disk::set_error_rate`]). An
//! injected failure does not touch turmoil's state: data written before a failed sync stays
//! pending, readable, lost at a crash, and durable at the next successful sync (as Linux keeps
//! dirty pages after a failed `fsync`).
//!
//! Latency is not modelled: redb's storage calls are synchronous, and a synchronous call cannot
//! wait on simulated time.
//!
//! # Rules for the caller
//!
//! Storage calls must run on the host's own thread (never `spawn_blocking` or another thread:
//! turmoil finds the host's file system through a thread-local that only its scheduler sets).
//! A call made outside a host (a `Database` dropped after the `Sim`, say) fails with an error
//! instead of panicking inside turmoil, but a database must not outlive its host: keep it
//! inside the host's future.

use std::fmt;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use redb::StorageBackend;
use turmoil::fs::shim::std::fs::{self as simfs, File, OpenOptions};

/// A host's disk as the simulator sees it: a fault switchboard shared by the test and the
/// host's storage. Cheap to clone; clones share state. Keep one per host across its restarts.
#[derive(Clone, Default)]
pub struct Disk {
    state: Arc<State>,
}

struct State {
    power_cut: AtomicBool,
    /// Writes left before the power is cut; `u64::MAX` when not armed.
    cut_after_writes: AtomicU64,
    fail_syncs: AtomicU64,
    fail_writes: AtomicU64,
    random: Mutex<Option<RandomFaults>>,
    reads: AtomicU64,
    writes: AtomicU64,
    syncs: AtomicU64,
    unsynced_writes: AtomicU64,
    injected: AtomicU64,
    refused_power_cut: AtomicU64,
}

/// Random failures from a seeded generator.
impl Default for State {
    fn default() -> Self {
        Self {
            power_cut: AtomicBool::new(false),
            cut_after_writes: AtomicU64::new(NOT_ARMED),
            fail_syncs: AtomicU64::new(0),
            fail_writes: AtomicU64::new(0),
            random: Mutex::new(None),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            unsynced_writes: AtomicU64::new(0),
            injected: AtomicU64::new(0),
            refused_power_cut: AtomicU64::new(0),
        }
    }
}

const NOT_ARMED: u64 = u64::MAX;

#[derive(Debug)]
struct RandomFaults {
    probability: f64,
    rng: SplitMix64,
}

/// SplitMix64: tiny, seedable, and enough for fault decisions.
#[derive(Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What the storage on a [`Disk`] has done so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiskStats {
    /// Successful reads.
    pub reads: u64,
    /// Successful writes and truncations.
    pub writes: u64,
    /// Successful syncs.
    pub syncs: u64,
    /// Successful writes and truncations since the last successful sync: what a crash now
    /// would discard or tear.
    pub unsynced_writes: u64,
    /// Calls failed by an injected error.
    pub injected_errors: u64,
    /// Calls refused because the power was cut.
    pub refused_power_cut: u64,
}

/// The kinds of storage call, for fault decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Open,
    Len,
    Read,
    Write,
    SetLen,
    Sync,
}

/// What a failing disk reports (EIO).
fn injected_error(op: Op) -> io::Error {
    io::Error::other(format!("simulated disk error ({op:?}): input/output error"))
}

/// Decrements `counter` if positive; whether it was.
fn take_one(counter: &AtomicU64) -> bool {
    counter
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
}

impl Disk {
    /// A healthy disk.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cuts the power: from now on every storage call fails (reads and lengths too), so that
    /// nothing — destructors included — writes before the host is crashed. Call it right
    /// before `Sim::crash`, and [`Disk::restore`] before the host restarts.
    pub fn power_cut(&self) {
        self.state.power_cut.store(true, Ordering::Relaxed);
    }

    /// Cuts the power in the middle of what the host is doing: the next `writes` writes or
    /// truncations succeed, and the power is cut at the one after (which fails, as does every
    /// later call). Crash the host afterwards (`Sim::crash`, or [`Disk::crash_host`]) to lose
    /// or tear what was not synced.
    pub fn power_cut_after_writes(&self, writes: u64) {
        self.state
            .cut_after_writes
            .store(writes.min(NOT_ARMED - 1), Ordering::Relaxed);
    }

    /// Restores the power (for the restarted host) and disarms
    /// [`Disk::power_cut_after_writes`]. Injected faults are left as they are.
    pub fn restore(&self) {
        self.state
            .cut_after_writes
            .store(NOT_ARMED, Ordering::Relaxed);
        self.state.power_cut.store(false, Ordering::Relaxed);
    }

    /// Whether the power is cut.
    pub fn is_power_cut(&self) -> bool {
        self.state.power_cut.load(Ordering::Relaxed)
    }

    /// Crashes `host` as a power cut would: cuts the power, crashes the host (its destructors
    /// run but cannot write; turmoil discards, or with a block size tears, everything not
    /// synced), and restores the power. Restart it with `Sim::bounce`.
    pub fn crash_host(&self, sim: &mut turmoil::Sim<'_>, host: impl turmoil::ToIpAddrs) {
        self.power_cut();
        sim.crash(host);
        self.restore();
    }

    /// Makes the next `n` syncs fail (added to any still pending).
    pub fn fail_next_syncs(&self, n: u64) {
        self.state.fail_syncs.fetch_add(n, Ordering::Relaxed);
    }

    /// Makes the next `n` writes or truncations fail (added to any still pending).
    pub fn fail_next_writes(&self, n: u64) {
        self.state.fail_writes.fetch_add(n, Ordering::Relaxed);
    }

    /// Makes each write, truncation and sync fail with `probability`, decided by a generator
    /// seeded with `seed` (the same calls in the same order fail in every run). A probability
    /// of 0 turns it off.
    pub fn set_error_rate(&self, probability: f64, seed: u64) {
        let mut random = self
            .state
            .random
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *random = (probability > 0.0).then(|| RandomFaults {
            probability: probability.min(1.0),
            rng: SplitMix64(seed),
        });
    }

    /// Clears the injected errors (not the power cut, nor an armed
    /// [`Disk::power_cut_after_writes`]: [`Disk::restore`] clears those).
    pub fn clear_faults(&self) {
        self.state.fail_syncs.store(0, Ordering::Relaxed);
        self.state.fail_writes.store(0, Ordering::Relaxed);
        self.set_error_rate(0.0, 0);
    }

    /// The counters so far.
    pub fn stats(&self) -> DiskStats {
        let s = &self.state;
        DiskStats {
            reads: s.reads.load(Ordering::Relaxed),
            writes: s.writes.load(Ordering::Relaxed),
            syncs: s.syncs.load(Ordering::Relaxed),
            unsynced_writes: s.unsynced_writes.load(Ordering::Relaxed),
            injected_errors: s.injected.load(Ordering::Relaxed),
            refused_power_cut: s.refused_power_cut.load(Ordering::Relaxed),
        }
    }

    /// Fails the call if the power is cut or there is no current turmoil host to run it on.
    fn check_available(&self, op: Op) -> io::Result<()> {
        let s = &self.state;
        if matches!(op, Op::Write | Op::SetLen)
            && s.cut_after_writes
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| match n {
                    NOT_ARMED | 0 => None,
                    n => Some(n - 1),
                })
                .is_err_and(|n| n == 0)
        {
            s.cut_after_writes.store(NOT_ARMED, Ordering::Relaxed);
            s.power_cut.store(true, Ordering::Relaxed);
        }
        if s.power_cut.load(Ordering::Relaxed) {
            s.refused_power_cut.fetch_add(1, Ordering::Relaxed);
            return Err(io::Error::other(format!("simulated power cut ({op:?})")));
        }
        // Outside a host turmoil would panic ("current host missing" or an unset
        // thread-local); a database dropped after its host gets an error instead.
        if turmoil::sim_elapsed().is_none() {
            return Err(io::Error::other(
                "simulated storage used outside a turmoil host",
            ));
        }
        Ok(())
    }

    /// Fails the call if the power is cut, there is no current turmoil host, or an injected
    /// fault fires.
    fn check(&self, op: Op) -> io::Result<()> {
        self.check_available(op)?;
        let s = &self.state;
        let injected = match op {
            Op::Open | Op::Len | Op::Read => false,
            Op::Sync => take_one(&s.fail_syncs) || self.random_fault(),
            Op::Write | Op::SetLen => take_one(&s.fail_writes) || self.random_fault(),
        };
        if injected {
            s.injected.fetch_add(1, Ordering::Relaxed);
            return Err(injected_error(op));
        }
        Ok(())
    }

    fn random_fault(&self) -> bool {
        let mut random = self
            .state
            .random
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match random.as_mut() {
            Some(faults) => faults.rng.next_f64() < faults.probability,
            None => false,
        }
    }

    fn done(&self, op: Op) {
        let s = &self.state;
        match op {
            Op::Open | Op::Len => {}
            Op::Read => {
                s.reads.fetch_add(1, Ordering::Relaxed);
            }
            Op::Write | Op::SetLen => {
                s.writes.fetch_add(1, Ordering::Relaxed);
                s.unsynced_writes.fetch_add(1, Ordering::Relaxed);
            }
            Op::Sync => {
                s.syncs.fetch_add(1, Ordering::Relaxed);
                s.unsynced_writes.store(0, Ordering::Relaxed);
            }
        }
    }

    /// Runs a storage call under the disk's faults.
    fn run<T>(&self, op: Op, call: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        self.check(op)?;
        let value = call()?;
        self.done(op);
        Ok(value)
    }
}

impl fmt::Debug for Disk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Disk")
            .field("power_cut", &self.is_power_cut())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// A redb [`StorageBackend`] on a file of turmoil's simulated file system, subject to a
/// [`Disk`]'s faults.
#[derive(Debug)]
pub struct SimBackend {
    file: File,
    path: PathBuf,
    disk: Disk,
}

impl SimBackend {
    /// Opens `path` on the current host's simulated file system for reading and writing,
    /// creating it and its parent directories if needed, and syncs every directory from the
    /// root down to the file's, so that a crash cannot orphan a new file.
    pub fn open(path: impl AsRef<Path>, disk: &Disk) -> io::Result<Self> {
        let path = path.as_ref();
        disk.check_available(Op::Open)?;
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{}: not an absolute file path", path.display()),
                )
            })?;
        simfs::create_dir_all(parent)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .open(path)?;
        let mut dirs: Vec<&Path> = parent.ancestors().collect();
        dirs.reverse();
        for dir in dirs {
            simfs::sync_dir(dir)?;
        }
        Ok(Self {
            file,
            path: path.to_owned(),
            disk: disk.clone(),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl StorageBackend for SimBackend {
    fn len(&self) -> Result<u64, io::Error> {
        self.disk.run(Op::Len, || Ok(self.file.metadata()?.len()))
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.disk
            .run(Op::Read, || self.file.read_exact_at(out, offset))
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.disk.run(Op::SetLen, || self.file.set_len(len))
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        self.disk.run(Op::Sync, || self.file.sync_data())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        self.disk
            .run(Op::Write, || self.file.write_all_at(data, offset))
    }
}

/// Why a simulated database could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// Creating the directories or the file failed.
    #[error("opening the database file: {0}")]
    Io(#[from] io::Error),
    /// redb refused the file (or failed reading it).
    #[error("opening the database: {0}")]
    Database(#[from] redb::DatabaseError),
}

/// Opens (or creates) the redb database at `path` on the current host's simulated file system,
/// on `disk`, with redb's default settings.
pub fn open_database(path: impl AsRef<Path>, disk: &Disk) -> Result<redb::Database, OpenError> {
    open_database_with(&redb::Database::builder(), path, disk)
}

/// [`open_database`] with the given redb builder (cache size, repair callback, …).
pub fn open_database_with(
    builder: &redb::Builder,
    path: impl AsRef<Path>,
    disk: &Disk,
) -> Result<redb::Database, OpenError> {
    let backend = SimBackend::open(path, disk)?;
    Ok(builder.create_with_backend(backend)?)
}

#[cfg(test)]
mod tests;
