//! The in-process `deploy` runner: canary, promote and rollback as
//! executions (audited, visible, cancelable, usable from rules and
//! workflows).
//!
//! Every operation takes the deploy lock of its app and role first (held by
//! the execution's id; released at the end, and by crash recovery at start),
//! emits `aviary.deploy.started`, changes the advertised versions through
//! [`aviary_store::DeployStore::change_version`] (which enforces the
//! promotion rule again in its transaction), waits for the hosts, emits
//! `aviary.deploy.host` per host and `aviary.deploy.finished` or
//! `aviary.deploy.failed`.

use std::collections::BTreeSet;
use std::time::Duration;

use aviary_core::model::{AuditRecord, Execution, ExecutionStatus, new_id};
use aviary_deploy::{
    BatchSpec, DeployLock, Host, HostState, VersionChangeKind, VersionChangeRequest,
    VersionOutcome, check_app, check_promotion, check_role, host_state, plan_batches,
};
use aviary_runners::{OutputEvent, Stream};
use chrono::Utc;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use super::Rollout;
use crate::engine::{Engine, Event};

/// Trigger emitted when a deploy starts.
pub const STARTED_TRIGGER: &str = "aviary.deploy.started";
/// Trigger emitted when a deploy succeeds.
pub const FINISHED_TRIGGER: &str = "aviary.deploy.finished";
/// Trigger emitted when a deploy fails (refused, timed out, a host failed).
pub const FAILED_TRIGGER: &str = "aviary.deploy.failed";
/// Trigger emitted for each host's outcome.
pub const HOST_TRIGGER: &str = "aviary.deploy.host";

/// How long to wait between lock attempts.
const LOCK_RETRY: Duration = Duration::from_millis(500);

struct Ctx<'a> {
    engine: &'a Engine,
    exec: &'a Execution,
    out: UnboundedSender<OutputEvent>,
    cancel: CancellationToken,
    operation: String,
    app: String,
    role: String,
}

impl Ctx<'_> {
    fn say(&self, line: impl Into<String>) {
        let mut data = line.into();
        data.push('\n');
        let _ = self.out.send(OutputEvent {
            stream: Stream::Stdout,
            data,
        });
    }

    async fn emit(&self, trigger: &str, key: &str, payload: Value) {
        if !self.engine.registry.load().by_trigger.contains_key(trigger) {
            return;
        }
        let event = Event {
            trigger: trigger.to_string(),
            payload,
            dedup_key: Some(format!("deploy:{}:{key}", self.exec.id)),
            webhook_url: None,
            only_rule: None,
        };
        if let Err(e) = self.engine.ingest(event).await {
            tracing::warn!(execution = %self.exec.id, error = %e, "cannot store a deploy trigger");
        }
    }
}

fn int(params: &Map<String, Value>, name: &str) -> Option<u64> {
    params.get(name).and_then(Value::as_u64)
}

fn text<'a>(params: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    params.get(name).and_then(Value::as_str)
}

fn fail(error: impl Into<String>, mut extra: Value) -> (ExecutionStatus, Value) {
    let error = error.into();
    if let Value::Object(m) = &mut extra {
        m.insert("error".into(), Value::String(error));
        m.insert("ok".into(), Value::Bool(false));
        (ExecutionStatus::Failed, extra)
    } else {
        (
            ExecutionStatus::Failed,
            json!({"error": error, "ok": false}),
        )
    }
}

/// Runs one deploy execution to its end.
pub async fn run(
    engine: &Engine,
    exec: &Execution,
    params: &Map<String, Value>,
    out: UnboundedSender<OutputEvent>,
    cancel: CancellationToken,
) -> (ExecutionStatus, Value) {
    let operation = text(params, "operation").unwrap_or("").to_string();
    let app = text(params, "app").unwrap_or("").to_string();
    let role = text(params, "role").unwrap_or("app").to_string();
    if let Err(e) = check_app(&app).and_then(|()| check_role(&app, &role)) {
        return fail(format!("parameter 'app'/'role': {e}"), json!({}));
    }
    if !["canary", "promote", "rollback"].contains(&operation.as_str()) {
        return fail(
            format!("unknown deploy operation '{operation}' (canary, promote or rollback)"),
            json!({}),
        );
    }
    let ctx = Ctx {
        engine,
        exec,
        out,
        cancel,
        operation,
        app,
        role,
    };
    let lock_wait = Duration::from_secs(int(params, "lock_wait").unwrap_or(0));
    if let Err(msg) = take_lock(&ctx, lock_wait).await {
        return fail(
            msg,
            json!({"operation": ctx.operation, "app": ctx.app, "role": ctx.role}),
        );
    }
    ctx.emit(
        STARTED_TRIGGER,
        "started",
        json!({"operation": ctx.operation, "app": ctx.app, "role": ctx.role,
               "version": text(params, "version"), "execution_id": exec.id}),
    )
    .await;
    let (status, result) = match ctx.operation.as_str() {
        "canary" => canary(&ctx, params).await,
        "promote" => promote(&ctx, params).await,
        _ => rollback(&ctx, params).await,
    };
    let (status, result) = if ctx.cancel.is_cancelled() {
        let mut r = result;
        r["error"] = json!("canceled");
        (ExecutionStatus::Canceled, r)
    } else {
        (status, result)
    };
    if let Err(e) = engine
        .store
        .release_deploy_lock(&ctx.app, &ctx.role, &exec.id)
        .await
    {
        tracing::warn!(execution = %exec.id, error = %e, "cannot release the deploy lock (crash recovery will)");
    }
    let trigger = if status == ExecutionStatus::Succeeded {
        FINISHED_TRIGGER
    } else {
        FAILED_TRIGGER
    };
    let mut payload = result.clone();
    payload["execution_id"] = json!(exec.id);
    payload["status"] = json!(status);
    ctx.emit(trigger, "end", payload).await;
    (status, result)
}

