//! Deploys on the server side: the [`DeployHub`] that tells connected agents
//! what to run, and the in-process `deploy` runner ([`run`]) behind
//! `core.deploy_canary`, `core.deploy_promote` and `core.deploy_rollback`.
//!
//! Agents never poll the database: the hub keeps one snapshot of every
//! advertised version in a `tokio::sync::watch` channel; each agent's SSE
//! stream waits on it and sends an event only when that agent's assignment
//! changed. The snapshot is rebuilt after every version change made here and
//! re-read from the store every [`REFRESH_EVERY`] (changes made by other
//! servers sharing a PostgreSQL database).
//!
//! A production rollout in batches is a property of the snapshot too: while
//! a promotion is rolling out, production hosts not yet released keep being
//! told the previous version. A rollout that stopped at a failed batch stays
//! halted (the rest keep the previous version) until the next deploy of that
//! app and role on this server. (This hold is kept in memory: a restart
//! releases it.)

pub mod run;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use aviary_deploy::{Assignment, Tag, Versions, assigned_version};
use aviary_store::{Store, StoreError};
use tokio::sync::watch;

/// How often the hub re-reads advertised versions from the store.
pub const REFRESH_EVERY: Duration = Duration::from_secs(2);

/// The runner type of the built-in deploy actions.
pub const DEPLOY_RUNNER: &str = "deploy";

/// A production rollout in progress (or halted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollout {
    /// What unreleased production hosts keep running.
    pub previous: Option<String>,
    /// Production hosts released to the new version.
    pub released: BTreeSet<String>,
}

/// What every agent should run, as of one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Advertised versions by (app, role).
    pub versions: BTreeMap<(String, String), Versions>,
    /// Rollouts by (app, role).
    pub rollouts: BTreeMap<(String, String), Rollout>,
}

impl Snapshot {
    /// The assignments of a host carrying `tags`.
    pub fn assignments(&self, host: &str, tags: &[Tag]) -> Vec<Assignment> {
        tags.iter()
            .map(|t| {
                let key = (t.app.clone(), t.role.clone());
                let mut version = assigned_version(t, self.versions.get(&key));
                if !t.canary
                    && let Some(r) = self.rollouts.get(&key)
                    && !r.released.contains(host)
                {
                    version = r.previous.clone();
                }
                Assignment {
                    tag: t.to_string(),
                    app: t.app.clone(),
                    version,
                }
            })
            .collect()
    }
}

/// Live advertised versions for agents and deploys.
pub struct DeployHub {
    snapshot: watch::Sender<Arc<Snapshot>>,
    reports: watch::Sender<u64>,
}

impl Default for DeployHub {
    fn default() -> Self {
        Self {
            snapshot: watch::Sender::new(Arc::new(Snapshot::default())),
            reports: watch::Sender::new(0),
        }
    }
}

impl DeployHub {
    /// The current snapshot.
    pub fn current(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// A receiver woken on every change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.subscribe()
    }

    /// Number of connected watchers (agents).
    pub fn watchers(&self) -> usize {
        self.snapshot.receiver_count()
    }

    /// Re-reads the advertised versions; publishes only if they changed.
    pub async fn refresh(&self, store: &dyn Store) -> Result<(), StoreError> {
        let list = store.list_versions().await?;
        let versions: BTreeMap<_, _> = list
            .into_iter()
            .map(|v| ((v.app.clone(), v.role.clone()), v))
            .collect();
        self.snapshot.send_if_modified(|s| {
            if s.versions == versions {
                return false;
            }
            let mut next = (**s).clone();
            next.versions = versions;
            *s = Arc::new(next);
            true
        });
        Ok(())
    }

    /// Sets or clears the rollout of an app and role.
    pub fn set_rollout(&self, app: &str, role: &str, rollout: Option<Rollout>) {
        let key = (app.to_string(), role.to_string());
        self.snapshot.send_if_modified(|s| {
            if s.rollouts.get(&key) == rollout.as_ref() {
                return false;
            }
            let mut next = (**s).clone();
            match rollout {
                Some(r) => next.rollouts.insert(key, r),
                None => next.rollouts.remove(&key),
            };
            *s = Arc::new(next);
            true
        });
    }

    /// Called when a host reported: wakes deploys waiting for hosts.
    pub fn reported(&self) {
        self.reports.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver woken on host reports.
    pub fn report_events(&self) -> watch::Receiver<u64> {
        self.reports.subscribe()
    }
}

/// Keeps the hub in step with the store until `shutdown`.
pub async fn run_refresh(
    engine: Arc<crate::engine::Engine>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        if let Err(e) = engine.deploy.refresh(engine.store.as_ref()).await {
            tracing::warn!(error = %e, "cannot refresh advertised versions");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(REFRESH_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    #[test]
    fn unreleased_production_hosts_keep_the_previous_version() {
        let mut s = Snapshot::default();
        s.versions.insert(
            ("web".into(), "app".into()),
            Versions {
                app: "web".into(),
                role: "app".into(),
                canary_version: Some("2".into()),
                production_version: Some("2".into()),
                updated_at: Utc::now(),
            },
        );
        s.rollouts.insert(
            ("web".into(), "app".into()),
            Rollout {
                previous: Some("1".into()),
                released: ["p1".to_string()].into_iter().collect(),
            },
        );
        let prod = [Tag::new("web", "app", false)];
        let canary = [Tag::new("web", "app", true)];
        assert_eq!(s.assignments("p1", &prod)[0].version.as_deref(), Some("2"));
        assert_eq!(s.assignments("p2", &prod)[0].version.as_deref(), Some("1"));
        assert_eq!(
            s.assignments("p2", &canary)[0].version.as_deref(),
            Some("2")
        );
        let other = [Tag::new("db", "app", false)];
        assert_eq!(s.assignments("p2", &other)[0].version, None);
    }
}
