//! `aviary haproxy run`: keeps an haproxy in front of each app's production
//! and canary pools, following the inventory (what consul-template +
//! haproxy did in the seed).
//!
//! Every few seconds it reads the hosts from the server (`GET
//! /api/v1/hosts`), builds an [`aviary_traffic::Snapshot`] (hosts tagged
//! `<app>::<role>` form the production pool, `<app>::<role>_canary` the canary
//! pool) and, when it changed, applies it: the configuration is checked with
//! `haproxy -c` and loaded by a master-worker reload that drops no
//! connection. A header `X-<App>-Canary: true` (or the cookie
//! `<app>_canary=true`) sends a request to the canary pool.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use aviary_traffic::haproxy::Haproxy;
use aviary_traffic::{App, RenderOptions, Server, Snapshot, render_haproxy};
use serde_json::Value;

/// One app behind haproxy.
#[derive(Debug, Clone)]
pub struct Front {
    /// App name (the package name in the tags).
    pub app: String,
    /// Role (`<app>::<role>` tags).
    pub role: String,
    /// Where the app's frontend listens.
    pub bind: SocketAddr,
    /// Port the app listens on, on every host.
    pub port: u16,
    /// Health check path.
    pub health_path: String,
    /// Share of ordinary requests sent to the canaries, in percent.
    pub canary_share: u8,
}

impl std::str::FromStr for Front {
    type Err = String;

    /// `APP[:ROLE]=BIND_ADDR:PORT,port=APP_PORT,health=/path,share=N`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let usage = "expected APP[:ROLE]=BIND:PORT[,port=N][,health=/path][,share=PERCENT], \
                     e.g. web=0.0.0.0:80,port=8080,health=/health";
        let (name, rest) = s.split_once('=').ok_or(usage)?;
        let (app, role) = name.split_once(':').unwrap_or((name, "app"));
        let mut parts = rest.split(',');
        let bind: SocketAddr = parts
            .next()
            .ok_or(usage)?
            .parse()
            .map_err(|e| format!("bind address: {e}; {usage}"))?;
        let mut front = Front {
            app: app.to_string(),
            role: role.to_string(),
            bind,
            port: 8080,
            health_path: "/health".into(),
            canary_share: 0,
        };
        for p in parts {
            match p.split_once('=') {
                Some(("port", v)) => front.port = v.parse().map_err(|e| format!("port: {e}"))?,
                Some(("health", v)) => front.health_path = v.to_string(),
                Some(("share", v)) => {
                    front.canary_share = v.parse().map_err(|e| format!("share: {e}"))?;
                }
                _ => return Err(format!("unknown option {p:?}; {usage}")),
            }
        }
        Ok(front)
    }
}

/// `aviary haproxy ...`
#[derive(clap::Subcommand)]
pub enum HaproxyCommand {
    /// Run haproxy and keep its pools in step with the inventory.
    Run(HaproxyArgs),
    /// Print the configuration the current inventory gives, and exit.
    Render(HaproxyArgs),
}

/// Options of `aviary haproxy run/render`.
#[derive(clap::Args)]
pub struct HaproxyArgs {
    /// An app to serve: APP[:ROLE]=BIND:PORT[,port=N][,health=/path][,share=PERCENT] (repeatable).
    #[arg(long = "app", required = true)]
    pub apps: Vec<Front>,
    /// Folder for haproxy's configuration, sockets and log.
    #[arg(long, default_value = "/var/lib/aviary/haproxy")]
    pub dir: PathBuf,
    /// The haproxy binary.
    #[arg(long, default_value = "haproxy")]
    pub haproxy: PathBuf,
    /// Seconds between inventory checks.
    #[arg(long, default_value_t = 2)]
    pub interval: u64,
}

