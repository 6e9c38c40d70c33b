//! Rule criteria: StackStorm's operators evaluated over a trigger instance.
//!
//! A criterion is `key: {type: <operator>, pattern: <value>}` where the key is
//! a path into the trigger instance (`trigger.body.ref`,
//! `trigger.headers['X-GitHub-Event']`). Evaluation is pure.
//!
//! Semantics follow StackStorm's `st2common/operators.py`, with these
//! documented, predictable rules where Python's dynamic typing decided:
//!
//! - A missing key, or a key whose value is JSON `null`, makes every operator
//!   fail except `nexists` (StackStorm treats `null` as "not there" too).
//! - A `null` pattern fails every operator except `exists`/`nexists`.
//! - Equality (`equals`, `nequals`, list membership in `contains`/`inside`)
//!   compares JSON values; numbers compare numerically (`1 == 1.0`); when one
//!   side is a string and the other a number or boolean, their string forms
//!   are compared (`"5" == 5`, `"true" == true`).
//! - String operators (`iequals`, `startswith`, `endswith` and their `i`
//!   variants, `matchwildcard`, `regex`, `iregex`) need a string value; a
//!   number or boolean pattern is used in its string form.
//! - `regex`/`iregex` find the pattern anywhere in the value (Python
//!   `re.search`, as StackStorm's `regex`); anchor with `^`/`$` yourself.
//!   `matchregex` is an alias of `regex` here.
//! - `lessthan`/`greaterthan` compare numbers numerically, strings
//!   lexicographically, and a numeric string against a number numerically.
//! - `timediff_lt`/`timediff_gt` compare `now - value` in seconds with the
//!   pattern; the value is RFC 3339, `YYYY-MM-DD HH:MM:SS[.f]` (UTC) or epoch
//!   seconds.
//! - `search` takes a list (an object is treated as a one-item list) and a
//!   pattern `{ "item.<path>[#tag]": {type, pattern[, condition]} }`.
//!
//! For throughput, build a [`CompiledCriteria`] once per rule: keys are
//! parsed and regular expressions compiled once.

use std::cmp::Ordering;

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A criteria operator, with StackStorm's names (and their short aliases).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operator {
    /// `equals`, `eq`
    Equals,
    /// `nequals`, `neq`
    NEquals,
    /// `lessthan`, `lt`
    LessThan,
    /// `greaterthan`, `gt`
    GreaterThan,
    /// `matchwildcard`
    MatchWildcard,
    /// `regex`, `matchregex`
    Regex,
    /// `iregex`
    IRegex,
    /// `iequals`
    IEquals,
    /// `contains`
    Contains,
    /// `ncontains`
    NContains,
    /// `icontains`
    IContains,
    /// `incontains`
    INContains,
    /// `startswith`
    StartsWith,
    /// `istartswith`
    IStartsWith,
    /// `endswith`
    EndsWith,
    /// `iendswith`
    IEndsWith,
    /// `timediff_lt`, `td_lt`
    TimeDiffLt,
    /// `timediff_gt`, `td_gt`
    TimeDiffGt,
    /// `exists`
    Exists,
    /// `nexists`
    NExists,
    /// `inside`
    Inside,
    /// `ninside`
    NInside,
    /// `search`
    Search,
}

impl Operator {
    /// Every operator with its canonical StackStorm name.
    pub const ALL: [(Operator, &'static str); 23] = [
        (Self::Equals, "equals"),
        (Self::NEquals, "nequals"),
        (Self::LessThan, "lessthan"),
        (Self::GreaterThan, "greaterthan"),
        (Self::MatchWildcard, "matchwildcard"),
        (Self::Regex, "regex"),
        (Self::IRegex, "iregex"),
        (Self::IEquals, "iequals"),
        (Self::Contains, "contains"),
        (Self::NContains, "ncontains"),
        (Self::IContains, "icontains"),
        (Self::INContains, "incontains"),
        (Self::StartsWith, "startswith"),
        (Self::IStartsWith, "istartswith"),
        (Self::EndsWith, "endswith"),
        (Self::IEndsWith, "iendswith"),
        (Self::TimeDiffLt, "timediff_lt"),
        (Self::TimeDiffGt, "timediff_gt"),
        (Self::Exists, "exists"),
        (Self::NExists, "nexists"),
        (Self::Inside, "inside"),
        (Self::NInside, "ninside"),
        (Self::Search, "search"),
    ];

    /// Parses an operator name or alias (case-sensitive, as StackStorm).
    pub fn parse(name: &str) -> Option<Self> {
        let canonical = match name {
            "eq" => "equals",
            "neq" => "nequals",
            "lt" => "lessthan",
            "gt" => "greaterthan",
            "matchregex" => "regex",
            "td_lt" => "timediff_lt",
            "td_gt" => "timediff_gt",
            "ieq" => "iequals",
            "in" => "inside",
            "nin" => "ninside",
            other => other,
        };
        Self::ALL
            .iter()
            .find(|(_, n)| *n == canonical)
            .map(|(op, _)| *op)
    }

    /// The canonical name.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(op, _)| *op == self)
            .map(|(_, n)| *n)
            .unwrap_or("?")
    }
}

