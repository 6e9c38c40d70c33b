//! Jenkins through the real binary: `core.jenkins_build` against a local
//! HTTP server standing in for Jenkins' REST API (it checks method, path,
//! basic auth, crumb, session cookie and form parameters), and the Jenkins
//! Notification plugin webhook turning the plugin's documented payloads into
//! `aviary.ci.build`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use serde_json::{Value, json};

use crate::harness::*;

/// One request as the fake Jenkins saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: HashMap<String, String>,
    body: String,
}

/// A tiny HTTP/1.1 server: `answer(request) -> (status, headers, body)`.
fn fake_jenkins(
    answer: impl Fn(&Seen, &str) -> (u16, Vec<(String, String)>, String) + Send + Sync + 'static,
) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let answer = Arc::new(answer);
    let me = base.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let log = log.clone();
            let answer = answer.clone();
            let me = me.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().expect("clone"));
                let mut conn = conn;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut parts = line.split_whitespace();
                    let method = parts.next().unwrap_or("").to_string();
                    let path = parts.next().unwrap_or("").to_string();
                    let mut headers = HashMap::new();
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) == 0 {
                            return;
                        }
                        let h = h.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':') {
                            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                        }
                    }
                    let len: usize = headers
                        .get("content-length")
                        .and_then(|l| l.parse().ok())
                        .unwrap_or(0);
                    let mut body = vec![0; len];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    let req = Seen {
                        method,
                        path,
                        headers,
                        body: String::from_utf8_lossy(&body).into_owned(),
                    };
                    let (status, extra, text) = answer(&req, &me);
                    log.lock().expect("log").push(req);
                    let mut resp = format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nContent-Type: application/json\r\n",
                        text.len()
                    );
                    for (k, v) in extra {
                        resp.push_str(&format!("{k}: {v}\r\n"));
                    }
                    resp.push_str("\r\n");
                    resp.push_str(&text);
                    if conn.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (base, seen)
}

fn basic(user: &str, token: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{token}"))
    )
}

fn form(body: &str) -> HashMap<String, String> {
    body.split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| {
            let dec = |s: &str| {
                let mut out = Vec::new();
                let b = s.as_bytes();
                let mut i = 0;
                while i < b.len() {
                    if b[i] == b'%' && i + 2 < b.len() {
                        out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).expect("hex"));
                        i += 3;
                    } else {
                        out.push(if b[i] == b'+' { b' ' } else { b[i] });
                        i += 1;
                    }
                }
                String::from_utf8(out).expect("utf8")
            };
            (dec(k), dec(v))
        })
        .collect()
}