async fn take_lock(ctx: &Ctx<'_>, wait: Duration) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut said = false;
    loop {
        let lock = DeployLock {
            app: ctx.app.clone(),
            role: ctx.role.clone(),
            holder: ctx.exec.id.clone(),
            actor: ctx.exec.requested_by.clone(),
            acquired_at: Utc::now(),
        };
        match ctx.engine.store.acquire_deploy_lock(lock).await {
            Ok(None) => return Ok(()),
            Ok(Some(held)) => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(format!(
                        "another deploy of {}::{} is running: execution {} (started by {} at {}); wait for it (`aviary execution get {}`), cancel it, or pass lock_wait",
                        ctx.app,
                        ctx.role,
                        held.holder,
                        held.actor,
                        held.acquired_at
                            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        held.holder
                    ));
                }
                if !said {
                    ctx.say(format!(
                        "waiting for the deploy lock of {}::{} held by execution {}",
                        ctx.app, ctx.role, held.holder
                    ));
                    said = true;
                }
            }
            Err(e) => return Err(format!("cannot take the deploy lock: {e}")),
        }
        tokio::select! {
            _ = ctx.cancel.cancelled() => return Err("canceled while waiting for the deploy lock".into()),
            _ = tokio::time::sleep(LOCK_RETRY) => {}
        }
    }
}

async fn change(ctx: &Ctx<'_>, kind: VersionChangeKind) -> Result<aviary_deploy::Versions, String> {
    let req = VersionChangeRequest {
        app: ctx.app.clone(),
        role: ctx.role.clone(),
        kind,
        actor: ctx.exec.requested_by.clone(),
        execution_id: Some(ctx.exec.id.clone()),
        at: Utc::now(),
    };
    let outcome = ctx
        .engine
        .store
        .change_version(req)
        .await
        .map_err(|e| format!("cannot change the advertised versions: {e}"))?;
    match outcome {
        VersionOutcome::Changed { versions, change } => {
            ctx.say(format!(
                "{} version of {}::{}: {} -> {}",
                change.kind,
                ctx.app,
                ctx.role,
                change.old_version.as_deref().unwrap_or("(none)"),
                change.new_version.as_deref().unwrap_or("(none)")
            ));
            if let Err(e) = ctx.engine.deploy.refresh(ctx.engine.store.as_ref()).await {
                tracing::warn!(error = %e, "cannot publish the new versions at once (the periodic refresh will)");
            }
            Ok(*versions)
        }
        VersionOutcome::Refused { reason } => Err(reason),
    }
}

/// One host's outcome in a deploy.
fn outcome_json(
    host: Option<&Host>,
    name: &str,
    app: &str,
    version: &str,
    timed_out: bool,
) -> Value {
    let Some(h) = host else {
        return json!({"host": name, "outcome": "missing", "error": "the host was removed from the inventory"});
    };
    let st = h.app_status(app);
    let outcome = match host_state(h, app, version) {
        HostState::Converged => "converged",
        HostState::Failed => "failed",
        HostState::Pending if timed_out => "timeout",
        HostState::Pending => "pending",
    };
    json!({
        "host": name,
        "address": h.address,
        "outcome": outcome,
        "installed": st.installed,
        "health": st.health,
        "error": st.error,
        "last_seen": h.last_seen,
    })
}

