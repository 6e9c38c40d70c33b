//! The HTTP API under `/api/v1` (see docs/api.md), `/healthz`, and webhooks.
//! Every route but `/healthz` and signed webhooks requires a token
//! ([`crate::auth::Caller`] is the extractor that enforces it). `/apt/` serves
//! the APT repository read-only.

pub mod apt;
mod deploy;
mod executions;
mod jenkins;
mod resources;
mod webhooks;
mod workflows;

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use crate::auth::TokenCache;
use crate::engine::Engine;

/// State shared by every handler.
#[derive(Clone)]
pub struct AppState {
    /// The engine.
    pub engine: Arc<Engine>,
    /// Verified tokens.
    pub tokens: Arc<TokenCache>,
    /// Serializes pack reloads.
    pub reload_lock: Arc<tokio::sync::Mutex<()>>,
}

/// An API error: a status and a JSON body `{"error", "details"}`.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// What went wrong and what to do.
    pub error: String,
    /// Every individual problem, when there are several.
    pub details: Vec<Value>,
}

impl ApiError {
    /// A new error.
    pub fn new(status: StatusCode, error: impl Into<String>) -> Self {
        Self {
            status,
            error: error.into(),
            details: Vec::new(),
        }
    }
    /// 400.
    pub fn bad_request(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, error)
    }
    /// 401.
    pub fn unauthorized(error: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, error)
    }
    /// 404.
    pub fn not_found(error: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, error)
    }
    /// With details.
    pub fn with_details(mut self, details: Vec<Value>) -> Self {
        self.details = details;
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.error });
        if !self.details.is_empty() {
            body["details"] = Value::Array(self.details);
        }
        (self.status, Json(body)).into_response()
    }
}

impl From<aviary_store::StoreError> for ApiError {
    fn from(e: aviary_store::StoreError) -> Self {
        tracing::error!(error = %e, "storage error");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("storage error: {e}"),
        )
    }
}

/// Parses a JSON request body with a clear error.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "request body is not valid JSON for this endpoint: {e} (line {}, column {})",
            e.line(),
            e.column()
        ))
    })
}

async fn healthz(axum::extract::State(state): axum::extract::State<AppState>) -> Json<Value> {
    Json(json!({ "status": "ok", "backend": state.engine.store.backend() }))
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint; see docs/api.md")
}

/// The whole HTTP application.
pub fn router(state: AppState) -> Router {
    let limit = state.engine.config.max_body_bytes;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/apt/{*path}", get(apt::serve))
        .route("/api/v1/webhooks/jenkins", post(jenkins::receive))
        .route("/api/v1/webhooks/{*url}", post(webhooks::receive))
        .route(
            "/api/v1/executions",
            get(executions::list).post(executions::create),
        )
        .route("/api/v1/executions/{id}", get(executions::get_one))
        .route("/api/v1/executions/{id}/cancel", post(executions::cancel))
        .route("/api/v1/executions/{id}/pause", post(workflows::pause))
        .route("/api/v1/executions/{id}/resume", post(workflows::resume))
        .route("/api/v1/executions/{id}/tasks", get(workflows::tasks))
        .route("/api/v1/executions/{id}/re-run", post(workflows::rerun))
        .route("/api/v1/inquiries", get(workflows::list))
        .route("/api/v1/inquiries/{id}", get(workflows::get_one))
        .route("/api/v1/inquiries/{id}/respond", post(workflows::respond))
        .route("/api/v1/executions/{id}/output", get(executions::output))
        .route("/api/v1/executions/{id}/stream", get(executions::stream))
        .route("/api/v1/actions", get(resources::list_actions))
        .route("/api/v1/actions/{reference}", get(resources::get_action))
        .route("/api/v1/rules", get(resources::list_rules))
        .route("/api/v1/rules/{reference}", get(resources::get_rule))
        .route(
            "/api/v1/rules/{reference}/enable",
            post(resources::enable_rule),
        )
        .route(
            "/api/v1/rules/{reference}/disable",
            post(resources::disable_rule),
        )
        .route(
            "/api/v1/trigger-instances",
            get(resources::list_trigger_instances),
        )
        .route(
            "/api/v1/trigger-instances/{id}",
            get(resources::get_trigger_instance),
        )
        .route("/api/v1/enforcements", get(resources::list_enforcements))
        .route("/api/v1/keys", get(resources::list_keys))
        .route(
            "/api/v1/keys/{scope}/{name}",
            get(resources::get_key)
                .put(resources::put_key)
                .delete(resources::delete_key),
        )
        .route(
            "/api/v1/tokens",
            get(resources::list_tokens).post(resources::create_token),
        )
        .route(
            "/api/v1/tokens/{id}",
            axum::routing::delete(resources::revoke_token),
        )
        .route("/api/v1/packs", get(resources::list_packs))
        .route("/api/v1/packs/reload", post(resources::reload_packs))
        .route("/api/v1/audit", get(resources::list_audit))
        .route("/api/v1/stats", get(resources::stats))
        .route(
            "/api/v1/hosts",
            get(deploy::list_hosts).post(deploy::add_host),
        )
        .route(
            "/api/v1/hosts/{name}",
            get(deploy::get_host).delete(deploy::delete_host),
        )
        .route(
            "/api/v1/hosts/{name}/token",
            post(deploy::create_agent_token).delete(deploy::revoke_agent_token),
        )
        .route("/api/v1/versions", get(deploy::list_versions))
        .route("/api/v1/versions/{app}", get(deploy::get_versions))
        .route(
            "/api/v1/versions/{app}/production",
            axum::routing::put(deploy::set_production),
        )
        .route("/api/v1/deploys", post(deploy::create_deploy))
        .route("/api/v1/deploy-locks", get(deploy::list_locks))
        .route("/api/v1/agent/register", post(deploy::agent_register))
        .route("/api/v1/agent/report", post(deploy::agent_report))
        .route("/api/v1/agent/versions", get(deploy::agent_versions))
        .route("/api/v1/agent/watch", get(deploy::agent_watch))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}
