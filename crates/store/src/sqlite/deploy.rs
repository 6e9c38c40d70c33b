//! SQLite implementation of [`DeployStore`]: writes go through the group
//! commit writer (each call is one savepoint, so a check and its set are
//! atomic), reads through the reader pool.

use std::collections::BTreeMap;

use async_trait::async_trait;
use aviary_deploy::{
    AppStatus, DeployLock, Host, VersionChange, VersionChangeRequest, VersionOutcome, Versions,
};
use chrono::{DateTime, Utc};
use rusqlite::{Connection, Row, params};

use super::{SqliteStore, corrupt, err, json_text, parse_json, query_all, text};
use crate::StoreError;
use crate::common::{from_ns, from_opt_ns, opt_ns, to_ns};
use crate::deploy::{Applied, DeployStore, LIVE_STATUSES, apply};

const HOST_COLS: &str = "name, address, tags, apps, last_seen, token_id, created_at";
const VERSION_COLS: &str = "app, role, canary_version, production_version, updated_at";
const HISTORY_COLS: &str = "id, app, role, kind, old_version, new_version, actor, execution_id, at";
const LOCK_COLS: &str = "app, role, holder, actor, acquired_at";

fn host_from_row(r: &Row<'_>) -> Result<Host, StoreError> {
    let c = || corrupt("host");
    let tags: String = r.get(2).map_err(c())?;
    let apps: String = r.get(3).map_err(c())?;
    Ok(Host {
        name: r.get(0).map_err(c())?,
        address: r.get(1).map_err(c())?,
        tags: serde_json::from_value(parse_json(&tags, "host tags")?).map_err(|e| {
            StoreError::Corrupt {
                what: "host tags".into(),
                reason: e.to_string(),
            }
        })?,
        apps: serde_json::from_value(parse_json(&apps, "host apps")?).map_err(|e| {
            StoreError::Corrupt {
                what: "host apps".into(),
                reason: e.to_string(),
            }
        })?,
        last_seen: from_opt_ns(r.get(4).map_err(c())?),
        token_id: r.get(5).map_err(c())?,
        created_at: from_ns(r.get(6).map_err(c())?),
    })
}

fn versions_from_row(r: &Row<'_>) -> Result<Versions, StoreError> {
    let c = || corrupt("advertised versions");
    Ok(Versions {
        app: r.get(0).map_err(c())?,
        role: r.get(1).map_err(c())?,
        canary_version: r.get(2).map_err(c())?,
        production_version: r.get(3).map_err(c())?,
        updated_at: from_ns(r.get(4).map_err(c())?),
    })
}

fn history_from_row(r: &Row<'_>) -> Result<VersionChange, StoreError> {
    let c = || corrupt("version history");
    Ok(VersionChange {
        id: r.get(0).map_err(c())?,
        app: r.get(1).map_err(c())?,
        role: r.get(2).map_err(c())?,
        kind: r.get(3).map_err(c())?,
        old_version: r.get(4).map_err(c())?,
        new_version: r.get(5).map_err(c())?,
        actor: r.get(6).map_err(c())?,
        execution_id: r.get(7).map_err(c())?,
        at: from_ns(r.get(8).map_err(c())?),
    })
}

fn lock_from_row(r: &Row<'_>) -> Result<DeployLock, StoreError> {
    let c = || corrupt("deploy lock");
    Ok(DeployLock {
        app: r.get(0).map_err(c())?,
        role: r.get(1).map_err(c())?,
        holder: r.get(2).map_err(c())?,
        actor: r.get(3).map_err(c())?,
        acquired_at: from_ns(r.get(4).map_err(c())?),
    })
}

fn to_json<T: serde::Serialize>(v: &T, what: &str) -> Result<String, StoreError> {
    serde_json::to_value(v)
        .map(|v| json_text(&v))
        .map_err(|e| StoreError::InvalidData {
            what: what.into(),
            reason: e.to_string(),
        })
}

fn read_versions(conn: &Connection, app: &str, role: &str) -> Result<Option<Versions>, StoreError> {
    let op = "reading advertised versions";
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {VERSION_COLS} FROM advertised_versions WHERE app = ?1 AND role = ?2"
        ))
        .map_err(err(op))?;
    let mut rows = stmt.query(params![app, role]).map_err(err(op))?;
    match rows.next().map_err(err(op))? {
        Some(r) => Ok(Some(versions_from_row(r)?)),
        None => Ok(None),
    }
}

