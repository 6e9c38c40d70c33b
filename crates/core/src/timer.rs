//! StackStorm timers: `core.st2.IntervalTimer`, `core.st2.CronTimer` and
//! `core.st2.DateTimer`, computed purely from their parameters.
//!
//! Cron timers take APScheduler's fields as StackStorm does (`year`, `month`,
//! `day`, `week`, `day_of_week`, `hour`, `minute`, `second`): fields more
//! significant than the least significant given field default to `*`, less
//! significant ones to their minimum (`{minute: "*/5"}` fires at second 0
//! every five minutes). `day_of_week` counts from Monday (`0` = `mon`), and
//! `day` and `day_of_week` must both match. The schedule is evaluated with the
//! croner crate. Time zones: `UTC` or a fixed offset (`+02:00`, `UTC-5`).

use chrono::{
    DateTime, Datelike, Duration, FixedOffset, NaiveDateTime, SecondsFormat, TimeZone, Timelike,
    Utc,
};
use serde_json::{Map, Value};

use crate::model::{CRON_TIMER_TRIGGER, DATE_TIMER_TRIGGER, INTERVAL_TIMER_TRIGGER};

/// A compiled cron schedule.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    cron: croner::Cron,
    /// The croner pattern (`sec min hour dom month dow`, Sunday = 0).
    pattern: String,
    /// Allowed years as inclusive ranges; `None` = every year.
    years: Option<Vec<(i32, i32)>>,
}

impl CronSchedule {
    /// The equivalent croner pattern with seconds (Sunday = 0), for display.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    fn year_ok(&self, year: i32) -> bool {
        match &self.years {
            None => true,
            Some(ranges) => ranges.iter().any(|(a, b)| (*a..=*b).contains(&year)),
        }
    }

    fn next_year_after(&self, year: i32) -> Option<i32> {
        self.years
            .as_ref()?
            .iter()
            .filter_map(|(a, b)| {
                if *b <= year {
                    None
                } else {
                    Some((*a).max(year + 1))
                }
            })
            .min()
    }
}

/// When a timer fires.
#[derive(Debug, Clone)]
pub enum TimerSpec {
    /// Every fixed duration.
    Interval {
        /// The period.
        every: Duration,
    },
    /// On a cron schedule in a time zone.
    Cron {
        /// The schedule.
        schedule: Box<CronSchedule>,
        /// The zone its fields are read in.
        timezone: FixedOffset,
    },
    /// Once.
    Date {
        /// The instant.
        at: DateTime<Utc>,
    },
}

const CRON_FIELDS: [&str; 8] = [
    "year",
    "month",
    "day",
    "week",
    "day_of_week",
    "hour",
    "minute",
    "second",
];
const CRON_DEFAULTS: [&str; 8] = ["*", "1", "1", "*", "*", "0", "0", "0"];
const WEEKDAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// Parses `UTC` (also `Z`, `GMT`, `Etc/UTC`) or a fixed offset (`+02:00`,
/// `-0530`, `UTC+2`, `UTC-05:30`).
pub fn parse_timezone(tz: &str) -> Result<FixedOffset, String> {
    let bad = || {
        format!(
            "unsupported timezone `{tz}`: use `UTC` or a fixed offset such as `+02:00` or `UTC-5`"
        )
    };
    let t = tz.trim();
    let upper = t.to_ascii_uppercase();
    if matches!(
        upper.as_str(),
        "UTC" | "Z" | "GMT" | "ETC/UTC" | "ETC/GMT" | "UNIVERSAL" | "ZULU"
    ) {
        return FixedOffset::east_opt(0).ok_or_else(bad);
    }
    let rest = upper
        .strip_prefix("UTC")
        .or_else(|| upper.strip_prefix("GMT"))
        .unwrap_or(&upper);
    let (sign, digits) = match rest.chars().next() {
        Some('+') => (1, &rest[1..]),
        Some('-') => (-1, &rest[1..]),
        _ => return Err(bad()),
    };
    let (h, m) = if let Some((h, m)) = digits.split_once(':') {
        (h, m)
    } else if digits.len() == 4 {
        digits.split_at(2)
    } else {
        (digits, "0")
    };
    let h: i32 = h.parse().map_err(|_| bad())?;
    let m: i32 = m.parse().map_err(|_| bad())?;
    if h > 14 || m > 59 {
        return Err(bad());
    }
    FixedOffset::east_opt(sign * (h * 3600 + m * 60)).ok_or_else(bad)
}

