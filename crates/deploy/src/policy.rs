//! Policy as code: when a promotion is allowed, how a host's report counts
//! towards a deploy, and how a production rollout is cut into batches.

use std::fmt;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use crate::model::{Health, Host};

/// Why one canary host blocks a promotion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum HostProblem {
    /// It runs another version (or none).
    WrongVersion {
        /// Host name.
        host: String,
        /// What it runs.
        installed: Option<String>,
    },
    /// It runs the version but is not healthy.
    Unhealthy {
        /// Host name.
        host: String,
        /// `unhealthy` or `unknown`.
        health: Health,
    },
    /// It has not reported recently.
    Stale {
        /// Host name.
        host: String,
        /// Last report, if any.
        last_seen: Option<DateTime<Utc>>,
    },
}

impl fmt::Display for HostProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostProblem::WrongVersion { host, installed } => match installed {
                Some(v) => write!(f, "host `{host}` runs `{v}`"),
                None => write!(f, "host `{host}` has no version installed"),
            },
            HostProblem::Unhealthy { host, health } => {
                write!(f, "host `{host}` is {}", health.as_str())
            }
            HostProblem::Stale { host, last_seen } => match last_seen {
                Some(t) => write!(
                    f,
                    "host `{host}` has not reported since {}",
                    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                ),
                None => write!(f, "host `{host}` has never reported"),
            },
        }
    }
}

/// Why a promotion is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Refusal {
    /// No canary version is advertised.
    #[error(
        "cannot promote {app}::{role}: no canary version is advertised; deploy one first with `aviary deploy canary {app} VERSION`"
    )]
    NoCanaryVersion {
        /// App.
        app: String,
        /// Role.
        role: String,
    },
    /// No host is tagged as a canary, so nothing vouches for the version.
    #[error(
        "cannot promote {app}::{role}: no host is tagged `{app}::{role}_canary`, so no canary runs `{version}`; tag at least one host as a canary"
    )]
    NoCanaryHosts {
        /// App.
        app: String,
        /// Role.
        role: String,
        /// The canary version.
        version: String,
    },
    /// Some canary hosts do not run the version, healthy and recently.
    #[error(
        "cannot promote {app}::{role} to `{version}`: not every canary runs it healthy: {}; wait for them, fix them, or roll back with `aviary rollback {app}`",
        .problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    )]
    CanariesNotReady {
        /// App.
        app: String,
        /// Role.
        role: String,
        /// The canary version.
        version: String,
        /// Every host that is not ready.
        problems: Vec<HostProblem>,
    },
}

/// Decides whether `canary_version` of `app`/`role` may be promoted: every
/// canary host must run it, be healthy, and have reported within `stale_after`
/// of `now`. Returns the version to promote.
pub fn check_promotion(
    app: &str,
    role: &str,
    canary_version: Option<&str>,
    hosts: &[Host],
    now: DateTime<Utc>,
    stale_after: Duration,
) -> Result<String, Refusal> {
    let Some(version) = canary_version else {
        return Err(Refusal::NoCanaryVersion {
            app: app.into(),
            role: role.into(),
        });
    };
    let canaries: Vec<&Host> = hosts.iter().filter(|h| h.is_canary(app, role)).collect();
    if canaries.is_empty() {
        return Err(Refusal::NoCanaryHosts {
            app: app.into(),
            role: role.into(),
            version: version.into(),
        });
    }
    let mut problems = Vec::new();
    for h in canaries {
        let st = h.app_status(app);
        if st.installed.as_deref() != Some(version) {
            problems.push(HostProblem::WrongVersion {
                host: h.name.clone(),
                installed: st.installed,
            });
        } else if st.health != Health::Healthy {
            problems.push(HostProblem::Unhealthy {
                host: h.name.clone(),
                health: st.health,
            });
        } else if h.last_seen.is_none_or(|t| now - t > stale_after) {
            problems.push(HostProblem::Stale {
                host: h.name.clone(),
                last_seen: h.last_seen,
            });
        }
    }
    if problems.is_empty() {
        Ok(version.to_string())
    } else {
        Err(Refusal::CanariesNotReady {
            app: app.into(),
            role: role.into(),
            version: version.into(),
            problems,
        })
    }
}

/// Where one host stands in a deploy of `version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Runs the version and is healthy.
    Converged,
    /// Not there yet.
    Pending,
    /// Its agent reported a failure for this version (install or health).
    Failed,
}

/// The state of `host` in a deploy of `app` at `version`.
pub fn host_state(host: &Host, app: &str, version: &str) -> HostState {
    let st = host.app_status(app);
    if st.installed.as_deref() == Some(version) {
        match st.health {
            Health::Healthy => HostState::Converged,
            Health::Unhealthy => HostState::Failed,
            Health::Unknown => HostState::Pending,
        }
    } else if st.target.as_deref() == Some(version) && st.error.is_some() {
        HostState::Failed
    } else {
        HostState::Pending
    }
}

/// How a production rollout is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BatchSpec {
    /// Hosts per batch.
    pub size: Option<usize>,
    /// Hosts per batch as a percentage of all production hosts (1-100).
    pub percent: Option<u8>,
    /// At most this many hosts updating (unavailable) at once.
    pub max_unavailable: Option<usize>,
}

