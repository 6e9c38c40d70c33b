//! Packs: offline validation reports every problem at once; a bad reload
//! never takes the running set down.

use crate::harness::*;

fn broken_pack(root: &std::path::Path) -> std::path::PathBuf {
    let pack = root.join("broken");
    write(
        &pack.join("pack.yaml"),
        "ref: broken\nname: broken\ndescription: broken on purpose\nversion: 0.0.1\n",
    );
    write(
        &pack.join("actions/a.yaml"),
        "name: a\npack: broken\nrunner_type: local-shell-kmd\nparameters:\n  x:\n    type: strin\n",
    );
    write(
        &pack.join("rules/r.yaml"),
        "name: r\npack: broken\ntrigger:\n  type: core.st2.webhook\n  parameters:\n    url: x\ncriteria:\n  trigger.body.a:\n    type: equalz\n    pattern: 1\naction:\n  ref: core.echo\n  parameters:\n    message: \"{{ trigger.body.a \"\n",
    );
    pack
}

#[test]
fn validate_reports_every_error_with_locations() {
    let dir = tempfile::tempdir().expect("tmp");
    let pack = broken_pack(dir.path());
    let out = std::process::Command::new(bin())
        .args(["pack", "validate"])
        .arg(&pack)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("actions/a.yaml:3:"),
        "runner_type located: {err}"
    );
    assert!(err.contains("local-shell-kmd"), "{err}");
    assert!(err.contains("strin"), "{err}");
    assert!(
        err.contains("rules/r.yaml:") && err.contains("equalz"),
        "{err}"
    );
    assert!(err.contains("message"), "template error named: {err}");

    let good = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../packs/examples"));
    let ok = std::process::Command::new(bin())
        .args(["pack", "validate"])
        .arg(good)
        .output()
        .expect("run");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

#[test]
fn bad_reload_keeps_the_running_set() {
    let dir = tempfile::tempdir().expect("tmp");
    let root = dir.path().join("packs");
    let pack = root.join("good");
    write(
        &pack.join("pack.yaml"),
        "ref: good\nname: good\ndescription: good\nversion: 0.0.1\n",
    );
    write(
        &pack.join("actions/hi.yaml"),
        "name: hi\npack: good\nrunner_type: local-shell-cmd\nparameters:\n  cmd:\n    default: echo hi\n    immutable: true\n    type: string\n",
    );
    let s = Server::start(Backend::Sqlite, &[&root]);
    let (st, _) = s.get("/api/v1/actions/good.hi");
    assert_eq!(st, 200);
    broken_pack(&root);
    let out = s.cli(&["pack", "reload"]);
    assert_eq!(out.status.code(), Some(1));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("equalz"), "{text}");
    let (st, _) = s.get("/api/v1/actions/good.hi");
    assert_eq!(st, 200, "running set must be unchanged");
    // Fix it and reload: the new pack appears.
    std::fs::remove_dir_all(root.join("broken")).expect("rm");
    write(
        &root.join("more/pack.yaml"),
        "ref: more\nname: more\ndescription: more\nversion: 0.0.1\n",
    );
    let out = s.cli(&["pack", "reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = s.cli(&["pack", "list"]);
    assert!(String::from_utf8_lossy(&list.stdout).contains("more"));
}

#[test]
fn the_cicd_pack_rehearsals_pass() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packs/cicd/tests");
    let mut specs: Vec<String> = std::fs::read_dir(&root)
        .expect("packs/cicd/tests")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| p.display().to_string())
        .collect();
    specs.sort();
    assert!(specs.len() >= 8, "{specs:?}");
    let mut args = vec!["workflow".to_string(), "rehearse".to_string()];
    args.extend(specs);
    let out = std::process::Command::new(bin())
        .args(&args)
        .output()
        .expect("run aviary");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains(" 0 failed"), "{text}");
}

