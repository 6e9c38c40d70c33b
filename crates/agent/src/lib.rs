//! Aviary's host agent (`aviary agent`): registers its host's tags with the
//! server, heartbeats, watches the advertised versions of its tags over
//! server-sent events (reconnecting with backoff), and converges with the
//! OS package manager:
//!
//! 1. the server's APT repository as a source with `signed-by=` (the key is
//!    fetched from `<server>/apt/aviary-archive-keyring.gpg`);
//! 2. `apt-get update` for that source only;
//! 3. `DEBIAN_FRONTEND=noninteractive apt-get install -y --allow-downgrades
//!    <app>=<version>` (argv, never shell text);
//! 4. an optional health check (an HTTP URL answering 2xx, or a command
//!    exiting 0);
//! 5. a report: installed version, health, apt's output.
//!
//! A failed install is reported with apt's output and retried with
//! exponential backoff ([`RETRY_MIN`] doubling to [`RETRY_MAX`]), never in a
//! hot loop. The agent acts on the host it runs on.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aviary_deploy::{AppStatus, Assignment, Health, parse_tag};
use futures::StreamExt;
use tokio::sync::watch;

/// First retry delay after a failed install.
pub const RETRY_MIN: Duration = Duration::from_secs(5);
/// Longest retry delay.
pub const RETRY_MAX: Duration = Duration::from_secs(300);
/// Longest delay between watch reconnections.
const RECONNECT_MAX: Duration = Duration::from_secs(30);
/// Output kept per report.
const MAX_OUTPUT: usize = 8 * 1024;

/// How the agent is configured.
#[derive(Debug, Clone)]
pub struct Config {
    /// Server base URL (`http://host:9700`).
    pub server: String,
    /// The host's agent token.
    pub token: String,
    /// Tags this host carries (`app::role`, `app::role_canary`).
    pub tags: Vec<String>,
    /// Address to register (default: the server keeps what it has).
    pub address: Option<String>,
    /// APT suite and component of the server's repository.
    pub suite: String,
    /// APT component.
    pub component: String,
    /// Where the repository key is written.
    pub keyring: PathBuf,
    /// The APT source file written for the server's repository.
    pub source_list: PathBuf,
    /// Health check URL (2xx = healthy).
    pub health_url: Option<String>,
    /// Health check command (argv; exit 0 = healthy).
    pub health_cmd: Vec<String>,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// How long a freshly installed version may take to become healthy: the
    /// check is repeated (every 100 ms) until it passes or this expires.
    pub health_grace: Duration,
}

impl Config {
    /// Defaults for a server URL, token and tags.
    pub fn new(server: &str, token: &str, tags: Vec<String>) -> Self {
        Self {
            server: server.trim_end_matches('/').to_string(),
            token: token.to_string(),
            tags,
            address: None,
            suite: "stable".into(),
            component: "main".into(),
            keyring: "/etc/apt/keyrings/aviary.gpg".into(),
            source_list: "/etc/apt/sources.list.d/aviary.list".into(),
            health_url: None,
            health_cmd: Vec::new(),
            heartbeat: Duration::from_secs(10),
            health_grace: Duration::from_secs(30),
        }
    }
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A tag is invalid.
    #[error("{0}")]
    Tag(#[from] aviary_deploy::TagError),
    /// The server refused the token or the tags (401/403): retrying cannot help.
    #[error("the server refused the agent ({status}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The server's error.
        message: String,
    },
    /// The APT source could not be written.
    #[error("cannot write {path}: {source}; the agent must run as root on its host")]
    Io {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// Shared state of one agent.
struct Agent {
    cfg: Config,
    http: reqwest::Client,
    statuses: Mutex<BTreeMap<String, AppStatus>>,
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_OUTPUT {
        let mut cut = s.len() - MAX_OUTPUT;
        while !s.is_char_boundary(cut) {
            cut += 1;
        }
        s = s[cut..].to_string();
    }
    s
}

/// Runs the agent until a fatal error (a refused token or tag).
pub async fn run(cfg: Config) -> Result<(), AgentError> {
    for t in &cfg.tags {
        parse_tag(t)?;
    }
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| AgentError::Refused {
            status: 0,
            message: e.to_string(),
        })?;
    let agent = Arc::new(Agent {
        cfg,
        http,
        statuses: Mutex::new(BTreeMap::new()),
    });
    let apps: Vec<String> = agent
        .cfg
        .tags
        .iter()
        .filter_map(|t| parse_tag(t).ok().map(|t| t.app))
        .collect();
    for app in &apps {
        let installed = installed_version(app).await;
        agent
            .statuses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                app.clone(),
                AppStatus {
                    installed,
                    ..AppStatus::default()
                },
            );
    }
    agent.register().await?;
    let (tx, rx) = watch::channel::<Option<Vec<Assignment>>>(None);
    let hb = tokio::spawn(heartbeat(agent.clone()));
    let conv = tokio::spawn(converge_loop(agent.clone(), rx));
    let result = agent.watch(tx).await;
    hb.abort();
    conv.abort();
    result
}

