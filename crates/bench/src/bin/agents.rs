//! `agents`: N simulated agents (default 1,000) connected to the real server
//! over SSE (`/api/v1/agent/watch`, one host and agent token each). Then a
//! canary deploy changes the advertised version, and it reports the time
//! from the deploy request until every agent has seen the new version, and
//! the server's RSS (idle, with every agent connected, peak).
//!
//! Figures are printed, never asserted. Run (raise the open-file limit for
//! the connections):
//! `ulimit -n 8192; cargo run --release -p aviary-bench --bin agents -- --aviary target/release/aviary`

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Options.
#[derive(Parser, Debug)]
#[command(about = "N simulated agents over SSE: notification time and server RSS")]
struct Args {
    /// The aviary binary (build it with --release first).
    #[arg(long, default_value = "target/release/aviary")]
    aviary: PathBuf,
    /// Simulated agents.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Version changes to measure.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

struct Server {
    child: Child,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
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

/// One agent: opens the watch stream and reports (via `seen`) the moment
/// each expected version appears in it.
async fn agent(
    port: u16,
    token: String,
    versions: Arc<Vec<String>>,
    seen: tokio::sync::mpsc::UnboundedSender<(usize, Instant)>,
    connected: tokio::sync::mpsc::UnboundedSender<()>,
) -> Result<()> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(
        format!(
            "GET /api/v1/agent/watch HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let mut next = 0;
    let mut announced = false;
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("stream closed");
        }
        buf.extend_from_slice(&chunk[..n]);
        if !announced && buf.windows(11).any(|w| w == b"assignments") {
            announced = true;
            let _ = connected.send(());
        }
        while next < versions.len() {
            let marker = format!("\"version\":\"{}\"", versions[next]);
            if buf.windows(marker.len()).any(|w| w == marker.as_bytes()) {
                let _ = seen.send((next, Instant::now()));
                next += 1;
                buf.clear();
            } else {
                break;
            }
        }
        if buf.len() > 64 * 1024 {
            buf.drain(..buf.len() - 1024);
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = std::env::temp_dir().join(format!("aviary-bench-agents-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new(&args.aviary)
        .arg("server")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env("AVIARY_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", args.aviary.display()))?;
    let server = Server {
        child,
        dir: dir.clone(),
    };
    let pid = server.child.id();
    let url = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let token = loop {
        if let Ok(t) = std::fs::read_to_string(dir.join("data/admin.token"))
            && client.get(format!("{url}/healthz")).send().await.is_ok()
        {
            break t.trim().to_string();
        }
        if Instant::now() > deadline {
            bail!("server did not start");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let idle = rss_kb(pid, "VmRSS:");

    // Hosts and agent tokens.
    let t = Instant::now();
    let mut tokens = Vec::with_capacity(args.agents);
    for i in 0..args.agents {
        // Every agent carries the canary tag, so every one is told of a
        // canary version change.
        let tag = "bench::app_canary";
        let r: serde_json::Value = client
            .post(format!("{url}/api/v1/hosts/h{i}/token"))
            .bearer_auth(&token)
            .json(&json!({"address": format!("10.1.{}.{}", i / 250, i % 250 + 1), "tags": [tag]}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        tokens.push(r["token"].as_str().context("token")?.to_string());
    }
    println!(
        "created {} hosts with agent tokens in {:.2?}",
        args.agents,
        t.elapsed()
    );

    let versions: Arc<Vec<String>> =
        Arc::new((1..=args.rounds).map(|r| format!("{r}.0")).collect());
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let (conn_tx, mut conn_rx) = tokio::sync::mpsc::unbounded_channel();
    let t = Instant::now();
    for tok in &tokens {
        let (v, s, c) = (versions.clone(), seen_tx.clone(), conn_tx.clone());
        let tok = tok.clone();
        tokio::spawn(async move {
            if let Err(e) = agent(port, tok, v, s, c).await {
                eprintln!("agent: {e}");
            }
        });
    }
    for _ in 0..args.agents {
        conn_rx.recv().await.context("agents")?;
    }
    let connected = rss_kb(pid, "VmRSS:");
    println!(
        "{} agents connected over SSE in {:.2?}; server RSS idle {} MB, with them {} MB",
        args.agents,
        t.elapsed(),
        idle / 1024,
        connected / 1024
    );
    for (round, v) in versions.iter().enumerate() {
        let t0 = Instant::now();
        let r = client
            .post(format!("{url}/api/v1/deploys"))
            .bearer_auth(&token)
            .json(&json!({"operation": "canary", "app": "bench", "version": v,
                           "parameters": {"timeout": 1, "lock_wait": 30}}))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("deploy refused: {}", r.text().await?);
        }
        let mut last = t0;
        for _ in 0..tokens.len() {
            let (i, at) = seen_rx.recv().await.context("seen")?;
            debug_assert_eq!(i, round);
            last = last.max(at);
        }
        println!(
            "round {}: canary version {v} reached all {} agents {:.1} ms after the deploy request",
            round + 1,
            tokens.len(),
            (last - t0).as_secs_f64() * 1000.0
        );
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    println!(
        "server RSS peak {} MB (VmHWM), now {} MB",
        rss_kb(pid, "VmHWM:") / 1024,
        rss_kb(pid, "VmRSS:") / 1024
    );
    drop(server);
    Ok(())
}
