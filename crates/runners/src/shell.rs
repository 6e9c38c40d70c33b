//! The `local-shell-cmd` and `local-shell-script` runners.
//!
//! The process runs in its own process group with stdin from `/dev/null` and
//! a clean environment. Action parameters reach it only as argv entries and
//! environment variables, never as shell text. On timeout or cancel the whole
//! group gets SIGTERM, then SIGKILL after a grace period, so background
//! children die too. Output is streamed line by line (partial lines after a
//! short delay) with secrets masked, and stored capped to its last 1 MiB.

use std::collections::HashSet;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use aviary_core::model::ExecutionStatus;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::mask::Masker;
use crate::{
    LOCAL_SHELL_CMD, OUTPUT_CAP, OutputEvent, RunOutcome, RunRequest, RunnerError, Stream,
    effective_timeout, value_text,
};

/// How long a partial line waits for its newline before it is streamed anyway.
const FLUSH_DELAY: Duration = Duration::from_millis(100);
/// Pending output above this size is streamed even without a newline.
const MAX_PENDING: usize = 64 * 1024;
/// Time between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// Safety net: how long to wait for output pipes after SIGKILL (a process that
/// left the group may still hold them open).
const DRAIN_AFTER_KILL: Duration = Duration::from_secs(2);
/// PATH used when the server has none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Runs a shell runner to completion.
pub(crate) async fn run(
    req: &RunRequest,
    masker: &Masker,
    output: UnboundedSender<OutputEvent>,
    cancel: CancellationToken,
) -> Result<RunOutcome, RunnerError> {
    let timeout = effective_timeout(req);
    let args = build_args(req)?;
    let env = build_env(req)?;
    let cwd = working_dir(req)?;

    let (program, argv): (PathBuf, Vec<String>) = if req.runner_type == LOCAL_SHELL_CMD {
        let cmd = shell_text(req, !args.is_empty())?;
        let mut argv = vec!["-c".to_owned(), cmd, "aviary".to_owned()];
        argv.extend(args);
        (PathBuf::from("/bin/bash"), argv)
    } else {
        let entry = req
            .entry_point
            .clone()
            .ok_or_else(|| RunnerError::MissingEntryPoint {
                action: req.action_ref.clone(),
            })?;
        (entry, args)
    };

    let mut command = tokio::process::Command::new(&program);
    command
        .args(&argv)
        .env_clear()
        .envs(env)
        .current_dir(&cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(|source| RunnerError::Spawn {
        action: req.action_ref.clone(),
        program: program.display().to_string(),
        hint: spawn_hint(&source),
        source,
    })?;
    let mut guard = GroupGuard {
        pgid: child.id().and_then(|id| i32::try_from(id).ok()),
        armed: true,
    };

    let masker = Arc::new(masker.clone());
    let stop_pumps = CancellationToken::new();
    let out_task = tokio::spawn(pump(
        child.stdout.take(),
        Stream::Stdout,
        Arc::clone(&masker),
        output.clone(),
        stop_pumps.clone(),
    ));
    let err_task = tokio::spawn(pump(
        child.stderr.take(),
        Stream::Stderr,
        Arc::clone(&masker),
        output,
        stop_pumps.clone(),
    ));
    let mut state = Waiting {
        child,
        status: None,
        out_task,
        out: None,
        err_task,
        err: None,
    };

    let stopped = match state.wait(Instant::now() + timeout, Some(&cancel)).await {
        WaitEnd::AllDone => None,
        WaitEnd::Deadline => Some(ExecutionStatus::Timeout),
        WaitEnd::Canceled => Some(ExecutionStatus::Canceled),
    };
    if stopped.is_some() {
        guard.signal(Signal::SIGTERM);
        let _ = state.wait(Instant::now() + KILL_GRACE, None).await;
        guard.signal(Signal::SIGKILL);
        if let WaitEnd::Deadline = state.wait(Instant::now() + DRAIN_AFTER_KILL, None).await {
            stop_pumps.cancel();
            let _ = state.wait(Instant::now() + DRAIN_AFTER_KILL, None).await;
        }
    }
    guard.armed = false;

    let exit = state.status.flatten();
    let out = state.out.take().unwrap_or_default();
    let err = state.err.take().unwrap_or_default();
    let return_code = exit.map(|st| st.code().or_else(|| st.signal().map(|s| -s)));
    let status = match stopped {
        Some(s) => s,
        None if exit.is_some_and(|st| st.success()) => ExecutionStatus::Succeeded,
        None => ExecutionStatus::Failed,
    };
    let succeeded = status == ExecutionStatus::Succeeded;

    let mut result = Map::new();
    let (stdout, stdout_complete) = out.text.finish();
    let (stderr, _) = err.text.finish();
    if stdout_complete
        && let Some(raw) = out.raw.as_deref()
        && let Ok(parsed) = serde_json::from_slice::<Value>(raw)
    {
        result.insert("result".into(), masker.mask_json(parsed));
    }
    result.insert("stdout".into(), Value::String(strip_shell_chars(stdout)));
    result.insert("stderr".into(), Value::String(strip_shell_chars(stderr)));
    result.insert(
        "return_code".into(),
        return_code.flatten().map_or(Value::Null, Value::from),
    );
    result.insert("succeeded".into(), Value::Bool(succeeded));
    result.insert("failed".into(), Value::Bool(!succeeded));
    match stopped {
        Some(ExecutionStatus::Timeout) => {
            result.insert(
                "error".into(),
                Value::String(format!(
                    "action {} did not finish within {:.1} s and was killed; raise its timeout if it needs longer",
                    req.action_ref,
                    timeout.as_secs_f64()
                )),
            );
        }
        Some(_) => {
            result.insert(
                "error".into(),
                Value::String(format!("action {} was canceled", req.action_ref)),
            );
        }
        None if exit.is_none() => {
            result.insert(
                "error".into(),
                Value::String(format!(
                    "action {}: could not get the exit status of the process",
                    req.action_ref
                )),
            );
        }
        None => {}
    }
    Ok(RunOutcome {
        status,
        result: Value::Object(result),
    })
}

/// Kills the process group if the run is abandoned (e.g. its future dropped).
struct GroupGuard {
    pgid: Option<i32>,
    armed: bool,
}

impl GroupGuard {
    /// Sends `sig` to the whole group; a group already gone is fine.
    fn signal(&self, sig: Signal) {
        if let Some(pgid) = self.pgid
            && pgid > 0
        {
            let _ = killpg(Pid::from_raw(pgid), sig);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            self.signal(Signal::SIGKILL);
        }
    }
}

/// Why [`Waiting::wait`] returned.
enum WaitEnd {
    /// The process exited and both output pipes closed.
    AllDone,
    /// The deadline passed first.
    Deadline,
    /// The cancel token fired first.
    Canceled,
}

/// A running process and its two output pumps.
struct Waiting {
    child: tokio::process::Child,
    /// `Some(None)` when waiting for the process failed.
    status: Option<Option<ExitStatus>>,
    out_task: JoinHandle<Captured>,
    out: Option<Captured>,
    err_task: JoinHandle<Captured>,
    err: Option<Captured>,
}

impl Waiting {
    /// Waits until everything finished, the deadline passes or `cancel` fires.
    async fn wait(&mut self, deadline: Instant, cancel: Option<&CancellationToken>) -> WaitEnd {
        let never = CancellationToken::new();
        let cancel = cancel.unwrap_or(&never);
        loop {
            if self.status.is_some() && self.out.is_some() && self.err.is_some() {
                return WaitEnd::AllDone;
            }
            tokio::select! {
                st = self.child.wait(), if self.status.is_none() => {
                    self.status = Some(st.ok());
                }
                r = &mut self.out_task, if self.out.is_none() => {
                    self.out = Some(r.unwrap_or_default());
                }
                r = &mut self.err_task, if self.err.is_none() => {
                    self.err = Some(r.unwrap_or_default());
                }
                _ = tokio::time::sleep_until(deadline) => return WaitEnd::Deadline,
                _ = cancel.cancelled() => return WaitEnd::Canceled,
            }
        }
    }
}

/// What a pump kept of one stream.
#[derive(Debug, Default)]
struct Captured {
    /// Masked text, tail-capped.
    text: TailBuf,
    /// Raw bytes while they fit in [`OUTPUT_CAP`] (for JSON parsing).
    raw: Option<Vec<u8>>,
}

/// Keeps the last [`OUTPUT_CAP`] bytes of a stream.
#[derive(Debug, Default)]
struct TailBuf {
    data: Vec<u8>,
    dropped: u64,
}

impl TailBuf {
    /// Appends bytes, dropping old ones now and then.
    fn push(&mut self, bytes: &[u8]) {
        self.data.extend_from_slice(bytes);
        if self.data.len() > 2 * OUTPUT_CAP {
            self.trim();
        }
    }

    /// Drops everything but the last [`OUTPUT_CAP`] bytes.
    fn trim(&mut self) {
        if self.data.len() > OUTPUT_CAP {
            let mut excess = self.data.len() - OUTPUT_CAP;
            // Do not start in the middle of a UTF-8 character.
            while excess < self.data.len() && (self.data[excess] & 0xC0) == 0x80 {
                excess += 1;
            }
            self.data.drain(..excess);
            self.dropped += excess as u64;
        }
    }

    /// The kept text (with a truncation marker) and whether it is complete.
    fn finish(mut self) -> (String, bool) {
        self.trim();
        let text = String::from_utf8_lossy(&self.data).into_owned();
        if self.dropped > 0 {
            (
                format!(
                    "[aviary: output truncated, {} earlier bytes dropped]\n{text}",
                    self.dropped
                ),
                false,
            )
        } else {
            (text, true)
        }
    }
}

/// How much of the pending output to stream now.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flush {
    /// Complete lines only.
    Lines,
    /// Everything that can be safely masked.
    Force,
    /// Everything: the stream ended.
    Eof,
}

