//! Helpers shared by the runner integration tests.

#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use aviary_runners::{OutputEvent, RunOutcome, RunRequest, Stream, run};
use serde_json::{Map, Value};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tokio_util::sync::CancellationToken;

/// Safety net for every run in the tests (never reached when things work).
pub const SAFETY: Duration = Duration::from_secs(60);

/// A request for `runner` with `params` (a JSON object) whose runner
/// parameters are `runner_params`.
pub fn request(runner: &str, params: Value, runner_params: &[&str], work_dir: &Path) -> RunRequest {
    let parameters: Map<String, Value> = match params {
        Value::Object(m) => m,
        _ => panic!("params must be an object"),
    };
    RunRequest {
        execution_id: "exec-1".into(),
        action_ref: "test.action".into(),
        runner_type: runner.into(),
        entry_point: None,
        parameters,
        runner_param_names: runner_params.iter().map(|s| s.to_string()).collect(),
        positions: Vec::new(),
        secrets: Vec::new(),
        timeout: SAFETY,
        work_dir: work_dir.to_path_buf(),
        extra_env: Vec::new(),
    }
}

/// A local-shell-cmd request running `cmd` with no action parameters.
pub fn cmd_request(cmd: &str, work_dir: &Path) -> RunRequest {
    request(
        "local-shell-cmd",
        serde_json::json!({ "cmd": cmd }),
        &["cmd", "env", "cwd", "kwarg_op", "timeout"],
        work_dir,
    )
}

/// Runs to completion and returns the outcome and every streamed event.
pub async fn run_collect(req: RunRequest) -> (RunOutcome, Vec<OutputEvent>) {
    let (tx, mut rx) = unbounded_channel();
    let outcome = tokio::time::timeout(SAFETY + SAFETY, run(req, tx, CancellationToken::new()))
        .await
        .expect("runner hung past the safety net");
    let mut events = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        events.push(ev);
    }
    (outcome, events)
}

/// Concatenation of the streamed chunks of one stream.
pub fn joined(events: &[OutputEvent], stream: Stream) -> String {
    events
        .iter()
        .filter(|e| e.stream == stream)
        .map(|e| e.data.as_str())
        .collect()
}

/// Receives events until the accumulated stdout contains `needle`.
pub async fn wait_for_stdout(rx: &mut UnboundedReceiver<OutputEvent>, needle: &str) -> String {
    let mut seen = String::new();
    tokio::time::timeout(SAFETY, async {
        while !seen.contains(needle) {
            match rx.recv().await {
                Some(ev) if ev.stream == Stream::Stdout => seen.push_str(&ev.data),
                Some(_) => {}
                None => panic!("output ended before {needle:?}; got {seen:?}"),
            }
        }
    })
    .await
    .expect("expected output never arrived");
    seen
}

/// A short random token for unique file names.
pub fn random_token() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    )
}
