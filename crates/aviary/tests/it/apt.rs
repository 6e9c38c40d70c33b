//! The APT repository through the binary: `aviary apt add/list/export-key`,
//! served by the server at `/apt/` without a token, verified by real gpgv and
//! consumed by real `apt-get update` + `apt-get download` with `signed-by`.

use std::path::Path;
use std::process::Command;

use crate::harness::*;

pub(crate) fn tiny_deb(dir: &Path, name: &str, version: &str) -> std::path::PathBuf {
    let root = dir.join(format!("{name}-{version}"));
    write(&root.join(format!("opt/{name}/hello.txt")), "hello\n");
    write(
        &root.join("DEBIAN/control"),
        &format!(
            "Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: T <t@example.com>\nDescription: test package\n"
        ),
    );
    let deb = dir.join(format!("{name}_{version}_all.deb"));
    let out = Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zgzip", "-b"])
        .arg(&root)
        .arg(&deb)
        .output()
        .expect("dpkg-deb");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    deb
}

/// Real apt-get against a server's `/apt/`, isolated from the machine's own
/// configuration (own sources, lists, status and cache under `dir`).
pub(crate) struct AptClient {
    dir: std::path::PathBuf,
}

impl AptClient {
    pub(crate) fn new(s: &Server, dir: &Path, key: &Path) -> AptClient {
        for sub in ["lists/partial", "cache/archives/partial", "dl"] {
            std::fs::create_dir_all(dir.join(sub)).expect("mkdir");
        }
        std::fs::write(dir.join("status"), "").expect("status");
        std::fs::write(
            dir.join("sources.list"),
            format!(
                "deb [signed-by={}] {}/apt/ stable main\n",
                key.display(),
                s.url("")
            ),
        )
        .expect("sources");
        AptClient {
            dir: dir.to_path_buf(),
        }
    }

