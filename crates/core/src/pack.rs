//! Packs (StackStorm layout): `pack.yaml`, `actions/*.yaml`, `rules/*.yaml`.
//!
//! [`load_pack`] validates every file of a pack and reports every problem of
//! every file at once, each at its line and column. The caller reads the
//! files; this module only sees their text.

use crate::action::{ActionMeta, parse_action};
use crate::diagnostic::{Diagnostic, Diagnostics, FileCheck, YamlValue, parse_yaml};
use crate::rule::{Rule, parse_rule};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// One file of a pack, as read by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    /// Path relative to the pack directory, `/`-separated (`actions/build.yaml`).
    pub path: String,
    /// The file's text.
    pub text: String,
}

/// A loaded, valid pack.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Pack {
    /// `pack.yaml`.
    pub meta: PackMeta,
    /// Actions, sorted by file path.
    pub actions: Vec<ActionMeta>,
    /// Rules, sorted by file path.
    pub rules: Vec<Rule>,
}

/// The pack's `pack.yaml`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PackMeta {
    /// Pack reference: `ref`, else `name`, else the folder's name.
    pub name: String,
    /// Version (a string, e.g. `1.0.2`).
    pub version: String,
    /// Human description.
    pub description: String,
    /// Author.
    pub author: Option<String>,
    /// Author's email.
    pub email: Option<String>,
}

/// What kind of pack file a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileKind {
    PackMeta,
    Action,
    Rule,
}

fn classify(path: &str) -> Option<FileKind> {
    let path = path.strip_prefix("./").unwrap_or(path);
    let is_yaml = |name: &str| name.ends_with(".yaml") || name.ends_with(".yml");
    let parts: Vec<&str> = path.split('/').collect();
    match parts.as_slice() {
        ["pack.yaml"] | ["pack.yml"] => Some(FileKind::PackMeta),
        ["actions", name] if is_yaml(name) => Some(FileKind::Action),
        ["rules", name] if is_yaml(name) => Some(FileKind::Rule),
        _ => None,
    }
}

