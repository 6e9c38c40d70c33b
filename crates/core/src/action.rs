//! Action metadata (StackStorm format) and parameter schemas.
//!
//! An action file (`actions/<name>.yaml`) names a runner type, an optional
//! entry point and typed parameters. Parameters of the runner (`cmd`, `url`,
//! `timeout`...) are inherited; an action may override their attributes.

use crate::diagnostic::{Diagnostic, FileCheck, YamlNode, YamlValue, join, parse_yaml, suggest};
use crate::runner_types::{ENTRY_POINT_REQUIRED, RUNNER_TYPES, runner_parameters};
use serde::Serialize;
use serde::ser::SerializeMap;
use serde_json::Value;
use std::collections::BTreeSet;

/// The JSON-schema type of a parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamType {
    /// `string`
    String,
    /// `integer`
    Integer,
    /// `number` (integer or float)
    Number,
    /// `boolean`
    Boolean,
    /// `array`
    Array,
    /// `object`
    Object,
    /// `null`
    Null,
}

impl ParamType {
    /// Every type with its name.
    pub const ALL: [(ParamType, &'static str); 7] = [
        (Self::String, "string"),
        (Self::Integer, "integer"),
        (Self::Number, "number"),
        (Self::Boolean, "boolean"),
        (Self::Array, "array"),
        (Self::Object, "object"),
        (Self::Null, "null"),
    ];

    /// Parses a type name (`string`, `integer`...).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.iter().find(|(_, n)| *n == name).map(|(t, _)| *t)
    }

    /// The type's name.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(t, _)| *t == self)
            .map(|(_, n)| *n)
            .unwrap_or("?")
    }

    /// Whether `value` is of this type (an integer is also a `number`).
    pub fn matches(self, value: &Value) -> bool {
        match self {
            Self::String => value.is_string(),
            Self::Integer => value.is_i64() || value.is_u64(),
            Self::Number => value.is_number(),
            Self::Boolean => value.is_boolean(),
            Self::Array => value.is_array(),
            Self::Object => value.is_object(),
            Self::Null => value.is_null(),
        }
    }
}

/// One parameter's declaration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ParamSpec {
    /// Its type (YAML key `type`).
    #[serde(rename = "type")]
    pub kind: ParamType,
    /// Human description.
    pub description: String,
    /// Value used when none is given.
    pub default: Option<Value>,
    /// A value must be given (or defaulted).
    pub required: bool,
    /// The value is masked in storage, logs and API output.
    pub secret: bool,
    /// The value cannot be changed from its default.
    pub immutable: bool,
    /// The allowed values (YAML key `enum`).
    #[serde(rename = "enum")]
    pub enum_values: Option<Vec<Value>>,
    /// Position in the command's arguments (shell runners).
    pub position: Option<u32>,
    /// Whether this is a parameter of the runner (`cmd`, `url`...) rather
    /// than one the action declares for itself.
    pub runner_param: bool,
}

/// Parameter declarations, in file order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ParamSchema(pub Vec<(String, ParamSpec)>);

impl ParamSchema {
    /// The declaration of `name`.
    pub fn get(&self, name: &str) -> Option<&ParamSpec> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, s)| s)
    }

    /// Parameter names, in order.
    pub fn names(&self) -> Vec<&str> {
        self.0.iter().map(|(n, _)| n.as_str()).collect()
    }
}

impl Serialize for ParamSchema {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, spec) in &self.0 {
            map.serialize_entry(name, spec)?;
        }
        map.end()
    }
}

/// An action's metadata.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActionMeta {
    /// Pack reference.
    pub pack: String,
    /// Action name (unique in the pack).
    pub name: String,
    /// Human description.
    pub description: String,
    /// Runner type (`local-shell-cmd`, `http-request`...).
    pub runner_type: String,
    /// Script or workflow file, relative to the pack's `actions/` folder.
    pub entry_point: Option<String>,
    /// Disabled actions cannot be run.
    pub enabled: bool,
    /// The action's parameters, runner parameters it overrides included
    /// (merged with the runner's declaration, `runner_param` set).
    pub parameters: ParamSchema,
    /// Metadata file, relative to the pack directory; None for built-ins.
    pub file: Option<String>,
}

impl ActionMeta {
    /// `pack.name`.
    pub fn reference(&self) -> String {
        format!("{}.{}", self.pack, self.name)
    }

