use std::cell::RefCell;
use std::collections::BTreeMap;
use std::error::Error;
use std::rc::Rc;
use std::time::Duration;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, TableError};

use super::*;

const TABLE: TableDefinition<'_, &str, &str> = TableDefinition::new("t");
const PATH: &str = "/data/db/node.redb";

type Rows = BTreeMap<String, String>;
type TestResult<T> = Result<T, Box<dyn Error>>;

fn rows(db: &Database) -> TestResult<Rows> {
    let txn = db.begin_read()?;
    let table = match txn.open_table(TABLE) {
        Ok(table) => table,
        Err(TableError::TableDoesNotExist(_)) => return Ok(Rows::new()),
        Err(e) => return Err(e.into()),
    };
    let mut rows = Rows::new();
    for row in table.iter()? {
        let (k, v) = row?;
        rows.insert(k.value().to_owned(), v.value().to_owned());
    }
    Ok(rows)
}

fn put(db: &Database, key: &str, value: &str, durability: Durability) -> TestResult<()> {
    let mut txn = db.begin_write()?;
    txn.set_durability(durability)?;
    {
        let mut table = txn.open_table(TABLE)?;
        table.insert(key, value)?;
    }
    txn.commit()?;
    Ok(())
}

fn row(key: &str, value: &str) -> (String, String) {
    (key.to_owned(), value.to_owned())
}

/// What a boot of the database host saw and did.
#[derive(Debug, Default)]
struct Boot {
    /// The rows found on opening.
    rows: Rows,
    /// What the script wrote down.
    notes: Vec<String>,
}

type Boots = Rc<RefCell<Vec<Boot>>>;

/// What a boot's script may keep alive until the host is crashed.
type Held = Option<redb::WriteTransaction>;

