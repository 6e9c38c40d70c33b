//! The `jenkins-build` runner: starts a Jenkins job over Jenkins' REST API,
//! for teams that keep their Jenkins.
//!
//! 1. With `crumb` (default), `GET <url>/crumbIssuer/api/json` for a CSRF
//!    crumb (`{"crumbRequestField", "crumb"}`); a 404 means Jenkins issues
//!    none and is not an error. The crumb is bound to the session, so the
//!    cookies of that answer go with the next request.
//! 2. `POST <url>/job/<a>/job/<b>/buildWithParameters` with the parameters as
//!    an `application/x-www-form-urlencoded` form (`/build` when there are
//!    none), basic auth `username:api_token`. Jenkins answers 201 with the
//!    queue item in `Location`.
//! 3. With `wait_for_build`, `GET <queue item>api/json` until it has an
//!    `executable` (`number`, `url`), or says it was cancelled.
//!
//! The API token is a secret parameter: masked in the result and errors.

use std::time::{Duration, Instant};

use aviary_core::model::ExecutionStatus;
use reqwest::header::{CONTENT_TYPE, COOKIE, HeaderName, HeaderValue, LOCATION, SET_COOKIE};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::mask::Masker;
use crate::{RunOutcome, RunRequest, RunnerError, effective_timeout, value_text};

fn invalid(req: &RunRequest, name: &str, reason: impl Into<String>) -> RunnerError {
    RunnerError::InvalidParameter {
        action: req.action_ref.clone(),
        name: name.into(),
        reason: reason.into(),
    }
}

fn text<'a>(req: &'a RunRequest, name: &str) -> Option<&'a str> {
    req.parameters
        .get(name)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

fn flag(req: &RunRequest, name: &str, default: bool) -> bool {
    req.parameters
        .get(name)
        .and_then(Value::as_bool)
        .unwrap_or(default)
}

/// Percent-encodes for a form value or a path segment (RFC 3986 unreserved kept).
pub(crate) fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `job/a/job/b` for `a/b`; refuses empty, `.` and `..` segments.
fn job_path(req: &RunRequest, job: &str) -> Result<String, RunnerError> {
    let mut out = Vec::new();
    for seg in job.trim_matches('/').split('/') {
        if seg.is_empty() || seg == "." || seg == ".." {
            return Err(invalid(
                req,
                "job",
                format!("'{job}' is not a job name; use `name` or `folder/name`"),
            ));
        }
        out.push(format!("job/{}", encode(seg)));
    }
    Ok(out.join("/"))
}

