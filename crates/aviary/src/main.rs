//! The `aviary` binary: `aviary server` runs the server, `aviary pack
//! validate` checks packs offline, every other command is an API client
//! (see the aviary-cli crate). This file only parses arguments and dispatches.

mod demo;
mod git_hook;
mod haproxy;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use aviary_server::config::{Overrides, ServerConfig};
use clap::{Parser, Subcommand};

/// Aviary: event-driven automation and canary delivery in one binary.
#[derive(Parser)]
#[command(name = "aviary", version, about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: aviary_cli::GlobalArgs,
    #[command(subcommand)]
    command: Top,
}

#[derive(Subcommand)]
enum Top {
    /// Run the server: HTTP API, webhooks, rules, the execution queue and timers.
    Server(ServerArgs),
    /// Work with packs: validate folders offline, list or reload the server's.
    #[command(subcommand)]
    Pack(PackCommand),
    /// Build a .deb from a checked-out repository (what FPM did in the seed).
    Package(PackageArgs),
    /// Manage the signed APT repository the server publishes at /apt/.
    #[command(subcommand)]
    Apt(AptCommand),
    /// Work with Orquesta workflows offline.
    #[command(subcommand)]
    Workflow(WorkflowCommand),
    /// A git post-receive hook that sends pushes to Aviary like GitHub's webhook.
    #[command(subcommand)]
    GitHook(git_hook::GitHookCommand),
    /// The pipeline on this machine in one command: server, hosts, a sample app, a push.
    Demo(demo::DemoArgs),
    /// haproxy in front of each app's production and canary pools, following the inventory.
    #[command(subcommand)]
    Haproxy(haproxy::HaproxyCommand),
    /// Run the host agent: register, watch advertised versions, converge with apt-get.
    Agent(AgentArgs),
    #[command(flatten)]
    Client(aviary_cli::Command),
}

#[derive(clap::Args)]
struct AgentArgs {
    /// Server base URL.
    #[arg(long, env = "AVIARY_SERVER")]
    server: String,
    /// The host's agent token (`aviary host token create HOST`).
    #[arg(long, env = "AVIARY_AGENT_TOKEN", hide_env_values = true)]
    token: String,
    /// A tag this host carries: APP::ROLE or APP::ROLE_canary (repeatable).
    #[arg(long = "tag", required = true)]
    tags: Vec<String>,
    /// Address to register for this host.
    #[arg(long)]
    address: Option<String>,
    /// Health check URL (2xx is healthy).
    #[arg(long)]
    health_url: Option<String>,
    /// Health check command and arguments (exit 0 is healthy), e.g. `--health-cmd /usr/bin/test -- -e /opt/web`.
    #[arg(long, num_args = 1.., allow_hyphen_values = true)]
    health_cmd: Vec<String>,
    /// Heartbeat interval in seconds.
    #[arg(long, default_value_t = 10)]
    heartbeat: u64,
    /// Seconds a new version may take to pass its health check after the install.
    #[arg(long, default_value_t = 30)]
    health_grace: u64,
    /// APT suite of the server's repository.
    #[arg(long, default_value = "stable")]
    suite: String,
    /// APT component.
    #[arg(long, default_value = "main")]
    component: String,
}

#[derive(clap::Args)]
struct PackageArgs {
    /// The application repository (metadata from fpm.json and .aviary/package.yaml).
    repo_dir: PathBuf,
    /// Where to write the .deb.
    #[arg(long, short, default_value = ".")]
    out: PathBuf,
    /// Build number for the iteration (default: SOURCE_DATE_EPOCH or now).
    #[arg(long)]
    build_number: Option<String>,
    /// Commit id; its short form goes into the version.
    #[arg(long)]
    commit: Option<String>,
    /// Compression: gzip or xz, with an optional level (gzip:6, xz:1).
    #[arg(long, default_value = "gzip:6")]
    compression: String,
}

#[derive(clap::Args)]
struct AptRepoArgs {
    /// Repository folder; default: <data dir>/apt (what the server serves at /apt/).
    #[arg(long, global = true)]
    repo: Option<PathBuf>,
}

