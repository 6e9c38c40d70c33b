//! Integration tests of the .deb builder against the real Debian tools:
//! `dpkg-deb` reads the package, `lintian` reports no error, `dpkg -i`
//! installs it and runs the postinst (root only), builds are byte-identical,
//! and bad input is refused before anything is written.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use aviary_packaging::{BuildRequest, Compression, DebError, build, read_metadata};

const SDE: i64 = 1_700_000_000;
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Writes `content` at `root/rel`, creating parents, with `mode`.
fn write(root: &Path, rel: &str, content: &str, mode: u32) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, content).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
}

/// A sample application repository named `name`; the post-inst appends its
/// arguments to `marker`.
fn sample_repo(dir: &Path, name: &str, marker: &Path) -> PathBuf {
    let repo = dir.join("checkout");
    fs::create_dir_all(&repo).unwrap();
    write(
        &repo,
        "fpm.json",
        &format!(
            r#"{{"name": "{name}", "version": "1.2.3", "description": "Seat sharing web application\nBooks seats and shares them.", "maintainer": "Ops Team <ops@example.com>", "depends": "dash, coreutils (>= 8)", "architecture": "all", "license": "Apache-2.0"}}"#
        ),
        0o644,
    );
    write(&repo, "README.md", "# Seatshare\n\nHello.\n", 0o644);
    write(&repo, "script/cisetup", "#!/bin/sh\nexit 0\n", 0o755);
    write(&repo, "script/cibuild", "#!/bin/sh\nexit 0\n", 0o755);
    write(
        &repo,
        "script/post-inst",
        &format!(
            "#!/bin/sh\nset -e\necho \"post-inst $*\" >> '{}'\n",
            marker.display()
        ),
        0o755,
    );
    write(
        &repo,
        "script/pre-rm",
        &format!("#!/bin/sh\necho \"pre-rm $*\" >> '{}'\n", marker.display()),
        0o755,
    );
    write(
        &repo,
        "script/post-rm",
        &format!("#!/bin/sh\necho \"post-rm $*\" >> '{}'\n", marker.display()),
        0o755,
    );
    write(
        &repo,
        "app/server.py",
        "#!/bin/sh\necho hi; exit 0\n",
        0o755,
    );
    write(
        &repo,
        "app/static/style.css",
        "body { color: red; }\n",
        0o600,
    );
    let deep = format!("app/{}/deep.txt", "d".repeat(60) + "/" + &"e".repeat(60));
    write(&repo, &deep, "deep\n", 0o644);
    write(&repo, "logs/build.log", "noise\n", 0o644);
    write(&repo, "config/extra.conf", "key=value\n", 0o644);
    write(
        &repo,
        "debian-root/etc/NAME/app.conf"
            .replace("NAME", name)
            .as_str(),
        "port=8080\n",
        0o644,
    );
    write(&repo, ".git/HEAD", "ref: refs/heads/main\n", 0o644);
    write(&repo, ".gitignore", "*.pyc\n", 0o644);
    fs::create_dir_all(repo.join("app/empty")).unwrap();
    symlink("server.py", repo.join("app/current")).unwrap();
    write(
        &repo,
        ".aviary/package.yaml",
        &format!(
            "section: web\nhomepage: https://example.com/{name}\nexclude:\n  - \"*.log\"\nprerm: script/pre-rm\npostrm: script/post-rm\nfiles:\n  config/extra.conf: /etc/{name}/extra.conf\n"
        ),
        0o644,
    );
    repo
}