fn field_text(name: &str, v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) if !s.trim().is_empty() => Ok(s.trim().to_ascii_lowercase()),
        Value::Number(n) if n.as_u64().is_some() => Ok(n.to_string()),
        other => Err(format!(
            "CronTimer `{name}` must be a non-negative integer or a cron expression string, not {other}"
        )),
    }
}

/// Parses one APScheduler-style list element (`*`, `*/n`, `a`, `a-b`,
/// `a-b/n`) over `min..=max`, with optional names, into the values it covers.
fn expand(
    field: &str,
    expr: &str,
    min: i32,
    max: i32,
    name_to_num: &dyn Fn(&str) -> Option<i32>,
) -> Result<Vec<i32>, String> {
    let bad = |why: &str| format!("CronTimer `{field}` = `{expr}`: {why}");
    let num = |s: &str| -> Result<i32, String> {
        let v = match s.parse::<i32>() {
            Ok(v) => v,
            Err(_) => name_to_num(s).ok_or_else(|| bad(&format!("`{s}` is not a valid value")))?,
        };
        if v < min || v > max {
            return Err(bad(&format!("{v} is outside {min}-{max}")));
        }
        Ok(v)
    };
    let mut out = Vec::new();
    for part in expr.split(',') {
        let part = part.trim();
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let s: i32 = s
                    .parse()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| bad("the step must be a positive integer"))?;
                (r, s)
            }
            None => (part, 1),
        };
        let (a, b) = if range == "*" {
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            (num(a.trim())?, num(b.trim())?)
        } else {
            let a = num(range)?;
            (a, if step > 1 { max } else { a })
        };
        if a > b {
            return Err(bad("the range start is after its end"));
        }
        out.extend((a..=b).step_by(step as usize));
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn weekday_num(s: &str) -> Option<i32> {
    WEEKDAYS.iter().position(|d| *d == s).map(|p| p as i32)
}

/// A pass-through cron field, checked for characters croner understands.
fn passthrough(field: &str, expr: &str) -> Result<String, String> {
    let ok = expr
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '*' | '/' | '-' | ','));
    if !ok {
        return Err(format!(
            "CronTimer `{field}` = `{expr}`: unsupported characters (use *, */n, a-b, a,b)"
        ));
    }
    Ok(expr.to_ascii_uppercase())
}

