//! Aviary's command-line client: `aviary run`, `aviary execution ...`,
//! `aviary rule ...`, `aviary key ...` and friends. It talks to the server's
//! HTTP API (see `docs/api.md`), prints readable tables by default and the raw
//! JSON with `--json`.
//!
//! The binary crate flattens [`Command`] next to its own subcommands and calls
//! [`run`] (or [`run_and_report`]). Exit codes: 0 ok, 1 the thing failed
//! (execution failed, not found...), 2 usage or API errors, 3 cannot reach the
//! server or it refused the token.

pub mod client;
pub mod config;
pub mod deploy;
pub mod error;
mod exec;
pub mod format;
mod resources;
pub mod sse;

use std::io::{IsTerminal, Write};

use aviary_core::model::ExecutionStatus;

pub use client::ApiClient;
pub use config::{DiscoveryEnv, Endpoint, TokenSource, discover};
pub use error::{CliError, EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE};

/// Options shared by every client command.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct GlobalArgs {
    /// Aviary server URL [default: from ~/.config/aviary/cli.json, else http://127.0.0.1:9700].
    #[arg(long, env = "AVIARY_URL", global = true)]
    pub url: Option<String>,
    /// API token [default: from ~/.config/aviary/cli.json, else the local server's admin.token].
    #[arg(long, env = "AVIARY_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// Print the raw JSON answers (for scripts) instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

/// The client subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Run an action and follow its execution.
    #[command(
        long_about = "Run an action and follow its execution: its output is printed live, then a \
summary (id, status, duration, result). Parameters are given as key=value; values are sent \
as strings and the server converts them to the parameter's declared type.\n\n\
Exit code: 0 when the execution succeeded, 1 when it failed, timed out, was canceled or \
abandoned, 2 on usage or API errors (bad parameters are all listed), 3 when the server \
cannot be reached.",
        after_long_help = "Examples:\n  \
aviary run core.local cmd='echo hello'\n  \
aviary run core.http url=https://example.com method=GET\n  \
aviary run deploy.canary version=1.4.2 --async\n  \
aviary run core.local cmd='sleep 600' --timeout 30\n  \
aviary run core.echo message=hi --json | jq .result"
    )]
    Run(RunArgs),
    /// List, inspect, follow or cancel executions.
    #[command(subcommand)]
    Execution(ExecutionCmd),
    /// List, inspect, enable or disable rules.
    #[command(subcommand)]
    Rule(RuleCmd),
    /// List or inspect actions.
    #[command(subcommand)]
    Action(ActionCmd),
    /// List or inspect trigger instances (stored events).
    #[command(subcommand, name = "trigger-instance")]
    TriggerInstance(TriggerInstanceCmd),
    /// Manage datastore keys.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Manage API tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// List or reload packs. Not parsed here: the binary's `aviary pack`
    /// (which adds the offline `validate`) builds this variant.
    #[command(skip)]
    Pack(PackCmd),
    /// Show the audit trail (who did what).
    Audit(AuditArgs),
    /// List, show or answer inquiries (`core.ask`).
    #[command(subcommand)]
    Inquiry(InquiryCmd),
    /// The host inventory and agent tokens.
    #[command(subcommand)]
    Host(deploy::HostCmd),
    /// Canary deploys and deploy locks.
    #[command(subcommand)]
    Deploy(deploy::DeployCmd),
    /// Promote what the canaries run to production (takes no version), in batches.
    Promote(deploy::PromoteArgs),
    /// Return the canaries to the production version.
    Rollback(deploy::RollbackArgs),
    /// Advertised versions (canary, production) and their history.
    Versions(deploy::VersionsArgs),
}

/// `aviary run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Action reference, e.g. `core.local`.
    pub action: String,
    /// Parameters as key=value (repeatable).
    #[arg(value_name = "KEY=VALUE")]
    pub parameters: Vec<String>,
    /// Do not follow: print the execution id and return at once.
    #[arg(long = "async")]
    pub run_async: bool,
    /// Stop following after this many seconds (the execution keeps running).
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
}

