//! Durable Orquesta workflows.
//!
//! A workflow execution (runner `orquesta`) holds no worker while it waits:
//! its conductor state lives in the store (`workflow_states`), each task's
//! action is an ordinary child execution (`parent_id` = the workflow), and
//! the workflow advances one step each time a child ends. A step is: lock the
//! workflow (in-process), load its state, feed every ended child not yet
//! applied to the conductor, and save the new state together with the new
//! children in one transaction (optimistic version check; retried on
//! conflict). Applied children are recorded, so a child is never applied
//! twice. After a crash the resume scan steps every running workflow of this
//! node, which picks up children that ended (or were abandoned) meanwhile.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use aviary_core::model::{Execution, ExecutionStatus};
use aviary_store::{ChildEnd, ExecutionFilter, NewExecution};
use aviary_workflow::conductor::{self, Command, Env, TaskRef, TaskStatus, WorkflowState};
use aviary_workflow::expr::KvLookup;
use aviary_workflow::spec::WorkflowSpec;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::Engine;

/// The runner type of workflow actions.
pub const WORKFLOW_RUNNER: &str = "orquesta";
/// How often running workflows are re-examined (crash recovery, missed steps).
const RESUME_EVERY: Duration = Duration::from_secs(3);
/// Most children of one workflow examined per step.
const MAX_CHILDREN: u32 = 100_000;
/// The runner whose tasks a step completes itself (nothing runs).
const INLINE_RUNNER: &str = "noop";
/// Most such tasks completed in one step (a cycle of them still yields).
const MAX_INLINE: usize = 1_000;

/// What is stored per workflow execution.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    /// The conductor's state.
    conductor: WorkflowState,
    /// Child execution id -> the task instance it runs.
    children: BTreeMap<String, TaskRef>,
    /// Children already fed to the conductor.
    #[serde(default)]
    applied: BTreeSet<String>,
    /// Final status and result, once the conductor finished (the execution
    /// may not be transitioned yet if the server stopped in between).
    #[serde(default)]
    finish: Option<(ExecutionStatus, Value)>,
    /// Secret values of the workflow's parameters: children's parameters
    /// that carry them are stored encrypted and masked. When there are any,
    /// the whole state is stored encrypted (see [`seal`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    secrets: Vec<String>,
}

/// Encodes the state for the store; encrypted when it holds secrets.
fn seal(engine: &Engine, stored: &Stored) -> Result<Value, String> {
    let value = serde_json::to_value(stored).map_err(|e| e.to_string())?;
    if stored.secrets.is_empty() {
        return Ok(value);
    }
    Ok(json!({ "sealed": engine.secret_key.encrypt(&value.to_string()) }))
}

/// [`seal`] as JSON text, without building a `Value` first.
fn seal_text(engine: &Engine, stored: &Stored) -> Result<String, String> {
    let text = serde_json::to_string(stored).map_err(|e| e.to_string())?;
    if stored.secrets.is_empty() {
        return Ok(text);
    }
    Ok(json!({ "sealed": engine.secret_key.encrypt(&text) }).to_string())
}

/// Per workflow: the stored state's version, the state, the workflow action.
type StateCache = Mutex<HashMap<String, (i64, Stored, String)>>;

/// The last state this node stored for each workflow it steps, with its
/// version: a step reads it instead of the store. A copy is only trusted
/// for its version (a save with a stale one fails and the step reloads).
fn state_cache() -> &'static StateCache {
    static CACHE: OnceLock<StateCache> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// Most workflow states kept in memory.
const MAX_CACHED_STATES: usize = 1_000;

fn take_cached(id: &str) -> Option<(i64, Stored, String)> {
    state_cache().lock().ok()?.remove(id)
}

fn put_cached(id: &str, version: i64, stored: Stored, action: &str) {
    if let Ok(mut map) = state_cache().lock() {
        if map.len() >= MAX_CACHED_STATES {
            map.clear();
        }
        map.insert(id.to_string(), (version, stored, action.to_string()));
    }
}

fn forget_cached(id: &str) {
    if let Ok(mut map) = state_cache().lock() {
        map.remove(id);
    }
}

/// Decodes [`seal`]'s output.
fn unseal(engine: &Engine, value: Value) -> Result<Stored, String> {
    if let Some(sealed) = value.get("sealed").and_then(Value::as_str) {
        let plain = engine.secret_key.decrypt(sealed).map_err(|e| {
            format!("cannot decrypt the workflow state: {e}; was the key file replaced?")
        })?;
        return serde_json::from_str(&plain).map_err(|e| e.to_string());
    }
    serde_json::from_value(value).map_err(|e| e.to_string())
}

type Locks = Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>;

fn locks() -> &'static Locks {
    static LOCKS: OnceLock<Locks> = OnceLock::new();
    LOCKS.get_or_init(Default::default)
}

/// The in-process lock serializing the steps of one workflow.
fn lock_for(id: &str) -> Arc<tokio::sync::Mutex<()>> {
    match locks().lock() {
        Ok(mut map) => map.entry(id.to_string()).or_default().clone(),
        Err(poisoned) => poisoned
            .into_inner()
            .entry(id.to_string())
            .or_default()
            .clone(),
    }
}

fn forget_lock(id: &str) {
    if let Ok(mut map) = locks().lock() {
        map.remove(id);
    }
}

