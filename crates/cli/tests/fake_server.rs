//! The CLI against a small fake Aviary server (axum on 127.0.0.1:0) that
//! records every request and answers in the documented shapes.

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use aviary_cli::{CliError, Command, Console, Endpoint, GlobalArgs, run_with};
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use clap::{CommandFactory, Parser};
use serde_json::{Value, json};

#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    path: String,
    query: String,
    auth: Option<String>,
    body: Value,
}

#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<Recorded>>>);

impl Log {
    fn all(&self) -> Vec<Recorded> {
        self.0.lock().unwrap().clone()
    }
    fn find(&self, method: &str, path: &str) -> Recorded {
        self.all()
            .into_iter()
            .find(|r| r.method == method && r.path == path)
            .unwrap_or_else(|| panic!("no {method} {path} in {:?}", self.all()))
    }
}

async fn record(State(log): State<Log>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
    log.0.lock().unwrap().push(Recorded {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().unwrap_or("").to_string(),
        auth: parts
            .headers
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_string()),
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    });
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

async fn serve(router: Router) -> (String, Log) {
    let log = Log::default();
    let app = router.layer(axum::middleware::from_fn_with_state(log.clone(), record));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), log)
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    cmd: Command,
}

struct Outcome {
    code: Result<i32, CliError>,
    out: String,
    err: String,
}

impl Outcome {
    fn exit(&self) -> i32 {
        match &self.code {
            Ok(c) => *c,
            Err(e) => e.exit_code(),
        }
    }
    fn error(&self) -> String {
        match &self.code {
            Ok(c) => panic!("expected an error, got exit {c}; out: {}", self.out),
            Err(e) => e.to_string(),
        }
    }
}