    /// Every parameter the action accepts: its own (with runner overrides)
    /// in file order, then the runner parameters it does not mention.
    pub fn effective_schema(&self) -> ParamSchema {
        let mut out = self.parameters.clone();
        if let Some(runner) = runner_parameters(&self.runner_type) {
            for (name, spec) in runner.0 {
                if out.get(&name).is_none() {
                    out.0.push((name, spec));
                }
            }
        }
        out
    }
}

/// `a string`, `an integer`, ... for messages.
fn with_article(kind: ParamType) -> String {
    match kind {
        ParamType::Integer | ParamType::Array | ParamType::Object => format!("an {}", kind.name()),
        other => format!("a {}", other.name()),
    }
}

/// Top-level keys of action metadata.
const ACTION_KEYS: &[&str] = &[
    "name",
    "pack",
    "runner_type",
    "entry_point",
    "description",
    "enabled",
    "parameters",
];
/// StackStorm action keys accepted and ignored.
const ACTION_IGNORED: &[&str] = &[
    "notify",
    "output_schema",
    "tags",
    "uid",
    "ref",
    "id",
    "metadata_file",
];
/// Keys of one parameter declaration.
const PARAM_KEYS: &[&str] = &[
    "type",
    "description",
    "default",
    "required",
    "secret",
    "immutable",
    "enum",
    "position",
];
/// JSON-schema keys StackStorm allows on parameters; accepted and ignored.
const PARAM_IGNORED: &[&str] = &[
    "title",
    "items",
    "properties",
    "additionalProperties",
    "patternProperties",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "uniqueItems",
    "pattern",
    "format",
    "oneOf",
    "anyOf",
    "allOf",
    "dependencies",
];

/// An action parsed from its file, with where its name is (for duplicates).
#[derive(Debug)]
pub(crate) struct ParsedAction {
    /// The metadata, if the file was valid.
    pub meta: Option<ActionMeta>,
    /// Name and the node where it is declared.
    pub name: Option<(String, usize, usize)>,
}

/// Validates a name (action or rule): non-empty, no whitespace, no `/`.
pub(crate) fn check_name(check: &mut FileCheck<'_>, name: &str, node: &YamlNode) -> bool {
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c == '/') {
        check.error(
            node,
            "name",
            format!("invalid name '{name}'"),
            Some("use letters, digits, '_' and '-' only".to_string()),
        );
        false
    } else {
        true
    }
}

/// Checks the optional `pack` field equals the pack being loaded.
pub(crate) fn check_pack_field(check: &mut FileCheck<'_>, doc: &YamlNode, pack: &str) {
    if let Some((given, node)) = check.string(doc, "pack", "", false)
        && given != pack
    {
        check.error(
            node,
            "pack",
            format!("pack '{given}' does not match the pack being loaded, '{pack}'"),
            Some(format!(
                "remove `pack:` or set it to `{pack}` (the pack's ref)"
            )),
        );
    }
}

/// Normalizes an entry point to a path relative to the pack directory
/// (`actions/<entry_point>`); None if it leaves the pack.
fn entry_point_path(entry_point: &str) -> Option<String> {
    let mut parts: Vec<&str> = vec!["actions"];
    for part in entry_point.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    if entry_point.starts_with('/') || parts.is_empty() {
        return None;
    }
    Some(parts.join("/"))
}

