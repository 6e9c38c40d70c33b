//! A thin HTTP client for the Aviary API: builds URLs safely (every path
//! segment is percent-encoded), adds the bearer token and maps error answers
//! to [`CliError`]s with actionable messages.

use std::time::Duration;

use reqwest::{Method, Url};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::config::Endpoint;
use crate::error::CliError;

/// One answer of the API, not yet checked for errors.
#[derive(Debug, Clone)]
pub struct ApiResponse {
    /// HTTP status code.
    pub status: u16,
    /// The JSON body (`Value::Null` when empty).
    pub body: Value,
    /// The URL that answered (for messages).
    pub url: String,
}

/// The API client.
#[derive(Debug, Clone)]
pub struct ApiClient {
    endpoint: Endpoint,
    base: Url,
    http: reqwest::Client,
}

/// Renders one entry of an error answer's `details` list for people.
pub fn describe_detail(d: &Value) -> String {
    match d {
        Value::String(s) => s.clone(),
        Value::Object(m) => {
            let msg = m.get("message").and_then(Value::as_str);
            match (m.get("parameter").and_then(Value::as_str), msg) {
                (Some(p), Some(msg)) => format!("parameter `{p}`: {msg}"),
                (None, Some(msg)) => msg.to_string(),
                _ => d.to_string(),
            }
        }
        other => other.to_string(),
    }
}

/// The innermost cause of an error chain (e.g. "Connection refused (os error 111)").
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

impl ApiClient {
    /// A client for `endpoint`.
    pub fn new(endpoint: Endpoint) -> Result<Self, CliError> {
        let base = Url::parse(&endpoint.url)
            .ok()
            .filter(|u| !u.cannot_be_a_base() && matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| {
                CliError::Usage(format!(
                    "the server URL `{}` is not an http(s) URL; use e.g. --url http://127.0.0.1:9700",
                    endpoint.url
                ))
            })?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| CliError::Usage(format!("cannot set up the HTTP client: {e}")))?;
        Ok(Self {
            endpoint,
            base,
            http,
        })
    }

    /// The endpoint in use.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// `<base>/api/v1/<segments...>?<query>`, each segment percent-encoded.
    pub fn url(&self, segments: &[&str], query: &[(&str, String)]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut p) = url.path_segments_mut() {
            p.pop_if_empty().extend(["api", "v1"]).extend(segments);
        }
        if !query.is_empty() {
            url.query_pairs_mut()
                .extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
        }
        url
    }

    fn transport_error(&self, e: &reqwest::Error) -> CliError {
        CliError::Unreachable {
            url: self.endpoint.url.clone(),
            cause: root_cause(e),
        }
    }

    /// Sends a request and returns the raw answer (any status).
    pub async fn send(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<ApiResponse, CliError> {
        let url = self.url(segments, query);
        let mut req = self.http.request(method, url.clone());
        if let Some(t) = &self.endpoint.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| self.transport_error(&e))?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|e| self.transport_error(&e))?;
        let body = if bytes.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            match serde_json::from_slice(&bytes) {
                Ok(v) => v,
                // Error answers may be plain text (e.g. from a proxy).
                Err(_) if status >= 400 => {
                    Value::String(String::from_utf8_lossy(&bytes).trim().to_string())
                }
                Err(e) => {
                    return Err(CliError::Protocol {
                        url: url.to_string(),
                        cause: format!("the body is not JSON: {e}"),
                    });
                }
            }
        };
        Ok(ApiResponse {
            status,
            body,
            url: url.to_string(),
        })
    }

    /// Maps an error answer to a [`CliError`]; success passes through.
    pub fn check(&self, resp: ApiResponse) -> Result<ApiResponse, CliError> {
        if (200..300).contains(&resp.status) {
            return Ok(resp);
        }
        Err(self.error_for(resp.status, &resp.body))
    }

    /// The [`CliError`] for an error answer with `status` and JSON `body`.
    pub fn error_for(&self, status: u16, body: &Value) -> CliError {
        let message = match body {
            Value::Object(m) => m
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| body.to_string()),
            Value::String(s) if !s.is_empty() => s.clone(),
            _ => reqwest::StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("error")
                .to_string(),
        };
        let details = body
            .get("details")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(describe_detail).collect())
            .unwrap_or_default();
        match status {
            401 | 403 => CliError::Unauthorized {
                status,
                message,
                hint: self.endpoint.auth_hint(),
            },
            404 => CliError::NotFound { message },
            _ => CliError::Api {
                status,
                message,
                details,
            },
        }
    }

    /// Sends a request and fails on error answers.
    pub async fn call(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Value, CliError> {
        let r = self.send(method, segments, query, body).await?;
        Ok(self.check(r)?.body)
    }

    /// `GET` returning JSON.
    pub async fn get(
        &self,
        segments: &[&str],
        query: &[(&str, String)],
    ) -> Result<Value, CliError> {
        self.call(Method::GET, segments, query, None).await
    }

    /// Converts an API body into a typed value, reporting shape mismatches.
    pub fn decode<T: DeserializeOwned>(&self, body: Value, what: &str) -> Result<T, CliError> {
        serde_json::from_value(body).map_err(|e| CliError::Protocol {
            url: self.endpoint.url.clone(),
            cause: format!("cannot read {what}: {e}"),
        })
    }

    /// Opens a streaming `GET` (server-sent events); `Ok(None)` when the
    /// server does not offer the stream (404, 405, 501), so callers can poll.
    pub async fn open_stream(
        &self,
        segments: &[&str],
    ) -> Result<Option<reqwest::Response>, CliError> {
        let url = self.url(segments, &[]);
        let mut req = self
            .http
            .get(url)
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(t) = &self.endpoint.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.map_err(|e| self.transport_error(&e))?;
        let status = resp.status().as_u16();
        if resp.status().is_success() {
            return Ok(Some(resp));
        }
        if matches!(status, 404 | 405 | 501) {
            return Ok(None);
        }
        let text = resp.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Err(self.error_for(status, &body))
    }
}