/// `aviary execution ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ExecutionCmd {
    /// List executions, newest first.
    List {
        /// Only executions of this action.
        #[arg(long)]
        action: Option<String>,
        /// Only executions in this status.
        #[arg(long, value_parser = parse_status)]
        status: Option<ExecutionStatus>,
        /// Only executions started by this rule.
        #[arg(long)]
        rule: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Show one execution: status, times, parameters, result and trace.
    Get {
        /// Execution id.
        id: String,
    },
    /// Follow an execution's output until it ends (or print a finished one's).
    Tail {
        /// Execution id.
        id: String,
    },
    /// Cancel an execution.
    Cancel {
        /// Execution id.
        id: String,
    },
    /// Pause a workflow (and its subworkflows): running tasks end, no new task starts.
    Pause {
        /// Workflow execution id.
        id: String,
    },
    /// Resume a paused workflow.
    Resume {
        /// Workflow execution id.
        id: String,
    },
    /// Re-run a finished workflow from some of its tasks: a new execution that keeps the
    /// original's finished tasks and runs these again (and what follows them).
    #[command(name = "re-run")]
    ReRun {
        /// Workflow execution id.
        id: String,
        /// Tasks to run again, comma-separated (e.g. --tasks build,test).
        #[arg(long, value_delimiter = ',', required = true)]
        tasks: Vec<String>,
        /// With-items tasks (also in --tasks) whose items that succeeded are kept:
        /// only their other items run again.
        #[arg(long = "no-reset", value_delimiter = ',')]
        no_reset: Vec<String>,
    },
}

/// `aviary inquiry ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum InquiryCmd {
    /// List pending inquiries (questions `core.ask` waits on), newest first.
    List {
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Show one inquiry: its JSON schema, who may answer, and the answer.
    Get {
        /// Inquiry (execution) id.
        id: String,
    },
    /// Answer an inquiry with a JSON object matching its schema.
    #[command(
        after_long_help = "Example:\n  aviary inquiry respond 0193... '{\"approved\": true}'"
    )]
    Respond {
        /// Inquiry (execution) id.
        id: String,
        /// The answer, as JSON.
        response: String,
    },
}

/// `aviary rule ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum RuleCmd {
    /// List rules.
    List,
    /// Show one rule.
    Get {
        /// Rule reference (`pack.name`).
        r#ref: String,
    },
    /// Enable a rule.
    Enable {
        /// Rule reference (`pack.name`).
        r#ref: String,
    },
    /// Disable a rule.
    Disable {
        /// Rule reference (`pack.name`).
        r#ref: String,
    },
}

/// `aviary action ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ActionCmd {
    /// List actions.
    List,
    /// Show one action and its parameters.
    Get {
        /// Action reference (`pack.name`).
        r#ref: String,
    },
}

/// `aviary trigger-instance ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum TriggerInstanceCmd {
    /// List trigger instances, newest first.
    List {
        /// Only instances of this trigger type (e.g. `core.st2.webhook`).
        #[arg(long)]
        trigger: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Show one trigger instance with its enforcements.
    Get {
        /// Trigger instance id.
        id: String,
    },
}

/// Datastore scope on the command line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ScopeArg {
    /// Shared by everything (`st2kv.system`).
    #[default]
    System,
    /// Per user (`st2kv.user`).
    User,
}

impl ScopeArg {
    /// The API's name for the scope.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
        }
    }
}

/// `aviary key ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum KeyCmd {
    /// Set a key.
    Set {
        /// Key name.
        name: String,
        /// Value.
        value: String,
        /// Store the value encrypted (a secret).
        #[arg(long)]
        encrypt: bool,
        /// Expire the key after this many seconds.
        #[arg(long, value_name = "SECONDS")]
        ttl: Option<u64>,
        /// Scope.
        #[arg(long, value_enum, default_value_t)]
        scope: ScopeArg,
    },
    /// Show a key.
    Get {
        /// Key name.
        name: String,
        /// Show a secret's plain value.
        #[arg(long)]
        decrypt: bool,
        /// Scope.
        #[arg(long, value_enum, default_value_t)]
        scope: ScopeArg,
    },
    /// List keys.
    List {
        /// Only keys whose name starts with this.
        #[arg(long)]
        prefix: Option<String>,
        /// Show secrets' plain values.
        #[arg(long)]
        decrypt: bool,
        /// Only this scope.
        #[arg(long, value_enum)]
        scope: Option<ScopeArg>,
    },
    /// Delete a key.
    Delete {
        /// Key name.
        name: String,
        /// Scope.
        #[arg(long, value_enum, default_value_t)]
        scope: ScopeArg,
    },
}

