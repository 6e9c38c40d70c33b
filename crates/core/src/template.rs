//! Jinja templates over trigger data and the datastore (minijinja 2).
//!
//! Rule action parameters are rendered with the trigger instance in the
//! context (`{{ trigger.body.ref }}`) and datastore values
//! (`{{ st2kv.system.deploy_target }}`). Undefined variables are errors
//! (StackStorm uses Jinja's `StrictUndefined`).
//!
//! Two renderings:
//! - [`TemplateEngine::render_value`] renders every string inside a JSON
//!   value; a string that is exactly one `{{ expr }}` keeps the expression's
//!   native type (number, bool, list, object).
//! - [`TemplateEngine::render_shell`] renders text that a shell will run:
//!   expression output is never spliced into the text; each one becomes a
//!   quoted environment variable reference `"${AVIARY_ARG_<n>}"` whose value
//!   the caller passes in the process environment. Template authors must not
//!   put quotes around `{{ ... }}` in such text (single quotes would stop the
//!   shell from expanding the variable).

use std::sync::{Arc, Mutex};

use minijinja::value::{Object, Value as JValue};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, UndefinedBehavior};
use serde_json::Value;

/// Context variable carrying the shell-argument collector during
/// [`TemplateEngine::render_shell`].
const SHELL_ARGS_VAR: &str = "__aviary_shell_args__";

/// Names that are template globals, not context variables.
const GLOBALS: [&str; 9] = [
    "range",
    "dict",
    "debug",
    "namespace",
    "loop",
    "self",
    "super",
    "caller",
    "varargs",
];

/// A template that failed to parse or render.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", match .line { Some(l) => format!("template error at line {l}: {message}"), None => format!("template error: {message}") })]
pub struct TemplateError {
    /// What went wrong (names the undefined variable when there is one).
    pub message: String,
    /// 1-based line in the template, when known.
    pub line: Option<usize>,
}

/// Collects the values of `{{ ... }}` outputs during shell rendering.
#[derive(Debug, Default)]
struct ShellArgs(Arc<Mutex<Vec<String>>>);

impl Object for ShellArgs {}

/// The Jinja environment with StackStorm-like filters. `Send + Sync`; build
/// one and share it.
#[derive(Debug)]
pub struct TemplateEngine {
    env: Environment<'static>,
}

impl Default for TemplateEngine {
    fn default() -> Self {
        Self::new()
    }
}

impl TemplateEngine {
    /// A new engine: strict undefined, no auto-escaping, minijinja builtins
    /// plus `to_json_string`, `from_json_string`, `to_complex`,
    /// `json_escape`, `regex_match`, `regex_search`, `regex_replace`,
    /// `regex_substring`, `basename`, `dirname`, `use_none`.
    pub fn new() -> Self {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_recursion_limit(100);
        env.set_formatter(|out, state, value| {
            if let Some(args) = state.lookup(SHELL_ARGS_VAR)
                && let Some(args) = args.downcast_object_ref::<ShellArgs>()
            {
                let text = shell_text(value);
                let mut list = args
                    .0
                    .lock()
                    .map_err(|_| Error::new(ErrorKind::InvalidOperation, "shell args poisoned"))?;
                let n = list.len();
                list.push(text);
                return write!(out, "\"${{AVIARY_ARG_{n}}}\"")
                    .map_err(|_| Error::new(ErrorKind::WriteFailure, "write failed"));
            }
            minijinja::escape_formatter(out, state, value)
        });
        filters::register(&mut env);
        Self { env }
    }

    /// Checks syntax only (load time). The error says what and where (line
    /// in the template).
    pub fn check(&self, template: &str) -> Result<(), TemplateError> {
        self.env
            .template_from_str(template)
            .map(|_| ())
            .map_err(|e| convert(&e, template, None))
    }

