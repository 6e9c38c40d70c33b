//! Nothing accepted is lost: the queue survives kill -9; what was running is
//! marked abandoned, never silently re-run. Timers fire.

use serde_json::json;

use crate::harness::*;

fn queue_survives_kill9(backend: Backend) {
    let dir = tempfile::tempdir().expect("tmp");
    let marker = dir.path().join("runs");
    let mut s = Server::start_with(backend, &[], &["--workers", "1"]);
    // A long one occupies the only worker; three more wait in the queue.
    let (st, first) = s.post(
        "/api/v1/executions",
        json!({"action": "core.local", "parameters": {"cmd": "sleep 30"}}),
    );
    assert_eq!(st, 201);
    let first = first["id"].as_str().expect("id").to_string();
    s.wait_for("first running", || {
        let (_, e) = s.get(&format!("/api/v1/executions/{first}"));
        (e["status"] == "running").then_some(())
    });
    let mut queued = Vec::new();
    for i in 0..3 {
        let cmd = format!("echo {i} >> '{}'", marker.display());
        let (st, e) = s.post(
            "/api/v1/executions",
            json!({"action": "core.local", "parameters": {"cmd": cmd}}),
        );
        assert_eq!(st, 201, "{e}");
        queued.push(e["id"].as_str().expect("id").to_string());
    }
    s.kill9();
    s.spawn();
    let abandoned = s.wait_execution(&first);
    assert_eq!(abandoned["status"], "abandoned", "{abandoned}");
    for id in &queued {
        let e = s.wait_execution(id);
        assert_eq!(e["status"], "succeeded", "{e}");
    }
    let runs = std::fs::read_to_string(&marker).expect("marker");
    assert_eq!(
        runs.lines().count(),
        3,
        "each queued execution ran exactly once: {runs}"
    );
}

#[test]
fn queue_survives_kill9_sqlite() {
    queue_survives_kill9(Backend::Sqlite);
}

#[test]
fn queue_survives_kill9_postgres() {
    queue_survives_kill9(Backend::Postgres);
}

#[test]
fn interval_timer_fires() {
    let dir = tempfile::tempdir().expect("tmp");
    let pack = dir.path().join("tick");
    write(
        &pack.join("pack.yaml"),
        "ref: tick\nname: tick\ndescription: timer test\nversion: 0.0.1\n",
    );
    write(
        &pack.join("rules/every_second.yaml"),
        "name: every_second\npack: tick\ntrigger:\n  type: core.st2.IntervalTimer\n  parameters:\n    unit: seconds\n    delta: 1\naction:\n  ref: core.noop\n",
    );
    let s = Server::start(Backend::Sqlite, &[&pack]);
    s.wait_for("two timer executions", || {
        let execs = s.executions("rule=tick.every_second");
        (execs.iter().filter(|e| e["status"] == "succeeded").count() >= 2).then_some(())
    });
    let (_, tis) = s.get("/api/v1/trigger-instances?trigger=core.st2.IntervalTimer");
    assert!(tis.as_array().map(|a| a.len()).unwrap_or(0) >= 2);
}

#[test]
fn http_runner_calls_a_real_server() {
    // A one-shot HTTP server on loopback that records the request.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let handle = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut conn, _) = listener.accept().expect("accept");
        let mut buf = vec![0u8; 65536];
        let mut got = Vec::new();
        loop {
            let n = conn.read(&mut buf).unwrap_or(0);
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got);
            if n == 0 || (text.contains("\r\n\r\n") && text.ends_with('}')) {
                break;
            }
        }
        let body = r#"{"ok":true}"#;
        let _ = write!(
            conn,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        String::from_utf8_lossy(&got).into_owned()
    });
    let s = Server::start(Backend::Sqlite, &[]);
    let (st, e) = s.post(
        "/api/v1/executions",
        json!({"action": "core.http", "parameters": {"url": format!("http://127.0.0.1:{port}/hook"), "method": "POST", "body": "{\"a\":1}", "headers": {"X-Test": "yes"}}}),
    );
    assert_eq!(st, 201, "{e}");
    let done = s.wait_execution(e["id"].as_str().expect("id"));
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["result"]["status_code"], 200);
    assert_eq!(done["result"]["body"]["ok"], true);
    let request = handle.join().expect("server thread");
    assert!(request.starts_with("POST /hook"), "{request}");
    assert!(
        request.to_ascii_lowercase().contains("x-test: yes"),
        "{request}"
    );
}
