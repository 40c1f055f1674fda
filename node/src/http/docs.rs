//! Document routes: read, write, list and sync.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{Value as Json_, json};
use verge_core::limits::{LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX, TTL_SECONDS_MAX};
use verge_core::{DocId, Expiry, Op, Write, heads_to_hex};

use super::idempotency;
use super::serve::BodyCut;
use super::{ApiError, AppState};
use crate::replication::ReplicaWaiter;

/// Most peers a write may wait for.
pub const REPLICAS_MAX: usize = 16;
/// How long a write waits for `?replicas=N` peers.
pub const REPLICAS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Most heads `?after=` or `If-Match` may name (a document's heads are rarely more than a few).
pub const HEADS_PARAM_MAX: usize = 64;
/// How long `GET ?after=` waits when `wait_ms` is not given.
pub const AFTER_WAIT_MS_DEFAULT: u64 = 2_000;
/// Longest `wait_ms`.
pub const AFTER_WAIT_MS_MAX: u64 = 30_000;

type IdPath = Result<Path<String>, PathRejection>;
type Params = Result<Query<HashMap<String, String>>, QueryRejection>;
type Body = Result<Bytes, BytesRejection>;

fn doc_id(state: &AppState, path: IdPath) -> Result<DocId, ApiError> {
    let Path(raw) = path.map_err(|e| {
        state.metrics.decode_error("id");
        ApiError::invalid_id(format!("document id: {e}"))
    })?;
    DocId::new(raw).map_err(|e| {
        state.metrics.decode_error("id");
        ApiError::invalid_id(e.to_string())
    })
}

/// `/v1/docs/` and `/v1/sync/` with nothing after the slash: an empty document id.
pub async fn empty_id() -> ApiError {
    ApiError::invalid_id("document id: empty")
}

fn body_bytes(state: &AppState, body: Body) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if let Some(cut) = super::serve::body_cut(&e) {
            match cut {
                BodyCut::TimedOut => ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    format!(
                        "the request body did not arrive within {}s (body_timeout_s)",
                        state.body_deadline.timeout.as_secs()
                    ),
                ),
                BodyCut::ShuttingDown => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "shutting_down",
                    "the node is shutting down; nothing of this request was written",
                ),
            }
        } else if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(format!("request body too large: {}", e.body_text()))
        } else {
            state.metrics.decode_error("body");
            ApiError::invalid_json(format!("request body: {}", e.body_text()))
        }
    })
}

fn json_body(state: &AppState, body: Body) -> Result<(Json_, Bytes), ApiError> {
    let bytes = body_bytes(state, body)?;
    if let Some(literal) = verge_core::json_int::first_beyond_64_bits(&bytes) {
        state.metrics.decode_error("json");
        return Err(ApiError::invalid_json(format!(
            "the integer {literal} is beyond the 64-bit range a document stores (it would be \
             rounded); send it as a string"
        )));
    }
    let value = serde_json::from_slice(&bytes).map_err(|e| {
        state.metrics.decode_error("json");
        ApiError::invalid_json(format!("request body is not valid JSON: {e}"))
    })?;
    Ok((value, bytes))
}

fn params(state: &AppState, query: Params) -> Result<HashMap<String, String>, ApiError> {
    query.map(|Query(q)| q).map_err(|e| {
        state.metrics.decode_error("query");
        ApiError::invalid_query(e.body_text())
    })
}

fn expiry(state: &AppState, params: &HashMap<String, String>) -> Result<Expiry, ApiError> {
    let Some(raw) = params.get("ttl") else {
        return Ok(Expiry::Keep);
    };
    let seconds: u64 = raw
        .parse()
        .ok()
        .filter(|s| *s <= TTL_SECONDS_MAX)
        .ok_or_else(|| {
            ApiError::invalid_query(format!(
                "ttl must be 0..={TTL_SECONDS_MAX} seconds, got {raw:?}"
            ))
        })?;
    if seconds == 0 {
        return Ok(Expiry::Clear);
    }
    // Bounded by TTL_SECONDS_MAX, so the product fits.
    Ok(Expiry::At(
        state.clock.now_ms().saturating_add(seconds as i64 * 1000),
    ))
}

fn reject_unknown_params(
    params: &HashMap<String, String>,
    allowed: &[&str],
) -> Result<(), ApiError> {
    match params.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ApiError::invalid_query(format!(
            "unknown query parameter {k:?}"
        ))),
        None => Ok(()),
    }
}

fn written(id: &DocId, heads: &[automerge::ChangeHash]) -> Response {
    Json(json!({ "id": id.as_str(), "heads": heads_to_hex(heads) })).into_response()
}

