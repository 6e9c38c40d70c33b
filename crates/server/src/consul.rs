//! The Consul inventory backend: a sync task that reads Consul's catalog and
//! health API (`GET /v1/catalog/services`, `GET /v1/health/service/<svc>`)
//! and upserts the hosts it finds into the store (so deploys, `aviary host
//! list`, HAProxy and the API see them), removes the hosts it created that
//! disappeared from Consul, and mirrors the advertised versions into Consul KV
//! (`<app>::canary_version`, `<app>::version`, or `<app>::<role>::...` for
//! roles other than `app`) for consul-template setups. The store stays the
//! source of truth. Errors are logged, kept in [`status`] (shown in
//! `/api/v1/stats`) and retried with backoff; they never stop the server.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use aviary_deploy::{Health, Host, parse_tag, valid_host_name};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::InventoryConfig;
use crate::engine::Engine;

/// Marker in [`Host::token_id`] of the hosts the Consul sync created.
pub const OWNER: &str = "consul";

/// What the last sync did, for `/api/v1/stats`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConsulStatus {
    /// Consul's address.
    pub address: String,
    /// When the last sync succeeded (RFC 3339).
    pub last_success: Option<String>,
    /// The last error, if the last sync failed.
    pub last_error: Option<String>,
    /// Consecutive failed syncs.
    pub failures: u32,
    /// Hosts seen in Consul at the last sync, with their Consul health.
    pub hosts: BTreeMap<String, String>,
    /// KV keys written so far.
    pub kv_writes: u64,
}

fn cell() -> &'static Mutex<Option<ConsulStatus>> {
    static CELL: OnceLock<Mutex<Option<ConsulStatus>>> = OnceLock::new();
    CELL.get_or_init(|| Mutex::new(None))
}

/// The Consul sync's status, or `None` when the builtin inventory is used.
pub fn status() -> Option<ConsulStatus> {
    cell().lock().ok().and_then(|g| g.clone())
}

