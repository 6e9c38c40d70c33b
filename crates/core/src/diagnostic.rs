//! Located diagnostics for pack files, and the located YAML tree they point into.
//!
//! Pack files (pack.yaml, action metadata, rules) are parsed into a
//! [`YamlNode`] tree where every node, including every mapping key, knows its
//! 1-based line and column. Validation then walks the tree and reports
//! [`Diagnostic`]s that point at the offending node, so a user sees
//! `rules/deploy.yaml:7:13: criteria.trigger.body.ref.type: unknown operator`.

use serde::Serialize;
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use std::fmt;

/// One problem in one file, at one place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    /// File path, relative to the pack directory (`actions/build.yaml`).
    pub file: String,
    /// 1-based line of the offending YAML node.
    pub line: usize,
    /// 1-based column of the offending YAML node.
    pub column: usize,
    /// Dotted path of the field (`parameters.message.type`, `action.ref`).
    pub field: String,
    /// What is wrong.
    pub message: String,
    /// What to do about it, if we can tell.
    pub hint: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file, self.line, self.column, self.field, self.message
        )?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostic {}

/// Every problem found, in file, line, column order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    /// Sorts by file, then line, then column (stable for equal positions).
    pub fn sort(&mut self) {
        self.0
            .sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

/// A YAML node with its position (1-based line and column).
#[derive(Debug, Clone, PartialEq)]
pub struct YamlNode {
    /// The node's value.
    pub value: YamlValue,
    /// 1-based line where the node starts.
    pub line: usize,
    /// 1-based column where the node starts.
    pub column: usize,
}

/// The value of a [`YamlNode`].
#[derive(Debug, Clone, PartialEq)]
pub enum YamlValue {
    /// `~`, `null` or nothing.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// Any number.
    Number(serde_json::Number),
    /// A string scalar.
    String(String),
    /// A sequence.
    Seq(Vec<YamlNode>),
    /// A mapping, in file order; keys are nodes too (they have positions).
    Map(Vec<(YamlNode, YamlNode)>),
}

impl YamlNode {
    /// The node as JSON (mapping keys rendered as strings).
    pub fn to_json(&self) -> Value {
        match &self.value {
            YamlValue::Null => Value::Null,
            YamlValue::Bool(b) => Value::Bool(*b),
            YamlValue::Number(n) => Value::Number(n.clone()),
            YamlValue::String(s) => Value::String(s.clone()),
            YamlValue::Seq(items) => Value::Array(items.iter().map(YamlNode::to_json).collect()),
            YamlValue::Map(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.key_string(), v.to_json()))
                    .collect(),
            ),
        }
    }

    /// The string, if this is a string scalar.
    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            YamlValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The entries, if this is a mapping.
    pub fn as_map(&self) -> Option<&[(YamlNode, YamlNode)]> {
        match &self.value {
            YamlValue::Map(entries) => Some(entries),
            _ => None,
        }
    }

    /// The value under `key`, if this is a mapping holding it.
    pub fn get(&self, key: &str) -> Option<&YamlNode> {
        self.as_map()?
            .iter()
            .find(|(k, _)| k.key_string() == key)
            .map(|(_, v)| v)
    }

    /// The key node for `key`, if this is a mapping holding it.
    pub fn get_key(&self, key: &str) -> Option<&YamlNode> {
        self.as_map()?
            .iter()
            .find(|(k, _)| k.key_string() == key)
            .map(|(k, _)| k)
    }

    /// A scalar rendered as text (for mapping keys); other nodes as JSON text.
    pub fn key_string(&self) -> String {
        match &self.value {
            YamlValue::String(s) => s.clone(),
            YamlValue::Null => "null".to_string(),
            YamlValue::Bool(b) => b.to_string(),
            YamlValue::Number(n) => n.to_string(),
            _ => self.to_json().to_string(),
        }
    }

    /// What kind of node this is, for messages (`a string`, `a mapping`...).
    pub fn kind_name(&self) -> &'static str {
        match &self.value {
            YamlValue::Null => "null",
            YamlValue::Bool(_) => "a boolean",
            YamlValue::Number(_) => "a number",
            YamlValue::String(_) => "a string",
            YamlValue::Seq(_) => "a list",
            YamlValue::Map(_) => "a mapping",
        }
    }
}

