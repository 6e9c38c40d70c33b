//! Reading packs from disk into a validated [`Registry`]: the set of actions
//! and rules the engine runs with. A new registry replaces the old one only
//! when every pack in it is valid.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aviary_core::action::ActionMeta;
use aviary_core::criteria::CompiledCriteria;
use aviary_core::diagnostic::{Diagnostic, Diagnostics};
use aviary_core::model::WEBHOOK_TRIGGER;
use aviary_core::pack::{Pack, SourceFile, core_pack, load_pack};
use aviary_core::rule::Rule;
use aviary_workflow::spec::{WorkflowSpec, parse_workflow};
use serde::Serialize;

/// Files larger than this are not read as pack files.
const MAX_PACK_FILE_BYTES: u64 = 4 * 1024 * 1024;
/// Folders deeper than this inside a pack are not walked.
const MAX_PACK_DEPTH: usize = 8;

/// A pack as loaded, with where it came from.
#[derive(Debug, Clone, Serialize)]
pub struct LoadedPack {
    /// Pack name (its ref).
    pub name: String,
    /// Version from pack.yaml.
    pub version: String,
    /// Description from pack.yaml.
    pub description: String,
    /// Folder it was read from (`None` for the built-in core pack).
    pub path: Option<PathBuf>,
    /// Number of actions.
    pub actions: usize,
    /// Number of rules.
    pub rules: usize,
}

/// The validated, immutable set of packs, actions and rules in effect.
#[derive(Debug, Default)]
pub struct Registry {
    /// Packs in load order (core first).
    pub packs: Vec<LoadedPack>,
    /// Actions by reference.
    pub actions: HashMap<String, Arc<ActionMeta>>,
    /// Pack folders by pack name (to resolve entry points).
    pub pack_dirs: HashMap<String, PathBuf>,
    /// Every rule, in load order.
    pub rules: Vec<Arc<Rule>>,
    /// Each rule's criteria, compiled once (same order as `rules`).
    pub compiled: Vec<CompiledCriteria>,
    /// Rules by trigger type (indexes into `rules`).
    pub by_trigger: HashMap<String, Vec<usize>>,
    /// Webhook rules by webhook URL (indexes into `rules`).
    pub webhooks: HashMap<String, Vec<usize>>,
    /// Parsed workflow definitions of `orquesta` actions, by action reference.
    pub workflows: HashMap<String, Arc<WorkflowSpec>>,
    /// Each pack's `config.yaml` settings (`config_context` in templates), by pack name.
    pub configs: HashMap<String, serde_json::Value>,
}

/// Why packs could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PackLoadError {
    /// A folder or file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// One or more files are invalid; every problem is listed.
    #[error("{0}")]
    Invalid(Diagnostics),
}

impl Registry {
    /// Loads the built-in core pack plus every pack found under `roots`
    /// (each root is a pack folder or a folder of packs). Collects every
    /// error of every pack before failing.
    pub fn load(roots: &[PathBuf]) -> Result<Self, PackLoadError> {
        let mut packs: Vec<(Pack, Option<PathBuf>)> = vec![(core_pack(), None)];
        let mut problems = Vec::new();
        for dir in discover_pack_dirs(roots)? {
            match read_pack_dir(&dir)? {
                Ok(pack) => packs.push((pack, Some(dir))),
                Err(diags) => problems.extend(diags.0),
            }
        }
        let registry = Self::assemble(packs, &mut problems);
        if problems.is_empty() {
            Ok(registry)
        } else {
            Err(PackLoadError::Invalid(Diagnostics(problems)))
        }
    }

