//! `aviary host ...`, `aviary deploy canary|locks`, `aviary promote`,
//! `aviary rollback`, `aviary versions`: the inventory and deploys. Deploy
//! commands follow their execution and print each host's outcome; the exit
//! code is 0 only when the deploy succeeded.

use reqwest::Method;
use serde_json::{Value, json};

use crate::format::{self, Table};
use crate::{ApiClient, CliError, Console, EXIT_FAILED, EXIT_OK};

/// `aviary host ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum HostCmd {
    /// List hosts, optionally filtered.
    List {
        /// Only hosts with exactly this tag.
        #[arg(long)]
        tag: Option<String>,
        /// Only hosts carrying this app.
        #[arg(long)]
        app: Option<String>,
        /// With --app: only this role.
        #[arg(long)]
        role: Option<String>,
        /// With --app: only canaries (APP::ROLE_canary).
        #[arg(long)]
        canary: bool,
        /// With --app: only production targets (never canaries).
        #[arg(long, conflicts_with = "canary")]
        production: bool,
    },
    /// Show one host with what it reported.
    Get {
        /// Host name.
        name: String,
    },
    /// Add (or update) a host.
    Add {
        /// Host name.
        name: String,
        /// IP address or DNS name.
        #[arg(long)]
        address: String,
        /// Tag: APP::ROLE or APP::ROLE_canary (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// Remove a host (and revoke its agent token).
    Remove {
        /// Host name.
        name: String,
    },
    /// Manage a host's agent token.
    #[command(subcommand)]
    Token(HostTokenCmd),
}

/// `aviary host token ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum HostTokenCmd {
    /// Issue the host's agent token (printed once; replaces the previous one).
    Create {
        /// Host name (created if missing).
        name: String,
        /// Address of the host.
        #[arg(long)]
        address: Option<String>,
        /// Tags the host's agent may carry (default: what the agent registers first).
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// Revoke the host's agent token.
    Revoke {
        /// Host name.
        name: String,
    },
}

/// Options shared by deploy commands.
#[derive(Debug, Clone, clap::Args)]
pub struct DeployOpts {
    /// Role of the app.
    #[arg(long, default_value = "app")]
    pub role: String,
    /// Seconds to wait for the hosts.
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Seconds to wait for another deploy of this app and role (default: refuse at once).
    #[arg(long)]
    pub lock_wait: Option<u64>,
    /// Start it and print the execution id without following it.
    #[arg(long = "async")]
    pub run_async: bool,
}

/// `aviary deploy ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DeployCmd {
    /// Deploy VERSION of APP to its canaries and wait for them.
    Canary {
        /// Application (package name).
        app: String,
        /// Version.
        #[arg(value_name = "VERSION")]
        app_version: String,
        /// Deploy options.
        #[command(flatten)]
        opts: DeployOpts,
    },
    /// Show held deploy locks.
    Locks,
}

/// `aviary promote`.
#[derive(Debug, Clone, clap::Args)]
pub struct PromoteArgs {
    /// Application. No version: only what the canaries run can be promoted.
    pub app: String,
    /// Production hosts per batch.
    #[arg(long)]
    pub batch_size: Option<u64>,
    /// Production hosts per batch, in percent.
    #[arg(long)]
    pub batch_percent: Option<u64>,
    /// At most this many production hosts updating at once.
    #[arg(long)]
    pub max_unavailable: Option<u64>,
    /// Deploy options.
    #[command(flatten)]
    pub opts: DeployOpts,
}

/// `aviary rollback`.
#[derive(Debug, Clone, clap::Args)]
pub struct RollbackArgs {
    /// Application: its canaries go back to the production version.
    pub app: String,
    /// Deploy options.
    #[command(flatten)]
    pub opts: DeployOpts,
}