/// Parses and validates one action metadata file of pack `pack`.
pub(crate) fn parse_action(
    pack: &str,
    file: &str,
    text: &str,
    existing_paths: &BTreeSet<String>,
) -> (ParsedAction, Vec<Diagnostic>) {
    let mut parsed = ParsedAction {
        meta: None,
        name: None,
    };
    let doc = match parse_yaml(file, text) {
        Ok(doc) => doc,
        Err(d) => return (parsed, vec![d]),
    };
    let mut check = FileCheck::new(file);
    if !check.check_keys(&doc, "", ACTION_KEYS, ACTION_IGNORED) {
        return (parsed, check.out);
    }
    let name = check.string(&doc, "name", "", true);
    if let Some((n, node)) = &name
        && check_name(&mut check, n, node)
    {
        parsed.name = Some((n.clone(), node.line, node.column));
    }
    check_pack_field(&mut check, &doc, pack);
    let description = check
        .string(&doc, "description", "", false)
        .map(|(s, _)| s)
        .unwrap_or_default();
    let enabled = check.boolean(&doc, "enabled", "", true);
    let runner = check.string(&doc, "runner_type", "", true);
    let runner_schema = match &runner {
        Some((r, node)) => {
            let schema = runner_parameters(r);
            if schema.is_none() {
                check.error(
                    node,
                    "runner_type",
                    format!("unknown runner type '{r}'"),
                    Some(match suggest(r, RUNNER_TYPES) {
                        Some(s) => format!(
                            "did you mean `{s}`? known runner types: {}",
                            RUNNER_TYPES.join(", ")
                        ),
                        None => format!("known runner types: {}", RUNNER_TYPES.join(", ")),
                    }),
                );
            }
            schema
        }
        None => None,
    };
    let entry_point = check
        .string(&doc, "entry_point", "", false)
        .filter(|(s, _)| !s.trim().is_empty());
    if let Some((ep, node)) = &entry_point {
        match entry_point_path(ep) {
            None => check.error(
                node,
                "entry_point",
                format!("entry point '{ep}' is outside the pack"),
                Some("give a path relative to the pack's actions/ folder".to_string()),
            ),
            Some(path) if !existing_paths.contains(&path) => check.error(
                node,
                "entry_point",
                format!("entry point file '{path}' does not exist"),
                Some("entry_point is relative to the pack's actions/ folder".to_string()),
            ),
            Some(_) => {}
        }
    } else if let Some((r, _)) = &runner
        && ENTRY_POINT_REQUIRED.contains(&r.as_str())
    {
        check.error(
            &doc,
            "entry_point",
            format!("runner type '{r}' needs an entry_point"),
            Some("add `entry_point: <file relative to actions/>`".to_string()),
        );
    }
    let parameters = match doc.get("parameters") {
        Some(node) if !matches!(node.value, YamlValue::Null) => {
            parse_params(&mut check, node, "parameters", runner_schema.as_ref())
        }
        _ => ParamSchema::default(),
    };
    if check.out.is_empty()
        && let (Some((name, _)), Some((runner_type, _))) = (name, runner)
    {
        parsed.meta = Some(ActionMeta {
            pack: pack.to_string(),
            name,
            description,
            runner_type,
            entry_point: entry_point.map(|(s, _)| s),
            enabled,
            parameters,
            file: Some(file.to_string()),
        });
    }
    (parsed, check.out)
}

/// Parses a `parameters:` mapping. Runner parameters named here are merged:
/// the runner's declaration overlaid with the attributes given.
pub(crate) fn parse_params(
    check: &mut FileCheck<'_>,
    node: &YamlNode,
    path: &str,
    runner: Option<&ParamSchema>,
) -> ParamSchema {
    let mut out = ParamSchema::default();
    let Some(entries) = node.as_map() else {
        check.error(
            node,
            path,
            format!(
                "expected a mapping of parameter names, found {}",
                node.kind_name()
            ),
            Some("write `parameters:` then `  name: {type: string, ...}` lines".to_string()),
        );
        return out;
    };
    let mut positions: Vec<(u32, String)> = Vec::new();
    for (key, spec_node) in entries {
        let name = key.key_string();
        let field = join(path, &name);
        let inherited = runner.and_then(|r| r.get(&name)).cloned();
        if let Some(spec) = parse_param(check, &name, spec_node, &field, inherited) {
            if let Some(p) = spec.position {
                if let Some((_, other)) = positions.iter().find(|(q, _)| *q == p) {
                    let at = spec_node.get("position").unwrap_or(spec_node);
                    check.error(
                        at,
                        &join(&field, "position"),
                        format!("position {p} is already used by parameter '{other}'"),
                        Some("give each positional parameter its own position".to_string()),
                    );
                }
                positions.push((p, name.clone()));
            }
            out.0.push((name, spec));
        }
    }
    out
}