fn env(kv: KvLookup<'_>) -> Env<'_> {
    Env {
        now: Utc::now(),
        kv: Some(kv),
    }
}

/// Datastore values read before a step: (key, decrypt) -> value.
type KvSnapshot = HashMap<(String, bool), Value>;

type KvRefCache = Mutex<HashMap<usize, Arc<Vec<(String, bool)>>>>;

/// The `st2kv('key')` references of a workflow (scanned once per loaded spec).
fn kv_refs(spec: &Arc<WorkflowSpec>) -> Arc<Vec<(String, bool)>> {
    static CACHE: OnceLock<KvRefCache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = Arc::as_ptr(spec) as usize;
    if let Ok(map) = cache.lock()
        && let Some(found) = map.get(&key)
    {
        return found.clone();
    }
    let text = serde_json::to_string(spec.as_ref()).unwrap_or_default();
    let refs = Arc::new(aviary_workflow::expr::kv_references(&text));
    if let Ok(mut map) = cache.lock() {
        map.insert(key, refs.clone());
    }
    refs
}

/// Reads the datastore keys a workflow refers to, for its expressions
/// (`system.key`, `user.key`, or a bare key: system, else user). Secrets
/// come decrypted only for `decrypt=true` (else as stored, encrypted); a
/// decrypted value joins the workflow's secrets (masked, stored encrypted).
async fn kv_snapshot(
    engine: &Engine,
    spec: &Arc<WorkflowSpec>,
    secrets: &mut Vec<String>,
) -> KvSnapshot {
    use aviary_core::model::KvScope;
    let refs = kv_refs(spec);
    let mut out = KvSnapshot::new();
    let now = Utc::now();
    for (key, decrypt) in refs.iter() {
        let scopes: Vec<(KvScope, &str)> = match key.split_once('.') {
            Some(("system", name)) => vec![(KvScope::System, name)],
            Some(("user", name)) => vec![(KvScope::User, name)],
            _ => vec![
                (KvScope::System, key.as_str()),
                (KvScope::User, key.as_str()),
            ],
        };
        for (scope, name) in scopes {
            let kv = match engine.store.get_kv(scope, name, now).await {
                Ok(Some(kv)) => kv,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(key = %key, error = %e, "cannot read a datastore key for a workflow");
                    break;
                }
            };
            let value = if kv.secret && *decrypt {
                match engine.secret_key.decrypt(&kv.value) {
                    Ok(plain) => {
                        if !secrets.contains(&plain) {
                            secrets.push(plain.clone());
                        }
                        plain
                    }
                    Err(e) => {
                        tracing::warn!(key = %key, error = %e, "cannot decrypt a datastore secret");
                        break;
                    }
                }
            } else {
                kv.value
            };
            out.insert((key.clone(), *decrypt), Value::String(value));
            break;
        }
    }
    out
}

fn lookup_in(snapshot: &KvSnapshot) -> impl Fn(&str, bool) -> Option<Value> + '_ {
    move |key: &str, decrypt: bool| snapshot.get(&(key.to_string(), decrypt)).cloned()
}

/// Starts a claimed (`scheduled`) workflow execution: marks it running,
/// starts its conductor and stores the state with the first children.
/// `secrets` are the plain values of its secret parameters.
pub async fn start(
    engine: &Engine,
    exec: &Execution,
    params: Map<String, Value>,
    secrets: Vec<String>,
) {
    let id = exec.id.clone();
    let lock = lock_for(&id);
    let _guard = lock.lock().await;
    let registry = engine.registry.load_full();
    let Some(spec) = registry.workflows.get(&exec.action).cloned() else {
        fail_scheduled(
            engine,
            &id,
            format!(
                "workflow action '{}' has no loaded workflow definition (packs were reloaded?)",
                exec.action
            ),
        )
        .await;
        return;
    };
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
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            tracing::error!(execution = %id, error = %e, "cannot mark workflow running");
            return;
        }
    }
    let mut secrets = secrets;
    let snapshot = kv_snapshot(engine, &spec, &mut secrets).await;
    let lookup = lookup_in(&snapshot);
    let (state, commands) = conductor::start(&spec, params, env(&lookup));
    let mut stored = Stored {
        conductor: state,
        children: BTreeMap::new(),
        applied: BTreeSet::new(),
        finish: None,
        secrets,
    };
    let mut children = run_commands(engine, &spec, &id, &mut stored, commands, &lookup);
    let value = match seal(engine, &stored) {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(execution = %id, error = %e, "cannot encode workflow state");
            return;
        }
    };
    let here = claim_here(engine, &mut children);
    match engine
        .store
        .save_workflow(&id, None, value, children.clone())
        .await
    {
        Ok(true) => hand_over(engine, children, here).await,
        Ok(false) => {
            release_here(engine, here);
            tracing::warn!(execution = %id, "workflow state already stored; not starting it again");
            return;
        }
        Err(e) => {
            release_here(engine, here);
            tracing::error!(execution = %id, error = %e, "cannot store the workflow's first step");
            return;
        }
    }
    match stored.finish.take() {
        Some((status, result)) => {
            complete(engine, &id, status, result).await;
        }
        None => put_cached(&id, 1, stored, &exec.action),
    }
}

async fn fail_scheduled(engine: &Engine, id: &str, msg: String) {
    if let Err(e) = engine
        .store
        .transition_execution(
            id,
            &[ExecutionStatus::Scheduled, ExecutionStatus::Running],
            ExecutionStatus::Failed,
            Some(json!({"error": msg})),
            Utc::now(),
        )
        .await
    {
        tracing::error!(execution = id, error = %e, "cannot record a workflow's failure");
    }
}

