//! Read-your-writes (`GET ?after=`) and conditional writes (`If-Match`) on real nodes.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::time::{Duration, Instant};

use serde_json::json;

use common::cluster::Cluster;
use common::{Node, http};

const TIMEOUT: Duration = Duration::from_secs(40);

fn heads_param(heads: &[String]) -> String {
    heads.join(",")
}

fn patch_if_match(node: &Node, id: &str, ops: serde_json::Value, if_match: &str) -> common::Resp {
    let body = serde_json::to_vec(&json!({ "ops": ops })).unwrap();
    http(
        node.addr,
        "PATCH",
        &format!("/v1/docs/{id}"),
        &body,
        &[("content-type", "application/json"), ("If-Match", if_match)],
        TIMEOUT,
    )
    .unwrap()
}

#[test]
fn a_conditional_write_applies_only_at_the_heads_it_names() {
    let node = Node::start("if-match");
    let first = node.patch_doc("c/1", json!([{ "op": "set", "path": ["n"], "value": 1 }]));
    let heads = common::heads_of(&first.ok_json("first write"), "first write");
    // Read-modify-write at the heads just read: applies.
    let next = patch_if_match(
        &node,
        "c/1",
        json!([{ "op": "set", "path": ["n"], "value": 2 }]),
        &heads_param(&heads),
    );
    let after = common::heads_of(&next.ok_json("at the heads"), "at the heads");
    // The same heads again (another writer's read, now stale): refused, nothing written.
    let stale = patch_if_match(
        &node,
        "c/1",
        json!([{ "op": "set", "path": ["n"], "value": 3 }]),
        &heads_param(&heads),
    );
    stale.assert_error(412, "precondition_failed", "stale If-Match");
    let doc = node.get_doc("c/1").ok_json("GET c/1");
    assert_eq!(doc["doc"]["n"], json!(2));
    assert_eq!(common::heads_of(&doc, "GET c/1"), after);
    // Quoted as entity tags, in any order: the same heads.
    let quoted: Vec<String> = after.iter().rev().map(|h| format!("\"{h}\"")).collect();
    let ok = patch_if_match(
        &node,
        "c/1",
        json!([{ "op": "inc", "path": ["k"] }]),
        &quoted.join(", "),
    );
    ok.ok_json("quoted heads");
    // Bad headers: a clear 400, nothing written.
    let before = node.get_doc("c/1").ok_json("GET c/1")["heads"].clone();
    for bad in ["zz", &"ab".repeat(33), &vec!["00".repeat(32); 65].join(",")] {
        patch_if_match(&node, "c/1", json!([{ "op": "inc", "path": ["k"] }]), bad).assert_error(
            400,
            "invalid_query",
            bad,
        );
    }
    assert_eq!(node.get_doc("c/1").ok_json("GET c/1")["heads"], before);
}

#[test]
fn a_read_after_heads_waits_for_them_and_times_out_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("verge.toml");
    fs::write(&config, "[compaction]\nafter_changes = 16\n").unwrap();
    let node = Node::start_with(
        "after",
        vec!["--config".into(), config.display().to_string()],
    );
    let w = node.patch_doc("a/1", json!([{ "op": "set", "path": ["v"], "value": "x" }]));
    let heads = common::heads_of(&w.ok_json("write"), "write");
    let read = node.get(&format!("/v1/docs/a/1?after={}", heads_param(&heads)));
    assert_eq!(read.ok_json("after its own heads")["doc"]["v"], json!("x"));
    // Heads of a generation the document has left are still held: their changes are in the
    // root, or carried.
    for i in 0..64 {
        node.patch_doc("a/1", json!([{ "op": "set", "path": ["i"], "value": i }]))
            .ok_json("write");
    }
    common::wait_for(TIMEOUT, "a new generation", || {
        let g = node.get_doc("a/1").ok_json("GET")["generation"]
            .as_u64()
            .unwrap();
        if g >= 2 {
            Ok(())
        } else {
            Err(format!("generation {g}"))
        }
    });
    let read = node.get(&format!("/v1/docs/a/1?after={}", heads_param(&heads)));
    assert_eq!(
        read.ok_json("after heads of a generation left")["doc"]["v"],
        json!("x")
    );
    // Heads nobody holds: 504 after the wait, not before.
    let nowhere = "00".repeat(32);
    let start = Instant::now();
    node.get(&format!("/v1/docs/a/1?after={nowhere}&wait_ms=300"))
        .assert_error(504, "not_yet_replicated", "after heads nobody holds");
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "{:?}",
        start.elapsed()
    );
    // Bad parameters: a clear 400.
    for target in [
        "/v1/docs/a/1?after=xyz".to_string(),
        format!("/v1/docs/a/1?after={nowhere}&wait_ms=30001"),
        format!("/v1/docs/a/1?after={nowhere}&wait_ms=soon"),
        "/v1/docs/a/1?wait_ms=10".to_string(),
        format!("/v1/docs/a/1?after={}", vec![nowhere.clone(); 65].join(",")),
    ] {
        node.get(&target)
            .assert_error(400, "invalid_query", &target);
    }
}

