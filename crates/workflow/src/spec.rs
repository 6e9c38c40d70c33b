//! Orquesta workflow definitions: parse YAML into a typed [`WorkflowSpec`]
//! and validate all of it at once, every problem located
//! (`file:line:column: tasks.build.next[0].do: ...`).
//!
//! Accepted forms follow Orquesta: `input` as names or `{name: default}`,
//! `vars`/`output` as a mapping or a list of single-key mappings, inline
//! actions (`action: core.echo message=<% ctx().name %>`), `publish` as a
//! mapping, a `key=value` string, or a list of either, and `do` as a list or
//! a comma-separated string. A `next` entry without `do` goes to `continue`.

use crate::expr;
use aviary_core::diagnostic::{Diagnostic, Diagnostics, YamlNode, YamlValue, parse_yaml};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Engine commands usable in `do`, which are not tasks.
pub const ENGINE_COMMANDS: [&str; 4] = ["continue", "fail", "noop", "retry"];

/// A parsed, validated workflow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkflowSpec {
    /// Always `1.0`.
    pub version: String,
    /// Free text.
    pub description: Option<String>,
    /// Input names with their defaults (`None`: required, null if absent).
    pub input: Vec<(String, Option<Value>)>,
    /// Variables, rendered in order after input.
    pub vars: Vec<(String, Value)>,
    /// Output values, rendered in order at the end.
    pub output: Vec<(String, Value)>,
    /// Tasks by name.
    pub tasks: BTreeMap<String, TaskSpec>,
    /// Tasks whose `cmd` input is shell text (the loader marks tasks of
    /// shell-command actions): expressions in it render into environment
    /// variables `AVIARY_ARG_<n>`, the text getting `"${AVIARY_ARG_<n>}"`.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub shell_cmd_tasks: BTreeSet<String>,
}

/// `join: all` or `join: <count>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Join {
    /// Wait for every inbound task.
    All,
    /// Wait for this many inbound tasks.
    Count(usize),
}

/// `with: items ... concurrency ...`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WithItems {
    /// The expression giving the items (`<% ctx(xs) %>`).
    pub items: String,
    /// Names bound to each item (`x, y in ...`); empty for plain `item()`.
    pub keys: Vec<String>,
    /// Maximum items running at once (a number or an expression).
    pub concurrency: Option<Value>,
}

/// `retry: {when, count, delay}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrySpec {
    /// Condition; absent means "when the task failed".
    pub when: Option<String>,
    /// How many retries (a number or an expression).
    pub count: Value,
    /// Seconds between retries (a number or an expression).
    pub delay: Option<Value>,
}

/// One `next` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransitionSpec {
    /// Condition; absent means always.
    pub when: Option<String>,
    /// Values to publish, in order (later ones see earlier ones).
    pub publish: Vec<(String, Value)>,
    /// Next tasks or engine commands (`continue` when `do` is absent; empty
    /// when `do` was only `retry`, which became the task's retry policy).
    pub targets: Vec<String>,
}

/// One task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// Action reference (`core.echo`); `None` for a task with no action.
    pub action: Option<String>,
    /// Action input (inline parameters merged in).
    pub input: Map<String, Value>,
    /// Transitions, in order.
    pub next: Vec<TransitionSpec>,
    /// Barrier.
    pub join: Option<Join>,
    /// With-items.
    pub with: Option<WithItems>,
    /// Retry policy.
    pub retry: Option<RetrySpec>,
    /// Delay in seconds before running (a number or an expression).
    pub delay: Option<Value>,
}

impl WorkflowSpec {
    /// Tasks no other task transitions to, sorted.
    pub fn start_tasks(&self) -> Vec<String> {
        let targeted: BTreeSet<&str> = self
            .tasks
            .values()
            .flat_map(|t| {
                t.next
                    .iter()
                    .flat_map(|n| n.targets.iter().map(String::as_str))
            })
            .collect();
        self.tasks
            .keys()
            .filter(|k| !targeted.contains(k.as_str()))
            .cloned()
            .collect()
    }

