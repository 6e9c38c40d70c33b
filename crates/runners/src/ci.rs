//! The `ci-build` runner: the seed's CI step without Jenkins.
//!
//! It checks a repository out at a commit into a fresh workspace (shelling
//! out to `git`, shallow where possible), checks the conventions
//! (`script/cisetup`, `script/cibuild` and `script/post-inst` exist and are
//! executable), then runs `script/cisetup` and `script/cibuild` there,
//! streaming their output. Every step runs through the shell runner's
//! process handling (own process group, timeout, cancel, secret masking), with
//! every value passed as an argument, never as shell text. The workspace is
//! removed afterwards, whatever happened.

use std::path::{Path, PathBuf};
use std::time::Instant;

use aviary_core::model::ExecutionStatus;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use crate::mask::Masker;
use crate::{LOCAL_SHELL_SCRIPT, OutputEvent, RunOutcome, RunRequest, RunnerError, Stream};

/// The scripts every project must have, by convention.
pub const CONVENTION_SCRIPTS: [&str; 3] = ["script/cisetup", "script/cibuild", "script/post-inst"];

/// Which `git` to run.
const GIT: &str = "/usr/bin/git";

fn param<'a>(req: &'a RunRequest, name: &str) -> Option<&'a str> {
    req.parameters
        .get(name)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

fn invalid(req: &RunRequest, name: &str, reason: impl Into<String>) -> RunnerError {
    RunnerError::InvalidParameter {
        action: req.action_ref.clone(),
        name: name.into(),
        reason: reason.into(),
    }
}

/// A ref or commit safe to hand to git as an argument.
fn safe_ref(s: &str) -> bool {
    !s.starts_with('-')
        && !s.contains("..")
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._/-".contains(c))
}

/// The project name: the `project` parameter, else the repository's last path segment.
fn project_name(req: &RunRequest, repo: &str) -> String {
    if let Some(p) = param(req, "project") {
        return p.to_string();
    }
    repo.trim_end_matches('/')
        .rsplit(['/', ':'])
        .next()
        .unwrap_or(repo)
        .trim_end_matches(".git")
        .to_string()
}

fn send(output: &UnboundedSender<OutputEvent>, line: String) {
    let _ = output.send(OutputEvent {
        stream: Stream::Stdout,
        data: line,
    });
}

/// One program run as a step of the build.
struct Step<'a> {
    req: &'a RunRequest,
    masker: &'a Masker,
    output: &'a UnboundedSender<OutputEvent>,
    cancel: &'a CancellationToken,
    deadline: Instant,
    env: Map<String, Value>,
    steps: Vec<Value>,
}

impl Step<'_> {
    async fn run(&mut self, name: &str, program: &Path, args: &[&str], cwd: &Path) -> RunOutcome {
        let started = Instant::now();
        let remaining = self.deadline.saturating_duration_since(started);
        if remaining.is_zero() {
            return RunOutcome::error(
                ExecutionStatus::Timeout,
                format!("no time left for step '{name}'"),
            );
        }
        let mut parameters = Map::new();
        let mut positions = Vec::new();
        for (i, a) in args.iter().enumerate() {
            let key = format!("arg{i:03}");
            parameters.insert(key.clone(), Value::String((*a).to_string()));
            positions.push((key, i as u32));
        }
        parameters.insert("cwd".into(), Value::String(cwd.display().to_string()));
        parameters.insert("env".into(), Value::Object(self.env.clone()));
        let sub = RunRequest {
            execution_id: self.req.execution_id.clone(),
            action_ref: format!("{} ({name})", self.req.action_ref),
            runner_type: LOCAL_SHELL_SCRIPT.into(),
            entry_point: Some(program.to_path_buf()),
            parameters,
            runner_param_names: vec!["cwd".into(), "env".into()],
            positions,
            secrets: self.req.secrets.clone(),
            timeout: remaining,
            work_dir: cwd.to_path_buf(),
            extra_env: self.req.extra_env.clone(),
        };
        send(
            self.output,
            format!(
                "[aviary] {name}: {} {}\n",
                program.display(),
                args.join(" ")
            ),
        );
        let outcome =
            crate::shell::run(&sub, self.masker, self.output.clone(), self.cancel.clone())
                .await
                .unwrap_or_else(|e| {
                    RunOutcome::error(
                        ExecutionStatus::Failed,
                        self.masker.mask_str(&e.to_string()),
                    )
                });
        self.steps.push(json!({
            "name": name,
            "status": outcome.status.as_str(),
            "return_code": outcome.result.get("return_code").cloned().unwrap_or(Value::Null),
            "duration_ms": started.elapsed().as_millis() as u64,
        }));
        outcome
    }
}

