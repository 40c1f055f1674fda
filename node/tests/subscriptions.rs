//! Webhook subscriptions on a real node, delivering to a small HTTP receiver in the test: a
//! receiver that is down, then fails, then recovers gets every event under the prefix at least
//! once, signed, in order, and the cursor survives a SIGKILL and restart.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Node;
use serde_json::{Value, json};

const SECRET: &str = "test-secret-0123456789abcdef";

/// One POST the receiver took.
#[derive(Debug, Clone)]
struct Received {
    body: Value,
    signature_ok: bool,
}

/// A receiver answering `500` to its first `failures` requests, then `200`.
struct Receiver {
    got: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    fn start(listener: TcpListener, failures: usize) -> Receiver {
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let answered = Arc::new(AtomicUsize::new(0));
        let shared = Arc::clone(&got);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (got, answered) = (Arc::clone(&shared), Arc::clone(&answered));
                std::thread::spawn(move || serve(stream, &got, &answered, failures));
            }
        });
        Receiver { got }
    }

    /// The same over TLS, with `config`'s certificate.
    fn start_tls(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> Receiver {
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let answered = Arc::new(AtomicUsize::new(0));
        let shared = Arc::clone(&got);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (got, answered, config) = (
                    Arc::clone(&shared),
                    Arc::clone(&answered),
                    Arc::clone(&config),
                );
                std::thread::spawn(move || {
                    let Ok(connection) = rustls::ServerConnection::new(config) else {
                        return;
                    };
                    serve(
                        rustls::StreamOwned::new(connection, stream),
                        &got,
                        &answered,
                        0,
                    );
                });
            }
        });
        Receiver { got }
    }

    fn received(&self) -> Vec<Received> {
        self.got.lock().expect("lock").clone()
    }
}

fn serve(
    stream: impl Read + Write,
    got: &Mutex<Vec<Received>>,
    answered: &AtomicUsize,
    failures: usize,
) {
    let mut reader = BufReader::new(stream);
    loop {
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line == "\r\n" {
                break;
            }
            head.push(line.trim_end().to_owned());
        }
        let header = |name: &str| {
            head.iter().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
            })
        };
        let len: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let expected = {
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
            format!(
                "sha256={}",
                hex::encode(ring::hmac::sign(&key, &body).as_ref())
            )
        };
        let n = answered.fetch_add(1, Ordering::SeqCst);
        let status = if n < failures {
            "500 Internal Server Error"
        } else {
            got.lock().expect("lock").push(Received {
                body: serde_json::from_slice(&body).expect("a JSON batch"),
                signature_ok: header("verge-signature").as_deref() == Some(expected.as_str()),
            });
            "200 OK"
        };
        let answer = format!("HTTP/1.1 {status}\r\nContent-Length: 2\r\n\r\nok");
        let stream = reader.get_mut();
        if stream.write_all(answer.as_bytes()).is_err() || stream.flush().is_err() {
            return;
        }
    }
}

