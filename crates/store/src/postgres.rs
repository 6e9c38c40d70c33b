//! PostgreSQL backend, for several servers sharing one database.
//!
//! An `sqlx` connection pool; statements are prepared and cached per
//! connection by sqlx. The execution queue is claimed with
//! `FOR UPDATE SKIP LOCKED`, so concurrent claimers never get the same row and
//! never wait on each other. Migrations run under `pg_advisory_lock`, so two
//! servers opening the same database at once do not both migrate.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use aviary_core::model::{
    ApiToken, AuditRecord, Enforcement, Execution, ExecutionStatus, KeyValue, KvScope,
    TriggerInstance,
};
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Executor, Postgres, QueryBuilder, Row};

use crate::common::{
    Migration, abandoned_error, count_to_u64, from_ns, from_opt_ns, opt_ns, parse_scope,
    parse_status, parse_ti_status, redact_url, timeout_from_i64, timeout_to_i64, to_ns,
};
use crate::sqlite::conflict_what;
use crate::{
    ChildEnd, ExecutionFilter, Ingest, IngestOutcome, NewExecution, OutputChunk, Store, StoreError,
};

mod deploy;

const BACKEND: &str = "postgres";

const MIGRATIONS: &[Migration] = &[
    (1, "init", include_str!("migrations/postgres/0001_init.sql")),
    (
        2,
        "workflows",
        include_str!("migrations/postgres/0002_workflows.sql"),
    ),
    (
        3,
        "deploy",
        include_str!("migrations/postgres/0003_deploy.sql"),
    ),
];

/// A boxed `Send` future returning `Result<T, StoreError>`.
type BoxedFuture<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Pool size: enough for a busy server on a small machine.
const POOL_MAX: u32 = 16;

/// The PostgreSQL store.
pub struct PgStore {
    pool: PgPool,
}

fn err(op: &str) -> impl FnOnce(sqlx::Error) -> StoreError + '_ {
    move |e| map_err(op, e)
}

fn map_err(op: &str, e: sqlx::Error) -> StoreError {
    if let sqlx::Error::Database(db) = &e {
        match db.code().as_deref() {
            Some("23505") => {
                let detail = db
                    .constraint()
                    .map(str::to_string)
                    .unwrap_or_else(|| db.message().to_string());
                return StoreError::Conflict {
                    what: conflict_what(&detail),
                    detail,
                };
            }
            Some("22P05") => {
                return StoreError::InvalidData {
                    what: "JSON data".into(),
                    reason: format!(
                        "{} (PostgreSQL JSONB cannot hold the \\u0000 character)",
                        db.message()
                    ),
                };
            }
            _ => {}
        }
    }
    StoreError::Database {
        backend: BACKEND,
        op: op.to_string(),
        message: e.to_string(),
    }
}

fn corrupt(what: &str) -> impl FnOnce(sqlx::Error) -> StoreError + '_ {
    move |e| StoreError::Corrupt {
        what: what.to_string(),
        reason: e.to_string(),
    }
}

/// Splits the `schema=<name>` parameter off a PostgreSQL URL.
fn split_schema(url: &str) -> Result<(String, Option<String>), StoreError> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), None));
    };
    let mut schema = None;
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.strip_prefix("schema=") {
            Some(name) => schema = Some(name.to_string()),
            None => kept.push(pair),
        }
    }
    if let Some(name) = &schema {
        let valid = !name.is_empty()
            && name.len() <= 63
            && name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(StoreError::InvalidUrl {
                url: redact_url(url),
                reason: format!(
                    "schema name `{name}` must be 1-63 letters, digits or `_`, not starting with a digit"
                ),
            });
        }
    }
    let rebuilt = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rebuilt, schema))
}

const TI_COLS: &str = "id, trigger, payload, occurrence_time, dedup_key, status";
const ENF_COLS: &str = "id, trigger_instance_id, rule, execution_id, failure_reason, enforced_at";
const EXEC_COLS: &str = "id, action, runner, parameters, status, result, trigger_instance_id, rule, \
     enforcement_id, parent_id, requested_by, created_at, started_at, finished_at, timeout_secs, node, secrets";
const KV_COLS: &str = "scope, name, value, secret, expire_at, updated_at";
const TOKEN_COLS: &str = "id, name, hash, role, created_at, revoked_at, last_used_at";

fn ti_from_row(r: &PgRow) -> Result<TriggerInstance, StoreError> {
    let c = || corrupt("trigger instance");
    let status: String = r.try_get("status").map_err(c())?;
    Ok(TriggerInstance {
        id: r.try_get("id").map_err(c())?,
        trigger: r.try_get("trigger").map_err(c())?,
        payload: r.try_get("payload").map_err(c())?,
        occurrence_time: from_ns(r.try_get("occurrence_time").map_err(c())?),
        dedup_key: r.try_get("dedup_key").map_err(c())?,
        status: parse_ti_status(&status)?,
    })
}

