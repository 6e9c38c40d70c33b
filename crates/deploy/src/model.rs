//! The deploy data model shared by the store, the server, the CLI and the
//! agent: hosts and what they report, advertised versions, their history, and
//! deploy locks.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::tag::{Tag, parse_tag};

/// A host's health for one app, as its last report said.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Not reported yet (or no health check ran).
    #[default]
    Unknown,
    /// The health check passed (or there is none and the install succeeded).
    Healthy,
    /// The health check failed.
    Unhealthy,
}

impl Health {
    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

/// What a host reports about one app.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AppStatus {
    /// Version installed (dpkg's view), if any.
    #[serde(default)]
    pub installed: Option<String>,
    /// Version the host is converging to (the advertised one it last saw).
    #[serde(default)]
    pub target: Option<String>,
    /// Health after the last install/check.
    #[serde(default)]
    pub health: Health,
    /// The last install or health check failure for `target`, if it failed.
    #[serde(default)]
    pub error: Option<String>,
    /// Output of the last install and health check (truncated by the agent).
    #[serde(default)]
    pub output: String,
    /// When this status was reported.
    #[serde(default)]
    pub updated_at: Option<DateTime<Utc>>,
    /// How long the last convergence's steps took, in milliseconds
    /// (`apt_update`, `apt_install`, `health`), so a deploy's time can be
    /// split into apt's and Aviary's own.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub timings_ms: BTreeMap<String, u64>,
}

/// A host in the inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    /// Unique name (1-64 of letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// Address (IP or DNS name) traffic and SSH use.
    pub address: String,
    /// Deploy tags (`app::role`, `app::role_canary`) and any other labels.
    pub tags: Vec<String>,
    /// Per-app status, by app name.
    #[serde(default)]
    pub apps: BTreeMap<String, AppStatus>,
    /// Last heartbeat or report.
    pub last_seen: Option<DateTime<Utc>>,
    /// Id of the host's agent token, if one was issued.
    pub token_id: Option<String>,
    /// When the host was added.
    pub created_at: DateTime<Utc>,
}

/// Whether a host name is valid.
pub fn valid_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !name.starts_with('.')
}

impl Host {
    /// The deploy tags this host carries (other labels are skipped).
    pub fn deploy_tags(&self) -> Vec<Tag> {
        self.tags.iter().filter_map(|t| parse_tag(t).ok()).collect()
    }

    /// Whether the host is a canary of `app`/`role`.
    pub fn is_canary(&self, app: &str, role: &str) -> bool {
        self.deploy_tags()
            .iter()
            .any(|t| t.app == app && t.role == role && t.canary)
    }

    /// Whether the host is a production target of `app`/`role`: tagged
    /// `app::role` and NOT a canary of it (a canary is never a production
    /// target, one of the seed pack's bugs).
    pub fn is_production(&self, app: &str, role: &str) -> bool {
        !self.is_canary(app, role)
            && self
                .deploy_tags()
                .iter()
                .any(|t| t.app == app && t.role == role && !t.canary)
    }

    /// Whether the host carries `app` at all (any role, canary or not).
    pub fn has_app(&self, app: &str) -> bool {
        self.deploy_tags().iter().any(|t| t.app == app)
    }

    /// The host's status for `app` (empty if never reported).
    pub fn app_status(&self, app: &str) -> AppStatus {
        self.apps.get(app).cloned().unwrap_or_default()
    }
}

/// Which hosts a listing wants. All set fields must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFilter {
    /// Exact tag.
    pub tag: Option<String>,
    /// App (any of its tags).
    pub app: Option<String>,
    /// Role (with `app`).
    pub role: Option<String>,
    /// `Some(true)`: canaries of app/role only; `Some(false)`: production targets only.
    pub canary: Option<bool>,
}

impl HostFilter {
    /// Whether a host matches.
    pub fn matches(&self, h: &Host) -> bool {
        if let Some(t) = &self.tag
            && !h.tags.iter().any(|x| x == t)
        {
            return false;
        }
        let Some(app) = &self.app else {
            return true;
        };
        match (&self.role, self.canary) {
            (role, Some(true)) => h.is_canary(app, role.as_deref().unwrap_or("app")),
            (role, Some(false)) => h.is_production(app, role.as_deref().unwrap_or("app")),
            (Some(role), None) => h
                .deploy_tags()
                .iter()
                .any(|t| &t.app == app && &t.role == role),
            (None, None) => h.has_app(app),
        }
    }
}

