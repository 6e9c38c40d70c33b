//! PostgreSQL implementation of [`DeployStore`]. A version change runs in
//! one transaction under a transaction-scoped advisory lock on its app and
//! role, so concurrent changes (from several servers) apply one after the
//! other and the check always sees the row it sets.

use std::collections::BTreeMap;

use async_trait::async_trait;
use aviary_deploy::{
    AppStatus, DeployLock, Host, VersionChange, VersionChangeRequest, VersionOutcome, Versions,
};
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::postgres::PgRow;

use super::{PgStore, corrupt, decode_all, err};
use crate::StoreError;
use crate::common::{from_ns, from_opt_ns, opt_ns, to_ns};
use crate::deploy::{Applied, DeployStore, LIVE_STATUSES, apply};

const HOST_COLS: &str = "name, address, tags, apps, last_seen, token_id, created_at";
const VERSION_COLS: &str = "app, role, canary_version, production_version, updated_at";
const HISTORY_COLS: &str = "id, app, role, kind, old_version, new_version, actor, execution_id, at";
const LOCK_COLS: &str = "app, role, holder, actor, acquired_at";

fn json_field<T: serde::de::DeserializeOwned>(
    r: &PgRow,
    col: &str,
    what: &str,
) -> Result<T, StoreError> {
    let v: serde_json::Value = r.try_get(col).map_err(corrupt(what))?;
    serde_json::from_value(v).map_err(|e| StoreError::Corrupt {
        what: what.into(),
        reason: e.to_string(),
    })
}

fn host_from_row(r: &PgRow) -> Result<Host, StoreError> {
    let c = || corrupt("host");
    Ok(Host {
        name: r.try_get("name").map_err(c())?,
        address: r.try_get("address").map_err(c())?,
        tags: json_field(r, "tags", "host tags")?,
        apps: json_field(r, "apps", "host apps")?,
        last_seen: from_opt_ns(r.try_get("last_seen").map_err(c())?),
        token_id: r.try_get("token_id").map_err(c())?,
        created_at: from_ns(r.try_get("created_at").map_err(c())?),
    })
}

fn versions_from_row(r: &PgRow) -> Result<Versions, StoreError> {
    let c = || corrupt("advertised versions");
    Ok(Versions {
        app: r.try_get("app").map_err(c())?,
        role: r.try_get("role").map_err(c())?,
        canary_version: r.try_get("canary_version").map_err(c())?,
        production_version: r.try_get("production_version").map_err(c())?,
        updated_at: from_ns(r.try_get("updated_at").map_err(c())?),
    })
}

fn history_from_row(r: &PgRow) -> Result<VersionChange, StoreError> {
    let c = || corrupt("version history");
    Ok(VersionChange {
        id: r.try_get("id").map_err(c())?,
        app: r.try_get("app").map_err(c())?,
        role: r.try_get("role").map_err(c())?,
        kind: r.try_get("kind").map_err(c())?,
        old_version: r.try_get("old_version").map_err(c())?,
        new_version: r.try_get("new_version").map_err(c())?,
        actor: r.try_get("actor").map_err(c())?,
        execution_id: r.try_get("execution_id").map_err(c())?,
        at: from_ns(r.try_get("at").map_err(c())?),
    })
}

fn lock_from_row(r: &PgRow) -> Result<DeployLock, StoreError> {
    let c = || corrupt("deploy lock");
    Ok(DeployLock {
        app: r.try_get("app").map_err(c())?,
        role: r.try_get("role").map_err(c())?,
        holder: r.try_get("holder").map_err(c())?,
        actor: r.try_get("actor").map_err(c())?,
        acquired_at: from_ns(r.try_get("acquired_at").map_err(c())?),
    })
}

fn to_value<T: serde::Serialize>(v: &T, what: &str) -> Result<serde_json::Value, StoreError> {
    serde_json::to_value(v).map_err(|e| StoreError::InvalidData {
        what: what.into(),
        reason: e.to_string(),
    })
}

