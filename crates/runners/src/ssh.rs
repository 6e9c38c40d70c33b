//! The `remote-shell-cmd` and `remote-shell-script` runners: SSH push mode.
//!
//! Each host gets one run of the system `ssh` client, started with argv only
//! and these options: `BatchMode=yes` (never prompt), `StrictHostKeyChecking=yes`
//! (a host key not in known_hosts is an error, never accepted or added),
//! `IdentitiesOnly=yes`, `ConnectTimeout`, and the `known_hosts` file given.
//!
//! The remote command is shell text for the remote shell, so it is built
//! here from three parts: the action's `cmd` (the action author's shell text,
//! as for `local-shell-cmd`), and parameter values, which only ever appear as
//! single-quoted words (`export ST2_ACTION_X='...'`, positional arguments),
//! with `'` written as `'\''`. The whole script is then quoted once more as
//! the argument of `sh -c` (or `sudo -n -- sh -c`), so the login shell of the
//! remote user only sees one plain command. `remote-shell-script` sends the
//! script on ssh's stdin into a private temporary file on the host, runs it
//! with the quoted arguments and removes it.
//!
//! Hosts run in parallel up to `concurrency` (or one by one). The result is
//! StackStorm's: an object keyed by host, each with `stdout`, `stderr`,
//! `return_code`, `succeeded`, `failed`; the run fails if any host failed.
//! Timeout and cancel kill every `ssh` process still running (the remote
//! command gets SIGHUP only if it reads or writes its closed connection).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use aviary_core::model::ExecutionStatus;
use serde_json::{Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::sync::Semaphore;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::mask::Masker;
use crate::shell::{action_params, build_args, env_name};
use crate::{
    OUTPUT_CAP, OutputEvent, REMOTE_SHELL_CMD, RunOutcome, RunRequest, RunnerError, Stream,
    effective_timeout, value_text,
};

/// Upper bound of the `concurrency` parameter.
const MAX_CONCURRENCY: u64 = 256;

/// One host to run on.
#[derive(Debug, Clone)]
struct Target {
    /// The entry as given (the result key).
    key: String,
    /// Host name or address.
    host: String,
    /// SSH port.
    port: u16,
}

/// Captured output of one host.
#[derive(Debug, Default)]
struct HostOut {
    stdout: String,
    stderr: String,
    truncated: bool,
}

/// Runs a remote shell runner to completion.
pub(crate) async fn run(
    req: &RunRequest,
    masker: &Masker,
    output: UnboundedSender<OutputEvent>,
    cancel: CancellationToken,
) -> Result<RunOutcome, RunnerError> {
    let timeout = effective_timeout(req);
    let invalid = |name: &str, reason: String| RunnerError::InvalidParameter {
        action: req.action_ref.clone(),
        name: name.to_owned(),
        reason,
    };
    let port = match req.parameters.get("port") {
        None | Some(Value::Null) => 22,
        Some(v) => v
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p > 0)
            .ok_or_else(|| invalid("port", "it must be a port number 1-65535".into()))?,
    };
    let targets = parse_hosts(req, port)?;
    let username = optional_string(req, "username")?;
    if let Some(u) = &username
        && (u.starts_with('-') || u.contains(|c: char| c.is_whitespace() || c == '@'))
    {
        return Err(invalid(
            "username",
            format!("{u:?} is not a user name (no leading '-', spaces or '@')"),
        ));
    }
    let known_hosts = optional_string(req, "known_hosts")?;
    if let Some(k) = &known_hosts
        && k.contains(|c: char| c.is_whitespace() || c == '"' || c == '\'')
    {
        return Err(invalid(
            "known_hosts",
            format!("{k:?}: use a path without spaces or quotes"),
        ));
    }
    let sudo = flag(req, "sudo", false)?;
    let parallel = flag(req, "parallel", true)?;
    let concurrency = match req.parameters.get("concurrency") {
        None | Some(Value::Null) => 10,
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=MAX_CONCURRENCY).contains(n))
            .ok_or_else(|| {
                invalid(
                    "concurrency",
                    format!("it must be an integer from 1 to {MAX_CONCURRENCY}"),
                )
            })?,
    };
    let concurrency = if parallel {
        usize::try_from(concurrency).unwrap_or(1)
    } else {
        1
    };
    let connect_timeout = match req.parameters.get("connect_timeout") {
        None | Some(Value::Null) => 10,
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=3600).contains(n))
            .ok_or_else(|| invalid("connect_timeout", "it must be 1-3600 seconds".into()))?,
    };

    // The private key: a path, or the key text written to a private temp file.
    let mut _key_file: Option<tempfile::NamedTempFile> = None;
    let key_path: Option<PathBuf> = match optional_string(req, "private_key")? {
        None => None,
        Some(k) if k.contains("PRIVATE KEY-----") => {
            let mut f = tempfile::NamedTempFile::new().map_err(|e| {
                invalid(
                    "private_key",
                    format!("cannot write it to a temporary file: {e}"),
                )
            })?;
            let mut text = k.clone();
            if !text.ends_with('\n') {
                text.push('\n');
            }
            std::io::Write::write_all(&mut f, text.as_bytes()).map_err(|e| {
                invalid(
                    "private_key",
                    format!("cannot write it to a temporary file: {e}"),
                )
            })?;
            let path = f.path().to_owned();
            _key_file = Some(f);
            Some(path)
        }
        Some(path) => {
            let p = PathBuf::from(&path);
            if !p.is_file() {
                return Err(invalid(
                    "private_key",
                    "it is neither key text (-----BEGIN ... PRIVATE KEY-----) nor an existing file"
                        .into(),
                ));
            }
            Some(p)
        }
    };

    let (script, stdin_data) = remote_script(req)?;
    let inner = quote(&script).map_err(|r| invalid("parameters", r))?;
    let remote = if sudo {
        format!("sudo -n -- sh -c {inner}")
    } else {
        format!("sh -c {inner}")
    };

    let mut base: Vec<String> = Vec::new();
    for opt in [
        "BatchMode=yes".to_owned(),
        "StrictHostKeyChecking=yes".to_owned(),
        "IdentitiesOnly=yes".to_owned(),
        "PasswordAuthentication=no".to_owned(),
        "KbdInteractiveAuthentication=no".to_owned(),
        "LogLevel=ERROR".to_owned(),
        format!("ConnectTimeout={connect_timeout}"),
    ] {
        base.push("-o".into());
        base.push(opt);
    }
    if let Some(k) = &known_hosts {
        base.extend([
            "-o".into(),
            format!("UserKnownHostsFile={k}"),
            "-o".into(),
            "GlobalKnownHostsFile=/dev/null".into(),
        ]);
    }
    if let Some(k) = &key_path {
        base.push("-i".into());
        base.push(k.display().to_string());
    }
    if let Some(u) = &username {
        base.push("-l".into());
        base.push(u.clone());
    }

    let semaphore = Arc::new(Semaphore::new(concurrency));
    let stop = CancellationToken::new();
    let masker = Arc::new(masker.clone());
    let stdin_data = Arc::new(stdin_data);
    let mut outs: Vec<(Target, Arc<Mutex<HostOut>>)> = Vec::new();
    let mut tasks: JoinSet<(usize, Option<i32>, Option<String>)> = JoinSet::new();
    for (i, target) in targets.into_iter().enumerate() {
        let out = Arc::new(Mutex::new(HostOut::default()));
        outs.push((target.clone(), Arc::clone(&out)));
        let mut argv = base.clone();
        argv.extend(["-p".into(), target.port.to_string(), "--".into()]);
        argv.push(target.host.clone());
        argv.push(remote.clone());
        let semaphore = Arc::clone(&semaphore);
        let masker = Arc::clone(&masker);
        let stdin_data = Arc::clone(&stdin_data);
        let tx = output.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            let _permit = tokio::select! {
                p = semaphore.acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return (i, None, Some("could not start".to_owned())),
                },
                _ = stop.cancelled() => return (i, None, None),
            };
            let (code, err) = run_host(&target, argv, stdin_data, out, masker, tx, stop).await;
            (i, code, err)
        });
    }

    let mut done: Vec<Option<(Option<i32>, Option<String>)>> = vec![None; outs.len()];
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let stopped = loop {
        tokio::select! {
            next = tasks.join_next() => match next {
                None => break None,
                Some(Ok((i, code, err))) => done[i] = Some((code, err)),
                Some(Err(e)) => tracing::warn!(error = %e, "ssh host task failed"),
            },
            _ = &mut deadline => break Some(ExecutionStatus::Timeout),
            _ = cancel.cancelled() => break Some(ExecutionStatus::Canceled),
        }
    };
    if stopped.is_some() {
        // Every host still running kills its ssh and waits for it to exit.
        stop.cancel();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
    }
    // Safety net: dropping a task drops its ssh child, which is killed on drop.
    tasks.shutdown().await;

    let mut result = Map::new();
    let mut all_ok = true;
    for ((target, out), end) in outs.iter().zip(done) {
        let captured = std::mem::take(&mut *out.lock().unwrap_or_else(|p| p.into_inner()));
        let mut entry = Map::new();
        let (code, error) = match end {
            Some((code, error)) => (code, error),
            None => (
                None,
                Some(match stopped {
                    Some(ExecutionStatus::Canceled) => "canceled; ssh was killed".to_owned(),
                    _ => format!(
                        "did not finish within {:.1} s; ssh was killed",
                        timeout.as_secs_f64()
                    ),
                }),
            ),
        };
        let ok = code == Some(0);
        all_ok &= ok;
        let mut stdout = captured.stdout;
        let mut stderr = captured.stderr;
        if captured.truncated {
            stderr.push_str("\n[aviary: output truncated at 1 MiB]");
        }
        strip_newline(&mut stdout);
        strip_newline(&mut stderr);
        entry.insert("stdout".into(), Value::String(stdout));
        entry.insert("stderr".into(), Value::String(stderr));
        entry.insert("return_code".into(), code.map_or(Value::Null, Value::from));
        entry.insert("succeeded".into(), Value::Bool(ok));
        entry.insert("failed".into(), Value::Bool(!ok));
        if let Some(e) = error {
            entry.insert("error".into(), Value::String(masker.mask_str(&e)));
        } else if code == Some(255) {
            entry.insert(
                "error".into(),
                Value::String(
                    "ssh failed (exit 255): connection, authentication or host key \
                     verification; see stderr"
                        .into(),
                ),
            );
        }
        result.insert(target.key.clone(), Value::Object(entry));
    }
    let status = match stopped {
        Some(s) => s,
        None if all_ok => ExecutionStatus::Succeeded,
        None => ExecutionStatus::Failed,
    };
    Ok(RunOutcome {
        status,
        result: Value::Object(result),
    })
}

