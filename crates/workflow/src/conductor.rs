//! The workflow conductor: Orquesta's state machine as pure functions.
//!
//! [`start`] builds a [`WorkflowState`] and the first [`Command`]s;
//! [`on_action_finished`] (and optionally [`on_action_started`]) feed an
//! action's outcome back and return the next commands. The state is plain
//! serde data: a caller may store it between events and load it again. No
//! clock is read (time comes in through [`Env`]) and nothing runs here.
//!
//! Semantics follow Orquesta's conductor: transitions are evaluated in
//! order; each `next` whose `when` holds publishes (later keys see earlier
//! ones) and stages its `do` tasks; `join` barriers wait for their inbound
//! transitions; a task reached by more than one transition (and not a join)
//! runs once per path, each path being a *route*; with-items tasks run one
//! action per item, at most `concurrency` at once, their result being the
//! list of item results; `retry` re-runs a task; tasks in a cycle get a new
//! entry in the sequence each time. Engine commands: `continue` (the
//! default, does not handle a failure), `noop` (handles a failure), `fail`
//! (fails the workflow). A failed task whose transitions lead nowhere but
//! `continue` fails the workflow. The output is rendered at the end, on
//! failure too.

use crate::expr::{self, CurrentTask, KvLookup, Scope};
use crate::spec::{ENGINE_COMMANDS, Join, TaskSpec, WorkflowSpec};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// What the conductor needs from the outside world for one step.
#[derive(Clone, Copy)]
pub struct Env<'a> {
    /// The current time (recorded in task entries).
    pub now: DateTime<Utc>,
    /// Datastore lookup for `st2kv(...)`.
    pub kv: Option<KvLookup<'a>>,
}

impl std::fmt::Debug for Env<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env")
            .field("now", &self.now)
            .finish_non_exhaustive()
    }
}

/// Workflow status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkflowStatus {
    /// Tasks are running or about to.
    Running,
    /// Finished well.
    Succeeded,
    /// Finished badly.
    Failed,
    /// Stopped on request.
    Canceled,
}

impl WorkflowStatus {
    /// Orquesta's name for the status.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
        }
    }

    /// True once the workflow can no longer change.
    pub fn is_completed(self) -> bool {
        !matches!(self, Self::Running)
    }
}

/// Status of a task (or of an action, reported back).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    /// The action is running.
    Running,
    /// Failed and about to run again.
    Retrying,
    /// Finished well.
    Succeeded,
    /// Finished badly.
    Failed,
    /// Ran out of time.
    Expired,
    /// Lost (its runner went away).
    Abandoned,
    /// Canceled.
    Canceled,
}

impl TaskStatus {
    /// Orquesta's name for the status.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Retrying => "retrying",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Expired => "expired",
            Self::Abandoned => "abandoned",
            Self::Canceled => "canceled",
        }
    }

    /// Succeeded, failed, expired, abandoned or canceled.
    pub fn is_completed(self) -> bool {
        !matches!(self, Self::Running | Self::Retrying)
    }

    /// Failed, expired, abandoned (and canceled): a failure to handle.
    pub fn is_abended(self) -> bool {
        matches!(
            self,
            Self::Failed | Self::Expired | Self::Abandoned | Self::Canceled
        )
    }

    /// Parses Orquesta's name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "running" => Self::Running,
            "retrying" => Self::Retrying,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "expired" | "timeout" => Self::Expired,
            "abandoned" => Self::Abandoned,
            "canceled" => Self::Canceled,
            _ => return None,
        })
    }
}

/// Which task instance an action belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRef {
    /// Task name.
    pub id: String,
    /// Route (0 unless the task is reached on several paths).
    pub route: usize,
    /// Item index for with-items tasks.
    pub item: Option<usize>,
}

/// What the caller must do next.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Run an action, after `delay` seconds if given, and report its end
    /// with [`on_action_finished`].
    RunAction {
        /// The task instance (and item).
        task: TaskRef,
        /// Action reference (`core.echo`).
        action: String,
        /// Rendered action input.
        input: Map<String, Value>,
        /// Seconds to wait before running.
        delay: Option<u64>,
    },
    /// The workflow is done.
    Finish {
        /// Final status.
        status: WorkflowStatus,
        /// Rendered output (`None` if the workflow has no output).
        output: Option<Map<String, Value>>,
        /// Every error logged.
        errors: Vec<WorkflowError>,
    },
}

/// An error logged during the run (Orquesta's `errors` entries).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkflowError {
    /// Always `error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// What happened.
    pub message: String,
    /// The task concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// Its route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<usize>,
    /// The transition concerned (`task2__t0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_transition_id: Option<String>,
    /// The failed action's result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
}

/// Retry bookkeeping for one task entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryState {
    /// Condition (`None`: retry on failure).
    pub when: Option<String>,
    /// Retries allowed.
    pub count: u64,
    /// Seconds between retries.
    pub delay: u64,
    /// Retries done.
    pub tally: u64,
}

/// One task instance in the sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskEntry {
    /// Task name (or engine command).
    pub id: String,
    /// Route index into [`WorkflowState::routes`].
    pub route: usize,
    /// Context indexes merged to make the task's context.
    pub ctxs: Vec<usize>,
    /// Inbound transitions (`task1__t0`) to the sequence index of their source.
    pub prev: BTreeMap<String, usize>,
    /// Outbound transitions evaluated (`task2__t0`) and whether they held.
    pub next: BTreeMap<String, bool>,
    /// Status.
    pub status: TaskStatus,
    /// Retry state, if the task has a retry policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryState>,
    /// True if the task ended a path of the workflow.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub term: bool,
    /// When the entry was created.
    pub started_at: DateTime<Utc>,
    /// When it completed.
    pub finished_at: Option<DateTime<Utc>>,
    /// Values its transitions published.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub published: Map<String, Value>,
}

/// Progress of one item of a with-items task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemState {
    /// `None` until dispatched.
    pub status: Option<TaskStatus>,
    /// The item's action result.
    pub result: Value,
}