/// Turns conductor commands into child executions (returned, to be saved
/// with the state). Children that cannot even be created (unknown action,
/// invalid parameters) are fed back to the conductor as failed at once.
/// Tasks of runner `noop` (up to [`MAX_INLINE`] per step) have nothing to
/// run: they are created already succeeded and applied at once, so a chain
/// of them is one step, one transaction.
fn run_commands(
    engine: &Engine,
    spec: &WorkflowSpec,
    wf_id: &str,
    stored: &mut Stored,
    commands: Vec<Command>,
    kv: KvLookup<'_>,
) -> Vec<NewExecution> {
    let registry = engine.registry.load_full();
    let mut queue: std::collections::VecDeque<Command> = commands.into();
    let mut out = Vec::new();
    let mut inline_budget = MAX_INLINE;
    while let Some(cmd) = queue.pop_front() {
        match cmd {
            Command::RunAction {
                task,
                action,
                input,
                delay,
            } => {
                let now = Utc::now();
                let at =
                    now + chrono::Duration::seconds(delay.unwrap_or(0).min(86_400 * 365) as i64);
                let built = match registry.actions.get(&action) {
                    Some(meta) => engine
                        .build_execution(
                            meta,
                            input,
                            &stored.secrets,
                            format!("workflow:{wf_id}"),
                            at,
                        )
                        .map_err(|e| e.to_string()),
                    None => Err(format!(
                        "action '{action}' does not exist; see `aviary action list`"
                    )),
                };
                let inline = inline_budget > 0
                    && delay.unwrap_or(0) == 0
                    && registry
                        .actions
                        .get(&action)
                        .is_some_and(|meta| meta.runner_type == INLINE_RUNNER);
                match built {
                    Ok(mut new) if inline => {
                        // Nothing to run: it ends here, stored with the step.
                        inline_budget -= 1;
                        let result = json!({});
                        let ex = &mut new.execution;
                        ex.parent_id = Some(wf_id.to_string());
                        ex.status = ExecutionStatus::Succeeded;
                        ex.started_at = Some(now);
                        ex.finished_at = Some(now);
                        ex.result = result.clone();
                        ex.node = Some(engine.config.node.clone());
                        stored.children.insert(ex.id.clone(), task.clone());
                        stored.applied.insert(ex.id.clone());
                        out.push(new);
                        match conductor::on_action_finished(
                            spec,
                            &mut stored.conductor,
                            &task,
                            TaskStatus::Succeeded,
                            result,
                            env(kv),
                        ) {
                            Ok(more) => queue.extend(more),
                            Err(e) => {
                                tracing::error!(workflow = wf_id, error = %e, "conductor refused a task's end")
                            }
                        }
                    }
                    Ok(mut new) => {
                        new.execution.parent_id = Some(wf_id.to_string());
                        stored
                            .children
                            .insert(new.execution.id.clone(), task.clone());
                        out.push(new);
                    }
                    Err(msg) => {
                        match conductor::on_action_finished(
                            spec,
                            &mut stored.conductor,
                            &task,
                            TaskStatus::Failed,
                            json!({"error": msg}),
                            env(kv),
                        ) {
                            Ok(more) => queue.extend(more),
                            Err(e) => {
                                tracing::error!(workflow = wf_id, error = %e, "conductor refused a task failure")
                            }
                        }
                    }
                }
            }
            Command::Finish {
                status,
                output,
                errors,
            } => {
                let to = match status {
                    conductor::WorkflowStatus::Succeeded => ExecutionStatus::Succeeded,
                    conductor::WorkflowStatus::Canceled => ExecutionStatus::Canceled,
                    _ => ExecutionStatus::Failed,
                };
                let mut result = json!({ "output": output, "errors": errors });
                if to == ExecutionStatus::Failed
                    && let Some(first) = errors.first()
                {
                    result["error"] = json!(first.message);
                }

                stored.finish = Some((to, result));
            }
        }
    }
    out
}

/// Picks the new children this node starts at once, without the queue:
/// those due now (no `delay`), not CI builds (they wait for a CI slot in
/// the queue), while a worker slot is free. They are stored already
/// `running` on this node (a crash before they end makes them `abandoned`,
/// as for any running action); [`hand_over`] runs them once stored.
/// Workflows and inquiries are stored `scheduled` (their own start marks
/// them).
fn claim_here(
    engine: &Engine,
    children: &mut [NewExecution],
) -> Vec<(String, OwnedSemaphorePermit)> {
    let now = Utc::now();
    let mut here = Vec::new();
    for new in children.iter_mut() {
        let ex = &mut new.execution;
        if ex.status != ExecutionStatus::Requested
            || ex.created_at > now
            || ex.runner == super::ci::CI_BUILD
        {
            continue;
        }
        let Ok(permit) = engine.workers.clone().try_acquire_owned() else {
            break;
        };
        if ex.runner == WORKFLOW_RUNNER || ex.runner == super::inquiry::INQUIRY_RUNNER {
            ex.status = ExecutionStatus::Scheduled;
        } else {
            ex.status = ExecutionStatus::Running;
            ex.started_at = Some(now);
        }
        ex.node = Some(engine.config.node.clone());
        if ex.status == ExecutionStatus::Running
            && let Ok(mut running) = engine.running.lock()
        {
            // Before it is stored, so that a cancel always finds it.
            running.insert(ex.id.clone(), CancellationToken::new());
        }
        here.push((ex.id.clone(), permit));
    }
    here
}

/// Undoes [`claim_here`] when the step was not stored.
fn release_here(engine: &Engine, here: Vec<(String, OwnedSemaphorePermit)>) {
    if let Ok(mut running) = engine.running.lock() {
        for (id, _permit) in here {
            running.remove(&id);
        }
    }
}

/// After a step was stored: runs the children claimed here, wakes the
/// scheduler for the queued ones, and emits the action triggers of those
/// that already ended (inline tasks).
async fn hand_over(
    engine: &Engine,
    children: Vec<NewExecution>,
    here: Vec<(String, OwnedSemaphorePermit)>,
) {
    let mut here: HashMap<String, OwnedSemaphorePermit> = here.into_iter().collect();
    let mut queued = false;
    let mut ended = Vec::new();
    for new in children {
        if new.execution.status.is_terminal() {
            ended.push(new.execution.id);
        } else if let Some(permit) = here.remove(&new.execution.id) {
            engine.direct.run(new, permit);
        } else {
            queued = true;
        }
    }
    if queued {
        engine.queue_notify.notify_one();
    }
    for id in ended {
        engine.emit_execution_triggers(&id).await;
    }
}

