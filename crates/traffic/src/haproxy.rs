//! Running HAProxy: master-worker mode, checked hitless reloads, and the
//! runtime API for weight and drain changes.
//!
//! [`Haproxy::start`] writes the configuration into a state directory,
//! checks it with `haproxy -c`, and starts `haproxy -W -S <dir>/master.sock -f
//! <dir>/haproxy.cfg`. [`Haproxy::apply`] writes a new configuration next to
//! the live one, checks it, swaps it in atomically and asks the master to
//! `reload`: the master starts a new worker with the same listening sockets
//! and the old worker finishes its connections, so no connection is refused or
//! dropped. A configuration that fails the check never replaces the live one.
//! Runtime changes ([`Haproxy::set_weight`], [`Haproxy::set_state`]) go to the
//! stats socket and need no reload (they last until the next reload, which
//! applies what the rendered configuration says).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};

use crate::{Error, Result};

/// How long to wait for haproxy to come up or finish a reload.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

fn ha(what: &str, message: impl Into<String>) -> Error {
    Error::Haproxy {
        what: what.to_owned(),
        message: message.into(),
    }
}

/// Writes `text` to `path` atomically (temp file in the same directory, then
/// rename). Returns false, writing nothing, if the file already has it.
pub fn write_atomically(path: &Path, text: &str) -> Result<bool> {
    if std::fs::read_to_string(path).is_ok_and(|old| old == text) {
        return Ok(false);
    }
    let tmp = path.with_extension("aviary-tmp");
    std::fs::write(&tmp, text).map_err(io(format!("write {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io(format!("replace {}", path.display())))?;
    Ok(true)
}

/// Checks a configuration file with `haproxy -c -f`.
pub async fn check_config(binary: &Path, path: &Path) -> Result<()> {
    let out = Command::new(binary)
        .args(["-c", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(io(format!(
            "run {} (install haproxy, or give its path)",
            binary.display()
        )))?;
    if out.status.success() {
        Ok(())
    } else {
        let mut output = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if output.is_empty() {
            output = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        }
        Err(Error::ConfigRejected {
            path: path.display().to_string(),
            output,
        })
    }
}

/// A server's administrative state on the runtime API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerState {
    /// Takes traffic.
    Ready,
    /// Finishes current connections, gets no new ones (health checks continue).
    Drain,
    /// Out of service.
    Maint,
}

impl ServerState {
    fn as_str(self) -> &'static str {
        match self {
            ServerState::Ready => "ready",
            ServerState::Drain => "drain",
            ServerState::Maint => "maint",
        }
    }
}

/// A running haproxy in master-worker mode. Killed when dropped.
#[derive(Debug)]
pub struct Haproxy {
    binary: PathBuf,
    config: PathBuf,
    master_socket: PathBuf,
    stats_socket: PathBuf,
    child: Child,
}

/// Sends one command to a CLI socket and returns the whole answer.
pub async fn socket_command(socket: &Path, command: &str) -> Result<String> {
    if command.contains(['\n', '\r', ';']) {
        return Err(ha(
            "runtime command",
            format!("{command:?} must be a single command (no newline or ';')"),
        ));
    }
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(io(format!("connect to {}", socket.display())))?;
    stream
        .write_all(format!("{command}\n").as_bytes())
        .await
        .map_err(io(format!("send to {}", socket.display())))?;
    // The master CLI answers only once it sees the end of the request.
    stream
        .shutdown()
        .await
        .map_err(io(format!("send to {}", socket.display())))?;
    let mut answer = String::new();
    tokio::time::timeout(READY_TIMEOUT, stream.read_to_string(&mut answer))
        .await
        .map_err(|_| ha(command, "no answer within 15 s"))?
        .map_err(io(format!("read from {}", socket.display())))?;
    Ok(answer)
}

impl Haproxy {
    /// The runtime API socket path used for state directory `dir`; pass it to
    /// [`crate::RenderOptions::new`].
    pub fn stats_socket_for(dir: &Path) -> PathBuf {
        dir.join("stats.sock")
    }

    /// Checks and writes `config` into `dir` (created if needed) and starts
    /// haproxy; returns when its runtime API answers. `config` must use the
    /// stats socket [`Haproxy::stats_socket_for`]`(dir)`.
    pub async fn start(binary: impl Into<PathBuf>, dir: &Path, config: &str) -> Result<Self> {
        let binary = binary.into();
        std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
        let path = dir.join("haproxy.cfg");
        let candidate = dir.join("haproxy.cfg.new");
        std::fs::write(&candidate, config).map_err(io(format!("write {}", candidate.display())))?;
        check_config(&binary, &candidate).await?;
        std::fs::rename(&candidate, &path).map_err(io(format!("write {}", path.display())))?;
        let master_socket = dir.join("master.sock");
        let stats_socket = Self::stats_socket_for(dir);
        let _ = std::fs::remove_file(&master_socket);
        let log = std::fs::File::create(dir.join("haproxy.log"))
            .map_err(io(format!("create {}", dir.join("haproxy.log").display())))?;
        let child = Command::new(&binary)
            .arg("-W")
            .arg("-S")
            .arg(&master_socket)
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(io(format!("start {}", binary.display())))?;
        let mut proxy = Haproxy {
            binary,
            config: path,
            master_socket,
            stats_socket,
            child,
        };
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if proxy.runtime("show info").await.is_ok()
                && proxy.workers().await.is_ok_and(|w| !w.is_empty())
            {
                return Ok(proxy);
            }
            if let Ok(Some(status)) = proxy.child.try_wait() {
                let log = std::fs::read_to_string(dir.join("haproxy.log")).unwrap_or_default();
                return Err(ha("start", format!("exited with {status}: {}", log.trim())));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(ha("start", "runtime API did not answer within 15 s"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The live configuration file.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The master CLI socket.
    pub fn master_socket(&self) -> &Path {
        &self.master_socket
    }

    /// The runtime API (stats) socket.
    pub fn stats_socket(&self) -> &Path {
        &self.stats_socket
    }

    /// Pids of the current workers (`show proc` on the master CLI), old
    /// workers still finishing connections excluded.
    pub async fn workers(&self) -> Result<Vec<u32>> {
        let text = socket_command(&self.master_socket, "show proc").await?;
        let mut current = false;
        let mut pids = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') {
                current = line.trim() == "# workers";
                continue;
            }
            if current
                && let Some(pid) = line.split_whitespace().next().and_then(|p| p.parse().ok())
            {
                pids.push(pid);
            }
        }
        Ok(pids)
    }

    /// Applies a new configuration: unchanged text does nothing (false);
    /// otherwise it is checked with `haproxy -c` (the live file stays if it
    /// fails), swapped in, and haproxy reloads without dropping connections.
    pub async fn apply(&self, config: &str) -> Result<bool> {
        if std::fs::read_to_string(&self.config).is_ok_and(|old| old == config) {
            return Ok(false);
        }
        let candidate = self.config.with_extension("cfg.new");
        std::fs::write(&candidate, config).map_err(io(format!("write {}", candidate.display())))?;
        if let Err(e) = check_config(&self.binary, &candidate).await {
            let _ = std::fs::remove_file(&candidate);
            return Err(e);
        }
        std::fs::rename(&candidate, &self.config)
            .map_err(io(format!("replace {}", self.config.display())))?;
        self.reload().await?;
        Ok(true)
    }

    /// Reloads the live configuration (master CLI `reload`) and waits until a
    /// new worker serves the runtime API.
    pub async fn reload(&self) -> Result<()> {
        let before = self.workers().await?;
        // The master re-executes itself; the answer may be empty or cut.
        let _ = socket_command(&self.master_socket, "reload").await;
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(now) = self.workers().await
                && !now.is_empty()
                && now.iter().all(|p| !before.contains(p))
                && self.runtime("show info").await.is_ok()
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(ha(
                    "reload",
                    format!(
                        "no new worker within 15 s; see {}",
                        self.config.with_file_name("haproxy.log").display()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends one runtime API command (stats socket, level admin).
    pub async fn runtime(&self, command: &str) -> Result<String> {
        socket_command(&self.stats_socket, command).await
    }

    fn check_names(backend: &str, server: &str) -> Result<()> {
        let ok = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        };
        if ok(backend) && ok(server) {
            Ok(())
        } else {
            Err(ha(
                "runtime command",
                format!("{backend:?}/{server:?} is not a backend/server name"),
            ))
        }
    }

    /// Runtime API answers are empty on success, else the error text.
    fn expect_empty(what: &str, answer: String) -> Result<()> {
        if answer.trim().is_empty() {
            Ok(())
        } else {
            Err(ha(what, answer.trim().to_owned()))
        }
    }

    /// Sets a server's weight (0-256) without a reload.
    pub async fn set_weight(&self, backend: &str, server: &str, weight: u16) -> Result<()> {
        Self::check_names(backend, server)?;
        let cmd = format!("set server {backend}/{server} weight {weight}");
        let answer = self.runtime(&cmd).await?;
        Self::expect_empty(&cmd, answer)
    }

    /// Sets a server's state (`ready`, `drain`, `maint`) without a reload.
    pub async fn set_state(&self, backend: &str, server: &str, state: ServerState) -> Result<()> {
        Self::check_names(backend, server)?;
        let cmd = format!("set server {backend}/{server} state {}", state.as_str());
        let answer = self.runtime(&cmd).await?;
        Self::expect_empty(&cmd, answer)
    }

    /// Stops haproxy (the master and its workers).
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}