/// A task waiting to run (or, for with-items, running some items).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StagedTask {
    /// Task name.
    pub id: String,
    /// Route.
    pub route: usize,
    /// Context indexes for the task's context.
    pub ctxs: Vec<usize>,
    /// Inbound transitions.
    pub prev: BTreeMap<String, usize>,
    /// True when its inbound criteria (join) are met.
    pub ready: bool,
    /// True once its action (or items) were handed out.
    pub dispatched: bool,
    /// Retry delay to apply to the next run.
    pub retry_delay: Option<u64>,
    /// With-items progress (`None` until the items are rendered).
    pub items: Option<Vec<ItemState>>,
    /// Rendered actions per item (with-items only).
    pub item_actions: Vec<(String, Map<String, Value>)>,
    /// Concurrency limit for items.
    pub concurrency: Option<usize>,
    /// Run even though the workflow failed (remediation next to `fail`).
    pub run_on_fail: bool,
    /// Items kept from the run being re-run (`--no-reset`): item index ->
    /// its result; they count as succeeded and are not run again.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub kept_items: BTreeMap<usize, Value>,
}

/// The whole, serializable state of one workflow run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkflowState {
    /// Workflow status.
    pub status: WorkflowStatus,
    /// Input as given.
    pub input: Map<String, Value>,
    /// Context values; 0 is the initial context (input + vars), the others
    /// hold values published by one transition.
    pub contexts: Vec<Map<String, Value>>,
    /// Routes: each is the list of split transitions taken (`task1__t0`).
    pub routes: Vec<Vec<String>>,
    /// Every task instance, in the order they started.
    pub sequence: Vec<TaskEntry>,
    /// Latest sequence index per `task__rN`.
    pub tasks: BTreeMap<String, usize>,
    /// Tasks waiting to run.
    pub staged: Vec<StagedTask>,
    /// Errors logged.
    pub errors: Vec<WorkflowError>,
    /// Rendered output once completed.
    pub output: Option<Map<String, Value>>,
    /// True once [`Command::Finish`] was returned.
    pub finished: bool,
    /// When the run started.
    pub started_at: DateTime<Utc>,
    /// When it completed.
    pub finished_at: Option<DateTime<Utc>>,
    /// True while paused: running actions may end, nothing new is
    /// dispatched until [`resume`].
    #[serde(default)]
    pub paused: bool,
}

/// A call that does not fit the state (a bug in the caller).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConductorError {
    /// The task instance is not waiting for an action.
    #[error(
        "task '{id}' (route {route}) is not waiting for an action result; report only actions from RunAction commands"
    )]
    NotWaiting {
        /// Task name.
        id: String,
        /// Route.
        route: usize,
    },
    /// The item does not exist.
    #[error("task '{id}' has no item {item}")]
    NoSuchItem {
        /// Task name.
        id: String,
        /// Item index.
        item: usize,
    },
    /// Not a task of this workflow.
    #[error("'{0}' is not a task of this workflow")]
    UnknownTask(String),
}

fn key(id: &str, route: usize) -> String {
    format!("{id}__r{route}")
}

fn deep_merge(into: &mut Map<String, Value>, from: &Map<String, Value>) {
    for (k, v) in from {
        match (into.get_mut(k), v) {
            (Some(Value::Object(a)), Value::Object(b)) => deep_merge(a, b),
            _ => {
                into.insert(k.clone(), v.clone());
            }
        }
    }
}

fn error(message: impl Into<String>) -> WorkflowError {
    WorkflowError {
        kind: "error".into(),
        message: message.into(),
        task_id: None,
        route: None,
        task_transition_id: None,
        result: None,
    }
}

impl WorkflowState {
    /// The context made of the given indexes, merged in order.
    pub fn context(&self, idxs: &[usize]) -> Map<String, Value> {
        let mut out = Map::new();
        for i in idxs {
            if let Some(c) = self.contexts.get(*i) {
                deep_merge(&mut out, c);
            }
        }
        out
    }

    /// The latest entry for a task instance.
    pub fn entry(&self, id: &str, route: usize) -> Option<&TaskEntry> {
        self.tasks
            .get(&key(id, route))
            .and_then(|i| self.sequence.get(*i))
    }

    fn staged_idx(&self, id: &str, route: usize) -> Option<usize> {
        self.staged
            .iter()
            .position(|s| s.id == id && s.route == route)
    }

    fn task_statuses(&self) -> BTreeMap<String, String> {
        self.sequence
            .iter()
            .map(|e| (e.id.clone(), e.status.as_str().to_string()))
            .collect()
    }

    fn has_active(&self) -> bool {
        self.sequence.iter().enumerate().any(|(i, e)| {
            matches!(e.status, TaskStatus::Running)
                && self.tasks.get(&key(&e.id, e.route)) == Some(&i)
        }) || self.staged.iter().any(|s| {
            s.items.as_ref().is_some_and(|items| {
                items
                    .iter()
                    .any(|it| it.status == Some(TaskStatus::Running))
            })
        })
    }

    fn has_ready_staged(&self) -> bool {
        self.staged.iter().any(|s| s.ready)
    }

    fn log(&mut self, e: WorkflowError) {
        if !self.errors.contains(&e) {
            self.errors.push(e);
        }
    }
}

struct Run<'s, 'e> {
    spec: &'s WorkflowSpec,
    env: Env<'e>,
    commands: Vec<Command>,
}

/// Starts a workflow: renders input and vars, stages the start tasks and
/// returns the commands to run them. Input names the workflow does not
/// declare are ignored. Rendering errors fail the workflow (see the
/// [`Command::Finish`]).
pub fn start(
    spec: &WorkflowSpec,
    input: Map<String, Value>,
    env: Env<'_>,
) -> (WorkflowState, Vec<Command>) {
    start_with_context(spec, input, Map::new(), env)
}