fn update(f: impl FnOnce(&mut ConsulStatus)) {
    if let Ok(mut g) = cell().lock() {
        f(g.get_or_insert_with(ConsulStatus::default));
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Entry {
    node: NodeInfo,
    service: ServiceInfo,
    #[serde(default)]
    checks: Vec<Check>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct NodeInfo {
    node: String,
    #[serde(default)]
    address: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ServiceInfo {
    #[serde(default)]
    address: String,
    #[serde(default)]
    tags: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Check {
    status: String,
}

/// A host as Consul describes it.
#[derive(Debug, Default)]
struct Seen {
    address: String,
    tags: BTreeSet<String>,
    /// 0 passing, 1 warning, 2 critical.
    worst: u8,
}

fn rank(status: &str) -> u8 {
    match status {
        "passing" => 0,
        "warning" => 1,
        _ => 2,
    }
}

fn rank_name(r: u8) -> &'static str {
    match r {
        0 => "passing",
        1 => "warning",
        _ => "critical",
    }
}

/// The Consul client and the sync's memory.
struct Sync {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    service: Option<String>,
    /// KV values written (key -> value), to write only changes.
    written: HashMap<String, String>,
}

impl Sync {
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(t) = &self.token {
            r = r.header("X-Consul-Token", t);
        }
        r
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, String> {
        let resp = self
            .request(reqwest::Method::GET, path)
            .send()
            .await
            .map_err(|e| format!("GET {}{path}: {e}", self.base))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(format!(
                "GET {}{path}: HTTP {status}: {} (check inventory.token and the ACL policy)",
                self.base,
                body.trim()
            ));
        }
        resp.json()
            .await
            .map_err(|e| format!("GET {}{path}: unexpected response: {e}", self.base))
    }

    async fn catalog(&self) -> Result<BTreeMap<String, Seen>, String> {
        let services: Vec<String> = match &self.service {
            Some(s) => vec![s.clone()],
            None => self
                .get_json::<BTreeMap<String, serde_json::Value>>("/v1/catalog/services")
                .await?
                .into_keys()
                .filter(|s| s != "consul")
                .collect(),
        };
        let mut hosts: BTreeMap<String, Seen> = BTreeMap::new();
        for svc in services {
            let entries: Vec<Entry> = self
                .get_json(&format!("/v1/health/service/{}", urlencode(&svc)))
                .await?;
            for e in entries {
                if !valid_host_name(&e.node.node) {
                    tracing::warn!(node = %e.node.node, "consul node name is not a valid host name; skipped");
                    continue;
                }
                let seen = hosts.entry(e.node.node.clone()).or_default();
                let addr = if e.service.address.is_empty() {
                    e.node.address.clone()
                } else {
                    e.service.address.clone()
                };
                if seen.address.is_empty() {
                    seen.address = addr;
                }
                for t in e.service.tags.unwrap_or_default() {
                    if parse_tag(&t).is_ok() {
                        seen.tags.insert(t);
                    }
                }
                for c in &e.checks {
                    seen.worst = seen.worst.max(rank(&c.status));
                }
            }
        }
        Ok(hosts)
    }

    async fn sync_hosts(&self, engine: &Engine) -> Result<BTreeMap<String, String>, String> {
        let seen = self.catalog().await?;
        let store = engine.store.as_ref();
        let existing = store.list_hosts().await.map_err(|e| e.to_string())?;
        let mut by_name: HashMap<String, Host> =
            existing.into_iter().map(|h| (h.name.clone(), h)).collect();
        let mut report = BTreeMap::new();
        for (name, s) in &seen {
            report.insert(name.clone(), rank_name(s.worst).to_string());
            let health = match s.worst {
                0 => Health::Healthy,
                _ => Health::Unhealthy,
            };
            let tags: Vec<String> = s.tags.iter().cloned().collect();
            let mut host = by_name.remove(name).unwrap_or_else(|| Host {
                name: name.clone(),
                address: s.address.clone(),
                tags: Vec::new(),
                apps: BTreeMap::new(),
                last_seen: None,
                token_id: Some(OWNER.to_string()),
                created_at: chrono::Utc::now(),
            });
            let before = host.clone();
            host.address = s.address.clone();
            host.tags = tags;
            // Consul's health shows where no agent reported yet; an agent's
            // own report (install + health check) wins.
            for t in &host.tags {
                if let Ok(tag) = parse_tag(t) {
                    let st = host.apps.entry(tag.app.clone()).or_default();
                    if st.updated_at.is_none() {
                        st.health = health;
                    }
                }
            }
            if host != before {
                store.upsert_host(host).await.map_err(|e| e.to_string())?;
            }
        }
        for (name, h) in by_name {
            if h.token_id.as_deref() == Some(OWNER) {
                store.delete_host(&name).await.map_err(|e| e.to_string())?;
                tracing::info!(host = %name, "host left consul; removed");
            }
        }
        Ok(report)
    }

    async fn mirror_versions(&mut self, engine: &Engine) -> Result<u64, String> {
        let versions = engine
            .store
            .list_versions()
            .await
            .map_err(|e| e.to_string())?;
        let mut writes = 0;
        for v in versions {
            let prefix = if v.role == "app" {
                v.app.clone()
            } else {
                format!("{}::{}", v.app, v.role)
            };
            for (suffix, value) in [
                ("canary_version", &v.canary_version),
                ("version", &v.production_version),
            ] {
                let Some(value) = value else { continue };
                let key = format!("{prefix}::{suffix}");
                if self.written.get(&key) == Some(value) {
                    continue;
                }
                let path = format!("/v1/kv/{}", urlencode(&key));
                let resp = self
                    .request(reqwest::Method::PUT, &path)
                    .body(value.clone())
                    .send()
                    .await
                    .map_err(|e| format!("PUT {}{path}: {e}", self.base))?;
                if !resp.status().is_success() {
                    return Err(format!(
                        "PUT {}{path}: HTTP {} (check inventory.token's KV write rights)",
                        self.base,
                        resp.status()
                    ));
                }
                self.written.insert(key, value.clone());
                writes += 1;
            }
        }
        Ok(writes)
    }
}

fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Runs the Consul sync until `shutdown` (does nothing for the builtin
/// inventory).
pub async fn run(engine: Arc<Engine>, shutdown: CancellationToken) {
    let cfg: InventoryConfig = engine.config.inventory.clone();
    if !cfg.is_consul() {
        return;
    }
    let base = cfg
        .address
        .clone()
        .unwrap_or_default()
        .trim_end_matches('/')
        .to_string();
    update(|s| s.address = base.clone());
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            update(|s| s.last_error = Some(format!("cannot build HTTP client: {e}")));
            return;
        }
    };
    let mut sync = Sync {
        http,
        base,
        token: cfg.token.clone(),
        service: cfg.service.clone(),
        written: HashMap::new(),
    };
    let interval = Duration::from_secs(cfg.interval_secs.unwrap_or(5));
    // Versions are checked every second so KV follows a change quickly.
    let mut next_catalog = tokio::time::Instant::now();
    let mut failures: u32 = 0;
    loop {
        let mut result = Ok(());
        if tokio::time::Instant::now() >= next_catalog {
            match sync.sync_hosts(&engine).await {
                Ok(hosts) => {
                    update(|s| s.hosts = hosts);
                    next_catalog = tokio::time::Instant::now() + interval;
                }
                Err(e) => result = Err(e),
            }
        }
        if result.is_ok() {
            match sync.mirror_versions(&engine).await {
                Ok(n) => update(|s| s.kv_writes += n),
                Err(e) => result = Err(e),
            }
        }
        let wait = match result {
            Ok(()) => {
                failures = 0;
                update(|s| {
                    s.failures = 0;
                    s.last_error = None;
                    s.last_success = Some(chrono::Utc::now().to_rfc3339());
                });
                Duration::from_secs(1).min(interval)
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::warn!(error = %e, failures, "consul sync failed; retrying");
                update(|s| {
                    s.failures = failures;
                    s.last_error = Some(e);
                });
                let backoff = interval.saturating_mul(1 << failures.min(4));
                next_catalog = tokio::time::Instant::now();
                backoff.min(Duration::from_secs(60))
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
