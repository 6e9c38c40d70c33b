//! CI and packaging steps the server runs itself, and CI housekeeping.
//!
//! - Runner types `deb-build` (a .deb from a folder on the server),
//!   `apt-publish` (.deb files into the server's APT repository, the one
//!   `/apt/` serves) and `ci-package` (checkout at a commit into a fresh
//!   workspace, .deb, publish, workspace removed whatever happens). They run
//!   here because the repository lives under the server's data dir: one
//!   shared [`Repository`] keeps the index state in memory, and its lock
//!   (a mutex and an `flock`) makes concurrent publishes safe, also against
//!   `aviary apt` commands.
//! - The CI concurrency limit (`ci.max_concurrent`): a semaphore that
//!   `ci-build` executions wait for in the queue (status `scheduled`, no
//!   worker held).
//! - Build log retention (`ci.log_retention_days`, `ci.keep_builds`): a
//!   periodic purge of the output of old CI builds.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aviary_core::model::ExecutionStatus;
use aviary_packaging::apt::{RepoConfig, Repository};
use aviary_packaging::deb::{BuildRequest, BuiltPackage, Compression};
use aviary_runners::{OutputEvent, RunOutcome, RunRequest, Stream};
use chrono::Utc;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use super::Engine;
use crate::config::ServerConfig;

/// Runner: build a .deb from a folder on the server.
pub const DEB_BUILD: &str = "deb-build";
/// Runner: publish .deb files into the server's APT repository.
pub const APT_PUBLISH: &str = "apt-publish";
/// Runner: checkout, .deb, publish, in one step.
pub const CI_PACKAGE: &str = "ci-package";
/// The CI build runner (in aviary-runners).
pub const CI_BUILD: &str = "ci-build";

/// True for the runner types [`run`] handles (in the server, not in aviary-runners).
pub fn runs_in_server(runner: &str) -> bool {
    matches!(runner, DEB_BUILD | APT_PUBLISH | CI_PACKAGE)
}

/// CI state shared by the engine.
pub struct CiState {
    /// Free CI build slots (`ci.max_concurrent`), if limited.
    pub slots: Option<Arc<Semaphore>>,
    repo: Mutex<Option<Arc<Repository>>>,
}

impl CiState {
    /// State for this configuration.
    pub fn new(config: &ServerConfig) -> Self {
        Self {
            slots: config
                .ci
                .max_concurrent
                .map(|n| Arc::new(Semaphore::new(n))),
            repo: Mutex::new(None),
        }
    }
}

/// The repository configuration from the server's `apt:` settings.
pub fn repo_config(config: &ServerConfig) -> RepoConfig {
    let mut c = RepoConfig::default();
    let a = &config.apt;
    if let Some(v) = &a.suites {
        c.suites = v.clone();
    }
    if let Some(v) = &a.components {
        c.components = v.clone();
    }
    if let Some(v) = &a.architectures {
        c.architectures = v.clone();
    }
    if let Some(v) = a.keep_versions {
        c.keep_versions = v;
    }
    c
}

/// The server's APT repository (`<data dir>/apt`), opened once.
fn repository(engine: &Engine, keep_versions: Option<usize>) -> Result<Arc<Repository>, String> {
    let root = crate::api::apt::repo_dir(&engine.config.data_dir);
    let mut config = repo_config(&engine.config);
    if let Some(k) = keep_versions {
        // Another retention: its own handle (same files, same lock).
        config.keep_versions = k;
        return Repository::open_or_create(&root, config)
            .map(Arc::new)
            .map_err(|e| format!("APT repository {}: {e}", root.display()));
    }
    let mut slot = engine.ci.repo.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(r) = slot.as_ref() {
        return Ok(r.clone());
    }
    let repo = Repository::open_or_create(&root, config)
        .map(Arc::new)
        .map_err(|e| format!("APT repository {}: {e}", root.display()))?;
    *slot = Some(repo.clone());
    Ok(repo)
}

fn say(output: &UnboundedSender<OutputEvent>, line: String) {
    let _ = output.send(OutputEvent {
        stream: Stream::Stdout,
        data: line,
    });
}

fn failed(message: impl Into<String>) -> RunOutcome {
    RunOutcome::error(ExecutionStatus::Failed, message)
}

fn text<'a>(req: &'a RunRequest, name: &str) -> Option<&'a str> {
    req.parameters
        .get(name)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// An absolute path parameter.
