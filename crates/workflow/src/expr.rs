//! Orquesta expressions: YAQL `<% ... %>` (a subset, parsed by a tokenizer
//! and a Pratt parser) and Jinja `{{ ... }}` (minijinja with Orquesta's
//! functions).
//!
//! Supported YAQL: `ctx()`, `ctx(name)`, `ctx('name')`, attribute and index
//! access (`ctx().a.b`, `ctx(a).b[0]`), `$` (the context, as Mistral's
//! `$.x`), `succeeded()`, `failed()`, `completed()`, `result()`, `item()`,
//! `item(name)`, `task_status(name)`, `st2kv('key')`, `and`/`or`/`not`,
//! `=`/`!=`/`<`/`>`/`<=`/`>=`, `in`, `+ - * / mod`, unary minus, string,
//! number, boolean and null literals, lists `[a, b]`, dicts `{k => v}`, and
//! the functions `list()`, `dict()`, `zip()`, `str()`, `int()`, `float()`,
//! `bool()`, `len()`. Anything else is a load-time error naming the
//! construct and its position, never a wrong value.
//!
//! A string that is exactly one expression yields the expression's native
//! JSON value; an expression embedded in text renders into a string.

use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

/// An expression that could not be parsed or evaluated.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ExprError {
    /// What is wrong, naming the expression.
    pub message: String,
}

impl ExprError {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}

/// The task whose transitions or retry are being evaluated.
#[derive(Debug, Clone, PartialEq)]
pub struct CurrentTask {
    /// Task name.
    pub id: String,
    /// Task status (`succeeded`, `failed`...).
    pub status: String,
    /// Task result (for with-items: the list of item results).
    pub result: Value,
}

/// Datastore lookup for `st2kv('key')` and `st2kv('key', decrypt=true)`:
/// the key and whether a secret is wanted decrypted.
pub type KvLookup<'a> = &'a dyn Fn(&str, bool) -> Option<Value>;

/// Everything an expression can see.
#[derive(Clone, Default)]
pub struct Scope<'a> {
    /// The workflow context (input, vars, published values).
    pub ctx: Map<String, Value>,
    /// The current task, when evaluating transitions.
    pub current: Option<CurrentTask>,
    /// The current item, for with-items tasks.
    pub item: Option<Value>,
    /// Latest status of each task that has run (`task_status(name)`).
    pub task_statuses: BTreeMap<String, String>,
    /// Datastore lookup for `st2kv(...)`; `None` makes `st2kv` an error.
    pub kv: Option<KvLookup<'a>>,
}

impl std::fmt::Debug for Scope<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scope")
            .field("ctx", &self.ctx)
            .field("current", &self.current)
            .field("item", &self.item)
            .field("task_statuses", &self.task_statuses)
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------- tokens

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(Value),
    Str(String),
    Ident(String),
    Sym(&'static str),
}

const SYMBOLS: [&str; 19] = [
    "=>", "!=", "<=", ">=", "(", ")", "[", "]", "{", "}", ",", ".", "+", "-", "*", "/", "=", "<",
    ">",
];

