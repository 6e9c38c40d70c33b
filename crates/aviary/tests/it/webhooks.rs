//! Webhooks: signatures, dedup, bad input, injection, criteria, datastore templates.

use std::path::Path;

use serde_json::{Value, json};

use crate::harness::*;

fn examples() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../packs/examples"))
}

fn post_github(s: &Server, secret: Option<&str>, delivery: &str, body: &Value) -> (u16, Value) {
    let raw = serde_json::to_vec(body).expect("json");
    let mut req = s
        .http()
        .post(s.url("/api/v1/webhooks/github"))
        .header("content-type", "application/json")
        .header("X-GitHub-Event", "push")
        .header("X-GitHub-Delivery", delivery);
    if let Some(secret) = secret {
        req = req.header("X-Hub-Signature-256", sign(secret, &raw));
    }
    let r = req.body(raw).send().expect("post");
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

fn setup_secret(s: &Server, secret: &str) {
    let out = s.cli(&["key", "set", "github_webhook_secret", secret, "--encrypt"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn trigger_instance_count(s: &Server) -> usize {
    let (st, v) = s.get("/api/v1/trigger-instances?limit=1000");
    assert_eq!(st, 200);
    v.as_array().map(|a| a.len()).unwrap_or(0)
}

fn signed_push_runs_the_rule(backend: Backend) {
    let s = Server::start(backend, &[examples()]);
    setup_secret(&s, "s3cret");
    let body = push_payload(
        "webapp",
        "refs/heads/main",
        "0123456789abcdef0123456789abcdef01234567",
    );
    let (st, v) = post_github(&s, Some("s3cret"), "d-1", &body);
    assert_eq!(st, 202, "{v}");
    assert_eq!(v["duplicate"], false);
    let exec_id = v["executions"][0]
        .as_str()
        .expect("an execution")
        .to_string();
    let exec = s.wait_execution(&exec_id);
    assert_eq!(exec["status"], "succeeded", "{exec}");
    assert_eq!(
        exec["result"]["stdout"].as_str().unwrap_or_default().trim(),
        "push to webapp refs/heads/main at 0123456789abcdef0123456789abcdef01234567 by octocat"
    );
    // The trace: trigger instance -> rule -> execution.
    assert_eq!(exec["rule"], "examples.github_push");
    assert_eq!(exec["trigger_instance_id"], v["trigger_instance_id"]);
    let (st, ti) = s.get(&format!(
        "/api/v1/trigger-instances/{}",
        v["trigger_instance_id"].as_str().unwrap_or_default()
    ));
    assert_eq!(st, 200);
    assert_eq!(ti["trigger_instance"]["trigger"], "core.st2.webhook");
    assert_eq!(
        ti["trigger_instance"]["payload"]["body"]["ref"],
        "refs/heads/main"
    );
    assert_eq!(ti["enforcements"][0]["execution_id"], exec_id.as_str());

    // Redelivery: same X-GitHub-Delivery -> 200, no second event.
    let (st, again) = post_github(&s, Some("s3cret"), "d-1", &body);
    assert_eq!(st, 200, "{again}");
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["trigger_instance_id"], v["trigger_instance_id"]);
    assert_eq!(trigger_instance_count(&s), 1);
    assert_eq!(s.executions("action=examples.on_push").len(), 1);
}

#[test]
fn signed_push_runs_the_rule_sqlite() {
    signed_push_runs_the_rule(Backend::Sqlite);
}

#[test]
fn signed_push_runs_the_rule_postgres() {
    signed_push_runs_the_rule(Backend::Postgres);
}

#[test]
fn bad_webhooks_are_refused_and_nothing_is_stored() {
    let s = Server::start_with(
        Backend::Sqlite,
        &[examples()],
        &["--max-body-bytes", "4096"],
    );
    setup_secret(&s, "s3cret");
    let body = push_payload("webapp", "refs/heads/main", "abc");
    // Missing signature.
    let (st, v) = post_github(&s, None, "x1", &body);
    assert_eq!(st, 401, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .contains("X-Hub-Signature-256"),
        "{v}"
    );
    // Wrong secret.
    let (st, _) = post_github(&s, Some("wrong"), "x2", &body);
    assert_eq!(st, 401);
    // Signed, but malformed JSON.
    let raw = b"{\"ref\": ".to_vec();
    let r = s
        .http()
        .post(s.url("/api/v1/webhooks/github"))
        .header("content-type", "application/json")
        .header("X-GitHub-Event", "push")
        .header("X-Hub-Signature-256", sign("s3cret", &raw))
        .body(raw)
        .send()
        .expect("post");
    assert_eq!(r.status().as_u16(), 400);
    // Too large.
    let big = json!({"ref": "x".repeat(10_000)});
    let (st, _) = post_github(&s, Some("s3cret"), "x3", &big);
    assert_eq!(st, 413);
    // Unknown URL.
    let r = s
        .http()
        .post(s.url("/api/v1/webhooks/nope"))
        .json(&json!({}))
        .send()
        .expect("post");
    assert_eq!(r.status().as_u16(), 404);
    assert_eq!(trigger_instance_count(&s), 0);
    assert!(s.executions("").is_empty());
}

#[test]
fn event_data_never_reaches_a_shell() {
    let dir = tempfile::tempdir().expect("tmp");
    let pack = dir.path().join("inj");
    let pwned = dir.path().join("pwned");
    write(
        &pack.join("pack.yaml"),
        "ref: inj\nname: inj\ndescription: injection test\nversion: 0.0.1\n",
    );
    write(
        &pack.join("rules/push.yaml"),
        "name: push\npack: inj\ntrigger:\n  type: core.st2.webhook\n  parameters:\n    url: push\naction:\n  ref: core.local\n  parameters:\n    cmd: echo {{ trigger.body.ref }} and \"{{ trigger.body.who }}\"\n",
    );
    write(
        &pack.join("rules/echo.yaml"),
        "name: echo\npack: inj\ntrigger:\n  type: core.st2.webhook\n  parameters:\n    url: push\naction:\n  ref: core.echo\n  parameters:\n    message: \"{{ trigger.body.ref }}\"\n",
    );
    let s = Server::start(Backend::Sqlite, &[&pack]);
    let evil_ref = format!("main;touch${{IFS}}{}", pwned.display());
    let evil_who = format!("$(touch {})", pwned.display());
    let (st, v) = s.post(
        "/api/v1/webhooks/push",
        json!({"ref": evil_ref, "who": evil_who}),
    );
    assert_eq!(st, 202, "{v}");
    let ids: Vec<String> = v["executions"]
        .as_array()
        .expect("executions")
        .iter()
        .map(|x| x.as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(ids.len(), 2);
    for id in ids {
        let exec = s.wait_execution(&id);
        assert_eq!(exec["status"], "succeeded", "{exec}");
        let out = exec["result"]["stdout"].as_str().unwrap_or_default();
        assert!(out.contains(&evil_ref), "value must arrive verbatim: {out}");
    }
    assert!(!pwned.exists(), "event data was run by a shell");
}

#[test]
fn criteria_and_datastore_templates() {
    let dir = tempfile::tempdir().expect("tmp");
    let pack = dir.path().join("crit");
    write(
        &pack.join("pack.yaml"),
        "ref: crit\nname: crit\ndescription: criteria test\nversion: 0.0.1\n",
    );
    write(
        &pack.join("rules/main_only.yaml"),
        r#"name: main_only
pack: crit
trigger:
  type: core.st2.webhook
  parameters:
    url: gh
criteria:
  trigger.headers['X-GitHub-Event']:
    type: equals
    pattern: push
  trigger.body.ref:
    type: regex
    pattern: "^refs/heads/(main|release/.*)$"
  trigger.body.commits:
    type: search
    condition: any
    pattern:
      item.message:
        type: icontains
        pattern: deploy
action:
  ref: core.echo
  parameters:
    message: "{{ trigger.body.repository.name }} {{ st2kv.system.greeting }} {{ config_context.apps[trigger.body.repository.name].role }} {{ (config_context.apps['other'] | default({})).role | default('app') }}"
"#,
    );
    // Pack settings (StackStorm's pack config) reach templates as config_context.
    write(&pack.join("config.yaml"), "apps:\n  app:\n    role: web\n");
    let s = Server::start(Backend::Sqlite, &[&pack]);
    assert!(s.cli(&["key", "set", "greeting", "hello"]).status.success());
    let send = |git_ref: &str, msg: &str| {
        let r = s
            .http()
            .post(s.url("/api/v1/webhooks/gh"))
            .bearer_auth(&s.token)
            .header("X-GitHub-Event", "push")
            .json(&json!({"ref": git_ref, "repository": {"name": "app"}, "commits": [{"message": "x"}, {"message": msg}]}))
            .send()
            .expect("post");
        let st = r.status().as_u16();
        let v: Value = r.json().expect("json");
        assert_eq!(st, 202, "{v}");
        v["executions"].as_array().map(|a| a.len()).unwrap_or(0)
    };
    assert_eq!(send("refs/heads/feature", "please DEPLOY"), 0);
    assert_eq!(send("refs/heads/main", "nothing"), 0);
    assert_eq!(send("refs/heads/main", "please DEPLOY"), 1);
    let execs = s.executions("action=core.echo");
    assert_eq!(execs.len(), 1);
    let exec = s.wait_execution(execs[0]["id"].as_str().unwrap_or_default());
    assert_eq!(
        exec["result"]["stdout"].as_str().unwrap_or_default().trim(),
        "app hello web app"
    );
}

#[test]
fn actions_emit_custom_triggers_with_their_own_token() {
    let dir = tempfile::tempdir().expect("tmp");
    let pack = dir.path().join("ci");
    write(
        &pack.join("pack.yaml"),
        "ref: ci\nname: ci\ndescription: emit test\nversion: 0.0.1\n",
    );
    write(
        &pack.join("rules/on_build.yaml"),
        "name: on_build\npack: ci\ntrigger:\n  type: ci.build\ncriteria:\n  trigger.status:\n    type: equals\n    pattern: succeeded\naction:\n  ref: core.echo\n  parameters:\n    message: \"built {{ trigger.commit }}\"\n",
    );
    let s = Server::start(Backend::Sqlite, &[&pack]);
    let saved = dir.path().join("token");
    let cmd = format!(
        r#"curl -sf -H "Authorization: Bearer $AVIARY_API_TOKEN" -H 'content-type: application/json' -d '{{"trigger":"ci.build","payload":{{"status":"succeeded","commit":"abc123"}}}}' "$AVIARY_API_URL/api/v1/webhooks/st2" && printf %s "$AVIARY_API_TOKEN" > {}"#,
        saved.display()
    );
    let (st, e) = s.post(
        "/api/v1/executions",
        json!({"action": "core.local", "parameters": {"cmd": cmd}}),
    );
    assert_eq!(st, 201, "{e}");
    let done = s.wait_execution(e["id"].as_str().expect("id"));
    assert_eq!(done["status"], "succeeded", "{done}");
    let echo = s.wait_for("the rule on the emitted trigger", || {
        s.executions("action=core.echo").into_iter().next()
    });
    let echo = s.wait_execution(echo["id"].as_str().expect("id"));
    assert_eq!(echo["result"]["stdout"], "built abc123");
    // The execution's token is no longer accepted once it ended.
    let token = std::fs::read_to_string(&saved).expect("the token the action saw");
    assert!(token.starts_with("avx_"), "{token}");
    let r = s
        .http()
        .get(s.url("/api/v1/executions"))
        .bearer_auth(&token)
        .send()
        .expect("request");
    assert_eq!(r.status().as_u16(), 401);
    assert!(
        r.text().unwrap_or_default().contains("execution has ended"),
        "the refusal says why"
    );
    // A forged one (another execution's id under the same MAC) is refused too.
    let (id, mac) = token["avx_".len()..].split_once('.').expect("id.mac");
    let forged = format!("avx_{}.{mac}", uuid_like());
    assert_ne!(forged, format!("avx_{id}.{mac}"));
    let r = s
        .http()
        .get(s.url("/api/v1/executions"))
        .bearer_auth(&forged)
        .send()
        .expect("request");
    assert_eq!(r.status().as_u16(), 401);
}

#[test]
fn inject_trigger_and_action_trigger_chain_rules() {
    let dir = tempfile::tempdir().expect("tmp");
    let pack = dir.path().join("chain");
    write(
        &pack.join("pack.yaml"),
        "ref: chain\nname: chain\ndescription: chaining\nversion: 0.0.1\n",
    );
    write(
        &pack.join("rules/on_deploy.yaml"),
        "name: on_deploy\npack: chain\ntrigger:\n  type: chain.deployed\naction:\n  ref: core.echo\n  parameters:\n    message: \"deployed {{ trigger.version }}\"\n",
    );
    write(
        &pack.join("rules/on_echo_done.yaml"),
        "name: on_echo_done\npack: chain\ntrigger:\n  type: core.st2.generic.actiontrigger\ncriteria:\n  trigger.action_ref:\n    type: equals\n    pattern: core.echo\n  trigger.status:\n    type: equals\n    pattern: succeeded\naction:\n  ref: core.noop\n",
    );
    let s = Server::start(Backend::Sqlite, &[&pack]);
    let out = s.cli(&[
        "run",
        "core.inject_trigger",
        "trigger=chain.deployed",
        r#"payload={"version": "1.2.3"}"#,
    ]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let echo = s.wait_for("echo from the injected trigger", || {
        s.executions("action=core.echo").into_iter().next()
    });
    let echo = s.wait_execution(echo["id"].as_str().expect("id"));
    assert_eq!(echo["result"]["stdout"], "deployed 1.2.3");
    let noop = s.wait_for("noop from the action trigger", || {
        s.executions("rule=chain.on_echo_done").into_iter().next()
    });
    assert_eq!(
        s.wait_execution(noop["id"].as_str().expect("id"))["status"],
        "succeeded"
    );
}

#[test]
fn form_encoded_github_payloads_are_accepted() {
    let s = Server::start(Backend::Sqlite, &[examples()]);
    setup_secret(&s, "s3cret");
    let json_body =
        serde_json::to_string(&push_payload("formapp", "refs/heads/main", "f00d")).expect("json");
    // GitHub's form content type: payload=<urlencoded JSON>.
    let encoded: String = json_body
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let raw = format!("payload={encoded}");
    // And curl's default: JSON sent as a "form".
    for (delivery, body) in [
        ("f-1", raw.into_bytes()),
        ("f-2", json_body.clone().into_bytes()),
    ] {
        let r = s
            .http()
            .post(s.url("/api/v1/webhooks/github"))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("X-GitHub-Event", "push")
            .header("X-GitHub-Delivery", delivery)
            .header("X-Hub-Signature-256", sign("s3cret", &body))
            .body(body)
            .send()
            .expect("post");
        assert_eq!(r.status().as_u16(), 202);
        let v: Value = r.json().expect("json");
        let exec = s.wait_execution(v["executions"][0].as_str().expect("an execution"));
        assert!(
            exec["result"]["stdout"]
                .as_str()
                .unwrap_or_default()
                .contains("push to formapp"),
            "{exec}"
        );
    }
}

#[test]
fn event_data_reaches_a_remote_shell_only_through_the_environment() {
    let dir = tempfile::tempdir().expect("tmp");
    let pack = dir.path().join("remote");
    write(
        &pack.join("pack.yaml"),
        "ref: remote\nname: remote\ndescription: remote shell test\nversion: 0.0.1\n",
    );
    write(
        &pack.join("rules/deploy.yaml"),
        r#"name: deploy
pack: remote
trigger:
  type: core.st2.webhook
  parameters:
    url: deploy
action:
  ref: core.remote
  parameters:
    hosts: 127.0.0.1
    cmd: "deploy {{ trigger.body.ref }}"
    timeout: 5
"#,
    );
    let s = Server::start(Backend::Sqlite, &[&pack]);
    let evil = "main; touch /tmp/pwned-remote";
    let r = s
        .http()
        .post(s.url("/api/v1/webhooks/deploy"))
        .bearer_auth(&s.token)
        .json(&json!({"ref": evil}))
        .send()
        .expect("post");
    assert_eq!(r.status().as_u16(), 202);
    let execs = s.executions("action=core.remote");
    assert_eq!(execs.len(), 1);
    let params = &execs[0]["parameters"];
    assert_eq!(params["cmd"], "deploy \"${AVIARY_ARG_0}\"", "{params}");
    assert_eq!(params["env"]["AVIARY_ARG_0"], evil, "{params}");
}