/// Like [`start`], with an initial context (Orquesta's conductor
/// `context`, such as StackStorm's `st2` values) that inputs and vars are
/// laid over.
pub fn start_with_context(
    spec: &WorkflowSpec,
    input: Map<String, Value>,
    context: Map<String, Value>,
    env: Env<'_>,
) -> (WorkflowState, Vec<Command>) {
    let mut state = WorkflowState {
        status: WorkflowStatus::Running,
        input: input.clone(),
        contexts: Vec::new(),
        routes: vec![Vec::new()],
        sequence: Vec::new(),
        tasks: BTreeMap::new(),
        staged: Vec::new(),
        errors: Vec::new(),
        output: None,
        finished: false,
        started_at: env.now,
        finished_at: None,
        paused: false,
    };
    let mut ctx = context;
    let mut failed = false;
    for (name, default) in &spec.input {
        let value = match (input.get(name), default) {
            (Some(v), _) => v.clone(),
            (None, Some(d)) => {
                let scope = Scope {
                    ctx: ctx.clone(),
                    kv: env.kv,
                    ..Scope::default()
                };
                match expr::render(d, &scope) {
                    Ok(v) => v,
                    Err(e) => {
                        state.log(error(format!("input '{name}': {}", e.message)));
                        failed = true;
                        Value::Null
                    }
                }
            }
            (None, None) => Value::Null,
        };
        ctx.insert(name.clone(), value);
    }
    for (name, v) in &spec.vars {
        let scope = Scope {
            ctx: ctx.clone(),
            kv: env.kv,
            ..Scope::default()
        };
        match expr::render(v, &scope) {
            Ok(v) => {
                ctx.insert(name.clone(), v);
            }
            Err(e) => {
                state.log(error(format!("vars '{name}': {}", e.message)));
                failed = true;
            }
        }
    }
    state.contexts.push(ctx);
    let mut run = Run {
        spec,
        env,
        commands: Vec::new(),
    };
    if failed {
        state.status = WorkflowStatus::Failed;
    } else {
        for t in spec.start_tasks() {
            state.staged.push(StagedTask {
                id: t,
                route: 0,
                ctxs: vec![0],
                prev: BTreeMap::new(),
                ready: true,
                dispatched: false,
                retry_delay: None,
                items: None,
                item_actions: Vec::new(),
                concurrency: None,
                run_on_fail: false,
                kept_items: BTreeMap::new(),
            });
        }
        run.dispatch(&mut state);
    }
    run.maybe_finish(&mut state);
    (state, run.commands)
}

/// Records that a dispatched action started running (optional: a task entry
/// is created on its first event either way). Unknown tasks are an error.
pub fn on_action_started(
    spec: &WorkflowSpec,
    state: &mut WorkflowState,
    task: &TaskRef,
    env: Env<'_>,
) -> Result<(), ConductorError> {
    if !spec.tasks.contains_key(&task.id) {
        return Err(ConductorError::UnknownTask(task.id.clone()));
    }
    let run = Run {
        spec,
        env,
        commands: Vec::new(),
    };
    let idx = run.entry_for_event(state, &task.id, task.route)?;
    if let Some(e) = state.sequence.get_mut(idx)
        && !e.status.is_completed()
    {
        e.status = TaskStatus::Running;
    }
    if let (Some(item), Some(si)) = (task.item, state.staged_idx(&task.id, task.route))
        && let Some(items) = state.staged[si].items.as_mut()
        && let Some(it) = items.get_mut(item)
    {
        it.status = Some(TaskStatus::Running);
    }
    Ok(())
}

/// Feeds back the end of an action and returns the next commands.
pub fn on_action_finished(
    spec: &WorkflowSpec,
    state: &mut WorkflowState,
    task: &TaskRef,
    status: TaskStatus,
    result: Value,
    env: Env<'_>,
) -> Result<Vec<Command>, ConductorError> {
    let Some(task_spec) = spec.tasks.get(&task.id) else {
        return Err(ConductorError::UnknownTask(task.id.clone()));
    };
    let mut run = Run {
        spec,
        env,
        commands: Vec::new(),
    };
    let idx = run.entry_for_event(state, &task.id, task.route)?;
    if status.is_abended() {
        state.log(WorkflowError {
            task_id: Some(task.id.clone()),
            result: (!result.is_null()).then(|| result.clone()),
            ..error("Execution failed. See result for details.")
        });
    }
    if task_spec.with.is_some() {
        let si =
            state
                .staged_idx(&task.id, task.route)
                .ok_or_else(|| ConductorError::NotWaiting {
                    id: task.id.clone(),
                    route: task.route,
                })?;
        let item = task.item.unwrap_or(0);
        let staged = &mut state.staged[si];
        let items = staged.items.get_or_insert_with(Vec::new);
        let it = items.get_mut(item).ok_or(ConductorError::NoSuchItem {
            id: task.id.clone(),
            item,
        })?;
        it.status = Some(status);
        it.result = result;
        let any_running = items
            .iter()
            .any(|i| matches!(i.status, Some(TaskStatus::Running)));
        let any_failed = items
            .iter()
            .any(|i| i.status.is_some_and(TaskStatus::is_abended));
        let all_done = items
            .iter()
            .all(|i| i.status.is_some_and(TaskStatus::is_completed));
        if any_running || (!all_done && !any_failed) {
            run.dispatch(state);
            run.maybe_finish(state);
            return Ok(run.commands);
        }
        // As Orquesta: the results of the items that ran (in item order);
        // items never started after a failure are left out.
        let results: Vec<Value> = items
            .iter()
            .filter(|i| i.status.is_some())
            .map(|i| i.result.clone())
            .collect();
        let status = if any_failed {
            TaskStatus::Failed
        } else {
            TaskStatus::Succeeded
        };
        run.complete(state, idx, status, Value::Array(results));
    } else {
        run.complete(state, idx, status, result);
    }
    run.dispatch(state);
    run.maybe_finish(state);
    Ok(run.commands)
}