fn tokenize(src: &str) -> Result<Vec<(Tok, usize)>, ExprError> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        if c == '\'' || c == '"' {
            let quote = c;
            let mut s = String::new();
            i += 1;
            loop {
                match chars.get(i) {
                    None => {
                        return Err(ExprError::new(format!(
                            "unterminated string starting at column {}",
                            start + 1
                        )));
                    }
                    Some('\\') => {
                        match chars.get(i + 1) {
                            Some('n') => s.push('\n'),
                            Some('t') => s.push('\t'),
                            Some(other) => s.push(*other),
                            None => {}
                        }
                        i += 2;
                    }
                    Some(ch) if *ch == quote => {
                        i += 1;
                        break;
                    }
                    Some(ch) => {
                        s.push(*ch);
                        i += 1;
                    }
                }
            }
            out.push((Tok::Str(s), start));
            continue;
        }
        if c.is_ascii_digit() {
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                // A dot followed by a non-digit is attribute access, not a decimal point.
                if chars[i] == '.' && !chars.get(i + 1).is_some_and(|d| d.is_ascii_digit()) {
                    break;
                }
                i += 1;
            }
            let text: String = chars[start..i].iter().collect();
            let num = if text.contains('.') {
                text.parse::<f64>()
                    .ok()
                    .and_then(serde_json::Number::from_f64)
                    .map(Value::Number)
            } else {
                text.parse::<i64>().ok().map(Value::from)
            };
            let num = num.ok_or_else(|| ExprError::new(format!("bad number `{text}`")))?;
            out.push((Tok::Num(num), start));
            continue;
        }
        if c.is_alphabetic() || c == '_' || c == '$' {
            i += 1;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push((Tok::Ident(chars[start..i].iter().collect()), start));
            continue;
        }
        let rest: String = chars[i..chars.len().min(i + 2)].iter().collect();
        match SYMBOLS.iter().find(|s| rest.starts_with(**s)) {
            Some(sym) => {
                out.push((Tok::Sym(sym), start));
                i += sym.chars().count();
            }
            None => {
                return Err(ExprError::new(format!(
                    "unsupported character `{c}` at column {}",
                    start + 1
                )));
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------- AST

#[derive(Debug, Clone, Copy, PartialEq)]
enum BinOp {
    Or,
    And,
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
    In,
    Add,
    Sub,
    Mul,
    Div,
    Mod,
}

#[derive(Debug, Clone, PartialEq)]
enum Ast {
    Lit(Value),
    Dollar,
    Call(String, Vec<Ast>),
    Attr(Box<Ast>, String),
    Index(Box<Ast>, Box<Ast>),
    Neg(Box<Ast>),
    Not(Box<Ast>),
    Bin(BinOp, Box<Ast>, Box<Ast>),
    List(Vec<Ast>),
    Dict(Vec<(Ast, Ast)>),
}

/// Functions a YAQL expression may call, with their allowed argument counts.
const FUNCTIONS: [(&str, usize, usize); 16] = [
    ("ctx", 0, 1),
    ("succeeded", 0, 0),
    ("failed", 0, 0),
    ("completed", 0, 0),
    ("result", 0, 0),
    ("item", 0, 1),
    ("task_status", 1, 1),
    ("st2kv", 1, 2),
    ("list", 0, usize::MAX),
    ("dict", 0, usize::MAX),
    ("zip", 1, usize::MAX),
    ("str", 1, 1),
    ("int", 1, 1),
    ("float", 1, 1),
    ("bool", 1, 1),
    ("len", 1, 1),
];

struct Parser<'s> {
    src: &'s str,
    toks: Vec<(Tok, usize)>,
    pos: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|(t, _)| t)
    }

    fn col(&self) -> usize {
        self.toks
            .get(self.pos)
            .map(|(_, c)| c + 1)
            .unwrap_or(self.src.chars().count() + 1)
    }

    fn err<T>(&self, what: &str) -> Result<T, ExprError> {
        Err(ExprError::new(format!(
            "{what} at column {} in `{}`",
            self.col(),
            self.src.trim()
        )))
    }

    fn eat_sym(&mut self, sym: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Sym(s)) if *s == sym) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect_sym(&mut self, sym: &str) -> Result<(), ExprError> {
        if self.eat_sym(sym) {
            Ok(())
        } else {
            self.err(&format!("expected `{sym}`"))
        }
    }

    fn infix(&self) -> Option<(BinOp, u8)> {
        let op = match self.peek()? {
            Tok::Ident(w) if w == "or" => (BinOp::Or, 1),
            Tok::Ident(w) if w == "and" => (BinOp::And, 2),
            Tok::Ident(w) if w == "in" => (BinOp::In, 4),
            Tok::Ident(w) if w == "mod" => (BinOp::Mod, 6),
            Tok::Sym("=") => (BinOp::Eq, 4),
            Tok::Sym("!=") => (BinOp::Ne, 4),
            Tok::Sym("<") => (BinOp::Lt, 4),
            Tok::Sym(">") => (BinOp::Gt, 4),
            Tok::Sym("<=") => (BinOp::Le, 4),
            Tok::Sym(">=") => (BinOp::Ge, 4),
            Tok::Sym("+") => (BinOp::Add, 5),
            Tok::Sym("-") => (BinOp::Sub, 5),
            Tok::Sym("*") => (BinOp::Mul, 6),
            Tok::Sym("/") => (BinOp::Div, 6),
            _ => return None,
        };
        Some(op)
    }

    fn expr(&mut self, min_bp: u8) -> Result<Ast, ExprError> {
        let mut lhs = self.prefix()?;
        loop {
            // Postfix: attribute and index access bind tightest.
            if self.eat_sym(".") {
                match self.toks.get(self.pos).cloned() {
                    Some((Tok::Ident(name), _)) => {
                        self.pos += 1;
                        if matches!(self.peek(), Some(Tok::Sym("("))) {
                            return self.err(&format!(
                                "method call `.{name}(...)` is not supported (use a function, e.g. `len(x)`)"
                            ));
                        }
                        lhs = Ast::Attr(Box::new(lhs), name);
                    }
                    _ => return self.err("expected a name after `.`"),
                }
                continue;
            }
            if self.eat_sym("[") {
                let index = self.expr(0)?;
                self.expect_sym("]")?;
                lhs = Ast::Index(Box::new(lhs), Box::new(index));
                continue;
            }
            let Some((op, bp)) = self.infix() else { break };
            if bp <= min_bp {
                break;
            }
            self.pos += 1;
            let rhs = self.expr(bp)?;
            lhs = Ast::Bin(op, Box::new(lhs), Box::new(rhs));
        }
        Ok(lhs)
    }

    fn prefix(&mut self) -> Result<Ast, ExprError> {
        let Some((tok, _)) = self.toks.get(self.pos).cloned() else {
            return self.err("unexpected end of expression");
        };
        self.pos += 1;
        match tok {
            Tok::Num(n) => Ok(Ast::Lit(n)),
            Tok::Str(s) => Ok(Ast::Lit(Value::String(s))),
            Tok::Sym("-") => Ok(Ast::Neg(Box::new(self.expr(6)?))),
            Tok::Sym("(") => {
                let inner = self.expr(0)?;
                self.expect_sym(")")?;
                Ok(inner)
            }
            Tok::Sym("[") => {
                let mut items = Vec::new();
                if !self.eat_sym("]") {
                    loop {
                        items.push(self.expr(0)?);
                        if self.eat_sym("]") {
                            break;
                        }
                        self.expect_sym(",")?;
                    }
                }
                Ok(Ast::List(items))
            }
            Tok::Sym("{") => {
                let mut entries = Vec::new();
                if !self.eat_sym("}") {
                    loop {
                        let k = self.expr(0)?;
                        self.expect_sym("=>")?;
                        let v = self.expr(0)?;
                        entries.push((k, v));
                        if self.eat_sym("}") {
                            break;
                        }
                        self.expect_sym(",")?;
                    }
                }
                Ok(Ast::Dict(entries))
            }
            Tok::Ident(word) => match word.as_str() {
                "true" => Ok(Ast::Lit(Value::Bool(true))),
                "false" => Ok(Ast::Lit(Value::Bool(false))),
                "null" | "none" => Ok(Ast::Lit(Value::Null)),
                "not" => Ok(Ast::Not(Box::new(self.expr(3)?))),
                "$" => Ok(Ast::Dollar),
                _ => {
                    if !self.eat_sym("(") {
                        self.pos -= 1;
                        return self.err(&format!(
                            "unsupported name `{word}` (variables are read with ctx({word}) or ctx().{word})"
                        ));
                    }
                    let Some(&(_, min, max)) = FUNCTIONS.iter().find(|(n, _, _)| *n == word) else {
                        self.pos -= 2;
                        return self.err(&format!("unsupported function `{word}()`"));
                    };
                    let mut args = Vec::new();
                    if !self.eat_sym(")") {
                        loop {
                            // A bare name as a whole argument is a YAQL keyword
                            // string: ctx(name), task_status(name), list(a, b).
                            let bare = match (self.toks.get(self.pos), self.toks.get(self.pos + 1))
                            {
                                (Some((Tok::Ident(n), _)), Some((Tok::Sym(")" | ","), _)))
                                    if !matches!(
                                        n.as_str(),
                                        "true" | "false" | "null" | "none" | "$"
                                    ) =>
                                {
                                    Some(n.clone())
                                }
                                _ => None,
                            };
                            // st2kv('key', decrypt=true): the keyword names the 2nd argument.
                            if word == "st2kv"
                                && let (Some((Tok::Ident(n), _)), Some((Tok::Sym("="), _))) =
                                    (self.toks.get(self.pos), self.toks.get(self.pos + 1))
                                && n == "decrypt"
                            {
                                self.pos += 2;
                            }
                            if let Some(name) = bare {
                                self.pos += 1;
                                args.push(Ast::Lit(Value::String(name)));
                            } else {
                                args.push(self.expr(0)?);
                            }
                            if self.eat_sym(")") {
                                break;
                            }
                            self.expect_sym(",")?;
                        }
                    }
                    if args.len() < min || args.len() > max {
                        return self.err(&format!(
                            "`{word}()` takes {} argument(s), got {}",
                            if min == max {
                                min.to_string()
                            } else if max == usize::MAX {
                                format!("at least {min}")
                            } else {
                                format!("{min} to {max}")
                            },
                            args.len()
                        ));
                    }
                    Ok(Ast::Call(word, args))
                }
            },
            Tok::Sym(s) => {
                self.pos -= 1;
                self.err(&format!("unexpected `{s}`"))
            }
        }
    }
}