/// What a build or a checkout works on, from the parameters.
struct Target {
    repo: String,
    branch: Option<String>,
    commit: Option<String>,
    depth: u64,
    project: String,
    env: Map<String, Value>,
}

fn target(req: &RunRequest) -> Result<Target, RunnerError> {
    let repo = param(req, "repo")
        .ok_or_else(|| invalid(req, "repo", "a repository URL or path is required"))?;
    if repo.starts_with('-') {
        return Err(invalid(req, "repo", "a repository may not start with '-'"));
    }
    let branch = param(req, "branch").map(|b| b.trim_start_matches("refs/heads/").to_string());
    let commit = param(req, "commit").map(str::to_string);
    if branch.is_none() && commit.is_none() {
        return Err(invalid(req, "branch", "give a branch, a commit, or both"));
    }
    for (name, v) in [("branch", &branch), ("commit", &commit)] {
        if let Some(v) = v
            && !safe_ref(v)
        {
            return Err(invalid(
                req,
                name,
                format!("'{v}' is not a valid git ref or commit"),
            ));
        }
    }
    let depth = req
        .parameters
        .get("depth")
        .and_then(Value::as_u64)
        .unwrap_or(1)
        .max(1);
    let project = project_name(req, repo);
    let mut env = match req.parameters.get("env") {
        Some(Value::Object(m)) => m.clone(),
        _ => Map::new(),
    };
    if let Some(Value::Object(m)) = req.parameters.get("secret_env") {
        for (k, v) in m {
            env.insert(k.clone(), v.clone());
        }
    }
    env.insert("GIT_TERMINAL_PROMPT".into(), json!("0"));
    env.insert(
        "GIT_ALLOW_PROTOCOL".into(),
        json!("file:git:http:https:ssh"),
    );
    env.insert("AVIARY_CI_PROJECT".into(), json!(project));
    env.insert("AVIARY_CI_REPO".into(), json!(repo));
    if let Some(b) = &branch {
        env.insert("AVIARY_CI_BRANCH".into(), json!(b));
    }
    if let Some(c) = &commit {
        env.insert("AVIARY_CI_COMMIT".into(), json!(c));
    }
    Ok(Target {
        repo: repo.to_string(),
        branch,
        commit,
        depth,
        project,
        env,
    })
}

/// A repository checked out by [`checkout`].
#[derive(Debug, Clone)]
pub struct Checkout {
    /// Project name (the `project` parameter, else the repository's name).
    pub project: String,
    /// The repository as given.
    pub repo: String,
    /// Branch, without `refs/heads/`.
    pub branch: Option<String>,
    /// The commit checked out (full id).
    pub commit: Option<String>,
    /// The git steps run: name, status, return code, duration.
    pub steps: Vec<Value>,
}