impl Agent {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.cfg.server)
    }

    async fn refused(resp: reqwest::Response) -> AgentError {
        let status = resp.status().as_u16();
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        AgentError::Refused {
            status,
            message: body["error"].as_str().unwrap_or("no detail").to_string(),
        }
    }

    /// Registers, retrying with backoff while the server is unreachable.
    async fn register(&self) -> Result<(), AgentError> {
        let mut delay = Duration::from_secs(1);
        loop {
            let body = serde_json::json!({"tags": self.cfg.tags, "address": self.cfg.address});
            match self
                .http
                .post(self.url("/api/v1/agent/register"))
                .bearer_auth(&self.cfg.token)
                .json(&body)
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => {
                    tracing::info!(tags = ?self.cfg.tags, "registered");
                    return Ok(());
                }
                Ok(r) if r.status().is_client_error() => return Err(Self::refused(r).await),
                Ok(r) => tracing::warn!(status = %r.status(), "register failed; retrying"),
                Err(e) => tracing::warn!(error = %e, "server unreachable; retrying"),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(RECONNECT_MAX);
        }
    }

    async fn report(&self) {
        let apps = self
            .statuses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let res = self
            .http
            .post(self.url("/api/v1/agent/report"))
            .bearer_auth(&self.cfg.token)
            .timeout(Duration::from_secs(10))
            .json(&serde_json::json!({ "apps": apps }))
            .send()
            .await;
        match res {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => tracing::warn!(status = %r.status(), "report refused"),
            Err(e) => tracing::warn!(error = %e, "cannot report"),
        }
    }

    /// Watches assignments; reconnects with backoff; returns only on refusal.
    async fn watch(&self, tx: watch::Sender<Option<Vec<Assignment>>>) -> Result<(), AgentError> {
        let mut delay = Duration::from_millis(500);
        loop {
            let resp = self
                .http
                .get(self.url("/api/v1/agent/watch"))
                .bearer_auth(&self.cfg.token)
                .send()
                .await;
            match resp {
                Ok(r) if r.status().is_success() => {
                    tracing::info!("watching advertised versions");
                    let mut parser = sse::Parser::default();
                    let mut body = r.bytes_stream();
                    while let Some(chunk) = body.next().await {
                        let Ok(bytes) = chunk else { break };
                        for ev in parser.push(&bytes) {
                            if ev.event == "assignments" {
                                delay = Duration::from_millis(500);
                                match serde_json::from_str::<Vec<Assignment>>(&ev.data) {
                                    Ok(a) => {
                                        tx.send_replace(Some(a));
                                    }
                                    Err(e) => tracing::warn!(error = %e, "bad assignments event"),
                                }
                            }
                        }
                    }
                    tracing::warn!("watch stream ended; reconnecting");
                }
                Ok(r) if r.status().is_client_error() => return Err(Self::refused(r).await),
                Ok(r) => tracing::warn!(status = %r.status(), "watch failed; retrying"),
                Err(e) => tracing::warn!(error = %e, "server unreachable; retrying"),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(RECONNECT_MAX);
        }
    }

    /// Writes the keyring and the source list for the server's repository.
    async fn configure_source(&self) -> Result<(), String> {
        let key = self
            .http
            .get(self.url("/apt/aviary-archive-keyring.gpg"))
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| format!("cannot fetch the repository key: {e}"))?
            .bytes()
            .await
            .map_err(|e| format!("cannot fetch the repository key: {e}"))?;
        let write = |path: &PathBuf, data: &[u8]| -> Result<(), String> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            }
            std::fs::write(path, data).map_err(|e| format!("cannot write {}: {e}", path.display()))
        };
        write(&self.cfg.keyring, &key)?;
        let line = format!(
            "deb [signed-by={}] {}/apt {} {}\n",
            self.cfg.keyring.display(),
            self.cfg.server,
            self.cfg.suite,
            self.cfg.component
        );
        write(&self.cfg.source_list, line.as_bytes())
    }

    /// Installs `app=version` and runs the health check; returns the status.
    async fn install(&self, app: &str, version: &str) -> AppStatus {
        let mut output = String::new();
        let mut status = AppStatus {
            target: Some(version.to_string()),
            ..AppStatus::default()
        };
        if let Err(e) = self.configure_source().await {
            status.installed = installed_version(app).await;
            status.error = Some(e.clone());
            status.output = e;
            return status;
        }
        let list = self.cfg.source_list.display().to_string();
        let t_update = std::time::Instant::now();
        let update = command(
            "apt-get",
            &[
                "update",
                "-o",
                &format!("Dir::Etc::sourcelist={list}"),
                "-o",
                "Dir::Etc::sourceparts=-",
                "-o",
                "APT::Get::List-Cleanup=0",
            ],
        )
        .await;
        output.push_str(&update.1);
        status
            .timings_ms
            .insert("apt_update".into(), t_update.elapsed().as_millis() as u64);
        let t_install = std::time::Instant::now();
        let install_ok = if update.0 {
            let pkg = format!("{app}={version}");
            let r = command(
                "apt-get",
                &[
                    "install",
                    "-y",
                    "--allow-downgrades",
                    "-o",
                    "Dpkg::Options::=--force-confdef",
                    "-o",
                    "Dpkg::Options::=--force-confold",
                    &pkg,
                ],
            )
            .await;
            output.push_str(&r.1);
            r.0
        } else {
            false
        };
        status
            .timings_ms
            .insert("apt_install".into(), t_install.elapsed().as_millis() as u64);
        status.installed = installed_version(app).await;
        if !install_ok || status.installed.as_deref() != Some(version) {
            status.health = Health::Unknown;
            status.error = Some(format!(
                "apt-get could not install {app}={version}: {}",
                last_line(&output)
            ));
        } else {
            // A service restarted by its postinst needs a moment to listen.
            let t_health = std::time::Instant::now();
            let deadline = tokio::time::Instant::now() + self.cfg.health_grace;
            let (healthy, out) = loop {
                let (healthy, out) = self.health_check().await;
                if healthy || tokio::time::Instant::now() >= deadline {
                    break (healthy, out);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            status
                .timings_ms
                .insert("health".into(), t_health.elapsed().as_millis() as u64);
            output.push_str(&out);
            status.health = if healthy {
                Health::Healthy
            } else {
                Health::Unhealthy
            };
            if !healthy {
                status.error = Some(format!("health check failed: {}", last_line(&out)));
            }
        }
        status.output = truncate(output);
        status
    }

    async fn health_check(&self) -> (bool, String) {
        if let Some(url) = &self.cfg.health_url {
            return match self
                .http
                .get(url)
                .timeout(Duration::from_secs(10))
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => {
                    (true, format!("health check {url}: {}\n", r.status()))
                }
                Ok(r) => (false, format!("health check {url}: {}\n", r.status())),
                Err(e) => (false, format!("health check {url}: {e}\n")),
            };
        }
        if let Some((cmd, args)) = self.cfg.health_cmd.split_first() {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (ok, out) = command(cmd, &args).await;
            return (ok, out);
        }
        (true, String::new())
    }
}

