//! The Rust API against a real `verge node`, over plain HTTP/1.1 on a `TcpStream`: the kind of
//! transport a Rust edge runtime plugs in.
//!
//! The node binary is `VERGE_BIN`, else the workspace's `target/debug/verge`, which
//! `cargo test --workspace` builds (the node's own integration tests need it).

#![allow(clippy::unwrap_used, missing_docs)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value as Json, json};
use verge_client::{ClientError, DocId, Op, Replica};

struct Node {
    child: Child,
    addr: String,
    dir: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn verge_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("VERGE_BIN") {
        return bin.into();
    }
    // target/debug/deps/node-xxxx -> target/debug/verge
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("verge");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p verge-node` or set VERGE_BIN",
        bin.display()
    );
    bin
}

fn start_node() -> Node {
    start_node_with(&[])
}

/// A node with `config` lines as its `verge.toml`.
fn start_node_with(config: &[&str]) -> Node {
    // Tests run in parallel in one process: a counter keeps their data directories apart.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "verge-client-rs-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let bin = verge_bin();
    let help = Command::new(&bin)
        .args(["node", "--help"])
        .output()
        .unwrap();
    let mut cmd = Command::new(&bin);
    cmd.args(["node", "--data-dir"])
        .arg(&dir)
        .args(["--api-addr", "127.0.0.1:0"]);
    if !config.is_empty() {
        let path = dir.join("verge.toml");
        std::fs::write(&path, config.join("\n")).unwrap();
        cmd.arg("--config").arg(path);
    }
    if String::from_utf8_lossy(&help.stdout).contains("--gossip-addr") {
        cmd.args(["--gossip-addr", "127.0.0.1:0"]);
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut node = Node {
        child,
        addr: String::new(),
        dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // The node writes the address and a newline; a partial read has no newline yet.
        if let Ok(addr) = std::fs::read_to_string(node.dir.join("api.addr"))
            && addr.ends_with('\n')
        {
            node.addr = addr.trim().to_owned();
            return node;
        }
        assert!(Instant::now() < deadline, "verge node did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One HTTP/1.1 request; returns status and body.
fn http(addr: &str, method: &str, path: &str, body: &[u8]) -> Result<(u16, Vec<u8>), ClientError> {
    let net = |e: std::io::Error| ClientError::Network(e.to_string());
    let mut stream = TcpStream::connect(addr).map_err(net)?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).map_err(net)?;
    stream.write_all(body).map_err(net)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(net)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| ClientError::Network("no HTTP header".into()))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ClientError::Network("bad status line".into()))?;
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Ok((status, body))
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..eol]).unwrap().trim(), 16)
            .unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[eol + 2..eol + 2 + size]);
        raw = &raw[eol + 2 + size + 2..];
    }
}

fn transport(addr: &str) -> impl FnMut(&DocId, &[u8]) -> Result<Vec<u8>, ClientError> + '_ {
    move |id, body| match http(addr, "POST", &format!("/v1/sync/{id}"), body)? {
        (200, reply) => Ok(reply),
        (status, reply) => Err(ClientError::from_response(status, &reply)),
    }
}

fn node_doc(addr: &str, id: &str) -> Json {
    let (status, body) = http(addr, "GET", &format!("/v1/docs/{id}"), b"").unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice::<Json>(&body).unwrap()["doc"].clone()
}

fn ops(v: Json) -> Vec<Op> {
    Op::parse_list(&v).unwrap()
}

#[test]
fn two_rust_replicas_converge_through_a_real_node() {
    let node = start_node();
    let mut t = transport(&node.addr);
    let id = DocId::new("rs/cart").unwrap();
    let mut a = Replica::open(id.clone(), &mut t).unwrap();
    assert_eq!(a.last_sync().round_trips, 1);
    a.apply(
        ops(json!([{"op": "inc", "path": ["n"], "by": 0}, {"op": "splice", "path": ["t"], "index": 0, "text": "ab"}])),
        1,
    )
    .unwrap();
    a.sync(&mut t).unwrap();
    let mut b = Replica::open(id, &mut t).unwrap();
    // Offline edits on both sides.
    a.apply(ops(json!([{"op": "inc", "path": ["n"], "by": 2}, {"op": "splice", "path": ["t"], "index": 2, "text": "c"}])), 2).unwrap();
    b.apply(ops(json!([{"op": "inc", "path": ["n"], "by": 5}, {"op": "splice", "path": ["t"], "index": 0, "text": "_"}])), 2).unwrap();
    let stats = a.sync(&mut t).unwrap();
    assert_eq!(stats.round_trips, 1);
    let stats = b.sync(&mut t).unwrap();
    assert_eq!(stats.round_trips, 1);
    assert!(stats.changed);
    a.sync(&mut t).unwrap();
    assert_eq!(a.heads().expect("heads"), b.heads().expect("heads"));
    assert_eq!(a.to_json(), json!({"n": 7, "t": "_abc"}));
    assert_eq!(b.to_json(), a.to_json());
    assert_eq!(node_doc(&node.addr, "rs/cart"), a.to_json());
}

#[test]
fn steady_state_sync_of_a_long_history_is_small() {
    let node = start_node();
    let mut t = transport(&node.addr);
    let id = DocId::new("rs/long").unwrap();
    let mut writer = Replica::new(id.clone());
    for i in 0..5000 {
        writer
            .apply(ops(json!([{"op": "inc", "path": ["n"], "by": 1}])), i)
            .unwrap();
    }
    writer.sync(&mut t).unwrap();
    let mut doc = Replica::open(id, &mut t).unwrap();
    let open = doc.last_sync();
    assert_eq!(open.round_trips, 1);
    doc.apply(ops(json!([{"op": "inc", "path": ["n"], "by": 1}])), 1)
        .unwrap();
    let push = doc.sync(&mut t).unwrap();
    assert_eq!(push.round_trips, 1);
    assert!(push.bytes_sent < 1024, "{push:?}");
    assert!(push.bytes_received < 1024, "{push:?}");
    let pull = writer.sync(&mut t).unwrap();
    assert_eq!(pull.round_trips, 1);
    assert!(
        pull.bytes_sent < 1024 && pull.bytes_received < 1024,
        "{pull:?}"
    );
    assert_eq!(writer.to_json(), json!({"n": 5001}));
    println!("open of 5000 changes: {open:?}; push {push:?}; pull {pull:?}");
}

#[test]
fn node_errors_keep_their_codes() {
    let node = start_node();
    let mut t = transport(&node.addr);
    let err = t(&DocId::new("rs/x").unwrap(), b"not a sync message").unwrap_err();
    assert_eq!(err.code(), "invalid_sync_message");
    let mut offline = |_: &DocId, _: &[u8]| -> Result<Vec<u8>, ClientError> {
        Err(ClientError::Network("down".into()))
    };
    let mut r = Replica::new(DocId::new("rs/x").unwrap());
    r.apply(ops(json!([{"op": "set", "path": ["k"], "value": 1}])), 1)
        .unwrap();
    assert!(r.sync(&mut offline).unwrap_err().is_retryable());
    assert!(r.has_unsynced_changes());
    r.sync(&mut t).unwrap();
    assert!(!r.has_unsynced_changes());
    assert_eq!(node_doc(&node.addr, "rs/x"), json!({"k": 1}));
}

#[test]
fn offline_replicas_creating_the_same_list_and_counter_converge_exactly() {
    let node = start_node();
    let mut t = transport(&node.addr);
    let id = DocId::new("rs/room").unwrap();
    // Both open the document before it exists, then write offline: each creates the list, the
    // counter, the text and the nested maps on its own.
    let mut a = Replica::open(id.clone(), &mut t).unwrap();
    let mut b = Replica::open(id, &mut t).unwrap();
    for (name, r) in [("a", &mut a), ("b", &mut b)] {
        for i in 0..10 {
            r.apply(
                ops(json!([
                    {"op": "push", "path": ["messages"], "value": {"from": name, "i": i}},
                    {"op": "inc", "path": ["count"]},
                    {"op": "set", "path": ["seen", name, format!("m{i}")], "value": true},
                    {"op": "splice", "path": ["log"], "index": 0, "text": format!("<{name}{i}>")},
                ])),
                1,
            )
            .unwrap();
        }
    }
    a.sync(&mut t).unwrap();
    b.sync(&mut t).unwrap();
    a.sync(&mut t).unwrap();
    assert_eq!(a.heads().expect("heads"), b.heads().expect("heads"));
    let doc = a.to_json();
    assert_eq!(b.to_json(), doc);
    assert_eq!(doc["messages"].as_array().unwrap().len(), 20, "{doc}");
    assert_eq!(doc["count"], json!(20));
    assert_eq!(doc["seen"]["a"].as_object().unwrap().len(), 10);
    assert_eq!(doc["seen"]["b"].as_object().unwrap().len(), 10);
    assert_eq!(doc["log"].as_str().unwrap().matches('<').count(), 20);
    assert_eq!(node_doc(&node.addr, "rs/room"), doc);
}

#[test]
fn a_revived_document_replaces_a_stale_replica() {
    let node = start_node();
    let mut t = transport(&node.addr);
    let id = DocId::new("rs/revived").unwrap();
    let mut a = Replica::open(id.clone(), &mut t).unwrap();
    a.apply(
        ops(json!([{"op": "push", "path": ["log"], "value": "old"}])),
        1,
    )
    .unwrap();
    a.sync(&mut t).unwrap();
    let mut stale = Replica::open(id.clone(), &mut t).unwrap();
    assert_eq!(stale.to_json(), json!({"log": ["old"]}));
    // a deletes and writes again: a new incarnation, starting from empty.
    a.delete(2).unwrap();
    a.apply(
        ops(json!([{"op": "push", "path": ["log"], "value": "new"}])),
        3,
    )
    .unwrap();
    a.sync(&mut t).unwrap();
    assert_eq!(node_doc(&node.addr, "rs/revived"), json!({"log": ["new"]}));
    // The stale replica takes the new incarnation whole.
    stale.sync(&mut t).unwrap();
    assert_eq!(stale.to_json(), json!({"log": ["new"]}));
    assert_eq!(stale.heads().expect("heads"), a.heads().expect("heads"));
    // And writes into it land on the node.
    stale
        .apply(
            ops(json!([{"op": "push", "path": ["log"], "value": "after"}])),
            4,
        )
        .unwrap();
    stale.sync(&mut t).unwrap();
    assert_eq!(
        node_doc(&node.addr, "rs/revived"),
        json!({"log": ["new", "after"]})
    );
}

#[test]
fn a_stale_replica_with_unsynced_writes_starts_over_from_the_revived_document() {
    let node = start_node();
    let mut t = transport(&node.addr);
    let id = DocId::new("rs/stale").unwrap();
    let mut a = Replica::open(id.clone(), &mut t).unwrap();
    a.apply(
        ops(json!([{"op": "push", "path": ["log"], "value": "old"}])),
        1,
    )
    .unwrap();
    a.sync(&mut t).unwrap();
    // A replica created before the document existed, writing offline into its own history.
    let mut stale = Replica::new(id.clone());
    stale
        .apply(
            ops(json!([{"op": "push", "path": ["log"], "value": "offline"}])),
            1,
        )
        .unwrap();
    // Meanwhile the document is deleted and written again.
    let (status, _) = http(&node.addr, "DELETE", "/v1/docs/rs/stale", b"").unwrap();
    assert_eq!(status, 200);
    let (status, _) = http(
        &node.addr,
        "PATCH",
        "/v1/docs/rs/stale",
        br#"{"ops":[{"op":"push","path":["log"],"value":"new"}]}"#,
    )
    .unwrap();
    assert_eq!(status, 200);
    // The stale replica's history can never merge with the new incarnation: it starts over
    // (its offline write was concurrent with the delete) and reads what the node has.
    stale.sync(&mut t).unwrap();
    assert_eq!(stale.to_json(), json!({"log": ["new"]}));
    assert_eq!(node_doc(&node.addr, "rs/stale"), json!({"log": ["new"]}));
    stale
        .apply(
            ops(json!([{"op": "push", "path": ["log"], "value": "later"}])),
            2,
        )
        .unwrap();
    stale.sync(&mut t).unwrap();
    assert_eq!(
        node_doc(&node.addr, "rs/stale"),
        json!({"log": ["new", "later"]})
    );
}

/// Writes `n` increments of `n` to `id` over HTTP, then waits until its generation is at least
/// `generation`.
fn compact_under_writes(addr: &str, id: &str, n: usize, generation: u64) {
    for _ in 0..n {
        let (status, _) = http(
            addr,
            "PATCH",
            &format!("/v1/docs/{id}"),
            br#"{"ops":[{"op":"inc","path":["n"],"by":1}]}"#,
        )
        .unwrap();
        assert_eq!(status, 200);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = http(addr, "GET", &format!("/v1/docs/{id}"), b"").unwrap();
        let body: Json = serde_json::from_slice(&body).unwrap();
        if body["generation"].as_u64().unwrap() >= generation {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the document never reached generation {generation}: {body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A counter of the node's `/metrics`.
fn metric(addr: &str, name: &str) -> u64 {
    let (status, body) = http(addr, "GET", "/metrics", b"").unwrap();
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn unsynced_writes_from_before_a_compaction_are_carried_onto_the_new_generation() {
    let node = start_node_with(&["[compaction]", "after_changes = 16"]);
    let mut t = transport(&node.addr);
    let id = DocId::new("rs/compacted").unwrap();
    let mut writer = Replica::open(id.clone(), &mut t).unwrap();
    writer
        .apply(ops(json!([{"op": "inc", "path": ["n"], "by": 1}])), 1)
        .unwrap();
    writer.sync(&mut t).unwrap();
    let mut reader = Replica::open(id.clone(), &mut t).unwrap();
    // Offline writes, then the node compacts the document under writes of others.
    writer
        .apply(
            ops(json!([
                {"op": "inc", "path": ["n"], "by": 5},
                {"op": "push", "path": ["log"], "value": "offline"}
            ])),
            2,
        )
        .unwrap();
    compact_under_writes(&node.addr, "rs/compacted", 64, 1);
    // The writer's copy cannot merge with the new generation: the node carries its changes onto
    // it, and the writer starts over from the node's without making its writes again.
    let stats = writer.sync(&mut t).unwrap();
    assert_eq!(stats.replayed, 0, "{stats:?}");
    assert_eq!(metric(&node.addr, "verge_stale_carried_total"), 1);
    let expected = json!({"n": 70, "log": ["offline"]});
    assert_eq!(writer.to_json(), expected);
    assert_eq!(node_doc(&node.addr, "rs/compacted"), expected);
    // A replica without unsynced writes just takes the new generation.
    let stats = reader.sync(&mut t).unwrap();
    assert_eq!(stats.replayed, 0);
    assert_eq!(reader.to_json(), expected);
    // Both go on writing in it.
    writer
        .apply(ops(json!([{"op": "inc", "path": ["n"], "by": 10}])), 3)
        .unwrap();
    writer.sync(&mut t).unwrap();
    reader.sync(&mut t).unwrap();
    assert_eq!(reader.to_json()["n"], json!(80));
    assert_eq!(node_doc(&node.addr, "rs/compacted")["n"], json!(80));
}

#[test]
fn a_write_whose_answer_was_lost_before_a_compaction_takes_effect_once() {
    let node = start_node_with(&["[compaction]", "after_changes = 16"]);
    let mut t = transport(&node.addr);
    let id = DocId::new("rs/lost").unwrap();
    let mut writer = Replica::open(id.clone(), &mut t).unwrap();
    writer
        .apply(ops(json!([{"op": "inc", "path": ["n"], "by": 1}])), 1)
        .unwrap();
    writer.sync(&mut t).unwrap();
    writer
        .apply(ops(json!([{"op": "inc", "path": ["n"], "by": 1000}])), 2)
        .unwrap();
    // The node takes the write, and its answer is lost on the way back.
    let mut lossy = |id: &DocId, body: &[u8]| -> Result<Vec<u8>, ClientError> {
        transport(&node.addr)(id, body)?;
        Err(ClientError::Network("answer lost".into()))
    };
    let err = writer.sync(&mut lossy).expect_err("the answer is lost");
    assert_eq!(err.code(), "network");
    assert_eq!(node_doc(&node.addr, "rs/lost")["n"], json!(1001));
    compact_under_writes(&node.addr, "rs/lost", 40, 1);
    // The writer cannot tell whether the node took it; the node carries it again, which is the
    // change its compaction already carried.
    let stats = writer.sync(&mut t).unwrap();
    assert_eq!(stats.replayed, 0, "{stats:?}");
    assert_eq!(metric(&node.addr, "verge_stale_carried_total"), 1);
    assert_eq!(node_doc(&node.addr, "rs/lost")["n"], json!(1041));
    assert_eq!(writer.to_json()["n"], json!(1041));
}

#[test]
fn writes_older_than_the_retained_generations_are_made_again() {
    let node = start_node_with(&[
        "[compaction]",
        "after_changes = 16",
        "retain_generations = 4",
    ]);
    let mut t = transport(&node.addr);
    let id = DocId::new("rs/far").unwrap();
    let mut writer = Replica::open(id.clone(), &mut t).unwrap();
    writer
        .apply(ops(json!([{"op": "inc", "path": ["n"], "by": 1}])), 1)
        .unwrap();
    writer.sync(&mut t).unwrap();
    writer
        .apply(
            ops(json!([
                {"op": "inc", "path": ["n"], "by": 5},
                {"op": "push", "path": ["log"], "value": "offline"}
            ])),
            2,
        )
        .unwrap();
    // More generations pass than a node retains (4).
    compact_under_writes(&node.addr, "rs/far", 200, 6);
    let stats = writer.sync(&mut t).unwrap();
    assert_eq!(stats.replayed, 2, "{stats:?}");
    assert_eq!(stats.replay_refused, 0);
    assert_eq!(metric(&node.addr, "verge_stale_not_carried_total"), 1);
    let expected = json!({"n": 206, "log": ["offline"]});
    assert_eq!(writer.to_json(), expected);
    assert_eq!(node_doc(&node.addr, "rs/far"), expected);
}
