//! API limits against real `verge node` processes: a request rate per token (`429
//! rate_limited`), caps on open connections per node and per client address (`503
//! too_many_connections`, probes still answered), and timeouts that close idle, slowloris and
//! never-ending connections (`408 request_timeout` for a body).
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

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
        "[limits]\nrequests_per_second_per_token = 1\n[auth]\nmode = \"tokens\"\n{}{}",
        token_entry("slow", SLOW, "read", ""),
        token_entry("fast", FAST, "admin", "requests_per_second = 1000\n"),
    );
    let (node, _dir) = start_with_config("limits-rate", &config);

    // At 1 request per second, 10 requests get at least 5 refusals unless they take over 4 s
    // (a loaded machine took about a second at 3 per second, and got fewer).
    let started = Instant::now();
    let responses: Vec<Resp> = (0..10).map(|_| get_as(&node, "/v1/docs/a", SLOW)).collect();
    let took = started.elapsed();
    let limited: Vec<&Resp> = responses.iter().filter(|r| r.status == 429).collect();
    assert!(
        limited.len() >= 5 || took > Duration::from_secs(4),
        "a token limited to 1/s sent 10 requests at once; only {} got 429 (they took {took:?})",
        limited.len()
    );
    assert!(!limited.is_empty(), "no request was refused");
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
    // The idle connections send nothing: a header timeout longer than the test can take keeps
    // them open (under load, the default 10 s closed one before the last refusal below, and
    // that request was admitted instead of refused).
    let (node, _dir) = start_with_config(
        "limits-conn",
        "[limits]\napi_connections_max = 3\nheader_timeout_s = 120\n",
    );
    // The server accepts connections in its own time (under load, well after the client's
    // connect), so each idle one is seen counted before the next is opened: the gauge counts
    // the idle ones plus the `/metrics` request's own connection.
    let mut idle: Vec<TcpStream> = Vec::new();
    for held in 1..=2 {
        idle.push(TcpStream::connect(node.addr).unwrap());
        wait_for_open_connections(&node, held + 1, &idle);
    }
    idle.push(TcpStream::connect(node.addr).unwrap());
    let r = refused_once_full(&node, &mut idle);
    r.assert_error(503, "too_many_connections", "a fourth connection");
    assert_eq!(r.header("retry-after"), Some("1"));
    // Probes still answer beyond the limit: a load balancer must not take the node for dead.
    let r = http(node.addr, "GET", "/readyz", b"", &[], REQUEST_TIMEOUT).unwrap();
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "ready"),
        "{}",
        r.describe()
    );
    let r = http(node.addr, "GET", "/healthz", b"", &[], REQUEST_TIMEOUT).unwrap();
    assert_eq!(r.status, 200, "{}", r.describe());

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
    let refused = metric_value(
        &metrics,
        "verge_api_connections_refused_total{limit=\"node\"}",
    )
    .unwrap_or(0.0);
    assert!(refused >= 3.0, "{metrics}");
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

