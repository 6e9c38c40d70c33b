//! Conductor behaviour seen through its commands: rendering, delays,
//! retries, with-items concurrency, serialization between events, errors.

#![allow(clippy::unwrap_used)]

use aviary_workflow::conductor::{
    self, Command, ConductorError, Env, TaskRef, TaskStatus, WorkflowState, WorkflowStatus,
};
use aviary_workflow::spec::{WorkflowSpec, parse_workflow};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

fn env() -> Env<'static> {
    Env {
        now: DateTime::<Utc>::UNIX_EPOCH,
        kv: None,
    }
}

fn spec(text: &str) -> WorkflowSpec {
    parse_workflow("wf.yaml", text).unwrap()
}

fn input(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

/// (task, action, input, delay) of each RunAction.
type Run = (TaskRef, String, Map<String, Value>, Option<u64>);

fn runs(cmds: &[Command]) -> Vec<Run> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::RunAction {
                task,
                action,
                input,
                delay,
            } => Some((task.clone(), action.clone(), input.clone(), *delay)),
            Command::Finish { .. } => None,
        })
        .collect()
}

fn finish(cmds: &[Command]) -> Option<(WorkflowStatus, Option<Map<String, Value>>)> {
    cmds.iter().find_map(|c| match c {
        Command::Finish { status, output, .. } => Some((*status, output.clone())),
        Command::RunAction { .. } => None,
    })
}

fn task(id: &str) -> TaskRef {
    TaskRef {
        id: id.into(),
        route: 0,
        item: None,
    }
}

const DEPLOY: &str = r#"
version: 1.0
input:
  - env
  - target: <% ctx(env) + '-cluster' %>
vars:
  - attempts: 0
output:
  - url: <% ctx(url) %>
tasks:
  build:
    action: core.local cmd="make <% ctx(target) %>"
    delay: 5
    next:
      - when: <% succeeded() %>
        publish: url=<% result().url %>
        do: deploy
  deploy:
    action: aviary.deploy
    input:
      url: <% ctx(url) %>
      region: "{{ st2kv('region') }}"
    retry:
      count: 2
      delay: 30
"#;

#[test]
fn renders_input_delay_and_finishes_with_output() {
    let wf = spec(DEPLOY);
    let (mut state, cmds) = conductor::start(&wf, input(json!({"env": "prod"})), env());
    let r = runs(&cmds);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].1, "core.local");
    assert_eq!(r[0].2, input(json!({"cmd": "make prod-cluster"})));
    assert_eq!(r[0].3, Some(5));
    let kv = |k: &str, _decrypt: bool| (k == "region").then(|| json!("eu-west"));
    let env_kv = Env {
        kv: Some(&kv),
        ..env()
    };
    let cmds = conductor::on_action_finished(
        &wf,
        &mut state,
        &task("build"),
        TaskStatus::Succeeded,
        json!({"url": "https://x"}),
        env_kv,
    )
    .unwrap();
    let r = runs(&cmds);
    assert_eq!(r[0].1, "aviary.deploy");
    assert_eq!(
        r[0].2,
        input(json!({"url": "https://x", "region": "eu-west"}))
    );
    assert_eq!(r[0].3, None);
    // Fails once: retried after the retry delay.
    let cmds = conductor::on_action_finished(
        &wf,
        &mut state,
        &task("deploy"),
        TaskStatus::Failed,
        json!({"stderr": "timeout"}),
        env_kv,
    )
    .unwrap();
    let r = runs(&cmds);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].3, Some(30));
    assert_eq!(
        state.entry("deploy", 0).unwrap().status,
        TaskStatus::Retrying
    );
    let cmds = conductor::on_action_finished(
        &wf,
        &mut state,
        &task("deploy"),
        TaskStatus::Succeeded,
        json!({}),
        env_kv,
    )
    .unwrap();
    let (status, output) = finish(&cmds).unwrap();
    assert_eq!(status, WorkflowStatus::Succeeded);
    assert_eq!(output, Some(input(json!({"url": "https://x"}))));
    assert_eq!(state.sequence.len(), 2);
    assert_eq!(
        state
            .entry("deploy", 0)
            .unwrap()
            .retry
            .as_ref()
            .unwrap()
            .tally,
        1
    );
}