/// How `search` combines its sub-criteria over the items of a list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SearchCondition {
    /// At least one item matches every sub-criterion.
    Any,
    /// Every item matches every sub-criterion.
    All,
    /// At least one item matches at least one sub-criterion.
    Any2Any,
    /// Every item matches at least one sub-criterion.
    All2Any,
}

/// One criterion of a rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Criterion {
    /// Path into the trigger instance, as written (`trigger.body.ref`).
    pub key: String,
    /// The operator.
    pub op: Operator,
    /// The pattern (for `search`: a map of item sub-criteria).
    pub pattern: Value,
    /// For `search` only.
    pub condition: Option<SearchCondition>,
}

impl SearchCondition {
    /// Parses `any`, `all`, `any2any` or `all2any`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "any" => Some(Self::Any),
            "all" => Some(Self::All),
            "any2any" => Some(Self::Any2Any),
            "all2any" => Some(Self::All2Any),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------
// Key paths
// ---------------------------------------------------------------------------

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathSegment {
    /// An object key (`.name`, `['name']`). On a list, a key made of digits
    /// (`list.0`) is used as an index.
    Key(String),
    /// A list index (`[0]`). On an object, it looks up the key `"0"`.
    Index(usize),
}

/// A syntactically bad criteria key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "bad criteria key `{key}` at character {position}: {reason}; write keys like \
     `trigger.body.ref`, `trigger.headers['X-GitHub-Event']` or `trigger.body.commits[0].id`"
)]
pub struct KeyPathError {
    /// The key as written.
    pub key: String,
    /// 0-based character offset of the problem.
    pub position: usize,
    /// What is wrong.
    pub reason: String,
}