/// Runs ssh for one host (until it ends or `stop` fires: then ssh is killed
/// and reaped); returns its exit code (None if killed or not
/// started) and an error message if it could not run.
async fn run_host(
    target: &Target,
    argv: Vec<String>,
    stdin_data: Arc<Option<Vec<u8>>>,
    out: Arc<Mutex<HostOut>>,
    masker: Arc<Masker>,
    tx: UnboundedSender<OutputEvent>,
    stop: CancellationToken,
) -> (Option<i32>, Option<String>) {
    let mut cmd = tokio::process::Command::new("ssh");
    cmd.args(&argv)
        .stdin(if stdin_data.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return (
                None,
                Some(format!(
                    "could not start ssh: {e}; install the OpenSSH client (openssh-client)"
                )),
            );
        }
    };
    let writer = match (child.stdin.take(), stdin_data.as_ref()) {
        (Some(mut stdin), Some(data)) => {
            let data = data.clone();
            Some(tokio::spawn(async move {
                let _ = stdin.write_all(&data).await;
                let _ = stdin.shutdown().await;
            }))
        }
        _ => None,
    };
    let prefix = format!("{}: ", target.key);
    let pump_out = pump(
        child.stdout.take(),
        Stream::Stdout,
        prefix.clone(),
        Arc::clone(&out),
        Arc::clone(&masker),
        tx.clone(),
    );
    let pump_err = pump(child.stderr.take(), Stream::Stderr, prefix, out, masker, tx);
    let status = tokio::select! {
        (status, (), ()) = async { tokio::join!(child.wait(), pump_out, pump_err) } => status,
        _ = stop.cancelled() => {
            // Killed and reaped before the run reports its end.
            let _ = child.kill().await;
            if let Some(w) = writer {
                w.abort();
            }
            return (None, None);
        }
    };
    if let Some(w) = writer {
        w.abort();
    }
    match status {
        Ok(st) => (st.code(), None),
        Err(e) => (None, Some(format!("could not wait for ssh: {e}"))),
    }
}

