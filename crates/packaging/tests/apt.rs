//! Integration tests of the APT repository against the real tools: dpkg's
//! version ordering, gpgv, apt-get update/download/install over HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use aviary_packaging::apt::{AptError, RepoConfig, Repository, compare_versions};
use sha2::Digest;

/// Builds a tiny .deb with dpkg-deb.
fn build_deb(dir: &Path, name: &str, version: &str, arch: &str, payload: &str) -> PathBuf {
    let tree = dir.join(format!("tree-{name}-{version}-{arch}-{}", payload.len()));
    std::fs::create_dir_all(tree.join("DEBIAN")).unwrap();
    let share = tree.join("usr/share").join(name);
    std::fs::create_dir_all(&share).unwrap();
    std::fs::write(share.join("payload.txt"), payload).unwrap();
    std::fs::write(
        tree.join("DEBIAN/control"),
        format!(
            "Package: {name}\nVersion: {version}\nArchitecture: {arch}\nMaintainer: Test <t@example.org>\nSection: misc\nPriority: optional\nDescription: test package {name}\n a longer description line\n"
        ),
    )
    .unwrap();
    let out = dir.join(format!("{name}_{version}_{arch}_{}.deb", payload.len()));
    let st = Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zgzip", "-b"])
        .arg(&tree)
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    out
}

fn sha256_file(p: &Path) -> String {
    hex::encode(sha2::Sha256::digest(std::fs::read(p).unwrap()))
}