/// Parses a key path: dotted names, `['quoted']`/`["quoted"]` keys, `[n]`
/// indexes and numeric segments (`list.0`).
pub fn parse_key(key: &str) -> Result<Vec<PathSegment>, KeyPathError> {
    let err = |position: usize, reason: &str| KeyPathError {
        key: key.to_string(),
        position,
        reason: reason.to_string(),
    };
    let chars: Vec<char> = key.chars().collect();
    let mut segments = Vec::new();
    let mut i = 0;
    // True when a bare name must (or may) follow: at the start or after '.'.
    let mut expect_name = true;
    if chars.is_empty() {
        return Err(err(0, "the key is empty"));
    }
    while i < chars.len() {
        let c = chars[i];
        if c == '[' {
            if expect_name && i != 0 {
                return Err(err(i, "'[' right after '.'"));
            }
            if i == 0 {
                return Err(err(0, "a key cannot start with '['"));
            }
            i += 1;
            let Some(&open) = chars.get(i) else {
                return Err(err(i, "unclosed '['"));
            };
            if open == '\'' || open == '"' {
                i += 1;
                let mut name = String::new();
                loop {
                    match chars.get(i) {
                        None => return Err(err(i, "unterminated quoted key")),
                        Some('\\') => {
                            match chars.get(i + 1) {
                                Some(&n) => name.push(n),
                                None => return Err(err(i, "unterminated quoted key")),
                            }
                            i += 2;
                        }
                        Some(&q) if q == open => {
                            i += 1;
                            break;
                        }
                        Some(&other) => {
                            name.push(other);
                            i += 1;
                        }
                    }
                }
                if chars.get(i) != Some(&']') {
                    return Err(err(i, "expected ']' after the quoted key"));
                }
                i += 1;
                segments.push(PathSegment::Key(name));
            } else {
                let start = i;
                while i < chars.len() && chars[i] != ']' {
                    i += 1;
                }
                if i >= chars.len() {
                    return Err(err(start, "unclosed '['"));
                }
                let inner: String = chars[start..i].iter().collect();
                let inner = inner.trim();
                if inner.is_empty() {
                    return Err(err(start, "empty '[]'"));
                }
                i += 1;
                match inner.parse::<usize>() {
                    Ok(n) => segments.push(PathSegment::Index(n)),
                    Err(_) => segments.push(PathSegment::Key(inner.to_string())),
                }
            }
            expect_name = false;
            match chars.get(i) {
                None | Some('[') => {}
                Some('.') => {
                    i += 1;
                    expect_name = true;
                    if i >= chars.len() {
                        return Err(err(i - 1, "the key ends with '.'"));
                    }
                }
                Some(_) => return Err(err(i, "expected '.' or '[' after ']'")),
            }
        } else {
            if !expect_name {
                return Err(err(i, "expected '.' or '['"));
            }
            let start = i;
            while i < chars.len() && chars[i] != '.' && chars[i] != '[' {
                if chars[i] == ']' || chars[i] == '\'' || chars[i] == '"' {
                    return Err(err(i, "unexpected character; quote keys with ['...']"));
                }
                i += 1;
            }
            if i == start {
                return Err(err(i, "empty name (two dots, or a leading dot)"));
            }
            let name: String = chars[start..i].iter().collect();
            segments.push(PathSegment::Key(name));
            expect_name = false;
            if chars.get(i) == Some(&'.') {
                i += 1;
                expect_name = true;
                if i >= chars.len() {
                    return Err(err(i - 1, "the key ends with '.'"));
                }
            }
        }
    }
    Ok(segments)
}

/// Resolves parsed segments against a value. Under a `headers` key, object
/// keys fall back to a case-insensitive match (HTTP header names are
/// case-insensitive).
pub fn resolve<'a>(root: &'a Value, path: &[PathSegment]) -> Option<&'a Value> {
    let mut cur = root;
    let mut in_headers = false;
    for seg in path {
        cur = match (seg, cur) {
            (PathSegment::Key(k), Value::Object(map)) => match map.get(k) {
                Some(v) => v,
                None if in_headers => map
                    .iter()
                    .find(|(name, _)| name.eq_ignore_ascii_case(k))
                    .map(|(_, v)| v)?,
                None => return None,
            },
            (PathSegment::Key(k), Value::Array(list)) => list.get(k.parse::<usize>().ok()?)?,
            (PathSegment::Index(n), Value::Array(list)) => list.get(*n)?,
            (PathSegment::Index(n), Value::Object(map)) => map.get(&n.to_string())?,
            _ => return None,
        };
        in_headers = matches!(seg, PathSegment::Key(k) if k == "headers");
    }
    Some(cur)
}

/// Resolves a key path against the trigger instance context. The context
/// given is the JSON object `{"trigger": <payload>}` (plus anything else).
/// Key syntax as StackStorm: `trigger.body.ref`,
/// `trigger.headers['X-GitHub-Event']`, `trigger.headers["X"]`,
/// `trigger.body.commits[0].id`, `trigger.body.list.0`. A bad key yields
/// `None` (use [`parse_key`] to report it).
pub fn lookup<'a>(ctx: &'a Value, key: &str) -> Option<&'a Value> {
    let path = parse_key(key).ok()?;
    resolve(ctx, &path)
}

// ---------------------------------------------------------------------------
// Dates
// ---------------------------------------------------------------------------

/// Parses a time as RFC 3339, `YYYY-MM-DD HH:MM:SS[.f]` or
/// `YYYY-MM-DDTHH:MM:SS[.f]` (both UTC), or epoch seconds (number or
/// numeric string).
pub fn parse_time(value: &Value) -> Option<DateTime<Utc>> {
    match value {
        Value::Number(n) => epoch(n.as_f64()?),
        Value::String(s) => {
            let s = s.trim();
            if let Ok(t) = DateTime::parse_from_rfc3339(s) {
                return Some(t.with_timezone(&Utc));
            }
            for fmt in ["%Y-%m-%d %H:%M:%S%.f%:z", "%Y-%m-%d %H:%M:%S%.f%z"] {
                if let Ok(t) = DateTime::parse_from_str(s, fmt) {
                    return Some(t.with_timezone(&Utc));
                }
            }
            for fmt in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
                if let Ok(t) = NaiveDateTime::parse_from_str(s, fmt) {
                    return Some(Utc.from_utc_datetime(&t));
                }
            }
            epoch(s.parse::<f64>().ok()?)
        }
        _ => None,
    }
}

