//! The HTTP API of a simulated node, as clients inside the simulation call it.
//!
//! Every request opens its own connection and is bounded by a timeout: under a partition a new
//! connection is refused at once, while a request on an open one would wait forever. A refused
//! connection means the request never reached the node; a timeout means it may have.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, StatusCode};
use serde_json::Value;

use crate::net::tcp::{HttpError, SimHttp};

/// The port every simulated node serves its API on.
pub const API_PORT: u16 = 7070;
/// The port every simulated node listens for peers on.
pub const GOSSIP_PORT: u16 = 7946;
/// How long a client waits for an answer before it gives up (the outcome is then unknown).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a request got no answer: refused (never sent, [`HttpError::not_sent`]), timed out or
/// broken (it may have been applied).
pub type ApiError = HttpError;

/// An answer: status and body.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The status code.
    pub status: StatusCode,
    /// The body.
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// One node's API.
#[derive(Debug, Clone)]
pub struct NodeApi {
    addr: SocketAddr,
    timeout: Duration,
}

impl NodeApi {
    /// The API of the simulated host `host` (a name such as `n0`). Call inside the simulation.
    pub fn of(host: &str) -> Self {
        Self::at(SocketAddr::new(turmoil::lookup(host), API_PORT))
    }

    /// The API at `addr`.
    pub fn at(addr: SocketAddr) -> Self {
        Self {
            addr,
            timeout: REQUEST_TIMEOUT,
        }
    }

    /// The same API with another request timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The node's IP address.
    pub fn ip(&self) -> IpAddr {
        self.addr.ip()
    }

    fn build(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Request<Bytes>, ApiError> {
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        Request::builder()
            .method(method)
            .uri(path)
            .header(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )
            .body(Bytes::from(bytes))
            .map_err(|e| HttpError::Protocol(e.to_string()))
    }

    /// Sends a write with `Idempotency-Key: key` and reads the whole answer.
    pub async fn write_keyed(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        key: &str,
    ) -> Result<Answer, ApiError> {
        let mut request = self.build(method, path, body)?;
        request.headers_mut().insert(
            "idempotency-key",
            HeaderValue::from_str(key).map_err(|e| HttpError::Protocol(e.to_string()))?,
        );
        self.send_built(request).await
    }

    /// Sends a built request and reads the whole answer.
    async fn send_built(&self, request: Request<Bytes>) -> Result<Answer, ApiError> {
        let response = SimHttp::new(self.timeout)
            .send(&self.addr.ip().to_string(), self.addr.port(), request)
            .await?;
        Ok(Answer {
            status: response.status(),
            body: response.into_body(),
        })
    }

    /// Sends one request and reads the whole answer.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Answer, ApiError> {
        let request = self.build(method, path, body)?;
        self.send_built(request).await
    }

    /// Sends a request and returns the response with its body still streaming (for watch).
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<hyper::Response<Incoming>, ApiError> {
        let request = self.build(method, path, body)?;
        SimHttp::new(self.timeout)
            .stream(&self.addr.ip().to_string(), self.addr.port(), request)
            .await
    }

    /// `GET /v1/docs/{id}`.
    pub async fn get(&self, id: &str) -> Result<Answer, ApiError> {
        self.request(Method::GET, &format!("/v1/docs/{id}"), None)
            .await
    }

    /// `PATCH /v1/docs/{id}` with `ops`.
    pub async fn patch(&self, id: &str, ops: Value) -> Result<Answer, ApiError> {
        self.request(
            Method::PATCH,
            &format!("/v1/docs/{id}"),
            Some(serde_json::json!({ "ops": ops })),
        )
        .await
    }

    /// `PATCH /v1/docs/{id}?ttl=SECONDS`: the document expires that long after the write, by
    /// the node's clock.
    pub async fn patch_ttl(&self, id: &str, ops: Value, ttl_s: u64) -> Result<Answer, ApiError> {
        self.request(
            Method::PATCH,
            &format!("/v1/docs/{id}?ttl={ttl_s}"),
            Some(serde_json::json!({ "ops": ops })),
        )
        .await
    }

