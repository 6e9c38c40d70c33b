//! Actions, rules, trigger instances, enforcements, the datastore, tokens,
//! packs and the audit trail.

use std::sync::Arc;

use aviary_core::model::{KeyValue, KvScope, MASK};
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use chrono::Utc;
use serde::Deserialize;
use serde_json::{Value, json};

use super::executions::audit;
use super::{ApiError, AppState, parse_json};
use crate::auth::{Caller, create_token as make_token};
use crate::packs::{PackLoadError, Registry};

/// `GET /api/v1/actions`.
pub async fn list_actions(_c: Caller, State(state): State<AppState>) -> Json<Value> {
    let registry = state.engine.registry.load();
    let mut actions: Vec<_> = registry.actions.values().cloned().collect();
    actions.sort_by_key(|a| a.reference());
    Json(json!(
        actions.iter().map(|a| action_json(a)).collect::<Vec<_>>()
    ))
}

fn action_json(a: &aviary_core::action::ActionMeta) -> Value {
    let mut v = json!(a);
    v["ref"] = json!(a.reference());
    v
}

/// `GET /api/v1/actions/{ref}`.
pub async fn get_action(
    _c: Caller,
    State(state): State<AppState>,
    Path(reference): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let registry = state.engine.registry.load();
    let a = registry.actions.get(&reference).ok_or_else(|| {
        ApiError::not_found(format!("no action '{reference}'; see `aviary action list`"))
    })?;
    Ok(Json(action_json(a)))
}

fn rule_json(state: &AppState, r: &aviary_core::rule::Rule) -> Value {
    let mut v = json!(r);
    v["ref"] = json!(r.reference());
    v["enabled"] = json!(state.engine.rule_enabled(r));
    v
}

/// `GET /api/v1/rules`.
pub async fn list_rules(_c: Caller, State(state): State<AppState>) -> Json<Value> {
    let registry = state.engine.registry.load();
    Json(json!(
        registry
            .rules
            .iter()
            .map(|r| rule_json(&state, r))
            .collect::<Vec<_>>()
    ))
}

/// `GET /api/v1/rules/{ref}`.
pub async fn get_rule(
    _c: Caller,
    State(state): State<AppState>,
    Path(reference): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let registry = state.engine.registry.load();
    let r = registry.rule(&reference).ok_or_else(|| {
        ApiError::not_found(format!("no rule '{reference}'; see `aviary rule list`"))
    })?;
    Ok(Json(rule_json(&state, r)))
}

async fn set_rule(
    state: &AppState,
    caller: &Caller,
    reference: &str,
    enabled: bool,
) -> Result<Json<Value>, ApiError> {
    let registry = state.engine.registry.load_full();
    let rule = registry.rule(reference).ok_or_else(|| {
        ApiError::not_found(format!("no rule '{reference}'; see `aviary rule list`"))
    })?;
    state
        .engine
        .store
        .set_rule_enabled(reference, enabled)
        .await?;
    let overrides = state.engine.store.rule_overrides().await?;
    state.engine.rule_overrides.store(Arc::new(overrides));
    state.engine.registry_changed.notify_waiters();
    let action = if enabled {
        "rule.enable"
    } else {
        "rule.disable"
    };
    audit(state, &caller.name, action, reference, json!({})).await;
    Ok(Json(rule_json(state, rule)))
}

/// `POST /api/v1/rules/{ref}/enable`.
pub async fn enable_rule(
    c: Caller,
    State(state): State<AppState>,
    Path(r): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_rule(&state, &c, &r, true).await
}

/// `POST /api/v1/rules/{ref}/disable`.
pub async fn disable_rule(
    c: Caller,
    State(state): State<AppState>,
    Path(r): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_rule(&state, &c, &r, false).await
}

/// Paging query.
#[derive(Debug, Deserialize)]
pub struct TiQuery {
    trigger: Option<String>,
    limit: Option<u32>,
    offset: Option<u32>,
}

