//! Backups and restores of real nodes, to a local directory (`file://`) and to a real
//! S3-compatible server (`s3s-fs`, installed by scripts/setup.sh) started on loopback.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::Node;
use serde_json::{Value, json};

/// `[backup] ship_interval_ms` of the nodes here.
const SHIP_INTERVAL_MS: u64 = 200;
/// How long the tests wait for something the node does in the background.
const WAIT: Duration = Duration::from_secs(30);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A backup location and the environment a node needs to reach it.
struct Location {
    url: String,
    env: Vec<(String, String)>,
    /// Where the objects end up on disk (both servers here keep them in files).
    files: PathBuf,
    _server: Option<S3Server>,
    _dir: tempfile::TempDir,
}

struct S3Server(Child);

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn s3s_fs_binary() -> PathBuf {
    if let Ok(path) = std::env::var("VERGE_TEST_S3S_FS") {
        return PathBuf::from(path);
    }
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cargo"));
    let installed = home.join("bin/s3s-fs");
    assert!(
        installed.is_file(),
        "the S3-compatible test server is missing: run scripts/setup.sh (it installs s3s-fs)"
    );
    installed
}

fn file_location() -> Location {
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("backups");
    Location {
        url: format!("file://{}", files.display()),
        env: Vec::new(),
        files,
        _server: None,
        _dir: dir,
    }
}

fn s3_location() -> Location {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("s3");
    std::fs::create_dir_all(root.join("verge-backups")).unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(s3s_fs_binary())
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--access-key",
            "verge-test",
            "--secret-key",
            "verge-test-secret",
        ])
        .arg(&root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = S3Server(child);
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "s3s-fs did not listen");
        thread::sleep(Duration::from_millis(20));
    }
    let env = vec![
        ("AWS_ENDPOINT".into(), format!("http://127.0.0.1:{port}")),
        ("AWS_ALLOW_HTTP".into(), "true".into()),
        ("AWS_ACCESS_KEY_ID".into(), "verge-test".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "verge-test-secret".into()),
        ("AWS_REGION".into(), "us-east-1".into()),
    ];
    Location {
        url: "s3://verge-backups/cluster-1/node-a".into(),
        env,
        files: root.join("verge-backups/cluster-1/node-a"),
        _server: Some(server),
        _dir: dir,
    }
}

fn start_node(loc: &Location, extra: &[String]) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("verge.toml");
    std::fs::write(
        &config,
        format!(
            "[backup]\nto = {:?}\nship_interval_ms = {SHIP_INTERVAL_MS}\nsnapshot_interval_s = 3600\n",
            loc.url
        ),
    )
    .unwrap();
    let mut args = vec!["--config".to_string(), config.display().to_string()];
    args.extend_from_slice(extra);
    let node = Node::start_env("node-a", args, loc.env.clone());
    // The config file must outlive the node's restarts: keep its directory.
    std::mem::forget(dir);
    node
}