impl<'de> Deserialize<'de> for YamlNode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let spanned = serde_saphyr::Spanned::<YamlValue>::deserialize(d)?;
        Ok(YamlNode {
            value: spanned.value,
            line: spanned.referenced.line() as usize,
            column: spanned.referenced.column() as usize,
        })
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = YamlValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E>(self) -> Result<YamlValue, E> {
        Ok(YamlValue::Null)
    }
    fn visit_none<E>(self) -> Result<YamlValue, E> {
        Ok(YamlValue::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<YamlValue, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
    fn visit_bool<E>(self, b: bool) -> Result<YamlValue, E> {
        Ok(YamlValue::Bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<YamlValue, E> {
        Ok(YamlValue::Number(n.into()))
    }
    fn visit_u64<E>(self, n: u64) -> Result<YamlValue, E> {
        Ok(YamlValue::Number(n.into()))
    }
    fn visit_f64<E>(self, n: f64) -> Result<YamlValue, E> {
        Ok(serde_json::Number::from_f64(n)
            .map(YamlValue::Number)
            .unwrap_or(YamlValue::Null))
    }
    fn visit_str<E>(self, s: &str) -> Result<YamlValue, E> {
        Ok(YamlValue::String(s.to_string()))
    }
    fn visit_string<E>(self, s: String) -> Result<YamlValue, E> {
        Ok(YamlValue::String(s))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<YamlValue, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<YamlNode>()? {
            items.push(item);
        }
        Ok(YamlValue::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<YamlValue, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<YamlNode>()? {
            let value = map.next_value::<YamlNode>()?;
            entries.push((key, value));
        }
        Ok(YamlValue::Map(entries))
    }
}

impl<'de> Deserialize<'de> for YamlValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

/// Parses one YAML document into a located tree. A syntax error becomes a
/// [`Diagnostic`] in `file` at the error's position.
pub fn parse_yaml(file: &str, text: &str) -> Result<YamlNode, Diagnostic> {
    serde_saphyr::from_str::<YamlNode>(text).map_err(|err| {
        let (line, column) = err
            .location()
            .map(|l| (l.line() as usize, l.column() as usize))
            .unwrap_or((1, 1));
        let mut message = err.without_snippet().to_string();
        if let Some(at) = message.rfind(" at line ") {
            message.truncate(at);
        }
        Diagnostic {
            file: file.to_string(),
            line: line.max(1),
            column: column.max(1),
            field: "(yaml)".to_string(),
            message: format!("invalid YAML: {message}"),
            hint: Some("fix the YAML syntax; a YAML linter shows the exact problem".to_string()),
        }
    })
}

/// The candidate closest to `word` (edit distance at most 2), for
/// "did you mean" hints.
pub fn suggest<'c>(word: &str, candidates: &[&'c str]) -> Option<&'c str> {
    fn distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut prev: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut cur = vec![i + 1];
            for (j, cb) in b.iter().enumerate() {
                let sub = prev[j] + usize::from(ca != *cb);
                cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
            }
            prev = cur;
        }
        prev[b.len()]
    }
    candidates
        .iter()
        .map(|c| (distance(word, c), *c))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Joins a dotted field path.
pub(crate) fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Collects diagnostics for one file while validating it.
#[derive(Debug)]
pub(crate) struct FileCheck<'a> {
    /// The file being checked.
    pub file: &'a str,
    /// Diagnostics found so far.
    pub out: Vec<Diagnostic>,
}

impl<'a> FileCheck<'a> {
    /// A checker for `file`.
    pub fn new(file: &'a str) -> Self {
        Self {
            file,
            out: Vec::new(),
        }
    }

    /// Reports a problem at `node`.
    pub fn error(&mut self, node: &YamlNode, field: &str, message: String, hint: Option<String>) {
        self.out.push(Diagnostic {
            file: self.file.to_string(),
            line: node.line,
            column: node.column,
            field: field.to_string(),
            message,
            hint,
        });
    }