/// Reads one stream line by line into the host's capture, streaming each
/// masked line prefixed with the host.
async fn pump<R: AsyncRead + Unpin>(
    reader: Option<R>,
    stream: Stream,
    prefix: String,
    out: Arc<Mutex<HostOut>>,
    masker: Arc<Masker>,
    tx: UnboundedSender<OutputEvent>,
) {
    let Some(reader) = reader else { return };
    let mut reader = BufReader::new(reader);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&masker.mask_bytes(&line)).into_owned();
        {
            let mut o = out.lock().unwrap_or_else(|p| p.into_inner());
            let HostOut {
                stdout,
                stderr,
                truncated,
            } = &mut *o;
            let buf = match stream {
                Stream::Stdout => stdout,
                Stream::Stderr => stderr,
            };
            if buf.len() + text.len() <= OUTPUT_CAP {
                buf.push_str(&text);
            } else {
                *truncated = true;
            }
        }
        let _ = tx.send(OutputEvent {
            stream,
            data: format!("{prefix}{text}"),
        });
    }
}

/// Removes one trailing newline (then one carriage return), as StackStorm does.
fn strip_newline(s: &mut String) {
    if s.ends_with('\n') {
        s.pop();
    }
    if s.ends_with('\r') {
        s.pop();
    }
}

