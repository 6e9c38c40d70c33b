//! `aviary demo`: the seed's pipeline on one machine, in one command.
//!
//! The demo has two processes:
//! - the **supervisor** (`aviary demo --supervise`, started in the
//!   background by the first `aviary demo`) owns everything long-lived: the
//!   Aviary server, a bridge with a few local hosts (network namespace and
//!   overlay root each, see `aviary-testhosts`) running `aviary agent`, and
//!   haproxy in front when it is installed. It writes `ready.json` and waits;
//!   on SIGTERM (`aviary demo --down`) it stops everything it started.
//! - the **foreground** command writes the `cicd` pack and a sample
//!   application repository (a bare repository with Aviary's post-receive
//!   hook), pushes a commit and follows the pipeline (CI -> package -> APT
//!   -> canary) live, then prints where to look and what to type next.
//!
//! Everything lives under one folder (default `/var/tmp/aviary-demo`);
//! `aviary demo --down` removes it.

mod files;
mod supervisor;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// The sample application's name (its package and tags).
pub const APP: &str = "hello-aviary";

/// `aviary demo` arguments.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Folder for everything the demo makes.
    #[arg(long, default_value = "/var/tmp/aviary-demo")]
    pub dir: PathBuf,
    /// Stop and remove everything the demo made.
    #[arg(long)]
    pub down: bool,
    /// Production hosts to start (plus one canary).
    #[arg(long, default_value_t = 2)]
    pub production_hosts: u8,
    /// Port of the demo's Aviary server.
    #[arg(long, default_value_t = 9710)]
    pub port: u16,
    /// Post each stage's outcome to this Slack-compatible incoming webhook.
    #[arg(long)]
    pub notify_url: Option<String>,
    /// Seconds a deploy waits for hosts to report the version installed and healthy.
    #[arg(long, default_value_t = 120)]
    pub deploy_timeout: u32,
    /// Seconds a new version may take to pass its health check on a host.
    #[arg(long, default_value_t = 30)]
    pub health_grace: u32,
    /// Internal: run as the demo's supervisor.
    #[arg(long, hide = true)]
    pub supervise: bool,
}

/// What the supervisor tells the foreground command (`ready.json`).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Ready {
    /// Server URL (reachable from this machine and from the hosts).
    pub url: String,
    /// Admin token.
    pub token: String,
    /// Hosts: name, address, tags.
    pub hosts: Vec<Value>,
    /// haproxy front end (`host:port`), when haproxy runs.
    pub haproxy: Option<String>,
}

/// Runs `aviary demo`.
pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    if args.supervise {
        return supervisor::run(&args).await;
    }
    if args.down {
        return down(&args.dir);
    }
    up(&args).await
}

fn step(msg: &str) {
    println!("==> {msg}");
}

fn pid_file(dir: &Path) -> PathBuf {
    dir.join("supervisor.pid")
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn read_pid(dir: &Path) -> Option<i32> {
    std::fs::read_to_string(pid_file(dir))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|&p| alive(p))
}

fn down(dir: &Path) -> anyhow::Result<ExitCode> {
    if let Some(pid) = read_pid(dir) {
        step(&format!("stopping the demo (supervisor pid {pid})"));
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
        let t = Instant::now();
        while alive(pid) && t.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(200));
        }
        if alive(pid) {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
        }
    }
    if dir.exists() {
        if !dir.join("demo.marker").exists() {
            bail!(
                "{}: not made by `aviary demo` (no demo.marker); not removing it",
                dir.display()
            );
        }
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    step(&format!("removed {}", dir.display()));
    Ok(ExitCode::SUCCESS)
}