fn enf_from_row(r: &PgRow) -> Result<Enforcement, StoreError> {
    let c = || corrupt("enforcement");
    Ok(Enforcement {
        id: r.try_get("id").map_err(c())?,
        trigger_instance_id: r.try_get("trigger_instance_id").map_err(c())?,
        rule: r.try_get("rule").map_err(c())?,
        execution_id: r.try_get("execution_id").map_err(c())?,
        failure_reason: r.try_get("failure_reason").map_err(c())?,
        enforced_at: from_ns(r.try_get("enforced_at").map_err(c())?),
    })
}

fn exec_from_row(r: &PgRow) -> Result<NewExecution, StoreError> {
    let c = || corrupt("execution");
    let status: String = r.try_get("status").map_err(c())?;
    Ok(NewExecution {
        execution: Execution {
            id: r.try_get("id").map_err(c())?,
            action: r.try_get("action").map_err(c())?,
            runner: r.try_get("runner").map_err(c())?,
            parameters: r.try_get("parameters").map_err(c())?,
            status: parse_status(&status)?,
            result: r.try_get("result").map_err(c())?,
            trigger_instance_id: r.try_get("trigger_instance_id").map_err(c())?,
            rule: r.try_get("rule").map_err(c())?,
            enforcement_id: r.try_get("enforcement_id").map_err(c())?,
            parent_id: r.try_get("parent_id").map_err(c())?,
            requested_by: r.try_get("requested_by").map_err(c())?,
            created_at: from_ns(r.try_get("created_at").map_err(c())?),
            started_at: from_opt_ns(r.try_get("started_at").map_err(c())?),
            finished_at: from_opt_ns(r.try_get("finished_at").map_err(c())?),
            timeout_secs: timeout_from_i64(r.try_get("timeout_secs").map_err(c())?)?,
            node: r.try_get("node").map_err(c())?,
        },
        secrets: r.try_get("secrets").map_err(c())?,
    })
}

fn kv_from_row(r: &PgRow) -> Result<KeyValue, StoreError> {
    let c = || corrupt("datastore item");
    let scope: String = r.try_get("scope").map_err(c())?;
    Ok(KeyValue {
        scope: parse_scope(&scope)?,
        name: r.try_get("name").map_err(c())?,
        value: r.try_get("value").map_err(c())?,
        secret: r.try_get("secret").map_err(c())?,
        expire_at: from_opt_ns(r.try_get("expire_at").map_err(c())?),
        updated_at: from_ns(r.try_get("updated_at").map_err(c())?),
    })
}

fn token_from_row(r: &PgRow) -> Result<ApiToken, StoreError> {
    let c = || corrupt("API token");
    Ok(ApiToken {
        id: r.try_get("id").map_err(c())?,
        name: r.try_get("name").map_err(c())?,
        hash: r.try_get("hash").map_err(c())?,
        role: r.try_get("role").map_err(c())?,
        created_at: from_ns(r.try_get("created_at").map_err(c())?),
        revoked_at: from_opt_ns(r.try_get("revoked_at").map_err(c())?),
        last_used_at: from_opt_ns(r.try_get("last_used_at").map_err(c())?),
    })
}

fn decode_all<T>(
    rows: Vec<PgRow>,
    decode: fn(&PgRow) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    rows.iter().map(decode).collect()
}

fn count_row(r: &PgRow) -> Result<u64, StoreError> {
    let n: i64 = r.try_get(0).map_err(corrupt("count"))?;
    Ok(count_to_u64(n))
}

async fn insert_execution<'e, E>(exec: E, new: &NewExecution) -> Result<(), StoreError>
where
    E: sqlx::PgExecutor<'e>,
{
    let e = &new.execution;
    sqlx::query(&format!(
        "INSERT INTO executions ({EXEC_COLS}) VALUES \
         ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"
    ))
    .bind(&e.id)
    .bind(&e.action)
    .bind(&e.runner)
    .bind(&e.parameters)
    .bind(e.status.as_str())
    .bind(&e.result)
    .bind(&e.trigger_instance_id)
    .bind(&e.rule)
    .bind(&e.enforcement_id)
    .bind(&e.parent_id)
    .bind(&e.requested_by)
    .bind(to_ns(e.created_at, "execution created_at")?)
    .bind(opt_ns(e.started_at, "execution started_at")?)
    .bind(opt_ns(e.finished_at, "execution finished_at")?)
    .bind(timeout_to_i64(e.timeout_secs)?)
    .bind(&e.node)
    .bind(&new.secrets)
    .execute(exec)
    .await
    .map_err(err("storing an execution"))?;
    Ok(())
}