/// `aviary versions`.
#[derive(Debug, Clone, clap::Args)]
pub struct VersionsArgs {
    /// Application (all apps when omitted).
    pub app: Option<String>,
    /// Role.
    #[arg(long, default_value = "app")]
    pub role: String,
    /// History lines.
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn host_row(t: &mut Table, h: &Value) {
    let apps = h["apps"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(app, st)| {
                    format!(
                        "{app}={} ({})",
                        s(&st["installed"]),
                        st["health"].as_str().unwrap_or("unknown")
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    let tags = h["tags"]
        .as_array()
        .map(|a| a.iter().map(s).collect::<Vec<_>>().join(","))
        .unwrap_or_default();
    let seen = h["last_seen"]
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| format::time(&t.with_timezone(&chrono::Utc)))
        .unwrap_or_else(|| "never".into());
    t.row(vec![s(&h["name"]), s(&h["address"]), tags, apps, seen]);
}

/// `aviary host ...`.
pub(crate) async fn host(
    api: &ApiClient,
    cmd: HostCmd,
    console: &mut Console<'_>,
) -> Result<i32, CliError> {
    let resp = match cmd {
        HostCmd::List {
            tag,
            app,
            role,
            canary,
            production,
        } => {
            let mut q = Vec::new();
            if let Some(t) = tag {
                q.push(("tag", t));
            }
            if let Some(a) = app {
                q.push(("app", a));
            }
            if let Some(r) = role {
                q.push(("role", r));
            }
            if canary {
                q.push(("canary", "true".to_string()));
            } else if production {
                q.push(("canary", "false".to_string()));
            }
            let resp = api.get(&["hosts"], &q).await?;
            if console.json {
                console.print_json(&resp)?;
            } else {
                let mut t = Table::new(&["name", "address", "tags", "apps", "last seen"]);
                for h in resp.as_array().into_iter().flatten() {
                    host_row(&mut t, h);
                }
                console.print(&t.render())?;
            }
            return Ok(EXIT_OK);
        }
        HostCmd::Get { name } => api.get(&["hosts", &name], &[]).await?,
        HostCmd::Add {
            name,
            address,
            tags,
        } => {
            let body = json!({"name": name, "address": address, "tags": tags});
            api.call(Method::POST, &["hosts"], &[], Some(&body)).await?
        }
        HostCmd::Remove { name } => {
            api.call(Method::DELETE, &["hosts", &name], &[], None)
                .await?;
            if !console.json {
                console.print(&format!("removed host {name}\n"))?;
            }
            return Ok(EXIT_OK);
        }
        HostCmd::Token(HostTokenCmd::Create {
            name,
            address,
            tags,
        }) => {
            let mut body = json!({"tags": tags});
            if let Some(a) = address {
                body["address"] = json!(a);
            }
            let resp = api
                .call(Method::POST, &["hosts", &name, "token"], &[], Some(&body))
                .await?;
            if console.json {
                console.print_json(&resp)?;
            } else {
                console.print(&format!("{}\n", s(&resp["token"])))?;
                console.eprint(&format!(
                    "agent token for host {name} (shown once): run `aviary agent --server URL --token TOKEN --tag APP::ROLE` on it\n"
                ))?;
            }
            return Ok(EXIT_OK);
        }
        HostCmd::Token(HostTokenCmd::Revoke { name }) => {
            api.call(Method::DELETE, &["hosts", &name, "token"], &[], None)
                .await?;
            if !console.json {
                console.print(&format!("revoked the agent token of host {name}\n"))?;
            }
            return Ok(EXIT_OK);
        }
    };
    if console.json {
        console.print_json(&resp)?;
    } else {
        let mut t = Table::new(&["name", "address", "tags", "apps", "last seen"]);
        host_row(&mut t, &resp);
        console.print(&t.render())?;
    }
    Ok(EXIT_OK)
}

async fn start_deploy(
    api: &ApiClient,
    operation: &str,
    app: &str,
    version: Option<String>,
    mut parameters: serde_json::Map<String, Value>,
    opts: DeployOpts,
    console: &mut Console<'_>,
) -> Result<i32, CliError> {
    parameters.insert("role".into(), json!(opts.role));
    if let Some(t) = opts.timeout {
        parameters.insert("timeout".into(), json!(t));
    }
    if let Some(w) = opts.lock_wait {
        parameters.insert("lock_wait".into(), json!(w));
    }
    let body =
        json!({"operation": operation, "app": app, "version": version, "parameters": parameters});
    let created = api
        .call(Method::POST, &["deploys"], &[], Some(&body))
        .await?;
    let id = s(&created["id"]);
    if opts.run_async {
        if console.json {
            console.print_json(&created)?;
        } else {
            console.print(&format!("{id}\n"))?;
        }
        return Ok(EXIT_OK);
    }
    if !console.json {
        console.eprint(&format!("{operation} of {app}: execution {id}\n"))?;
    }
    let (exec, raw) = crate::exec::follow_created(api, &id, console).await?;
    if console.json {
        console.print_json(&raw)?;
    } else {
        let r = &exec.result;
        let mut t = Table::new(&["host", "outcome", "installed", "health", "error"]);
        for h in r["hosts"].as_array().into_iter().flatten() {
            t.row(vec![
                s(&h["host"]),
                s(&h["outcome"]),
                s(&h["installed"]),
                s(&h["health"]),
                s(&h["error"]),
            ]);
        }
        if !t.is_empty() {
            console.print(&t.render())?;
        }
        let status = format::status(exec.status, console.color);
        console.print(&format!(
            "{operation} {app} {}: {status}\n",
            s(&r["version"])
        ))?;
        if let Some(e) = r["error"].as_str() {
            console.eprint(&format!("error: {e}\n"))?;
        }
    }
    Ok(
        if exec.status == aviary_core::model::ExecutionStatus::Succeeded {
            EXIT_OK
        } else {
            EXIT_FAILED
        },
    )
}

/// `aviary deploy ...`.
pub(crate) async fn deploy(
    api: &ApiClient,
    cmd: DeployCmd,
    console: &mut Console<'_>,
) -> Result<i32, CliError> {
    match cmd {
        DeployCmd::Canary {
            app,
            app_version,
            opts,
        } => {
            start_deploy(
                api,
                "canary",
                &app,
                Some(app_version),
                Default::default(),
                opts,
                console,
            )
            .await
        }
        DeployCmd::Locks => {
            let resp = api.get(&["deploy-locks"], &[]).await?;
            if console.json {
                console.print_json(&resp)?;
            } else {
                let mut t = Table::new(&["app", "role", "holder", "actor", "since"]);
                for l in resp.as_array().into_iter().flatten() {
                    t.row(vec![
                        s(&l["app"]),
                        s(&l["role"]),
                        s(&l["holder"]),
                        s(&l["actor"]),
                        s(&l["acquired_at"]),
                    ]);
                }
                console.print(&t.render())?;
            }
            Ok(EXIT_OK)
        }
    }
}

/// `aviary promote`.
pub(crate) async fn promote(
    api: &ApiClient,
    args: PromoteArgs,
    console: &mut Console<'_>,
) -> Result<i32, CliError> {
    let mut p = serde_json::Map::new();
    for (k, v) in [
        ("batch_size", args.batch_size),
        ("batch_percent", args.batch_percent),
        ("max_unavailable", args.max_unavailable),
    ] {
        if let Some(v) = v {
            p.insert(k.into(), json!(v));
        }
    }
    start_deploy(api, "promote", &args.app, None, p, args.opts, console).await
}

/// `aviary rollback`.
pub(crate) async fn rollback(
    api: &ApiClient,
    args: RollbackArgs,
    console: &mut Console<'_>,
) -> Result<i32, CliError> {
    start_deploy(
        api,
        "rollback",
        &args.app,
        None,
        Default::default(),
        args.opts,
        console,
    )
    .await
}

/// `aviary versions`.
pub(crate) async fn versions(
    api: &ApiClient,
    args: VersionsArgs,
    console: &mut Console<'_>,
) -> Result<i32, CliError> {
    let Some(app) = args.app else {
        let resp = api.get(&["versions"], &[]).await?;
        if console.json {
            console.print_json(&resp)?;
        } else {
            let mut t = Table::new(&["app", "role", "canary", "production", "updated"]);
            for v in resp.as_array().into_iter().flatten() {
                t.row(vec![
                    s(&v["app"]),
                    s(&v["role"]),
                    s(&v["canary_version"]),
                    s(&v["production_version"]),
                    s(&v["updated_at"]),
                ]);
            }
            console.print(&t.render())?;
        }
        return Ok(EXIT_OK);
    };
    let resp = api
        .get(
            &["versions", &app],
            &[("role", args.role), ("limit", args.limit.to_string())],
        )
        .await?;
    if console.json {
        console.print_json(&resp)?;
        return Ok(EXIT_OK);
    }
    let pairs = [
        ("app", format!("{}::{}", s(&resp["app"]), s(&resp["role"]))),
        ("canary", s(&resp["canary_version"])),
        ("production", s(&resp["production_version"])),
    ];
    console.print(&format::fields(&pairs))?;
    let mut t = Table::new(&["at", "kind", "old", "new", "actor", "execution"]);
    for c in resp["history"].as_array().into_iter().flatten() {
        t.row(vec![
            s(&c["at"]),
            s(&c["kind"]),
            s(&c["old_version"]),
            s(&c["new_version"]),
            s(&c["actor"]),
            s(&c["execution_id"]),
        ]);
    }
    console.print(&t.render())?;
    Ok(EXIT_OK)
}