fn parse_yaql(src: &str) -> Result<Ast, ExprError> {
    let toks = tokenize(src).map_err(|e| ExprError::new(format!("{} in `{}`", e, src.trim())))?;
    let mut p = Parser { src, toks, pos: 0 };
    let ast = p.expr(0)?;
    if p.pos < p.toks.len() {
        return p.err("unexpected text");
    }
    Ok(ast)
}

// ---------------------------------------------------------------- templates

/// One piece of a string holding expressions.
#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Yaql(Ast),
}

/// A string compiled for rendering.
#[derive(Debug, Clone, PartialEq)]
enum Compiled {
    Plain,
    Yaql {
        whole: Option<Ast>,
        parts: Vec<Part>,
    },
    Jinja {
        whole: Option<String>,
    },
}

fn has_jinja(s: &str) -> bool {
    s.contains("{{") || s.contains("{%")
}

fn compile(s: &str) -> Result<Compiled, ExprError> {
    let jinja = has_jinja(s);
    let yaql = s.contains("<%");
    if jinja && yaql {
        return Err(ExprError::new(format!(
            "`{s}` mixes YAQL `<% %>` and Jinja `{{{{ }}}}`; use one kind per value"
        )));
    }
    if jinja {
        let env = jinja_env(&Arc::new(OwnedScope::default()));
        env.template_from_str(s)
            .map_err(|e| ExprError::new(format!("bad Jinja in `{s}`: {e}")))?;
        let trimmed = s.trim();
        let whole = trimmed
            .strip_prefix("{{")
            .and_then(|r| r.strip_suffix("}}"))
            .filter(|inner| !inner.contains("{{") && !inner.contains("}}"))
            .map(|inner| inner.trim().to_string());
        if let Some(inner) = &whole {
            env.compile_expression(inner)
                .map_err(|e| ExprError::new(format!("bad Jinja in `{s}`: {e}")))?;
        }
        return Ok(Compiled::Jinja { whole });
    }
    if !yaql {
        return Ok(Compiled::Plain);
    }
    let mut parts = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find("<%") {
        if start > 0 {
            parts.push(Part::Text(rest[..start].to_string()));
        }
        let after = &rest[start + 2..];
        let Some(end) = after.find("%>") else {
            return Err(ExprError::new(format!(
                "`<%` without a closing `%>` in `{s}`"
            )));
        };
        parts.push(Part::Yaql(parse_yaql(&after[..end])?));
        rest = &after[end + 2..];
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest.to_string()));
    }
    let whole = {
        let meaningful: Vec<&Part> = parts
            .iter()
            .filter(|p| !matches!(p, Part::Text(t) if t.trim().is_empty()))
            .collect();
        match meaningful.as_slice() {
            [Part::Yaql(ast)] => Some(ast.clone()),
            _ => None,
        }
    };
    Ok(Compiled::Yaql { whole, parts })
}

/// Checks every expression inside `value` (strings, recursively) at load
/// time. The error names the expression and what is unsupported.
pub fn check(value: &Value) -> Result<(), ExprError> {
    match value {
        Value::String(s) => compile(s).map(|_| ()),
        Value::Array(items) => items.iter().try_for_each(check),
        Value::Object(map) => map.values().try_for_each(check),
        _ => Ok(()),
    }
}

/// True if `s` holds a YAQL or Jinja expression.
pub fn is_expression(s: &str) -> bool {
    s.contains("<%") || has_jinja(s)
}

/// Renders every string inside `value` with `scope`. A string that is
/// exactly one expression yields the native value.
pub fn render(value: &Value, scope: &Scope<'_>) -> Result<Value, ExprError> {
    match value {
        Value::String(s) => render_str(s, scope),
        Value::Array(items) => items
            .iter()
            .map(|v| render(v, scope))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
        Value::Object(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                out.insert(k.clone(), render(v, scope)?);
            }
            Ok(Value::Object(out))
        }
        other => Ok(other.clone()),
    }
}

/// Renders one string (see [`render`]).
pub fn render_str(s: &str, scope: &Scope<'_>) -> Result<Value, ExprError> {
    match compile(s)? {
        Compiled::Plain => Ok(Value::String(s.to_string())),
        Compiled::Yaql {
            whole: Some(ast), ..
        } => eval(&ast, scope),
        Compiled::Yaql { whole: None, parts } => {
            let mut out = String::new();
            for part in parts {
                match part {
                    Part::Text(t) => out.push_str(&t),
                    Part::Yaql(ast) => out.push_str(&to_text(&eval(&ast, scope)?)),
                }
            }
            Ok(Value::String(out))
        }
        Compiled::Jinja { whole } => render_jinja(s, whole.as_deref(), scope),
    }
}

