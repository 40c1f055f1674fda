//! The change feed on a real node: `GET /v1/watch` resumes after a sequence number (`since`
//! or `Last-Event-ID`) without gap or repeat, across a SIGKILL and restart, and a resume point
//! older than retention is told to reset.

mod common;

use std::time::Duration;

use common::{Node, SseEvent, SseStream};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

fn node_with_feed(name: &str, retain_events: u64) -> (Node, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("verge.toml");
    std::fs::write(&path, format!("[feed]\nretain_events = {retain_events}\n"))
        .expect("write the config");
    let node = Node::start_with(name, vec!["--config".into(), path.display().to_string()]);
    (node, dir)
}

fn watch(node: &Node, target: &str, headers: &[(&str, &str)]) -> SseStream {
    let sse = SseStream::open_with(node.addr, target, headers, WAIT).expect("open watch");
    assert_eq!(sse.status, 200, "{target}");
    sse
}

/// The next `change` event's data and its id, which must be its `seq`.
fn next_change(sse: &mut SseStream, context: &str) -> (u64, Value) {
    let event = sse
        .next_event(WAIT)
        .unwrap_or_else(|| panic!("{context}: no event within {WAIT:?}"));
    assert_eq!(event.event, "change", "{context}: {event:?}");
    let data: Value = serde_json::from_str(&event.data).expect("change data is JSON");
    let seq = data["seq"].as_u64().expect("a seq");
    assert_eq!(
        event.id.as_deref(),
        Some(seq.to_string().as_str()),
        "{context}: id is seq"
    );
    (seq, data)
}

fn write(node: &Node, i: usize) {
    let r = node.patch_doc(
        &format!("feed/{}", i % 7),
        json!([{ "op": "set", "path": ["n"], "value": i }]),
    );
    assert_eq!(r.status, 200, "write {i}: {}", r.describe());
}

/// The ids of the writes, in the order the feed gave them, with the `n` each set.
fn collect(sse: &mut SseStream, count: usize, context: &str) -> Vec<(u64, String)> {
    (0..count)
        .map(|k| {
            let (seq, data) = next_change(sse, &format!("{context}, change {k}"));
            (seq, data["id"].as_str().expect("id").to_owned())
        })
        .collect()
}

#[test]
fn a_watcher_resumes_exactly_after_its_last_event_across_a_kill_and_restart() {
    let (mut node, _dir) = node_with_feed("feed-resume", 100_000);
    let mut sse = watch(&node, "/v1/watch?prefix=feed%2F", &[]);
    for i in 0..100 {
        write(&node, i);
    }
    let first = collect(&mut sse, 100, "first 100");
    drop(sse);
    let last_seen = first.last().expect("100 events").0;
    // Numbers rise by one per change (every change here is under the prefix).
    for pair in first.windows(2) {
        assert_eq!(pair[1].0, pair[0].0 + 1, "{pair:?}");
    }
    for i in 100..200 {
        write(&node, i);
    }
    node.restart_after_kill();
    for i in 200..300 {
        write(&node, i);
    }
    // A browser reconnecting repeats the URL it opened (here with an older `since`) and adds
    // Last-Event-ID: the header wins.
    let mut sse = watch(
        &node,
        "/v1/watch?prefix=feed%2F&since=3",
        &[("Last-Event-ID", &last_seen.to_string())],
    );
    let rest = collect(&mut sse, 200, "the other 200");
    let expected: Vec<u64> = (last_seen + 1..=last_seen + 200).collect();
    assert_eq!(
        rest.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
        expected,
        "exactly the 200 after the last seen, in order"
    );
    for (k, (_, id)) in rest.iter().enumerate() {
        assert_eq!(
            id,
            &format!("feed/{}", (k + 100) % 7),
            "change {k} in write order"
        );
    }
    assert!(
        sse.next_event(Duration::from_millis(500)).is_none(),
        "nothing more"
    );
    // Then it follows live changes.
    write(&node, 300);
    let (seq, data) = next_change(&mut sse, "live after catching up");
    assert_eq!(seq, last_seen + 201);
    assert_eq!(data["id"], "feed/6");

    // `?since=` alone does the same, and `include=doc` carries the document.
    let mut sse = watch(
        &node,
        &format!(
            "/v1/watch?prefix=feed%2F&since={}&include=doc",
            last_seen + 199
        ),
        &[],
    );
    let (seq, data) = next_change(&mut sse, "since with include=doc");
    assert_eq!(seq, last_seen + 200);
    assert_eq!(data["id"], "feed/5", "write 299");
    assert_eq!(data["doc"]["n"], json!(299), "{data}");
}

#[test]
fn a_resume_point_older_than_retention_is_told_to_reset() {
    let (node, _dir) = node_with_feed("feed-reset", 10);
    for i in 0..30 {
        write(&node, i);
    }
    let mut sse = watch(&node, "/v1/watch?since=2", &[]);
    let reset: SseEvent = sse.next_event(WAIT).expect("a reset event");
    assert_eq!(reset.event, "reset", "{reset:?}");
    let data: Value = serde_json::from_str(&reset.data).expect("JSON");
    assert_eq!(
        data,
        json!({ "oldest": 21, "last": 30 }),
        "the newest 10 kept"
    );
    assert_eq!(
        reset.id.as_deref(),
        Some("30"),
        "resuming from the reset goes on after it"
    );
    // Then live changes, from after `last`.
    write(&node, 30);
    let (seq, _) = next_change(&mut sse, "live after the reset");
    assert_eq!(seq, 31);

    // Resuming right before the oldest kept (22 now) is no reset.
    let mut sse = watch(&node, "/v1/watch?since=21", &[]);
    let seqs: Vec<u64> = (0..10).map(|_| next_change(&mut sse, "kept").0).collect();
    assert_eq!(seqs, (22..=31).collect::<Vec<_>>());
    // A number this node never gave is a reset too.
    let mut sse = watch(&node, "/v1/watch?since=1000", &[]);
    assert_eq!(sse.next_event(WAIT).expect("reset").event, "reset");
    let metrics = node.get("/metrics").text();
    assert!(
        metrics.contains("verge_watch_resets_total 2"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("watch") || l.contains("feed"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(metrics.contains("verge_feed_last_seq 31"));
}

#[test]
fn malformed_resume_points_are_refused_clearly() {
    let node = Node::start("feed-bad");
    for target in [
        "/v1/watch?since=-1",
        "/v1/watch?since=abc",
        "/v1/watch?since=99999999999999999999999",
        "/v1/watch?include=everything",
        "/v1/watch?sinse=1",
    ] {
        node.get(target).assert_error(400, "invalid_query", target);
    }
    let sse = SseStream::open_with(node.addr, "/v1/watch", &[("Last-Event-ID", "x1")], WAIT)
        .expect("open");
    assert_eq!(sse.status, 400, "a malformed Last-Event-ID");
    node.assert_serving("after bad watch requests");
}
