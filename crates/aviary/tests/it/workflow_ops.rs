//! Workflow operations through the binary: pause and resume (cascading to
//! subworkflows, surviving a restart) and `core.ask` inquiries (schema,
//! who may answer, audit, ttl).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::*;

fn workflow(pack: &Path, name: &str, body: &str) {
    write(
        &pack.join(format!("actions/{name}.yaml")),
        &format!(
            "name: {name}\npack: ops\nrunner_type: orquesta\nentry_point: workflows/{name}.yaml\nparameters:\n  ttl:\n    type: number\n  file:\n    type: string\n  marker:\n    type: string\n"
        ),
    );
    write(&pack.join(format!("actions/workflows/{name}.yaml")), body);
}

fn ops_pack(root: &Path) -> PathBuf {
    let pack = root.join("ops");
    write(
        &pack.join("pack.yaml"),
        "ref: ops\nname: ops\ndescription: workflow operation tests\nversion: 0.0.1\n",
    );
    // A subworkflow: a slow first task, then a second one.
    workflow(
        &pack,
        "inner",
        r#"version: 1.0
tasks:
  slow:
    action: core.local
    input:
      cmd: sleep 1
    next:
      - do: after
  after:
    action: core.echo
    input:
      message: inner done
    next:
      - publish:
          - said: <% result().stdout %>
output:
  - said: <% ctx(said) %>
"#,
    );
    workflow(
        &pack,
        "outer",
        r#"version: 1.0
tasks:
  sub:
    action: ops.inner
    next:
      - publish:
          - inner: <% result().output.said %>
        do: last
  last:
    action: core.echo
    input:
      message: outer done
output:
  - inner: <% ctx(inner) %>
"#,
    );
    workflow(
        &pack,
        "approve",
        r#"version: 1.0
input:
  - ttl: 1440
tasks:
  prepare:
    action: core.noop
    next:
      - do: ask
  ask:
    action: core.ask
    input:
      schema:
        type: object
        properties:
          approved:
            type: boolean
          note:
            type: string
            maxLength: 20
        required: [approved]
        additionalProperties: false
      roles: [approver]
      ttl: <% ctx(ttl) %>
    next:
      - when: <% succeeded() %>
        publish:
          - approved: <% result().response.approved %>
        do: ship
      - when: <% failed() %>
        publish:
          - approved: expired
        do: noop
  ship:
    action: core.echo
    input:
      message: shipping
output:
  - approved: <% ctx(approved) %>
"#,
    );
    workflow(
        &pack,
        "timeouts",
        r#"version: 1.0
tasks:
  quick:
    action: core.local
    input:
      cmd: sleep 30
      timeout: 1
    next:
      - when: <% failed() %>
        do: nap
  nap:
    action: core.local
    input:
      cmd: sleep 60
"#,
    );
    workflow(
        &pack,
        "kv",
        r#"version: 1.0
vars:
  - target: <% st2kv('system.target') %>
tasks:
  show:
    action: core.echo
    input:
      message: deploying to <% ctx(target) %>
    next:
      - publish:
          - said: <% result().stdout %>
        do: secret
  secret:
    action: core.local
    input:
      cmd: test "$PW" = s3cret-kv-value && echo matched
      env:
        PW: <% st2kv('system.pw', decrypt=true) %>
    next:
      - publish:
          - matched: <% result().stdout %>
output:
  - said: <% ctx(said) %>
  - matched: <% ctx(matched) %>
"#,
    );
    workflow(
        &pack,
        "flaky",
        r#"version: 1.0
input:
  - file
  - marker
tasks:
  first:
    action: core.local
    input:
      cmd: echo one >> "$F"
      env:
        F: <% ctx(file) %>
    next:
      - when: <% succeeded() %>
        publish:
          - first: done
        do: check
  check:
    action: core.local
    input:
      cmd: test -e "$M" && echo ok
      env:
        M: <% ctx(marker) %>
    next:
      - when: <% succeeded() %>
        publish:
          - checked: <% result().stdout %>
        do: finish
  finish:
    action: core.noop
output:
  - first: <% ctx(first) %>
  - checked: <% ctx(checked) %>
"#,
    );
    // With-items: item b fails until the marker exists.
    workflow(
        &pack,
        "each",
        r#"version: 1.0
input:
  - file
  - marker
tasks:
  each:
    with: x in <% list(a, b, c) %>
    action: core.local
    input:
      cmd: echo "$X" >> "$F"; if [ "$X" = b ] && [ ! -e "$M" ]; then exit 1; fi; echo "got $X"
      env:
        X: <% item(x) %>
        F: <% ctx(file) %>
        M: <% ctx(marker) %>
    next:
      - when: <% succeeded() %>
        publish:
          - got: <% result() %>
output:
  - got: <% ctx(got) %>
"#,
    );
    pack
}