/// Runs `verge restore`; its output and whether it succeeded.
fn restore(loc: &Location, data_dir: &Path, extra: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_verge"))
        .args(["restore", "--from", &loc.url, "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .envs(loc.env.iter().map(|(k, v)| (k, v)))
        .env_remove("VERGE_ENCRYPTION_KEY_FILE")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Starts a node on a restored data directory (no backups of its own).
fn start_restored(data_dir: &Path, extra: &[String]) -> Node {
    start_restored_as("restored", data_dir, extra)
}

/// [`start_restored`] under a given node id.
fn start_restored_as(name: &str, data_dir: &Path, extra: &[String]) -> Node {
    let mut node = Node::start_with(name, extra.to_vec());
    node.kill();
    std::fs::remove_dir_all(&node.data_dir).ok();
    copy_dir(data_dir, &node.data_dir);
    node.spawn();
    node
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn status(node: &Node) -> Value {
    node.get("/v1/status").ok_json("status")
}

/// Waits until the backup has shipped everything the feed held when called.
fn wait_shipped(node: &Node) {
    let target = status(node)["feed_last_seq"].as_u64().unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let s = status(node);
        if s["backup"]["shipped_seq"]
            .as_u64()
            .is_some_and(|v| v >= target)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "backups did not reach feed position {target}: {}\n{}",
            s["backup"],
            node.output()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// The time `verge restore` says the state is from.
fn restored_as_of(output: &str) -> i64 {
    let at = output
        .split(" as of ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no time in: {output}"));
    verge_node::backup::restore::parse_at(at).unwrap()
}

fn object_files(dir: &Path, kind: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join(kind))
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    files.sort();
    files
}

/// 16 writers write while backups ship; the node is SIGKILLed mid-load; the restore holds every
/// write acknowledged before the time it is from, with its value, and that time is within a
/// shipping interval (plus an upload) of the kill.
fn writes_survive_a_kill(loc: &Location) {
    let mut node = start_node(loc, &[]);
    // One acknowledged write: (writer, n, when acknowledged).
    let acked: Arc<Mutex<Vec<(usize, u64, i64)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..16)
        .map(|w| {
            let acked = Arc::clone(&acked);
            let stop = Arc::clone(&stop);
            let addr = node.addr;
            thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    let body = json!({"ops": [{"op": "set", "path": [format!("k{n}")], "value": n * 10 + w as u64}]});
                    let sent = common::http(
                        addr,
                        "PATCH",
                        &format!("/v1/docs/w/{w}"),
                        body.to_string().as_bytes(),
                        &[("content-type", "application/json")],
                        Duration::from_secs(5),
                    );
                    match sent {
                        Ok(r) if r.status == 200 => acked.lock().unwrap().push((w, n, now_ms())),
                        // The kill: later writes are unacknowledged.
                        _ => break,
                    }
                }
            })
        })
        .collect();
    // Let a snapshot and many segments go by under load.
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    assert!(
        status(&node)["backup"]["state"] == "ok",
        "{}",
        status(&node)
    );
    node.kill();
    let killed_at = now_ms();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 200,
        "only {} writes were acknowledged",
        acked.len()
    );

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("restored");
    let (ok, out) = restore(loc, &data, &[]);
    assert!(ok, "restore failed: {out}");
    let as_of = restored_as_of(&out);
    let window = killed_at - as_of;
    println!(
        "{}: {} writes acknowledged; restored state is {window} ms older than the kill",
        loc.url,
        acked.len()
    );
    assert!(
        window <= SHIP_INTERVAL_MS as i64 + 2000,
        "the restored state is {window} ms older than the kill: {out}"
    );
    let restored = start_restored(&data, &[]);
    let mut checked = 0;
    for w in 0..16 {
        let doc = restored.get_doc(&format!("w/{w}"));
        let doc = if doc.status == 200 {
            doc.json()["doc"].clone()
        } else {
            json!({})
        };
        for (_, n, at) in acked.iter().filter(|(aw, _, at)| *aw == w && *at < as_of) {
            let want = n * 10 + w as u64;
            assert_eq!(
                doc[format!("k{n}")],
                json!(want),
                "writer {w}'s write {n}, acknowledged {} ms before the restored state, is missing",
                as_of - at
            );
            checked += 1;
        }
    }
    assert!(
        checked > 100,
        "only {checked} writes fell before the restored state"
    );
}

#[test]
fn file_backup_keeps_every_write_shipped_before_a_kill() {
    writes_survive_a_kill(&file_location());
}

#[test]
fn s3_backup_keeps_every_write_shipped_before_a_kill() {
    writes_survive_a_kill(&s3_location());
}

/// A document deleted by mistake comes back from a restore `--at` a time before the delete.
fn restore_before_a_delete(loc: &Location) {
    let node = start_node(loc, &[]);
    node.put_doc("cart/u-1", &json!({"items": ["apple", "pear"]}))
        .ok_json("put");
    node.put_doc("cart/u-2", &json!({"items": ["fig"]}))
        .ok_json("put");
    wait_shipped(&node);
    let before_delete = now_ms();
    thread::sleep(Duration::from_millis(50));
    node.delete_doc("cart/u-1").ok_json("delete");
    wait_shipped(&node);

    let dir = tempfile::tempdir().unwrap();
    let at = verge_node::backup::restore::rfc3339(before_delete);
    let (ok, out) = restore(loc, &dir.path().join("before"), &["--at", &at]);
    assert!(ok, "{out}");
    let (ok, latest) = restore(loc, &dir.path().join("latest"), &[]);
    assert!(ok, "{latest}");
    let before = start_restored(&dir.path().join("before"), &[]);
    assert_eq!(
        before.get_doc("cart/u-1").ok_json("restored --at")["doc"],
        json!({"items": ["apple", "pear"]})
    );
    let latest = start_restored(&dir.path().join("latest"), &[]);
    assert_eq!(latest.get_doc("cart/u-1").status, 404);
    assert_eq!(
        latest.get_doc("cart/u-2").ok_json("latest")["doc"],
        json!({"items": ["fig"]})
    );
    // A time before any snapshot restores nothing, and says so.
    let (ok, out) = restore(
        loc,
        &dir.path().join("too-early"),
        &["--at", "2001-01-01T00:00:00Z"],
    );
    assert!(
        !ok && out.contains("no snapshot taken at or before"),
        "{out}"
    );
    assert!(!dir.path().join("too-early").exists());
}

