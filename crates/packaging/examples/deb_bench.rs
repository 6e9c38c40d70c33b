//! Benchmark: Aviary's .deb builder against `dpkg-deb -b`.
//!
//! Generates a repository of 3,000 files and about 50 MB (half compressible
//! text, half random bytes), then builds it with Aviary and with `dpkg-deb -b`
//! at equal settings (gzip -6, xz -1, xz -6), and Aviary's default against
//! dpkg-deb's default (xz -6), printing wall times and compression ratios.
//!
//! Run in release: `cargo run --release -p aviary-packaging --example deb_bench`
//! (arguments: `[files] [megabytes] [--levels]`, default `3000 50`; with
//! `--levels` Aviary alone is also timed at gzip -1..-9 and xz -0..-6). dpkg-deb gets a tree
//! already staged in Debian layout (and computes no md5sums); Aviary starts from
//! the repository, as in the pipeline.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use aviary_packaging::{BuildRequest, Compression, build};

/// A small xorshift generator (deterministic data, no dependency).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

const WORDS: &[&str] = &[
    "canary",
    "deploy",
    "package",
    "version",
    "release",
    "rollback",
    "webhook",
    "rule",
    "action",
    "execution",
    "trigger",
    "sensor",
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "service",
    "host",
    "health",
    "check",
    "traffic",
    "weight",
    "promote",
    "seat",
    "share",
    "function",
    "return",
    "value",
    "config",
    "request",
    "response",
    "error",
    "retry",
];

/// Writes the benchmark repository; returns the total size in bytes.
fn generate(repo: &Path, files: usize, total_bytes: u64) -> std::io::Result<u64> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let avg = total_bytes / files as u64;
    let mut written = 0;
    for i in 0..files {
        let dir = repo.join(format!("app/mod{:02}/sub{}", i % 40, i % 7));
        fs::create_dir_all(&dir)?;
        let size = (avg / 2 + rng.next() % avg) as usize;
        let data: Vec<u8> = if i % 2 == 0 {
            let mut t = String::with_capacity(size + 16);
            while t.len() < size {
                t.push_str(WORDS[(rng.next() % WORDS.len() as u64) as usize]);
                t.push(if rng.next().is_multiple_of(12) {
                    '\n'
                } else {
                    ' '
                });
            }
            t.into_bytes()
        } else {
            (0..size.div_ceil(8))
                .flat_map(|_| rng.next().to_le_bytes())
                .take(size)
                .collect()
        };
        written += data.len() as u64;
        fs::write(dir.join(format!("file{i}.dat")), data)?;
    }
    for s in ["script/cisetup", "script/cibuild", "script/post-inst"] {
        let p = repo.join(s);
        fs::create_dir_all(p.parent().unwrap_or(repo))?;
        fs::write(&p, "#!/bin/sh\nexit 0\n")?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755))?;
    }
    fs::write(
        repo.join("fpm.json"),
        r#"{"name":"bench-app","version":"1.0.0","description":"Benchmark application"}"#,
    )?;
    Ok(written)
}

/// Copies (hard-links) the repository into a dpkg-deb staging tree.
fn stage(repo: &Path, staging: &Path) -> std::io::Result<()> {
    let target = staging.join("opt/bench-app");
    fs::create_dir_all(staging.join("opt"))?;
    let status = Command::new("cp")
        .arg("-al")
        .arg(repo)
        .arg(&target)
        .status()?;
    if !status.success() {
        return Err(std::io::Error::other("cp -al failed"));
    }
    fs::create_dir_all(staging.join("DEBIAN"))?;
    fs::write(
        staging.join("DEBIAN/control"),
        "Package: bench-app\nVersion: 1.0.0-1\nArchitecture: all\nMaintainer: Bench <bench@example.com>\nDescription: Benchmark application\n",
    )?;
    Ok(())
}

