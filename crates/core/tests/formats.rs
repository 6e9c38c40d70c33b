//! Pack loading against sample packs under `tests/fixtures/`: a valid pack
//! loads, a broken one reports every problem of every file at once, with
//! line and column (snapshots under `tests/snapshots/`).
#![allow(clippy::unwrap_used)]

use aviary_core::action::ParamType;
use aviary_core::criteria::{Operator, SearchCondition};
use aviary_core::diagnostic::Diagnostics;
use aviary_core::pack::{Pack, SourceFile, core_pack, load_pack};
use std::collections::BTreeSet;
use std::path::Path;

/// Reads a fixture pack the way a caller would: every YAML file as text,
/// every path for the entry point check.
fn read_pack(name: &str) -> (Vec<SourceFile>, BTreeSet<String>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let mut files = Vec::new();
    let mut paths = BTreeSet::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path
                .strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            if rel.ends_with(".yaml") || rel.ends_with(".yml") {
                files.push(SourceFile {
                    path: rel.clone(),
                    text: std::fs::read_to_string(&path).unwrap(),
                });
            }
            paths.insert(rel);
        }
    }
    (files, paths)
}

fn load(name: &str) -> Result<Pack, Diagnostics> {
    let (files, paths) = read_pack(name);
    load_pack(name, &files, &paths)
}

#[test]
fn valid_pack_loads() {
    let pack = load("canary").unwrap_or_else(|d| panic!("{d}"));
    assert_eq!(pack.meta.name, "canary");
    assert_eq!(pack.meta.version, "0.3.1");
    assert_eq!(pack.meta.email.as_deref(), Some("release@example.invalid"));

    let refs: Vec<String> = pack.actions.iter().map(|a| a.reference()).collect();
    assert_eq!(refs, vec!["canary.deploy", "canary.rollout"]);
    let deploy = &pack.actions[0];
    assert_eq!(deploy.entry_point.as_deref(), Some("deploy.sh"));
    assert_eq!(deploy.file.as_deref(), Some("actions/deploy.yaml"));
    let timeout = deploy.parameters.get("timeout").unwrap();
    assert!(timeout.runner_param);
    assert_eq!(timeout.kind, ParamType::Integer);
    assert_eq!(timeout.default, Some(serde_json::json!(600)));
    assert_eq!(
        deploy.effective_schema().names(),
        vec![
            "commit", "percent", "token", "timeout", "env", "cwd", "kwarg_op"
        ]
    );

    let rule_refs: Vec<String> = pack.rules.iter().map(|r| r.reference()).collect();
    assert_eq!(rule_refs, vec!["canary.deploy_main", "canary.on_push"]);
    let on_push = &pack.rules[1];
    assert_eq!(on_push.trigger.kind, "core.st2.webhook");
    assert_eq!(on_push.trigger.parameters["url"], "github");
    assert_eq!(on_push.criteria.len(), 2);
    assert_eq!(on_push.criteria[0].key, "trigger.headers['X-GitHub-Event']");
    assert_eq!(on_push.criteria[0].op, Operator::Equals);
    assert_eq!(on_push.criteria[1].key, "trigger.body.ref");
    assert_eq!(on_push.criteria[1].op, Operator::Regex);
    assert_eq!(on_push.action.reference, "core.local");
    assert!(
        on_push.action.parameters["cmd"]
            .as_str()
            .unwrap()
            .contains("{{ trigger.body.ref }}")
    );
    let deploy_main = &pack.rules[0];
    assert_eq!(deploy_main.criteria[1].op, Operator::Search);
    assert_eq!(
        deploy_main.criteria[1].condition,
        Some(SearchCondition::Any)
    );

    insta::assert_yaml_snapshot!("canary_pack", pack);
}

#[test]
fn broken_pack_reports_everything_at_once() {
    let diags = load("broken").unwrap_err();
    // Every file with a problem is reported, not just the first one.
    let files: BTreeSet<&str> = diags.0.iter().map(|d| d.file.as_str()).collect();
    assert_eq!(
        files,
        BTreeSet::from([
            "actions/missing_fields.yaml",
            "actions/unknown_runner.yaml",
            "actions/z_duplicate.yaml",
            "pack.yaml",
            "rules/bad_criteria.yaml",
            "rules/bad_yaml.yaml",
            "rules/typo.yaml",
        ])
    );
    let at = |file: &str, field: &str| -> (usize, usize) {
        let d = diags
            .0
            .iter()
            .find(|d| d.file == file && d.field == field)
            .unwrap_or_else(|| panic!("no diagnostic for {file} {field}:\n{diags}"));
        (d.line, d.column)
    };
    // Unknown runner: at the value.
    assert_eq!(at("actions/unknown_runner.yaml", "runner_type"), (2, 14));
    // Missing required fields: at the parent mapping (the document).
    assert_eq!(at("actions/missing_fields.yaml", "name"), (1, 1));
    assert_eq!(at("actions/missing_fields.yaml", "runner_type"), (1, 1));
    // Bad parameter type name, wrong default type, unknown key (at the key).
    assert_eq!(
        at("actions/missing_fields.yaml", "parameters.count.type"),
        (4, 11)
    );
    assert_eq!(
        at("actions/missing_fields.yaml", "parameters.retries.default"),
        (7, 14)
    );
    assert_eq!(
        at("actions/missing_fields.yaml", "parameters.level.requried"),
        (10, 5)
    );
    // Duplicate name across two files, pointing back at the first.
    let dup = diags
        .0
        .iter()
        .find(|d| d.file == "actions/z_duplicate.yaml" && d.field == "name")
        .unwrap();
    assert_eq!((dup.line, dup.column), (2, 7));
    assert!(
        dup.message.contains("actions/unknown_runner.yaml:1"),
        "{dup}"
    );
    // Bad operator, bad regex, bad search, bad Jinja, missing in-pack action.
    assert_eq!(
        at("rules/bad_criteria.yaml", "criteria.trigger.body.ref.type"),
        (8, 11)
    );
    assert_eq!(
        at(
            "rules/bad_criteria.yaml",
            "criteria.trigger.headers['X-GitHub-Event'].pattern"
        ),
        (12, 14)
    );
    assert_eq!(
        at(
            "rules/bad_criteria.yaml",
            "criteria.trigger.body.sender.condition"
        ),
        (14, 5)
    );
    assert_eq!(
        at(
            "rules/bad_criteria.yaml",
            "criteria.trigger.body.sender.pattern"
        ),
        (15, 14)
    );
    assert_eq!(at("rules/bad_criteria.yaml", "action.ref"), (17, 8));
    assert_eq!(
        at("rules/bad_criteria.yaml", "action.parameters.cmd"),
        (19, 10)
    );
    assert_eq!(
        at("rules/bad_criteria.yaml", "action.parameters.args[0]"),
        (21, 9)
    );
    // YAML syntax error, typo'd key, missing trigger, malformed ref.
    assert_eq!(at("rules/typo.yaml", "trigerr"), (2, 1));
    assert_eq!(at("rules/typo.yaml", "trigger"), (1, 1));
    assert_eq!(at("rules/typo.yaml", "action.ref"), (5, 8));
    assert!(
        diags
            .0
            .iter()
            .any(|d| d.file == "rules/bad_yaml.yaml" && d.field == "(yaml)")
    );
    // pack.yaml: unquoted version.
    assert_eq!(at("pack.yaml", "version"), (2, 10));

    insta::assert_snapshot!("broken_pack", diags.to_string());
}

