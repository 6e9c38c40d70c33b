//! Webhooks: `POST /api/v1/webhooks/<url>` becomes a `core.st2.webhook`
//! trigger instance `{headers, body}`; `POST /api/v1/webhooks/st2` takes
//! `{trigger, payload}` for custom triggers.
//!
//! A webhook whose rule names a `secret` requires GitHub's
//! `X-Hub-Signature-256`, checked in constant time; any other webhook
//! requires an API token. `X-GitHub-Delivery` deduplicates redeliveries.
//! A 2xx answer means the event is durable.

use aviary_core::model::WEBHOOK_TRIGGER;
use aviary_core::signature::verify_github_signature;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::{ApiError, AppState, parse_json};
use crate::auth::authenticate;
use crate::engine::Event;
use crate::packs::normalize_webhook_url;

/// Header names GitHub spells with inner capitals; payloads carry that
/// spelling too so that StackStorm-style criteria written either way match.
const GITHUB_SPELLINGS: &[&str] = &[
    "X-GitHub-Event",
    "X-GitHub-Delivery",
    "X-GitHub-Hook-ID",
    "X-GitHub-Hook-Installation-Target-ID",
    "X-GitHub-Hook-Installation-Target-Type",
];

/// Title-Case of a lowercase header name: `x-github-event` -> `X-Github-Event`.
fn title_case(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut c = part.chars();
            match c.next() {
                Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

fn headers_json(headers: &HeaderMap) -> Value {
    let mut map = Map::new();
    for (name, value) in headers {
        if matches!(
            name.as_str(),
            "authorization" | "x-auth-token" | "st2-api-key" | "cookie"
        ) {
            continue;
        }
        let value = Value::String(String::from_utf8_lossy(value.as_bytes()).into_owned());
        let title = title_case(name.as_str());
        if let Some(spelling) = GITHUB_SPELLINGS
            .iter()
            .find(|s| s.eq_ignore_ascii_case(name.as_str()))
        {
            map.insert((*spelling).to_string(), value.clone());
        }
        map.insert(title, value);
    }
    Value::Object(map)
}

/// Parses the body: JSON, or a form (GitHub's `payload=` form included).
fn parse_body(headers: &HeaderMap, body: &[u8]) -> Result<Value, ApiError> {
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    // `curl -d '{...}'` labels JSON as a form: a body that is a JSON object is JSON.
    let looks_json =
        body.first() == Some(&b'{') && serde_json::from_slice::<serde_json::Value>(body).is_ok();
    if content_type.starts_with("application/x-www-form-urlencoded") && !looks_json {
        let mut map = Map::new();
        for (k, v) in form_urlencoded_pairs(body) {
            map.insert(k, Value::String(v));
        }
        if let Some(Value::String(payload)) = map.get("payload") {
            return serde_json::from_str(payload).map_err(|e| {
                ApiError::bad_request(format!("form field 'payload' is not valid JSON: {e}"))
            });
        }
        return Ok(Value::Object(map));
    }
    if body.is_empty() {
        return Ok(Value::Object(Map::new()));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "webhook body is not valid JSON: {e} (line {}, column {}); send JSON or an application/x-www-form-urlencoded form",
            e.line(),
            e.column()
        ))
    })
}

fn form_urlencoded_pairs(body: &[u8]) -> Vec<(String, String)> {
    fn decode(s: &[u8]) -> String {
        let mut out = Vec::with_capacity(s.len());
        let mut i = 0;
        while i < s.len() {
            match s[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < s.len() => {
                    match u8::from_str_radix(&String::from_utf8_lossy(&s[i + 1..i + 3]), 16) {
                        Ok(b) => {
                            out.push(b);
                            i += 2;
                        }
                        Err(_) => out.push(b'%'),
                    }
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    body.split(|&b| b == b'&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let mut it = pair.splitn(2, |&b| b == b'=');
            let k = decode(it.next().unwrap_or_default());
            let v = decode(it.next().unwrap_or_default());
            (k, v)
        })
        .collect()
}

/// The secret a webhook URL requires, from its rules' `secret` parameter
/// (a literal or a template such as `{{ st2kv.system.github_secret }}`).
async fn webhook_secret(state: &AppState, url: &str) -> Result<Option<String>, ApiError> {
    let registry = state.engine.registry.load_full();
    let Some(ids) = registry.webhooks.get(url) else {
        return Ok(None);
    };
    for &i in ids {
        let rule = &registry.rules[i];
        if let Some(secret) = rule.trigger.parameters.get("secret") {
            let mut params = Map::new();
            params.insert("secret".into(), secret.clone());
            let (ctx, _) = state.engine.with_datastore(&json!({}), &params).await?;
            let rendered = state
                .engine
                .templates
                .render_value(secret, &ctx)
                .map_err(|e| {
                    ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!(
                            "webhook '{url}': the secret of rule {} cannot be rendered: {e}",
                            rule.reference()
                        ),
                    )
                })?;
            match rendered {
                Value::String(s) if !s.is_empty() => return Ok(Some(s)),
                _ => {
                    return Err(ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!(
                            "webhook '{url}': the secret of rule {} is empty; set the datastore key it names",
                            rule.reference()
                        ),
                    ));
                }
            }
        }
    }
    Ok(None)
}

/// `POST /api/v1/webhooks/{*url}`.
pub async fn receive(
    State(state): State<AppState>,
    Path(url): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let url = normalize_webhook_url(&url);
    if url == "st2" {
        authenticate(&state, &headers, uri.query()).await?;
        #[derive(serde::Deserialize)]
        struct Generic {
            trigger: String,
            #[serde(default)]
            payload: Value,
        }
        let g: Generic = parse_json(&body)?;
        if g.trigger.is_empty() || !g.trigger.contains('.') {
            return Err(ApiError::bad_request(format!(
                "'trigger' must be a trigger reference like pack.name, got '{}'",
                g.trigger
            )));
        }
        let result = state
            .engine
            .ingest(Event {
                trigger: g.trigger,
                payload: g.payload,
                dedup_key: None,
                webhook_url: None,
                only_rule: None,
            })
            .await?;
        return Ok((StatusCode::ACCEPTED, Json(result)).into_response());
    }

    if !state.engine.registry.load().webhooks.contains_key(&url) {
        return Err(ApiError::not_found(format!(
            "no rule listens on webhook '{url}'; add a rule with trigger type core.st2.webhook and parameters.url: {url}"
        )));
    }
    match webhook_secret(&state, &url).await? {
        Some(secret) => {
            let sig = headers
                .get("x-hub-signature-256")
                .and_then(|v| v.to_str().ok());
            verify_github_signature(secret.as_bytes(), &body, sig)
                .map_err(|e| ApiError::unauthorized(format!("webhook '{url}': {e}")))?;
        }
        None => {
            authenticate(&state, &headers, uri.query()).await?;
        }
    }
    let parsed = parse_body(&headers, &body)?;
    let dedup_key = headers
        .get("x-github-delivery")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 200)
        .map(|v| format!("github:{url}:{v}"));
    let payload = json!({
        "url": url,
        "headers": headers_json(&headers),
        "body": parsed,
    });
    let result = state
        .engine
        .ingest(Event {
            trigger: WEBHOOK_TRIGGER.to_string(),
            payload,
            dedup_key,
            webhook_url: Some(url),
            only_rule: None,
        })
        .await?;
    let status = if result.duplicate {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(result)).into_response())
}
