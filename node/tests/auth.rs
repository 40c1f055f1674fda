//! API authentication, roles and prefix scopes, the start-up refusal beyond loopback, and TLS
//! on the API, against real `verge node` processes.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Node, REQUEST_TIMEOUT, Resp, http, metric_value};
use serde_json::json;
use tempfile::TempDir;

const ADMIN: &str = "vg_test-admin-0000000000000000000000000000000000000000000000000000000000";
const CART_WRITER: &str = "vg_test-cart-writer-000000000000000000000000000000000000000000000000";
const CART_READER: &str = "vg_test-cart-reader-000000000000000000000000000000000000000000000000";
const READER: &str = "vg_test-reader-0000000000000000000000000000000000000000000000000000000";
const TWO_PREFIXES: &str = "vg_test-two-prefixes-0000000000000000000000000000000000000000000000";
const CART_ADMIN: &str = "vg_test-cart-admin-00000000000000000000000000000000000000000000000000";

/// The `[[auth.tokens]]` entries of the test config: name, secret, role, prefixes.
const TOKENS: &[(&str, &str, &str, &[&str])] = &[
    ("admin", ADMIN, "admin", &[""]),
    ("cart-writer", CART_WRITER, "write", &["cart/"]),
    ("cart-reader", CART_READER, "read", &["cart/"]),
    ("reader", READER, "read", &[""]),
    ("two", TWO_PREFIXES, "read", &["cart/", "user/"]),
    ("cart-admin", CART_ADMIN, "admin", &["cart/"]),
];

fn token_config() -> String {
    let mut text = String::from("[auth]\nmode = \"tokens\"\n");
    for (name, secret, role, prefixes) in TOKENS {
        let hash = verge_node::auth::format_hash(&verge_node::auth::hash_token(secret));
        let prefixes: Vec<String> = prefixes.iter().map(|p| format!("{p:?}")).collect();
        text.push_str(&format!(
            "[[auth.tokens]]\nname = \"{name}\"\nhash = \"{hash}\"\nrole = \"{role}\"\nprefixes = [{}]\n",
            prefixes.join(", ")
        ));
    }
    text
}

/// A node with the test tokens; the directory holding its config lives as long as it does.
struct AuthNode {
    node: Node,
    _config_dir: TempDir,
}

fn start_with_tokens(name: &str) -> AuthNode {
    let config_dir = tempfile::tempdir().unwrap();
    let path = config_dir.path().join("verge.toml");
    fs::write(&path, token_config()).unwrap();
    let node = Node::start_with(name, vec!["--config".into(), path.display().to_string()]);
    AuthNode {
        node,
        _config_dir: config_dir,
    }
}

impl AuthNode {
    fn call(&self, method: &str, target: &str, body: &[u8], token: Option<&str>) -> Resp {
        let header = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = header
            .as_deref()
            .map(|h| vec![("Authorization", h)])
            .unwrap_or_default();
        http(
            self.node.addr,
            method,
            target,
            body,
            &headers,
            REQUEST_TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("{method} {target}: {e}\n{}", self.node.output()))
    }

    fn put(&self, id: &str, token: &str) -> Resp {
        self.call(
            "PUT",
            &format!("/v1/docs/{id}"),
            json!({ "v": id }).to_string().as_bytes(),
            Some(token),
        )
    }

    fn metric(&self, series: &str) -> f64 {
        let r = self.call("GET", "/metrics", b"", Some(ADMIN));
        assert_eq!(r.status, 200, "{}", r.describe());
        metric_value(&r.text(), series).unwrap_or(0.0)
    }
}

const PATCH_BODY: &[u8] = br#"{"ops":[{"op":"inc","path":["n"]}]}"#;

