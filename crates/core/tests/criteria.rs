//! Table tests for rule criteria: every operator, positive and negative,
//! missing keys, key syntax, search conditions and compiled evaluation.

#![allow(clippy::unwrap_used)]

use aviary_core::criteria::{
    CompiledCriteria, Criterion, Operator, PathSegment, SearchCondition, evaluate_all, lookup,
    parse_key,
};
use chrono::{DateTime, TimeZone, Utc};
use serde_json::{Value, json};

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap()
}

fn ctx() -> Value {
    json!({"trigger": {
        "headers": {"X-GitHub-Event": "push", "Content-Length": "120"},
        "body": {
            "ref": "refs/heads/main",
            "repo": "Aviary/Core",
            "count": 5,
            "ratio": 0.5,
            "flag": true,
            "nothing": null,
            "tags": ["canary", "prod", 3],
            "created": "2026-01-01 11:59:00",
            "created_rfc": "2026-01-01T11:00:00Z",
            "epoch": 1767268740,
            "multi": "line one\nline two",
            "map": {"a": 1},
            "commits": [
                {"id": "c1", "author": "alice", "added": 3},
                {"id": "c2", "author": "bob", "added": 10}
            ]
        }
    }})
}

fn crit(key: &str, op: &str, pattern: Value) -> Criterion {
    Criterion {
        key: key.to_string(),
        op: Operator::parse(op).unwrap_or_else(|| panic!("unknown op {op}")),
        pattern,
        condition: None,
    }
}