    /// Dotted names of datastore keys a template refers to:
    /// `st2kv.system.x` / `st2kv.user.y` (attribute access only), sorted, so
    /// the caller can fetch only those.
    pub fn kv_references(&self, template: &str) -> Result<Vec<String>, TemplateError> {
        let tmpl = self
            .env
            .template_from_str(template)
            .map_err(|e| convert(&e, template, None))?;
        let mut names: Vec<String> = tmpl
            .undeclared_variables(true)
            .into_iter()
            .filter(|n| n.starts_with("st2kv."))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Renders every string inside `value` (recursively through arrays and
    /// objects; object keys are kept) with `ctx`. A string that is exactly
    /// one expression `{{ expr }}` yields the expression's native JSON value
    /// instead of its string form; otherwise a string. Undefined variables
    /// are an error naming the variable.
    pub fn render_value(&self, value: &Value, ctx: &Value) -> Result<Value, TemplateError> {
        match value {
            Value::String(s) => self.render_string(s, ctx),
            Value::Array(items) => items
                .iter()
                .map(|v| self.render_value(v, ctx))
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array),
            Value::Object(map) => {
                let mut out = serde_json::Map::with_capacity(map.len());
                for (k, v) in map {
                    out.insert(k.clone(), self.render_value(v, ctx)?);
                }
                Ok(Value::Object(out))
            }
            other => Ok(other.clone()),
        }
    }

    /// Renders one string as [`Self::render_value`] does.
    pub fn render_string(&self, s: &str, ctx: &Value) -> Result<Value, TemplateError> {
        if !has_template_syntax(s) {
            return Ok(Value::String(s.to_string()));
        }
        if let Some(expr) = single_expression(s) {
            let compiled = self
                .env
                .compile_expression(expr)
                .map_err(|e| convert(&e, s, Some(ctx)))?;
            let out = compiled.eval(ctx).map_err(|e| convert(&e, s, Some(ctx)))?;
            if out.is_undefined() {
                return Err(undefined_error(s, ctx, None, &self.env));
            }
            return serde_json::to_value(&out).map_err(|e| TemplateError {
                message: format!("the value of `{expr}` cannot be turned into JSON: {e}"),
                line: None,
            });
        }
        self.env
            .render_str(s, ctx)
            .map(Value::String)
            .map_err(|e| convert_with_env(&e, s, Some(ctx), &self.env))
    }

    /// Shell-safe rendering for text a shell will run (the `cmd` parameter).
    /// Every `{{ ... }}` output is not inserted; the text gets
    /// `"${AVIARY_ARG_<n>}"` (double-quoted) instead, and
    /// `("AVIARY_ARG_<n>", value-as-string)` is returned so the runner passes
    /// the value as an environment variable. Literal template text is kept
    /// as is. Filters such as `|safe` cannot bypass this (it is the
    /// environment's formatter). Strings are passed as is, `none` as an
    /// empty string, lists and maps as JSON.
    pub fn render_shell(
        &self,
        text: &str,
        ctx: &Value,
    ) -> Result<(String, Vec<(String, String)>), TemplateError> {
        if !has_template_syntax(text) {
            return Ok((text.to_string(), Vec::new()));
        }
        let collected = Arc::new(Mutex::new(Vec::new()));
        let jctx = minijinja::context! {
            ..minijinja::context! { __aviary_shell_args__ => JValue::from_object(ShellArgs(collected.clone())) },
            ..JValue::from_serialize(ctx)
        };
        let rendered = self
            .env
            .render_str(text, jctx)
            .map_err(|e| convert_with_env(&e, text, Some(ctx), &self.env))?;
        let values = collected
            .lock()
            .map_err(|_| TemplateError {
                message: "internal error: shell argument list poisoned".into(),
                line: None,
            })?
            .clone();
        let env = values
            .into_iter()
            .enumerate()
            .map(|(i, v)| (format!("AVIARY_ARG_{i}"), v))
            .collect();
        Ok((rendered, env))
    }
}

/// True when the text contains Jinja syntax at all.
fn has_template_syntax(s: &str) -> bool {
    s.contains("{{") || s.contains("{%") || s.contains("{#")
}

/// The inner expression when `s` is exactly one `{{ expr }}`.
fn single_expression(s: &str) -> Option<&str> {
    let inner = s.strip_prefix("{{")?.strip_suffix("}}")?;
    if inner.contains("{{") || inner.contains("}}") || inner.contains("{%") || inner.contains("{#")
    {
        return None;
    }
    let inner = inner.strip_prefix(['-', '+']).unwrap_or(inner);
    let inner = inner.strip_suffix(['-', '+']).unwrap_or(inner);
    let inner = inner.trim();
    (!inner.is_empty()).then_some(inner)
}

/// Text passed to the shell for one expression's output.
fn shell_text(value: &JValue) -> String {
    use minijinja::value::ValueKind;
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => String::new(),
        ValueKind::String => value.as_str().unwrap_or_default().to_string(),
        ValueKind::Seq | ValueKind::Map => {
            serde_json::to_string(value).unwrap_or_else(|_| value.to_string())
        }
        _ => value.to_string(),
    }
}

