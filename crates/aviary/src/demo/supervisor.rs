//! The demo's supervisor: owns the server, the local hosts with their agents
//! and haproxy; writes `ready.json`; stops everything on SIGTERM/SIGINT.

use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use aviary_testhosts::{HostProcess, TestHost, TestNet};
use serde_json::json;

use super::{APP, DemoArgs, Ready};

/// Port the sample application listens on inside every host.
pub const APP_PORT: u16 = 8080;

struct Running {
    server: Option<Child>,
    haproxy: Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    )>,
    agents: Vec<HostProcess>,
    hosts: Vec<TestHost>,
    net: Option<TestNet>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some((stop, _task)) = self.haproxy.take() {
            // The task stops haproxy; a dropped runtime kills it (kill_on_drop).
            let _ = stop.send(());
        }
        for a in &mut self.agents {
            a.kill();
        }
        self.agents.clear();
        self.hosts.clear();
        self.net = None;
        if let Some(mut s) = self.server.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(s.id().to_string())
                .status();
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = s.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}

pub async fn run(args: &DemoArgs) -> anyhow::Result<ExitCode> {
    let dir = args.dir.canonicalize().context("the demo folder")?;
    std::fs::write(super::pid_file(&dir), std::process::id().to_string())?;
    let mut running = Running {
        server: None,
        haproxy: None,
        agents: Vec::new(),
        hosts: Vec::new(),
        net: None,
    };
    let result = start(&dir, args, &mut running).await;
    if let Err(e) = result {
        eprintln!("aviary demo: {e:#}");
        drop(running);
        return Ok(ExitCode::from(1));
    }
    eprintln!("aviary demo: ready; waiting for SIGTERM (aviary demo --down)");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let exe = std::env::current_exe()?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {
                // A crashed server is restarted: the store keeps every accepted
                // event and the pipeline resumes where it was.
                let exited = running
                    .server
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                if let Some(status) = exited {
                    eprintln!("aviary demo: the server exited ({status}); restarting it");
                    match spawn_server(&exe, &dir, args.port) {
                        Ok(c) => running.server = Some(c),
                        Err(e) => eprintln!("aviary demo: cannot restart the server: {e:#}"),
                    }
                }
            }
        }
    }
    eprintln!("aviary demo: stopping");
    drop(running);
    let _ = std::fs::remove_file(super::pid_file(&dir));
    Ok(ExitCode::SUCCESS)
}

async fn start(dir: &Path, args: &DemoArgs, running: &mut Running) -> anyhow::Result<()> {
    let net = TestNet::new("demo").context("creating the demo's host network (needs root)")?;
    let gateway = net.gateway();
    let exe = std::env::current_exe()?;

    // The server: reachable from this machine and from the hosts.
    let server = spawn_server(&exe, dir, args.port)?;
    running.server = Some(server);
    let data = dir.join("data");
    let local_url = format!("http://127.0.0.1:{}", args.port);
    let host_url = format!("http://{gateway}:{}", args.port);
    wait_http(&format!("{local_url}/healthz"), Duration::from_secs(30))
        .await
        .context("the server did not start; see server.log")?;
    let token = std::fs::read_to_string(data.join("admin.token"))
        .context("reading the admin token")?
        .trim()
        .to_string();
    let client = reqwest::Client::new();

    let mut hosts_json = Vec::new();
    let mut names = vec![("canary1".to_string(), format!("{APP}::app_canary"))];
    for i in 1..=args.production_hosts {
        names.push((format!("web{i}"), format!("{APP}::app")));
    }
    for (name, tag) in names {
        let host = net
            .host(&name)
            .with_context(|| format!("creating host {name}"))?;
        let host_token = create_host_token(&client, &local_url, &token, &name, &host, &tag).await?;
        // The host sees the real / except /tmp and /run: copy the binary in.
        let agent_exe = host
            .install_program(&exe)
            .with_context(|| format!("copying aviary into host {name}"))?;
        let mut cmd = host.command(&agent_exe);
        cmd.arg("agent")
            .arg("--server")
            .arg(&host_url)
            .arg("--token")
            .arg(&host_token)
            .arg("--address")
            .arg(host.ip().to_string())
            .arg("--tag")
            .arg(&tag)
            .arg("--health-url")
            .arg(format!("http://127.0.0.1:{APP_PORT}/health"))
            .arg("--health-grace")
            .arg(args.health_grace.to_string())
            .env("AVIARY_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(
                dir.join(format!("agent-{name}.log")),
            )?);
        let agent = host
            .spawn(&mut cmd)
            .with_context(|| format!("starting the agent on {name}"))?;
        hosts_json.push(json!({"name": name, "address": host.ip().to_string(), "tags": [tag]}));
        running.agents.push(agent);
        running.hosts.push(host);
    }

    let front = if which("haproxy") {
        let bind = format!("127.0.0.1:{}", args.port + 1);
        let fronts = vec![crate::haproxy::Front {
            app: APP.into(),
            role: "app".into(),
            bind: bind.parse()?,
            port: APP_PORT,
            health_path: "/health".into(),
            canary_share: 0,
        }];
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (url, token) = (local_url.clone(), token.clone());
        let hdir = dir.join("haproxy");
        let task = tokio::spawn(async move {
            let r = crate::haproxy::run_loop(
                url,
                token,
                fronts,
                hdir,
                "haproxy".into(),
                Duration::from_secs(2),
                async {
                    let _ = stop_rx.await;
                },
            )
            .await;
            if let Err(e) = r {
                eprintln!("aviary demo: haproxy: {e:#}");
            }
        });
        running.haproxy = Some((stop_tx, task));
        Some(bind)
    } else {
        eprintln!("aviary demo: haproxy is not installed; skipping the traffic layer");
        None
    };
    running.net = Some(net);

    let ready = Ready {
        url: local_url,
        token,
        hosts: hosts_json,
        haproxy: front,
    };
    let tmp = dir.join("ready.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&ready)?)?;
    std::fs::rename(&tmp, dir.join("ready.json"))?;
    Ok(())
}

/// Starts `aviary server` for the demo and records its pid in `server.pid`.
fn spawn_server(exe: &Path, dir: &Path, port: u16) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))?;
    let child = Command::new(exe)
        .arg("server")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--listen")
        .arg(format!("0.0.0.0:{port}"))
        .arg("--packs")
        .arg(dir.join("packs"))
        .env("AVIARY_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the server")?;
    std::fs::write(dir.join("server.pid"), child.id().to_string())?;
    Ok(child)
}

async fn wait_http(url: &str, timeout: Duration) -> anyhow::Result<()> {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if let Ok(r) = reqwest::get(url).await
            && r.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{url} did not answer within {timeout:?}")
}

async fn create_host_token(
    client: &reqwest::Client,
    url: &str,
    admin: &str,
    name: &str,
    host: &TestHost,
    tag: &str,
) -> anyhow::Result<String> {
    let r = client
        .post(format!("{url}/api/v1/hosts/{name}/token"))
        .bearer_auth(admin)
        .json(&json!({"address": host.ip().to_string(), "tags": [tag]}))
        .send()
        .await?;
    let status = r.status();
    let v: serde_json::Value = r.json().await.unwrap_or_default();
    if !status.is_success() {
        bail!("registering host {name}: {status}: {v}");
    }
    v["token"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("registering host {name}: no token in {v}"))
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}