/// Runs `dpkg-deb -b` with `args`; returns (seconds, size).
fn dpkg_deb(staging: &Path, out: &Path, args: &[&str]) -> Option<(f64, u64)> {
    let _ = fs::remove_file(out);
    let start = Instant::now();
    let status = Command::new("dpkg-deb")
        .arg("--root-owner-group")
        .args(args)
        .arg("-b")
        .arg(staging)
        .arg(out)
        .stdout(std::process::Stdio::null())
        .status()
        .ok()?;
    let secs = start.elapsed().as_secs_f64();
    if !status.success() {
        return None;
    }
    Some((secs, fs::metadata(out).ok()?.len()))
}

/// Builds with Aviary; returns (seconds, size).
fn aviary(repo: &Path, out: &Path, compression: Compression) -> Option<(f64, u64)> {
    let _ = fs::remove_dir_all(out);
    let mut req = BuildRequest::new(repo, out);
    req.compression = compression;
    req.source_date_epoch = Some(1_700_000_000);
    req.commit = Some("0123456789abcdef".into());
    let start = Instant::now();
    match build(&req) {
        Ok(built) => Some((start.elapsed().as_secs_f64(), built.size)),
        Err(e) => {
            eprintln!("aviary build failed: {e}");
            None
        }
    }
}

fn main() {
    let mut args: Vec<String> = std::env::args().collect();
    let levels = args.iter().any(|a| a == "--levels");
    args.retain(|a| a != "--levels");
    let files: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(3000);
    let mb: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(50);
    let Ok(tmp) = tempfile::tempdir() else {
        eprintln!("cannot create a temporary directory");
        std::process::exit(1);
    };
    let repo = tmp.path().join("bench-app");
    let total = match generate(&repo, files, mb * 1_000_000) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("generating the tree failed: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "tree: {files} files, {:.1} MB (half text, half random), {} threads",
        total as f64 / 1e6,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let staging = tmp.path().join("staging");
    let have_dpkg = stage(&repo, &staging).is_ok()
        && Command::new("dpkg-deb").arg("--version").output().is_ok();
    let out = tmp.path().join("out");
    let dpkg_out = tmp.path().join("dpkg.deb");

    println!(
        "{:<28} {:>9} {:>9} {:>8}   {:>9} {:>9} {:>8}  {:>7}",
        "setting", "aviary s", "MB", "ratio", "dpkg s", "MB", "ratio", "speedup"
    );
    let cases: [(&str, Compression, &[&str]); 4] = [
        (
            "gzip -6 (equal)",
            Compression::Gzip { level: 6 },
            &["-Zgzip", "-z6"],
        ),
        (
            "xz -1 (equal)",
            Compression::Xz { level: 1 },
            &["-Zxz", "-z1"],
        ),
        (
            "xz -6 (equal)",
            Compression::Xz { level: 6 },
            &["-Zxz", "-z6"],
        ),
        ("aviary default vs dpkg", Compression::default(), &[]),
    ];
    for (label, compression, dpkg_args) in cases {
        let a = aviary(&repo, &out, compression);
        let d = if have_dpkg {
            dpkg_deb(&staging, &dpkg_out, dpkg_args)
        } else {
            None
        };
        let fmt = |r: Option<(f64, u64)>| match r {
            Some((s, size)) => format!(
                "{s:>9.2} {:>9.1} {:>7.1}%",
                size as f64 / 1e6,
                100.0 * size as f64 / total as f64
            ),
            None => format!("{:>9} {:>9} {:>8}", "-", "-", "-"),
        };
        let speedup = match (a, d) {
            (Some((sa, _)), Some((sd, _))) if sa > 0.0 => format!("{:>6.1}x", sd / sa),
            _ => "-".to_owned(),
        };
        println!("{label:<28} {}   {}  {speedup:>7}", fmt(a), fmt(d));
    }
    if levels {
        println!("\naviary alone, per level:");
        let all = (1..=9)
            .map(|level| Compression::Gzip { level })
            .chain((0..=6).map(|level| Compression::Xz { level }));
        for compression in all {
            if let Some((s, size)) = aviary(&repo, &out, compression) {
                println!(
                    "{:<12} {s:>7.2} s {:>7.1} MB {:>6.1}%",
                    format!("{} -{}", compression.extension(), compression.level()),
                    size as f64 / 1e6,
                    100.0 * size as f64 / total as f64
                );
            }
        }
    }
}
