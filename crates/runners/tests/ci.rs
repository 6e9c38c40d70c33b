//! The `ci-build` runner against real git repositories: checkout at a commit
//! (also one that is not the branch head, fetched shallow), conventions,
//! cisetup/cibuild streaming and failure, bad refs, workspace cleanup.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

use aviary_core::model::ExecutionStatus;
use aviary_runners::Stream;
use common::*;
use serde_json::json;

const CI_PARAMS: &[&str] = &[
    "repo", "branch", "commit", "project", "depth", "env", "timeout",
];

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn script(dir: &Path, name: &str, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, body).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A bare repository with two commits on `main`: the first builds, the second fails.
fn repo(root: &Path) -> (String, String, String) {
    let src = root.join("src");
    std::fs::create_dir_all(&src).unwrap();
    git(&src, &["init", "-q", "-b", "main"]);
    script(
        &src,
        "script/cisetup",
        "#!/bin/sh\necho \"setup $AVIARY_CI_PROJECT\"\n",
    );
    script(
        &src,
        "script/cibuild",
        "#!/bin/sh\necho building; test ! -f broken || { echo 'tests failed' >&2; exit 3; }\necho build ok\n",
    );
    script(&src, "script/post-inst", "#!/bin/sh\nexit 0\n");
    git(&src, &["add", "."]);
    git(&src, &["commit", "-qm", "good"]);
    let good = git(&src, &["rev-parse", "HEAD"]);
    std::fs::write(src.join("broken"), "yes").unwrap();
    git(&src, &["add", "."]);
    git(&src, &["commit", "-qm", "bad"]);
    let bad = git(&src, &["rev-parse", "HEAD"]);
    let bare = root.join("app.git");
    git(
        root,
        &[
            "clone",
            "-q",
            "--bare",
            src.to_str().unwrap(),
            bare.to_str().unwrap(),
        ],
    );
    (format!("file://{}", bare.display()), good, bad)
}

#[tokio::test]
async fn builds_a_commit_that_is_not_the_branch_head() {
    let tmp = tempfile::tempdir().unwrap();
    let (url, good, _bad) = repo(tmp.path());
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let req = request(
        "ci-build",
        json!({"repo": url, "branch": "refs/heads/main", "commit": good}),
        CI_PARAMS,
        &work,
    );
    let (outcome, events) = run_collect(req).await;
    assert_eq!(
        outcome.status,
        ExecutionStatus::Succeeded,
        "{}",
        outcome.result
    );
    assert_eq!(outcome.result["commit"], good);
    assert_eq!(outcome.result["project"], "app");
    assert_eq!(outcome.result["stage"], "done");
    let out = joined(&events, Stream::Stdout);
    assert!(
        out.contains("setup app") && out.contains("build ok"),
        "{out}"
    );
    assert!(
        !work.join("workspace").exists(),
        "workspace must be removed"
    );
}

#[tokio::test]
async fn a_failing_cibuild_fails_the_build_at_that_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let (url, _good, bad) = repo(tmp.path());
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let req = request(
        "ci-build",
        json!({"repo": url, "branch": "main"}),
        CI_PARAMS,
        &work,
    );
    let (outcome, events) = run_collect(req).await;
    assert_eq!(
        outcome.status,
        ExecutionStatus::Failed,
        "{}",
        outcome.result
    );
    assert_eq!(outcome.result["stage"], "cibuild");
    assert_eq!(outcome.result["commit"], bad);
    assert!(
        outcome.result["error"]
            .as_str()
            .unwrap()
            .contains("exit code 3")
    );
    assert!(joined(&events, Stream::Stderr).contains("tests failed"));
    assert!(!work.join("workspace").exists());
}

#[tokio::test]
async fn missing_convention_scripts_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    git(&src, &["init", "-q", "-b", "main"]);
    script(&src, "script/cibuild", "#!/bin/sh\nexit 0\n");
    std::fs::write(src.join("script/cisetup"), "#!/bin/sh\n").unwrap(); // not executable
    git(&src, &["add", "."]);
    git(&src, &["commit", "-qm", "c"]);
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let req = request(
        "ci-build",
        json!({"repo": src.display().to_string(), "branch": "main"}),
        CI_PARAMS,
        &work,
    );
    let (outcome, _) = run_collect(req).await;
    assert_eq!(outcome.status, ExecutionStatus::Failed);
    assert_eq!(outcome.result["stage"], "conventions");
    let err = outcome.result["error"].as_str().unwrap();
    assert!(
        err.contains("script/post-inst (missing)")
            && err.contains("script/cisetup (not executable"),
        "{err}"
    );
}

#[tokio::test]
async fn refs_that_could_be_options_or_shell_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for (branch, repo) in [
        ("main;touch${IFS}x", "/tmp/r"),
        ("--upload-pack=touch", "/tmp/r"),
        ("main", "--upload-pack=x"),
    ] {
        let req = request(
            "ci-build",
            json!({"repo": repo, "branch": branch}),
            CI_PARAMS,
            tmp.path(),
        );
        let (outcome, _) = run_collect(req).await;
        assert_eq!(outcome.status, ExecutionStatus::Failed, "{branch} {repo}");
        assert!(
            outcome.result["error"]
                .as_str()
                .unwrap()
                .contains("parameter"),
            "{}",
            outcome.result
        );
    }
}
