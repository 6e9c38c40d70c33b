//! `aviary git-hook`: a real bare repository with the installed post-receive
//! hook; a real `git push` reaches the server as a signed GitHub-style push.

use std::path::Path;

use crate::harness::{Backend, Server, git, write};

fn examples() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../packs/examples"))
}

#[test]
fn a_push_to_a_bare_repository_runs_the_rule() {
    let s = Server::start(Backend::Sqlite, &[examples()]);
    let out = s.cli(&[
        "key",
        "set",
        "github_webhook_secret",
        "hook-s3cret",
        "--encrypt",
    ]);
    assert!(out.status.success());
    let tmp = tempfile::tempdir().expect("tempdir");
    let bare = tmp.path().join("webapp.git");
    let work = tmp.path().join("work");
    git(
        tmp.path(),
        &[
            "init",
            "-q",
            "--bare",
            "-b",
            "main",
            bare.to_str().expect("utf8"),
        ],
    );
    let secret = tmp.path().join("secret");
    write(&secret, "hook-s3cret\n");

    // Refuses a hook it did not write.
    write(&bare.join("hooks/post-receive"), "#!/bin/sh\necho mine\n");
    let refused = s.cli(&[
        "git-hook",
        "install",
        bare.to_str().expect("utf8"),
        "--server",
        &s.url(""),
        "--secret-file",
        secret.to_str().expect("utf8"),
    ]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--force"));

    let installed = s.cli(&[
        "git-hook",
        "install",
        bare.to_str().expect("utf8"),
        "--server",
        &s.url(""),
        "--secret-file",
        secret.to_str().expect("utf8"),
        "--force",
    ]);
    assert!(
        installed.status.success(),
        "{}",
        String::from_utf8_lossy(&installed.stderr)
    );

    git(
        tmp.path(),
        &["clone", "-q", bare.to_str().expect("utf8"), "work"],
    );
    write(&work.join("README"), "hello\n");
    git(&work, &["add", "README"]);
    git(&work, &["commit", "-q", "-m", "first"]);
    let commit = git(&work, &["rev-parse", "HEAD"]).trim().to_string();
    let pushed = git(&work, &["push", "-q", "origin", "HEAD:main"]);
    assert!(pushed.contains("refs/heads/main"), "hook output: {pushed}");

    let exec = s.wait_for("the rule's execution", || {
        s.executions("action=examples.on_push").into_iter().next()
    });
    let exec = s.wait_execution(exec["id"].as_str().expect("id"));
    assert_eq!(exec["status"], "succeeded", "{exec}");
    assert_eq!(
        exec["result"]["stdout"].as_str().unwrap_or_default().trim(),
        format!(
            "push to webapp refs/heads/main at {commit} by {}",
            std::env::var("USER").unwrap_or_else(|_| "git".into())
        )
    );

    // A branch deletion is delivered too, and the example rule ignores it.
    git(&work, &["push", "-q", "origin", "HEAD:refs/heads/tmp"]);
    git(&work, &["push", "-q", "origin", "--delete", "tmp"]);
    let (_, tis) = s.get("/api/v1/trigger-instances");
    let bodies: Vec<_> = tis
        .as_array()
        .expect("list")
        .iter()
        .map(|t| t["payload"]["body"].clone())
        .collect();
    assert!(
        bodies
            .iter()
            .any(|b| b["deleted"] == true && b["ref"] == "refs/heads/tmp"),
        "{bodies:?}"
    );
    assert_eq!(s.executions("action=examples.on_push").len(), 2);
}