#[test]
fn state_survives_serialization_between_events() {
    let wf = spec(DEPLOY);
    let (state, _) = conductor::start(&wf, input(json!({"env": "dev"})), env());
    let text = serde_json::to_string(&state).unwrap();
    let mut state: WorkflowState = serde_json::from_str(&text).unwrap();
    let kv = |_: &str, _: bool| Some(json!("r"));
    let env_kv = Env {
        kv: Some(&kv),
        ..env()
    };
    conductor::on_action_finished(
        &wf,
        &mut state,
        &task("build"),
        TaskStatus::Succeeded,
        json!({"url": "u"}),
        env_kv,
    )
    .unwrap();
    let text = serde_json::to_string(&state).unwrap();
    let mut state: WorkflowState = serde_json::from_str(&text).unwrap();
    let cmds = conductor::on_action_finished(
        &wf,
        &mut state,
        &task("deploy"),
        TaskStatus::Succeeded,
        json!({}),
        env_kv,
    )
    .unwrap();
    assert_eq!(finish(&cmds).unwrap().0, WorkflowStatus::Succeeded);
}

#[test]
fn reports_for_tasks_not_waiting_are_errors() {
    let wf = spec(DEPLOY);
    let (mut state, _) = conductor::start(&wf, input(json!({"env": "dev"})), env());
    let err = conductor::on_action_finished(
        &wf,
        &mut state,
        &task("deploy"),
        TaskStatus::Succeeded,
        Value::Null,
        env(),
    )
    .unwrap_err();
    assert!(matches!(err, ConductorError::NotWaiting { .. }), "{err}");
    let err = conductor::on_action_finished(
        &wf,
        &mut state,
        &task("nope"),
        TaskStatus::Succeeded,
        Value::Null,
        env(),
    )
    .unwrap_err();
    assert_eq!(err, ConductorError::UnknownTask("nope".into()));
}

#[test]
fn runtime_expression_error_fails_the_workflow_with_a_message() {
    let wf = spec("version: 1.0\ntasks:\n  a:\n    action: core.echo message=<% ctx(missing) %>\n");
    let (state, cmds) = conductor::start(&wf, Map::new(), env());
    assert!(runs(&cmds).is_empty());
    assert_eq!(finish(&cmds).unwrap().0, WorkflowStatus::Failed);
    assert!(
        state.errors[0]
            .message
            .contains("`missing` is referenced before assignment"),
        "{:?}",
        state.errors
    );
    assert_eq!(state.errors[0].task_id.as_deref(), Some("a"));
}

#[test]
fn with_items_respects_concurrency() {
    let wf = spec(
        r#"
version: 1.0
input: [hosts]
tasks:
  ping:
    with:
      items: h in <% ctx(hosts) %>
      concurrency: 2
    action: core.remote hosts=<% item(h) %> cmd=uptime
    next:
      - publish: ups=<% result() %>
output:
  - ups: <% ctx(ups) %>
"#,
    );
    let (mut state, cmds) = conductor::start(&wf, input(json!({"hosts": ["a", "b", "c"]})), env());
    let r = runs(&cmds);
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].0.item, Some(0));
    assert_eq!(r[1].2, input(json!({"hosts": "b", "cmd": "uptime"})));
    let item = |i: usize| TaskRef {
        item: Some(i),
        ..task("ping")
    };
    let cmds = conductor::on_action_finished(
        &wf,
        &mut state,
        &item(1),
        TaskStatus::Succeeded,
        json!("up b"),
        env(),
    )
    .unwrap();
    let r = runs(&cmds);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0.item, Some(2));
    for i in [0, 2] {
        let cmds = conductor::on_action_finished(
            &wf,
            &mut state,
            &item(i),
            TaskStatus::Succeeded,
            json!(format!("up {i}")),
            env(),
        )
        .unwrap();
        if i == 2 {
            let (status, output) = finish(&cmds).unwrap();
            assert_eq!(status, WorkflowStatus::Succeeded);
            // Item results in item order, whatever order they ended in.
            assert_eq!(
                output.and_then(|o| o.get("ups").cloned()),
                Some(json!(["up 0", "up b", "up 2"]))
            );
        }
    }
}