fn last_line(s: &str) -> String {
    s.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .to_string()
}

/// Runs a command (argv), returns success and combined output.
async fn command(program: &str, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(program)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(std::process::Stdio::null())
        .output()
        .await;
    match out {
        Ok(o) => {
            let mut text = format!("$ {program} {}\n", args.join(" "));
            text.push_str(&String::from_utf8_lossy(&o.stdout));
            text.push_str(&String::from_utf8_lossy(&o.stderr));
            (o.status.success(), text)
        }
        Err(e) => (false, format!("cannot run {program}: {e}\n")),
    }
}

/// The installed version of a package, from dpkg's database.
pub async fn installed_version(app: &str) -> Option<String> {
    let out = tokio::process::Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}\t${Version}", app])
        .output()
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (status, version) = text.split_once('\t')?;
    (status.ends_with(" installed") && !version.is_empty()).then(|| version.to_string())
}

/// What each app should run: a canary assignment wins over production.
pub fn desired(assignments: &[Assignment]) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, (bool, String)> = BTreeMap::new();
    for a in assignments {
        let Some(v) = &a.version else { continue };
        let canary = a.tag.ends_with("_canary");
        match out.get(&a.app) {
            Some((true, _)) if !canary => {}
            _ => {
                out.insert(a.app.clone(), (canary, v.clone()));
            }
        }
    }
    out.into_iter().map(|(k, (_, v))| (k, v)).collect()
}

async fn heartbeat(agent: Arc<Agent>) {
    loop {
        agent.report().await;
        tokio::time::sleep(agent.cfg.heartbeat).await;
    }
}