fn task_status(status: ExecutionStatus) -> TaskStatus {
    match status {
        ExecutionStatus::Succeeded => TaskStatus::Succeeded,
        _ => TaskStatus::Failed,
    }
}

fn child_result(child: &Execution) -> Value {
    let mut result = child.result.clone();
    let reason = match child.status {
        ExecutionStatus::Timeout => Some("the action timed out"),
        ExecutionStatus::Abandoned => Some("the server stopped while the action ran"),
        ExecutionStatus::Canceled => Some("the action was canceled"),
        _ => None,
    };
    if let Some(reason) = reason {
        match &mut result {
            Value::Object(map) => {
                map.entry("error").or_insert_with(|| json!(reason));
                map.insert("status".into(), json!(child.status.as_str()));
            }
            other => {
                *other = json!({"error": reason, "status": child.status.as_str(), "result": other.clone()});
            }
        }
    }
    result
}

/// Called when an execution ended: if it is a workflow's child, steps the
/// workflow (and, when that finishes it, its own parent, and so on).
pub async fn on_child_finished(engine: &Engine, child_id: &str) {
    let mut current = child_id.to_string();
    loop {
        let parent = match engine.store.get_execution(&current).await {
            Ok(Some(e)) => e.parent_id,
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(execution = %current, error = %e, "cannot read an ended execution");
                None
            }
        };
        let Some(parent) = parent else {
            return;
        };
        match engine.store.get_execution(&parent).await {
            Ok(Some(p)) if p.runner == WORKFLOW_RUNNER => {}
            _ => return,
        }
        if !step(engine, &parent).await {
            return;
        }
        // The workflow finished: it may itself be a child.
        current = parent;
    }
}

/// Records how a workflow's task ended and steps the workflow with it, in
/// one transaction (the common case: one write per task). Returns false,
/// having written nothing, when that does not apply (the workflow is not
/// plainly running, its state changed meanwhile, the child was applied
/// already...): the caller then records the end alone and steps the
/// workflow the general way ([`on_child_finished`]).
pub async fn end_child_and_step(
    engine: &Engine,
    child: &Execution,
    from: &[ExecutionStatus],
    to: ExecutionStatus,
    result: Value,
) -> bool {
    let Some(wf_id) = child.parent_id.clone() else {
        return false;
    };
    let completed = {
        let lock = lock_for(&wf_id);
        let _guard = lock.lock().await;
        // The workflow must still be running: checked by the store in the
        // step's transaction (and here when its state is not cached).
        let (version, mut stored, action) = match take_cached(&wf_id) {
            Some(cached) => cached,
            None => {
                let Ok(Some(wf)) = engine.store.get_execution(&wf_id).await else {
                    return false;
                };
                if wf.status != ExecutionStatus::Running || wf.runner != WORKFLOW_RUNNER {
                    return false;
                }
                let Ok(Some((version, value))) = engine.store.load_workflow(&wf_id).await else {
                    return false;
                };
                let Ok(stored) = unseal(engine, value) else {
                    return false;
                };
                (version, stored, wf.action)
            }
        };
        if stored.finish.is_some() || stored.conductor.paused || stored.applied.contains(&child.id)
        {
            return false;
        }
        let Some(task) = stored.children.get(&child.id).cloned() else {
            return false;
        };
        let registry = engine.registry.load_full();
        let Some(spec) = registry.workflows.get(&action).cloned() else {
            return false;
        };
        let snapshot = kv_snapshot(engine, &spec, &mut stored.secrets).await;
        let lookup = lookup_in(&snapshot);
        let now = Utc::now();
        let ended = Execution {
            status: to,
            result: result.clone(),
            finished_at: Some(now),
            ..child.clone()
        };
        stored.applied.insert(child.id.clone());
        let commands = match conductor::on_action_finished(
            &spec,
            &mut stored.conductor,
            &task,
            task_status(to),
            child_result(&ended),
            env(&lookup),
        ) {
            Ok(commands) => commands,
            Err(_) => return false,
        };
        let mut children = run_commands(engine, &spec, &wf_id, &mut stored, commands, &lookup);
        let Ok(value) = seal_text(engine, &stored) else {
            return false;
        };
        let here = claim_here(engine, &mut children);
        let end = ChildEnd {
            id: child.id.clone(),
            from: from.to_vec(),
            to,
            result,
            at: now,
        };
        match engine
            .store
            .save_workflow_step(&wf_id, version, value, children.clone(), Some(end))
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                release_here(engine, here);
                return false;
            }
            Err(e) => {
                release_here(engine, here);
                tracing::warn!(workflow = %wf_id, child = %child.id, error = %e, "cannot store a workflow step; retrying it the general way");
                return false;
            }
        }
        hand_over(engine, children, here).await;
        match stored.finish.take() {
            Some((status, result)) => complete(engine, &wf_id, status, result).await,
            None => {
                put_cached(&wf_id, version + 1, stored, &action);
                false
            }
        }
    };
    if completed {
        // The workflow may itself be a task of another.
        on_child_finished(engine, &wf_id).await;
    }
    true
}

