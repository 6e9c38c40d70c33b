//! Hosts, advertised versions, deploys and deploy locks (API tokens), and
//! the agent endpoints under `/api/v1/agent/` (per-host agent tokens: an
//! agent reads the versions of its own tags and reports about its own host).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

use aviary_deploy::{
    AppStatus, Host, HostFilter, VersionChangeKind, VersionChangeRequest, VersionOutcome,
    check_app, check_promotion, check_role, parse_tag, parse_tags, valid_host_name,
};
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use chrono::Utc;
use serde::Deserialize;
use serde_json::{Value, json};

use super::executions::audit;
use super::{ApiError, AppState, parse_json};
use crate::auth::{AGENT_ROLE, AgentCaller, Caller, agent_token_name, create_token};
use crate::engine::RequestError;

/// Largest `output` kept per app in a report.
const MAX_OUTPUT: usize = 16 * 1024;
/// How often a watch stream re-checks that its token is still valid.
const RECHECK_TOKEN: Duration = Duration::from_secs(30);

fn conflict(msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, msg)
}

fn tag_errors(errors: Vec<aviary_deploy::TagError>) -> ApiError {
    let details = errors
        .iter()
        .map(|e| json!({"field": "tags", "message": e.to_string()}))
        .collect();
    ApiError::bad_request(format!(
        "invalid tags: {}",
        errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    ))
    .with_details(details)
}

/// Query of `GET /api/v1/hosts`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostQuery {
    tag: Option<String>,
    app: Option<String>,
    role: Option<String>,
    canary: Option<bool>,
}

/// `GET /api/v1/hosts?tag=&app=&role=&canary=`.
pub async fn list_hosts(
    _c: Caller,
    State(state): State<AppState>,
    Query(q): Query<HostQuery>,
) -> Result<Json<Value>, ApiError> {
    if (q.role.is_some() || q.canary.is_some()) && q.app.is_none() {
        return Err(ApiError::bad_request(
            "`role` and `canary` filter within an app: add `app=NAME`",
        ));
    }
    let filter = HostFilter {
        tag: q.tag,
        app: q.app,
        role: q.role,
        canary: q.canary,
    };
    let hosts = state.engine.store.list_hosts().await?;
    let hosts: Vec<Host> = hosts.into_iter().filter(|h| filter.matches(h)).collect();
    Ok(Json(json!(hosts)))
}

async fn load_host(state: &AppState, name: &str) -> Result<Host, ApiError> {
    state.engine.store.get_host(name).await?.ok_or_else(|| {
        ApiError::not_found(format!("no host named '{name}'; see `aviary host list`"))
    })
}

/// `GET /api/v1/hosts/{name}`.
pub async fn get_host(
    _c: Caller,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!(load_host(&state, &name).await?)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewHost {
    name: String,
    address: String,
    #[serde(default)]
    tags: Vec<String>,
}

fn check_host_name(name: &str) -> Result<(), ApiError> {
    if valid_host_name(name) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "host name '{name}' is not valid: use 1-64 letters, digits, `-`, `_` or `.`"
        )))
    }
}

fn check_address(address: &str) -> Result<(), ApiError> {
    let ok = !address.is_empty()
        && address.len() <= 253
        && address
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "address '{address}' is not an IP address or DNS name"
        )))
    }
}

/// `POST /api/v1/hosts` `{name, address, tags}`: adds or updates a host.
pub async fn add_host(
    c: Caller,
    State(state): State<AppState>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let body: NewHost = parse_json(&body)?;
    check_host_name(&body.name)?;
    check_address(&body.address)?;
    parse_tags(&body.tags).map_err(tag_errors)?;
    let existing = state.engine.store.get_host(&body.name).await?;
    let host = Host {
        name: body.name.clone(),
        address: body.address,
        tags: body.tags,
        apps: BTreeMap::new(),
        last_seen: None,
        token_id: existing.as_ref().and_then(|h| h.token_id.clone()),
        created_at: existing.as_ref().map_or_else(Utc::now, |h| h.created_at),
    };
    state.engine.store.upsert_host(host.clone()).await?;
    audit(
        &state,
        &c.name,
        "host.add",
        &host.name,
        json!({"address": host.address, "tags": host.tags}),
    )
    .await;
    let stored = load_host(&state, &host.name).await?;
    let status = if existing.is_some() {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(json!(stored))))
}