/// Cuts `hosts` (in the order given) into batches: `size`, else `percent` of
/// the total (rounded up), else all at once; never more than
/// `max_unavailable` per batch; at least one.
pub fn plan_batches(hosts: &[String], spec: BatchSpec) -> Vec<Vec<String>> {
    if hosts.is_empty() {
        return Vec::new();
    }
    let n = hosts.len();
    let mut size = match (spec.size, spec.percent) {
        (Some(s), _) => s,
        (None, Some(p)) => (n * usize::from(p.min(100))).div_ceil(100),
        (None, None) => n,
    };
    if let Some(m) = spec.max_unavailable {
        size = size.min(m);
    }
    let size = size.max(1);
    hosts.chunks(size).map(<[String]>::to_vec).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::AppStatus;
    use std::collections::BTreeMap;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).expect("valid")
    }

    fn host(name: &str, tags: &[&str], installed: Option<&str>, health: Health) -> Host {
        let mut apps = BTreeMap::new();
        apps.insert(
            "web".to_string(),
            AppStatus {
                installed: installed.map(Into::into),
                target: installed.map(Into::into),
                health,
                ..AppStatus::default()
            },
        );
        Host {
            name: name.into(),
            address: "10.0.0.1".into(),
            tags: tags.iter().map(|t| (*t).to_string()).collect(),
            apps,
            last_seen: Some(at(0)),
            token_id: None,
            created_at: at(-100),
        }
    }

    #[test]
    fn promotion_allowed_when_every_canary_runs_it_healthy() {
        let hosts = vec![
            host("c1", &["web::app_canary"], Some("1.1"), Health::Healthy),
            host("c2", &["web::app_canary"], Some("1.1"), Health::Healthy),
            host("p1", &["web::app"], Some("1.0"), Health::Healthy),
        ];
        let v = check_promotion(
            "web",
            "app",
            Some("1.1"),
            &hosts,
            at(10),
            Duration::seconds(60),
        );
        assert_eq!(v.expect("allowed"), "1.1");
    }

    #[test]
    fn refusals_name_every_host() {
        let mut stale = host("c4", &["web::app_canary"], Some("1.1"), Health::Healthy);
        stale.last_seen = Some(at(-3600));
        let hosts = vec![
            host("c1", &["web::app_canary"], Some("1.0"), Health::Healthy),
            host("c2", &["web::app_canary"], Some("1.1"), Health::Unhealthy),
            host("c3", &["web::app_canary"], None, Health::Unknown),
            stale,
            host("c5", &["web::app_canary"], Some("1.1"), Health::Healthy),
            host("p1", &["web::app"], Some("0.9"), Health::Unhealthy),
        ];
        let now = at(10);
        let refusals: Vec<String> = [
            check_promotion("web", "app", None, &hosts, now, Duration::seconds(60)),
            check_promotion("web", "db", Some("1.1"), &hosts, now, Duration::seconds(60)),
            check_promotion(
                "web",
                "app",
                Some("1.1"),
                &hosts,
                now,
                Duration::seconds(60),
            ),
        ]
        .into_iter()
        .map(|r| r.expect_err("refused").to_string())
        .collect();
        insta::assert_yaml_snapshot!(refusals);
    }

    #[test]
    fn canaries_are_never_production_targets() {
        let both = host(
            "c1",
            &["web::app", "web::app_canary"],
            None,
            Health::Unknown,
        );
        assert!(both.is_canary("web", "app"));
        assert!(!both.is_production("web", "app"));
        let prod = host("p1", &["web::app"], None, Health::Unknown);
        assert!(prod.is_production("web", "app"));
        assert!(!prod.is_production("web", "db"));
    }

    #[test]
    fn host_states() {
        let h = host("c1", &["web::app_canary"], Some("1.1"), Health::Healthy);
        assert_eq!(host_state(&h, "web", "1.1"), HostState::Converged);
        assert_eq!(host_state(&h, "web", "1.2"), HostState::Pending);
        let mut f = host("c2", &["web::app_canary"], Some("1.0"), Health::Healthy);
        if let Some(st) = f.apps.get_mut("web") {
            st.target = Some("1.2".into());
            st.error = Some("E: Version '1.2' for 'web' was not found".into());
        }
        assert_eq!(host_state(&f, "web", "1.2"), HostState::Failed);
        let u = host("c3", &["web::app_canary"], Some("1.1"), Health::Unhealthy);
        assert_eq!(host_state(&u, "web", "1.1"), HostState::Failed);
    }

    #[test]
    fn batches() {
        let hosts: Vec<String> = (1..=10).map(|i| format!("h{i}")).collect();
        let sizes = |spec| {
            plan_batches(&hosts, spec)
                .iter()
                .map(Vec::len)
                .collect::<Vec<_>>()
        };
        assert_eq!(sizes(BatchSpec::default()), vec![10]);
        assert_eq!(
            sizes(BatchSpec {
                size: Some(4),
                ..BatchSpec::default()
            }),
            vec![4, 4, 2]
        );
        assert_eq!(
            sizes(BatchSpec {
                percent: Some(25),
                ..BatchSpec::default()
            }),
            vec![3, 3, 3, 1]
        );
        assert_eq!(
            sizes(BatchSpec {
                percent: Some(50),
                max_unavailable: Some(2),
                ..BatchSpec::default()
            }),
            vec![2, 2, 2, 2, 2]
        );
        assert_eq!(
            sizes(BatchSpec {
                size: Some(0),
                ..BatchSpec::default()
            }),
            vec![1; 10]
        );
        assert!(plan_batches(&[], BatchSpec::default()).is_empty());
    }
}