/// Cancels the workflow: nothing more is dispatched; the workflow finishes
/// as canceled once no action is running.
pub fn cancel(spec: &WorkflowSpec, state: &mut WorkflowState, env: Env<'_>) -> Vec<Command> {
    let mut run = Run {
        spec,
        env,
        commands: Vec::new(),
    };
    if !state.status.is_completed() {
        state.status = WorkflowStatus::Canceled;
    }
    state.staged.retain(|s| s.dispatched);
    run.maybe_finish(state);
    run.commands
}

/// Why a re-run cannot start.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RerunError {
    /// A task to keep items of is not one of the tasks re-run.
    #[error("task '{0}' is in --no-reset but not in --tasks; list it in both")]
    KeptNotRerun(String),
    /// A task to keep items of is not a with-items task.
    #[error("task '{0}' is not a with-items task; --no-reset only applies to with-items tasks")]
    KeptNotItems(String),
    /// The original is still running.
    #[error("the workflow is still {0}; only a finished workflow can be re-run")]
    NotFinished(&'static str),
    /// No task named.
    #[error("name at least one task to re-run from")]
    NoTasks,
    /// A named task never ran in the original.
    #[error(
        "task '{0}' did not run in the original workflow; re-run from tasks that ran (see `aviary execution get`)"
    )]
    DidNotRun(String),
}

/// Prepares a re-run of a finished workflow from the given tasks: a new
/// state that keeps the original's finished tasks, their results and
/// published context, and runs each named task again (its latest run, with
/// the context it had then) and whatever follows from it. Errors and
/// output are reset.
pub fn rerun(
    spec: &WorkflowSpec,
    original: &WorkflowState,
    tasks: &[String],
    env: Env<'_>,
) -> Result<(WorkflowState, Vec<Command>), RerunError> {
    rerun_keeping(spec, original, tasks, &BTreeMap::new(), env)
}

/// [`rerun`], keeping some items of with-items tasks (StackStorm's
/// `--no-reset`): `kept` maps a task to the items (index -> result) that
/// succeeded before; they are not run again and keep their results.
pub fn rerun_keeping(
    spec: &WorkflowSpec,
    original: &WorkflowState,
    tasks: &[String],
    kept: &BTreeMap<String, BTreeMap<usize, Value>>,
    env: Env<'_>,
) -> Result<(WorkflowState, Vec<Command>), RerunError> {
    for name in kept.keys() {
        if !tasks.contains(name) {
            return Err(RerunError::KeptNotRerun(name.clone()));
        }
        if spec.tasks.get(name).is_none_or(|t| t.with.is_none()) {
            return Err(RerunError::KeptNotItems(name.clone()));
        }
    }
    if !original.status.is_completed() {
        return Err(RerunError::NotFinished(original.status.as_str()));
    }
    if tasks.is_empty() {
        return Err(RerunError::NoTasks);
    }
    let mut state = original.clone();
    state.status = WorkflowStatus::Running;
    state.errors.clear();
    state.output = None;
    state.finished = false;
    state.finished_at = None;
    state.paused = false;
    state.started_at = env.now;
    state.staged.clear();
    for name in tasks {
        let Some(entry) = state
            .sequence
            .iter()
            .rev()
            .find(|e| &e.id == name && e.status.is_completed())
            .cloned()
        else {
            return Err(RerunError::DidNotRun(name.clone()));
        };
        if state.staged_idx(name, entry.route).is_some() {
            continue;
        }
        state.staged.push(StagedTask {
            id: entry.id.clone(),
            route: entry.route,
            ctxs: entry.ctxs.clone(),
            prev: entry.prev.clone(),
            ready: true,
            dispatched: false,
            retry_delay: None,
            items: None,
            item_actions: Vec::new(),
            concurrency: None,
            run_on_fail: false,
            kept_items: kept.get(name).cloned().unwrap_or_default(),
        });
    }
    let mut run = Run {
        spec,
        env,
        commands: Vec::new(),
    };
    run.dispatch(&mut state);
    run.maybe_finish(&mut state);
    Ok((state, run.commands))
}

/// Pauses the workflow: actions already running may end (their outcome
/// is recorded and their transitions staged), but no task is dispatched
/// until [`resume`]. A paused workflow does not finish while tasks are
/// ready to run.
pub fn pause(state: &mut WorkflowState) {
    if !state.status.is_completed() {
        state.paused = true;
    }
}

/// Resumes a paused workflow: dispatches what became ready meanwhile and
/// returns the commands (a [`Command::Finish`] if nothing is left).
pub fn resume(spec: &WorkflowSpec, state: &mut WorkflowState, env: Env<'_>) -> Vec<Command> {
    let mut run = Run {
        spec,
        env,
        commands: Vec::new(),
    };
    state.paused = false;
    run.dispatch(state);
    run.maybe_finish(state);
    run.commands
}

/// True when nothing runs: every dispatched action ended (a paused
/// workflow in this state is fully paused).
pub fn is_idle(state: &WorkflowState) -> bool {
    !state.has_active() && !state.staged.iter().any(|s| s.dispatched)
}

enum Inbound {
    Satisfied,
    Wip,
    NotSatisfied,
}

impl Run<'_, '_> {
    fn task_spec(&self, id: &str) -> Option<&TaskSpec> {
        self.spec.tasks.get(id)
    }

    /// The sequence index for an incoming event: the current entry if it is
    /// running or retrying, else a new entry made from the staged task.
    fn entry_for_event(
        &self,
        state: &mut WorkflowState,
        id: &str,
        route: usize,
    ) -> Result<usize, ConductorError> {
        if let Some(&i) = state.tasks.get(&key(id, route))
            && !state.sequence[i].status.is_completed()
        {
            return Ok(i);
        }
        let Some(si) = state
            .staged_idx(id, route)
            .filter(|&si| state.staged[si].dispatched)
        else {
            return Err(ConductorError::NotWaiting {
                id: id.to_string(),
                route,
            });
        };
        Ok(self.add_entry(state, si))
    }