fn cron_from_params(params: &Map<String, Value>) -> Result<TimerSpec, String> {
    for key in params.keys() {
        if key != "timezone" && !CRON_FIELDS.contains(&key.as_str()) {
            return Err(format!(
                "CronTimer has unknown parameter `{key}`; allowed: timezone, {}",
                CRON_FIELDS.join(", ")
            ));
        }
    }
    let timezone = match params.get("timezone") {
        None | Some(Value::Null) => parse_timezone("UTC")?,
        Some(Value::String(s)) => parse_timezone(s)?,
        Some(other) => {
            return Err(format!(
                "CronTimer `timezone` must be a string, not {other}"
            ));
        }
    };
    // APScheduler: once every given field has been consumed, the remaining
    // (less significant) fields take their defaults; earlier ones are `*`.
    let mut remaining = CRON_FIELDS
        .iter()
        .filter(|f| params.get(**f).is_some_and(|v| !v.is_null()))
        .count();
    let mut exprs = Vec::with_capacity(8);
    for (i, field) in CRON_FIELDS.iter().enumerate() {
        let expr = match params.get(*field).filter(|v| !v.is_null()) {
            Some(v) => {
                remaining -= 1;
                field_text(field, v)?
            }
            None if remaining == 0 => CRON_DEFAULTS[i].to_string(),
            None => "*".to_string(),
        };
        exprs.push(expr);
    }
    let [year, month, day, week, dow, hour, minute, second] =
        <[String; 8]>::try_from(exprs).map_err(|_| "internal: cron fields".to_string())?;

    if week != "*" {
        return Err(format!(
            "CronTimer `week` = `{week}`: ISO week numbers are not supported; use `day_of_week`, `day` or `month`"
        ));
    }
    let years = if year == "*" {
        None
    } else {
        let mut ranges = Vec::new();
        for part in year.split(',') {
            let part = part.trim();
            let parse = |s: &str| {
                s.trim().parse::<i32>().map_err(|_| {
                    format!(
                        "CronTimer `year` = `{year}`: use years like 2026, 2026-2028 or 2026,2027"
                    )
                })
            };
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => (parse(a)?, parse(b)?),
                None => (parse(part)?, parse(part)?),
            };
            if a > b {
                return Err(format!(
                    "CronTimer `year` = `{year}`: the range start is after its end"
                ));
            }
            ranges.push((a, b));
        }
        Some(ranges)
    };
    let day = if day == "last" {
        "L".to_string()
    } else if day.contains(' ') || day.contains("last") {
        return Err(format!(
            "CronTimer `day` = `{day}`: expressions like `last fri` or `2nd mon` are not supported"
        ));
    } else {
        passthrough("day", &day)?
    };
    let dow = if dow == "*" {
        "*".to_string()
    } else {
        let days = expand("day_of_week", &dow, 0, 6, &weekday_num)?;
        // APScheduler 0 = Monday; cron 0 = Sunday.
        let mut cron_days: Vec<i32> = days.iter().map(|d| (d + 1) % 7).collect();
        cron_days.sort_unstable();
        cron_days
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let pattern = format!(
        "{} {} {} {} {} {}",
        passthrough("second", &second)?,
        passthrough("minute", &minute)?,
        passthrough("hour", &hour)?,
        day,
        passthrough("month", &month)?,
        dow
    );
    let cron = croner::Cron::new(&pattern)
        .with_seconds_required()
        .with_dom_and_dow()
        .parse()
        .map_err(|e| {
            format!("CronTimer schedule `{pattern}` (sec min hour day month dow) is invalid: {e}")
        })?;
    Ok(TimerSpec::Cron {
        schedule: Box::new(CronSchedule {
            cron,
            pattern,
            years,
        }),
        timezone,
    })
}

fn interval_from_params(params: &Map<String, Value>) -> Result<TimerSpec, String> {
    let unit = params
        .get("unit")
        .and_then(Value::as_str)
        .ok_or("IntervalTimer needs `unit`: weeks, days, hours, minutes or seconds")?;
    let delta = params
        .get("delta")
        .and_then(Value::as_i64)
        .filter(|d| *d > 0)
        .ok_or("IntervalTimer needs `delta`: an integer greater than 0")?;
    let every = match unit {
        "weeks" => Duration::try_weeks(delta),
        "days" => Duration::try_days(delta),
        "hours" => Duration::try_hours(delta),
        "minutes" => Duration::try_minutes(delta),
        "seconds" => Duration::try_seconds(delta),
        other => {
            return Err(format!(
                "IntervalTimer `unit` = `{other}`: use weeks, days, hours, minutes or seconds"
            ));
        }
    }
    .ok_or_else(|| format!("IntervalTimer `delta` = {delta} {unit} is too large"))?;
    Ok(TimerSpec::Interval { every })
}