/// Advances a workflow with every ended child not yet applied. Returns true
/// if this call completed the workflow execution.
pub async fn step(engine: &Engine, wf_id: &str) -> bool {
    let lock = lock_for(wf_id);
    let _guard = lock.lock().await;
    forget_cached(wf_id);
    let registry = engine.registry.load_full();
    for _attempt in 0..20 {
        let wf = match engine.store.get_execution(wf_id).await {
            Ok(Some(e)) => e,
            Ok(None) => return false,
            Err(e) => {
                tracing::warn!(workflow = wf_id, error = %e, "cannot read workflow execution");
                return false;
            }
        };
        if wf.status.is_terminal() {
            forget_lock(wf_id);
            return false;
        }
        let (version, mut stored) = match engine.store.load_workflow(wf_id).await {
            Ok(Some((v, value))) => match unseal(engine, value) {
                Ok(s) => (v, s),
                Err(e) => {
                    fail_running(
                        engine,
                        wf_id,
                        format!("the stored workflow state is unreadable: {e}"),
                    )
                    .await;
                    return true;
                }
            },
            Ok(None) => {
                // Running without a stored state: the server stopped between
                // marking it running and storing its first step (they happen
                // under this lock). No child exists yet (children are stored
                // with the state), so it is safe to queue it again.
                if wf.status == ExecutionStatus::Running {
                    match engine
                        .store
                        .transition_execution(
                            wf_id,
                            &[ExecutionStatus::Running],
                            ExecutionStatus::Requested,
                            None,
                            Utc::now(),
                        )
                        .await
                    {
                        Ok(true) => engine.queue_notify.notify_one(),
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(workflow = wf_id, error = %e, "cannot requeue a workflow that never stepped")
                        }
                    }
                } else if wf.status == ExecutionStatus::Canceling {
                    complete(
                        engine,
                        wf_id,
                        ExecutionStatus::Canceled,
                        json!({"error": "canceled before its first step"}),
                    )
                    .await;
                    return true;
                }
                return false;
            }
            Err(e) => {
                tracing::warn!(workflow = wf_id, error = %e, "cannot load workflow state");
                return false;
            }
        };
        if let Some((status, result)) = stored.finish.clone() {
            return complete(engine, wf_id, status, result).await;
        }
        let Some(spec) = registry.workflows.get(&wf.action).cloned() else {
            fail_running(
                engine,
                wf_id,
                format!("workflow action '{}' is no longer loaded", wf.action),
            )
            .await;
            return true;
        };
        let kids = match children_oldest_first(engine, wf_id).await {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(workflow = wf_id, error = %e, "cannot list workflow children");
                return false;
            }
        };
        let snapshot = kv_snapshot(engine, &spec, &mut stored.secrets).await;
        let lookup = lookup_in(&snapshot);
        let mut commands = Vec::new();
        let mut changed = false;
        if wf.status == ExecutionStatus::Canceling
            && stored.conductor.status == conductor::WorkflowStatus::Running
        {
            stored.conductor.paused = false;
            commands.extend(conductor::cancel(
                &spec,
                &mut stored.conductor,
                env(&lookup),
            ));
            changed = true;
        }
        let pausing = matches!(
            wf.status,
            ExecutionStatus::Pausing | ExecutionStatus::Paused
        );
        if pausing && !stored.conductor.paused && !stored.conductor.finished {
            conductor::pause(&mut stored.conductor);
            changed = true;
        }
        for kid in &kids {
            if !kid.status.is_terminal() || stored.applied.contains(&kid.id) {
                continue;
            }
            let Some(task) = stored.children.get(&kid.id).cloned() else {
                continue;
            };
            stored.applied.insert(kid.id.clone());
            changed = true;
            match conductor::on_action_finished(
                &spec,
                &mut stored.conductor,
                &task,
                task_status(kid.status),
                child_result(kid),
                env(&lookup),
            ) {
                Ok(more) => commands.extend(more),
                Err(e) => {
                    tracing::warn!(workflow = wf_id, child = %kid.id, error = %e, "conductor ignored a child's end")
                }
            }
        }
        if wf.status == ExecutionStatus::Running && stored.conductor.paused {
            commands.extend(conductor::resume(
                &spec,
                &mut stored.conductor,
                env(&lookup),
            ));
            changed = true;
        }
        // Fully paused once nothing of it runs: every unfinished child is
        // itself paused or waits for an answer.
        let settled = wf.status == ExecutionStatus::Pausing
            && kids.iter().all(|k| {
                k.status.is_terminal()
                    || matches!(k.status, ExecutionStatus::Paused | ExecutionStatus::Pending)
            });
        if !changed {
            if settled {
                mark_paused(engine, wf_id).await;
            }
            return false;
        }
        let mut children = run_commands(engine, &spec, wf_id, &mut stored, commands, &lookup);
        let value = match seal(engine, &stored) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(workflow = wf_id, error = %e, "cannot encode workflow state");
                return false;
            }
        };
        let here = claim_here(engine, &mut children);
        match engine
            .store
            .save_workflow(wf_id, Some(version), value, children.clone())
            .await
        {
            Ok(true) => hand_over(engine, children, here).await,
            Ok(false) => {
                release_here(engine, here);
                continue;
            }
            Err(e) => {
                release_here(engine, here);
                tracing::warn!(workflow = wf_id, error = %e, "cannot save workflow step");
                return false;
            }
        }
        if let Some((status, result)) = stored.finish {
            return complete(engine, wf_id, status, result).await;
        }
        if settled {
            mark_paused(engine, wf_id).await;
        }
        put_cached(wf_id, version + 1, stored, &wf.action);
        return false;
    }
    tracing::warn!(
        workflow = wf_id,
        "workflow step kept conflicting; the resume scan will retry"
    );
    false
}

async fn fail_running(engine: &Engine, wf_id: &str, msg: String) {
    complete(
        engine,
        wf_id,
        ExecutionStatus::Failed,
        json!({"error": msg}),
    )
    .await;
}

