//! `aviary run` and `aviary execution ...`: starting executions and following
//! their output (server-sent events, falling back to polling).

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Map, Value};

use aviary_core::model::{Execution, ExecutionStatus};

use crate::client::ApiClient;
use crate::error::{CliError, EXIT_FAILED, EXIT_OK};
use crate::format::{self, Table};
use crate::sse::SseParser;
use crate::{Console, ExecutionCmd, InquiryCmd, RunArgs};

/// How often the polling fallback asks for news.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// One chunk of an execution's output, as the API returns it.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
struct OutputChunk {
    seq: i64,
    #[serde(default)]
    stream: String,
    #[serde(default)]
    data: String,
    #[serde(default)]
    at: Option<DateTime<Utc>>,
}

/// Parses `key=value` arguments into a JSON object of strings.
pub(crate) fn parse_parameters(args: &[String]) -> Result<Map<String, Value>, CliError> {
    let mut map = Map::new();
    for a in args {
        let Some((k, v)) = a.split_once('=') else {
            return Err(CliError::Usage(format!(
                "parameter `{a}` is not KEY=VALUE; write e.g. cmd='echo hi'"
            )));
        };
        let k = k.trim();
        if k.is_empty() {
            return Err(CliError::Usage(format!(
                "parameter `{a}` has an empty name; write KEY=VALUE"
            )));
        }
        if map
            .insert(k.to_string(), Value::String(v.to_string()))
            .is_some()
        {
            return Err(CliError::Usage(format!(
                "parameter `{k}` is given twice; give each parameter once"
            )));
        }
    }
    Ok(map)
}

/// The exit code for an execution's final status.
fn exit_for(status: ExecutionStatus) -> i32 {
    if status == ExecutionStatus::Succeeded {
        EXIT_OK
    } else {
        EXIT_FAILED
    }
}

/// `aviary run`.
pub(crate) async fn run_action(
    api: &ApiClient,
    args: RunArgs,
    console: &mut Console<'_>,
) -> Result<i32, CliError> {
    let parameters = parse_parameters(&args.parameters)?;
    let body = serde_json::json!({"action": args.action, "parameters": parameters});
    let created = api
        .call(Method::POST, &["executions"], &[], Some(&body))
        .await?;
    let execution: Execution = api.decode(created.clone(), "the new execution")?;

    if args.run_async {
        if console.json {
            console.print_json(&created)?;
        } else {
            console.print(&format!("{}\n", execution.id))?;
            console.eprint(&format!(
                "execution {} is {}; follow it with `aviary execution tail {}`\n",
                execution.id, execution.status, execution.id
            ))?;
        }
        return Ok(EXIT_OK);
    }

    let show = if console.json {
        Show::Nothing
    } else {
        Show::Raw
    };
    let mut follower = Follower::new(&execution.id, show);
    let done = match args.timeout {
        Some(secs) => {
            match tokio::time::timeout(Duration::from_secs(secs), follower.follow(api, console))
                .await
            {
                Ok(r) => r?,
                Err(_) => {
                    follower.end_line(console)?;
                    console.eprint(&format!(
                        "stopped waiting after {secs}s; execution {id} is still going: \
                         `aviary execution tail {id}` follows it, `aviary execution cancel {id}` stops it\n",
                        id = execution.id
                    ))?;
                    return Ok(EXIT_FAILED);
                }
            }
        }
        None => follower.follow(api, console).await?,
    };
    let (exec, raw) = done;
    if console.json {
        console.print_json(&raw)?;
    } else {
        follower.end_line(console)?;
        print_summary(&exec, follower.printed_any, console)?;
    }
    Ok(exit_for(exec.status))
}

/// Follows a just-created execution to its end, printing its output live
/// (not with `--json`); returns it.
pub(crate) async fn follow_created(
    api: &ApiClient,
    id: &str,
    console: &mut Console<'_>,
) -> Result<(Execution, Value), CliError> {
    let show = if console.json {
        Show::Nothing
    } else {
        Show::Raw
    };
    let mut follower = Follower::new(id, show);
    let done = follower.follow(api, console).await?;
    follower.end_line(console)?;
    Ok(done)
}