fn read_lock(conn: &Connection, app: &str, role: &str) -> Result<Option<DeployLock>, StoreError> {
    let op = "reading a deploy lock";
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {LOCK_COLS} FROM deploy_locks WHERE app = ?1 AND role = ?2"
        ))
        .map_err(err(op))?;
    let mut rows = stmt.query(params![app, role]).map_err(err(op))?;
    match rows.next().map_err(err(op))? {
        Some(r) => Ok(Some(lock_from_row(r)?)),
        None => Ok(None),
    }
}

#[async_trait]
impl DeployStore for SqliteStore {
    async fn upsert_host(&self, host: Host) -> Result<(), StoreError> {
        let tags = to_json(&host.tags, "host tags")?;
        let apps = to_json(&host.apps, "host apps")?;
        let last_seen = opt_ns(host.last_seen, "host last_seen")?;
        let created = to_ns(host.created_at, "host creation time")?;
        self.write(move |conn| {
            let op = "storing a host";
            conn.prepare_cached(
                "INSERT INTO hosts (name, address, tags, apps, last_seen, token_id, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (name) DO UPDATE SET \
                 address = excluded.address, tags = excluded.tags, token_id = excluded.token_id",
            )
            .map_err(err(op))?
            .execute(params![
                host.name,
                host.address,
                tags,
                apps,
                last_seen,
                host.token_id,
                created
            ])
            .map_err(err(op))?;
            Ok(())
        })
        .await
    }

    async fn get_host(&self, name: &str) -> Result<Option<Host>, StoreError> {
        let name = name.to_string();
        self.read(move |conn| {
            let rows = query_all(
                conn,
                "reading a host",
                &format!("SELECT {HOST_COLS} FROM hosts WHERE name = ?1"),
                &[text(&name)],
                host_from_row,
            )?;
            Ok(rows.into_iter().next())
        })
        .await
    }

    async fn list_hosts(&self) -> Result<Vec<Host>, StoreError> {
        self.read(|conn| {
            query_all(
                conn,
                "listing hosts",
                &format!("SELECT {HOST_COLS} FROM hosts ORDER BY name"),
                &[],
                host_from_row,
            )
        })
        .await
    }

    async fn delete_host(&self, name: &str) -> Result<bool, StoreError> {
        let name = name.to_string();
        self.write(move |conn| {
            let n = conn
                .prepare_cached("DELETE FROM hosts WHERE name = ?1")
                .map_err(err("deleting a host"))?
                .execute(params![name])
                .map_err(err("deleting a host"))?;
            Ok(n > 0)
        })
        .await
    }

    async fn record_host_report(
        &self,
        name: &str,
        apps: BTreeMap<String, AppStatus>,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let name = name.to_string();
        let apps = to_json(&apps, "host apps")?;
        let at = to_ns(at, "report time")?;
        self.write(move |conn| {
            let op = "recording a host report";
            let n = conn
                .prepare_cached("UPDATE hosts SET apps = ?2, last_seen = ?3 WHERE name = ?1")
                .map_err(err(op))?
                .execute(params![name, apps, at])
                .map_err(err(op))?;
            Ok(n > 0)
        })
        .await
    }

    async fn get_versions(&self, app: &str, role: &str) -> Result<Option<Versions>, StoreError> {
        let (app, role) = (app.to_string(), role.to_string());
        self.read(move |conn| read_versions(conn, &app, &role))
            .await
    }

    async fn list_versions(&self) -> Result<Vec<Versions>, StoreError> {
        self.read(|conn| {
            query_all(
                conn,
                "listing advertised versions",
                &format!("SELECT {VERSION_COLS} FROM advertised_versions ORDER BY app, role"),
                &[],
                versions_from_row,
            )
        })
        .await
    }