    /// `POST /v1/sync/{id}` with one Automerge sync message: the node's answer (an empty body
    /// when it has nothing to say).
    pub async fn sync(&self, id: &str, message: Vec<u8>) -> Result<Answer, ApiError> {
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("/v1/sync/{id}"))
            .header(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            )
            .body(Bytes::from(message))
            .map_err(|e| HttpError::Protocol(e.to_string()))?;
        self.send_built(request).await
    }

    /// `POST /v1/ops/{id}` with a thin replica's push (JSON): the node's answer.
    pub async fn push(&self, id: &str, body: String) -> Result<Answer, ApiError> {
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("/v1/ops/{id}"))
            .header(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )
            .body(Bytes::from(body))
            .map_err(|e| HttpError::Protocol(e.to_string()))?;
        self.send_built(request).await
    }

    /// The heads of the node's whole copy of document `id`, whatever its state (live, expired,
    /// deleted or a purged stub; empty when the node holds nothing), sorted, in hex. Read by
    /// syncing an empty Automerge document with it, which changes nothing on the node; `None`
    /// when the node did not answer.
    pub async fn stored_heads(&self, id: &str) -> Option<Vec<String>> {
        use automerge::sync::{Message, State, SyncDoc};
        let mut doc = automerge::Automerge::new();
        let mut state = State::new();
        for _ in 0..16 {
            let Some(message) = doc.generate_sync_message(&mut state) else {
                break;
            };
            let answer = self.sync(id, message.encode()).await.ok()?;
            if !answer.status.is_success() {
                return None;
            }
            if answer.body.is_empty() {
                break;
            }
            let reply = Message::decode(&answer.body).ok()?;
            doc.receive_sync_message(&mut state, reply).ok()?;
        }
        let mut heads: Vec<String> = doc.get_heads().iter().map(ToString::to_string).collect();
        heads.sort();
        Some(heads)
    }

    /// `PATCH /v1/docs/{id}?replicas=N`: answered once `replicas` peers persisted the change.
    pub async fn patch_replicated(
        &self,
        id: &str,
        ops: Value,
        replicas: usize,
    ) -> Result<Answer, ApiError> {
        self.request(
            Method::PATCH,
            &format!("/v1/docs/{id}?replicas={replicas}"),
            Some(serde_json::json!({ "ops": ops })),
        )
        .await
    }

    /// `PUT /v1/docs/{id}` with a whole document.
    pub async fn put(&self, id: &str, doc: Value) -> Result<Answer, ApiError> {
        self.request(Method::PUT, &format!("/v1/docs/{id}"), Some(doc))
            .await
    }

    /// `DELETE /v1/docs/{id}`.
    pub async fn delete(&self, id: &str) -> Result<Answer, ApiError> {
        self.request(Method::DELETE, &format!("/v1/docs/{id}"), None)
            .await
    }

    /// `GET /v1/docs?prefix=P&limit=N`, first page.
    pub async fn list(&self, prefix: &str, limit: usize) -> Result<Answer, ApiError> {
        self.request(
            Method::GET,
            &format!("/v1/docs?prefix={prefix}&limit={limit}"),
            None,
        )
        .await
    }

    /// The value of a counter in `GET /metrics`, summed over its labels; `None` when the page
    /// could not be read.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        Some(self.metric_series(name).await?.values().sum())
    }

    /// Every series of a metric in `GET /metrics`, by its label text (`{kind="changes"}`, or
    /// empty without labels); `None` when the page could not be read.
    pub async fn metric_series(
        &self,
        name: &str,
    ) -> Option<std::collections::BTreeMap<String, f64>> {
        let answer = self
            .request(Method::GET, "/metrics", None)
            .await
            .ok()
            .filter(|a| a.status == StatusCode::OK)?;
        let text = String::from_utf8_lossy(&answer.body);
        let mut series = std::collections::BTreeMap::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(name) else {
                continue;
            };
            if !(rest.starts_with(' ') || rest.starts_with('{')) {
                continue;
            }
            let Some((labels, value)) = rest.rsplit_once(' ') else {
                continue;
            };
            if let Ok(value) = value.parse::<f64>() {
                *series.entry(labels.trim().to_owned()).or_insert(0.0) += value;
            }
        }
        Some(series)
    }
}