    fn add_entry(&self, state: &mut WorkflowState, si: usize) -> usize {
        let staged = state.staged[si].clone();
        let retry = self
            .task_spec(&staged.id)
            .and_then(|t| t.retry.as_ref())
            .map(|r| {
                let scope = Scope {
                    ctx: state.context(&staged.ctxs),
                    kv: self.env.kv,
                    ..Scope::default()
                };
                let num = |v: &Value| -> u64 {
                    expr::render(v, &scope)
                        .ok()
                        .and_then(|v| v.as_u64())
                        .unwrap_or(0)
                };
                RetryState {
                    when: r.when.clone(),
                    count: num(&r.count),
                    delay: r.delay.as_ref().map(num).unwrap_or(0),
                    tally: 0,
                }
            });
        state.sequence.push(TaskEntry {
            id: staged.id.clone(),
            route: staged.route,
            ctxs: staged.ctxs.clone(),
            prev: staged.prev.clone(),
            next: BTreeMap::new(),
            status: TaskStatus::Running,
            retry,
            term: false,
            started_at: self.env.now,
            finished_at: None,
            published: Map::new(),
        });
        let idx = state.sequence.len() - 1;
        state.tasks.insert(key(&staged.id, staged.route), idx);
        idx
    }

    fn scope(&self, state: &WorkflowState, ctx: Map<String, Value>) -> Scope<'static> {
        Scope {
            ctx,
            task_statuses: state.task_statuses(),
            ..Scope::default()
        }
    }

    /// Hands out every ready staged task (only remediation tasks once the
    /// workflow failed), sorted by (task, route).
    fn dispatch(&mut self, state: &mut WorkflowState) {
        if state.paused {
            return;
        }
        loop {
            let mut order: Vec<usize> = (0..state.staged.len())
                .filter(|&i| {
                    let s = &state.staged[i];
                    s.ready
                        && !ENGINE_COMMANDS.contains(&s.id.as_str())
                        && (state.status == WorkflowStatus::Running
                            || (state.status == WorkflowStatus::Failed && s.run_on_fail))
                        && (!s.dispatched || s.items.is_some())
                })
                .collect();
            order.sort_by(|&a, &b| {
                (&state.staged[a].id, state.staged[a].route)
                    .cmp(&(&state.staged[b].id, state.staged[b].route))
            });
            let ids: Vec<(String, usize)> = order
                .iter()
                .map(|&i| (state.staged[i].id.clone(), state.staged[i].route))
                .collect();
            let mut inline_done = false;
            for (id, route) in ids {
                if let Some(si) = state.staged_idx(&id, route)
                    && self.dispatch_one(state, si)
                {
                    inline_done = true;
                }
                if state.status.is_completed() && state.status != WorkflowStatus::Failed {
                    return;
                }
            }
            if !inline_done {
                return;
            }
        }
    }

    /// Returns true if the task completed inline (no action, or no items).
    fn dispatch_one(&mut self, state: &mut WorkflowState, si: usize) -> bool {
        let staged = state.staged[si].clone();
        let Some(task) = self.task_spec(&staged.id).cloned() else {
            return false;
        };
        let mut ctx_map = state.context(&staged.ctxs);
        ctx_map.remove("__task");
        let base = Scope {
            kv: self.env.kv,
            ..self.scope(state, ctx_map)
        };
        let fail = |state: &mut WorkflowState, msg: String| {
            state.log(WorkflowError {
                task_id: Some(staged.id.clone()),
                route: Some(staged.route),
                ..error(msg)
            });
            state.status = WorkflowStatus::Failed;
            state
                .staged
                .retain(|s| !(s.id == staged.id && s.route == staged.route));
        };
        // Delay: the retry delay wins over the task's delay.
        let delay = match (&staged.retry_delay, &task.delay) {
            (Some(d), _) => Some(*d),
            (None, Some(d)) => match expr::render(d, &base) {
                Ok(v) => match v.as_u64() {
                    Some(n) => Some(n),
                    None => {
                        fail(
                            state,
                            format!(
                                "the delay of task '{}' is not a whole number of seconds: {v}",
                                staged.id
                            ),
                        );
                        return false;
                    }
                },
                Err(e) => {
                    fail(state, e.message);
                    return false;
                }
            },
            (None, None) => None,
        };
        let render_action = |scope: &Scope<'_>| -> Result<(String, Map<String, Value>), String> {
            let action = match &task.action {
                Some(a) => match expr::render_str(a, scope).map_err(|e| e.message)? {
                    Value::String(s) => s,
                    other => return Err(format!("action must render to a name, got {other}")),
                },
                None => String::new(),
            };
            let mut input = match expr::render(&Value::Object(task.input.clone()), scope)
                .map_err(|e| e.message)?
            {
                Value::Object(m) => m,
                _ => Map::new(),
            };
            // Shell text: values go into the environment, never the text.
            if self.spec.shell_cmd_tasks.contains(&staged.id)
                && let Some(Value::String(raw)) = task.input.get("cmd")
                && expr::is_expression(raw)
            {
                let (text, values) = expr::render_shell(raw, scope)
                    .map_err(|e| format!("input 'cmd': {}", e.message))?;
                input.insert("cmd".into(), Value::String(text));
                let env = input
                    .entry("env")
                    .or_insert_with(|| Value::Object(Map::new()));
                if env.is_null() {
                    *env = Value::Object(Map::new());
                }
                let Value::Object(env) = env else {
                    return Err("input 'env' must be a map of names to values".into());
                };
                for (i, v) in values.into_iter().enumerate() {
                    env.insert(format!("AVIARY_ARG_{i}"), Value::String(v));
                }
            }
            Ok((action, input))
        };
        match &task.with {
            None => {
                let (action, input) = match render_action(&base) {
                    Ok(x) => x,
                    Err(msg) => {
                        fail(state, msg);
                        return false;
                    }
                };
                state.staged[si].dispatched = true;
                state.staged[si].retry_delay = None;
                let tref = TaskRef {
                    id: staged.id.clone(),
                    route: staged.route,
                    item: None,
                };
                if task.action.is_none() {
                    // A task without an action succeeds at once.
                    if let Ok(idx) = self.entry_for_event(state, &tref.id, tref.route) {
                        self.complete(state, idx, TaskStatus::Succeeded, Value::Null);
                    }
                    return true;
                }
                self.commands.push(Command::RunAction {
                    task: tref,
                    action,
                    input,
                    delay,
                });
                false
            }
            Some(with) => {
                if state.staged[si].items.is_none() {
                    let items = match expr::render_str(&with.items, &base) {
                        Ok(Value::Array(a)) => a,
                        Ok(other) => {
                            fail(
                                state,
                                format!(
                                    "the items of task '{}' are not a list: {other}",
                                    staged.id
                                ),
                            );
                            return false;
                        }
                        Err(e) => {
                            fail(state, e.message);
                            return false;
                        }
                    };
                    let mut actions = Vec::new();
                    for item in items {
                        let item = if with.keys.is_empty() {
                            item
                        } else if let (Value::Array(parts), true) = (&item, with.keys.len() > 1) {
                            Value::Object(
                                with.keys
                                    .iter()
                                    .cloned()
                                    .zip(parts.iter().cloned())
                                    .collect(),
                            )
                        } else if with.keys.len() == 1 {
                            Value::Object([(with.keys[0].clone(), item)].into_iter().collect())
                        } else {
                            item
                        };
                        let scope = Scope {
                            item: Some(item),
                            ..base.clone()
                        };
                        match render_action(&scope) {
                            Ok(a) => actions.push(a),
                            Err(msg) => {
                                fail(state, msg);
                                return false;
                            }
                        }
                    }
                    let concurrency = match &with.concurrency {
                        None => None,
                        Some(c) => match expr::render(c, &base).map(|v| v.as_u64()) {
                            Ok(Some(n)) => Some(n.max(1) as usize),
                            Ok(None) => {
                                fail(
                                    state,
                                    format!(
                                        "the concurrency of task '{}' is not a number",
                                        staged.id
                                    ),
                                );
                                return false;
                            }
                            Err(e) => {
                                fail(state, e.message);
                                return false;
                            }
                        },
                    };
                    let n = actions.len();
                    let s = &mut state.staged[si];
                    let items: Vec<ItemState> = (0..n)
                        .map(|i| match s.kept_items.get(&i) {
                            Some(result) => ItemState {
                                status: Some(TaskStatus::Succeeded),
                                result: result.clone(),
                            },
                            None => ItemState {
                                status: None,
                                result: Value::Null,
                            },
                        })
                        .collect();
                    let all_kept = items.iter().all(|i| i.status.is_some());
                    let results: Vec<Value> = items.iter().map(|i| i.result.clone()).collect();
                    s.items = Some(items);
                    s.item_actions = actions;
                    s.concurrency = concurrency;
                    s.dispatched = true;
                    if all_kept {
                        // No items, or every item kept from the run re-run:
                        // the task succeeds at once.
                        if let Ok(idx) = self.entry_for_event(state, &staged.id, staged.route) {
                            self.complete(state, idx, TaskStatus::Succeeded, Value::Array(results));
                        }
                        return true;
                    }
                }
                let s = &mut state.staged[si];
                let Some(items) = s.items.as_mut() else {
                    return false;
                };
                if items
                    .iter()
                    .any(|i| i.status.is_some_and(TaskStatus::is_abended))
                {
                    return false; // an item failed: run no more
                }
                let active = items
                    .iter()
                    .filter(|i| i.status == Some(TaskStatus::Running))
                    .count();
                let mut room = s
                    .concurrency
                    .map(|c| c.saturating_sub(active))
                    .unwrap_or(usize::MAX);
                for (i, it) in items.iter_mut().enumerate() {
                    if room == 0 {
                        break;
                    }
                    if it.status.is_none() {
                        it.status = Some(TaskStatus::Running);
                        room -= 1;
                        let (action, input) = s.item_actions[i].clone();
                        self.commands.push(Command::RunAction {
                            task: TaskRef {
                                id: s.id.clone(),
                                route: s.route,
                                item: Some(i),
                            },
                            action,
                            input,
                            delay,
                        });
                    }
                }
                s.retry_delay = None;
                false
            }
        }
    }

    fn inbound_status(&self, state: &WorkflowState, task: &str, route: usize) -> Inbound {
        let inbound = self.spec.inbound(task);
        let mut sources: BTreeMap<String, Option<bool>> =
            inbound.iter().map(|(s, _)| (s.clone(), None)).collect();
        let barrier = self.task_spec(task).and_then(|t| t.join);
        let required = match barrier {
            Some(Join::All) => sources.len(),
            Some(Join::Count(n)) => n,
            None => 1,
        };
        for (src, idx) in &inbound {
            let Some(entry) = state.entry(src, route) else {
                continue;
            };
            let tid = format!("{task}__t{idx}");
            let satisfied = entry.next.get(&tid).copied().unwrap_or(false);
            let slot = sources.entry(src.clone()).or_insert(None);
            if !slot.unwrap_or(false) {
                *slot = Some(satisfied);
            }
        }
        if sources.values().filter(|v| **v == Some(true)).count() >= required {
            return Inbound::Satisfied;
        }
        if sources.values().any(Option::is_none) && (state.has_active() || state.has_ready_staged())
        {
            return Inbound::Wip;
        }
        Inbound::NotSatisfied
    }

    fn evaluate_route(
        &self,
        state: &mut WorkflowState,
        src: &str,
        idx: usize,
        target: &str,
        route: usize,
    ) -> usize {
        // Engine commands split like tasks: `noop` named by the failure
        // transitions of several branches runs once per branch, each on
        // its own route (as in Orquesta).
        if !self.spec.is_split(target) || self.spec.in_cycle(target) {
            return route;
        }
        // Orquesta names a split by the edge from `src` to `target`: its
        // key counts the earlier transitions of `src` naming `target`.
        let key = self.task_spec(src).map_or(idx, |t| {
            t.next
                .iter()
                .take(idx)
                .filter(|n| n.targets.iter().any(|x| x == target))
                .count()
        });
        let tid = format!("{src}__t{key}");
        let old = state.routes.get(route).cloned().unwrap_or_default();
        if old.contains(&tid) {
            return route;
        }
        let mut new = old;
        new.push(tid);
        if let Some(existing) = state.routes.iter().position(|r| *r == new) {
            return existing;
        }
        state.routes.push(new);
        state.routes.len() - 1
    }

    /// A task instance completed with `status`: retry, evaluate transitions,
    /// run engine commands, update the workflow status.
    fn complete(
        &mut self,
        state: &mut WorkflowState,
        idx: usize,
        status: TaskStatus,
        result: Value,
    ) {
        let (id, route) = (state.sequence[idx].id.clone(), state.sequence[idx].route);
        let is_engine = ENGINE_COMMANDS.contains(&id.as_str());
        {
            let e = &mut state.sequence[idx];
            e.status = status;
            e.finished_at = Some(self.env.now);
        }
        let mut ctx_map = state.context(&state.sequence[idx].ctxs.clone());
        ctx_map.remove("__task");
        let scope = Scope {
            kv: self.env.kv,
            current: Some(CurrentTask {
                id: id.clone(),
                status: status.as_str().to_string(),
                result: result.clone(),
            }),
            ..self.scope(state, ctx_map)
        };
        // Retry.
        if state.status == WorkflowStatus::Running
            && let Some(r) = state.sequence[idx].retry.clone()
            && r.tally < r.count
        {
            let again = match &r.when {
                None => status.is_abended(),
                Some(w) => match expr::evaluate_bool(w, &scope) {
                    Ok(b) => b,
                    Err(e) => {
                        state.log(WorkflowError {
                            task_id: Some(id.clone()),
                            route: Some(route),
                            ..error(e.message)
                        });
                        state.status = WorkflowStatus::Failed;
                        false
                    }
                },
            };
            if again {
                let e = &mut state.sequence[idx];
                e.status = TaskStatus::Retrying;
                e.finished_at = None;
                if let Some(rs) = e.retry.as_mut() {
                    rs.tally += 1;
                }
                let (ctxs, prev) = (e.ctxs.clone(), e.prev.clone());
                state.staged.retain(|s| !(s.id == id && s.route == route));
                state.staged.push(StagedTask {
                    id: id.clone(),
                    route,
                    ctxs,
                    prev,
                    ready: true,
                    dispatched: false,
                    retry_delay: Some(r.delay),
                    items: None,
                    item_actions: Vec::new(),
                    concurrency: None,
                    run_on_fail: false,
                    kept_items: BTreeMap::new(),
                });
                return;
            }
        }
        state.staged.retain(|s| !(s.id == id && s.route == route));
        let mut engine_queue: Vec<(String, usize)> = Vec::new();
        let transitions = self
            .task_spec(&id)
            .map(|t| t.next.clone())
            .unwrap_or_default();
        if transitions.is_empty() {
            state.sequence[idx].term = true;
        }
        let mut has_manual_fail = false;
        let mut ready_next: Vec<(String, usize)> = Vec::new();
        for (i, t) in transitions.iter().enumerate() {
            let holds = match &t.when {
                None => Ok(true),
                Some(w) => expr::evaluate_bool(w, &scope),
            };
            let holds = match holds {
                Ok(b) => b,
                Err(e) => {
                    for target in &t.targets {
                        state.sequence[idx]
                            .next
                            .insert(format!("{target}__t{i}"), false);
                    }
                    state.log(WorkflowError {
                        task_id: Some(id.clone()),
                        route: Some(route),
                        task_transition_id: t.targets.first().map(|x| format!("{x}__t{i}")),
                        ..error(e.message)
                    });
                    state.status = WorkflowStatus::Failed;
                    continue;
                }
            };
            for target in &t.targets {
                state.sequence[idx]
                    .next
                    .insert(format!("{target}__t{i}"), holds);
            }
            if !holds {
                continue;
            }
            // Publish, in order; later values see earlier ones (but not
            // other transitions' values).
            let mut published = Map::new();
            let mut publish_failed = false;
            let mut pscope = scope.clone();
            for (k, v) in &t.publish {
                match expr::render(v, &pscope) {
                    Ok(val) => {
                        published.insert(k.clone(), val.clone());
                        pscope.ctx.insert(k.clone(), val);
                    }
                    Err(e) => {
                        state.log(WorkflowError {
                            task_id: Some(id.clone()),
                            route: Some(route),
                            task_transition_id: t.targets.first().map(|x| format!("{x}__t{i}")),
                            ..error(e.message)
                        });
                        state.status = WorkflowStatus::Failed;
                        publish_failed = true;
                    }
                }
            }
            if publish_failed {
                continue;
            }
            let mut out_ctxs = state.sequence[idx].ctxs.clone();
            if !published.is_empty() {
                for (k, v) in &published {
                    state.sequence[idx].published.insert(k.clone(), v.clone());
                }
                state.contexts.push(published);
                out_ctxs.push(state.contexts.len() - 1);
            }
            for target in &t.targets {
                let next_route = self.evaluate_route(state, &id, i, target, route);
                let backref = format!("{id}__t{i}");
                // A join that already started on this route is not staged again.
                let is_join = self.task_spec(target).is_some_and(|t| t.join.is_some());
                let started = state.entry(target, next_route).is_some()
                    || state
                        .staged_idx(target, next_route)
                        .is_some_and(|si| state.staged[si].dispatched);
                if is_join && started && !self.spec.in_cycle(target) {
                    continue;
                }
                let si = match state.staged_idx(target, next_route) {
                    Some(si) if !state.staged[si].dispatched => {
                        let s = &mut state.staged[si];
                        for c in &out_ctxs {
                            if *c != 0 {
                                s.ctxs.push(*c);
                            }
                        }
                        s.prev.insert(backref, idx);
                        si
                    }
                    _ => {
                        state.staged.push(StagedTask {
                            id: target.clone(),
                            route: next_route,
                            ctxs: out_ctxs.clone(),
                            prev: [(backref, idx)].into_iter().collect(),
                            ready: false,
                            dispatched: false,
                            retry_delay: None,
                            items: None,
                            item_actions: Vec::new(),
                            concurrency: None,
                            run_on_fail: false,
                            kept_items: BTreeMap::new(),
                        });
                        state.staged.len() - 1
                    }
                };
                let ready = matches!(
                    self.inbound_status(state, target, route),
                    Inbound::Satisfied
                );
                state.staged[si].ready = ready;
                if ENGINE_COMMANDS.contains(&target.as_str()) {
                    engine_queue.push((target.clone(), next_route));
                    has_manual_fail |= target == "fail";
                } else if ready {
                    ready_next.push((target.clone(), next_route));
                }
            }
        }
        if has_manual_fail {
            for (t, r) in &ready_next {
                if let Some(si) = state.staged_idx(t, *r) {
                    state.staged[si].run_on_fail = true;
                }
            }
        }
        self.workflow_on_task(state, &id, route, status, is_engine);
        for (cmd, r) in engine_queue {
            let Some(si) = state.staged_idx(&cmd, r) else {
                continue;
            };
            state.staged[si].dispatched = true;
            let eidx = self.add_entry(state, si);
            let st = if cmd == "fail" {
                TaskStatus::Failed
            } else {
                TaskStatus::Succeeded
            };
            self.complete(state, eidx, st, Value::Null);
        }
        if state.status.is_completed() {
            state.sequence[idx].term = true;
        }
    }

    /// Orquesta's workflow state machine, for one completed task.
    fn workflow_on_task(
        &mut self,
        state: &mut WorkflowState,
        id: &str,
        route: usize,
        status: TaskStatus,
        _is_engine: bool,
    ) {
        if state.status != WorkflowStatus::Running {
            return;
        }
        if status.is_abended() && !self.has_next_tasks(state, id, route) {
            state.status = WorkflowStatus::Failed;
            return;
        }
        if !state.has_active() && !state.has_ready_staged() {
            state.status = WorkflowStatus::Succeeded;
        }
    }

    /// True if a transition taken from the task leads somewhere other than
    /// `continue` (a handled failure).
    fn has_next_tasks(&self, state: &WorkflowState, id: &str, route: usize) -> bool {
        let Some(entry) = state.entry(id, route) else {
            return false;
        };
        for (tid, holds) in &entry.next {
            if !holds {
                continue;
            }
            let target = tid.rsplit_once("__t").map(|(t, _)| t).unwrap_or(tid);
            if target == "continue" {
                continue;
            }
            if self.task_spec(target).is_some_and(|t| t.join.is_some())
                && matches!(
                    self.inbound_status(state, target, route),
                    Inbound::NotSatisfied
                )
            {
                continue;
            }
            return true;
        }
        false
    }

    /// Emits [`Command::Finish`] once the workflow completed and nothing is
    /// running; renders the output then.
    fn maybe_finish(&mut self, state: &mut WorkflowState) {
        if state.finished
            || (state.paused && state.staged.iter().any(|s| s.ready))
            || !state.status.is_completed()
            || state.has_active()
            || state.staged.iter().any(|s| s.dispatched)
        {
            return;
        }
        if state.status == WorkflowStatus::Failed
            && state.staged.iter().any(|s| s.run_on_fail && s.ready)
        {
            return;
        }
        // Unreachable joins: the workflow cannot finish them (logged after a
        // failure too, as Orquesta does).
        if matches!(
            state.status,
            WorkflowStatus::Succeeded | WorkflowStatus::Failed
        ) {
            let stuck: Vec<(String, usize)> = state
                .staged
                .iter()
                .filter(|s| !s.ready && self.task_spec(&s.id).is_some_and(|t| t.join.is_some()))
                .map(|s| (s.id.clone(), s.route))
                .collect();
            for (id, route) in stuck {
                if matches!(
                    self.inbound_status(state, &id, route),
                    Inbound::NotSatisfied
                ) {
                    state.status = WorkflowStatus::Failed;
                    state.log(WorkflowError {
                        task_id: Some(id.clone()),
                        route: Some(route),
                        ..error(format!(
                            "UnreachableJoinError: The join task|route \"{id}|{route}\" is partially satisfied but unreachable."
                        ))
                    });
                }
            }
        }
        self.render_output(state);
        state.finished = true;
        state.finished_at = Some(self.env.now);
        self.commands.push(Command::Finish {
            status: state.status,
            output: state.output.clone(),
            errors: state.errors.clone(),
        });
    }

    fn render_output(&mut self, state: &mut WorkflowState) {
        if self.spec.output.is_empty() {
            return;
        }
        // Terminal context: the first terminal task's context, then the
        // values the other terminal tasks saw (minus the initial context).
        let terms: Vec<Vec<usize>> = state
            .sequence
            .iter()
            .filter(|e| e.term)
            .map(|e| e.ctxs.clone())
            .collect();
        let mut ctx = match terms.first() {
            Some(first) => state.context(first),
            None => state.context(&[0]),
        };
        for other in terms.iter().skip(1) {
            let rest: Vec<usize> = other.iter().copied().filter(|c| *c != 0).collect();
            deep_merge(&mut ctx, &state.context(&rest));
        }
        let mut scope = Scope {
            kv: self.env.kv,
            ..self.scope(state, ctx)
        };
        let mut out = Map::new();
        for (k, v) in &self.spec.output {
            match expr::render(v, &scope) {
                Ok(val) => {
                    out.insert(k.clone(), val.clone());
                    scope.ctx.insert(k.clone(), val);
                }
                Err(e) => {
                    state.log(error(format!("output '{k}': {}", e.message)));
                    if state.status != WorkflowStatus::Canceled {
                        state.status = WorkflowStatus::Failed;
                    }
                }
            }
        }
        if !out.is_empty() {
            state.output = Some(out);
        }
    }
}