#[test]
fn operator_table() {
    let cases: Vec<(&str, &str, Value, bool)> = vec![
        // equals / nequals
        ("trigger.body.ref", "equals", json!("refs/heads/main"), true),
        ("trigger.body.ref", "eq", json!("refs/heads/dev"), false),
        ("trigger.body.count", "equals", json!(5), true),
        ("trigger.body.count", "equals", json!(5.0), true),
        ("trigger.body.count", "equals", json!("5"), true),
        ("trigger.body.count", "equals", json!(6), false),
        ("trigger.body.flag", "equals", json!("true"), true),
        ("trigger.body.flag", "equals", json!(false), false),
        (
            "trigger.body.tags",
            "equals",
            json!(["canary", "prod", 3]),
            true,
        ),
        ("trigger.body.ref", "equals", Value::Null, false),
        ("trigger.body.ref", "nequals", json!("refs/heads/dev"), true),
        ("trigger.body.ref", "neq", json!("refs/heads/main"), false),
        // iequals
        ("trigger.body.repo", "iequals", json!("aviary/core"), true),
        ("trigger.body.repo", "ieq", json!("aviary/other"), false),
        ("trigger.body.count", "iequals", json!("5"), false),
        // lessthan / greaterthan
        ("trigger.body.count", "lessthan", json!(6), true),
        ("trigger.body.count", "lt", json!(5), false),
        ("trigger.body.count", "greaterthan", json!(4.5), true),
        ("trigger.body.count", "gt", json!(5), false),
        (
            "trigger.headers['Content-Length']",
            "greaterthan",
            json!(100),
            true,
        ),
        (
            "trigger.headers['Content-Length']",
            "lessthan",
            json!(100),
            false,
        ),
        ("trigger.body.ref", "lessthan", json!(3), false),
        (
            "trigger.body.ref",
            "greaterthan",
            json!("refs/heads/a"),
            true,
        ),
        // matchwildcard (fnmatch)
        (
            "trigger.body.ref",
            "matchwildcard",
            json!("refs/heads/*"),
            true,
        ),
        (
            "trigger.body.ref",
            "matchwildcard",
            json!("refs/tags/*"),
            false,
        ),
        (
            "trigger.body.ref",
            "matchwildcard",
            json!("refs/heads/ma?n"),
            true,
        ),
        (
            "trigger.body.ref",
            "matchwildcard",
            json!("refs/heads/[mn]ain"),
            true,
        ),
        (
            "trigger.body.ref",
            "matchwildcard",
            json!("refs/heads/[!m]ain"),
            false,
        ),
        ("trigger.body.ref", "matchwildcard", json!("*/MAIN"), false),
        ("trigger.body.ref", "matchwildcard", json!("refs"), false),
        // regex: search semantics, case-sensitive
        ("trigger.body.ref", "regex", json!("^refs/heads/"), true),
        ("trigger.body.ref", "regex", json!("heads/ma"), true),
        (
            "trigger.body.ref",
            "matchregex",
            json!("^refs/heads/main$"),
            true,
        ),
        ("trigger.body.ref", "regex", json!("^refs/tags/"), false),
        ("trigger.body.ref", "regex", json!("MAIN"), false),
        ("trigger.body.ref", "iregex", json!("MAIN$"), true),
        ("trigger.body.ref", "iregex", json!("^DEV"), false),
        ("trigger.body.count", "regex", json!("5"), false),
        ("trigger.body.multi", "regex", json!("two$"), true),
        // contains family
        ("trigger.body.ref", "contains", json!("heads"), true),
        ("trigger.body.ref", "contains", json!("HEADS"), false),
        ("trigger.body.tags", "contains", json!("prod"), true),
        ("trigger.body.tags", "contains", json!("3"), true),
        ("trigger.body.tags", "contains", json!("dev"), false),
        ("trigger.body.map", "contains", json!("a"), true),
        ("trigger.body.ref", "ncontains", json!("tags"), true),
        ("trigger.body.ref", "ncontains", json!("heads"), false),
        ("trigger.body.tags", "ncontains", json!("dev"), true),
        ("trigger.body.count", "ncontains", json!("x"), false),
        ("trigger.body.ref", "icontains", json!("HEADS"), true),
        ("trigger.body.tags", "icontains", json!("CANARY"), true),
        ("trigger.body.ref", "icontains", json!("TAGS"), false),
        ("trigger.body.ref", "incontains", json!("TAGS"), true),
        ("trigger.body.ref", "incontains", json!("HEADS"), false),
        // startswith / endswith
        ("trigger.body.ref", "startswith", json!("refs/"), true),
        ("trigger.body.ref", "startswith", json!("REFS/"), false),
        ("trigger.body.ref", "istartswith", json!("REFS/"), true),
        ("trigger.body.ref", "istartswith", json!("heads"), false),
        ("trigger.body.ref", "endswith", json!("/main"), true),
        ("trigger.body.ref", "endswith", json!("/MAIN"), false),
        ("trigger.body.ref", "iendswith", json!("/MAIN"), true),
        ("trigger.body.ref", "iendswith", json!("/dev"), false),
        // timediff: now - value (seconds)
        ("trigger.body.created", "timediff_lt", json!(120), true),
        ("trigger.body.created", "td_lt", json!(30), false),
        ("trigger.body.created", "timediff_gt", json!(30), true),
        ("trigger.body.created", "td_gt", json!("120"), false),
        ("trigger.body.created_rfc", "timediff_gt", json!(3599), true),
        (
            "trigger.body.created_rfc",
            "timediff_lt",
            json!(3599),
            false,
        ),
        ("trigger.body.epoch", "timediff_lt", json!(61), true),
        ("trigger.body.epoch", "timediff_gt", json!(61), false),
        ("trigger.body.ref", "timediff_lt", json!(61), false),
        // exists / nexists
        ("trigger.body.ref", "exists", Value::Null, true),
        ("trigger.body.missing", "exists", Value::Null, false),
        ("trigger.body.nothing", "exists", Value::Null, false),
        ("trigger.body.missing", "nexists", Value::Null, true),
        ("trigger.body.nothing", "nexists", Value::Null, true),
        ("trigger.body.ref", "nexists", Value::Null, false),
        // inside / ninside
        (
            "trigger.body.ref",
            "inside",
            json!(["refs/heads/main", "refs/heads/dev"]),
            true,
        ),
        ("trigger.body.ref", "in", json!(["refs/heads/dev"]), false),
        ("trigger.body.count", "inside", json!([1, 5]), true),
        (
            "trigger.body.ref",
            "inside",
            json!("xx refs/heads/main xx"),
            true,
        ),
        (
            "trigger.body.ref",
            "ninside",
            json!(["refs/heads/dev"]),
            true,
        ),
        ("trigger.body.ref", "nin", json!(["refs/heads/main"]), false),
        ("trigger.body.map", "ninside", json!("abc"), false),
    ];
    let c = ctx();
    let mut failures = Vec::new();
    for (key, op, pattern, expected) in &cases {
        let cr = crit(key, op, pattern.clone());
        cr.validate()
            .unwrap_or_else(|e| panic!("{key} {op} {pattern}: {e}"));
        if cr.matches(&c, now()) != *expected {
            failures.push(format!("{key} {op} {pattern} expected {expected}"));
        }
    }
    assert!(failures.is_empty(), "failures:\n{}", failures.join("\n"));
}

