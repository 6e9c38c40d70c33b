//! The engine: turns events into executions and runs them.
//!
//! - [`Engine::ingest`] stores a trigger instance together with the
//!   enforcements and executions of every rule it matches, in one
//!   transaction: once it returns, the event and the work it causes are
//!   durable, and nothing half-done is ever stored.
//! - [`scheduler`] claims requested executions from the durable queue and
//!   runs them on a bounded pool of workers.
//! - [`timers`] fires the rules on timer triggers.
//! - [`output`] carries live output to subscribers and into the store.
//! - [`workflow`] runs Orquesta workflows durably, one step per ended child.
//! - [`ci`] runs the packaging steps (`deb-build`, `apt-publish`,
//!   `ci-package`), limits concurrent CI builds and purges old build logs.

pub mod ci;
pub mod inquiry;
pub mod output;
pub mod scheduler;
pub mod timers;
pub mod workflow;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arc_swap::ArcSwap;
use aviary_core::action::ActionMeta;
use aviary_core::model::{
    Enforcement, Execution, ExecutionStatus, KvScope, TriggerInstance, TriggerInstanceStatus,
    new_id,
};
use aviary_core::params::{ParamErrors, resolve_parameters, split_secrets};
use aviary_core::rule::Rule;
use aviary_core::secret::SecretKey;
use aviary_core::template::TemplateEngine;
use aviary_store::{Ingest, IngestOutcome, NewExecution, Store, StoreError};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
use tokio::sync::Notify;

use crate::config::ServerConfig;
use crate::packs::Registry;

/// The trigger a finished `ci-build` execution emits.
pub const CI_BUILD_TRIGGER: &str = "aviary.ci.build";

/// The runner whose `cmd` parameter is shell text.
/// Runners whose `cmd` is shell text (locally or on remote hosts): template
/// values in it go into environment variables, never into the text.
const SHELL_CMD_RUNNERS: [&str; 2] = ["local-shell-cmd", "remote-shell-cmd"];

/// Shared state of the engine.
pub struct Engine {
    /// Durable storage.
    pub store: Arc<dyn Store>,
    /// Packs, actions and rules in effect (swapped whole on reload).
    pub registry: ArcSwap<Registry>,
    /// Rule enable/disable overrides from the store.
    pub rule_overrides: ArcSwap<HashMap<String, bool>>,
    /// Jinja engine.
    pub templates: TemplateEngine,
    /// Key that encrypts secrets at rest.
    pub secret_key: SecretKey,
    /// Server configuration.
    pub config: ServerConfig,
    /// Woken whenever executions are requested.
    pub queue_notify: Notify,
    /// Executions running here, by id, with the token that cancels them.
    pub running: std::sync::Mutex<HashMap<String, tokio_util::sync::CancellationToken>>,
    /// Live output of executions running here.
    pub output: Arc<output::OutputHub>,
    /// Woken whenever the registry changes (timers re-plan).
    pub registry_changed: Notify,
    /// CI slots and the APT repository of the packaging steps.
    pub ci: ci::CiState,
    /// Advertised versions for agents and deploys.
    pub deploy: crate::deploy::DeployHub,
    /// Worker slots: at most `config.workers` executions run at once.
    pub workers: Arc<tokio::sync::Semaphore>,
    /// Executions handed straight to this node's scheduler (already
    /// `scheduled` here, with their worker slot), e.g. a workflow's next task.
    pub direct: scheduler::DirectQueue,
}

/// What [`Engine::ingest`] did with an event.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IngestResult {
    /// The stored trigger instance (or the earlier one, for a duplicate).
    pub trigger_instance_id: String,
    /// True when the event had been received before and was not stored again.
    pub duplicate: bool,
    /// Executions it started.
    pub executions: Vec<String>,
}

/// An event to ingest.
#[derive(Debug, Clone)]
pub struct Event {
    /// Trigger type reference.
    pub trigger: String,
    /// Event data.
    pub payload: Value,
    /// Deduplication key, if the source has one.
    pub dedup_key: Option<String>,
    /// For webhooks: the URL, which selects the rules.
    pub webhook_url: Option<String>,
    /// For timers: only this rule.
    pub only_rule: Option<String>,
}

