//! Executions: list, request, get, cancel, stored output and live output as
//! server-sent events.

use std::convert::Infallible;
use std::time::Duration;

use aviary_core::model::{AuditRecord, ExecutionStatus, new_id};
use aviary_store::ExecutionFilter;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use chrono::Utc;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::wrappers::ReceiverStream;

use super::{ApiError, AppState, parse_json};
use crate::auth::Caller;
use crate::engine::RequestError;
use crate::engine::output::LiveEvent;

/// Query of `GET /executions`.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    action: Option<String>,
    status: Option<String>,
    rule: Option<String>,
    trigger_instance: Option<String>,
    parent: Option<String>,
    limit: Option<u32>,
    offset: Option<u32>,
}

/// `GET /api/v1/executions`.
pub async fn list(
    _caller: Caller,
    State(state): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let status = match q.status.as_deref() {
        Some(s) => Some(ExecutionStatus::parse(s).ok_or_else(|| {
            ApiError::bad_request(format!(
                "unknown status '{s}'; one of: {}",
                ExecutionStatus::ALL.map(|s| s.as_str()).join(", ")
            ))
        })?),
        None => None,
    };
    let filter = ExecutionFilter {
        action: q.action,
        status,
        rule: q.rule,
        trigger_instance_id: q.trigger_instance,
        parent_id: q.parent,
        limit: q.limit.unwrap_or(50).min(1000),
        offset: q.offset.unwrap_or(0),
    };
    let list = state.engine.store.list_executions(&filter).await?;
    Ok(Json(json!(list)))
}

/// Body of `POST /executions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    action: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

/// `POST /api/v1/executions`.
pub async fn create(
    caller: Caller,
    State(state): State<AppState>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let body: CreateBody = parse_json(&body)?;
    let exec = state
        .engine
        .request(&body.action, body.parameters, &caller.name)
        .await
        .map_err(|e| match e {
            RequestError::UnknownAction(_) => ApiError::not_found(e.to_string()),
            RequestError::Parameters { ref errors, .. } => {
                let details = errors
                    .0
                    .iter()
                    .map(|p| json!({"parameter": p.parameter, "message": p.message}))
                    .collect();
                ApiError::bad_request(e.to_string()).with_details(details)
            }
            RequestError::Disabled(_) | RequestError::Template(_) => {
                ApiError::bad_request(e.to_string())
            }
            RequestError::Store(s) => ApiError::from(s),
        })?;
    audit(
        &state,
        &caller.name,
        "execution.request",
        &exec.id,
        json!({"action": exec.action}),
    )
    .await;
    Ok((StatusCode::CREATED, Json(json!(exec))))
}

/// Appends to the audit trail; failures are logged, not fatal.
pub async fn audit(state: &AppState, actor: &str, action: &str, target: &str, details: Value) {
    let record = AuditRecord {
        id: new_id(),
        at: Utc::now(),
        actor: actor.to_string(),
        action: action.to_string(),
        target: target.to_string(),
        details,
    };
    if let Err(e) = state.engine.store.append_audit(record).await {
        tracing::warn!(error = %e, "cannot write the audit trail");
    }
}

async fn load(state: &AppState, id: &str) -> Result<aviary_core::model::Execution, ApiError> {
    state.engine.store.get_execution(id).await?.ok_or_else(|| {
        ApiError::not_found(format!("no execution '{id}'; see `aviary execution list`"))
    })
}

/// `GET /api/v1/executions/{id}`.
pub async fn get_one(
    _caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!(load(&state, &id).await?)))
}

/// `POST /api/v1/executions/{id}/cancel`.
pub async fn cancel(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let exec = state
        .engine
        .cancel(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no execution '{id}'")))?;
    audit(
        &state,
        &caller.name,
        "execution.cancel",
        &id,
        json!({"status": exec.status}),
    )
    .await;
    Ok(Json(json!(exec)))
}

/// Query of the output endpoints.
#[derive(Debug, Deserialize)]
pub struct OutputQuery {
    after: Option<i64>,
}

/// `GET /api/v1/executions/{id}/output`.
pub async fn output(
    _caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<OutputQuery>,
) -> Result<Json<Value>, ApiError> {
    load(&state, &id).await?;
    let chunks = state
        .engine
        .store
        .get_output(&id, q.after.unwrap_or(0))
        .await?;
    Ok(Json(json!(chunks)))
}

/// `GET /api/v1/executions/{id}/stream`: stored output first, then live
/// output, status changes, and a final `end` event with the execution.
pub async fn stream(
    _caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<OutputQuery>,
) -> Result<impl axum::response::IntoResponse, ApiError> {
    load(&state, &id).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(256);
    let engine = state.engine.clone();
    let mut last_seq = q.after.unwrap_or(0);
    tokio::spawn(async move {
        let mut sub = engine.output.subscribe(&id);
        let mut last_status: Option<ExecutionStatus> = None;
        loop {
            // Catch up: the store, then chunks not stored yet (see OutputHub).
            if let Ok(chunks) = engine.store.get_output(&id, last_seq).await {
                for c in chunks {
                    last_seq = c.seq;
                    if tx.send(Ok(chunk_event(&c))).await.is_err() {
                        return;
                    }
                }
            }
            if let Some(s) = sub.as_mut() {
                for c in std::mem::take(&mut s.backlog) {
                    if c.seq > last_seq {
                        last_seq = c.seq;
                        if tx.send(Ok(chunk_event(&c))).await.is_err() {
                            return;
                        }
                    }
                }
            }
            let exec = match engine.store.get_execution(&id).await {
                Ok(Some(e)) => e,
                _ => return,
            };
            if last_status != Some(exec.status) {
                last_status = Some(exec.status);
                let ev = SseEvent::default()
                    .event("status")
                    .data(json!({"status": exec.status}).to_string());
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
            if exec.status.is_terminal() {
                if let Ok(chunks) = engine.store.get_output(&id, last_seq).await {
                    for c in chunks {
                        let _ = tx.send(Ok(chunk_event(&c))).await;
                    }
                }
                let _ = tx
                    .send(Ok(SseEvent::default()
                        .event("end")
                        .data(json!(exec).to_string())))
                    .await;
                return;
            }
            if sub.is_none() {
                sub = engine.output.subscribe(&id);
                if sub.is_some() {
                    continue;
                }
            }
            match sub.as_mut() {
                Some(s) => loop {
                    match tokio::time::timeout(Duration::from_secs(1), s.live.recv()).await {
                        Ok(Ok(LiveEvent::Output(c))) => {
                            if c.seq > last_seq {
                                last_seq = c.seq;
                                if tx.send(Ok(chunk_event(&c))).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Ok(Ok(LiveEvent::Status(_))) => break,
                        Ok(Ok(LiveEvent::End)) | Ok(Err(RecvError::Closed)) => {
                            sub = None;
                            break;
                        }
                        // Lagged: catch up from the store; timeout: re-check the status.
                        Ok(Err(RecvError::Lagged(_))) | Err(_) => break,
                    }
                },
                None => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    Ok(Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default()))
}

fn chunk_event(c: &aviary_store::OutputChunk) -> SseEvent {
    SseEvent::default()
        .event("output")
        .id(c.seq.to_string())
        .data(json!({"seq": c.seq, "stream": c.stream, "data": c.data, "at": c.at}).to_string())
}