/// `GET /api/v1/trigger-instances`.
pub async fn list_trigger_instances(
    _c: Caller,
    State(state): State<AppState>,
    Query(q): Query<TiQuery>,
) -> Result<Json<Value>, ApiError> {
    let list = state
        .engine
        .store
        .list_trigger_instances(
            q.trigger.as_deref(),
            q.limit.unwrap_or(50).min(1000),
            q.offset.unwrap_or(0),
        )
        .await?;
    Ok(Json(json!(list)))
}

/// `GET /api/v1/trigger-instances/{id}`.
pub async fn get_trigger_instance(
    _c: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let ti = state
        .engine
        .store
        .get_trigger_instance(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no trigger instance '{id}'")))?;
    let enforcements = state
        .engine
        .store
        .list_enforcements(Some(&id), None, 1000)
        .await?;
    Ok(Json(
        json!({"trigger_instance": ti, "enforcements": enforcements}),
    ))
}

/// Query of `GET /enforcements`.
#[derive(Debug, Deserialize)]
pub struct EnfQuery {
    rule: Option<String>,
    trigger_instance: Option<String>,
    limit: Option<u32>,
}

/// `GET /api/v1/enforcements`.
pub async fn list_enforcements(
    _c: Caller,
    State(state): State<AppState>,
    Query(q): Query<EnfQuery>,
) -> Result<Json<Value>, ApiError> {
    let list = state
        .engine
        .store
        .list_enforcements(
            q.trigger_instance.as_deref(),
            q.rule.as_deref(),
            q.limit.unwrap_or(50).min(1000),
        )
        .await?;
    Ok(Json(json!(list)))
}

fn parse_scope(s: &str) -> Result<KvScope, ApiError> {
    KvScope::parse(s)
        .ok_or_else(|| ApiError::bad_request(format!("unknown scope '{s}'; use system or user")))
}

/// Datastore keys of the user scope are stored as `<user>:<name>`.
fn scoped_name(scope: KvScope, caller: &Caller, name: &str) -> String {
    match scope {
        KvScope::System => name.to_string(),
        KvScope::User => format!("{}:{name}", caller.name),
    }
}

fn kv_json(state: &AppState, kv: &KeyValue, decrypt: bool) -> Value {
    let value = if kv.secret {
        if decrypt {
            state
                .engine
                .secret_key
                .decrypt(&kv.value)
                .unwrap_or_else(|_| MASK.to_string())
        } else {
            MASK.to_string()
        }
    } else {
        kv.value.clone()
    };
    let name = match kv.scope {
        KvScope::User => kv
            .name
            .split_once(':')
            .map(|(_, n)| n)
            .unwrap_or(&kv.name)
            .to_string(),
        KvScope::System => kv.name.clone(),
    };
    json!({
        "scope": kv.scope, "name": name, "value": value, "secret": kv.secret,
        "expire_at": kv.expire_at, "updated_at": kv.updated_at,
    })
}

/// Query of key reads.
#[derive(Debug, Deserialize)]
pub struct KeyQuery {
    scope: Option<String>,
    prefix: Option<String>,
    #[serde(default)]
    decrypt: bool,
}

/// `GET /api/v1/keys`.
pub async fn list_keys(
    c: Caller,
    State(state): State<AppState>,
    Query(q): Query<KeyQuery>,
) -> Result<Json<Value>, ApiError> {
    let scope = q.scope.as_deref().map(parse_scope).transpose()?;
    let list = state
        .engine
        .store
        .list_kv(scope, q.prefix.as_deref(), Utc::now())
        .await?;
    let own_prefix = format!("{}:", c.name);
    let visible: Vec<Value> = list
        .iter()
        .filter(|kv| kv.scope == KvScope::System || kv.name.starts_with(&own_prefix))
        .map(|kv| kv_json(&state, kv, q.decrypt))
        .collect();
    Ok(Json(json!(visible)))
}

/// `GET /api/v1/keys/{scope}/{name}`.
pub async fn get_key(
    c: Caller,
    State(state): State<AppState>,
    Path((scope, name)): Path<(String, String)>,
    Query(q): Query<KeyQuery>,
) -> Result<Json<Value>, ApiError> {
    let scope = parse_scope(&scope)?;
    let kv = state
        .engine
        .store
        .get_kv(scope, &scoped_name(scope, &c, &name), Utc::now())
        .await?
        .ok_or_else(|| {
            ApiError::not_found(format!("no key '{name}' in scope {}", scope.as_str()))
        })?;
    if q.decrypt && kv.secret {
        audit(
            &state,
            &c.name,
            "key.decrypt",
            &name,
            json!({"scope": scope}),
        )
        .await;
    }
    Ok(Json(kv_json(&state, &kv, q.decrypt)))
}

/// Body of `PUT /keys/{scope}/{name}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PutKey {
    value: String,
    #[serde(default, alias = "encrypt")]
    secret: bool,
    ttl: Option<u64>,
}

