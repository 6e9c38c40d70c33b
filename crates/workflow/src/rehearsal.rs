//! Rehearsals: run a workflow against the conductor with mocked action
//! results (no action runs) and compare with what must happen, in
//! Orquesta's `WorkflowTestCase` format:
//!
//! ```yaml
//! workflow: workflows/sequential.yaml
//! inputs: {name: Stanley}
//! context: {st2: {api_url: ...}}   # optional initial context
//! mock_action_executions:
//!   - task_id: task1          # also: seq_id, item_id, num_iter, status, result
//!     result: Stanley
//! expected_task_sequence: [task1, task2, task3, continue]
//! expected_routes: [[]]               # default
//! expected_workflow_status: succeeded # default
//! expected_output: {greeting: ...}
//! expected_term_tasks: [task3]        # optional
//! expected_errors: [...]              # optional
//! ```
//!
//! Task names in `expected_task_sequence` may carry a route (`task4__r1`);
//! without one, route 0 is meant.

use crate::conductor::{self, Command, Env, TaskRef, TaskStatus, WorkflowState, WorkflowStatus};
use crate::spec::{WorkflowSpec, parse_workflow};
use aviary_core::diagnostic::parse_yaml;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::fmt;

/// One mocked action execution.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MockActionExecution {
    /// Task name.
    pub task_id: String,
    /// Route (accepted for compatibility; matching ignores it as Orquesta does).
    #[serde(default)]
    pub route: Option<usize>,
    /// Only for the task entry at this index of the sequence.
    #[serde(default)]
    pub seq_id: Option<usize>,
    /// Item index, for with-items tasks.
    #[serde(default)]
    pub item_id: Option<usize>,
    /// Accepted for compatibility.
    #[serde(default)]
    pub iter_id: Option<usize>,
    /// How many executions this mock answers (default 1).
    #[serde(default)]
    pub num_iter: Option<usize>,
    /// Action status (default succeeded).
    #[serde(default)]
    pub status: Option<String>,
    /// Action result.
    #[serde(default)]
    pub result: Value,
}

/// A rehearsal spec.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RehearsalSpec {
    /// Path of the workflow definition (resolved by the caller).
    pub workflow: String,
    /// Workflow input.
    #[serde(default)]
    pub inputs: Map<String, Value>,
    /// Initial workflow context (Orquesta's conductor `context`).
    #[serde(default)]
    pub context: Map<String, Value>,
    /// Mocked results.
    #[serde(default)]
    pub mock_action_executions: Vec<MockActionExecution>,
    /// Task instances in order of start.
    pub expected_task_sequence: Vec<String>,
    /// Expected routes (default `[[]]`).
    #[serde(default)]
    pub expected_routes: Option<Vec<Vec<String>>>,
    /// Expected final status (default `succeeded`).
    #[serde(default)]
    pub expected_workflow_status: Option<String>,
    /// Expected output.
    #[serde(default)]
    pub expected_output: Option<Value>,
    /// Expected terminal tasks (any order).
    #[serde(default)]
    pub expected_term_tasks: Option<Vec<String>>,
    /// Expected errors.
    #[serde(default)]
    pub expected_errors: Option<Value>,
    /// Not supported (static inspection results).
    #[serde(default)]
    pub expected_inspection_errors: Option<Value>,
}

/// What a rehearsal found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The workflow path from the spec.
    pub workflow: String,
    /// Every difference from the expectations (empty: passed).
    pub mismatches: Vec<String>,
    /// Actual task sequence (`task__rN`).
    pub sequence: Vec<String>,
    /// Actual routes.
    pub routes: Vec<Vec<String>>,
    /// Actual final status.
    pub status: Option<String>,
    /// Actual output.
    pub output: Option<Value>,
    /// Actual errors.
    pub errors: Value,
}

impl Report {
    /// True if everything matched.
    pub fn passed(&self) -> bool {
        self.mismatches.is_empty()
    }