/// Moves the workflow execution to its final status. Returns whether it changed.
async fn complete(
    engine: &Engine,
    wf_id: &str,
    mut status: ExecutionStatus,
    mut result: Value,
) -> bool {
    if status == ExecutionStatus::Canceled
        && let Ok(Some(wf)) = engine.store.get_execution(wf_id).await
        && let Some(secs) = timeout_of(&wf)
        && deadline_passed(&wf)
    {
        status = ExecutionStatus::Timeout;
        let msg = format!("the workflow ran past its timeout of {secs} s; its tasks were canceled");
        match &mut result {
            Value::Object(m) => {
                m.insert("error".into(), json!(msg));
            }
            other => *other = json!({"error": msg}),
        }
    }
    let changed = match engine
        .store
        .transition_execution(
            wf_id,
            &[
                ExecutionStatus::Running,
                ExecutionStatus::Canceling,
                ExecutionStatus::Pausing,
                ExecutionStatus::Paused,
            ],
            status,
            Some(result),
            Utc::now(),
        )
        .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(workflow = wf_id, error = %e, "cannot record the end of a workflow");
            false
        }
    };
    if changed {
        forget_lock(wf_id);
        forget_cached(wf_id);
        engine.emit_execution_triggers(wf_id).await;
    }
    changed
}

async fn mark_paused(engine: &Engine, wf_id: &str) {
    if let Err(e) = engine
        .store
        .transition_execution(
            wf_id,
            &[ExecutionStatus::Pausing],
            ExecutionStatus::Paused,
            None,
            Utc::now(),
        )
        .await
    {
        tracing::warn!(workflow = wf_id, error = %e, "cannot mark a workflow paused");
    }
}

/// Why a pause or resume request was refused.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    /// No such execution.
    #[error("no execution '{0}'; see `aviary execution list`")]
    NotFound(String),
    /// Not a workflow, or not in a state that allows it.
    #[error("{0}")]
    Conflict(String),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] aviary_store::StoreError),
}

async fn unfinished_workflow_children(
    engine: &Engine,
    wf_id: &str,
) -> Result<Vec<Execution>, aviary_store::StoreError> {
    Ok(children_oldest_first(engine, wf_id)
        .await?
        .into_iter()
        .filter(|k| k.runner == WORKFLOW_RUNNER && !k.status.is_terminal())
        .collect())
}

/// The child executions of workflow `wf_id`, oldest first.
async fn children_oldest_first(
    engine: &Engine,
    wf_id: &str,
) -> Result<Vec<Execution>, aviary_store::StoreError> {
    let filter = ExecutionFilter {
        parent_id: Some(wf_id.to_string()),
        limit: MAX_CHILDREN,
        ..Default::default()
    };
    let mut kids = engine.store.list_executions(&filter).await?;
    kids.reverse(); // the store lists newest first
    Ok(kids)
}

/// The workflow execution `id`, or why it cannot be `verb` (paused, resumed).
async fn workflow_execution(
    engine: &Engine,
    id: &str,
    verb: &str,
) -> Result<Execution, PauseError> {
    let exec = engine
        .store
        .get_execution(id)
        .await?
        .ok_or_else(|| PauseError::NotFound(id.to_string()))?;
    if exec.runner != WORKFLOW_RUNNER {
        return Err(PauseError::Conflict(format!(
            "execution '{id}' runs action '{}', not a workflow; only workflows can be {verb}",
            exec.action
        )));
    }
    Ok(exec)
}

/// Pauses a workflow and its subworkflows: running tasks may end, no new
/// task starts; it is `pausing` until nothing of it runs, then `paused`.
/// The pause is stored, so it survives a restart.
pub async fn pause(engine: &Engine, id: &str) -> Result<Execution, PauseError> {
    let exec = workflow_execution(engine, id, "paused").await?;
    match exec.status {
        ExecutionStatus::Pausing | ExecutionStatus::Paused => {}
        ExecutionStatus::Running => {
            engine
                .store
                .transition_execution(
                    id,
                    &[ExecutionStatus::Running],
                    ExecutionStatus::Pausing,
                    None,
                    Utc::now(),
                )
                .await?;
        }
        other => {
            return Err(PauseError::Conflict(format!(
                "workflow '{id}' is {}; only a running workflow can be paused",
                other.as_str()
            )));
        }
    }
    for kid in unfinished_workflow_children(engine, id).await? {
        if kid.status == ExecutionStatus::Running
            && let Err(e) = Box::pin(pause(engine, &kid.id)).await
        {
            tracing::warn!(workflow = id, child = %kid.id, error = %e, "cannot pause a subworkflow");
        }
    }
    Box::pin(on_workflow_changed(engine, id)).await;
    engine
        .store
        .get_execution(id)
        .await?
        .ok_or_else(|| PauseError::NotFound(id.to_string()))
}

/// Resumes a paused (or pausing) workflow and its paused subworkflows.
pub async fn resume(engine: &Engine, id: &str) -> Result<Execution, PauseError> {
    let exec = workflow_execution(engine, id, "resumed").await?;
    match exec.status {
        ExecutionStatus::Pausing | ExecutionStatus::Paused => {
            engine
                .store
                .transition_execution(
                    id,
                    &[ExecutionStatus::Pausing, ExecutionStatus::Paused],
                    ExecutionStatus::Running,
                    None,
                    Utc::now(),
                )
                .await?;
        }
        ExecutionStatus::Running => {}
        other => {
            return Err(PauseError::Conflict(format!(
                "workflow '{id}' is {}; only a paused workflow can be resumed",
                other.as_str()
            )));
        }
    }
    for kid in unfinished_workflow_children(engine, id).await? {
        if matches!(
            kid.status,
            ExecutionStatus::Pausing | ExecutionStatus::Paused
        ) && let Err(e) = Box::pin(resume(engine, &kid.id)).await
        {
            tracing::warn!(workflow = id, child = %kid.id, error = %e, "cannot resume a subworkflow");
        }
    }
    Box::pin(on_workflow_changed(engine, id)).await;
    engine
        .store
        .get_execution(id)
        .await?
        .ok_or_else(|| PauseError::NotFound(id.to_string()))
}