/// Builds the traffic snapshot for `fronts` from the server's host list.
pub fn snapshot(hosts: &[Value], fronts: &[Front]) -> Snapshot {
    let mut apps = Vec::new();
    for f in fronts {
        let prod_tag = format!("{}::{}", f.app, f.role);
        let canary_tag = format!("{}::{}_canary", f.app, f.role);
        let mut production = Vec::new();
        let mut canary = Vec::new();
        for h in hosts {
            let tags: Vec<&str> = h["tags"]
                .as_array()
                .map(|t| t.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let (Some(name), Some(address)) = (h["name"].as_str(), h["address"].as_str()) else {
                continue;
            };
            let server = Server {
                name: name.to_string(),
                address: address.to_string(),
                port: f.port,
                weight: 100,
                draining: false,
            };
            if tags.contains(&canary_tag.as_str()) {
                canary.push(server);
            } else if tags.contains(&prod_tag.as_str()) {
                production.push(server);
            }
        }
        production.sort_by(|a, b| a.name.cmp(&b.name));
        canary.sort_by(|a, b| a.name.cmp(&b.name));
        apps.push(App {
            name: f.app.clone(),
            bind: f.bind,
            health_path: f.health_path.clone(),
            canary_share: f.canary_share,
            production,
            canary,
        });
    }
    Snapshot { apps }
}

/// Reads the hosts from the server.
pub async fn fetch_hosts(
    client: &reqwest::Client,
    url: &str,
    token: &str,
) -> anyhow::Result<Vec<Value>> {
    let r = client
        .get(format!("{}/api/v1/hosts", url.trim_end_matches('/')))
        .bearer_auth(token)
        .send()
        .await
        .context("reading the hosts")?;
    let status = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("reading the hosts: {status}: {v}");
    }
    Ok(match v {
        Value::Array(a) => a,
        Value::Object(mut m) => match m.remove("hosts") {
            Some(Value::Array(a)) => a,
            _ => Vec::new(),
        },
        _ => Vec::new(),
    })
}

/// Renders the configuration for a snapshot, with the runtime socket in `dir`.
pub fn render(snapshot: &Snapshot, dir: &Path) -> anyhow::Result<String> {
    let options = RenderOptions::new(Haproxy::stats_socket_for(dir).display().to_string());
    Ok(render_haproxy(snapshot, &options)?)
}

/// Starts haproxy for `fronts` and keeps it in step with the inventory
/// until `stop` resolves.
pub async fn run_loop(
    url: String,
    token: String,
    fronts: Vec<Front>,
    dir: PathBuf,
    binary: PathBuf,
    interval: Duration,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let hosts = fetch_hosts(&client, &url, &token).await?;
    let mut current = snapshot(&hosts, &fronts);
    let proxy = Haproxy::start(&binary, &dir, &render(&current, &dir)?)
        .await
        .context("starting haproxy")?;
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(interval) => {}
        }
        let hosts = match fetch_hosts(&client, &url, &token).await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot read the inventory; keeping the current pools");
                continue;
            }
        };
        let next = snapshot(&hosts, &fronts);
        if next != current {
            match proxy.apply(&render(&next, &dir)?).await {
                Ok(_) => {
                    tracing::info!("inventory changed: haproxy reloaded");
                    current = next;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "haproxy refused the new configuration; keeping the current one")
                }
            }
        }
    }
    proxy.stop().await;
    Ok(())
}

/// Runs `aviary haproxy ...` with the CLI's server and token.
pub async fn run(cmd: HaproxyCommand, global: aviary_cli::GlobalArgs) -> anyhow::Result<ExitCode> {
    let endpoint = aviary_cli::discover(&aviary_cli::DiscoveryEnv::from_process(
        global.url.clone(),
        global.token.clone(),
    ))
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let url = endpoint.url.clone();
    let token = endpoint
        .token
        .clone()
        .context("no API token: pass --token or set AVIARY_TOKEN")?;
    match cmd {
        HaproxyCommand::Render(args) => {
            let client = reqwest::Client::new();
            let hosts = fetch_hosts(&client, &url, &token).await?;
            print!("{}", render(&snapshot(&hosts, &args.apps), &args.dir)?);
            Ok(ExitCode::SUCCESS)
        }
        HaproxyCommand::Run(args) => {
            run_loop(
                url,
                token,
                args.apps,
                args.dir,
                args.haproxy,
                Duration::from_secs(args.interval.max(1)),
                async {
                    let _ = tokio::signal::ctrl_c().await;
                },
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pools_follow_the_tags() {
        let hosts = vec![
            json!({"name": "c1", "address": "10.0.0.2", "tags": ["web::app_canary"]}),
            json!({"name": "p1", "address": "10.0.0.3", "tags": ["web::app", "other::app"]}),
            json!({"name": "x", "address": "10.0.0.4", "tags": ["other::app"]}),
        ];
        let front: Front = "web=127.0.0.1:8088,port=8080,health=/health"
            .parse()
            .expect("front");
        let s = snapshot(&hosts, &[front]);
        let app = &s.apps[0];
        assert_eq!(
            app.canary.iter().map(|s| &s.name).collect::<Vec<_>>(),
            ["c1"]
        );
        assert_eq!(
            app.production.iter().map(|s| &s.name).collect::<Vec<_>>(),
            ["p1"]
        );
        assert!("web".parse::<Front>().is_err());
        assert!("web=127.0.0.1:1,bogus=1".parse::<Front>().is_err());
    }
}
