//! History compaction on a real node (docs/compaction.md): a document that outgrows its
//! generation starts a new one, and no write is lost or counted twice doing so.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::thread;
use std::time::Duration;

use serde_json::{Value, json};

use common::cluster::Cluster;
use common::{Node, wait_for};

/// Changes per generation in these tests: the smallest allowed, so that a few hundred writes
/// start many generations.
const AFTER_CHANGES: u64 = 16;
/// Generations the test nodes retain.
const RETAIN_GENERATIONS: u64 = 4;

/// A node alone (no peers: it compacts without asking anyone) with small generations.
fn compacting_node(name: &str) -> (Node, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("verge.toml");
    fs::write(
        &path,
        format!(
            "[compaction]\nafter_changes = {AFTER_CHANGES}\nafter_bytes = 1048576\n\
             retain_generations = {RETAIN_GENERATIONS}\n"
        ),
    )
    .unwrap();
    let node = Node::start_with(name, vec!["--config".into(), path.display().to_string()]);
    (node, dir)
}

fn metric(node: &Node, name: &str) -> u64 {
    let text = node.get("/metrics").text();
    text.lines()
        .find_map(|line| {
            let (key, value) = line.split_once(' ')?;
            (key == name).then(|| value.trim().parse::<f64>().ok())?
        })
        .map_or(0, |v| v as u64)
}

#[test]
fn a_hot_counter_compacts_while_writers_increment_it_and_stays_exact() {
    let (mut node, _config) = compacting_node("test-compaction");
    const WRITERS: usize = 8;
    const EACH: u64 = 60;
    thread::scope(|s| {
        for w in 0..WRITERS {
            let node = &node;
            s.spawn(move || {
                for i in 0..EACH {
                    // A list push beside each increment: appends must survive too.
                    node.patch_doc(
                        "c/hot",
                        json!([
                            { "op": "inc", "path": ["n"], "by": 1 },
                            { "op": "push", "path": ["log"], "value": format!("{w}-{i}") }
                        ]),
                    )
                    .ok_json("PATCH c/hot");
                }
            });
        }
    });
    let total = WRITERS as u64 * EACH;
    let check = |doc: &Value, context: &str| {
        assert_eq!(doc["doc"]["n"], json!(total), "{context}: {doc}");
        let log = doc["doc"]["log"].as_array().expect("log");
        assert_eq!(log.len() as u64, total, "{context}: every push once");
        let mut seen: Vec<&str> = log.iter().map(|v| v.as_str().unwrap()).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len() as u64, total, "{context}: no push twice");
    };
    // The compactor runs in the background: wait until it caught up with the last writes.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let doc = loop {
        let doc = node.get_doc("c/hot").ok_json("GET c/hot");
        if doc["history_changes"].as_u64().unwrap() <= AFTER_CHANGES
            || std::time::Instant::now() > deadline
        {
            break doc;
        }
        thread::sleep(Duration::from_millis(50));
    };
    check(&doc, "after the writes");
    let generation = doc["generation"].as_u64().unwrap();
    assert!(
        generation >= total / (2 * AFTER_CHANGES),
        "{total} writes at {AFTER_CHANGES} changes a generation started only {generation}: {doc}"
    );
    assert!(
        doc["history_changes"].as_u64().unwrap() <= AFTER_CHANGES,
        "the history is not bounded by the generation size: {doc}"
    );
    // Reads show a generation as soon as it is built; the metric counts it once its commit is
    // durable, which may still be in flight here.
    wait_for(
        Duration::from_secs(10),
        "verge_compactions_total to count every generation started",
        || {
            let started = metric(&node, "verge_compactions_total");
            if started >= generation {
                Ok(())
            } else {
                Err(format!("{started} counted, generation {generation}"))
            }
        },
    );

    // A restart loads the last generation and goes on writing in it.
    node.kill();
    node.restart_after_kill();
    let doc = node.get_doc("c/hot").ok_json("GET c/hot after restart");
    check(&doc, "after a restart");
    assert!(doc["generation"].as_u64().unwrap() >= generation);
    for _ in 0..(2 * AFTER_CHANGES) {
        node.patch_doc("c/hot", json!([{ "op": "inc", "path": ["n"], "by": 1 }]))
            .ok_json("PATCH after restart");
    }
    let doc = node.get_doc("c/hot").ok_json("GET c/hot");
    assert_eq!(doc["doc"]["n"], json!(total + 2 * AFTER_CHANGES), "{doc}");
}

