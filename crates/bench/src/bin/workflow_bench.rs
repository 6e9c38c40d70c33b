//! `workflow_bench`: measures durable Orquesta workflows end to end on the
//! real server binary (state stored at every step):
//!
//! - (a) a sequential workflow of N `core.noop` tasks: engine overhead per
//!   task (workflow wall time / N);
//! - (b) a sequential workflow of N `core.local cmd=true` tasks against a
//!   bash script that runs the same process N times in the same run (the
//!   runner spawns `/bin/bash -c true` per task; the script is timed both
//!   spawning `bash -c true` and spawning `/bin/true`): the ratio;
//! - (c) one with-items task over M items at concurrency C (`core.noop`).
//!
//! Wall times are the server's own `created_at` -> `finished_at` of the
//! workflow execution. Figures are printed, never asserted.
//! Run: `cargo build --release -p aviary -p aviary-bench &&
//! target/release/workflow_bench --backend sqlite`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::{Value, json};

/// Benchmark options.
#[derive(Parser, Debug)]
#[command(about = "Durable workflow benchmark of the aviary server")]
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
    /// Tasks in the sequential workflows.
    #[arg(long, default_value_t = 500)]
    tasks: usize,
    /// Items of the with-items workflow.
    #[arg(long, default_value_t = 1000)]
    items: usize,
    /// Concurrency of the with-items task.
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// Keep the server's data directory (to look at the executions after).
    #[arg(long)]
    keep_data: bool,
}

struct Server {
    child: Child,
    url: String,
    token: String,
    dir: PathBuf,
    keep: bool,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.keep {
            eprintln!("data kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn sequential(n: usize, action: &str) -> String {
    let mut s = String::from("version: 1.0\ntasks:\n");
    for i in 0..n {
        s.push_str(&format!("  t{i}:\n    {action}\n"));
        if i + 1 < n {
            s.push_str(&format!("    next:\n      - do: t{}\n", i + 1));
        }
    }
    s
}

fn write_pack(root: &Path, args: &Args) -> Result<()> {
    let pack = root.join("wfbench");
    write(
        &pack.join("pack.yaml"),
        "ref: wfbench\nname: wfbench\ndescription: workflow benchmark\nversion: 0.0.1\n",
    )?;
    let workflows = [
        ("noops", sequential(args.tasks, "action: core.noop")),
        (
            "trues",
            sequential(
                args.tasks,
                "action: core.local\n    input:\n      cmd: \"true\"",
            ),
        ),
        (
            "items",
            format!(
                "version: 1.0\ninput:\n  - xs\ntasks:\n  each:\n    with:\n      items: x in <% ctx(xs) %>\n      concurrency: {}\n    action: core.noop\n",
                args.concurrency
            ),
        ),
    ];
    for (name, body) in workflows {
        write(
            &pack.join(format!("actions/{name}.yaml")),
            &format!(
                "name: {name}\npack: wfbench\nrunner_type: orquesta\nentry_point: workflows/{name}.yaml\nparameters:\n  xs:\n    type: array\n"
            ),
        )?;
        write(&pack.join(format!("actions/workflows/{name}.yaml")), &body)?;
    }
    Ok(())
}

fn start_server(args: &Args) -> Result<Server> {
    let dir = std::env::temp_dir().join(format!("aviary-wfbench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    write_pack(&dir.join("packs"), args)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let database = match args.backend.as_str() {
        "sqlite" => format!("sqlite:{}", dir.join("data/aviary.db").display()),
        "postgres" => format!(
            "{}?schema=aviary_wfbench_{}",
            args.postgres,
            std::process::id()
        ),
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
    let token_path = dir.join("data/admin.token");
    let deadline = Instant::now() + Duration::from_secs(30);
    let client = reqwest::blocking::Client::new();
    loop {
        if let Ok(t) = std::fs::read_to_string(&token_path)
            && client
                .get(format!("{url}/healthz"))
                .send()
                .is_ok_and(|r| r.status().is_success())
        {
            return Ok(Server {
                child,
                url,
                token: t.trim().to_string(),
                dir,
                keep: args.keep_data,
            });
        }
        if Instant::now() > deadline {
            bail!("server did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a workflow to its end; returns the server-side wall time.
fn run(s: &Server, action: &str, params: Value) -> Result<Duration> {
    let client = reqwest::blocking::Client::new();
    let r = client
        .post(format!("{}/api/v1/executions", s.url))
        .bearer_auth(&s.token)
        .json(&json!({"action": action, "parameters": params}))
        .send()?;
    if r.status().as_u16() != 201 {
        bail!("cannot start {action}: {}", r.text().unwrap_or_default());
    }
    let exec: Value = r.json()?;
    let id = exec["id"].as_str().context("execution id")?.to_string();
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let e: Value = client
            .get(format!("{}/api/v1/executions/{id}", s.url))
            .bearer_auth(&s.token)
            .send()?
            .json()?;
        if let Some(finished) = e["finished_at"].as_str() {
            if e["status"] != "succeeded" {
                let mut detail = e["result"]["error"].to_string();
                detail.truncate(400);
                bail!("{action} ended {}: {detail}", e["status"]);
            }
            let created = e["created_at"].as_str().context("created_at")?;
            let f: chrono::DateTime<chrono::Utc> = finished.parse()?;
            let c: chrono::DateTime<chrono::Utc> = created.parse()?;
            return Ok((f - c).to_std().unwrap_or_default());
        }
        if Instant::now() > deadline {
            bail!("{action} did not finish: {e}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn script(n: usize, cmd: &str) -> Result<Duration> {
    let t = Instant::now();
    let status = Command::new("/bin/bash")
        .arg("-c")
        .arg(format!("for i in $(seq {n}); do {cmd}; done"))
        .status()?;
    if !status.success() {
        bail!("the bash baseline failed");
    }
    Ok(t.elapsed())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> Result<()> {
    let args = Args::parse();
    let server = start_server(&args)?;
    // Warm up (first executions open files, build caches).
    run(&server, "wfbench.items", json!({"xs": [1, 2, 3]}))?;

    let n = args.tasks;
    let noops = run(&server, "wfbench.noops", json!({}))?;
    println!(
        "(a) {n} sequential core.noop tasks: {:.0} ms, engine overhead {:.3} ms/task ({} backend)",
        ms(noops),
        ms(noops) / n as f64,
        args.backend
    );

    let trues = run(&server, "wfbench.trues", json!({}))?;
    let bash_c = script(n, "/bin/bash -c true")?;
    let bin_true = script(n, "/bin/true")?;
    println!(
        "(b) {n} sequential core.local cmd=true tasks: {:.0} ms ({:.3} ms/task)",
        ms(trues),
        ms(trues) / n as f64
    );
    println!(
        "    bash script, {n}x `/bin/bash -c true` (what the runner spawns): {:.0} ms -> ratio {:.2}",
        ms(bash_c),
        trues.as_secs_f64() / bash_c.as_secs_f64()
    );
    println!(
        "    bash script, {n}x `/bin/true`: {:.0} ms -> ratio {:.2}",
        ms(bin_true),
        trues.as_secs_f64() / bin_true.as_secs_f64()
    );

    let xs: Vec<usize> = (0..args.items).collect();
    let items = run(&server, "wfbench.items", json!({ "xs": xs }))?;
    println!(
        "(c) with-items over {} items at concurrency {}: {:.0} ms ({:.3} ms/item, {:.0} items/s)",
        args.items,
        args.concurrency,
        ms(items),
        ms(items) / args.items as f64,
        args.items as f64 / items.as_secs_f64()
    );
    Ok(())
}