fn abs_path(req: &RunRequest, name: &str) -> Result<PathBuf, RunOutcome> {
    let p = text(req, name).ok_or_else(|| {
        failed(format!(
            "action {}: parameter '{name}' is required",
            req.action_ref
        ))
    })?;
    let path = PathBuf::from(p);
    if !path.is_absolute() {
        return Err(failed(format!(
            "action {}: parameter '{name}' must be an absolute path on the server, got '{p}'",
            req.action_ref
        )));
    }
    Ok(path)
}

/// Compression from `compression` and `level`.
fn compression(req: &RunRequest) -> Result<Compression, RunOutcome> {
    let level = req
        .parameters
        .get("level")
        .and_then(Value::as_u64)
        .map(|l| l as u32);
    let c = match text(req, "compression").unwrap_or("gzip") {
        "gzip" | "gz" => Compression::Gzip {
            level: level.unwrap_or(6),
        },
        "xz" => Compression::Xz {
            level: level.unwrap_or(1),
        },
        other => {
            return Err(failed(format!(
                "action {}: parameter 'compression': unknown '{other}'; use gzip or xz (lintian refuses zstd)",
                req.action_ref
            )));
        }
    };
    c.validate().map_err(|e| failed(e.to_string()))?;
    Ok(c)
}

fn build_number(req: &RunRequest) -> Option<String> {
    match req.parameters.get("build_number") {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    }
}

fn built_json(b: &BuiltPackage) -> Value {
    json!({
        "name": b.name,
        "version": b.version,
        "architecture": b.architecture,
        "path": b.path,
        "size": b.size,
        "sha256": b.sha256,
        "files": b.files,
    })
}

/// Runs blocking work; on cancel, returns at once and lets the work finish
/// in the background, then runs `cleanup`.
async fn blocking<T: Send + 'static>(
    cancel: &CancellationToken,
    work: impl FnOnce() -> T + Send + 'static,
    cleanup: impl FnOnce() + Send + 'static,
) -> Result<T, RunOutcome> {
    let mut handle = tokio::task::spawn_blocking(work);
    tokio::select! {
        r = &mut handle => r.map_err(|e| failed(format!("the step stopped unexpectedly: {e}"))),
        _ = cancel.cancelled() => {
            tokio::spawn(async move {
                let _ = handle.await;
                cleanup();
            });
            Err(RunOutcome::error(ExecutionStatus::Canceled, "canceled"))
        }
    }
}

/// Runs a server-side runner (see [`runs_in_server`]) to completion.
pub async fn run(
    engine: &Engine,
    req: RunRequest,
    output: UnboundedSender<OutputEvent>,
    cancel: CancellationToken,
) -> RunOutcome {
    let timeout = req
        .parameters
        .get("timeout")
        .and_then(Value::as_u64)
        .map(Duration::from_secs)
        .filter(|t| *t < req.timeout)
        .unwrap_or(req.timeout);
    let work = async {
        match req.runner_type.as_str() {
            DEB_BUILD => deb_build(&req, &output, &cancel).await,
            APT_PUBLISH => apt_publish(engine, &req, &output, &cancel).await,
            CI_PACKAGE => ci_package(engine, &req, &output, &cancel).await,
            other => Err(failed(format!(
                "runner '{other}' does not run in the server"
            ))),
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok(result)) => RunOutcome {
            status: ExecutionStatus::Succeeded,
            result,
        },
        Ok(Err(outcome)) => outcome,
        Err(_) => {
            cancel.cancel();
            RunOutcome::error(
                ExecutionStatus::Timeout,
                format!(
                    "{} ran out of time ({}s)",
                    req.action_ref,
                    timeout.as_secs()
                ),
            )
        }
    }
}

async fn deb_build(
    req: &RunRequest,
    output: &UnboundedSender<OutputEvent>,
    cancel: &CancellationToken,
) -> Result<Value, RunOutcome> {
    let path = abs_path(req, "path")?;
    let out_dir = abs_path(req, "out_dir")?;
    let mut build = BuildRequest::new(&path, &out_dir);
    build.build_number = build_number(req);
    build.commit = text(req, "commit").map(str::to_string);
    build.source_date_epoch = req
        .parameters
        .get("source_date_epoch")
        .and_then(Value::as_i64);
    build.compression = compression(req)?;
    say(
        output,
        format!("[aviary] building a .deb from {}\n", path.display()),
    );
    let built = blocking(cancel, move || aviary_packaging::deb::build(&build), || {})
        .await?
        .map_err(|e| failed(e.to_string()))?;
    say(
        output,
        format!(
            "[aviary] built {} ({} {}, {} bytes)\n",
            built.path.display(),
            built.name,
            built.version,
            built.size
        ),
    );
    Ok(built_json(&built))
}