/// Re-runs a finished workflow from the given tasks: a new workflow
/// execution (same action and input) whose state starts from the
/// original's, keeping its finished tasks' results and context, and runs
/// the named tasks again and what follows them. Returns the new execution.
/// `no_reset` names with-items tasks among `tasks` whose items that
/// succeeded are kept (StackStorm's `--no-reset`): only their other items
/// run again.
pub async fn rerun(
    engine: &Engine,
    id: &str,
    tasks: &[String],
    no_reset: &[String],
    requested_by: &str,
) -> Result<Execution, PauseError> {
    let exec = workflow_execution(engine, id, "re-run from tasks").await?;
    if !exec.status.is_terminal() {
        return Err(PauseError::Conflict(format!(
            "workflow '{id}' is {}; only a finished workflow can be re-run",
            exec.status.as_str()
        )));
    }
    let original = match engine.store.load_workflow(id).await? {
        Some((_, value)) => unseal(engine, value).map_err(PauseError::Conflict)?,
        None => {
            return Err(PauseError::Conflict(format!(
                "workflow '{id}' has no stored state (it never started a task); run it again instead"
            )));
        }
    };
    let registry = engine.registry.load_full();
    let (Some(spec), Some(meta)) = (
        registry.workflows.get(&exec.action).cloned(),
        registry.actions.get(&exec.action).cloned(),
    ) else {
        return Err(PauseError::Conflict(format!(
            "workflow action '{}' is no longer loaded",
            exec.action
        )));
    };
    let mut secrets = original.secrets.clone();
    let snapshot = kv_snapshot(engine, &spec, &mut secrets).await;
    let lookup = lookup_in(&snapshot);
    let mut kept: BTreeMap<String, BTreeMap<usize, Value>> = BTreeMap::new();
    if !no_reset.is_empty() {
        // Oldest first: a later run of an item wins.
        let kids = children_oldest_first(engine, id).await?;
        for name in no_reset {
            let items = kept.entry(name.clone()).or_default();
            for kid in &kids {
                let Some(task) = original.children.get(&kid.id) else {
                    continue;
                };
                let Some(item) = task.item.filter(|_| &task.id == name) else {
                    continue;
                };
                if kid.status == ExecutionStatus::Succeeded {
                    items.insert(item, kid.result.clone());
                } else {
                    items.remove(&item);
                }
            }
        }
    }
    let (state, commands) =
        conductor::rerun_keeping(&spec, &original.conductor, tasks, &kept, env(&lookup))
            .map_err(|e| PauseError::Conflict(format!("cannot re-run workflow '{id}': {e}")))?;
    let now = Utc::now();
    let mut new = engine
        .build_execution(
            &meta,
            original.conductor.input.clone(),
            &[],
            requested_by.to_string(),
            now,
        )
        .map_err(|e| PauseError::Conflict(format!("cannot re-run workflow '{id}': {e}")))?;
    // It starts running at once, from the prepared state (the scheduler
    // never claims it).
    new.execution.status = ExecutionStatus::Running;
    new.execution.started_at = Some(now);
    new.execution.node = Some(engine.config.node.clone());
    let new_id = new.execution.id.clone();
    let mut stored = Stored {
        conductor: state,
        children: BTreeMap::new(),
        applied: BTreeSet::new(),
        finish: None,
        secrets,
    };
    let children = run_commands(engine, &spec, &new_id, &mut stored, commands, &lookup);
    let value = seal(engine, &stored).map_err(PauseError::Conflict)?;
    {
        let lock = lock_for(&new_id);
        let _guard = lock.lock().await;
        engine.store.create_execution(new).await?;
        engine
            .store
            .save_workflow(&new_id, None, value, children.clone())
            .await?;
        hand_over(engine, children, Vec::new()).await;
    }
    if let Some((status, result)) = stored.finish {
        complete(engine, &new_id, status, result).await;
    }
    engine
        .store
        .get_execution(&new_id)
        .await?
        .ok_or_else(|| PauseError::NotFound(new_id.clone()))
}

/// The outermost workflow an execution belongs to (itself if none).
pub async fn root_workflow(engine: &Engine, id: &str) -> Option<String> {
    let mut current = engine.store.get_execution(id).await.ok().flatten()?;
    let mut root = None;
    while let Some(parent) = current.parent_id.clone() {
        let Ok(Some(p)) = engine.store.get_execution(&parent).await else {
            break;
        };
        if p.runner != WORKFLOW_RUNNER {
            break;
        }
        root = Some(p.id.clone());
        current = p;
    }
    root
}

/// Cancels the non-terminal children of a workflow being canceled, then
/// steps it (it ends as canceled once no child runs).
pub async fn cancel_children(engine: &Engine, wf_id: &str) {
    match children_oldest_first(engine, wf_id).await {
        Ok(kids) => {
            for kid in kids.into_iter().filter(|k| !k.status.is_terminal()) {
                if let Err(e) = Box::pin(engine.cancel(&kid.id)).await {
                    tracing::warn!(workflow = wf_id, child = %kid.id, error = %e, "cannot cancel a workflow child");
                }
            }
        }
        Err(e) => tracing::warn!(workflow = wf_id, error = %e, "cannot list workflow children"),
    }
    Box::pin(on_workflow_changed(engine, wf_id)).await;
}

/// Steps a workflow and, if that completed it, its parents.
async fn on_workflow_changed(engine: &Engine, wf_id: &str) {
    if step(engine, wf_id).await {
        on_child_finished(engine, wf_id).await;
    }
}

/// The workflow's `timeout` parameter (seconds), if set.
fn timeout_of(wf: &Execution) -> Option<i64> {
    wf.parameters
        .get("timeout")
        .and_then(Value::as_i64)
        .filter(|t| *t > 0)
}