fn parse_param(
    check: &mut FileCheck<'_>,
    name: &str,
    node: &YamlNode,
    field: &str,
    inherited: Option<ParamSpec>,
) -> Option<ParamSpec> {
    let before = check.out.len();
    if !check.check_keys(node, field, PARAM_KEYS, PARAM_IGNORED) {
        return None;
    }
    let kind = match check.string(node, "type", field, inherited.is_none()) {
        Some((t, tnode)) => match ParamType::parse(&t) {
            Some(k) => {
                if let Some(inh) = &inherited
                    && inh.kind != k
                {
                    check.error(
                        tnode,
                        &join(field, "type"),
                        format!(
                            "runner parameter '{name}' has type {}, it cannot be changed to {t}",
                            inh.kind.name()
                        ),
                        Some(format!("remove `type:` or use `type: {}`", inh.kind.name())),
                    );
                }
                Some(k)
            }
            None => {
                check.error(
                    tnode,
                    &join(field, "type"),
                    format!("unknown parameter type '{t}'"),
                    Some(format!(
                        "use one of: {}",
                        ParamType::ALL.map(|(_, n)| n).join(", ")
                    )),
                );
                None
            }
        },
        None => inherited.as_ref().map(|i| i.kind),
    };
    let mut spec = inherited.unwrap_or(ParamSpec {
        kind: kind.unwrap_or(ParamType::String),
        description: String::new(),
        default: None,
        required: false,
        secret: false,
        immutable: false,
        enum_values: None,
        position: None,
        runner_param: false,
    });
    if let Some(k) = kind {
        spec.kind = k;
    }
    if let Some((d, _)) = check.string(node, "description", field, false) {
        spec.description = d;
    }
    spec.required = check.boolean(node, "required", field, spec.required);
    spec.secret = check.boolean(node, "secret", field, spec.secret);
    spec.immutable = check.boolean(node, "immutable", field, spec.immutable);
    if let Some(e) = node.get("enum") {
        match &e.value {
            YamlValue::Seq(items) => {
                let values: Vec<Value> = items.iter().map(YamlNode::to_json).collect();
                if kind.is_some() {
                    for (item, v) in items.iter().zip(&values) {
                        if !spec.kind.matches(v) {
                            check.error(
                                item,
                                &join(field, "enum"),
                                format!("enum value {v} is not of type {}", spec.kind.name()),
                                None,
                            );
                        }
                    }
                }
                spec.enum_values = Some(values);
            }
            _ => check.error(
                e,
                &join(field, "enum"),
                format!("expected a list of allowed values, found {}", e.kind_name()),
                Some("write `enum: [a, b, c]`".to_string()),
            ),
        }
    }
    if let Some(p) = node.get("position") {
        match p.to_json().as_u64().and_then(|n| u32::try_from(n).ok()) {
            Some(n) => spec.position = Some(n),
            None => check.error(
                p,
                &join(field, "position"),
                format!("expected a non-negative integer, found {}", p.to_json()),
                None,
            ),
        }
    }
    if let Some(d) = node.get("default") {
        let v = d.to_json();
        let templated = v
            .as_str()
            .is_some_and(|s| s.contains("{{") || s.contains("{%"));
        if kind.is_some() && !v.is_null() && !templated && !spec.kind.matches(&v) {
            check.error(
                d,
                &join(field, "default"),
                format!(
                    "default {v} is not of type {} (it is {})",
                    spec.kind.name(),
                    d.kind_name()
                ),
                Some(format!("give {} default", with_article(spec.kind))),
            );
        } else if let Some(allowed) = &spec.enum_values
            && !v.is_null()
            && !templated
            && !allowed.contains(&v)
        {
            check.error(
                d,
                &join(field, "default"),
                format!("default {v} is not one of the enum values"),
                None,
            );
        }
        spec.default = if v.is_null() { None } else { Some(v) };
    }
    if check.out.len() > before {
        None
    } else {
        Some(spec)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn entry_point_paths() {
        assert_eq!(entry_point_path("a.sh").as_deref(), Some("actions/a.sh"));
        assert_eq!(
            entry_point_path("./workflows/x.yaml").as_deref(),
            Some("actions/workflows/x.yaml")
        );
        assert_eq!(
            entry_point_path("../scripts/x.sh").as_deref(),
            Some("scripts/x.sh")
        );
        assert_eq!(entry_point_path("../../x.sh"), None);
        assert_eq!(entry_point_path("/etc/passwd"), None);
    }

    #[test]
    fn runner_params_overlay() {
        let text = "name: a\nrunner_type: local-shell-cmd\nparameters:\n  cmd:\n    default: ls\n    immutable: true\n  x:\n    type: integer\n";
        let (p, diags) = parse_action("p", "actions/a.yaml", text, &BTreeSet::new());
        assert!(diags.is_empty(), "{diags:?}");
        let meta = p.meta.unwrap();
        let cmd = meta.parameters.get("cmd").unwrap();
        assert!(cmd.runner_param && cmd.immutable && cmd.required);
        assert_eq!(cmd.kind, ParamType::String);
        let eff = meta.effective_schema();
        assert_eq!(
            eff.names(),
            vec!["cmd", "x", "env", "cwd", "timeout", "kwarg_op"]
        );
    }
}