/// `DELETE /api/v1/hosts/{name}`: removes a host and revokes its agent token.
pub async fn delete_host(
    c: Caller,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    if !state.engine.store.delete_host(&name).await? {
        return Err(ApiError::not_found(format!("no host named '{name}'")));
    }
    state
        .engine
        .store
        .revoke_token(&agent_token_name(&name), Utc::now())
        .await?;
    state.tokens.clear();
    audit(&state, &c.name, "host.delete", &name, json!({})).await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAgentToken {
    address: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
}

/// `POST /api/v1/hosts/{name}/token` `{address?, tags?}`: issues the host's
/// agent token (shown once), replacing any previous one. Creates the host
/// if needed. An agent may carry only tags its host has; a host without tags
/// takes the tags its agent registers with (enrollment).
pub async fn create_agent_token(
    c: Caller,
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if c.role != "admin" {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "only admin tokens may issue agent tokens",
        ));
    }
    check_host_name(&name)?;
    let body: NewAgentToken = if body.is_empty() {
        NewAgentToken::default()
    } else {
        parse_json(&body)?
    };
    if let Some(a) = &body.address {
        check_address(a)?;
    }
    parse_tags(&body.tags).map_err(tag_errors)?;
    let store = state.engine.store.as_ref();
    let token_name = agent_token_name(&name);
    store.revoke_token(&token_name, Utc::now()).await?;
    state.tokens.clear();
    let (secret, token) = create_token(store, &token_name, AGENT_ROLE).await?;
    let existing = store.get_host(&name).await?;
    let host = match existing {
        Some(mut h) => {
            if let Some(a) = body.address {
                h.address = a;
            }
            if !body.tags.is_empty() {
                h.tags = body.tags;
            }
            h.token_id = Some(token.id.clone());
            h
        }
        None => Host {
            name: name.clone(),
            address: body.address.unwrap_or_else(|| name.clone()),
            tags: body.tags,
            apps: BTreeMap::new(),
            last_seen: None,
            token_id: Some(token.id.clone()),
            created_at: Utc::now(),
        },
    };
    store.upsert_host(host.clone()).await?;
    audit(
        &state,
        &c.name,
        "host.token.create",
        &name,
        json!({"token_id": token.id}),
    )
    .await;
    Ok((
        StatusCode::CREATED,
        Json(json!({"token": secret, "id": token.id, "host": host})),
    ))
}

/// `DELETE /api/v1/hosts/{name}/token`: revokes the host's agent token
/// (open watch streams end within [`RECHECK_TOKEN`]).
pub async fn revoke_agent_token(
    c: Caller,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let revoked = state
        .engine
        .store
        .revoke_token(&agent_token_name(&name), Utc::now())
        .await?;
    state.tokens.clear();
    if !revoked {
        return Err(ApiError::not_found(format!(
            "host '{name}' has no active agent token"
        )));
    }
    audit(&state, &c.name, "host.token.revoke", &name, json!({})).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Query with an optional role.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleQuery {
    role: Option<String>,
    limit: Option<u32>,
}

fn app_role(app: &str, role: Option<&str>) -> Result<String, ApiError> {
    let role = role.unwrap_or("app").to_string();
    check_app(app)
        .and_then(|()| check_role(app, &role))
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(role)
}

/// `GET /api/v1/versions`: every app and role.
pub async fn list_versions(
    _c: Caller,
    State(state): State<AppState>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!(state.engine.store.list_versions().await?)))
}

