//! `aviary git-hook`: a self-hosted git server's `post-receive` hook that
//! tells Aviary about pushes, the way GitHub's push webhook does.
//!
//! `aviary git-hook install <bare-repo>` writes `hooks/post-receive`, which
//! runs `aviary git-hook post-receive` with the repository's settings. That
//! command reads git's `<old> <new> <ref>` lines on stdin and posts, for each
//! updated ref, a GitHub-shaped push payload (`ref`, `before`, `after`,
//! `created`, `deleted`, `repository.{name,full_name,clone_url}`,
//! `pusher.name`, `head_commit`) to `POST /api/v1/webhooks/<url>` with
//! `X-GitHub-Event: push`, a fresh `X-GitHub-Delivery` and, when a secret is
//! configured, `X-Hub-Signature-256`. The same rules therefore serve GitHub
//! and a bare repository on any machine.
//!
//! The push itself has already succeeded when the hook runs, so a delivery
//! failure never fails the push: it is retried a few times, then reported
//! with the exact command that redelivers it.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// Marker line that identifies a hook written by Aviary (so reinstalling replaces it).
const MARKER: &str = "# Written by `aviary git-hook install`";

/// The all-zero object id git uses for "no commit" (branch created or deleted).
const ZERO: &str = "0000000000000000000000000000000000000000";

/// Where the hook sends its pushes and how it authenticates.
#[derive(clap::Args, Clone, Debug)]
pub struct HookTarget {
    /// Aviary server URL.
    #[arg(long, env = "AVIARY_URL", default_value = "http://127.0.0.1:9700")]
    pub server: String,
    /// Webhook URL name: pushes go to /api/v1/webhooks/<url>.
    #[arg(long = "webhook", default_value = "github")]
    pub webhook: String,
    /// File holding the webhook secret (signs X-Hub-Signature-256, as GitHub does).
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// File holding an API token, for a webhook without a secret.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

/// `aviary git-hook ...`
#[derive(clap::Subcommand)]
pub enum GitHookCommand {
    /// Install a post-receive hook into a bare repository.
    Install {
        /// The bare repository (the folder holding `hooks/`).
        repo: PathBuf,
        #[command(flatten)]
        target: HookTarget,
        /// Repository name in the payload (default: the folder name without `.git`).
        #[arg(long)]
        name: Option<String>,
        /// Replace an existing post-receive hook that Aviary did not write.
        #[arg(long)]
        force: bool,
    },
    /// Run as the hook: read `<old> <new> <ref>` lines on stdin and post them.
    PostReceive {
        #[command(flatten)]
        target: HookTarget,
        /// Repository name in the payload.
        #[arg(long)]
        name: String,
        /// Clone URL in the payload (default: the repository's absolute path).
        #[arg(long)]
        clone_url: Option<String>,
    },
}

/// Runs a `git-hook` subcommand.
pub async fn run(cmd: GitHookCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        GitHookCommand::Install {
            repo,
            target,
            name,
            force,
        } => install(&repo, &target, name, force),
        GitHookCommand::PostReceive {
            target,
            name,
            clone_url,
        } => post_receive(&target, &name, clone_url).await,
    }
}

/// Quotes a value for a POSIX shell: single quotes, embedded ones escaped.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

