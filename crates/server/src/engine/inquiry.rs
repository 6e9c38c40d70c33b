//! Inquiries: actions of runner `inquirer` (`core.ask`) that wait for a
//! human answer.
//!
//! When the scheduler claims one it does not run anything: the execution
//! becomes `pending`, its result holds the question (JSON `schema`, `users`,
//! `roles`, `route`, `ttl`, `expires_at`), and the outermost workflow it
//! belongs to is paused (StackStorm's behaviour: running tasks end, no new
//! one starts). An answer ([`respond`]) must satisfy the schema and come from
//! an allowed token (listed user or role, or an admin when the lists are
//! set); it is recorded with who answered and when, the execution succeeds
//! with `result.response`, and the workflow resumes. An inquiry not answered
//! within `ttl` minutes ends as `timeout` (the task fails) and the workflow
//! resumes to handle it. Everything is in the executions table, so a
//! pending inquiry survives restarts.

use aviary_core::model::{Execution, ExecutionStatus};
use aviary_store::ExecutionFilter;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use super::Engine;
use super::workflow;

/// The runner type of inquiry actions.
pub const INQUIRY_RUNNER: &str = "inquirer";

/// Why an answer was refused.
#[derive(Debug, thiserror::Error)]
pub enum InquiryError {
    /// No such inquiry.
    #[error("no inquiry '{0}'; see `aviary inquiry list`")]
    NotFound(String),
    /// Already answered, expired or canceled.
    #[error("{0}")]
    Conflict(String),
    /// The caller may not answer.
    #[error("{0}")]
    Forbidden(String),
    /// The answer does not satisfy the schema (one message per problem).
    #[error("the answer does not match the inquiry's schema: {}", .0.join("; "))]
    Invalid(Vec<String>),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] aviary_store::StoreError),
}

fn str_list(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Opens a claimed (`scheduled`) inquiry: it becomes `pending` and its
/// workflow pauses.
pub async fn open(engine: &Engine, exec: &Execution, params: Map<String, Value>) {
    let schema = params
        .get("schema")
        .cloned()
        .unwrap_or_else(|| json!({"type": "object"}));
    if let Err(e) = jsonschema::validator_for(&schema) {
        fail(
            engine,
            &exec.id,
            format!("parameter 'schema' is not a valid JSON schema: {e}"),
        )
        .await;
        return;
    }
    let ttl = params.get("ttl").and_then(Value::as_f64).unwrap_or(1440.0);
    let expires_at = (ttl > 0.0)
        .then(|| Utc::now() + chrono::Duration::milliseconds((ttl * 60_000.0).min(1e15) as i64));
    let question = json!({
        "schema": schema,
        "users": str_list(params.get("users")),
        "roles": str_list(params.get("roles")),
        "route": params.get("route").cloned().unwrap_or(json!("")),
        "ttl": ttl,
        "expires_at": expires_at,
    });
    match engine
        .store
        .transition_execution(
            &exec.id,
            &[ExecutionStatus::Scheduled],
            ExecutionStatus::Pending,
            Some(question),
            Utc::now(),
        )
        .await
    {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            tracing::error!(execution = %exec.id, error = %e, "cannot open an inquiry");
            return;
        }
    }
    if let Some(root) = workflow::root_workflow(engine, &exec.id).await
        && let Err(e) = workflow::pause(engine, &root).await
    {
        tracing::warn!(inquiry = %exec.id, workflow = %root, error = %e, "cannot pause the inquiry's workflow");
    }
}

async fn fail(engine: &Engine, id: &str, msg: String) {
    if let Err(e) = engine
        .store
        .transition_execution(
            id,
            &[ExecutionStatus::Scheduled],
            ExecutionStatus::Failed,
            Some(json!({"error": msg})),
            Utc::now(),
        )
        .await
    {
        tracing::error!(execution = id, error = %e, "cannot record an inquiry's failure");
    }
}

/// Loads an inquiry execution (any status).
pub async fn get(engine: &Engine, id: &str) -> Result<Execution, InquiryError> {
    match engine.store.get_execution(id).await? {
        Some(e) if e.runner == INQUIRY_RUNNER => Ok(e),
        _ => Err(InquiryError::NotFound(id.to_string())),
    }
}

