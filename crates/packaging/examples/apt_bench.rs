//! APT repository benchmark: Aviary's `apt` module against `reprepro
//! includedeb` and `aptly repo add` + `aptly publish`.
//!
//! Run with `cargo run --release -p aviary-packaging --example apt_bench`
//! (`APT_BENCH_BIG=10000` sets the large repository size). reprepro and
//! aptly publish unsigned (no gpg-agent key set up: reprepro without
//! `SignWith`, aptly with `-skip-signing`), which favours them: Aviary signs
//! InRelease and Release.gpg with Ed25519 on every publish.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use aviary_packaging::apt::{RepoConfig, Repository};
use aviary_packaging::deb::{ar, tar::TarWriter};

/// Writes a tiny .deb (control + one small file) directly.
fn make_deb(dir: &Path, name: &str, version: &str) -> PathBuf {
    let gz = |tar: Vec<u8>| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        e.write_all(&tar).unwrap();
        e.finish().unwrap()
    };
    let control = format!(
        "Package: {name}\nVersion: {version}\nArchitecture: amd64\nMaintainer: Bench <bench@example.org>\nInstalled-Size: 1\nSection: misc\nPriority: optional\nDescription: benchmark package {name}\n tiny package for the APT repository benchmark\n"
    );
    let mut ct = TarWriter::new(Vec::new(), 0);
    ct.dir("./", 0o755).unwrap();
    ct.file_bytes("./control", 0o644, control.as_bytes())
        .unwrap();
    let mut dt = TarWriter::new(Vec::new(), 0);
    dt.dir("./", 0o755).unwrap();
    dt.dir("./usr/", 0o755).unwrap();
    dt.dir("./usr/share/", 0o755).unwrap();
    dt.file_bytes(&format!("./usr/share/{name}.txt"), 0o644, name.as_bytes())
        .unwrap();
    let mut out = Vec::new();
    out.extend_from_slice(ar::MAGIC);
    ar::write_member(&mut out, "debian-binary", 0, b"2.0\n").unwrap();
    ar::write_member(&mut out, "control.tar.gz", 0, &gz(ct.finish().unwrap())).unwrap();
    ar::write_member(&mut out, "data.tar.gz", 0, &gz(dt.finish().unwrap())).unwrap();
    let path = dir.join(format!("{name}_{version}_amd64.deb"));
    std::fs::write(&path, out).unwrap();
    path
}

fn debs(dir: &Path, prefix: &str, n: usize) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    (0..n)
        .map(|i| make_deb(dir, &format!("{prefix}{i:05}"), "1.0-1"))
        .collect()
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{:?} failed: {}{}",
        cmd.get_program(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

struct Reprepro(PathBuf);
impl Reprepro {
    fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir.join("conf")).unwrap();
        std::fs::write(
            dir.join("conf/distributions"),
            "Codename: stable\nSuite: stable\nArchitectures: amd64\nComponents: main\n",
        )
        .unwrap();
        Reprepro(dir.to_path_buf())
    }
    fn include(&self, files: &[PathBuf]) {
        for batch in files.chunks(2000) {
            run(Command::new("reprepro")
                .arg("-b")
                .arg(&self.0)
                .args(["--silent", "includedeb", "stable"])
                .args(batch));
        }
    }
}