fn epoch(secs: f64) -> Option<DateTime<Utc>> {
    if !secs.is_finite() {
        return None;
    }
    let whole = secs.floor();
    let nanos = ((secs - whole) * 1e9).round().min(999_999_999.0) as u32;
    DateTime::from_timestamp(whole as i64, nanos)
}

// ---------------------------------------------------------------------------
// Compilation
// ---------------------------------------------------------------------------

/// What a compiled criterion needs beyond its pattern.
#[derive(Debug, Clone)]
enum Prepared {
    /// Nothing to prepare.
    Plain,
    /// `regex`, `iregex`, `matchwildcard`.
    Regex(regex::Regex),
    /// `timediff_*`: the period in seconds.
    Seconds(f64),
    /// `search`.
    Search {
        condition: SearchCondition,
        children: Vec<CompiledCriterion>,
    },
}

/// A criterion with its key parsed and its regex compiled: build once per
/// rule, evaluate many times.
#[derive(Debug, Clone)]
pub struct CompiledCriterion {
    key: String,
    path: Vec<PathSegment>,
    op: Operator,
    pattern: Value,
    prepared: Prepared,
}

/// Translates an `fnmatch` pattern (Python semantics: `*`, `?`, `[seq]`,
/// `[!seq]`; a `[` without `]` is literal; `*` also matches `/`) into an
/// anchored regex.
pub fn wildcard_to_regex(pattern: &str) -> String {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = String::from("(?s)^");
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        match c {
            '*' => out.push_str(".*"),
            '?' => out.push('.'),
            '[' => {
                let mut j = i;
                if j < chars.len() && chars[j] == '!' {
                    j += 1;
                }
                if j < chars.len() && chars[j] == ']' {
                    j += 1;
                }
                while j < chars.len() && chars[j] != ']' {
                    j += 1;
                }
                if j >= chars.len() {
                    out.push_str("\\[");
                } else {
                    let mut body: String = chars[i..j].iter().collect();
                    i = j + 1;
                    let negate = body.starts_with('!');
                    if negate {
                        body.remove(0);
                    }
                    let mut class = String::from("[");
                    if negate {
                        class.push('^');
                    }
                    for ch in body.chars() {
                        match ch {
                            '\\' | '[' | ']' | '&' | '~' | '^' => {
                                class.push('\\');
                                class.push(ch);
                            }
                            _ => class.push(ch),
                        }
                    }
                    class.push(']');
                    out.push_str(&class);
                }
            }
            other => out.push_str(&regex::escape(&other.to_string())),
        }
    }
    out.push('$');
    out
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn pattern_seconds(pattern: &Value) -> Option<f64> {
    match pattern {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
    .filter(|f| f.is_finite())
}

impl CompiledCriterion {
    /// Compiles a criterion; the error says what is wrong with it.
    pub fn compile(c: &Criterion) -> Result<Self, String> {
        let path = parse_key(&c.key).map_err(|e| e.to_string())?;
        Self::compile_with_path(c, path)
    }

    fn compile_with_path(c: &Criterion, path: Vec<PathSegment>) -> Result<Self, String> {
        let where_ = format!("criterion `{}` ({})", c.key, c.op.name());
        let prepared = match c.op {
            Operator::Regex | Operator::IRegex | Operator::MatchWildcard => {
                if c.pattern.is_null() {
                    Prepared::Plain
                } else {
                    let text = scalar_text(&c.pattern).ok_or_else(|| {
                        format!("{where_}: the pattern must be a string, not {}", c.pattern)
                    })?;
                    let source = match c.op {
                        Operator::MatchWildcard => wildcard_to_regex(&text),
                        Operator::IRegex => format!("(?i){text}"),
                        _ => text,
                    };
                    let re = regex::Regex::new(&source).map_err(|e| {
                        format!("{where_}: the pattern is not a valid regular expression: {e}")
                    })?;
                    Prepared::Regex(re)
                }
            }
            Operator::TimeDiffLt | Operator::TimeDiffGt => {
                if c.pattern.is_null() {
                    Prepared::Plain
                } else {
                    let secs = pattern_seconds(&c.pattern).ok_or_else(|| {
                        format!(
                            "{where_}: the pattern must be a number of seconds, not {}",
                            c.pattern
                        )
                    })?;
                    Prepared::Seconds(secs)
                }
            }
            Operator::Inside | Operator::NInside => {
                if !matches!(
                    c.pattern,
                    Value::Array(_) | Value::String(_) | Value::Object(_) | Value::Null
                ) {
                    return Err(format!(
                        "{where_}: the pattern must be a list or a string, not {}",
                        c.pattern
                    ));
                }
                Prepared::Plain
            }
            Operator::Search => {
                let condition = c.condition.ok_or_else(|| {
                    format!("{where_}: `search` needs `condition: any|all|any2any|all2any`")
                })?;
                let Value::Object(map) = &c.pattern else {
                    return Err(format!(
                        "{where_}: the pattern must be a map of `item.<field>: {{type, pattern}}`, not {}",
                        c.pattern
                    ));
                };
                if map.is_empty() {
                    return Err(format!("{where_}: the pattern has no sub-criteria"));
                }
                let mut children = Vec::with_capacity(map.len());
                for (sub_key, spec) in map {
                    children.push(compile_child(&where_, sub_key, spec)?);
                }
                Prepared::Search {
                    condition,
                    children,
                }
            }
            _ => Prepared::Plain,
        };
        Ok(Self {
            key: c.key.clone(),
            path,
            op: c.op,
            pattern: c.pattern.clone(),
            prepared,
        })
    }

    /// The key as written.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The operator.
    pub fn op(&self) -> Operator {
        self.op
    }

    /// Evaluates against a context (for top-level criteria: the
    /// `{"trigger": ...}` object) at time `now`.
    pub fn matches(&self, ctx: &Value, now: DateTime<Utc>) -> bool {
        let value = resolve(ctx, &self.path).filter(|v| !v.is_null());
        self.matches_value(value, now)
    }

    fn matches_value(&self, value: Option<&Value>, now: DateTime<Utc>) -> bool {
        match self.op {
            Operator::Exists => return value.is_some(),
            Operator::NExists => return value.is_none(),
            _ => {}
        }
        let Some(v) = value else {
            return false;
        };
        let p = &self.pattern;
        if p.is_null() {
            // StackStorm: `nequals(value, None)` is `value != None`.
            return self.op == Operator::NEquals;
        }
        match self.op {
            Operator::Equals => loose_eq(v, p),
            Operator::NEquals => !loose_eq(v, p),
            Operator::IEquals => str_op(v, p, |a, b| a.to_lowercase() == b.to_lowercase()),
            Operator::StartsWith => str_op(v, p, |a, b| a.starts_with(b)),
            Operator::IStartsWith => {
                str_op(v, p, |a, b| a.to_lowercase().starts_with(&b.to_lowercase()))
            }
            Operator::EndsWith => str_op(v, p, |a, b| a.ends_with(b)),
            Operator::IEndsWith => {
                str_op(v, p, |a, b| a.to_lowercase().ends_with(&b.to_lowercase()))
            }
            Operator::Contains => contains(v, p, false).unwrap_or(false),
            Operator::NContains => contains(v, p, false).map(|b| !b).unwrap_or(false),
            Operator::IContains => contains(v, p, true).unwrap_or(false),
            Operator::INContains => contains(v, p, true).map(|b| !b).unwrap_or(false),
            Operator::Inside => contains(p, v, false).unwrap_or(false),
            Operator::NInside => contains(p, v, false).map(|b| !b).unwrap_or(false),
            Operator::LessThan => compare(v, p) == Some(Ordering::Less),
            Operator::GreaterThan => compare(v, p) == Some(Ordering::Greater),
            Operator::Regex | Operator::IRegex | Operator::MatchWildcard => {
                match (&self.prepared, v) {
                    (Prepared::Regex(re), Value::String(s)) => re.is_match(s),
                    _ => false,
                }
            }
            Operator::TimeDiffLt | Operator::TimeDiffGt => {
                let (Prepared::Seconds(period), Some(t)) = (&self.prepared, parse_time(v)) else {
                    return false;
                };
                let diff = (now - t).num_milliseconds() as f64 / 1000.0;
                if self.op == Operator::TimeDiffLt {
                    diff < *period
                } else {
                    diff > *period
                }
            }
            Operator::Search => {
                let Prepared::Search {
                    condition,
                    children,
                } = &self.prepared
                else {
                    return false;
                };
                let items: &[Value] = match v {
                    Value::Array(list) => list,
                    Value::Object(_) => std::slice::from_ref(v),
                    _ => return false,
                };
                let item_matches = |item: &Value| {
                    let one = |c: &CompiledCriterion| {
                        c.matches_value(resolve(item, &c.path).filter(|x| !x.is_null()), now)
                    };
                    match condition {
                        SearchCondition::Any | SearchCondition::All => children.iter().all(one),
                        SearchCondition::Any2Any | SearchCondition::All2Any => {
                            children.iter().any(one)
                        }
                    }
                };
                match condition {
                    SearchCondition::Any | SearchCondition::Any2Any => {
                        items.iter().any(item_matches)
                    }
                    SearchCondition::All | SearchCondition::All2Any => {
                        items.iter().all(item_matches)
                    }
                }
            }
            Operator::Exists | Operator::NExists => false,
        }
    }
}

fn compile_child(where_: &str, sub_key: &str, spec: &Value) -> Result<CompiledCriterion, String> {
    // "item.field#2": text after '#' only makes map keys unique.
    let key = sub_key.split('#').next().unwrap_or(sub_key).trim();
    let mut path = parse_key(key).map_err(|e| format!("{where_}: {e}"))?;
    if path.first() != Some(&PathSegment::Key("item".to_string())) || path.len() < 2 {
        return Err(format!(
            "{where_}: sub-criterion key `{sub_key}` must start with `item.` (the list item)"
        ));
    }
    path.remove(0);
    let Value::Object(spec) = spec else {
        return Err(format!(
            "{where_}: sub-criterion `{sub_key}` must be a map with `type` and `pattern`"
        ));
    };
    let type_name = spec.get("type").and_then(Value::as_str).ok_or_else(|| {
        format!("{where_}: sub-criterion `{sub_key}` needs a `type` (an operator name)")
    })?;
    let op = Operator::parse(type_name).ok_or_else(|| {
        format!("{where_}: sub-criterion `{sub_key}` has unknown operator `{type_name}`")
    })?;
    let condition = match spec.get("condition") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(SearchCondition::parse(s).ok_or_else(|| {
            format!(
                "{where_}: sub-criterion `{sub_key}` has unknown condition `{s}` (any, all, any2any, all2any)"
            )
        })?),
        Some(other) => {
            return Err(format!(
                "{where_}: sub-criterion `{sub_key}` condition must be a string, not {other}"
            ));
        }
    };
    let child = Criterion {
        key: key.to_string(),
        op,
        pattern: spec.get("pattern").cloned().unwrap_or(Value::Null),
        condition,
    };
    CompiledCriterion::compile_with_path(&child, path)
}

