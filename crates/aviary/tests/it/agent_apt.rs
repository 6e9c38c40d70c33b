//! The real thing: three test hosts (own network namespace, overlay root and
//! dpkg database) run the real `aviary agent`, which installs with the real
//! `apt-get` from the server's signed `/apt/` repository (packages built
//! with `aviary package`, published with `aviary apt add`). Canary ->
//! promote -> canary -> server restart (agents reconnect) -> rollback
//! (a downgrade). Prints the time of each deploy. Skipped (with a line
//! saying so) when not root.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use aviary_testhosts::{HostProcess, TestHost, TestNet};
use serde_json::{Value, json};

use crate::harness::*;

/// Builds `web` at `version` with `aviary package`; returns the .deb path and its version.
fn build_web(s: &Server, dir: &Path, version: &str) -> (String, String) {
    let src = dir.join(format!("src-{version}"));
    write(
        &src.join("fpm.json"),
        &format!(
            r#"{{"name": "aviary-it-web", "version": "{version}", "description": "Test web app"}}"#
        ),
    );
    write(&src.join("app/index.html"), &format!("web {version}\n"));
    for (script, body) in [
        ("script/cisetup", "exit 0"),
        ("script/cibuild", "exit 0"),
        ("script/post-inst", "exit 0"),
    ] {
        write(&src.join(script), &format!("#!/bin/sh\n{body}\n"));
        chmod_x(&src.join(script));
    }
    let out_dir = dir.join("out");
    std::fs::create_dir_all(&out_dir).expect("mkdir");
    let built = s.cli(&[
        "--json",
        "package",
        src.to_str().expect("path"),
        "--out",
        out_dir.to_str().expect("path"),
        "--build-number",
        "1",
    ]);
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let b: Value = serde_json::from_slice(&built.stdout).expect("json");
    let path = b["path"].as_str().expect("path").to_string();
    let added = s.cli(&["apt", "add", &path]);
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    (path, b["version"].as_str().expect("version").to_string())
}

fn installed(h: &TestHost) -> Option<String> {
    let out = h
        .run(
            h.command("dpkg-query")
                .args(["-W", "-f", "${Status}\t${Version}", "aviary-it-web"]),
        )
        .ok()?;
    let (status, v) = out.split_once('\t')?;
    status.ends_with(" installed").then(|| v.to_string())
}

fn agent(s: &Server, net: &TestNet, host: &TestHost, tag: &str, logs: &Path) -> HostProcess {
    let (st, v) = s.post(
        &format!("/api/v1/hosts/{}/token", host.name()),
        json!({"address": host.ip().to_string(), "tags": [tag]}),
    );
    assert_eq!(st, 201, "{v}");
    let token = v["token"].as_str().expect("token");
    let log = std::fs::File::create(logs.join(format!("{}.log", host.name()))).expect("log");
    host.spawn(
        host.command(
            host.install_program(std::path::Path::new(bin()))
                .expect("copy aviary into the host"),
        )
        .args([
            "agent",
            "--server",
            &format!("http://{}:{}", net.gateway(), s.port),
            "--token",
            token,
            "--tag",
            tag,
            "--heartbeat",
            "2",
            "--health-cmd",
            "test",
            "-e",
            "/opt/aviary-it-web/app/index.html",
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log),
    )
    .expect("spawn agent")
}

fn run_deploy(s: &Server, args: &[&str], logs: &Path) -> Duration {
    let t = Instant::now();
    let out = s.cli(args);
    let took = t.elapsed();
    let dump = || {
        let mut text = String::new();
        for e in std::fs::read_dir(logs).expect("logs").flatten() {
            text.push_str(&format!(
                "--- {}\n{}\n",
                e.path().display(),
                std::fs::read_to_string(e.path()).unwrap_or_default()
            ));
        }
        text
    };
    assert!(
        out.status.success(),
        "{args:?}\n{}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        dump()
    );
    took
}

#[test]
fn agents_converge_with_real_apt_canary_promote_rollback() {
    let Some(net) = TestNet::for_test("deploy-apt") else {
        return;
    };
    let mut s = Server::start_on(Backend::Sqlite, &[], &[], "0.0.0.0");
    let tmp = tempfile::tempdir().expect("tmp");
    let logs = tmp.path().join("logs");
    std::fs::create_dir_all(&logs).expect("logs");
    let (_, v1) = build_web(&s, tmp.path(), "1.0.0");
    let (_, v2) = build_web(&s, tmp.path(), "2.0.0");

    let c1 = net.host("c1").expect("host");
    let p1 = net.host("p1").expect("host");
    let p2 = net.host("p2").expect("host");
    let _agents = [
        agent(&s, &net, &c1, "aviary-it-web::app_canary", &logs),
        agent(&s, &net, &p1, "aviary-it-web::app", &logs),
        agent(&s, &net, &p2, "aviary-it-web::app", &logs),
    ];
    s.wait_for("agents registered", || {
        let (_, hosts) = s.get("/api/v1/hosts");
        let seen = hosts
            .as_array()?
            .iter()
            .filter(|h| !h["last_seen"].is_null())
            .count();
        (seen == 3).then_some(())
    });

    let app = "aviary-it-web";
    let canary = run_deploy(
        &s,
        &["deploy", "canary", app, &v1, "--timeout", "120"],
        &logs,
    );
    assert_eq!(installed(&c1).as_deref(), Some(v1.as_str()));
    assert_eq!(
        installed(&p1),
        None,
        "production does not get the canary version"
    );

    let promote = run_deploy(
        &s,
        &["promote", app, "--batch-size", "1", "--timeout", "120"],
        &logs,
    );
    assert_eq!(installed(&p1).as_deref(), Some(v1.as_str()));
    assert_eq!(installed(&p2).as_deref(), Some(v1.as_str()));

    // The server restarts; the agents reconnect and converge on what it advertises next.
    s.kill9();
    s.spawn();
    let canary2 = run_deploy(
        &s,
        &["deploy", "canary", app, &v2, "--timeout", "120"],
        &logs,
    );
    assert_eq!(installed(&c1).as_deref(), Some(v2.as_str()));
    assert_eq!(installed(&p1).as_deref(), Some(v1.as_str()));

    let rollback = run_deploy(&s, &["rollback", app, "--timeout", "120"], &logs);
    assert_eq!(installed(&c1).as_deref(), Some(v1.as_str()), "downgraded");
    let (_, host) = s.get("/api/v1/hosts/c1");
    assert_eq!(host["apps"][app]["health"], "healthy", "{host}");
    assert!(
        host["apps"][app]["output"]
            .as_str()
            .unwrap_or("")
            .contains("apt-get install"),
        "{host}"
    );
    eprintln!(
        "real apt deploys (3 test hosts): canary {canary:?}, promote (2 batches) {promote:?}, canary after restart {canary2:?}, rollback {rollback:?}"
    );
}
