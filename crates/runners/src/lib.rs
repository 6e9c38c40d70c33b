//! Aviary's action runners: `noop`, `local-shell-cmd`, `local-shell-script`,
//! `http-request`, `ci-build`, `jenkins-build`, and over SSH `remote-shell-cmd`
//! and `remote-shell-script`; [`checkout`] is the `ci-build` checkout for
//! steps the server runs itself (`ci-package`).
//!
//! [`run`] executes one action to completion and returns a [`RunOutcome`]
//! whose `result` has StackStorm's shape for the runner. Output of the shell
//! runners is streamed as [`OutputEvent`]s while the action runs. Secret values
//! are masked everywhere (streamed chunks, stored output, result).
//!
//! Event data never reaches a local shell as text: action parameters are
//! passed as argv entries and environment variables only. For a remote shell
//! (SSH), where the command is necessarily text, they appear only as
//! single-quoted words.

mod ci;
mod http;
mod jenkins;
mod mask;
mod shell;
mod ssh;

pub use ci::{Checkout, checkout};

use std::path::PathBuf;
use std::time::Duration;

use aviary_core::model::ExecutionStatus;
use serde_json::{Map, Value};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

/// Runner type that does nothing and succeeds.
pub const NOOP: &str = "noop";
/// Runner type that runs a shell command line with bash.
pub const LOCAL_SHELL_CMD: &str = "local-shell-cmd";
/// Runner type that runs an executable script (via its shebang).
pub const LOCAL_SHELL_SCRIPT: &str = "local-shell-script";
/// Runner type that makes one HTTP request.
pub const HTTP_REQUEST: &str = "http-request";
/// Runner type: check out a repository and run its CI scripts.
pub const CI_BUILD: &str = "ci-build";
/// Runner type: start a Jenkins job over its REST API.
pub const JENKINS_BUILD: &str = "jenkins-build";
/// Runner type that runs a shell command on remote hosts over SSH.
pub const REMOTE_SHELL_CMD: &str = "remote-shell-cmd";
/// Runner type that runs a script (the entry point) on remote hosts over SSH.
pub const REMOTE_SHELL_SCRIPT: &str = "remote-shell-script";

/// Every runner type this crate can run.
pub const KNOWN_RUNNERS: [&str; 8] = [
    NOOP,
    LOCAL_SHELL_CMD,
    LOCAL_SHELL_SCRIPT,
    HTTP_REQUEST,
    CI_BUILD,
    JENKINS_BUILD,
    REMOTE_SHELL_CMD,
    REMOTE_SHELL_SCRIPT,
];

/// Maximum stored size of stdout, stderr and an HTTP response body (1 MiB).
pub const OUTPUT_CAP: usize = 1024 * 1024;

/// Everything a runner needs to run one execution.
#[derive(Debug, Clone)]
pub struct RunRequest {
    /// Execution identifier (for logs).
    pub execution_id: String,
    /// Action reference, `pack.name` (for logs and messages).
    pub action_ref: String,
    /// One of [`KNOWN_RUNNERS`].
    pub runner_type: String,
    /// Absolute path of the script (local-shell-script), already checked by the caller.
    pub entry_point: Option<PathBuf>,
    /// Resolved parameters: runner parameters (cmd, env, cwd, timeout, url, ...)
    /// and action parameters, with real secret values.
    pub parameters: Map<String, Value>,
    /// Which keys of `parameters` are runner parameters (the rest are action parameters).
    pub runner_param_names: Vec<String>,
    /// Action parameters that are positional: name -> position.
    pub positions: Vec<(String, u32)>,
    /// Values to mask in output and result, however short.
    pub secrets: Vec<String>,
    /// Maximum run time; a smaller `timeout` parameter (seconds) also applies.
    pub timeout: Duration,
    /// Default working directory (the caller creates it; the `cwd` parameter overrides).
    pub work_dir: PathBuf,
    /// Extra environment variables, e.g. `AVIARY_EXECUTION_ID`, `AVIARY_API_URL`.
    pub extra_env: Vec<(String, String)>,
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// A chunk of (masked) output, as it arrives: usually whole lines, sometimes a
/// partial line flushed after a short delay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputEvent {
    /// The stream it was written to.
    pub stream: Stream,
    /// The text (invalid UTF-8 replaced by U+FFFD).
    pub data: String,
}

/// How an execution ended.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOutcome {
    /// One of `Succeeded`, `Failed`, `Timeout`, `Canceled`.
    pub status: ExecutionStatus,
    /// Runner result (StackStorm shape), secrets masked.
    pub result: Value,
}