/// Whether `s` is a valid pack ref (StackStorm: lowercase letters, digits, `_`).
fn is_pack_ref(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn parse_pack_meta(dir_name: &str, file: &str, text: &str) -> (Option<PackMeta>, Vec<Diagnostic>) {
    let doc = match parse_yaml(file, text) {
        Ok(doc) => doc,
        Err(d) => return (None, vec![d]),
    };
    let mut check = FileCheck::new(file);
    if doc.as_map().is_none() {
        check.error(
            &doc,
            "(document)",
            format!("expected a mapping, found {}", doc.kind_name()),
            Some("pack.yaml needs at least `name:` and `version:`".to_string()),
        );
        return (None, check.out);
    }
    let reference = check.string(&doc, "ref", "", false);
    let name = check.string(&doc, "name", "", false);
    let pack_ref = match (&reference, &name) {
        (Some((r, node)), _) => {
            if !is_pack_ref(r) {
                check.error(
                    node,
                    "ref",
                    format!("invalid pack ref '{r}'"),
                    Some("use lowercase letters, digits and '_' only".to_string()),
                );
            }
            r.clone()
        }
        (None, Some((n, node))) => {
            if !is_pack_ref(n) {
                check.error(
                    node,
                    "name",
                    format!("pack name '{n}' is not a valid pack ref"),
                    Some(
                        "add `ref: <lowercase letters, digits, _>` or rename the pack".to_string(),
                    ),
                );
            }
            n.clone()
        }
        (None, None) => {
            if !is_pack_ref(dir_name) {
                check.error(
                    &doc,
                    "ref",
                    format!("pack folder name '{dir_name}' is not a valid pack ref"),
                    Some("add `ref: <lowercase letters, digits, _>` to pack.yaml".to_string()),
                );
            }
            dir_name.to_string()
        }
    };
    let version = match doc.get("version") {
        None => {
            check.error(
                &doc,
                "version",
                "missing required field 'version'".to_string(),
                Some("add `version: \"0.1.0\"`".to_string()),
            );
            String::new()
        }
        Some(node) => match &node.value {
            YamlValue::String(s) => s.clone(),
            _ => {
                check.error(
                    node,
                    "version",
                    format!("expected a string, found {}", node.kind_name()),
                    Some(format!("quote it: `version: \"{}\"`", node.key_string())),
                );
                String::new()
            }
        },
    };
    let description = check
        .string(&doc, "description", "", false)
        .map(|(s, _)| s)
        .unwrap_or_default();
    let author = check.string(&doc, "author", "", false).map(|(s, _)| s);
    let email = check.string(&doc, "email", "", false).map(|(s, _)| s);
    if !check.out.is_empty() {
        return (None, check.out);
    }
    (
        Some(PackMeta {
            name: pack_ref,
            version,
            description,
            author,
            email,
        }),
        check.out,
    )
}

/// Loads and validates a pack.
///
/// `dir_name` is the pack folder's name (the pack ref when pack.yaml has no
/// `ref`/`name`). `files` are every `*.yaml`/`*.yml` file under the pack
/// directory; only `pack.yaml`, `actions/*.yaml` and `rules/*.yaml` are read
/// (workflow bodies under `actions/workflows/`, sensors, aliases and policies
/// are skipped). `existing_paths` are all files of the pack (relative paths),
/// used to check action entry points.
///
/// Returns every error of every file at once, sorted by file and position.
pub fn load_pack(
    dir_name: &str,
    files: &[SourceFile],
    existing_paths: &BTreeSet<String>,
) -> Result<Pack, Diagnostics> {
    let mut diags: Vec<Diagnostic> = Vec::new();
    let mut sorted: Vec<(&SourceFile, FileKind)> = files
        .iter()
        .filter_map(|f| classify(&f.path).map(|k| (f, k)))
        .collect();
    sorted.sort_by(|a, b| a.0.path.cmp(&b.0.path));

    let metas: Vec<&SourceFile> = sorted
        .iter()
        .filter(|(_, k)| *k == FileKind::PackMeta)
        .map(|(f, _)| *f)
        .collect();
    let meta = match metas.as_slice() {
        [] => {
            diags.push(Diagnostic {
                file: "pack.yaml".to_string(),
                line: 1,
                column: 1,
                field: "(file)".to_string(),
                message: format!("pack '{dir_name}' has no pack.yaml"),
                hint: Some(
                    "create pack.yaml with `name:`, `version:` and `description:`".to_string(),
                ),
            });
            None
        }
        [one, rest @ ..] => {
            for extra in rest {
                diags.push(Diagnostic {
                    file: extra.path.clone(),
                    line: 1,
                    column: 1,
                    field: "(file)".to_string(),
                    message: format!("a pack has one metadata file, but {} also exists", one.path),
                    hint: Some("keep only pack.yaml".to_string()),
                });
            }
            let (meta, d) = parse_pack_meta(dir_name, &one.path, &one.text);
            diags.extend(d);
            meta
        }
    };
    // Validate the other files against the pack ref even if pack.yaml is broken.
    let pack_ref = meta
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_else(|| dir_name.to_string());

    let mut actions = Vec::new();
    let mut action_names: BTreeMap<String, (String, usize)> = BTreeMap::new();
    let mut rules = Vec::new();
    let mut rule_names: BTreeMap<String, (String, usize)> = BTreeMap::new();
    let mut rule_refs: Vec<(String, String, usize, usize)> = Vec::new();

    for (file, kind) in &sorted {
        match kind {
            FileKind::PackMeta => {}
            FileKind::Action => {
                let (parsed, d) = parse_action(&pack_ref, &file.path, &file.text, existing_paths);
                diags.extend(d);
                if let Some((name, line, column)) = parsed.name {
                    duplicate_check(
                        &mut diags,
                        &mut action_names,
                        "action",
                        &pack_ref,
                        &file.path,
                        name,
                        line,
                        column,
                    );
                }
                actions.extend(parsed.meta);
            }
            FileKind::Rule => {
                let (parsed, d) = parse_rule(&pack_ref, &file.path, &file.text);
                diags.extend(d);
                if let Some((name, line, column)) = parsed.name {
                    duplicate_check(
                        &mut diags,
                        &mut rule_names,
                        "rule",
                        &pack_ref,
                        &file.path,
                        name,
                        line,
                        column,
                    );
                }
                if let Some((r, line, column)) = parsed.action_ref {
                    rule_refs.push((file.path.clone(), r, line, column));
                }
                rules.extend(parsed.rule);
            }
        }
    }

    let prefix = format!("{pack_ref}.");
    for (file, reference, line, column) in rule_refs {
        if let Some(name) = reference.strip_prefix(&prefix)
            && !action_names.contains_key(name)
        {
            let known: Vec<&str> = action_names.keys().map(String::as_str).collect();
            diags.push(Diagnostic {
                file,
                line,
                column,
                field: "action.ref".to_string(),
                message: format!("action '{reference}' does not exist in pack '{pack_ref}'"),
                hint: Some(if known.is_empty() {
                    "this pack defines no actions; add one under actions/".to_string()
                } else {
                    format!("actions in this pack: {}", known.join(", "))
                }),
            });
        }
    }

    if !diags.is_empty() {
        let mut all = Diagnostics(diags);
        all.sort();
        return Err(all);
    }
    match meta {
        Some(meta) => Ok(Pack {
            meta,
            actions,
            rules,
        }),
        None => Err(Diagnostics(Vec::new())),
    }
}

#[allow(clippy::too_many_arguments)]
fn duplicate_check(
    diags: &mut Vec<Diagnostic>,
    seen: &mut BTreeMap<String, (String, usize)>,
    what: &str,
    pack: &str,
    file: &str,
    name: String,
    line: usize,
    column: usize,
) {
    if let Some((first_file, first_line)) = seen.get(&name) {
        diags.push(Diagnostic {
            file: file.to_string(),
            line,
            column,
            field: "name".to_string(),
            message: format!(
                "duplicate {what} name '{pack}.{name}': first defined at {first_file}:{first_line}"
            ),
            hint: Some(format!("rename one of the two {what}s")),
        });
    } else {
        seen.insert(name, (file.to_string(), line));
    }
}

/// The built-in `core` pack's files, embedded in the binary.
const CORE_FILES: &[(&str, &str)] = &[
    ("pack.yaml", include_str!("builtin/pack.yaml")),
    (
        "actions/echo.yaml",
        include_str!("builtin/actions/echo.yaml"),
    ),
    (
        "actions/http.yaml",
        include_str!("builtin/actions/http.yaml"),
    ),
    (
        "actions/local.yaml",
        include_str!("builtin/actions/local.yaml"),
    ),
    ("actions/ask.yaml", include_str!("builtin/actions/ask.yaml")),
    (
        "actions/noop.yaml",
        include_str!("builtin/actions/noop.yaml"),
    ),
    (
        "actions/ci_build.yaml",
        include_str!("builtin/actions/ci_build.yaml"),
    ),
    (
        "actions/inject_trigger.yaml",
        include_str!("builtin/actions/inject_trigger.yaml"),
    ),
];

/// The built-in `core` pack: `core.local`, `core.http`, `core.noop`,
/// `core.echo`, parsed from embedded YAML with the same code as user packs.
pub fn core_pack() -> Pack {
    let files: Vec<SourceFile> = CORE_FILES
        .iter()
        .map(|(path, text)| SourceFile {
            path: (*path).to_string(),
            text: (*text).to_string(),
        })
        .collect();
    match load_pack("core", &files, &BTreeSet::new()) {
        Ok(mut pack) => {
            // Built-ins have no file on disk.
            for a in &mut pack.actions {
                a.file = None;
            }
            pack
        }
        // The embedded files are fixed at build time and tested.
        Err(d) => panic!("the built-in core pack is invalid:\n{d}"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert_eq!(classify("pack.yaml"), Some(FileKind::PackMeta));
        assert_eq!(classify("actions/a.yml"), Some(FileKind::Action));
        assert_eq!(classify("actions/workflows/w.yaml"), None);
        assert_eq!(classify("rules/r.yaml"), Some(FileKind::Rule));
        assert_eq!(classify("sensors/s.yaml"), None);
        assert_eq!(classify("actions/run.sh"), None);
    }

    #[test]
    fn core_pack_loads() {
        let pack = core_pack();
        assert_eq!(pack.meta.name, "core");
        let refs: Vec<String> = pack.actions.iter().map(|a| a.reference()).collect();
        assert_eq!(
            refs,
            vec![
                "core.ask",
                "core.ci_build",
                "core.echo",
                "core.http",
                "core.inject_trigger",
                "core.local",
                "core.noop"
            ]
        );
        let echo = pack.actions.iter().find(|a| a.name == "echo").unwrap();
        let cmd = echo.parameters.get("cmd").unwrap();
        assert!(cmd.immutable && cmd.runner_param);
        assert_eq!(cmd.default, Some(serde_json::json!("echo")));
        let message = echo.parameters.get("message").unwrap();
        assert!(message.required && !message.runner_param);
        assert_eq!(message.position, Some(0));
    }
}
