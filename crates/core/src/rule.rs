//! Rules (StackStorm format): a trigger, criteria over the trigger instance,
//! and an action whose parameters are Jinja templates over the trigger data.
//!
//! ```yaml
//! name: on_push
//! trigger: {type: core.st2.webhook, parameters: {url: github}}
//! criteria:
//!   trigger.body.ref: {type: equals, pattern: refs/heads/main}
//! action: {ref: core.local, parameters: {cmd: "echo {{ trigger.body.ref }}"}}
//! ```

use crate::action::{check_name, check_pack_field};
use crate::criteria::{Criterion, Operator, SearchCondition};
use crate::diagnostic::{Diagnostic, FileCheck, YamlNode, YamlValue, join, parse_yaml, suggest};
use crate::model::{
    CRON_TIMER_TRIGGER, DATE_TIMER_TRIGGER, INTERVAL_TIMER_TRIGGER, WEBHOOK_TRIGGER,
};
use serde::Serialize;
use serde_json::{Map, Value};

/// A rule.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rule {
    /// Pack reference.
    pub pack: String,
    /// Rule name (unique in the pack).
    pub name: String,
    /// Human description.
    pub description: String,
    /// Disabled rules match nothing.
    pub enabled: bool,
    /// What event it listens to.
    pub trigger: RuleTrigger,
    /// Conditions that must all hold, in file order.
    pub criteria: Vec<Criterion>,
    /// What it runs.
    pub action: RuleAction,
    /// Rule file, relative to the pack directory.
    pub file: Option<String>,
}

impl Rule {
    /// `pack.name`.
    pub fn reference(&self) -> String {
        format!("{}.{}", self.pack, self.name)
    }
}

/// The trigger a rule listens to.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleTrigger {
    /// Trigger type reference (YAML key `type`), e.g. `core.st2.webhook`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Trigger parameters (webhook `url`, timer `unit`/`delta`...).
    pub parameters: Map<String, Value>,
}

/// The action a rule runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleAction {
    /// Action reference `pack.name` (YAML key `ref`).
    #[serde(rename = "ref")]
    pub reference: String,
    /// Parameters; string values are Jinja templates over `trigger`.
    pub parameters: Map<String, Value>,
}

const RULE_KEYS: &[&str] = &[
    "name",
    "pack",
    "description",
    "enabled",
    "trigger",
    "criteria",
    "action",
];
const RULE_IGNORED: &[&str] = &[
    "uid",
    "ref",
    "id",
    "tags",
    "context",
    "metadata_file",
    "type",
];
const INTERVAL_UNITS: &[&str] = &["weeks", "days", "hours", "minutes", "seconds"];
const CRON_FIELDS: &[&str] = &[
    "timezone",
    "year",
    "month",
    "day",
    "week",
    "day_of_week",
    "hour",
    "minute",
    "second",
];

/// A rule parsed from its file, plus locations used by cross-file checks.
#[derive(Debug)]
pub(crate) struct ParsedRule {
    /// The rule, if the file was valid.
    pub rule: Option<Rule>,
    /// Name and where it is declared.
    pub name: Option<(String, usize, usize)>,
    /// Action ref and where it is written.
    pub action_ref: Option<(String, usize, usize)>,
}

/// Whether `s` is a `pack.name` reference.
pub(crate) fn is_reference(s: &str) -> bool {
    match s.split_once('.') {
        Some((pack, name)) => {
            !pack.is_empty()
                && !name.is_empty()
                && !s.chars().any(char::is_whitespace)
                && pack
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        }
        None => false,
    }
}