#[test]
fn missing_key_fails_everything_but_nexists() {
    let c = ctx();
    for (op, _) in Operator::ALL {
        if op == Operator::Search {
            continue;
        }
        let cr = Criterion {
            key: "trigger.body.absent.deeper".into(),
            op,
            pattern: json!("x"),
            condition: None,
        };
        let expected = op == Operator::NExists;
        assert_eq!(cr.matches(&c, now()), expected, "{}", op.name());
    }
}

#[test]
fn key_syntax() {
    assert_eq!(
        parse_key("trigger.headers['X-GitHub-Event']").unwrap(),
        vec![
            PathSegment::Key("trigger".into()),
            PathSegment::Key("headers".into()),
            PathSegment::Key("X-GitHub-Event".into()),
        ]
    );
    assert_eq!(
        parse_key(r#"trigger.a["b.c"][2].d.0"#).unwrap(),
        vec![
            PathSegment::Key("trigger".into()),
            PathSegment::Key("a".into()),
            PathSegment::Key("b.c".into()),
            PathSegment::Index(2),
            PathSegment::Key("d".into()),
            PathSegment::Key("0".into()),
        ]
    );
    assert_eq!(
        parse_key(r"t['it\'s']").unwrap()[1],
        PathSegment::Key("it's".into())
    );
    for bad in [
        "", ".a", "a.", "a..b", "a['x'", "a[", "a[]", "a['x']b", "[0]", "a.]",
    ] {
        let e = parse_key(bad).expect_err(bad);
        assert!(e.to_string().contains("bad criteria key"), "{e}");
    }

    let c = ctx();
    assert_eq!(
        lookup(&c, "trigger.headers['X-GitHub-Event']"),
        Some(&json!("push"))
    );
    assert_eq!(
        lookup(&c, r#"trigger.headers["X-GitHub-Event"]"#),
        Some(&json!("push"))
    );
    // Header names are case-insensitive.
    assert_eq!(
        lookup(&c, "trigger.headers['x-github-event']"),
        Some(&json!("push"))
    );
    // ... other keys are not.
    assert_eq!(lookup(&c, "trigger.body.REF"), None);
    assert_eq!(lookup(&c, "trigger.body.commits[1].id"), Some(&json!("c2")));
    assert_eq!(lookup(&c, "trigger.body.commits.0.id"), Some(&json!("c1")));
    assert_eq!(lookup(&c, "trigger.body.commits[5].id"), None);
    assert_eq!(lookup(&c, "trigger.body.ref.deeper"), None);
    assert_eq!(lookup(&c, "trigger.body..ref"), None);
}

fn search(condition: SearchCondition, pattern: Value) -> Criterion {
    Criterion {
        key: "trigger.body.commits".into(),
        op: Operator::Search,
        pattern,
        condition: Some(condition),
    }
}

#[test]
fn search_conditions() {
    let c = ctx();
    let alice_big = json!({
        "item.author": {"type": "equals", "pattern": "alice"},
        "item.added": {"type": "greaterthan", "pattern": 5}
    });
    let bob_big = json!({
        "item.author": {"type": "equals", "pattern": "bob"},
        "item.added#1": {"type": "greaterthan", "pattern": 5},
        "item.added#2": {"type": "lessthan", "pattern": 20}
    });
    let any_author = json!({
        "item.author": {"type": "inside", "pattern": ["alice", "bob"]},
        "item.id": {"type": "startswith", "pattern": "c"}
    });
    let alice_or_big = json!({
        "item.author": {"type": "equals", "pattern": "alice"},
        "item.added": {"type": "greaterthan", "pattern": 5}
    });
    let bob_or_big = json!({
        "item.author": {"type": "equals", "pattern": "bob"},
        "item.added": {"type": "greaterthan", "pattern": 5}
    });
    let nobody = json!({
        "item.author": {"type": "equals", "pattern": "carol"},
        "item.added": {"type": "greaterthan", "pattern": 100}
    });
    let table = [
        (SearchCondition::Any, &alice_big, false),
        (SearchCondition::Any, &bob_big, true),
        (SearchCondition::All, &bob_big, false),
        (SearchCondition::All, &any_author, true),
        (SearchCondition::Any2Any, &alice_or_big, true),
        (SearchCondition::Any2Any, &nobody, false),
        (SearchCondition::All2Any, &alice_or_big, true),
        (SearchCondition::All2Any, &bob_or_big, false),
    ];
    for (cond, pattern, expected) in table {
        let cr = search(cond, pattern.clone());
        cr.validate().unwrap();
        assert_eq!(cr.matches(&c, now()), expected, "{cond:?} {pattern}");
    }
    // Search on a missing key or a non-list fails; nested search works.
    let mut cr = search(SearchCondition::Any, any_author.clone());
    cr.key = "trigger.body.missing".into();
    assert!(!cr.matches(&c, now()));
    cr.key = "trigger.body.ref".into();
    assert!(!cr.matches(&c, now()));
    let nested = json!({"trigger": {"groups": [{"members": [{"n": "x"}, {"n": "y"}]}]}});
    let cr = Criterion {
        key: "trigger.groups".into(),
        op: Operator::Search,
        condition: Some(SearchCondition::Any),
        pattern: json!({"item.members": {"type": "search", "condition": "any",
            "pattern": {"item.n": {"type": "eq", "pattern": "y"}}}}),
    };
    assert!(cr.matches(&nested, now()));
}

#[test]
fn validation_errors() {
    let bad: Vec<(Criterion, &str)> = vec![
        (crit("trigger..x", "equals", json!(1)), "bad criteria key"),
        (
            crit("trigger.x", "regex", json!("([a-")),
            "not a valid regular expression",
        ),
        (crit("trigger.x", "regex", json!([1])), "must be a string"),
        (
            crit("trigger.x", "timediff_lt", json!("soon")),
            "number of seconds",
        ),
        (crit("trigger.x", "inside", json!(5)), "list or a string"),
        (
            Criterion {
                condition: None,
                ..crit("trigger.x", "search", json!({}))
            },
            "needs `condition",
        ),
        (search(SearchCondition::Any, json!([1])), "must be a map"),
        (
            search(
                SearchCondition::Any,
                json!({"x.a": {"type": "eq", "pattern": 1}}),
            ),
            "must start with `item.`",
        ),
        (
            search(SearchCondition::Any, json!({"item.a": {"type": "bogus"}})),
            "unknown operator `bogus`",
        ),
        (
            search(
                SearchCondition::Any,
                json!({"item.a": {"type": "regex", "pattern": "("}}),
            ),
            "not a valid regular expression",
        ),
    ];
    for (cr, needle) in bad {
        let err = cr.validate().expect_err(needle);
        assert!(err.contains(needle), "{err} should contain {needle}");
        assert!(!cr.matches(&ctx(), now()));
    }
}

#[test]
fn evaluate_all_and_compiled() {
    let c = ctx();
    let criteria = vec![
        crit("trigger.headers['X-GitHub-Event']", "equals", json!("push")),
        crit("trigger.body.ref", "regex", json!("^refs/heads/main$")),
        crit("trigger.body.count", "gt", json!(10)),
    ];
    assert_eq!(evaluate_all(&[], &c, now()), Ok(()));
    assert_eq!(evaluate_all(&criteria[..2], &c, now()), Ok(()));
    assert_eq!(evaluate_all(&criteria, &c, now()), Err(2));

    let compiled = CompiledCriteria::new(&criteria).unwrap();
    assert_eq!(compiled.len(), 3);
    assert_eq!(compiled.evaluate(&c, now()), Err(2));
    let ok = CompiledCriteria::new(&criteria[..2]).unwrap();
    for _ in 0..1000 {
        assert_eq!(ok.evaluate(&c, now()), Ok(()));
    }
    let err = CompiledCriteria::new(&[criteria[0].clone(), crit("trigger.x", "regex", json!("("))])
        .unwrap_err();
    assert_eq!(err.index, 1);
}

#[test]
fn operator_aliases() {
    for (alias, op) in [
        ("eq", Operator::Equals),
        ("neq", Operator::NEquals),
        ("ieq", Operator::IEquals),
        ("lt", Operator::LessThan),
        ("gt", Operator::GreaterThan),
        ("matchregex", Operator::Regex),
        ("td_lt", Operator::TimeDiffLt),
        ("td_gt", Operator::TimeDiffGt),
        ("in", Operator::Inside),
        ("nin", Operator::NInside),
    ] {
        assert_eq!(Operator::parse(alias), Some(op), "{alias}");
    }
    for (op, name) in Operator::ALL {
        assert_eq!(Operator::parse(name), Some(op));
    }
}
