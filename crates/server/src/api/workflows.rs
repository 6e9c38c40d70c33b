//! Workflow operations and inquiries: pause and resume a workflow
//! execution; list, show and answer `core.ask` inquiries.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::executions::audit;
use super::{ApiError, AppState, parse_json};
use crate::auth::Caller;
use crate::engine::inquiry::{self, InquiryError};
use crate::engine::workflow::{self, PauseError};

impl From<PauseError> for ApiError {
    fn from(e: PauseError) -> Self {
        match e {
            PauseError::NotFound(_) => ApiError::not_found(e.to_string()),
            PauseError::Conflict(_) => ApiError::new(StatusCode::CONFLICT, e.to_string()),
            PauseError::Store(s) => ApiError::from(s),
        }
    }
}

impl From<InquiryError> for ApiError {
    fn from(e: InquiryError) -> Self {
        match e {
            InquiryError::NotFound(_) => ApiError::not_found(e.to_string()),
            InquiryError::Conflict(_) => ApiError::new(StatusCode::CONFLICT, e.to_string()),
            InquiryError::Forbidden(_) => ApiError::new(StatusCode::FORBIDDEN, e.to_string()),
            InquiryError::Invalid(ref problems) => {
                let details = problems.iter().map(|p| json!({"message": p})).collect();
                ApiError::bad_request(e.to_string()).with_details(details)
            }
            InquiryError::Store(s) => ApiError::from(s),
        }
    }
}

/// `POST /api/v1/executions/{id}/pause`.
pub async fn pause(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let exec = workflow::pause(&state.engine, &id).await?;
    audit(
        &state,
        &caller.name,
        "execution.pause",
        &id,
        json!({"status": exec.status}),
    )
    .await;
    Ok(Json(json!(exec)))
}

/// `POST /api/v1/executions/{id}/resume`.
pub async fn resume(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let exec = workflow::resume(&state.engine, &id).await?;
    audit(
        &state,
        &caller.name,
        "execution.resume",
        &id,
        json!({"status": exec.status}),
    )
    .await;
    Ok(Json(json!(exec)))
}

/// Body of `POST /executions/{id}/re-run`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RerunBody {
    tasks: Vec<String>,
    /// With-items tasks (among `tasks`) whose succeeded items are kept.
    #[serde(default)]
    no_reset: Vec<String>,
}

/// `POST /api/v1/executions/{id}/re-run` with `{"tasks": ["a", "b"]}`
/// (and `"no_reset": ["b"]` to run only b's items that did not succeed).
pub async fn rerun(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let body: RerunBody = parse_json(&body)?;
    let exec = workflow::rerun(
        &state.engine,
        &id,
        &body.tasks,
        &body.no_reset,
        &caller.name,
    )
    .await?;
    audit(
        &state,
        &caller.name,
        "execution.re-run",
        &exec.id,
        json!({"original": id, "tasks": body.tasks, "no_reset": body.no_reset}),
    )
    .await;
    Ok((StatusCode::CREATED, Json(json!(exec))))
}

/// `GET /api/v1/executions/{id}/tasks`: a workflow's task tree.
pub async fn tasks(
    _caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(workflow::task_tree(&state.engine, &id).await?))
}

/// The API view of an inquiry execution.
fn view(exec: &aviary_core::model::Execution) -> Value {
    let r = &exec.result;
    json!({
        "id": exec.id,
        "action": exec.action,
        "status": exec.status,
        "parent_id": exec.parent_id,
        "created_at": exec.created_at,
        "schema": r.get("schema"),
        "users": r.get("users"),
        "roles": r.get("roles"),
        "route": r.get("route"),
        "ttl": r.get("ttl"),
        "expires_at": r.get("expires_at"),
        "response": r.get("response"),
        "responded_by": r.get("responded_by"),
        "responded_at": r.get("responded_at"),
    })
}

/// Query of `GET /inquiries`.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    limit: Option<u32>,
}

/// `GET /api/v1/inquiries`: pending inquiries, newest first.
pub async fn list(
    _caller: Caller,
    State(state): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let list = inquiry::list_pending(&state.engine, q.limit.unwrap_or(100).min(1000)).await?;
    Ok(Json(Value::Array(list.iter().map(view).collect())))
}

/// `GET /api/v1/inquiries/{id}`.
pub async fn get_one(
    _caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(view(&inquiry::get(&state.engine, &id).await?)))
}

/// Body of `POST /inquiries/{id}/respond`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RespondBody {
    response: Value,
}

/// `POST /api/v1/inquiries/{id}/respond` with `{"response": {...}}`.
pub async fn respond(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let body: RespondBody = parse_json(&body)?;
    let exec = inquiry::respond(
        &state.engine,
        &id,
        &caller.name,
        &caller.role,
        body.response.clone(),
    )
    .await?;
    audit(
        &state,
        &caller.name,
        "inquiry.respond",
        &id,
        json!({"response": body.response}),
    )
    .await;
    Ok(Json(view(&exec)))
}