fn print_summary(
    exec: &Execution,
    output_shown: bool,
    console: &mut Console<'_>,
) -> Result<(), CliError> {
    let mut result = exec.result.clone();
    if output_shown && let Value::Object(m) = &mut result {
        // Already printed live above.
        m.remove("stdout");
        m.remove("stderr");
    }
    let pairs = [
        ("id", exec.id.clone()),
        ("action", exec.action.clone()),
        ("status", format::status(exec.status, console.color)),
        (
            "duration",
            format::execution_duration(exec.started_at.as_ref(), exec.finished_at.as_ref()),
        ),
        ("result", format::pretty(&result, 2)),
    ];
    let text = format::fields(&pairs);
    console.print(&text)
}

/// Follows one execution's output to its end, deduplicating chunks by `seq`.
/// How a follower shows output chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Show {
    /// Not at all (only the final execution matters).
    Nothing,
    /// As written: stdout chunks to stdout, stderr chunks to stderr.
    Raw,
    /// Each chunk as one compact JSON object per stdout line.
    JsonLines,
}

struct Follower {
    id: String,
    show: Show,
    last_seq: Option<i64>,
    printed_any: bool,
    at_line_start: bool,
}

impl Follower {
    fn new(id: &str, show: Show) -> Self {
        Self {
            id: id.to_string(),
            show,
            last_seq: None,
            printed_any: false,
            at_line_start: true,
        }
    }

    /// Ends a partial stdout line so that what follows starts on its own line.
    fn end_line(&mut self, console: &mut Console<'_>) -> Result<(), CliError> {
        if !self.at_line_start {
            console.print("\n")?;
            self.at_line_start = true;
        }
        Ok(())
    }

    fn emit(&mut self, chunk: &OutputChunk, console: &mut Console<'_>) -> Result<(), CliError> {
        if self.last_seq.is_some_and(|s| chunk.seq <= s) {
            return Ok(());
        }
        self.last_seq = Some(chunk.seq);
        match self.show {
            Show::Nothing => return Ok(()),
            Show::JsonLines => {
                let line = serde_json::to_string(chunk).unwrap_or_default();
                return console.print(&format!("{line}\n"));
            }
            Show::Raw if chunk.data.is_empty() => return Ok(()),
            Show::Raw => {}
        }
        self.printed_any = true;
        if chunk.stream == "stderr" {
            console.eprint(&chunk.data)?;
        } else {
            console.print(&chunk.data)?;
            self.at_line_start = chunk.data.ends_with('\n');
        }
        Ok(())
    }

