//! The CLI against a real server: run, executions, keys, tokens, rules, auth.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::*;

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn run_prints_results_and_exit_codes_are_trustworthy() {
    let s = Server::start(Backend::Sqlite, &[]);
    let ok = s.cli(&["run", "core.echo", "message=hello world"]);
    assert_eq!(ok.status.code(), Some(0), "{}{}", stdout(&ok), stderr(&ok));
    assert!(stdout(&ok).contains("hello world"));

    let fail = s.cli(&["run", "core.local", "cmd=echo oops >&2; exit 3"]);
    assert_eq!(
        fail.status.code(),
        Some(1),
        "{}{}",
        stdout(&fail),
        stderr(&fail)
    );

    let bad = s.cli(&["run", "core.local", "nope=1"]);
    assert_eq!(bad.status.code(), Some(2));
    let text = stdout(&bad) + &stderr(&bad);
    assert!(
        text.contains("nope") && text.contains("cmd"),
        "must name the unknown and the missing parameter: {text}"
    );

    let unknown = s.cli(&["run", "no.such"]);
    assert_ne!(unknown.status.code(), Some(0));

    let asy = s.cli(&["--json", "run", "core.noop", "--async"]);
    assert_eq!(asy.status.code(), Some(0), "{}", stderr(&asy));
    let v: Value = serde_json::from_str(stdout(&asy).trim()).expect("json output");
    let id = v["id"].as_str().expect("id").to_string();
    assert_eq!(s.wait_execution(&id)["status"], "succeeded");

    let list = s.cli(&["--json", "execution", "list", "--action", "core.echo"]);
    let v: Value = serde_json::from_str(&stdout(&list)).expect("json list");
    assert_eq!(v.as_array().map(|a| a.len()), Some(1));
    let table = s.cli(&["execution", "list"]);
    assert!(stdout(&table).contains("core.local"));
}

#[test]
fn api_requires_a_valid_token() {
    let s = Server::start(Backend::Sqlite, &[]);
    let r = s
        .http()
        .get(s.url("/api/v1/executions"))
        .send()
        .expect("get");
    assert_eq!(r.status().as_u16(), 401);
    let r = s
        .http()
        .get(s.url("/api/v1/executions"))
        .bearer_auth("avy_wrong")
        .send()
        .expect("get");
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(
        s.http()
            .get(s.url("/healthz"))
            .send()
            .expect("get")
            .status()
            .as_u16(),
        200
    );

    let created = s.cli(&["--json", "token", "create", "ci-bot"]);
    assert!(created.status.success(), "{}", stderr(&created));
    let v: Value = serde_json::from_str(stdout(&created).trim()).expect("json");
    let token = v["token"].as_str().expect("token").to_string();
    let r = s
        .http()
        .get(s.url("/api/v1/actions"))
        .bearer_auth(&token)
        .send()
        .expect("get");
    assert_eq!(r.status().as_u16(), 200);
    // Tokens are stored hashed: the secret is nowhere in the database file.
    let db = std::fs::read(s.data_dir().join("aviary.db")).unwrap_or_default();
    assert!(!String::from_utf8_lossy(&db).contains(&token));

    assert!(s.cli(&["token", "revoke", "ci-bot"]).status.success());
    std::thread::sleep(Duration::from_millis(2100)); // the token cache keeps entries 2 s
    let r = s
        .http()
        .get(s.url("/api/v1/actions"))
        .bearer_auth(&token)
        .send()
        .expect("get");
    assert_eq!(r.status().as_u16(), 401);
    let listed = s.cli(&["token", "list"]);
    assert!(stdout(&listed).contains("ci-bot"));

    // The CLI finds the admin token by itself through the data dir.
    let out = Command::new(bin())
        .args(["action", "list"])
        .env("AVIARY_URL", s.url(""))
        .env_remove("AVIARY_TOKEN")
        .env("AVIARY_DATA_DIR", s.data_dir())
        .env("XDG_CONFIG_HOME", s.dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("cli");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("core.echo"));

    // Audit trail.
    let (st, audit) = s.get("/api/v1/audit");
    assert_eq!(st, 200);
    let actions: Vec<&str> = audit
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|a| a["action"].as_str())
        .collect();
    assert!(
        actions.contains(&"token.create") && actions.contains(&"token.revoke"),
        "{actions:?}"
    );
}