/// Waits until every named host converged on `version` or failed, or the
/// deadline passes; returns each host's outcome and whether all converged.
async fn wait_for_hosts(
    ctx: &Ctx<'_>,
    names: &[String],
    version: &str,
    timeout: Duration,
) -> Result<(Vec<Value>, bool), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut reports = ctx.engine.deploy.report_events();
    let mut announced: BTreeSet<String> = BTreeSet::new();
    loop {
        let hosts = ctx
            .engine
            .store
            .list_hosts()
            .await
            .map_err(|e| format!("cannot read the inventory: {e}"))?;
        let find = |n: &str| hosts.iter().find(|h| h.name == n);
        let mut pending = 0;
        for n in names {
            match find(n).map(|h| host_state(h, &ctx.app, version)) {
                Some(HostState::Pending) => pending += 1,
                Some(state) => {
                    if announced.insert(n.clone()) {
                        ctx.say(format!(
                            "  {n}: {}",
                            if state == HostState::Converged {
                                "converged"
                            } else {
                                "FAILED"
                            }
                        ));
                    }
                }
                None => {
                    announced.insert(n.clone());
                }
            }
        }
        let timed_out = tokio::time::Instant::now() >= deadline;
        if pending == 0 || timed_out || ctx.cancel.is_cancelled() {
            let outcomes: Vec<Value> = names
                .iter()
                .map(|n| outcome_json(find(n), n, &ctx.app, version, timed_out))
                .collect();
            let all_ok = outcomes.iter().all(|o| o["outcome"] == json!("converged"));
            for o in &outcomes {
                let mut payload = o.clone();
                payload["app"] = json!(ctx.app);
                payload["role"] = json!(ctx.role);
                payload["version"] = json!(version);
                payload["operation"] = json!(ctx.operation);
                payload["execution_id"] = json!(ctx.exec.id);
                let key = format!("host:{}:{}", o["host"].as_str().unwrap_or(""), version);
                ctx.emit(HOST_TRIGGER, &key, payload).await;
            }
            return Ok((outcomes, all_ok));
        }
        tokio::select! {
            _ = ctx.cancel.cancelled() => {}
            _ = reports.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}

fn timeout_of(params: &Map<String, Value>) -> Duration {
    Duration::from_secs(int(params, "timeout").unwrap_or(300))
}

async fn hosts_where(ctx: &Ctx<'_>, canary: bool) -> Result<Vec<String>, String> {
    let hosts = ctx
        .engine
        .store
        .list_hosts()
        .await
        .map_err(|e| format!("cannot read the inventory: {e}"))?;
    Ok(hosts
        .into_iter()
        .filter(|h| {
            if canary {
                h.is_canary(&ctx.app, &ctx.role)
            } else {
                h.is_production(&ctx.app, &ctx.role)
            }
        })
        .map(|h| h.name)
        .collect())
}

async fn canary(ctx: &Ctx<'_>, params: &Map<String, Value>) -> (ExecutionStatus, Value) {
    let base = json!({"operation": "canary", "app": ctx.app, "role": ctx.role});
    let Some(version) = text(params, "version").filter(|v| valid_version(v)) else {
        return fail(
            "parameter 'version' must be a Debian version (digits, letters, . + ~ - :)",
            base,
        );
    };
    canary_to(
        ctx,
        params,
        VersionChangeKind::Canary {
            version: version.to_string(),
        },
        base,
    )
    .await
}

async fn rollback(ctx: &Ctx<'_>, params: &Map<String, Value>) -> (ExecutionStatus, Value) {
    let base = json!({"operation": "rollback", "app": ctx.app, "role": ctx.role});
    canary_to(ctx, params, VersionChangeKind::Rollback, base).await
}

/// Sets the canary version (canary or rollback) and waits for the canaries.
async fn canary_to(
    ctx: &Ctx<'_>,
    params: &Map<String, Value>,
    kind: VersionChangeKind,
    mut base: Value,
) -> (ExecutionStatus, Value) {
    let versions = match change(ctx, kind).await {
        Ok(v) => v,
        Err(e) => return fail(e, base),
    };
    let version = versions.canary_version.clone().unwrap_or_default();
    base["version"] = json!(version);
    let names = match hosts_where(ctx, true).await {
        Ok(n) => n,
        Err(e) => return fail(e, base),
    };
    if names.is_empty() {
        ctx.say(format!(
            "no host is tagged {}::{}_canary; nothing to wait for",
            ctx.app, ctx.role
        ));
    } else {
        ctx.say(format!(
            "waiting for {} canar{}: {}",
            names.len(),
            if names.len() == 1 { "y" } else { "ies" },
            names.join(", ")
        ));
    }
    let (hosts, ok) = match wait_for_hosts(ctx, &names, &version, timeout_of(params)).await {
        Ok(r) => r,
        Err(e) => return fail(e, base),
    };
    base["hosts"] = json!(hosts);
    if ok {
        base["ok"] = json!(true);
        (ExecutionStatus::Succeeded, base)
    } else {
        let bad: Vec<String> = hosts
            .iter()
            .filter(|h| h["outcome"] != json!("converged"))
            .map(|h| {
                format!(
                    "{} ({})",
                    h["host"].as_str().unwrap_or("?"),
                    h["outcome"].as_str().unwrap_or("?")
                )
            })
            .collect();
        fail(
            format!(
                "{} of {} canaries did not converge on {version}: {}",
                bad.len(),
                hosts.len(),
                bad.join(", ")
            ),
            base,
        )
    }
}

async fn promote(ctx: &Ctx<'_>, params: &Map<String, Value>) -> (ExecutionStatus, Value) {
    let mut base = json!({"operation": "promote", "app": ctx.app, "role": ctx.role});
    let store = ctx.engine.store.as_ref();
    let (versions, hosts) = match (
        store.get_versions(&ctx.app, &ctx.role).await,
        store.list_hosts().await,
    ) {
        (Ok(v), Ok(h)) => (v, h),
        (Err(e), _) | (_, Err(e)) => return fail(format!("cannot read the store: {e}"), base),
    };
    let stale_after = chrono::Duration::seconds(
        i64::try_from(int(params, "stale_after").unwrap_or(120)).unwrap_or(i64::MAX / 1_000_000),
    );
    let canary_version = versions.as_ref().and_then(|v| v.canary_version.clone());
    let previous = versions.as_ref().and_then(|v| v.production_version.clone());
    let version = match check_promotion(
        &ctx.app,
        &ctx.role,
        canary_version.as_deref(),
        &hosts,
        Utc::now(),
        stale_after,
    ) {
        Ok(v) => v,
        Err(refusal) => {
            let record = AuditRecord {
                id: new_id(),
                at: Utc::now(),
                actor: ctx.exec.requested_by.clone(),
                action: "deploy.promote.refused".into(),
                target: format!("{}::{}", ctx.app, ctx.role),
                details: json!({"execution_id": ctx.exec.id, "refusal": refusal}),
            };
            if let Err(e) = store.append_audit(record).await {
                tracing::warn!(error = %e, "cannot audit a refused promotion");
            }
            base["refusal"] = json!(refusal);
            return fail(refusal.to_string(), base);
        }
    };
    base["version"] = json!(version);
    base["previous"] = json!(previous);
    // Hold production hosts on the previous version before it changes, then
    // release them batch by batch.
    let mut rollout = Rollout {
        previous: previous.clone(),
        released: BTreeSet::new(),
    };
    ctx.engine
        .deploy
        .set_rollout(&ctx.app, &ctx.role, Some(rollout.clone()));
    if let Err(e) = change(
        ctx,
        VersionChangeKind::Production {
            version: version.clone(),
        },
    )
    .await
    {
        ctx.engine.deploy.set_rollout(&ctx.app, &ctx.role, None);
        return fail(e, base);
    }
    let mut names: Vec<String> = hosts
        .iter()
        .filter(|h| h.is_production(&ctx.app, &ctx.role))
        .map(|h| h.name.clone())
        .collect();
    names.sort();
    let spec = BatchSpec {
        size: int(params, "batch_size").and_then(|n| usize::try_from(n).ok()),
        percent: int(params, "batch_percent").and_then(|n| u8::try_from(n.min(100)).ok()),
        max_unavailable: int(params, "max_unavailable").and_then(|n| usize::try_from(n).ok()),
    };
    let batches = plan_batches(&names, spec);
    base["batches"] = json!(batches);
    let mut all_hosts = Vec::new();
    let total = batches.len();
    for (i, batch) in batches.iter().enumerate() {
        ctx.say(format!("batch {}/{total}: {}", i + 1, batch.join(", ")));
        rollout.released.extend(batch.iter().cloned());
        ctx.engine
            .deploy
            .set_rollout(&ctx.app, &ctx.role, Some(rollout.clone()));
        let (outcomes, ok) = match wait_for_hosts(ctx, batch, &version, timeout_of(params)).await {
            Ok(r) => r,
            Err(e) => return fail(e, base),
        };
        all_hosts.extend(outcomes);
        base["hosts"] = json!(all_hosts);
        if !ok {
            let held = names.len() - rollout.released.len();
            return fail(
                format!(
                    "batch {}/{total} failed; the rollout stopped ({held} production host(s) not yet released stay on {}); fix the hosts and promote again, or roll back",
                    i + 1,
                    previous.as_deref().unwrap_or("their version")
                ),
                base,
            );
        }
    }
    ctx.engine.deploy.set_rollout(&ctx.app, &ctx.role, None);
    if names.is_empty() {
        ctx.say(format!(
            "no production host is tagged {}::{}",
            ctx.app, ctx.role
        ));
    }
    base["hosts"] = json!(all_hosts);
    base["ok"] = json!(true);
    (ExecutionStatus::Succeeded, base)
}

/// A Debian version: starts with a digit; letters, digits, `.+~-:`.
pub fn valid_version(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && v.chars().next().is_some_and(|c| c.is_ascii_digit())
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || ".+~-:".contains(c))
}