fn metric(node: &Node, line_start: &str) -> u64 {
    node.get("/metrics")
        .text()
        .lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn write(node: &Node, id: &str, i: usize) {
    let r = node.patch_doc(id, json!([{ "op": "set", "path": ["i"], "value": i }]));
    assert_eq!(r.status, 200, "{}", r.describe());
}

/// The seqs of `hook/` events delivered, in delivery order (repeats kept).
fn delivered(receiver: &Receiver) -> Vec<u64> {
    receiver
        .received()
        .iter()
        .flat_map(|r| {
            r.body["events"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|e| {
                    assert!(
                        e["id"].as_str().is_some_and(|id| id.starts_with("hook/")),
                        "outside the prefix: {e}"
                    );
                    e["seq"].as_u64().expect("seq")
                })
        })
        .collect()
}

#[test]
fn a_receiver_that_was_down_and_failing_gets_every_event_signed_and_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("hook.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).expect("secret");
    // A port nobody listens on yet: the receiver is down.
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    // And one that takes connections and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_port = silent.local_addr().expect("addr").port();
    let config = dir.path().join("verge.toml");
    std::fs::write(
        &config,
        format!(
            "[[subscriptions]]\nname = \"orders\"\nurl = \"http://127.0.0.1:{port}/hook\"\n\
             prefix = \"hook/\"\nsecret_file = {secret:?}\nbatch_max = 10\nmax_delay_ms = 50\n\
             timeout_s = 2\n\n\
             [[subscriptions]]\nname = \"silent\"\nurl = \"http://127.0.0.1:{silent_port}/\"\n\
             secret_file = {secret:?}\ntimeout_s = 1\nmax_delay_ms = 0\n",
            secret = secret.display().to_string()
        ),
    )
    .expect("config");
    let mut node = Node::start_with(
        "hooks",
        vec!["--config".into(), config.display().to_string()],
    );
    for i in 0..25 {
        write(&node, &format!("hook/{}", i % 4), i);
        if i % 5 == 0 {
            write(&node, "other/x", i);
        }
    }
    let failures = "verge_subscription_failures_total{subscription=\"orders\"}";
    wait_for("two failed tries", Duration::from_secs(20), || {
        metric(&node, failures) >= 2
    });
    let silent_failures = "verge_subscription_failures_total{subscription=\"silent\"}";
    wait_for(
        "a receiver that never answers to count as failing",
        Duration::from_secs(20),
        || metric(&node, silent_failures) >= 1,
    );
    let status = node.get("/v1/status").json();
    assert!(
        status["subscriptions"][1]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("no answer")),
        "{status}"
    );
    let sub = &status["subscriptions"][0];
    assert_eq!(sub["name"], "orders");
    assert!(sub["lag"].as_u64().expect("lag") >= 30, "{sub}");
    assert!(sub["last_error"].as_str().is_some(), "{sub}");

    // It comes back, answers 500 three times, then recovers.
    let listener = TcpListener::bind(("127.0.0.1", port)).expect("rebind the receiver's port");
    let receiver = Receiver::start(listener, 3);
    wait_for("all 25 events", Duration::from_secs(60), || {
        delivered(&receiver)
            .into_iter()
            .collect::<BTreeSet<_>>()
            .len()
            == 25
    });
    let got = receiver.received();
    assert!(got.iter().all(|r| r.signature_ok), "every batch signed");
    assert!(got.iter().all(|r| r.body["subscription"] == "orders"));
    let seqs = delivered(&receiver);
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "in order, none twice: {seqs:?}"
    );
    assert!(
        got.iter()
            .all(|r| r.body["events"].as_array().expect("events").len() <= 10)
    );
    assert!(metric(&node, failures) >= 5, "2 refused, 3 answered 500");
    wait_for("no lag", Duration::from_secs(20), || {
        node.get("/v1/status").json()["subscriptions"][0]["lag"] == 0
    });

    // The cursor is durable: after a SIGKILL and restart only the new events come.
    node.restart_after_kill();
    for i in 25..35 {
        write(&node, &format!("hook/{}", i % 4), i);
    }
    wait_for("the 10 new events", Duration::from_secs(30), || {
        delivered(&receiver).len() == 35
    });
    let seqs = delivered(&receiver);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    // Counted once the node read the receiver's answer, a moment after the receiver took it.
    let delivered_total = "verge_subscription_delivered_total{subscription=\"orders\"}";
    wait_for(
        "the count of events delivered",
        Duration::from_secs(10),
        || metric(&node, delivered_total) >= 10,
    );
    assert_eq!(
        metric(&node, delivered_total),
        10,
        "since the restart, none again"
    );
    wait_for(
        "the silent receiver failing again",
        Duration::from_secs(20),
        || metric(&node, silent_failures) >= 1,
    );
    // `verge subscriptions` shows them.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_verge"))
        .args(["subscriptions", "--url", &format!("http://{}", node.addr)])
        .output()
        .expect("run verge subscriptions");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("orders") && text.contains("CURSOR"), "{text}");
    assert!(
        text.contains("silent") && text.contains("no answer"),
        "{text}"
    );
    node.assert_serving("with a receiver that never answers");
    drop(silent);
}