impl RunOutcome {
    /// An outcome with this status whose result is `{"error": message}`.
    pub fn error(status: ExecutionStatus, message: impl Into<String>) -> Self {
        let mut m = Map::new();
        m.insert("error".into(), Value::String(message.into()));
        Self {
            status,
            result: Value::Object(m),
        }
    }
}

/// Errors preparing a run; reported to the user as `{"error": "..."}` in a
/// `Failed` outcome.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The runner type is not one of [`KNOWN_RUNNERS`].
    #[error(
        "action {action}: unknown runner type '{runner}'; use one of noop, local-shell-cmd, local-shell-script, http-request, ci-build, remote-shell-cmd, remote-shell-script"
    )]
    UnknownRunner {
        /// Action reference.
        action: String,
        /// The runner type given.
        runner: String,
    },
    /// A required runner parameter is missing.
    #[error(
        "action {action}: runner parameter '{name}' is required; set it in the action metadata or the rule"
    )]
    MissingParameter {
        /// Action reference.
        action: String,
        /// Parameter name.
        name: String,
    },
    /// A parameter has the wrong type or value.
    #[error("action {action}: parameter '{name}' is invalid: {reason}")]
    InvalidParameter {
        /// Action reference.
        action: String,
        /// Parameter name.
        name: String,
        /// What is wrong and what is expected.
        reason: String,
    },
    /// The local-shell-script runner needs an entry point.
    #[error(
        "action {action}: runner local-shell-script needs an entry_point (the script to run); set entry_point in the action metadata"
    )]
    MissingEntryPoint {
        /// Action reference.
        action: String,
    },
    /// The process could not be started.
    #[error("action {action}: could not start {program}: {source}{hint}")]
    Spawn {
        /// Action reference.
        action: String,
        /// Program that failed to start.
        program: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// The HTTP client could not be built.
    #[error("action {action}: could not set up the HTTP client: {source}")]
    HttpClient {
        /// Action reference.
        action: String,
        /// Underlying error.
        #[source]
        source: reqwest::Error,
    },
}

/// True if [`run`] knows `runner_type`.
pub fn is_known_runner(runner_type: &str) -> bool {
    KNOWN_RUNNERS.contains(&runner_type)
}

/// Runs one execution to completion.
///
/// Output is streamed to `output` (an unbounded channel, so a slow receiver
/// never blocks the runner; a dropped receiver is ignored). The run stops on
/// timeout (status `Timeout`) or when `cancel` fires (status `Canceled`); the
/// shell runners then terminate the whole process group.
pub async fn run(
    req: RunRequest,
    output: UnboundedSender<OutputEvent>,
    cancel: CancellationToken,
) -> RunOutcome {
    let masker = mask::Masker::new(&req.secrets);
    if cancel.is_cancelled() {
        return RunOutcome::error(ExecutionStatus::Canceled, "canceled before it started");
    }
    tracing::debug!(
        execution = %req.execution_id,
        action = %req.action_ref,
        runner = %req.runner_type,
        "running action"
    );
    let outcome = match req.runner_type.as_str() {
        NOOP => Ok(RunOutcome {
            status: ExecutionStatus::Succeeded,
            result: Value::Object(Map::new()),
        }),
        LOCAL_SHELL_CMD | LOCAL_SHELL_SCRIPT => shell::run(&req, &masker, output, cancel).await,
        HTTP_REQUEST => http::run(&req, &masker, cancel).await,
        CI_BUILD => ci::run(&req, &masker, output, cancel).await,
        JENKINS_BUILD => jenkins::run(&req, &masker, cancel).await,
        REMOTE_SHELL_CMD | REMOTE_SHELL_SCRIPT => ssh::run(&req, &masker, output, cancel).await,
        other => Err(RunnerError::UnknownRunner {
            action: req.action_ref.clone(),
            runner: other.to_owned(),
        }),
    };
    let outcome = outcome.unwrap_or_else(|e| {
        RunOutcome::error(ExecutionStatus::Failed, masker.mask_str(&e.to_string()))
    });
    tracing::debug!(
        execution = %req.execution_id,
        status = outcome.status.as_str(),
        "action finished"
    );
    outcome
}

/// Effective timeout: the request's, or the `timeout` parameter (seconds) if smaller.
pub(crate) fn effective_timeout(req: &RunRequest) -> Duration {
    let param = req
        .parameters
        .get("timeout")
        .and_then(Value::as_f64)
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64);
    match param {
        Some(p) if p < req.timeout => p,
        _ => req.timeout,
    }
}

/// A parameter value as command-line / environment text: strings raw,
/// everything else as JSON text.
fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