fn request(repo: &Path, out: &Path) -> BuildRequest {
    BuildRequest {
        repo_dir: repo.to_path_buf(),
        out_dir: out.to_path_buf(),
        build_number: Some("42".into()),
        commit: Some(COMMIT.into()),
        source_date_epoch: Some(SDE),
        compression: Compression::default(),
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn metadata_is_read_with_defaults() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("My_Service");
    fs::create_dir_all(&repo).unwrap();
    write(&repo, "README.md", "\n# My Service does things\n", 0o644);
    let meta = read_metadata(&repo).unwrap();
    assert_eq!(meta.name, "my-service");
    assert_eq!(meta.version, "0.0.0");
    assert_eq!(meta.prefix, "/opt/my-service");
    assert_eq!(meta.architecture, "all");
    assert_eq!(meta.synopsis, "My Service does things");
    assert_eq!(meta.maintainer, "Aviary <aviary@aviary.invalid>");

    write(
        &repo,
        "fpm.json",
        r#"{"name":"svc","version":"2.0","depends":["a","b (>= 1)"]}"#,
        0o644,
    );
    write(
        &repo,
        ".aviary/package.yaml",
        "depends: c, d\nprefix: /srv/svc/\n",
        0o644,
    );
    let meta = read_metadata(&repo).unwrap();
    assert_eq!(meta.name, "svc");
    assert_eq!(meta.depends, vec!["c", "d"]);
    assert_eq!(meta.prefix, "/srv/svc");

    write(&repo, ".aviary/package.yaml", "prefx: /srv\n", 0o644);
    let err = read_metadata(&repo).unwrap_err();
    assert!(matches!(err, DebError::MetadataParse { .. }), "{err}");
}

#[test]
fn dpkg_deb_reads_the_package() {
    if !have("dpkg-deb") {
        println!("skipped: dpkg-deb is not installed (apt-get install dpkg)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let name = "aviary-readtest";
    let repo = sample_repo(tmp.path(), name, &tmp.path().join("marker"));
    for compression in [Compression::Gzip { level: 6 }, Compression::Xz { level: 1 }] {
        let out = tmp.path().join(format!("out-{}", compression.extension()));
        let mut req = request(&repo, &out);
        req.compression = compression;
        let built = build(&req).unwrap();
        assert_eq!(built.version, "1.2.3-42.0123456");
        assert_eq!(
            built.path.file_name().unwrap().to_str().unwrap(),
            format!("{name}_1.2.3-42.0123456_all.deb")
        );
        assert_eq!(built.size, fs::metadata(&built.path).unwrap().len());
        let deb = built.path.to_str().unwrap();

        let info = run(Command::new("dpkg-deb").args(["--info", deb]));
        assert!(info.contains(&format!(" Package: {name}\n")), "{info}");
        assert!(info.contains(" Version: 1.2.3-42.0123456\n"), "{info}");
        assert!(
            info.contains(" Depends: dash, coreutils (>= 8)\n"),
            "{info}"
        );
        assert!(info.contains(" Section: web\n"), "{info}");
        assert!(
            info.contains(
                " Description: Seat sharing web application\n  Books seats and shares them.\n"
            ),
            "{info}"
        );
        assert!(info.contains(&format!(" Installed-Size: {}\n", built.installed_size_kb)));

        let conffiles = run(Command::new("dpkg-deb").args(["-I", deb, "conffiles"]));
        assert_eq!(
            conffiles,
            format!("/etc/{name}/app.conf\n/etc/{name}/extra.conf\n")
        );
        let postinst = run(Command::new("dpkg-deb").args(["-I", deb, "postinst"]));
        assert!(postinst.starts_with("#!/bin/sh\n"));
        assert!(postinst.contains("set -e\n"));
        assert!(postinst.contains(&format!("'/opt/{name}/script/post-inst' \"$@\"")));

        let contents = run(Command::new("dpkg-deb").args(["--contents", deb]));
        let lines: Vec<&str> = contents.lines().collect();
        assert!(lines[0].starts_with("drwxr-xr-x root/root"), "{contents}");
        assert!(lines[0].ends_with(" ./"), "{contents}");
        for want in [
            " ./opt/\n",
            &format!(" ./opt/{name}/\n"),
            &format!(" ./opt/{name}/app/empty/\n"),
            &format!(" ./opt/{name}/app/current -> server.py\n"),
            &format!(" ./opt/{name}/config/extra.conf\n"),
            &format!(" ./usr/share/doc/{name}/copyright\n"),
            &format!(" ./usr/share/doc/{name}/changelog.Debian.gz\n"),
            &format!(" ./etc/{name}/extra.conf\n"),
        ] {
            assert!(contents.contains(want), "missing {want:?} in\n{contents}");
        }
        assert!(
            contents.contains(&format!(
                "-rwxr-xr-x root/root        26 2023-11-14 22:13 ./opt/{name}/app/server.py\n"
            )),
            "{contents}"
        );
        assert!(contents.contains(&format!("-rw-r--r-- root/root        21 2023-11-14 22:13 ./opt/{name}/app/static/style.css\n")), "{contents}");
        for absent in [".git", ".gitignore", "build.log", "debian-root", ".aviary"] {
            assert!(!contents.contains(absent), "{absent} packaged:\n{contents}");
        }

        // Extract and compare with the repository; check md5sums.
        let x = tmp.path().join(format!("x-{}", compression.extension()));
        run(Command::new("dpkg-deb").args(["-x", deb, x.to_str().unwrap()]));
        let deep = format!("app/{}/{}/deep.txt", "d".repeat(60), "e".repeat(60));
        assert_eq!(
            fs::read(x.join(format!("opt/{name}/{deep}"))).unwrap(),
            b"deep\n"
        );
        assert_eq!(
            fs::read_to_string(x.join(format!("etc/{name}/app.conf"))).unwrap(),
            "port=8080\n"
        );
        let md5sums = run(Command::new("dpkg-deb").args(["-I", deb, "md5sums"]));
        assert!(!md5sums.contains("etc/"), "conffiles are not in md5sums");
        fs::write(tmp.path().join("md5sums"), &md5sums).unwrap();
        run(Command::new("md5sum")
            .args([
                "--quiet",
                "-c",
                tmp.path().join("md5sums").to_str().unwrap(),
            ])
            .current_dir(&x));
        // Every file but the two conffiles and the symlink has an md5sum.
        assert_eq!(md5sums.lines().count() + 2 + 1, built.files, "{md5sums}");
    }
}

#[test]
fn builds_are_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = sample_repo(tmp.path(), "aviary-repro", &tmp.path().join("marker"));
    for compression in [Compression::Gzip { level: 6 }, Compression::Xz { level: 6 }] {
        let mut a = request(&repo, &tmp.path().join("a"));
        a.compression = compression;
        let mut b = request(&repo, &tmp.path().join("b"));
        b.compression = compression;
        let first = build(&a).unwrap();
        // Touch a file: mtimes in the repository must not matter.
        let f = repo.join("app/server.py");
        let content = fs::read(&f).unwrap();
        fs::write(&f, content).unwrap();
        let second = build(&b).unwrap();
        assert_eq!(first.sha256, second.sha256);
        assert_eq!(
            fs::read(&first.path).unwrap(),
            fs::read(&second.path).unwrap()
        );
        // Another SOURCE_DATE_EPOCH gives another package.
        let mut c = request(&repo, &tmp.path().join("c"));
        c.compression = compression;
        c.source_date_epoch = Some(SDE + 1);
        assert_ne!(build(&c).unwrap().sha256, first.sha256);
    }
    // No temporary files are left behind.
    let names: Vec<_> = fs::read_dir(tmp.path().join("a"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn lintian_reports_no_errors() {
    if !have("lintian") {
        println!("skipped: lintian is not installed (apt-get install lintian)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // The marker is never written here; outside /tmp so that lintian does not
    // flag the embedded postrm for /tmp handling.
    let repo = sample_repo(
        tmp.path(),
        "aviary-lintian",
        Path::new("/var/lib/aviary-lintian-marker"),
    );
    // A repository with nothing but the convention scripts: all defaults.
    let minimal = tmp.path().join("aviary-minimal");
    for script in ["script/cisetup", "script/cibuild", "script/post-inst"] {
        write(&minimal, script, "#!/bin/sh\nexit 0\n", 0o755);
    }
    for (repo, compression) in [
        (&repo, Compression::default()),
        (&repo, Compression::Xz { level: 6 }),
        (&minimal, Compression::default()),
    ] {
        let out = tmp
            .path()
            .join(format!("{}-{}", compression.extension(), repo.display()).replace('/', "_"));
        let mut req = request(repo, &out);
        req.compression = compression;
        let built = build(&req).unwrap();
        let out = Command::new("lintian")
            .args([
                "--tag-display-limit",
                "0",
                "--display-info",
                built.path.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&out.stdout);
        println!(
            "lintian ({compression:?}):\n{report}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !report.lines().any(|l| l.starts_with("E:")),
            "lintian errors:\n{report}"
        );
        // Only the accepted warnings (see the crate README).
        for line in report.lines().filter(|l| l.starts_with("W:")) {
            assert!(
                ACCEPTED_WARNINGS.iter().any(|t| line.contains(t)),
                "unexpected lintian warning: {line}"
            );
        }
    }
}

/// Lintian warnings accepted for an application in /opt (see README).
const ACCEPTED_WARNINGS: &[&str] = &[];

/// Purges a really installed test package on drop.
struct Purge(&'static str);

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["-P", self.0]).output();
    }
}

#[test]
fn dpkg_installs_it_and_runs_the_postinst() {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if !is_root || !have("dpkg") {
        println!("skipped: installing a package needs root and dpkg");
        return;
    }
    const NAME: &str = "aviary-packaging-itest";
    let tmp = tempfile::tempdir().unwrap();
    let marker = tmp.path().join("marker");
    let repo = sample_repo(tmp.path(), NAME, &marker);
    let _purge = Purge(NAME);
    let _ = Command::new("dpkg").args(["-P", NAME]).output();
    let built = build(&request(&repo, &tmp.path().join("out"))).unwrap();
    run(Command::new("dpkg").args(["-i", built.path.to_str().unwrap()]));
    let log = fs::read_to_string(&marker).unwrap();
    assert_eq!(
        log.trim_end(),
        "post-inst configure",
        "postinst ran with configure"
    );
    assert!(Path::new(&format!("/opt/{NAME}/app/server.py")).is_file());
    let status = run(Command::new("dpkg-query").args(["-W", "-f=${Version} ${Conffiles}", NAME]));
    assert!(status.starts_with("1.2.3-42.0123456 "), "{status}");
    assert!(
        status.contains(&format!("/etc/{NAME}/app.conf")),
        "{status}"
    );

    // Upgrade: the postinst gets the old version.
    let mut next = request(&repo, &tmp.path().join("out2"));
    next.build_number = Some("43".into());
    let built2 = build(&next).unwrap();
    run(Command::new("dpkg").args(["-i", built2.path.to_str().unwrap()]));
    let log = fs::read_to_string(&marker).unwrap();
    assert!(log.contains("pre-rm upgrade 1.2.3-43.0123456\n"), "{log}");
    assert!(
        log.ends_with("post-inst configure 1.2.3-42.0123456\n"),
        "{log}"
    );

    run(Command::new("dpkg").args(["-P", NAME]));
    let log = fs::read_to_string(&marker).unwrap();
    assert!(log.contains("pre-rm remove\n"), "{log}");
    assert!(log.contains("post-rm remove\n"), "{log}");
    assert!(log.ends_with("post-rm purge\n"), "{log}");
    assert!(!Path::new(&format!("/opt/{NAME}")).exists());
}

/// Asserts that building fails with an error matching `check` and leaves
/// the output directory empty.
fn assert_refused(repo: &Path, out: &Path, check: impl Fn(&DebError) -> bool) -> String {
    let err = build(&request(repo, out)).unwrap_err();
    assert!(check(&err), "unexpected error: {err}");
    let left: Vec<_> = fs::read_dir(out)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "files left behind: {left:?}");
    err.to_string()
}

#[test]
fn bad_input_is_refused_before_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let repo = sample_repo(tmp.path(), "aviary-bad", &tmp.path().join("marker"));
    let fpm = fs::read_to_string(repo.join("fpm.json")).unwrap();

    write(
        &repo,
        "fpm.json",
        &fpm.replace("aviary-bad", "Aviary_Bad"),
        0o644,
    );
    let msg = assert_refused(&repo, &out, |e| matches!(e, DebError::InvalidName { .. }));
    assert!(msg.contains("lowercase"), "{msg}");

    write(&repo, "fpm.json", &fpm.replace("1.2.3", "v1.2.3"), 0o644);
    let msg = assert_refused(&repo, &out, |e| {
        matches!(e, DebError::InvalidVersion { .. })
    });
    assert!(msg.contains("start with a digit"), "{msg}");
    write(&repo, "fpm.json", &fpm, 0o644);

    let mut req = request(&repo, &out);
    req.build_number = Some("4-2".into());
    assert!(matches!(
        build(&req),
        Err(DebError::InvalidVersion {
            part: "build number",
            ..
        })
    ));
    req.build_number = None;
    req.commit = Some("not-a-commit".into());
    assert!(matches!(
        build(&req),
        Err(DebError::InvalidVersion { part: "commit", .. })
    ));

    let yaml = fs::read_to_string(repo.join(".aviary/package.yaml")).unwrap();
    write(
        &repo,
        ".aviary/package.yaml",
        &format!("{yaml}  config/extra.conf2: ../../etc/passwd\n"),
        0o644,
    );
    let msg = assert_refused(&repo, &out, |e| matches!(e, DebError::PathEscapes { .. }));
    assert!(msg.contains(".."), "{msg}");
    write(&repo, ".aviary/package.yaml", &yaml, 0o644);

    symlink("/etc/passwd", repo.join("app/passwd")).unwrap();
    let msg = assert_refused(&repo, &out, |e| {
        matches!(e, DebError::SymlinkEscapes { .. })
    });
    assert!(
        msg.contains("app/passwd") && msg.contains("absolute"),
        "{msg}"
    );
    fs::remove_file(repo.join("app/passwd")).unwrap();

    symlink("../../outside", repo.join("app/out")).unwrap();
    assert_refused(&repo, &out, |e| {
        matches!(e, DebError::SymlinkEscapes { .. })
    });
    fs::remove_file(repo.join("app/out")).unwrap();

    fs::set_permissions(
        repo.join("script/post-inst"),
        fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let msg = assert_refused(&repo, &out, |e| {
        matches!(e, DebError::ConventionScript { .. })
    });
    assert!(
        msg.contains("script/post-inst") && msg.contains("not executable"),
        "{msg}"
    );
    assert!(
        msg.contains("script/cisetup, script/cibuild and script/post-inst"),
        "{msg}"
    );
    fs::remove_file(repo.join("script/post-inst")).unwrap();
    let msg = assert_refused(&repo, &out, |e| {
        matches!(e, DebError::ConventionScript { .. })
    });
    assert!(msg.contains("is missing"), "{msg}");
    write(&repo, "script/post-inst", "#!/bin/sh\n", 0o755);

    write(
        &repo,
        ".aviary/package.yaml",
        &format!("{yaml}conffiles: [/etc/nowhere.conf]\n"),
        0o644,
    );
    assert_refused(&repo, &out, |e| {
        matches!(e, DebError::UnknownConffile { .. })
    });
    write(&repo, ".aviary/package.yaml", &yaml, 0o644);

    // And the fixed repository builds.
    build(&request(&repo, &out)).unwrap();
}