/// Every route but the probes, with a body where it takes one.
const ROUTES: &[(&str, &str, &[u8])] = &[
    ("GET", "/v1/docs/cart/a", b""),
    ("PUT", "/v1/docs/cart/a", br#"{"a":1}"#),
    ("PATCH", "/v1/docs/cart/a", PATCH_BODY),
    ("DELETE", "/v1/docs/cart/a", b""),
    ("GET", "/v1/docs", b""),
    ("GET", "/v1/docs?prefix=cart/", b""),
    ("POST", "/v1/sync/cart/a", b"\x42\x00"),
    ("GET", "/v1/watch", b""),
    ("GET", "/v1/status", b""),
    ("GET", "/metrics", b""),
    ("GET", "/no/such/route", b""),
];

#[test]
fn requests_without_a_valid_token_are_refused_on_every_route() {
    let n = start_with_tokens("auth-401");
    for (method, target, body) in ROUTES {
        for token in [None, Some("vg_wrong"), Some(&ADMIN[..ADMIN.len() - 1])] {
            let r = n.call(method, target, body, token);
            r.assert_error(
                401,
                "unauthorized",
                &format!("{method} {target} token {token:?}"),
            );
            let challenge = r.header("www-authenticate").unwrap_or_default();
            assert!(
                challenge.starts_with("Bearer"),
                "{method} {target}: WWW-Authenticate {challenge:?}"
            );
        }
        // Not a bearer token at all.
        let basic = http(
            n.node.addr,
            method,
            target,
            body,
            &[("Authorization", "Basic YWRtaW46YWRtaW4=")],
            REQUEST_TIMEOUT,
        )
        .unwrap();
        basic.assert_error(401, "unauthorized", &format!("{method} {target} Basic"));
    }
    // The probes stay open for load balancers.
    assert_eq!(n.call("GET", "/healthz", b"", None).status, 200);
    assert_eq!(n.call("GET", "/readyz", b"", None).status, 200);
    // Nothing was written by the refused requests.
    n.call("GET", "/v1/docs/cart/a", b"", Some(ADMIN))
        .assert_error(404, "not_found", "refused writes left no document");
    let routes = ROUTES.len() as f64;
    assert_eq!(
        n.metric("verge_auth_failures_total{reason=\"missing\"}"),
        routes
    );
    assert_eq!(
        n.metric("verge_auth_failures_total{reason=\"unknown_token\"}"),
        2.0 * routes
    );
    assert_eq!(
        n.metric("verge_auth_failures_total{reason=\"malformed\"}"),
        routes
    );
    // The token never shows up in the node's output.
    assert!(!n.node.output().contains("vg_test-admin"));

    // The CLI says what went wrong and what to do.
    let out = Command::new(env!("CARGO_BIN_EXE_verge"))
        .args([
            "--url",
            &format!("http://{}", n.node.addr),
            "--token",
            "vg_wrong",
            "get",
            "cart/a",
        ])
        .env_remove("VERGE_TOKEN")
        .env_remove("VERGE_URL")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error: unauthorized") && stderr.contains("--token"),
        "{stderr}"
    );
}