fn keep_versions(req: &RunRequest) -> Option<usize> {
    req.parameters
        .get("keep_versions")
        .and_then(Value::as_u64)
        .filter(|k| *k > 0)
        .map(|k| k as usize)
}

/// Publishes `debs`; the report as JSON.
async fn publish(
    engine: &Engine,
    req: &RunRequest,
    debs: Vec<PathBuf>,
    output: &UnboundedSender<OutputEvent>,
    cancel: &CancellationToken,
) -> Result<Value, RunOutcome> {
    let suite = text(req, "suite").unwrap_or("stable").to_string();
    let component = text(req, "component").unwrap_or("main").to_string();
    let repo = repository(engine, keep_versions(req)).map_err(failed)?;
    say(
        output,
        format!(
            "[aviary] publishing {} package(s) into {suite}/{component}\n",
            debs.len()
        ),
    );
    let (s, c) = (suite.clone(), component.clone());
    let report = blocking(cancel, move || repo.add(&debs, &s, &c), || {})
        .await?
        .map_err(|e| failed(e.to_string()))?;
    for (what, list) in [
        ("added", &report.added),
        ("unchanged", &report.unchanged),
        ("removed", &report.removed),
    ] {
        for e in list {
            say(
                output,
                format!("[aviary] {what} {} {}\n", e.name, e.version),
            );
        }
    }
    Ok(json!({
        "suite": suite,
        "component": component,
        "added": report.added,
        "unchanged": report.unchanged,
        "removed": report.removed,
        "published": report.published,
    }))
}

async fn apt_publish(
    engine: &Engine,
    req: &RunRequest,
    output: &UnboundedSender<OutputEvent>,
    cancel: &CancellationToken,
) -> Result<Value, RunOutcome> {
    let debs: Vec<PathBuf> = match req.parameters.get("debs") {
        Some(Value::Array(items)) if !items.is_empty() => {
            let mut out = Vec::new();
            for (i, v) in items.iter().enumerate() {
                let p = v.as_str().map(PathBuf::from).filter(|p| p.is_absolute());
                match p {
                    Some(p) => out.push(p),
                    None => {
                        return Err(failed(format!(
                            "action {}: debs[{i}] must be an absolute path of a .deb on the server, got {v}",
                            req.action_ref
                        )));
                    }
                }
            }
            out
        }
        Some(Value::String(s)) if Path::new(s).is_absolute() => vec![PathBuf::from(s)],
        _ => {
            return Err(failed(format!(
                "action {}: parameter 'debs' must list the .deb files to publish (absolute paths)",
                req.action_ref
            )));
        }
    };
    publish(engine, req, debs, output, cancel).await
}