/// Pending inquiries, newest first.
pub async fn list_pending(engine: &Engine, limit: u32) -> Result<Vec<Execution>, InquiryError> {
    let filter = ExecutionFilter {
        status: Some(ExecutionStatus::Pending),
        limit,
        ..Default::default()
    };
    Ok(engine
        .store
        .list_executions(&filter)
        .await?
        .into_iter()
        .filter(|e| e.runner == INQUIRY_RUNNER)
        .collect())
}

/// Answers a pending inquiry as the token `name` of role `role`.
pub async fn respond(
    engine: &Engine,
    id: &str,
    name: &str,
    role: &str,
    response: Value,
) -> Result<Execution, InquiryError> {
    let exec = get(engine, id).await?;
    if exec.status != ExecutionStatus::Pending {
        return Err(InquiryError::Conflict(format!(
            "inquiry '{id}' is {}; only a pending inquiry can be answered",
            exec.status.as_str()
        )));
    }
    let users = str_list(exec.result.get("users"));
    let roles = str_list(exec.result.get("roles"));
    let allowed = (users.is_empty() && roles.is_empty())
        || role == "admin"
        || users.iter().any(|u| u == name)
        || roles.iter().any(|r| r == role);
    if !allowed {
        return Err(InquiryError::Forbidden(format!(
            "token '{name}' (role '{role}') may not answer inquiry '{id}': it is for users [{}] and roles [{}]",
            users.join(", "),
            roles.join(", ")
        )));
    }
    let schema = exec
        .result
        .get("schema")
        .cloned()
        .unwrap_or_else(|| json!({"type": "object"}));
    let validator = jsonschema::validator_for(&schema)
        .map_err(|e| InquiryError::Conflict(format!("the inquiry's schema is not valid: {e}")))?;
    let problems: Vec<String> = validator
        .iter_errors(&response)
        .map(|e| {
            let path = e.instance_path().to_string();
            let path = if path.is_empty() {
                "/".to_string()
            } else {
                path
            };
            format!("at {path}: {e}")
        })
        .collect();
    if !problems.is_empty() {
        return Err(InquiryError::Invalid(problems));
    }
    let mut result = exec.result.clone();
    if let Value::Object(map) = &mut result {
        map.insert("response".into(), response);
        map.insert("responded_by".into(), json!(name));
        map.insert("responded_at".into(), json!(Utc::now()));
    }
    let answered = engine
        .store
        .transition_execution(
            id,
            &[ExecutionStatus::Pending],
            ExecutionStatus::Succeeded,
            Some(result),
            Utc::now(),
        )
        .await?;
    if !answered {
        return Err(InquiryError::Conflict(format!(
            "inquiry '{id}' was answered, canceled or expired meanwhile"
        )));
    }
    ended(engine, &exec).await;
    get(engine, id).await
}

/// After an inquiry ended: resume its workflow and let it take the outcome.
async fn ended(engine: &Engine, exec: &Execution) {
    if let Some(root) = workflow::root_workflow(engine, &exec.id).await
        && let Ok(Some(wf)) = engine.store.get_execution(&root).await
        && matches!(
            wf.status,
            ExecutionStatus::Pausing | ExecutionStatus::Paused
        )
        && let Err(e) = workflow::resume(engine, &root).await
    {
        tracing::warn!(inquiry = %exec.id, workflow = %root, error = %e, "cannot resume the inquiry's workflow");
    }
    if exec.parent_id.is_some() {
        workflow::on_child_finished(engine, &exec.id).await;
    }
    engine.emit_execution_triggers(&exec.id).await;
}

/// Times out pending inquiries past their `expires_at`.
pub async fn expire(engine: &Engine) {
    let pending = match list_pending(engine, 1000).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list pending inquiries");
            return;
        }
    };
    let now = Utc::now();
    for exec in pending {
        let expires = exec
            .result
            .get("expires_at")
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<DateTime<Utc>>().ok());
        if expires.is_none_or(|at| at > now) {
            continue;
        }
        let ttl = exec.result.get("ttl").cloned().unwrap_or(Value::Null);
        let mut result = exec.result.clone();
        if let Value::Object(map) = &mut result {
            map.insert(
                "error".into(),
                json!(format!(
                    "no answer within the inquiry's ttl of {ttl} minutes"
                )),
            );
        }
        match engine
            .store
            .transition_execution(
                &exec.id,
                &[ExecutionStatus::Pending],
                ExecutionStatus::Timeout,
                Some(result),
                now,
            )
            .await
        {
            Ok(true) => ended(engine, &exec).await,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(inquiry = %exec.id, error = %e, "cannot time out an inquiry")
            }
        }
    }
}