/// A minimal static HTTP/1.0 file server on 127.0.0.1.
struct Server {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl Server {
    fn start(root: PathBuf) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(c) = conn {
                    let root = root.clone();
                    std::thread::spawn(move || serve(c, &root));
                }
            }
        });
        Server { port, stop }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve(mut c: TcpStream, root: &Path) {
    let mut reader = BufReader::new(c.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("/").trim_start_matches('/');
    let file = root.join(path);
    let ok = !path.split('/').any(|s| s == ".." || s.starts_with('.')) && file.is_file();
    let resp = if ok {
        let body = std::fs::read(&file).unwrap_or_default();
        let mut r = format!(
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        if method != "HEAD" {
            r.extend_from_slice(&body);
        }
        r
    } else {
        b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
    };
    let _ = c.write_all(&resp);
}

/// An isolated apt configuration pointing at the repository.
struct Apt {
    dir: PathBuf,
}

impl Apt {
    fn new(dir: &Path, port: u16, key: &[u8]) -> Self {
        let dir = dir.to_path_buf();
        for d in ["state/lists/partial", "cache/archives/partial", "etc", "dl"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::write(dir.join("state/status"), "").unwrap();
        std::fs::write(dir.join("etc/key.gpg"), key).unwrap();
        std::fs::write(
            dir.join("etc/sources.list"),
            format!(
                "deb [signed-by={}] http://127.0.0.1:{port}/ stable main\n",
                dir.join("etc/key.gpg").display()
            ),
        )
        .unwrap();
        Apt { dir }
    }

    fn cmd(&self, real_status: bool) -> Command {
        let mut c = Command::new("apt-get");
        let d = &self.dir;
        c.arg("-q")
            .arg(format!(
                "-oDir::Etc::sourcelist={}",
                d.join("etc/sources.list").display()
            ))
            .arg("-oDir::Etc::sourceparts=-")
            .arg(format!(
                "-oDir::State::Lists={}",
                d.join("state/lists").display()
            ))
            .arg(format!("-oDir::Cache={}", d.join("cache").display()))
            .arg("-oAPT::Sandbox::User=root")
            .arg("-oAcquire::Languages=none")
            .arg("-oAPT::Architecture=amd64")
            .arg("-oAPT::Architectures::=amd64")
            .arg("-oDPkg::Lock::Timeout=120")
            .current_dir(d.join("dl"));
        if !real_status {
            c.arg(format!(
                "-oDir::State::status={}",
                d.join("state/status").display()
            ));
        }
        c
    }

    fn run(&self, args: &[&str], real_status: bool) -> (bool, String) {
        let out = self.cmd(real_status).args(args).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    fn update_ok(&self) {
        self.update_with(&[]);
    }

    fn update_with(&self, opts: &[&str]) {
        let mut args = opts.to_vec();
        args.push("update");
        let (ok, text) = self.run(&args, false);
        assert!(ok, "apt-get update failed:\n{text}");
        assert!(
            !text.contains("W:") && !text.contains("E:"),
            "apt-get update warned:\n{text}"
        );
    }

    fn download(&self, pkg: &str) -> PathBuf {
        let (ok, text) = self.run(&["download", pkg], false);
        assert!(ok, "apt-get download {pkg} failed:\n{text}");
        let dl = self.dir.join("dl");
        std::fs::read_dir(&dl)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(&format!("{pkg}_"))
            })
            .unwrap_or_else(|| panic!("{pkg} not downloaded:\n{text}"))
    }
}

fn gpgv(keyring: &Path, args: &[&Path]) -> (bool, String) {
    let out = Command::new("gpgv")
        .arg("--keyring")
        .arg(keyring)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn version_order_matches_dpkg() {
    let cases = [
        ("1.0", "1.0"),
        ("1.0", "1.1"),
        ("1.0~rc1", "1.0"),
        ("1.0~~", "1.0~"),
        ("1.0~", "1.0"),
        ("1.0", "1.0+b1"),
        ("1.0", "1.0.1"),
        ("1.0-1", "1.0-2"),
        ("1.0-1", "1.0-10"),
        ("1.0-9", "1.0-10"),
        ("1:0.9", "2.0"),
        ("0:1.0", "1.0"),
        ("2:1.0", "10:0.1"),
        ("1.0a", "1.0b"),
        ("1.0a", "1.0+"),
        ("1.0a", "1.0."),
        ("1.01", "1.1"),
        ("1.001", "1.1"),
        ("1.0-0", "1.0"),
        ("2.0.0-rc1", "2.0.0"),
        ("2.0.0~rc1", "2.0.0-1"),
        ("1.2.3+git20240101.abc-1", "1.2.3+git20231231.def-3"),
        ("0.0.0", "0"),
        ("1a", "1"),
        ("1-1-1", "1-1"),
        ("1.0+dfsg-1", "1.0-1"),
        ("9", "10"),
        ("1.0-1ubuntu1", "1.0-1"),
        ("1.0-1~bpo1", "1.0-1"),
        ("3.4.5-2+deb12u1", "3.4.5-2"),
    ];
    for (a, b) in cases {
        for (x, y) in [(a, b), (b, a)] {
            let ours = compare_versions(x, y);
            let dpkg = |op: &str| {
                Command::new("dpkg")
                    .args(["--compare-versions", x, op, y])
                    .status()
                    .unwrap()
                    .success()
            };
            let expected = if dpkg("lt") {
                std::cmp::Ordering::Less
            } else if dpkg("eq") {
                std::cmp::Ordering::Equal
            } else {
                std::cmp::Ordering::Greater
            };
            assert_eq!(ours, expected, "{x} vs {y}");
        }
    }
}

#[test]
fn signed_repository_verifies_with_gpgv_and_apt() {
    let tmp = tempfile::tempdir().unwrap();
    let debs = tmp.path().join("debs");
    std::fs::create_dir_all(&debs).unwrap();
    let root = tmp.path().join("repo");
    let repo = Repository::open_or_create(&root, RepoConfig::default()).unwrap();
    let a = build_deb(&debs, "aviary-hello", "1.0-1", "amd64", "hello");
    let b = build_deb(&debs, "libaviary-data", "2:0.5", "all", "data");
    let report = repo.add(&[a.clone(), b.clone()], "stable", "main").unwrap();
    assert_eq!(report.added.len(), 2);

    // The key is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(root.join(".aviary-state/signing-key.asc"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // gpgv accepts InRelease and Release.gpg with the exported key.
    let keyring = tmp.path().join("key.gpg");
    std::fs::write(&keyring, repo.export_public_key().unwrap()).unwrap();
    assert!(
        repo.export_public_key_armored()
            .unwrap()
            .contains("BEGIN PGP PUBLIC KEY")
    );
    let dists = root.join("dists/stable");
    let (ok, err) = gpgv(&keyring, &[&dists.join("InRelease")]);
    assert!(ok, "gpgv InRelease: {err}");
    let (ok, err) = gpgv(
        &keyring,
        &[&dists.join("Release.gpg"), &dists.join("Release")],
    );
    assert!(ok, "gpgv Release.gpg: {err}");
    // A tampered Release fails.
    let tampered = tmp.path().join("Release.bad");
    let text = std::fs::read_to_string(dists.join("Release")).unwrap();
    std::fs::write(&tampered, text.replace("Aviary", "Evil")).unwrap();
    assert!(!gpgv(&keyring, &[&dists.join("Release.gpg"), &tampered]).0);

    // Release content and by-hash files.
    for f in [
        "Origin: Aviary",
        "Suite: stable",
        "Acquire-By-Hash: yes",
        "MD5Sum:",
        "SHA256:",
        "Valid-Until:",
    ] {
        assert!(text.contains(f), "{f} missing in\n{text}");
    }
    let sha_section = text.split("SHA256:\n").nth(1).unwrap();
    for line in sha_section.lines() {
        let mut it = line.split_whitespace();
        let (h, size, path) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
        let named = dists.join(path);
        assert_eq!(sha256_file(&named), h, "{path}");
        assert_eq!(std::fs::metadata(&named).unwrap().len().to_string(), size);
        let dir = Path::new(path).parent().unwrap();
        assert_eq!(
            sha256_file(&dists.join(dir).join("by-hash/SHA256").join(h)),
            h
        );
    }
    // Arch all is in every index; amd64 only in binary-amd64.
    let amd64 = std::fs::read_to_string(dists.join("main/binary-amd64/Packages")).unwrap();
    let all = std::fs::read_to_string(dists.join("main/binary-all/Packages")).unwrap();
    assert!(amd64.contains("Package: aviary-hello") && amd64.contains("Package: libaviary-data"));
    assert!(all.contains("Package: libaviary-data") && !all.contains("Package: aviary-hello"));
    assert!(amd64.contains("Filename: pool/main/liba/libaviary-data/libaviary-data_0.5_all.deb"));
    assert!(amd64.contains(&format!("SHA256: {}", sha256_file(&a))));
    let stanza = amd64
        .split("\n\n")
        .find(|s| s.contains("aviary-hello"))
        .unwrap();
    assert!(
        stanza.trim_end().ends_with(" a longer description line"),
        "{stanza}"
    );

    // Real apt: update, download (checksum), and one real install + purge.
    let export = tmp.path().join("www");
    repo.export_to(&export).unwrap();
    assert!(!export.join(".aviary-state").exists());
    let server = Server::start(export.clone());
    let apt = Apt::new(
        &tmp.path().join("apt"),
        server.port,
        &repo.export_public_key().unwrap(),
    );
    apt.update_ok();
    let got = apt.download("aviary-hello");
    assert_eq!(sha256_file(&got), sha256_file(&a));
    let got = apt.download("libaviary-data");
    assert_eq!(sha256_file(&got), sha256_file(&b));
    let (ok, text) = apt.run(&["install", "-y", "--no-download", "aviary-hello"], true);
    let (ok2, text2) = if ok {
        (ok, text)
    } else {
        apt.run(&["install", "-y", "aviary-hello"], true)
    };
    let installed = Path::new("/usr/share/aviary-hello/payload.txt").exists();
    let purge = Command::new("dpkg")
        .args(["-P", "aviary-hello"])
        .output()
        .unwrap();
    assert!(ok2, "apt-get install failed:\n{text2}");
    assert!(installed);
    assert!(purge.status.success());

    // A different key makes apt refuse the repository.
    let other = tempfile::tempdir().unwrap();
    let other_repo = Repository::open_or_create(other.path(), RepoConfig::default()).unwrap();
    let apt2 = Apt::new(
        &tmp.path().join("apt2"),
        server.port,
        &other_repo.export_public_key().unwrap(),
    );
    let (_, text) = apt2.run(&["update"], false);
    assert!(
        text.contains("NO_PUBKEY") || text.contains("not signed"),
        "{text}"
    );

    // A repository that was signed and now is not is refused.
    std::fs::remove_file(export.join("dists/stable/InRelease")).unwrap();
    std::fs::remove_file(export.join("dists/stable/Release.gpg")).unwrap();
    let (_, text) = apt.run(&["update"], false);
    assert!(text.contains("not signed") || text.contains("E:"), "{text}");
}

#[test]
fn duplicates_conflicts_and_bad_files() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repository::open_or_create(&tmp.path().join("repo"), RepoConfig::default()).unwrap();
    let a = build_deb(tmp.path(), "dup", "1.0", "amd64", "one");
    let a2 = build_deb(tmp.path(), "dup", "1.0", "amd64", "other content");
    repo.add(std::slice::from_ref(&a), "stable", "main")
        .unwrap();
    let again = repo
        .add(std::slice::from_ref(&a), "stable", "main")
        .unwrap();
    assert!(again.added.is_empty() && again.unchanged.len() == 1);
    let err = repo.add(&[a2], "stable", "main").unwrap_err();
    assert!(matches!(err, AptError::Conflict { .. }), "{err}");
    assert!(err.to_string().contains("different content"));

    let junk = tmp.path().join("junk.deb");
    std::fs::write(&junk, "not a package").unwrap();
    let err = repo.add(&[junk], "stable", "main").unwrap_err();
    assert!(matches!(err, AptError::NotADeb { .. }), "{err}");
    let err = repo
        .add(std::slice::from_ref(&a), "unstable", "main")
        .unwrap_err();
    assert!(err.to_string().contains("not configured"), "{err}");
    let arm = build_deb(tmp.path(), "armonly", "1.0", "arm64", "x");
    assert!(matches!(
        repo.add(&[arm], "stable", "main").unwrap_err(),
        AptError::NotConfigured { .. }
    ));
    assert_eq!(repo.list(None).unwrap().len(), 1);
}

#[test]
fn retention_remove_and_gc() {
    let tmp = tempfile::tempdir().unwrap();
    let config = RepoConfig {
        keep_versions: 2,
        ..RepoConfig::default()
    };
    let root = tmp.path().join("repo");
    let repo = Repository::open_or_create(&root, config).unwrap();
    for v in ["1.0", "1.10", "1.2~rc1", "1.2", "0.9"] {
        let d = build_deb(tmp.path(), "app", v, "amd64", v);
        repo.add(&[d], "stable", "main").unwrap();
    }
    let versions: Vec<String> = repo
        .list(Some("stable"))
        .unwrap()
        .into_iter()
        .map(|e| e.version)
        .collect();
    assert_eq!(versions, ["1.2", "1.10"]);
    let pool_files = |root: &Path| {
        let mut n = 0;
        let mut stack = vec![root.join("pool")];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() { stack.push(p) } else { n += 1 }
            }
        }
        n
    };
    assert_eq!(pool_files(&root), 5);
    assert_eq!(repo.gc().unwrap(), 3);
    assert_eq!(pool_files(&root), 2);
    let r = repo.remove("stable", "main", "app", Some("1.2")).unwrap();
    assert_eq!(r.removed.len(), 1);
    assert!(repo.remove("stable", "main", "nope", None).is_err());
    let packages =
        std::fs::read_to_string(root.join("dists/stable/main/binary-amd64/Packages")).unwrap();
    assert!(packages.contains("Version: 1.10") && !packages.contains("Version: 1.2\n"));
    assert_eq!(repo.gc().unwrap(), 1);
    // A second handle (another process) sees the same state.
    let repo2 = Repository::open_or_create(&root, RepoConfig::default()).unwrap();
    assert_eq!(repo2.list(None).unwrap().len(), 1);
}

