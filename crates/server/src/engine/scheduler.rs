//! The worker pool: claims requested executions from the durable queue and
//! runs them, at most `workers` at a time. Because the queue lives in the
//! store, nothing requested is lost when the server dies; what was running
//! then is marked abandoned at the next start (never silently re-run).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aviary_core::action::ActionMeta;
use aviary_core::model::{Execution, ExecutionStatus};
use aviary_runners::{RunRequest, run};
use aviary_store::NewExecution;
use chrono::Utc;
use serde_json::{Map, Value, json};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;

use super::Engine;
use super::output::{LiveEvent, pump};

/// How often the queue is polled when nothing wakes the scheduler (other
/// servers sharing a PostgreSQL queue, executions requested elsewhere).
const POLL_EVERY: Duration = Duration::from_millis(500);
/// Largest batch claimed at once.
const MAX_CLAIM: usize = 256;

/// Executions started on this node without going through the queue: a
/// workflow step stores its next tasks as `scheduled` here when a worker
/// slot is free, and hands them over with that slot.
pub struct DirectQueue {
    tx: mpsc::UnboundedSender<(NewExecution, OwnedSemaphorePermit)>,
    rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<(NewExecution, OwnedSemaphorePermit)>>>,
}

impl Default for DirectQueue {
    fn default() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            tx,
            rx: std::sync::Mutex::new(Some(rx)),
        }
    }
}

impl DirectQueue {
    /// Runs `new` (stored as `scheduled` on this node) in the slot `permit`.
    /// Without a running scheduler it stays scheduled; the node's next start
    /// puts it back in the queue.
    pub fn run(&self, new: NewExecution, permit: OwnedSemaphorePermit) {
        if self.tx.send((new, permit)).is_err() {
            tracing::warn!("the scheduler has stopped; an execution stays scheduled");
        }
    }
}

/// Runs what is handed to [`DirectQueue`] until `shutdown`.
async fn run_direct(engine: Arc<Engine>, shutdown: CancellationToken) {
    let taken = engine.direct.rx.lock().ok().and_then(|mut rx| rx.take());
    let Some(mut rx) = taken else {
        return;
    };
    loop {
        let (new, permit) = tokio::select! {
            _ = shutdown.cancelled() => return,
            next = rx.recv() => match next {
                Some(next) => next,
                None => return,
            },
        };
        let engine = engine.clone();
        tokio::spawn(async move {
            run_one(&engine, new).await;
            drop(permit);
        });
    }
}