#[test]
fn a_read_at_another_node_waits_for_a_write_made_elsewhere() {
    let c = Cluster::start("ryw", 2, 0, |i| vec![1 - i]);
    c.wait_connected();
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    for i in 0..5 {
        let id = format!("ryw/{i}");
        let w = a.patch_doc(&id, json!([{ "op": "set", "path": ["from"], "value": i }]));
        let heads = common::heads_of(&w.ok_json("write at a"), "write at a");
        // At once, at the other node: it answers once the write arrived, with the write.
        let read = b.get(&format!(
            "/v1/docs/{id}?after={}&wait_ms=20000",
            heads_param(&heads)
        ));
        let doc = read.ok_json("read at b");
        assert_eq!(doc["doc"]["from"], json!(i));
        let held = common::heads_of(&doc, "read at b");
        assert!(
            heads.iter().all(|h| held.contains(h)),
            "{heads:?} in {held:?}"
        );
    }
}

/// A read at B after heads that only A holds, with A stopped (SIGSTOP): `504
/// not_yet_replicated` once `wait_ms` passed, and the document as soon as A is back. B starts
/// after the write and after A stopped, so that nothing of it can have reached B.
#[test]
fn a_read_after_heads_held_only_by_a_stopped_node_times_out() {
    let c = Cluster::start("ryw-stop", 1, 1, |_| Vec::new());
    let a = &c.nodes[0];
    let w = a.patch_doc(
        "ryw/stop",
        json!([{ "op": "set", "path": ["at"], "value": "a" }]),
    );
    let heads = common::heads_of(&w.ok_json("write at a"), "write at a");
    common::pause(a);
    let b = c.start_extra("ryw-stop", 1, &[0]);
    let target = format!(
        "/v1/docs/ryw/stop?after={}&wait_ms=1500",
        heads_param(&heads)
    );
    let started = std::time::Instant::now();
    b.get(&target)
        .assert_error(504, "not_yet_replicated", "a read at b while a is stopped");
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(1500),
        "answered after the wait, not before: {:?}",
        started.elapsed()
    );
    common::resume(a);
    let read = b.get(&format!(
        "/v1/docs/ryw/stop?after={}&wait_ms=30000",
        heads_param(&heads)
    ));
    assert_eq!(read.ok_json("read at b once a is back")["doc"]["at"], "a");
}

/// `verge` against `node`: exit code, stdout, stderr.
fn cli(node: &Node, args: &[&str]) -> (Option<i32>, String, String) {
    let url = format!("http://{}", node.addr);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_verge"))
        .args(["--url", &url])
        .args(args)
        .env_remove("VERGE_TOKEN")
        .env_remove("VERGE_URL")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_cli_reads_after_heads_and_writes_if_they_match() {
    let node = Node::start("cli-ryw");
    let (code, out, err) = cli(
        &node,
        &["patch", "k/1", r#"[{"op":"set","path":["v"],"value":1}]"#],
    );
    assert_eq!(code, Some(0), "{err}");
    let heads: Vec<&str> = out.lines().collect();
    assert!(!heads.is_empty(), "{out}");
    let (code, out, err) = cli(&node, &["get", "k/1", "--after", &heads.join(",")]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("\"v\": 1"), "{out}");
    let (code, _, err) = cli(
        &node,
        &[
            "get",
            "k/1",
            "--after",
            &"00".repeat(32),
            "--wait-ms",
            "100",
        ],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not_yet_replicated"), "{err}");
    // A write at the heads read applies; the same heads again are refused.
    let set2 = r#"[{"op":"set","path":["v"],"value":2}]"#;
    let (code, _, err) = cli(
        &node,
        &["patch", "k/1", set2, "--if-match", &heads.join(",")],
    );
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = cli(
        &node,
        &["put", "k/1", r#"{"v":3}"#, "--if-match", &heads.join(",")],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("precondition_failed"), "{err}");
    assert_eq!(node.get_doc("k/1").ok_json("GET")["doc"]["v"], json!(2));
}