    fn fail(workflow: &str, msg: String) -> Self {
        Self {
            workflow: workflow.to_string(),
            mismatches: vec![msg],
            ..Self::default()
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.passed() {
            return write!(f, "PASS {}", self.workflow);
        }
        writeln!(f, "FAIL {}", self.workflow)?;
        for m in &self.mismatches {
            writeln!(f, "  - {}", m.replace('\n', "\n    "))?;
        }
        Ok(())
    }
}

fn list_diff(what: &str, expected: &[String], actual: &[String]) -> Option<String> {
    if expected == actual {
        return None;
    }
    let n = expected.len().max(actual.len());
    let mut lines = vec![format!("{what} differs (expected | actual):")];
    for i in 0..n {
        let e = expected.get(i).map(String::as_str).unwrap_or("-");
        let a = actual.get(i).map(String::as_str).unwrap_or("-");
        let mark = if e == a { " " } else { "!" };
        lines.push(format!("{mark} {i:>3}: {e:<24} | {a}"));
    }
    Some(lines.join("\n"))
}

fn normalize_seq(name: &str) -> String {
    if name.contains("__r") {
        name.to_string()
    } else {
        format!("{name}__r0")
    }
}

/// Runs a rehearsal spec (YAML text). `load_workflow` returns the text of
/// the workflow file the spec names.
pub fn rehearse(spec_text: &str, load_workflow: impl Fn(&str) -> Result<String, String>) -> Report {
    let node = match parse_yaml("rehearsal", spec_text) {
        Ok(n) => n,
        Err(d) => return Report::fail("?", d.to_string()),
    };
    let spec: RehearsalSpec = match serde_json::from_value(node.to_json()) {
        Ok(s) => s,
        Err(e) => return Report::fail("?", format!("bad rehearsal spec: {e}")),
    };
    let wf = &spec.workflow;
    if spec.expected_inspection_errors.is_some() {
        return Report::fail(wf, "expected_inspection_errors is not supported".into());
    }
    let text = match load_workflow(wf) {
        Ok(t) => t,
        Err(e) => return Report::fail(wf, format!("cannot load workflow '{wf}': {e}")),
    };
    let wf_spec = match parse_workflow(wf, &text) {
        Ok(s) => s,
        Err(d) => return Report::fail(wf, format!("invalid workflow:\n{d}")),
    };
    for m in &spec.mock_action_executions {
        match wf_spec.tasks.get(&m.task_id) {
            None => {
                return Report::fail(wf, format!("mock for unknown task '{}'", m.task_id));
            }
            Some(t) if t.with.is_some() && m.item_id.is_none() => {
                return Report::fail(
                    wf,
                    format!(
                        "mock for with-items task '{}' is missing item_id",
                        m.task_id
                    ),
                );
            }
            _ => {}
        }
        if let Some(s) = &m.status
            && TaskStatus::parse(s).is_none()
        {
            return Report::fail(
                wf,
                format!("mock for '{}': unknown status '{s}'", m.task_id),
            );
        }
    }
    let state = match run(&wf_spec, &spec) {
        Ok(s) => s,
        Err(e) => return Report::fail(wf, e),
    };
    compare(&spec, &state)
}

fn run(wf_spec: &WorkflowSpec, spec: &RehearsalSpec) -> Result<WorkflowState, String> {
    let now: DateTime<Utc> = DateTime::UNIX_EPOCH;
    let env = Env { now, kv: None };
    let mut uses: Vec<usize> = vec![0; spec.mock_action_executions.len()];
    let (mut state, mut pending) =
        conductor::start_with_context(wf_spec, spec.inputs.clone(), spec.context.clone(), env);
    let mut rounds = 0;
    while pending
        .iter()
        .any(|c| matches!(c, Command::RunAction { .. }))
    {
        rounds += 1;
        if rounds > 10_000 {
            return Err(
                "the workflow did not finish after 10000 rounds (a cycle without exit?)".into(),
            );
        }
        // Like Orquesta's rehearsal: run a round's tasks sorted by task and route.
        let mut batch = std::mem::take(&mut pending);
        batch.sort_by_key(|c| match c {
            Command::RunAction { task, .. } => (0, task.id.clone(), task.route, task.item),
            Command::Finish { .. } => (1, String::new(), 0, None),
        });
        for cmd in batch {
            let Command::RunAction { task, .. } = cmd else {
                continue;
            };
            let (status, result) = pick_mock(spec, &mut uses, &state, &task);
            let cmds =
                conductor::on_action_finished(wf_spec, &mut state, &task, status, result, env)
                    .map_err(|e| e.to_string())?;
            pending.extend(cmds);
        }
    }
    Ok(state)
}

fn pick_mock(
    spec: &RehearsalSpec,
    uses: &mut [usize],
    state: &WorkflowState,
    task: &TaskRef,
) -> (TaskStatus, Value) {
    let seq_id = match state.entry(&task.id, task.route) {
        Some(e) if !e.status.is_completed() => state
            .tasks
            .get(&format!("{}__r{}", task.id, task.route))
            .copied(),
        _ => None,
    }
    .unwrap_or(state.sequence.len());
    let candidates: Vec<usize> = spec
        .mock_action_executions
        .iter()
        .enumerate()
        .filter(|(i, m)| {
            m.task_id == task.id
                && uses[*i] < m.num_iter.unwrap_or(1)
                && (task.item.is_none() || m.item_id == task.item)
        })
        .map(|(i, _)| i)
        .collect();
    let chosen = candidates
        .iter()
        .copied()
        .find(|&i| spec.mock_action_executions[i].seq_id == Some(seq_id))
        .or_else(|| {
            candidates
                .first()
                .copied()
                .filter(|&i| spec.mock_action_executions[i].seq_id.is_none())
        });
    match chosen {
        Some(i) => {
            uses[i] += 1;
            let m = &spec.mock_action_executions[i];
            let status = m
                .status
                .as_deref()
                .and_then(TaskStatus::parse)
                .unwrap_or(TaskStatus::Succeeded);
            (status, m.result.clone())
        }
        None => (TaskStatus::Succeeded, Value::Null),
    }
}

fn compare(spec: &RehearsalSpec, state: &WorkflowState) -> Report {
    let mut report = Report {
        workflow: spec.workflow.clone(),
        sequence: state
            .sequence
            .iter()
            .map(|e| format!("{}__r{}", e.id, e.route))
            .collect(),
        routes: state.routes.clone(),
        status: Some(state.status.as_str().to_string()),
        output: state.output.clone().map(Value::Object),
        errors: serde_json::to_value(&state.errors).unwrap_or(Value::Null),
        mismatches: Vec::new(),
    };
    let expected_seq: Vec<String> = spec
        .expected_task_sequence
        .iter()
        .map(|s| normalize_seq(s))
        .collect();
    if let Some(d) = list_diff("task sequence", &expected_seq, &report.sequence) {
        report.mismatches.push(d);
    }
    let expected_routes = spec.expected_routes.clone().unwrap_or_else(|| vec![vec![]]);
    if expected_routes != report.routes {
        report.mismatches.push(format!(
            "routes differ:\n  expected: {}\n  actual:   {}",
            serde_json::to_string(&expected_routes).unwrap_or_default(),
            serde_json::to_string(&report.routes).unwrap_or_default()
        ));
    }
    let expected_status = spec
        .expected_workflow_status
        .clone()
        .unwrap_or_else(|| WorkflowStatus::Succeeded.as_str().to_string());
    if Some(&expected_status) != report.status.as_ref() {
        report.mismatches.push(format!(
            "workflow status: expected {expected_status}, actual {}{}",
            report.status.as_deref().unwrap_or("?"),
            if state.errors.is_empty() {
                String::new()
            } else {
                format!(" (errors: {})", report.errors)
            }
        ));
    }
    if let Some(expected) = &spec.expected_output {
        let actual = report.output.clone().unwrap_or(Value::Null);
        if *expected != actual {
            report.mismatches.push(format!(
                "output differs:\n  expected: {expected}\n  actual:   {actual}"
            ));
        }
    }
    if let Some(expected) = &spec.expected_term_tasks {
        let mut e: Vec<String> = expected.iter().map(|s| normalize_seq(s)).collect();
        let mut a: Vec<String> = state
            .sequence
            .iter()
            .filter(|t| t.term)
            .map(|t| format!("{}__r{}", t.id, t.route))
            .collect();
        e.sort();
        a.sort();
        if let Some(d) = list_diff("terminal tasks", &e, &a) {
            report.mismatches.push(d);
        }
    }
    if let Some(expected) = &spec.expected_errors
        && *expected != report.errors
    {
        report.mismatches.push(format!(
            "errors differ:\n  expected: {expected}\n  actual:   {}",
            report.errors
        ));
    }
    report
}