#[test]
fn file_restore_at_a_time_before_a_delete_brings_the_document_back() {
    restore_before_a_delete(&file_location());
}

#[test]
fn s3_restore_at_a_time_before_a_delete_brings_the_document_back() {
    restore_before_a_delete(&s3_location());
}

#[test]
fn an_encrypted_store_backs_up_no_plaintext() {
    let loc = file_location();
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("store.key");
    std::fs::write(&key, "11".repeat(32)).unwrap();
    let wrong = keys.path().join("wrong.key");
    std::fs::write(&wrong, "22".repeat(32)).unwrap();
    let key_arg = key.display().to_string();
    let node = start_node(&loc, &["--encryption-key-file".into(), key_arg.clone()]);
    let canary = "plaintext-canary-7f3a9c";
    node.put_doc("secret/doc-canary", &json!({"note": canary}))
        .ok_json("put");
    node.patch_doc(
        "secret/doc-canary",
        json!([{"op": "splice", "path": ["text"], "index": 0, "text": canary}]),
    );
    node.req("POST", "/v1/admin/backup", b"")
        .ok_json("backup now");
    node.put_doc("secret/later", &json!({"note": canary}))
        .ok_json("put");
    wait_shipped(&node);
    let mut objects = object_files(&loc.files, "snapshots");
    objects.extend(object_files(&loc.files, "segments"));
    assert!(objects.len() >= 2, "{objects:?}");
    for object in &objects {
        let bytes = std::fs::read(object).unwrap();
        for needle in [canary.as_bytes(), b"doc-canary", b"secret/"] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "{} holds {:?} in the clear",
                object.display(),
                String::from_utf8_lossy(needle)
            );
        }
    }
    let dir = tempfile::tempdir().unwrap();
    // Without the key, or with another one: refused, nothing written.
    let (ok, out) = restore(&loc, &dir.path().join("nokey"), &[]);
    assert!(!ok && out.contains("encrypted"), "{out}");
    assert!(!dir.path().join("nokey").exists());
    let wrong_arg = wrong.display().to_string();
    let (ok, out) = restore(
        &loc,
        &dir.path().join("wrong"),
        &["--encryption-key-file", &wrong_arg],
    );
    assert!(!ok && out.contains("does not open with the key"), "{out}");
    assert!(!dir.path().join("wrong").exists());
    // With it: the documents, readable by a node started with the same key.
    let (ok, out) = restore(
        &loc,
        &dir.path().join("ok"),
        &["--encryption-key-file", &key_arg],
    );
    assert!(ok, "{out}");
    let restored = start_restored(
        &dir.path().join("ok"),
        &["--encryption-key-file".into(), key_arg],
    );
    let doc = restored.get_doc("secret/doc-canary").ok_json("restored");
    assert_eq!(doc["doc"]["note"], json!(canary));
    assert_eq!(doc["doc"]["text"], json!(canary));
    assert_eq!(
        restored.get_doc("secret/later").ok_json("restored")["doc"]["note"],
        json!(canary)
    );
}