#[test]
fn jenkins_build_starts_a_job_with_crumb_auth_and_parameters() {
    let token = "11e2b7a9c0ffee";
    let auth = basic("ci-bot", token);
    let expected_auth = auth.clone();
    let polls = Arc::new(Mutex::new(0));
    let (base, seen) = fake_jenkins(move |r, me| {
        if r.headers.get("authorization") != Some(&expected_auth) {
            return (401, vec![], "{}".into());
        }
        match (r.method.as_str(), r.path.as_str()) {
            ("GET", "/crumbIssuer/api/json") => (
                200,
                vec![(
                    "Set-Cookie".into(),
                    "JSESSIONID.abc=node0xyz; Path=/; HttpOnly".into(),
                )],
                r#"{"_class":"hudson.security.csrf.DefaultCrumbIssuer","crumb":"c0ffee42","crumbRequestField":"Jenkins-Crumb"}"#.into(),
            ),
            ("POST", "/job/apps/job/deploy%20me/buildWithParameters") => {
                let ok = r.headers.get("jenkins-crumb").map(String::as_str) == Some("c0ffee42")
                    && r.headers
                        .get("cookie")
                        .is_some_and(|c| c.contains("JSESSIONID.abc=node0xyz"))
                    && r.headers
                        .get("content-type")
                        .is_some_and(|c| c.starts_with("application/x-www-form-urlencoded"));
                if ok {
                    (201, vec![("Location".into(), format!("{me}/queue/item/42/"))], String::new())
                } else {
                    (403, vec![], "No valid crumb was included in the request".into())
                }
            }
            ("GET", "/queue/item/42/api/json") => {
                let mut n = polls.lock().expect("polls");
                *n += 1;
                if *n < 2 {
                    (200, vec![], r#"{"blocked":false,"why":"Waiting for next available executor"}"#.into())
                } else {
                    (200, vec![], r#"{"executable":{"number":7,"url":"http://jenkins/job/apps/job/deploy%20me/7/"}}"#.into())
                }
            }
            _ => (404, vec![], "{}".into()),
        }
    });
    let s = Server::start(Backend::Sqlite, &[]);
    // The fake's Location is absolute, as Jenkins' is.
    let (st, e) = s.post(
        "/api/v1/executions",
        json!({"action": "core.jenkins_build", "parameters": {
            "url": format!("{base}/"), "job": "apps/deploy me", "username": "ci-bot", "api_token": token,
            "parameters": {"BRANCH": "main", "COMMIT": "c6d86dc6", "NOTE": "a&b=c d"},
            "wait_for_build": true}}),
    );
    assert_eq!(st, 201, "{e}");
    let exec = s.wait_execution(e["id"].as_str().expect("id"));
    assert_eq!(exec["status"], "succeeded", "{exec}");
    assert_eq!(exec["result"]["build_number"], 7, "{exec}");
    assert_eq!(exec["result"]["crumb"], true);
    assert_eq!(
        exec["result"]["queue_url"],
        format!("{base}/queue/item/42/").as_str()
    );
    let log = seen.lock().expect("log").clone();
    let post = log
        .iter()
        .find(|r| r.method == "POST")
        .expect("a POST reached Jenkins");
    assert_eq!(post.path, "/job/apps/job/deploy%20me/buildWithParameters");
    let params = form(&post.body);
    assert_eq!(params.get("BRANCH").map(String::as_str), Some("main"));
    assert_eq!(params.get("COMMIT").map(String::as_str), Some("c6d86dc6"));
    assert_eq!(params.get("NOTE").map(String::as_str), Some("a&b=c d"));
    assert_eq!(
        log[0].path, "/crumbIssuer/api/json",
        "the crumb comes first"
    );
    assert!(!exec.to_string().contains(token), "token leaked: {exec}");
    assert_eq!(exec["parameters"]["api_token"], "********");
}

#[test]
fn jenkins_build_without_crumbs_and_with_a_bad_token() {
    let (base, seen) = fake_jenkins(|r, _| match (r.method.as_str(), r.path.as_str()) {
        ("GET", "/crumbIssuer/api/json") => (404, vec![], "{}".into()),
        ("POST", "/job/nightly/build")
            if r.headers.get("authorization") == Some(&basic("u", "good")) =>
        {
            (
                201,
                vec![("Location".into(), "http://x/queue/item/1/".into())],
                String::new(),
            )
        }
        _ => (401, vec![], "Invalid password/token for user: u".into()),
    });
    let s = Server::start(Backend::Sqlite, &[]);
    let run = |token: &str| {
        let (st, e) = s.post(
            "/api/v1/executions",
            json!({"action": "core.jenkins_build", "parameters": {
                "url": base, "job": "nightly", "username": "u", "api_token": token}}),
        );
        assert_eq!(st, 201, "{e}");
        s.wait_execution(e["id"].as_str().expect("id"))
    };
    let ok = run("good");
    assert_eq!(ok["status"], "succeeded", "{ok}");
    assert_eq!(ok["result"]["crumb"], false, "no crumb issuer: no crumb");
    assert!(
        seen.lock()
            .expect("log")
            .iter()
            .filter(|r| r.method == "POST")
            .all(|r| !r.headers.contains_key("jenkins-crumb"))
    );
    let bad = run("wrong-token");
    assert_eq!(bad["status"], "failed", "{bad}");
    let err = bad["result"]["error"].as_str().unwrap_or_default();
    assert!(err.contains("401") && err.contains("API token"), "{err}");
    assert!(!bad.to_string().contains("wrong-token"), "{bad}");
}

/// The Notification plugin's payload (its documented shape).
fn notification(phase: &str, status: Option<&str>, number: u64) -> Value {
    let mut build = json!({
        "full_url": format!("http://localhost:8080/job/asgard/{number}/"),
        "number": number,
        "queue_id": 1,
        "phase": phase,
        "url": format!("job/asgard/{number}/"),
        "scm": {
            "url": "https://github.com/evgeny-goldin/asgard.git",
            "branch": "origin/master",
            "commit": "c6d86dc654b12425e706bcf951adfe5a8627a517"
        },
        "log": "",
        "artifacts": {}
    });
    if let Some(st) = status {
        build["status"] = json!(st);
    }
    json!({"name": "asgard", "display_name": "asgard", "url": "job/asgard/", "build": build})
}

fn ci_rule_pack(dir: &std::path::Path) -> std::path::PathBuf {
    let pack = dir.join("cicd");
    write(
        &pack.join("pack.yaml"),
        "ref: cicd\nname: cicd\ndescription: jenkins ci test\nversion: 0.0.1\n",
    );
    write(
        &pack.join("rules/on_ci.yaml"),
        "name: on_ci\npack: cicd\ntrigger:\n  type: aviary.ci.build\naction:\n  ref: core.echo\n  parameters:\n    message: \"{{ trigger.project }} {{ trigger.branch }} {{ trigger.status }} {{ trigger.commit }} {{ trigger.jenkins.number }}\"\n",
    );
    pack
}

fn jenkins_notifications(backend: Backend) {
    let tmp = tempfile::tempdir().expect("tmp");
    let pack = ci_rule_pack(tmp.path());
    let s = Server::start(backend, &[&pack]);
    let http = s.http();
    let send = |query: &str, body: &Value| {
        let r = http
            .post(s.url(&format!("/api/v1/webhooks/jenkins{query}")))
            .json(body)
            .send()
            .expect("post");
        let st = r.status().as_u16();
        (st, r.json::<Value>().unwrap_or(Value::Null))
    };
    let with_token = format!("?st2-api-key={}", s.token);
    // No credentials: refused.
    let (st, _) = send("", &notification("COMPLETED", Some("SUCCESS"), 18));
    assert_eq!(st, 401);
    // STARTED is acknowledged, emits nothing.
    let (st, v) = send(&with_token, &notification("STARTED", None, 18));
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["ignored"], true);
    // COMPLETED emits aviary.ci.build once.
    let (st, v) = send(&with_token, &notification("COMPLETED", Some("SUCCESS"), 18));
    assert_eq!(st, 202, "{v}");
    let (st, v) = send(&with_token, &notification("COMPLETED", Some("SUCCESS"), 18));
    assert_eq!(st, 200, "a redelivery is stored once: {v}");
    assert_eq!(v["duplicate"], true);
    let (st, _) = send(&with_token, &notification("FINALIZED", Some("SUCCESS"), 18));
    assert_eq!(st, 200);
    let echo = s.wait_for("the rule on aviary.ci.build", || {
        s.executions("action=core.echo").into_iter().next()
    });
    let echo = s.wait_execution(echo["id"].as_str().expect("id"));
    assert_eq!(
        echo["result"]["stdout"],
        "asgard master succeeded c6d86dc654b12425e706bcf951adfe5a8627a517 18"
    );
    // emit_on=finalized: COMPLETED is ignored, FINALIZED emits; ABORTED -> canceled.
    let fin = format!("{with_token}&emit_on=finalized");
    let (st, v) = send(&fin, &notification("COMPLETED", Some("ABORTED"), 19));
    assert_eq!((st, v["ignored"].clone()), (200, json!(true)));
    let (st, _) = send(&fin, &notification("FINALIZED", Some("ABORTED"), 19));
    assert_eq!(st, 202);
    // A per-URL secret from the datastore instead of a token.
    let set = s.cli(&[
        "key",
        "set",
        "jenkins_webhook_secret",
        "hunter2",
        "--encrypt",
    ]);
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    let (st, _) = send(
        "?secret=wrong",
        &notification("COMPLETED", Some("FAILURE"), 20),
    );
    assert_eq!(st, 401);
    let (st, _) = send(
        "?secret=hunter2",
        &notification("COMPLETED", Some("FAILURE"), 20),
    );
    assert_eq!(st, 202);
    // A payload that is not the plugin's: every problem listed.
    let (st, v) = send(&with_token, &json!({"build": {"status": "SUCCESS"}}));
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["details"].as_array().map(Vec::len), Some(3), "{v}");
    let messages = s.wait_for("three CI triggers", || {
        let done: Vec<String> = s
            .executions("action=core.echo")
            .iter()
            .map(|e| s.wait_execution(e["id"].as_str().expect("id")))
            .filter_map(|e| e["result"]["stdout"].as_str().map(String::from))
            .collect();
        (done.len() >= 3).then_some(done)
    });
    assert_eq!(messages.len(), 3, "{messages:?}");
    assert!(
        messages
            .iter()
            .any(|m| m.contains("canceled") && m.ends_with(" 19")),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("failed") && m.ends_with(" 20")),
        "{messages:?}"
    );
}

#[test]
fn jenkins_notifications_emit_the_ci_trigger() {
    jenkins_notifications(Backend::Sqlite);
}

#[test]
fn jenkins_notifications_emit_the_ci_trigger_postgres() {
    jenkins_notifications(Backend::Postgres);
}