/// Runs the scheduler until `shutdown` fires.
///
/// It waits for a free worker, claims as many requested executions as there
/// are free workers, and starts them. When the queue is empty it sleeps until
/// an execution is requested (or a poll interval passes, for executions
/// requested by other servers sharing the database).
pub async fn run_scheduler(engine: Arc<Engine>, shutdown: CancellationToken) {
    tokio::spawn(super::workflow::run_resume(
        engine.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(run_direct(engine.clone(), shutdown.clone()));
    let permits = engine.workers.clone();
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let want = (1 + permits.available_permits()).min(MAX_CLAIM);
        let batch = match engine
            .store
            .claim_executions(&engine.config.node, want as u32)
            .await
        {
            Ok(batch) => batch,
            Err(e) => {
                tracing::error!(error = %e, "cannot claim executions from the queue");
                drop(first);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
        };
        if batch.is_empty() {
            drop(first);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = engine.queue_notify.notified() => {}
                _ = tokio::time::sleep(POLL_EVERY) => {}
            }
            continue;
        }
        let mut first = Some(first);
        for new in batch {
            let permit = match first.take() {
                Some(p) => p,
                None => match permits.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let engine = engine.clone();
            if new.execution.runner == super::ci::CI_BUILD
                && let Some(slots) = engine.ci.slots.clone()
            {
                // A CI build waits for a CI slot in the queue (still
                // `scheduled`), holding no worker meanwhile.
                drop(permit);
                let permits = permits.clone();
                tokio::spawn(async move {
                    if new.execution.parameters.get("cancel_previous") != Some(&Value::Bool(false))
                        && let Some(params) = new.execution.parameters.as_object()
                    {
                        engine
                            .cancel_superseded_builds(&new.execution, params)
                            .await;
                    }
                    let Ok(slot) = slots.acquire_owned().await else {
                        return;
                    };
                    let Ok(permit) = permits.acquire_owned().await else {
                        return;
                    };
                    run_one(&engine, new).await;
                    drop(permit);
                    drop(slot);
                });
                continue;
            }
            tokio::spawn(async move {
                run_one(&engine, new).await;
                drop(permit);
            });
        }
    }
}

/// Records how `exec` ended. A workflow's task is recorded together with
/// the workflow step that applies it when possible; returns whether that
/// step was done here.
async fn finish(
    engine: &Engine,
    exec: &Execution,
    from: &[ExecutionStatus],
    to: ExecutionStatus,
    result: Value,
) -> bool {
    if exec.parent_id.is_some()
        && exec.runner != super::workflow::WORKFLOW_RUNNER
        && super::workflow::end_child_and_step(engine, exec, from, to, result.clone()).await
    {
        return true;
    }
    if let Err(e) = engine
        .store
        .transition_execution(&exec.id, from, to, Some(result), Utc::now())
        .await
    {
        tracing::error!(execution = %exec.id, error = %e, "cannot record the end of an execution");
    }
    false
}

/// Runs one claimed execution to its end and records the outcome; if it is
/// a workflow's child, steps the workflow.
async fn run_one(engine: &Engine, new: NewExecution) {
    let id = new.execution.id.clone();
    let child = new.execution.parent_id.is_some()
        && new.execution.runner != super::workflow::WORKFLOW_RUNNER;
    let stepped = run_one_inner(engine, new).await;
    if child && !stepped {
        super::workflow::on_child_finished(engine, &id).await;
    }
}

/// Makes `cancel` the token that cancels execution `id` here.
fn register(engine: &Engine, id: &str, cancel: &CancellationToken) {
    if let Ok(mut running) = engine.running.lock() {
        running.insert(id.to_string(), cancel.clone());
    }
}

fn unregister(engine: &Engine, id: &str) {
    if let Ok(mut running) = engine.running.lock() {
        running.remove(id);
    }
}

/// Runs one execution; returns whether its end already stepped its
/// workflow (see [`finish`]).
async fn run_one_inner(engine: &Engine, new: NewExecution) -> bool {
    let exec = new.execution;
    let id = exec.id.clone();
    let registry = engine.registry.load_full();
    let Some(action) = registry.actions.get(&exec.action).cloned() else {
        return finish(
            engine,
            &exec,
            &[ExecutionStatus::Scheduled, ExecutionStatus::Running],
            ExecutionStatus::Failed,
            json!({"error": format!("action '{}' no longer exists (packs were reloaded)", exec.action)}),
        )
        .await;
    };
    let (params, secrets) = match merge_secrets(engine, &exec, new.secrets.as_deref()) {
        Ok(v) => v,
        Err(msg) => {
            return finish(
                engine,
                &exec,
                &[ExecutionStatus::Scheduled, ExecutionStatus::Running],
                ExecutionStatus::Failed,
                json!({"error": msg}),
            )
            .await;
        }
    };
    if exec.runner == super::workflow::WORKFLOW_RUNNER {
        // Holds no worker: the workflow advances as its children end.
        super::workflow::start(engine, &exec, params, secrets).await;
        return false;
    }
    if exec.runner == super::inquiry::INQUIRY_RUNNER {
        // Holds no worker either: it waits for an answer.
        super::inquiry::open(engine, &exec, params).await;
        return false;
    }
    // A task a workflow step stored `running` here had its cancel token
    // registered before it was stored, so a cancel since then fired it.
    let registered = engine
        .running
        .lock()
        .ok()
        .and_then(|running| running.get(&id).cloned());
    let preregistered = registered.is_some();
    let cancel = registered.unwrap_or_default();
    if exec.status != ExecutionStatus::Running {
        match engine
            .store
            .transition_execution(
                &id,
                &[ExecutionStatus::Scheduled],
                ExecutionStatus::Running,
                None,
                Utc::now(),
            )
            .await
        {
            Ok(true) => {
                if exec.runner == "ci-build"
                    && params.get("cancel_previous").and_then(Value::as_bool) != Some(false)
                {
                    engine.cancel_superseded_builds(&exec, &params).await;
                }
            }
            Ok(false) => return false, // canceled meanwhile
            Err(e) => {
                tracing::error!(execution = %id, error = %e, "cannot mark execution running");
                return false;
            }
        }
    }
    if !preregistered {
        register(engine, &id, &cancel);
    }

    // In-process runners: no process, no output stream.
    let in_process = match exec.runner.as_str() {
        "noop" => Some((ExecutionStatus::Succeeded, json!({}))),
        "inject-trigger" => Some(inject_trigger(engine, &exec, &params).await),
        _ => None,
    };
    if let Some((status, result)) = in_process {
        let stepped = finish(
            engine,
            &exec,
            &[ExecutionStatus::Running, ExecutionStatus::Canceling],
            status,
            result,
        )
        .await;
        unregister(engine, &id);
        engine.emit_execution_triggers(&id).await;
        return stepped;
    }

    engine.output.open(&id);
    engine
        .output
        .send(&id, LiveEvent::Status(ExecutionStatus::Running));
    if exec.runner == crate::deploy::DEPLOY_RUNNER {
        let (tx, rx) = mpsc::unbounded_channel();
        let pump_task = tokio::spawn(pump(
            engine.store.clone(),
            engine.output.clone(),
            id.clone(),
            rx,
        ));
        let (status, result) =
            crate::deploy::run::run(engine, &exec, &params, tx, cancel.clone()).await;
        let _ = pump_task.await;
        let status = if cancel.is_cancelled() {
            ExecutionStatus::Canceled
        } else {
            status
        };
        let stepped = finish(
            engine,
            &exec,
            &[ExecutionStatus::Running, ExecutionStatus::Canceling],
            status,
            result,
        )
        .await;
        engine.output.send(&id, LiveEvent::Status(status));
        unregister(engine, &id);
        engine.output.close(&id);
        engine.emit_execution_triggers(&id).await;
        return stepped;
    }
    let work_dir = engine.config.data_dir.join("work").join(&id);
    // A token valid while the action runs, so it can call the API (emit
    // triggers, read keys); derived from the server's key, nothing stored.
    let action_token = crate::auth::execution_token(&engine.secret_key, &id);
    let prepared = prepare_request(
        engine,
        &registry.pack_dirs,
        &action,
        &exec,
        params,
        secrets,
        &work_dir,
    )
    .map(|mut req| {
        req.extra_env
            .push(("AVIARY_API_TOKEN".into(), action_token.clone()));
        req.extra_env
            .push(("ST2_ACTION_AUTH_TOKEN".into(), action_token.clone()));
        req.secrets.push(action_token.clone());
        req
    });
    let mut stepped = false;
    let outcome = match prepared {
        Ok(req) => {
            let (tx, rx) = mpsc::unbounded_channel();
            let pump_task = tokio::spawn(pump(
                engine.store.clone(),
                engine.output.clone(),
                id.clone(),
                rx,
            ));
            let outcome = if super::ci::runs_in_server(&req.runner_type) {
                super::ci::run(engine, req, tx, cancel.clone()).await
            } else {
                run(req, tx, cancel.clone()).await
            };
            let _ = pump_task.await;
            Some(outcome)
        }
        Err(msg) => {
            stepped = finish(
                engine,
                &exec,
                &[ExecutionStatus::Running, ExecutionStatus::Canceling],
                ExecutionStatus::Failed,
                json!({"error": msg}),
            )
            .await;
            None
        }
    };
    if let Some(outcome) = outcome {
        let status = if cancel.is_cancelled() {
            ExecutionStatus::Canceled
        } else {
            outcome.status
        };
        stepped = finish(
            engine,
            &exec,
            &[ExecutionStatus::Running, ExecutionStatus::Canceling],
            status,
            outcome.result,
        )
        .await;
        engine.output.send(&id, LiveEvent::Status(status));
    }
    unregister(engine, &id);
    engine.output.close(&id);
    // The work directory goes once the end is recorded (off the path to
    // the next task); what a crash leaves is removed at the next start.
    tokio::task::spawn_blocking(move || {
        let _ = std::fs::remove_dir_all(&work_dir);
    });
    engine.emit_execution_triggers(&id).await;
    stepped
}

/// `core.inject_trigger`: stores an event for rules to match.
async fn inject_trigger(
    engine: &Engine,
    exec: &Execution,
    params: &Map<String, Value>,
) -> (ExecutionStatus, Value) {
    let Some(trigger) = params.get("trigger").and_then(Value::as_str) else {
        return (
            ExecutionStatus::Failed,
            json!({"error": "parameter 'trigger' must be a trigger reference like pack.name"}),
        );
    };
    let payload = params.get("payload").cloned().unwrap_or_else(|| json!({}));
    let event = super::Event {
        trigger: trigger.to_string(),
        payload,
        dedup_key: Some(format!("inject:{}", exec.id)),
        webhook_url: None,
        only_rule: None,
    };
    match engine.ingest(event).await {
        Ok(r) => (
            ExecutionStatus::Succeeded,
            json!({"trigger_instance_id": r.trigger_instance_id, "executions": r.executions}),
        ),
        Err(e) => (
            ExecutionStatus::Failed,
            json!({"error": format!("cannot store the event: {e}")}),
        ),
    }
}

/// Puts the real secret values back into the parameters.
fn merge_secrets(
    engine: &Engine,
    exec: &Execution,
    blob: Option<&str>,
) -> Result<(Map<String, Value>, Vec<String>), String> {
    let mut params = exec.parameters.as_object().cloned().unwrap_or_default();
    let mut secrets = Vec::new();
    if let Some(blob) = blob {
        let plain = engine.secret_key.decrypt(blob).map_err(|e| {
            format!(
                "cannot decrypt the execution's secret parameters: {e}; was the key file replaced?"
            )
        })?;
        let parsed: Value =
            serde_json::from_str(&plain).map_err(|e| format!("corrupt secret parameters: {e}"))?;
        if let Some(map) = parsed.get("parameters").and_then(Value::as_object) {
            for (k, v) in map {
                secrets.push(match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                });
                // Every value inside an object or array secret too.
                secret_leaves(v, &mut secrets);
                params.insert(k.clone(), v.clone());
            }
        }
        if let Some(list) = parsed.get("mask").and_then(Value::as_array) {
            secrets.extend(list.iter().filter_map(|v| v.as_str().map(String::from)));
        }
    }
    secrets.retain(|s| !s.is_empty());
    Ok((params, secrets))
}

/// The scalar values inside a secret object or array (masked one by one).
fn secret_leaves(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => m.values().for_each(|v| leaf(v, out)),
        Value::Array(a) => a.iter().for_each(|v| leaf(v, out)),
        _ => {}
    }
    fn leaf(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) => out.push(s.clone()),
            Value::Number(_) => out.push(v.to_string()),
            Value::Null | Value::Bool(_) => {}
            _ => secret_leaves(v, out),
        }
    }
}