fn datastore(backend: Backend) {
    let s = Server::start(backend, &[]);
    assert!(s.cli(&["key", "set", "plain", "v1"]).status.success());
    assert!(
        s.cli(&["key", "set", "pw", "hunter2", "--encrypt"])
            .status
            .success()
    );
    assert!(
        s.cli(&["key", "set", "short", "x", "--ttl", "1"])
            .status
            .success()
    );
    let get = s.cli(&["key", "get", "plain"]);
    assert!(stdout(&get).contains("v1"));
    let masked = s.cli(&["--json", "key", "get", "pw"]);
    assert!(
        !stdout(&masked).contains("hunter2"),
        "secret shown without --decrypt"
    );
    let dec = s.cli(&["--json", "key", "get", "pw", "--decrypt"]);
    assert!(stdout(&dec).contains("hunter2"));
    let list = s.cli(&["--json", "key", "list"]);
    assert!(!stdout(&list).contains("hunter2"));
    std::thread::sleep(Duration::from_millis(1500));
    let expired = s.cli(&["key", "get", "short"]);
    assert_eq!(
        expired.status.code(),
        Some(1),
        "expired key still visible: {}",
        stdout(&expired)
    );
    assert!(s.cli(&["key", "delete", "plain"]).status.success());
    assert_eq!(s.cli(&["key", "get", "plain"]).status.code(), Some(1));
    if backend == Backend::Sqlite {
        let db = std::fs::read(s.data_dir().join("aviary.db")).unwrap_or_default();
        let wal = std::fs::read(s.data_dir().join("aviary.db-wal")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&db).contains("hunter2")
                && !String::from_utf8_lossy(&wal).contains("hunter2")
        );
    }
}

#[test]
fn datastore_sqlite() {
    datastore(Backend::Sqlite);
}

#[test]
fn datastore_postgres() {
    datastore(Backend::Postgres);
}

#[test]
fn timeout_cancel_and_live_tail() {
    let s = Server::start(Backend::Sqlite, &[]);
    let out = s.cli(&["--json", "run", "core.local", "cmd=sleep 30", "timeout=1"]);
    let v: Value = serde_json::from_str(stdout(&out).trim()).unwrap_or(Value::Null);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert_eq!(v["status"], "timeout", "{v}");

    let (st, exec) = s.post(
        "/api/v1/executions",
        json!({"action": "core.local", "parameters": {"cmd": "for i in 1 2 3 4 5 6 7 8 9 10; do echo tick-$i; sleep 0.2; done; sleep 60 & wait"}}),
    );
    assert_eq!(st, 201, "{exec}");
    let id = exec["id"].as_str().expect("id").to_string();
    // `tail` streams while it runs: read until tick-3 shows up, then cancel.
    let mut tail = Command::new(bin())
        .args(["execution", "tail", &id])
        .env("AVIARY_URL", s.url(""))
        .env("AVIARY_TOKEN", &s.token)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("tail");
    let mut reader = std::io::BufReader::new(tail.stdout.take().expect("stdout"));
    let mut seen = String::new();
    while !seen.contains("tick-3") {
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut reader, &mut line).unwrap_or(0) == 0 {
            break;
        }
        seen.push_str(&line);
    }
    assert!(
        seen.contains("tick-1") && seen.contains("tick-3"),
        "live output: {seen}"
    );
    let c = s.cli(&["execution", "cancel", &id]);
    assert!(c.status.success(), "{}", stderr(&c));
    let done = s.wait_execution(&id);
    assert_eq!(done["status"], "canceled", "{done}");
    let _ = tail.wait();
}

#[test]
fn rules_can_be_disabled_and_listed() {
    let examples =
        std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../packs/examples"));
    let s = Server::start(Backend::Sqlite, &[examples]);
    let list = s.cli(&["rule", "list"]);
    assert!(
        stdout(&list).contains("examples.github_push"),
        "{}",
        stdout(&list)
    );
    assert!(
        s.cli(&["rule", "disable", "examples.github_push"])
            .status
            .success()
    );
    let (_, rule) = s.get("/api/v1/rules/examples.github_push");
    assert_eq!(rule["enabled"], false);
    // A disabled rule does not fire.
    assert!(
        s.cli(&["key", "set", "github_webhook_secret", "k", "--encrypt"])
            .status
            .success()
    );
    let raw = serde_json::to_vec(&push_payload("a", "refs/heads/main", "abc")).expect("json");
    let r = s
        .http()
        .post(s.url("/api/v1/webhooks/github"))
        .header("X-GitHub-Event", "push")
        .header("content-type", "application/json")
        .header("X-Hub-Signature-256", sign("k", &raw))
        .body(raw)
        .send()
        .expect("post");
    assert_eq!(r.status().as_u16(), 202);
    assert!(s.executions("").is_empty());
    // The state survives a restart.
    let mut s = s;
    s.kill9();
    s.spawn();
    let (_, rule) = s.get("/api/v1/rules/examples.github_push");
    assert_eq!(rule["enabled"], false);
    assert!(
        s.cli(&["rule", "enable", "examples.github_push"])
            .status
            .success()
    );
}
