//! The Consul inventory backend against an in-process fake Consul (axum on
//! 127.0.0.1:0) answering the documented catalog, health and KV shapes with
//! `X-Consul-Index` headers: hosts appear with their tags and health, a
//! removed service's hosts disappear, deploys mirror the advertised versions
//! into KV, and the ACL token is sent on every request.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, put};
use serde_json::{Value, json};

use crate::harness::{Backend, Server};

#[derive(Default)]
struct Fake {
    /// Service name -> health entries.
    services: BTreeMap<String, Vec<Value>>,
    /// KV PUTs in order (key, value).
    kv: Vec<(String, String)>,
    /// Requests with a wrong or missing token.
    bad_tokens: usize,
    requests: usize,
}

type Shared = Arc<Mutex<Fake>>;

const TOKEN: &str = "s3cr3t-consul-token";

fn check(state: &Shared, headers: &HeaderMap) -> bool {
    let mut f = state.lock().expect("lock");
    f.requests += 1;
    let ok = headers.get("x-consul-token").and_then(|v| v.to_str().ok()) == Some(TOKEN);
    if !ok {
        f.bad_tokens += 1;
    }
    ok
}

async fn services(State(s): State<Shared>, headers: HeaderMap) -> impl IntoResponse {
    if !check(&s, &headers) {
        return (StatusCode::FORBIDDEN, "ACL not found").into_response();
    }
    let f = s.lock().expect("lock");
    let mut body = serde_json::Map::new();
    body.insert("consul".into(), json!([]));
    for (name, entries) in &f.services {
        let mut tags: Vec<Value> = Vec::new();
        for e in entries {
            tags.extend(e["Service"]["Tags"].as_array().cloned().unwrap_or_default());
        }
        body.insert(name.clone(), Value::Array(tags));
    }
    ([("X-Consul-Index", "42")], axum::Json(Value::Object(body))).into_response()
}

async fn health(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path(svc): Path<String>,
) -> impl IntoResponse {
    if !check(&s, &headers) {
        return (StatusCode::FORBIDDEN, "ACL not found").into_response();
    }
    let f = s.lock().expect("lock");
    let entries = f.services.get(&svc).cloned().unwrap_or_default();
    (
        [("X-Consul-Index", "43")],
        axum::Json(Value::Array(entries)),
    )
        .into_response()
}

async fn kv_put(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path(key): Path<String>,
    body: String,
) -> impl IntoResponse {
    if !check(&s, &headers) {
        return (StatusCode::FORBIDDEN, "ACL not found").into_response();
    }
    s.lock().expect("lock").kv.push((key, body));
    axum::Json(json!(true)).into_response()
}

/// A health entry as `GET /v1/health/service/<svc>` returns it.
fn entry(
    node: &str,
    node_addr: &str,
    svc: &str,
    svc_addr: &str,
    tags: &[&str],
    status: &str,
) -> Value {
    json!({
        "Node": {"ID": "", "Node": node, "Address": node_addr, "Datacenter": "dc1",
                 "TaggedAddresses": {}, "Meta": {}, "CreateIndex": 1, "ModifyIndex": 1},
        "Service": {"ID": format!("{svc}-{node}"), "Service": svc, "Tags": tags,
                    "Address": svc_addr, "Port": 8080, "Meta": {}, "EnableTagOverride": false,
                    "CreateIndex": 1, "ModifyIndex": 1},
        "Checks": [
            {"Node": node, "CheckID": "serfHealth", "Name": "Serf Health Status",
             "Status": "passing", "Notes": "", "Output": "Agent alive and reachable",
             "ServiceID": "", "ServiceName": "", "ServiceTags": []},
            {"Node": node, "CheckID": format!("service:{svc}-{node}"), "Name": "http",
             "Status": status, "Notes": "", "Output": "", "ServiceID": format!("{svc}-{node}"),
             "ServiceName": svc, "ServiceTags": tags}
        ]
    })
}

fn start_fake(state: Shared) -> u16 {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let app = Router::new()
                .route("/v1/catalog/services", get(services))
                .route("/v1/health/service/{svc}", get(health))
                .route("/v1/kv/{*key}", put(kv_put))
                .with_state(state);
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            tx.send(l.local_addr().expect("addr").port()).expect("send");
            axum::serve(l, app).await.expect("serve");
        });
    });
    rx.recv().expect("port")
}

fn hosts(s: &Server) -> BTreeMap<String, Value> {
    let (st, v) = s.get("/api/v1/hosts");
    assert_eq!(st, 200, "{v}");
    let list = v
        .as_array()
        .cloned()
        .or_else(|| v["hosts"].as_array().cloned())
        .expect("hosts array");
    list.into_iter()
        .map(|h| (h["name"].as_str().expect("name").to_string(), h))
        .collect()
}