/// Checks the repository named by the request's `repo`, `branch`, `commit`
/// and `depth` parameters out into `workspace` (created if missing), the way
/// `ci-build` does, streaming git's output. The caller removes `workspace`.
/// On failure, the outcome to report (status and `{"error", "stage"}`).
pub async fn checkout(
    req: &RunRequest,
    workspace: &Path,
    output: UnboundedSender<OutputEvent>,
    cancel: CancellationToken,
) -> Result<Checkout, RunOutcome> {
    let masker = Masker::new(&req.secrets);
    let t = target(req)
        .map_err(|e| RunOutcome::error(ExecutionStatus::Failed, masker.mask_str(&e.to_string())))?;
    std::fs::create_dir_all(workspace).map_err(|e| {
        RunOutcome::error(
            ExecutionStatus::Failed,
            format!("cannot create the workspace {}: {e}", workspace.display()),
        )
    })?;
    let mut step = Step {
        req,
        masker: &masker,
        output: &output,
        cancel: &cancel,
        deadline: Instant::now() + crate::effective_timeout(req),
        env: t.env.clone(),
        steps: Vec::new(),
    };
    match fetch(
        &mut step,
        &t.repo,
        t.branch.as_deref(),
        t.commit.as_deref(),
        t.depth,
        workspace,
    )
    .await
    {
        Ok(head) => Ok(Checkout {
            project: t.project,
            repo: t.repo,
            branch: t.branch,
            commit: head.or(t.commit),
            steps: step.steps,
        }),
        Err((status, stage, message, _)) => {
            let mut o = RunOutcome::error(
                status,
                masker
                    .mask_str(&message.unwrap_or_else(|| format!("checkout {}", status.as_str()))),
            );
            o.result["stage"] = json!(stage);
            o.result["steps"] = Value::Array(step.steps);
            Err(o)
        }
    }
}

/// Runs a CI build to completion.
pub(crate) async fn run(
    req: &RunRequest,
    masker: &Masker,
    output: UnboundedSender<OutputEvent>,
    cancel: CancellationToken,
) -> Result<RunOutcome, RunnerError> {
    let started = Instant::now();
    let Target {
        repo,
        branch,
        commit,
        depth,
        project,
        env,
    } = target(req)?;
    let repo = repo.as_str();
    let workspace: PathBuf = req.work_dir.join("workspace");
    let timeout = crate::effective_timeout(req);
    let mut step = Step {
        req,
        masker,
        output: &output,
        cancel: &cancel,
        deadline: started + timeout,
        env,
        steps: Vec::new(),
    };
    std::fs::create_dir_all(&workspace).map_err(|e| invalid(req, "work_dir", e.to_string()))?;
    let outcome = build(
        &mut step,
        repo,
        branch.as_deref(),
        commit.as_deref(),
        depth,
        &workspace,
    )
    .await;
    let _ = std::fs::remove_dir_all(&workspace);

    let (status, stage, message, head) = outcome;
    let mut result = json!({
        "project": project,
        "repo": repo,
        "branch": branch,
        "commit": head.or(commit),
        "status": status.as_str(),
        "stage": stage,
        "duration_ms": started.elapsed().as_millis() as u64,
        "steps": step.steps,
    });
    if let Some(m) = message {
        result["error"] = Value::String(masker.mask_str(&m));
    }
    Ok(RunOutcome { status, result })
}

/// How a build ended: status, stage reached, error message, commit checked out.
type Ended = (
    ExecutionStatus,
    &'static str,
    Option<String>,
    Option<String>,
);

/// Checkout, conventions, cisetup, cibuild.
async fn build(
    step: &mut Step<'_>,
    repo: &str,
    branch: Option<&str>,
    commit: Option<&str>,
    depth: u64,
    ws: &Path,
) -> Ended {
    let head = match fetch(step, repo, branch, commit, depth, ws).await {
        Ok(head) => head,
        Err(ended) => return ended,
    };
    scripts(step, ws, head).await
}