#[test]
fn concurrent_adds_lose_nothing_and_apt_installs_each() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("repo");
    // Small chunks: Packages.gz is many gzip members.
    let config = RepoConfig {
        index_chunk: 3,
        ..RepoConfig::default()
    };
    let mut debs = Vec::new();
    for t in 0..4 {
        for i in 0..5 {
            debs.push((
                t,
                build_deb(
                    tmp.path(),
                    &format!("conc-{t}-{i}"),
                    "1.0",
                    "amd64",
                    &format!("{t}{i}"),
                ),
            ));
        }
    }
    let debs = Arc::new(debs);
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let debs = debs.clone();
            let root = root.clone();
            let config = config.clone();
            std::thread::spawn(move || {
                // Each thread has its own handle, like separate processes.
                let repo = Repository::open_or_create(&root, config).unwrap();
                for (_, d) in debs.iter().filter(|(x, _)| *x == t) {
                    repo.add(std::slice::from_ref(d), "stable", "main").unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let repo = Repository::open_or_create(&root, RepoConfig::default()).unwrap();
    assert_eq!(repo.list(None).unwrap().len(), 20);
    let packages =
        std::fs::read_to_string(root.join("dists/stable/main/binary-amd64/Packages")).unwrap();
    let server = Server::start(root.clone());
    let apt = Apt::new(
        &tmp.path().join("apt"),
        server.port,
        &repo.export_public_key().unwrap(),
    );
    apt.update_ok();
    // Forced to the (multi-member) gz or the xz index, apt
    // still reads every package.
    for comp in ["gz", "xz"] {
        let apt_c = Apt::new(
            &tmp.path().join(format!("apt-{comp}")),
            server.port,
            &repo.export_public_key().unwrap(),
        );
        apt_c.update_with(&[
            &format!("-oAcquire::CompressionTypes::Order::={comp}"),
            "-oAcquire::GzipIndexes=false",
        ]);
        let (ok, text) = apt_c.run(&["download", "conc-3-4", "conc-0-0"], false);
        assert!(ok, "{comp}: {text}");
        let stored = std::fs::read_dir(tmp.path().join(format!("apt-{comp}/state/lists")))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.to_string_lossy().ends_with("binary-amd64_Packages"))
            .unwrap();
        assert_eq!(std::fs::read_to_string(stored).unwrap(), packages, "{comp}");
    }
    // apt fetched the indexes.
    let lists: Vec<String> = std::fs::read_dir(tmp.path().join("apt/state/lists"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(
        lists.iter().any(|l| l.contains("binary-amd64_Packages")),
        "{lists:?}"
    );
    let xz = std::fs::read(root.join("dists/stable/main/binary-amd64/Packages.xz")).unwrap();
    let mut text = String::new();
    liblzma::read::XzDecoder::new_multi_decoder(&xz[..])
        .read_to_string(&mut text)
        .unwrap();
    assert_eq!(text, packages);
    let gz = std::fs::read(root.join("dists/stable/main/binary-amd64/Packages.gz")).unwrap();
    let mut text = String::new();
    flate2::read::MultiGzDecoder::new(&gz[..])
        .read_to_string(&mut text)
        .unwrap();
    assert_eq!(text, packages);
    for (_, d) in debs.iter() {
        let name = d
            .file_name()
            .unwrap()
            .to_string_lossy()
            .split('_')
            .next()
            .unwrap()
            .to_string();
        assert!(packages.contains(&format!("Package: {name}\n")));
        let got = apt.download(&name);
        assert_eq!(sha256_file(&got), sha256_file(d));
    }
}

#[test]
fn readers_never_see_a_release_naming_a_missing_file() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("repo");
    let repo = Repository::open_or_create(&root, RepoConfig::default()).unwrap();
    let first = build_deb(tmp.path(), "atom-0", "1.0", "amd64", "0");
    repo.add(&[first], "stable", "main").unwrap();
    let debs: Vec<PathBuf> = (1..30)
        .map(|i| {
            build_deb(
                tmp.path(),
                &format!("atom-{i}"),
                "1.0",
                "amd64",
                &i.to_string(),
            )
        })
        .collect();
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let done = done.clone();
        let dists = root.join("dists/stable");
        std::thread::spawn(move || {
            let (mut checks, mut failures) = (0u64, Vec::new());
            while !done.load(Ordering::SeqCst) || checks == 0 {
                let mut text = String::new();
                std::fs::File::open(dists.join("InRelease"))
                    .unwrap()
                    .read_to_string(&mut text)
                    .unwrap();
                let section = text.split("SHA256:\n").nth(1).unwrap();
                for line in section.lines().take_while(|l| l.starts_with(' ')) {
                    let mut it = line.split_whitespace();
                    let (h, path) = (it.next().unwrap(), it.nth(1).unwrap());
                    let dir = Path::new(path).parent().unwrap();
                    let by_hash = dists.join(dir).join("by-hash/SHA256").join(h);
                    match std::fs::read(&by_hash) {
                        Ok(b) if hex::encode(sha2::Sha256::digest(&b)) == h => {}
                        other => failures.push(format!("{path} {h}: {:?}", other.map(|b| b.len()))),
                    }
                    checks += 1;
                }
            }
            (checks, failures)
        })
    };
    for d in &debs {
        repo.add(std::slice::from_ref(d), "stable", "main").unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let (checks, failures) = reader.join().unwrap();
    assert!(checks > 0);
    assert!(
        failures.is_empty(),
        "{} failures of {checks}: {failures:?}",
        failures.len()
    );
}

#[test]
fn imported_key_signs() {
    let tmp = tempfile::tempdir().unwrap();
    let donor =
        Repository::open_or_create(&tmp.path().join("donor"), RepoConfig::default()).unwrap();
    let donor_pub = donor.export_public_key().unwrap();
    let armored =
        std::fs::read_to_string(tmp.path().join("donor/.aviary-state/signing-key.asc")).unwrap();
    let root = tmp.path().join("repo");
    let repo = Repository::open_or_create(&root, RepoConfig::default()).unwrap();
    repo.add(
        &[build_deb(tmp.path(), "imp", "1", "all", "i")],
        "stable",
        "main",
    )
    .unwrap();
    let fpr = repo.import_key(&armored).unwrap();
    assert_eq!(fpr, donor.key_fingerprint().unwrap());
    let keyring = tmp.path().join("k.gpg");
    std::fs::write(&keyring, donor_pub).unwrap();
    assert!(gpgv(&keyring, &[&root.join("dists/stable/InRelease")]).0);
    assert!(repo.import_key("garbage").is_err());
}