/// `PUT /api/v1/keys/{scope}/{name}`.
pub async fn put_key(
    c: Caller,
    State(state): State<AppState>,
    Path((scope, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let scope = parse_scope(&scope)?;
    if name.is_empty() || name.len() > 512 || name.contains(':') {
        return Err(ApiError::bad_request(
            "key names are 1-512 characters without ':'",
        ));
    }
    let body: PutKey = parse_json(&body)?;
    let now = Utc::now();
    let kv = KeyValue {
        scope,
        name: scoped_name(scope, &c, &name),
        value: if body.secret {
            state.engine.secret_key.encrypt(&body.value)
        } else {
            body.value
        },
        secret: body.secret,
        expire_at: body
            .ttl
            .map(|t| now + chrono::Duration::seconds(t.min(i64::MAX as u64 / 2) as i64)),
        updated_at: now,
    };
    state.engine.store.set_kv(kv.clone()).await?;
    audit(
        &state,
        &c.name,
        "key.set",
        &name,
        json!({"scope": scope, "secret": kv.secret, "ttl": body.ttl}),
    )
    .await;
    Ok(Json(kv_json(&state, &kv, false)))
}

/// `DELETE /api/v1/keys/{scope}/{name}`.
pub async fn delete_key(
    c: Caller,
    State(state): State<AppState>,
    Path((scope, name)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let scope = parse_scope(&scope)?;
    if !state
        .engine
        .store
        .delete_kv(scope, &scoped_name(scope, &c, &name))
        .await?
    {
        return Err(ApiError::not_found(format!(
            "no key '{name}' in scope {}",
            scope.as_str()
        )));
    }
    audit(
        &state,
        &c.name,
        "key.delete",
        &name,
        json!({"scope": scope}),
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}

fn require_admin(c: &Caller) -> Result<(), ApiError> {
    if c.role == "admin" {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "only admin tokens may manage tokens",
        ))
    }
}

/// `GET /api/v1/tokens`.
pub async fn list_tokens(
    c: Caller,
    State(state): State<AppState>,
) -> Result<Json<Value>, ApiError> {
    require_admin(&c)?;
    let tokens = state.engine.store.list_tokens().await?;
    Ok(Json(json!(
        tokens
            .iter()
            .map(
                |t| json!({"id": t.id, "name": t.name, "role": t.role, "created_at": t.created_at,
                        "revoked_at": t.revoked_at, "last_used_at": t.last_used_at})
            )
            .collect::<Vec<_>>()
    )))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    name: String,
    role: Option<String>,
}

/// `POST /api/v1/tokens`.
pub async fn create_token(
    c: Caller,
    State(state): State<AppState>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    require_admin(&c)?;
    let body: NewToken = parse_json(&body)?;
    if body.name.is_empty()
        || body.name.len() > 100
        || !body
            .name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "-_.@".contains(ch))
    {
        return Err(ApiError::bad_request(
            "token names are 1-100 characters: letters, digits, - _ . @",
        ));
    }
    let role = body.role.unwrap_or_else(|| "admin".into());
    let (secret, t) = make_token(state.engine.store.as_ref(), &body.name, &role)
        .await
        .map_err(|e| match e {
            aviary_store::StoreError::Conflict { .. } => ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "a token named '{}' exists; revoke it first or pick another name",
                    body.name
                ),
            ),
            other => ApiError::from(other),
        })?;
    audit(
        &state,
        &c.name,
        "token.create",
        &t.name,
        json!({"id": t.id, "role": t.role}),
    )
    .await;
    Ok((
        StatusCode::CREATED,
        Json(
            json!({"token": secret, "id": t.id, "name": t.name, "role": t.role, "created_at": t.created_at}),
        ),
    ))
}

