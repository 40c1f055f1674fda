//! Encryption at rest: the database file of an encrypted node holds none of the plaintext
//! written through the API, and the node opens it only with its key.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Node, find, read_log, spawn_verge, wait_timeout};
use serde_json::json;

/// Strings written through the API, looked for in the database file afterwards.
const SECRETS: [&str; 3] = [
    "zebra-plaintext-5f3c9e",
    "pangolin-card-4111-9d2b",
    "okapi-session-77aa01",
];

fn key_file(dir: &Path, name: &str, byte: u8) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, format!("{}\n", hex_key(byte))).unwrap();
    path
}

fn hex_key(byte: u8) -> String {
    format!("{byte:02x}").repeat(32)
}

/// Writes the secrets: as a whole document, as patches, and enough patches for the
/// compactor to write a snapshot.
fn write_secrets(node: &Node) {
    node.put_doc("cart/1", &json!({ "owner": SECRETS[0], "items": [] }))
        .ok_json("PUT");
    node.patch_doc(
        "cart/1",
        json!([{ "op": "set", "path": ["card"], "value": SECRETS[1] }]),
    )
    .ok_json("PATCH");
    for i in 0..300 {
        node.patch_doc(
            "session/1",
            json!([{ "op": "set", "path": ["token"], "value": format!("{}-{i}", SECRETS[2]) }]),
        )
        .ok_json("PATCH session");
    }
}

fn db_bytes(node: &Node) -> Vec<u8> {
    fs::read(node.data_dir.join("verge.redb")).unwrap()
}

fn found_secrets(bytes: &[u8]) -> Vec<&'static str> {
    SECRETS
        .iter()
        .copied()
        .filter(|s| find(bytes, s.as_bytes()).is_some())
        .collect()
}

/// Starts `verge node` on `node`'s data dir with `args` and expects it to refuse to start.
fn refused_start(node: &Node, args: &[&str], context: &str) -> String {
    let log = node
        .base_dir()
        .join(format!("refused-{}.log", node.node_id));
    let _ = fs::remove_file(&log);
    let mut all: Vec<String> = vec![
        "node".into(),
        "--data-dir".into(),
        node.data_dir.display().to_string(),
        "--api-addr".into(),
        "127.0.0.1:0".into(),
        "--gossip-addr".into(),
        "127.0.0.1:0".into(),
    ];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    let mut child = spawn_verge(&all, node.base_dir(), &log);
    let status = wait_timeout(&mut child, Duration::from_secs(20));
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let output = read_log(&log);
    let status = status.unwrap_or_else(|| panic!("{context}: the node kept running\n{output}"));
    assert!(
        !status.success(),
        "{context}: expected a non-zero exit, got {status}\n{output}"
    );
    output
}

#[test]
fn encrypted_node_stores_no_plaintext_and_needs_its_key() {
    let keys = tempfile::tempdir().unwrap();
    let right = key_file(keys.path(), "right.key", 0x42);
    let wrong = key_file(keys.path(), "wrong.key", 0x17);
    let right_arg = right.display().to_string();
    let wrong_arg = wrong.display().to_string();

    // Control: the same writes on a plaintext node do leave the strings in its file, so the
    // search below is not vacuous.
    let mut plain = Node::start("enc-plain");
    write_secrets(&plain);
    assert!(plain.terminate(Duration::from_secs(20)).success());
    assert_eq!(found_secrets(&db_bytes(&plain)), SECRETS.to_vec());

    let mut node = Node::start_with(
        "enc-node",
        vec!["--encryption-key-file".into(), right_arg.clone()],
    );
    write_secrets(&node);
    let status = node.terminate(Duration::from_secs(20));
    assert!(status.success(), "clean SIGTERM exit, got {status}");
    assert!(
        found_secrets(&db_bytes(&node)).is_empty(),
        "plaintext found in the encrypted node's database file"
    );
    assert!(
        !node.output().contains(&hex_key(0x42)),
        "the key must never be logged"
    );

    let out = refused_start(
        &node,
        &["--encryption-key-file", &wrong_arg],
        "restart with the wrong key",
    );
    assert!(
        out.contains("not the key this store was encrypted with"),
        "unclear message for a wrong key:\n{out}"
    );
    let out = refused_start(&node, &[], "restart without a key");
    assert!(
        out.contains("this store is encrypted and no encryption key was given"),
        "unclear message without a key:\n{out}"
    );
    let out = refused_start(
        &plain,
        &["--encryption-key-file", &right_arg],
        "plaintext store with a key",
    );
    assert!(
        out.contains("this store is not encrypted"),
        "unclear message for a key on a plaintext store:\n{out}"
    );

    node.append_log_marker("restart with the right key");
    node.spawn();
    let cart = node.get_doc("cart/1").ok_json("GET cart after restart");
    assert_eq!(cart["doc"]["owner"], SECRETS[0]);
    assert_eq!(cart["doc"]["card"], SECRETS[1]);
    let session = node
        .get_doc("session/1")
        .ok_json("GET session after restart");
    assert_eq!(session["doc"]["token"], format!("{}-299", SECRETS[2]));
    let listed = node.get("/v1/docs").ok_json("list after restart");
    assert_eq!(listed["docs"].as_array().map(Vec::len), Some(2), "{listed}");
}

#[test]
fn rekey_rotates_the_key_of_a_stopped_node() {
    let keys = tempfile::tempdir().unwrap();
    let old = key_file(keys.path(), "old.key", 0x01);
    let new = key_file(keys.path(), "new.key", 0x02);
    let mut node = Node::start_with(
        "enc-rekey",
        vec!["--encryption-key-file".into(), old.display().to_string()],
    );
    node.put_doc("cart/9", &json!({ "owner": SECRETS[0] }))
        .ok_json("PUT");
    assert!(node.terminate(Duration::from_secs(20)).success());

    let log = node.base_dir().join("rekey.log");
    let args: Vec<String> = [
        "rekey",
        "--data-dir",
        &node.data_dir.display().to_string(),
        "--old-key-file",
        &old.display().to_string(),
        "--new-key-file",
        &new.display().to_string(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let mut child = spawn_verge(&args, node.base_dir(), &log);
    let status = wait_timeout(&mut child, Duration::from_secs(20)).unwrap();
    assert!(status.success(), "rekey failed:\n{}", read_log(&log));

    let out = refused_start(
        &node,
        &["--encryption-key-file", &old.display().to_string()],
        "the old key after rekey",
    );
    assert!(out.contains("not the key"), "{out}");
    node.extra_args = vec!["--encryption-key-file".into(), new.display().to_string()];
    node.spawn();
    let body = node.get_doc("cart/9").ok_json("GET after rekey");
    assert_eq!(body["doc"]["owner"], SECRETS[0]);
}