/// `aviary token ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum TokenCmd {
    /// Create a token; its secret is printed once.
    Create {
        /// Token name (e.g. `ci-bot`).
        name: String,
        /// Role (default: the server's default).
        #[arg(long)]
        role: Option<String>,
    },
    /// List tokens.
    List,
    /// Revoke a token.
    Revoke {
        /// Token id or name.
        id_or_name: String,
    },
}

/// `aviary pack ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum PackCmd {
    /// List loaded packs.
    List,
    /// Reload packs from disk (prints diagnostics if they are invalid).
    Reload,
}

/// `aviary audit`.
#[derive(Debug, Clone, clap::Args)]
pub struct AuditArgs {
    /// At most this many records, newest first.
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
}

fn parse_status(s: &str) -> Result<ExecutionStatus, String> {
    ExecutionStatus::parse(s).ok_or_else(|| {
        let all: Vec<&str> = ExecutionStatus::ALL.iter().map(|s| s.as_str()).collect();
        format!("unknown status `{s}`; use one of: {}", all.join(", "))
    })
}

/// Where command output goes (stdout/stderr, or buffers in tests).
pub struct Console<'a> {
    /// Normal output.
    pub out: &'a mut (dyn Write + Send),
    /// Diagnostics and an execution's stderr.
    pub err: &'a mut (dyn Write + Send),
    /// Colour statuses (only when stdout is a terminal).
    pub color: bool,
    /// Print raw JSON instead of tables.
    pub json: bool,
}

impl Console<'_> {
    /// Writes `s` to stdout.
    pub fn print(&mut self, s: &str) -> Result<(), CliError> {
        self.out.write_all(s.as_bytes())?;
        self.out.flush()?;
        Ok(())
    }

    /// Writes `s` to stderr.
    pub fn eprint(&mut self, s: &str) -> Result<(), CliError> {
        self.err.write_all(s.as_bytes())?;
        self.err.flush()?;
        Ok(())
    }

    /// Prints a JSON value, pretty, followed by a newline.
    pub fn print_json(&mut self, v: &serde_json::Value) -> Result<(), CliError> {
        let mut s = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
        s.push('\n');
        self.print(&s)
    }
}

/// Runs a command against the server found by discovery (flags, environment,
/// config file, local admin token); returns the process exit code.
pub async fn run(global: GlobalArgs, cmd: Command) -> Result<i32, CliError> {
    let endpoint = discover(&DiscoveryEnv::from_process(global.url, global.token))?;
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    let color = stdout.is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let mut console = Console {
        out: &mut stdout,
        err: &mut stderr,
        color,
        json: global.json,
    };
    run_with(&endpoint, cmd, &mut console).await
}

/// Like [`run`], but prints an error to stderr (`error: ...`) and returns its
/// exit code, for `main`.
pub async fn run_and_report(global: GlobalArgs, cmd: Command) -> i32 {
    match run(global, cmd).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

/// Runs a command against an explicit endpoint, writing to `console`.
pub async fn run_with(
    endpoint: &Endpoint,
    cmd: Command,
    console: &mut Console<'_>,
) -> Result<i32, CliError> {
    let api = ApiClient::new(endpoint.clone())?;
    match cmd {
        Command::Run(args) => exec::run_action(&api, args, console).await,
        Command::Execution(c) => exec::execution(&api, c, console).await,
        Command::Rule(c) => resources::rule(&api, c, console).await,
        Command::Action(c) => resources::action(&api, c, console).await,
        Command::TriggerInstance(c) => resources::trigger_instance(&api, c, console).await,
        Command::Key(c) => resources::key(&api, c, console).await,
        Command::Token(c) => resources::token(&api, c, console).await,
        Command::Pack(c) => resources::pack(&api, c, console).await,
        Command::Audit(a) => resources::audit(&api, a, console).await,
        Command::Inquiry(c) => exec::inquiry(&api, c, console).await,
        Command::Host(c) => deploy::host(&api, c, console).await,
        Command::Deploy(c) => deploy::deploy(&api, c, console).await,
        Command::Promote(a) => deploy::promote(&api, a, console).await,
        Command::Rollback(a) => deploy::rollback(&api, a, console).await,
        Command::Versions(a) => deploy::versions(&api, a, console).await,
    }
}