fn convert(err: &Error, source: &str, ctx: Option<&Value>) -> TemplateError {
    let env = Environment::new();
    convert_with_env(err, source, ctx, &env)
}

fn convert_with_env(
    err: &Error,
    source: &str,
    ctx: Option<&Value>,
    env: &Environment<'_>,
) -> TemplateError {
    if err.kind() == ErrorKind::UndefinedError
        && let Some(ctx) = ctx
    {
        return undefined_error(source, ctx, err.line(), env);
    }
    let mut message = match err.detail() {
        Some(d) => format!("{}: {d}", err.kind()),
        None => err.kind().to_string(),
    };
    message.push_str(&format!(" in `{}`", excerpt(source)));
    TemplateError {
        message,
        line: err.line(),
    }
}

/// Names the first variable of `source` that does not resolve in `ctx`.
fn undefined_error(
    source: &str,
    ctx: &Value,
    line: Option<usize>,
    env: &Environment<'_>,
) -> TemplateError {
    let mut names: Vec<String> = match env.template_from_str(source) {
        Ok(t) => t.undeclared_variables(true).into_iter().collect(),
        Err(_) => Vec::new(),
    };
    if names.is_empty()
        && let Some(expr) = single_expression(source)
        && let Ok(e) = env.compile_expression(expr)
    {
        names = e.undeclared_variables(true).into_iter().collect();
    }
    names.sort();
    let missing = names.iter().find_map(|name| first_missing(ctx, name));
    let message = match missing {
        Some(name) => format!(
            "undefined variable `{name}` in `{}`; check the spelling, or use `{name} | default(...)` when it may be absent",
            excerpt(source)
        ),
        None => format!(
            "undefined value in `{}` (an attribute or item that does not exist)",
            excerpt(source)
        ),
    };
    TemplateError { message, line }
}

/// For a dotted name, the prefix up to the first segment missing in `ctx`.
fn first_missing(ctx: &Value, name: &str) -> Option<String> {
    let mut parts = name.split('.');
    let first = parts.next()?;
    if GLOBALS.contains(&first) || first == "kwargs" {
        return None;
    }
    let mut cur = ctx.get(first);
    let mut path = first.to_string();
    if cur.is_none() {
        return Some(path);
    }
    for part in parts {
        path.push('.');
        path.push_str(part);
        cur = match cur {
            Some(Value::Object(m)) => m.get(part),
            Some(Value::Array(l)) => part.parse::<usize>().ok().and_then(|i| l.get(i)),
            _ => None,
        };
        if cur.is_none() {
            return Some(path);
        }
    }
    None
}

fn excerpt(source: &str) -> String {
    let flat: String = source
        .chars()
        .map(|c| if c == '\n' { ' ' } else { c })
        .collect();
    if flat.chars().count() > 80 {
        let cut: String = flat.chars().take(77).collect();
        format!("{cut}...")
    } else {
        flat
    }
}

/// StackStorm-like filters.
mod filters {
    use minijinja::value::Value as JValue;
    use minijinja::{Environment, Error, ErrorKind};

    fn invalid(msg: String) -> Error {
        Error::new(ErrorKind::InvalidOperation, msg)
    }

    fn compile(pattern: &str) -> Result<regex::Regex, Error> {
        regex::Regex::new(pattern)
            .map_err(|e| invalid(format!("invalid regular expression `{pattern}`: {e}")))
    }

    fn to_json(value: &JValue) -> Result<String, Error> {
        serde_json::to_string(value)
            .map_err(|e| invalid(format!("value cannot be written as JSON: {e}")))
    }

