//! Runs every rehearsal spec under tests/rehearsals against the conductor
//! and prints the pass count. Specs ported from Orquesta that do not pass
//! yet are in tests/rehearsals_known_failing (not run here).

use aviary_workflow::rehearsal::rehearse;
use std::path::Path;

#[test]
fn all_rehearsals_pass() {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut names: Vec<_> = std::fs::read_dir(base.join("rehearsals"))
        .expect("rehearsals dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    names.sort();
    let mut failed = Vec::new();
    for path in &names {
        let text = std::fs::read_to_string(path).expect("read spec");
        let report = rehearse(&text, |wf| {
            std::fs::read_to_string(base.join(wf)).map_err(|e| e.to_string())
        });
        println!("{} ({})", report, path.display());
        if !report.passed() {
            failed.push(path.display().to_string());
        }
    }
    println!(
        "rehearsals: {} of {} passed",
        names.len() - failed.len(),
        names.len()
    );
    assert!(names.len() >= 20, "expected at least 20 rehearsal specs");
    assert!(failed.is_empty(), "failed: {failed:?}");
}

#[test]
fn a_wrong_expectation_gives_a_readable_diff() {
    // Orquesta's own sequential_failure fixture: the expected order is wrong.
    let spec = r#"
workflow: workflows/sequential.yaml
inputs: {name: Stanley}
expected_task_sequence: [task1, task3, task2, continue]
mock_action_executions:
  - {task_id: task1, result: Stanley}
  - {task_id: task2, result: "All your base are belong to us!"}
  - {task_id: task3, result: "Stanley, All your base are belong to us!"}
expected_output:
  greeting: "Stanley, All your base are belong to us!"
"#;
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let report = rehearse(spec, |wf| {
        std::fs::read_to_string(base.join(wf)).map_err(|e| e.to_string())
    });
    assert!(!report.passed());
    let shown = report.to_string();
    assert!(shown.contains("task sequence differs"), "{shown}");
    assert!(shown.contains("!   1: task3__r0"), "{shown}");
    assert!(!shown.contains("output differs"), "{shown}");
}

#[test]
fn bad_specs_are_reported() {
    let load = |_: &str| Ok("version: 1.0\ntasks:\n  a:\n    action: core.noop\n".to_string());
    let r = rehearse(
        "workflow: x.yaml\nexpected_task_sequence: [a]\nbogus: 1\n",
        load,
    );
    assert!(r.to_string().contains("bogus"), "{r}");
    let r = rehearse(
        "workflow: x.yaml\nexpected_task_sequence: [a]\nmock_action_executions: [{task_id: b}]\n",
        load,
    );
    assert!(r.to_string().contains("unknown task 'b'"), "{r}");
    let r = rehearse(
        "workflow: x.yaml\nexpected_task_sequence: [a]\n",
        |_: &str| Err("no such file".to_string()),
    );
    assert!(r.to_string().contains("no such file"), "{r}");
}
