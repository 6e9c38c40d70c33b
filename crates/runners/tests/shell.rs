//! Integration tests of the shell runners with real processes.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use aviary_core::model::{ExecutionStatus, MASK};
use aviary_runners::{OUTPUT_CAP, Stream, is_known_runner, run};
use common::*;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use serde_json::json;
use tokio::sync::mpsc::unbounded_channel;
use tokio_util::sync::CancellationToken;

/// True while `pid` exists and is not a zombie.
fn alive(pid: i32) -> bool {
    if kill(Pid::from_raw(pid), None).is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the ")" closing the command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(true),
        Err(_) => false,
    }
}

/// Waits (with a safety net) until `pid` is gone.
async fn assert_dies(pid: i32) {
    let gone = tokio::time::timeout(Duration::from_secs(20), async {
        while alive(pid) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(gone.is_ok(), "process {pid} survived the runner");
}

#[tokio::test]
async fn noop_and_known_runners() {
    let dir = tempfile::tempdir().unwrap();
    let (out, events) = run_collect(request("noop", json!({}), &[], dir.path())).await;
    assert_eq!(out.status, ExecutionStatus::Succeeded);
    assert_eq!(out.result, json!({}));
    assert!(events.is_empty());
    for r in [
        "noop",
        "local-shell-cmd",
        "local-shell-script",
        "http-request",
    ] {
        assert!(is_known_runner(r));
    }
    assert!(!is_known_runner("python-script"));

    let (out, _) = run_collect(request("python-script", json!({}), &[], dir.path())).await;
    assert_eq!(out.status, ExecutionStatus::Failed);
    assert!(
        out.result["error"]
            .as_str()
            .unwrap()
            .contains("unknown runner type")
    );
}

#[tokio::test]
async fn exit_codes_and_capture() {
    let dir = tempfile::tempdir().unwrap();
    let (out, _) = run_collect(cmd_request("echo out; echo err >&2", dir.path())).await;
    assert_eq!(out.status, ExecutionStatus::Succeeded);
    assert_eq!(out.result["stdout"], "out");
    assert_eq!(out.result["stderr"], "err");
    assert_eq!(out.result["return_code"], 0);
    assert_eq!(out.result["succeeded"], true);
    assert_eq!(out.result["failed"], false);
    assert!(out.result.get("result").is_none());

    let (out, _) = run_collect(cmd_request("echo bad >&2; exit 3", dir.path())).await;
    assert_eq!(out.status, ExecutionStatus::Failed);
    assert_eq!(out.result["return_code"], 3);
    assert_eq!(out.result["stderr"], "bad");
    assert_eq!(out.result["succeeded"], false);
    assert_eq!(out.result["failed"], true);

    let (out, _) = run_collect(cmd_request("kill -9 $$", dir.path())).await;
    assert_eq!(out.status, ExecutionStatus::Failed);
    assert_eq!(out.result["return_code"], -9);
}

#[tokio::test]
async fn json_stdout_is_parsed() {
    let dir = tempfile::tempdir().unwrap();
    let (out, _) = run_collect(cmd_request(r#"echo '{"a": [1, 2], "b": "x"}'"#, dir.path())).await;
    assert_eq!(out.status, ExecutionStatus::Succeeded);
    assert_eq!(out.result["result"], json!({"a": [1, 2], "b": "x"}));
}

#[tokio::test]
async fn positional_and_named_args() {
    let dir = tempfile::tempdir().unwrap();
    let mut req = request(
        "local-shell-cmd",
        json!({
            "cmd": "printf '[%s]\\n'",
            "a": "x y",
            "b": "z",
            "flag": true,
            "count": 3,
            "list": [1, "two"],
            "skipped": null,
            "name": "it's \"quoted\""
        }),
        &["cmd"],
        dir.path(),
    );
    req.positions = vec![("b".into(), 1), ("a".into(), 0)];
    let (out, _) = run_collect(req.clone()).await;
    assert_eq!(out.status, ExecutionStatus::Succeeded, "{}", out.result);
    assert_eq!(
        out.result["stdout"],
        "[x y]\n[z]\n[--count=3]\n[--flag=true]\n[--list=[1,\"two\"]]\n[--name=it's \"quoted\"]"
    );

    // A custom kwarg_op, and a missing positional keeps later positions.
    req.parameters.insert("kwarg_op".into(), json!("-"));
    req.runner_param_names.push("kwarg_op".into());
    req.parameters.remove("a");
    req.parameters.remove("list");
    req.parameters.remove("name");
    let (out, _) = run_collect(req).await;
    assert_eq!(out.result["stdout"], "[]\n[z]\n[-count=3]\n[-flag=true]");
}

#[tokio::test]
async fn event_data_never_becomes_shell_text() {
    let dir = tempfile::tempdir().unwrap();
    let marker = format!("/tmp/pwned-{}", random_token());
    let evil = format!("main;touch${{IFS}}{marker}\n$(id) `id` && touch {marker} | \"'");

    // core.echo: message is position 0.
    let mut req = request(
        "local-shell-cmd",
        json!({"cmd": "echo", "message": evil}),
        &["cmd"],
        dir.path(),
    );
    req.positions = vec![("message".into(), 0)];
    let (out, _) = run_collect(req).await;
    assert_eq!(out.status, ExecutionStatus::Succeeded);
    assert_eq!(out.result["stdout"].as_str().unwrap(), evil);

    // A named parameter.
    let req = request(
        "local-shell-cmd",
        json!({"cmd": "printf '%s'", "ref": evil}),
        &["cmd"],
        dir.path(),
    );
    let (out, _) = run_collect(req).await;
    assert_eq!(
        out.result["stdout"].as_str().unwrap(),
        format!("--ref={evil}")
    );

    // A template value passed through env as ${AVIARY_ARG_0}.
    let req = request(
        "local-shell-cmd",
        json!({"cmd": "printf '%s' \"${AVIARY_ARG_0}\"", "env": {"AVIARY_ARG_0": evil}}),
        &["cmd", "env"],
        dir.path(),
    );
    let (out, _) = run_collect(req).await;
    assert_eq!(out.result["stdout"].as_str().unwrap(), evil);

    assert!(
        !std::path::Path::new(&marker).exists(),
        "injection created {marker}"
    );
}

#[tokio::test]
async fn clean_environment_with_params() {
    let dir = tempfile::tempdir().unwrap();
    let mut req = request(
        "local-shell-cmd",
        json!({
            "cmd": "env",
            "env": {"FOO": "bar baz", "NUM": 5},
            "my-param": "v1",
            "obj": {"k": 1}
        }),
        &["cmd", "env"],
        dir.path(),
    );
    req.extra_env = vec![("AVIARY_EXECUTION_ID".into(), "exec-1".into())];
    // Named args would reach `env` as commands: use a command that ignores them.
    req.parameters.insert("cmd".into(), json!("env; true"));
    let (out, _) = run_collect(req).await;
    assert_eq!(out.status, ExecutionStatus::Succeeded, "{}", out.result);
    let stdout = out.result["stdout"].as_str().unwrap();
    let vars: std::collections::BTreeMap<&str, &str> =
        stdout.lines().filter_map(|l| l.split_once('=')).collect();
    assert_eq!(vars.get("FOO"), Some(&"bar baz"));
    assert_eq!(vars.get("NUM"), Some(&"5"));
    assert_eq!(vars.get("AVIARY_PARAM_MY_PARAM"), Some(&"v1"));
    assert_eq!(vars.get("ST2_ACTION_MY_PARAM"), Some(&"v1"));
    assert_eq!(vars.get("AVIARY_PARAM_OBJ"), Some(&"{\"k\":1}"));
    assert_eq!(vars.get("AVIARY_EXECUTION_ID"), Some(&"exec-1"));
    assert!(vars.contains_key("PATH"));
    // Nothing else from the test process (cargo sets CARGO_* variables).
    let allowed = [
        "PATH",
        "HOME",
        "LANG",
        "USER",
        "FOO",
        "NUM",
        "AVIARY_PARAM_MY_PARAM",
        "ST2_ACTION_MY_PARAM",
        "AVIARY_PARAM_OBJ",
        "ST2_ACTION_OBJ",
        "AVIARY_EXECUTION_ID",
        // Set by bash itself.
        "PWD",
        "SHLVL",
        "_",
        "OLDPWD",
    ];
    for k in vars.keys() {
        assert!(
            allowed.contains(k),
            "unexpected variable {k} in the action env"
        );
    }
}

#[tokio::test]
async fn working_directory() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let (out, _) = run_collect(cmd_request("pwd -P", dir.path())).await;
    assert_eq!(
        out.result["stdout"].as_str().unwrap(),
        dir.path().canonicalize().unwrap().to_str().unwrap()
    );
    let mut req = cmd_request("pwd -P", dir.path());
    req.parameters
        .insert("cwd".into(), json!(other.path().to_str().unwrap()));
    let (out, _) = run_collect(req).await;
    assert_eq!(
        out.result["stdout"].as_str().unwrap(),
        other.path().canonicalize().unwrap().to_str().unwrap()
    );

    let mut req = cmd_request("pwd", dir.path());
    req.parameters
        .insert("cwd".into(), json!("/nonexistent/dir"));
    let (out, _) = run_collect(req).await;
    assert_eq!(out.status, ExecutionStatus::Failed);
    assert!(out.result["error"].as_str().unwrap().contains("cwd"));
}

#[tokio::test]
async fn timeout_kills_the_whole_group() {
    let dir = tempfile::tempdir().unwrap();
    let mut req = cmd_request("sleep 1000 & echo $!; wait", dir.path());
    req.timeout = Duration::from_secs(1);
    let (out, events) = run_collect(req).await;
    assert_eq!(out.status, ExecutionStatus::Timeout, "{}", out.result);
    assert_eq!(out.result["failed"], true);
    assert!(out.result["error"].as_str().unwrap().contains("timeout"));
    let pid: i32 = joined(&events, Stream::Stdout).trim().parse().unwrap();
    assert_dies(pid).await;
}

#[tokio::test]
async fn timeout_parameter_and_sigkill_escalation() {
    let dir = tempfile::tempdir().unwrap();
    // Ignores SIGTERM (and so does its child): only SIGKILL stops them.
    let mut req = cmd_request("trap '' TERM; sleep 1000 & echo $!; wait; wait", dir.path());
    req.parameters.insert("timeout".into(), json!(1));
    let (out, events) = run_collect(req).await;
    assert_eq!(out.status, ExecutionStatus::Timeout);
    assert_eq!(out.result["return_code"], -9);
    let pid: i32 = joined(&events, Stream::Stdout).trim().parse().unwrap();
    assert_dies(pid).await;
}

#[tokio::test]
async fn cancel_stops_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let req = cmd_request("sleep 1000 & echo $!; echo started; wait", dir.path());
    let (tx, mut rx) = unbounded_channel();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(run(req, tx, cancel.clone()));
    let seen = wait_for_stdout(&mut rx, "started").await;
    cancel.cancel();
    let out = tokio::time::timeout(SAFETY, task).await.unwrap().unwrap();
    assert_eq!(out.status, ExecutionStatus::Canceled);
    let pid: i32 = seen.lines().next().unwrap().parse().unwrap();
    assert_dies(pid).await;

    // Already canceled: nothing runs.
    let cancel = CancellationToken::new();
    cancel.cancel();
    let (tx, _rx) = unbounded_channel();
    let marker = dir.path().join("ran");
    let req = cmd_request(&format!("touch {}", marker.display()), dir.path());
    let out = run(req, tx, cancel).await;
    assert_eq!(out.status, ExecutionStatus::Canceled);
    assert!(!marker.exists());
}

#[tokio::test]
async fn secrets_are_masked_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let cmd = r#"printf 'a s3cr'; sleep 0.3; printf 'et-value b\n'
printf 'Q1Q\n'
echo "err s3cret-value" >&2
printf 's3'; printf 'cret-value'; printf '\n'"#;
    let mut req = cmd_request(cmd, dir.path());
    req.secrets = vec!["s3cret-value".into(), "Q".into(), String::new()];
    let (out, events) = run_collect(req).await;
    assert_eq!(out.status, ExecutionStatus::Succeeded);
    let expected = format!("a {MASK} b\n{MASK}1{MASK}\n{MASK}\n");
    assert_eq!(joined(&events, Stream::Stdout), expected);
    assert_eq!(joined(&events, Stream::Stderr), format!("err {MASK}\n"));
    assert_eq!(out.result["stdout"], expected.trim_end());
    assert_eq!(out.result["stderr"], format!("err {MASK}"));
    for ev in &events {
        assert!(
            !ev.data.contains("s3cr") && !ev.data.contains('Q'),
            "{ev:?}"
        );
    }

    // A multi-line secret written in two pieces.
    let mut req = cmd_request("printf 'x ab\\n'; sleep 0.3; printf 'cd y\\n'", dir.path());
    req.secrets = vec!["ab\ncd".into()];
    let (out, events) = run_collect(req).await;
    assert_eq!(joined(&events, Stream::Stdout), format!("x {MASK} y\n"));
    assert_eq!(out.result["stdout"], format!("x {MASK} y"));

    // Secrets inside parsed JSON output, even when JSON-escaped.
    let mut req = cmd_request(r#"echo '{"token": "p\"w", "n": 1}'"#, dir.path());
    req.secrets = vec!["p\"w".into()];
    let (out, _) = run_collect(req).await;
    assert_eq!(out.result["result"], json!({"token": MASK, "n": 1}));
}

#[tokio::test]
async fn output_streams_in_order_while_running() {
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("flag");
    let mut req = request(
        "local-shell-cmd",
        json!({
            "cmd": "for i in $(seq 1 500); do echo line$i; done; printf partial; \
                    while [ ! -e \"$FLAG\" ]; do sleep 0.05; done; echo end",
            "env": {"FLAG": flag.to_str().unwrap()}
        }),
        &["cmd", "env"],
        dir.path(),
    );
    req.timeout = SAFETY;
    let (tx, mut rx) = unbounded_channel();
    let task = tokio::spawn(run(req, tx, CancellationToken::new()));
    // The partial line is streamed while the command still waits for the flag.
    let mut seen = wait_for_stdout(&mut rx, "partial").await;
    std::fs::write(&flag, b"").unwrap();
    let out = tokio::time::timeout(SAFETY, task).await.unwrap().unwrap();
    while let Ok(ev) = rx.try_recv() {
        seen.push_str(&ev.data);
    }
    let mut expected: String = (1..=500).map(|i| format!("line{i}\n")).collect();
    expected.push_str("partialend\n");
    assert_eq!(seen, expected);
    assert_eq!(out.result["stdout"], expected.trim_end());
}

#[tokio::test]
async fn large_output_is_capped_but_fully_streamed() {
    let dir = tempfile::tempdir().unwrap();
    let total = 2 * OUTPUT_CAP + 12345;
    let (out, events) = run_collect(cmd_request(
        &format!("head -c {total} /dev/zero | tr '\\0' a; echo; echo tail-end"),
        dir.path(),
    ))
    .await;
    assert_eq!(out.status, ExecutionStatus::Succeeded);
    assert_eq!(joined(&events, Stream::Stdout).len(), total + 1 + 9);
    let stdout = out.result["stdout"].as_str().unwrap();
    assert!(stdout.starts_with("[aviary: output truncated,"));
    assert!(stdout.ends_with("aaa\ntail-end"));
    assert!(stdout.len() <= OUTPUT_CAP + 100);
}

#[tokio::test]
async fn local_shell_script() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("script.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\nprintf '<%s>\\n' \"$@\"\necho \"cwd=$(pwd -P) p=$AVIARY_PARAM_FIRST\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let marker = format!("/tmp/pwned-{}", random_token());
    let evil = format!("$(touch {marker});x");
    let mut req = request(
        "local-shell-script",
        json!({"first": evil, "second": "two", "opt": "o"}),
        &[],
        dir.path(),
    );
    req.entry_point = Some(script.clone());
    req.positions = vec![("first".into(), 0), ("second".into(), 1)];
    let (out, _) = run_collect(req.clone()).await;
    assert_eq!(out.status, ExecutionStatus::Succeeded, "{}", out.result);
    let cwd = dir.path().canonicalize().unwrap();
    assert_eq!(
        out.result["stdout"].as_str().unwrap(),
        format!("<{evil}>\n<two>\n<--opt=o>\ncwd={} p={evil}", cwd.display())
    );
    assert!(!std::path::Path::new(&marker).exists());

    // Not executable: a clear error.
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (out, _) = run_collect(req.clone()).await;
    assert_eq!(out.status, ExecutionStatus::Failed);
    assert!(
        out.result["error"].as_str().unwrap().contains("chmod +x"),
        "{}",
        out.result
    );

    req.entry_point = None;
    let (out, _) = run_collect(req).await;
    assert_eq!(out.status, ExecutionStatus::Failed);
    assert!(
        out.result["error"]
            .as_str()
            .unwrap()
            .contains("entry_point")
    );
}

#[tokio::test]
async fn bad_parameters_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let req = request("local-shell-cmd", json!({}), &["cmd"], dir.path());
    let (out, _) = run_collect(req).await;
    assert_eq!(out.status, ExecutionStatus::Failed);
    assert!(
        out.result["error"]
            .as_str()
            .unwrap()
            .contains("'cmd' is required")
    );

    let req = request(
        "local-shell-cmd",
        json!({"cmd": "echo hi;", "x": "1"}),
        &["cmd"],
        dir.path(),
    );
    let (out, _) = run_collect(req).await;
    assert_eq!(out.status, ExecutionStatus::Failed);

    let req = request(
        "local-shell-cmd",
        json!({"cmd": "echo", "env": {"A=B": "x"}}),
        &["cmd", "env"],
        dir.path(),
    );
    let (out, _) = run_collect(req).await;
    assert_eq!(out.status, ExecutionStatus::Failed);
    assert!(out.result["error"].as_str().unwrap().contains("env"));
}

#[tokio::test]
async fn dropping_the_run_kills_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let req = cmd_request("sleep 1000 & echo $!; wait", dir.path());
    let (tx, mut rx) = unbounded_channel();
    let task = tokio::spawn(run(req, tx, CancellationToken::new()));
    let seen = wait_for_stdout(&mut rx, "\n").await;
    task.abort();
    let _ = task.await;
    let pid: i32 = seen.trim().parse().unwrap();
    assert_dies(pid).await;
}

#[tokio::test]
async fn a_dropped_output_receiver_is_fine() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, rx) = unbounded_channel();
    drop(rx);
    let out = run(
        cmd_request("seq 1 1000", dir.path()),
        tx,
        CancellationToken::new(),
    )
    .await;
    assert_eq!(out.status, ExecutionStatus::Succeeded);
    assert!(
        out.result["stdout"]
            .as_str()
            .unwrap()
            .ends_with("999\n1000")
    );
}
