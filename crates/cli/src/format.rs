//! Human-readable output: aligned tables, times, durations, statuses.

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::Value;

use aviary_core::model::ExecutionStatus;

/// Longest cell shown in a table before it is cut with `…`.
pub const MAX_CELL: usize = 60;

/// A table with a header row and aligned columns (two spaces apart).
#[derive(Debug, Clone)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column names (shown upper-case).
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| h.to_uppercase()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; cells are flattened to one line and cut at [`MAX_CELL`].
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows
            .push(cells.into_iter().map(|c| cell(&c)).collect());
    }

    /// Number of data rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True when there are no data rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The rendered table, one line per row, each ending with `\n`.
    pub fn render(&self) -> String {
        let cols = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(cols) {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for r in std::iter::once(&self.header).chain(self.rows.iter()) {
            let mut line = String::new();
            for (i, w) in widths.iter().enumerate() {
                let c = r.get(i).map(String::as_str).unwrap_or("");
                if i + 1 == cols {
                    line.push_str(c);
                } else {
                    line.push_str(c);
                    line.push_str(&" ".repeat(w - c.chars().count() + 2));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// One table cell: newlines and tabs become spaces, long text is cut.
pub fn cell(s: &str) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() > MAX_CELL {
        let mut cut: String = flat.chars().take(MAX_CELL - 1).collect();
        cut.push('…');
        cut
    } else {
        flat
    }
}

/// A time as `2024-05-01 12:00:03 UTC`.
pub fn time(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// An optional time, `-` when absent.
pub fn opt_time(t: Option<&DateTime<Utc>>) -> String {
    t.map(time).unwrap_or_else(|| "-".to_string())
}

/// A duration like `0.4s`, `1.2s`, `3m04s`, `2h05m`.
pub fn duration(d: TimeDelta) -> String {
    let ms = d.num_milliseconds().max(0);
    if ms < 60_000 {
        format!("{}.{}s", ms / 1000, (ms % 1000) / 100)
    } else if ms < 3_600_000 {
        format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000)
    } else {
        format!("{}h{:02}m", ms / 3_600_000, (ms % 3_600_000) / 60_000)
    }
}

/// How long an execution ran (or has been running), `-` if not started.
pub fn execution_duration(
    started: Option<&DateTime<Utc>>,
    finished: Option<&DateTime<Utc>>,
) -> String {
    match (started, finished) {
        (Some(s), Some(f)) => duration(*f - *s),
        (Some(s), None) => format!("{} so far", duration(Utc::now() - *s)),
        _ => "-".to_string(),
    }
}

/// A status, coloured when `color` (green success, red failure, yellow busy).
pub fn status(s: ExecutionStatus, color: bool) -> String {
    if !color {
        return s.as_str().to_string();
    }
    let code = match s {
        ExecutionStatus::Succeeded => "32",
        ExecutionStatus::Failed | ExecutionStatus::Timeout | ExecutionStatus::Abandoned => "31",
        ExecutionStatus::Canceled | ExecutionStatus::Canceling => "35",
        _ => "33",
    };
    format!("\x1b[{code}m{}\x1b[0m", s.as_str())
}

/// A JSON value for a table cell: strings bare, `-` for null, else compact JSON.
pub fn value_cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "-".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// Pretty JSON indented by `indent` spaces on every line after the first.
pub fn pretty(v: &Value, indent: usize) -> String {
    let text = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
    let pad = " ".repeat(indent);
    text.lines().collect::<Vec<_>>().join(&format!("\n{pad}"))
}

/// Aligned `key: value` lines.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (k, v) in pairs {
        let key = format!("{k}:");
        out.push_str(&format!("{key:<w$} {v}\n"));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_short() {
        assert_eq!(duration(TimeDelta::milliseconds(1234)), "1.2s");
        assert_eq!(duration(TimeDelta::milliseconds(40)), "0.0s");
        assert_eq!(duration(TimeDelta::seconds(184)), "3m04s");
        assert_eq!(duration(TimeDelta::seconds(7500)), "2h05m");
        assert_eq!(duration(TimeDelta::seconds(-3)), "0.0s");
    }

    #[test]
    fn tables_align_and_flatten() {
        let mut t = Table::new(&["id", "name"]);
        t.row(vec!["1".into(), "a\nb".into()]);
        t.row(vec!["12345".into(), "x".repeat(70)]);
        let r = t.render();
        let lines: Vec<&str> = r.lines().collect();
        assert_eq!(lines[0], "ID     NAME");
        assert_eq!(lines[1], "1      a b");
        assert!(lines[2].starts_with("12345  xxx"));
        assert!(lines[2].ends_with('…'));
        assert_eq!(lines[2].chars().count(), 7 + MAX_CELL);
    }
}
