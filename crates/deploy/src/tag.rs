//! Host tags: `<app>::<role>` (a production host of the app's role) and
//! `<app>::<role>_canary` (a canary host of it). The role defaults to `app`,
//! so `web::app` and `web::app_canary` are the common pair.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The role used when none is given.
pub const DEFAULT_ROLE: &str = "app";

/// A parsed deploy tag.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Tag {
    /// Application (also the OS package name).
    pub app: String,
    /// Role of the host within the application.
    pub role: String,
    /// Whether the host is a canary of that app and role.
    pub canary: bool,
}

impl Tag {
    /// A tag from parts.
    pub fn new(app: &str, role: &str, canary: bool) -> Self {
        Self {
            app: app.to_string(),
            role: role.to_string(),
            canary,
        }
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let suffix = if self.canary { "_canary" } else { "" };
        write!(f, "{}::{}{}", self.app, self.role, suffix)
    }
}

/// Why a tag, app or role name is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TagError {
    /// The tag has no `::`.
    #[error(
        "tag `{tag}` has no `::`; write `<app>::<role>` or `<app>::<role>_canary` (e.g. `web::app_canary`)"
    )]
    NoSeparator {
        /// The tag as given.
        tag: String,
    },
    /// A part is empty or has characters outside the allowed set.
    #[error(
        "{what} `{value}` in tag `{tag}` is not valid: use 1-64 lowercase letters, digits, `-` or `.`, starting with a letter or digit{hint}"
    )]
    BadName {
        /// `app name` or `role`.
        what: &'static str,
        /// The offending part.
        value: String,
        /// The tag as given.
        tag: String,
        /// Extra advice.
        hint: &'static str,
    },
}

/// Checks an application or role name: 1-64 of `[a-z0-9.-]`, starting with
/// a letter or digit (a valid Debian package name for apps).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

/// Checks an app name alone (for APIs that take `app` and `role` apart).
pub fn check_app(app: &str) -> Result<(), TagError> {
    if valid_name(app) {
        Ok(())
    } else {
        Err(TagError::BadName {
            what: "app name",
            value: app.to_string(),
            tag: format!("{app}::{DEFAULT_ROLE}"),
            hint: " (the app name is the Debian package name)",
        })
    }
}

/// Checks a role name alone.
pub fn check_role(app: &str, role: &str) -> Result<(), TagError> {
    if valid_name(role) && !role.ends_with("_canary") {
        Ok(())
    } else {
        Err(TagError::BadName {
            what: "role",
            value: role.to_string(),
            tag: format!("{app}::{role}"),
            hint: "",
        })
    }
}

/// Parses `<app>::<role>` or `<app>::<role>_canary`.
pub fn parse_tag(tag: &str) -> Result<Tag, TagError> {
    let Some((app, rest)) = tag.split_once("::") else {
        return Err(TagError::NoSeparator {
            tag: tag.to_string(),
        });
    };
    let (role, canary) = match rest.strip_suffix("_canary") {
        Some(r) => (r, true),
        None => (rest, false),
    };
    if !valid_name(app) {
        return Err(TagError::BadName {
            what: "app name",
            value: app.to_string(),
            tag: tag.to_string(),
            hint: " (the app name is the Debian package name)",
        });
    }
    if !valid_name(role) {
        return Err(TagError::BadName {
            what: "role",
            value: role.to_string(),
            tag: tag.to_string(),
            hint: "; the canary suffix is `_canary` after the role",
        });
    }
    Ok(Tag::new(app, role, canary))
}

/// Parses every tag, gathering every error.
pub fn parse_tags(tags: &[String]) -> Result<Vec<Tag>, Vec<TagError>> {
    let mut ok = Vec::new();
    let mut errors = Vec::new();
    for t in tags {
        match parse_tag(t) {
            Ok(tag) => ok.push(tag),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(ok)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_production_and_canary_tags() {
        assert_eq!(
            parse_tag("web::app").expect("valid"),
            Tag::new("web", "app", false)
        );
        assert_eq!(
            parse_tag("web::app_canary").expect("valid"),
            Tag::new("web", "app", true)
        );
        assert_eq!(
            parse_tag("seatshare::fe").expect("valid").to_string(),
            "seatshare::fe"
        );
        assert_eq!(
            parse_tag("seatshare::fe_canary")
                .expect("valid")
                .to_string(),
            "seatshare::fe_canary"
        );
    }

    #[test]
    fn refuses_bad_tags_with_clear_messages() {
        let msgs: Vec<String> = [
            "web",
            "::app",
            "Web::app",
            "web::",
            "web::_canary",
            "a b::app",
        ]
        .iter()
        .map(|t| parse_tag(t).expect_err("invalid").to_string())
        .collect();
        insta::assert_yaml_snapshot!(msgs);
    }

    #[test]
    fn gathers_every_error() {
        let tags = vec!["web::app".into(), "nope".into(), "X::y".into()];
        assert_eq!(parse_tags(&tags).expect_err("two errors").len(), 2);
    }
}