    /// Reports every key of mapping `map` not in `known` (keys in `ignored`
    /// are accepted silently). Returns false if `map` is not a mapping (and
    /// reports that).
    pub fn check_keys(
        &mut self,
        map: &YamlNode,
        path: &str,
        known: &[&str],
        ignored: &[&str],
    ) -> bool {
        let Some(entries) = map.as_map() else {
            self.error(
                map,
                if path.is_empty() { "(document)" } else { path },
                format!("expected a mapping, found {}", map.kind_name()),
                None,
            );
            return false;
        };
        for (key, _) in entries {
            let name = key.key_string();
            if !known.contains(&name.as_str()) && !ignored.contains(&name.as_str()) {
                let hint = match suggest(&name, known) {
                    Some(s) => format!(
                        "did you mean `{s}`? valid fields here: {}",
                        known.join(", ")
                    ),
                    None => format!("valid fields here: {}", known.join(", ")),
                };
                self.error(
                    key,
                    &join(path, &name),
                    format!("unknown field '{name}'"),
                    Some(hint),
                );
            }
        }
        true
    }

    /// A string field. Reports a missing required field at the mapping and a
    /// wrong type at the value.
    pub fn string<'n>(
        &mut self,
        map: &'n YamlNode,
        key: &str,
        path: &str,
        required: bool,
    ) -> Option<(String, &'n YamlNode)> {
        let field = join(path, key);
        match map.get(key) {
            None => {
                if required {
                    self.error(
                        map,
                        &field,
                        format!("missing required field '{key}'"),
                        Some(format!("add `{key}: <value>`")),
                    );
                }
                None
            }
            Some(node) => match &node.value {
                YamlValue::String(s) => Some((s.clone(), node)),
                YamlValue::Null if !required => None,
                _ => {
                    self.error(
                        node,
                        &field,
                        format!("expected a string, found {}", node.kind_name()),
                        Some("quote the value".to_string()),
                    );
                    None
                }
            },
        }
    }

    /// A boolean field with a default.
    pub fn boolean(&mut self, map: &YamlNode, key: &str, path: &str, default: bool) -> bool {
        match map.get(key) {
            None => default,
            Some(node) => match &node.value {
                YamlValue::Bool(b) => *b,
                YamlValue::Null => default,
                _ => {
                    self.error(
                        node,
                        &join(path, key),
                        format!("expected true or false, found {}", node.kind_name()),
                        None,
                    );
                    default
                }
            },
        }
    }

    /// A mapping field converted to a JSON object (absent or null: empty).
    pub fn object<'n>(
        &mut self,
        map: &'n YamlNode,
        key: &str,
        path: &str,
    ) -> (serde_json::Map<String, Value>, Option<&'n YamlNode>) {
        match map.get(key) {
            None => (serde_json::Map::new(), None),
            Some(node) => match &node.value {
                YamlValue::Map(_) => match node.to_json() {
                    Value::Object(o) => (o, Some(node)),
                    _ => (serde_json::Map::new(), Some(node)),
                },
                YamlValue::Null => (serde_json::Map::new(), None),
                _ => {
                    self.error(
                        node,
                        &join(path, key),
                        format!("expected a mapping, found {}", node.kind_name()),
                        None,
                    );
                    (serde_json::Map::new(), None)
                }
            },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn positions_of_keys_and_values() {
        let node = parse_yaml("x.yaml", "a: 1\nb:\n  c: [x, 'y']\n").unwrap();
        let b = node.get("b").unwrap();
        assert_eq!((b.line, b.column), (3, 3));
        let key = b.get_key("c").unwrap();
        assert_eq!((key.line, key.column), (3, 3));
        let c = b.get("c").unwrap();
        assert_eq!((c.line, c.column), (3, 6));
        assert_eq!(c.to_json(), serde_json::json!(["x", "y"]));
    }

    #[test]
    fn syntax_error_is_located() {
        let err = parse_yaml("x.yaml", "a: 1\nb: [1, 2\nc: 3\n").unwrap_err();
        assert_eq!((err.line, err.column), (3, 2));
        assert!(err.message.starts_with("invalid YAML: "), "{}", err.message);
        assert!(!err.message.contains("at line"), "{}", err.message);
    }

    #[test]
    fn display_formats() {
        let d = Diagnostic {
            file: "a.yaml".into(),
            line: 2,
            column: 5,
            field: "x.y".into(),
            message: "bad".into(),
            hint: Some("fix it".into()),
        };
        assert_eq!(d.to_string(), "a.yaml:2:5: x.y: bad\n  hint: fix it");
        let ds = Diagnostics(vec![d.clone(), Diagnostic { hint: None, ..d }]);
        assert_eq!(
            ds.to_string(),
            "a.yaml:2:5: x.y: bad\n  hint: fix it\na.yaml:2:5: x.y: bad"
        );
    }
}