#[test]
fn cancel_waits_for_running_actions() {
    let wf = spec(DEPLOY);
    let (mut state, _) = conductor::start(&wf, input(json!({"env": "dev"})), env());
    let cmds = conductor::cancel(&wf, &mut state, env());
    assert!(finish(&cmds).is_none(), "build is still running");
    let cmds = conductor::on_action_finished(
        &wf,
        &mut state,
        &task("build"),
        TaskStatus::Succeeded,
        json!({"url": "u"}),
        env(),
    )
    .unwrap();
    assert!(runs(&cmds).is_empty());
    assert_eq!(finish(&cmds).unwrap().0, WorkflowStatus::Canceled);
}

#[test]
fn start_reports_bad_input_defaults() {
    let wf =
        spec("version: 1.0\ninput:\n  - x: <% ctx(nope) %>\ntasks:\n  a:\n    action: core.noop\n");
    let (state, cmds) = conductor::start(&wf, Map::new(), env());
    assert_eq!(finish(&cmds).unwrap().0, WorkflowStatus::Failed);
    assert!(
        state.errors[0].message.starts_with("input 'x'"),
        "{:?}",
        state.errors
    );
    // Given input wins over the default.
    let (_, cmds) = conductor::start(&wf, input(json!({"x": 1})), env());
    assert_eq!(runs(&cmds).len(), 1);
}

const PARALLEL: &str = r#"
version: 1.0
tasks:
  a:
    action: core.noop
    next:
      - do: c
  b:
    action: core.noop
  c:
    action: core.echo
    input:
      message: after a
    next:
      - publish:
          - said: <% result() %>
output:
  - said: <% ctx(said) %>
"#;

#[test]
fn pause_lets_running_actions_end_and_starts_nothing_until_resumed() {
    let s = spec(PARALLEL);
    let (mut st, cmds) = conductor::start(&s, Map::new(), env());
    assert_eq!(runs(&cmds).len(), 2);
    conductor::pause(&mut st);
    let cmds = conductor::on_action_finished(
        &s,
        &mut st,
        &task("a"),
        TaskStatus::Succeeded,
        json!({}),
        env(),
    )
    .unwrap();
    assert!(cmds.is_empty(), "nothing dispatched while paused: {cmds:?}");
    assert!(!conductor::is_idle(&st), "b still runs");
    let cmds = conductor::on_action_finished(
        &s,
        &mut st,
        &task("b"),
        TaskStatus::Succeeded,
        json!({}),
        env(),
    )
    .unwrap();
    assert!(
        cmds.is_empty(),
        "a paused workflow does not finish with work left: {cmds:?}"
    );
    assert!(conductor::is_idle(&st));
    // Survives serialization (the server stores it).
    let mut st: WorkflowState = serde_json::from_value(serde_json::to_value(&st).unwrap()).unwrap();
    let cmds = conductor::resume(&s, &mut st, env());
    let r = runs(&cmds);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0.id, "c");
    let cmds = conductor::on_action_finished(
        &s,
        &mut st,
        &task("c"),
        TaskStatus::Succeeded,
        json!("after a"),
        env(),
    )
    .unwrap();
    assert_eq!(
        finish(&cmds),
        Some((
            WorkflowStatus::Succeeded,
            Some(input(json!({"said": "after a"})))
        ))
    );
}