/// Shell-safe rendering of shell text (a shell command's `cmd`): each
/// expression's value is not inserted; the text gets `"${AVIARY_ARG_<n>}"`
/// (double-quoted) and the value (as text) is returned at index n, for the
/// caller to pass as environment variable `AVIARY_ARG_<n>`. Jinja control
/// blocks are refused (only `{{ }}` expressions can be placed).
pub fn render_shell(s: &str, scope: &Scope<'_>) -> Result<(String, Vec<String>), ExprError> {
    let placeholder = |n: usize| format!("\"${{AVIARY_ARG_{n}}}\"");
    match compile(s)? {
        Compiled::Plain => Ok((s.to_string(), Vec::new())),
        Compiled::Yaql {
            whole: Some(ast), ..
        } => Ok((placeholder(0), vec![to_text(&eval(&ast, scope)?)])),
        Compiled::Yaql { whole: None, parts } => {
            let mut out = String::new();
            let mut values = Vec::new();
            for part in parts {
                match part {
                    Part::Text(t) => out.push_str(&t),
                    Part::Yaql(ast) => {
                        out.push_str(&placeholder(values.len()));
                        values.push(to_text(&eval(&ast, scope)?));
                    }
                }
            }
            Ok((out, values))
        }
        Compiled::Jinja { .. } => {
            if s.contains("{%") || s.contains("{#") {
                return Err(ExprError::new(
                    "a shell command's cmd may hold {{ }} expressions but no {% %} blocks or {# #} comments; compute the value in a vars entry or publish, then use it",
                ));
            }
            let mut out = String::new();
            let mut values = Vec::new();
            let mut rest = s;
            while let Some(start) = rest.find("{{") {
                let Some(len) = rest[start..].find("}}") else {
                    break;
                };
                out.push_str(&rest[..start]);
                let segment = &rest[start..start + len + 2];
                out.push_str(&placeholder(values.len()));
                values.push(to_text(&render_str(segment, scope)?));
                rest = &rest[start + len + 2..];
            }
            out.push_str(rest);
            Ok((out, values))
        }
    }
}

/// Evaluates `s` as a condition (`when`): the truthiness of the value.
pub fn evaluate_bool(s: &str, scope: &Scope<'_>) -> Result<bool, ExprError> {
    Ok(truthy(&render_str(s, scope)?))
}

/// Text form of a value inside a string (strings unquoted, others as JSON).
pub fn to_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "None".to_string(),
        Value::Bool(true) => "True".to_string(),
        Value::Bool(false) => "False".to_string(),
        other => other.to_string(),
    }
}

/// Python-like truthiness.
pub fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

// ---------------------------------------------------------------- evaluation

fn ctx_lookup(scope: &Scope<'_>, name: &str) -> Result<Value, ExprError> {
    scope.ctx.get(name).cloned().ok_or_else(|| {
        ExprError::new(format!(
            "variable `{name}` is referenced before assignment (not an input, var or published value)"
        ))
    })
}

fn current<'s>(scope: &'s Scope<'_>, f: &str) -> Result<&'s CurrentTask, ExprError> {
    scope.current.as_ref().ok_or_else(|| {
        ExprError::new(format!(
            "`{f}()` is only available in task transitions (next/when/publish) and retry"
        ))
    })
}

fn item_lookup(scope: &Scope<'_>, name: Option<&str>) -> Result<Value, ExprError> {
    let item = scope
        .item
        .as_ref()
        .ok_or_else(|| ExprError::new("`item()` is only available in with-items tasks"))?;
    match name {
        None => Ok(item.clone()),
        Some(n) => item
            .get(n)
            .cloned()
            .ok_or_else(|| ExprError::new(format!("item has no field `{n}`"))),
    }
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn int_or_float(f: f64) -> Value {
    if f.fract() == 0.0 && f.abs() < 9.0e15 {
        Value::from(f as i64)
    } else {
        serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null)
    }
}

/// Equality that treats 1 and 1.0 as equal.
fn equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

fn compare(op: BinOp, a: &Value, b: &Value) -> Result<bool, ExprError> {
    let ord = match (a, b) {
        (Value::Number(x), Value::Number(y)) => x
            .as_f64()
            .partial_cmp(&y.as_f64())
            .ok_or_else(|| ExprError::new("cannot compare NaN"))?,
        (Value::String(x), Value::String(y)) => x.cmp(y),
        _ => {
            return Err(ExprError::new(format!(
                "cannot compare {} with {}",
                kind(a),
                kind(b)
            )));
        }
    };
    Ok(match op {
        BinOp::Lt => ord.is_lt(),
        BinOp::Gt => ord.is_gt(),
        BinOp::Le => ord.is_le(),
        _ => ord.is_ge(),
    })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a dict",
    }
}

fn arith(op: BinOp, a: Value, b: Value) -> Result<Value, ExprError> {
    match (op, &a, &b) {
        (BinOp::Add, Value::String(x), Value::String(y)) => Ok(Value::String(format!("{x}{y}"))),
        (BinOp::Add, Value::Array(x), Value::Array(y)) => {
            Ok(Value::Array(x.iter().chain(y.iter()).cloned().collect()))
        }
        (BinOp::Add, Value::Object(x), Value::Object(y)) => {
            let mut m = x.clone();
            m.extend(y.clone());
            Ok(Value::Object(m))
        }
        (_, Value::Number(x), Value::Number(y)) => {
            if let (Some(i), Some(j)) = (x.as_i64(), y.as_i64()) {
                let r = match op {
                    BinOp::Add => i.checked_add(j),
                    BinOp::Sub => i.checked_sub(j),
                    BinOp::Mul => i.checked_mul(j),
                    BinOp::Mod if j != 0 => Some(i.rem_euclid(j)),
                    BinOp::Div if j != 0 && i % j == 0 => Some(i / j),
                    _ => None,
                };
                if let Some(r) = r {
                    return Ok(Value::from(r));
                }
            }
            let (f, g) = (num(&a).unwrap_or(0.0), num(&b).unwrap_or(0.0));
            if matches!(op, BinOp::Div | BinOp::Mod) && g == 0.0 {
                return Err(ExprError::new("division by zero"));
            }
            let r = match op {
                BinOp::Add => f + g,
                BinOp::Sub => f - g,
                BinOp::Mul => f * g,
                BinOp::Div => f / g,
                _ => f.rem_euclid(g),
            };
            serde_json::Number::from_f64(r)
                .map(Value::Number)
                .ok_or_else(|| ExprError::new("arithmetic result is not a number"))
        }
        _ => Err(ExprError::new(format!(
            "cannot apply `{}` to {} and {}",
            match op {
                BinOp::Add => "+",
                BinOp::Sub => "-",
                BinOp::Mul => "*",
                BinOp::Div => "/",
                _ => "mod",
            },
            kind(&a),
            kind(&b)
        ))),
    }
}

