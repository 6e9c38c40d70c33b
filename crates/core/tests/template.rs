//! Template tests: native values, strict undefined naming the variable,
//! datastore references, filters, and shell-safe rendering against injection.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use aviary_core::template::TemplateEngine;
use serde_json::{Value, json};

fn ctx() -> Value {
    json!({
        "trigger": {
            "body": {
                "ref": "refs/heads/main",
                "count": 5,
                "ok": true,
                "tags": ["a", "b"],
                "repo": {"name": "aviary", "owner": "birds"},
                "nothing": null,
                "path": "/srv/app/releases/v1.2.tar.gz"
            },
            "headers": {"X-GitHub-Event": "push"}
        },
        "st2kv": {"system": {"target": "canary-1"}, "user": {"token": "t0k"}}
    })
}

#[test]
fn native_values_for_single_expressions() {
    let e = TemplateEngine::new();
    let c = ctx();
    let cases = [
        (json!("{{ trigger.body.count }}"), json!(5)),
        (json!("{{trigger.body.ok}}"), json!(true)),
        (json!("{{ trigger.body.tags }}"), json!(["a", "b"])),
        (
            json!("{{ trigger.body.repo }}"),
            json!({"name": "aviary", "owner": "birds"}),
        ),
        (json!("{{ trigger.body.nothing }}"), Value::Null),
        (json!("{{ trigger.body.count + 1 }}"), json!(6)),
        (json!("{{- trigger.body.ref -}}"), json!("refs/heads/main")),
        (json!("n={{ trigger.body.count }}"), json!("n=5")),
        (
            json!("{{ trigger.body.count }} {{ trigger.body.ok }}"),
            json!("5 True"),
        ),
        (json!("plain text"), json!("plain text")),
        (
            json!("{{ trigger.headers['X-GitHub-Event'] }}"),
            json!("push"),
        ),
        (json!("{{ st2kv.system.target }}"), json!("canary-1")),
        (
            json!("{{ trigger.body.missing | default('dflt') }}"),
            json!("dflt"),
        ),
        (json!(42), json!(42)),
    ];
    for (input, expected) in cases {
        assert_eq!(e.render_value(&input, &c).unwrap(), expected, "{input}");
    }
    let nested =
        json!({"a": ["{{ trigger.body.count }}", {"b": "x{{ trigger.body.ref }}"}], "{{k}}": 1});
    assert_eq!(
        e.render_value(&nested, &c).unwrap(),
        json!({"a": [5, {"b": "xrefs/heads/main"}], "{{k}}": 1})
    );
}

#[test]
fn strict_undefined_names_the_variable() {
    let e = TemplateEngine::new();
    let c = ctx();
    for (tmpl, name) in [
        ("{{ trigger.body.nope }}", "trigger.body.nope"),
        ("x {{ trigger.body.nope }} y", "trigger.body.nope"),
        ("{{ nothere }}", "nothere"),
        ("line1\n{{ st2kv.system.absent }}", "st2kv.system.absent"),
    ] {
        let err = e.render_value(&json!(tmpl), &c).unwrap_err();
        assert!(
            err.message.contains(&format!("`{name}`")),
            "{tmpl}: {}",
            err.message
        );
    }
    let err = e
        .render_value(&json!("line1\n{{ st2kv.system.absent }}"), &c)
        .unwrap_err();
    assert_eq!(err.line, Some(2), "{err}");
    assert!(err.to_string().contains("line 2"), "{err}");
}

#[test]
fn check_reports_syntax_errors_with_line() {
    let e = TemplateEngine::new();
    e.check("{{ trigger.body.ref }} and {% if x %}y{% endif %}")
        .unwrap();
    let err = e.check("ok\nstill ok\n{{ trigger.body.ref ").unwrap_err();
    assert_eq!(err.line, Some(3), "{err}");
    assert!(err.message.contains("syntax error"), "{err}");
    assert!(e.check("{% if %}").is_err());
}

#[test]
fn kv_references() {
    let e = TemplateEngine::new();
    let refs = e
        .kv_references(
            "{{ st2kv.system.target }} {{ st2kv.user.token }} {{ trigger.body.ref }} {{ st2kv.system.target }}",
        )
        .unwrap();
    assert_eq!(refs, vec!["st2kv.system.target", "st2kv.user.token"]);
    assert!(e.kv_references("{{ trigger.x }}").unwrap().is_empty());
    assert!(e.kv_references("{{ oops").is_err());
}