/// A receiver down while retention dropped what it had not taken is told so: its next batch
/// says `reset`, and holds what the feed still has.
#[test]
fn a_receiver_behind_retention_is_told_to_reset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("hook.secret");
    std::fs::write(&secret, SECRET).expect("secret");
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let config = dir.path().join("verge.toml");
    std::fs::write(
        &config,
        format!(
            "[feed]\nretain_events = 5\n\n[[subscriptions]]\nname = \"late\"\n\
             url = \"http://127.0.0.1:{port}/\"\nsecret_file = {:?}\nmax_delay_ms = 0\n",
            secret.display().to_string()
        ),
    )
    .expect("config");
    let node = Node::start_with(
        "hooks-late",
        vec!["--config".into(), config.display().to_string()],
    );
    for i in 0..20 {
        write(&node, &format!("hook/{i}"), i);
    }
    let listener = TcpListener::bind(("127.0.0.1", port)).expect("rebind the receiver's port");
    let receiver = Receiver::start(listener, 0);
    wait_for("the newest events", Duration::from_secs(60), || {
        delivered(&receiver).last() == Some(&20)
    });
    // Whatever batches the subscription formed (it may have formed one before retention
    // dropped anything, and sends it as formed), every gap in what arrived is announced by
    // `reset` on the batch after it, and the newest 5 arrive.
    let mut resets = 0;
    let mut last = 0;
    // A reset may come in a batch of its own, announcing the gap before the next batch.
    let mut announced = false;
    for batch in receiver.received() {
        let seqs: Vec<u64> = batch.body["events"]
            .as_array()
            .expect("events")
            .iter()
            .map(|e| e["seq"].as_u64().expect("seq"))
            .collect();
        let reset = batch.body["reset"] == true;
        resets += u64::from(reset);
        announced |= reset;
        if let Some(&first) = seqs.first() {
            assert!(first > last, "in order: {seqs:?} after {last}");
            assert!(
                announced || first == last + 1,
                "a gap before {first} without a reset"
            );
            announced = false;
            assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
            last = *seqs.last().expect("a last");
        }
    }
    assert!(resets >= 1, "the loss was announced");
    assert_eq!(
        &delivered(&receiver)[delivered(&receiver).len() - 5..],
        &[16, 17, 18, 19, 20]
    );
    assert_eq!(
        metric(
            &node,
            "verge_subscription_resets_total{subscription=\"late\"}"
        ),
        resets
    );
}

/// A CA (its PEM) and a server configuration with a certificate it signed for 127.0.0.1.
fn tls_receiver_config() -> (String, Arc<rustls::ServerConfig>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
    let cert = params.signed_by(&key, &issuer).expect("cert");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .expect("server config");
    (ca.pem(), Arc::new(config))
}

/// An https:// receiver whose certificate an authority in `ca_file` signed gets the events;
/// one the node does not trust is a counted failure.
#[test]
fn an_https_receiver_gets_signed_batches_over_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("hook.secret");
    std::fs::write(&secret, SECRET).expect("secret");
    let (ca_pem, server) = tls_receiver_config();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).expect("ca");
    let (other_ca, _) = tls_receiver_config();
    let other_ca_file = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca_file, other_ca).expect("other ca");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let receiver = Receiver::start_tls(listener, server);
    let config = dir.path().join("verge.toml");
    std::fs::write(
        &config,
        format!(
            "[[subscriptions]]\nname = \"tls\"\nurl = \"https://127.0.0.1:{port}/hook\"\n\
             prefix = \"hook/\"\nsecret_file = {secret:?}\nca_file = {ca:?}\nmax_delay_ms = 0\n\n\
             [[subscriptions]]\nname = \"untrusted\"\nurl = \"https://127.0.0.1:{port}/hook\"\n\
             prefix = \"hook/\"\nsecret_file = {secret:?}\nca_file = {other:?}\n",
            secret = secret.display().to_string(),
            ca = ca_file.display().to_string(),
            other = other_ca_file.display().to_string(),
        ),
    )
    .expect("config");
    let node = Node::start_with(
        "hooks-tls",
        vec!["--config".into(), config.display().to_string()],
    );
    for i in 0..5 {
        write(&node, &format!("hook/{i}"), i);
    }
    wait_for("5 events over TLS", Duration::from_secs(30), || {
        delivered(&receiver).len() >= 5
    });
    assert_eq!(delivered(&receiver), vec![1, 2, 3, 4, 5]);
    assert!(receiver.received().iter().all(|r| r.signature_ok));
    wait_for("the untrusted one to fail", Duration::from_secs(20), || {
        metric(
            &node,
            "verge_subscription_failures_total{subscription=\"untrusted\"}",
        ) >= 1
    });
    let status = node.get("/v1/status").json();
    assert!(
        status["subscriptions"][1]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("TLS")),
        "{status}"
    );
}

#[test]
fn bad_subscriptions_stop_the_node_at_start_with_a_clear_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("verge.toml");
    std::fs::write(
        &config,
        "[[subscriptions]]\nname = \"x\"\nurl = \"http://127.0.0.1:9/\"\nsecret_file = \"/nonexistent\"\n",
    )
    .expect("config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_verge"))
        .args(["node", "--config", &config.display().to_string()])
        .args(["--data-dir", &dir.path().join("d").display().to_string()])
        .output()
        .expect("run verge node");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("subscription \"x\"") && err.contains("secret_file"),
        "{err}"
    );
}