/// Converges whenever assignments change; retries failures with backoff.
async fn converge_loop(agent: Arc<Agent>, mut rx: watch::Receiver<Option<Vec<Assignment>>>) {
    let mut retry: BTreeMap<String, (String, Duration, tokio::time::Instant)> = BTreeMap::new();
    loop {
        let assignments = rx.borrow_and_update().clone();
        if let Some(assignments) = assignments {
            let want = desired(&assignments);
            retry.retain(|app, (v, _, _)| want.get(app) == Some(v));
            for (app, version) in &want {
                let current = agent
                    .statuses
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(app)
                    .cloned()
                    .unwrap_or_default();
                let done = current.installed.as_deref() == Some(version.as_str())
                    && current.target.as_deref() == Some(version.as_str());
                let failed_before =
                    current.target.as_deref() == Some(version.as_str()) && current.error.is_some();
                if done && current.error.is_none() {
                    continue;
                }
                if failed_before
                    && let Some((_, _, at)) = retry.get(app)
                    && tokio::time::Instant::now() < *at
                {
                    continue;
                }
                if current.installed.as_deref() == Some(version.as_str()) && !done {
                    tracing::info!(%app, %version, "already installed; checking health");
                } else {
                    tracing::info!(%app, %version, "installing");
                }
                let status = agent.install(app, version).await;
                let failed = status.error.is_some();
                agent
                    .statuses
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(app.clone(), status);
                agent.report().await;
                if failed {
                    let delay = retry
                        .get(app)
                        .map_or(RETRY_MIN, |(_, d, _)| (*d * 2).min(RETRY_MAX));
                    tracing::warn!(%app, %version, retry_in = ?delay, "install failed");
                    retry.insert(
                        app.clone(),
                        (version.clone(), delay, tokio::time::Instant::now() + delay),
                    );
                } else {
                    retry.remove(app);
                }
            }
        }
        let next_retry = retry.values().map(|(_, _, at)| *at).min();
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = async {
                match next_retry {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending::<()>().await,
                }
            } => {}
        }
    }
}

/// A minimal incremental `text/event-stream` parser.
pub mod sse {
    /// One event.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Event {
        /// `event:` (default `message`).
        pub event: String,
        /// `data:` lines joined by newlines.
        pub data: String,
    }

    /// Feed bytes, get events.
    #[derive(Debug, Default)]
    pub struct Parser {
        buf: Vec<u8>,
        event: Option<String>,
        data: Vec<String>,
    }

    impl Parser {
        /// Adds bytes; returns the events they complete.
        pub fn push(&mut self, bytes: &[u8]) -> Vec<Event> {
            self.buf.extend_from_slice(bytes);
            let mut out = Vec::new();
            while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                let line = String::from_utf8_lossy(&line).into_owned();
                if line.is_empty() {
                    let event = self.event.take();
                    if !self.data.is_empty() {
                        out.push(Event {
                            event: event.unwrap_or_else(|| "message".into()),
                            data: std::mem::take(&mut self.data).join("\n"),
                        });
                    }
                    continue;
                }
                if line.starts_with(':') {
                    continue;
                }
                let (field, value) = match line.split_once(':') {
                    Some((f, v)) => (f.to_string(), v.strip_prefix(' ').unwrap_or(v).to_string()),
                    None => (line.clone(), String::new()),
                };
                match field.as_str() {
                    "event" => self.event = Some(value),
                    "data" => self.data.push(value),
                    _ => {}
                }
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canary_assignment_wins() {
        let a = |tag: &str, v: Option<&str>| Assignment {
            tag: tag.into(),
            app: tag.split("::").next().unwrap_or("").into(),
            version: v.map(Into::into),
        };
        let d = desired(&[
            a("web::app_canary", Some("2")),
            a("web::app", Some("1")),
            a("db::app", None),
        ]);
        assert_eq!(d.get("web").map(String::as_str), Some("2"));
        assert!(!d.contains_key("db"));
        let d = desired(&[a("web::app", Some("1")), a("web::app_canary", Some("2"))]);
        assert_eq!(d.get("web").map(String::as_str), Some("2"));
    }

    #[test]
    fn sse_events_across_chunks() {
        let mut p = sse::Parser::default();
        assert!(p.push(b"event: assignments\nda").is_empty());
        let evs = p.push(b"ta: [1]\n\n: keep-alive\n\n");
        assert_eq!(
            evs,
            vec![sse::Event {
                event: "assignments".into(),
                data: "[1]".into()
            }]
        );
    }

    #[tokio::test]
    async fn unknown_package_has_no_version() {
        assert_eq!(installed_version("aviary-no-such-package-xyz").await, None);
    }
}