fn consul_inventory(backend: Backend) {
    let state: Shared = Arc::default();
    {
        let mut f = state.lock().expect("lock");
        f.services.insert(
            "web".into(),
            vec![
                entry(
                    "c1",
                    "10.0.0.1",
                    "web",
                    "10.1.0.1",
                    &["web::app_canary", "urlprefix-/"],
                    "passing",
                ),
                entry("p1", "10.0.0.2", "web", "", &["web::app"], "critical"),
            ],
        );
        f.services.insert(
            "api".into(),
            vec![entry("a1", "10.0.0.3", "api", "", &["api::app"], "warning")],
        );
    }
    let port = start_fake(state.clone());
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("aviary.yaml");
    crate::harness::write(
        &config,
        &format!(
            "inventory:\n  backend: consul\n  address: http://127.0.0.1:{port}\n  token: {TOKEN}\n  interval_secs: 1\n"
        ),
    );
    let s = Server::start_with(backend, &[], &["--config", config.to_str().expect("utf8")]);

    // Hosts appear with their deploy tags (other Consul tags are not deploy
    // tags and stay out), the service address or else the node address, and
    // Consul's health where no agent reported.
    let h = s.wait_for("consul hosts", || {
        let h = hosts(&s);
        (h.len() == 3).then_some(h)
    });
    assert_eq!(h["c1"]["address"], "10.1.0.1");
    assert_eq!(h["c1"]["tags"], json!(["web::app_canary"]));
    assert_eq!(h["c1"]["apps"]["web"]["health"], "healthy");
    assert_eq!(h["p1"]["address"], "10.0.0.2");
    assert_eq!(h["p1"]["tags"], json!(["web::app"]));
    assert_eq!(h["p1"]["apps"]["web"]["health"], "unhealthy");
    assert_eq!(h["a1"]["apps"]["api"]["health"], "unhealthy");
    let (_, stats) = s.get("/api/v1/stats");
    assert_eq!(stats["consul"]["hosts"]["a1"], "warning", "{stats}");
    assert_eq!(stats["consul"]["hosts"]["p1"], "critical", "{stats}");
    assert!(stats["consul"]["last_error"].is_null(), "{stats}");

    // The CLI sees them too.
    let out = s.cli(&["host", "list", "--tag", "web::app_canary"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("c1") && !text.contains("p1"),
        "{text}"
    );

    // A built-in host is not Consul's to remove.
    let out = s.cli(&[
        "host",
        "add",
        "manual",
        "--address",
        "10.0.0.9",
        "--tag",
        "api::app",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A removed service's hosts disappear.
    state.lock().expect("lock").services.remove("api");
    s.wait_for("a1 removed", || {
        (!hosts(&s).contains_key("a1")).then_some(())
    });
    assert!(hosts(&s).contains_key("manual"));

    // A canary deploy writes the canary version to KV (hosts never report: the
    // deploy times out, the advertised version changed anyway).
    let (st, v) = s.post(
        "/api/v1/deploys",
        json!({"operation": "canary", "app": "web", "version": "1.2-1", "parameters": {"timeout": 1}}),
    );
    assert_eq!(st, 201, "{v}");
    s.wait_for("canary KV", || {
        let f = state.lock().expect("lock");
        f.kv.iter()
            .any(|(k, v)| k == "web::canary_version" && v == "1.2-1")
            .then_some(())
    });
    // A role other than `app` gets its role in the key.
    let (st, v) = s.post(
        "/api/v1/deploys",
        json!({"operation": "canary", "app": "web", "version": "7", "parameters": {"timeout": 1, "role": "worker"}}),
    );
    assert_eq!(st, 201, "{v}");
    s.wait_for("role KV", || {
        let f = state.lock().expect("lock");
        f.kv.iter()
            .any(|(k, v)| k == "web::worker::canary_version" && v == "7")
            .then_some(())
    });

    let f = state.lock().expect("lock");
    assert!(f.requests > 0);
    assert_eq!(f.bad_tokens, 0, "every request carries X-Consul-Token");
    // Only changes are written: one PUT per key and value.
    let mut seen = std::collections::HashSet::new();
    for kv in &f.kv {
        assert!(
            seen.insert(kv.clone()),
            "written twice: {kv:?} in {:?}",
            f.kv
        );
    }
}

#[test]
fn consul_inventory_sqlite() {
    consul_inventory(Backend::Sqlite);
}

#[test]
fn consul_inventory_postgres() {
    consul_inventory(Backend::Postgres);
}

#[test]
fn consul_down_is_visible_and_not_fatal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("aviary.yaml");
    let port = crate::harness::free_port();
    crate::harness::write(
        &config,
        &format!(
            "inventory:\n  backend: consul\n  address: http://127.0.0.1:{port}\n  interval_secs: 1\n"
        ),
    );
    let s = Server::start_with(
        Backend::Sqlite,
        &[],
        &["--config", config.to_str().expect("utf8")],
    );
    let err = s.wait_for("consul error in stats", || {
        let (_, v) = s.get("/api/v1/stats");
        v["consul"]["last_error"].as_str().map(str::to_string)
    });
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    let (st, _) = s.get("/healthz");
    assert_eq!(st, 200);
}

#[test]
fn a_bad_inventory_backend_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("aviary.yaml");
    crate::harness::write(&config, "inventory:\n  backend: etcd\n");
    let out = std::process::Command::new(crate::harness::bin())
        .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("inventory.backend") && err.contains("etcd") && err.contains("`consul`"),
        "{err}"
    );
}