    async fn change_version(
        &self,
        req: VersionChangeRequest,
    ) -> Result<VersionOutcome, StoreError> {
        self.write(move |conn| {
            let current = read_versions(conn, &req.app, &req.role)?;
            match apply(&req, current.as_ref()) {
                Applied::Change(versions, change) => {
                    let op = "changing advertised versions";
                    let at = to_ns(versions.updated_at, "version change time")?;
                    conn.prepare_cached(
                        "INSERT INTO advertised_versions \
                         (app, role, canary_version, production_version, updated_at) \
                         VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (app, role) DO UPDATE SET \
                         canary_version = excluded.canary_version, \
                         production_version = excluded.production_version, \
                         updated_at = excluded.updated_at",
                    )
                    .map_err(err(op))?
                    .execute(params![
                        versions.app,
                        versions.role,
                        versions.canary_version,
                        versions.production_version,
                        at
                    ])
                    .map_err(err(op))?;
                    conn.prepare_cached(
                        "INSERT INTO version_history (id, app, role, kind, old_version, \
                         new_version, actor, execution_id, at) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                    )
                    .map_err(err(op))?
                    .execute(params![
                        change.id,
                        change.app,
                        change.role,
                        change.kind,
                        change.old_version,
                        change.new_version,
                        change.actor,
                        change.execution_id,
                        at
                    ])
                    .map_err(err(op))?;
                    Ok(VersionOutcome::Changed {
                        change: Box::new(change),
                        versions: Box::new(versions),
                    })
                }
                Applied::Refuse(reason, audit) => {
                    let op = "auditing a refused version change";
                    conn.prepare_cached(
                        "INSERT INTO audit (id, at, actor, action, target, details) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    )
                    .map_err(err(op))?
                    .execute(params![
                        audit.id,
                        to_ns(audit.at, "audit time")?,
                        audit.actor,
                        audit.action,
                        audit.target,
                        json_text(&audit.details)
                    ])
                    .map_err(err(op))?;
                    Ok(VersionOutcome::Refused { reason })
                }
            }
        })
        .await
    }

    async fn version_history(
        &self,
        app: &str,
        role: &str,
        limit: u32,
    ) -> Result<Vec<VersionChange>, StoreError> {
        let (app, role) = (app.to_string(), role.to_string());
        self.read(move |conn| {
            query_all(
                conn,
                "reading version history",
                &format!(
                    "SELECT {HISTORY_COLS} FROM version_history WHERE app = ?1 AND role = ?2 \
                     ORDER BY seq DESC LIMIT ?3"
                ),
                &[text(&app), text(&role), limit.into()],
                history_from_row,
            )
        })
        .await
    }

    async fn acquire_deploy_lock(
        &self,
        lock: DeployLock,
    ) -> Result<Option<DeployLock>, StoreError> {
        let at = to_ns(lock.acquired_at, "lock time")?;
        self.write(move |conn| {
            if let Some(held) = read_lock(conn, &lock.app, &lock.role)? {
                return Ok((held.holder != lock.holder).then_some(held));
            }
            let op = "taking a deploy lock";
            conn.prepare_cached(
                "INSERT INTO deploy_locks (app, role, holder, actor, acquired_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .map_err(err(op))?
            .execute(params![lock.app, lock.role, lock.holder, lock.actor, at])
            .map_err(err(op))?;
            Ok(None)
        })
        .await
    }

    async fn release_deploy_lock(
        &self,
        app: &str,
        role: &str,
        holder: &str,
    ) -> Result<bool, StoreError> {
        let (app, role, holder) = (app.to_string(), role.to_string(), holder.to_string());
        self.write(move |conn| {
            let op = "releasing a deploy lock";
            let n = conn
                .prepare_cached(
                    "DELETE FROM deploy_locks WHERE app = ?1 AND role = ?2 AND holder = ?3",
                )
                .map_err(err(op))?
                .execute(params![app, role, holder])
                .map_err(err(op))?;
            Ok(n > 0)
        })
        .await
    }

    async fn list_deploy_locks(&self) -> Result<Vec<DeployLock>, StoreError> {
        self.read(|conn| {
            query_all(
                conn,
                "listing deploy locks",
                &format!("SELECT {LOCK_COLS} FROM deploy_locks ORDER BY app, role"),
                &[],
                lock_from_row,
            )
        })
        .await
    }

    async fn release_orphan_deploy_locks(&self) -> Result<Vec<DeployLock>, StoreError> {
        self.write(|conn| {
            let op = "releasing orphan deploy locks";
            let orphans = query_all(
                conn,
                op,
                &format!(
                    "SELECT {LOCK_COLS} FROM deploy_locks WHERE holder NOT IN \
                     (SELECT id FROM executions WHERE status IN ({LIVE_STATUSES}))"
                ),
                &[],
                lock_from_row,
            )?;
            for l in &orphans {
                conn.prepare_cached(
                    "DELETE FROM deploy_locks WHERE app = ?1 AND role = ?2 AND holder = ?3",
                )
                .map_err(err(op))?
                .execute(params![l.app, l.role, l.holder])
                .map_err(err(op))?;
            }
            Ok(orphans)
        })
        .await
    }
}
