//! Process lifecycle: graceful shutdown on SIGTERM, restart with the data, zero-config start.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::{Node, http, read_log, spawn_verge, wait_ready, wait_timeout};

#[test]
fn sigterm_drains_exits_zero_and_data_survives_restart() {
    let mut node = Node::start("test-sigterm");
    for i in 0..5 {
        node.put_doc(&format!("t/{i}"), &json!({ "i": i }))
            .ok_json("PUT before SIGTERM");
    }
    // Writers keep going while the node shuts down; every 200 must be on disk.
    let addr = node.addr;
    let stop = AtomicBool::new(false);
    let acked: Mutex<BTreeMap<String, i64>> = Mutex::new(BTreeMap::new());
    let acks = AtomicUsize::new(0);
    let status = thread::scope(|s| {
        for t in 0..4 {
            let (stop, acked, acks) = (&stop, &acked, &acks);
            s.spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("w{t}-{n}");
                    let body = json!({ "ops": [{ "op": "set", "path": [key], "value": n }] }).to_string();
                    match http(addr, "PATCH", "/v1/docs/t/live", body.as_bytes(), &[], Duration::from_secs(5)) {
                        Ok(r) if r.status == 200 => {
                            acked.lock().unwrap().insert(key, n);
                            acks.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => {
                            let code = r.error_code();
                            assert!(
                                r.status == 503 && matches!(code.as_deref(), Some("shutting_down") | Some("overloaded")),
                                "a write during shutdown must succeed or answer 503 shutting_down/overloaded: {}",
                                r.describe()
                            );
                            thread::sleep(Duration::from_millis(5));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(5)),
                    }
                    n += 1;
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while acks.load(Ordering::Relaxed) < 20 {
            assert!(Instant::now() < deadline, "writers got no acknowledgements");
            thread::sleep(Duration::from_millis(5));
        }
        let status = node.terminate(Duration::from_secs(20));
        stop.store(true, Ordering::Relaxed);
        status
    });
    assert!(
        status.success(),
        "verge node must exit 0 after SIGTERM, got {status}\n--- node output ---\n{}",
        common::tail(&node.output(), 4000)
    );

    node.append_log_marker("restart after SIGTERM");
    node.spawn();
    for i in 0..5 {
        let body = node.get_doc(&format!("t/{i}")).ok_json("GET after restart");
        assert_eq!(body["doc"], json!({ "i": i }));
    }
    let acked = acked.into_inner().unwrap();
    let body = node.get_doc("t/live").ok_json("GET t/live after restart");
    let doc = body["doc"].as_object().unwrap();
    let missing: Vec<&String> = acked
        .iter()
        .filter(|(k, v)| doc.get(*k) != Some(&Value::from(**v)))
        .map(|(k, _)| k)
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged writes lost across SIGTERM: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(10)]
    );
}