/// Checks the Jinja syntax of every string under `node` that looks templated.
pub(crate) fn check_jinja(check: &mut FileCheck<'_>, node: &YamlNode, field: &str) {
    match &node.value {
        YamlValue::String(s) if s.contains("{{") || s.contains("{%") || s.contains("{#") => {
            let env = minijinja::Environment::new();
            if let Err(e) = env.template_from_str(s) {
                let detail = e.detail().unwrap_or("syntax error");
                let at = e
                    .line()
                    .map(|l| format!(" (template line {l})"))
                    .unwrap_or_default();
                check.error(
                    node,
                    field,
                    format!("invalid Jinja template: {detail}{at}"),
                    Some(
                        "check the {{ ... }} and {% ... %} blocks are closed and well formed"
                            .to_string(),
                    ),
                );
            }
        }
        YamlValue::Seq(items) => {
            for (i, item) in items.iter().enumerate() {
                check_jinja(check, item, &format!("{field}[{i}]"));
            }
        }
        YamlValue::Map(entries) => {
            for (k, v) in entries {
                check_jinja(check, v, &join(field, &k.key_string()));
            }
        }
        _ => {}
    }
}

/// Shortens a regex compile error to its one-line cause.
fn regex_error_text(err: &regex::Error) -> String {
    let text = err.to_string();
    text.lines()
        .find_map(|l| l.strip_prefix("error: "))
        .map(str::to_string)
        .unwrap_or_else(|| text.lines().collect::<Vec<_>>().join(" "))
}

/// Parses a criteria mapping (also used for `search` sub-criteria).
pub(crate) fn parse_criteria(
    check: &mut FileCheck<'_>,
    node: &YamlNode,
    path: &str,
) -> Vec<Criterion> {
    let mut out = Vec::new();
    let Some(entries) = node.as_map() else {
        check.error(
            node,
            path,
            format!("expected a mapping of criteria, found {}", node.kind_name()),
            Some("write `<key>: {type: <operator>, pattern: <value>}` entries".to_string()),
        );
        return out;
    };
    for (key, spec) in entries {
        let key_text = key.key_string();
        let field = join(path, &key_text);
        if let Some(c) = parse_criterion(check, key_text, spec, &field) {
            out.push(c);
        }
    }
    out
}

fn parse_criterion(
    check: &mut FileCheck<'_>,
    key: String,
    spec: &YamlNode,
    field: &str,
) -> Option<Criterion> {
    if !check.check_keys(spec, field, &["type", "pattern", "condition"], &[]) {
        return None;
    }
    let (op_name, op_node) = check.string(spec, "type", field, true)?;
    let Some(op) = Operator::parse(&op_name) else {
        check.error(
            op_node,
            &join(field, "type"),
            format!("unknown criteria operator '{op_name}'"),
            Some({
                let names = Operator::ALL.map(|(_, n)| n);
                match suggest(&op_name, &names) {
                    Some(s) => format!("did you mean `{s}`? operators: {}", names.join(", ")),
                    None => format!("use one of: {}", names.join(", ")),
                }
            }),
        );
        return None;
    };
    let pattern_node = spec.get("pattern");
    let pattern_field = join(field, "pattern");
    let pattern = pattern_node.map(YamlNode::to_json).unwrap_or(Value::Null);
    let needs_pattern = !matches!(op, Operator::Exists | Operator::NExists);
    if needs_pattern && pattern_node.is_none() {
        check.error(
            spec,
            &pattern_field,
            format!("operator '{op_name}' needs a `pattern`"),
            Some("add `pattern: <value>`".to_string()),
        );
        return None;
    }
    let before = check.out.len();
    let mut condition = None;
    match (op, pattern_node) {
        (Operator::Search, Some(p)) => {
            if let Some((c, cnode)) = check.string(spec, "condition", field, true) {
                condition = match c.as_str() {
                    "any" => Some(SearchCondition::Any),
                    "all" => Some(SearchCondition::All),
                    "any2any" => Some(SearchCondition::Any2Any),
                    "all2any" => Some(SearchCondition::All2Any),
                    _ => {
                        check.error(
                            cnode,
                            &join(field, "condition"),
                            format!("unknown search condition '{c}'"),
                            Some("use one of: any, all, any2any, all2any".to_string()),
                        );
                        None
                    }
                }
            }
            if p.as_map().is_some() {
                parse_criteria(check, p, &pattern_field);
            } else {
                check.error(
                    p,
                    &pattern_field,
                    format!(
                        "a search pattern must be a mapping of sub-criteria, found {}",
                        p.kind_name()
                    ),
                    Some(
                        "write `pattern: {item.<field>: {type: equals, pattern: <value>}}`"
                            .to_string(),
                    ),
                );
            }
        }
        (_, p) => {
            if let Some(c) = spec.get("condition") {
                check.error(
                    c,
                    &join(field, "condition"),
                    format!("`condition` only applies to the search operator, not '{op_name}'"),
                    Some("remove `condition:`".to_string()),
                );
            }
            if let Some(p) = p {
                check_pattern(check, op, &op_name, p, &pattern_field);
            }
        }
    }
    if check.out.len() > before {
        return None;
    }
    Some(Criterion {
        key,
        op,
        pattern,
        condition,
    })
}