fn prepare_request(
    engine: &Engine,
    pack_dirs: &std::collections::HashMap<String, PathBuf>,
    action: &ActionMeta,
    exec: &Execution,
    params: Map<String, Value>,
    secrets: Vec<String>,
    work_dir: &Path,
) -> Result<RunRequest, String> {
    let entry_point = match &action.entry_point {
        Some(ep) if !ep.is_empty() => Some(resolve_entry_point(pack_dirs, action, ep)?),
        _ => None,
    };
    std::fs::create_dir_all(work_dir)
        .map_err(|e| format!("cannot create work dir {}: {e}", work_dir.display()))?;
    let runner_param_names: Vec<String> =
        aviary_core::runner_types::runner_parameters(&action.runner_type)
            .map(|s| s.0.into_iter().map(|(n, _)| n).collect())
            .unwrap_or_default();
    let positions = action
        .parameters
        .0
        .iter()
        .filter_map(|(name, spec)| spec.position.map(|p| (name.clone(), p)))
        .collect();
    Ok(RunRequest {
        execution_id: exec.id.clone(),
        action_ref: exec.action.clone(),
        runner_type: action.runner_type.clone(),
        entry_point,
        parameters: params,
        runner_param_names,
        positions,
        secrets,
        timeout: Duration::from_secs(exec.timeout_secs.max(1)),
        work_dir: work_dir.to_path_buf(),
        extra_env: vec![
            ("AVIARY_EXECUTION_ID".into(), exec.id.clone()),
            ("AVIARY_ACTION".into(), exec.action.clone()),
            ("AVIARY_API_URL".into(), engine.config.public_url.clone()),
        ],
    })
}

/// An entry point is a path relative to the pack's `actions/` folder and
/// must stay inside the pack.
fn resolve_entry_point(
    pack_dirs: &std::collections::HashMap<String, PathBuf>,
    action: &ActionMeta,
    entry_point: &str,
) -> Result<PathBuf, String> {
    let dir = pack_dirs.get(&action.pack).ok_or_else(|| {
        format!(
            "pack '{}' has no folder for entry point '{entry_point}'",
            action.pack
        )
    })?;
    let root = dir
        .canonicalize()
        .map_err(|e| format!("pack folder {}: {e}", dir.display()))?;
    let path = dir
        .join("actions")
        .join(entry_point)
        .canonicalize()
        .map_err(|e| format!("entry point '{entry_point}' of {}: {e}", action.reference()))?;
    if !path.starts_with(&root) {
        return Err(format!(
            "entry point '{entry_point}' of {} resolves outside its pack; refusing to run it",
            action.reference()
        ));
    }
    Ok(path)
}
