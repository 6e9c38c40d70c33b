//! API authentication: bearer tokens stored as SHA-256 hashes, the admin
//! token created on first start, and a short-lived cache of valid tokens.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aviary_core::model::{ApiToken, ExecutionStatus, new_id};
use aviary_store::{Store, StoreError};
use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::request::Parts;
use chrono::Utc;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::api::{ApiError, AppState};

/// How long a checked token is trusted without asking the store again.
const CACHE_FOR: Duration = Duration::from_secs(2);

/// The authenticated caller of an API request.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Token name.
    pub name: String,
    /// Token role.
    pub role: String,
}

/// Recently verified tokens, by hash.
#[derive(Default)]
pub struct TokenCache {
    entries: Mutex<HashMap<String, (Caller, Instant)>>,
}

impl TokenCache {
    fn get(&self, hash: &str) -> Option<Caller> {
        let map = self.entries.lock().ok()?;
        map.get(hash)
            .filter(|(_, at)| at.elapsed() < CACHE_FOR)
            .map(|(c, _)| c.clone())
    }
    fn put(&self, hash: String, caller: Caller) {
        if let Ok(mut map) = self.entries.lock() {
            if map.len() > 10_000 {
                map.clear();
            }
            map.insert(hash, (caller, Instant::now()));
        }
    }
    /// Forgets every cached token (after a revocation).
    pub fn clear(&self) {
        if let Ok(mut map) = self.entries.lock() {
            map.clear();
        }
    }
}

/// SHA-256 of a token, hex: what the store keeps.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new random token secret.
pub fn generate_token() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("avy_{}", hex::encode(bytes))
}

/// Prefix of an execution's own API token.
const EXECUTION_TOKEN_PREFIX: &str = "avx_";
/// MAC purpose of execution tokens.
const EXECUTION_TOKEN_PURPOSE: &str = "aviary execution token";

/// The API token an action gets while it runs (`AVIARY_API_TOKEN`):
/// `avx_<execution id>.<HMAC of the id under the server's key>`. Nothing is
/// stored: it is checked by its MAC, and it is valid only while the
/// execution runs (role `action`), on any server node sharing the key.
pub fn execution_token(key: &aviary_core::secret::SecretKey, execution_id: &str) -> String {
    format!(
        "{EXECUTION_TOKEN_PREFIX}{execution_id}.{}",
        key.mac(EXECUTION_TOKEN_PURPOSE, execution_id)
    )
}

/// The caller of an execution token, if `token` is one that is valid now.
async fn execution_caller(state: &AppState, token: &str) -> Result<Option<Caller>, ApiError> {
    let Some(rest) = token.strip_prefix(EXECUTION_TOKEN_PREFIX) else {
        return Ok(None);
    };
    let Some((id, tag)) = rest.split_once('.') else {
        return Ok(None);
    };
    if !state
        .engine
        .secret_key
        .verify_mac(EXECUTION_TOKEN_PURPOSE, id, tag)
    {
        return Ok(None);
    }
    let running = matches!(
        state.engine.store.get_execution(id).await?,
        Some(e) if matches!(
            e.status,
            ExecutionStatus::Running | ExecutionStatus::Canceling
        )
    );
    if !running {
        return Err(ApiError::unauthorized(
            "this execution token is no longer valid: its execution has ended",
        ));
    }
    Ok(Some(Caller {
        name: format!("execution-{id}"),
        role: "action".into(),
    }))
}

/// Creates and stores a token; returns the secret (shown once) and the record.
pub async fn create_token(
    store: &dyn Store,
    name: &str,
    role: &str,
) -> Result<(String, ApiToken), StoreError> {
    let secret = generate_token();
    let token = ApiToken {
        id: new_id(),
        name: name.to_string(),
        hash: hash_token(&secret),
        role: role.to_string(),
        created_at: Utc::now(),
        revoked_at: None,
        last_used_at: None,
    };
    store.insert_token(token.clone()).await?;
    Ok((secret, token))
}