impl PgStore {
    /// Connects to `url` (`postgres://...`, optional `schema=<name>` query
    /// parameter) and migrates the database.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let (sqlx_url, schema) = split_schema(url)?;
        let mut options =
            PgConnectOptions::from_str(&sqlx_url).map_err(|e| StoreError::InvalidUrl {
                url: redact_url(url),
                reason: e.to_string(),
            })?;
        if let Some(schema) = &schema {
            options = options.options([("search_path", schema.as_str())]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(POOL_MAX)
            .acquire_timeout(Duration::from_secs(15))
            .connect_with(options)
            .await
            .map_err(|e| StoreError::PgConnect {
                url: redact_url(url),
                message: e.to_string(),
            })?;
        let store = Self { pool };
        store.migrate(schema.as_deref()).await?;
        Ok(store)
    }

    /// Boxed with an explicit `Send` bound so that `tokio::spawn(open(..))`
    /// type-checks (sqlx executor futures trip the compiler's higher-ranked
    /// `Send` inference; see rust-lang/rust#96865). Note: `RawSql::execute`
    /// must not be used here for the same reason; `Executor::execute` is.
    fn migrate<'a>(&'a self, schema: Option<&'a str>) -> BoxedFuture<'a, ()> {
        Box::pin(async move {
            let op = "migrating the schema";
            let mut conn = self.pool.acquire().await.map_err(err(op))?;
            let lock_key = format!("aviary-migrate:{}", schema.unwrap_or("public"));
            sqlx::query("SELECT pg_advisory_lock(hashtext($1))")
                .bind(&lock_key)
                .execute(&mut *conn)
                .await
                .map_err(err(op))?;
            // Migrations run on other pool connections while this one holds the lock.
            let result = self.migrate_locked(schema).await;
            let unlock = sqlx::query("SELECT pg_advisory_unlock(hashtext($1))")
                .bind(&lock_key)
                .execute(&mut *conn)
                .await;
            if let Err(e) = unlock {
                // Closing the connection releases the lock anyway.
                tracing::warn!(error = %e, "releasing the migration lock failed");
                conn.detach();
            }
            result
        })
    }

    fn migrate_locked<'a>(&'a self, schema: Option<&'a str>) -> BoxedFuture<'a, ()> {
        Box::pin(async move {
            let op = "migrating the schema";
            if let Some(schema) = schema {
                // The name was validated (letters, digits, `_`).
                sqlx::raw_sql(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
                    .execute(&self.pool)
                    .await
                    .map_err(err(op))?;
            }
            sqlx::raw_sql(
                "CREATE TABLE IF NOT EXISTS schema_migrations (
                version    BIGINT PRIMARY KEY,
                name       TEXT   NOT NULL,
                applied_at BIGINT NOT NULL
            )",
            )
            .execute(&self.pool)
            .await
            .map_err(err(op))?;
            let supported = MIGRATIONS.iter().map(|m| m.0).max().unwrap_or(0);
            let found: Option<i64> =
                sqlx::query_scalar("SELECT MAX(version) FROM schema_migrations")
                    .fetch_one(&self.pool)
                    .await
                    .map_err(err(op))?;
            if let Some(found) = found.filter(|f| *f > supported) {
                return Err(StoreError::SchemaTooNew {
                    backend: BACKEND,
                    found,
                    supported,
                });
            }
            for &(version, name, sql) in MIGRATIONS {
                if found.is_some_and(|f| f >= version) {
                    continue;
                }
                let mig_err = |e: sqlx::Error| StoreError::Migration {
                    backend: BACKEND,
                    version,
                    name: name.to_string(),
                    message: e.to_string(),
                };
                let mut tx = self.pool.begin().await.map_err(mig_err)?;
                let applied: Option<i64> =
                    sqlx::query_scalar("SELECT version FROM schema_migrations WHERE version = $1")
                        .bind(version)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(mig_err)?;
                if applied.is_none() {
                    (&mut *tx)
                        .execute(sqlx::raw_sql(sql))
                        .await
                        .map_err(mig_err)?;
                    sqlx::query(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                )
                .bind(version)
                .bind(name)
                .bind(to_ns(Utc::now(), "migration time")?)
                .execute(&mut *tx)
                .await
                .map_err(mig_err)?;
                    tracing::info!(backend = BACKEND, version, name, "applied schema migration");
                }
                tx.commit().await.map_err(mig_err)?;
            }
            Ok(())
        })
    }
}

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn ingest(&self, ingest: Ingest) -> Result<IngestOutcome, StoreError> {
        let op = "storing an event";
        let ti = &ingest.trigger_instance;
        let mut tx = self.pool.begin().await.map_err(err(op))?;
        let inserted: Option<String> = sqlx::query_scalar(&format!(
            "INSERT INTO trigger_instances ({TI_COLS}) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (dedup_key) DO NOTHING RETURNING id"
        ))
        .bind(&ti.id)
        .bind(&ti.trigger)
        .bind(&ti.payload)
        .bind(to_ns(ti.occurrence_time, "event occurrence_time")?)
        .bind(&ti.dedup_key)
        .bind(ti.status.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(err(op))?;
        if inserted.is_none() {
            tx.rollback().await.map_err(err(op))?;
            let existing: Option<String> =
                sqlx::query_scalar("SELECT id FROM trigger_instances WHERE dedup_key = $1")
                    .bind(&ti.dedup_key)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(err(op))?;
            return match existing {
                Some(existing_id) => Ok(IngestOutcome::Duplicate { existing_id }),
                None => Err(StoreError::Database {
                    backend: BACKEND,
                    op: op.into(),
                    message:
                        "the event's dedup key collided with an event that then vanished; retry"
                            .into(),
                }),
            };
        }
        for e in &ingest.enforcements {
            sqlx::query(&format!(
                "INSERT INTO enforcements ({ENF_COLS}) VALUES ($1, $2, $3, $4, $5, $6)"
            ))
            .bind(&e.id)
            .bind(&e.trigger_instance_id)
            .bind(&e.rule)
            .bind(&e.execution_id)
            .bind(&e.failure_reason)
            .bind(to_ns(e.enforced_at, "enforcement enforced_at")?)
            .execute(&mut *tx)
            .await
            .map_err(err(op))?;
        }
        for x in &ingest.executions {
            insert_execution(&mut *tx, x).await?;
        }
        tx.commit().await.map_err(err(op))?;
        Ok(IngestOutcome::Stored)
    }

    async fn get_trigger_instance(&self, id: &str) -> Result<Option<TriggerInstance>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {TI_COLS} FROM trigger_instances WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(err("reading a trigger instance"))?;
        row.as_ref().map(ti_from_row).transpose()
    }