fn deadline_passed(wf: &Execution) -> bool {
    match (timeout_of(wf), wf.started_at) {
        (Some(secs), Some(started)) => Utc::now() >= started + chrono::Duration::seconds(secs),
        _ => false,
    }
}

/// Stops a workflow that ran past its `timeout`: it is canceled (running
/// tasks and subworkflows too) and ends as `timeout`.
async fn enforce_timeout(engine: &Engine, wf_id: &str) {
    let Ok(Some(wf)) = engine.store.get_execution(wf_id).await else {
        return;
    };
    if matches!(
        wf.status,
        ExecutionStatus::Running | ExecutionStatus::Pausing | ExecutionStatus::Paused
    ) && deadline_passed(&wf)
    {
        tracing::info!(
            workflow = wf_id,
            "workflow ran past its timeout; canceling it"
        );
        if let Err(e) = Box::pin(engine.cancel(wf_id)).await {
            tracing::warn!(workflow = wf_id, error = %e, "cannot stop a timed-out workflow");
        }
    }
}

/// Steps every running workflow of this node now and then every few
/// seconds, until `shutdown`: resumes workflows after a crash and catches
/// any step missed.
pub async fn run_resume(engine: Arc<Engine>, shutdown: CancellationToken) {
    loop {
        super::inquiry::expire(&engine).await;
        match engine
            .store
            .list_running_workflows(Some(&engine.config.node))
            .await
        {
            Ok(ids) => {
                for id in ids {
                    if shutdown.is_cancelled() {
                        return;
                    }
                    enforce_timeout(&engine, &id).await;
                    on_workflow_changed(&engine, &id).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list running workflows"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(RESUME_EVERY) => {}
        }
    }
}

/// The task tree of a workflow execution: one node per task instance
/// (task, route, status, times, published values, the child executions
/// that ran it), subworkflows nested under their task. Secret values of
/// the workflow's parameters are masked.
pub async fn task_tree(engine: &Engine, id: &str) -> Result<Value, PauseError> {
    let exec = engine
        .store
        .get_execution(id)
        .await?
        .ok_or_else(|| PauseError::NotFound(id.to_string()))?;
    if exec.runner != WORKFLOW_RUNNER {
        return Err(PauseError::Conflict(format!(
            "execution '{id}' runs action '{}', not a workflow; it has no tasks",
            exec.action
        )));
    }
    Ok(Box::pin(tree_of(engine, &exec, 0)).await)
}

fn mask(value: &Value, secrets: &[String]) -> Value {
    match value {
        Value::String(s) => {
            let mut out = s.clone();
            for secret in secrets.iter().filter(|x| !x.is_empty()) {
                out = out.replace(secret.as_str(), "********");
            }
            Value::String(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(|v| mask(v, secrets)).collect()),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), mask(v, secrets)))
                .collect(),
        ),
        other => other.clone(),
    }
}

fn spec_has_task(engine: &Engine, action: &str, task: &str) -> bool {
    engine
        .registry
        .load()
        .workflows
        .get(action)
        .is_some_and(|spec| spec.tasks.contains_key(task))
}

async fn tree_of(engine: &Engine, wf: &Execution, depth: usize) -> Value {
    let stored = match engine.store.load_workflow(&wf.id).await {
        Ok(Some((_, value))) => unseal(engine, value).ok(),
        _ => None,
    };
    let Some(stored) = stored else {
        return json!({"id": wf.id, "action": wf.action, "status": wf.status, "tasks": []});
    };
    let kids = children_oldest_first(engine, &wf.id)
        .await
        .unwrap_or_default();
    // Each child goes to the first entry of its task instance that was
    // still open when the child was created (cycles make several entries).
    let seq = &stored.conductor.sequence;
    let mut assigned: Vec<Vec<&Execution>> = vec![Vec::new(); seq.len()];
    for k in &kids {
        let Some(t) = stored.children.get(&k.id) else {
            continue;
        };
        let slot = seq.iter().position(|e| {
            e.id == t.id && e.route == t.route && e.finished_at.is_none_or(|f| k.created_at <= f)
        });
        if let Some(i) = slot {
            assigned[i].push(k);
        }
    }
    let mut tasks = Vec::new();
    for (entry, mine) in seq.iter().zip(assigned) {
        // The implicit `continue` of transitions without `do` is noise here.
        if entry.id == "continue" && !spec_has_task(engine, &wf.action, "continue") {
            continue;
        }
        let mut executions = Vec::new();
        for k in &mine {
            let mut node = json!({
                "id": k.id,
                "action": k.action,
                "status": k.status,
                "item": stored.children.get(&k.id).and_then(|t| t.item),
                "started_at": k.started_at,
                "finished_at": k.finished_at,
            });
            if k.runner == WORKFLOW_RUNNER && depth < 8 {
                node["workflow"] = Box::pin(tree_of(engine, k, depth + 1)).await;
            }
            executions.push(node);
        }
        // Times of the actions that ran the task (the entry's own times
        // for tasks without an action).
        let started = mine
            .iter()
            .filter_map(|k| k.started_at)
            .min()
            .unwrap_or(entry.started_at);
        let finished = if mine.is_empty() {
            entry.finished_at
        } else if mine.iter().all(|k| k.finished_at.is_some()) {
            mine.iter().filter_map(|k| k.finished_at).max()
        } else {
            None
        };
        let duration = finished.map(|f| (f - started).num_milliseconds() as f64 / 1000.0);
        tasks.push(json!({
            "task": entry.id,
            "route": entry.route,
            "status": entry.status.as_str(),
            "started_at": started,
            "finished_at": finished,
            "duration": duration,
            "published": mask(&Value::Object(entry.published.clone()), &stored.secrets),
            "executions": executions,
        }));
    }
    json!({
        "id": wf.id,
        "action": wf.action,
        "status": wf.status,
        "paused": stored.conductor.paused,
        "tasks": tasks,
    })
}