/// A prefix is a possibly empty beginning of a document id.
pub(super) fn check_prefix(prefix: &str) -> Result<(), ApiError> {
    if prefix.len() > verge_core::limits::DOC_ID_BYTES_MAX {
        return Err(ApiError::invalid_query(
            "prefix is longer than a document id can be",
        ));
    }
    if let Some(b) = prefix.bytes().find(|b| !verge_core::doc_id::is_id_byte(*b)) {
        return Err(ApiError::invalid_query(format!(
            "prefix has byte 0x{b:02x}, outside the document id alphabet [A-Za-z0-9._~:/@+-]"
        )));
    }
    Ok(())
}

/// Writes, then with `?replicas=N` waits until `N` peers persisted the change.
#[allow(clippy::too_many_arguments)]
async fn write_with_replicas(
    state: &AppState,
    id: &DocId,
    write: &Write,
    expiry: Expiry,
    size: usize,
    params: &HashMap<String, String>,
    if_match: Option<&[automerge::ChangeHash]>,
    claim: Option<&idempotency::Claim>,
) -> Result<Vec<automerge::ChangeHash>, ApiError> {
    let idempotent = claim.map(idempotency::Claim::idempotent);
    let replicas = match params.get("replicas") {
        None => 0,
        Some(raw) => raw
            .parse::<usize>()
            .ok()
            .filter(|n| *n <= REPLICAS_MAX)
            .ok_or_else(|| {
                ApiError::invalid_query(format!("replicas must be 0..={REPLICAS_MAX}, got {raw:?}"))
            })?,
    };
    if replicas == 0 {
        return Ok(state
            .docs
            .write(id, write, expiry, size, None, if_match, idempotent)
            .await?);
    }
    let waiter = Arc::new(ReplicaWaiter::default());
    let heads = state
        .docs
        .write(
            id,
            write,
            expiry,
            size,
            Some(Arc::clone(&waiter)),
            if_match,
            idempotent,
        )
        .await?;
    let acked = waiter.wait(replicas, REPLICAS_TIMEOUT).await;
    if acked < replicas {
        return Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "replication_timeout",
            format!(
                "the write is durable on this node but only {acked} of the {replicas} peers asked for persisted it within {} s; it will still replicate",
                REPLICAS_TIMEOUT.as_secs()
            ),
        ));
    }
    Ok(heads)
}

/// What `PUT` and `PATCH` share: the id, the query (`ttl`, `replicas`) and the JSON body.
struct WriteRequest {
    id: DocId,
    params: HashMap<String, String>,
    expiry: Expiry,
    value: Json_,
    body: Bytes,
}

fn write_request(
    state: &AppState,
    path: IdPath,
    query: Params,
    body: Body,
) -> Result<WriteRequest, ApiError> {
    let id = doc_id(state, path)?;
    let params = params(state, query)?;
    reject_unknown_params(&params, &["ttl", "replicas"])?;
    let expiry = expiry(state, &params)?;
    let (value, body) = json_body(state, body)?;
    Ok(WriteRequest {
        id,
        params,
        expiry,
        value,
        body,
    })
}

/// Heads in an API's text form: hex, separated by commas, each optionally in double quotes (as
/// an entity tag), at most [`HEADS_PARAM_MAX`]. `what` names the source in errors.
fn parse_heads(raw: &str, what: &str) -> Result<Vec<automerge::ChangeHash>, ApiError> {
    let parts: Vec<&str> = raw
        .split(',')
        .map(|p| p.trim().trim_matches('"'))
        .filter(|p| !p.is_empty())
        .collect();
    if parts.len() > HEADS_PARAM_MAX {
        return Err(ApiError::invalid_query(format!(
            "{what} names {} heads; at most {HEADS_PARAM_MAX}",
            parts.len()
        )));
    }
    verge_core::heads_from_hex(&parts).ok_or_else(|| {
        ApiError::invalid_query(format!(
            "{what} must be heads as writes return them: 64 hex digits each, comma-separated"
        ))
    })
}

/// The heads of an `If-Match` header, if any.
fn if_match(headers: &HeaderMap) -> Result<Option<Vec<automerge::ChangeHash>>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let raw = value
        .to_str()
        .map_err(|_| ApiError::invalid_query("If-Match is not ASCII"))?;
    parse_heads(raw, "If-Match").map(Some)
}