    /// Python `re.sub` replacement (`\1`, `\g<name>`) to Rust syntax.
    fn python_replacement(rep: &str) -> String {
        let mut out = String::new();
        let chars: Vec<char> = rep.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            match chars[i] {
                '$' => out.push_str("$$"),
                '\\' if i + 1 < chars.len() && chars[i + 1].is_ascii_digit() => {
                    let mut j = i + 1;
                    while j < chars.len() && chars[j].is_ascii_digit() {
                        j += 1;
                    }
                    let n: String = chars[i + 1..j].iter().collect();
                    out.push_str(&format!("${{{n}}}"));
                    i = j;
                    continue;
                }
                '\\' if i + 2 < chars.len() && chars[i + 1] == 'g' && chars[i + 2] == '<' => {
                    if let Some(end) = chars[i + 3..].iter().position(|&c| c == '>') {
                        let name: String = chars[i + 3..i + 3 + end].iter().collect();
                        out.push_str(&format!("${{{name}}}"));
                        i = i + 3 + end + 1;
                        continue;
                    }
                    out.push('\\');
                }
                '\\' if i + 1 < chars.len() && chars[i + 1] == 'n' => {
                    out.push('\n');
                    i += 2;
                    continue;
                }
                '\\' if i + 1 < chars.len() && chars[i + 1] == '\\' => {
                    out.push('\\');
                    i += 2;
                    continue;
                }
                c => out.push(c),
            }
            i += 1;
        }
        out
    }

    /// Python `os.path.basename`.
    fn basename(path: String) -> String {
        match path.rsplit_once('/') {
            Some((_, base)) => base.to_string(),
            None => path,
        }
    }

    /// Python `os.path.dirname`.
    fn dirname(path: String) -> String {
        match path.rsplit_once('/') {
            Some((head, _)) => {
                let trimmed = head.trim_end_matches('/');
                if trimmed.is_empty() && !head.is_empty() {
                    head.to_string()
                } else {
                    trimmed.to_string()
                }
            }
            None => String::new(),
        }
    }

    pub(super) fn register(env: &mut Environment<'static>) {
        env.add_filter("to_json_string", |v: JValue| to_json(&v));
        env.add_filter("to_complex", |v: JValue| to_json(&v));
        env.add_filter("from_json_string", |s: String| {
            serde_json::from_str::<serde_json::Value>(&s)
                .map(JValue::from_serialize)
                .map_err(|e| invalid(format!("from_json_string: not valid JSON: {e}")))
        });
        env.add_filter("json_escape", |v: JValue| -> Result<String, Error> {
            let text = match v.as_str() {
                Some(s) => s.to_string(),
                None => v.to_string(),
            };
            let quoted = to_json(&JValue::from(text))?;
            Ok(quoted[1..quoted.len() - 1].to_string())
        });
        env.add_filter("regex_match", |v: String, p: String| {
            compile(&format!("^(?:{p})")).map(|re| re.is_match(&v))
        });
        env.add_filter("regex_search", |v: String, p: String| {
            compile(&p).map(|re| re.is_match(&v))
        });
        env.add_filter("regex_replace", |v: String, p: String, r: String| {
            compile(&p).map(|re| re.replace_all(&v, python_replacement(&r)).into_owned())
        });
        env.add_filter(
            "regex_substring",
            |v: String, p: String, idx: Option<usize>| -> Result<String, Error> {
                let re = compile(&p)?;
                let idx = idx.unwrap_or(0);
                let found = re.captures_iter(&v).nth(idx).ok_or_else(|| {
                    invalid(format!(
                        "regex_substring: no match #{idx} for `{p}` in the value"
                    ))
                })?;
                let m = if re.captures_len() > 1 {
                    found.get(1)
                } else {
                    found.get(0)
                };
                Ok(m.map(|m| m.as_str().to_string()).unwrap_or_default())
            },
        );
        env.add_filter("basename", basename);
        env.add_filter("dirname", dirname);
        env.add_filter("use_none", |v: JValue| {
            if v.is_undefined() {
                JValue::from(())
            } else {
                v
            }
        });
    }
}