#[test]
fn workflow_bodies_and_sensors_are_not_read_as_actions() {
    let (mut files, paths) = read_pack("canary");
    files.push(SourceFile {
        path: "actions/workflows/other.yaml".into(),
        text: "this is: [not an action".into(),
    });
    files.push(SourceFile {
        path: "policies/p.yaml".into(),
        text: "{{{".into(),
    });
    assert!(load_pack("canary", &files, &paths).is_ok());
}

#[test]
fn missing_entry_point_file_is_reported() {
    let (files, mut paths) = read_pack("canary");
    paths.remove("actions/deploy.sh");
    let diags = load_pack("canary", &files, &paths).unwrap_err();
    assert_eq!(diags.0.len(), 1, "{diags}");
    let d = &diags.0[0];
    assert_eq!(
        (d.file.as_str(), d.line, d.column),
        ("actions/deploy.yaml", 6, 14)
    );
    assert!(d.message.contains("actions/deploy.sh"), "{d}");
}

#[test]
fn pack_ref_defaults_to_folder_name() {
    let files = vec![
        SourceFile {
            path: "pack.yaml".into(),
            text: "description: x\nversion: '1'\n".into(),
        },
        SourceFile {
            path: "actions/a.yaml".into(),
            text: "name: a\nrunner_type: noop\n".into(),
        },
        SourceFile {
            path: "rules/r.yaml".into(),
            text: "name: r\ntrigger: {type: my.custom_trigger}\naction: {ref: folder_name.a}\n"
                .into(),
        },
    ];
    let pack = load_pack("folder_name", &files, &BTreeSet::new()).unwrap();
    assert_eq!(pack.meta.name, "folder_name");
    assert_eq!(pack.rules[0].trigger.kind, "my.custom_trigger");
    let missing = load_pack("folder_name", &files[1..], &BTreeSet::new()).unwrap_err();
    assert_eq!(missing.0[0].file, "pack.yaml");
}

#[test]
fn core_pack_is_stackstorm_compatible() {
    let core = core_pack();
    let local = core.actions.iter().find(|a| a.name == "local").unwrap();
    assert_eq!(local.runner_type, "local-shell-cmd");
    assert!(local.effective_schema().get("cmd").unwrap().required);
    let http = core.actions.iter().find(|a| a.name == "http").unwrap();
    let schema = http.effective_schema();
    assert!(schema.get("url").unwrap().required);
    assert!(schema.get("password").unwrap().secret);
    let noop = core.actions.iter().find(|a| a.name == "noop").unwrap();
    assert!(noop.effective_schema().0.is_empty());
    assert!(core.actions.iter().all(|a| a.file.is_none()));
}

#[test]
fn duplicate_rules_and_empty_files_are_reported() {
    let rule = "name: r\ntrigger: {type: core.st2.webhook, parameters: {url: x}}\naction: {ref: core.noop}\n";
    let files = vec![
        SourceFile {
            path: "pack.yaml".into(),
            text: "name: p\nversion: '1'\n".into(),
        },
        SourceFile {
            path: "rules/a.yaml".into(),
            text: rule.into(),
        },
        SourceFile {
            path: "rules/b.yaml".into(),
            text: format!("# same name\n{rule}"),
        },
        SourceFile {
            path: "actions/empty.yaml".into(),
            text: String::new(),
        },
    ];
    let diags = load_pack("p", &files, &BTreeSet::new()).unwrap_err();
    let text = diags.to_string();
    assert_eq!(diags.0.len(), 2, "{text}");
    assert!(
        text.contains("actions/empty.yaml:1:1: (document): expected a mapping, found null"),
        "{text}"
    );
    assert!(
        text.contains(
            "rules/b.yaml:2:7: name: duplicate rule name 'p.r': first defined at rules/a.yaml:1"
        ),
        "{text}"
    );
}
