//! Integration tests of the http-request runner against a real local server.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use aviary_core::model::{ExecutionStatus, MASK};
use aviary_runners::{RunRequest, run};
use axum::Json;
use axum::Router;
use axum::extract::Query;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{any, get};
use common::*;
use serde_json::{Value, json};
use tokio::sync::mpsc::unbounded_channel;
use tokio_util::sync::CancellationToken;

/// Echoes the request back as JSON.
async fn echo(
    method: Method,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
    body: String,
) -> Json<Value> {
    let h = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    Json(json!({
        "method": method.as_str(),
        "query": query,
        "authorization": h("authorization"),
        "x_custom": h("x-custom"),
        "content_type": h("content-type"),
        "body": body,
    }))
}

/// Starts the test server and returns its address.
async fn server() -> SocketAddr {
    let app = Router::new()
        .route("/echo", any(echo))
        .route(
            "/text",
            get(|| async { ([("x-token", "tok-SECRET")], "hello SECRET") }),
        )
        .route(
            "/redirect",
            get(|| async { (StatusCode::FOUND, [(header::LOCATION, "/echo")]).into_response() }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(1000)).await;
                "late"
            }),
        )
        .route(
            "/fail",
            get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "boom") }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    addr
}

/// An http-request request with `params`.
fn http_request(params: Value) -> RunRequest {
    request(
        "http-request",
        params,
        &[
            "url",
            "method",
            "headers",
            "body",
            "params",
            "timeout",
            "verify_ssl_cert",
            "allow_redirects",
            "username",
            "password",
        ],
        std::path::Path::new("/tmp"),
    )
}

#[tokio::test]
async fn get_with_query_headers_and_basic_auth() {
    let addr = server().await;
    let req = http_request(json!({
        "url": format!("http://{addr}/echo"),
        "params": {"q": "a b&c", "n": 2},
        "headers": {"X-Custom": "yes"},
        "username": "user",
        "password": "pw",
    }));
    let (out, _) = run_collect(req).await;
    assert_eq!(out.status, ExecutionStatus::Succeeded, "{}", out.result);
    assert_eq!(out.result["status_code"], 200);
    assert!(
        out.result["headers"]["content-type"]
            .as_str()
            .unwrap()
            .contains("application/json")
    );
    let body = &out.result["body"];
    assert_eq!(body["method"], "GET");
    assert_eq!(body["query"], json!({"q": "a b&c", "n": "2"}));
    assert_eq!(body["x_custom"], "yes");
    // base64("user:pw")
    assert_eq!(body["authorization"], "Basic dXNlcjpwdw==");
}

#[tokio::test]
async fn post_bodies_and_content_types() {
    let addr = server().await;
    let url = format!("http://{addr}/echo");

    // JSON text without a content type: sent as application/json.
    let (out, _) = run_collect(http_request(json!({
        "url": url, "method": "post", "body": "{\"a\": 1}"
    })))
    .await;
    assert_eq!(out.status, ExecutionStatus::Succeeded);
    assert_eq!(out.result["body"]["method"], "POST");
    assert_eq!(out.result["body"]["body"], "{\"a\": 1}");
    assert_eq!(out.result["body"]["content_type"], "application/json");

    // An explicit content type wins; plain text gets none added.
    let (out, _) = run_collect(http_request(json!({
        "url": url, "method": "PUT", "body": "{\"a\": 1}",
        "headers": {"Content-Type": "text/plain"}
    })))
    .await;
    assert_eq!(out.result["body"]["method"], "PUT");
    assert_eq!(out.result["body"]["content_type"], "text/plain");
    let (out, _) = run_collect(http_request(json!({
        "url": url, "method": "POST", "body": "not json"
    })))
    .await;
    assert_eq!(out.result["body"]["body"], "not json");
    assert_eq!(out.result["body"]["content_type"], Value::Null);
}

#[tokio::test]
async fn text_response_and_masking() {
    let addr = server().await;
    let mut req = http_request(json!({"url": format!("http://{addr}/text")}));
    req.secrets = vec!["SECRET".into()];
    let (out, _) = run_collect(req).await;
    assert_eq!(out.status, ExecutionStatus::Succeeded);
    assert_eq!(out.result["body"], format!("hello {MASK}"));
    assert_eq!(out.result["headers"]["x-token"], format!("tok-{MASK}"));
}

#[tokio::test]
async fn error_statuses_fail() {
    let addr = server().await;
    let (out, _) = run_collect(http_request(
        json!({"url": format!("http://{addr}/missing")}),
    ))
    .await;
    assert_eq!(out.status, ExecutionStatus::Failed);
    assert_eq!(out.result["status_code"], 404);

    let (out, _) = run_collect(http_request(json!({"url": format!("http://{addr}/fail")}))).await;
    assert_eq!(out.status, ExecutionStatus::Failed);
    assert_eq!(out.result["status_code"], 500);
    assert_eq!(out.result["body"], "boom");
}

#[tokio::test]
async fn redirects() {
    let addr = server().await;
    let url = format!("http://{addr}/redirect");
    let (out, _) = run_collect(http_request(json!({"url": url}))).await;
    assert_eq!(out.status, ExecutionStatus::Succeeded);
    assert_eq!(out.result["status_code"], 302);
    assert_eq!(out.result["headers"]["location"], "/echo");

    let (out, _) = run_collect(http_request(json!({"url": url, "allow_redirects": true}))).await;
    assert_eq!(out.status, ExecutionStatus::Succeeded);
    assert_eq!(out.result["status_code"], 200);
    assert_eq!(out.result["body"]["method"], "GET");
}

#[tokio::test]
async fn connection_refused_fails() {
    // Take a free port, then close it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let mut req = http_request(json!({"url": format!("http://{addr}/x?token=SECRET")}));
    req.secrets = vec!["SECRET".into()];
    let (out, _) = run_collect(req).await;
    assert_eq!(out.status, ExecutionStatus::Failed);
    let err = out.result["error"].as_str().unwrap();
    assert!(err.contains("HTTP request failed"), "{err}");
    assert!(!err.contains("SECRET"), "{err}");
}

#[tokio::test]
async fn timeout_and_cancel() {
    let addr = server().await;
    let url = format!("http://{addr}/slow");
    let (out, _) = run_collect(http_request(json!({"url": url, "timeout": 0.5}))).await;
    assert_eq!(out.status, ExecutionStatus::Timeout, "{}", out.result);

    let (tx, _rx) = unbounded_channel();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(run(http_request(json!({"url": url})), tx, cancel.clone()));
    cancel.cancel();
    let out = tokio::time::timeout(SAFETY, task).await.unwrap().unwrap();
    assert_eq!(out.status, ExecutionStatus::Canceled);
}

#[tokio::test]
async fn bad_parameters() {
    for params in [
        json!({}),
        json!({"url": "ftp://example.invalid/"}),
        json!({"url": "not a url"}),
        json!({"url": "http://127.0.0.1:1/", "method": "BAD METHOD"}),
        json!({"url": "http://127.0.0.1:1/", "headers": {"bad header": "x"}}),
        json!({"url": "http://127.0.0.1:1/", "verify_ssl_cert": "no"}),
    ] {
        let (out, _) = run_collect(http_request(params.clone())).await;
        assert_eq!(out.status, ExecutionStatus::Failed, "{params}");
        assert!(
            out.result["error"].as_str().unwrap().contains("parameter"),
            "{params}: {}",
            out.result
        );
    }
}
