//! `aviary-bench`: measures Aviary end to end with signed GitHub push
//! webhooks of the real payload shape. It starts the real server binary on
//! loopback with a rule that runs `core.noop`, then reports:
//!
//! - sustained events/s from webhook to finished execution (closed loop),
//! - p50/p99 webhook-to-finished latency at a fixed rate (open loop),
//! - server RSS idle and peak under load,
//! - events in vs trigger instances stored vs executions succeeded.
//!
//! Figures are printed, never asserted: this is a benchmark, not a test.
//! Run: `cargo run --release -p aviary-bench -- --backend sqlite` (see --help).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};

/// Benchmark options.
#[derive(Parser, Debug)]
#[command(about = "End-to-end webhook benchmark of the aviary server")]
struct Args {
    /// The aviary binary (build it with --release first).
    #[arg(long, default_value = "target/release/aviary")]
    aviary: PathBuf,
    /// sqlite or postgres.
    #[arg(long, default_value = "sqlite")]
    backend: String,
    /// PostgreSQL URL for --backend postgres.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test")]
    postgres: String,
    /// Events for the throughput phase.
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Concurrent senders for the throughput phase.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Fixed rate (events/s) for the latency phase.
    #[arg(long, default_value_t = 200)]
    rate: u64,
    /// Duration of the latency phase, seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

const SECRET: &str = "bench-secret";

fn sign(body: &[u8]) -> String {
    let mut mac = match Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn push_payload(i: usize) -> Vec<u8> {
    let after = format!("{:040x}", i as u128 * 7919 + 1);
    let v = json!({
        "ref": "refs/heads/main",
        "before": "0000000000000000000000000000000000000000",
        "after": after,
        "created": false, "deleted": false, "forced": false,
        "compare": "https://github.com/acme/webapp/compare/abc...def",
        "repository": {"id": 1, "name": "webapp", "full_name": "acme/webapp", "private": false,
                        "clone_url": "https://github.com/acme/webapp.git", "default_branch": "main"},
        "pusher": {"name": "octocat", "email": "octocat@example.com"},
        "sender": {"login": "octocat", "id": 583231},
        "head_commit": {"id": after, "message": "Bench commit", "timestamp": "2026-11-27T10:00:00Z",
                         "author": {"name": "Octo Cat", "email": "octocat@example.com"},
                         "added": [], "removed": [], "modified": ["README.md"]},
        "commits": [{"id": after, "message": "Bench commit", "modified": ["README.md"]}],
    });
    serde_json::to_vec(&v).unwrap_or_default()
}

struct Server {
    child: Child,
    url: String,
    token: String,
    _dir: tempfile_dir::Dir,
}

mod tempfile_dir {
    //! A minimal temp dir removed on drop (keeps the bench free of extra deps).
    use std::path::PathBuf;
    /// The directory.
    pub struct Dir(pub PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

fn start_server(args: &Args) -> Result<Server> {
    let dir = std::env::temp_dir().join(format!("aviary-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let pack = dir.join("packs/bench");
    std::fs::create_dir_all(pack.join("rules"))?;
    std::fs::write(
        pack.join("pack.yaml"),
        "ref: bench\nname: bench\ndescription: benchmark\nversion: 0.0.1\n",
    )?;
    std::fs::write(
        pack.join("rules/push.yaml"),
        "name: push\npack: bench\ntrigger:\n  type: core.st2.webhook\n  parameters:\n    url: github\n    secret: \"{{ st2kv.system.bench_secret }}\"\ncriteria:\n  trigger.headers['X-GitHub-Event']:\n    type: equals\n    pattern: push\n  trigger.body.ref:\n    type: startswith\n    pattern: refs/heads/\naction:\n  ref: core.noop\n",
    )?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let database = match args.backend.as_str() {
        "sqlite" => format!("sqlite:{}", dir.join("data/aviary.db").display()),
        "postgres" => {
            let schema = format!("aviary_bench_{}", std::process::id());
            format!("{}?schema={schema}", args.postgres)
        }
        other => bail!("unknown backend '{other}': use sqlite or postgres"),
    };
    let child = Command::new(&args.aviary)
        .arg("server")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--database", &database])
        .arg("--packs")
        .arg(dir.join("packs"))
        .env("AVIARY_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| {
            format!(
                "cannot start {} (build it with cargo build --release)",
                args.aviary.display()
            )
        })?;
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let token_path = dir.join("data/admin.token");
    loop {
        if let Ok(t) = std::fs::read_to_string(&token_path)
            && probe::healthy(&format!("{url}/healthz"))
        {
            return Ok(Server {
                child,
                url,
                token: t.trim().to_string(),
                _dir: tempfile_dir::Dir(dir),
            });
        }
        if Instant::now() > deadline {
            bail!("server did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

mod probe {
    //! A tiny blocking health probe over std TCP.
    /// True when GET `url` answers 200 (plain HTTP on loopback).
    pub fn healthy(url: &str) -> bool {
        use std::io::{Read, Write};
        let Some(rest) = url.strip_prefix("http://") else {
            return false;
        };
        let (host, path) = rest
            .split_once('/')
            .map(|(h, p)| (h, format!("/{p}")))
            .unwrap_or((rest, "/".into()));
        let Ok(mut s) = std::net::TcpStream::connect(host) else {
            return false;
        };
        let _ = write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        );
        let mut buf = String::new();
        let _ = s.read_to_string(&mut buf);
        buf.starts_with("HTTP/1.1 200")
    }
}

async fn send(client: &reqwest::Client, url: &str, i: usize) -> Result<Value> {
    let body = push_payload(i);
    let r = client
        .post(format!("{url}/api/v1/webhooks/github"))
        .header("content-type", "application/json")
        .header("X-GitHub-Event", "push")
        .header(
            "X-GitHub-Delivery",
            format!("bench-{}-{i}", std::process::id()),
        )
        .header("X-Hub-Signature-256", sign(&body))
        .body(body)
        .send()
        .await?;
    if r.status().as_u16() != 202 {
        bail!("webhook answered {}", r.status());
    }
    Ok(r.json().await?)
}

async fn stats(client: &reqwest::Client, s: &Server) -> Result<Value> {
    Ok(client
        .get(format!("{}/api/v1/stats", s.url))
        .bearer_auth(&s.token)
        .send()
        .await?
        .json()
        .await?)
}

async fn wait_all_done(client: &reqwest::Client, s: &Server, expected: u64) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let st = stats(client, s).await?;
        let done = st["executions"]["succeeded"].as_u64().unwrap_or(0)
            + st["executions"]["failed"].as_u64().unwrap_or(0);
        if done >= expected {
            return Ok(st);
        }
        if Instant::now() > deadline {
            bail!("executions did not finish: {st}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let server = start_server(&args)?;
    let pid = server.child.id();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()?;
    // Store the webhook secret, encrypted.
    let r = client
        .put(format!("{}/api/v1/keys/system/bench_secret", server.url))
        .bearer_auth(&server.token)
        .json(&json!({"value": SECRET, "secret": true}))
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("cannot set the secret: {}", r.status());
    }
    // Warm up, then measure idle RSS.
    for i in 0..50 {
        send(&client, &server.url, 1_000_000_000 + i).await?;
    }
    wait_all_done(&client, &server, 50).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss = rss_kb(pid, "VmRSS:");

    // Phase 1: closed-loop throughput.
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let client = client.clone();
        let url = server.url.clone();
        let next = next.clone();
        let total = args.events;
        tasks.push(tokio::spawn(async move {
            let mut errors = 0usize;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return errors;
                }
                if send(&client, &url, i).await.is_err() {
                    errors += 1;
                }
            }
        }));
    }
    let mut send_errors = 0;
    for t in tasks {
        send_errors += t.await.unwrap_or(1);
    }
    let accepted_at = started.elapsed();
    let st = wait_all_done(&client, &server, 50 + args.events as u64).await?;
    let finished_at = started.elapsed();
    let peak_rss = rss_kb(pid, "VmHWM:");
    let tput = args.events as f64 / finished_at.as_secs_f64();

    // Phase 2: open-loop latency at a fixed rate.
    let n = (args.rate * args.seconds) as usize;
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let base = 2_000_000_000usize;
    let t0 = Instant::now();
    let wall0 = chrono_now_micros();
    let mut sends = Vec::with_capacity(n);
    for k in 0..n {
        let due = t0 + interval * k as u32;
        tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
        let client = client.clone();
        let url = server.url.clone();
        let sent_us = wall0 + (Instant::now() - t0).as_micros() as i64;
        sends.push(tokio::spawn(async move {
            (sent_us, send(&client, &url, base + k).await)
        }));
    }
    let mut ids = Vec::new();
    for s in sends {
        if let Ok((sent, Ok(v))) = s.await
            && let Some(id) = v["executions"][0].as_str()
        {
            ids.push((sent, id.to_string()));
        }
    }
    let final_stats = wait_all_done(&client, &server, 50 + args.events as u64 + n as u64).await?;
    let mut lat = Vec::new();
    for (sent, id) in &ids {
        let e: Value = client
            .get(format!("{}/api/v1/executions/{id}", server.url))
            .bearer_auth(&server.token)
            .send()
            .await?
            .json()
            .await?;
        if let Some(fin) = e["finished_at"].as_str().and_then(parse_rfc3339_micros) {
            lat.push((fin - sent) as f64 / 1000.0);
        }
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));

    let sent_total = 50 + args.events as u64 + n as u64;
    println!(
        "aviary webhook benchmark — backend {}, {} cores",
        args.backend,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "throughput: {} signed push webhooks, {} concurrent senders",
        args.events, args.concurrency
    );
    println!(
        "  accepted (2xx) in        {:>8.2} s  ({:.0} events/s)",
        accepted_at.as_secs_f64(),
        args.events as f64 / accepted_at.as_secs_f64()
    );
    println!(
        "  all executions finished  {:>8.2} s  ({:.0} events/s to finished)   target >= 2000 (sqlite)",
        finished_at.as_secs_f64(),
        tput
    );
    println!("  send errors              {send_errors}");
    println!(
        "latency at {} events/s for {} s ({} events, webhook sent -> execution finished):",
        args.rate, args.seconds, n
    );
    println!(
        "  p50 {:.2} ms   p99 {:.2} ms   max {:.2} ms   target p99 <= 25 ms",
        percentile(&lat, 50.0),
        percentile(&lat, 99.0),
        lat.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "memory: idle RSS {:.1} MB (target <= 30), peak RSS under load {:.1} MB",
        idle_rss as f64 / 1024.0,
        peak_rss as f64 / 1024.0
    );
    println!(
        "events in {}  trigger instances stored {}  executions succeeded {}  failed {}  -> {}",
        sent_total,
        final_stats["trigger_instances"],
        final_stats["executions"]["succeeded"],
        final_stats["executions"]["failed"],
        if final_stats["trigger_instances"].as_u64() == Some(sent_total)
            && final_stats["executions"]["succeeded"].as_u64() == Some(sent_total)
        {
            "none lost"
        } else {
            "MISMATCH"
        }
    );
    let _ = st;
    drop(server);
    if args.backend == "postgres" {
        // Drop the benchmark's schema (best effort).
        let _ = Command::new("psql")
            .arg(&args.postgres)
            .arg("-qc")
            .arg(format!(
                "DROP SCHEMA IF EXISTS aviary_bench_{} CASCADE",
                std::process::id()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    Ok(())
}

fn chrono_now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Parses an RFC 3339 time to Unix microseconds.
fn parse_rfc3339_micros(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_micros())
}