/// `GET /v1/docs/{id}`, with `?after=H1,H2[&wait_ms=N]`: once this node holds those heads.
pub async fn read(
    State(state): State<Arc<AppState>>,
    path: IdPath,
    query: Params,
) -> Result<Response, ApiError> {
    let id = doc_id(&state, path)?;
    let params = params(&state, query)?;
    reject_unknown_params(&params, &["after", "wait_ms"])?;
    if let Some(raw) = params.get("after") {
        let heads = parse_heads(raw, "after")?;
        let wait_ms = match params.get("wait_ms") {
            None => AFTER_WAIT_MS_DEFAULT,
            Some(raw) => raw
                .parse::<u64>()
                .ok()
                .filter(|ms| *ms <= AFTER_WAIT_MS_MAX)
                .ok_or_else(|| {
                    ApiError::invalid_query(format!(
                        "wait_ms must be 0..={AFTER_WAIT_MS_MAX}, got {raw:?}"
                    ))
                })?,
        };
        wait_for_heads(
            &state,
            &id,
            &heads,
            std::time::Duration::from_millis(wait_ms),
        )
        .await?;
    } else if params.contains_key("wait_ms") {
        return Err(ApiError::invalid_query("wait_ms needs after"));
    }
    let body = state.docs.read(&id)?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// Waits until this node holds `heads` of `id` (a write's, made here or at another node), at
/// most `wait`; `504 not_yet_replicated` after it.
async fn wait_for_heads(
    state: &AppState,
    id: &DocId,
    heads: &[automerge::ChangeHash],
    wait: std::time::Duration,
) -> Result<(), ApiError> {
    let deadline = tokio::time::Instant::now() + wait;
    // Subscribed before the first look, so that no commit falls between the two.
    let mut events = state.docs.subscribe();
    let mut checked_retained = None;
    loop {
        if state.docs.holds(id, heads, &mut checked_retained)? {
            return Ok(());
        }
        // Wake on this document's next commit (or on a lag, which may have hidden one).
        let woke = loop {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Ok(event)) if event.record.id == id.as_str() => break true,
                Ok(Ok(_)) => continue,
                Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => break true,
                Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) | Err(_) => break false,
            }
        };
        if !woke {
            if state.docs.holds(id, heads, &mut checked_retained)? {
                return Ok(());
            }
            state.metrics.not_yet_replicated.inc();
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "not_yet_replicated",
                format!(
                    "this node does not hold every head in after= within {} ms; the write has not reached it yet (retry, or read where it was made)",
                    wait.as_millis()
                ),
            ));
        }
    }
}

/// A write request as `PUT`, `PATCH` and `DELETE` received it, for its idempotency key.
struct Sent<'a> {
    method: &'static str,
    headers: &'a HeaderMap,
    token: Option<Extension<super::TokenName>>,
    /// The request's body (empty for `DELETE`).
    body: &'a [u8],
}

/// Writes and answers with the document's heads. A request with an idempotency key is looked
/// up first (the same request again is answered as the first time), then written in its own
/// task holding the key's claim until the write is answered, so that a client that hangs up
/// while the write is being committed (and retries) finds the key in flight, not free while
/// the write lands.
async fn write_answered(
    state: &Arc<AppState>,
    sent: Sent<'_>,
    id: &DocId,
    write: Write,
    expiry: Expiry,
    params: HashMap<String, String>,
    if_match: Option<Vec<automerge::ChangeHash>>,
) -> Result<Response, ApiError> {
    let token = sent
        .token
        .as_ref()
        .map(|Extension(super::TokenName(name))| name.as_str());
    let size = sent.body.len();
    let claim = match idempotency::begin(
        state,
        sent.headers,
        token,
        sent.method,
        id,
        &params,
        sent.body,
    )? {
        None => None,
        Some(idempotency::Begin::Write(claim)) => Some(claim),
        Some(idempotency::Begin::Replay(heads)) => {
            return Ok(idempotency::replayed(written(id, &heads)));
        }
    };
    let heads = match claim {
        None => {
            write_with_replicas(
                state,
                id,
                &write,
                expiry,
                size,
                &params,
                if_match.as_deref(),
                None,
            )
            .await?
        }
        Some(claim) => {
            let (state, id) = (Arc::clone(state), id.clone());
            tokio::spawn(async move {
                write_with_replicas(
                    &state,
                    &id,
                    &write,
                    expiry,
                    size,
                    &params,
                    if_match.as_deref(),
                    Some(&claim),
                )
                .await
            })
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "a write with an idempotency key failed in its task");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the write failed while being answered",
                )
            })??
        }
    };
    Ok(written(id, &heads))
}

/// `PUT /v1/docs/{id}`: replace the document by a diff.
pub async fn replace(
    State(state): State<Arc<AppState>>,
    token: Option<Extension<super::TokenName>>,
    path: IdPath,
    query: Params,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let if_match = if_match(&headers)?;
    let WriteRequest {
        id,
        params,
        expiry,
        value,
        body,
    } = write_request(&state, path, query, body)?;
    let Json_::Object(map) = value else {
        state.metrics.decode_error("document");
        return Err(ApiError::invalid_document(
            "a document must be a JSON object",
        ));
    };
    let sent = Sent {
        method: "PUT",
        headers: &headers,
        token,
        body: &body,
    };
    write_answered(
        &state,
        sent,
        &id,
        Write::Replace(map),
        expiry,
        params,
        if_match,
    )
    .await
}

