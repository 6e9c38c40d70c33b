//! The `http-request` runner: one HTTP request with reqwest.
//!
//! Parameters: `url` (required), `method` (GET), `headers` (object), `body`
//! (string; JSON object/array text gets `application/json` unless a content
//! type is given; objects and arrays are sent as JSON), `params` (query, object),
//! `timeout`, `verify_ssl_cert` (true), `allow_redirects` (false),
//! `username`/`password` (basic auth). Result: `{"status_code", "headers",
//! "body"}`, the body parsed when the response is JSON, capped at 1 MiB.

use std::error::Error as _;
use std::time::Duration;

use aviary_core::model::ExecutionStatus;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use crate::mask::Masker;
use crate::{OUTPUT_CAP, RunOutcome, RunRequest, RunnerError, effective_timeout, value_text};

/// Maximum redirects followed when `allow_redirects` is true.
const MAX_REDIRECTS: usize = 10;

/// Runs the HTTP request runner.
pub(crate) async fn run(
    req: &RunRequest,
    masker: &Masker,
    cancel: CancellationToken,
) -> Result<RunOutcome, RunnerError> {
    let timeout = effective_timeout(req);
    let allow_redirects = bool_param(req, "allow_redirects", false)?;
    let verify = bool_param(req, "verify_ssl_cert", true)?;
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .redirect(if allow_redirects {
            reqwest::redirect::Policy::limited(MAX_REDIRECTS)
        } else {
            reqwest::redirect::Policy::none()
        })
        .danger_accept_invalid_certs(!verify)
        .build()
        .map_err(|source| RunnerError::HttpClient {
            action: req.action_ref.clone(),
            source,
        })?;
    let request = build_request(req, &client)?;

    let exchange = async {
        let mut resp = client.execute(request).await?;
        let status = resp.status();
        let headers = header_map_json(resp.headers());
        let is_json = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.to_ascii_lowercase().contains("json"));
        let mut body = Vec::new();
        let mut truncated = false;
        while let Some(chunk) = resp.chunk().await? {
            let room = OUTPUT_CAP - body.len();
            if chunk.len() > room {
                body.extend_from_slice(&chunk[..room]);
                truncated = true;
                break;
            }
            body.extend_from_slice(&chunk);
        }
        Ok::<_, reqwest::Error>((status, headers, is_json, body, truncated))
    };
    // reqwest's own timeout normally fires first; this one is a safety net.
    let outcome = tokio::select! {
        r = tokio::time::timeout(timeout + Duration::from_secs(1), exchange) => r,
        _ = cancel.cancelled() => {
            return Ok(RunOutcome::error(
                ExecutionStatus::Canceled,
                format!("action {} was canceled", req.action_ref),
            ));
        }
    };
    let timed_out = || {
        RunOutcome::error(
            ExecutionStatus::Timeout,
            format!(
                "action {}: the HTTP request did not finish within {:.1} s; raise its timeout if the server needs longer",
                req.action_ref,
                timeout.as_secs_f64()
            ),
        )
    };
    let (status, headers, is_json, body, truncated) = match outcome {
        Err(_) => return Ok(timed_out()),
        Ok(Err(e)) if e.is_timeout() => return Ok(timed_out()),
        Ok(Err(e)) => {
            return Ok(RunOutcome::error(
                ExecutionStatus::Failed,
                masker.mask_str(&format!(
                    "action {}: HTTP request failed: {}; check the url and that the server is reachable",
                    req.action_ref,
                    error_chain(&e)
                )),
            ));
        }
        Ok(Ok(parts)) => parts,
    };

    let body = if is_json && !truncated {
        serde_json::from_slice::<Value>(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()))
    } else {
        Value::String(String::from_utf8_lossy(&body).into_owned())
    };
    let mut result = Map::new();
    result.insert("status_code".into(), Value::from(status.as_u16()));
    result.insert("headers".into(), headers);
    result.insert("body".into(), body);
    if truncated {
        result.insert("body_truncated".into(), Value::Bool(true));
    }
    let ok = status.is_success() || (status.is_redirection() && !allow_redirects);
    Ok(RunOutcome {
        status: if ok {
            ExecutionStatus::Succeeded
        } else {
            ExecutionStatus::Failed
        },
        result: masker.mask_json(Value::Object(result)),
    })
}