/// Why an execution could not be requested.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The action does not exist.
    #[error("no action '{0}'; see `aviary action list`")]
    UnknownAction(String),
    /// The action is disabled.
    #[error("action '{0}' is disabled")]
    Disabled(String),
    /// Parameters are invalid (every problem listed).
    #[error("invalid parameters for '{action}': {errors}")]
    Parameters {
        /// Action reference.
        action: String,
        /// Every problem.
        errors: ParamErrors,
    },
    /// A template could not be rendered.
    #[error("{0}")]
    Template(String),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Engine {
    /// Is this rule enabled, taking overrides into account?
    pub fn rule_enabled(&self, rule: &Rule) -> bool {
        self.rule_overrides
            .load()
            .get(&rule.reference())
            .copied()
            .unwrap_or(rule.enabled)
    }

    /// Stores an event with everything its rules cause, atomically.
    pub async fn ingest(&self, event: Event) -> Result<IngestResult, StoreError> {
        let now = Utc::now();
        let registry = self.registry.load_full();
        let ti = TriggerInstance {
            id: new_id(),
            trigger: event.trigger.clone(),
            payload: event.payload,
            occurrence_time: now,
            dedup_key: event.dedup_key,
            status: TriggerInstanceStatus::Processed,
        };
        let only: Vec<usize>;
        let candidates: &[usize] = match (&event.webhook_url, &event.only_rule) {
            (_, Some(reference)) => {
                only = registry
                    .rules
                    .iter()
                    .position(|r| &r.reference() == reference)
                    .into_iter()
                    .collect();
                &only
            }
            (Some(url), None) => registry
                .webhooks
                .get(url)
                .map(Vec::as_slice)
                .unwrap_or_default(),
            (None, None) => registry
                .by_trigger
                .get(&event.trigger)
                .map(Vec::as_slice)
                .unwrap_or_default(),
        };
        let ctx = json!({ "trigger": ti.payload });
        let mut enforcements = Vec::new();
        let mut executions = Vec::new();
        for &idx in candidates {
            let rule = &registry.rules[idx];
            if !self.rule_enabled(rule) {
                continue;
            }
            if registry.compiled[idx].evaluate(&ctx, now).is_err() {
                continue;
            }
            let mut enforcement = Enforcement {
                id: new_id(),
                trigger_instance_id: ti.id.clone(),
                rule: rule.reference(),
                execution_id: None,
                failure_reason: None,
                enforced_at: now,
            };
            match self
                .prepare_rule_execution(&registry, rule, &ctx, &ti, &enforcement, now)
                .await
            {
                Ok(new) => {
                    enforcement.execution_id = Some(new.execution.id.clone());
                    executions.push(new);
                }
                Err(reason) => enforcement.failure_reason = Some(reason),
            }
            enforcements.push(enforcement);
        }
        let execution_ids: Vec<String> =
            executions.iter().map(|e| e.execution.id.clone()).collect();
        let ti_id = ti.id.clone();
        let outcome = self
            .store
            .ingest(Ingest {
                trigger_instance: ti,
                enforcements,
                executions,
            })
            .await?;
        Ok(match outcome {
            IngestOutcome::Stored => {
                if !execution_ids.is_empty() {
                    self.queue_notify.notify_one();
                }
                IngestResult {
                    trigger_instance_id: ti_id,
                    duplicate: false,
                    executions: execution_ids,
                }
            }
            IngestOutcome::Duplicate { existing_id } => IngestResult {
                trigger_instance_id: existing_id,
                duplicate: true,
                executions: Vec::new(),
            },
        })
    }

    async fn prepare_rule_execution(
        &self,
        registry: &Registry,
        rule: &Rule,
        ctx: &Value,
        ti: &TriggerInstance,
        enforcement: &Enforcement,
        now: DateTime<Utc>,
    ) -> Result<NewExecution, String> {
        let action = registry
            .actions
            .get(&rule.action.reference)
            .ok_or_else(|| format!("action '{}' does not exist", rule.action.reference))?;
        let mut ctx = ctx.clone();
        ctx["config_context"] = registry
            .configs
            .get(&rule.pack)
            .cloned()
            .unwrap_or_else(|| json!({}));
        let (ctx, kv_secrets) = self
            .with_datastore(&ctx, &rule.action.parameters)
            .await
            .map_err(|e| format!("datastore: {e}"))?;
        let rendered = self
            .render_parameters(action, &rule.action.parameters, &ctx)
            .map_err(|e| format!("rule '{}': {e}", rule.reference()))?;
        let mut new = self
            .build_execution(
                action,
                rendered,
                &kv_secrets,
                format!("rule:{}", rule.reference()),
                now,
            )
            .map_err(|e| e.to_string())?;
        new.execution.trigger_instance_id = Some(ti.id.clone());
        new.execution.rule = Some(rule.reference());
        new.execution.enforcement_id = Some(enforcement.id.clone());
        Ok(new)
    }

    /// Adds `st2kv.<scope>.<key>` values referenced by `templates` to the
    /// context. Returns the plain values of secrets used, so they are treated
    /// as secrets downstream.
    pub async fn with_datastore(
        &self,
        ctx: &Value,
        templates: &Map<String, Value>,
    ) -> Result<(Value, Vec<String>), StoreError> {
        let mut refs = HashSet::new();
        collect_kv_refs(
            &self.templates,
            &Value::Object(templates.clone()),
            &mut refs,
        );
        if refs.is_empty() {
            return Ok((ctx.clone(), Vec::new()));
        }
        let mut ctx = ctx.clone();
        let mut secrets = Vec::new();
        let mut st2kv = json!({ "system": {}, "user": {} });
        let now = Utc::now();
        for r in refs {
            let mut parts = r.splitn(3, '.');
            let (Some(_), Some(scope), Some(name)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let Some(scope_kind) = KvScope::parse(scope) else {
                continue;
            };
            let name = name.split('.').next().unwrap_or(name);
            if let Some(kv) = self.store.get_kv(scope_kind, name, now).await? {
                let value = if kv.secret {
                    match self.secret_key.decrypt(&kv.value) {
                        Ok(v) => {
                            secrets.push(v.clone());
                            v
                        }
                        Err(_) => continue,
                    }
                } else {
                    kv.value
                };
                st2kv[scope][name] = Value::String(value);
            }
        }
        ctx["st2kv"] = st2kv;
        Ok((ctx, secrets))
    }

    /// Renders rule parameters: Jinja everywhere, and shell-safe rendering
    /// for the `cmd` of shell-command actions (values go into `env`).
    pub fn render_parameters(
        &self,
        action: &ActionMeta,
        params: &Map<String, Value>,
        ctx: &Value,
    ) -> Result<Map<String, Value>, String> {
        let mut out = Map::new();
        let mut shell_env: Vec<(String, String)> = Vec::new();
        for (name, value) in params {
            if SHELL_CMD_RUNNERS.contains(&action.runner_type.as_str())
                && name == "cmd"
                && let Value::String(text) = value
            {
                let (cmd, env) = self
                    .templates
                    .render_shell(text, ctx)
                    .map_err(|e| format!("parameter 'cmd': {e}"))?;
                shell_env.extend(env);
                out.insert(name.clone(), Value::String(cmd));
                continue;
            }
            let rendered = self
                .templates
                .render_value(value, ctx)
                .map_err(|e| format!("parameter '{name}': {e}"))?;
            out.insert(name.clone(), rendered);
        }
        if !shell_env.is_empty() {
            let env = out
                .entry("env".to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(env) = env {
                for (k, v) in shell_env {
                    env.insert(k, Value::String(v));
                }
            }
        }
        Ok(out)
    }

    /// Validates parameters and builds a requested execution, secrets apart
    /// and encrypted.
    pub fn build_execution(
        &self,
        action: &ActionMeta,
        given: Map<String, Value>,
        extra_secrets: &[String],
        requested_by: String,
        now: DateTime<Utc>,
    ) -> Result<NewExecution, RequestError> {
        if !action.enabled {
            return Err(RequestError::Disabled(action.reference()));
        }
        let schema = action.effective_schema();
        let resolved =
            resolve_parameters(&schema, &given).map_err(|errors| RequestError::Parameters {
                action: action.reference(),
                errors,
            })?;
        let (mut masked, mut secrets) = split_secrets(&schema, &resolved);
        // A parameter whose value carries a datastore secret is a secret too.
        if !extra_secrets.is_empty() {
            for (name, value) in &resolved {
                let text = value.to_string();
                if extra_secrets
                    .iter()
                    .any(|s| !s.is_empty() && text.contains(s.as_str()))
                {
                    secrets.insert(name.clone(), value.clone());
                    masked.insert(name.clone(), Value::String(aviary_core::model::MASK.into()));
                }
            }
        }
        let timeout_secs = resolved
            .get("timeout")
            .and_then(Value::as_u64)
            .unwrap_or(self.config.default_timeout_secs);
        let secrets_blob = if secrets.is_empty() {
            None
        } else {
            let mut blob = json!({ "parameters": secrets });
            if !extra_secrets.is_empty() {
                blob["mask"] = json!(extra_secrets);
            }
            Some(self.secret_key.encrypt(&blob.to_string()))
        };
        Ok(NewExecution {
            execution: Execution {
                id: new_id(),
                action: action.reference(),
                runner: action.runner_type.clone(),
                parameters: Value::Object(masked),
                status: ExecutionStatus::Requested,
                result: Value::Null,
                trigger_instance_id: None,
                rule: None,
                enforcement_id: None,
                parent_id: None,
                requested_by,
                created_at: now,
                started_at: None,
                finished_at: None,
                timeout_secs,
                node: None,
            },
            secrets: secrets_blob,
        })
    }

    /// Emits the triggers of an execution that ended, each only if a rule
    /// listens to it (no cost otherwise): `core.st2.generic.actiontrigger`
    /// for every execution, `aviary.ci.build` for CI builds.
    pub async fn emit_execution_triggers(&self, id: &str) {
        let (action_listeners, ci_listeners) = {
            let registry = self.registry.load();
            (
                registry
                    .by_trigger
                    .contains_key(aviary_core::model::ACTION_TRIGGER),
                registry.by_trigger.contains_key(CI_BUILD_TRIGGER),
            )
        };
        if !action_listeners && !ci_listeners {
            return;
        }
        let exec = match self.store.get_execution(id).await {
            Ok(Some(e)) => e,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(execution = id, error = %e, "cannot read execution for its action trigger");
                return;
            }
        };
        if ci_listeners && exec.runner == "ci-build" {
            self.emit_ci_build(&exec).await;
        }
        if !action_listeners {
            return;
        }
        let payload = json!({
            "execution_id": exec.id,
            "status": exec.status,
            "action_name": exec.action.split_once('.').map(|(_, n)| n).unwrap_or(&exec.action),
            "action_ref": exec.action,
            "runner_ref": exec.runner,
            "parameters": exec.parameters,
            "result": exec.result,
            "start_timestamp": exec.started_at,
            "end_timestamp": exec.finished_at,
            "rule": exec.rule,
        });
        let event = Event {
            trigger: aviary_core::model::ACTION_TRIGGER.to_string(),
            payload,
            dedup_key: Some(format!("actiontrigger:{}", exec.id)),
            webhook_url: None,
            only_rule: None,
        };
        if let Err(e) = self.ingest(event).await {
            tracing::warn!(execution = id, error = %e, "cannot store the action trigger");
        }
    }

    /// A newer build of the same repository and branch supersedes older ones:
    /// they are canceled (queued ones at once, running ones killed).
    pub async fn cancel_superseded_builds(&self, exec: &Execution, params: &Map<String, Value>) {
        let key = |p: &Value| {
            (
                p.get("repo").and_then(Value::as_str).map(String::from),
                p.get("branch")
                    .and_then(Value::as_str)
                    .map(|b| b.trim_start_matches("refs/heads/").to_string()),
            )
        };
        let mine = key(&Value::Object(params.clone()));
        if mine.1.is_none() {
            return;
        }
        for status in [
            ExecutionStatus::Requested,
            ExecutionStatus::Scheduled,
            ExecutionStatus::Running,
        ] {
            let filter = aviary_store::ExecutionFilter {
                action: Some(exec.action.clone()),
                status: Some(status),
                limit: 1000,
                ..Default::default()
            };
            let Ok(others) = self.store.list_executions(&filter).await else {
                continue;
            };
            for other in others {
                if other.id != exec.id
                    && other.created_at < exec.created_at
                    && key(&other.parameters) == mine
                {
                    tracing::info!(superseded = %other.id, by = %exec.id, "canceling a superseded build");
                    if let Err(e) = self.cancel(&other.id).await {
                        tracing::warn!(execution = %other.id, error = %e, "cannot cancel a superseded build");
                    }
                }
            }
        }
    }

    /// Emits `aviary.ci.build` for a finished CI build, as Jenkins' webhook
    /// did in the seed: project, branch, commit, status, duration, execution.
    async fn emit_ci_build(&self, exec: &Execution) {
        let r = &exec.result;
        let duration_ms = r.get("duration_ms").and_then(Value::as_u64).unwrap_or(0);
        let payload = json!({
            "project": r.get("project"),
            "repo": r.get("repo"),
            "branch": r.get("branch"),
            "commit": r.get("commit"),
            "status": exec.status,
            "stage": r.get("stage"),
            "error": r.get("error"),
            "duration": duration_ms as f64 / 1000.0,
            "execution_id": exec.id,
        });
        let event = Event {
            trigger: CI_BUILD_TRIGGER.to_string(),
            payload,
            dedup_key: Some(format!("ci:{}", exec.id)),
            webhook_url: None,
            only_rule: None,
        };
        if let Err(e) = self.ingest(event).await {
            tracing::warn!(execution = %exec.id, error = %e, "cannot store the CI build trigger");
        }
    }

    /// Requests an execution of an action directly (API / CLI `run`).
    pub async fn request(
        &self,
        action_ref: &str,
        params: Map<String, Value>,
        requested_by: &str,
    ) -> Result<Execution, RequestError> {
        let registry = self.registry.load_full();
        let action = registry
            .actions
            .get(action_ref)
            .ok_or_else(|| RequestError::UnknownAction(action_ref.to_string()))?;
        let new =
            self.build_execution(action, params, &[], requested_by.to_string(), Utc::now())?;
        let execution = new.execution.clone();
        self.store.create_execution(new).await?;
        self.queue_notify.notify_one();
        Ok(execution)
    }

    /// Cancels an execution: queued ones are canceled at once, running ones
    /// are stopped (their process group is killed).
    pub async fn cancel(&self, id: &str) -> Result<Option<Execution>, StoreError> {
        let now = Utc::now();
        let Some(exec) = self.store.get_execution(id).await? else {
            return Ok(None);
        };
        if exec.status.is_terminal() {
            return Ok(Some(exec));
        }
        let queued = [ExecutionStatus::Requested, ExecutionStatus::Scheduled];
        let canceled_now = self
            .store
            .transition_execution(
                id,
                &queued,
                ExecutionStatus::Canceled,
                Some(json!({"error": "canceled before it started"})),
                now,
            )
            .await?;
        // An inquiry waiting for its answer ends at once.
        let canceled_now = canceled_now
            || self
                .store
                .transition_execution(
                    id,
                    &[ExecutionStatus::Pending],
                    ExecutionStatus::Canceled,
                    Some(json!({"error": "the inquiry was canceled before an answer"})),
                    now,
                )
                .await?;
        if !canceled_now {
            self.store
                .transition_execution(
                    id,
                    &[
                        ExecutionStatus::Running,
                        ExecutionStatus::Pausing,
                        ExecutionStatus::Paused,
                    ],
                    ExecutionStatus::Canceling,
                    None,
                    now,
                )
                .await?;
            let token = self.running.lock().ok().and_then(|m| m.get(id).cloned());
            if let Some(token) = token {
                token.cancel();
            }
            if exec.runner == workflow::WORKFLOW_RUNNER {
                workflow::cancel_children(self, id).await;
            }
        } else if exec.parent_id.is_some() {
            Box::pin(workflow::on_child_finished(self, id)).await;
        }
        self.store.get_execution(id).await
    }
}

fn collect_kv_refs(engine: &TemplateEngine, value: &Value, out: &mut HashSet<String>) {
    match value {
        Value::String(s) if s.contains("st2kv") => {
            if let Ok(refs) = engine.kv_references(s) {
                out.extend(refs);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_kv_refs(engine, v, out)),
        Value::Object(map) => map.values().for_each(|v| collect_kv_refs(engine, v, out)),
        _ => {}
    }
}