#[test]
fn a_damaged_or_missing_object_restores_nothing() {
    let loc = file_location();
    let node = start_node(&loc, &[]);
    for i in 0..5 {
        node.put_doc(&format!("d/{i}"), &json!({"i": i}))
            .ok_json("put");
        wait_shipped(&node);
    }
    let segments = object_files(&loc.files, "segments");
    assert!(segments.len() >= 3, "{segments:?}");
    let dir = tempfile::tempdir().unwrap();

    // A flipped byte in the middle of a segment.
    let victim = &segments[segments.len() / 2];
    let original = std::fs::read(victim).unwrap();
    let mut damaged = original.clone();
    let at = damaged.len() / 2;
    damaged[at] ^= 0x01;
    std::fs::write(victim, &damaged).unwrap();
    let target = dir.path().join("damaged");
    let (ok, out) = restore(&loc, &target, &[]);
    let name = victim.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        !ok && out.contains(&name) && out.contains("damaged"),
        "{out}"
    );
    assert!(
        !target.exists(),
        "a failed restore left {}",
        target.display()
    );
    assert!(!dir.path().join("damaged.restoring").exists());

    // Cut short.
    std::fs::write(victim, &original[..original.len() - 5]).unwrap();
    let (ok, out) = restore(&loc, &target, &[]);
    assert!(!ok && out.contains("cut short"), "{out}");
    assert!(!target.exists());

    // Missing.
    std::fs::remove_file(victim).unwrap();
    let (ok, out) = restore(&loc, &target, &[]);
    assert!(!ok && out.contains("missing the segment"), "{out}");
    assert!(!target.exists());

    // A target that holds something is never touched.
    std::fs::write(victim, &original).unwrap();
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join("keep.txt"), "mine").unwrap();
    let (ok, out) = restore(&loc, &target, &[]);
    assert!(!ok && out.contains("not empty"), "{out}");
    assert_eq!(
        std::fs::read_to_string(target.join("keep.txt")).unwrap(),
        "mine"
    );

    // An existing empty directory (a mount point): a failed restore leaves it empty...
    std::fs::remove_file(target.join("keep.txt")).unwrap();
    std::fs::write(victim, &damaged).unwrap();
    let (ok, out) = restore(&loc, &target, &[]);
    assert!(!ok, "{out}");
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0, "{out}");
    std::fs::write(victim, &original).unwrap();

    // ...and, whole again, a restore fills it.
    let (ok, out) = restore(&loc, &target, &[]);
    assert!(ok, "{out}");
    let restored = start_restored(&target, &[]);
    for i in 0..5 {
        assert_eq!(
            restored.get_doc(&format!("d/{i}")).ok_json("restored")["doc"],
            json!({"i": i})
        );
    }
}

#[test]
fn backup_commands_and_a_location_of_another_store() {
    let loc = file_location();
    let node = start_node(&loc, &[]);
    node.put_doc("a/1", &json!({"x": 1})).ok_json("put");
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_verge"))
            .args(["--url", &format!("http://{}", node.addr)])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = cli(&["backup", "now"]);
    assert!(
        ok && out.contains("snapshot snapshots/") && out.contains("1 documents"),
        "{out}"
    );
    let (ok, out) = cli(&["backup", "list"]);
    assert!(
        ok && out.contains("state: ok") && out.contains("snapshots/"),
        "{out}"
    );
    let metrics = node.get("/metrics").text();
    for name in [
        "verge_backup_snapshots_total",
        "verge_backup_segments_total",
        "verge_backup_bytes_total",
        "verge_backup_shipped_seq",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }

    // Another store pointed at the same location refuses to write there.
    let other = start_node(&loc, &[]);
    let deadline = Instant::now() + WAIT;
    loop {
        let s = status(&other);
        if s["backup"]["state"] == "failing" {
            let error = s["backup"]["error"].as_str().unwrap();
            assert!(error.contains("another store"), "{error}");
            break;
        }
        assert!(Instant::now() < deadline, "{}", s["backup"]);
        thread::sleep(Duration::from_millis(20));
    }
    let r = other.req("POST", "/v1/admin/backup", b"");
    assert_eq!(r.status, 502, "{}", r.describe());

    // A node without [backup] says so.
    let plain = Node::start("plain");
    plain.req("POST", "/v1/admin/backup", b"").assert_error(
        409,
        "backup_not_configured",
        "backup now without [backup]",
    );
}

#[test]
fn a_graceful_stop_ships_the_last_writes() {
    let loc = file_location();
    // A shipping interval far longer than the test: only the stop ships the write.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("verge.toml");
    std::fs::write(
        &config,
        format!("[backup]\nto = {:?}\nship_interval_ms = 3600000\n", loc.url),
    )
    .unwrap();
    let mut node = Node::start_with(
        "node-a",
        vec!["--config".into(), config.display().to_string()],
    );
    let deadline = Instant::now() + WAIT;
    while status(&node)["backup"]["last_snapshot"].is_null() {
        assert!(Instant::now() < deadline, "no first snapshot");
        thread::sleep(Duration::from_millis(20));
    }
    node.put_doc("last/words", &json!({"said": "goodbye"}))
        .ok_json("put");
    let exit = node.terminate(Duration::from_secs(30));
    assert!(exit.success(), "{exit:?}");
    let out = tempfile::tempdir().unwrap();
    let (ok, text) = restore(&loc, &out.path().join("r"), &[]);
    assert!(ok, "{text}");
    let restored = start_restored(&out.path().join("r"), &[]);
    assert_eq!(
        restored.get_doc("last/words").ok_json("restored")["doc"],
        json!({"said": "goodbye"})
    );
}

