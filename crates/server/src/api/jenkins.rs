//! `POST /api/v1/webhooks/jenkins`: the Jenkins Notification plugin's JSON
//! payloads become the same `aviary.ci.build` trigger the built-in CI emits,
//! so rules react to a Jenkins build exactly as to an Aviary one.
//!
//! Payload (plugin format): `name` (job), `url`, `build.{number, phase,
//! status, url, full_url, duration, scm.{url, branch, commit}}`. Phases
//! `QUEUED`, `STARTED`, `COMPLETED`, `FINALIZED` arrive for every build; one
//! trigger is emitted per build, on `COMPLETED` (default) or `FINALIZED`
//! (`ci.jenkins_emit_on`, or `?emit_on=finalized` on the URL); the others are
//! acknowledged and ignored. A redelivery of the same build is stored once.
//! Statuses: `SUCCESS` -> succeeded, `FAILURE`/`UNSTABLE` -> failed,
//! `ABORTED`/`NOT_BUILT` -> canceled.
//!
//! Authentication: an API token (header, or `?st2-api-key=` in the URL set in
//! Jenkins), or `?secret=` equal to the datastore key
//! `jenkins_webhook_secret` (compared in constant time).

use aviary_core::model::KvScope;
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};
use crate::auth::authenticate;
use crate::engine::{CI_BUILD_TRIGGER, Event};

/// The datastore key (system scope) holding the URL secret.
pub const SECRET_KEY: &str = "jenkins_webhook_secret";

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Checks `?secret=` against the datastore, else requires a token.
async fn check_auth(state: &AppState, headers: &HeaderMap, uri: &Uri) -> Result<(), ApiError> {
    if let Some(given) = query_param(uri.query(), "secret") {
        let stored = state
            .engine
            .store
            .get_kv(KvScope::System, SECRET_KEY, Utc::now())
            .await?;
        let expected = match stored {
            Some(kv) if kv.secret => state.engine.secret_key.decrypt(&kv.value).ok(),
            Some(kv) => Some(kv.value),
            None => None,
        };
        return match expected {
            Some(e) if !e.is_empty() && bool::from(e.as_bytes().ct_eq(given.as_bytes())) => Ok(()),
            Some(_) => Err(ApiError::unauthorized(
                "jenkins webhook: the secret does not match the datastore key jenkins_webhook_secret",
            )),
            None => Err(ApiError::unauthorized(format!(
                "jenkins webhook: a secret was given but none is set; run `aviary key set {SECRET_KEY} <secret> --encrypt`"
            ))),
        };
    }
    authenticate(state, headers, uri.query()).await.map(|_| ())
}

/// Maps a Jenkins build status to Aviary's CI status.
pub fn map_status(jenkins: &str) -> Option<&'static str> {
    match jenkins.to_ascii_uppercase().as_str() {
        "SUCCESS" => Some("succeeded"),
        "FAILURE" | "UNSTABLE" => Some("failed"),
        "ABORTED" | "NOT_BUILT" => Some("canceled"),
        _ => None,
    }
}

/// `origin/main` or `refs/heads/main` -> `main`.
fn branch_name(b: &str) -> String {
    let b = b.trim_start_matches("refs/heads/");
    let b = b.strip_prefix("refs/remotes/").unwrap_or(b);
    match b.split_once('/') {
        Some(("origin", rest)) => rest.to_string(),
        _ => b.to_string(),
    }
}

/// The repository's name from its URL (`.../webapp.git` -> `webapp`).
fn repo_name(url: &str) -> Option<String> {
    let name = url
        .trim_end_matches('/')
        .rsplit(['/', ':'])
        .next()?
        .trim_end_matches(".git");
    (!name.is_empty()).then(|| name.to_string())
}