pub fn install(
    repo: &Path,
    target: &HookTarget,
    name: Option<String>,
    force: bool,
) -> anyhow::Result<ExitCode> {
    let repo = repo
        .canonicalize()
        .with_context(|| format!("{}: no such repository", repo.display()))?;
    let hooks = repo.join("hooks");
    if !repo.join("HEAD").is_file() || !repo.join("objects").is_dir() {
        bail!(
            "{}: not a bare git repository (no HEAD and objects/); create one with `git init --bare {}`",
            repo.display(),
            repo.display()
        );
    }
    std::fs::create_dir_all(&hooks).with_context(|| format!("creating {}", hooks.display()))?;
    let hook = hooks.join("post-receive");
    if let Ok(existing) = std::fs::read_to_string(&hook)
        && !existing.contains(MARKER)
        && !force
    {
        bail!(
            "{}: a post-receive hook already exists and Aviary did not write it; \
             pass --force to replace it (or call `aviary git-hook post-receive` from it)",
            hook.display()
        );
    }
    let name = match name {
        Some(n) => n,
        None => default_name(&repo),
    };
    for file in [&target.secret_file, &target.token_file]
        .into_iter()
        .flatten()
    {
        if !file.is_file() {
            bail!(
                "{}: no such file; write the secret or token there first (mode 0600)",
                file.display()
            );
        }
    }
    let exe = std::env::current_exe().context("cannot find the aviary executable")?;
    let mut argv = vec![
        exe.display().to_string(),
        "git-hook".into(),
        "post-receive".into(),
        "--server".into(),
        target.server.clone(),
        "--webhook".into(),
        target.webhook.clone(),
        "--name".into(),
        name.clone(),
        "--clone-url".into(),
        repo.display().to_string(),
    ];
    if let Some(f) = &target.secret_file {
        argv.push("--secret-file".into());
        argv.push(absolute(f)?.display().to_string());
    }
    if let Some(f) = &target.token_file {
        argv.push("--token-file".into());
        argv.push(absolute(f)?.display().to_string());
    }
    let line: Vec<String> = argv.iter().map(|a| sh_quote(a)).collect();
    let script = format!(
        "#!/bin/sh\n{MARKER}: tells Aviary about pushes.\nexec {}\n",
        line.join(" ")
    );
    let tmp = hooks.join(".post-receive.aviary-tmp");
    std::fs::write(&tmp, script).with_context(|| format!("writing {}", tmp.display()))?;
    set_executable(&tmp)?;
    std::fs::rename(&tmp, &hook).with_context(|| format!("installing {}", hook.display()))?;
    println!(
        "installed {} (pushes to {} go to {}/api/v1/webhooks/{} as {name})",
        hook.display(),
        repo.display(),
        target.server.trim_end_matches('/'),
        target.webhook
    );
    Ok(ExitCode::SUCCESS)
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    p.canonicalize()
        .with_context(|| format!("{}: cannot resolve", p.display()))
}

#[cfg(unix)]
fn set_executable(p: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod {}", p.display()))
}

fn default_name(repo: &Path) -> String {
    let base = repo
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "repo".into());
    base.strip_suffix(".git").unwrap_or(&base).to_string()
}

/// One ref update as git gives it to post-receive.
#[derive(Debug, PartialEq, Eq)]
struct RefUpdate {
    old: String,
    new: String,
    refname: String,
}

fn parse_updates(input: impl BufRead) -> anyhow::Result<Vec<RefUpdate>> {
    let mut out = Vec::new();
    for (n, line) in input.lines().enumerate() {
        let line = line.context("reading the ref updates on stdin")?;
        if line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(old), Some(new), Some(refname), None) => out.push(RefUpdate {
                old: old.into(),
                new: new.into(),
                refname: refname.into(),
            }),
            _ => bail!(
                "stdin line {}: expected `<old> <new> <ref>` as git gives post-receive, got {line:?}",
                n + 1
            ),
        }
    }
    Ok(out)
}

/// Reads `git log -1` facts about a commit in the current repository (the hook runs in it).
fn head_commit(id: &str) -> Value {
    let out = Command::new("git")
        .args([
            "log",
            "-1",
            "--format=%H%x00%an%x00%ae%x00%cI%x00%B",
            id,
            "--",
        ])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            let mut f = text.splitn(5, '\0');
            let (h, an, ae, at, msg) = (
                f.next().unwrap_or(id),
                f.next().unwrap_or(""),
                f.next().unwrap_or(""),
                f.next().unwrap_or(""),
                f.next().unwrap_or("").trim_end(),
            );
            json!({"id": h, "message": msg, "timestamp": at,
                   "author": {"name": an, "email": ae}})
        }
        _ => json!({"id": id}),
    }
}

