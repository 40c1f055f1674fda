use std::cell::RefCell;
use std::net::Ipv4Addr;
use std::rc::Rc;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use hyper::header::HeaderName;

use super::*;

const PORT: u16 = 8080;

fn any(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))
}

fn router() -> Router {
    Router::new()
        .route("/hello", get(|| async { "hello" }))
        .route("/echo", post(|body: Bytes| async move { body }))
        .route(
            "/header",
            get(|headers: HeaderMap| async move {
                headers
                    .get("x-probe")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("none")
                    .to_owned()
            }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                "slow"
            }),
        )
}

fn serve(sim: &mut turmoil::Sim<'_>) {
    sim.host("server", || async {
        axum::serve(SimListener::bind(any(PORT)).await?, router()).await?;
        Ok(())
    });
}

/// Fixed 1 ms links: exchanges take a few simulated milliseconds.
fn builder() -> turmoil::Builder {
    let mut builder = turmoil::Builder::new();
    builder
        .rng_seed(11)
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(1));
    builder
}

/// axum serves a router through [`SimListener`]; [`SimHttp`] gets statuses and bodies for
/// GET and POST, sends custom headers, and sees 404 for an unknown path.
#[test]
fn axum_serves_simulated_clients() {
    let mut sim = builder().build();
    serve(&mut sim);
    sim.client("client", async {
        let http = SimHttp::new(Duration::from_secs(1));
        let (status, body) = http.get("server", PORT, "/hello").await?;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"hello"[..]));

        let (status, body) = http
            .request(
                "server",
                PORT,
                Method::POST,
                "/echo",
                Some(b"ping".to_vec()),
                HeaderMap::new(),
            )
            .await?;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"ping"[..]));

        let mut headers = HeaderMap::new();
        headers.insert(
            HeaderName::from_static("x-probe"),
            HeaderValue::from_static("42"),
        );
        let (status, body) = http
            .request("server", PORT, Method::GET, "/header", None, headers)
            .await?;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"42"[..]));

        let server_ip = turmoil::lookup("server").to_string();
        let (status, _) = http.get(&server_ip, PORT, "/missing").await?;
        assert_eq!(status, StatusCode::NOT_FOUND);
        Ok(())
    });
    sim.run().expect("simulation");
}

/// `ConnectInfo<SocketAddr>` works once the listener is wrapped in `tap_io`.
#[test]
fn connect_info_through_tap_io() {
    let mut sim = builder().build();
    sim.host("server", || async {
        let router = Router::new().route(
            "/peer",
            get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.ip().to_string() }),
        );
        axum::serve(
            SimListener::bind(any(PORT)).await?.tap_io(|_| {}),
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await?;
        Ok(())
    });
    sim.client("client", async {
        let (status, body) = SimHttp::default().get("server", PORT, "/peer").await?;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, turmoil::lookup("client").to_string());
        Ok(())
    });
    sim.run().expect("simulation");
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    Refused,
    Timeout,
    Other,
}

/// A client polling every 100 ms while the test partitions the link at 1 s and repairs it at
/// 2 s (from outside the hosts, with `Sim::partition`): requests before and after succeed,
/// those during the partition are refused at once.
#[test]
fn partition_refuses_requests_until_repaired() {
    let mut sim = builder().build();
    serve(&mut sim);
    let log: Rc<RefCell<Vec<(Duration, Outcome)>>> = Rc::default();
    let out = Rc::clone(&log);
    sim.client("client", async move {
        let http = SimHttp::new(Duration::from_millis(500));
        while turmoil::elapsed() < Duration::from_secs(3) {
            let start = turmoil::elapsed();
            let outcome = match http.get("server", PORT, "/hello").await {
                Ok((StatusCode::OK, body)) if body == "hello" => Outcome::Ok,
                Ok(_) => Outcome::Other,
                Err(HttpError::Refused(_)) => Outcome::Refused,
                Err(HttpError::Timeout(_)) => Outcome::Timeout,
                Err(_) => Outcome::Other,
            };
            out.borrow_mut().push((start, outcome));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    });
    let run_until = |sim: &mut turmoil::Sim<'_>, t: Duration| {
        while sim.elapsed() < t {
            sim.step().expect("step");
        }
    };
    run_until(&mut sim, Duration::from_millis(1050));
    sim.partition("client", "server");
    run_until(&mut sim, Duration::from_millis(2050));
    sim.repair("client", "server");
    sim.run().expect("simulation");

    let log = log.take();
    assert!(log.len() >= 25, "{log:?}");
    for (start, outcome) in &log {
        let expected =
            if *start > Duration::from_millis(1050) && *start < Duration::from_millis(2050) {
                Outcome::Refused
            } else {
                Outcome::Ok
            };
        assert_eq!(*outcome, expected, "request at {start:?}: {log:?}");
    }
    assert!(log.iter().any(|(_, o)| *o == Outcome::Refused));
}

/// A held link delays the handshake, so the request times out; after `release` requests
/// succeed again.
#[test]
fn held_link_times_out_until_released() {
    let mut sim = builder().build();
    serve(&mut sim);
    sim.client("client", async {
        let http = SimHttp::new(Duration::from_millis(300));
        turmoil::hold("client", "server");
        let error = http
            .get("server", PORT, "/hello")
            .await
            .expect_err("held link");
        assert!(matches!(error, HttpError::Timeout(_)), "{error:?}");
        assert!(error.is_unreachable());
        turmoil::release("client", "server");
        let (status, _) = http.get("server", PORT, "/hello").await?;
        assert_eq!(status, StatusCode::OK);
        Ok(())
    });
    sim.run().expect("simulation");
}

/// A server that crashes while a request is in flight: the open request fails with an
/// unexpected end of file; a new request to the crashed host times out (turmoil holds
/// messages to a host that is down rather than refusing them); after the restart requests
/// succeed.
#[test]
fn server_crash_fails_requests_until_restart() {
    let mut sim = builder().build();
    serve(&mut sim);
    let log: Rc<RefCell<Vec<String>>> = Rc::default();
    let out = Rc::clone(&log);
    sim.client("client", async move {
        let http = SimHttp::new(Duration::from_secs(2));
        let record = |r: Result<(StatusCode, Bytes), HttpError>| match r {
            Ok((status, _)) => status.to_string(),
            Err(HttpError::Io(e)) => format!("io {:?}", e.kind()),
            Err(e) => format!("{e}"),
        };
        let slow = http.get("server", PORT, "/slow").await;
        out.borrow_mut().push(record(slow));
        let after_crash = http.get("server", PORT, "/hello").await;
        out.borrow_mut().push(record(after_crash));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after_restart = http.get("server", PORT, "/hello").await;
        out.borrow_mut().push(record(after_restart));
        Ok(())
    });
    while sim.elapsed() < Duration::from_millis(200) {
        sim.step().expect("step");
    }
    sim.crash("server");
    // Let the client see the crash, then restart the server.
    while log.borrow().len() < 2 {
        sim.step().expect("step");
    }
    sim.bounce("server");
    sim.run().expect("simulation");
    let log = log.take();
    assert_eq!(log.len(), 3, "{log:?}");
    assert_eq!(log[0], "io UnexpectedEof", "{log:?}");
    assert_eq!(log[1], "no response within 2s", "{log:?}");
    assert_eq!(log[2], "200 OK", "{log:?}");
}