/// `PATCH /v1/docs/{id}`: apply ops.
pub async fn patch(
    State(state): State<Arc<AppState>>,
    token: Option<Extension<super::TokenName>>,
    path: IdPath,
    query: Params,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let if_match = if_match(&headers)?;
    let WriteRequest {
        id,
        params,
        expiry,
        value,
        body,
    } = write_request(&state, path, query, body)?;
    let ops = Op::parse_patch(&value).map_err(|e| {
        state.metrics.decode_error("ops");
        ApiError::invalid_op(e.to_string())
    })?;
    let sent = Sent {
        method: "PATCH",
        headers: &headers,
        token,
        body: &body,
    };
    write_answered(&state, sent, &id, Write::Ops(ops), expiry, params, if_match).await
}

/// `DELETE /v1/docs/{id}`: write a tombstone.
pub async fn delete(
    State(state): State<Arc<AppState>>,
    token: Option<Extension<super::TokenName>>,
    path: IdPath,
    query: Params,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let if_match = if_match(&headers)?;
    let id = doc_id(&state, path)?;
    let params = params(&state, query)?;
    reject_unknown_params(&params, &["replicas"])?;
    let sent = Sent {
        method: "DELETE",
        headers: &headers,
        token,
        body: b"",
    };
    write_answered(
        &state,
        sent,
        &id,
        Write::Delete,
        Expiry::Keep,
        params,
        if_match,
    )
    .await
}

/// `GET /v1/docs?prefix=&limit=&cursor=`. Without a prefix, a token with one prefix lists
/// that prefix (`scope`, set by the auth middleware).
pub async fn list(
    State(state): State<Arc<AppState>>,
    scope: Option<Extension<super::ScopePrefix>>,
    query: Params,
) -> Result<Response, ApiError> {
    let params = params(&state, query)?;
    reject_unknown_params(&params, &["prefix", "limit", "cursor"])?;
    let scope = scope.map(|Extension(super::ScopePrefix(p))| p);
    let prefix = params
        .get("prefix")
        .filter(|p| !p.is_empty())
        .or(scope.as_ref())
        .map_or("", String::as_str);
    check_prefix(prefix)?;
    let limit = match params.get("limit") {
        None => LIST_LIMIT_DEFAULT,
        Some(raw) => raw
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=LIST_LIMIT_MAX).contains(n))
            .ok_or_else(|| {
                ApiError::invalid_query(format!("limit must be 1..={LIST_LIMIT_MAX}, got {raw:?}"))
            })?,
    };
    let cursor =
        match params.get("cursor").filter(|c| !c.is_empty()) {
            None => None,
            Some(raw) => Some(DocId::new(raw.as_str()).map_err(|e| {
                ApiError::invalid_query(format!("cursor is not a document id: {e}"))
            })?),
        };
    let page = state.docs.list(prefix, cursor.as_ref(), limit)?;
    Ok(Json(page).into_response())
}

/// `POST /v1/sync/{id}`: one Automerge sync message in, one out.
pub async fn sync(
    State(state): State<Arc<AppState>>,
    path: IdPath,
    body: Body,
) -> Result<Response, ApiError> {
    let id = doc_id(&state, path)?;
    let bytes = body_bytes(&state, body)?;
    let reply = state.docs.sync(&id, &bytes).await.inspect_err(|e| {
        if matches!(e, crate::documents::DocError::InvalidSync(_)) {
            state.metrics.decode_error("sync");
        }
    })?;
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        reply.message,
    )
        .into_response())
}

/// `POST /v1/ops/{id}`: a thin replica's writes since the heads it read (`verge_core::thin`),
/// made here at those heads. Answers the heads that hold them, and the state when the replica
/// does not already show it.
pub async fn push(
    State(state): State<Arc<AppState>>,
    path: IdPath,
    body: Body,
) -> Result<Response, ApiError> {
    let id = doc_id(&state, path)?;
    // As PUT and PATCH read theirs: an integer beyond 64 bits is refused, not rounded.
    let (json, _) = json_body(&state, body)?;
    let push = verge_core::thin::Push::from_json(&json).map_err(|e| {
        state.metrics.decode_error("push");
        match e {
            verge_core::thin::WireError::TooLarge(m) => ApiError::too_large(m),
            verge_core::thin::WireError::Op(e) => ApiError::invalid_op(e.to_string()),
            other => ApiError::new(StatusCode::BAD_REQUEST, "invalid_push", other.to_string()),
        }
    })?;
    let answer = state.docs.push(&id, push).await?;
    Ok(Json(answer.to_json()).into_response())
}