/// `DELETE /api/v1/tokens/{id or name}`.
pub async fn revoke_token(
    c: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    require_admin(&c)?;
    if !state.engine.store.revoke_token(&id, Utc::now()).await? {
        return Err(ApiError::not_found(format!("no active token '{id}'")));
    }
    state.tokens.clear();
    audit(&state, &c.name, "token.revoke", &id, json!({})).await;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /api/v1/packs`.
pub async fn list_packs(_c: Caller, State(state): State<AppState>) -> Json<Value> {
    Json(json!(state.engine.registry.load().packs))
}

/// `POST /api/v1/packs/reload`: the new set replaces the running one only if
/// every pack is valid.
pub async fn reload_packs(
    c: Caller,
    State(state): State<AppState>,
) -> Result<Json<Value>, ApiError> {
    let _guard = state.reload_lock.lock().await;
    let roots = state.engine.config.packs.clone();
    let loaded = tokio::task::spawn_blocking(move || Registry::load(&roots))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    match loaded {
        Ok(registry) => {
            let packs = json!(registry.packs);
            state.engine.registry.store(Arc::new(registry));
            state.engine.registry_changed.notify_waiters();
            audit(&state, &c.name, "pack.reload", "*", json!({"result": "ok"})).await;
            Ok(Json(json!({"packs": packs})))
        }
        Err(PackLoadError::Invalid(diags)) => {
            audit(
                &state,
                &c.name,
                "pack.reload",
                "*",
                json!({"result": "invalid", "errors": diags.0.len()}),
            )
            .await;
            Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "{} problem(s) in packs; the running set is unchanged",
                    diags.0.len()
                ),
            )
            .with_details(diags.0.iter().map(|d| json!(d.to_string())).collect()))
        }
        Err(e) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{e}; the running set is unchanged"),
        )),
    }
}

/// Query of `GET /audit`.
#[derive(Debug, Deserialize)]
pub struct AuditQuery {
    limit: Option<u32>,
}

/// `GET /api/v1/audit`.
pub async fn list_audit(
    _c: Caller,
    State(state): State<AppState>,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!(
        state
            .engine
            .store
            .list_audit(q.limit.unwrap_or(100).min(10_000))
            .await?
    )))
}

/// `GET /api/v1/stats`: counts of trigger instances and executions by status.
pub async fn stats(_c: Caller, State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let store = &state.engine.store;
    let mut executions = serde_json::Map::new();
    for status in aviary_core::model::ExecutionStatus::ALL {
        executions.insert(
            status.as_str().into(),
            json!(store.count_executions(Some(status)).await?),
        );
    }
    Ok(Json(json!({
        "trigger_instances": store.count_trigger_instances().await?,
        "executions": executions,
        "backend": store.backend(),
        "running_here": state.engine.running.lock().map(|m| m.len()).unwrap_or(0),
        "consul": crate::consul::status(),
    })))
}