/// The advertised versions of one app and role (the seed's
/// `<app>::canary_version` and `<app>::version`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versions {
    /// Application.
    pub app: String,
    /// Role.
    pub role: String,
    /// Version the canaries should run.
    pub canary_version: Option<String>,
    /// Version production should run.
    pub production_version: Option<String>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// A requested change of advertised versions; the store checks and applies it
/// in one transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum VersionChangeKind {
    /// The canary version becomes `version`.
    Canary {
        /// New canary version.
        version: String,
    },
    /// The production version becomes `version`, which must be the current
    /// canary version (refused otherwise).
    Production {
        /// The version to promote.
        version: String,
    },
    /// The canary version goes back to the production version.
    Rollback,
}

impl VersionChangeKind {
    /// `canary`, `production` or `rollback`.
    pub fn name(&self) -> &'static str {
        match self {
            VersionChangeKind::Canary { .. } => "canary",
            VersionChangeKind::Production { .. } => "production",
            VersionChangeKind::Rollback => "rollback",
        }
    }
}

/// A request to change the advertised versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionChangeRequest {
    /// Application.
    pub app: String,
    /// Role.
    pub role: String,
    /// What to change.
    pub kind: VersionChangeKind,
    /// Who asked (token name, `rule:<ref>`...).
    pub actor: String,
    /// The deploy execution doing it, if any.
    pub execution_id: Option<String>,
    /// When.
    pub at: DateTime<Utc>,
}

/// One line of an app's version history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionChange {
    /// Identifier.
    pub id: String,
    /// Application.
    pub app: String,
    /// Role.
    pub role: String,
    /// `canary`, `production` or `rollback`.
    pub kind: String,
    /// The version before (of the changed slot).
    pub old_version: Option<String>,
    /// The version after.
    pub new_version: Option<String>,
    /// Who.
    pub actor: String,
    /// From which execution.
    pub execution_id: Option<String>,
    /// When.
    pub at: DateTime<Utc>,
}

/// What the store did with a [`VersionChangeRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "lowercase")]
pub enum VersionOutcome {
    /// Applied and recorded in the history.
    Changed {
        /// The history line.
        change: Box<VersionChange>,
        /// The versions now.
        versions: Box<Versions>,
    },
    /// Refused by policy (and audited); nothing changed.
    Refused {
        /// Why, and what to do.
        reason: String,
    },
}

/// The store-side policy check of a version change: returns the refusal
/// reason, or the new (canary, production) pair. Pure, so both backends apply
/// exactly the same rule inside their transaction.
pub fn apply_change(
    app: &str,
    role: &str,
    current: Option<(&Option<String>, &Option<String>)>,
    kind: &VersionChangeKind,
) -> Result<(Option<String>, Option<String>), String> {
    let (canary, production) = current
        .map(|(c, p)| (c.clone(), p.clone()))
        .unwrap_or((None, None));
    match kind {
        VersionChangeKind::Canary { version } => Ok((Some(version.clone()), production)),
        VersionChangeKind::Production { version } => match &canary {
            Some(c) if c == version => Ok((canary.clone(), Some(version.clone()))),
            Some(c) => Err(format!(
                "refused: production of {app}::{role} can only be set to the current canary version `{c}`, not `{version}`; deploy `{version}` to the canaries first (`aviary deploy canary {app} {version}`), then `aviary promote {app}`"
            )),
            None => Err(format!(
                "refused: {app}::{role} has no canary version, so there is nothing to promote; deploy to the canaries first (`aviary deploy canary {app} VERSION`)"
            )),
        },
        VersionChangeKind::Rollback => match &production {
            Some(p) => Ok((Some(p.clone()), production.clone())),
            None => Err(format!(
                "refused: {app}::{role} has no production version to roll the canaries back to"
            )),
        },
    }
}

/// A deploy lock: one deploy at a time per app and role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployLock {
    /// Application.
    pub app: String,
    /// Role.
    pub role: String,
    /// The deploy execution holding it.
    pub holder: String,
    /// Who started that deploy.
    pub actor: String,
    /// Since when.
    pub acquired_at: DateTime<Utc>,
}

/// Versions as agents see them: what each of an agent's tags should run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The tag (`app::role` or `app::role_canary`).
    pub tag: String,
    /// Application (the package name).
    pub app: String,
    /// The version hosts with this tag should run (none advertised yet: None).
    pub version: Option<String>,
}

/// The version a host carrying `tag` should run, given the advertised versions.
pub fn assigned_version(tag: &Tag, versions: Option<&Versions>) -> Option<String> {
    let v = versions?;
    if tag.canary {
        v.canary_version
            .clone()
            .or_else(|| v.production_version.clone())
    } else {
        v.production_version.clone()
    }
}