#[test]
fn workflow_rehearse_runs_specs_and_shows_differences() {
    let root = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../workflow/tests"));
    let specs: Vec<_> = std::fs::read_dir(root.join("rehearsals"))
        .expect("specs")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    assert!(specs.len() >= 10);
    let ok = std::process::Command::new(bin())
        .args(["workflow", "rehearse"])
        .args(&specs)
        .output()
        .expect("run");
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{out}");
    assert!(
        out.contains(&format!("{} passed, 0 failed", specs.len())),
        "{out}"
    );

    // A wrong expectation: exit 1 and the difference is shown.
    let dir = tempfile::tempdir().expect("tmp");
    let wf = dir.path().join("wf.yaml");
    write(
        &wf,
        "version: 1.0\ntasks:\n  a:\n    action: core.noop\n    next:\n      - when: <% succeeded() %>\n        do: b\n  b:\n    action: core.noop\n",
    );
    let spec = dir.path().join("spec.yaml");
    write(
        &spec,
        "workflow: wf.yaml\nexpected_task_sequence:\n  - a\n  - c\nexpected_workflow_status: succeeded\n",
    );
    let bad = std::process::Command::new(bin())
        .args(["workflow", "rehearse"])
        .arg(&spec)
        .output()
        .expect("run");
    assert_eq!(bad.status.code(), Some(1));
    let out = String::from_utf8_lossy(&bad.stdout);
    assert!(
        out.contains("FAIL") && out.contains('c') && out.contains('b'),
        "{out}"
    );
}

#[test]
fn workflow_expressions_in_shell_text_go_through_the_environment() {
    let dir = tempfile::tempdir().expect("tmp");
    let pack = dir.path().join("wfsh");
    write(
        &pack.join("pack.yaml"),
        "ref: wfsh\nname: wfsh\ndescription: shell safety\nversion: 0.0.1\n",
    );
    write(
        &pack.join("actions/deploy.yaml"),
        "name: deploy\npack: wfsh\nrunner_type: orquesta\nentry_point: workflows/deploy.yaml\nparameters:\n  branch:\n    type: string\n    required: true\n",
    );
    write(
        &pack.join("actions/workflows/deploy.yaml"),
        "version: 1.0\ninput:\n  - branch\ntasks:\n  build:\n    action: core.local\n    input:\n      cmd: printf '%s|%s' <% ctx(branch) %> <% ctx(branch) %>\n    next:\n      - publish:\n          - out: <% result().stdout %>\noutput:\n  - out: <% ctx(out) %>\n",
    );
    let out = std::process::Command::new(bin())
        .args(["pack", "validate"])
        .arg(&pack)
        .output()
        .expect("run");
    assert!(out.status.success(), "{out:?}");
    let s = Server::start(Backend::Sqlite, &[&pack]);
    let pwned = dir.path().join("pwned");
    let hostile = format!(
        "main; touch {p} $(touch {p}) `touch {p}` \"' && touch {p}",
        p = pwned.display()
    );
    let (st, e) = s.post(
        "/api/v1/executions",
        serde_json::json!({"action": "wfsh.deploy", "parameters": {"branch": hostile}}),
    );
    assert_eq!(st, 201, "{e}");
    let wf = s.wait_execution(e["id"].as_str().expect("id"));
    assert_eq!(wf["status"], "succeeded", "{wf}\n{}", s.log());
    assert_eq!(
        wf["result"]["output"]["out"],
        serde_json::json!(format!("{hostile}|{hostile}")),
        "{wf}"
    );
    assert!(!pwned.exists(), "the value ran as shell text");
    // The stored cmd holds the placeholders, not the values.
    let kids = s.executions(&format!("parent={}", wf["id"].as_str().expect("id")));
    assert_eq!(
        kids[0]["parameters"]["cmd"], "printf '%s|%s' \"${AVIARY_ARG_0}\" \"${AVIARY_ARG_1}\"",
        "{kids:?}"
    );
}