#[test]
fn a_prefix_scoped_token_reaches_only_its_prefix() {
    let n = start_with_tokens("auth-scope");
    assert_eq!(n.put("user/u-1", ADMIN).status, 200);
    let before = n.call("GET", "/v1/docs/user/u-1", b"", Some(ADMIN));
    assert_eq!(before.status, 200);

    // Inside the prefix: read and write.
    assert_eq!(n.put("cart/c-1", CART_WRITER).status, 200);
    let r = n.call("PATCH", "/v1/docs/cart/c-1", PATCH_BODY, Some(CART_WRITER));
    assert_eq!(r.status, 200, "{}", r.describe());
    let r = n.call("GET", "/v1/docs/cart/c-1", b"", Some(CART_WRITER));
    assert_eq!(r.json()["doc"]["n"], 1);

    // Outside: nothing, whatever the method.
    for (method, target, body) in [
        ("GET", "/v1/docs/user/u-1", &b""[..]),
        ("PUT", "/v1/docs/user/u-1", br#"{"x":1}"#),
        ("PATCH", "/v1/docs/user/u-1", PATCH_BODY),
        ("DELETE", "/v1/docs/user/u-1", b""),
        ("POST", "/v1/sync/user/u-1", b"\x42\x00"),
        // A prefix of the scope is not inside it.
        ("GET", "/v1/docs/cart", b""),
    ] {
        n.call(method, target, body, Some(CART_WRITER))
            .assert_error(403, "forbidden", &format!("cart writer {method} {target}"));
    }
    let after = n.call("GET", "/v1/docs/user/u-1", b"", Some(ADMIN));
    assert_eq!(
        after.json(),
        before.json(),
        "refused writes changed nothing"
    );
    assert!(n.metric("verge_auth_failures_total{reason=\"prefix\"}") >= 6.0);
}

#[test]
fn read_tokens_cannot_write() {
    let n = start_with_tokens("auth-read");
    assert_eq!(n.put("cart/c-1", ADMIN).status, 200);
    for token in [READER, CART_READER] {
        let r = n.call("GET", "/v1/docs/cart/c-1", b"", Some(token));
        assert_eq!(r.status, 200, "{}", r.describe());
        for (method, target, body) in [
            ("PUT", "/v1/docs/cart/c-1", &br#"{"x":1}"#[..]),
            ("PATCH", "/v1/docs/cart/c-1", PATCH_BODY),
            ("DELETE", "/v1/docs/cart/c-1", b""),
            ("POST", "/v1/sync/cart/c-1", b"\x42\x00"),
        ] {
            n.call(method, target, body, Some(token)).assert_error(
                403,
                "forbidden",
                &format!("read token {method} {target}"),
            );
        }
    }
    assert_eq!(
        n.metric("verge_auth_failures_total{reason=\"role\"}"),
        8.0,
        "two read tokens, four write routes"
    );
    // A write token writes, an admin token too.
    assert_eq!(n.put("cart/c-2", CART_WRITER).status, 200);
    assert_eq!(n.put("cart/c-3", ADMIN).status, 200);
}

fn ids(resp: &Resp) -> Vec<String> {
    resp.ok_json("list")["docs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn listing_and_watching_stay_inside_the_tokens_prefixes() {
    let n = start_with_tokens("auth-list");
    for id in ["cart/c-1", "user/u-1", "zzz"] {
        assert_eq!(n.put(id, ADMIN).status, 200);
    }
    let list = |target: &str, token: &str| n.call("GET", target, b"", Some(token));

    assert_eq!(ids(&list("/v1/docs", ADMIN)).len(), 3);
    assert_eq!(ids(&list("/v1/docs", CART_READER)), ["cart/c-1"]);
    assert_eq!(ids(&list("/v1/docs?prefix=", CART_READER)), ["cart/c-1"]);
    assert_eq!(
        ids(&list("/v1/docs?prefix=cart/c", CART_READER)),
        ["cart/c-1"]
    );
    list("/v1/docs?prefix=user/", CART_READER).assert_error(403, "forbidden", "outside");
    list("/v1/docs?prefix=ca", CART_READER).assert_error(403, "forbidden", "wider");
    list("/v1/docs", TWO_PREFIXES).assert_error(403, "forbidden", "several prefixes");
    assert_eq!(
        ids(&list("/v1/docs?prefix=user/", TWO_PREFIXES)),
        ["user/u-1"]
    );

    list("/v1/watch?prefix=user/", CART_READER).assert_error(403, "forbidden", "watch");
    list("/v1/watch", TWO_PREFIXES).assert_error(403, "forbidden", "watch several");

    // A watch without a prefix sees the token's prefix only.
    let mut watch = TcpStream::connect(n.node.addr).unwrap();
    write!(
        watch,
        "GET /v1/watch HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CART_READER}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    watch
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(15);
    // Writes are repeated until the stream shows one: the stream may open after the first.
    while !String::from_utf8_lossy(&seen).contains("cart/c-2") {
        assert!(
            Instant::now() < deadline,
            "no event: {}",
            String::from_utf8_lossy(&seen)
        );
        assert_eq!(n.put("user/u-2", ADMIN).status, 200);
        assert_eq!(n.put("cart/c-2", ADMIN).status, 200);
        if let Ok(k) = watch.read(&mut buf) {
            seen.extend_from_slice(&buf[..k]);
        }
        if let Ok(k) = watch.read(&mut buf) {
            seen.extend_from_slice(&buf[..k]);
        }
    }
    let text = String::from_utf8_lossy(&seen);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        !text.contains("user/"),
        "an event outside the scope: {text}"
    );
}

#[test]
fn status_and_metrics_need_admin() {
    let n = start_with_tokens("auth-admin");
    for target in ["/v1/status", "/metrics"] {
        for token in [READER, CART_WRITER] {
            n.call("GET", target, b"", Some(token)).assert_error(
                403,
                "forbidden",
                &format!("{target} without admin"),
            );
        }
        let r = n.call("GET", target, b"", Some(ADMIN));
        assert_eq!(r.status, 200, "{target}: {}", r.describe());
        // Status and metrics describe every document (counts, write volume, peers): an admin
        // scoped to a prefix does not see them.
        let scoped = n.call("GET", target, b"", Some(CART_ADMIN));
        scoped.assert_error(
            403,
            "forbidden",
            &format!("{target} by an admin scoped to cart/"),
        );
        assert!(
            scoped.text().contains("every document"),
            "{}",
            scoped.text()
        );
    }
    // Within its prefix the scoped admin is a writer as any other.
    n.call("PUT", "/v1/docs/cart/1", b"{\"a\":1}", Some(CART_ADMIN))
        .ok_json("PUT by a scoped admin");
    // The admin routes act on the whole node: a full admin only (the forget of an address
    // that is no member shows the request got through).
    let forget = br#"{"addr": "127.0.0.1:9"}"#;
    for token in [READER, CART_WRITER, CART_ADMIN] {
        for (target, body) in [
            ("/v1/admin/leave", &b""[..]),
            ("/v1/admin/members/forget", &forget[..]),
        ] {
            n.call("POST", target, body, Some(token)).assert_error(
                403,
                "forbidden",
                &format!("{target} without full admin"),
            );
        }
    }
    n.call("POST", "/v1/admin/members/forget", forget, None)
        .assert_error(401, "unauthorized", "forget without a token");
    n.call("POST", "/v1/admin/members/forget", forget, Some(ADMIN))
        .assert_error(404, "not_a_member", "forget by an admin");
}

/// Waits for a child to write its API address and returns it, or its output if it exited.
fn wait_addr(child: &mut std::process::Child, data_dir: &Path) -> Result<SocketAddr, String> {
    let deadline = Instant::now() + common::START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited with {status}"));
        }
        if let Ok(text) = fs::read_to_string(data_dir.join("api.addr"))
            && let Some(Ok(addr)) = text.strip_suffix('\n').map(|l| l.parse())
        {
            return Ok(addr);
        }
        assert!(
            Instant::now() < deadline,
            "the node neither started nor exited"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_node_beyond_loopback_needs_tokens_or_an_explicit_no_auth() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("node.log");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "node",
            "--data-dir",
            &data.display().to_string(),
            "--api-addr",
            "0.0.0.0:0",
            "--gossip-addr",
            "127.0.0.1:0",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        a.extend(extra.iter().map(|s| (*s).to_owned()));
        a
    };
    let mut refused = common::spawn_verge(&args(&[]), dir.path(), &log);
    let status = common::wait_timeout(&mut refused, common::START_TIMEOUT).expect("exits");
    let output = common::read_log(&log);
    assert_eq!(status.code(), Some(2), "{output}");
    assert!(
        output.contains("beyond loopback") && output.contains("mode = \"none\""),
        "{output}"
    );
    assert!(!data.join("api.addr").exists());

    let config = dir.path().join("open.toml");
    fs::write(&config, "[auth]\nmode = \"none\"\n").unwrap();
    let mut open = common::spawn_verge(
        &args(&["--config", &config.display().to_string()]),
        dir.path(),
        &log,
    );
    let addr =
        wait_addr(&mut open, &data).unwrap_or_else(|e| panic!("{e}: {}", common::read_log(&log)));
    let local = SocketAddr::from(([127, 0, 0, 1], addr.port()));
    let r = http(local, "GET", "/v1/docs", b"", &[], REQUEST_TIMEOUT).unwrap();
    let _ = open.kill();
    let _ = open.wait();
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(
        common::read_log(&log).contains("without authentication"),
        "the open node warns"
    );
}

// ---------------------------------------------------------------------------------------------
// TLS on the API
// ---------------------------------------------------------------------------------------------

/// One HTTPS request with a real TLS client that trusts only `ca`.
async fn https_get(
    addr: SocketAddr,
    ca: &Path,
    server_name: &str,
    target: &str,
    token: Option<&str>,
) -> Result<(u16, String), String> {
    use http_body_util::BodyExt;
    use rustls_pki_types::pem::PemObject;

    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca).map_err(|e| e.to_string())? {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from(server_name.to_owned())
        .map_err(|e| e.to_string())?;
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut request = hyper::Request::get(target).header("host", server_name);
    if let Some(t) = token {
        request = request.header("authorization", format!("Bearer {t}"));
    }
    let response = sender
        .send_request(
            request
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .map_err(|e| e.to_string())?,
        )
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn make_api_cert(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    fs::create_dir_all(dir).unwrap();
    let d = dir.display().to_string();
    common::run_verge(
        &[
            "certs", "api", "--name", "api", "--host", "api", "--dir", &d,
        ],
        dir,
    );
    (
        dir.join("api-ca.pem"),
        dir.join("api.pem"),
        dir.join("api.key"),
    )
}

/// API certificates are not cluster credentials: a node refuses to serve its API with a member
/// certificate, and to join with a certificate that lacks the member mark (one made for
/// another purpose, or before the mark existed), naming the command that makes the right one.
#[test]
fn member_and_api_certificates_are_not_interchangeable() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    common::make_certs(&certs, &["edge-1"]);
    let (_, api_cert, api_key) = make_api_cert(&certs);
    let start = |extra: &[String], log: &str| {
        let mut args: Vec<String> = [
            "node",
            "--data-dir",
            &dir.path().join(log).display().to_string(),
            "--api-addr",
            "127.0.0.1:0",
            "--gossip-addr",
            "127.0.0.1:0",
            "--tls-ca",
            &certs.join("ca.pem").display().to_string(),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        args.extend(extra.iter().cloned());
        let log = dir.path().join(format!("{log}.log"));
        let mut child = common::spawn_verge(&args, dir.path(), &log);
        let status = common::wait_timeout(&mut child, Duration::from_secs(20));
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        (status, common::read_log(&log))
    };
    let path = |p: &Path| p.display().to_string();
    // The API served with a member certificate: refused at start.
    let (status, log) = start(
        &[
            "--tls-cert".into(),
            path(&certs.join("edge-1.pem")),
            "--tls-key".into(),
            path(&certs.join("edge-1.key")),
            "--api-tls-cert".into(),
            path(&certs.join("edge-1.pem")),
            "--api-tls-key".into(),
            path(&certs.join("edge-1.key")),
        ],
        "api-member",
    );
    assert!(status.is_some_and(|s| !s.success()), "{status:?}\n{log}");
    assert!(
        log.contains("this is a cluster member certificate"),
        "{log}"
    );
    assert!(log.contains("verge certs api"), "{log}");
    // Joining with the API certificate (signed by the API CA, no member mark): refused at start.
    let (status, log) = start(
        &[
            "--tls-cert".into(),
            path(&api_cert),
            "--tls-key".into(),
            path(&api_key),
        ],
        "member-api",
    );
    assert!(status.is_some_and(|s| !s.success()), "{status:?}\n{log}");
    assert!(log.contains("not a cluster member certificate"), "{log}");
    assert!(log.contains("verge certs node"), "{log}");
}

#[test]
fn the_api_serves_https_with_tokens_and_refuses_plain_http() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_api_cert(&dir.path().join("certs"));
    let config = dir.path().join("verge.toml");
    fs::write(&config, token_config()).unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("node.log");
    let args: Vec<String> = [
        "node",
        "--data-dir",
        &data.display().to_string(),
        "--api-addr",
        "127.0.0.1:0",
        "--gossip-addr",
        "127.0.0.1:0",
        "--config",
        &config.display().to_string(),
        "--api-tls-cert",
        &cert.display().to_string(),
        "--api-tls-key",
        &key.display().to_string(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let mut child = common::spawn_verge(&args, dir.path(), &log);
    let addr =
        wait_addr(&mut child, &data).unwrap_or_else(|e| panic!("{e}: {}", common::read_log(&log)));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let result = runtime.block_on(async {
        let deadline = Instant::now() + common::START_TIMEOUT;
        loop {
            match https_get(addr, &ca, "api", "/readyz", None).await {
                Ok((200, _)) => break,
                other if Instant::now() > deadline => return Err(format!("readyz: {other:?}")),
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        let unauthorized = https_get(addr, &ca, "api", "/v1/docs", None).await?;
        let listed = https_get(addr, &ca, "api", "/v1/docs", Some(READER)).await?;
        let status = https_get(addr, &ca, "api", "/v1/status", Some(ADMIN)).await?;
        // A client that checks the name against a name the certificate lacks gives up.
        let wrong_name = https_get(addr, &ca, "elsewhere.example", "/readyz", None).await;
        Ok((unauthorized, listed, status, wrong_name))
    });
    let plain = http(addr, "GET", "/readyz", b"", &[], Duration::from_secs(5));
    let still_https = runtime.block_on(https_get(addr, &ca, "api", "/healthz", None));
    // Graceful shutdown works as over plain HTTP.
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own, unreaped child.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let exited = common::wait_timeout(&mut child, Duration::from_secs(20));
    if exited.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let output = common::read_log(&log);
    let (unauthorized, listed, status, wrong_name) =
        result.unwrap_or_else(|e| panic!("{e}\n{output}"));
    assert_eq!(unauthorized.0, 401, "{unauthorized:?}");
    assert_eq!(listed.0, 200, "{listed:?}");
    assert!(listed.1.contains("\"docs\""), "{listed:?}");
    assert_eq!(status.0, 200, "{status:?}");
    assert!(wrong_name.is_err(), "{wrong_name:?}");
    assert!(
        plain.is_err(),
        "plain HTTP to the TLS port must not get an HTTP answer: {:?}",
        plain.map(|r| r.describe())
    );
    assert_eq!(
        still_https.map(|r| r.0),
        Ok(200),
        "a failed handshake leaves the node serving"
    );
    assert_eq!(rc, 0);
    assert!(
        exited.is_some_and(|s| s.success()),
        "SIGTERM stops the node cleanly: {output}"
    );
    assert!(!data.join("api.addr").exists(), "api.addr removed on exit");
}

/// A node with the test tokens and `[cors]` allowing one origin.
fn start_with_tokens_and_cors(name: &str) -> AuthNode {
    let config_dir = tempfile::tempdir().unwrap();
    let path = config_dir.path().join("verge.toml");
    let config = format!(
        "[cors]\nallowed_origins = [\"https://app.example.com\"]\n\n{}",
        token_config()
    );
    fs::write(&path, config).unwrap();
    let node = Node::start_with(name, vec!["--config".into(), path.display().to_string()]);
    AuthNode {
        node,
        _config_dir: config_dir,
    }
}

impl AuthNode {
    fn call_from(
        &self,
        origin: &str,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
    ) -> Resp {
        let mut all = vec![("Origin", origin)];
        all.extend_from_slice(headers);
        http(self.node.addr, method, target, b"", &all, REQUEST_TIMEOUT)
            .unwrap_or_else(|e| panic!("{method} {target}: {e}\n{}", self.node.output()))
    }
}

/// A browser page on an allowed origin gets its preflight answered without a token, then calls
/// with one; the answers name the origin, errors too, so the page can read their codes. Other
/// origins get nothing that lets a browser through.
#[test]
fn browsers_on_allowed_origins_pass_preflight_and_read_answers_and_errors() {
    let n = start_with_tokens_and_cors("cors");
    let app = "https://app.example.com";
    let preflight = n.call_from(
        app,
        "OPTIONS",
        "/v1/sync/cart/a",
        &[
            ("Access-Control-Request-Method", "POST"),
            (
                "Access-Control-Request-Headers",
                "authorization, content-type, if-match",
            ),
        ],
    );
    assert_eq!(preflight.status, 204, "{}", preflight.describe());
    assert_eq!(preflight.header("access-control-allow-origin"), Some(app));
    let methods = preflight
        .header("access-control-allow-methods")
        .unwrap_or("");
    assert!(
        methods.contains("POST") && methods.contains("PATCH"),
        "{methods}"
    );
    let allowed = preflight
        .header("access-control-allow-headers")
        .unwrap_or("");
    assert!(
        allowed.contains("authorization")
            && allowed.contains("content-type")
            && allowed.contains("if-match")
            && allowed.contains("idempotency-key"),
        "{allowed}"
    );
    assert!(preflight.header("access-control-max-age").is_some());

    // The call itself, with a token: answered, naming the origin.
    let bearer = format!("Bearer {CART_WRITER}");
    let ok = n.call_from(app, "GET", "/v1/docs/cart/a", &[("Authorization", &bearer)]);
    assert_eq!(ok.status, 404, "{}", ok.describe());
    assert_eq!(ok.header("access-control-allow-origin"), Some(app));
    assert!(ok.header("vary").unwrap_or("").contains("origin"));
    // Refusals name it too: the page reads `unauthorized` and `forbidden`, not a network error.
    let refused = n.call_from(app, "GET", "/v1/docs/cart/a", &[]);
    refused.assert_error(401, "unauthorized", "no token from an allowed origin");
    assert_eq!(refused.header("access-control-allow-origin"), Some(app));
    let expose = refused
        .header("access-control-expose-headers")
        .unwrap_or("");
    assert!(expose.contains("www-authenticate"), "{expose}");
    let reader = format!("Bearer {CART_READER}");
    let forbidden = n.call_from(
        app,
        "DELETE",
        "/v1/docs/cart/a",
        &[("Authorization", &reader)],
    );
    forbidden.assert_error(403, "forbidden", "a read token deleting");
    assert_eq!(forbidden.header("access-control-allow-origin"), Some(app));

    // Another origin: its preflight is refused, and answers never name it.
    let evil = "https://evil.example.com";
    let refused = n.call_from(
        evil,
        "OPTIONS",
        "/v1/sync/cart/a",
        &[("Access-Control-Request-Method", "POST")],
    );
    refused.assert_error(
        403,
        "cors_origin_not_allowed",
        "preflight from another origin",
    );
    assert_eq!(refused.header("access-control-allow-origin"), None);
    let direct = n.call_from(
        evil,
        "GET",
        "/v1/docs/cart/a",
        &[("Authorization", &bearer)],
    );
    assert_eq!(direct.status, 404);
    assert_eq!(direct.header("access-control-allow-origin"), None);
}

/// Without `[cors]`, no answer carries CORS headers and an `OPTIONS` is an ordinary request.
#[test]
fn without_cors_configured_no_origin_is_named() {
    let n = start_with_tokens("no-cors");
    let app = "https://app.example.com";
    let preflight = n.call_from(
        app,
        "OPTIONS",
        "/v1/sync/cart/a",
        &[("Access-Control-Request-Method", "POST")],
    );
    assert_eq!(preflight.header("access-control-allow-origin"), None);
    assert_ne!(preflight.status, 204, "{}", preflight.describe());
    let bearer = format!("Bearer {ADMIN}");
    let r = n.call_from(app, "GET", "/v1/status", &[("Authorization", &bearer)]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), None);
}

/// A malformed origin in the configuration stops the node at start with the setting named.
#[test]
fn a_malformed_cors_origin_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("verge.toml");
    fs::write(
        &config,
        "[cors]\nallowed_origins = [\"https://app.example.com/\"]\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_verge"))
        .args(["node", "--config"])
        .arg(&config)
        .args(["--data-dir"])
        .arg(dir.path().join("data"))
        .args(["--api-addr", "127.0.0.1:0", "--gossip-addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cors.allowed_origins") && stderr.contains("not an origin"),
        "{stderr}"
    );
}