#[test]
fn a_client_copy_from_an_older_generation_is_carried_or_told_to_start_over() {
    let (node, _config) = compacting_node("test-compaction-sync");
    node.patch_doc("c/s", json!([{ "op": "set", "path": ["k"], "value": 1 }]))
        .ok_json("PATCH c/s");
    // A plain Automerge peer's copy: the whole generation-0 history.
    let old = node.req("POST", "/v1/sync/c/s", &empty_sync_message());
    assert_eq!(old.status, 200, "{}", old.text());
    for i in 0..(3 * AFTER_CHANGES) {
        node.patch_doc("c/s", json!([{ "op": "set", "path": ["i"], "value": i }]))
            .ok_json("PATCH c/s");
    }
    let wait_for_generation = |at_least: u64| {
        wait_for(
            Duration::from_secs(20),
            &format!("generation {at_least}"),
            || {
                let doc = node.get_doc("c/s").ok_json("GET");
                let generation = doc["generation"].as_u64().unwrap();
                if generation >= at_least {
                    Ok(())
                } else {
                    Err(format!("generation {generation}"))
                }
            },
        )
    };
    wait_for_generation(1);
    // Offering generation 0's history again (as a stale copy would): the node retains
    // generation 0 and carries the copy's changes, which the new generation holds already, so
    // it tells the copy to start over without making its writes again, and changes nothing.
    let before = node.get_doc("c/s").ok_json("GET");
    let stale = node.req("POST", "/v1/sync/c/s", &old.body);
    assert_eq!(stale.status, 409, "{}", stale.text());
    assert_eq!(stale.json()["error"]["code"], "changes_carried");
    let after = node.get_doc("c/s").ok_json("GET");
    assert_eq!(before["heads"], after["heads"]);
    assert_eq!(after["doc"]["k"], json!(1));
    assert_eq!(metric(&node, "verge_stale_carried_total"), 1);
    // Once more generations passed than a node retains, the copy's changes are refused with a
    // code that says to make its writes again.
    for i in 0..((RETAIN_GENERATIONS + 2) * AFTER_CHANGES) {
        node.patch_doc("c/s", json!([{ "op": "set", "path": ["i"], "value": i }]))
            .ok_json("PATCH c/s");
    }
    wait_for_generation(RETAIN_GENERATIONS + 2);
    let before = node.get_doc("c/s").ok_json("GET");
    let stale = node.req("POST", "/v1/sync/c/s", &old.body);
    assert_eq!(stale.status, 409, "{}", stale.text());
    assert_eq!(stale.json()["error"]["code"], "document_compacted");
    let after = node.get_doc("c/s").ok_json("GET");
    assert_eq!(before["heads"], after["heads"]);
    assert_eq!(metric(&node, "verge_stale_not_carried_total"), 1);
    assert!(metric(&node, "verge_sync_stale_generation_total") >= 2);
}

/// An Automerge sync message from an empty peer: heads none, have none. The node answers
/// with its whole history.
fn empty_sync_message() -> Vec<u8> {
    // Message type 0x42, no heads, no need, one empty have, no changes.
    vec![0x42, 0, 0, 1, 0, 0, 0]
}

/// Sends `each` increments of `c/hot`'s counter from `threads` threads at each of `nodes`;
/// returns how many were acknowledged (all of them: any other answer fails the test).
fn increment_from(nodes: &[&Node], threads: usize, each: u64) -> u64 {
    thread::scope(|s| {
        for node in nodes {
            for _ in 0..threads {
                s.spawn(move || {
                    for _ in 0..each {
                        node.patch_doc("c/hot", json!([{ "op": "inc", "path": ["n"], "by": 1 }]))
                            .ok_json("PATCH c/hot");
                    }
                });
            }
        }
    });
    nodes.len() as u64 * threads as u64 * each
}

/// The state of `c/hot` at `node`: counter, generation and heads.
fn hot_state(node: &Node) -> (Value, u64, Value) {
    let body = node.get_doc("c/hot").ok_json("GET c/hot");
    (
        body["doc"]["n"].clone(),
        body["generation"].as_u64().unwrap(),
        body["heads"].clone(),
    )
}

#[test]
fn three_nodes_compact_a_hot_counter_and_a_node_down_meanwhile_catches_up_exactly() {
    let config = format!(
        "[replication]\nanti_entropy_interval_s = 1\n[compaction]\nafter_changes = {AFTER_CHANGES}\n"
    );
    let mut c = Cluster::start_configured(
        "compact",
        3,
        0,
        |i| (0..3).filter(|&j| j != i).collect(),
        Some(&config),
    );
    c.wait_connected();
    let mut total = 0;
    // All three increment at once until the members agree on a first compaction.
    let (generation, _) = wait_for(Duration::from_secs(60), "a first compaction", || {
        let nodes: Vec<&Node> = c.nodes.iter().collect();
        total += increment_from(&nodes, 2, 10);
        let generation = hot_state(&c.nodes[0]).1;
        if generation >= 1 {
            Ok(generation)
        } else {
            Err(format!("generation {generation} after {total} increments"))
        }
    });
    // The third node goes down; the others go on writing (and cannot compact without it).
    let before_down = hot_state(&c.nodes[2]);
    c.nodes[2].kill();
    total += increment_from(&[&c.nodes[0], &c.nodes[1]], 2, 3 * AFTER_CHANGES);
    // Back: it catches up, the members compact again, and everyone goes on incrementing.
    c.nodes[2].restart_after_kill();
    c.wait_connected();
    let nodes: Vec<&Node> = c.nodes.iter().collect();
    total += increment_from(&nodes, 2, 2 * AFTER_CHANGES);
    let (state, _) = wait_for(
        Duration::from_secs(30),
        "every node to hold the same counter, generation and heads",
        || {
            let states: Vec<_> = c.nodes.iter().map(hot_state).collect();
            if states.iter().all(|s| s == &states[0]) && states[0].1 > before_down.1 {
                Ok(states[0].clone())
            } else {
                Err(format!("{states:?}"))
            }
        },
    );
    assert_eq!(state.0, json!(total), "every acknowledged increment, once");
    assert!(state.1 > generation, "compaction went on after the restart");
    let history = c.nodes[0].get_doc("c/hot").ok_json("GET")["history_changes"]
        .as_u64()
        .unwrap();
    assert!(
        history < total,
        "{history} changes of history after {total} increments"
    );
}
