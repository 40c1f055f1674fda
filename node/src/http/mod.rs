//! The HTTP API of a node (`/v1`, probes and metrics). See docs/api.md.

mod admin;
mod auth;
mod backup;
pub mod cors;
mod docs;
pub use docs::REPLICAS_MAX;
mod error;
mod idempotency;
pub mod limits;
mod node;
pub mod serve;
pub mod tls;
mod watch;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{any, get, post};
use verge_core::limits::{REQUEST_BODY_BYTES_MAX, SYNC_MESSAGE_BYTES_MAX};

pub use auth::{ScopePrefix, Scoped, TokenName};
pub use error::ApiError;
pub use tls::{ApiTlsFiles, TlsListener};

use crate::clock::Clock;
use crate::documents::Documents;
use crate::metrics::Metrics;

/// What every handler can reach.
#[derive(Debug)]
pub struct AppState {
    /// The document service.
    pub docs: Arc<Documents>,
    /// The node's metrics.
    pub metrics: Arc<Metrics>,
    /// The node's id.
    pub node_id: String,
    /// The address the API listens on.
    pub api_addr: String,
    /// Wall clock.
    pub clock: Arc<dyn Clock>,
    /// When the node started, milliseconds since the Unix epoch.
    pub started_at_ms: i64,
    /// Whether `/readyz` answers ready: storage is open and the node is not draining.
    pub ready: AtomicBool,
    /// Replication, for the member list in status.
    pub replication: Option<Arc<crate::replication::Replication>>,
    /// Who may do what (see `auth`).
    pub auth: crate::auth::Auth,
    /// Request rate limits per token.
    pub rate_limits: limits::RateLimits,
    /// How long a request's body may take to arrive.
    pub body_deadline: serve::BodyDeadline,
    /// Browser origins allowed to call the API.
    pub cors: Arc<cors::Cors>,
    /// Idempotency keys whose first write is under way.
    pub idempotency: Arc<idempotency::InFlight>,
    /// Webhook subscriptions, for status.
    pub subscriptions: Arc<crate::subscriptions::Subscriptions>,
    /// Backups, when configured.
    pub backup: Option<Arc<crate::backup::Backup>>,
    /// Notified when the node left the cluster (`POST /v1/admin/leave`): the node then stops
    /// as on SIGTERM.
    pub leave_requested: Arc<tokio::sync::Notify>,
}

/// The largest body an admin route takes (a forget names one address).
const ADMIN_BODY_BYTES_MAX: usize = 4096;

/// Builds the router over `state`.
///
/// `stop` turns `true` when the node starts draining; long-lived responses (watch streams) end
/// then, so that draining does not wait for them.
pub fn router(state: Arc<AppState>, stop: tokio::sync::watch::Receiver<bool>) -> Router {
    let docs = Router::new()
        .route("/v1/docs", get(docs::list))
        .route("/v1/docs/", any(docs::empty_id))
        .route("/v1/sync/", any(docs::empty_id))
        .route(
            "/v1/docs/{*id}",
            get(docs::read)
                .put(docs::replace)
                .patch(docs::patch)
                .delete(docs::delete),
        )
        .route("/v1/ops/", any(docs::empty_id))
        .route("/v1/ops/{*id}", post(docs::push))
        .layer(DefaultBodyLimit::max(REQUEST_BODY_BYTES_MAX));
    let sync = Router::new()
        .route("/v1/sync/{*id}", post(docs::sync))
        .layer(DefaultBodyLimit::max(SYNC_MESSAGE_BYTES_MAX));
    let admin = Router::new()
        .route("/v1/admin/leave", post(admin::leave))
        .route("/v1/admin/members/forget", post(admin::forget))
        .layer(DefaultBodyLimit::max(ADMIN_BODY_BYTES_MAX));
    // The routes that take a body; inside authorization, so that an unknown client's body is
    // never waited for.
    let with_body =
        Router::new()
            .merge(docs)
            .merge(sync)
            .merge(admin)
            .layer(middleware::from_fn_with_state(
                state.body_deadline.clone(),
                serve::body_deadline,
            ));
    let routes = Router::new()
        .merge(with_body)
        .route("/v1/watch", get(watch::watch).layer(axum::Extension(stop)))
        .route("/v1/status", get(node::status))
        .route("/v1/admin/backup", post(backup::now))
        .route("/v1/admin/backups", get(backup::list))
        .route("/healthz", get(node::healthz))
        .route("/readyz", get(node::readyz))
        .route("/metrics", get(node::metrics))
        .fallback(node::not_found)
        .method_not_allowed_fallback(node::method_not_allowed);
    // Inside the request counter, so that refused requests are counted too. An open API (no
    // tokens) skips the layer: it would let every request through at a cost on the hot path.
    let routes = if state.auth.is_open() {
        routes
    } else {
        routes.layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            auth::authorize,
        ))
    };
    let routes = routes.layer(middleware::from_fn_with_state(
        Arc::clone(&state),
        catch_panics,
    ));
    // Outside authorization: a browser's preflight carries no token.
    let routes = if state.cors.is_off() {
        routes
    } else {
        routes.layer(middleware::from_fn_with_state(
            Arc::clone(&state.cors),
            cors::cors,
        ))
    };
    routes
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            count_requests,
        ))
        .with_state(state)
}

/// Answers a request whose handler panicked with `500 internal` instead of dropping its
/// connection unanswered, and counts it. (Store reads catch the storage engine's panics
/// themselves; this is the net for anything else.)
async fn catch_panics(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    use futures_util::FutureExt;
    match std::panic::AssertUnwindSafe(next.run(request))
        .catch_unwind()
        .await
    {
        Ok(response) => response,
        Err(panic) => {
            state.metrics.api_panics.inc();
            let message = crate::store::panic_message(panic.as_ref());
            tracing::error!(panic = %message, "a request handler panicked");
            axum::response::IntoResponse::into_response(ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the node failed while answering this request; it is logged and counted",
            ))
        }
    }
}

/// The router a connection beyond a connection limit is served with: the probes answer as
/// usual (a load balancer must not take a busy node for a dead one), anything else gets
/// `503 too_many_connections`.
pub fn probes_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(node::healthz))
        .route("/readyz", get(node::readyz))
        .fallback(node::too_many_connections)
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            count_requests,
        ))
        .with_state(state)
}

/// The route label of a request: its template, from a fixed set so that labels never
/// allocate and a client cannot grow the metric's cardinality.
fn route_label(path: Option<&MatchedPath>) -> &'static str {
    match path.map(MatchedPath::as_str) {
        Some("/v1/docs") => "/v1/docs",
        Some("/v1/docs/{*id}") => "/v1/docs/{*id}",
        Some("/v1/sync/{*id}") => "/v1/sync/{*id}",
        Some("/v1/watch") => "/v1/watch",
        Some("/v1/status") => "/v1/status",
        Some("/v1/admin/leave") => "/v1/admin/leave",
        Some("/v1/admin/members/forget") => "/v1/admin/members/forget",
        Some("/v1/admin/backup") => "/v1/admin/backup",
        Some("/v1/admin/backups") => "/v1/admin/backups",
        Some("/healthz") => "/healthz",
        Some("/readyz") => "/readyz",
        Some("/metrics") => "/metrics",
        Some(_) => "other",
        None => "unmatched",
    }
}

/// Counts every request by route template and status.
async fn count_requests(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let route = route_label(request.extensions().get::<MatchedPath>());
    let response = next.run(request).await;
    state
        .metrics
        .http_request(route, response.status().as_u16());
    response
}