#[derive(Subcommand)]
enum AptCommand {
    /// Add .deb files to a suite and component, re-sign and publish atomically.
    Add {
        /// The .deb files.
        #[arg(required = true)]
        debs: Vec<PathBuf>,
        /// Suite (distribution).
        #[arg(long, default_value = "stable")]
        suite: String,
        /// Component.
        #[arg(long, default_value = "main")]
        component: String,
        #[command(flatten)]
        repo: AptRepoArgs,
    },
    /// List the packages of the repository.
    List {
        /// Only this suite.
        #[arg(long)]
        suite: Option<String>,
        #[command(flatten)]
        repo: AptRepoArgs,
    },
    /// Remove a package (all versions, or one) and publish.
    Remove {
        /// Package name.
        package: String,
        /// Only this version.
        #[arg(long)]
        version: Option<String>,
        /// Suite (distribution).
        #[arg(long, default_value = "stable")]
        suite: String,
        /// Component.
        #[arg(long, default_value = "main")]
        component: String,
        #[command(flatten)]
        repo: AptRepoArgs,
    },
    /// Print the public signing key, for `deb [signed-by=/etc/apt/keyrings/aviary.gpg] ...`.
    ExportKey {
        /// ASCII-armored instead of binary (binary is what signed-by files usually hold).
        #[arg(long)]
        armor: bool,
        /// Write to this file instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
        #[command(flatten)]
        repo: AptRepoArgs,
    },
    /// Copy the public part (pool and dists) to a folder, e.g. for nginx.
    Export {
        /// Destination folder.
        dir: PathBuf,
        #[command(flatten)]
        repo: AptRepoArgs,
    },
    /// Delete pool files no index refers to any more.
    Gc {
        #[command(flatten)]
        repo: AptRepoArgs,
    },
}