fn payload(u: &RefUpdate, name: &str, clone_url: &str, pusher: &str) -> Value {
    let created = u.old == ZERO;
    let deleted = u.new == ZERO;
    json!({
        "ref": u.refname,
        "before": u.old,
        "after": u.new,
        "created": created,
        "deleted": deleted,
        "forced": false,
        "repository": {"name": name, "full_name": name, "clone_url": clone_url, "url": clone_url},
        "pusher": {"name": pusher},
        "head_commit": if deleted { Value::Null } else { head_commit(&u.new) },
    })
}

fn read_secret(path: &Path) -> anyhow::Result<String> {
    let s = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(s.trim_end_matches(['\n', '\r']).to_string())
}

async fn post_receive(
    target: &HookTarget,
    name: &str,
    clone_url: Option<String>,
) -> anyhow::Result<ExitCode> {
    let updates = parse_updates(std::io::stdin().lock())?;
    let clone_url = match clone_url {
        Some(u) => u,
        None => std::env::current_dir()
            .context("cannot read the repository folder")?
            .display()
            .to_string(),
    };
    let pusher = std::env::var("GIT_PUSHER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "git".into());
    let secret = target.secret_file.as_deref().map(read_secret).transpose()?;
    let token = target.token_file.as_deref().map(read_secret).transpose()?;
    let url = format!(
        "{}/api/v1/webhooks/{}",
        target.server.trim_end_matches('/'),
        target.webhook
    );
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .context("cannot build the HTTP client")?;
    let mut failed = 0;
    for u in &updates {
        let body = serde_json::to_vec(&payload(u, name, &clone_url, &pusher))
            .context("cannot encode the payload")?;
        let delivery = uuid::Uuid::new_v4().to_string();
        let mut last_err = String::new();
        let mut delivered = false;
        for attempt in 0..4u32 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
            }
            let mut req = client
                .post(&url)
                .header("Content-Type", "application/json")
                .header("X-GitHub-Event", "push")
                .header("X-GitHub-Delivery", &delivery)
                .header("User-Agent", "aviary-git-hook");
            if let Some(s) = &secret {
                req = req.header(
                    "X-Hub-Signature-256",
                    aviary_core::signature::github_signature(s.as_bytes(), &body),
                );
            }
            if let Some(t) = &token {
                req = req.bearer_auth(t);
            }
            match req.body(body.clone()).send().await {
                Ok(r) if r.status().is_success() => {
                    delivered = true;
                    break;
                }
                Ok(r) => {
                    let status = r.status();
                    let text = r.text().await.unwrap_or_default();
                    last_err = format!("{status}: {}", text.trim());
                    if status.is_client_error() {
                        break; // a refusal will not change on retry
                    }
                }
                Err(e) => last_err = e.to_string(),
            }
        }
        if delivered {
            eprintln!("aviary: {} {} -> {url}", u.refname, short(&u.new));
        } else {
            failed += 1;
            eprintln!(
                "aviary: could not deliver {} {} to {url}: {last_err}\n\
                 aviary: the push itself succeeded; redeliver with:\n  echo '{} {} {}' | GIT_DIR={} {} git-hook post-receive --server {} --webhook {} --name {}",
                u.refname,
                short(&u.new),
                u.old,
                u.new,
                u.refname,
                sh_quote(&clone_url),
                std::env::current_exe()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|_| "aviary".into()),
                sh_quote(&target.server),
                sh_quote(&target.webhook),
                sh_quote(name),
            );
        }
    }
    // Never fail the push: it is already in the repository.
    let _ = failed;
    Ok(ExitCode::SUCCESS)
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_git_ref_lines() {
        let input = format!("{ZERO} abc refs/heads/main\n\nabc {ZERO} refs/heads/old\n");
        let u = parse_updates(input.as_bytes()).expect("parse");
        assert_eq!(u.len(), 2);
        assert_eq!(u[0].refname, "refs/heads/main");
        let p = payload(&u[1], "app", "/srv/app.git", "alice");
        assert_eq!(p["deleted"], true);
        assert_eq!(p["created"], false);
        assert!(p["head_commit"].is_null());
        assert!(parse_updates("only two".as_bytes()).is_err());
    }

    #[test]
    fn quotes_for_the_shell() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn default_name_drops_dot_git() {
        assert_eq!(default_name(Path::new("/srv/seatshare.git")), "seatshare");
    }
}