#[async_trait]
impl DeployStore for PgStore {
    async fn upsert_host(&self, host: Host) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO hosts (name, address, tags, apps, last_seen, token_id, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (name) DO UPDATE SET \
             address = excluded.address, tags = excluded.tags, token_id = excluded.token_id",
        )
        .bind(&host.name)
        .bind(&host.address)
        .bind(to_value(&host.tags, "host tags")?)
        .bind(to_value(&host.apps, "host apps")?)
        .bind(opt_ns(host.last_seen, "host last_seen")?)
        .bind(&host.token_id)
        .bind(to_ns(host.created_at, "host creation time")?)
        .execute(&self.pool)
        .await
        .map_err(err("storing a host"))?;
        Ok(())
    }

    async fn get_host(&self, name: &str) -> Result<Option<Host>, StoreError> {
        let row = sqlx::query(&format!("SELECT {HOST_COLS} FROM hosts WHERE name = $1"))
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(err("reading a host"))?;
        row.as_ref().map(host_from_row).transpose()
    }

    async fn list_hosts(&self) -> Result<Vec<Host>, StoreError> {
        let rows = sqlx::query(&format!("SELECT {HOST_COLS} FROM hosts ORDER BY name"))
            .fetch_all(&self.pool)
            .await
            .map_err(err("listing hosts"))?;
        decode_all(rows, host_from_row)
    }

    async fn delete_host(&self, name: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM hosts WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(err("deleting a host"))?;
        Ok(done.rows_affected() > 0)
    }

    async fn record_host_report(
        &self,
        name: &str,
        apps: BTreeMap<String, AppStatus>,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE hosts SET apps = $2, last_seen = $3 WHERE name = $1")
            .bind(name)
            .bind(to_value(&apps, "host apps")?)
            .bind(to_ns(at, "report time")?)
            .execute(&self.pool)
            .await
            .map_err(err("recording a host report"))?;
        Ok(done.rows_affected() > 0)
    }

    async fn get_versions(&self, app: &str, role: &str) -> Result<Option<Versions>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {VERSION_COLS} FROM advertised_versions WHERE app = $1 AND role = $2"
        ))
        .bind(app)
        .bind(role)
        .fetch_optional(&self.pool)
        .await
        .map_err(err("reading advertised versions"))?;
        row.as_ref().map(versions_from_row).transpose()
    }

    async fn list_versions(&self) -> Result<Vec<Versions>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {VERSION_COLS} FROM advertised_versions ORDER BY app, role"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(err("listing advertised versions"))?;
        decode_all(rows, versions_from_row)
    }

    async fn change_version(
        &self,
        req: VersionChangeRequest,
    ) -> Result<VersionOutcome, StoreError> {
        let op = "changing advertised versions";
        let mut tx = self.pool.begin().await.map_err(err(op))?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("aviary.versions:{}::{}", req.app, req.role))
            .execute(&mut *tx)
            .await
            .map_err(err(op))?;
        let row = sqlx::query(&format!(
            "SELECT {VERSION_COLS} FROM advertised_versions WHERE app = $1 AND role = $2 FOR UPDATE"
        ))
        .bind(&req.app)
        .bind(&req.role)
        .fetch_optional(&mut *tx)
        .await
        .map_err(err(op))?;
        let current = row.as_ref().map(versions_from_row).transpose()?;
        let outcome = match apply(&req, current.as_ref()) {
            Applied::Change(versions, change) => {
                let at = to_ns(versions.updated_at, "version change time")?;
                sqlx::query(
                    "INSERT INTO advertised_versions \
                     (app, role, canary_version, production_version, updated_at) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (app, role) DO UPDATE SET \
                     canary_version = excluded.canary_version, \
                     production_version = excluded.production_version, \
                     updated_at = excluded.updated_at",
                )
                .bind(&versions.app)
                .bind(&versions.role)
                .bind(&versions.canary_version)
                .bind(&versions.production_version)
                .bind(at)
                .execute(&mut *tx)
                .await
                .map_err(err(op))?;
                sqlx::query(
                    "INSERT INTO version_history (id, app, role, kind, old_version, \
                     new_version, actor, execution_id, at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                )
                .bind(&change.id)
                .bind(&change.app)
                .bind(&change.role)
                .bind(&change.kind)
                .bind(&change.old_version)
                .bind(&change.new_version)
                .bind(&change.actor)
                .bind(&change.execution_id)
                .bind(at)
                .execute(&mut *tx)
                .await
                .map_err(err(op))?;
                VersionOutcome::Changed {
                    change: Box::new(change),
                    versions: Box::new(versions),
                }
            }
            Applied::Refuse(reason, audit) => {
                sqlx::query(
                    "INSERT INTO audit (id, at, actor, action, target, details) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(&audit.id)
                .bind(to_ns(audit.at, "audit time")?)
                .bind(&audit.actor)
                .bind(&audit.action)
                .bind(&audit.target)
                .bind(&audit.details)
                .execute(&mut *tx)
                .await
                .map_err(err("auditing a refused version change"))?;
                VersionOutcome::Refused { reason }
            }
        };
        tx.commit().await.map_err(err(op))?;
        Ok(outcome)
    }

    async fn version_history(
        &self,
        app: &str,
        role: &str,
        limit: u32,
    ) -> Result<Vec<VersionChange>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {HISTORY_COLS} FROM version_history WHERE app = $1 AND role = $2 \
             ORDER BY seq DESC LIMIT $3"
        ))
        .bind(app)
        .bind(role)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(err("reading version history"))?;
        decode_all(rows, history_from_row)
    }

    async fn acquire_deploy_lock(
        &self,
        lock: DeployLock,
    ) -> Result<Option<DeployLock>, StoreError> {
        let op = "taking a deploy lock";
        let mut tx = self.pool.begin().await.map_err(err(op))?;
        sqlx::query(
            "INSERT INTO deploy_locks (app, role, holder, actor, acquired_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (app, role) DO NOTHING",
        )
        .bind(&lock.app)
        .bind(&lock.role)
        .bind(&lock.holder)
        .bind(&lock.actor)
        .bind(to_ns(lock.acquired_at, "lock time")?)
        .execute(&mut *tx)
        .await
        .map_err(err(op))?;
        let row = sqlx::query(&format!(
            "SELECT {LOCK_COLS} FROM deploy_locks WHERE app = $1 AND role = $2"
        ))
        .bind(&lock.app)
        .bind(&lock.role)
        .fetch_one(&mut *tx)
        .await
        .map_err(err(op))?;
        tx.commit().await.map_err(err(op))?;
        let held = lock_from_row(&row)?;
        Ok((held.holder != lock.holder).then_some(held))
    }

    async fn release_deploy_lock(
        &self,
        app: &str,
        role: &str,
        holder: &str,
    ) -> Result<bool, StoreError> {
        let done =
            sqlx::query("DELETE FROM deploy_locks WHERE app = $1 AND role = $2 AND holder = $3")
                .bind(app)
                .bind(role)
                .bind(holder)
                .execute(&self.pool)
                .await
                .map_err(err("releasing a deploy lock"))?;
        Ok(done.rows_affected() > 0)
    }

    async fn list_deploy_locks(&self) -> Result<Vec<DeployLock>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {LOCK_COLS} FROM deploy_locks ORDER BY app, role"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(err("listing deploy locks"))?;
        decode_all(rows, lock_from_row)
    }

    async fn release_orphan_deploy_locks(&self) -> Result<Vec<DeployLock>, StoreError> {
        let rows = sqlx::query(&format!(
            "DELETE FROM deploy_locks WHERE holder NOT IN \
             (SELECT id FROM executions WHERE status IN ({LIVE_STATUSES})) \
             RETURNING {LOCK_COLS}"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(err("releasing orphan deploy locks"))?;
        decode_all(rows, lock_from_row)
    }
}