/// Reads one output stream, streaming masked chunks and capturing them.
async fn pump<R: AsyncRead + Unpin>(
    reader: Option<R>,
    stream: Stream,
    masker: Arc<Masker>,
    tx: UnboundedSender<OutputEvent>,
    stop: CancellationToken,
) -> Captured {
    let mut cap = Captured {
        text: TailBuf::default(),
        raw: Some(Vec::new()),
    };
    let Some(mut reader) = reader else {
        return cap;
    };
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut timer_flushed = false;
    loop {
        let wait_flush = !pending.is_empty() && !timer_flushed;
        let read = tokio::select! {
            r = reader.read(&mut buf) => Some(r),
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(FLUSH_DELAY), if wait_flush => None,
        };
        match read {
            None => {
                timer_flushed = true;
                emit(&mut pending, Flush::Force, stream, &masker, &tx, &mut cap);
            }
            Some(Ok(0)) => break,
            Some(Ok(n)) => {
                let chunk = &buf[..n];
                if let Some(raw) = cap.raw.as_mut() {
                    if raw.len() + n > OUTPUT_CAP {
                        cap.raw = None;
                    } else {
                        raw.extend_from_slice(chunk);
                    }
                }
                pending.extend_from_slice(chunk);
                timer_flushed = false;
                let how = if pending.len() >= MAX_PENDING {
                    Flush::Force
                } else {
                    Flush::Lines
                };
                emit(&mut pending, how, stream, &masker, &tx, &mut cap);
            }
            Some(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Some(Err(_)) => break,
        }
    }
    emit(&mut pending, Flush::Eof, stream, &masker, &tx, &mut cap);
    cap
}

/// Streams and captures the part of `pending` that can go out now.
fn emit(
    pending: &mut Vec<u8>,
    how: Flush,
    stream: Stream,
    masker: &Masker,
    tx: &UnboundedSender<OutputEvent>,
    cap: &mut Captured,
) {
    let mut cut = match how {
        Flush::Eof | Flush::Force => pending.len(),
        Flush::Lines => pending
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |i| i + 1),
    };
    if how != Flush::Eof {
        cut = utf8_boundary(pending, cut);
        cut = masker.safe_cut(pending, cut);
    }
    if cut == 0 {
        return;
    }
    let masked = masker.mask_bytes(&pending[..cut]);
    pending.drain(..cut);
    let data = String::from_utf8_lossy(&masked).into_owned();
    cap.text.push(data.as_bytes());
    // A dropped receiver only means nobody is watching live output.
    let _ = tx.send(OutputEvent { stream, data });
}