fn check_pattern(
    check: &mut FileCheck<'_>,
    op: Operator,
    op_name: &str,
    p: &YamlNode,
    field: &str,
) {
    let templated = p
        .as_str()
        .is_some_and(|s| s.contains("{{") || s.contains("{%"));
    if templated {
        check_jinja(check, p, field);
        return;
    }
    match op {
        Operator::Regex | Operator::IRegex => match p.as_str() {
            Some(re) => {
                let built = regex::RegexBuilder::new(re)
                    .case_insensitive(op == Operator::IRegex)
                    .build();
                if let Err(e) = built {
                    check.error(
                        p,
                        field,
                        format!("invalid regular expression: {}", regex_error_text(&e)),
                        Some("fix the pattern; remember to quote it in YAML".to_string()),
                    );
                }
            }
            None => check.error(
                p,
                field,
                format!(
                    "a {op_name} pattern must be a string, found {}",
                    p.kind_name()
                ),
                Some("quote the pattern".to_string()),
            ),
        },
        Operator::TimeDiffLt | Operator::TimeDiffGt if !matches!(p.value, YamlValue::Number(_)) => {
            check.error(
                p,
                field,
                format!(
                    "a {op_name} pattern is a number of seconds, found {}",
                    p.kind_name()
                ),
                None,
            );
        }
        _ => {}
    }
}