#[test]
fn zero_config_node_uses_verge_data_and_port_7070() {
    // The defaults are fixed ports; skip rather than fail when something else has them.
    for port in [7070u16, 7071] {
        if TcpListener::bind(("127.0.0.1", port)).is_err() {
            println!(
                "SKIPPED zero_config_node_uses_verge_data_and_port_7070: 127.0.0.1:{port} (TCP) is taken"
            );
            return;
        }
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_err() {
            println!(
                "SKIPPED zero_config_node_uses_verge_data_and_port_7070: 127.0.0.1:{port} (UDP) is taken"
            );
            return;
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path().join("cwd");
    let log = tmp.path().join("node.log");
    let mut child = spawn_verge(&["node".to_string()], &cwd, &log);
    let addr_file = cwd.join("verge-data").join("api.addr");
    let addr = match wait_ready(&mut child, &addr_file, &log, common::START_TIMEOUT) {
        Ok(a) => a,
        Err(why) => {
            let _ = child.kill();
            let _ = child.wait();
            let out = read_log(&log);
            if out.to_lowercase().contains("address already in use") || out.contains("AddrInUse") {
                println!(
                    "SKIPPED zero_config_node_uses_verge_data_and_port_7070: a default port was taken meanwhile:\n{out}"
                );
                return;
            }
            panic!("zero-config verge node did not come up: {why}\n--- node output ---\n{out}");
        }
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert_eq!(
            addr,
            "127.0.0.1:7070".parse().unwrap(),
            "default API address"
        );
        assert!(
            cwd.join("verge-data").is_dir(),
            "./verge-data was not created"
        );
        let r = http(
            addr,
            "PUT",
            "/v1/docs/zc/1",
            b"{\"a\":1}",
            &[],
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(r.status, 200, "{}", r.describe());
        let r = http(
            addr,
            "GET",
            "/v1/docs/zc/1",
            b"",
            &[],
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(r.json()["doc"], json!({ "a": 1 }));
    }));
    // Stop it gracefully so the port is free for whoever is next.
    #[allow(unsafe_code)]
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our unreaped child.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let status = wait_timeout(&mut child, Duration::from_secs(20));
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    if let Err(e) = result {
        eprintln!("--- node output ---\n{}", read_log(&log));
        std::panic::resume_unwind(e);
    }
    let status = status.expect("zero-config node did not exit within 20 s of SIGTERM");
    assert!(
        status.success(),
        "zero-config node exited with {status} after SIGTERM\n{}",
        read_log(&log)
    );
}

#[test]
fn restart_keeps_heads_tombstones_expiry_and_listing() {
    let mut node = Node::start("test-restart");
    node.put_doc("r/a", &json!({ "a": 1, "nested": { "l": [1, 2] } }))
        .ok_json("PUT r/a");
    node.patch_doc(
        "r/a",
        json!([
            { "op": "inc", "path": ["n"], "by": 4 },
            { "op": "splice", "path": ["t"], "index": 0, "text": "text" }
        ]),
    )
    .ok_json("PATCH r/a");
    node.put_doc("r/gone", &json!({ "x": 1 }))
        .ok_json("PUT r/gone");
    node.delete_doc("r/gone").ok_json("DELETE r/gone");
    node.req("PUT", "/v1/docs/r/ttl?ttl=3600", b"{\"t\":1}")
        .ok_json("PUT r/ttl?ttl=3600");

    let before_a = node.get_doc("r/a").ok_json("GET r/a");
    let before_ttl = node.get_doc("r/ttl").ok_json("GET r/ttl");
    let before_list = node.get("/v1/docs?prefix=r%2F").ok_json("list");
    let before_status = node.get("/v1/status").ok_json("status");

    for how in ["SIGKILL", "SIGTERM"] {
        if how == "SIGKILL" {
            node.kill();
        } else {
            let st = node.terminate(Duration::from_secs(20));
            assert!(st.success(), "exit status after SIGTERM: {st}");
        }
        node.append_log_marker(&format!("restart after {how}"));
        node.spawn();
        let a = node.get_doc("r/a").ok_json("GET r/a after restart");
        assert_eq!(a, before_a, "r/a (doc and heads) after a restart by {how}");
        assert_eq!(
            a["doc"],
            json!({ "a": 1, "nested": { "l": [1, 2] }, "n": 4, "t": "text" })
        );
        node.get_doc("r/gone")
            .assert_error(404, "not_found", &format!("deleted doc after {how}"));
        let t = node.get_doc("r/ttl").ok_json("GET r/ttl after restart");
        assert_eq!(t, before_ttl, "expiry after a restart by {how}");
        assert!(t["expires_at_ms"].is_u64(), "{t}");
        let list = node
            .get("/v1/docs?prefix=r%2F")
            .ok_json("list after restart");
        assert_eq!(list, before_list, "listing after a restart by {how}");
        let status = node.get("/v1/status").ok_json("status after restart");
        // w/after, written after the first restart, is there from the second on.
        let extra = u64::from(how == "SIGTERM");
        assert_eq!(
            status["docs"].as_u64(),
            before_status["docs"].as_u64().map(|n| n + extra),
            "{status}"
        );
        assert_eq!(status["node_id"], json!("test-restart"));
        // Writing after a restart works (the node writes with a fresh actor) and is kept.
        let key = format!("after-{how}");
        node.patch_doc(
            "w/after",
            json!([{ "op": "set", "path": [key], "value": true }]),
        )
        .ok_json("PATCH after restart");
        let w = node.get_doc("w/after").ok_json("GET w/after");
        assert_eq!(w["doc"][&key], json!(true), "{w}");
    }
}

/// A client that sent half a request when SIGTERM came neither delays the exit nor makes the
/// node report lost writes (it waited for the drain timeout, then logged that "unacknowledged
/// writes are lost" with none pending).
#[test]
fn sigterm_with_half_sent_requests_exits_at_once_without_false_alarms() {
    use std::io::Write;
    let mut node = Node::start("test-sigterm-half");
    node.put_doc("h/1", &serde_json::json!({ "a": 1 }))
        .ok_json("PUT before SIGTERM");
    let mut half: Vec<std::net::TcpStream> = Vec::new();
    for target in [
        "GET /v1/docs/h/1 HTTP/1.1\r\nhost",
        "PUT /v1/docs/h/2 HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"b\":",
    ] {
        let mut stream = std::net::TcpStream::connect(node.addr).unwrap();
        stream.write_all(target.as_bytes()).unwrap();
        half.push(stream);
    }
    // Once the node holds both connections (and the one asking), stop it.
    common::wait_for(
        Duration::from_secs(10),
        "the node to accept both",
        || match node.metric("verge_api_connections") {
            n if n >= 3.0 => Ok(()),
            n => Err(format!("{n} API connections")),
        },
    );
    let started = Instant::now();
    let status = node.terminate(Duration::from_secs(30));
    let took = started.elapsed();
    let output = node.output();
    assert!(
        status.success(),
        "exit {status}\n{}",
        common::tail(&output, 4000)
    );
    // Before, it waited for the 10 s drain timeout, then up to 10 s more for the writer.
    assert!(
        took < Duration::from_secs(8),
        "SIGTERM took {took:?} with half-sent requests open\n{}",
        common::tail(&output, 4000)
    );
    assert!(
        !output.contains("did not drain"),
        "a false alarm about lost writes:\n{}",
        common::tail(&output, 4000)
    );
    drop(half);
}
