//! Orquesta workflows run durably: each task is a child execution, the
//! workflow state is stored between steps, and a workflow survives kill -9
//! of the server (no finished task runs twice).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::*;

fn action(pack: &Path, name: &str, params: &str) {
    write(
        &pack.join(format!("actions/{name}.yaml")),
        &format!(
            "name: {name}\npack: wf\nrunner_type: orquesta\nentry_point: workflows/{name}.yaml\nparameters:\n{params}"
        ),
    );
}

/// A pack `wf` with the workflows the tests run.
fn wf_pack(root: &Path) -> PathBuf {
    let pack = root.join("wf");
    write(
        &pack.join("pack.yaml"),
        "ref: wf\nname: wf\ndescription: workflow tests\nversion: 0.0.1\n",
    );
    action(
        &pack,
        "seq",
        "  name:\n    type: string\n    required: true\n",
    );
    write(
        &pack.join("actions/workflows/seq.yaml"),
        r#"version: 1.0
input:
  - name
tasks:
  greet:
    action: core.echo
    input:
      message: hello <% ctx(name) %>
    next:
      - when: <% succeeded() %>
        publish:
          - greeting: <% result().stdout %>
        do: shout
  shout:
    action: core.echo
    input:
      message: again
    next:
      - publish:
          - last: <% result().stdout %>
output:
  - greeting: <% ctx(greeting) %>
  - last: <% ctx(last) %>
"#,
    );
    action(&pack, "branch", "  {}\n");
    write(
        &pack.join("actions/workflows/branch.yaml"),
        r#"version: 1.0
tasks:
  try:
    action: core.local
    input:
      cmd: exit 3
    next:
      - when: <% succeeded() %>
        publish:
          - path: good
        do: good
      - when: <% failed() %>
        publish:
          - path: recovered
        do: recover
  good:
    action: core.noop
  recover:
    action: core.echo
    input:
      message: recovering
output:
  - path: <% ctx(path) %>
"#,
    );
    action(&pack, "items", "  {}\n");
    write(
        &pack.join("actions/workflows/items.yaml"),
        r#"version: 1.0
vars:
  - xs: [a, b, c, d, e]
tasks:
  each:
    with:
      items: <% ctx(xs) %>
      concurrency: 2
    action: core.echo
    input:
      message: <% item() %>
    next:
      - publish:
          - outs: <% result() %>
output:
  - outs: <% ctx(outs) %>
"#,
    );
    action(&pack, "parent", "  {}\n");
    write(
        &pack.join("actions/workflows/parent.yaml"),
        r#"version: 1.0
tasks:
  sub:
    action: wf.seq
    input:
      name: sub
    next:
      - publish:
          - inner: <% result().output.greeting %>
output:
  - inner: <% ctx(inner) %>
"#,
    );
    action(
        &pack,
        "secretive",
        "  token:\n    type: string\n    secret: true\n    required: true\n",
    );
    write(
        &pack.join("actions/workflows/secretive.yaml"),
        r#"version: 1.0
input:
  - token
tasks:
  use:
    action: core.echo
    input:
      message: <% ctx(token) %>
"#,
    );
    action(&pack, "later", "  {}\n");
    write(
        &pack.join("actions/workflows/later.yaml"),
        r#"version: 1.0
tasks:
  wait:
    delay: 2
    action: core.noop
"#,
    );
    action(&pack, "slow", "  {}\n");
    write(
        &pack.join("actions/workflows/slow.yaml"),
        r#"version: 1.0
tasks:
  a:
    action: core.local
    input:
      cmd: sleep 30
    next:
      - do: after
  b:
    action: core.local
    input:
      cmd: sleep 30
  after:
    action: core.noop
"#,
    );
    action(
        &pack,
        "steps",
        "  file:\n    type: string\n    required: true\n",
    );
    let mut steps = String::from("version: 1.0\ninput:\n  - file\ntasks:\n");
    for i in 1..=8 {
        steps.push_str(&format!(
            "  t{i}:\n    action: core.local\n    input:\n      cmd: echo {i} >> \"$OUT\"; sleep 0.3\n      env:\n        OUT: <% ctx(file) %>\n"
        ));
        if i < 8 {
            steps.push_str(&format!("    next:\n      - do: t{}\n", i + 1));
        }
    }
    steps.push_str("output:\n  - done: true\n");
    write(&pack.join("actions/workflows/steps.yaml"), &steps);
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

fn sequential_with_publish_and_output(backend: Backend) {
    let dir = tempfile::tempdir().expect("tmp");
    let pack = wf_pack(dir.path());
    let s = Server::start(backend, &[&pack]);
    let id = run(&s, "wf.seq", json!({"name": "world"}));
    let wf = s.wait_execution(&id);
    assert_eq!(wf["status"], "succeeded", "{wf}\n{}", s.log());
    let out = &wf["result"]["output"];
    assert!(
        out["greeting"]
            .as_str()
            .is_some_and(|g| g.contains("hello world")),
        "{wf}"
    );
    assert!(
        out["last"].as_str().is_some_and(|g| g.contains("again")),
        "{wf}"
    );
    let kids = children(&s, &id);
    assert_eq!(kids.len(), 2, "{kids:?}");
    assert!(kids.iter().all(|k| k["status"] == "succeeded"));
}

fn branch_on_failure(backend: Backend) {
    let dir = tempfile::tempdir().expect("tmp");
    let pack = wf_pack(dir.path());
    let s = Server::start(backend, &[&pack]);
    let id = run(&s, "wf.branch", json!({}));
    let wf = s.wait_execution(&id);
    assert_eq!(wf["status"], "succeeded", "{wf}\n{}", s.log());
    assert_eq!(wf["result"]["output"]["path"], "recovered", "{wf}");
    let kids = children(&s, &id);
    let mut actions: Vec<(String, String)> = kids
        .iter()
        .map(|k| {
            (
                k["action"].as_str().unwrap_or_default().to_string(),
                k["status"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    actions.sort();
    assert_eq!(
        actions,
        vec![
            ("core.echo".to_string(), "succeeded".to_string()),
            ("core.local".to_string(), "failed".to_string())
        ]
    );
}

fn with_items_concurrency(backend: Backend) {
    let dir = tempfile::tempdir().expect("tmp");
    let pack = wf_pack(dir.path());
    let s = Server::start(backend, &[&pack]);
    let id = run(&s, "wf.items", json!({}));
    let wf = s.wait_execution(&id);
    assert_eq!(wf["status"], "succeeded", "{wf}\n{}", s.log());
    let outs: Vec<String> = wf["result"]["output"]["outs"]
        .as_array()
        .expect("outs")
        .iter()
        .map(|v| v["stdout"].as_str().unwrap_or_default().trim().to_string())
        .collect();
    assert_eq!(outs, vec!["a", "b", "c", "d", "e"], "{wf}");
    let kids = children(&s, &id);
    assert_eq!(kids.len(), 5);
    // At most 2 items overlapped in time.
    let span = |k: &Value| {
        (
            k["started_at"].as_str().unwrap_or_default().to_string(),
            k["finished_at"].as_str().unwrap_or_default().to_string(),
        )
    };
    let spans: Vec<(String, String)> = kids.iter().map(span).collect();
    for (a_start, _) in &spans {
        let running = spans
            .iter()
            .filter(|(s2, f2)| s2 <= a_start && a_start < f2)
            .count();
        assert!(running <= 2, "more than 2 items at once: {spans:?}");
    }
}

fn subworkflow(backend: Backend) {
    let dir = tempfile::tempdir().expect("tmp");
    let pack = wf_pack(dir.path());
    let s = Server::start(backend, &[&pack]);
    let id = run(&s, "wf.parent", json!({}));
    let wf = s.wait_execution(&id);
    assert_eq!(wf["status"], "succeeded", "{wf}\n{}", s.log());
    assert!(
        wf["result"]["output"]["inner"]
            .as_str()
            .is_some_and(|g| g.contains("hello sub")),
        "{wf}"
    );
    let kids = children(&s, &id);
    assert_eq!(kids.len(), 1);
    assert_eq!(kids[0]["action"], "wf.seq");
    let grandkids = children(&s, kids[0]["id"].as_str().expect("id"));
    assert_eq!(grandkids.len(), 2);
}

fn survives_kill9(backend: Backend) {
    let dir = tempfile::tempdir().expect("tmp");
    let pack = wf_pack(dir.path());
    let file = dir.path().join("steps.txt");
    let mut s = Server::start(backend, &[&pack]);
    let id = run(&s, "wf.steps", json!({"file": file.display().to_string()}));
    // Kill at varied points: just after it started, then after some task
    // lines (crash points differ from run to run, which is the point).
    for (round, lines) in [0usize, 2, 4, 6].into_iter().enumerate() {
        s.wait_for("progress", || {
            let n = std::fs::read_to_string(&file)
                .map(|t| t.lines().count())
                .unwrap_or(0);
            let (_, wf) = s.get(&format!("/api/v1/executions/{id}"));
            let started = wf["status"] != "requested" && wf["status"] != "scheduled";
            (started && n >= lines || wf["finished_at"].is_string()).then_some(())
        });
        std::thread::sleep(Duration::from_millis(70 * round as u64));
        s.kill9();
        s.spawn();
    }
    let wf = s.wait_execution(&id);
    let text = std::fs::read_to_string(&file).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let mut seen = std::collections::HashSet::new();
    for l in &lines {
        assert!(seen.insert(*l), "task line {l} ran twice: {lines:?}");
    }
    // Every `next` is unconditional, so a task lost in a crash (failed,
    // with the reason) does not stop the workflow: it goes on and succeeds.
    assert_eq!(wf["status"], "succeeded", "{wf}\n{}", s.log());
    assert_eq!(wf["result"]["output"], json!({"done": true}), "{wf}");
    let kids = children(&s, &id);
    assert_eq!(kids.len(), 8, "one child per task: {kids:?}");
    let mut sorted = lines.clone();
    sorted.sort();
    assert_eq!(sorted, lines, "tasks ran in order: {lines:?}");
    let succeeded = kids.iter().filter(|k| k["status"] == "succeeded").count();
    let abandoned = kids.iter().filter(|k| k["status"] == "abandoned").count();
    assert_eq!(succeeded + abandoned, 8, "{kids:?}");
    assert!(lines.len() >= succeeded, "{lines:?} {kids:?}");
    let errors = wf["result"]["errors"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(errors.len(), abandoned, "{wf}");
    for e in &errors {
        assert!(
            e["result"]["error"]
                .as_str()
                .is_some_and(|m| m.contains("stopped while it ran")),
            "{wf}"
        );
    }
}

fn cancel_cascades(backend: Backend) {
    let dir = tempfile::tempdir().expect("tmp");
    let pack = wf_pack(dir.path());
    // One worker: one child runs, the other waits in the queue.
    let s = Server::start_with(backend, &[&pack], &["--workers", "1"]);
    let id = run(&s, "wf.slow", json!({}));
    s.wait_for("a child running and one queued", || {
        let kids = children(&s, &id);
        let running = kids.iter().filter(|k| k["status"] == "running").count();
        (kids.len() == 2 && running == 1).then_some(())
    });
    let (st, body) = s.post(&format!("/api/v1/executions/{id}/cancel"), json!({}));
    assert!(st == 200 || st == 202, "{st} {body}");
    let wf = s.wait_execution(&id);
    assert_eq!(wf["status"], "canceled", "{wf}\n{}", s.log());
    let kids = children(&s, &id);
    assert_eq!(kids.len(), 2, "nothing new after the cancel: {kids:?}");
    for k in &kids {
        assert_eq!(k["status"], "canceled", "{k}");
    }
}

#[test]
fn secrets_stay_encrypted_in_state_and_children() {
    let dir = tempfile::tempdir().expect("tmp");
    let pack = wf_pack(dir.path());
    let s = Server::start(Backend::Sqlite, &[&pack]);
    let token = "s3cr3t-wf-token-4711";
    let id = run(&s, "wf.secretive", json!({"token": token}));
    let wf = s.wait_execution(&id);
    assert_eq!(wf["status"], "succeeded", "{wf}\n{}", s.log());
    assert!(!wf.to_string().contains(token), "{wf}");
    let kids = children(&s, &id);
    assert_eq!(kids.len(), 1);
    assert!(!kids[0].to_string().contains(token), "{:?}", kids[0]);
    // Nothing in the database files holds the plain value.
    for name in ["aviary.db", "aviary.db-wal"] {
        let path = s.dir.path().join(name);
        if let Ok(bytes) = std::fs::read(&path) {
            assert!(
                !bytes.windows(token.len()).any(|w| w == token.as_bytes()),
                "{} holds the secret in plain text",
                path.display()
            );
        }
    }
}

#[test]
fn delayed_task_is_not_run_before_its_time() {
    let dir = tempfile::tempdir().expect("tmp");
    let pack = wf_pack(dir.path());
    let s = Server::start(Backend::Sqlite, &[&pack]);
    let id = run(&s, "wf.later", json!({}));
    let wf = s.wait_execution(&id);
    assert_eq!(wf["status"], "succeeded", "{wf}\n{}", s.log());
    let kids = children(&s, &id);
    assert_eq!(kids.len(), 1);
    let exec = |v: &Value| -> aviary_core::model::Execution {
        serde_json::from_value(v.clone()).expect("an execution")
    };
    let (kid, wf) = (exec(&kids[0]), exec(&wf));
    let wf_started = wf.started_at.expect("workflow started");
    let kid_started = kid.started_at.expect("child started");
    assert!(
        (kid.created_at - wf_started).num_milliseconds() >= 2000,
        "the child is due 2 s after the step: {kids:?}"
    );
    assert!(kid_started >= kid.created_at, "not claimed early: {kids:?}");
}

#[test]
fn bad_workflows_are_refused_with_locations() {
    let dir = tempfile::tempdir().expect("tmp");
    let pack = wf_pack(dir.path());
    write(
        &pack.join("actions/workflows/seq.yaml"),
        "version: 1.0\ntasks:\n  one:\n    action: nope.missing\n",
    );
    write(
        &pack.join("actions/workflows/branch.yaml"),
        "version: 1.0\ntasks:\n  one:\n    action: core.noop\n    next:\n      - do: nowhere\n",
    );
    let out = std::process::Command::new(bin())
        .args(["pack", "validate"])
        .arg(&pack)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let seq = pack
        .join("actions/workflows/seq.yaml")
        .display()
        .to_string();
    assert!(
        err.contains(&format!("{seq}:4:13: tasks.one.action")) && err.contains("nope.missing"),
        "unknown action located at its task: {err}"
    );
    let branch = pack
        .join("actions/workflows/branch.yaml")
        .display()
        .to_string();
    assert!(
        err.contains(&format!("{branch}:")) && err.contains("nowhere"),
        "{err}"
    );
}

#[test]
fn cancel_cascades_sqlite() {
    cancel_cascades(Backend::Sqlite);
}

#[test]
fn cancel_cascades_postgres() {
    cancel_cascades(Backend::Postgres);
}

#[test]
fn sequential_with_publish_and_output_sqlite() {
    sequential_with_publish_and_output(Backend::Sqlite);
}

#[test]
fn sequential_with_publish_and_output_postgres() {
    sequential_with_publish_and_output(Backend::Postgres);
}

#[test]
fn branch_on_failure_sqlite() {
    branch_on_failure(Backend::Sqlite);
}

#[test]
fn branch_on_failure_postgres() {
    branch_on_failure(Backend::Postgres);
}

#[test]
fn with_items_concurrency_sqlite() {
    with_items_concurrency(Backend::Sqlite);
}

#[test]
fn with_items_concurrency_postgres() {
    with_items_concurrency(Backend::Postgres);
}

#[test]
fn subworkflow_sqlite() {
    subworkflow(Backend::Sqlite);
}

#[test]
fn subworkflow_postgres() {
    subworkflow(Backend::Postgres);
}

#[test]
fn survives_kill9_sqlite() {
    survives_kill9(Backend::Sqlite);
}

#[test]
fn survives_kill9_postgres() {
    survives_kill9(Backend::Postgres);
}