fn run(s: &Server, action: &str, params: Value) -> String {
    let (st, e) = s.post(
        "/api/v1/executions",
        json!({"action": action, "parameters": params}),
    );
    assert_eq!(st, 201, "{e}");
    e["id"].as_str().expect("id").to_string()
}

fn children(s: &Server, id: &str) -> Vec<Value> {
    s.executions(&format!("parent={id}"))
}

fn status(s: &Server, id: &str) -> String {
    let (_, e) = s.get(&format!("/api/v1/executions/{id}"));
    e["status"].as_str().unwrap_or_default().to_string()
}

fn wait_status(s: &Server, id: &str, want: &str) {
    s.wait_for(&format!("{id} to be {want}"), || {
        (status(s, id) == want).then_some(())
    });
}

fn pause_resume_cascades_and_survives_restart(backend: Backend) {
    let dir = tempfile::tempdir().expect("tmp");
    let pack = ops_pack(dir.path());
    let mut s = Server::start(backend, &[&pack]);
    let id = run(&s, "ops.outer", json!({}));
    let sub = s.wait_for("the subworkflow's first task running", || {
        let kids = children(&s, &id);
        let sub = kids.first()?["id"].as_str()?.to_string();
        let grand = children(&s, &sub);
        (grand.len() == 1 && grand[0]["status"] == "running").then_some(sub)
    });
    let out = s.cli(&["execution", "pause", &id]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("pausing"),
        "{out:?}"
    );
    // The running task ends; nothing new starts; both become paused.
    wait_status(&s, &sub, "paused");
    wait_status(&s, &id, "paused");
    let grand = children(&s, &sub);
    assert_eq!(grand.len(), 1, "no task started while pausing: {grand:?}");
    assert_eq!(grand[0]["status"], "succeeded", "{grand:?}");
    // The pause is stored: a restart (and its resume scan) keeps it.
    s.kill9();
    s.spawn();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(status(&s, &id), "paused");
    assert_eq!(status(&s, &sub), "paused");
    assert_eq!(children(&s, &sub).len(), 1);
    // Resuming twice would be refused once it runs to its end.
    let out = s.cli(&["execution", "resume", &id]);
    assert!(out.status.success(), "{out:?}");
    let wf = s.wait_execution(&id);
    assert_eq!(wf["status"], "succeeded", "{wf}\n{}", s.log());
    assert!(
        wf["result"]["output"]["inner"]
            .as_str()
            .is_some_and(|v| v.contains("inner done")),
        "{wf}"
    );
    assert_eq!(children(&s, &sub).len(), 2);
    // A finished workflow can be neither paused nor resumed.
    let (st, body) = s.post(&format!("/api/v1/executions/{id}/pause"), json!({}));
    assert_eq!(st, 409, "{body}");
    let (st, body) = s.post(&format!("/api/v1/executions/{id}/resume"), json!({}));
    assert_eq!(st, 409, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|m| m.contains("succeeded")),
        "{body}"
    );
    // Pausing is for workflows only.
    let grand_id = children(&s, &sub)[0]["id"]
        .as_str()
        .expect("id")
        .to_string();
    let (st, body) = s.post(&format!("/api/v1/executions/{grand_id}/pause"), json!({}));
    assert_eq!(st, 409, "{body}");
    let (_, audit) = s.get("/api/v1/audit?limit=100");
    let text = audit.to_string();
    assert!(
        text.contains("execution.pause") && text.contains("execution.resume"),
        "{audit}"
    );
}

