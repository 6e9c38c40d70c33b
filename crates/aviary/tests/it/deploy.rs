//! Hosts, advertised versions and deploys through the real binary, on SQLite
//! and PostgreSQL: the promotion policy (refusals name each host; a direct
//! production set is refused and audited), deploy locks, rollback, history,
//! agent token scoping, and the agents' SSE watch. Host reports come from
//! the agent API with real per-host agent tokens (the agent with real
//! apt-get runs in `agent_apt`).

use std::io::{BufRead, BufReader};
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Backend, Server};

fn agent_token(s: &Server, host: &str, address: &str, tags: &[&str]) -> String {
    let (st, v) = s.post(
        &format!("/api/v1/hosts/{host}/token"),
        json!({"address": address, "tags": tags}),
    );
    assert_eq!(st, 201, "{v}");
    v["token"].as_str().expect("token").to_string()
}

fn agent_call(s: &Server, token: &str, method: &str, path: &str, body: Value) -> (u16, Value) {
    let c = s.http();
    let req = match method {
        "GET" => c.get(s.url(path)),
        _ => c.post(s.url(path)).json(&body),
    };
    let r = req.bearer_auth(token).send().expect("agent call");
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

/// Reports, as the host's agent would, `app` at `version` with `health`.
fn report(s: &Server, token: &str, app: &str, version: &str, health: &str) {
    let (st, v) = agent_call(
        s,
        token,
        "POST",
        "/api/v1/agent/report",
        json!({"apps": {app: {"installed": version, "target": version, "health": health, "output": "ok"}}}),
    );
    assert_eq!(st, 204, "{v}");
}

fn deploy(s: &Server, op: &str, app: &str, version: Option<&str>, params: Value) -> String {
    let (st, v) = s.post(
        "/api/v1/deploys",
        json!({"operation": op, "app": app, "version": version, "parameters": params}),
    );
    assert_eq!(st, 201, "{v}");
    v["id"].as_str().expect("id").to_string()
}

fn policy_and_history(backend: Backend) {
    let s = Server::start(backend, &[]);
    let c1 = agent_token(&s, "c1", "10.0.0.1", &["web::app_canary"]);
    let c2 = agent_token(&s, "c2", "10.0.0.2", &["web::app_canary"]);
    let p1 = agent_token(&s, "p1", "10.0.0.3", &["web::app"]);
    let out = s.cli(&[
        "host",
        "add",
        "p2",
        "--address",
        "10.0.0.4",
        "--tag",
        "web::app",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Filters: canaries are never production targets.
    let (_, v) = s.get("/api/v1/hosts?app=web&canary=true");
    let names: Vec<&str> = v
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|h| h["name"].as_str())
        .collect();
    assert_eq!(names, vec!["c1", "c2"]);
    let (_, v) = s.get("/api/v1/hosts?app=web&canary=false");
    assert_eq!(v.as_array().expect("list").len(), 2);
    let out = s.cli(&["host", "list", "--tag", "web::app"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("p1") && text.contains("p2") && !text.contains("c1"),
        "{text}"
    );

    // Canary 1.0: the canaries report it; the deploy lists every host.
    let id = deploy(&s, "canary", "web", Some("1.0"), json!({"timeout": 60}));
    report(&s, &c1, "web", "1.0", "healthy");
    report(&s, &c2, "web", "1.0", "healthy");
    let exec = s.wait_execution(&id);
    assert_eq!(exec["status"], "succeeded", "{exec}");
    let outcomes: Vec<(String, String)> = exec["result"]["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .map(|h| {
            (
                h["host"].as_str().unwrap_or("").into(),
                h["outcome"].as_str().unwrap_or("").into(),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        vec![
            ("c1".into(), "converged".into()),
            ("c2".into(), "converged".into())
        ]
    );

    // Promote 1.0 through the CLI: production hosts converge in batches of one.
    std::thread::scope(|scope| {
        let h = scope.spawn(|| s.cli(&["promote", "web", "--batch-size", "1", "--timeout", "60"]));
        // Production hosts are released one at a time: p2 is held on the
        // previous (no) version until p1 converged.
        s.wait_for("p1 released", || {
            let (_, a) = agent_call(&s, &p1, "GET", "/api/v1/agent/versions", json!(null));
            (a[0]["version"] == "1.0").then_some(())
        });
        let p2 = agent_token(&s, "p2", "10.0.0.4", &["web::app"]);
        let (_, a) = agent_call(&s, &p2, "GET", "/api/v1/agent/versions", json!(null));
        assert_eq!(a[0]["version"], Value::Null, "p2 is not released yet: {a}");
        report(&s, &p1, "web", "1.0", "healthy");
        s.wait_for("p2 released", || {
            let (_, a) = agent_call(&s, &p2, "GET", "/api/v1/agent/versions", json!(null));
            (a[0]["version"] == "1.0").then_some(())
        });
        report(&s, &p2, "web", "1.0", "healthy");
        let out = h.join().expect("promote");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("batch 1/2: p1") && text.contains("batch 2/2: p2"),
            "{text}"
        );
    });

    // Canary 1.1, only c1 gets there; c2 stays on 1.0 (timeout 1s).
    let id = deploy(&s, "canary", "web", Some("1.1"), json!({"timeout": 1}));
    report(&s, &c1, "web", "1.1", "healthy");
    let exec = s.wait_execution(&id);
    assert_eq!(exec["status"], "failed", "{exec}");
    assert!(
        exec["result"]["error"]
            .as_str()
            .unwrap_or("")
            .contains("c2 (timeout)"),
        "{exec}"
    );

    // Promote is refused, naming c2 and what it runs.
    let out = s.cli(&["promote", "web"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("host `c2` runs `1.0`"), "{err}");
    assert!(!err.contains("`c1`"), "{err}");
    // c1 unhealthy: named too.
    report(&s, &c1, "web", "1.1", "unhealthy");
    let id = deploy(&s, "promote", "web", None, json!({}));
    let exec = s.wait_execution(&id);
    let e = exec["result"]["error"].as_str().unwrap_or("");
    assert!(
        e.contains("host `c1` is unhealthy") && e.contains("host `c2` runs `1.0`"),
        "{e}"
    );

    // A direct production set: not the canary version -> refused, audited.
    let r = s
        .http()
        .put(s.url("/api/v1/versions/web/production"))
        .bearer_auth(&s.token)
        .json(&json!({"version": "9.9"}))
        .send()
        .expect("put");
    assert_eq!(r.status().as_u16(), 409);
    let body: Value = r.json().expect("json");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("current canary version `1.1`"),
        "{body}"
    );
    // The canary version, but the canaries do not all run it -> refused too.
    let r = s
        .http()
        .put(s.url("/api/v1/versions/web/production"))
        .bearer_auth(&s.token)
        .json(&json!({"version": "1.1"}))
        .send()
        .expect("put");
    assert_eq!(r.status().as_u16(), 409);
    let (_, audit) = s.get("/api/v1/audit?limit=100");
    let refused: Vec<&Value> = audit
        .as_array()
        .expect("audit")
        .iter()
        .filter(|a| a["action"] == "version.refused")
        .collect();
    assert_eq!(refused.len(), 2, "{audit}");
    assert!(
        audit
            .as_array()
            .expect("audit")
            .iter()
            .any(|a| a["action"] == "deploy.promote.refused")
    );
    let (_, v) = s.get("/api/v1/versions/web");
    assert_eq!(v["production_version"], "1.0");

    // Rollback: canaries back to 1.0.
    let id = deploy(&s, "rollback", "web", None, json!({"timeout": 60}));
    s.wait_for("rollback advertised", || {
        let (_, a) = agent_call(&s, &c1, "GET", "/api/v1/agent/versions", json!(null));
        (a[0]["version"] == "1.0").then_some(())
    });
    report(&s, &c1, "web", "1.0", "healthy");
    let exec = s.wait_execution(&id);
    assert_eq!(exec["status"], "succeeded", "{exec}");

    let out = s.cli(&["versions", "web", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        (
            v["canary_version"].as_str(),
            v["production_version"].as_str()
        ),
        (Some("1.0"), Some("1.0"))
    );
    let kinds: Vec<&str> = v["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|c| c["kind"].as_str())
        .collect();
    assert_eq!(kinds, vec!["rollback", "canary", "production", "canary"]);
    assert!(v["history"][0]["execution_id"] == json!(id));
    // Promote takes no version.
    let (st, _) = s.post(
        "/api/v1/deploys",
        json!({"operation": "promote", "app": "web", "version": "2.0"}),
    );
    assert_eq!(st, 400);
}

#[test]
fn policy_and_history_sqlite() {
    policy_and_history(Backend::Sqlite);
}

#[test]
fn policy_and_history_postgres() {
    policy_and_history(Backend::Postgres);
}

fn locks(backend: Backend) {
    let s = Server::start(backend, &[]);
    agent_token(&s, "c1", "10.0.0.1", &["api::app_canary"]);
    // A canary deploy that waits for a host that never reports.
    let first = deploy(&s, "canary", "api", Some("1.0"), json!({"timeout": 120}));
    s.wait_for("lock held", || {
        let (_, l) = s.get("/api/v1/deploy-locks");
        (l[0]["holder"] == json!(first)).then_some(())
    });
    let second = deploy(&s, "canary", "api", Some("2.0"), json!({}));
    let exec = s.wait_execution(&second);
    assert_eq!(exec["status"], "failed");
    let e = exec["result"]["error"].as_str().unwrap_or("");
    assert!(e.contains(&format!("execution {first}")), "{e}");
    // Another app is not blocked.
    let other = deploy(&s, "canary", "db", Some("1.0"), json!({}));
    assert_eq!(s.wait_execution(&other)["status"], "succeeded");
    // Cancel the first: its lock goes.
    let (st, _) = s.post(&format!("/api/v1/executions/{first}/cancel"), json!({}));
    assert_eq!(st, 200);
    let exec = s.wait_execution(&first);
    assert_eq!(exec["status"], "canceled", "{exec}");
    let (_, l) = s.get("/api/v1/deploy-locks");
    assert_eq!(l, json!([]));
    let out = s.cli(&["deploy", "locks"]);
    assert!(out.status.success());
}

#[test]
fn locks_sqlite() {
    locks(Backend::Sqlite);
}

#[test]
fn locks_postgres() {
    locks(Backend::Postgres);
}

#[test]
fn agent_tokens_are_scoped_and_revocable() {
    let s = Server::start(Backend::Sqlite, &[]);
    let t = agent_token(&s, "c1", "10.0.0.1", &["web::app_canary"]);
    // Not an API token.
    for path in ["/api/v1/hosts", "/api/v1/executions", "/api/v1/keys"] {
        let (st, v) = agent_call(&s, &t, "GET", path, json!(null));
        assert_eq!(st, 403, "{path}: {v}");
    }
    // Only its own tags and apps.
    let (st, v) = agent_call(
        &s,
        &t,
        "POST",
        "/api/v1/agent/register",
        json!({"tags": ["db::app"]}),
    );
    assert_eq!(st, 403, "{v}");
    assert!(v["error"].as_str().unwrap_or("").contains("db::app"), "{v}");
    let (st, _) = agent_call(
        &s,
        &t,
        "POST",
        "/api/v1/agent/register",
        json!({"tags": ["web::app_canary"]}),
    );
    assert_eq!(st, 200);
    let (st, _) = agent_call(
        &s,
        &t,
        "POST",
        "/api/v1/agent/report",
        json!({"apps": {"db": {"installed": "1"}}}),
    );
    assert_eq!(st, 403);
    // An admin token is not an agent.
    let (st, _) = agent_call(&s, &s.token, "GET", "/api/v1/agent/versions", json!(null));
    assert_eq!(st, 403);
    // Revoked: refused.
    let out = s.cli(&["host", "token", "revoke", "c1"]);
    assert!(out.status.success());
    let (st, _) = agent_call(&s, &t, "GET", "/api/v1/agent/versions", json!(null));
    assert_eq!(st, 401);
    // The agent binary stops on a refused token, saying why.
    let out = std::process::Command::new(crate::harness::bin())
        .args([
            "agent",
            "--server",
            &s.url(""),
            "--token",
            &t,
            "--tag",
            "web::app_canary",
        ])
        .output()
        .expect("agent");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Enrollment: a host without tags takes its agent's.
    let t2 = agent_token(&s, "n1", "10.0.0.9", &[]);
    let (st, v) = agent_call(
        &s,
        &t2,
        "POST",
        "/api/v1/agent/register",
        json!({"tags": ["web::app"]}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["host"]["tags"], json!(["web::app"]));
}

/// Reads SSE events of one type from a watch stream.
fn next_assignments(lines: &mut impl BufRead) -> Value {
    let mut event = String::new();
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            lines.read_line(&mut line).expect("read") > 0,
            "stream ended"
        );
        let l = line.trim_end();
        if let Some(e) = l
            .strip_prefix("event: ")
            .or_else(|| l.strip_prefix("event:"))
        {
            event = e.to_string();
        } else if let Some(d) = l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:"))
            && event == "assignments"
        {
            return serde_json::from_str(d).expect("json");
        }
    }
}

#[test]
fn watch_streams_changes_and_survives_reconnects() {
    let s = Server::start(Backend::Sqlite, &[]);
    let t = agent_token(&s, "c1", "10.0.0.1", &["web::app_canary"]);
    let open = || {
        let r = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("client")
            .get(s.url("/api/v1/agent/watch"))
            .bearer_auth(&t)
            .send()
            .expect("watch");
        assert_eq!(r.status().as_u16(), 200);
        BufReader::new(r)
    };
    let mut w = open();
    assert_eq!(next_assignments(&mut w)[0]["version"], Value::Null);
    deploy(&s, "canary", "web", Some("3.0"), json!({"timeout": 1}));
    let a = next_assignments(&mut w);
    assert_eq!(
        a,
        json!([{"tag": "web::app_canary", "app": "web", "version": "3.0"}])
    );
    drop(w);
    // While disconnected the version changes; a new stream starts with it.
    deploy(
        &s,
        "canary",
        "web",
        Some("3.1"),
        json!({"timeout": 1, "lock_wait": 30}),
    );
    s.wait_for("3.1 advertised", || {
        let (_, v) = s.get("/api/v1/versions/web");
        (v["canary_version"] == "3.1").then_some(())
    });
    let mut w = open();
    assert_eq!(next_assignments(&mut w)[0]["version"], "3.1");
}
