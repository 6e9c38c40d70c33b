//! The APT repository through the binary: `aviary apt add/list/export-key`,
//! served by the server at `/apt/` without a token, verified by real gpgv and
//! consumed by real `apt-get update` + `apt-get download` with `signed-by`.

use std::path::Path;
use std::process::Command;

use crate::harness::*;

fn tiny_deb(dir: &Path, name: &str, version: &str) -> std::path::PathBuf {
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
    for sub in ["lists/partial", "cache/archives/partial", "dl"] {
        std::fs::create_dir_all(d.join(sub)).expect("mkdir");
    }
    std::fs::write(d.join("status"), "").expect("status");
    std::fs::write(
        d.join("sources.list"),
        format!(
            "deb [signed-by={}] {}/apt/ stable main\n",
            key.display(),
            s.url("")
        ),
    )
    .expect("sources");
    let apt = |args: &[&str]| {
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
    };
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