/// Moves `cut` back so that `data[..cut]` does not end inside a UTF-8 character.
fn utf8_boundary(data: &[u8], cut: usize) -> usize {
    let mut start = cut;
    // Find the start of the last character (at most 3 continuation bytes back).
    while start > 0 && cut - start < 4 && (data[start - 1] & 0xC0) == 0x80 {
        start -= 1;
    }
    if start == 0 {
        return cut;
    }
    let lead = data[start - 1];
    let needed = match lead {
        0x00..=0x7F => 1,
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF7 => 4,
        _ => return cut,
    };
    if cut - (start - 1) < needed {
        start - 1
    } else {
        cut
    }
}

/// Removes one trailing newline (then one carriage return), as StackStorm does.
fn strip_shell_chars(mut s: String) -> String {
    if s.ends_with('\n') {
        s.pop();
    }
    if s.ends_with('\r') {
        s.pop();
    }
    s
}

/// The bash script text for local-shell-cmd: `<cmd> "$@"`.
fn shell_text(req: &RunRequest, has_args: bool) -> Result<String, RunnerError> {
    let cmd = match req.parameters.get("cmd") {
        Some(Value::String(s)) => s.trim_end(),
        Some(Value::Null) | None => {
            return Err(RunnerError::MissingParameter {
                action: req.action_ref.clone(),
                name: "cmd".into(),
            });
        }
        Some(_) => {
            return Err(RunnerError::InvalidParameter {
                action: req.action_ref.clone(),
                name: "cmd".into(),
                reason: "it must be a string of shell text".into(),
            });
        }
    };
    if cmd.is_empty() {
        return Err(RunnerError::InvalidParameter {
            action: req.action_ref.clone(),
            name: "cmd".into(),
            reason: "it is empty; give the command to run".into(),
        });
    }
    if !has_args {
        return Ok(cmd.to_owned());
    }
    // The arguments are appended as "$@"; after a command separator they would
    // become a command of their own.
    if cmd.ends_with([';', '&', '|']) {
        return Err(RunnerError::InvalidParameter {
            action: req.action_ref.clone(),
            name: "cmd".into(),
            reason: "it ends with ';', '&' or '|' but the action has parameters that are passed \
                     as arguments after it; end cmd with the command that takes them"
                .into(),
        });
    }
    Ok(format!("{cmd} \"$@\""))
}