/// `s` as one single-quoted shell word (`'` written as `'\''`). NUL cannot
/// be passed to a shell at all and is refused.
pub(crate) fn quote(s: &str) -> Result<String, String> {
    if s.contains('\0') {
        return Err("a value contains a NUL byte, which a remote shell cannot receive".into());
    }
    let mut q = String::with_capacity(s.len() + 2);
    q.push('\'');
    for c in s.chars() {
        if c == '\'' {
            q.push_str("'\\''");
        } else {
            q.push(c);
        }
    }
    q.push('\'');
    Ok(q)
}

/// True for a name usable in `export NAME=...`.
fn valid_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The script run by `sh -c` on each host, and the bytes to send on stdin
/// (the script file, for remote-shell-script).
fn remote_script(req: &RunRequest) -> Result<(String, Option<Vec<u8>>), RunnerError> {
    let invalid = |name: &str, reason: String| RunnerError::InvalidParameter {
        action: req.action_ref.clone(),
        name: name.to_owned(),
        reason,
    };
    let mut lines: Vec<String> = Vec::new();
    let mut export = |name: &str, value: &str, param: &str| -> Result<(), RunnerError> {
        let q = quote(value).map_err(|r| invalid(param, r))?;
        lines.push(format!("export {name}={q}"));
        Ok(())
    };
    for (name, value) in action_params(req) {
        if value.is_null() {
            continue;
        }
        let text = value_text(value);
        export(&env_name("AVIARY_PARAM_", name), &text, name)?;
        export(&env_name("ST2_ACTION_", name), &text, name)?;
    }
    match req.parameters.get("env") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (k, v) in map {
                if !valid_env_name(k) {
                    return Err(invalid(
                        "env",
                        format!(
                            "variable name {k:?} is not valid for a remote shell; use letters, digits and '_', not starting with a digit"
                        ),
                    ));
                }
                if !v.is_null() {
                    export(k, &value_text(v), "env")?;
                }
            }
        }
        Some(_) => {
            return Err(invalid(
                "env",
                "it must be an object of variable names to string values".into(),
            ));
        }
    }
    for (k, v) in &req.extra_env {
        if valid_env_name(k) {
            export(k, v, "env")?;
        }
    }
    if let Some(cwd) = optional_string(req, "cwd")? {
        let q = quote(&cwd).map_err(|r| invalid("cwd", r))?;
        lines.push(format!("cd -- {q} || exit 1"));
    }
    let mut args = Vec::new();
    for a in build_args(req)? {
        args.push(quote(&a).map_err(|r| invalid("parameters", r))?);
    }
    let args = args.join(" ");
    if req.runner_type == REMOTE_SHELL_CMD {
        let cmd = match req.parameters.get("cmd") {
            Some(Value::String(s)) if !s.trim().is_empty() => s.trim_end().to_owned(),
            Some(Value::Null) | None => {
                return Err(RunnerError::MissingParameter {
                    action: req.action_ref.clone(),
                    name: "cmd".into(),
                });
            }
            Some(_) => {
                return Err(invalid(
                    "cmd",
                    "it must be a non-empty string of shell text".into(),
                ));
            }
        };
        if !args.is_empty() && cmd.ends_with([';', '&', '|']) {
            return Err(invalid(
                "cmd",
                "it ends with ';', '&' or '|' but the action has parameters that are passed \
                 as arguments after it; end cmd with the command that takes them"
                    .into(),
            ));
        }
        if args.is_empty() {
            lines.push(cmd);
        } else {
            lines.push(format!("{cmd} {args}"));
        }
        Ok((lines.join("\n"), None))
    } else {
        let entry = req
            .entry_point
            .clone()
            .ok_or_else(|| RunnerError::MissingEntryPoint {
                action: req.action_ref.clone(),
            })?;
        let body = std::fs::read(&entry).map_err(|source| RunnerError::Spawn {
            action: req.action_ref.clone(),
            program: entry.display().to_string(),
            source,
            hint: "; the entry point must be a readable file in the pack",
        })?;
        let mut script = vec![
            "AVIARY_SCRIPT=$(mktemp) || exit 1".to_owned(),
            "trap 'rm -f \"$AVIARY_SCRIPT\"' EXIT".to_owned(),
            "cat > \"$AVIARY_SCRIPT\" && chmod 700 \"$AVIARY_SCRIPT\" || exit 1".to_owned(),
        ];
        script.extend(lines);
        script.push(format!("\"$AVIARY_SCRIPT\" {args} < /dev/null"));
        Ok((script.join("\n"), Some(body)))
    }
}

