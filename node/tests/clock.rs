//! Wall clocks that disagree or move back, on real `verge` processes whose clock is moved with
//! libfaketime (`scripts/fetch-faketime.sh` fetches it; `LD_PRELOAD` applies it to the node's
//! wall clock only, not to its monotonic clock).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::cluster::{Cluster, members, members_up};
use common::{Node, metric_value, wait_for};

/// How long peers get to take a restarted node back.
const TAKEN_BACK_WITHIN: Duration = Duration::from_secs(30);
/// How long the restarted node must then stay up at its peer.
const STAYS_UP_FOR: Duration = Duration::from_secs(15);
const DAY_MS: i64 = 24 * 3600 * 1000;

/// libfaketime's multi-threaded library: `VERGE_TEST_FAKETIME`, else the one
/// `scripts/fetch-faketime.sh` put under `target/faketime`.
fn faketime_library() -> PathBuf {
    if let Some(path) = std::env::var_os("VERGE_TEST_FAKETIME") {
        return PathBuf::from(path);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/faketime/usr/lib");
    let found = std::fs::read_dir(&root).ok().and_then(|dirs| {
        dirs.filter_map(Result::ok)
            .map(|d| d.path().join("faketime/libfaketimeMT.so.1"))
            .find(|p| p.exists())
    });
    found.unwrap_or_else(|| {
        panic!(
            "libfaketime is missing under {}: run scripts/fetch-faketime.sh (scripts/test.sh \
             does), or set VERGE_TEST_FAKETIME to libfaketimeMT.so.1",
            root.display()
        )
    })
}

/// The environment that runs a node with its wall clock moved by `offset` (libfaketime's
/// syntax, e.g. `+1d`).
fn clock_moved(offset: &str) -> Vec<(String, String)> {
    vec![
        (
            "LD_PRELOAD".into(),
            faketime_library().display().to_string(),
        ),
        ("FAKETIME".into(), offset.into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ]
}

fn restart_with(node: &mut Node, env: Vec<(String, String)>) {
    let status = node.terminate(Duration::from_secs(20));
    assert!(status.success(), "{status}");
    node.env = env;
    node.append_log_marker("restart with another clock");
    node.spawn();
}

/// The member `addr` as `node` shows it in status.
fn member(node: &Node, addr: &str) -> serde_json::Value {
    members(node)
        .into_iter()
        .find(|m| m["addr"] == addr)
        .unwrap_or_else(|| panic!("{} does not list {addr}", node.node_id))
}

/// `verge_peers_down` agrees with the members status shows as down.
fn assert_status_and_metric_agree(node: &Node) {
    wait_for(
        Duration::from_secs(10),
        "status and peers_down to agree",
        || {
            let down = members(node)
                .iter()
                .filter(|m| m["state"] == "down")
                .count();
            let metrics = node.get("/metrics").text();
            let metric = metric_value(&metrics, "verge_peers_down").unwrap_or(-1.0);
            if metric == down as f64 {
                Ok(())
            } else {
                Err(format!(
                    "status shows {down} down, verge_peers_down {metric}"
                ))
            }
        },
    );
}

#[test]
fn a_node_that_ran_a_day_ahead_is_taken_back_with_the_right_clock() {
    let mut cluster = Cluster::start("clock", 2, 0, |i| if i == 1 { vec![0] } else { vec![] });
    cluster.wait_connected();
    let addrs: Vec<String> = cluster
        .ports
        .iter()
        .map(|p| common::cluster::gossip_addr(*p).to_string())
        .collect();

    // b runs with its clock a day ahead: a takes it back, and warns about the clock.
    restart_with(&mut cluster.nodes[1], clock_moved("+1d"));
    cluster.wait_connected();
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    wait_for(Duration::from_secs(10), "a to measure b's clock", || {
        let offset = member(a, &addrs[1])["clock_offset_ms"].as_i64();
        match offset {
            Some(ms) if (ms - DAY_MS).abs() < 60_000 => Ok(()),
            other => Err(format!("b's clock offset at a: {other:?}")),
        }
    });
    wait_for(Duration::from_secs(10), "b to measure a's clock", || {
        match member(b, &addrs[0])["clock_offset_ms"].as_i64() {
            Some(ms) if (ms + DAY_MS).abs() < 60_000 => Ok(()),
            other => Err(format!("a's clock offset at b: {other:?}")),
        }
    });
    wait_for(
        Duration::from_secs(10),
        "the skew to be counted",
        || match a.metric("verge_peer_clock_skews_total") {
            n if n >= 1.0 => Ok(()),
            n => Err(format!("verge_peer_clock_skews_total {n}")),
        },
    );
    wait_for(
        Duration::from_secs(10),
        "the widest offset in metrics",
        || match a.metric("verge_peer_clock_offset_max_ms") {
            ms if ms > (DAY_MS - 60_000) as f64 => Ok(()),
            ms => Err(format!("verge_peer_clock_offset_max_ms {ms}")),
        },
    );
    wait_for(Duration::from_secs(10), "a to log the skew", || {
        if a.output()
            .contains("a peer's wall clock is far from this node's")
        {
            Ok(())
        } else {
            Err("no skew warning in a's log".into())
        }
    });

    // b restarts with the right clock: its peers take it back (they kept it down while its
    // membership generation, the start time, was below the one of its run a day ahead).
    restart_with(&mut cluster.nodes[1], Vec::new());
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    wait_for(TAKEN_BACK_WITHIN, "a to take b back", || {
        let up = members_up(a);
        if up.contains(&addrs[1]) {
            Ok(())
        } else {
            Err(format!("a's members: {:?}", members(a)))
        }
    });
    wait_for(TAKEN_BACK_WITHIN, "b to see a up", || {
        if members_up(b).contains(&addrs[0]) {
            Ok(())
        } else {
            Err(format!("b's members: {:?}", members(b)))
        }
    });
    // ...and keep it: SWIM probes the member for several rounds, which a stale generation
    // does not survive (it was declared down a few seconds after the restart, for good). A
    // member may flap on a starved machine, so what counts is that it is up after the rounds.
    std::thread::sleep(STAYS_UP_FOR);
    for (node, other) in [(a, &addrs[1]), (b, &addrs[0])] {
        wait_for(
            TAKEN_BACK_WITHIN,
            "the member to be up after SWIM's rounds",
            || {
                if members_up(node).contains(other) {
                    Ok(())
                } else {
                    Err(format!(
                        "{} lists {other} down: {:?}",
                        node.node_id,
                        members(node)
                    ))
                }
            },
        );
        assert_status_and_metric_agree(node);
    }
    wait_for(Duration::from_secs(10), "the clocks to agree again", || {
        match member(a, &addrs[1])["clock_offset_ms"].as_i64() {
            Some(ms) if ms.abs() < 2_000 => Ok(()),
            other => Err(format!("b's clock offset at a: {other:?}")),
        }
    });
    // And writes flow both ways again.
    b.put_doc("after/clock", &serde_json::json!({ "x": 1 }))
        .ok_json("PUT at b");
    wait_for(Duration::from_secs(10), "a to get b's write", || {
        match a.get_doc("after/clock").status {
            200 => Ok(()),
            s => Err(format!("{s}")),
        }
    });
}