/// String form used for loose comparisons between strings and scalars.
fn loose_text(v: &Value) -> Option<std::borrow::Cow<'_, str>> {
    match v {
        Value::String(s) => Some(std::borrow::Cow::Borrowed(s)),
        Value::Number(n) => Some(std::borrow::Cow::Owned(n.to_string())),
        Value::Bool(b) => Some(std::borrow::Cow::Borrowed(if *b {
            "true"
        } else {
            "false"
        })),
        _ => None,
    }
}

/// Equality: numbers numerically; string vs number/bool by string form
/// (booleans case-insensitively); otherwise JSON equality.
fn loose_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(i), Some(j)) => i == j,
            _ => match (x.as_u64(), y.as_u64()) {
                (Some(i), Some(j)) => i == j,
                _ => x.as_f64() == y.as_f64(),
            },
        },
        (Value::String(s), Value::Bool(bv)) | (Value::Bool(bv), Value::String(s)) => {
            s.eq_ignore_ascii_case(if *bv { "true" } else { "false" })
        }
        (Value::String(s), Value::Number(n)) | (Value::Number(n), Value::String(s)) => {
            *s == n.to_string()
        }
        _ => a == b,
    }
}

/// A string operator: the value must be a string; the pattern a scalar.
fn str_op(v: &Value, p: &Value, f: impl Fn(&str, &str) -> bool) -> bool {
    match (v, loose_text(p)) {
        (Value::String(s), Some(pat)) => f(s, &pat),
        _ => false,
    }
}