    async fn list_trigger_instances(
        &self,
        trigger: Option<&str>,
        limit: u32,
        offset: u32,
    ) -> Result<Vec<TriggerInstance>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {TI_COLS} FROM trigger_instances WHERE ($1::text IS NULL OR trigger = $1) \
             ORDER BY seq DESC LIMIT $2 OFFSET $3"
        ))
        .bind(trigger)
        .bind(i64::from(limit))
        .bind(i64::from(offset))
        .fetch_all(&self.pool)
        .await
        .map_err(err("listing trigger instances"))?;
        decode_all(rows, ti_from_row)
    }

    async fn list_enforcements(
        &self,
        trigger_instance_id: Option<&str>,
        rule: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Enforcement>, StoreError> {
        let mut qb: QueryBuilder<Postgres> =
            QueryBuilder::new(format!("SELECT {ENF_COLS} FROM enforcements WHERE TRUE"));
        if let Some(ti) = trigger_instance_id {
            qb.push(" AND trigger_instance_id = ").push_bind(ti);
        }
        if let Some(rule) = rule {
            qb.push(" AND rule = ").push_bind(rule);
        }
        qb.push(" ORDER BY seq DESC LIMIT ")
            .push_bind(i64::from(limit));
        let rows = qb
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(err("listing enforcements"))?;
        decode_all(rows, enf_from_row)
    }

    async fn count_trigger_instances(&self) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) FROM trigger_instances")
            .fetch_one(&self.pool)
            .await
            .map_err(err("counting trigger instances"))?;
        count_row(&row)
    }

    async fn create_execution(&self, new: NewExecution) -> Result<(), StoreError> {
        insert_execution(&self.pool, &new).await
    }

    async fn claim_executions(
        &self,
        node: &str,
        limit: u32,
    ) -> Result<Vec<NewExecution>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(&format!(
            // A CTE with a locking clause is evaluated exactly once; a plain
            // `IN (subquery ... LIMIT)` may be re-run by the planner and claim
            // more than `limit` rows.
            "WITH picked AS ( \
                 SELECT seq AS picked_seq FROM executions WHERE status = 'requested' \
                 AND created_at <= $3 \
                 ORDER BY created_at, seq LIMIT $2 FOR UPDATE SKIP LOCKED) \
             UPDATE executions SET status = 'scheduled', node = $1 \
             FROM picked WHERE executions.seq = picked.picked_seq \
             RETURNING {EXEC_COLS}, seq"
        ))
        .bind(node)
        .bind(i64::from(limit))
        .bind(to_ns(Utc::now(), "claim time")?)
        .fetch_all(&self.pool)
        .await
        .map_err(err("claiming executions"))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let seq: i64 = r.try_get("seq").map_err(corrupt("execution"))?;
            out.push((seq, exec_from_row(r)?));
        }
        out.sort_by_key(|(seq, x)| (x.execution.created_at, *seq));
        Ok(out.into_iter().map(|(_, x)| x).collect())
    }

    async fn transition_execution(
        &self,
        id: &str,
        from: &[ExecutionStatus],
        to: ExecutionStatus,
        result: Option<serde_json::Value>,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        if from.is_empty() {
            return Ok(false);
        }
        transition_in(&self.pool, id, from, to, result.as_ref(), at).await
    }

    async fn get_execution(&self, id: &str) -> Result<Option<Execution>, StoreError> {
        let row = sqlx::query(&format!("SELECT {EXEC_COLS} FROM executions WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(err("reading an execution"))?;
        Ok(row
            .as_ref()
            .map(exec_from_row)
            .transpose()?
            .map(|x| x.execution))
    }

    async fn list_executions(
        &self,
        filter: &ExecutionFilter,
    ) -> Result<Vec<Execution>, StoreError> {
        let mut qb: QueryBuilder<Postgres> =
            QueryBuilder::new(format!("SELECT {EXEC_COLS} FROM executions WHERE TRUE"));
        let fields = [
            ("action", filter.action.clone()),
            ("status", filter.status.map(|s| s.as_str().to_string())),
            ("rule", filter.rule.clone()),
            ("trigger_instance_id", filter.trigger_instance_id.clone()),
            ("parent_id", filter.parent_id.clone()),
        ];
        for (col, value) in fields {
            if let Some(v) = value {
                qb.push(format!(" AND {col} = ")).push_bind(v);
            }
        }
        qb.push(" ORDER BY created_at DESC, seq DESC LIMIT ")
            .push_bind(i64::from(filter.limit))
            .push(" OFFSET ")
            .push_bind(i64::from(filter.offset));
        let rows = qb
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(err("listing executions"))?;
        Ok(decode_all(rows, exec_from_row)?
            .into_iter()
            .map(|x| x.execution)
            .collect())
    }

    async fn count_executions(&self, status: Option<ExecutionStatus>) -> Result<u64, StoreError> {
        let row =
            sqlx::query("SELECT COUNT(*) FROM executions WHERE ($1::text IS NULL OR status = $1)")
                .bind(status.map(|s| s.as_str()))
                .fetch_one(&self.pool)
                .await
                .map_err(err("counting executions"))?;
        count_row(&row)
    }

    async fn recover_node(&self, node: &str, at: DateTime<Utc>) -> Result<Vec<String>, StoreError> {
        let op = "recovering a node's executions";
        let mut tx = self.pool.begin().await.map_err(err(op))?;
        sqlx::query(
            "UPDATE executions SET status = 'requested', node = NULL \
             WHERE node = $1 AND status = 'scheduled'",
        )
        .bind(node)
        .execute(&mut *tx)
        .await
        .map_err(err(op))?;
        let ids: Vec<String> = sqlx::query_scalar(
            "UPDATE executions SET status = 'abandoned', finished_at = $2, \
             result = CASE WHEN jsonb_typeof(result) = 'object' THEN result || $3 ELSE $3 END \
             WHERE node = $1 AND status IN ('running', 'canceling') \
             AND runner <> 'orquesta' RETURNING id",
        )
        .bind(node)
        .bind(to_ns(at, "recovery time")?)
        .bind(abandoned_error(node))
        .fetch_all(&mut *tx)
        .await
        .map_err(err(op))?;
        tx.commit().await.map_err(err(op))?;
        Ok(ids)
    }

    async fn list_running_workflows(&self, node: Option<&str>) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar(
            "SELECT id FROM executions WHERE runner = 'orquesta' \
             AND status IN ('running', 'canceling', 'pausing', 'paused') \
             AND ($1::text IS NULL OR node = $1) ORDER BY seq",
        )
        .bind(node)
        .fetch_all(&self.pool)
        .await
        .map_err(err("listing running workflows"))
    }

    async fn load_workflow(
        &self,
        execution_id: &str,
    ) -> Result<Option<(i64, serde_json::Value)>, StoreError> {
        let row = sqlx::query("SELECT version, state FROM workflow_states WHERE execution_id = $1")
            .bind(execution_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(err("reading a workflow's state"))?;
        row.map(|r| {
            let v: i64 = r.try_get(0).map_err(corrupt("workflow state"))?;
            let s: serde_json::Value = r.try_get(1).map_err(corrupt("workflow state"))?;
            Ok((v, s))
        })
        .transpose()
    }

    async fn save_workflow(
        &self,
        execution_id: &str,
        expected_version: Option<i64>,
        state: serde_json::Value,
        children: Vec<NewExecution>,
    ) -> Result<bool, StoreError> {
        let op = "saving a workflow's state";
        let at = to_ns(Utc::now(), "workflow save time")?;
        let mut tx = self.pool.begin().await.map_err(err(op))?;
        let done = match expected_version {
            None => sqlx::query(
                "INSERT INTO workflow_states (execution_id, version, state, updated_at) \
                 VALUES ($1, 1, $2, $3) ON CONFLICT (execution_id) DO NOTHING",
            )
            .bind(execution_id)
            .bind(&state)
            .bind(at)
            .execute(&mut *tx)
            .await
            .map_err(err(op))?,
            Some(v) => sqlx::query(
                "UPDATE workflow_states SET version = version + 1, state = $2, updated_at = $3 \
                 WHERE execution_id = $1 AND version = $4",
            )
            .bind(execution_id)
            .bind(&state)
            .bind(at)
            .bind(v)
            .execute(&mut *tx)
            .await
            .map_err(err(op))?,
        };
        if done.rows_affected() == 0 {
            tx.rollback().await.map_err(err(op))?;
            return Ok(false);
        }
        for child in &children {
            insert_execution(&mut *tx, child).await?;
        }
        tx.commit().await.map_err(err(op))?;
        Ok(true)
    }

    async fn save_workflow_step(
        &self,
        execution_id: &str,
        expected_version: i64,
        state: String,
        children: Vec<NewExecution>,
        ended: Option<ChildEnd>,
    ) -> Result<bool, StoreError> {
        let op = "saving a workflow step";
        let at = to_ns(Utc::now(), "workflow save time")?;
        let mut tx = self.pool.begin().await.map_err(err(op))?;
        let done = sqlx::query(
            "UPDATE workflow_states SET version = version + 1, state = $2::jsonb, updated_at = $3 \
             WHERE execution_id = $1 AND version = $4 \
             AND EXISTS (SELECT 1 FROM executions WHERE id = $1 AND status = 'running')",
        )
        .bind(execution_id)
        .bind(&state)
        .bind(at)
        .bind(expected_version)
        .execute(&mut *tx)
        .await
        .map_err(err(op))?;
        if done.rows_affected() == 0 {
            tx.rollback().await.map_err(err(op))?;
            return Ok(false);
        }
        if let Some(end) = &ended
            && !transition_in(
                &mut *tx,
                &end.id,
                &end.from,
                end.to,
                Some(&end.result),
                end.at,
            )
            .await?
        {
            tx.rollback().await.map_err(err(op))?;
            return Ok(false);
        }
        for child in &children {
            insert_execution(&mut *tx, child).await?;
        }
        tx.commit().await.map_err(err(op))?;
        Ok(true)
    }

    async fn append_output(&self, chunks: Vec<OutputChunk>) -> Result<(), StoreError> {
        if chunks.is_empty() {
            return Ok(());
        }
        let op = "storing execution output";
        let mut ids = Vec::with_capacity(chunks.len());
        let mut seqs = Vec::with_capacity(chunks.len());
        let mut streams = Vec::with_capacity(chunks.len());
        let mut datas = Vec::with_capacity(chunks.len());
        let mut ats = Vec::with_capacity(chunks.len());
        for c in chunks {
            ats.push(to_ns(c.at, "output time")?);
            ids.push(c.execution_id);
            seqs.push(c.seq);
            streams.push(c.stream);
            datas.push(c.data);
        }
        sqlx::query(
            "INSERT INTO execution_output (execution_id, seq, stream, data, at) \
             SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::text[], $5::bigint[]) \
             ON CONFLICT DO NOTHING",
        )
        .bind(ids)
        .bind(seqs)
        .bind(streams)
        .bind(datas)
        .bind(ats)
        .execute(&self.pool)
        .await
        .map_err(err(op))?;
        Ok(())
    }

    async fn get_output(
        &self,
        execution_id: &str,
        after_seq: i64,
    ) -> Result<Vec<OutputChunk>, StoreError> {
        let rows = sqlx::query(
            "SELECT execution_id, seq, stream, data, at FROM execution_output \
             WHERE execution_id = $1 AND seq > $2 ORDER BY seq",
        )
        .bind(execution_id)
        .bind(after_seq)
        .fetch_all(&self.pool)
        .await
        .map_err(err("reading execution output"))?;
        rows.iter()
            .map(|r| {
                let c = || corrupt("execution output");
                Ok(OutputChunk {
                    execution_id: r.try_get("execution_id").map_err(c())?,
                    seq: r.try_get("seq").map_err(c())?,
                    stream: r.try_get("stream").map_err(c())?,
                    data: r.try_get("data").map_err(c())?,
                    at: from_ns(r.try_get("at").map_err(c())?),
                })
            })
            .collect()
    }

    async fn set_kv(&self, kv: KeyValue) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "INSERT INTO kv ({KV_COLS}) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (scope, name) DO UPDATE SET value = excluded.value, \
             secret = excluded.secret, expire_at = excluded.expire_at, \
             updated_at = excluded.updated_at"
        ))
        .bind(kv.scope.as_str())
        .bind(&kv.name)
        .bind(&kv.value)
        .bind(kv.secret)
        .bind(opt_ns(kv.expire_at, "datastore expire_at")?)
        .bind(to_ns(kv.updated_at, "datastore updated_at")?)
        .execute(&self.pool)
        .await
        .map_err(err("storing a datastore item"))?;
        Ok(())
    }

    async fn get_kv(
        &self,
        scope: KvScope,
        name: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<KeyValue>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {KV_COLS} FROM kv WHERE scope = $1 AND name = $2 \
             AND (expire_at IS NULL OR expire_at > $3)"
        ))
        .bind(scope.as_str())
        .bind(name)
        .bind(to_ns(now, "current time")?)
        .fetch_optional(&self.pool)
        .await
        .map_err(err("reading a datastore item"))?;
        row.as_ref().map(kv_from_row).transpose()
    }

    async fn list_kv(
        &self,
        scope: Option<KvScope>,
        prefix: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {KV_COLS} FROM kv WHERE (expire_at IS NULL OR expire_at > $1) \
             AND ($2::text IS NULL OR scope = $2) \
             AND ($3::text IS NULL OR starts_with(name, $3)) \
             ORDER BY scope, name COLLATE \"C\""
        ))
        .bind(to_ns(now, "current time")?)
        .bind(scope.map(|s| s.as_str()))
        .bind(prefix)
        .fetch_all(&self.pool)
        .await
        .map_err(err("listing datastore items"))?;
        decode_all(rows, kv_from_row)
    }

    async fn delete_kv(&self, scope: KvScope, name: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM kv WHERE scope = $1 AND name = $2")
            .bind(scope.as_str())
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(err("deleting a datastore item"))?;
        Ok(done.rows_affected() > 0)
    }

    async fn delete_output(&self, execution_ids: &[String]) -> Result<u64, StoreError> {
        if execution_ids.is_empty() {
            return Ok(0);
        }
        let done = sqlx::query("DELETE FROM execution_output WHERE execution_id = ANY($1)")
            .bind(execution_ids)
            .execute(&self.pool)
            .await
            .map_err(err("deleting execution output"))?;
        Ok(done.rows_affected())
    }

    async fn purge_expired_kv(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM kv WHERE expire_at IS NOT NULL AND expire_at <= $1")
            .bind(to_ns(now, "current time")?)
            .execute(&self.pool)
            .await
            .map_err(err("purging expired datastore items"))?;
        Ok(done.rows_affected())
    }

    async fn insert_token(&self, token: ApiToken) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "INSERT INTO api_tokens ({TOKEN_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
        ))
        .bind(&token.id)
        .bind(&token.name)
        .bind(&token.hash)
        .bind(&token.role)
        .bind(to_ns(token.created_at, "token created_at")?)
        .bind(opt_ns(token.revoked_at, "token revoked_at")?)
        .bind(opt_ns(token.last_used_at, "token last_used_at")?)
        .execute(&self.pool)
        .await
        .map_err(err("storing an API token"))?;
        Ok(())
    }

    async fn find_token_by_hash(&self, hash: &str) -> Result<Option<ApiToken>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {TOKEN_COLS} FROM api_tokens WHERE hash = $1 AND revoked_at IS NULL"
        ))
        .bind(hash)
        .fetch_optional(&self.pool)
        .await
        .map_err(err("looking up an API token"))?;
        row.as_ref().map(token_from_row).transpose()
    }

    async fn list_tokens(&self) -> Result<Vec<ApiToken>, StoreError> {
        let rows = sqlx::query(&format!("SELECT {TOKEN_COLS} FROM api_tokens ORDER BY seq"))
            .fetch_all(&self.pool)
            .await
            .map_err(err("listing API tokens"))?;
        decode_all(rows, token_from_row)
    }

    async fn revoke_token(&self, id_or_name: &str, at: DateTime<Utc>) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE api_tokens SET revoked_at = $2 \
             WHERE (id = $1 OR name = $1) AND revoked_at IS NULL",
        )
        .bind(id_or_name)
        .bind(to_ns(at, "revocation time")?)
        .execute(&self.pool)
        .await
        .map_err(err("revoking an API token"))?;
        Ok(done.rows_affected() > 0)
    }

    async fn count_tokens(&self) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) FROM api_tokens WHERE revoked_at IS NULL")
            .fetch_one(&self.pool)
            .await
            .map_err(err("counting API tokens"))?;
        count_row(&row)
    }

    async fn append_audit(&self, record: AuditRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO audit (id, at, actor, action, target, details) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&record.id)
        .bind(to_ns(record.at, "audit time")?)
        .bind(&record.actor)
        .bind(&record.action)
        .bind(&record.target)
        .bind(&record.details)
        .execute(&self.pool)
        .await
        .map_err(err("appending to the audit trail"))?;
        Ok(())
    }

    async fn list_audit(&self, limit: u32) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, at, actor, action, target, details FROM audit ORDER BY seq DESC LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(err("listing the audit trail"))?;
        rows.iter()
            .map(|r| {
                let c = || corrupt("audit record");
                Ok(AuditRecord {
                    id: r.try_get("id").map_err(c())?,
                    at: from_ns(r.try_get("at").map_err(c())?),
                    actor: r.try_get("actor").map_err(c())?,
                    action: r.try_get("action").map_err(c())?,
                    target: r.try_get("target").map_err(c())?,
                    details: r.try_get("details").map_err(c())?,
                })
            })
            .collect()
    }

    async fn set_rule_enabled(&self, rule: &str, enabled: bool) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO rule_overrides (rule, enabled, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (rule) DO UPDATE SET enabled = excluded.enabled, \
             updated_at = excluded.updated_at",
        )
        .bind(rule)
        .bind(enabled)
        .bind(to_ns(Utc::now(), "current time")?)
        .execute(&self.pool)
        .await
        .map_err(err("storing a rule override"))?;
        Ok(())
    }

    async fn rule_overrides(&self) -> Result<HashMap<String, bool>, StoreError> {
        let rows = sqlx::query("SELECT rule, enabled FROM rule_overrides")
            .fetch_all(&self.pool)
            .await
            .map_err(err("reading rule overrides"))?;
        rows.iter()
            .map(|r| {
                let c = || corrupt("rule override");
                Ok((
                    r.try_get::<String, _>("rule").map_err(c())?,
                    r.try_get::<bool, _>("enabled").map_err(c())?,
                ))
            })
            .collect()
    }

    async fn get_timer_fired(&self, key: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        let ns: Option<i64> = sqlx::query_scalar("SELECT fired_at FROM timers WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(err("reading timer state"))?;
        Ok(ns.map(from_ns))
    }

    async fn set_timer_fired(&self, key: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO timers (key, fired_at) VALUES ($1, $2) \
             ON CONFLICT (key) DO UPDATE SET fired_at = excluded.fired_at",
        )
        .bind(key)
        .bind(to_ns(at, "timer fire time")?)
        .execute(&self.pool)
        .await
        .map_err(err("storing timer state"))?;
        Ok(())
    }
}