/// Fetches and checks out; the commit checked out, or how it failed.
async fn fetch(
    step: &mut Step<'_>,
    repo: &str,
    branch: Option<&str>,
    commit: Option<&str>,
    depth: u64,
    ws: &Path,
) -> Result<Option<String>, Ended> {
    let git = Path::new(GIT);
    let depth_arg = format!("--depth={depth}");
    let o = step.run("git init", git, &["init", "-q", "."], ws).await;
    if o.status != ExecutionStatus::Succeeded {
        return Err((o.status, "checkout", Some("git init failed".into()), None));
    }
    // Fetch the branch (shallow), then make sure the commit is there.
    let mut fetched = false;
    if let Some(b) = branch {
        let refspec = format!("refs/heads/{b}");
        let o = step
            .run(
                "git fetch",
                git,
                &["fetch", "-q", "--no-tags", &depth_arg, "--", repo, &refspec],
                ws,
            )
            .await;
        if matches!(
            o.status,
            ExecutionStatus::Timeout | ExecutionStatus::Canceled
        ) {
            return Err((o.status, "checkout", None, None));
        }
        fetched = o.status == ExecutionStatus::Succeeded;
    }
    let target = match commit {
        Some(c) => {
            let present = step
                .run(
                    "git cat-file",
                    git,
                    &["cat-file", "-e", &format!("{c}^{{commit}}")],
                    ws,
                )
                .await
                .status
                == ExecutionStatus::Succeeded;
            if !present {
                let o = step
                    .run(
                        "git fetch commit",
                        git,
                        &["fetch", "-q", "--no-tags", &depth_arg, "--", repo, c],
                        ws,
                    )
                    .await;
                if o.status != ExecutionStatus::Succeeded && fetched {
                    // Not fetchable by id: deepen the branch until it is there.
                    let refspec = format!("refs/heads/{}", branch.unwrap_or_default());
                    step.run(
                        "git fetch (full)",
                        git,
                        &[
                            "fetch",
                            "-q",
                            "--no-tags",
                            "--unshallow",
                            "--",
                            repo,
                            &refspec,
                        ],
                        ws,
                    )
                    .await;
                }
            }
            c.to_string()
        }
        None if fetched => "FETCH_HEAD".to_string(),
        None => {
            return Err((
                ExecutionStatus::Failed,
                "checkout",
                Some(format!(
                    "cannot fetch branch '{}' from {repo}",
                    branch.unwrap_or_default()
                )),
                None,
            ));
        }
    };
    let o = step
        .run(
            "git checkout",
            git,
            &["checkout", "-q", "--detach", &target],
            ws,
        )
        .await;
    if o.status != ExecutionStatus::Succeeded {
        let msg = format!(
            "cannot check out {target} from {repo}: {}",
            o.result.get("stderr").and_then(Value::as_str).unwrap_or("")
        );
        return Err((
            if o.status == ExecutionStatus::Succeeded {
                ExecutionStatus::Failed
            } else {
                o.status
            },
            "checkout",
            Some(msg),
            None,
        ));
    }
    let head = step
        .run("git rev-parse", git, &["rev-parse", "HEAD"], ws)
        .await
        .result
        .get("stdout")
        .and_then(Value::as_str)
        .map(|s| s.trim().to_string());

    Ok(head)
}

/// Conventions, then cisetup and cibuild.
async fn scripts(step: &mut Step<'_>, ws: &Path, head: Option<String>) -> Ended {
    // Conventions first: every script must exist and be executable.
    let mut missing = Vec::new();
    for script in CONVENTION_SCRIPTS {
        let path = ws.join(script);
        let executable = std::fs::metadata(&path)
            .map(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.is_file() && m.permissions().mode() & 0o111 != 0
            })
            .unwrap_or(false);
        if !executable {
            missing.push(if path.exists() {
                format!("{script} (not executable: chmod +x it and commit)")
            } else {
                format!("{script} (missing)")
            });
        }
    }
    if !missing.is_empty() {
        let msg = format!(
            "the project does not follow the conventions: {}. Every project needs script/cisetup, script/cibuild and script/post-inst, executable (each may just `exit 0`)",
            missing.join(", ")
        );
        send(step.output, format!("[aviary] {msg}\n"));
        return (ExecutionStatus::Failed, "conventions", Some(msg), head);
    }
    for (stage, script) in [("cisetup", "script/cisetup"), ("cibuild", "script/cibuild")] {
        let o = step.run(stage, &ws.join(script), &[], ws).await;
        if o.status != ExecutionStatus::Succeeded {
            let msg = match o.status {
                ExecutionStatus::Timeout => format!("{script} ran out of time"),
                ExecutionStatus::Canceled => format!("{script} was canceled"),
                _ => format!(
                    "{script} failed with exit code {}",
                    o.result.get("return_code").cloned().unwrap_or(Value::Null)
                ),
            };
            return (o.status, stage, Some(msg), head);
        }
    }
    (ExecutionStatus::Succeeded, "done", None, head)
}