/// The `hosts` parameter: a comma-separated list of `host` or `host:port`
/// (`[v6addr]:port`).
fn parse_hosts(req: &RunRequest, default_port: u16) -> Result<Vec<Target>, RunnerError> {
    let invalid = |reason: String| RunnerError::InvalidParameter {
        action: req.action_ref.clone(),
        name: "hosts".into(),
        reason,
    };
    let list = match req.parameters.get("hosts") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => items.iter().map(value_text).collect::<Vec<_>>().join(","),
        Some(Value::Null) | None => {
            return Err(RunnerError::MissingParameter {
                action: req.action_ref.clone(),
                name: "hosts".into(),
            });
        }
        Some(_) => {
            return Err(invalid(
                "it must be a comma-separated string of hosts".into(),
            ));
        }
    };
    let mut out: Vec<Target> = Vec::new();
    for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (host, port) = if let Some(rest) = entry.strip_prefix('[') {
            let (h, tail) = rest
                .split_once(']')
                .ok_or_else(|| invalid(format!("{entry:?}: missing ']'")))?;
            let port = match tail.strip_prefix(':') {
                Some(p) => Some(p),
                None if tail.is_empty() => None,
                None => return Err(invalid(format!("{entry:?}: expected [address]:port"))),
            };
            (h.to_owned(), port)
        } else if entry.matches(':').count() == 1 {
            let (h, p) = entry.split_once(':').unwrap_or((entry, ""));
            (h.to_owned(), Some(p))
        } else {
            (entry.to_owned(), None)
        };
        let port = match port {
            None => default_port,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| invalid(format!("{entry:?}: port must be 1-65535")))?,
        };
        let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '%');
        if host.is_empty() || host.starts_with('-') || !host.chars().all(plain) {
            return Err(invalid(format!(
                "{entry:?} is not a host name or address (letters, digits, '.', '-', '_'; not starting with '-')"
            )));
        }
        if out.iter().any(|t| t.key == entry) {
            continue;
        }
        out.push(Target {
            key: entry.to_owned(),
            host,
            port,
        });
    }
    if out.is_empty() {
        return Err(invalid(
            "it lists no host; give e.g. \"web1,web2:2222\"".into(),
        ));
    }
    Ok(out)
}

fn optional_string(req: &RunRequest, name: &str) -> Result<Option<String>, RunnerError> {
    match req.parameters.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(RunnerError::InvalidParameter {
            action: req.action_ref.clone(),
            name: name.to_owned(),
            reason: "it must be a string".into(),
        }),
    }
}

fn flag(req: &RunRequest, name: &str, default: bool) -> Result<bool, RunnerError> {
    match req.parameters.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(RunnerError::InvalidParameter {
            action: req.action_ref.clone(),
            name: name.to_owned(),
            reason: "it must be true or false".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_round_trips_through_sh() {
        for v in [
            "plain",
            "it's",
            "$(touch /tmp/x); `id` \"q\" \\ \n new line",
            "''",
            "",
        ] {
            let q = quote(v).expect("quote");
            let out = std::process::Command::new("sh")
                .args(["-c", &format!("printf %s {q}")])
                .output()
                .expect("sh");
            assert_eq!(String::from_utf8_lossy(&out.stdout), v);
        }
        assert!(quote("a\0b").is_err());
    }

    #[test]
    fn env_names_for_remote_shells() {
        assert!(valid_env_name("ST2_ACTION_X"));
        assert!(valid_env_name("_a1"));
        assert!(!valid_env_name("1A"));
        assert!(!valid_env_name("A B"));
        assert!(!valid_env_name("A;rm"));
        assert!(!valid_env_name(""));
    }
}