/// `GET /api/v1/versions/{app}?role=&limit=`: current versions and history.
pub async fn get_versions(
    _c: Caller,
    State(state): State<AppState>,
    Path(app): Path<String>,
    Query(q): Query<RoleQuery>,
) -> Result<Json<Value>, ApiError> {
    let role = app_role(&app, q.role.as_deref())?;
    let store = state.engine.store.as_ref();
    let current = store.get_versions(&app, &role).await?;
    let history = store
        .version_history(&app, &role, q.limit.unwrap_or(50).min(1000))
        .await?;
    Ok(Json(json!({
        "app": app,
        "role": role,
        "canary_version": current.as_ref().and_then(|v| v.canary_version.clone()),
        "production_version": current.as_ref().and_then(|v| v.production_version.clone()),
        "updated_at": current.as_ref().map(|v| v.updated_at),
        "history": history,
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetProduction {
    version: String,
    role: Option<String>,
}

/// `PUT /api/v1/versions/{app}/production` `{version, role?}`: a direct
/// production change. Policy applies exactly as for `promote`: refused (409,
/// audited) unless `version` is the canary version and every canary runs it
/// healthy. It does not roll out in batches; use `promote` for that.
pub async fn set_production(
    c: Caller,
    State(state): State<AppState>,
    Path(app): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let body: SetProduction = parse_json(&body)?;
    let role = app_role(&app, body.role.as_deref())?;
    let store = state.engine.store.as_ref();
    let current = store.get_versions(&app, &role).await?;
    let canary = current.as_ref().and_then(|v| v.canary_version.clone());
    // The store refuses (and audits) a version that is not the canary's.
    if canary.as_deref() == Some(body.version.as_str()) {
        let hosts = store.list_hosts().await?;
        if let Err(refusal) = check_promotion(
            &app,
            &role,
            canary.as_deref(),
            &hosts,
            Utc::now(),
            chrono::Duration::seconds(120),
        ) {
            audit(
                &state,
                &c.name,
                "version.refused",
                &format!("{app}::{role}"),
                json!({"kind": "production", "version": body.version, "reason": refusal.to_string()}),
            )
            .await;
            return Err(conflict(refusal.to_string()));
        }
    }
    let outcome = store
        .change_version(VersionChangeRequest {
            app: app.clone(),
            role: role.clone(),
            kind: VersionChangeKind::Production {
                version: body.version,
            },
            actor: c.name.clone(),
            execution_id: None,
            at: Utc::now(),
        })
        .await?;
    match outcome {
        VersionOutcome::Changed { versions, change } => {
            if let Err(e) = state.engine.deploy.refresh(store).await {
                tracing::warn!(error = %e, "cannot publish the new versions at once");
            }
            Ok(Json(json!({"versions": versions, "change": change})))
        }
        VersionOutcome::Refused { reason } => Err(conflict(reason)),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployBody {
    operation: String,
    app: String,
    version: Option<String>,
    #[serde(default)]
    parameters: serde_json::Map<String, Value>,
}

/// `POST /api/v1/deploys` `{operation: canary|promote|rollback, app,
/// version?, parameters?}`: requests the built-in deploy action; 201 with the
/// execution.
pub async fn create_deploy(
    c: Caller,
    State(state): State<AppState>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let body: DeployBody = parse_json(&body)?;
    let action = match body.operation.as_str() {
        "canary" => "core.deploy_canary",
        "promote" => "core.deploy_promote",
        "rollback" => "core.deploy_rollback",
        other => {
            return Err(ApiError::bad_request(format!(
                "operation '{other}' is not canary, promote or rollback"
            )));
        }
    };
    if body.operation != "canary" && body.version.is_some() {
        return Err(ApiError::bad_request(format!(
            "{} takes no version: it can only {} (policy)",
            body.operation,
            if body.operation == "promote" {
                "promote the version the canaries run"
            } else {
                "return the canaries to the production version"
            }
        )));
    }
    let mut params = body.parameters;
    params.insert("app".into(), json!(body.app));
    if let Some(v) = body.version {
        params.insert("version".into(), json!(v));
    }
    let exec = state
        .engine
        .request(action, params, &c.name)
        .await
        .map_err(|e| match e {
            RequestError::Parameters { ref errors, .. } => {
                let details = errors
                    .0
                    .iter()
                    .map(|p| json!({"parameter": p.parameter, "message": p.message}))
                    .collect();
                ApiError::bad_request(e.to_string()).with_details(details)
            }
            RequestError::Store(s) => ApiError::from(s),
            other => ApiError::bad_request(other.to_string()),
        })?;
    audit(
        &state,
        &c.name,
        "execution.request",
        &exec.id,
        json!({"action": exec.action}),
    )
    .await;
    Ok((StatusCode::CREATED, Json(json!(exec))))
}

/// `GET /api/v1/deploy-locks`.
pub async fn list_locks(
    _c: Caller,
    State(state): State<AppState>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!(state.engine.store.list_deploy_locks().await?)))
}

// ------------------------------------------------------------------ agents

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Register {
    address: Option<String>,
    tags: Vec<String>,
}

/// `POST /api/v1/agent/register` `{address?, tags}`: the agent says which
/// tags it carries. They must be tags of its host (a host without tags takes
/// them: enrollment). Returns the host and its assignments.
pub async fn agent_register(
    a: AgentCaller,
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let body: Register = parse_json(&body)?;
    let tags = parse_tags(&body.tags).map_err(tag_errors)?;
    if tags.is_empty() {
        return Err(ApiError::bad_request(
            "an agent needs at least one tag (`--tag APP::ROLE` or `--tag APP::ROLE_canary`)",
        ));
    }
    if let Some(addr) = &body.address {
        check_address(addr)?;
    }
    let mut host = load_host(&state, &a.host).await?;
    if host.tags.is_empty() {
        host.tags = body.tags.clone();
        audit(
            &state,
            &agent_token_name(&a.host),
            "host.enroll",
            &a.host,
            json!({"tags": host.tags}),
        )
        .await;
    } else {
        let foreign: Vec<&String> = body
            .tags
            .iter()
            .filter(|t| !host.tags.contains(t))
            .collect();
        if !foreign.is_empty() {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "host '{}' does not carry {:?} (its tags: {:?}); an admin can change them with `aviary host add {} --address ADDR --tag ...`",
                    a.host, foreign, host.tags, a.host
                ),
            ));
        }
    }
    if let Some(addr) = body.address {
        host.address = addr;
    }
    state.engine.store.upsert_host(host.clone()).await?;
    let assignments = state.engine.deploy.current().assignments(&host.name, &tags);
    Ok(Json(json!({"host": host, "assignments": assignments})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Report {
    #[serde(default)]
    apps: BTreeMap<String, AppStatus>,
}

/// `POST /api/v1/agent/report` `{apps: {APP: AppStatus}}`: heartbeat and
/// report about the agent's own host; only apps its tags carry are accepted.
pub async fn agent_report(
    a: AgentCaller,
    State(state): State<AppState>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let body: Report = parse_json(&body)?;
    let host = load_host(&state, &a.host).await?;
    let foreign: Vec<&String> = body.apps.keys().filter(|app| !host.has_app(app)).collect();
    if !foreign.is_empty() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "host '{}' has no tag for {:?}; an agent reports only the apps its host carries",
                a.host, foreign
            ),
        ));
    }
    let now = Utc::now();
    let apps = body
        .apps
        .into_iter()
        .map(|(k, mut st)| {
            if st.output.len() > MAX_OUTPUT {
                let mut cut = st.output.len() - MAX_OUTPUT;
                while !st.output.is_char_boundary(cut) {
                    cut += 1;
                }
                st.output = st.output[cut..].to_string();
            }
            st.updated_at = Some(now);
            (k, st)
        })
        .collect();
    state
        .engine
        .store
        .record_host_report(&a.host, apps, now)
        .await?;
    state.engine.deploy.reported();
    Ok(StatusCode::NO_CONTENT)
}

async fn host_tags(state: &AppState, host: &str) -> Result<Vec<aviary_deploy::Tag>, ApiError> {
    let host = load_host(state, host).await?;
    Ok(host.tags.iter().filter_map(|t| parse_tag(t).ok()).collect())
}

/// `GET /api/v1/agent/versions`: what the agent's host should run.
pub async fn agent_versions(
    a: AgentCaller,
    State(state): State<AppState>,
) -> Result<Json<Value>, ApiError> {
    let tags = host_tags(&state, &a.host).await?;
    Ok(Json(json!(
        state.engine.deploy.current().assignments(&a.host, &tags)
    )))
}

/// `GET /api/v1/agent/watch`: server-sent events. `assignments` (data: the
/// JSON list) at once and whenever the host's assignments change. The
/// stream ends when the token is revoked or the host removed.
pub async fn agent_watch(
    a: AgentCaller,
    State(state): State<AppState>,
) -> Result<Sse<impl futures::Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let tags = host_tags(&state, &a.host).await?;
    let rx = state.engine.deploy.subscribe();
    struct W {
        rx: tokio::sync::watch::Receiver<std::sync::Arc<crate::deploy::Snapshot>>,
        last: Option<Value>,
        next_check: tokio::time::Instant,
        state: AppState,
        a: AgentCaller,
        tags: Vec<aviary_deploy::Tag>,
        id: u64,
    }
    let w = W {
        rx,
        last: None,
        next_check: tokio::time::Instant::now() + RECHECK_TOKEN,
        state,
        a,
        tags,
        id: 0,
    };
    let stream = futures::stream::unfold(w, |mut w| async move {
        loop {
            let current = json!(w.rx.borrow_and_update().assignments(&w.a.host, &w.tags));
            if w.last.as_ref() != Some(&current) {
                w.last = Some(current.clone());
                w.id += 1;
                let ev = SseEvent::default()
                    .event("assignments")
                    .id(w.id.to_string())
                    .data(current.to_string());
                return Some((Ok(ev), w));
            }
            tokio::select! {
                changed = w.rx.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                _ = tokio::time::sleep_until(w.next_check) => {
                    w.next_check = tokio::time::Instant::now() + RECHECK_TOKEN;
                    match w.state.engine.store.find_token_by_hash(&w.a.token_hash).await {
                        Ok(Some(_)) => {}
                        Ok(None) => return None,
                        Err(_) => {}
                    }
                }
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