fn eval(ast: &Ast, scope: &Scope<'_>) -> Result<Value, ExprError> {
    match ast {
        Ast::Lit(v) => Ok(v.clone()),
        Ast::Dollar => Ok(Value::Object(scope.ctx.clone())),
        Ast::List(items) => items
            .iter()
            .map(|i| eval(i, scope))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
        Ast::Dict(entries) => {
            let mut m = Map::new();
            for (k, v) in entries {
                m.insert(to_text(&eval(k, scope)?), eval(v, scope)?);
            }
            Ok(Value::Object(m))
        }
        Ast::Attr(base, name) => match eval(base, scope)? {
            Value::Object(m) => Ok(m.get(name).cloned().unwrap_or(Value::Null)),
            other => Err(ExprError::new(format!(
                "cannot read `.{name}` of {}",
                kind(&other)
            ))),
        },
        Ast::Index(base, index) => {
            let base = eval(base, scope)?;
            let index = eval(index, scope)?;
            match (&base, &index) {
                (Value::Array(a), Value::Number(n)) => {
                    let len = a.len() as i64;
                    let i = n
                        .as_i64()
                        .ok_or_else(|| ExprError::new("list index must be an integer"))?;
                    let i = if i < 0 { len + i } else { i };
                    usize::try_from(i)
                        .ok()
                        .and_then(|i| a.get(i))
                        .cloned()
                        .ok_or_else(|| {
                            ExprError::new(format!("list index {n} out of range (length {len})"))
                        })
                }
                (Value::Object(m), Value::String(k)) => {
                    Ok(m.get(k).cloned().unwrap_or(Value::Null))
                }
                _ => Err(ExprError::new(format!(
                    "cannot index {} with {}",
                    kind(&base),
                    kind(&index)
                ))),
            }
        }
        Ast::Neg(inner) => match eval(inner, scope)? {
            Value::Number(n) => Ok(match n.as_i64() {
                Some(i) => Value::from(-i),
                None => int_or_float(-n.as_f64().unwrap_or(0.0)),
            }),
            other => Err(ExprError::new(format!("cannot negate {}", kind(&other)))),
        },
        Ast::Not(inner) => Ok(Value::Bool(!truthy(&eval(inner, scope)?))),
        Ast::Bin(op, a, b) => {
            match op {
                BinOp::Or => {
                    let l = eval(a, scope)?;
                    return if truthy(&l) { Ok(l) } else { eval(b, scope) };
                }
                BinOp::And => {
                    let l = eval(a, scope)?;
                    return if truthy(&l) { eval(b, scope) } else { Ok(l) };
                }
                _ => {}
            }
            let l = eval(a, scope)?;
            let r = eval(b, scope)?;
            match op {
                BinOp::Eq => Ok(Value::Bool(equal(&l, &r))),
                BinOp::Ne => Ok(Value::Bool(!equal(&l, &r))),
                BinOp::Lt | BinOp::Gt | BinOp::Le | BinOp::Ge => {
                    Ok(Value::Bool(compare(*op, &l, &r)?))
                }
                BinOp::In => match &r {
                    Value::Array(items) => Ok(Value::Bool(items.iter().any(|i| equal(i, &l)))),
                    Value::Object(m) => Ok(Value::Bool(m.contains_key(&to_text(&l)))),
                    Value::String(s) => Ok(Value::Bool(s.contains(&to_text(&l)))),
                    other => Err(ExprError::new(format!(
                        "`in` needs a list, dict or string on the right, found {}",
                        kind(other)
                    ))),
                },
                _ => arith(*op, l, r),
            }
        }
        Ast::Call(name, args) => call(name, args, scope),
    }
}

fn arg_text(args: &[Ast], i: usize, scope: &Scope<'_>) -> Result<String, ExprError> {
    match args.get(i).map(|a| eval(a, scope)).transpose()? {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Ok(to_text(&other)),
        None => Err(ExprError::new("missing argument")),
    }
}

