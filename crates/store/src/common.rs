//! Helpers shared by both backends: time and JSON encoding, URL redaction,
//! the migration list type.

use chrono::{DateTime, Utc};

use crate::StoreError;

/// One versioned migration: `(version, name, sql)`.
pub(crate) type Migration = (i64, &'static str, &'static str);

/// Encodes a time as nanoseconds since the Unix epoch.
pub(crate) fn to_ns(t: DateTime<Utc>, what: &str) -> Result<i64, StoreError> {
    t.timestamp_nanos_opt()
        .ok_or_else(|| StoreError::InvalidData {
            what: what.to_string(),
            reason: format!("time {t} is outside the storable range (years 1677 to 2262)"),
        })
}

/// Encodes an optional time.
pub(crate) fn opt_ns(t: Option<DateTime<Utc>>, what: &str) -> Result<Option<i64>, StoreError> {
    t.map(|t| to_ns(t, what)).transpose()
}

/// Decodes [`to_ns`]'s output.
pub(crate) fn from_ns(ns: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_nanos(ns)
}

/// Decodes an optional time.
pub(crate) fn from_opt_ns(ns: Option<i64>) -> Option<DateTime<Utc>> {
    ns.map(from_ns)
}

/// Converts an execution timeout to the stored signed integer.
pub(crate) fn timeout_to_i64(secs: u64) -> Result<i64, StoreError> {
    i64::try_from(secs).map_err(|_| StoreError::InvalidData {
        what: "execution timeout".into(),
        reason: format!("{secs} seconds is too large"),
    })
}

/// Converts a stored timeout back.
pub(crate) fn timeout_from_i64(secs: i64) -> Result<u64, StoreError> {
    u64::try_from(secs).map_err(|_| StoreError::Corrupt {
        what: "execution timeout".into(),
        reason: format!("negative value {secs}"),
    })
}

/// Converts a stored count.
pub(crate) fn count_to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// The `error` text put in the result of an execution abandoned by [`crate::Store::recover_node`].
pub(crate) fn abandoned_error(node: &str) -> serde_json::Value {
    serde_json::json!({
        "error": format!(
            "the server (node `{node}`) stopped while it ran, so its outcome is unknown; \
             it was not re-run automatically: check its effects and re-run it if that is safe"
        ),
        // For workflows: `retry: {when: <% result().abandoned = true %>}`
        // re-runs an idempotent step that a crash interrupted.
        "abandoned": true,
    })
}

/// Parses a stored status.
pub(crate) fn parse_status(s: &str) -> Result<aviary_core::model::ExecutionStatus, StoreError> {
    aviary_core::model::ExecutionStatus::parse(s).ok_or_else(|| StoreError::Corrupt {
        what: "execution status".into(),
        reason: format!("unknown status `{s}`"),
    })
}

/// Parses a stored trigger instance status.
pub(crate) fn parse_ti_status(
    s: &str,
) -> Result<aviary_core::model::TriggerInstanceStatus, StoreError> {
    aviary_core::model::TriggerInstanceStatus::parse(s).ok_or_else(|| StoreError::Corrupt {
        what: "trigger instance status".into(),
        reason: format!("unknown status `{s}`"),
    })
}

/// Parses a stored datastore scope.
pub(crate) fn parse_scope(s: &str) -> Result<aviary_core::model::KvScope, StoreError> {
    aviary_core::model::KvScope::parse(s).ok_or_else(|| StoreError::Corrupt {
        what: "datastore scope".into(),
        reason: format!("unknown scope `{s}`"),
    })
}

/// Hides the password of a URL (`postgres://user:secret@host` -> `postgres://user:***@host`).
pub(crate) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://u:pw@h:5432/db?schema=x"),
            "postgres://u:***@h:5432/db?schema=x"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("postgres://h/db"), "postgres://h/db");
    }

    #[test]
    fn times_round_trip_in_nanoseconds() {
        let t = DateTime::from_timestamp(1_700_000_000, 123_456_789).unwrap();
        assert_eq!(from_ns(to_ns(t, "t").unwrap()), t);
        assert!(to_ns(DateTime::<Utc>::MAX_UTC, "t").is_err());
    }
}