/// Names of the action (non-runner) parameters.
pub(crate) fn action_params(req: &RunRequest) -> impl Iterator<Item = (&String, &Value)> {
    let runner: HashSet<&str> = req.runner_param_names.iter().map(String::as_str).collect();
    req.parameters
        .iter()
        .filter(move |(k, _)| !runner.contains(k.as_str()))
}

/// Positional parameters in position order, then `<kwarg_op><name>=<value>`.
pub(crate) fn build_args(req: &RunRequest) -> Result<Vec<String>, RunnerError> {
    let kwarg_op = match req.parameters.get("kwarg_op") {
        None | Some(Value::Null) => "--".to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(RunnerError::InvalidParameter {
                action: req.action_ref.clone(),
                name: "kwarg_op".into(),
                reason: "it must be a string such as \"--\" or \"-\"".into(),
            });
        }
    };
    let mut positions = req.positions.clone();
    positions.sort_by_key(|(name, pos)| (*pos, name.clone()));
    let positional: HashSet<&str> = positions.iter().map(|(n, _)| n.as_str()).collect();

    let mut args: Vec<Option<String>> = positions
        .iter()
        .map(|(name, _)| match req.parameters.get(name) {
            None | Some(Value::Null) => None,
            Some(v) => Some(value_text(v)),
        })
        .collect();
    // Missing values keep later positions in place (as ""), but trailing ones
    // are left out.
    while matches!(args.last(), Some(None)) {
        args.pop();
    }
    let mut out: Vec<String> = args.into_iter().map(Option::unwrap_or_default).collect();
    for (name, value) in action_params(req) {
        if positional.contains(name.as_str()) || value.is_null() {
            continue;
        }
        out.push(format!("{kwarg_op}{name}={}", value_text(value)));
    }
    Ok(out)
}