#[test]
fn filters() {
    let e = TemplateEngine::new();
    let c = ctx();
    let r = |t: &str| e.render_value(&json!(t), &c).unwrap();
    assert_eq!(
        r("{{ trigger.body.tags | to_json_string }}"),
        json!("[\"a\",\"b\"]")
    );
    assert_eq!(
        r("{{ trigger.body.repo | to_complex }}"),
        json!("{\"name\":\"aviary\",\"owner\":\"birds\"}")
    );
    assert_eq!(
        r("{{ '{\"a\": [1]}' | from_json_string }}"),
        json!({"a": [1]})
    );
    assert_eq!(
        r("{{ 'say \"hi\"\n' | json_escape }}"),
        json!("say \\\"hi\\\"\\n")
    );
    assert_eq!(
        r("{{ trigger.body.ref | regex_match('refs/') }}"),
        json!(true)
    );
    assert_eq!(
        r("{{ trigger.body.ref | regex_match('heads') }}"),
        json!(false)
    );
    assert_eq!(
        r("{{ trigger.body.ref | regex_search('heads') }}"),
        json!(true)
    );
    assert_eq!(
        r("{{ trigger.body.ref | regex_replace('refs/heads/(.*)', 'branch-\\\\1') }}"),
        json!("branch-main")
    );
    assert_eq!(
        r("{{ 'v1.2.3 and v4.5.6' | regex_substring('v(\\\\d)') }}"),
        json!("1")
    );
    assert_eq!(
        r("{{ 'v1.2.3 and v4.5.6' | regex_substring('v\\\\d', 1) }}"),
        json!("v4")
    );
    assert_eq!(
        r("{{ trigger.body.path | basename }}"),
        json!("v1.2.tar.gz")
    );
    assert_eq!(
        r("{{ trigger.body.path | dirname }}"),
        json!("/srv/app/releases")
    );
    assert_eq!(r("{{ trigger.body.nothing | use_none }}"), Value::Null);
    assert_eq!(
        r("{{ trigger.body.ref | upper }}"),
        json!("REFS/HEADS/MAIN")
    );
    let err = e
        .render_value(&json!("{{ 'x' | regex_match('(') }}"), &c)
        .unwrap_err();
    assert!(err.message.contains("invalid regular expression"), "{err}");
}

fn injection_ctx() -> Value {
    json!({"trigger": {"body": {
        "branch": "main;touch${IFS}/tmp/pwned",
        "title": "$(id) `id` 'q' \"dq\" \\",
        "n": 7,
        "list": [1, "two"]
    }}})
}

#[test]
fn render_shell_never_splices_values() {
    let e = TemplateEngine::new();
    let c = injection_ctx();
    let (text, env) = e
        .render_shell(
            "git checkout {{ trigger.body.branch }} && echo {{ trigger.body.title | safe }} {{ trigger.body.n }}",
            &c,
        )
        .unwrap();
    assert_eq!(
        text,
        "git checkout \"${AVIARY_ARG_0}\" && echo \"${AVIARY_ARG_1}\" \"${AVIARY_ARG_2}\""
    );
    assert!(!text.contains("touch"));
    assert!(!text.contains("$(id)"));
    assert_eq!(
        env,
        vec![
            (
                "AVIARY_ARG_0".to_string(),
                "main;touch${IFS}/tmp/pwned".to_string()
            ),
            (
                "AVIARY_ARG_1".to_string(),
                "$(id) `id` 'q' \"dq\" \\".to_string()
            ),
            ("AVIARY_ARG_2".to_string(), "7".to_string()),
        ]
    );
    // Filters and control flow still go through the same hook.
    let (text, env) = e
        .render_shell(
            "{% for x in trigger.body.list %}a {{ x }} {% endfor %}{% filter upper %}{{ trigger.body.branch }}{% endfilter %} {{ trigger.body.list }}",
            &c,
        )
        .unwrap();
    assert!(!text.contains("touch") && !text.contains("TOUCH"), "{text}");
    assert_eq!(env[0].1, "1");
    assert_eq!(env[1].1, "two");
    assert_eq!(env.last().unwrap().1, "[1,\"two\"]");
    // Text without templates is untouched.
    let (text, env) = e.render_shell("echo 'hi' $HOME", &c).unwrap();
    assert_eq!(text, "echo 'hi' $HOME");
    assert!(env.is_empty());
    // Undefined is still an error.
    let err = e
        .render_shell("echo {{ trigger.body.nope }}", &c)
        .unwrap_err();
    assert!(err.message.contains("`trigger.body.nope`"), "{err}");
    // A normal render afterwards is not affected by the shell hook.
    assert_eq!(
        e.render_value(&json!("b={{ trigger.body.n }}"), &c)
            .unwrap(),
        json!("b=7")
    );
}

#[test]
fn render_shell_runs_safely_in_a_real_shell() {
    let e = TemplateEngine::new();
    let c = injection_ctx();
    let dir = std::env::temp_dir().join(format!("aviary-tmpl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let marker = dir.join("pwned");
    let ctx = json!({"trigger": {"body": {
        "branch": format!("main;touch${{IFS}}{}", marker.display()),
        "title": c["trigger"]["body"]["title"].clone(),
    }}});
    let (text, env) = e
        .render_shell(
            "printf '%s|%s' {{ trigger.body.branch }} {{ trigger.body.title }}",
            &ctx,
        )
        .unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(&text)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stdout,
        format!(
            "{}|{}",
            ctx["trigger"]["body"]["branch"].as_str().unwrap(),
            ctx["trigger"]["body"]["title"].as_str().unwrap()
        )
    );
    assert!(!marker.exists(), "the injected command ran");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn engine_is_send_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<TemplateEngine>();
}