/// `GET /v1/docs/a` until the node, whose last slot is being filled by `idle`, refuses it
/// while every idle socket is held.
///
/// The server notices a closed connection some time after the client closed it, so an idle
/// socket opened right after another request (the start-up readiness poll, a `/metrics` poll,
/// a `GET` here) may find that request's connection still counted and be refused itself. A
/// refused socket that sends nothing is closed after the node's 1 s refusal timeout: a refusal
/// counts once the idle sockets are still open past that, and a closed one is opened again.
fn refused_once_full(node: &Node, idle: &mut [TcpStream]) -> Resp {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = http(node.addr, "GET", "/v1/docs/a", b"", &[], REQUEST_TIMEOUT).unwrap();
        if r.status != 404 {
            thread::sleep(REFUSED_CLOSE_WITHIN);
            if idle.iter().all(|s| socket_state(s) == "open") {
                return r;
            }
        }
        for stream in idle.iter_mut() {
            if socket_state(stream) != "open" {
                *stream = TcpStream::connect(node.addr).unwrap();
            }
        }
        assert!(
            Instant::now() < deadline,
            "the node never filled up: {}",
            describe_connections(node, idle)
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `verge_api_connections` until it reads `open` (each poll's own connection included).
fn wait_for_open_connections(node: &Node, open: usize, idle: &[TcpStream]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let seen = metric_value(&node.get("/metrics").text(), "verge_api_connections");
        if seen == Some(open as f64) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "expected {open} open connections, the node counts {seen:?}: {}",
            describe_connections(node, idle)
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// What a failure needs to tell why connections were not held: the node's counts, and
/// whether the server closed any of the idle ones.
fn describe_connections(node: &Node, idle: &[TcpStream]) -> String {
    let states: Vec<String> = idle.iter().map(socket_state).collect();
    let metrics = node.get("/metrics").text();
    let counts: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("verge_api_"))
        .collect();
    format!(
        "idle connections {states:?}; {}\n--- node log ---\n{}",
        counts.join("; "),
        common::read_log(&node.log_path)
    )
}

/// How long after a refusal the node has closed a refused socket that sends nothing: its 1 s
/// refusal timeout, with room for a loaded machine.
const REFUSED_CLOSE_WITHIN: Duration = Duration::from_millis(2500);

/// Whether the server still holds `s` open, without reading from it.
fn socket_state(s: &TcpStream) -> String {
    let _ = s.set_nonblocking(true);
    let mut byte = [0u8; 1];
    let state = match s.peek(&mut byte) {
        Ok(0) => "closed by the node".to_string(),
        Ok(_) => "the node sent bytes".to_string(),
        Err(e) if e.kind() == ErrorKind::WouldBlock => "open".to_string(),
        Err(e) => format!("error {e}"),
    };
    let _ = s.set_nonblocking(false);
    state
}

/// A node whose timeouts are short enough for a test to watch them.
const SHORT_TIMEOUTS: &str =
    "[limits]\nheader_timeout_s = 1\nbody_timeout_s = 1\nidle_timeout_s = 2\n";
/// How long the tests give a 1 s timeout to close a connection (under load).
const CLOSE_WITHIN: Duration = Duration::from_secs(10);

/// Reads until the server closes `stream`: `Ok(bytes read)` when it did within `within`.
fn wait_closed(stream: &mut TcpStream, within: Duration) -> Result<Vec<u8>, String> {
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(got),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(format!("read failed: {e}")),
        }
        if Instant::now() > deadline {
            return Err(format!(
                "still open after {within:?} ({} bytes answered)",
                got.len()
            ));
        }
    }
}

#[test]
fn sockets_that_send_nothing_are_closed_and_probes_answer_meanwhile() {
    // The header timeout must outlast filling the node (with the wait that confirms it full)
    // and probing it, under load: seconds.
    let config = "[limits]\nheader_timeout_s = 10\napi_connections_max = 40\n";
    let (node, _dir) = start_with_config("limits-silent", config);
    let mut silent: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(node.addr).unwrap())
        .collect();
    // Every slot is taken: an API request is refused, the probes answer.
    refused_once_full(&node, &mut silent).assert_error(
        503,
        "too_many_connections",
        "beyond 40 silent sockets",
    );
    for probe in ["/healthz", "/readyz"] {
        let r = http(node.addr, "GET", probe, b"", &[], REQUEST_TIMEOUT).unwrap();
        assert_eq!(r.status, 200, "{probe} while full: {}", r.describe());
    }
    // Each silent socket is closed once the header timeout passes.
    for (i, stream) in silent.iter_mut().enumerate() {
        wait_closed(stream, CLOSE_WITHIN + Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("silent socket {i}: {e}"));
    }
    node.get("/readyz");
    let r = http(node.addr, "GET", "/v1/docs/a", b"", &[], REQUEST_TIMEOUT).unwrap();
    assert_eq!(r.status, 404, "served again: {}", r.describe());
    let timed_out = node.metric("verge_api_timeouts_total{kind=\"header\"}");
    assert!(timed_out >= 40.0, "{timed_out} header timeouts counted");
}