    /// Inbound transitions of `task`: (source task, transition index),
    /// once per `next` entry naming it.
    pub fn inbound(&self, task: &str) -> Vec<(String, usize)> {
        let mut out = Vec::new();
        for (name, spec) in &self.tasks {
            for (i, n) in spec.next.iter().enumerate() {
                if n.targets.iter().any(|t| t == task) {
                    out.push((name.clone(), i));
                }
            }
        }
        out
    }

    /// Orquesta's split task: not a join and more than one inbound transition.
    pub fn is_split(&self, task: &str) -> bool {
        let is_join = self.tasks.get(task).is_some_and(|t| t.join.is_some());
        !is_join && self.inbound(task).len() > 1
    }

    /// True if `task` can reach itself through transitions.
    pub fn in_cycle(&self, task: &str) -> bool {
        let mut seen = BTreeSet::new();
        let mut queue: VecDeque<&str> = VecDeque::new();
        let next_of = |t: &str| -> Vec<&str> {
            self.tasks
                .get(t)
                .map(|s| {
                    s.next
                        .iter()
                        .flat_map(|n| n.targets.iter().map(String::as_str))
                        .collect()
                })
                .unwrap_or_default()
        };
        queue.extend(next_of(task));
        while let Some(t) = queue.pop_front() {
            if t == task {
                return true;
            }
            if seen.insert(t) {
                queue.extend(next_of(t));
            }
        }
        false
    }
}

/// Parses and validates a workflow definition. `file` names the file in
/// diagnostics. Every problem is reported, sorted by position.
pub fn parse_workflow(file: &str, text: &str) -> Result<WorkflowSpec, Diagnostics> {
    let root = parse_yaml(file, text).map_err(|d| Diagnostics(vec![d]))?;
    let mut c = Check {
        file,
        out: Vec::new(),
    };
    let spec = c.workflow(&root);
    let mut diags = Diagnostics(c.out);
    diags.sort();
    match spec {
        Some(spec) if diags.0.is_empty() => Ok(spec),
        _ => Err(diags),
    }
}

struct Check<'a> {
    file: &'a str,
    out: Vec<Diagnostic>,
}

fn key_hint(known: &[&str]) -> String {
    format!("valid fields here: {}", known.join(", "))
}

