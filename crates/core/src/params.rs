//! Resolving and checking action parameters before anything runs.
//!
//! [`resolve_parameters`] coerces CLI strings to declared types, applies
//! defaults and reports every problem at once. [`split_secrets`] masks secret
//! values for storage and display.

use crate::action::{ParamSchema, ParamSpec, ParamType};
use crate::model::MASK;
use serde_json::{Map, Value};
use std::fmt;

/// One problem with one parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamError {
    /// The parameter's name.
    pub parameter: String,
    /// What is wrong, and what to do.
    pub message: String,
}

impl fmt::Display for ParamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "parameter '{}': {}", self.parameter, self.message)
    }
}

impl std::error::Error for ParamError {}

/// Every parameter problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamErrors(pub Vec<ParamError>);

impl fmt::Display for ParamErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ParamErrors {}

/// Describes a value for messages without revealing secrets.
fn shown(spec: &ParamSpec, v: &Value) -> String {
    if spec.secret {
        MASK.to_string()
    } else {
        let s = v.to_string();
        if s.chars().count() > 80 {
            format!("{}...", s.chars().take(77).collect::<String>())
        } else {
            s
        }
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a number",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Coerces `v` to `kind` when it is a string (CLI input) or a float with no
/// fraction given for an integer. Err describes why it cannot be.
fn coerce(kind: ParamType, v: &Value) -> Result<Value, String> {
    if kind.matches(v) {
        return Ok(v.clone());
    }
    let fail = || {
        format!(
            "expected {}, got {}",
            match kind {
                ParamType::Integer => "an integer",
                ParamType::Array => "an array",
                ParamType::Object => "an object",
                other => other.name(),
            },
            json_kind(v)
        )
    };
    match (kind, v) {
        (ParamType::Integer, Value::Number(n)) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(Value::from(f as i64)),
            _ => Err(fail()),
        },
        (ParamType::Integer, Value::String(s)) => s
            .trim()
            .parse::<i64>()
            .map(Value::from)
            .map_err(|_| format!("'{s}' is not an integer")),
        (ParamType::Number, Value::String(s)) => {
            let t = s.trim();
            if let Ok(i) = t.parse::<i64>() {
                return Ok(Value::from(i));
            }
            t.parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map(Value::Number)
                .ok_or_else(|| format!("'{s}' is not a number"))
        }
        (ParamType::Boolean, Value::String(s)) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "1" => Ok(Value::Bool(true)),
            "false" | "no" | "off" | "0" => Ok(Value::Bool(false)),
            _ => Err(format!("'{s}' is not a boolean (use true or false)")),
        },
        (ParamType::Array, Value::String(s)) => {
            let t = s.trim();
            if t.starts_with('[') {
                match serde_json::from_str::<Value>(t) {
                    Ok(a @ Value::Array(_)) => Ok(a),
                    _ => Err(format!("'{s}' is not a JSON array")),
                }
            } else if t.is_empty() {
                Ok(Value::Array(Vec::new()))
            } else {
                // StackStorm's CLI: comma-separated items.
                Ok(Value::Array(
                    t.split(',')
                        .map(|p| Value::String(p.trim().to_string()))
                        .collect(),
                ))
            }
        }
        (ParamType::Object, Value::String(s)) => match serde_json::from_str::<Value>(s.trim()) {
            Ok(o @ Value::Object(_)) => Ok(o),
            _ => Err(format!(
                "'{s}' is not a JSON object (write it as {{\"key\": \"value\"}})"
            )),
        },
        (ParamType::Null, Value::String(s)) if s.trim().is_empty() || s.trim() == "null" => {
            Ok(Value::Null)
        }
        _ => Err(fail()),
    }
}

/// Resolves the parameters of a run.
///
/// `given` values are coerced to their declared types (strings from the CLI:
/// `"5"` -> `5`, `"true"` -> `true`, JSON text for arrays/objects), defaults
/// are applied, and every problem is reported: unknown names (listing the
/// known ones), immutable parameters given a value different from their
/// default, missing required ones, wrong types and values outside `enum`.
/// A `null` value counts as not given.
pub fn resolve_parameters(
    schema: &ParamSchema,
    given: &Map<String, Value>,
) -> Result<Map<String, Value>, ParamErrors> {
    let mut errors = Vec::new();
    let mut out = Map::new();
    for name in given.keys() {
        if schema.get(name).is_none() {
            let known = schema.names();
            errors.push(ParamError {
                parameter: name.clone(),
                message: if known.is_empty() {
                    "unknown parameter; this action takes no parameters".to_string()
                } else {
                    format!("unknown parameter; known parameters: {}", known.join(", "))
                },
            });
        }
    }
    for (name, spec) in &schema.0 {
        let value = given
            .get(name)
            .filter(|v| !v.is_null() || spec.kind == ParamType::Null);
        let err = |message: String| ParamError {
            parameter: name.clone(),
            message,
        };
        let value = match value {
            None => match &spec.default {
                Some(d) => d.clone(),
                None => {
                    if spec.required {
                        errors.push(err(format!(
                            "required {} parameter is missing",
                            spec.kind.name()
                        )));
                    }
                    continue;
                }
            },
            Some(v) => {
                let v = match coerce(spec.kind, v) {
                    Ok(v) => v,
                    Err(m) => {
                        let m = if spec.secret {
                            format!("expected {} value (value not shown)", spec.kind.name())
                        } else {
                            m
                        };
                        errors.push(err(m));
                        continue;
                    }
                };
                if spec.immutable && spec.default.as_ref() != Some(&v) {
                    errors.push(err(match &spec.default {
                        Some(d) => format!(
                            "is immutable (always {}); remove it from the request",
                            shown(spec, d)
                        ),
                        None => {
                            "is immutable and cannot be set; remove it from the request".to_string()
                        }
                    }));
                    continue;
                }
                v
            }
        };
        if let Some(allowed) = &spec.enum_values
            && !allowed.contains(&value)
        {
            let list: Vec<String> = allowed.iter().map(|a| shown(spec, a)).collect();
            errors.push(err(format!(
                "{} is not one of the allowed values: {}",
                shown(spec, &value),
                list.join(", ")
            )));
            continue;
        }
        out.insert(name.clone(), value);
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(ParamErrors(errors))
    }
}

/// Splits `params`: a copy with every secret parameter's value replaced by
/// [`MASK`] (for storage and display), and the secret values apart.
pub fn split_secrets(
    schema: &ParamSchema,
    params: &Map<String, Value>,
) -> (Map<String, Value>, Map<String, Value>) {
    let mut masked = Map::new();
    let mut secrets = Map::new();
    for (name, value) in params {
        if schema.get(name).is_some_and(|s| s.secret) {
            masked.insert(name.clone(), Value::String(MASK.to_string()));
            secrets.insert(name.clone(), value.clone());
        } else {
            masked.insert(name.clone(), value.clone());
        }
    }
    (masked, secrets)
}