/// `POST /api/v1/webhooks/jenkins`.
pub async fn receive(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_auth(&state, &headers, &uri).await?;
    let payload: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "jenkins webhook: the body is not JSON: {e} (line {}, column {}); set the Notification plugin's format to JSON",
            e.line(),
            e.column()
        ))
    })?;
    let emit_on = query_param(uri.query(), "emit_on")
        .or_else(|| state.engine.config.ci.jenkins_emit_on.clone())
        .unwrap_or_else(|| "completed".into())
        .to_ascii_uppercase();
    if emit_on != "COMPLETED" && emit_on != "FINALIZED" {
        return Err(ApiError::bad_request(format!(
            "jenkins webhook: emit_on '{emit_on}' must be completed or finalized"
        )));
    }
    let mut problems = Vec::new();
    let job = payload.get("name").and_then(Value::as_str);
    if job.is_none() {
        problems.push(json!({"field": "name", "message": "the job name is missing"}));
    }
    let build = payload.get("build").filter(|b| b.is_object());
    if build.is_none() {
        problems.push(json!({"field": "build", "message": "the build object is missing"}));
    }
    let phase = build
        .and_then(|b| b.get("phase"))
        .and_then(Value::as_str)
        .map(str::to_ascii_uppercase);
    if build.is_some() && phase.is_none() {
        problems.push(json!({"field": "build.phase", "message": "missing (QUEUED, STARTED, COMPLETED or FINALIZED)"}));
    }
    let number = build.and_then(|b| b.get("number")).and_then(Value::as_u64);
    if build.is_some() && number.is_none() {
        problems.push(json!({"field": "build.number", "message": "missing or not a number"}));
    }
    if !problems.is_empty() {
        return Err(ApiError::bad_request(
            "jenkins webhook: not a Notification plugin payload (see docs/api.md)",
        )
        .with_details(problems));
    }
    let (Some(job), Some(build), Some(phase), Some(number)) = (job, build, phase, number) else {
        return Err(ApiError::bad_request("jenkins webhook: incomplete payload"));
    };
    if phase != emit_on {
        return Ok((
            StatusCode::OK,
            Json(json!({"ignored": true, "phase": phase, "emit_on": emit_on})),
        )
            .into_response());
    }
    let jenkins_status = build.get("status").and_then(Value::as_str).unwrap_or("");
    let Some(status) = map_status(jenkins_status) else {
        return Err(ApiError::bad_request(format!(
            "jenkins webhook: build.status '{jenkins_status}' is not one of SUCCESS, FAILURE, UNSTABLE, ABORTED, NOT_BUILT"
        ))
        .with_details(vec![json!({"field": "build.status", "message": "unknown status"})]));
    };
    let scm = build.get("scm");
    let scm_text = |k: &str| {
        scm.and_then(|s| s.get(k))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let repo = scm_text("url");
    let project = repo.and_then(repo_name).unwrap_or_else(|| job.to_string());
    let duration = build
        .get("duration")
        .and_then(Value::as_f64)
        .map(|ms| ms / 1000.0);
    let event_payload = json!({
        "project": project,
        "repo": repo,
        "branch": scm_text("branch").map(branch_name),
        "commit": scm_text("commit"),
        "status": status,
        "stage": if status == "succeeded" { "done" } else { "jenkins" },
        "error": if status == "succeeded" { Value::Null } else { json!(format!("Jenkins build {job} #{number}: {jenkins_status}")) },
        "duration": duration,
        "execution_id": Value::Null,
        "source": "jenkins",
        "jenkins": {
            "job": job,
            "number": number,
            "status": jenkins_status,
            "phase": phase,
            "url": build.get("full_url").or_else(|| build.get("url")),
        },
    });
    let result = state
        .engine
        .ingest(Event {
            trigger: CI_BUILD_TRIGGER.to_string(),
            payload: event_payload,
            dedup_key: Some(format!("jenkins:{job}:{number}")),
            webhook_url: None,
            only_rule: None,
        })
        .await?;
    let code = if result.duplicate {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((code, Json(result)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_branches() {
        assert_eq!(map_status("SUCCESS"), Some("succeeded"));
        assert_eq!(map_status("UNSTABLE"), Some("failed"));
        assert_eq!(map_status("ABORTED"), Some("canceled"));
        assert_eq!(map_status("RUNNING"), None);
        assert_eq!(branch_name("origin/master"), "master");
        assert_eq!(branch_name("refs/heads/feature/x"), "feature/x");
        assert_eq!(branch_name("origin/feature/x"), "feature/x");
        assert_eq!(branch_name("main"), "main");
        assert_eq!(
            repo_name("https://github.com/evgeny-goldin/asgard.git").as_deref(),
            Some("asgard")
        );
        assert_eq!(percent_decode("a%2Fb+c"), "a/b c");
    }
}