    fn assemble(packs: Vec<(Pack, Option<PathBuf>)>, problems: &mut Vec<Diagnostic>) -> Self {
        let mut reg = Registry::default();
        let mut seen_packs: HashMap<String, Option<PathBuf>> = HashMap::new();
        for (pack, path) in packs {
            let name = pack.meta.name.clone();
            if let Some(first) = seen_packs.get(&name) {
                problems.push(Diagnostic {
                    file: path
                        .as_ref()
                        .map(|p| p.join("pack.yaml").display().to_string())
                        .unwrap_or_default(),
                    line: 1,
                    column: 1,
                    field: "name".into(),
                    message: format!("pack '{name}' is defined twice"),
                    hint: Some(format!(
                        "the first one is at {}; rename one of them",
                        first
                            .as_ref()
                            .map(|p| p.display().to_string())
                            .unwrap_or_else(|| "built in".into())
                    )),
                });
                continue;
            }
            seen_packs.insert(name.clone(), path.clone());
            reg.packs.push(LoadedPack {
                name: name.clone(),
                version: pack.meta.version.clone(),
                description: pack.meta.description.clone(),
                path: path.clone(),
                actions: pack.actions.len(),
                rules: pack.rules.len(),
            });
            if let Some(p) = &path {
                reg.pack_dirs.insert(name.clone(), p.clone());
            }
            reg.configs.insert(name.clone(), pack.config);
            for action in pack.actions {
                reg.actions.insert(action.reference(), Arc::new(action));
            }
            for rule in pack.rules {
                reg.rules.push(Arc::new(rule));
            }
        }
        // Cross-pack checks: every rule's action exists.
        for rule in &reg.rules {
            if !reg.actions.contains_key(&rule.action.reference) {
                let (file, line, column) = locate_in_rule_file(&reg, rule, &rule.action.reference);
                let mut known: Vec<&String> = reg.actions.keys().collect();
                known.sort();
                problems.push(Diagnostic {
                    file,
                    line,
                    column,
                    field: "action.ref".into(),
                    message: format!(
                        "rule '{}' runs action '{}', which no loaded pack defines",
                        rule.reference(),
                        rule.action.reference
                    ),
                    hint: Some(format!(
                        "known actions: {}",
                        known
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                });
            }
        }
        load_workflows(&mut reg, problems);
        for rule in &reg.rules {
            let compiled = CompiledCriteria::new(&rule.criteria).unwrap_or_else(|e| {
                problems.push(Diagnostic {
                    file: rule.file.clone().unwrap_or_default(),
                    line: 1,
                    column: 1,
                    field: "criteria".into(),
                    message: e.to_string(),
                    hint: None,
                });
                CompiledCriteria::default()
            });
            reg.compiled.push(compiled);
        }
        for (idx, rule) in reg.rules.iter().enumerate() {
            reg.by_trigger
                .entry(rule.trigger.kind.clone())
                .or_default()
                .push(idx);
            if rule.trigger.kind == WEBHOOK_TRIGGER
                && let Some(url) = rule.trigger.parameters.get("url").and_then(|u| u.as_str())
            {
                reg.webhooks
                    .entry(normalize_webhook_url(url))
                    .or_default()
                    .push(idx);
            }
        }
        reg
    }

    /// The rule with this reference.
    pub fn rule(&self, reference: &str) -> Option<&Arc<Rule>> {
        self.rules.iter().find(|r| r.reference() == reference)
    }
}

/// Parses the workflow file of every `orquesta` action (its entry point,
/// relative to the pack's `actions/` folder) into `reg.workflows`, and checks
/// that every action its tasks run exists. Problems carry the file's full path.
fn load_workflows(reg: &mut Registry, problems: &mut Vec<Diagnostic>) {
    let mut refs: Vec<String> = reg
        .actions
        .values()
        .filter(|a| a.runner_type == "orquesta")
        .map(|a| a.reference())
        .collect();
    refs.sort();
    for reference in refs {
        let Some(action) = reg.actions.get(&reference).cloned() else {
            continue;
        };
        let entry = action.entry_point.clone().unwrap_or_default();
        let Some(dir) = reg.pack_dirs.get(&action.pack) else {
            continue;
        };
        let path = dir.join("actions").join(&entry);
        let file = path.display().to_string();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                problems.push(Diagnostic {
                    file: action
                        .file
                        .as_ref()
                        .map(|f| dir.join(f).display().to_string())
                        .unwrap_or_else(|| file.clone()),
                    line: 1,
                    column: 1,
                    field: "entry_point".into(),
                    message: format!(
                        "workflow action '{reference}' cannot read its workflow file {file}: {e}"
                    ),
                    hint: Some(
                        "entry_point is relative to the pack's actions/ folder, e.g. workflows/deploy.yaml"
                            .into(),
                    ),
                });
                continue;
            }
        };
        match parse_workflow(&file, &text) {
            Ok(mut spec) => {
                let mut shell_tasks = Vec::new();
                for (task_name, task) in &spec.tasks {
                    let Some(target) = &task.action else {
                        continue;
                    };
                    if target.contains("<%") || target.contains("{{") {
                        continue;
                    }
                    // Values must not be spliced into shell text: expressions in a
                    // shell command's `cmd` render into environment variables.
                    if let Some(action) = reg.actions.get(target)
                        && matches!(
                            action.runner_type.as_str(),
                            "local-shell-cmd" | "remote-shell-cmd"
                        )
                        && task.input.get("cmd").is_some()
                    {
                        shell_tasks.push(task_name.clone());
                    }
                    if !reg.actions.contains_key(target) {
                        let (line, column) = locate_task_action(&text, task_name, target);
                        problems.push(Diagnostic {
                            file: file.clone(),
                            line,
                            column,
                            field: format!("tasks.{task_name}.action"),
                            message: format!(
                                "task '{task_name}' of workflow '{reference}' runs action '{target}', which no loaded pack defines"
                            ),
                            hint: Some(
                                "check the spelling (pack.action) or install the pack that defines it"
                                    .into(),
                            ),
                        });
                    }
                }
                spec.shell_cmd_tasks.extend(shell_tasks);
                reg.workflows.insert(reference, Arc::new(spec));
            }
            Err(diags) => problems.extend(diags.0),
        }
    }
}