fn date_from_params(params: &Map<String, Value>) -> Result<TimerSpec, String> {
    let date = params
        .get("date")
        .and_then(Value::as_str)
        .ok_or("DateTimer needs `date`, e.g. \"2026-12-01 10:00:00\" or RFC 3339")?
        .trim();
    let tz = match params.get("timezone") {
        None | Some(Value::Null) => parse_timezone("UTC")?,
        Some(Value::String(s)) => parse_timezone(s)?,
        Some(other) => {
            return Err(format!(
                "DateTimer `timezone` must be a string, not {other}"
            ));
        }
    };
    if let Ok(t) = DateTime::parse_from_rfc3339(date) {
        return Ok(TimerSpec::Date {
            at: t.with_timezone(&Utc),
        });
    }
    for fmt in [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
    ] {
        if let Ok(naive) = NaiveDateTime::parse_from_str(date, fmt) {
            let at = tz
                .from_local_datetime(&naive)
                .single()
                .ok_or_else(|| format!("DateTimer `date` = `{date}` does not exist in {tz}"))?;
            return Ok(TimerSpec::Date {
                at: at.with_timezone(&Utc),
            });
        }
    }
    Err(format!(
        "DateTimer `date` = `{date}`: use \"YYYY-MM-DD HH:MM:SS\" or RFC 3339 (2026-12-01T10:00:00Z)"
    ))
}

impl TimerSpec {
    /// From a rule's trigger type and parameters:
    /// `core.st2.IntervalTimer {unit, delta}`,
    /// `core.st2.CronTimer {timezone?, year?, month?, day?, week?,
    /// day_of_week?, hour?, minute?, second?}`,
    /// `core.st2.DateTimer {date, timezone?}`. The error says what to fix.
    pub fn from_trigger(trigger_type: &str, params: &Map<String, Value>) -> Result<Self, String> {
        match trigger_type {
            INTERVAL_TIMER_TRIGGER => interval_from_params(params),
            CRON_TIMER_TRIGGER => cron_from_params(params),
            DATE_TIMER_TRIGGER => date_from_params(params),
            other => Err(format!(
                "`{other}` is not a timer; use {INTERVAL_TIMER_TRIGGER}, {CRON_TIMER_TRIGGER} or {DATE_TIMER_TRIGGER}"
            )),
        }
    }

    /// True for the trigger types this module schedules.
    pub fn is_timer_trigger(trigger_type: &str) -> bool {
        matches!(
            trigger_type,
            INTERVAL_TIMER_TRIGGER | CRON_TIMER_TRIGGER | DATE_TIMER_TRIGGER
        )
    }

    /// Next fire strictly after `after`, or `None` (a date timer in the
    /// past, or a cron schedule that never fires again). Interval timers
    /// fire `every` after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            TimerSpec::Interval { every } => after.checked_add_signed(*every),
            TimerSpec::Date { at } => (*at > after).then_some(*at),
            TimerSpec::Cron { schedule, timezone } => {
                let local = after.with_timezone(timezone);
                let mut t = local.with_nanosecond(0)?;
                for _ in 0..1000 {
                    let next = schedule.cron.find_next_occurrence(&t, false).ok()?;
                    if schedule.year_ok(next.year()) {
                        return Some(next.with_timezone(&Utc));
                    }
                    let year = schedule.next_year_after(next.year())?;
                    let start = timezone.with_ymd_and_hms(year, 1, 1, 0, 0, 0).single()?;
                    t = start - Duration::seconds(1);
                }
                None
            }
        }
    }
}

/// The trigger payload a timer produces (StackStorm-like):
/// `{"executed_at": <RFC 3339>, "schedule": <params>}`.
pub fn timer_payload(params: &Map<String, Value>, fired_at: DateTime<Utc>) -> Value {
    serde_json::json!({
        "executed_at": fired_at.to_rfc3339_opts(SecondsFormat::AutoSi, true),
        "schedule": Value::Object(params.clone()),
    })
}