/// Environment variable name for a parameter name.
pub(crate) fn env_name(prefix: &str, name: &str) -> String {
    let mut s = String::with_capacity(prefix.len() + name.len());
    s.push_str(prefix);
    s.extend(name.chars().map(|c| {
        if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        }
    }));
    s
}

/// The clean environment of the process.
fn build_env(req: &RunRequest) -> Result<Vec<(String, String)>, RunnerError> {
    let mut env: Vec<(String, String)> = Vec::new();
    let path = std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.to_owned());
    env.push(("PATH".into(), path));
    for var in ["HOME", "LANG", "USER"] {
        if let Ok(v) = std::env::var(var) {
            env.push((var.into(), v));
        }
    }
    for (name, value) in action_params(req) {
        if value.is_null() {
            continue;
        }
        let text = value_text(value);
        env.push((env_name("AVIARY_PARAM_", name), text.clone()));
        env.push((env_name("ST2_ACTION_", name), text));
    }
    match req.parameters.get("env") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (k, v) in map {
                if k.is_empty() || k.contains(['=', '\0']) {
                    return Err(RunnerError::InvalidParameter {
                        action: req.action_ref.clone(),
                        name: "env".into(),
                        reason: format!(
                            "variable name {k:?} is not valid; names must be non-empty and contain no '=' or NUL"
                        ),
                    });
                }
                if !v.is_null() {
                    env.push((k.clone(), value_text(v)));
                }
            }
        }
        Some(_) => {
            return Err(RunnerError::InvalidParameter {
                action: req.action_ref.clone(),
                name: "env".into(),
                reason: "it must be an object of variable names to string values".into(),
            });
        }
    }
    env.extend(req.extra_env.iter().cloned());
    Ok(env)
}

/// The working directory: the `cwd` parameter or the request's work_dir.
fn working_dir(req: &RunRequest) -> Result<PathBuf, RunnerError> {
    let dir = match req.parameters.get("cwd") {
        None | Some(Value::Null) => return Ok(req.work_dir.clone()),
        Some(Value::String(s)) if !s.is_empty() => PathBuf::from(s),
        Some(_) => {
            return Err(RunnerError::InvalidParameter {
                action: req.action_ref.clone(),
                name: "cwd".into(),
                reason: "it must be a directory path".into(),
            });
        }
    };
    if !dir.is_dir() {
        return Err(RunnerError::InvalidParameter {
            action: req.action_ref.clone(),
            name: "cwd".into(),
            reason: format!("{} is not an existing directory", dir.display()),
        });
    }
    Ok(dir)
}

/// What to do when a program cannot be started.
fn spawn_hint(e: &std::io::Error) -> &'static str {
    match (e.kind(), e.raw_os_error()) {
        (std::io::ErrorKind::PermissionDenied, _) => {
            "; make the script executable (chmod +x) and check the directory permissions"
        }
        (_, Some(8)) => "; start the script with a shebang line such as #!/bin/sh",
        (std::io::ErrorKind::NotFound, _) => {
            "; check that the file and the interpreter named in its shebang line exist"
        }
        (std::io::ErrorKind::InvalidInput, _) => {
            "; a parameter or environment value contains a NUL byte, which processes cannot receive"
        }
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_boundary_holds_back_partial_char() {
        let s = "aé".as_bytes(); // 61 C3 A9
        assert_eq!(utf8_boundary(s, 3), 3);
        assert_eq!(utf8_boundary(s, 2), 1);
        assert_eq!(utf8_boundary(b"abc", 2), 2);
    }

    #[test]
    fn tail_buf_keeps_tail_and_marks() {
        let mut t = TailBuf::default();
        t.push(&vec![b'a'; OUTPUT_CAP]);
        t.push(b"end");
        let (text, complete) = t.finish();
        assert!(!complete);
        assert!(text.starts_with("[aviary: output truncated, 3 earlier bytes dropped]\n"));
        assert!(text.ends_with("aend"));
    }

    #[test]
    fn env_names_are_upper_snake() {
        assert_eq!(
            env_name("AVIARY_PARAM_", "my-param.x"),
            "AVIARY_PARAM_MY_PARAM_X"
        );
    }
}