struct Aptly(PathBuf, bool);
impl Aptly {
    fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join("aptly.conf"),
            format!(
                "{{\"rootDir\": \"{}\", \"architectures\": [\"amd64\", \"all\"]}}",
                dir.join("root").display()
            ),
        )
        .unwrap();
        let a = Aptly(dir.to_path_buf(), false);
        run(a.cmd().args([
            "repo",
            "create",
            "-distribution=stable",
            "-component=main",
            "bench",
        ]));
        a
    }
    fn cmd(&self) -> Command {
        let mut c = Command::new("aptly");
        c.arg(format!("-config={}", self.0.join("aptly.conf").display()));
        c
    }
    fn add_publish(&mut self, dir: &Path) {
        run(self
            .cmd()
            .args(["repo", "add", "-force-replace", "bench"])
            .arg(dir));
        if self.1 {
            run(self
                .cmd()
                .args(["publish", "update", "-skip-signing", "stable"]));
        } else {
            run(self.cmd().args([
                "publish",
                "repo",
                "-skip-signing",
                "-architectures=amd64,all",
                "bench",
            ]));
            self.1 = true;
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let big: usize = std::env::var("APT_BENCH_BIG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let started = Instant::now();
    let thousand = debs(&t.join("d1000"), "pkg-a", 1000);
    let many = debs(&t.join("dbig"), "pkg-b", big);
    let one_dir = t.join("done");
    let one = debs(&one_dir, "pkg-one", 1);
    let one2_dir = t.join("done2");
    let one2 = debs(&one2_dir, "pkg-two", 1);
    println!(
        "generated {} .debs in {}",
        1002 + big,
        ms(started.elapsed())
    );
    let mut rows: Vec<(String, Duration, Duration, Duration)> = Vec::new();

    // 1,000 packages into an empty repository.
    let repo = Repository::open_or_create(&t.join("av1"), RepoConfig::default()).unwrap();
    let av = timed(|| {
        repo.add(&thousand, "stable", "main").unwrap();
    });
    let rp = Reprepro::new(&t.join("rp1"));
    let rr = timed(|| rp.include(&thousand));
    let ap = timed(|| Aptly::new(&t.join("ap1")).add_publish(&t.join("d1000")));
    rows.push(("1,000 into empty".into(), av, rr, ap));

    // One package into 1,000 (same repositories).
    let av = timed(|| {
        repo.add(&one, "stable", "main").unwrap();
    });
    let av_cold = timed(|| {
        let r = Repository::open_or_create(&t.join("av1"), RepoConfig::default()).unwrap();
        r.add(&one2, "stable", "main").unwrap();
    });
    let rr = timed(|| rp.include(&one));
    let mut aptly1 = Aptly(t.join("ap1"), true);
    let ap = timed(|| aptly1.add_publish(&one_dir));
    rows.push(("1 into 1,000 (warm handle)".into(), av, rr, ap));
    rows.push(("1 into 1,000 (new handle)".into(), av_cold, rr, ap));

    // One package into `big`.
    let repo = Repository::open_or_create(&t.join("avb"), RepoConfig::default()).unwrap();
    let av_fill = timed(|| {
        repo.add(&many, "stable", "main").unwrap();
    });
    let rp = Reprepro::new(&t.join("rpb"));
    let rr_fill = timed(|| rp.include(&many));
    let mut aptly = Aptly::new(&t.join("apb"));
    let ap_fill = timed(|| aptly.add_publish(&t.join("dbig")));
    rows.push((format!("{big} into empty"), av_fill, rr_fill, ap_fill));
    let mut samples = Vec::new();
    for i in 0..5 {
        let d = debs(&t.join(format!("s{i}")), &format!("pkg-s{i}-"), 1);
        samples.push(timed(|| {
            repo.add(&d, "stable", "main").unwrap();
        }));
    }
    samples.sort();
    let av = samples[samples.len() / 2];
    let av_cold = timed(|| {
        let r = Repository::open_or_create(&t.join("avb"), RepoConfig::default()).unwrap();
        r.add(&one2, "stable", "main").unwrap();
    });
    let rr = timed(|| rp.include(&one));
    let ap = timed(|| aptly.add_publish(&one_dir));
    let no_xz = RepoConfig {
        write_xz: false,
        ..RepoConfig::default()
    };
    let repo_gz = Repository::open_or_create(&t.join("avb"), no_xz).unwrap();
    repo_gz.list(None).unwrap();
    let mut samples = Vec::new();
    for i in 0..5 {
        let d = debs(&t.join(format!("g{i}")), &format!("pkg-g{i}-"), 1);
        samples.push(timed(|| {
            repo_gz.add(&d, "stable", "main").unwrap();
        }));
    }
    samples.sort();
    let av_gz = samples[samples.len() / 2];
    rows.push((format!("1 into {big} (warm, median of 5)"), av, rr, ap));
    rows.push((
        format!("1 into {big} (warm, no Packages.xz, median of 5)"),
        av_gz,
        rr,
        ap,
    ));
    rows.push((format!("1 into {big} (new handle)"), av_cold, rr, ap));

    println!(
        "\n| scenario | aviary | reprepro | aptly | aviary/reprepro | aviary/aptly |\n|---|---:|---:|---:|---:|---:|"
    );
    for (name, a, r, p) in rows {
        println!(
            "| {name} | {} | {} | {} | {:.3}x | {:.3}x |",
            ms(a),
            ms(r),
            ms(p),
            a.as_secs_f64() / r.as_secs_f64(),
            a.as_secs_f64() / p.as_secs_f64()
        );
    }
}