/// On first start (no token at all) creates the `admin` token and writes it
/// to `<data dir>/admin.token`, readable only by its owner.
pub async fn bootstrap_admin(
    store: &dyn Store,
    data_dir: &Path,
) -> Result<Option<PathBuf>, String> {
    let count = store.count_tokens().await.map_err(|e| e.to_string())?;
    if count > 0 {
        return Ok(None);
    }
    let (secret, _) = create_token(store, "admin", "admin")
        .await
        .map_err(|e| e.to_string())?;
    let path = data_dir.join("admin.token");
    write_private(&path, &format!("{secret}\n"))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(Some(path))
}

/// Writes a file readable and writable only by its owner (mode 0600).
pub fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The token a request carries: `Authorization: Bearer`, StackStorm's
/// `X-Auth-Token` / `St2-Api-Key` headers, or `?st2-api-key=` / `?x-auth-token=`.
pub fn token_from(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    if let Some(v) = headers.get("authorization").and_then(|v| v.to_str().ok())
        && let Some(t) = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
    {
        return Some(t.trim().to_string());
    }
    for h in ["x-auth-token", "st2-api-key"] {
        if let Some(v) = headers.get(h).and_then(|v| v.to_str().ok()) {
            return Some(v.trim().to_string());
        }
    }
    let query = query?;
    for pair in query.split('&') {
        if let Some((k, v)) = pair.split_once('=')
            && (k == "st2-api-key" || k == "x-auth-token")
        {
            return Some(v.to_string());
        }
    }
    None
}

/// Checks a request's token; the error says what to do.
pub async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Caller, ApiError> {
    let Some(token) = token_from(headers, query) else {
        return Err(ApiError::unauthorized(
            "authentication required: send `Authorization: Bearer <token>` (see `aviary token create`, or the admin token file in the server's data dir)",
        ));
    };
    if let Some(caller) = execution_caller(state, &token).await? {
        return Ok(caller);
    }
    let hash = hash_token(&token);
    if let Some(c) = state.tokens.get(&hash) {
        return Ok(c);
    }
    match state.engine.store.find_token_by_hash(&hash).await {
        Ok(Some(t)) => {
            let caller = Caller {
                name: t.name,
                role: t.role,
            };
            state.tokens.put(hash, caller.clone());
            Ok(caller)
        }
        Ok(None) => Err(ApiError::unauthorized(
            "the token is unknown or revoked; create one with `aviary token create NAME`",
        )),
        Err(e) => Err(ApiError::from(e)),
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let caller = authenticate(state, &parts.headers, parts.uri.query()).await?;
        if caller.role == AGENT_ROLE {
            return Err(ApiError::new(
                axum::http::StatusCode::FORBIDDEN,
                "an agent token may only call /api/v1/agent/ endpoints; use an API token (`aviary token create NAME`)",
            ));
        }
        Ok(caller)
    }
}

/// Role of per-host agent tokens.
pub const AGENT_ROLE: &str = "agent";

/// The token name of a host's agent token.
pub fn agent_token_name(host: &str) -> String {
    format!("agent@{host}")
}

/// An authenticated agent: it may read what its host needs and report about
/// its host only.
#[derive(Debug, Clone)]
pub struct AgentCaller {
    /// The host the token was issued for.
    pub host: String,
    /// Hash of its token (to re-check revocation on long streams).
    pub token_hash: String,
}

impl FromRequestParts<AppState> for AgentCaller {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let caller = authenticate(state, &parts.headers, parts.uri.query()).await?;
        let host = caller
            .name
            .strip_prefix("agent@")
            .filter(|_| caller.role == AGENT_ROLE)
            .ok_or_else(|| {
                ApiError::new(
                    axum::http::StatusCode::FORBIDDEN,
                    "agent endpoints need a host's agent token; create one with `aviary host token create HOST`",
                )
            })?;
        let token = token_from(&parts.headers, parts.uri.query()).unwrap_or_default();
        Ok(AgentCaller {
            host: host.to_string(),
            token_hash: hash_token(&token),
        })
    }
}