impl Check<'_> {
    fn error(&mut self, node: &YamlNode, field: &str, message: String, hint: Option<String>) {
        self.out.push(Diagnostic {
            file: self.file.to_string(),
            line: node.line,
            column: node.column,
            field: if field.is_empty() {
                "(document)".to_string()
            } else {
                field.to_string()
            },
            message,
            hint,
        });
    }

    fn keys(&mut self, node: &YamlNode, path: &str, known: &[&str]) -> bool {
        let Some(entries) = node.as_map() else {
            self.error(
                node,
                path,
                format!("expected a mapping, found {}", node.kind_name()),
                None,
            );
            return false;
        };
        for (k, _) in entries {
            let name = k.key_string();
            if !known.contains(&name.as_str()) {
                self.error(
                    k,
                    &join(path, &name),
                    format!("unknown field '{name}'"),
                    Some(key_hint(known)),
                );
            }
        }
        true
    }

    fn expr(&mut self, node: &YamlNode, path: &str, value: &Value) {
        if let Err(e) = expr::check(value) {
            self.error(
                node,
                path,
                format!("bad expression: {}", e.message),
                Some("Orquesta expressions are YAQL `<% ... %>` or Jinja `{{ ... }}`".into()),
            );
        }
    }

    fn string(&mut self, node: &YamlNode, path: &str) -> Option<String> {
        match &node.value {
            YamlValue::String(s) => Some(s.clone()),
            YamlValue::Number(n) => Some(n.to_string()),
            _ => {
                self.error(
                    node,
                    path,
                    format!("expected a string, found {}", node.kind_name()),
                    None,
                );
                None
            }
        }
    }

    /// A mapping or a list of single-key mappings (or bare names when
    /// `names_ok`), as ordered (name, value, node) entries.
    fn named_list<'n>(
        &mut self,
        node: &'n YamlNode,
        path: &str,
        names_ok: bool,
    ) -> Vec<(String, Option<Value>, &'n YamlNode)> {
        let mut out = Vec::new();
        match &node.value {
            YamlValue::Null => {}
            YamlValue::Map(entries) => {
                for (k, v) in entries {
                    out.push((k.key_string(), Some(v.to_json()), v));
                }
            }
            YamlValue::Seq(items) => {
                for (i, item) in items.iter().enumerate() {
                    match &item.value {
                        YamlValue::String(s) if names_ok => out.push((s.clone(), None, item)),
                        YamlValue::Map(entries) if entries.len() == 1 => {
                            let (k, v) = &entries[0];
                            out.push((k.key_string(), Some(v.to_json()), v));
                        }
                        _ => self.error(
                            item,
                            &format!("{path}[{i}]"),
                            format!(
                                "expected {}a single-key mapping, found {}",
                                if names_ok { "a name or " } else { "" },
                                item.kind_name()
                            ),
                            Some("write `- name: value`".into()),
                        ),
                    }
                }
            }
            _ => self.error(
                node,
                path,
                format!("expected a list or a mapping, found {}", node.kind_name()),
                None,
            ),
        }
        for (name, value, vnode) in &out {
            if let Some(v) = value {
                self.expr(vnode, &join(path, name), v);
            }
        }
        out
    }

    fn workflow(&mut self, root: &YamlNode) -> Option<WorkflowSpec> {
        const TOP: [&str; 6] = ["version", "description", "input", "vars", "output", "tasks"];
        if !self.keys(root, "", &TOP) {
            return None;
        }
        let version = match root.get("version") {
            None => {
                self.error(
                    root,
                    "version",
                    "missing required field 'version'".into(),
                    Some("add `version: 1.0`".into()),
                );
                String::new()
            }
            Some(v) => {
                let text = v.key_string();
                if text != "1.0" && text != "1" {
                    self.error(
                        v,
                        "version",
                        format!("unsupported version '{text}'"),
                        Some("use `version: 1.0`".into()),
                    );
                }
                "1.0".to_string()
            }
        };
        let description = root
            .get("description")
            .and_then(|d| self.string(d, "description"));
        let input = root
            .get("input")
            .map(|n| {
                self.named_list(n, "input", true)
                    .into_iter()
                    .map(|(k, v, _)| (k, v))
                    .collect()
            })
            .unwrap_or_default();
        let vars = root
            .get("vars")
            .map(|n| {
                self.named_list(n, "vars", false)
                    .into_iter()
                    .map(|(k, v, _)| (k, v.unwrap_or(Value::Null)))
                    .collect()
            })
            .unwrap_or_default();
        let output = root
            .get("output")
            .map(|n| {
                self.named_list(n, "output", false)
                    .into_iter()
                    .map(|(k, v, _)| (k, v.unwrap_or(Value::Null)))
                    .collect()
            })
            .unwrap_or_default();
        let mut tasks = BTreeMap::new();
        let mut do_refs: Vec<(String, &YamlNode, String)> = Vec::new();
        match root.get("tasks") {
            None => self.error(
                root,
                "tasks",
                "missing required field 'tasks'".into(),
                Some("add `tasks:` with at least one task".into()),
            ),
            Some(node) => match node.as_map() {
                Some(entries) if !entries.is_empty() => {
                    for (k, v) in entries {
                        let name = k.key_string();
                        let path = format!("tasks.{name}");
                        if ENGINE_COMMANDS.contains(&name.as_str()) {
                            self.error(
                                k,
                                &path,
                                format!("'{name}' is a reserved engine command, not a task name"),
                                Some("rename the task".into()),
                            );
                        }
                        if let Some(t) = self.task(v, &path, &mut do_refs) {
                            tasks.insert(name, t);
                        }
                    }
                }
                _ => self.error(
                    node,
                    "tasks",
                    "expected a mapping of at least one task".into(),
                    None,
                ),
            },
        }
        // Unknown task names in `do`.
        let names: Vec<&str> = tasks.keys().map(String::as_str).collect();
        for (target, node, path) in &do_refs {
            if !tasks.contains_key(target) && !ENGINE_COMMANDS.contains(&target.as_str()) {
                let hint = match aviary_core::diagnostic::suggest(target, &names) {
                    Some(s) => format!("did you mean `{s}`? tasks: {}", names.join(", ")),
                    None => format!(
                        "tasks: {}; engine commands: {}",
                        names.join(", "),
                        ENGINE_COMMANDS.join(", ")
                    ),
                };
                self.error(node, path, format!("unknown task '{target}'"), Some(hint));
            }
        }
        let spec = WorkflowSpec {
            version,
            description,
            input,
            vars,
            output,
            tasks,
            shell_cmd_tasks: BTreeSet::new(),
        };
        // Reachability from the start tasks.
        if let Some(tasks_node) = root.get("tasks")
            && !spec.tasks.is_empty()
        {
            let starts = spec.start_tasks();
            if starts.is_empty() {
                self.error(
                    tasks_node,
                    "tasks",
                    "no start task: every task is the target of a transition".into(),
                    Some("a workflow starts at the tasks no other task transitions to".into()),
                );
            } else {
                let mut seen: BTreeSet<String> = starts.iter().cloned().collect();
                let mut queue: VecDeque<String> = starts.into_iter().collect();
                while let Some(t) = queue.pop_front() {
                    if let Some(ts) = spec.tasks.get(&t) {
                        for n in &ts.next {
                            for target in &n.targets {
                                if seen.insert(target.clone()) {
                                    queue.push_back(target.clone());
                                }
                            }
                        }
                    }
                }
                for name in spec.tasks.keys() {
                    if !seen.contains(name)
                        && let Some(k) = tasks_node.get_key(name)
                    {
                        self.error(
                            k,
                            &format!("tasks.{name}"),
                            format!("task '{name}' is unreachable from the start tasks"),
                            Some("add it to some task's `next.do`, or remove it".into()),
                        );
                    }
                }
            }
        }
        Some(spec)
    }

    fn task<'n>(
        &mut self,
        node: &'n YamlNode,
        path: &str,
        do_refs: &mut Vec<(String, &'n YamlNode, String)>,
    ) -> Option<TaskSpec> {
        const KEYS: [&str; 7] = ["action", "input", "next", "join", "with", "retry", "delay"];
        if !self.keys(node, path, &KEYS) {
            return None;
        }
        let mut input = Map::new();
        let mut action = None;
        if let Some(a) = node.get("action")
            && let Some(text) = self.string(a, &join(path, "action"))
        {
            let (name, inline) = parse_inline_action(&text);
            if name.is_empty() {
                self.error(a, &join(path, "action"), "empty action".into(), None);
            } else if !name.contains('.') && !expr::is_expression(&name) {
                self.error(
                    a,
                    &join(path, "action"),
                    format!("action '{name}' is not a `pack.action` reference"),
                    Some("write e.g. `core.echo`".into()),
                );
            }
            match inline {
                Ok(params) => {
                    for (k, v) in params {
                        self.expr(a, &join(path, "action"), &v);
                        input.insert(k, v);
                    }
                }
                Err(msg) => self.error(a, &join(path, "action"), msg, None),
            }
            action = Some(name);
        }
        if let Some(i) = node.get("input") {
            match i.to_json() {
                Value::Object(m) => {
                    for (k, v) in m {
                        input.insert(k, v);
                    }
                    self.expr(i, &join(path, "input"), &i.to_json());
                }
                Value::Null => {}
                _ => {
                    if let YamlValue::String(s) = &i.value
                        && expr::is_expression(s)
                    {
                        self.error(
                            i,
                            &join(path, "input"),
                            "an expression as the whole input is not supported".into(),
                            Some("give input as a mapping of name: value".into()),
                        );
                    } else {
                        self.error(
                            i,
                            &join(path, "input"),
                            format!("expected a mapping, found {}", i.kind_name()),
                            None,
                        );
                    }
                }
            }
        }
        let join_spec = node.get("join").and_then(|j| match &j.value {
            YamlValue::String(s) if s == "all" => Some(Join::All),
            YamlValue::Number(n) if n.as_u64().is_some_and(|n| n > 0) => {
                n.as_u64().map(|n| Join::Count(n as usize))
            }
            _ => {
                self.error(
                    j,
                    &join(path, "join"),
                    "expected `all` or a positive count".into(),
                    None,
                );
                None
            }
        });
        let with = node
            .get("with")
            .and_then(|w| self.with_items(w, &join(path, "with")));
        let retry = node
            .get("retry")
            .and_then(|r| self.retry(r, &join(path, "retry")));
        let delay = node.get("delay").and_then(|d| match &d.value {
            YamlValue::Number(n) if n.as_u64().is_some() => Some(Value::Number(n.clone())),
            YamlValue::String(s) if expr::is_expression(s) => {
                self.expr(d, &join(path, "delay"), &Value::String(s.clone()));
                Some(Value::String(s.clone()))
            }
            _ => {
                self.error(
                    d,
                    &join(path, "delay"),
                    "expected a number of seconds or an expression".into(),
                    None,
                );
                None
            }
        });
        let mut next = Vec::new();
        if let Some(n) = node.get("next") {
            let npath = join(path, "next");
            match &n.value {
                YamlValue::Seq(items) => {
                    for (i, item) in items.iter().enumerate() {
                        if let Some(t) = self.transition(item, &format!("{npath}[{i}]"), do_refs) {
                            next.push(t);
                        }
                    }
                }
                YamlValue::Null => {}
                _ => self.error(
                    n,
                    &npath,
                    format!("expected a list, found {}", n.kind_name()),
                    Some("write `next: [{when: ..., do: ...}]`".into()),
                ),
            }
        }
        // `do: retry` is a retry policy: the transition's condition, 3 times.
        let mut retry = retry;
        for t in &mut next {
            if t.targets.iter().any(|x| x == "retry") {
                t.targets.retain(|x| x != "retry");
                if retry.is_none() {
                    retry = Some(RetrySpec {
                        when: t.when.clone(),
                        count: Value::from(3),
                        delay: None,
                    });
                }
            }
        }
        Some(TaskSpec {
            action,
            input,
            next,
            join: join_spec,
            with,
            retry,
            delay,
        })
    }

    fn transition<'n>(
        &mut self,
        node: &'n YamlNode,
        path: &str,
        do_refs: &mut Vec<(String, &'n YamlNode, String)>,
    ) -> Option<TransitionSpec> {
        if !self.keys(node, path, &["when", "publish", "do"]) {
            return None;
        }
        let when = node.get("when").and_then(|w| {
            let s = match &w.value {
                YamlValue::Bool(b) => Some(b.to_string()),
                _ => self.string(w, &join(path, "when")),
            }?;
            self.expr(w, &join(path, "when"), &Value::String(s.clone()));
            Some(s)
        });
        let mut publish = Vec::new();
        if let Some(p) = node.get("publish") {
            let ppath = join(path, "publish");
            match &p.value {
                YamlValue::String(s) => match parse_key_values(s) {
                    Ok(kvs) => publish.extend(kvs),
                    Err(msg) => self.error(p, &ppath, msg, None),
                },
                YamlValue::Map(entries) => {
                    for (k, v) in entries {
                        publish.push((k.key_string(), v.to_json()));
                    }
                }
                YamlValue::Seq(items) => {
                    for (i, item) in items.iter().enumerate() {
                        match &item.value {
                            YamlValue::String(s) => match parse_key_values(s) {
                                Ok(kvs) => publish.extend(kvs),
                                Err(msg) => self.error(item, &format!("{ppath}[{i}]"), msg, None),
                            },
                            YamlValue::Map(entries) if entries.len() == 1 => {
                                publish.push((entries[0].0.key_string(), entries[0].1.to_json()));
                            }
                            _ => self.error(
                                item,
                                &format!("{ppath}[{i}]"),
                                "expected `key=value` or a single-key mapping".into(),
                                None,
                            ),
                        }
                    }
                }
                _ => self.error(
                    p,
                    &ppath,
                    format!("expected a mapping or list, found {}", p.kind_name()),
                    None,
                ),
            }
            for (k, v) in &publish {
                self.expr(p, &join(&ppath, k), v);
            }
        }
        let mut targets = Vec::new();
        if let Some(d) = node.get("do") {
            let dpath = join(path, "do");
            match &d.value {
                YamlValue::String(s) => {
                    for t in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                        do_refs.push((t.to_string(), d, dpath.clone()));
                        targets.push(t.to_string());
                    }
                }
                YamlValue::Seq(items) => {
                    for (i, item) in items.iter().enumerate() {
                        if let Some(t) = self.string(item, &format!("{dpath}[{i}]")) {
                            do_refs.push((t.clone(), item, format!("{dpath}[{i}]")));
                            targets.push(t);
                        }
                    }
                }
                YamlValue::Null => {}
                _ => self.error(
                    d,
                    &dpath,
                    format!("expected a task name or a list, found {}", d.kind_name()),
                    None,
                ),
            }
        }
        if targets.is_empty() {
            targets.push("continue".to_string());
        }
        Some(TransitionSpec {
            when,
            publish,
            targets,
        })
    }

    fn with_items(&mut self, node: &YamlNode, path: &str) -> Option<WithItems> {
        let (items_node, concurrency) = match &node.value {
            YamlValue::String(_) => (node, None),
            YamlValue::Map(_) => {
                if !self.keys(node, path, &["items", "concurrency"]) {
                    return None;
                }
                let Some(items) = node.get("items") else {
                    self.error(
                        node,
                        &join(path, "items"),
                        "missing required field 'items'".into(),
                        None,
                    );
                    return None;
                };
                let conc = node.get("concurrency").map(|c| {
                    let v = c.to_json();
                    self.expr(c, &join(path, "concurrency"), &v);
                    v
                });
                (items, conc)
            }
            _ => {
                self.error(
                    node,
                    path,
                    "expected `items: <expression>` or a mapping".into(),
                    None,
                );
                return None;
            }
        };
        let ipath = join(path, "items");
        let text = self.string(items_node, &ipath)?;
        let (keys, expr_text) = match text.find(" in ") {
            Some(i) if !text[..i].contains("<%") && !text[..i].contains("{{") => (
                text[..i]
                    .split(',')
                    .map(|k| k.trim().to_string())
                    .filter(|k| !k.is_empty())
                    .collect(),
                text[i + 4..].trim().to_string(),
            ),
            _ => (Vec::new(), text.trim().to_string()),
        };
        if !expr::is_expression(&expr_text) {
            self.error(
                items_node,
                &ipath,
                format!("items must be an expression, found `{expr_text}`"),
                Some("write `items: x in <% ctx(xs) %>`".into()),
            );
        }
        self.expr(items_node, &ipath, &Value::String(expr_text.clone()));
        Some(WithItems {
            items: expr_text,
            keys,
            concurrency,
        })
    }

    fn retry(&mut self, node: &YamlNode, path: &str) -> Option<RetrySpec> {
        if !self.keys(node, path, &["when", "count", "delay"]) {
            return None;
        }
        let when = node.get("when").and_then(|w| {
            let s = self.string(w, &join(path, "when"))?;
            self.expr(w, &join(path, "when"), &Value::String(s.clone()));
            Some(s)
        });
        let count = match node.get("count") {
            None => {
                self.error(
                    node,
                    &join(path, "count"),
                    "missing required field 'count'".into(),
                    None,
                );
                return None;
            }
            Some(c) => c.to_json(),
        };
        let delay = node.get("delay").map(YamlNode::to_json);
        if let Some(c) = node.get("count") {
            self.expr(c, &join(path, "count"), &count);
        }
        Some(RetrySpec { when, count, delay })
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Splits `core.echo message=<% ctx().name %> n=1` into the action
/// reference and its inline parameters.
pub fn parse_inline_action(text: &str) -> (String, Result<Vec<(String, Value)>, String>) {
    let text = text.trim();
    match text.find(char::is_whitespace) {
        None => (text.to_string(), Ok(Vec::new())),
        Some(i) => (text[..i].to_string(), parse_key_values(&text[i..])),
    }
}

/// Parses `a=1 b=<% ctx(x) %> c='some text'` into ordered pairs. A value runs
/// until the next ` name=` outside an expression or quotes. Unquoted values
/// that are JSON numbers, booleans or null become those; the rest strings.
pub fn parse_key_values(text: &str) -> Result<Vec<(String, Value)>, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let n = chars.len();
    while i < n {
        while i < n && chars[i].is_whitespace() {
            i += 1;
        }
        if i >= n {
            break;
        }
        let start = i;
        while i < n && (chars[i].is_alphanumeric() || chars[i] == '_') {
            i += 1;
        }
        if i == start || i >= n || chars[i] != '=' {
            return Err(format!("expected `name=value` in `{}`", text.trim()));
        }
        let key: String = chars[start..i].iter().collect();
        i += 1;
        let vstart = i;
        let mut depth = 0usize;
        let mut quote: Option<char> = None;
        while i < n {
            let c = chars[i];
            let two: String = chars[i..n.min(i + 2)].iter().collect();
            if let Some(q) = quote {
                if c == q {
                    quote = None;
                }
            } else if two == "<%" || two == "{{" {
                depth += 1;
                i += 2;
                continue;
            } else if (two == "%>" || two == "}}") && depth > 0 {
                depth -= 1;
                i += 2;
                continue;
            } else if depth == 0 && (c == '\'' || c == '"') && i == vstart {
                quote = Some(c);
            } else if depth == 0 && c.is_whitespace() {
                // Does a `name=` follow?
                let mut j = i;
                while j < n && chars[j].is_whitespace() {
                    j += 1;
                }
                let k = j;
                let mut j2 = j;
                while j2 < n && (chars[j2].is_alphanumeric() || chars[j2] == '_') {
                    j2 += 1;
                }
                if j2 > k && j2 < n && chars[j2] == '=' {
                    break;
                }
            }
            i += 1;
        }
        let raw: String = chars[vstart..i].iter().collect();
        let raw = raw.trim();
        let value = if raw.len() >= 2
            && ((raw.starts_with('\'') && raw.ends_with('\''))
                || (raw.starts_with('"') && raw.ends_with('"')))
        {
            Value::String(raw[1..raw.len() - 1].to_string())
        } else if !expr::is_expression(raw)
            && let Ok(v @ (Value::Number(_) | Value::Bool(_) | Value::Null)) =
                serde_json::from_str::<Value>(raw)
        {
            v
        } else {
            Value::String(raw.to_string())
        };
        out.push((key, value));
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    const GOOD: &str = r#"
version: 1.0
description: A basic sequential workflow.
input:
  - name
  - count: 2
vars:
  - greeting: null
output:
  - greeting: <% ctx().greeting %>
tasks:
  task1:
    action: core.echo message=<% ctx().name %> n=3 text='a b=c'
    next:
      - when: <% succeeded() %>
        publish: greeting=<% result() %> other=1
        do: task2, task3
  task2:
    action: core.echo
    input:
      message: "All your base"
    next:
      - publish:
          - greeting: <% ctx("greeting") %>, <% result() %>
          - x=<% ctx(x) %>
        do:
          - task4
  task3:
    with: x, y in <% zip(ctx(xs), ctx(ys)) %>
    action: core.echo message=<% item(x) %>
    retry:
      count: 2
      delay: 1
  task4:
    join: all
"#;

    #[test]
    fn parses_the_forms() {
        let spec = parse_workflow("wf.yaml", GOOD).unwrap();
        assert_eq!(
            spec.input,
            vec![("name".into(), None), ("count".into(), Some(json!(2)))]
        );
        assert_eq!(spec.vars, vec![("greeting".into(), Value::Null)]);
        let t1 = &spec.tasks["task1"];
        assert_eq!(t1.action.as_deref(), Some("core.echo"));
        assert_eq!(t1.input["message"], json!("<% ctx().name %>"));
        assert_eq!(t1.input["n"], json!(3));
        assert_eq!(t1.input["text"], json!("a b=c"));
        assert_eq!(t1.next[0].targets, vec!["task2", "task3"]);
        assert_eq!(
            t1.next[0].publish,
            vec![
                ("greeting".into(), json!("<% result() %>")),
                ("other".into(), json!(1))
            ]
        );
        let t2 = &spec.tasks["task2"];
        assert_eq!(t2.next[0].publish.len(), 2);
        assert_eq!(t2.next[0].publish[1].0, "x");
        let t3 = &spec.tasks["task3"];
        let with = t3.with.as_ref().unwrap();
        assert_eq!(with.keys, vec!["x", "y"]);
        assert_eq!(with.items, "<% zip(ctx(xs), ctx(ys)) %>");
        assert_eq!(t3.next.len(), 0);
        assert_eq!(spec.tasks["task4"].join, Some(Join::All));
        assert_eq!(spec.start_tasks(), vec!["task1"]);
    }

    #[test]
    fn next_without_do_continues() {
        let spec = parse_workflow(
            "w.yaml",
            "version: 1.0\ntasks:\n  a:\n    action: core.noop\n    next:\n      - publish: x=1\n",
        )
        .unwrap();
        assert_eq!(spec.tasks["a"].next[0].targets, vec!["continue"]);
    }

    #[test]
    fn every_error_is_located() {
        let text = r#"version: 1.0
tasks:
  build:
    action: core.local cmd=<% foo() %>
    next:
      - when: <% succeeded( %>
        do: tset
      - do: [deploy]
        bogus: 1
  deploy:
    action: core.noop
  orphan:
    action: core.noop
    next:
      - do: orphan2
  orphan2:
    action: core.noop
    next:
      - do: orphan
"#;
        let err = parse_workflow("wf.yaml", text).unwrap_err();
        let shown = err.to_string();
        assert!(
            shown.contains("wf.yaml:4:13: tasks.build.action: bad expression"),
            "{shown}"
        );
        assert!(
            shown.contains("wf.yaml:6:15: tasks.build.next[0].when: bad expression"),
            "{shown}"
        );
        assert!(
            shown.contains("wf.yaml:7:13: tasks.build.next[0].do: unknown task 'tset'"),
            "{shown}"
        );
        assert!(
            shown.contains("did you mean `test`") || shown.contains("tasks: build"),
            "{shown}"
        );
        assert!(
            shown.contains("wf.yaml:9:9: tasks.build.next[1].bogus: unknown field 'bogus'"),
            "{shown}"
        );
        assert!(
            shown.contains("tasks.orphan: task 'orphan' is unreachable"),
            "{shown}"
        );
        assert!(
            shown.contains("tasks.orphan2: task 'orphan2' is unreachable"),
            "{shown}"
        );
    }

    #[test]
    fn top_level_errors() {
        let err = parse_workflow("w.yaml", "version: 2.0\nname: x\n").unwrap_err();
        let shown = err.to_string();
        assert!(
            shown.contains("w.yaml:1:10: version: unsupported version"),
            "{shown}"
        );
        assert!(
            shown.contains("w.yaml:2:1: name: unknown field 'name'"),
            "{shown}"
        );
        assert!(shown.contains("tasks: missing required field"), "{shown}");
        let err = parse_workflow(
            "w.yaml",
            "version: 1.0\ntasks:\n  fail:\n    action: core.noop\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("reserved engine command"), "{err}");
        let err = parse_workflow("w.yaml", "version: 1.0\ntasks: [1\n").unwrap_err();
        assert!(err.to_string().contains("invalid YAML"), "{err}");
    }

    #[test]
    fn key_values() {
        assert_eq!(
            parse_key_values("a=1 b=<% ctx(x) + ' y=z' %> c=\"q r\" d=true e=x").unwrap(),
            vec![
                ("a".into(), json!(1)),
                ("b".into(), json!("<% ctx(x) + ' y=z' %>")),
                ("c".into(), json!("q r")),
                ("d".into(), json!(true)),
                ("e".into(), json!("x")),
            ]
        );
        assert!(parse_key_values("=1").is_err());
    }
}
