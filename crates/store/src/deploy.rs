//! The deploy part of the storage interface: the host inventory, advertised
//! versions with their history, and deploy locks. Every [`crate::Store`] is a
//! [`DeployStore`] (a supertrait), so `Arc<dyn Store>` offers these methods.
//!
//! Invariant: the production version of an app and role only ever becomes
//! its canary version. [`DeployStore::change_version`] checks that and sets
//! it in one transaction (with [`aviary_deploy::apply_change`]), writes the
//! history line, and audits a refusal, whoever the caller is.

use async_trait::async_trait;
use aviary_core::model::{AuditRecord, new_id};
use aviary_deploy::{
    AppStatus, DeployLock, Host, VersionChange, VersionChangeKind, VersionChangeRequest, Versions,
};
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;

use crate::StoreError;

/// Statuses of executions that still hold a deploy lock legitimately.
pub(crate) const LIVE_STATUSES: &str = "'requested','scheduled','running','canceling'";

/// Storage of hosts, advertised versions and deploy locks.
#[async_trait]
pub trait DeployStore: Send + Sync {
    /// Adds a host or replaces its name, address, tags and token id (its
    /// reported app statuses and last_seen are kept when it exists).
    async fn upsert_host(&self, host: Host) -> Result<(), StoreError>;
    /// One host.
    async fn get_host(&self, name: &str) -> Result<Option<Host>, StoreError>;
    /// Every host, by name.
    async fn list_hosts(&self) -> Result<Vec<Host>, StoreError>;
    /// Removes a host; returns whether it existed.
    async fn delete_host(&self, name: &str) -> Result<bool, StoreError>;
    /// Records a host's report: its app statuses (replacing the previous
    /// ones) and `last_seen = at`. Returns false if the host is unknown.
    async fn record_host_report(
        &self,
        name: &str,
        apps: BTreeMap<String, AppStatus>,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError>;

    /// The advertised versions of one app and role.
    async fn get_versions(&self, app: &str, role: &str) -> Result<Option<Versions>, StoreError>;
    /// Every app and role's advertised versions.
    async fn list_versions(&self) -> Result<Vec<Versions>, StoreError>;
    /// Checks and applies a version change in one transaction (see the
    /// module doc). A refusal changes nothing but an audit record
    /// (`version.refused`) and is returned as `Refused`.
    async fn change_version(
        &self,
        req: VersionChangeRequest,
    ) -> Result<aviary_deploy::VersionOutcome, StoreError>;
    /// History of an app and role, newest first.
    async fn version_history(
        &self,
        app: &str,
        role: &str,
        limit: u32,
    ) -> Result<Vec<VersionChange>, StoreError>;

    /// Takes the deploy lock of `lock.app`/`lock.role` for `lock.holder`.
    /// Returns `None` when taken (or already held by the same holder), else
    /// the lock held by someone else.
    async fn acquire_deploy_lock(&self, lock: DeployLock)
    -> Result<Option<DeployLock>, StoreError>;
    /// Releases the lock if `holder` holds it; returns whether it did.
    async fn release_deploy_lock(
        &self,
        app: &str,
        role: &str,
        holder: &str,
    ) -> Result<bool, StoreError>;
    /// Every held lock.
    async fn list_deploy_locks(&self) -> Result<Vec<DeployLock>, StoreError>;
    /// Crash recovery: releases every lock whose holder execution is missing
    /// or finished; returns them.
    async fn release_orphan_deploy_locks(&self) -> Result<Vec<DeployLock>, StoreError>;
}

/// The outcome of applying a change to a current row, shared by the backends.
pub(crate) enum Applied {
    /// Write `versions` and `change`.
    Change(Versions, VersionChange),
    /// Write the audit record only.
    Refuse(String, AuditRecord),
}

/// Applies the policy of [`aviary_deploy::apply_change`] and builds the rows.
pub(crate) fn apply(req: &VersionChangeRequest, current: Option<&Versions>) -> Applied {
    let cur = current.map(|v| (&v.canary_version, &v.production_version));
    match aviary_deploy::apply_change(&req.app, &req.role, cur, &req.kind) {
        Ok((canary, production)) => {
            let (old, new) = match &req.kind {
                VersionChangeKind::Production { .. } => (
                    current.and_then(|v| v.production_version.clone()),
                    production.clone(),
                ),
                _ => (
                    current.and_then(|v| v.canary_version.clone()),
                    canary.clone(),
                ),
            };
            Applied::Change(
                Versions {
                    app: req.app.clone(),
                    role: req.role.clone(),
                    canary_version: canary,
                    production_version: production,
                    updated_at: req.at,
                },
                VersionChange {
                    id: new_id(),
                    app: req.app.clone(),
                    role: req.role.clone(),
                    kind: req.kind.name().to_string(),
                    old_version: old,
                    new_version: new,
                    actor: req.actor.clone(),
                    execution_id: req.execution_id.clone(),
                    at: req.at,
                },
            )
        }
        Err(reason) => {
            let audit = AuditRecord {
                id: new_id(),
                at: req.at,
                actor: req.actor.clone(),
                action: "version.refused".into(),
                target: format!("{}::{}", req.app, req.role),
                details: serde_json::json!({
                    "kind": req.kind,
                    "execution_id": req.execution_id,
                    "reason": reason,
                }),
            };
            Applied::Refuse(reason, audit)
        }
    }
}