/// Line and column of `target` after the task's key in a workflow file.
fn locate_task_action(text: &str, task: &str, target: &str) -> (usize, usize) {
    let mut in_task = false;
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with(&format!("{task}:")) {
            in_task = true;
        }
        if in_task && let Some(col) = line.find(target) {
            return (i + 1, col + 1);
        }
    }
    (1, 1)
}

/// Webhook URLs are matched without leading or trailing slashes.
pub fn normalize_webhook_url(url: &str) -> String {
    url.trim_matches('/').to_string()
}

fn locate_in_rule_file(reg: &Registry, rule: &Rule, needle: &str) -> (String, usize, usize) {
    let Some(rel) = &rule.file else {
        return (String::new(), 1, 1);
    };
    let full = reg
        .pack_dirs
        .get(&rule.pack)
        .map(|d| d.join(rel))
        .unwrap_or_else(|| PathBuf::from(rel));
    let text = std::fs::read_to_string(&full).unwrap_or_default();
    for (i, line) in text.lines().enumerate() {
        if let Some(col) = line.find(needle) {
            return (full.display().to_string(), i + 1, col + 1);
        }
    }
    (full.display().to_string(), 1, 1)
}

/// Expands roots into pack folders (those containing `pack.yaml`), sorted.
pub fn discover_pack_dirs(roots: &[PathBuf]) -> Result<Vec<PathBuf>, PackLoadError> {
    let mut out = Vec::new();
    for root in roots {
        if root.join("pack.yaml").is_file() {
            out.push(root.clone());
            continue;
        }
        let entries = std::fs::read_dir(root).map_err(|source| PackLoadError::Io {
            path: root.clone(),
            source,
        })?;
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.join("pack.yaml").is_file())
            .collect();
        found.sort();
        out.extend(found);
    }
    Ok(out)
}

/// Reads one pack folder: every YAML file's text, and every file's path.
/// Symbolic links are not followed, so nothing outside the pack is read.
pub fn read_pack_dir(dir: &Path) -> Result<Result<Pack, Diagnostics>, PackLoadError> {
    let mut files = Vec::new();
    let mut paths = BTreeSet::new();
    walk(dir, dir, 0, &mut files, &mut paths)?;
    let dir_name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "pack".into());
    Ok(load_pack(&dir_name, &files, &paths).map_err(|mut diags| {
        for d in &mut diags.0 {
            if !d.file.starts_with('/') {
                d.file = dir.join(&d.file).display().to_string();
            }
        }
        diags
    }))
}

fn walk(
    root: &Path,
    dir: &Path,
    depth: usize,
    files: &mut Vec<SourceFile>,
    paths: &mut BTreeSet<String>,
) -> Result<(), PackLoadError> {
    if depth > MAX_PACK_DEPTH {
        return Ok(());
    }
    let io = |source| PackLoadError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok())
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        if meta.is_dir() {
            walk(root, &path, depth + 1, files, paths)?;
            continue;
        }
        let Ok(rel) = path.strip_prefix(root) else {
            continue;
        };
        let rel = rel.to_string_lossy().into_owned();
        if meta.file_type().is_symlink() {
            // A link is recorded only if it resolves inside the pack.
            if let (Ok(target), Ok(root_real)) = (path.canonicalize(), root.canonicalize())
                && target.starts_with(&root_real)
            {
                paths.insert(rel);
            }
            continue;
        }
        paths.insert(rel.clone());
        let is_yaml = name.ends_with(".yaml") || name.ends_with(".yml");
        if is_yaml && meta.len() <= MAX_PACK_FILE_BYTES {
            let text = std::fs::read_to_string(&path).map_err(|source| PackLoadError::Io {
                path: path.clone(),
                source,
            })?;
            files.push(SourceFile { path: rel, text });
        }
    }
    Ok(())
}