fn call(name: &str, args: &[Ast], scope: &Scope<'_>) -> Result<Value, ExprError> {
    let vals =
        || -> Result<Vec<Value>, ExprError> { args.iter().map(|a| eval(a, scope)).collect() };
    match name {
        "ctx" => match args.first() {
            None => Ok(Value::Object(scope.ctx.clone())),
            Some(_) => ctx_lookup(scope, &arg_text(args, 0, scope)?),
        },
        "succeeded" => Ok(Value::Bool(current(scope, name)?.status == "succeeded")),
        "failed" => Ok(Value::Bool(current(scope, name)?.status == "failed")),
        "completed" => Ok(Value::Bool(matches!(
            current(scope, name)?.status.as_str(),
            "succeeded" | "failed" | "expired" | "abandoned" | "canceled"
        ))),
        "result" => Ok(current(scope, name)?.result.clone()),
        "item" => match args.first() {
            None => item_lookup(scope, None),
            Some(_) => item_lookup(scope, Some(&arg_text(args, 0, scope)?)),
        },
        "task_status" => {
            let task = arg_text(args, 0, scope)?;
            Ok(scope
                .task_statuses
                .get(&task)
                .map(|s| Value::String(s.clone()))
                .unwrap_or(Value::Null))
        }
        "st2kv" => {
            let key = arg_text(args, 0, scope)?;
            let decrypt = match args.get(1) {
                Some(a) => truthy(&eval(a, scope)?),
                None => false,
            };
            let lookup = scope.kv.ok_or_else(|| {
                ExprError::new(format!("st2kv('{key}'): no datastore is available here"))
            })?;
            lookup(&key, decrypt).ok_or_else(|| {
                ExprError::new(format!(
                    "st2kv('{key}'): the key is not in the datastore; create it with `aviary key set {key} <value>`"
                ))
            })
        }
        "list" => Ok(Value::Array(vals()?)),
        "dict" => {
            let vs = vals()?;
            if let [Value::Array(pairs)] = vs.as_slice() {
                let mut m = Map::new();
                for p in pairs {
                    match p {
                        Value::Array(kv) if kv.len() == 2 => {
                            m.insert(to_text(&kv[0]), kv[1].clone());
                        }
                        _ => {
                            return Err(ExprError::new(
                                "dict() expects a list of [key, value] pairs",
                            ));
                        }
                    }
                }
                return Ok(Value::Object(m));
            }
            if vs.is_empty() {
                return Ok(Value::Object(Map::new()));
            }
            Err(ExprError::new(
                "dict() takes a list of [key, value] pairs; use `{k => v}` for literals",
            ))
        }
        "zip" => {
            let lists = vals()?
                .into_iter()
                .map(|v| match v {
                    Value::Array(a) => Ok(a),
                    other => Err(ExprError::new(format!(
                        "zip() needs lists, found {}",
                        kind(&other)
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            let n = lists.iter().map(Vec::len).min().unwrap_or(0);
            Ok(Value::Array(
                (0..n)
                    .map(|i| Value::Array(lists.iter().map(|l| l[i].clone()).collect()))
                    .collect(),
            ))
        }
        "str" => Ok(Value::String(to_text(&vals()?[0]))),
        "int" => match &vals()?[0] {
            Value::Number(n) => Ok(Value::from(n.as_f64().unwrap_or(0.0).trunc() as i64)),
            Value::String(s) => s
                .trim()
                .parse::<i64>()
                .map(Value::from)
                .map_err(|_| ExprError::new(format!("int(): `{s}` is not an integer"))),
            Value::Bool(b) => Ok(Value::from(i64::from(*b))),
            other => Err(ExprError::new(format!(
                "int() cannot convert {}",
                kind(other)
            ))),
        },
        "float" => match &vals()?[0] {
            Value::Number(n) => Ok(int_or_float(n.as_f64().unwrap_or(0.0))),
            Value::String(s) => s
                .trim()
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map(Value::Number)
                .ok_or_else(|| ExprError::new(format!("float(): `{s}` is not a number"))),
            other => Err(ExprError::new(format!(
                "float() cannot convert {}",
                kind(other)
            ))),
        },
        "bool" => Ok(Value::Bool(truthy(&vals()?[0]))),
        "len" => match &vals()?[0] {
            Value::Array(a) => Ok(Value::from(a.len())),
            Value::Object(o) => Ok(Value::from(o.len())),
            Value::String(s) => Ok(Value::from(s.chars().count())),
            other => Err(ExprError::new(format!("len() of {}", kind(other)))),
        },
        other => Err(ExprError::new(format!("unsupported function `{other}()`"))),
    }
}

// ---------------------------------------------------------------- Jinja

/// A scope without borrowed parts, for minijinja functions ('static).
#[derive(Default)]
struct OwnedScope {
    ctx: Map<String, Value>,
    current: Option<CurrentTask>,
    item: Option<Value>,
    task_statuses: BTreeMap<String, String>,
    kv: BTreeMap<String, Option<Value>>,
}

fn mj_err(e: ExprError) -> minijinja::Error {
    minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.message)
}

fn jinja_env(owned: &Arc<OwnedScope>) -> minijinja::Environment<'static> {
    use minijinja::Value as J;
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    let s = owned.clone();
    env.add_function(
        "ctx",
        move |name: Option<String>| -> Result<J, minijinja::Error> {
            match name {
                None => Ok(J::from_serialize(&s.ctx)),
                Some(n) => s.ctx.get(&n).map(J::from_serialize).ok_or_else(|| {
                    mj_err(ExprError::new(format!(
                        "variable `{n}` is referenced before assignment"
                    )))
                }),
            }
        },
    );
    let status_fn = |owned: &Arc<OwnedScope>, want: &'static [&'static str], f: &'static str| {
        let s = owned.clone();
        move || -> Result<bool, minijinja::Error> {
            let cur = s.current.as_ref().ok_or_else(|| {
                mj_err(ExprError::new(format!(
                    "`{f}()` is only available in task transitions"
                )))
            })?;
            Ok(want.contains(&cur.status.as_str()))
        }
    };
    env.add_function("succeeded", status_fn(owned, &["succeeded"], "succeeded"));
    env.add_function("failed", status_fn(owned, &["failed"], "failed"));
    env.add_function(
        "completed",
        status_fn(
            owned,
            &["succeeded", "failed", "expired", "abandoned", "canceled"],
            "completed",
        ),
    );
    let s = owned.clone();
    env.add_function("result", move || -> Result<J, minijinja::Error> {
        let cur = s.current.as_ref().ok_or_else(|| {
            mj_err(ExprError::new(
                "`result()` is only available in task transitions",
            ))
        })?;
        Ok(J::from_serialize(&cur.result))
    });
    let s = owned.clone();
    env.add_function(
        "item",
        move |name: Option<String>| -> Result<J, minijinja::Error> {
            let scope = Scope {
                item: s.item.clone(),
                ..Scope::default()
            };
            item_lookup(&scope, name.as_deref())
                .map(|v| J::from_serialize(&v))
                .map_err(mj_err)
        },
    );
    let s = owned.clone();
    env.add_function("task_status", move |name: String| -> J {
        s.task_statuses
            .get(&name)
            .map(|v| J::from(v.clone()))
            .unwrap_or(J::from(()))
    });
    let s = owned.clone();
    env.add_function(
        "st2kv",
        move |key: String, _kwargs: minijinja::value::Kwargs| -> Result<J, minijinja::Error> {
            match s.kv.get(&key) {
                Some(Some(v)) => Ok(J::from_serialize(v)),
                _ => Err(mj_err(ExprError::new(format!(
                    "st2kv('{key}'): the key is not in the datastore"
                )))),
            }
        },
    );
    env
}

/// The datastore keys a text (YAQL or Jinja) refers to with literal
/// strings in `st2kv('key')` calls, each with whether the call asks for
/// `decrypt=true`. A caller resolves these before running the conductor.
pub fn kv_references(s: &str) -> Vec<(String, bool)> {
    let mut keys = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find("st2kv(") {
        let after = &rest[i + 6..];
        let trimmed = after.trim_start();
        if let Some(q) = trimmed.chars().next().filter(|c| *c == '\'' || *c == '"')
            && let Some(end) = trimmed[1..].find(q)
        {
            let call_rest = &trimmed[1 + end..];
            let call = &call_rest[..call_rest.find(')').unwrap_or(call_rest.len())];
            let compact: String = call.chars().filter(|c| !c.is_whitespace()).collect();
            let decrypt = compact.to_ascii_lowercase().contains("decrypt=true");
            keys.push((trimmed[1..1 + end].to_string(), decrypt));
        }
        rest = after;
    }
    keys
}

fn render_jinja(s: &str, whole: Option<&str>, scope: &Scope<'_>) -> Result<Value, ExprError> {
    let kv = kv_references(s)
        .into_iter()
        .map(|(k, decrypt)| {
            let v = scope.kv.and_then(|f| f(&k, decrypt));
            (k, v)
        })
        .collect();
    let owned = Arc::new(OwnedScope {
        ctx: scope.ctx.clone(),
        current: scope.current.clone(),
        item: scope.item.clone(),
        task_statuses: scope.task_statuses.clone(),
        kv,
    });
    let env = jinja_env(&owned);
    // Jinja variables are the context values themselves (`{{ name }}`) as well.
    let vars = Value::Object(scope.ctx.clone());
    let fail = |e: minijinja::Error| {
        let mut msg = e.to_string();
        if let Some(detail) = e.detail() {
            msg = format!("{msg}: {detail}");
        }
        ExprError::new(format!("evaluating `{s}`: {msg}"))
    };
    if let Some(inner) = whole {
        let expr = env.compile_expression(inner).map_err(fail)?;
        let out = expr.eval(&vars).map_err(fail)?;
        if out.is_undefined() {
            return Err(ExprError::new(format!("evaluating `{s}`: undefined value")));
        }
        return serde_json::to_value(&out)
            .map_err(|e| ExprError::new(format!("evaluating `{s}`: not JSON: {e}")));
    }
    env.render_str(s, &vars).map(Value::String).map_err(fail)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scope() -> Scope<'static> {
        let ctx = json!({"name": "Stanley", "n": 3, "xs": [1, 2, 3], "ys": ["a", "b"],
                         "a": {"b": {"c": 7}}, "flag": true})
        .as_object()
        .unwrap()
        .clone();
        Scope {
            ctx,
            current: Some(CurrentTask {
                id: "t1".into(),
                status: "succeeded".into(),
                result: json!({"stdout": "ok", "code": 0}),
            }),
            item: Some(json!({"x": 1, "y": "a"})),
            task_statuses: [("t0".to_string(), "failed".to_string())].into(),
            kv: None,
        }
    }

    fn y(s: &str) -> Value {
        render_str(s, &scope()).unwrap()
    }

    #[test]
    fn ctx_forms() {
        assert_eq!(y("<% ctx().name %>"), json!("Stanley"));
        assert_eq!(y("<% ctx(name) %>"), json!("Stanley"));
        assert_eq!(y("<% ctx('name') %>"), json!("Stanley"));
        assert_eq!(y("<% ctx(\"name\") %>"), json!("Stanley"));
        assert_eq!(y("<% ctx().a.b.c %>"), json!(7));
        assert_eq!(y("<% ctx(xs)[1] %>"), json!(2));
        assert_eq!(y("<% ctx(xs)[-1] %>"), json!(3));
        assert_eq!(y("<% ctx(a).b %>"), json!({"c": 7}));
        assert_eq!(y("<% $.name %>"), json!("Stanley"));
        assert_eq!(y("<% ctx().missing %>"), Value::Null);
    }

    #[test]
    fn native_vs_text() {
        assert_eq!(y("<% ctx(n) %>"), json!(3));
        assert_eq!(y("  <% ctx(xs) %> "), json!([1, 2, 3]));
        assert_eq!(y("build <% ctx(n) %> done"), json!("build 3 done"));
        assert_eq!(y("<% ctx(name) %>, <% ctx(n) %>"), json!("Stanley, 3"));
        assert_eq!(y("plain"), json!("plain"));
    }

    #[test]
    fn operators() {
        assert_eq!(y("<% 1 + 2 * 3 %>"), json!(7));
        assert_eq!(y("<% (1 + 2) * 3 %>"), json!(9));
        assert_eq!(y("<% -ctx(n) + 1 %>"), json!(-2));
        assert_eq!(y("<% 7 mod 3 %>"), json!(1));
        assert_eq!(y("<% 6 / 3 %>"), json!(2));
        assert_eq!(y("<% 7 / 2 %>"), json!(3.5));
        assert_eq!(y("<% ctx(n) > 2 and ctx(n) <= 3 %>"), json!(true));
        assert_eq!(y("<% ctx(n) = 3.0 %>"), json!(true));
        assert_eq!(y("<% ctx(n) != 3 or false %>"), json!(false));
        assert_eq!(y("<% not ctx(flag) %>"), json!(false));
        assert_eq!(y("<% 2 in ctx(xs) %>"), json!(true));
        assert_eq!(y("<% 'b' in ctx(a) %>"), json!(true));
        assert_eq!(y("<% 'a' + 'b' + str(1) %>"), json!("ab1"));
        // Bare names as arguments are YAQL keyword strings.
        assert_eq!(y("<% list(a, b) %>"), json!(["a", "b"]));
        assert_eq!(y("<% not 'c' in list(a, b) %>"), json!(true));
        assert_eq!(y("<% [1, 'x', null] %>"), json!([1, "x", null]));
        assert_eq!(
            y("<% {'k' => 1, 'j' => true} %>"),
            json!({"k": 1, "j": true})
        );
        assert_eq!(y("<% 'a' < 'b' %>"), json!(true));
    }

    #[test]
    fn functions() {
        assert_eq!(y("<% succeeded() %>"), json!(true));
        assert_eq!(y("<% failed() %>"), json!(false));
        assert_eq!(y("<% completed() %>"), json!(true));
        assert_eq!(y("<% result().stdout %>"), json!("ok"));
        assert_eq!(y("<% result() %>"), json!({"stdout": "ok", "code": 0}));
        assert_eq!(y("<% item(x) %>"), json!(1));
        assert_eq!(y("<% item().y %>"), json!("a"));
        assert_eq!(y("<% task_status(t0) %>"), json!("failed"));
        assert_eq!(y("<% task_status(nope) %>"), Value::Null);
        assert_eq!(
            y("<% zip(ctx(xs), ctx(ys)) %>"),
            json!([[1, "a"], [2, "b"]])
        );
        assert_eq!(y("<% len(ctx(xs)) %>"), json!(3));
        assert_eq!(y("<% int('42') + 1 %>"), json!(43));
        assert_eq!(y("<% list(1, 2) %>"), json!([1, 2]));
        assert_eq!(y("<% dict([['a', 1]]) %>"), json!({"a": 1}));
    }

    #[test]
    fn shell_rendering_keeps_values_out_of_the_text() {
        let mut s = scope();
        s.ctx
            .insert("evil".into(), json!("$(touch /tmp/x); rm -rf /"));
        let (text, values) = render_shell("echo <% ctx(evil) %> and <% 1 + 1 %>", &s).unwrap();
        assert_eq!(text, "echo \"${AVIARY_ARG_0}\" and \"${AVIARY_ARG_1}\"");
        assert_eq!(
            values,
            vec!["$(touch /tmp/x); rm -rf /".to_string(), "2".into()]
        );
        let (text, values) = render_shell("echo {{ ctx('evil') }}!", &s).unwrap();
        assert_eq!(text, "echo \"${AVIARY_ARG_0}\"!");
        assert_eq!(values, vec!["$(touch /tmp/x); rm -rf /".to_string()]);
        assert!(render_shell("{% if true %}x{% endif %}", &s).is_err());
        assert_eq!(render_shell("plain", &s).unwrap(), ("plain".into(), vec![]));
    }

    #[test]
    fn st2kv_uses_the_lookup() {
        let lookup = |k: &str, decrypt: bool| match (k, decrypt) {
            ("deploy.target", _) => Some(json!("prod")),
            ("system.pw", true) => Some(json!("plain")),
            ("system.pw", false) => Some(json!("cipher")),
            _ => None,
        };
        let mut s = scope();
        s.kv = Some(&lookup);
        assert_eq!(
            render_str("<% st2kv('deploy.target') %>", &s).unwrap(),
            json!("prod")
        );
        assert_eq!(
            render_str("{{ st2kv('deploy.target') }}", &s).unwrap(),
            json!("prod")
        );
        assert_eq!(
            render_str("<% st2kv('system.pw', decrypt=true) %>", &s).unwrap(),
            json!("plain")
        );
        assert_eq!(
            render_str("<% st2kv('system.pw') %>", &s).unwrap(),
            json!("cipher")
        );
        assert_eq!(
            render_str("{{ st2kv('system.pw', decrypt=true) }}", &s).unwrap(),
            json!("plain")
        );
        assert_eq!(
            kv_references("<% st2kv('a.b') %> {{ st2kv(\"c\", decrypt = True) }}"),
            vec![("a.b".to_string(), false), ("c".to_string(), true)]
        );
        let err = render_str("<% st2kv('nope') %>", &s).unwrap_err();
        assert!(err.message.contains("not in the datastore"), "{err}");
    }

    #[test]
    fn jinja() {
        assert_eq!(y("{{ ctx('name') }}"), json!("Stanley"));
        assert_eq!(y("{{ ctx().n + 1 }}"), json!(4));
        assert_eq!(y("{{ ctx('xs') }}"), json!([1, 2, 3]));
        assert_eq!(y("hi {{ ctx('name') }}!"), json!("hi Stanley!"));
        assert_eq!(y("{{ succeeded() and result().code == 0 }}"), json!(true));
        assert_eq!(y("{{ item('x') }}"), json!(1));
        assert_eq!(y("{{ task_status('t0') }}"), json!("failed"));
        assert!(render_str("{{ ctx('nope') }}", &scope()).is_err());
    }

    #[test]
    fn unsupported_is_an_error_with_position() {
        let e = check(&json!("<% ctx(xs).select($ * 2) %>")).unwrap_err();
        assert!(e.message.contains("method call"), "{e}");
        let e = check(&json!("<% foo(1) %>")).unwrap_err();
        assert!(e.message.contains("unsupported function `foo()`"), "{e}");
        assert!(e.message.contains("column 2"), "{e}");
        let e = check(&json!("<% 1 + %>")).unwrap_err();
        assert!(e.message.contains("unexpected end"), "{e}");
        let e = check(&json!("<% ctx( %>")).unwrap_err();
        assert!(e.message.contains("column"), "{e}");
        let e = check(&json!("<% name %>")).unwrap_err();
        assert!(e.message.contains("ctx(name)"), "{e}");
        assert!(check(&json!("<% a %> {{ b }}")).is_err());
        assert!(check(&json!("{{ ctx('x') ")).is_err());
        assert!(check(&json!("<% ctx(x) ")).is_err());
        assert!(check(&json!("<% ctx(x) | y %>")).is_err());
    }

    #[test]
    fn runtime_errors() {
        let s = scope();
        assert!(render_str("<% ctx(missing) %>", &s).is_err());
        assert!(render_str("<% ctx(xs)[9] %>", &s).is_err());
        assert!(render_str("<% 1 + 'a' %>", &s).is_err());
        let no_task = Scope::default();
        let e = render_str("<% result() %>", &no_task).unwrap_err();
        assert!(e.message.contains("only available"), "{e}");
    }
}
