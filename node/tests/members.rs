//! Retiring nodes: `verge leave` and `verge members forget`, on clusters of real `verge`
//! processes over QUIC with mutual TLS. Each node has every other as a configured seed, the
//! case where a departed node would otherwise be dialled forever.
//!
//! "No longer dialled" is checked where it shows: once the departed node's process is gone, a
//! UDP socket bound to its gossip address must receive nothing (no QUIC handshake, no SWIM
//! packet) for longer than the longest dial back-off; a dialled seed gets a packet at least
//! that often.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::UdpSocket;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::cluster::{Cluster, MEMBERSHIP_DEADLINE, gossip_addr, members};
use common::{Node, wait_for};

/// Longer than the longest wait between two dials of an unreachable peer
/// (`DIAL_BACKOFF_MAX_MS`, 5 s) plus a tick and SWIM's re-announce period (5 s).
const QUIET_WINDOW: Duration = Duration::from_secs(7);

fn all_others(n: usize) -> impl Fn(usize) -> Vec<usize> {
    move |i| (0..n).filter(|j| *j != i).collect()
}

/// Runs the `verge` CLI against `node`.
fn verge(node: &Node, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_verge"))
        .args(args)
        .args(["--url", &format!("http://{}", node.addr)])
        .env_remove("VERGE_URL")
        .env_remove("VERGE_TOKEN")
        .stdin(Stdio::null())
        .output()
        .expect("run the verge CLI")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The addresses in a node's `departed` list.
fn departed(node: &Node) -> Vec<String> {
    let status = node.get("/v1/status").ok_json("GET /v1/status");
    status["departed"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until `node` no longer lists `addr` among its members (in any state) and lists it as
/// departed.
fn wait_dropped(node: &Node, addr: &str) {
    wait_for(
        MEMBERSHIP_DEADLINE,
        &format!("{} to drop {addr}", node.node_id),
        || {
            let log = common::tail(&node.output(), 3000);
            let listed: Vec<Value> = members(node)
                .into_iter()
                .filter(|m| m["addr"] == addr)
                .collect();
            if listed.is_empty() && departed(node).iter().any(|a| a == addr) {
                Ok(())
            } else {
                Err(format!(
                    "still listed: {listed:?}; status: {}\n--- log ---\n{log}",
                    node.get("/v1/status").text()
                ))
            }
        },
    );
}

/// The value of an unlabelled or labelled sample of `/metrics`, e.g.
/// `verge_members_departed_total{reason="left"}`.
fn metric(node: &Node, sample: &str) -> f64 {
    let body = node.get("/metrics").text();
    body.lines()
        .find_map(|l| {
            l.strip_prefix(sample)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("{sample} not in /metrics:\n{body}"))
}

/// Binds the departed node's gossip address (its process is gone) and asserts that nothing
/// arrives there for [`QUIET_WINDOW`].
fn assert_not_dialled(cluster: &Cluster, port: u16) {
    let (socket, _) = wait_for(
        Duration::from_secs(10),
        "the departed node's gossip port to be free",
        || UdpSocket::bind(gossip_addr(port)).map_err(|e| e.to_string()),
    );
    let end = Instant::now() + QUIET_WINDOW;
    let mut buf = [0u8; 2048];
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        if left.is_zero() {
            break;
        }
        socket.set_read_timeout(Some(left)).unwrap();
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => panic!(
                "{from} sent {n} bytes to the departed node's address {}: it is still dialled \
                 (cluster ports {:?})\n--- logs ---\n{}",
                gossip_addr(port),
                cluster.ports,
                cluster
                    .nodes
                    .iter()
                    .map(|n| common::tail(&n.output(), 6000))
                    .collect::<Vec<_>>()
                    .join("\n-----\n")
            ),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("receiving on the departed node's address: {e}"),
        }
    }
}

fn wait_exited(node: &mut Node, why: &str) {
    wait_for(Duration::from_secs(20), why, || {
        if node.is_running() {
            Err(format!("still running; log:\n{}", node.output()))
        } else {
            Ok(())
        }
    });
}

#[test]
fn a_node_that_leaves_is_dropped_by_the_others_never_dialled_and_rejoins_when_started_again() {
    let mut cluster = Cluster::start("leave", 3, 0, all_others(3));
    cluster.wait_connected();
    let gone = gossip_addr(cluster.ports[2]).to_string();
    // A write just before: the leaving node drains it, and it reaches the others.
    let w = cluster.nodes[2].put_doc("leave/last", &json!({ "v": 1 }));
    assert_eq!(w.status, 200, "{}", w.describe());

    let out = verge(&cluster.nodes[2], &["leave"]);
    assert!(
        out.status.success(),
        "verge leave: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let said = text(&out.stdout);
    assert!(
        said.contains("left the cluster"),
        "verge leave printed: {said}"
    );
    for port in &cluster.ports[..2] {
        assert!(
            said.contains(&gossip_addr(*port).to_string()),
            "both members confirmed the announcement: {said}"
        );
    }
    wait_exited(&mut cluster.nodes[2], "the node that left to stop");
    let log = cluster.nodes[2].output();
    assert!(log.contains("node stopped"), "a graceful stop:\n{log}");

    for survivor in &cluster.nodes[..2] {
        wait_dropped(survivor, &gone);
        assert_eq!(
            metric(survivor, "verge_members_departed_total{reason=\"left\"}"),
            1.0
        );
        wait_for(
            Duration::from_secs(5),
            "the peer gauges to leave the departed node out",
            || match metric(survivor, "verge_peers_down") {
                0.0 => Ok(()),
                n => Err(format!(
                    "verge_peers_down {n}; status {}",
                    survivor.get("/v1/status").text()
                )),
            },
        );
        let r = survivor.get_doc("leave/last");
        assert_eq!(
            r.status,
            200,
            "the last write before leaving: {}",
            r.describe()
        );
    }
    assert_not_dialled(&cluster, cluster.ports[2]);
    for survivor in &cluster.nodes[..2] {
        assert!(
            members(survivor).iter().all(|m| m["addr"] != gone.as_str()),
            "still dropped after the quiet window"
        );
    }

    // Started again (a new generation), it is a member again.
    cluster.nodes[2].kill();
    cluster.nodes[2].append_log_marker("start after leaving");
    cluster.nodes[2].spawn();
    cluster.wait_connected();
    for survivor in &cluster.nodes[..2] {
        assert!(!departed(survivor).contains(&gone), "no longer departed");
    }
}

#[test]
fn forget_drops_a_killed_node_everywhere_and_refuses_unknown_and_own_addresses() {
    let mut cluster = Cluster::start("forget", 3, 0, all_others(3));
    cluster.wait_connected();
    let gone = gossip_addr(cluster.ports[2]).to_string();
    cluster.nodes[2].kill();
    // Until forgotten, a killed node is listed as down (and dialled).
    for survivor in &cluster.nodes[..2] {
        wait_for(
            Duration::from_secs(20),
            &format!("{} to list the killed node as down", survivor.node_id),
            || {
                let m = members(survivor);
                if m.iter()
                    .any(|m| m["addr"] == gone.as_str() && m["state"] == "down")
                {
                    Ok(())
                } else {
                    Err(format!("members: {m:?}"))
                }
            },
        );
    }

    let out = verge(&cluster.nodes[0], &["members", "forget", &gone]);
    assert!(
        out.status.success(),
        "verge members forget: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains(&format!("forgot {gone}")));
    // Dropped where it was forgotten by the time the command returns; the other learns it
    // from the gossip.
    assert!(
        members(&cluster.nodes[0])
            .iter()
            .all(|m| m["addr"] != gone.as_str())
    );
    for survivor in &cluster.nodes[..2] {
        wait_dropped(survivor, &gone);
        assert_eq!(
            metric(
                survivor,
                "verge_members_departed_total{reason=\"forgotten\"}"
            ),
            1.0
        );
    }
    assert_not_dialled(&cluster, cluster.ports[2]);

    // Errors: an address that is not a member, the node's own, one forgotten already, and
    // one that is not an address.
    let out = verge(&cluster.nodes[0], &["members", "forget", "127.0.0.1:9"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("not_a_member"),
        "{}",
        text(&out.stderr)
    );
    let forget = |node: &Node, addr: &str| {
        node.req(
            "POST",
            "/v1/admin/members/forget",
            json!({ "addr": addr }).to_string().as_bytes(),
        )
    };
    let own = gossip_addr(cluster.ports[0]).to_string();
    let r = forget(&cluster.nodes[0], &own);
    assert_eq!(r.status, 400, "{}", r.describe());
    assert_eq!(r.json()["error"]["code"], "cannot_forget_self");
    let r = forget(&cluster.nodes[1], &gone);
    assert_eq!(r.status, 404, "already gone: {}", r.describe());
    assert_eq!(r.json()["error"]["code"], "not_a_member");
    let r = forget(&cluster.nodes[0], "not-an-address");
    assert_eq!(r.status, 400, "{}", r.describe());
    assert_eq!(r.json()["error"]["code"], "invalid_addr");
    // The survivors still replicate with each other.
    let w = cluster.nodes[0].put_doc("forget/after", &json!({ "v": 2 }));
    assert_eq!(w.status, 200, "{}", w.describe());
    wait_for(
        MEMBERSHIP_DEADLINE,
        "the write to reach the other survivor",
        || match cluster.nodes[1].get_doc("forget/after").status {
            200 => Ok(()),
            s => Err(format!("status {s}")),
        },
    );
}

#[test]
fn sigterm_with_leave_on_shutdown_leaves_the_cluster() {
    let mut cluster = Cluster::start("sigleave", 3, 0, all_others(3));
    cluster.wait_connected();
    // Restarted with the flag.
    cluster.nodes[2].kill();
    cluster.nodes[2]
        .extra_args
        .push("--leave-on-shutdown".into());
    cluster.nodes[2].spawn();
    cluster.wait_connected();
    // The new start knows its members by name once SWIM told it of them.
    wait_for(
        MEMBERSHIP_DEADLINE,
        "the restarted node to know its members",
        || {
            let m = members(&cluster.nodes[2]);
            if m.iter().filter(|m| m["node_id"].is_string()).count() == 3 {
                Ok(())
            } else {
                Err(format!("{m:?}"))
            }
        },
    );
    let status = cluster.nodes[2].terminate(Duration::from_secs(20));
    assert!(status.success(), "{status}");
    let log = cluster.nodes[2].output();
    assert!(log.contains("left the cluster"), "{log}");
    assert!(!log.contains("told=[]"), "members were told: {log}");
    let gone = gossip_addr(cluster.ports[2]).to_string();
    for survivor in &cluster.nodes[..2] {
        wait_dropped(survivor, &gone);
    }
}
