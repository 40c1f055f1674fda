//! API limits against real `verge node` processes: a request rate per token (`429
//! rate_limited`) and a cap on open connections (`503 too_many_connections`).
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use common::{Node, REQUEST_TIMEOUT, Resp, http, metric_value};
use tempfile::TempDir;

const SLOW: &str = "vg_test-slow-00000000000000000000000000000000000000000000000000000000000";
const FAST: &str = "vg_test-fast-00000000000000000000000000000000000000000000000000000000000";

fn start_with_config(name: &str, config: &str) -> (Node, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("verge.toml");
    fs::write(&path, config).unwrap();
    let node = Node::start_with(name, vec!["--config".into(), path.display().to_string()]);
    (node, dir)
}

fn token_entry(name: &str, secret: &str, role: &str, extra: &str) -> String {
    let hash = verge_node::auth::format_hash(&verge_node::auth::hash_token(secret));
    format!(
        "[[auth.tokens]]\nname = \"{name}\"\nhash = \"{hash}\"\nrole = \"{role}\"\nprefixes = [\"\"]\n{extra}"
    )
}

fn get_as(node: &Node, target: &str, token: &str) -> Resp {
    let auth = format!("Bearer {token}");
    http(
        node.addr,
        "GET",
        target,
        b"",
        &[("Authorization", &auth)],
        REQUEST_TIMEOUT,
    )
    .unwrap()
}

#[test]
fn requests_beyond_a_tokens_rate_get_429_with_retry_after() {
    let config = format!(
        "[limits]\nrequests_per_second_per_token = 3\n[auth]\nmode = \"tokens\"\n{}{}",
        token_entry("slow", SLOW, "read", ""),
        token_entry("fast", FAST, "admin", "requests_per_second = 1000\n"),
    );
    let (node, _dir) = start_with_config("limits-rate", &config);

    let responses: Vec<Resp> = (0..10).map(|_| get_as(&node, "/v1/docs/a", SLOW)).collect();
    let limited: Vec<&Resp> = responses.iter().filter(|r| r.status == 429).collect();
    assert!(
        limited.len() >= 5,
        "a token limited to 3/s sent 10 requests at once; only {} got 429",
        limited.len()
    );
    assert_eq!(responses[0].status, 404, "{}", responses[0].describe());
    for r in &limited {
        r.assert_error(429, "rate_limited", "over the token's rate");
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=2).contains(&retry), "Retry-After {retry}");
    }

    // Another token has its own bucket, and its own higher rate.
    for _ in 0..20 {
        let r = get_as(&node, "/v1/docs/a", FAST);
        assert_eq!(
            r.status,
            404,
            "the fast token must not be limited: {}",
            r.describe()
        );
    }
    let metrics = get_as(&node, "/metrics", FAST);
    assert_eq!(metrics.status, 200);
    let counted =
        metric_value(&metrics.text(), "verge_rate_limited_total{token=\"slow\"}").unwrap_or(0.0);
    assert_eq!(counted, limited.len() as f64, "{}", metrics.text());
    assert_eq!(
        metric_value(&metrics.text(), "verge_rate_limited_total{token=\"fast\"}"),
        None
    );

    // The bucket refills.
    thread::sleep(Duration::from_millis(1100));
    assert_eq!(get_as(&node, "/v1/docs/a", SLOW).status, 404);
    // Probes are never limited.
    for _ in 0..10 {
        assert_eq!(node.get("/readyz").status, 200);
    }
}

#[test]
fn connections_beyond_the_limit_are_refused_then_admitted_again() {
    let (node, _dir) = start_with_config("limits-conn", "[limits]\napi_connections_max = 3\n");
    let idle: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(node.addr).unwrap())
        .collect();
    // Let the server accept them.
    thread::sleep(Duration::from_millis(300));

    let r = http(node.addr, "GET", "/readyz", b"", &[], REQUEST_TIMEOUT).unwrap();
    r.assert_error(503, "too_many_connections", "a fourth connection");
    assert_eq!(r.header("retry-after"), Some("1"));

    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match http(node.addr, "GET", "/readyz", b"", &[], REQUEST_TIMEOUT) {
            Ok(r) if r.status == 200 => break,
            other => assert!(
                Instant::now() < deadline,
                "connections were not admitted again after closing the idle ones: {:?}",
                other.map(|r| r.describe())
            ),
        }
        thread::sleep(Duration::from_millis(50));
    }
    let metrics = node.get("/metrics").text();
    let refused = metric_value(&metrics, "verge_api_connections_refused_total").unwrap_or(0.0);
    assert!(refused >= 1.0, "{metrics}");
    // The server notices a closed connection some time after the client closed it (the
    // `/readyz` one above included), so the gauge is polled down to the one `/metrics` request.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let open = metric_value(&node.get("/metrics").text(), "verge_api_connections");
        if open == Some(1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "connections stay counted after they closed: {open:?} open"
        );
        thread::sleep(Duration::from_millis(50));
    }
}