async fn cli_with(endpoint: Endpoint, args: &[&str]) -> Outcome {
    // `pack` is parsed by the binary (it adds the offline `validate`), which
    // builds `Command::Pack` itself; do the same here.
    let parsed = match args {
        ["pack", sub] => Cli {
            global: Cli::try_parse_from(["aviary", "audit"]).unwrap().global,
            cmd: Command::Pack(match *sub {
                "list" => aviary_cli::PackCmd::List,
                "reload" => aviary_cli::PackCmd::Reload,
                other => panic!("unknown pack command {other}"),
            }),
        },
        _ => Cli::try_parse_from(std::iter::once("aviary").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{e}")),
    };
    let mut out = Vec::new();
    let mut err = Vec::new();
    let mut console = Console {
        out: &mut out,
        err: &mut err,
        color: false,
        json: parsed.global.json,
    };
    let code = run_with(&endpoint, parsed.cmd, &mut console).await;
    Outcome {
        code,
        out: String::from_utf8(out).unwrap(),
        err: String::from_utf8(err).unwrap(),
    }
}

async fn cli(url: &str, args: &[&str]) -> Outcome {
    cli_with(Endpoint::new(url, Some("tok-123".into())), args).await
}

fn execution(id: &str, status: &str) -> Value {
    let terminal = matches!(
        status,
        "succeeded" | "failed" | "timeout" | "canceled" | "abandoned"
    );
    json!({
        "id": id,
        "action": "core.local",
        "runner": "local-shell-cmd",
        "parameters": {"cmd": "echo hello"},
        "status": status,
        "result": if terminal { json!({"stdout": "hello\n", "stderr": "", "exit_code": 0}) } else { json!({}) },
        "trigger_instance_id": null,
        "rule": null,
        "enforcement_id": null,
        "parent_id": null,
        "requested_by": "admin",
        "created_at": "2024-05-01T12:00:00Z",
        "started_at": "2024-05-01T12:00:01Z",
        "finished_at": if terminal { json!("2024-05-01T12:00:02.250Z") } else { Value::Null },
        "timeout_secs": 600,
        "node": "n1"
    })
}

fn chunk(seq: i64, stream: &str, data: &str) -> Value {
    json!({"seq": seq, "stream": stream, "data": data, "at": "2024-05-01T12:00:01Z"})
}

fn sse(events: Vec<(&'static str, Value)>) -> impl IntoResponse {
    let evs: Vec<Result<Event, Infallible>> = events
        .into_iter()
        .map(|(name, data)| Ok(Event::default().event(name).data(data.to_string())))
        .collect();
    Sse::new(futures::stream::iter(evs))
}

#[test]
fn clap_definitions_are_valid() {
    Cli::command().debug_assert();
    let help = Cli::command()
        .find_subcommand_mut("run")
        .unwrap()
        .render_long_help()
        .to_string();
    assert!(help.contains("Examples:"), "{help}");
    assert!(
        help.contains("aviary run core.local cmd='echo hello'"),
        "{help}"
    );
}

fn run_server(final_status: &'static str) -> Router {
    Router::new()
        .route(
            "/api/v1/executions",
            post(|| async { (StatusCode::CREATED, Json(execution("ex1", "requested"))) }),
        )
        // Output written before the stream opened is only in the store.
        .route(
            "/api/v1/executions/{id}/output",
            get(
                |Query(q): Query<std::collections::HashMap<String, String>>| async move {
                    let all = vec![chunk(1, "stdout", "early\n")];
                    let after: i64 = q.get("after").and_then(|a| a.parse().ok()).unwrap_or(0);
                    Json(Value::Array(
                        all.into_iter()
                            .filter(|c| c["seq"].as_i64().unwrap() > after)
                            .collect(),
                    ))
                },
            ),
        )
        .route(
            "/api/v1/executions/{id}/stream",
            get(move || async move {
                sse(vec![
                    ("output", chunk(1, "stdout", "early\n")),
                    ("status", json!({"status": "running"})),
                    ("output", chunk(2, "stdout", "hello\n")),
                    ("output", chunk(3, "stderr", "oops\n")),
                    ("end", execution("ex1", final_status)),
                ])
            }),
        )
}

#[tokio::test]
async fn run_follows_the_event_stream_and_prints_a_summary() {
    let (url, log) = serve(run_server("succeeded")).await;
    let o = cli(&url, &["run", "core.local", "cmd=echo hello", "n=3"]).await;
    assert_eq!(o.exit(), 0, "out: {} err: {}", o.out, o.err);
    // Each chunk exactly once, each on its stream.
    assert!(o.out.starts_with("early\nhello\n"), "{}", o.out);
    assert_eq!(o.out.matches("early").count(), 1, "{}", o.out);
    assert_eq!(o.err, "oops\n");
    assert!(o.out.contains("status:   succeeded"), "{}", o.out);
    assert!(o.out.contains("duration: 1.2s"), "{}", o.out);
    assert!(o.out.contains("\"exit_code\": 0"), "{}", o.out);
    // Output already shown live is not repeated in the summary.
    assert_eq!(o.out.matches("hello").count(), 1, "{}", o.out);

    let post = log.find("POST", "/api/v1/executions");
    assert_eq!(
        post.body,
        json!({"action": "core.local", "parameters": {"cmd": "echo hello", "n": "3"}})
    );
    assert_eq!(post.auth.as_deref(), Some("Bearer tok-123"));
}

#[tokio::test]
async fn run_exits_1_when_the_execution_fails() {
    let (url, _) = serve(run_server("failed")).await;
    let o = cli(&url, &["run", "core.local", "cmd=false"]).await;
    assert_eq!(o.code.unwrap(), 1);
    assert!(o.out.contains("status:   failed"), "{}", o.out);
}

#[tokio::test]
async fn run_json_prints_only_the_final_execution() {
    let (url, _) = serve(run_server("succeeded")).await;
    let o = cli(&url, &["run", "core.local", "cmd=x", "--json"]).await;
    assert_eq!(o.exit(), 0);
    let v: Value = serde_json::from_str(&o.out).unwrap();
    assert_eq!(v["status"], "succeeded");
    assert_eq!(v["id"], "ex1");
}

#[tokio::test]
async fn run_polls_when_the_server_has_no_stream() {
    let polls = Arc::new(AtomicUsize::new(0));
    let p = polls.clone();
    let router = Router::new()
        .route(
            "/api/v1/executions",
            post(|| async { (StatusCode::CREATED, Json(execution("ex2", "requested"))) }),
        )
        .route(
            "/api/v1/executions/{id}",
            get(move |Path(id): Path<String>| {
                let n = p.fetch_add(1, Ordering::SeqCst);
                async move { Json(execution(&id, if n < 2 { "running" } else { "succeeded" })) }
            }),
        )
        .route(
            "/api/v1/executions/{id}/output",
            get(
                |Query(q): Query<std::collections::HashMap<String, String>>| async move {
                    let all = vec![
                        chunk(0, "stdout", "line one\n"),
                        chunk(1, "stdout", "line two"),
                    ];
                    let after: i64 = q.get("after").and_then(|a| a.parse().ok()).unwrap_or(-1);
                    Json(Value::Array(
                        all.into_iter()
                            .filter(|c| c["seq"].as_i64().unwrap() > after)
                            .collect(),
                    ))
                },
            ),
        );
    let (url, log) = serve(router).await;
    let o = cli(&url, &["run", "core.local", "cmd=x"]).await;
    assert_eq!(o.exit(), 0, "{} {}", o.out, o.err);
    // The unterminated last line is ended before the summary.
    assert!(o.out.starts_with("line one\nline two\nid:"), "{}", o.out);
    assert!(polls.load(Ordering::SeqCst) >= 3);
    assert!(
        log.all()
            .iter()
            .any(|r| r.path.ends_with("/output") && r.query == "after=1")
    );
}

#[tokio::test]
async fn run_async_prints_the_id_or_json() {
    let router = Router::new().route(
        "/api/v1/executions",
        post(|| async { (StatusCode::CREATED, Json(execution("ex3", "requested"))) }),
    );
    let (url, log) = serve(router).await;
    let o = cli(&url, &["run", "core.noop", "--async"]).await;
    assert_eq!(o.exit(), 0);
    assert_eq!(o.out, "ex3\n");
    assert!(o.err.contains("aviary execution tail ex3"), "{}", o.err);
    let o = cli(&url, &["--json", "run", "core.noop", "--async"]).await;
    let v: Value = serde_json::from_str(&o.out).unwrap();
    assert_eq!(v["id"], "ex3");
    assert_eq!(log.all().len(), 2, "no following with --async");
}

#[tokio::test]
async fn run_lists_every_parameter_error_on_400() {
    let router = Router::new().route(
        "/api/v1/executions",
        post(|| async {
            (
                StatusCode::BAD_REQUEST,
                Json(json!({
                    "error": "invalid parameters for action core.local; fix them and retry",
                    "details": [
                        {"parameter": "cmd", "message": "is required"},
                        {"parameter": "timeout", "message": "must be an integer, got \"soon\""}
                    ]
                })),
            )
        }),
    );
    let (url, _) = serve(router).await;
    let o = cli(&url, &["run", "core.local", "timeout=soon"]).await;
    assert_eq!(o.exit(), 2);
    let msg = o.error();
    assert!(
        msg.contains("invalid parameters for action core.local"),
        "{msg}"
    );
    assert!(msg.contains("parameter `cmd`: is required"), "{msg}");
    assert!(
        msg.contains("parameter `timeout`: must be an integer"),
        "{msg}"
    );
}

#[tokio::test]
async fn bad_key_value_is_a_usage_error() {
    let (url, log) = serve(Router::new()).await;
    let o = cli(&url, &["run", "core.local", "cmd"]).await;
    assert_eq!(o.exit(), 2);
    assert!(o.error().contains("KEY=VALUE"));
    assert!(log.all().is_empty());
}

#[tokio::test]
async fn execution_list_as_table_and_json() {
    let router = Router::new().route(
        "/api/v1/executions",
        get(|| async {
            let mut b = execution("ex9", "failed");
            b["rule"] = json!("deploy.on_push");
            Json(json!([execution("ex8", "succeeded"), b]))
        }),
    );
    let (url, log) = serve(router).await;
    let o = cli(
        &url,
        &[
            "execution",
            "list",
            "--action",
            "core.local",
            "--status",
            "failed",
        ],
    )
    .await;
    assert_eq!(o.exit(), 0);
    let lines: Vec<&str> = o.out.lines().collect();
    assert_eq!(lines.len(), 3, "{}", o.out);
    assert!(lines[0].starts_with("ID   ACTION      STATUS"), "{}", o.out);
    assert!(
        lines[1].starts_with("ex8  core.local  succeeded  2024-05-01 12:00:00 UTC  1.2s"),
        "{}",
        o.out
    );
    assert!(lines[2].ends_with("rule:deploy.on_push"), "{}", o.out);
    let q = &log.all()[0].query;
    assert!(q.contains("limit=50"), "{q}");
    assert!(q.contains("action=core.local"), "{q}");
    assert!(q.contains("status=failed"), "{q}");

    let o = cli(&url, &["execution", "list", "--json"]).await;
    let v: Value = serde_json::from_str(&o.out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn execution_get_shows_the_trace() {
    let router = Router::new().route(
        "/api/v1/executions/{id}",
        get(|Path(id): Path<String>| async move {
            if id != "ex5" {
                return (
                    StatusCode::NOT_FOUND,
                    Json(json!({"error": format!("no execution {id}")})),
                );
            }
            let mut e = execution("ex5", "succeeded");
            e["trigger_instance_id"] = json!("ti1");
            e["rule"] = json!("ci.on_push");
            e["enforcement_id"] = json!("en1");
            (StatusCode::OK, Json(e))
        }),
    );
    let (url, _) = serve(router).await;
    let o = cli(&url, &["execution", "get", "ex5"]).await;
    assert_eq!(o.exit(), 0);
    assert!(
        o.out
            .contains("trace:        trigger instance ti1 -> rule ci.on_push -> enforcement en1 -> execution ex5"),
        "{}",
        o.out
    );
    assert!(o.out.contains("\"cmd\": \"echo hello\""), "{}", o.out);
    assert!(
        o.out.contains("finished:     2024-05-01 12:00:02 UTC"),
        "{}",
        o.out
    );

    let o = cli(&url, &["execution", "get", "nope"]).await;
    assert_eq!(o.exit(), 1);
    assert!(o.error().contains("no execution nope"));
}

#[tokio::test]
async fn tail_of_a_finished_execution_prints_its_stored_output() {
    let router = Router::new()
        .route(
            "/api/v1/executions/{id}",
            get(|Path(id): Path<String>| async move { Json(execution(&id, "failed")) }),
        )
        .route(
            "/api/v1/executions/{id}/output",
            get(|| async {
                Json(json!([
                    chunk(0, "stdout", "out\n"),
                    chunk(1, "stderr", "bad\n")
                ]))
            }),
        );
    let (url, log) = serve(router).await;
    let o = cli(&url, &["execution", "tail", "ex6"]).await;
    assert_eq!(o.exit(), 1, "a failed execution");
    assert_eq!(o.out, "out\n");
    assert!(o.err.starts_with("bad\n"), "{}", o.err);
    assert!(o.err.contains("execution ex6 failed"), "{}", o.err);
    assert!(!log.all().iter().any(|r| r.path.ends_with("/stream")));
}

#[tokio::test]
async fn key_set_with_encrypt_sends_a_secret() {
    let router = Router::new().route(
        "/api/v1/keys/{scope}/{name}",
        put(|Path((scope, name)): Path<(String, String)>| async move {
            Json(json!({
                "scope": scope, "name": name, "value": "********", "secret": true,
                "expire_at": "2024-05-01T13:00:00Z", "updated_at": "2024-05-01T12:00:00Z"
            }))
        }),
    );
    let (url, log) = serve(router).await;
    let o = cli(
        &url,
        &[
            "key",
            "set",
            "db/pass",
            "s3cret",
            "--encrypt",
            "--ttl",
            "3600",
            "--scope",
            "user",
        ],
    )
    .await;
    assert_eq!(o.exit(), 0, "{}", o.err);
    let put = log.find("PUT", "/api/v1/keys/user/db%2Fpass");
    assert_eq!(
        put.body,
        json!({"value": "s3cret", "secret": true, "ttl": 3600})
    );
    assert!(o.out.contains("user   db/pass  ********  yes"), "{}", o.out);
    assert!(!o.out.contains("s3cret"));

    cli(&url, &["key", "set", "plain", "v"]).await;
    let put = log.find("PUT", "/api/v1/keys/system/plain");
    assert_eq!(put.body, json!({"value": "v", "secret": false}));
}

#[tokio::test]
async fn key_list_passes_filters() {
    let router = Router::new().route(
        "/api/v1/keys",
        get(|| async {
            Json(
                json!([{"scope": "system", "name": "app.version", "value": "1.4.2", "secret": false,
                         "expire_at": null, "updated_at": "2024-05-01T12:00:00Z"}]),
            )
        }),
    );
    let (url, log) = serve(router).await;
    let o = cli(&url, &["key", "list", "--prefix", "app.", "--decrypt"]).await;
    assert_eq!(o.exit(), 0);
    assert!(
        o.out.contains("system  app.version  1.4.2  no      -"),
        "{}",
        o.out
    );
    let q = &log.all()[0].query;
    assert!(q.contains("prefix=app."), "{q}");
    assert!(q.contains("decrypt=true"), "{q}");
}

#[tokio::test]
async fn token_create_prints_the_token_once() {
    let router = Router::new().route(
        "/api/v1/tokens",
        post(|| async {
            (
                StatusCode::CREATED,
                Json(json!({
                    "token": "avt_secret_value", "id": "tk1", "name": "ci-bot", "role": "admin",
                    "created_at": "2024-05-01T12:00:00Z", "revoked_at": null, "last_used_at": null
                })),
            )
        }),
    );
    let (url, log) = serve(router).await;
    let o = cli(&url, &["token", "create", "ci-bot", "--role", "admin"]).await;
    assert_eq!(o.exit(), 0, "{}", o.err);
    assert!(o.out.contains("token: avt_secret_value"), "{}", o.out);
    assert!(o.err.contains("shown only this once"), "{}", o.err);
    assert_eq!(
        log.find("POST", "/api/v1/tokens").body,
        json!({"name": "ci-bot", "role": "admin"})
    );
}

#[tokio::test]
async fn unauthorized_exits_3_with_a_hint() {
    let router = Router::new().route(
        "/api/v1/rules",
        get(|| async {
            (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": "the token is unknown or revoked"})),
            )
        }),
    );
    let (url, _) = serve(router).await;
    let o = cli(&url, &["rule", "list"]).await;
    assert_eq!(o.exit(), 3);
    let msg = o.error();
    assert!(
        msg.starts_with("the server refused the token (401): the token is unknown or revoked;"),
        "{msg}"
    );
    assert!(msg.contains("AVIARY_TOKEN"), "{msg}");
    assert!(msg.contains("aviary token create"), "{msg}");
}

#[tokio::test]
async fn unreachable_server_exits_3_with_a_hint() {
    // A port that was free a moment ago: nothing listens there now.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    let o = cli(&url, &["execution", "list"]).await;
    assert_eq!(o.exit(), 3);
    let msg = o.error();
    assert!(
        msg.starts_with(&format!("cannot reach the Aviary server at {url}: ")),
        "{msg}"
    );
    assert!(msg.to_lowercase().contains("refused"), "{msg}");
    assert!(msg.contains("is `aviary server` running?"), "{msg}");
    assert!(msg.contains("AVIARY_URL"), "{msg}");
}

#[tokio::test]
async fn pack_reload_422_prints_diagnostics_and_exits_1() {
    let router = Router::new().route(
        "/api/v1/packs/reload",
        post(|| async {
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(json!({"error": "2 problems in packs",
                            "details": ["packs/ci/rules/a.yaml: unknown operator `eq`",
                                        "packs/ci/actions/b.yaml: missing runner_type"]})),
            )
        }),
    );
    let (url, _) = serve(router).await;
    let o = cli(&url, &["pack", "reload"]).await;
    assert_eq!(o.code.unwrap(), 1);
    assert!(o.err.contains("running packs are unchanged"), "{}", o.err);
    assert!(
        o.err
            .contains("  - packs/ci/rules/a.yaml: unknown operator `eq`\n"),
        "{}",
        o.err
    );
    assert!(
        o.err
            .contains("  - packs/ci/actions/b.yaml: missing runner_type\n"),
        "{}",
        o.err
    );
}

#[tokio::test]
async fn pack_list_and_reload_ok() {
    let packs = json!([{"name": "ci", "version": "1.0.0", "description": "CI", "actions": 3, "rules": 2, "path": "/p/ci"}]);
    let p2 = packs.clone();
    let router = Router::new()
        .route("/api/v1/packs", get(move || async move { Json(packs) }))
        .route(
            "/api/v1/packs/reload",
            post(move || async move { Json(json!({"packs": p2})) }),
        );
    let (url, _) = serve(router).await;
    let o = cli(&url, &["pack", "list"]).await;
    assert!(
        o.out
            .contains("ci    1.0.0    3        2      CI           /p/ci"),
        "{}",
        o.out
    );
    let o = cli(&url, &["pack", "reload"]).await;
    assert_eq!(o.exit(), 0);
    assert!(o.out.starts_with("reloaded 1 pack(s)\n"), "{}", o.out);
}

#[tokio::test]
async fn rules_actions_trigger_instances_and_audit() {
    let rule = json!({"name": "on_push", "pack": "ci", "enabled": false, "description": "deploy",
                      "trigger": {"type": "core.st2.webhook", "parameters": {"url": "github"}},
                      "criteria": {"trigger.body.ref": {"type": "equals", "pattern": "refs/heads/main"}},
                      "action": {"ref": "ci.deploy", "parameters": {"sha": "{{ trigger.body.after }}"}}});
    let r2 = rule.clone();
    let router = Router::new()
        .route("/api/v1/rules", get(move || async move { Json(json!([r2])) }))
        .route(
            "/api/v1/rules/{r}/disable",
            post(move || async move { Json(rule) }),
        )
        .route(
            "/api/v1/actions/{r}",
            get(|| async {
                Json(json!({"pack": "ci", "name": "deploy", "runner_type": "local-shell-script",
                            "entry_point": "deploy.sh",
                            "parameters": {"sha": {"type": "string", "required": true},
                                           "token": {"type": "string", "secret": true, "default": "x"}}}))
            }),
        )
        .route(
            "/api/v1/trigger-instances/{id}",
            get(|| async {
                Json(json!({
                    "trigger_instance": {"id": "ti1", "trigger": "core.st2.webhook",
                        "payload": {"body": {"ref": "refs/heads/main"}},
                        "occurrence_time": "2024-05-01T12:00:00Z", "dedup_key": null, "status": "processed"},
                    "enforcements": [{"id": "en1", "trigger_instance_id": "ti1", "rule": "ci.on_push",
                        "execution_id": "ex1", "failure_reason": null, "enforced_at": "2024-05-01T12:00:00Z"}]
                }))
            }),
        )
        .route(
            "/api/v1/audit",
            get(|| async {
                Json(json!([{"id": "a1", "at": "2024-05-01T12:00:00Z", "actor": "admin",
                             "action": "rule.disable", "target": "ci.on_push", "details": {}}]))
            }),
        );
    let (url, log) = serve(router).await;

    let o = cli(&url, &["rule", "list"]).await;
    assert!(
        o.out
            .contains("ci.on_push  false    core.st2.webhook  ci.deploy  deploy"),
        "{}",
        o.out
    );
    let o = cli(&url, &["rule", "disable", "ci.on_push"]).await;
    assert_eq!(o.out, "rule ci.on_push: disabled\n");
    log.find("POST", "/api/v1/rules/ci.on_push/disable");

    let o = cli(&url, &["action", "get", "ci.deploy"]).await;
    assert!(
        o.out.contains("runner:      local-shell-script"),
        "{}",
        o.out
    );
    assert!(
        o.out.contains("sha    string  yes       -        no"),
        "{}",
        o.out
    );
    assert!(
        o.out.contains("token  string  no        x        yes"),
        "{}",
        o.out
    );

    let o = cli(&url, &["trigger-instance", "get", "ti1"]).await;
    assert!(o.out.contains("\"ref\": \"refs/heads/main\""), "{}", o.out);
    assert!(o.out.contains("en1  ci.on_push  ex1"), "{}", o.out);

    let o = cli(&url, &["audit", "--limit", "5"]).await;
    assert!(
        o.out
            .contains("2024-05-01 12:00:00 UTC  admin  rule.disable  ci.on_push  {}"),
        "{}",
        o.out
    );
    assert_eq!(log.find("GET", "/api/v1/audit").query, "limit=5");
}

#[tokio::test]
async fn tail_follows_a_running_execution_as_json_lines() {
    let router = Router::new()
        .route(
            "/api/v1/executions/{id}",
            get(|Path(id): Path<String>| async move { Json(execution(&id, "running")) }),
        )
        .route(
            "/api/v1/executions/{id}/output",
            get(|| async { Json(json!([])) }),
        )
        .route(
            "/api/v1/executions/{id}/stream",
            get(|| async {
                sse(vec![
                    ("output", chunk(0, "stdout", "a\n")),
                    ("output", chunk(1, "stderr", "b\n")),
                    ("end", execution("ex7", "succeeded")),
                ])
            }),
        );
    let (url, _) = serve(router).await;
    let o = cli(&url, &["execution", "tail", "ex7", "--json"]).await;
    assert_eq!(o.exit(), 0, "{}", o.err);
    let lines: Vec<Value> = o
        .out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{}", o.out);
    assert_eq!(lines[0]["data"], "a\n");
    assert_eq!(lines[1]["stream"], "stderr");

    let o = cli(&url, &["execution", "tail", "ex7"]).await;
    assert_eq!((o.out.as_str(), o.exit()), ("a\n", 0));
    assert!(o.err.starts_with("b\nexecution ex7 succeeded"), "{}", o.err);
}

#[tokio::test]
async fn a_stream_that_breaks_off_falls_back_to_polling() {
    let router = Router::new()
        .route(
            "/api/v1/executions",
            post(|| async { (StatusCode::CREATED, Json(execution("ex10", "running"))) }),
        )
        .route(
            "/api/v1/executions/{id}",
            get(|Path(id): Path<String>| async move { Json(execution(&id, "canceled")) }),
        )
        .route(
            "/api/v1/executions/{id}/output",
            get(|| async {
                Json(json!([
                    chunk(0, "stdout", "x\n"),
                    chunk(1, "stdout", "y\n")
                ]))
            }),
        )
        // Sends the first chunk again, then ends without an `end` event.
        .route(
            "/api/v1/executions/{id}/stream",
            get(|| async { sse(vec![("output", chunk(0, "stdout", "x\n"))]) }),
        );
    let (url, _) = serve(router).await;
    let o = cli(&url, &["run", "core.local", "cmd=x"]).await;
    assert_eq!(o.exit(), 1, "canceled is a failure");
    assert!(o.out.starts_with("x\ny\nid:"), "{}", o.out);
    assert!(o.out.contains("status:   canceled"), "{}", o.out);
}

#[tokio::test]
async fn run_timeout_stops_waiting_but_not_the_execution() {
    let router = Router::new()
        .route(
            "/api/v1/executions",
            post(|| async { (StatusCode::CREATED, Json(execution("ex11", "running"))) }),
        )
        .route(
            "/api/v1/executions/{id}/output",
            get(|| async { Json(json!([])) }),
        )
        .route(
            "/api/v1/executions/{id}/stream",
            get(|| async {
                let first = futures::stream::iter(vec![Ok::<_, Infallible>(
                    Event::default()
                        .event("output")
                        .data(chunk(0, "stdout", "working").to_string()),
                )]);
                Sse::new(futures::StreamExt::chain(first, futures::stream::pending()))
            }),
        );
    let (url, log) = serve(router).await;
    let o = cli(
        &url,
        &["run", "core.local", "cmd=sleep 100", "--timeout", "1"],
    )
    .await;
    assert_eq!(o.exit(), 1);
    assert_eq!(o.out, "working\n");
    assert!(o.err.contains("stopped waiting after 1s"), "{}", o.err);
    assert!(o.err.contains("aviary execution tail ex11"), "{}", o.err);
    assert!(!log.all().iter().any(|r| r.path.ends_with("/cancel")));
}

#[tokio::test]
async fn conflicts_and_plain_text_errors_are_api_errors() {
    let router = Router::new()
        .route(
            "/api/v1/executions/{id}/cancel",
            post(|| async {
                (
                    StatusCode::CONFLICT,
                    Json(json!({"error": "execution ex1 already succeeded; nothing to cancel"})),
                )
            }),
        )
        .route(
            "/api/v1/tokens",
            get(|| async { (StatusCode::BAD_GATEWAY, "upstream down") }),
        );
    let (url, _) = serve(router).await;
    let o = cli(&url, &["execution", "cancel", "ex1"]).await;
    assert_eq!(o.exit(), 2);
    assert_eq!(
        o.error(),
        "the server rejected the request (409): execution ex1 already succeeded; nothing to cancel"
    );
    let o = cli(&url, &["token", "list"]).await;
    assert_eq!(o.exit(), 2);
    assert!(o.error().contains("(502): upstream down"), "{}", o.error());
}

#[tokio::test]
async fn missing_token_hint_says_where_to_put_one() {
    let router = Router::new().route(
        "/api/v1/audit",
        get(|| async {
            (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": "no token given"})),
            )
        }),
    );
    let (url, log) = serve(router).await;
    let o = cli_with(Endpoint::new(url.as_str(), None), &["audit"]).await;
    assert_eq!(o.exit(), 3);
    assert!(
        o.error().contains("no token was found; set AVIARY_TOKEN"),
        "{}",
        o.error()
    );
    assert_eq!(log.all()[0].auth, None);
}

#[test]
fn run_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    let cli = Cli::try_parse_from(["aviary", "audit"]).unwrap();
    let fut = aviary_cli::run(cli.global, cli.cmd);
    assert_send(&fut);
}
