//! The access rules of docs/api.md, applied to every request before its handler runs.
//!
//! One middleware decides for every route, so that no handler can forget a check:
//!
//! | route | needs |
//! |---|---|
//! | `/healthz`, `/readyz` | nothing (load balancers probe them) |
//! | `GET /v1/docs/{id}` | `read`, and a prefix covering `id` |
//! | `PUT`/`PATCH`/`DELETE /v1/docs/{id}`, `POST /v1/sync/{id}`, `POST /v1/ops/{id}` | `write`, and a prefix covering `id` (a sync or push can carry changes) |
//! | `GET /v1/docs`, `GET /v1/watch` | `read`; a `prefix` inside the token's prefixes |
//! | `GET /v1/status`, `/metrics` | `admin` reaching every document (they describe them all) |
//! | `/v1/admin/...` | `admin` reaching every document (they copy or act on the whole node) |
//! | anything else | a valid token (then `404`/`405`) |

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{FromRequestParts, MatchedPath, Path, Query, Request, State};
use axum::http::header::{AUTHORIZATION, RETRY_AFTER, WWW_AUTHENTICATE};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};
use crate::auth::{Denied, Role, Token};

/// The prefix a listing or watch without `?prefix=` is limited to, set when the token reaches
/// only one prefix.
#[derive(Debug, Clone)]
pub struct ScopePrefix(pub String);

/// The name of the token a request was authorized with (absent when the API is open): what
/// scopes idempotency keys, so that two clients' keys never meet.
#[derive(Debug, Clone)]
pub struct TokenName(pub String);

/// Set on a listing or watch by a token that does not reach every document: what it is told
/// must not reveal what happens outside its prefixes.
#[derive(Debug, Clone, Copy)]
pub struct Scoped;

/// Authenticates the request's bearer token and checks its role and scope for the route.
pub(super) async fn authorize(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    if state.auth.is_open() {
        return next.run(request).await;
    }
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    if matches!(route.as_deref(), Some("/healthz" | "/readyz")) {
        return next.run(request).await;
    }
    let header = request
        .headers()
        .get(AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    let token = match state.auth.authenticate(header) {
        Ok(token) => token,
        Err(denied) => return refuse(&state, &denied, route.as_deref()),
    };
    if let Err(wait) = state.rate_limits.check(token.name()) {
        return rate_limited(&state, token, wait);
    }
    let (mut parts, body) = request.into_parts();
    parts.extensions.insert(TokenName(token.name().to_owned()));
    let reads = parts.method == Method::GET || parts.method == Method::HEAD;
    let decision = match route.as_deref() {
        Some("/v1/status" | "/metrics") => need_role(token, Role::Admin).and_then(|()| {
            if token.reaches_everything() {
                Ok(())
            } else {
                Err(Denied::Prefix {
                    token: token.name().to_owned(),
                    target: "node-wide status and metrics, which describe every document".into(),
                })
            }
        }),
        Some(admin) if admin.starts_with("/v1/admin/") => {
            need_role(token, Role::Admin).and_then(|()| {
                if token.reaches_everything() {
                    Ok(())
                } else {
                    Err(Denied::Prefix {
                        token: token.name().to_owned(),
                        target: "node administration, which copies or acts on every document"
                            .into(),
                    })
                }
            })
        }
        Some("/v1/docs/{*id}") => {
            let role = if reads { Role::Read } else { Role::Write };
            match need_role(token, role) {
                Ok(()) => document_scope(token, &mut parts, &state).await,
                Err(denied) => Err(denied),
            }
        }
        Some("/v1/sync/{*id}" | "/v1/ops/{*id}") => match need_role(token, Role::Write) {
            Ok(()) => document_scope(token, &mut parts, &state).await,
            Err(denied) => Err(denied),
        },
        Some("/v1/docs" | "/v1/watch") => {
            need_role(token, Role::Read).and_then(|()| listing_scope(token, &mut parts))
        }
        // Unknown routes and wrong methods: a valid token is enough to learn that.
        _ => Ok(()),
    };
    match decision {
        Ok(()) => next.run(Request::from_parts(parts, body)).await,
        Err(denied) => refuse(&state, &denied, route.as_deref()),
    }
}

fn need_role(token: &Token, needs: Role) -> Result<(), Denied> {
    if token.role() >= needs {
        Ok(())
    } else {
        Err(Denied::Role {
            token: token.name().to_owned(),
            has: token.role(),
            needs,
        })
    }
}

/// The document id must start with one of the token's prefixes. The id is decoded exactly as
/// the handler decodes it; one that does not decode is left to the handler, which refuses it
/// with `400 invalid_id` before touching any document.
async fn document_scope(
    token: &Token,
    parts: &mut axum::http::request::Parts,
    state: &Arc<AppState>,
) -> Result<(), Denied> {
    match Path::<String>::from_request_parts(parts, state).await {
        Ok(Path(id)) if token.covers(&id) => Ok(()),
        Ok(Path(id)) => Err(Denied::Prefix {
            token: token.name().to_owned(),
            target: format!("document {id:?}"),
        }),
        Err(_) => Ok(()),
    }
}

/// A listing or watch stays inside the token's prefixes; without `?prefix=` it is narrowed to
/// the token's only prefix (see [`Token::listing_prefix`]). A query that does not parse is left
/// to the handler, which refuses it with `400 invalid_query`.
fn listing_scope(token: &Token, parts: &mut axum::http::request::Parts) -> Result<(), Denied> {
    let Ok(Query(params)) = Query::<HashMap<String, String>>::try_from_uri(&parts.uri) else {
        return Ok(());
    };
    let requested = params
        .get("prefix")
        .map(String::as_str)
        .filter(|p| !p.is_empty());
    let prefix = token.listing_prefix(requested)?;
    if !token.reaches_everything() {
        parts.extensions.insert(Scoped);
    }
    if requested.is_none() && !prefix.is_empty() {
        parts.extensions.insert(ScopePrefix(prefix));
    }
    Ok(())
}

/// Answers `429 rate_limited` with the whole seconds to wait in `Retry-After`, and counts it.
fn rate_limited(state: &AppState, token: &Token, wait: std::time::Duration) -> Response {
    state
        .metrics
        .rate_limited
        .get_or_create(&vec![("token", token.name().to_owned())])
        .inc();
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let seconds = seconds.max(1);
    let mut response = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!(
            "token {:?} is over its request rate; retry in {seconds} s",
            token.name()
        ),
    )
    .into_response();
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(seconds));
    response
}

/// Answers `401 unauthorized` or `403 forbidden`, counts it, and logs it without the token.
fn refuse(state: &AppState, denied: &Denied, route: Option<&str>) -> Response {
    state
        .metrics
        .auth_failures
        .get_or_create(&vec![("reason", denied.reason())])
        .inc();
    tracing::debug!(
        reason = denied.reason(),
        route = route.unwrap_or("unmatched"),
        "request refused"
    );
    let message = denied.message();
    if denied.is_unauthenticated() {
        let challenge = if *denied == Denied::Missing {
            "Bearer realm=\"verge\""
        } else {
            "Bearer realm=\"verge\", error=\"invalid_token\""
        };
        let mut response =
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
        response
            .headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
        response
    } else {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message).into_response()
    }
}