/// Runs the Jenkins runner.
pub(crate) async fn run(
    req: &RunRequest,
    masker: &Masker,
    cancel: CancellationToken,
) -> Result<RunOutcome, RunnerError> {
    let base = text(req, "url").ok_or_else(|| invalid(req, "url", "Jenkins' URL is required"))?;
    let base = reqwest::Url::parse(base)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https"))
        .ok_or_else(|| invalid(req, "url", format!("'{base}' is not an http(s) URL")))?;
    let base = base.as_str().trim_end_matches('/').to_string();
    let job = text(req, "job").ok_or_else(|| invalid(req, "job", "a job name is required"))?;
    let job_path = job_path(req, job)?;
    let params = match req.parameters.get("parameters") {
        None | Some(Value::Null) => serde_json::Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => {
            return Err(invalid(
                req,
                "parameters",
                "must be an object (name: value)",
            ));
        }
    };
    let user = text(req, "username");
    let token = text(req, "api_token");
    let timeout = effective_timeout(req);
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .danger_accept_invalid_certs(!flag(req, "verify_ssl_cert", true))
        .build()
        .map_err(|source| RunnerError::HttpClient {
            action: req.action_ref.clone(),
            source,
        })?;
    let auth = |b: reqwest::RequestBuilder| match user {
        Some(u) => b.basic_auth(u, token),
        None => b,
    };
    let deadline = Instant::now() + timeout;
    let work = async {
        let mut result = json!({"job": job});
        // 1. The crumb, with the session cookies it is bound to.
        let mut crumb: Option<(HeaderName, HeaderValue)> = None;
        let mut cookies: Vec<String> = Vec::new();
        if flag(req, "crumb", true) {
            let resp = auth(client.get(format!("{base}/crumbIssuer/api/json")))
                .send()
                .await
                .map_err(|e| format!("cannot reach Jenkins at {base}: {e}"))?;
            let status = resp.status();
            if status.is_success() {
                for c in resp.headers().get_all(SET_COOKIE) {
                    if let Ok(c) = c.to_str()
                        && let Some(pair) = c.split(';').next()
                    {
                        cookies.push(pair.trim().to_string());
                    }
                }
                let body: Value = resp
                    .json()
                    .await
                    .map_err(|e| format!("Jenkins' crumb issuer answered no JSON: {e}"))?;
                let field = body.get("crumbRequestField").and_then(Value::as_str);
                let value = body.get("crumb").and_then(Value::as_str);
                if let (Some(f), Some(v)) = (field, value) {
                    let name = HeaderName::from_bytes(f.as_bytes())
                        .map_err(|_| format!("Jenkins' crumb field '{f}' is not a header name"))?;
                    let value = HeaderValue::from_str(v)
                        .map_err(|_| "Jenkins' crumb is not a header value".to_string())?;
                    crumb = Some((name, value));
                    result["crumb"] = json!(true);
                }
            } else if status.as_u16() == 404 {
                result["crumb"] = json!(false); // CSRF protection is off
            } else {
                return Err(format!(
                    "Jenkins refused the crumb request ({status}); check the username and API token"
                ));
            }
        }
        // 2. Start the job.
        let (endpoint, form) = if params.is_empty() {
            ("build", String::new())
        } else {
            let form = params
                .iter()
                .map(|(k, v)| format!("{}={}", encode(k), encode(&value_text(v))))
                .collect::<Vec<_>>()
                .join("&");
            ("buildWithParameters", form)
        };
        let url = format!("{base}/{job_path}/{endpoint}");
        let mut post = auth(client.post(&url))
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(form);
        if let Some((name, value)) = &crumb {
            post = post.header(name.clone(), value.clone());
        }
        if !cookies.is_empty() {
            post = post.header(COOKIE, cookies.join("; "));
        }
        let resp = post
            .send()
            .await
            .map_err(|e| format!("cannot reach Jenkins at {url}: {e}"))?;
        let status = resp.status();
        result["status_code"] = json!(status.as_u16());
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            let hint = match status.as_u16() {
                401 | 403 => "; check the username, the API token and the job's permissions",
                404 => "; check the job name (folders: `folder/job`)",
                _ => "",
            };
            return Err(format!(
                "Jenkins answered {status} to POST {url}{hint}: {}",
                body.chars().take(500).collect::<String>()
            ));
        }
        let location = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        result["queue_url"] = json!(location);
        // 3. Follow the queue item to the build.
        if flag(req, "wait_for_build", false) {
            let Some(location) = location else {
                return Err("Jenkins gave no queue item (Location) to follow".into());
            };
            let item = format!("{}/api/json", location.trim_end_matches('/'));
            let mut pause = Duration::from_millis(100);
            loop {
                let resp = auth(client.get(&item))
                    .send()
                    .await
                    .map_err(|e| format!("cannot read the queue item {item}: {e}"))?;
                if !resp.status().is_success() {
                    return Err(format!(
                        "Jenkins answered {} for the queue item {item}",
                        resp.status()
                    ));
                }
                let body: Value = resp
                    .json()
                    .await
                    .map_err(|e| format!("the queue item {item} is not JSON: {e}"))?;
                if body.get("cancelled").and_then(Value::as_bool) == Some(true) {
                    return Err(format!(
                        "the queued build of {job} was cancelled in Jenkins"
                    ));
                }
                if let Some(exe) = body.get("executable").filter(|e| e.is_object()) {
                    result["build_number"] = exe.get("number").cloned().unwrap_or(Value::Null);
                    result["build_url"] = exe.get("url").cloned().unwrap_or(Value::Null);
                    break;
                }
                if Instant::now() + pause > deadline {
                    return Err(format!(
                        "Jenkins did not start the build of {job} in time (still queued: {})",
                        body.get("why")
                            .and_then(Value::as_str)
                            .unwrap_or("no reason given")
                    ));
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
        Ok::<Value, String>(result)
    };
    let outcome = tokio::select! {
        r = tokio::time::timeout(timeout + Duration::from_secs(1), work) => r,
        _ = cancel.cancelled() => {
            return Ok(RunOutcome::error(ExecutionStatus::Canceled, format!("action {} was canceled", req.action_ref)));
        }
    };
    Ok(match outcome {
        Err(_) => RunOutcome::error(
            ExecutionStatus::Timeout,
            format!("Jenkins did not answer within {}s", timeout.as_secs()),
        ),
        Ok(Err(msg)) => RunOutcome::error(ExecutionStatus::Failed, masker.mask_str(&msg)),
        Ok(Ok(result)) => RunOutcome {
            status: ExecutionStatus::Succeeded,
            result: masker.mask_json(result),
        },
    })
}