#[test]
fn pause_resume_sqlite() {
    pause_resume_cascades_and_survives_restart(Backend::Sqlite);
}

#[test]
fn pause_resume_postgres() {
    pause_resume_cascades_and_survives_restart(Backend::Postgres);
}

fn token(s: &Server, name: &str, role: &str) -> String {
    let (st, body) = s.post("/api/v1/tokens", json!({"name": name, "role": role}));
    assert_eq!(st, 201, "{body}");
    body["token"].as_str().expect("token").to_string()
}

fn respond_as(s: &Server, token: &str, id: &str, response: Value) -> (u16, Value) {
    let r = s
        .http()
        .post(s.url(&format!("/api/v1/inquiries/{id}/respond")))
        .bearer_auth(token)
        .json(&json!({ "response": response }))
        .send()
        .expect("POST");
    let st = r.status().as_u16();
    (st, r.json().unwrap_or(Value::Null))
}

fn pending_inquiry(s: &Server, wf: &str) -> String {
    s.wait_for("a pending inquiry", || {
        children(s, wf)
            .iter()
            .find(|k| k["status"] == "pending")
            .and_then(|k| k["id"].as_str().map(str::to_string))
    })
}

fn inquiry_pauses_until_a_valid_allowed_answer(backend: Backend) {
    let dir = tempfile::tempdir().expect("tmp");
    let pack = ops_pack(dir.path());
    let mut s = Server::start(backend, &[&pack]);
    let alice = token(&s, "alice", "approver");
    let bob = token(&s, "bob", "viewer");
    let id = run(&s, "ops.approve", json!({}));
    let q = pending_inquiry(&s, &id);
    wait_status(&s, &id, "paused");
    // Listed by the CLI.
    let out = s.cli(&["inquiry", "list"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&q), "{out:?}");
    // Pending inquiries survive a restart.
    s.kill9();
    s.spawn();
    assert_eq!(status(&s, &q), "pending");
    // Not an approver: refused.
    let (st, body) = respond_as(&s, &bob, &q, json!({"approved": true}));
    assert_eq!(st, 403, "{body}");
    assert!(
        body["error"].as_str().is_some_and(|m| m.contains("bob")),
        "{body}"
    );
    // Not matching the schema: refused with every problem.
    let (st, body) = respond_as(
        &s,
        &alice,
        &q,
        json!({"approved": "yes", "note": "far too long for the limit"}),
    );
    assert_eq!(st, 400, "{body}");
    let details = body["details"].as_array().cloned().unwrap_or_default();
    assert_eq!(details.len(), 2, "{body}");
    assert!(body.to_string().contains("/approved"), "{body}");
    let out = s.cli(&["inquiry", "respond", &q, "not json"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(status(&s, &q), "pending");
    assert_eq!(status(&s, &id), "paused");
    // An approver answers (through the CLI, with alice's token).
    let out = std::process::Command::new(bin())
        .args(["inquiry", "respond", &q, r#"{"approved": true}"#])
        .env("AVIARY_URL", s.url(""))
        .env("AVIARY_TOKEN", &alice)
        .output()
        .expect("cli");
    assert!(out.status.success(), "{out:?}");
    let wf = s.wait_execution(&id);
    assert_eq!(wf["status"], "succeeded", "{wf}\n{}", s.log());
    assert_eq!(wf["result"]["output"]["approved"], true, "{wf}");
    let (st, inq) = s.get(&format!("/api/v1/inquiries/{q}"));
    assert_eq!(st, 200, "{inq}");
    assert_eq!(inq["responded_by"], "alice", "{inq}");
    assert!(inq["responded_at"].is_string(), "{inq}");
    assert_eq!(inq["response"], json!({"approved": true}), "{inq}");
    // Answered once only.
    let (st, body) = respond_as(&s, &alice, &q, json!({"approved": false}));
    assert_eq!(st, 409, "{body}");
    let (_, audit) = s.get("/api/v1/audit?limit=100");
    assert!(audit.to_string().contains("inquiry.respond"), "{audit}");
    let out = s.cli(&["inquiry", "list"]);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(&q),
        "{out:?}"
    );
}

#[test]
fn inquiry_sqlite() {
    inquiry_pauses_until_a_valid_allowed_answer(Backend::Sqlite);
}

#[test]
fn inquiry_postgres() {
    inquiry_pauses_until_a_valid_allowed_answer(Backend::Postgres);
}

#[test]
fn inquiry_ttl_fails_the_task() {
    let dir = tempfile::tempdir().expect("tmp");
    let pack = ops_pack(dir.path());
    let s = Server::start(Backend::Sqlite, &[&pack]);
    // 0.02 minutes: the inquiry expires after 1.2 s.
    let id = run(&s, "ops.approve", json!({"ttl": 0.02}));
    let q = pending_inquiry(&s, &id);
    let wf = s.wait_execution(&id);
    assert_eq!(wf["status"], "succeeded", "{wf}\n{}", s.log());
    assert_eq!(wf["result"]["output"]["approved"], "expired", "{wf}");
    let (_, inq) = s.get(&format!("/api/v1/executions/{q}"));
    assert_eq!(inq["status"], "timeout", "{inq}");
    assert!(
        inq["result"]["error"]
            .as_str()
            .is_some_and(|m| m.contains("ttl")),
        "{inq}"
    );
    // No ship task ran.
    let kids = children(&s, &id);
    assert!(kids.iter().all(|k| k["action"] != "core.echo"), "{kids:?}");
}

#[test]
fn task_tree_and_tail_of_a_workflow() {
    let dir = tempfile::tempdir().expect("tmp");
    let pack = ops_pack(dir.path());
    let s = Server::start(Backend::Sqlite, &[&pack]);
    let id = run(&s, "ops.outer", json!({}));
    // Tail follows every task, subworkflow included, until the end.
    let out = s.cli(&["execution", "tail", &id]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("[sub/after] inner done\n"), "{out:?}");
    assert!(stdout.contains("[last] outer done\n"), "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("[sub/slow] succeeded"), "{stderr}");
    assert!(stderr.contains("succeeded"), "{stderr}");
    // The tree: tasks, statuses, times, published values, nested.
    let (st, tree) = s.get(&format!("/api/v1/executions/{id}/tasks"));
    assert_eq!(st, 200, "{tree}");
    let tasks = tree["tasks"].as_array().expect("tasks");
    let names: Vec<&str> = tasks.iter().filter_map(|t| t["task"].as_str()).collect();
    assert_eq!(names, vec!["sub", "last"], "{tree}");
    assert!(
        tasks[0]["published"]["inner"]
            .as_str()
            .is_some_and(|v| v.contains("inner done")),
        "{tree}"
    );
    assert!(
        tasks[0]["duration"].as_f64().is_some_and(|d| d >= 1.0),
        "{tree}"
    );
    let inner = &tasks[0]["executions"][0]["workflow"]["tasks"];
    let inner_names: Vec<&str> = inner
        .as_array()
        .expect("inner tasks")
        .iter()
        .filter_map(|t| t["task"].as_str())
        .collect();
    assert_eq!(inner_names, vec!["slow", "after"], "{tree}");
    let out = s.cli(&["execution", "get", &id]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("tasks:"), "{text}");
    assert!(
        text.contains("\n  slow ") || text.contains("  slow"),
        "{text}"
    );
    assert!(text.contains("inner="), "{text}");
    // Not a workflow: no tasks.
    let leaf = tasks[1]["executions"][0]["id"].as_str().expect("id");
    let (st, _) = s.get(&format!("/api/v1/executions/{leaf}/tasks"));
    assert_eq!(st, 409);
}

#[test]
fn task_and_workflow_timeouts() {
    let dir = tempfile::tempdir().expect("tmp");
    let pack = ops_pack(dir.path());
    let s = Server::start(Backend::Sqlite, &[&pack]);
    let id = run(&s, "ops.timeouts", json!({"timeout": 4}));
    let wf = s.wait_execution(&id);
    assert_eq!(wf["status"], "timeout", "{wf}\n{}", s.log());
    assert!(
        wf["result"]["error"]
            .as_str()
            .is_some_and(|m| m.contains("timeout of 4 s")),
        "{wf}"
    );
    let kids = children(&s, &id);
    let by_cmd = |cmd: &str| {
        kids.iter()
            .find(|k| k["parameters"]["cmd"] == cmd)
            .cloned()
            .unwrap_or(Value::Null)
    };
    // The task's own timeout: its action timed out, the task failed and
    // its failure transition ran the next task.
    assert_eq!(by_cmd("sleep 30")["status"], "timeout", "{kids:?}");
    // The workflow's timeout canceled the task still running.
    assert_eq!(by_cmd("sleep 60")["status"], "canceled", "{kids:?}");
    let (_, tree) = s.get(&format!("/api/v1/executions/{id}/tasks"));
    assert_eq!(tree["tasks"][0]["status"], "failed", "{tree}");
    assert_eq!(
        tree["tasks"][1]["executions"][0]["status"], "canceled",
        "{tree}"
    );
}

fn put_key(s: &Server, name: &str, value: &str, secret: bool) {
    let r = s
        .http()
        .put(s.url(&format!("/api/v1/keys/system/{name}")))
        .bearer_auth(&s.token)
        .json(&json!({"value": value, "secret": secret}))
        .send()
        .expect("PUT");
    assert!(r.status().is_success(), "{r:?}");
}

#[test]
fn st2kv_reads_the_datastore_at_run_time() {
    let dir = tempfile::tempdir().expect("tmp");
    let pack = ops_pack(dir.path());
    let s = Server::start(Backend::Sqlite, &[&pack]);
    // Without the key: the workflow fails, naming it.
    let id = run(&s, "ops.kv", json!({}));
    let wf = s.wait_execution(&id);
    assert_eq!(wf["status"], "failed", "{wf}");
    assert!(wf.to_string().contains("st2kv('system.target')"), "{wf}");
    put_key(&s, "target", "prod", false);
    put_key(&s, "pw", "s3cret-kv-value", true);
    let id = run(&s, "ops.kv", json!({}));
    let wf = s.wait_execution(&id);
    assert_eq!(wf["status"], "succeeded", "{wf}\n{}", s.log());
    let out = &wf["result"]["output"];
    assert!(
        out["said"]
            .as_str()
            .is_some_and(|v| v.contains("deploying to prod")),
        "{wf}"
    );
    assert!(
        out["matched"]
            .as_str()
            .is_some_and(|v| v.contains("matched")),
        "{wf}"
    );
    // The decrypted secret is masked everywhere it could show.
    let kids = children(&s, &id);
    assert!(!wf.to_string().contains("s3cret-kv-value"), "{wf}");
    for k in &kids {
        assert!(!k.to_string().contains("s3cret-kv-value"), "{k}");
    }
    let (_, tree) = s.get(&format!("/api/v1/executions/{id}/tasks"));
    assert!(!tree.to_string().contains("s3cret-kv-value"), "{tree}");
}

#[test]
fn rerun_a_failed_workflow_from_a_task() {
    let dir = tempfile::tempdir().expect("tmp");
    let pack = ops_pack(dir.path());
    let s = Server::start(Backend::Sqlite, &[&pack]);
    let file = dir.path().join("runs.txt");
    let marker = dir.path().join("marker");
    let id = run(
        &s,
        "ops.flaky",
        json!({"file": file.display().to_string(), "marker": marker.display().to_string()}),
    );
    let wf = s.wait_execution(&id);
    assert_eq!(wf["status"], "failed", "{wf}");
    // Fix the cause, then re-run from the failed task only.
    write(&marker, "");
    let out = s.cli(&["execution", "re-run", &id, "--tasks", "nope"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("task 'nope' did not run"),
        "{out:?}"
    );
    let out = s.cli(&["--json", "execution", "re-run", &id, "--tasks", "check"]);
    assert!(out.status.success(), "{out:?}");
    let new: Value = serde_json::from_slice(&out.stdout).expect("json");
    let new_id = new["id"].as_str().expect("id");
    assert_ne!(new_id, id);
    let again = s.wait_execution(new_id);
    assert_eq!(again["status"], "succeeded", "{again}\n{}", s.log());
    // The first task's result and published value were kept, not re-run.
    assert_eq!(again["result"]["output"]["first"], "done", "{again}");
    assert!(
        again["result"]["output"]["checked"]
            .as_str()
            .is_some_and(|v| v.contains("ok")),
        "{again}"
    );
    let runs = std::fs::read_to_string(&file).expect("runs");
    assert_eq!(runs, "one\n", "the first task ran once");
    let kids = children(&s, new_id);
    let mut actions: Vec<&str> = kids.iter().filter_map(|k| k["action"].as_str()).collect();
    actions.sort();
    assert_eq!(actions, vec!["core.local", "core.noop"], "{kids:?}");
    // The original stays as it was; a running workflow cannot be re-run.
    assert_eq!(status(&s, &id), "failed");
    let (_, audit) = s.get("/api/v1/audit?limit=100");
    assert!(audit.to_string().contains("execution.re-run"), "{audit}");
}

#[test]
fn rerun_without_reset_runs_only_the_failed_items() {
    let dir = tempfile::tempdir().expect("tmp");
    let pack = ops_pack(dir.path());
    let s = Server::start(Backend::Sqlite, &[&pack]);
    let file = dir.path().join("items.txt");
    let marker = dir.path().join("marker");
    let id = run(
        &s,
        "ops.each",
        json!({"file": file.display().to_string(), "marker": marker.display().to_string()}),
    );
    let wf = s.wait_execution(&id);
    assert_eq!(wf["status"], "failed", "{wf}");
    let mut first: Vec<String> = std::fs::read_to_string(&file)
        .expect("items")
        .lines()
        .map(String::from)
        .collect();
    first.sort();
    assert_eq!(first, vec!["a", "b", "c"]);
    write(&marker, "");
    // --no-reset must name a task that is re-run.
    let out = s.cli(&[
        "execution",
        "re-run",
        &id,
        "--tasks",
        "each",
        "--no-reset",
        "other",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = s.cli(&[
        "--json",
        "execution",
        "re-run",
        &id,
        "--tasks",
        "each",
        "--no-reset",
        "each",
    ]);
    assert!(out.status.success(), "{out:?}");
    let new: Value = serde_json::from_slice(&out.stdout).expect("json");
    let again = s.wait_execution(new["id"].as_str().expect("id"));
    assert_eq!(again["status"], "succeeded", "{again}\n{}", s.log());
    // Only b ran again; a's and c's results were kept.
    let lines = std::fs::read_to_string(&file).expect("items");
    assert_eq!(lines.lines().count(), 4, "{lines}");
    assert_eq!(lines.lines().last(), Some("b"), "{lines}");
    let got: Vec<String> = again["result"]["output"]["got"]
        .as_array()
        .expect("got")
        .iter()
        .map(|r| r["stdout"].as_str().unwrap_or_default().trim().to_string())
        .collect();
    assert_eq!(got, vec!["got a", "got b", "got c"], "{again}");
    assert_eq!(children(&s, new["id"].as_str().expect("id")).len(), 1);
}