/// Python's `needle in haystack`; `None` when the types don't allow it
/// (Python would raise, StackStorm then fails the criterion).
fn contains(haystack: &Value, needle: &Value, ignore_case: bool) -> Option<bool> {
    match haystack {
        Value::String(s) => {
            let n = loose_text(needle)?;
            Some(if ignore_case {
                s.to_lowercase().contains(&n.to_lowercase())
            } else {
                s.contains(n.as_ref())
            })
        }
        Value::Array(items) => Some(items.iter().any(|item| {
            if ignore_case {
                match (item, needle) {
                    (Value::String(a), Value::String(b)) => a.to_lowercase() == b.to_lowercase(),
                    _ => loose_eq(item, needle),
                }
            } else {
                loose_eq(item, needle)
            }
        })),
        Value::Object(map) => {
            let n = loose_text(needle)?;
            Some(if ignore_case {
                let n = n.to_lowercase();
                map.keys().any(|k| k.to_lowercase() == n)
            } else {
                map.contains_key(n.as_ref())
            })
        }
        _ => None,
    }
}

/// Ordering for `lessthan`/`greaterthan`.
fn compare(v: &Value, p: &Value) -> Option<Ordering> {
    let num = |x: &Value| match x {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    match (v, p) {
        (Value::String(a), Value::String(b)) => Some(a.as_str().cmp(b.as_str())),
        (Value::Number(_), _) | (_, Value::Number(_)) => num(v)?.partial_cmp(&num(p)?),
        _ => None,
    }
}

impl Criterion {
    /// Load-time check: key syntax, regex compiles, search pattern shape,
    /// timediff pattern is a number, inside/ninside patterns are lists or
    /// strings. The error names the criterion and says what to fix.
    pub fn validate(&self) -> Result<(), String> {
        CompiledCriterion::compile(self).map(|_| ())
    }

    /// Evaluates against the context at time `now`. This compiles the
    /// criterion on every call (an invalid criterion never matches); use
    /// [`CompiledCriteria`] on hot paths.
    pub fn matches(&self, ctx: &Value, now: DateTime<Utc>) -> bool {
        CompiledCriterion::compile(self)
            .map(|c| c.matches(ctx, now))
            .unwrap_or(false)
    }
}

/// All criteria must hold (empty = match). Returns the first failing
/// criterion's index for diagnostics. Compiles on every call; use
/// [`CompiledCriteria`] on hot paths.
pub fn evaluate_all(criteria: &[Criterion], ctx: &Value, now: DateTime<Utc>) -> Result<(), usize> {
    for (i, c) in criteria.iter().enumerate() {
        if !c.matches(ctx, now) {
            return Err(i);
        }
    }
    Ok(())
}

/// A rule's criteria, compiled once (keys parsed, regexes compiled).
#[derive(Debug, Clone, Default)]
pub struct CompiledCriteria {
    items: Vec<CompiledCriterion>,
}

/// A criterion that failed to compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("criterion #{index}: {message}")]
pub struct CriteriaError {
    /// Index of the criterion in the rule's list.
    pub index: usize,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl CompiledCriteria {
    /// Compiles every criterion; fails on the first invalid one.
    pub fn new(criteria: &[Criterion]) -> Result<Self, CriteriaError> {
        let items = criteria
            .iter()
            .enumerate()
            .map(|(index, c)| {
                CompiledCriterion::compile(c).map_err(|message| CriteriaError { index, message })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { items })
    }

    /// All criteria must hold (empty = match); `Err(i)` names the first
    /// failing criterion.
    pub fn evaluate(&self, ctx: &Value, now: DateTime<Utc>) -> Result<(), usize> {
        match self.items.iter().position(|c| !c.matches(ctx, now)) {
            Some(i) => Err(i),
            None => Ok(()),
        }
    }

    /// The compiled criteria, in order.
    pub fn items(&self) -> &[CompiledCriterion] {
        &self.items
    }

    /// Number of criteria.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when there are no criteria (everything matches).
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}
