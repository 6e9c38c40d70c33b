//! CI and packaging as actions through the real binary: `core.ci_package`
//! (checkout, .deb, publish) and `core.deb_build` + `core.apt_publish`, then
//! real `apt-get` with `signed-by` against the server's `/apt/`; concurrent
//! publishes; the CI concurrency limit; build log retention; secret masking.

use std::path::Path;

use serde_json::{Value, json};

use crate::apt::{AptClient, convention_repo, export_key, git};
use crate::harness::*;

/// Starts an execution over the API; returns its id.
fn start(s: &Server, action: &str, parameters: Value) -> String {
    let (st, e) = s.post(
        "/api/v1/executions",
        json!({"action": action, "parameters": parameters}),
    );
    assert_eq!(st, 201, "{e}");
    e["id"].as_str().expect("id").to_string()
}

/// Runs an action to its end over the API.
fn run(s: &Server, action: &str, parameters: Value) -> Value {
    let id = start(s, action, parameters);
    s.wait_execution(&id)
}

/// An application repository following the conventions, with fpm.json.
fn app_repo(dir: &Path, name: &str, version: &str) -> String {
    write(
        &dir.join("fpm.json"),
        &format!(r#"{{"name": "{name}", "version": "{version}", "description": "Test app"}}"#),
    );
    write(&dir.join("app/server.sh"), "#!/bin/sh\necho serving\n");
    convention_repo(dir, ["exit 0", "exit 0", "echo installed"])
}

fn ci_package_then_apt_get(backend: Backend) {
    let s = Server::start(backend, &[]);
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("seatshare");
    let commit = app_repo(&src, "seatshare", "1.2.0");
    let exec = run(
        &s,
        "core.ci_package",
        json!({"repo": format!("file://{}", src.display()), "branch": "main", "commit": commit, "build_number": "7"}),
    );
    assert_eq!(exec["status"], "succeeded", "{exec}");
    let r = &exec["result"];
    let version = r["version"].as_str().expect("version").to_string();
    assert_eq!(version, format!("1.2.0-7.{}", &commit[..7]), "{r}");
    assert_eq!(r["name"], "seatshare");
    assert_eq!(r["commit"], commit.as_str());
    assert_eq!(
        r["published"]["added"][0]["version"],
        version.as_str(),
        "{r}"
    );
    assert_eq!(r["package"]["sha256"].as_str().map(str::len), Some(64));
    // The workspace is gone.
    let work = s
        .data_dir()
        .join("work")
        .join(exec["id"].as_str().expect("id"));
    assert!(!work.exists(), "{} is left behind", work.display());

    // Reproducible: the same commit builds the same bytes (the pool keeps
    // the first; a second publish of identical content is a no-op).
    let again = run(
        &s,
        "core.ci_package",
        json!({"repo": src.display().to_string(), "commit": commit, "build_number": "7"}),
    );
    assert_eq!(again["status"], "succeeded", "{again}");
    assert_eq!(
        again["result"]["package"]["sha256"], r["package"]["sha256"],
        "same commit, same .deb"
    );
    assert_eq!(
        again["result"]["published"]["unchanged"][0]["version"],
        version.as_str()
    );

    let key = tmp.path().join("aviary.gpg");
    export_key(&s, &key);
    let apt = AptClient::new(&s, &tmp.path().join("apt"), &key);
    let (ok, text) = apt.run(&["update"]);
    assert!(
        ok && !text.contains("W:") && !text.contains("E:"),
        "apt-get update:\n{text}"
    );
    let (ok, text) = apt.run(&["download", &format!("seatshare={version}")]);
    assert!(ok, "apt-get download:\n{text}");
    assert!(
        apt.downloads()
            .join(format!("seatshare_{version}_all.deb"))
            .exists(),
        "{text}"
    );
}

#[test]
fn ci_package_builds_publishes_and_apt_gets_it() {
    ci_package_then_apt_get(Backend::Sqlite);
}

#[test]
fn ci_package_builds_publishes_and_apt_gets_it_postgres() {
    ci_package_then_apt_get(Backend::Postgres);
}

#[test]
fn ci_package_failures_say_where_and_clean_up() {
    let s = Server::start(Backend::Sqlite, &[]);
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("bad");
    // A name dpkg refuses.
    app_repo(&src, "Bad_Name", "1.0");
    let exec = run(
        &s,
        "core.ci_package",
        json!({"repo": src.display().to_string(), "branch": "main"}),
    );
    assert_eq!(exec["status"], "failed", "{exec}");
    assert_eq!(exec["result"]["stage"], "package", "{exec}");
    assert!(
        exec["result"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("Bad_Name")),
        "{exec}"
    );
    let work = s
        .data_dir()
        .join("work")
        .join(exec["id"].as_str().expect("id"));
    assert!(!work.exists());
    // A branch that is not there.
    let exec = run(
        &s,
        "core.ci_package",
        json!({"repo": src.display().to_string(), "branch": "nope"}),
    );
    assert_eq!(exec["status"], "failed", "{exec}");
    assert_eq!(exec["result"]["stage"], "checkout", "{exec}");
    // Nothing was published.
    let list = s.cli(&["apt", "list"]);
    assert!(!String::from_utf8_lossy(&list.stdout).contains("Bad_Name"));
}

#[test]
fn deb_build_and_concurrent_apt_publish_actions() {
    let s = Server::start(Backend::Sqlite, &[]);
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("out");
    let mut debs = Vec::new();
    for i in 0..4 {
        let src = tmp.path().join(format!("app{i}"));
        write(
            &src.join("fpm.json"),
            &format!(r#"{{"name": "conc{i}", "version": "1.0.{i}"}}"#),
        );
        write(&src.join("bin/run"), "#!/bin/sh\n");
        for script in ["script/cisetup", "script/cibuild", "script/post-inst"] {
            write(&src.join(script), "#!/bin/sh\nexit 0\n");
            chmod_x(&src.join(script));
        }
        let b = run(
            &s,
            "core.deb_build",
            json!({"path": src.display().to_string(), "out_dir": out.display().to_string(),
                   "build_number": "1", "commit": "abcdef0123", "compression": "xz", "source_date_epoch": 1700000000}),
        );
        assert_eq!(b["status"], "succeeded", "{b}");
        assert_eq!(b["result"]["version"], format!("1.0.{i}-1.abcdef0"));
        let path = b["result"]["path"].as_str().expect("path").to_string();
        assert!(Path::new(&path).exists());
        debs.push(path);
    }
    // Relative paths are refused with the parameter named.
    let bad = run(
        &s,
        "core.deb_build",
        json!({"path": "app0", "out_dir": out.display().to_string()}),
    );
    assert_eq!(bad["status"], "failed");
    assert!(
        bad["result"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("'path'") && e.contains("absolute")),
        "{bad}"
    );

    // Four publishes at once: none is lost.
    let ids: Vec<String> = debs
        .iter()
        .map(|d| start(&s, "core.apt_publish", json!({"debs": [d]})))
        .collect();
    for id in &ids {
        let e = s.wait_execution(id);
        assert_eq!(e["status"], "succeeded", "{e}");
        assert_eq!(
            e["result"]["added"].as_array().map(Vec::len),
            Some(1),
            "{e}"
        );
    }
    let packages = s
        .http()
        .get(s.url("/apt/dists/stable/main/binary-amd64/Packages"))
        .send()
        .expect("get")
        .text()
        .expect("text");
    for i in 0..4 {
        assert!(
            packages.contains(&format!("Package: conc{i}\n")),
            "conc{i} lost:\n{packages}"
        );
    }

    // Retention: keep_versions=2 drops the oldest of three versions.
    let src = tmp.path().join("app0");
    let mut versions = Vec::new();
    for build in ["2", "3"] {
        let b = run(
            &s,
            "core.deb_build",
            json!({"path": src.display().to_string(), "out_dir": out.display().to_string(), "build_number": build}),
        );
        assert_eq!(b["status"], "succeeded", "{b}");
        versions.push(b["result"]["path"].as_str().expect("path").to_string());
    }
    let p = run(
        &s,
        "core.apt_publish",
        json!({"debs": versions, "keep_versions": 2}),
    );
    assert_eq!(p["status"], "succeeded", "{p}");
    let removed: Vec<&str> = p["result"]["removed"]
        .as_array()
        .expect("removed")
        .iter()
        .filter_map(|e| e["version"].as_str())
        .collect();
    assert_eq!(removed, vec!["1.0.0-1.abcdef0"], "{p}");
}

/// A build whose cibuild runs until the branch `hold` has a marker file.
fn slow_repo(dir: &Path, marker: &Path) {
    convention_repo(
        dir,
        [
            "exit 0",
            &format!(
                "echo started $AVIARY_CI_BRANCH\nif [ \"$AVIARY_CI_BRANCH\" = hold ]; then while [ ! -e '{}' ]; do sleep 0.1; done; fi\nexit 0",
                marker.display()
            ),
            "exit 0",
        ],
    );
    git(dir, &["branch", "hold"]);
    git(dir, &["branch", "other"]);
}

#[test]
fn ci_builds_beyond_the_limit_wait_in_the_queue() {
    let tmp = tempfile::tempdir().expect("tmp");
    let config = tmp.path().join("aviary.yaml");
    std::fs::write(&config, "ci:\n  max_concurrent: 1\n").expect("config");
    let s = Server::start_with(
        Backend::Sqlite,
        &[],
        &["--config", config.to_str().expect("path")],
    );
    let src = tmp.path().join("app");
    let marker = tmp.path().join("release");
    slow_repo(&src, &marker);
    let repo = src.display().to_string();
    let first = start(&s, "core.ci_build", json!({"repo": repo, "branch": "hold"}));
    s.wait_for("the first build running", || {
        let (_, e) = s.get(&format!("/api/v1/executions/{first}"));
        (e["status"] == "running").then_some(())
    });
    let second = start(
        &s,
        "core.ci_build",
        json!({"repo": repo, "branch": "other"}),
    );
    // While the first holds the only slot, the second waits (not running, not failed).
    for _ in 0..20 {
        let (_, e) = s.get(&format!("/api/v1/executions/{second}"));
        assert!(
            matches!(e["status"].as_str(), Some("requested" | "scheduled")),
            "the second build must wait: {e}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Other actions are not held up by the CI limit.
    let echo = run(&s, "core.echo", json!({"message": "not blocked"}));
    assert_eq!(echo["status"], "succeeded");
    std::fs::write(&marker, "").expect("release");
    let a = s.wait_execution(&first);
    let b = s.wait_execution(&second);
    assert_eq!(a["status"], "succeeded", "{a}");
    assert_eq!(b["status"], "succeeded", "{b}");
    assert!(
        b["started_at"].as_str() >= a["finished_at"].as_str(),
        "the second started after the first ended: {a} {b}"
    );
}

fn output_len(s: &Server, id: &str) -> usize {
    let (st, v) = s.get(&format!("/api/v1/executions/{id}/output"));
    assert_eq!(st, 200, "{v}");
    v.as_array().map_or(0, Vec::len)
}

fn build_logs_are_purged(backend: Backend) {
    let tmp = tempfile::tempdir().expect("tmp");
    let config = tmp.path().join("aviary.yaml");
    std::fs::write(&config, "ci:\n  keep_builds: 1\n  purge_interval_secs: 1\n").expect("config");
    let s = Server::start_with(backend, &[], &["--config", config.to_str().expect("path")]);
    let src = tmp.path().join("app");
    convention_repo(&src, ["echo setup", "echo build log line", "exit 0"]);
    git(&src, &["branch", "other"]);
    let repo = src.display().to_string();
    let mut ids = Vec::new();
    for branch in ["main", "main", "other"] {
        let e = run(
            &s,
            "core.ci_build",
            json!({"repo": repo, "branch": branch, "cancel_previous": false}),
        );
        assert_eq!(e["status"], "succeeded", "{e}");
        ids.push(e["id"].as_str().expect("id").to_string());
    }
    s.wait_for("the older build's log purged", || {
        (output_len(&s, &ids[0]) == 0).then_some(())
    });
    assert!(
        output_len(&s, &ids[1]) > 0,
        "the newest of main keeps its log"
    );
    assert!(output_len(&s, &ids[2]) > 0, "another branch keeps its log");
    let (_, old) = s.get(&format!("/api/v1/executions/{}", ids[0]));
    assert_eq!(old["status"], "succeeded", "the execution itself stays");
}

#[test]
fn build_logs_past_retention_are_purged() {
    build_logs_are_purged(Backend::Sqlite);
}

#[test]
fn build_logs_past_retention_are_purged_postgres() {
    build_logs_are_purged(Backend::Postgres);
}

#[test]
fn secret_build_variables_are_masked_however_short() {
    let s = Server::start(Backend::Sqlite, &[]);
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("app");
    convention_repo(
        &src,
        [
            "exit 0",
            "echo \"token=$DEPLOY_TOKEN pin=$PIN\"; echo \"err $PIN\" >&2",
            "exit 0",
        ],
    );
    let e = run(
        &s,
        "core.ci_build",
        json!({"repo": src.display().to_string(), "branch": "main",
               "secret_env": {"DEPLOY_TOKEN": "s3cr3t-t0ken", "PIN": "Q"}}),
    );
    assert_eq!(e["status"], "succeeded", "{e}");
    let id = e["id"].as_str().expect("id");
    let (_, out) = s.get(&format!("/api/v1/executions/{id}/output"));
    let text: String = out
        .as_array()
        .expect("output")
        .iter()
        .filter_map(|c| c["data"].as_str())
        .collect();
    assert!(text.contains("token=********"), "{text}");
    assert!(!text.contains("s3cr3t-t0ken"), "{text}");
    assert!(!text.contains("pin=Q") && !text.contains("err Q"), "{text}");
    assert!(!e.to_string().contains("s3cr3t-t0ken"), "{e}");
    assert_eq!(e["parameters"]["secret_env"], "********", "{e}");
}