/// A host "db" that opens the database at [`PATH`] on every boot, records its rows, runs
/// `script` (given the boot number) and then idles until crashed.
fn db_host<F>(sim: &mut turmoil::Sim<'_>, disk: &Disk, script: F) -> Boots
where
    F: Fn(usize, &Database, &Disk, &mut Vec<String>) -> TestResult<Held> + 'static,
{
    let boots = Boots::default();
    let script = Rc::new(script);
    let (disk, out) = (disk.clone(), Rc::clone(&boots));
    sim.host("db", move || {
        let (disk, out, script) = (disk.clone(), Rc::clone(&out), Rc::clone(&script));
        async move {
            let db = open_database(PATH, &disk)?;
            let boot = out.borrow().len();
            let rows = rows(&db)?;
            let mut notes = Vec::new();
            let held = script(boot, &db, &disk, &mut notes)?;
            out.borrow_mut().push(Boot { rows, notes });
            std::future::pending::<()>().await;
            drop((held, db));
            Ok(())
        }
    });
    boots
}

fn step_until(sim: &mut turmoil::Sim<'_>, mut done: impl FnMut() -> bool) {
    let deadline = sim.elapsed() + Duration::from_secs(10);
    while !done() {
        assert!(sim.elapsed() < deadline, "condition not reached in time");
        sim.step().expect("step");
    }
}

/// Boots the host, lets `between` crash or restart it, boots it again; returns both boots.
fn two_boots<F>(
    builder: &turmoil::Builder,
    disk: &Disk,
    script: F,
    between: impl FnOnce(&mut turmoil::Sim<'_>),
) -> (Boot, Boot)
where
    F: Fn(usize, &Database, &Disk, &mut Vec<String>) -> TestResult<Held> + 'static,
{
    let mut sim = builder.build();
    let boots = db_host(&mut sim, disk, script);
    step_until(&mut sim, || boots.borrow().len() == 1);
    between(&mut sim);
    if !sim.is_host_running("db") {
        sim.bounce("db");
    }
    step_until(&mut sim, || boots.borrow().len() == 2);
    let mut boots = boots.take();
    let second = boots.pop().expect("second boot");
    let first = boots.pop().expect("first boot");
    (first, second)
}

fn seeded(seed: u64) -> turmoil::Builder {
    let mut builder = turmoil::Builder::new();
    builder.rng_seed(seed);
    builder
}

/// A row committed with the default durability survives a power cut and a restart (so the new
/// file's directory entries were synced too); a write transaction still open at the crash
/// leaves nothing behind. Also with a plain `Sim::crash`, which rolls the open transaction back
/// in its destructor.
#[test]
fn committed_rows_survive_a_crash_and_uncommitted_ones_do_not() {
    for power_cut in [true, false] {
        let disk = Disk::new();
        let (first, second) = two_boots(
            &seeded(1),
            &disk,
            |boot, db, _, _| {
                if boot > 0 {
                    return Ok(None);
                }
                put(db, "a", "1", Durability::Immediate)?;
                let txn = db.begin_write()?;
                txn.open_table(TABLE)?.insert("b", "2")?;
                Ok(Some(txn))
            },
            |sim| {
                if power_cut {
                    disk.crash_host(sim, "db");
                } else {
                    sim.crash("db");
                }
            },
        );
        assert_eq!(first.rows, Rows::new());
        assert_eq!(second.rows, Rows::from([row("a", "1")]), "cut: {power_cut}");
    }
}

/// redb's `Drop` makes non-durable commits durable, which a plain `Sim::crash` lets it do
/// (turmoil's crash runs destructors). With the power cut first, every storage call fails,
/// the destructor writes nothing, and the non-durable commit is gone, as after a real power
/// failure.
#[test]
fn power_cut_keeps_the_database_destructor_from_writing() {
    let script = |boot: usize, db: &Database, _: &Disk, _: &mut Vec<String>| -> TestResult<Held> {
        if boot == 0 {
            put(db, "durable", "1", Durability::Immediate)?;
            put(db, "volatile", "2", Durability::None)?;
        }
        Ok(None)
    };

    let disk = Disk::new();
    let (_, second) = two_boots(&seeded(2), &disk, script, |sim| sim.crash("db"));
    assert_eq!(
        second.rows,
        Rows::from([row("durable", "1"), row("volatile", "2")]),
        "without a power cut the destructor commits"
    );

    let disk = Disk::new();
    let (_, second) = two_boots(&seeded(2), &disk, script, |sim| {
        disk.crash_host(sim, "db");
    });
    assert_eq!(second.rows, Rows::from([row("durable", "1")]));
    assert!(disk.stats().refused_power_cut > 0, "{:?}", disk.stats());
    assert!(!disk.is_power_cut());
}

/// An injected sync failure makes `commit` fail; redb then refuses further writes on that
/// handle. After a power cut the failed commit is gone and the earlier one is intact.
#[test]
fn injected_sync_failure_fails_the_commit() {
    let disk = Disk::new();
    let (first, second) = two_boots(
        &seeded(3),
        &disk,
        |boot, db, disk, notes| {
            if boot == 0 {
                put(db, "a", "1", Durability::Immediate)?;
                disk.fail_next_syncs(1);
                let failed = put(db, "b", "2", Durability::Immediate);
                notes.push(format!("b: {failed:?}"));
                let after = put(db, "c", "3", Durability::Immediate);
                notes.push(format!("c: {after:?}"));
            }
            Ok(None)
        },
        |sim| disk.crash_host(sim, "db"),
    );
    assert!(first.notes[0].starts_with("b: Err("), "{:?}", first.notes);
    assert!(first.notes[1].starts_with("c: Err("), "{:?}", first.notes);
    assert_eq!(second.rows, Rows::from([row("a", "1")]));
    assert_eq!(disk.stats().injected_errors, 1);
}

/// After a failed sync without a crash, the failed commit's writes are still pending in
/// turmoil (as dirty pages are in a page cache), and a restart (not a crash) finds them: a
/// commit that returned an error may still take effect. Writes must be treated as of unknown
/// outcome after a storage error, not as rejected.
#[test]
fn a_failed_commit_can_still_appear_after_a_clean_restart() {
    let disk = Disk::new();
    let (_, second) = two_boots(
        &seeded(4),
        &disk,
        |boot, db, disk, _| {
            if boot == 0 {
                put(db, "a", "1", Durability::Immediate)?;
                disk.fail_next_syncs(1);
                assert!(put(db, "b", "2", Durability::Immediate).is_err());
            }
            Ok(None)
        },
        |sim| sim.bounce("db"),
    );
    assert_eq!(second.rows, Rows::from([row("a", "1"), row("b", "2")]));
}

/// A power cut in the middle of a commit, with turmoil's torn writes (512-byte blocks): the
/// commit's sync fails (injected), so its writes are still pending when the power goes, and
/// the crash keeps a random prefix of whole blocks of each. redb must open again with the
/// earlier commit intact and the torn one either absent or whole, for every seed.
#[test]
fn torn_writes_of_an_interrupted_commit_leave_earlier_commits_intact() {
    let big = "x".repeat(20_000);
    for seed in 1..=16 {
        let mut builder = seeded(seed);
        builder.fs().block_size(512);
        let disk = Disk::new();
        let value = big.clone();
        let (first, second) = two_boots(
            &builder,
            &disk,
            move |boot, db, disk, notes| {
                if boot == 0 {
                    put(db, "durable", &value, Durability::Immediate)?;
                    disk.fail_next_syncs(1);
                    let torn = put(db, "torn", &value.replace('x', "y"), Durability::Immediate);
                    assert!(torn.is_err());
                    notes.push(disk.stats().unsynced_writes.to_string());
                }
                Ok(None)
            },
            |sim| disk.crash_host(sim, "db"),
        );
        let unsynced: u64 = first.notes[0].parse().expect("a count");
        assert!(unsynced > 0, "seed {seed}: nothing left to tear");
        assert_eq!(second.rows.get("durable"), Some(&big), "seed {seed}");
        let torn = second.rows.get("torn").map(|v| v == &big.replace('x', "y"));
        assert_ne!(torn, Some(false), "seed {seed}: a torn value was read back");
    }
}

/// A power cut at every write of a commit in turn (and past its end), with torn writes:
/// after the crash the earlier commit is intact, the interrupted one is absent or whole, and
/// if its `commit` returned `Ok` it is there.
#[test]
fn a_power_cut_at_any_write_of_a_commit_is_recovered() {
    let old = "o".repeat(10_000);
    let new = "n".repeat(10_000);
    let mut acked_runs = 0;
    for writes in 0..16 {
        let mut builder = seeded(100 + writes);
        builder.fs().block_size(512);
        let disk = Disk::new();
        let (a, b) = (old.clone(), new.clone());
        let (first, second) = two_boots(
            &builder,
            &disk,
            move |boot, db, disk, notes| {
                if boot == 0 {
                    put(db, "a", &a, Durability::Immediate)?;
                    disk.power_cut_after_writes(writes);
                    let acked = put(db, "b", &b, Durability::Immediate).is_ok();
                    notes.push(acked.to_string());
                }
                Ok(None)
            },
            |sim| disk.crash_host(sim, "db"),
        );
        let acked = first.notes[0] == "true";
        acked_runs += usize::from(acked);
        assert_eq!(
            second.rows.get("a"),
            Some(&old),
            "cut after {writes} writes"
        );
        match second.rows.get("b") {
            Some(b) => assert_eq!(b, &new, "cut after {writes} writes"),
            None => assert!(
                !acked,
                "cut after {writes} writes: acknowledged commit lost"
            ),
        }
    }
    assert!(
        acked_runs > 0 && acked_runs < 16,
        "the sweep missed the commit"
    );
}

/// Random write and sync failures from a seeded generator: the host reopens the database
/// after each failure (redb refuses further writes on a handle after an I/O error) and keeps
/// writing. Every acknowledged row survives the final power cut, and the same seed fails the
/// same calls.
#[test]
fn random_disk_errors_are_deterministic_and_acknowledged_rows_survive() {
    let run = |seed: u64| {
        let mut sim = seeded(5).build();
        let disk = Disk::new();
        let acked: Rc<RefCell<Vec<String>>> = Rc::default();
        let found: Rc<RefCell<Option<Rows>>> = Rc::default();
        let (host_disk, out, seen) = (disk.clone(), Rc::clone(&acked), Rc::clone(&found));
        sim.host("db", move || {
            let (disk, out, seen) = (host_disk.clone(), Rc::clone(&out), Rc::clone(&seen));
            async move {
                if !out.borrow().is_empty() {
                    *seen.borrow_mut() = Some(rows(&open_database(PATH, &disk)?)?);
                    std::future::pending::<()>().await;
                }
                // Create the file before injecting errors: redb cannot open a file whose
                // creation failed half-way (see the module's tests below).
                let mut db = Some(open_database(PATH, &disk)?);
                disk.set_error_rate(0.05, seed);
                for i in 0..40 {
                    // Reopen after a failure; opening can fail too.
                    for _ in 0..10 {
                        if db.is_none() {
                            db = open_database(PATH, &disk).ok();
                        }
                    }
                    let Some(handle) = db.as_ref() else { continue };
                    let key = format!("k{i:02}");
                    match put(handle, &key, "v", Durability::Immediate) {
                        Ok(()) => out.borrow_mut().push(key),
                        Err(_) => db = None,
                    }
                }
                disk.clear_faults();
                out.borrow_mut().push("done".to_owned());
                std::future::pending::<()>().await;
                Ok(())
            }
        });
        step_until(&mut sim, || {
            acked.borrow().last().is_some_and(|k| k == "done")
        });
        disk.crash_host(&mut sim, "db");
        sim.bounce("db");
        step_until(&mut sim, || found.borrow().is_some());
        let mut acked = acked.take();
        acked.pop();
        let rows = found.take().expect("rows");
        (acked, rows, disk.stats().injected_errors)
    };
    let (acked, rows, injected) = run(7);
    assert!(injected > 0, "no error injected");
    assert!(acked.len() < 40 && !acked.is_empty(), "{acked:?}");
    for key in &acked {
        assert!(rows.contains_key(key), "acknowledged {key} lost: {rows:?}");
    }
    let (acked_again, rows_again, injected_again) = run(7);
    assert_eq!(
        (acked, rows, injected),
        (acked_again, rows_again, injected_again)
    );
}

/// turmoil deletes a file whose directory entry was never synced, even if its data was:
/// [`SimBackend::open`] syncs the directories, a bare create does not.
#[test]
fn a_new_file_needs_a_directory_sync_to_survive_a_crash() {
    let mut sim = seeded(6).build();
    let seen: Rc<RefCell<Vec<(bool, bool)>>> = Rc::default();
    let out = Rc::clone(&seen);
    let disk = Disk::new();
    let host_disk = disk.clone();
    sim.host("db", move || {
        let (out, disk) = (Rc::clone(&out), host_disk.clone());
        async move {
            let bare = Path::new("/bare/file");
            let synced = Path::new("/synced/file");
            if out.borrow().is_empty() {
                simfs::create_dir_all("/bare")?;
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .open(bare)?;
                file.write_all_at(b"data", 0)?;
                file.sync_all()?;
                let backend = SimBackend::open(synced, &disk)?;
                backend.write(0, b"data")?;
                backend.sync_data()?;
            }
            out.borrow_mut()
                .push((simfs::exists(bare), simfs::exists(synced)));
            std::future::pending::<()>().await;
            Ok(())
        }
    });
    step_until(&mut sim, || seen.borrow().len() == 1);
    disk.crash_host(&mut sim, "db");
    sim.bounce("db");
    step_until(&mut sim, || seen.borrow().len() == 2);
    assert_eq!(seen.take(), vec![(true, true), (false, true)]);
}

/// A database that outlives the simulation is dropped without panicking: its storage calls
/// fail instead of reaching for a turmoil world that is gone.
#[test]
fn a_database_dropped_after_the_simulation_does_not_panic() {
    let escaped: Rc<RefCell<Option<Database>>> = Rc::default();
    {
        let mut sim = seeded(8).build();
        let out = Rc::clone(&escaped);
        let disk = Disk::new();
        sim.client("db", async move {
            let db = open_database(PATH, &disk)?;
            put(&db, "a", "1", Durability::None)?;
            *out.borrow_mut() = Some(db);
            Ok(())
        });
        sim.run().expect("simulation");
    }
    drop(escaped.take().expect("database"));
}

/// Opens the database three times: with the power cut after `writes` writes, again after
/// restoring it (no crash), and after a power-cut crash and restart. Returns how each went.
fn interrupted_creation(writes: u64) -> Vec<Result<(), String>> {
    let mut sim = seeded(9).build();
    let disk = Disk::new();
    let log: Rc<RefCell<Vec<Result<(), String>>>> = Rc::default();
    let (host_disk, out) = (disk.clone(), Rc::clone(&log));
    sim.host("db", move || {
        let (disk, out) = (host_disk.clone(), Rc::clone(&out));
        async move {
            let open = |disk: &Disk| {
                open_database(PATH, disk)
                    .map(drop)
                    .map_err(|e| e.to_string())
            };
            if out.borrow().is_empty() {
                disk.power_cut_after_writes(writes);
                out.borrow_mut().push(open(&disk));
                disk.restore();
            }
            out.borrow_mut().push(open(&disk));
            std::future::pending::<()>().await;
            Ok(())
        }
    });
    step_until(&mut sim, || log.borrow().len() == 2);
    disk.crash_host(&mut sim, "db");
    sim.bounce("db");
    step_until(&mut sim, || log.borrow().len() == 3);
    log.take()
}

/// redb creates a database in two synced steps: the header without its magic number, then the
/// magic number. A power cut between them leaves a file that redb refuses for good ("Not a redb
/// database"), even after the crash. A cut earlier leaves a file that redb refuses until the
/// crash discards the unsynced part. (The node has to decide what to do with such a file; the
/// simulator reproduces both.)
#[test]
fn a_power_cut_while_creating_the_database_can_leave_an_unopenable_file() {
    let not_redb = Err(
        "opening the database: I/O error: Not a redb database: magic number mismatch".to_owned(),
    );
    let cut = |what: &str| {
        Err(format!(
            "opening the database: I/O error: simulated power cut ({what})"
        ))
    };

    // Cut at the first write: nothing was written, every later open works.
    assert_eq!(interrupted_creation(0), vec![cut("SetLen"), Ok(()), Ok(())]);
    // Cut at the second write: unsynced garbage, refused until the crash discards it.
    assert_eq!(
        interrupted_creation(1),
        vec![cut("Write"), not_redb.clone(), Ok(())]
    );
    // Cut after the first sync, before the magic number: refused for good.
    assert_eq!(
        interrupted_creation(2),
        vec![cut("Write"), not_redb.clone(), not_redb]
    );
}
