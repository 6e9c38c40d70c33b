//! Rule criteria: StackStorm's operators evaluated over a trigger instance.
//!
//! A criterion is `key: {type: <operator>, pattern: <value>}` where the key is
//! a path into the trigger instance (`trigger.body.ref`,
//! `trigger.headers['X-GitHub-Event']`). Evaluation is pure.

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
