//! Parameter resolution (`resolve_parameters`) and secret masking
//! (`split_secrets`) against the schemas of real actions.
#![allow(clippy::unwrap_used)]

use aviary_core::action::{ParamSchema, ParamSpec, ParamType};
use aviary_core::model::MASK;
use aviary_core::pack::core_pack;
use aviary_core::params::{resolve_parameters, split_secrets};
use serde_json::{Map, Value, json};

fn spec(kind: ParamType) -> ParamSpec {
    ParamSpec {
        kind,
        description: String::new(),
        default: None,
        required: false,
        secret: false,
        immutable: false,
        enum_values: None,
        position: None,
        runner_param: false,
    }
}

fn schema() -> ParamSchema {
    let mut commit = spec(ParamType::String);
    commit.required = true;
    let mut percent = spec(ParamType::Integer);
    percent.default = Some(json!(5));
    percent.enum_values = Some(vec![json!(1), json!(5), json!(25), json!(100)]);
    let mut cmd = spec(ParamType::String);
    cmd.immutable = true;
    cmd.default = Some(json!("echo"));
    let mut token = spec(ParamType::String);
    token.secret = true;
    ParamSchema(vec![
        ("commit".into(), commit),
        ("percent".into(), percent),
        ("cmd".into(), cmd),
        ("token".into(), token),
        ("ratio".into(), spec(ParamType::Number)),
        ("dry_run".into(), spec(ParamType::Boolean)),
        ("hosts".into(), spec(ParamType::Array)),
        ("env".into(), spec(ParamType::Object)),
    ])
}

fn map(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => panic!("not an object"),
    }
}

#[test]
fn defaults_are_applied_and_absent_optionals_omitted() {
    let out = resolve_parameters(&schema(), &map(json!({"commit": "abc"}))).unwrap();
    assert_eq!(
        Value::Object(out),
        json!({"commit": "abc", "percent": 5, "cmd": "echo"})
    );
}

#[test]
fn cli_strings_are_coerced() {
    let given = map(json!({
        "commit": "abc",
        "percent": "25",
        "ratio": "0.5",
        "dry_run": "true",
        "hosts": "[\"a\", \"b\"]",
        "env": "{\"A\": \"1\"}",
    }));
    let out = resolve_parameters(&schema(), &given).unwrap();
    assert_eq!(out["percent"], json!(25));
    assert_eq!(out["ratio"], json!(0.5));
    assert_eq!(out["dry_run"], json!(true));
    assert_eq!(out["hosts"], json!(["a", "b"]));
    assert_eq!(out["env"], json!({"A": "1"}));
    // Comma-separated arrays (StackStorm CLI), integer-valued floats, "false".
    let given =
        map(json!({"commit": "abc", "hosts": "a, b", "percent": 100.0, "dry_run": "False"}));
    let out = resolve_parameters(&schema(), &given).unwrap();
    assert_eq!(out["hosts"], json!(["a", "b"]));
    assert_eq!(out["percent"], json!(100));
    assert_eq!(out["dry_run"], json!(false));
}

#[test]
fn every_error_is_reported_at_once() {
    let given = map(json!({
        "percent": "7",
        "cmd": "rm",
        "ratio": "lots",
        "dry_run": "maybe",
        "hosts": "[1,",
        "env": "[]",
        "verbose": true,
    }));
    let errs = resolve_parameters(&schema(), &given).unwrap_err();
    let text = errs.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        vec![
            "parameter 'verbose': unknown parameter; known parameters: commit, percent, cmd, token, ratio, dry_run, hosts, env",
            "parameter 'commit': required string parameter is missing",
            "parameter 'percent': 7 is not one of the allowed values: 1, 5, 25, 100",
            "parameter 'cmd': is immutable (always \"echo\"); remove it from the request",
            "parameter 'ratio': 'lots' is not a number",
            "parameter 'dry_run': 'maybe' is not a boolean (use true or false)",
            "parameter 'hosts': '[1,' is not a JSON array",
            "parameter 'env': '[]' is not a JSON object (write it as {\"key\": \"value\"})",
        ]
    );
    assert_eq!(errs.0.len(), 8);
}

#[test]
fn wrong_json_types_are_rejected() {
    let given = map(json!({"commit": 5, "percent": 2.5, "hosts": {"a": 1}}));
    let errs = resolve_parameters(&schema(), &given).unwrap_err();
    let msgs: Vec<String> = errs.0.iter().map(|e| e.to_string()).collect();
    assert_eq!(
        msgs,
        vec![
            "parameter 'commit': expected string, got an integer",
            "parameter 'percent': expected an integer, got a number",
            "parameter 'hosts': expected an array, got an object",
        ]
    );
}

#[test]
fn immutable_given_its_default_is_fine_and_null_means_absent() {
    let given = map(json!({"commit": "x", "cmd": "echo", "percent": null}));
    let out = resolve_parameters(&schema(), &given).unwrap();
    assert_eq!(out["cmd"], "echo");
    assert_eq!(out["percent"], 5);
}

#[test]
fn secret_values_never_appear_in_errors() {
    let mut s = schema();
    s.0[3].1.enum_values = Some(vec![json!("only-this")]);
    let given = map(json!({"commit": "x", "token": "hunter2"}));
    let errs = resolve_parameters(&s, &given).unwrap_err();
    let text = errs.to_string();
    assert!(
        !text.contains("hunter2") && !text.contains("only-this"),
        "{text}"
    );
    let given = map(json!({"commit": "x", "token": ["hunter2"]}));
    let text = resolve_parameters(&s, &given).unwrap_err().to_string();
    assert!(!text.contains("hunter2"), "{text}");
}

#[test]
fn split_secrets_masks_and_separates() {
    let params = map(json!({"commit": "abc", "token": "hunter2", "percent": 5}));
    let (masked, secrets) = split_secrets(&schema(), &params);
    assert_eq!(
        Value::Object(masked),
        json!({"commit": "abc", "token": MASK, "percent": 5})
    );
    assert_eq!(Value::Object(secrets), json!({"token": "hunter2"}));
}

#[test]
fn core_echo_and_http_schemas_resolve() {
    let core = core_pack();
    let echo = core.actions.iter().find(|a| a.name == "echo").unwrap();
    let out = resolve_parameters(&echo.effective_schema(), &map(json!({"message": "hi"}))).unwrap();
    assert_eq!(out["cmd"], "echo");
    assert_eq!(out["message"], "hi");
    assert_eq!(out["timeout"], 60);
    let errs =
        resolve_parameters(&echo.effective_schema(), &map(json!({"cmd": "rm -rf /"}))).unwrap_err();
    assert_eq!(errs.0.len(), 2, "{errs}");

    let http = core.actions.iter().find(|a| a.name == "http").unwrap();
    let schema = http.effective_schema();
    let given = map(json!({"url": "https://example.invalid", "method": "BREW", "password": "pw"}));
    let errs = resolve_parameters(&schema, &given).unwrap_err();
    assert_eq!(errs.0.len(), 1, "{errs}");
    assert!(errs.0[0].message.contains("\"GET\", \"POST\""), "{errs}");
    let given = map(json!({"url": "https://example.invalid", "password": "pw"}));
    let out = resolve_parameters(&schema, &given).unwrap();
    assert_eq!(out["method"], "GET");
    assert_eq!(out["verify_ssl_cert"], true);
    let (masked, secrets) = split_secrets(&schema, &out);
    assert_eq!(masked["password"], MASK);
    assert_eq!(secrets["password"], "pw");
}