/// Validates trigger parameters for the built-in trigger types.
fn check_trigger(check: &mut FileCheck<'_>, trigger: &YamlNode, kind: &str, kind_node: &YamlNode) {
    let params = trigger.get("parameters");
    let pfield = "trigger.parameters";
    let empty = YamlNode {
        value: YamlValue::Map(Vec::new()),
        line: trigger.line,
        column: trigger.column,
    };
    let params = match params {
        Some(p) if !matches!(p.value, YamlValue::Null) => p,
        _ => &empty,
    };
    match kind {
        WEBHOOK_TRIGGER => {
            if check.check_keys(params, pfield, &["url", "secret"], &[])
                && let Some((url, node)) = check.string(params, "url", pfield, true)
            {
                let path = url.trim_start_matches('/');
                if path.is_empty()
                    || !path
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
                {
                    check.error(
                        node,
                        "trigger.parameters.url",
                        format!("invalid webhook url '{url}'"),
                        Some(
                            "use a path like `github` or `ci/deploy` (letters, digits, - _ . /)"
                                .to_string(),
                        ),
                    );
                }
            }
        }
        INTERVAL_TIMER_TRIGGER => {
            if check.check_keys(params, pfield, &["unit", "delta"], &[]) {
                if let Some((unit, node)) = check.string(params, "unit", pfield, true)
                    && !INTERVAL_UNITS.contains(&unit.as_str())
                {
                    check.error(
                        node,
                        "trigger.parameters.unit",
                        format!("unknown interval unit '{unit}'"),
                        Some(format!("use one of: {}", INTERVAL_UNITS.join(", "))),
                    );
                }
                match params.get("delta") {
                    None => check.error(
                        params,
                        "trigger.parameters.delta",
                        "missing required field 'delta'".to_string(),
                        Some("add `delta: <positive integer>`".to_string()),
                    ),
                    Some(d) => {
                        if d.to_json().as_u64().is_none_or(|n| n == 0) {
                            check.error(
                                d,
                                "trigger.parameters.delta",
                                format!("delta must be a positive integer, found {}", d.to_json()),
                                None,
                            );
                        }
                    }
                }
            }
        }
        CRON_TIMER_TRIGGER => {
            if check.check_keys(params, pfield, CRON_FIELDS, &[])
                && let Some(entries) = params.as_map()
            {
                if entries.is_empty() {
                    check.error(
                        params,
                        pfield,
                        "a cron timer needs at least one of its fields".to_string(),
                        Some(format!("set some of: {}", CRON_FIELDS.join(", "))),
                    );
                }
                for (k, v) in entries {
                    if !matches!(v.value, YamlValue::String(_) | YamlValue::Number(_)) {
                        check.error(
                            v,
                            &join(pfield, &k.key_string()),
                            format!("expected a string or number, found {}", v.kind_name()),
                            None,
                        );
                    }
                }
            }
        }
        DATE_TIMER_TRIGGER => {
            if check.check_keys(params, pfield, &["date", "timezone"], &[])
                && let Some((date, node)) = check.string(params, "date", pfield, true)
            {
                let ok = chrono::DateTime::parse_from_rfc3339(&date).is_ok()
                    || ["%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M"]
                        .iter()
                        .any(|f| chrono::NaiveDateTime::parse_from_str(&date, f).is_ok());
                if !ok {
                    check.error(
                        node,
                        "trigger.parameters.date",
                        format!("invalid date '{date}'"),
                        Some("write `YYYY-MM-DD HH:MM:SS` (UTC unless `timezone` is set) or RFC 3339".to_string()),
                    );
                }
            }
        }
        crate::model::ACTION_TRIGGER => {}
        other => {
            if other.starts_with("core.st2.") {
                check.error(
                    kind_node,
                    "trigger.type",
                    format!("unknown built-in trigger type '{other}'"),
                    Some(format!(
                        "built-in trigger types: {WEBHOOK_TRIGGER}, {INTERVAL_TIMER_TRIGGER}, {CRON_TIMER_TRIGGER}, {DATE_TIMER_TRIGGER}, {}", crate::model::ACTION_TRIGGER
                    )),
                );
            } else if !is_reference(other) {
                check.error(
                    kind_node,
                    "trigger.type",
                    format!("invalid trigger type '{other}'"),
                    Some(format!(
                        "use a built-in type ({WEBHOOK_TRIGGER}, {INTERVAL_TIMER_TRIGGER}, {CRON_TIMER_TRIGGER}, {DATE_TIMER_TRIGGER}) or a custom `pack.name`"
                    )),
                );
            }
        }
    }
}