    /// Runs apt-get; (success, stdout + stderr).
    pub(crate) fn run(&self, args: &[&str]) -> (bool, String) {
        let d = &self.dir;
        let out = Command::new("apt-get")
            .arg("-q")
            .arg(format!(
                "-oDir::Etc::sourcelist={}",
                d.join("sources.list").display()
            ))
            .arg("-oDir::Etc::sourceparts=-")
            .arg(format!("-oDir::State::Lists={}", d.join("lists").display()))
            .arg(format!(
                "-oDir::State::status={}",
                d.join("status").display()
            ))
            .arg(format!("-oDir::Cache={}", d.join("cache").display()))
            .arg("-oAPT::Sandbox::User=root")
            .arg("-oAcquire::Languages=none")
            .args(args)
            .current_dir(d.join("dl"))
            .output()
            .expect("apt-get");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    /// Where `apt-get download` puts files.
    pub(crate) fn downloads(&self) -> std::path::PathBuf {
        self.dir.join("dl")
    }
}

/// Exports the server's public key with the CLI to `path`.
pub(crate) fn export_key(s: &Server, path: &Path) {
    let exported = s.cli(&["apt", "export-key", "-o", path.to_str().expect("path")]);
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
}

#[test]
fn publish_serve_and_install_with_signed_by() {
    let s = Server::start(Backend::Sqlite, &[]);
    let tmp = tempfile::tempdir().expect("tmp");
    let deb = tiny_deb(tmp.path(), "aviary-it-hello", "1.0.0-1");
    let added = s.cli(&["apt", "add", deb.to_str().expect("path")]);
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    assert!(String::from_utf8_lossy(&added.stdout).contains("added     aviary-it-hello 1.0.0-1"));
    let list = s.cli(&["apt", "list"]);
    assert!(String::from_utf8_lossy(&list.stdout).contains("aviary-it-hello"));

    // Served without a token; the private state is not.
    let http = s.http();
    let inrelease = http
        .get(s.url("/apt/dists/stable/InRelease"))
        .send()
        .expect("get");
    assert_eq!(inrelease.status().as_u16(), 200);
    let inrelease = inrelease.bytes().expect("body");
    for hidden in [
        "/apt/.aviary-state/signing-key.asc",
        "/apt/../admin.token",
        "/apt/%2e%2e/admin.token",
    ] {
        let r = http.get(s.url(hidden)).send().expect("get");
        assert_eq!(r.status().as_u16(), 404, "{hidden} must not be served");
    }

    let key = tmp.path().join("aviary.gpg");
    let exported = s.cli(&["apt", "export-key", "-o", key.to_str().expect("path")]);
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    if Command::new("gpgv").arg("--version").output().is_ok() {
        let signed = tmp.path().join("InRelease");
        std::fs::write(&signed, &inrelease).expect("write");
        let v = Command::new("gpgv")
            .arg("--keyring")
            .arg(&key)
            .arg(&signed)
            .output()
            .expect("gpgv");
        assert!(
            v.status.success(),
            "gpgv: {}",
            String::from_utf8_lossy(&v.stderr)
        );
    }

    // Real apt, isolated from the machine's own configuration.
    let d = tmp.path().join("apt");
    let apt = AptClient::new(&s, &d, &key);
    let apt = |args: &[&str]| apt.run(args);
    let (ok, text) = apt(&["update"]);
    assert!(
        ok && !text.contains("W:") && !text.contains("E:"),
        "apt-get update:\n{text}"
    );
    let (ok, text) = apt(&["download", "aviary-it-hello=1.0.0-1"]);
    assert!(ok, "apt-get download:\n{text}");
    assert!(
        d.join("dl/aviary-it-hello_1.0.0-1_all.deb").exists(),
        "{text}"
    );
}

pub(crate) fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Makes `src` a git repository (branch main, one commit) following the
/// conventions, with these bodies for script/cisetup, script/cibuild and
/// script/post-inst; returns the commit.
pub(crate) fn convention_repo(src: &Path, bodies: [&str; 3]) -> String {
    for (script, body) in ["script/cisetup", "script/cibuild", "script/post-inst"]
        .into_iter()
        .zip(bodies)
    {
        write(&src.join(script), &format!("#!/bin/sh\n{body}\n"));
        chmod_x(&src.join(script));
    }
    git(src, &["init", "-q", "-b", "main"]);
    git(src, &["add", "."]);
    git(src, &["commit", "-qm", "first"]);
    git(src, &["rev-parse", "HEAD"])
}

#[test]
fn ci_build_then_package_then_publish() {
    let s = Server::start(Backend::Sqlite, &[]);
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("seatshare");
    write(
        &src.join("fpm.json"),
        r#"{"name": "seatshare", "version": "1.2.0", "description": "Seat sharing service"}"#,
    );
    write(&src.join("app/server.sh"), "#!/bin/sh\necho serving\n");
    let commit = convention_repo(&src, ["echo setup", "echo tests pass", "echo installed"]);

    let ci = s.cli(&[
        "--json",
        "run",
        "core.ci_build",
        &format!("repo=file://{}", src.display()),
        "branch=main",
        &format!("commit={commit}"),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&ci.stdout).unwrap_or_default();
    assert_eq!(
        ci.status.code(),
        Some(0),
        "{v} {}",
        String::from_utf8_lossy(&ci.stderr)
    );
    assert_eq!(v["result"]["commit"], commit.as_str());
    assert_eq!(v["result"]["project"], "seatshare");

    let out_dir = tmp.path().join("out");
    std::fs::create_dir_all(&out_dir).expect("mkdir");
    let built = s.cli(&[
        "--json",
        "package",
        src.to_str().expect("path"),
        "--out",
        out_dir.to_str().expect("path"),
        "--build-number",
        "7",
        "--commit",
        &commit,
    ]);
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let b: serde_json::Value = serde_json::from_slice(&built.stdout).expect("json");
    let version = b["version"].as_str().expect("version").to_string();
    assert!(
        version.starts_with("1.2.0-7.") && version.ends_with(&commit[..7]),
        "{version}"
    );
    let info = Command::new("dpkg-deb")
        .arg("--info")
        .arg(b["path"].as_str().expect("path"))
        .output()
        .expect("dpkg-deb");
    assert!(String::from_utf8_lossy(&info.stdout).contains("Package: seatshare"));

    let added = s.cli(&["apt", "add", b["path"].as_str().expect("path")]);
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let packages = s
        .http()
        .get(s.url("/apt/dists/stable/main/binary-amd64/Packages"))
        .send()
        .expect("get")
        .text()
        .expect("text");
    assert!(
        packages.contains("Package: seatshare")
            && packages.contains(&format!("Version: {version}")),
        "{packages}"
    );
}

#[test]
fn a_ci_build_emits_its_result_as_a_trigger() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pack = tmp.path().join("cicd");
    write(
        &pack.join("pack.yaml"),
        "ref: cicd\nname: cicd\ndescription: ci trigger test\nversion: 0.0.1\n",
    );
    write(
        &pack.join("rules/on_ci.yaml"),
        "name: on_ci\npack: cicd\ntrigger:\n  type: aviary.ci.build\naction:\n  ref: core.echo\n  parameters:\n    message: \"{{ trigger.project }} {{ trigger.branch }} {{ trigger.status }} {{ trigger.stage }}\"\n",
    );
    let s = Server::start(Backend::Sqlite, &[&pack]);
    let src = tmp.path().join("webapp");
    convention_repo(&src, ["exit 0", "echo broken >&2; exit 1", "exit 0"]);
    let ci = s.cli(&[
        "run",
        "core.ci_build",
        &format!("repo={}", src.display()),
        "branch=main",
    ]);
    assert_eq!(ci.status.code(), Some(1), "the build fails");
    let echo = s.wait_for("the rule on aviary.ci.build", || {
        s.executions("action=core.echo").into_iter().next()
    });
    let echo = s.wait_execution(echo["id"].as_str().expect("id"));
    assert_eq!(echo["result"]["stdout"], "webapp main failed cibuild");
}

#[test]
fn a_newer_build_of_the_same_branch_cancels_the_older_one() {
    let s = Server::start(Backend::Sqlite, &[]);
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("slow");
    convention_repo(&src, ["exit 0", "echo started; sleep 30", "exit 0"]);
    let repo = src.display().to_string();
    let start = |branch: &str| {
        let (st, e) = s.post(
            "/api/v1/executions",
            serde_json::json!({"action": "core.ci_build", "parameters": {"repo": repo, "branch": branch}}),
        );
        assert_eq!(st, 201, "{e}");
        e["id"].as_str().expect("id").to_string()
    };
    let older = start("main");
    let other_branch = start("other");
    s.wait_for("the older build running", || {
        let (_, e) = s.get(&format!("/api/v1/executions/{older}"));
        (e["status"] == "running").then_some(())
    });
    let newer = start("main");
    let done = s.wait_execution(&older);
    assert_eq!(done["status"], "canceled", "{done}");
    let (_, other) = s.get(&format!("/api/v1/executions/{other_branch}"));
    assert_ne!(
        other["status"], "canceled",
        "another branch is not superseded: {other}"
    );
    for id in [newer, other_branch] {
        assert!(s.cli(&["execution", "cancel", &id]).status.success());
    }
}