    /// Prints stored output after the last chunk seen.
    async fn backfill(
        &mut self,
        api: &ApiClient,
        console: &mut Console<'_>,
    ) -> Result<(), CliError> {
        let query: Vec<(&str, String)> = self
            .last_seq
            .map(|s| vec![("after", s.to_string())])
            .unwrap_or_default();
        let body = match api.get(&["executions", &self.id, "output"], &query).await {
            Ok(b) => b,
            // An older server without stored output: nothing to add.
            Err(CliError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut chunks: Vec<OutputChunk> = api.decode(body, "the execution output")?;
        chunks.sort_by_key(|c| c.seq);
        for c in &chunks {
            self.emit(c, console)?;
        }
        Ok(())
    }

    async fn get(&self, api: &ApiClient) -> Result<(Execution, Value), CliError> {
        let raw = api.get(&["executions", &self.id], &[]).await?;
        let exec = api.decode(raw.clone(), "the execution")?;
        Ok((exec, raw))
    }

    /// Follows to the end; returns the final execution and its raw JSON.
    async fn follow(
        &mut self,
        api: &ApiClient,
        console: &mut Console<'_>,
    ) -> Result<(Execution, Value), CliError> {
        if let Some(resp) = api.open_stream(&["executions", &self.id, "stream"]).await? {
            // The stream only promises what happens from now on: print what
            // was written before it opened, then the live chunks.
            self.backfill(api, console).await?;
            if let Some(done) = self.read_stream(resp, api, console).await? {
                self.backfill(api, console).await?;
                return Ok(done);
            }
        }
        self.poll(api, console).await
    }

    /// Reads the event stream; `None` if it ended without an `end` event.
    async fn read_stream(
        &mut self,
        resp: reqwest::Response,
        api: &ApiClient,
        console: &mut Console<'_>,
    ) -> Result<Option<(Execution, Value)>, CliError> {
        let mut parser = SseParser::new();
        let mut body = resp.bytes_stream();
        while let Some(item) = body.next().await {
            // A broken stream is not fatal: polling takes over.
            let Ok(bytes) = item else { return Ok(None) };
            for ev in parser.push(&bytes) {
                match ev.event.as_str() {
                    "output" => {
                        if let Ok(chunk) = serde_json::from_str::<OutputChunk>(&ev.data) {
                            self.emit(&chunk, console)?;
                        }
                    }
                    "end" => {
                        let raw: Value = serde_json::from_str(&ev.data).unwrap_or(Value::Null);
                        return match serde_json::from_value::<Execution>(raw.clone()) {
                            Ok(exec) if exec.status.is_terminal() => Ok(Some((exec, raw))),
                            _ => self.get(api).await.map(Some),
                        };
                    }
                    _ => {}
                }
            }
        }
        Ok(None)
    }

    async fn poll(
        &mut self,
        api: &ApiClient,
        console: &mut Console<'_>,
    ) -> Result<(Execution, Value), CliError> {
        loop {
            self.backfill(api, console).await?;
            let (exec, raw) = self.get(api).await?;
            if exec.status.is_terminal() {
                self.backfill(api, console).await?;
                return Ok((exec, raw));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

/// `aviary execution ...`.
pub(crate) async fn execution(
    api: &ApiClient,
    cmd: ExecutionCmd,
    console: &mut Console<'_>,
) -> Result<i32, CliError> {
    match cmd {
        ExecutionCmd::List {
            action,
            status,
            rule,
            limit,
        } => {
            let mut q: Vec<(&str, String)> = vec![("limit", limit.to_string())];
            if let Some(a) = action {
                q.push(("action", a));
            }
            if let Some(s) = status {
                q.push(("status", s.as_str().to_string()));
            }
            if let Some(r) = rule {
                q.push(("rule", r));
            }
            let body = api.get(&["executions"], &q).await?;
            if console.json {
                console.print_json(&body)?;
                return Ok(EXIT_OK);
            }
            let list: Vec<Execution> = api.decode(body, "the execution list")?;
            let mut t = Table::new(&["id", "action", "status", "created", "duration", "by"]);
            for e in &list {
                t.row(vec![
                    e.id.clone(),
                    e.action.clone(),
                    format::status(e.status, console.color),
                    format::time(&e.created_at),
                    format::execution_duration(e.started_at.as_ref(), e.finished_at.as_ref()),
                    e.rule
                        .as_ref()
                        .map(|r| format!("rule:{r}"))
                        .unwrap_or_else(|| e.requested_by.clone()),
                ]);
            }
            print_table(console, &t, "no executions")?;
            Ok(EXIT_OK)
        }
        ExecutionCmd::Get { id } => {
            let body = api.get(&["executions", &id], &[]).await?;
            if console.json {
                console.print_json(&body)?;
                return Ok(EXIT_OK);
            }
            let e: Execution = api.decode(body, "the execution")?;
            console.print(&describe_execution(&e, console.color))?;
            if e.runner == "orquesta" {
                let tree = api.get(&["executions", &id, "tasks"], &[]).await?;
                let mut t = Table::new(&[
                    "task",
                    "status",
                    "started",
                    "duration",
                    "execution",
                    "published",
                ]);
                task_rows(&tree, 0, &mut t);
                console.print("tasks:\n")?;
                print_table(console, &t, "no task started yet")?;
            }
            Ok(EXIT_OK)
        }
        ExecutionCmd::Tail { id } => {
            // Scripts (--json) get the chunks, one JSON object per line.
            let mode = if console.json {
                Show::JsonLines
            } else {
                Show::Raw
            };
            let mut f = Follower::new(&id, mode);
            let (exec, _) = f.get(api).await?;
            if exec.runner == "orquesta" {
                return tail_workflow(api, &id, console).await;
            }
            let exec = if exec.status.is_terminal() {
                f.backfill(api, console).await?;
                exec
            } else {
                f.follow(api, console).await?.0
            };
            f.end_line(console)?;
            if !console.json {
                console.eprint(&format!(
                    "execution {} {}\n",
                    exec.id,
                    format::status(exec.status, false)
                ))?;
            }
            Ok(exit_for(exec.status))
        }
        ExecutionCmd::Cancel { id } => {
            let body = api
                .call(Method::POST, &["executions", &id, "cancel"], &[], None)
                .await?;
            if console.json {
                console.print_json(&body)?;
                return Ok(EXIT_OK);
            }
            let e: Execution = api.decode(body, "the execution")?;
            console.print(&format!(
                "execution {}: {}\n",
                e.id,
                format::status(e.status, console.color)
            ))?;
            Ok(EXIT_OK)
        }
        ExecutionCmd::Pause { id } => pause_resume(api, &id, "pause", console).await,
        ExecutionCmd::Resume { id } => pause_resume(api, &id, "resume", console).await,
        ExecutionCmd::ReRun {
            id,
            tasks,
            no_reset,
        } => {
            let body = api
                .call(
                    Method::POST,
                    &["executions", &id, "re-run"],
                    &[],
                    Some(&serde_json::json!({ "tasks": tasks, "no_reset": no_reset })),
                )
                .await?;
            if console.json {
                console.print_json(&body)?;
                return Ok(EXIT_OK);
            }
            let e: Execution = api.decode(body, "the execution")?;
            console.print(&format!(
                "re-run of {id}: execution {} ({})\n",
                e.id,
                format::status(e.status, console.color)
            ))?;
            Ok(EXIT_OK)
        }
    }
}

/// A task execution followed by [`tail_workflow`].
#[derive(Default)]
struct TaskTail {
    last_seq: Option<i64>,
    partial: String,
    ended: bool,
}

/// Leaf executions of a task tree: (execution id, label, status, is workflow).
fn tree_leaves(tree: &Value, prefix: &str, out: &mut Vec<(String, String, String)>) {
    for task in tree["tasks"].as_array().into_iter().flatten() {
        let name = task["task"].as_str().unwrap_or("?");
        for ex in task["executions"].as_array().into_iter().flatten() {
            let mut label = format!("{prefix}{name}");
            if let Some(item) = ex["item"].as_u64() {
                label.push_str(&format!("[{item}]"));
            }
            if ex.get("workflow").is_some() {
                tree_leaves(&ex["workflow"], &format!("{label}/"), out);
                continue;
            }
            out.push((
                ex["id"].as_str().unwrap_or_default().to_string(),
                label,
                ex["status"].as_str().unwrap_or_default().to_string(),
            ));
        }
    }
}

/// `aviary execution tail` of a workflow: follows the output of every task
/// (subworkflows included), each line prefixed with its task, until the
/// workflow ends.
async fn tail_workflow(
    api: &ApiClient,
    id: &str,
    console: &mut Console<'_>,
) -> Result<i32, CliError> {
    let mut tails: std::collections::HashMap<String, TaskTail> = Default::default();
    loop {
        let exec: Execution =
            api.decode(api.get(&["executions", id], &[]).await?, "the execution")?;
        let tree = api.get(&["executions", id, "tasks"], &[]).await?;
        let mut leaves = Vec::new();
        tree_leaves(&tree, "", &mut leaves);
        for (eid, label, status) in leaves {
            let tail = tails.entry(eid.clone()).or_default();
            if tail.ended {
                continue;
            }
            let query: Vec<(&str, String)> = tail
                .last_seq
                .map(|s| vec![("after", s.to_string())])
                .unwrap_or_default();
            let body = api.get(&["executions", &eid, "output"], &query).await?;
            let mut chunks: Vec<OutputChunk> = api.decode(body, "the execution output")?;
            chunks.sort_by_key(|c| c.seq);
            for c in chunks {
                if tail.last_seq.is_some_and(|s| c.seq <= s) {
                    continue;
                }
                tail.last_seq = Some(c.seq);
                if console.json {
                    let mut v = serde_json::to_value(&c).unwrap_or_default();
                    v["task"] = Value::String(label.clone());
                    console.print(&format!("{v}\n"))?;
                    continue;
                }
                tail.partial.push_str(&c.data);
                while let Some(pos) = tail.partial.find('\n') {
                    let line: String = tail.partial.drain(..=pos).collect();
                    console.print(&format!("[{label}] {line}"))?;
                }
            }
            let status = ExecutionStatus::parse(&status);
            if status.is_some_and(ExecutionStatus::is_terminal) {
                tail.ended = true;
                if !tail.partial.is_empty() {
                    let rest = std::mem::take(&mut tail.partial);
                    console.print(&format!("[{label}] {rest}\n"))?;
                }
                if !console.json {
                    console.eprint(&format!(
                        "[{label}] {}\n",
                        status.map(ExecutionStatus::as_str).unwrap_or("?")
                    ))?;
                }
            }
        }
        if exec.status.is_terminal() {
            if !console.json {
                console.eprint(&format!(
                    "workflow {} {}\n",
                    exec.id,
                    format::status(exec.status, false)
                ))?;
            }
            return Ok(exit_for(exec.status));
        }
        tokio::time::sleep(POLL_INTERVAL / 2).await;
    }
}

/// Adds a workflow's task tree to a table, subworkflows indented.
fn task_rows(tree: &Value, depth: usize, t: &mut Table) {
    let indent = "  ".repeat(depth);
    for task in tree["tasks"].as_array().into_iter().flatten() {
        let started = task["started_at"]
            .as_str()
            .and_then(|s| s.parse::<DateTime<Utc>>().ok());
        let finished = task["finished_at"]
            .as_str()
            .and_then(|s| s.parse::<DateTime<Utc>>().ok());
        let published = task["published"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        let executions = task["executions"].as_array().cloned().unwrap_or_default();
        let exec_cell = match executions.as_slice() {
            [] => "-".to_string(),
            [one] => format::value_cell(one.get("id")),
            many => format!("{} items/runs", many.len()),
        };
        t.row(vec![
            format!("{indent}{}", format::value_cell(task.get("task"))),
            format::value_cell(task.get("status")),
            started
                .map(|s| format::time(&s))
                .unwrap_or_else(|| "-".into()),
            format::execution_duration(started.as_ref(), finished.as_ref()),
            exec_cell,
            if published.is_empty() {
                "-".into()
            } else {
                published
            },
        ]);
        for ex in &executions {
            if ex.get("workflow").is_some() {
                task_rows(&ex["workflow"], depth + 1, t);
            }
        }
    }
}

async fn pause_resume(
    api: &ApiClient,
    id: &str,
    op: &str,
    console: &mut Console<'_>,
) -> Result<i32, CliError> {
    let body = api
        .call(Method::POST, &["executions", id, op], &[], None)
        .await?;
    if console.json {
        console.print_json(&body)?;
        return Ok(EXIT_OK);
    }
    let e: Execution = api.decode(body, "the execution")?;
    console.print(&format!(
        "workflow {}: {}\n",
        e.id,
        format::status(e.status, console.color)
    ))?;
    Ok(EXIT_OK)
}

/// `aviary inquiry ...`.
pub(crate) async fn inquiry(
    api: &ApiClient,
    cmd: InquiryCmd,
    console: &mut Console<'_>,
) -> Result<i32, CliError> {
    match cmd {
        InquiryCmd::List { limit } => {
            let limit = limit.to_string();
            let body = api
                .call(Method::GET, &["inquiries"], &[("limit", limit)], None)
                .await?;
            if console.json {
                console.print_json(&body)?;
                return Ok(EXIT_OK);
            }
            let mut t = Table::new(&["ID", "ACTION", "WORKFLOW", "USERS", "ROLES", "EXPIRES"]);
            for q in body.as_array().into_iter().flatten() {
                let list = |k: &str| {
                    q.get(k)
                        .and_then(Value::as_array)
                        .map(|a| {
                            a.iter()
                                .filter_map(Value::as_str)
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .filter(|s| !s.is_empty())
                        .unwrap_or_else(|| "-".into())
                };
                t.row(vec![
                    format::value_cell(q.get("id")),
                    format::value_cell(q.get("action")),
                    format::value_cell(q.get("parent_id")),
                    list("users"),
                    list("roles"),
                    format::value_cell(q.get("expires_at")),
                ]);
            }
            print_table(console, &t, "no pending inquiries\n")?;
            Ok(EXIT_OK)
        }
        InquiryCmd::Get { id } => {
            let body = api
                .call(Method::GET, &["inquiries", &id], &[], None)
                .await?;
            console.print_json(&body)?;
            Ok(EXIT_OK)
        }
        InquiryCmd::Respond { id, response } => {
            let response: Value = serde_json::from_str(&response).map_err(|e| {
                CliError::Usage(format!(
                    "the response is not valid JSON: {e} (line {}, column {}); e.g. '{{\"approved\": true}}'",
                    e.line(),
                    e.column()
                ))
            })?;
            let body = api
                .call(
                    Method::POST,
                    &["inquiries", &id, "respond"],
                    &[],
                    Some(&serde_json::json!({ "response": response })),
                )
                .await?;
            if console.json {
                console.print_json(&body)?;
                return Ok(EXIT_OK);
            }
            console.print(&format!(
                "inquiry {}: {} (answered by {})\n",
                id,
                format::value_cell(body.get("status")),
                format::value_cell(body.get("responded_by"))
            ))?;
            Ok(EXIT_OK)
        }
    }
}

/// Prints a table, or `empty` on stderr when it has no rows.
pub(crate) fn print_table(
    console: &mut Console<'_>,
    t: &Table,
    empty: &str,
) -> Result<(), CliError> {
    if t.is_empty() {
        console.eprint(&format!("{empty}\n"))
    } else {
        console.print(&t.render())
    }
}

/// The trace of an execution: trigger instance -> rule -> execution.
fn trace(e: &Execution) -> String {
    let mut parts = Vec::new();
    if let Some(t) = &e.trigger_instance_id {
        parts.push(format!("trigger instance {t}"));
    }
    if let Some(r) = &e.rule {
        parts.push(format!("rule {r}"));
    }
    if let Some(en) = &e.enforcement_id {
        parts.push(format!("enforcement {en}"));
    }
    if let Some(p) = &e.parent_id {
        parts.push(format!("parent execution {p}"));
    }
    if parts.is_empty() {
        parts.push(format!("requested by {}", e.requested_by));
    }
    parts.push(format!("execution {}", e.id));
    parts.join(" -> ")
}

fn describe_execution(e: &Execution, color: bool) -> String {
    let pairs = [
        ("id", e.id.clone()),
        ("action", e.action.clone()),
        ("runner", e.runner.clone()),
        ("status", format::status(e.status, color)),
        ("requested by", e.requested_by.clone()),
        ("created", format::time(&e.created_at)),
        ("started", format::opt_time(e.started_at.as_ref())),
        ("finished", format::opt_time(e.finished_at.as_ref())),
        (
            "duration",
            format::execution_duration(e.started_at.as_ref(), e.finished_at.as_ref()),
        ),
        ("timeout", format!("{}s", e.timeout_secs)),
        ("trace", trace(e)),
        ("parameters", format::pretty(&e.parameters, 2)),
        ("result", format::pretty(&e.result, 2)),
    ];
    format::fields(&pairs)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_key_value_strings() {
        let args = vec![
            "cmd=echo a=b".to_string(),
            "n=3".to_string(),
            "e=".to_string(),
        ];
        let m = parse_parameters(&args).unwrap();
        assert_eq!(m["cmd"], "echo a=b");
        assert_eq!(m["n"], "3");
        assert_eq!(m["e"], "");
        assert!(matches!(
            parse_parameters(&["novalue".to_string()]),
            Err(CliError::Usage(_))
        ));
        assert!(matches!(
            parse_parameters(&["a=1".to_string(), "a=2".to_string()]),
            Err(CliError::Usage(_))
        ));
    }
}