/// The conditional status change of [`Store::transition_execution`], on a
/// pool or inside a transaction.
async fn transition_in<'e, E>(
    exec: E,
    id: &str,
    from: &[ExecutionStatus],
    to: ExecutionStatus,
    result: Option<&serde_json::Value>,
    at: DateTime<Utc>,
) -> Result<bool, StoreError>
where
    E: sqlx::PgExecutor<'e>,
{
    let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
    let done = sqlx::query(
        "UPDATE executions SET status = $1, \
         started_at = CASE WHEN $2 THEN $3 ELSE started_at END, \
         finished_at = CASE WHEN $4 THEN $3 ELSE finished_at END, \
         result = COALESCE($5, result) \
         WHERE id = $6 AND status = ANY($7)",
    )
    .bind(to.as_str())
    .bind(to == ExecutionStatus::Running)
    .bind(to_ns(at, "transition time")?)
    .bind(to.is_terminal())
    .bind(result)
    .bind(id)
    .bind(from)
    .execute(exec)
    .await
    .map_err(err("changing an execution's status"))?;
    Ok(done.rows_affected() > 0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn schema_parameter_is_split_off() {
        let (url, schema) = split_schema("postgres://u@h/db?schema=abc_1&sslmode=disable").unwrap();
        assert_eq!(url, "postgres://u@h/db?sslmode=disable");
        assert_eq!(schema.as_deref(), Some("abc_1"));
        let (url, schema) = split_schema("postgres://u@h/db?schema=x").unwrap();
        assert_eq!(url, "postgres://u@h/db");
        assert_eq!(schema.as_deref(), Some("x"));
        assert!(split_schema("postgres://u@h/db?schema=a;drop").is_err());
        assert!(split_schema("postgres://u@h/db?schema=1a").is_err());
        let (url, schema) = split_schema("postgres://u@h/db").unwrap();
        assert_eq!((url.as_str(), schema), ("postgres://u@h/db", None));
    }
}