fn write_tree(
    root: &Path,
    files: impl Iterator<Item = (String, String, bool)>,
) -> anyhow::Result<()> {
    for (rel, text, exec) in files {
        let path = root.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        if exec {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("chmod {}", path.display()))?;
        }
    }
    Ok(())
}

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Aviary demo")
        .env("GIT_AUTHOR_EMAIL", "demo@aviary.invalid")
        .env("GIT_COMMITTER_NAME", "Aviary demo")
        .env("GIT_COMMITTER_EMAIL", "demo@aviary.invalid")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running git {args:?} (is git installed?)"))?;
    if !out.status.success() {
        bail!(
            "git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

async fn up(args: &DemoArgs) -> anyhow::Result<ExitCode> {
    let dir = &args.dir;
    let started = Instant::now();
    if read_pid(dir).is_none() {
        if dir.exists() && !dir.join("demo.marker").exists() {
            bail!(
                "{}: exists and was not made by `aviary demo`; pick another --dir",
                dir.display()
            );
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("demo.marker"), "made by aviary demo\n")?;
        step(&format!(
            "writing the cicd pack to {}",
            dir.join("packs/cicd").display()
        ));
        write_tree(
            &dir.join("packs/cicd"),
            files::CICD_PACK.iter().map(|(p, t)| {
                let text = if *p == "config.yaml" {
                    demo_settings(t, args)
                } else {
                    t.to_string()
                };
                (p.to_string(), text, false)
            }),
        )?;
        step("starting the server, the hosts and their agents (in the background)");
        let _ = std::fs::remove_file(dir.join("ready.json"));
        let log = std::fs::File::create(dir.join("supervisor.log"))?;
        let exe = std::env::current_exe().context("cannot find the aviary executable")?;
        let mut cmd = Command::new(exe);
        cmd.arg("demo")
            .arg("--supervise")
            .arg("--dir")
            .arg(dir)
            .arg("--production-hosts")
            .arg(args.production_hosts.to_string())
            .arg("--port")
            .arg(args.port.to_string())
            .arg("--health-grace")
            .arg(args.health_grace.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        cmd.spawn().context("cannot start the demo supervisor")?;
    } else {
        step("the demo is already running; pushing a new commit");
    }
    let ready = wait_ready(dir).await?;
    for h in &ready.hosts {
        println!(
            "    host {:<10} {:<12} {}",
            h["name"].as_str().unwrap_or(""),
            h["address"].as_str().unwrap_or(""),
            h["tags"]
        );
    }
    if let Some(front) = &ready.haproxy {
        println!(
            "    haproxy    http://{front}/ (production pool; header X-Hello-Aviary-Canary: true forces the canary)"
        );
    }
    let api = Api::new(&ready)?;

    // The sample application: a bare repository with Aviary's hook, and a work tree.
    let bare = dir.join("repos").join(format!("{APP}.git"));
    let work = dir.join(APP);
    if !bare.exists() {
        step(&format!(
            "creating the sample application repository {}",
            bare.display()
        ));
        let secret = format!("{:032x}", rand_u128());
        std::fs::write(dir.join("webhook.secret"), &secret)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                dir.join("webhook.secret"),
                std::fs::Permissions::from_mode(0o600),
            )?;
        }
        api.put(
            "/api/v1/keys/system/cicd_webhook_secret",
            json!({"value": secret, "secret": true}),
        )
        .await
        .context("storing the webhook secret in the datastore")?;
        std::fs::create_dir_all(bare.parent().unwrap_or(dir))?;
        git(
            dir,
            &[
                "init",
                "-q",
                "--bare",
                "-b",
                "main",
                &bare.display().to_string(),
            ],
        )?;
        crate::git_hook::install(
            &bare,
            &crate::git_hook::HookTarget {
                server: ready.url.clone(),
                webhook: "push".into(),
                secret_file: Some(dir.join("webhook.secret")),
                token_file: None,
            },
            Some(APP.into()),
            true,
        )?;
        git(
            dir,
            &[
                "clone",
                "-q",
                &bare.display().to_string(),
                &work.display().to_string(),
            ],
        )?;
        write_tree(
            &work,
            files::SAMPLE_APP
                .iter()
                .map(|(p, t, x)| (p.to_string(), t.to_string(), *x)),
        )?;
        git(&work, &["add", "-A"])?;
        git(
            &work,
            &["commit", "-q", "-m", "hello-aviary: first version"],
        )?;
    } else {
        // Another run: a new commit so there is something new to deploy.
        let stamp = chrono_like_now();
        std::fs::write(work.join("CHANGES"), format!("demo run at {stamp}\n"))?;
        git(&work, &["add", "-A"])?;
        git(
            &work,
            &[
                "commit",
                "-q",
                "-m",
                &format!("hello-aviary: change at {stamp}"),
            ],
        )?;
    }
    let commit = git(&work, &["rev-parse", "HEAD"])?.trim().to_string();
    step(&format!(
        "git push (commit {})",
        &commit[..12.min(commit.len())]
    ));
    let pushed_at = Instant::now();
    git(&work, &["push", "-q", "origin", "HEAD:main"])?;

    let outcome = follow_pipeline(&api, &commit).await?;
    let took = pushed_at.elapsed();
    println!();
    match outcome {
        Some(version) => {
            step(&format!(
                "the canary runs {APP} {version}: push to canary in {:.1} s (demo up in {:.1} s)",
                took.as_secs_f64(),
                started.elapsed().as_secs_f64()
            ));
            if let Ok(split) = timing_split(&api, &commit, took).await {
                println!("    {split}");
            }
            print_next(&ready, dir);
            Ok(ExitCode::SUCCESS)
        }
        None => {
            step("the pipeline stopped before the canary; see the executions above");
            print_next(&ready, dir);
            Ok(ExitCode::from(1))
        }
    }
}

/// The pack's settings with the demo's choices (notification URL, deploy timeout).
fn demo_settings(config: &str, args: &DemoArgs) -> String {
    let mut out = String::new();
    for line in config.lines() {
        if line == "  notify_url: \"\""
            && let Some(url) = &args.notify_url
        {
            out.push_str(&format!(
                "  notify_url: {}\n",
                serde_json::Value::from(url.as_str())
            ));
        } else if line.starts_with("  deploy_timeout: ") {
            out.push_str(&format!("  deploy_timeout: {}\n", args.deploy_timeout));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn print_next(ready: &Ready, dir: &Path) {
    let data = dir.join("data");
    println!(
        "\nWhere to look:\n  export AVIARY_URL={url} AVIARY_DATA_DIR={data}   # the CLI then finds the demo server and its token\n  \
         aviary execution list              # every step, with its trace\n  \
         aviary host list                   # hosts, tags, installed versions, health",
        data = data.display(),
        url = ready.url,
    );
    if let Some(front) = &ready.haproxy {
        println!(
            "  curl -s http://{front}/                                   # production pool\n  \
             curl -s -H 'X-Hello-Aviary-Canary: true' http://{front}/    # the canary"
        );
    }
    println!(
        "\nWhat to try next:\n  aviary promote {APP}                # production takes exactly what the canary runs\n  \
         cd {work} && sed -i s/assertTrue/assertFalse/ test_app.py && git commit -qam broken && git push -q\n                                     # CI stops a broken commit: nothing is deployed\n  \
         aviary rollback {APP}               # canaries back to production's version\n  \
         aviary demo                         # push another commit through the pipeline\n  \
         aviary demo --down                  # remove everything the demo made",
        work = dir.join(APP).display()
    );
}

async fn wait_ready(dir: &Path) -> anyhow::Result<Ready> {
    let path = dir.join("ready.json");
    let t = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(&path)
            && let Ok(r) = serde_json::from_str::<Ready>(&text)
        {
            return Ok(r);
        }
        if read_pid(dir).is_none() && t.elapsed() > Duration::from_secs(3) {
            let log = std::fs::read_to_string(dir.join("supervisor.log")).unwrap_or_default();
            bail!(
                "the demo supervisor stopped before it was ready:\n{}",
                log.lines()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!(
                "the demo did not get ready within 120 s; see {}",
                dir.join("supervisor.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A small API client for the demo.
pub struct Api {
    client: reqwest::Client,
    url: String,
    token: String,
}

impl Api {
    fn new(ready: &Ready) -> anyhow::Result<Self> {
        Ok(Self {
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
            url: ready.url.trim_end_matches('/').to_string(),
            token: ready.token.clone(),
        })
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let r = self
            .client
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .send()
            .await?;
        let status = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("GET {path}: {status}: {v}");
        }
        Ok(v)
    }

    async fn put(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let r = self
            .client
            .put(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await?;
        let status = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("POST {path}: {status}: {v}");
        }
        Ok(v)
    }
}

/// Follows the executions of one pushed commit until the canary deploy ends
/// (Some(version)) or a step fails (None), printing each change once.
async fn follow_pipeline(api: &Api, commit: &str) -> anyhow::Result<Option<String>> {
    let t = Instant::now();
    let mut seen: std::collections::HashMap<String, String> = Default::default();
    let mut ci_seen = false;
    loop {
        let list = api.get("/api/v1/executions?limit=50").await?;
        let mut execs: Vec<Value> = list.as_array().cloned().unwrap_or_default();
        execs.reverse(); // oldest first
        let mine: Vec<&Value> = execs.iter().filter(|e| belongs_to(e, commit)).collect();
        for e in &mine {
            let id = e["id"].as_str().unwrap_or_default().to_string();
            let status = e["status"].as_str().unwrap_or_default().to_string();
            if seen.get(&id) != Some(&status) {
                println!(
                    "    {:>6.1}s  {:<28} {:<10} {}",
                    t.elapsed().as_secs_f64(),
                    e["action"].as_str().unwrap_or_default(),
                    status,
                    summary(e)
                );
                seen.insert(id, status);
            }
        }
        for e in &mine {
            let action = e["action"].as_str().unwrap_or_default();
            let status = e["status"].as_str().unwrap_or_default();
            if action == "core.ci_build" {
                ci_seen = true;
            }
            if action == "core.deploy_canary" && status == "succeeded" {
                return Ok(e["parameters"]["version"].as_str().map(str::to_string));
            }
            let failed = matches!(status, "failed" | "timeout" | "canceled" | "abandoned");
            if failed
                && matches!(
                    action,
                    "core.ci_build"
                        | "core.ci_package"
                        | "core.deploy_canary"
                        | "cicd.package_and_canary"
                )
            {
                return Ok(None);
            }
        }
        if !ci_seen && t.elapsed() > Duration::from_secs(30) {
            bail!(
                "no CI build started within 30 s of the push; see `aviary trigger-instance list`"
            );
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!("the pipeline did not reach the canary within 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Where the time from push to healthy canaries went: the app's own scripts
/// (cisetup, cibuild), git, apt/dpkg on the canaries, the app's start and
/// health check, and the rest: Aviary's own work (webhook, rules, workflows,
/// packaging, publishing, notifying the agents).
pub async fn timing_split(api: &Api, commit: &str, total: Duration) -> anyhow::Result<String> {
    let list = api.get("/api/v1/executions?limit=100").await?;
    let execs = list.as_array().cloned().unwrap_or_default();
    let build = execs
        .iter()
        .find(|e| {
            e["action"] == "core.ci_build" && belongs_to(e, commit) && e["status"] == "succeeded"
        })
        .context("no successful CI build for the commit")?;
    let mut scripts = 0u64;
    let mut git_ms = 0u64;
    for s in build["result"]["steps"].as_array().into_iter().flatten() {
        let ms = s["duration_ms"].as_u64().unwrap_or(0);
        match s["name"].as_str().unwrap_or_default() {
            "cisetup" | "cibuild" => scripts += ms,
            n if n.starts_with("git") => git_ms += ms,
            _ => {}
        }
    }
    let hosts = api.get("/api/v1/hosts").await?;
    let (mut apt, mut health) = (0u64, 0u64);
    for h in hosts.as_array().into_iter().flatten() {
        let canary = h["tags"].as_array().is_some_and(|t| {
            t.iter()
                .any(|t| t.as_str() == Some(&format!("{APP}::app_canary")))
        });
        if !canary {
            continue;
        }
        let t = &h["apps"][APP]["timings_ms"];
        let a = t["apt_update"].as_u64().unwrap_or(0) + t["apt_install"].as_u64().unwrap_or(0);
        apt = apt.max(a);
        health = health.max(t["health"].as_u64().unwrap_or(0));
    }
    // The canary deploy alone: from `core.deploy_canary` starting to the
    // canary reporting healthy.
    let short = commit.get(..7).unwrap_or(commit);
    let deploy_ms = execs
        .iter()
        .find(|e| {
            e["action"] == "core.deploy_canary"
                && e["status"] == "succeeded"
                && e["parameters"]["version"]
                    .as_str()
                    .is_some_and(|v| v.ends_with(short))
        })
        .and_then(|e| {
            let at = |k: &str| {
                e[k].as_str()
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            };
            Some(
                (at("finished_at")? - at("started_at")?)
                    .num_milliseconds()
                    .max(0) as u64,
            )
        });
    let total_ms = total.as_millis() as u64;
    let own = total_ms.saturating_sub(scripts + git_ms + apt + health);
    let pct = |v: u64| 100.0 * v as f64 / total_ms.max(1) as f64;
    let deploy_line = deploy_ms
        .map(|d| {
            let aviary = d.saturating_sub(apt + health);
            format!(
                "\n    canary deploy {:.2} s: apt/dpkg {:.2} s, app start + health {:.2} s, Aviary {:.2} s ({:.0}%)",
                d as f64 / 1000.0,
                apt as f64 / 1000.0,
                health as f64 / 1000.0,
                aviary as f64 / 1000.0,
                100.0 * aviary as f64 / d.max(1) as f64
            )
        })
        .unwrap_or_default();
    Ok(format!(
        "time split: your scripts {:.2} s ({:.0}%), apt/dpkg {:.2} s ({:.0}%), app start + health {:.2} s ({:.0}%), git {:.2} s ({:.0}%), Aviary {:.2} s ({:.0}%)",
        scripts as f64 / 1000.0,
        pct(scripts),
        apt as f64 / 1000.0,
        pct(apt),
        health as f64 / 1000.0,
        pct(health),
        git_ms as f64 / 1000.0,
        pct(git_ms),
        own as f64 / 1000.0,
        pct(own),
    ) + &deploy_line)
}

fn belongs_to(e: &Value, commit: &str) -> bool {
    let p = &e["parameters"];
    p["commit"].as_str() == Some(commit)
        || e["context"]["commit"].as_str() == Some(commit)
        || matches!(
            e["action"].as_str(),
            Some("core.deploy_canary" | "cicd.notify" | "core.http" | "core.noop")
        ) && e["parent_id"].is_string()
}

fn summary(e: &Value) -> String {
    let r = &e["result"];
    match e["action"].as_str().unwrap_or_default() {
        "core.ci_package" => r["package"]["version"]
            .as_str()
            .map(|v| format!("{APP} {v}"))
            .unwrap_or_default(),
        "core.deploy_canary" => e["parameters"]["version"]
            .as_str()
            .map(|v| format!("-> {v}"))
            .unwrap_or_default(),
        _ => r["error"]
            .as_str()
            .unwrap_or_default()
            .chars()
            .take(100)
            .collect(),
    }
}

fn rand_u128() -> u128 {
    let a = uuid::Uuid::new_v4().as_u128();
    let b = uuid::Uuid::new_v4().as_u128();
    a ^ b.rotate_left(64)
}

fn chrono_like_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    secs.to_string()
}

#[cfg(test)]
mod tests {
    use super::files;

    #[test]
    fn the_embedded_pack_is_the_shipped_pack() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../packs/cicd");
        let mut on_disk = Vec::new();
        for entry in walk(std::path::Path::new(root)) {
            on_disk.push(entry);
        }
        on_disk.sort();
        let mut embedded: Vec<String> = files::CICD_PACK
            .iter()
            .map(|(p, _)| p.to_string())
            .collect();
        embedded.sort();
        assert_eq!(
            on_disk, embedded,
            "crates/aviary/src/demo/files.rs must list every file of packs/cicd"
        );
    }

    #[test]
    fn demo_settings_reach_the_pack_config() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            a: super::DemoArgs,
        }
        let t = T::parse_from([
            "t",
            "--notify-url",
            "http://10.0.0.1:9/hook",
            "--deploy-timeout",
            "20",
        ]);
        let config = files::CICD_PACK
            .iter()
            .find(|(p, _)| *p == "config.yaml")
            .map(|(_, t)| *t)
            .expect("config.yaml");
        let out = super::demo_settings(config, &t.a);
        assert!(
            out.contains("  notify_url: \"http://10.0.0.1:9/hook\"\n"),
            "{out}"
        );
        assert!(out.contains("  deploy_timeout: 20\n"), "{out}");
    }

    fn walk(dir: &std::path::Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).expect("read packs/cicd").flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(
                        p.strip_prefix(dir)
                            .expect("under root")
                            .display()
                            .to_string(),
                    );
                }
            }
        }
        out
    }
}
