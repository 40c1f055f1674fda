//! A full disk degrades a node to read-only instead of stopping it: a real `verge` process on a
//! 16 MiB tmpfs, mounted in a user and mount namespace of its own (`unshare`), which a filler
//! file fills up and frees again.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

use common::{Resp, free_tcp_port, http, metric_value};

/// Runs the node in the namespace and carries out the test's commands there: the tmpfs (and so
/// the data directory) is visible inside it only. Commands are files `cmd-NAME` in the test
/// directory; each is answered with `done-NAME`.
const JAIL: &str = r#"#!/bin/sh
set -u
D="$1"; VERGE="$2"; PORT="$3"
mkdir -p "$D/fs"
mount -t tmpfs -o size=16m tmpfs "$D/fs" || exit 3
touch "$D/done-mount"
pid=
while :; do
  for c in start fill free stop quit; do
    [ -e "$D/cmd-$c" ] || continue
    rm -f "$D/cmd-$c"
    case $c in
      start) "$VERGE" node --data-dir "$D/fs/data" --api-addr "127.0.0.1:$PORT" \
               --gossip-addr 127.0.0.1:0 --config "$D/verge.toml" >> "$D/node.log" 2>&1 &
             pid=$! ;;
      fill) dd if=/dev/zero of="$D/fs/filler" bs=64k >/dev/null 2>&1 ;;
      free) rm -f "$D/fs/filler" ;;
      stop) kill -TERM "$pid"; wait "$pid"; echo $? > "$D/exit-code" ;;
      quit) [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null; exit 0 ;;
    esac
    touch "$D/done-$c"
  done
  sleep 0.05
done
"#;

/// The node's floor: writes stop below 4 MiB free.
const CONFIG: &str = "[storage]\nmin_free_bytes = 4194304\n";
const DEADLINE: Duration = Duration::from_secs(30);

struct Jail {
    dir: tempfile::TempDir,
    child: Child,
    addr: std::net::SocketAddr,
}

impl Jail {
    fn start() -> Jail {
        let dir = tempfile::Builder::new()
            .prefix("verge-disk-")
            .tempdir()
            .unwrap();
        fs::write(dir.path().join("jail.sh"), JAIL).unwrap();
        fs::write(dir.path().join("verge.toml"), CONFIG).unwrap();
        let port = free_tcp_port();
        let child = Command::new("unshare")
            .args(["--user", "--map-root-user", "--mount", "sh"])
            .arg(dir.path().join("jail.sh"))
            .arg(dir.path())
            .arg(env!("CARGO_BIN_EXE_verge"))
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("unshare (util-linux) runs");
        let mut jail = Jail {
            dir,
            child,
            addr: ([127, 0, 0, 1], port).into(),
        };
        jail.wait_file("done-mount");
        jail
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn wait_file(&mut self, name: &str) {
        let deadline = Instant::now() + DEADLINE;
        while !self.path(name).exists() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the namespace ended ({status}) before {name}: user namespaces may be \
                     disabled here (unshare --user --map-root-user --mount)\n{}",
                    self.log()
                );
            }
            assert!(Instant::now() < deadline, "no {name}\n{}", self.log());
            thread::sleep(Duration::from_millis(20));
        }
        fs::remove_file(self.path(name)).unwrap();
    }

    fn run(&mut self, command: &str) {
        fs::write(self.path(&format!("cmd-{command}")), "").unwrap();
        self.wait_file(&format!("done-{command}"));
    }

    fn log(&self) -> String {
        fs::read_to_string(self.path("node.log")).unwrap_or_default()
    }

    fn req(&self, method: &str, target: &str, body: &[u8]) -> Resp {
        http(
            self.addr,
            method,
            target,
            body,
            &[],
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{method} {target}: {e}\n{}", self.log()))
    }

    /// Starts the node and waits until `/readyz` answers `want`.
    fn start_node(&mut self, want: &str) {
        self.run("start");
        self.wait_ready(want);
    }

    fn wait_ready(&self, want: &str) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let probe = http(
                self.addr,
                "GET",
                "/readyz",
                b"",
                &[],
                Duration::from_secs(2),
            );
            if probe.is_ok_and(|r| r.status == 200 && r.text() == want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "readyz never said {want:?}\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop_node(&mut self) {
        self.run("stop");
        let code = fs::read_to_string(self.path("exit-code")).unwrap();
        assert_eq!(code.trim(), "0", "exit code\n{}", self.log());
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        let _ = fs::write(self.path("cmd-quit"), "");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const READY: &str = "ready";
const READ_ONLY: &str = "ready (read-only: disk nearly full)";

fn assert_refused(r: &Resp, what: &str) {
    r.assert_error(507, "insufficient_storage", what);
}

#[test]
fn a_full_disk_refuses_writes_serves_reads_and_recovers() {
    let mut jail = Jail::start();
    jail.start_node(READY);
    let put = |jail: &Jail, id: &str, v: i64| {
        jail.req(
            "PUT",
            &format!("/v1/docs/{id}"),
            json!({ "v": v }).to_string().as_bytes(),
        )
    };
    put(&jail, "cart/a", 1).ok_json("PUT with space");

    // The disk fills up: writes are refused, reads go on, and the node says so.
    jail.run("fill");
    jail.wait_ready(READ_ONLY);
    assert_refused(&put(&jail, "cart/b", 2), "PUT on a full disk");
    let patch = json!({ "ops": [{ "op": "set", "path": ["v"], "value": 9 }] }).to_string();
    assert_refused(
        &jail.req("PATCH", "/v1/docs/cart/a", patch.as_bytes()),
        "PATCH on a full disk",
    );
    assert_refused(
        &jail.req("DELETE", "/v1/docs/cart/a", b""),
        "DELETE on a full disk",
    );
    let read = jail
        .req("GET", "/v1/docs/cart/a", b"")
        .ok_json("GET on a full disk");
    assert_eq!(
        read["doc"],
        json!({ "v": 1 }),
        "the refused PATCH changed nothing"
    );
    let metrics = jail.req("GET", "/metrics", b"").text();
    assert_eq!(metric_value(&metrics, "verge_storage_read_only"), Some(1.0));
    let status = jail.req("GET", "/v1/status", b"").ok_json("status");
    assert_eq!(status["storage"]["read_only"], json!(true), "{status}");

    // It stops cleanly, and starts again on the full disk, read-only.
    jail.stop_node();
    jail.start_node(READ_ONLY);
    let read = jail
        .req("GET", "/v1/docs/cart/a", b"")
        .ok_json("GET after restart");
    assert_eq!(read["doc"], json!({ "v": 1 }));
    assert_refused(
        &put(&jail, "cart/b", 2),
        "PUT after a restart on a full disk",
    );

    // Space returns: writes resume without a restart, and are durable.
    jail.run("free");
    jail.wait_ready(READY);
    put(&jail, "cart/b", 2).ok_json("PUT once space returned");
    jail.req("PATCH", "/v1/docs/cart/a", patch.as_bytes())
        .ok_json("PATCH once space returned");
    jail.stop_node();
    jail.start_node(READY);
    let a = jail.req("GET", "/v1/docs/cart/a", b"").ok_json("GET a");
    assert_eq!(a["doc"], json!({ "v": 9 }));
    let b = jail.req("GET", "/v1/docs/cart/b", b"").ok_json("GET b");
    assert_eq!(b["doc"], json!({ "v": 2 }));
    let log = jail.log();
    assert!(log.contains("refusing writes (read-only)"), "{log}");
    assert!(log.contains("taking writes again"), "{log}");
}