#[test]
fn slowloris_headers_and_idle_keep_alive_connections_are_closed() {
    let (node, _dir) = start_with_config("limits-slowloris", SHORT_TIMEOUTS);
    // Ten connections that send a header byte every 200 ms: they never finish a head.
    let started = Instant::now();
    let workers: Vec<_> = (0..10)
        .map(|_| {
            let addr = node.addr;
            thread::spawn(move || {
                let mut stream = TcpStream::connect(addr).unwrap();
                let head = b"GET /v1/docs/a HTTP/1.1\r\nhost: x\r\nx-pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
                for byte in head.iter().cycle() {
                    if stream.write_all(&[*byte]).is_err() {
                        return Ok(started.elapsed());
                    }
                    if started.elapsed() > CLOSE_WITHIN {
                        return Err("still open".to_string());
                    }
                    thread::sleep(Duration::from_millis(200));
                }
                unreachable!("cycle never ends")
            })
        })
        .collect();
    for worker in workers {
        let closed_after = worker
            .join()
            .unwrap()
            .expect("the server closes a slowloris");
        assert!(closed_after < CLOSE_WITHIN);
    }

    // A kept-alive connection that served a request and then idles is closed too.
    let mut stream = TcpStream::connect(node.addr).unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let answered = wait_closed(&mut stream, CLOSE_WITHIN).expect("closed after idling");
    assert!(
        answered.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answered)
    );
}

#[test]
fn a_body_that_never_ends_gets_408_and_the_connection_closes() {
    let (node, _dir) = start_with_config("limits-body", SHORT_TIMEOUTS);
    let mut stream = TcpStream::connect(node.addr).unwrap();
    stream
        .write_all(
            b"PUT /v1/docs/slow HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
              transfer-encoding: chunked\r\n\r\n1\r\n{\r\n",
        )
        .unwrap();
    // A chunk every 300 ms keeps bytes moving (no idle timeout) but the body never ends.
    let writer = {
        let mut stream = stream.try_clone().unwrap();
        thread::spawn(move || {
            for _ in 0..40 {
                thread::sleep(Duration::from_millis(300));
                if stream.write_all(b"1\r\n \r\n").is_err() {
                    return;
                }
            }
        })
    };
    let answered = wait_closed(&mut stream, CLOSE_WITHIN).expect("answered and closed");
    let text = String::from_utf8_lossy(&answered);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"code\":\"request_timeout\""), "{text}");
    writer.join().unwrap();
    assert_eq!(node.get_doc("slow").status, 404, "nothing was written");
    assert!(node.metric("verge_api_timeouts_total{kind=\"body\"}") >= 1.0);
}

#[test]
fn one_client_address_cannot_take_every_connection() {
    let config = "[limits]\napi_connections_max = 20\napi_connections_per_client_max = 4\nheader_timeout_s = 600\n";
    let (node, _dir) = start_with_config("limits-per-client", config);
    let port = node.addr.port();
    let from = |ip: [u8; 4]| {
        let socket = socket_from(ip);
        socket
            .connect(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into())
            .unwrap();
        TcpStream::from(socket)
    };
    let held: Vec<TcpStream> = (0..4).map(|_| from([127, 0, 0, 2])).collect();
    // Once the node has accepted them, it holds 4 from 127.0.0.2 and one from here.
    let deadline = Instant::now() + Duration::from_secs(10);
    while node.metric("verge_api_connections") < 5.0 {
        assert!(
            Instant::now() < deadline,
            "the 4 connections were never accepted"
        );
        thread::sleep(Duration::from_millis(20));
    }
    // A fifth connection from that address is refused (the probes still answer it)...
    let request = |mut stream: TcpStream, target: &str| {
        stream
            .write_all(format!("GET {target} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .unwrap();
        let answer = wait_closed(&mut stream, CLOSE_WITHIN).unwrap_or_default();
        String::from_utf8_lossy(&answer).into_owned()
    };
    let refused = request(from([127, 0, 0, 2]), "/v1/docs/a");
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("too_many_connections"), "{refused}");
    assert!(request(from([127, 0, 0, 2]), "/healthz").starts_with("HTTP/1.1 200"));
    // ...while another address is served.
    let r = http(node.addr, "GET", "/v1/docs/a", b"", &[], REQUEST_TIMEOUT).unwrap();
    assert_eq!(r.status, 404, "another client: {}", r.describe());
    assert!(node.metric("verge_api_connections_refused_total{limit=\"client\"}") >= 2.0);
    drop(held);
}

/// A TCP socket bound to a loopback address of its own (127.0.0.0/8 is all loopback on Linux).
fn socket_from(ip: [u8; 4]) -> Socket {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket
        .bind(&std::net::SocketAddr::from((ip, 0)).into())
        .unwrap();
    socket
}