#[test]
fn rerun_keeps_finished_tasks_and_runs_the_named_ones_again() {
    let s = spec(PARALLEL);
    let (mut st, _) = conductor::start(&s, Map::new(), env());
    conductor::on_action_finished(
        &s,
        &mut st,
        &task("a"),
        TaskStatus::Succeeded,
        json!({}),
        env(),
    )
    .unwrap();
    conductor::on_action_finished(
        &s,
        &mut st,
        &task("b"),
        TaskStatus::Succeeded,
        json!({}),
        env(),
    )
    .unwrap();
    let cmds = conductor::on_action_finished(
        &s,
        &mut st,
        &task("c"),
        TaskStatus::Failed,
        json!({}),
        env(),
    )
    .unwrap();
    assert_eq!(finish(&cmds).map(|f| f.0), Some(WorkflowStatus::Failed));
    let err = conductor::rerun(&s, &st, &["nope".into()], env()).unwrap_err();
    assert!(err.to_string().contains("'nope' did not run"), "{err}");
    let (mut again, cmds) = conductor::rerun(&s, &st, &["c".into()], env()).unwrap();
    let r = runs(&cmds);
    assert_eq!(r.len(), 1, "only c runs again: {r:?}");
    assert_eq!(r[0].0.id, "c");
    assert!(again.errors.is_empty());
    let cmds = conductor::on_action_finished(
        &s,
        &mut again,
        &task("c"),
        TaskStatus::Succeeded,
        json!("fixed"),
        env(),
    )
    .unwrap();
    assert_eq!(
        finish(&cmds),
        Some((
            WorkflowStatus::Succeeded,
            Some(input(json!({"said": "fixed"})))
        ))
    );
    // A running workflow cannot be re-run.
    let (running, _) = conductor::start(&s, Map::new(), env());
    assert!(conductor::rerun(&s, &running, &["a".into()], env()).is_err());
}

#[test]
fn rerun_without_reset_runs_only_the_items_that_did_not_succeed() {
    let s = spec(
        r#"
version: 1.0
input: [hosts]
tasks:
  ping:
    with: h in <% ctx(hosts) %>
    action: core.echo message=<% item(h) %>
    next:
      - when: <% succeeded() %>
        publish: ups=<% result() %>
output:
  - ups: <% ctx(ups) %>
"#,
    );
    let item = |i: usize| TaskRef {
        id: "ping".into(),
        route: 0,
        item: Some(i),
    };
    let (mut st, cmds) = conductor::start(&s, input(json!({"hosts": ["a", "b", "c"]})), env());
    assert_eq!(runs(&cmds).len(), 3);
    for (i, status) in [
        (0, TaskStatus::Succeeded),
        (1, TaskStatus::Failed),
        (2, TaskStatus::Succeeded),
    ] {
        conductor::on_action_finished(&s, &mut st, &item(i), status, json!(format!("r{i}")), env())
            .unwrap();
    }
    assert_eq!(st.status, WorkflowStatus::Failed);
    let kept = [(
        "ping".to_string(),
        [(0, json!("r0")), (2, json!("r2"))].into_iter().collect(),
    )]
    .into_iter()
    .collect();
    // The kept task must be re-run, and be a with-items task.
    let err = conductor::rerun_keeping(&s, &st, &["other".into()], &kept, env()).unwrap_err();
    assert!(err.to_string().contains("not in --tasks"), "{err}");
    let (mut again, cmds) =
        conductor::rerun_keeping(&s, &st, &["ping".into()], &kept, env()).unwrap();
    let r = runs(&cmds);
    assert_eq!(r.len(), 1, "only the failed item runs again: {r:?}");
    assert_eq!(r[0].0.item, Some(1));
    let cmds = conductor::on_action_finished(
        &s,
        &mut again,
        &item(1),
        TaskStatus::Succeeded,
        json!("fixed"),
        env(),
    )
    .unwrap();
    assert_eq!(
        finish(&cmds),
        Some((
            WorkflowStatus::Succeeded,
            Some(input(json!({"ups": ["r0", "fixed", "r2"]})))
        ))
    );
    // Every item kept: the task succeeds without running anything.
    let all = [(
        "ping".to_string(),
        [(0, json!("x")), (1, json!("y")), (2, json!("z"))]
            .into_iter()
            .collect(),
    )]
    .into_iter()
    .collect();
    let (_, cmds) = conductor::rerun_keeping(&s, &st, &["ping".into()], &all, env()).unwrap();
    assert!(runs(&cmds).is_empty());
    assert_eq!(
        finish(&cmds),
        Some((
            WorkflowStatus::Succeeded,
            Some(input(json!({"ups": ["x", "y", "z"]})))
        ))
    );
}