#[derive(Subcommand)]
enum WorkflowCommand {
    /// Run rehearsal specs (Orquesta's format: mocked action results, expected task sequence,
    /// routes, status and output) without running any action. Exit 0 only if all pass.
    ///
    /// A spec's `workflow:` path is looked up next to the spec, then in the spec folder's
    /// parent, then in the current directory.
    Rehearse {
        /// Rehearsal spec files.
        #[arg(required = true)]
        specs: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PackCommand {
    /// Check pack folders and report every problem of every file at once (no server needed).
    Validate {
        /// Pack folders, or folders of packs.
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
    },
    /// List the packs the server has loaded.
    List,
    /// Reload the server's packs; the running set is replaced only if all are valid.
    Reload,
}

#[derive(clap::Args)]
struct ServerArgs {
    /// Configuration file (YAML); default: <data dir>/aviary.yaml if present.
    #[arg(long, env = "AVIARY_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, env = "AVIARY_LISTEN")]
    listen: Option<String>,
    /// Data directory (embedded database, keys, admin token).
    #[arg(long, env = "AVIARY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Database: sqlite:<path> (default, in the data dir) or postgres://user@host:port/db.
    #[arg(long, env = "AVIARY_DATABASE")]
    database: Option<String>,
    /// Pack folders (or folders of packs) to load; repeatable.
    #[arg(long = "packs", env = "AVIARY_PACKS", value_delimiter = ':')]
    packs: Vec<PathBuf>,
    /// How many actions may run at once.
    #[arg(long, env = "AVIARY_WORKERS")]
    workers: Option<usize>,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "AVIARY_MAX_BODY_BYTES")]
    max_body_bytes: Option<usize>,
    /// Node name (several servers sharing PostgreSQL need distinct names).
    #[arg(long, env = "AVIARY_NODE")]
    node: Option<String>,
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("AVIARY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn server(args: ServerArgs) -> anyhow::Result<()> {
    init_tracing();
    let config = ServerConfig::load(&Overrides {
        config_file: args.config,
        listen: args.listen,
        data_dir: args.data_dir,
        database: args.database,
        packs: args.packs,
        workers: args.workers,
        max_body_bytes: args.max_body_bytes,
        node: args.node,
    })
    .context("invalid configuration")?;
    aviary_server::serve(config).await?;
    Ok(())
}

fn validate(dirs: &[PathBuf]) -> anyhow::Result<ExitCode> {
    match aviary_server::packs::Registry::load(dirs) {
        Ok(reg) => {
            for p in reg.packs.iter().filter(|p| p.path.is_some()) {
                println!(
                    "ok  {} {} ({} actions, {} rules)",
                    p.name, p.version, p.actions, p.rules
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(aviary_server::packs::PackLoadError::Invalid(diags)) => {
            eprintln!("{diags}");
            eprintln!("{} problem(s) found", diags.0.len());
            Ok(ExitCode::from(1))
        }
        Err(e) => Err(e.into()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("aviary: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result: anyhow::Result<ExitCode> = runtime.block_on(async move {
        match cli.command {
            Top::Server(args) => server(args).await.map(|_| ExitCode::SUCCESS),
            Top::Pack(PackCommand::Validate { dirs }) => validate(&dirs),
            Top::Pack(PackCommand::List) => {
                client(
                    cli.global,
                    aviary_cli::Command::Pack(aviary_cli::PackCmd::List),
                )
                .await
            }
            Top::Pack(PackCommand::Reload) => {
                client(
                    cli.global,
                    aviary_cli::Command::Pack(aviary_cli::PackCmd::Reload),
                )
                .await
            }
            Top::Workflow(WorkflowCommand::Rehearse { specs }) => rehearse(&specs),
            Top::GitHook(cmd) => git_hook::run(cmd).await,
            Top::Demo(args) => demo::run(args).await,
            Top::Haproxy(cmd) => haproxy::run(cmd, cli.global).await,
            Top::Agent(args) => agent(args).await,
            Top::Apt(cmd) => apt(cmd, cli.global.json),
            Top::Package(args) => package(args, cli.global.json),
            Top::Client(cmd) => client(cli.global, cmd).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("aviary: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn agent(args: AgentArgs) -> anyhow::Result<ExitCode> {
    let mut cfg = aviary_agent::Config::new(&args.server, &args.token, args.tags);
    cfg.address = args.address;
    cfg.health_url = args.health_url;
    cfg.health_cmd = args.health_cmd;
    cfg.heartbeat = std::time::Duration::from_secs(args.heartbeat.max(1));
    cfg.health_grace = std::time::Duration::from_secs(args.health_grace);
    cfg.suite = args.suite;
    cfg.component = args.component;
    aviary_agent::run(cfg).await?;
    Ok(ExitCode::SUCCESS)
}

fn package(args: PackageArgs, json: bool) -> anyhow::Result<ExitCode> {
    use aviary_packaging::deb::{BuildRequest, Compression, build, source_date_epoch_from_env};
    let (kind, level) = args
        .compression
        .split_once(':')
        .unwrap_or((&args.compression, ""));
    let level = if level.is_empty() {
        None
    } else {
        Some(
            level
                .parse::<u32>()
                .context("compression level must be a number 0-9")?,
        )
    };
    let compression = match kind {
        "gzip" | "gz" => Compression::Gzip {
            level: level.unwrap_or(6),
        },
        "xz" => Compression::Xz {
            level: level.unwrap_or(1),
        },
        other => anyhow::bail!(
            "unknown compression '{other}': use gzip[:LEVEL] or xz[:LEVEL] (lintian refuses zstd)"
        ),
    };
    let mut req = BuildRequest::new(&args.repo_dir, &args.out);
    req.build_number = args.build_number;
    req.commit = args.commit;
    req.source_date_epoch = source_date_epoch_from_env();
    req.compression = compression;
    let built = build(&req)?;
    if json {
        println!(
            "{}",
            serde_json::json!({"path": built.path, "name": built.name, "version": built.version,
                "architecture": built.architecture, "size": built.size, "sha256": built.sha256, "files": built.files})
        );
    } else {
        println!(
            "{} {} {} ({} files, {} bytes)",
            built.path.display(),
            built.name,
            built.version,
            built.files,
            built.size
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn open_repo(args: &AptRepoArgs) -> anyhow::Result<aviary_packaging::apt::Repository> {
    let root = match &args.repo {
        Some(r) => r.clone(),
        None => aviary_server::api::apt::repo_dir(
            &aviary_server::config::default_data_dir()
                .context("no data directory: set --repo or AVIARY_DATA_DIR")?,
        ),
    };
    aviary_packaging::apt::Repository::open_or_create(&root, Default::default())
        .with_context(|| format!("APT repository {}", root.display()))
}

fn apt(cmd: AptCommand, json: bool) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    let print_entries = |entries: &[aviary_packaging::apt::PackageEntry]| {
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(entries).unwrap_or_default()
            );
        } else {
            for e in entries {
                println!(
                    "{:<30} {:<28} {:<6} {}/{}",
                    e.name, e.version, e.arch, e.suite, e.component
                );
            }
        }
    };
    match cmd {
        AptCommand::Add {
            debs,
            suite,
            component,
            repo,
        } => {
            let report = open_repo(&repo)?.add(&debs, &suite, &component)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                for e in &report.added {
                    println!("added     {} {} ({})", e.name, e.version, e.arch);
                }
                for e in &report.unchanged {
                    println!("unchanged {} {} ({})", e.name, e.version, e.arch);
                }
                for e in &report.removed {
                    println!("retired   {} {} ({})", e.name, e.version, e.arch);
                }
            }
        }
        AptCommand::List { suite, repo } => {
            print_entries(&open_repo(&repo)?.list(suite.as_deref())?)
        }
        AptCommand::Remove {
            package,
            version,
            suite,
            component,
            repo,
        } => {
            let report =
                open_repo(&repo)?.remove(&suite, &component, &package, version.as_deref())?;
            if report.removed.is_empty() {
                eprintln!("aviary: no package '{package}' in {suite}/{component}");
                return Ok(ExitCode::from(1));
            }
            print_entries(&report.removed);
        }
        AptCommand::ExportKey {
            armor,
            output,
            repo,
        } => {
            let r = open_repo(&repo)?;
            let bytes = if armor {
                r.export_public_key_armored()?.into_bytes()
            } else {
                r.export_public_key()?
            };
            match output {
                Some(path) => std::fs::write(&path, bytes)
                    .with_context(|| format!("cannot write {}", path.display()))?,
                None => std::io::stdout().write_all(&bytes)?,
            }
        }
        AptCommand::Export { dir, repo } => open_repo(&repo)?.export_to(&dir)?,
        AptCommand::Gc { repo } => println!("{} pool file(s) removed", open_repo(&repo)?.gc()?),
    }
    Ok(ExitCode::SUCCESS)
}

fn rehearse(specs: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let mut passed = 0;
    for spec in specs {
        let text = std::fs::read_to_string(spec)
            .with_context(|| format!("cannot read rehearsal spec {}", spec.display()))?;
        let dir = spec.parent().map(PathBuf::from).unwrap_or_default();
        let report = aviary_workflow::rehearsal::rehearse(&text, |path| {
            let candidates = [
                dir.join(path),
                dir.parent().map(|p| p.join(path)).unwrap_or_default(),
                PathBuf::from(path),
            ];
            candidates
                .iter()
                .find(|c| c.is_file())
                .ok_or_else(|| {
                    format!(
                        "workflow file '{path}' not found next to {}",
                        spec.display()
                    )
                })
                .and_then(|c| {
                    std::fs::read_to_string(c).map_err(|e| format!("{}: {e}", c.display()))
                })
        });
        println!("{}: {report}", spec.display());
        if report.passed() {
            passed += 1;
        }
    }
    println!("{passed} passed, {} failed", specs.len() - passed);
    Ok(if passed == specs.len() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn client(
    global: aviary_cli::GlobalArgs,
    cmd: aviary_cli::Command,
) -> anyhow::Result<ExitCode> {
    let code = aviary_cli::run_and_report(global, cmd).await;
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}