/// A node lost whole is replaced from its backup: the restored node takes its place in the
/// cluster and converges with the survivor both ways.
#[test]
fn a_restored_node_rejoins_and_converges() {
    use common::cluster::{Cluster, Spec, node_args};
    let loc = file_location();
    let backup = format!(
        "[backup]\nto = {:?}\nship_interval_ms = {SHIP_INTERVAL_MS}\n",
        loc.url
    );
    let mut cluster = Cluster::start_each_configured(
        "rj",
        |i| if i == 0 { vec![] } else { vec![0] },
        &[&backup, ""],
    );
    cluster.wait_connected();
    for i in 0..20 {
        cluster.nodes[0]
            .put_doc(&format!("d/{i}"), &json!({"i": i}))
            .ok_json("put");
    }
    wait_shipped(&cluster.nodes[0]);
    cluster.nodes[0].kill();
    cluster.nodes[1]
        .put_doc("after/loss", &json!({"written": "while rj-1 was gone"}))
        .ok_json("put on the survivor");

    let out = tempfile::tempdir().unwrap();
    let (ok, text) = restore(&loc, &out.path().join("r"), &[]);
    assert!(ok, "{text}");
    // The lost node's certificate and address, seeded with the survivor.
    let spec = Spec {
        name: "rj-1".into(),
        gossip_port: cluster.ports[0],
        seeds: vec![cluster.ports[1]],
        extra: Vec::new(),
    };
    let restored = start_restored_as(
        "rj-1",
        &out.path().join("r"),
        &node_args(cluster.certs.path(), &spec),
    );
    for i in 0..20 {
        assert_eq!(
            restored.get_doc(&format!("d/{i}")).ok_json("restored")["doc"],
            json!({"i": i})
        );
    }
    common::wait_for(WAIT, "the survivor's write on the restored node", || {
        let r = restored.get_doc("after/loss");
        if r.status == 200 {
            Ok(())
        } else {
            Err(r.describe())
        }
    });
    restored
        .put_doc("from/restored", &json!({"x": 1}))
        .ok_json("put on the restored node");
    common::wait_for(WAIT, "the restored node's write on the survivor", || {
        let r = cluster.nodes[1].get_doc("from/restored");
        if r.status == 200 {
            Ok(())
        } else {
            Err(r.describe())
        }
    });
}

/// A re-keyed store starts a new chain sealed under its new key: the restore with the new key
/// holds the writes from before and after the change.
#[test]
fn a_rekeyed_store_starts_a_chain_under_its_new_key() {
    let loc = file_location();
    let keys = tempfile::tempdir().unwrap();
    let old = keys.path().join("old.key");
    std::fs::write(&old, "33".repeat(32)).unwrap();
    let new = keys.path().join("new.key");
    std::fs::write(&new, "44".repeat(32)).unwrap();
    let mut node = start_node(
        &loc,
        &["--encryption-key-file".into(), old.display().to_string()],
    );
    node.put_doc("k/before", &json!({"v": 1})).ok_json("put");
    wait_shipped(&node);
    assert!(node.terminate(Duration::from_secs(30)).success());
    let out = Command::new(env!("CARGO_BIN_EXE_verge"))
        .args(["rekey", "--data-dir"])
        .arg(&node.data_dir)
        .arg("--old-key-file")
        .arg(&old)
        .arg("--new-key-file")
        .arg(&new)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key_pos = node
        .extra_args
        .iter()
        .position(|a| a == "--encryption-key-file")
        .unwrap();
    node.extra_args[key_pos + 1] = new.display().to_string();
    node.spawn();
    node.put_doc("k/after", &json!({"v": 2})).ok_json("put");
    wait_shipped(&node);
    let dir = tempfile::tempdir().unwrap();
    let new_arg = new.display().to_string();
    let (ok, text) = restore(
        &loc,
        &dir.path().join("r"),
        &["--encryption-key-file", &new_arg],
    );
    assert!(ok, "{text}");
    let restored = start_restored(
        &dir.path().join("r"),
        &["--encryption-key-file".into(), new_arg],
    );
    assert_eq!(
        restored.get_doc("k/before").ok_json("before")["doc"],
        json!({"v": 1})
    );
    assert_eq!(
        restored.get_doc("k/after").ok_json("after")["doc"],
        json!({"v": 2})
    );
}