/// Builds the request from the parameters.
fn build_request(
    req: &RunRequest,
    client: &reqwest::Client,
) -> Result<reqwest::Request, RunnerError> {
    let invalid = |name: &str, reason: String| RunnerError::InvalidParameter {
        action: req.action_ref.clone(),
        name: name.into(),
        reason,
    };
    let url = match req.parameters.get("url") {
        Some(Value::String(s)) if !s.is_empty() => s.as_str(),
        Some(Value::Null) | None => {
            return Err(RunnerError::MissingParameter {
                action: req.action_ref.clone(),
                name: "url".into(),
            });
        }
        Some(_) => return Err(invalid("url", "it must be a non-empty string".into())),
    };
    let url = reqwest::Url::parse(url)
        .map_err(|e| invalid("url", format!("it is not a valid URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(
            "url",
            format!(
                "scheme '{}' is not supported; use http or https",
                url.scheme()
            ),
        ));
    }
    let method = match req.parameters.get("method") {
        None | Some(Value::Null) => reqwest::Method::GET,
        Some(Value::String(m)) => reqwest::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
            .map_err(|_| invalid("method", format!("{m:?} is not an HTTP method")))?,
        Some(_) => return Err(invalid("method", "it must be a string such as GET".into())),
    };

    let mut headers = HeaderMap::new();
    match req.parameters.get("headers") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (k, v) in map {
                if v.is_null() {
                    continue;
                }
                let name = HeaderName::from_bytes(k.as_bytes())
                    .map_err(|_| invalid("headers", format!("{k:?} is not a valid header name")))?;
                let value = HeaderValue::from_str(&value_text(v)).map_err(|_| {
                    invalid(
                        "headers",
                        format!("the value of {k:?} contains characters not allowed in a header"),
                    )
                })?;
                headers.append(name, value);
            }
        }
        Some(_) => {
            return Err(invalid(
                "headers",
                "it must be an object of header names to values".into(),
            ));
        }
    }

    let mut builder = client.request(method, url);
    match req.parameters.get("params") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            let pairs: Vec<(&str, String)> = map
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.as_str(), value_text(v)))
                .collect();
            builder = builder.query(&pairs);
        }
        Some(_) => {
            return Err(invalid(
                "params",
                "it must be an object of query parameter names to values".into(),
            ));
        }
    }

    let has_content_type = headers.contains_key(CONTENT_TYPE);
    match req.parameters.get("body") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => {
            let is_json_doc = matches!(
                serde_json::from_str::<Value>(s),
                Ok(Value::Object(_) | Value::Array(_))
            );
            if !has_content_type && is_json_doc {
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            }
            builder = builder.body(s.clone());
        }
        Some(other) => {
            if !has_content_type {
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            }
            builder = builder.body(other.to_string());
        }
    }

    match req.parameters.get("username") {
        None | Some(Value::Null) => {}
        Some(Value::String(user)) => {
            let password = match req.parameters.get("password") {
                None | Some(Value::Null) => None,
                Some(p) => Some(value_text(p)),
            };
            builder = builder.basic_auth(user, password);
        }
        Some(_) => return Err(invalid("username", "it must be a string".into())),
    }

    builder
        .headers(headers)
        .build()
        .map_err(|e| invalid("url", format!("the request could not be built ({e})")))
}

/// A boolean parameter with a default.
fn bool_param(req: &RunRequest, name: &str, default: bool) -> Result<bool, RunnerError> {
    match req.parameters.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(RunnerError::InvalidParameter {
            action: req.action_ref.clone(),
            name: name.into(),
            reason: "it must be true or false".into(),
        }),
    }
}

/// Response headers as a JSON object; repeated headers joined with ", ".
fn header_map_json(headers: &HeaderMap) -> Value {
    let mut out = Map::new();
    for (name, value) in headers {
        let text = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match out.get_mut(name.as_str()) {
            Some(Value::String(existing)) => {
                existing.push_str(", ");
                existing.push_str(&text);
            }
            _ => {
                out.insert(name.as_str().to_owned(), Value::String(text));
            }
        }
    }
    Value::Object(out)
}

/// An error and its causes, joined with ": ".
fn error_chain(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}