/// The commit time of HEAD in `ws` (for reproducible packages).
async fn commit_time(ws: &Path) -> Option<i64> {
    let out = tokio::process::Command::new("git")
        .arg("-C")
        .arg(ws)
        .args(["log", "-1", "--format=%ct"])
        .output()
        .await
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

async fn ci_package(
    engine: &Engine,
    req: &RunRequest,
    output: &UnboundedSender<OutputEvent>,
    cancel: &CancellationToken,
) -> Result<Value, RunOutcome> {
    let started = std::time::Instant::now();
    let ws = req.work_dir.join("workspace");
    let out_dir = req.work_dir.join("out");
    let result = package_in(engine, req, &ws, &out_dir, output, cancel).await;
    // The workspace goes whatever happened (a canceled build step removes it
    // when it stops).
    if !cancel.is_cancelled() {
        let _ = std::fs::remove_dir_all(&ws);
        let _ = std::fs::remove_dir_all(&out_dir);
    }
    result.map(|mut v| {
        v["duration_ms"] = json!(started.elapsed().as_millis() as u64);
        v
    })
}

async fn package_in(
    engine: &Engine,
    req: &RunRequest,
    ws: &Path,
    out_dir: &Path,
    output: &UnboundedSender<OutputEvent>,
    cancel: &CancellationToken,
) -> Result<Value, RunOutcome> {
    let checkout = aviary_runners::checkout(req, ws, output.clone(), cancel.clone()).await?;
    let mut build = BuildRequest::new(ws, out_dir);
    build.build_number = build_number(req);
    build.commit = checkout.commit.clone();
    build.source_date_epoch = match req
        .parameters
        .get("source_date_epoch")
        .and_then(Value::as_i64)
    {
        Some(t) => Some(t),
        None => commit_time(ws).await,
    };
    build.compression = compression(req)?;
    say(
        output,
        format!("[aviary] building the .deb of {}\n", checkout.project),
    );
    let (ws2, out2) = (ws.to_path_buf(), out_dir.to_path_buf());
    let built = blocking(
        cancel,
        move || aviary_packaging::deb::build(&build),
        move || {
            let _ = std::fs::remove_dir_all(ws2);
            let _ = std::fs::remove_dir_all(out2);
        },
    )
    .await
    .map_err(|mut o| {
        o.result["stage"] = json!("package");
        o
    })?
    .map_err(|e| {
        let mut o = failed(e.to_string());
        o.result["stage"] = json!("package");
        o
    })?;
    say(
        output,
        format!(
            "[aviary] built {} {} ({} bytes, {} files)\n",
            built.name, built.version, built.size, built.files
        ),
    );
    let mut result = json!({
        "project": checkout.project,
        "repo": checkout.repo,
        "branch": checkout.branch,
        "commit": checkout.commit,
        "package": built_json(&built),
        "name": built.name,
        "version": built.version,
    });
    if req.parameters.get("publish").and_then(Value::as_bool) != Some(false) {
        let published = publish(engine, req, vec![built.path.clone()], output, cancel)
            .await
            .map_err(|mut o| {
                o.result["stage"] = json!("publish");
                o
            })?;
        result["published"] = published;
    }
    result["package"].as_object_mut().map(|p| p.remove("path"));
    Ok(result)
}

/// Deletes the output (build logs) of CI builds past retention; returns how
/// many executions lost their output.
pub async fn purge_build_logs(engine: &Engine) -> Result<usize, aviary_store::StoreError> {
    let ci = &engine.config.ci;
    if ci.log_retention_days.is_none() && ci.keep_builds.is_none() {
        return Ok(0);
    }
    let cutoff = ci
        .log_retention_days
        .map(|d| Utc::now() - chrono::Duration::days(d as i64));
    // Newest first; only finished CI builds.
    let actions: Vec<String> = {
        let registry = engine.registry.load();
        registry
            .actions
            .values()
            .filter(|a| a.runner_type == CI_BUILD)
            .map(|a| a.reference())
            .collect()
    };
    let mut doomed = Vec::new();
    for action in actions {
        let mut seen: HashMap<(Option<String>, Option<String>), usize> = HashMap::new();
        let mut offset = 0;
        loop {
            let page = engine
                .store
                .list_executions(&aviary_store::ExecutionFilter {
                    action: Some(action.clone()),
                    limit: 500,
                    offset,
                    ..Default::default()
                })
                .await?;
            if page.is_empty() {
                break;
            }
            offset += page.len() as u32;
            for e in page {
                if !e.status.is_terminal() {
                    continue;
                }
                let key = (
                    e.parameters
                        .get("repo")
                        .and_then(Value::as_str)
                        .map(String::from),
                    e.parameters
                        .get("branch")
                        .and_then(Value::as_str)
                        .map(|b| b.trim_start_matches("refs/heads/").to_string()),
                );
                let n = seen.entry(key).or_insert(0);
                *n += 1;
                let too_many = ci.keep_builds.is_some_and(|k| *n > k);
                let too_old = match (cutoff, e.finished_at.or(Some(e.created_at))) {
                    (Some(c), Some(at)) => at < c,
                    _ => false,
                };
                if too_many || too_old {
                    doomed.push(e.id);
                }
            }
        }
    }
    if doomed.is_empty() {
        return Ok(0);
    }
    engine.store.delete_output(&doomed).await?;
    Ok(doomed.len())
}

/// Runs [`purge_build_logs`] every `ci.purge_interval_secs` (and once at start).
pub async fn run_retention(engine: Arc<Engine>, shutdown: CancellationToken) {
    let ci = &engine.config.ci;
    if ci.log_retention_days.is_none() && ci.keep_builds.is_none() {
        return;
    }
    let every = Duration::from_secs(ci.purge_interval_secs.unwrap_or(3600).max(1));
    loop {
        match purge_build_logs(&engine).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(builds = n, "purged the logs of old CI builds"),
            Err(e) => tracing::warn!(error = %e, "cannot purge old CI build logs"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