/// Parses and validates one rule file of pack `pack`.
pub(crate) fn parse_rule(pack: &str, file: &str, text: &str) -> (ParsedRule, Vec<Diagnostic>) {
    let mut parsed = ParsedRule {
        rule: None,
        name: None,
        action_ref: None,
    };
    let doc = match parse_yaml(file, text) {
        Ok(doc) => doc,
        Err(d) => return (parsed, vec![d]),
    };
    let mut check = FileCheck::new(file);
    if !check.check_keys(&doc, "", RULE_KEYS, RULE_IGNORED) {
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

    let mut trigger = None;
    match doc.get("trigger") {
        None => check.error(
            &doc,
            "trigger",
            "missing required field 'trigger'".to_string(),
            Some("add `trigger: {type: core.st2.webhook, parameters: {url: <path>}}`".to_string()),
        ),
        Some(t) => {
            if check.check_keys(
                t,
                "trigger",
                &["type", "parameters"],
                &["ref", "description"],
            ) && let Some((kind, kind_node)) = check.string(t, "type", "trigger", true)
            {
                check_trigger(&mut check, t, &kind, kind_node);
                let (parameters, _) = check.object(t, "parameters", "trigger");
                trigger = Some(RuleTrigger { kind, parameters });
            }
        }
    }

    let criteria = match doc.get("criteria") {
        Some(c) if !matches!(c.value, YamlValue::Null) => parse_criteria(&mut check, c, "criteria"),
        _ => Vec::new(),
    };

    let mut action = None;
    match doc.get("action") {
        None => check.error(
            &doc,
            "action",
            "missing required field 'action'".to_string(),
            Some("add `action: {ref: <pack.action>, parameters: {...}}`".to_string()),
        ),
        Some(a) => {
            if check.check_keys(a, "action", &["ref", "parameters"], &[])
                && let Some((reference, ref_node)) = check.string(a, "ref", "action", true)
            {
                if is_reference(&reference) {
                    parsed.action_ref = Some((reference.clone(), ref_node.line, ref_node.column));
                } else {
                    check.error(
                        ref_node,
                        "action.ref",
                        format!("invalid action reference '{reference}'"),
                        Some("write `<pack>.<action>`, e.g. `core.local`".to_string()),
                    );
                }
                let (parameters, pnode) = check.object(a, "parameters", "action");
                if let Some(pnode) = pnode {
                    check_jinja(&mut check, pnode, "action.parameters");
                }
                action = Some(RuleAction {
                    reference,
                    parameters,
                });
            }
        }
    }

    if check.out.is_empty()
        && let (Some((name, _)), Some(trigger), Some(action)) = (name, trigger, action)
    {
        parsed.rule = Some(Rule {
            pack: pack.to_string(),
            name,
            description,
            enabled,
            trigger,
            criteria,
            action,
            file: Some(file.to_string()),
        });
    }
    (parsed, check.out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        assert!(is_reference("core.local"));
        assert!(is_reference("my_pack.a.b"));
        assert!(!is_reference("local"));
        assert!(!is_reference(".local"));
        assert!(!is_reference("core."));
        assert!(!is_reference("co re.local"));
    }

    #[test]
    fn interval_timer_rule() {
        let text = "name: tick\ntrigger:\n  type: core.st2.IntervalTimer\n  parameters: {unit: minutes, delta: 5}\naction:\n  ref: core.noop\n";
        let (p, d) = parse_rule("p", "rules/tick.yaml", text);
        assert!(d.is_empty(), "{d:?}");
        assert_eq!(p.rule.unwrap().trigger.parameters["delta"], 5);
    }

    #[test]
    fn bad_timers() {
        let text = "name: tick\ntrigger:\n  type: core.st2.IntervalTimer\n  parameters: {unit: fortnights, delta: -1}\naction:\n  ref: core.noop\n";
        let (_, d) = parse_rule("p", "rules/tick.yaml", text);
        assert_eq!(d.len(), 2, "{d:?}");
        let text = "name: once\ntrigger:\n  type: core.st2.DateTimer\n  parameters: {date: tomorrow}\naction:\n  ref: core.noop\n";
        let (_, d) = parse_rule("p", "rules/once.yaml", text);
        assert_eq!(d[0].field, "trigger.parameters.date");
        let text = "name: once\ntrigger:\n  type: core.st2.DateTimer\n  parameters: {date: '2030-01-02 03:04:05'}\naction:\n  ref: core.noop\n";
        let (_, d) = parse_rule("p", "rules/once.yaml", text);
        assert!(d.is_empty(), "{d:?}");
    }

    #[test]
    fn search_criteria() {
        let text = "name: s\ntrigger: {type: core.st2.webhook, parameters: {url: x}}\ncriteria:\n  trigger.body.commits:\n    type: search\n    condition: any\n    pattern:\n      item.author:\n        type: equals\n        pattern: bob\naction: {ref: core.noop}\n";
        let (p, d) = parse_rule("p", "rules/s.yaml", text);
        assert!(d.is_empty(), "{d:?}");
        let c = &p.rule.unwrap().criteria[0];
        assert_eq!(c.condition, Some(SearchCondition::Any));
        assert_eq!(c.pattern["item.author"]["pattern"], "bob");
        let bad = text
            .replace("condition: any", "condition: some")
            .replace("equals", "equalz");
        let (_, d) = parse_rule("p", "rules/s.yaml", &bad);
        let fields: Vec<_> = d.iter().map(|d| d.field.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "criteria.trigger.body.commits.condition",
                "criteria.trigger.body.commits.pattern.item.author.type"
            ]
        );
    }
}
