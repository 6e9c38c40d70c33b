//! Timer tests: interval, cron (APScheduler defaults, day_of_week, */n,
//! years, time zones), date in past and future, parameter errors, payload.

#![allow(clippy::unwrap_used)]

use aviary_core::timer::{TimerSpec, parse_timezone, timer_payload};
use chrono::{DateTime, Duration, TimeZone, Utc};
use serde_json::{Map, Value, json};

fn params(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn cron(v: Value) -> TimerSpec {
    TimerSpec::from_trigger("core.st2.CronTimer", &params(v)).unwrap()
}

fn nexts(spec: &TimerSpec, from: &str, n: usize) -> Vec<String> {
    let mut cur = t(from);
    let mut out = Vec::new();
    for _ in 0..n {
        cur = spec.next_after(cur).unwrap();
        out.push(cur.to_rfc3339());
    }
    out
}

#[test]
fn interval() {
    for (unit, delta, secs) in [
        ("seconds", 30, 30),
        ("minutes", 5, 300),
        ("hours", 2, 7200),
        ("days", 1, 86_400),
        ("weeks", 1, 604_800),
    ] {
        let spec = TimerSpec::from_trigger(
            "core.st2.IntervalTimer",
            &params(json!({"unit": unit, "delta": delta})),
        )
        .unwrap();
        let from = t("2026-03-01T10:00:00Z");
        assert_eq!(spec.next_after(from), Some(from + Duration::seconds(secs)));
    }
    for bad in [
        json!({"unit": "fortnights", "delta": 1}),
        json!({"unit": "seconds", "delta": 0}),
        json!({"unit": "seconds", "delta": -3}),
        json!({"unit": "seconds", "delta": "10"}),
        json!({"delta": 10}),
    ] {
        assert!(
            TimerSpec::from_trigger("core.st2.IntervalTimer", &params(bad.clone())).is_err(),
            "{bad}"
        );
    }
}

#[test]
fn cron_every_five_minutes_defaults_seconds_to_zero() {
    let spec = cron(json!({"minute": "*/5"}));
    assert_eq!(
        nexts(&spec, "2026-03-01T10:02:30Z", 3),
        [
            "2026-03-01T10:05:00+00:00",
            "2026-03-01T10:10:00+00:00",
            "2026-03-01T10:15:00+00:00"
        ]
    );
    // Strictly after: a fire time itself is skipped; sub-seconds handled.
    assert_eq!(
        spec.next_after(t("2026-03-01T10:05:00Z")).unwrap(),
        t("2026-03-01T10:10:00Z")
    );
    assert_eq!(
        spec.next_after(t("2026-03-01T10:04:59.500Z")).unwrap(),
        t("2026-03-01T10:05:00Z")
    );
}

#[test]
fn cron_apscheduler_defaults() {
    // hour given -> minute 0, second 0; day etc. are '*'.
    let spec = cron(json!({"hour": 10}));
    assert_eq!(
        nexts(&spec, "2026-03-01T10:00:00Z", 2),
        ["2026-03-02T10:00:00+00:00", "2026-03-03T10:00:00+00:00"]
    );
    // month given -> day 1 at midnight.
    let spec = cron(json!({"month": "6"}));
    assert_eq!(
        nexts(&spec, "2026-03-01T00:00:00Z", 2),
        ["2026-06-01T00:00:00+00:00", "2027-06-01T00:00:00+00:00"]
    );
    // second given -> every minute at that second.
    let spec = cron(json!({"second": 15}));
    assert_eq!(
        nexts(&spec, "2026-03-01T00:00:00Z", 2),
        ["2026-03-01T00:00:15+00:00", "2026-03-01T00:01:15+00:00"]
    );
    // hour and second, minute between them is '*'.
    let spec = cron(json!({"hour": 3, "second": 0}));
    assert_eq!(
        nexts(&spec, "2026-03-01T03:58:30Z", 3),
        [
            "2026-03-01T03:59:00+00:00",
            "2026-03-02T03:00:00+00:00",
            "2026-03-02T03:01:00+00:00"
        ]
    );
}

#[test]
fn cron_day_of_week_counts_from_monday() {
    // 2026-03-02 is a Monday.
    assert_eq!(
        Utc.with_ymd_and_hms(2026, 3, 2, 0, 0, 0)
            .unwrap()
            .format("%a")
            .to_string(),
        "Mon"
    );
    let by_name = cron(json!({"day_of_week": "mon", "hour": 9}));
    let by_num = cron(json!({"day_of_week": 0, "hour": 9}));
    for spec in [&by_name, &by_num] {
        assert_eq!(
            nexts(spec, "2026-03-01T12:00:00Z", 2),
            ["2026-03-02T09:00:00+00:00", "2026-03-09T09:00:00+00:00"]
        );
    }
    // Weekdays mon-fri at 08:30.
    let spec = cron(json!({"day_of_week": "mon-fri", "hour": 8, "minute": 30}));
    assert_eq!(
        nexts(&spec, "2026-03-06T09:00:00Z", 2),
        ["2026-03-09T08:30:00+00:00", "2026-03-10T08:30:00+00:00"]
    );
    // Weekend: 5-6 = sat,sun (APScheduler numbering).
    let spec = cron(json!({"day_of_week": "5-6", "hour": 0}));
    assert_eq!(
        nexts(&spec, "2026-03-02T00:00:00Z", 3),
        [
            "2026-03-07T00:00:00+00:00",
            "2026-03-08T00:00:00+00:00",
            "2026-03-14T00:00:00+00:00"
        ]
    );
    // day and day_of_week must both hold (APScheduler), not either.
    let spec = cron(json!({"day": 13, "day_of_week": "fri"}));
    assert_eq!(
        nexts(&spec, "2026-01-01T00:00:00Z", 1),
        ["2026-02-13T00:00:00+00:00"]
    );
}

#[test]
fn cron_years_and_timezones() {
    let spec = cron(json!({"year": "2028", "month": 1, "day": 1}));
    assert_eq!(
        spec.next_after(t("2026-05-01T00:00:00Z")),
        Some(t("2028-01-01T00:00:00Z"))
    );
    assert_eq!(spec.next_after(t("2028-01-01T00:00:00Z")), None);

    let spec = cron(json!({"hour": 9, "timezone": "+02:00"}));
    assert_eq!(
        spec.next_after(t("2026-03-01T00:00:00Z")),
        Some(t("2026-03-01T07:00:00Z"))
    );
    let spec = cron(json!({"hour": 9, "timezone": "UTC-5"}));
    assert_eq!(
        spec.next_after(t("2026-03-01T00:00:00Z")),
        Some(t("2026-03-01T14:00:00Z"))
    );
    assert!(parse_timezone("Europe/Paris").is_err());
    assert_eq!(parse_timezone("-0530").unwrap().local_minus_utc(), -19_800);
    assert_eq!(parse_timezone("utc").unwrap().local_minus_utc(), 0);
}

#[test]
fn cron_errors() {
    for (bad, needle) in [
        (json!({"minute": "*/0"}), "invalid"),
        (json!({"day_of_week": "funday"}), "funday"),
        (json!({"day_of_week": 7}), "outside"),
        (json!({"week": 3}), "week"),
        (json!({"day": "last fri"}), "not supported"),
        (json!({"hour": 25}), "invalid"),
        (json!({"hour": "1;2"}), "unsupported characters"),
        (json!({"minutes": 5}), "unknown parameter"),
        (json!({"hour": 1, "timezone": "Mars/Olympus"}), "timezone"),
        (json!({"year": "next"}), "year"),
        (json!({"hour": -1}), "non-negative"),
    ] {
        let err = TimerSpec::from_trigger("core.st2.CronTimer", &params(bad.clone()))
            .expect_err(&bad.to_string());
        assert!(err.contains(needle), "{bad}: {err}");
    }
    assert!(TimerSpec::from_trigger("core.st2.webhook", &Map::new()).is_err());
}

#[test]
fn date_timer() {
    let spec = TimerSpec::from_trigger(
        "core.st2.DateTimer",
        &params(json!({"date": "2026-12-01 10:00:00"})),
    )
    .unwrap();
    let at = t("2026-12-01T10:00:00Z");
    assert_eq!(spec.next_after(t("2026-11-30T00:00:00Z")), Some(at));
    assert_eq!(spec.next_after(at), None);
    assert_eq!(spec.next_after(t("2027-01-01T00:00:00Z")), None);

    let spec = TimerSpec::from_trigger(
        "core.st2.DateTimer",
        &params(json!({"date": "2026-12-01 10:00:00", "timezone": "+01:00"})),
    )
    .unwrap();
    assert_eq!(
        spec.next_after(t("2026-01-01T00:00:00Z")),
        Some(t("2026-12-01T09:00:00Z"))
    );
    let spec = TimerSpec::from_trigger(
        "core.st2.DateTimer",
        &params(json!({"date": "2026-12-01T10:00:00-03:00"})),
    )
    .unwrap();
    assert_eq!(
        spec.next_after(t("2026-01-01T00:00:00Z")),
        Some(t("2026-12-01T13:00:00Z"))
    );
    for bad in [json!({"date": "tomorrow"}), json!({}), json!({"date": 5})] {
        assert!(TimerSpec::from_trigger("core.st2.DateTimer", &params(bad)).is_err());
    }
}

#[test]
fn payload() {
    let p = params(json!({"unit": "seconds", "delta": 10}));
    assert_eq!(
        timer_payload(&p, t("2026-03-01T10:00:00Z")),
        json!({"executed_at": "2026-03-01T10:00:00Z", "schedule": {"unit": "seconds", "delta": 10}})
    );
}
