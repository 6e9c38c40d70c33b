//! Embedded SQLite backend.
//!
//! Durability and throughput come from **group commit**: one writer thread
//! owns the only read-write connection. Write requests arrive on a channel as
//! jobs; the thread takes everything queued (up to [`MAX_BATCH`]), runs each
//! job in its own `SAVEPOINT` inside ONE transaction (so a failing job fails
//! only itself), commits once (WAL, `synchronous=FULL`: one fsync for the whole
//! batch), then replies to every job. Reads use a small pool of read-only
//! connections on blocking threads. Statements are cached per connection.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aviary_core::model::{
    ApiToken, AuditRecord, Enforcement, Execution, ExecutionStatus, KeyValue, KvScope,
    TriggerInstance,
};
use chrono::{DateTime, Utc};
use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params, params_from_iter};
use tokio::sync::{Semaphore, oneshot};

use crate::common::{
    Migration, abandoned_error, count_to_u64, from_ns, from_opt_ns, opt_ns, parse_scope,
    parse_status, parse_ti_status, timeout_from_i64, timeout_to_i64, to_ns,
};
use crate::{
    ChildEnd, ExecutionFilter, Ingest, IngestOutcome, NewExecution, OutputChunk, Store, StoreError,
};

/// Most write jobs committed in one transaction.
pub const MAX_BATCH: usize = 256;
/// Read-only connections kept for reads.
const READERS: usize = 4;
/// How long a connection waits for a lock held by another process.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

const MIGRATIONS: &[Migration] = &[
    (1, "init", include_str!("migrations/sqlite/0001_init.sql")),
    (
        2,
        "workflows",
        include_str!("migrations/sqlite/0002_workflows.sql"),
    ),
    (
        3,
        "deploy",
        include_str!("migrations/sqlite/0003_deploy.sql"),
    ),
];

mod deploy;

const BACKEND: &str = "sqlite";

/// A unit of work for the writer thread.
trait WriteJob: Send {
    /// Runs inside the batch transaction; returns whether it succeeded.
    fn run(&mut self, conn: &Connection) -> bool;
    /// Records a failure without running the job.
    fn fail(&mut self, e: StoreError);
    /// Replies: with the job's own result, or with `failure` if the batch failed.
    fn finish(self: Box<Self>, failure: Option<StoreError>);
}

struct Pending<T, F> {
    f: Option<F>,
    result: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> WriteJob for Pending<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let Some(f) = self.f.take() else {
            return false;
        };
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| f(conn)));
        let result = outcome.unwrap_or_else(|_| {
            Err(StoreError::Database {
                backend: BACKEND,
                op: "running a write".into(),
                message: "the write panicked (a bug); it was rolled back".into(),
            })
        });
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn fail(&mut self, e: StoreError) {
        self.f = None;
        self.result = Some(Err(e));
    }

    fn finish(self: Box<Self>, failure: Option<StoreError>) {
        let result = match failure {
            Some(e) => Err(e),
            None => self.result.unwrap_or(Err(StoreError::WriterStopped)),
        };
        // The caller may have given up waiting; that is fine.
        let _ = self.reply.send(result);
    }
}

type Job = Box<dyn WriteJob>;

struct ReaderPool {
    path: String,
    conns: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
}

impl ReaderPool {
    fn take(&self) -> Result<Connection, StoreError> {
        let pooled = self.conns.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match pooled {
            Some(c) => Ok(c),
            None => open_reader(&self.path),
        }
    }

    fn give_back(&self, conn: Connection) {
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(conn);
    }
}

/// The SQLite store. Cheap to share behind an `Arc`; dropping it stops the
/// writer thread once queued writes are done.
pub struct SqliteStore {
    jobs: mpsc::Sender<Job>,
    readers: Option<Arc<ReaderPool>>,
}

fn err(op: &str) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
    move |e| map_err(op, e)
}

fn map_err(op: &str, e: rusqlite::Error) -> StoreError {
    if let rusqlite::Error::SqliteFailure(f, msg) = &e
        && f.code == rusqlite::ErrorCode::ConstraintViolation
    {
        let detail = msg.clone().unwrap_or_else(|| f.to_string());
        return StoreError::Conflict {
            what: conflict_what(&detail),
            detail,
        };
    }
    StoreError::Database {
        backend: BACKEND,
        op: op.to_string(),
        message: e.to_string(),
    }
}

/// A human name for what a constraint message is about.
pub(crate) fn conflict_what(detail: &str) -> String {
    let pairs = [
        ("api_tokens.name", "an active API token with this name"),
        (
            "api_tokens_active_name",
            "an active API token with this name",
        ),
        ("api_tokens.hash", "an API token with this secret"),
        ("api_tokens_hash", "an API token with this secret"),
        ("api_tokens", "an API token with this id"),
        (
            "trigger_instances.dedup_key",
            "a trigger instance with this dedup key",
        ),
        (
            "trigger_instances_dedup_key",
            "a trigger instance with this dedup key",
        ),
        ("trigger_instances", "a trigger instance with this id"),
        ("enforcements", "an enforcement with this id"),
        ("executions", "an execution with this id"),
        ("audit", "an audit record with this id"),
    ];
    pairs
        .iter()
        .find(|(k, _)| detail.contains(k))
        .map(|(_, w)| (*w).to_string())
        .unwrap_or_else(|| "a row with this key".to_string())
}

fn corrupt(what: &str) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
    move |e| StoreError::Corrupt {
        what: what.to_string(),
        reason: e.to_string(),
    }
}

fn json_text(v: &serde_json::Value) -> String {
    // Serializing a `Value` cannot fail (its keys are strings).
    v.to_string()
}

fn parse_json(s: &str, what: &str) -> Result<serde_json::Value, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt {
        what: what.to_string(),
        reason: format!("invalid JSON: {e}"),
    })
}

fn open_reader(path: &str) -> Result<Connection, StoreError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
        | OpenFlags::SQLITE_OPEN_URI
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| StoreError::SqliteOpen {
        path: path.to_string(),
        message: e.to_string(),
    })?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| StoreError::SqliteOpen {
            path: path.to_string(),
            message: e.to_string(),
        })?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

fn open_writer(path: &str, memory: bool) -> Result<Connection, StoreError> {
    let open_err = |e: rusqlite::Error| StoreError::SqliteOpen {
        path: path.to_string(),
        message: e.to_string(),
    };
    if !memory
        && let Some(parent) = Path::new(path).parent()
        && !parent.as_os_str().is_empty()
        && !parent.exists()
    {
        std::fs::create_dir_all(parent).map_err(|e| StoreError::SqliteOpen {
            path: path.to_string(),
            message: format!("cannot create directory {}: {e}", parent.display()),
        })?;
    }
    let conn = if memory {
        Connection::open_in_memory().map_err(open_err)?
    } else {
        Connection::open(path).map_err(open_err)?
    };
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
    conn.set_prepared_statement_cache_capacity(64);
    if !memory {
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::SqliteOpen {
                path: path.to_string(),
                message: format!(
                    "cannot switch to WAL journal mode (got `{mode}`); is the file on a network filesystem?"
                ),
            });
        }
    }
    conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=OFF;")
        .map_err(open_err)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let supported = MIGRATIONS.iter().map(|m| m.0).max().unwrap_or(0);
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version    INTEGER PRIMARY KEY,
            name       TEXT    NOT NULL,
            applied_at INTEGER NOT NULL
        )",
    )
    .map_err(err("creating schema_migrations"))?;
    for &(version, name, sql) in MIGRATIONS {
        let mig_err = |e: rusqlite::Error| StoreError::Migration {
            backend: BACKEND,
            version,
            name: name.to_string(),
            message: e.to_string(),
        };
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(mig_err)?;
        let found: Option<i64> = tx
            .query_row("SELECT MAX(version) FROM schema_migrations", [], |r| {
                r.get(0)
            })
            .map_err(mig_err)?;
        if let Some(found) = found.filter(|f| *f > supported) {
            return Err(StoreError::SchemaTooNew {
                backend: BACKEND,
                found,
                supported,
            });
        }
        let applied = tx
            .query_row(
                "SELECT 1 FROM schema_migrations WHERE version = ?1",
                [version],
                |_| Ok(()),
            )
            .optional()
            .map_err(mig_err)?
            .is_some();
        if !applied {
            tx.execute_batch(sql).map_err(mig_err)?;
            let now = to_ns(Utc::now(), "migration time")?;
            tx.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
                params![version, name, now],
            )
            .map_err(mig_err)?;
            tracing::info!(backend = BACKEND, version, name, "applied schema migration");
        }
        tx.commit().map_err(mig_err)?;
    }
    Ok(())
}

fn writer_loop(conn: Connection, jobs: mpsc::Receiver<Job>) {
    while let Ok(first) = jobs.recv() {
        let mut batch: Vec<Job> = Vec::with_capacity(64);
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        run_batch(&conn, batch);
    }
    tracing::debug!("SQLite writer thread stopping: store dropped");
}

/// Runs a parameterless statement through the statement cache.
fn exec_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

fn run_batch(conn: &Connection, mut batch: Vec<Job>) {
    if let Err(e) = exec_cached(conn, "BEGIN IMMEDIATE") {
        let e = map_err("starting a write transaction", e);
        for job in batch {
            job.finish(Some(e.clone()));
        }
        return;
    }
    for job in batch.iter_mut() {
        if let Err(e) = exec_cached(conn, "SAVEPOINT job") {
            // Cannot isolate this job: fail it without running it.
            job.fail(map_err("starting a savepoint", e));
            continue;
        }
        let ok = job.run(conn);
        let end = if ok {
            exec_cached(conn, "RELEASE job")
        } else {
            exec_cached(conn, "ROLLBACK TO job").and_then(|()| exec_cached(conn, "RELEASE job"))
        };
        if let Err(e) = end {
            tracing::error!(error = %e, "SQLite savepoint cleanup failed");
        }
    }
    match exec_cached(conn, "COMMIT") {
        Ok(()) => {
            for job in batch {
                job.finish(None);
            }
        }
        Err(e) => {
            let e = map_err("committing writes", e);
            tracing::error!(error = %e, jobs = batch.len(), "SQLite commit failed; batch rolled back");
            let _ = conn.execute_batch("ROLLBACK");
            for job in batch {
                job.finish(Some(e.clone()));
            }
        }
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` (`:memory:` for a
    /// private in-memory database) and migrates it.
    pub async fn open(path: &str) -> Result<Self, StoreError> {
        let path = path.to_string();
        let memory = path == ":memory:";
        let p = path.clone();
        let conn = tokio::task::spawn_blocking(move || -> Result<Connection, StoreError> {
            let mut conn = open_writer(&p, memory)?;
            migrate(&mut conn)?;
            Ok(conn)
        })
        .await
        .map_err(|e| StoreError::SqliteOpen {
            path: path.clone(),
            message: format!("opening task failed: {e}"),
        })??;
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("aviary-sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx))
            .map_err(|e| StoreError::SqliteOpen {
                path: path.clone(),
                message: format!("cannot start the writer thread: {e}"),
            })?;
        let readers = (!memory).then(|| {
            Arc::new(ReaderPool {
                path: path.clone(),
                conns: Mutex::new(Vec::new()),
                permits: Arc::new(Semaphore::new(READERS)),
            })
        });
        Ok(Self { jobs: tx, readers })
    }

    /// Runs `f` on the writer connection inside the current group-commit
    /// transaction; resolves once the transaction is committed.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let job: Job = Box::new(Pending {
            f: Some(f),
            result: None,
            reply,
        });
        self.jobs.send(job).map_err(|_| StoreError::WriterStopped)?;
        rx.await.map_err(|_| StoreError::WriterStopped)?
    }

    /// Runs `f` on a read-only connection (on the writer for in-memory databases).
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let Some(pool) = &self.readers else {
            return self.write(f).await;
        };
        let pool = Arc::clone(pool);
        let permit = Arc::clone(&pool.permits)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::WriterStopped)?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let conn = pool.take()?;
            let result = f(&conn);
            pool.give_back(conn);
            result
        })
        .await
        .map_err(|e| StoreError::Database {
            backend: BACKEND,
            op: "reading".into(),
            message: format!("the read task failed: {e}"),
        })?
    }
}

const TI_COLS: &str = "id, trigger, payload, occurrence_time, dedup_key, status";
const ENF_COLS: &str = "id, trigger_instance_id, rule, execution_id, failure_reason, enforced_at";
const EXEC_COLS: &str = "id, action, runner, parameters, status, result, trigger_instance_id, rule, \
     enforcement_id, parent_id, requested_by, created_at, started_at, finished_at, timeout_secs, node, secrets";
const KV_COLS: &str = "scope, name, value, secret, expire_at, updated_at";
const TOKEN_COLS: &str = "id, name, hash, role, created_at, revoked_at, last_used_at";

fn ti_from_row(r: &Row<'_>) -> Result<TriggerInstance, StoreError> {
    let c = corrupt("trigger instance");
    let payload: String = r.get(2).map_err(corrupt("trigger instance"))?;
    let status: String = r.get(5).map_err(corrupt("trigger instance"))?;
    Ok(TriggerInstance {
        id: r.get(0).map_err(corrupt("trigger instance"))?,
        trigger: r.get(1).map_err(corrupt("trigger instance"))?,
        payload: parse_json(&payload, "trigger instance payload")?,
        occurrence_time: from_ns(r.get(3).map_err(corrupt("trigger instance"))?),
        dedup_key: r.get(4).map_err(c)?,
        status: parse_ti_status(&status)?,
    })
}

fn enf_from_row(r: &Row<'_>) -> Result<Enforcement, StoreError> {
    let c = || corrupt("enforcement");
    Ok(Enforcement {
        id: r.get(0).map_err(c())?,
        trigger_instance_id: r.get(1).map_err(c())?,
        rule: r.get(2).map_err(c())?,
        execution_id: r.get(3).map_err(c())?,
        failure_reason: r.get(4).map_err(c())?,
        enforced_at: from_ns(r.get(5).map_err(c())?),
    })
}

fn exec_from_row(r: &Row<'_>) -> Result<NewExecution, StoreError> {
    let c = || corrupt("execution");
    let parameters: String = r.get(3).map_err(c())?;
    let status: String = r.get(4).map_err(c())?;
    let result: String = r.get(5).map_err(c())?;
    Ok(NewExecution {
        execution: Execution {
            id: r.get(0).map_err(c())?,
            action: r.get(1).map_err(c())?,
            runner: r.get(2).map_err(c())?,
            parameters: parse_json(&parameters, "execution parameters")?,
            status: parse_status(&status)?,
            result: parse_json(&result, "execution result")?,
            trigger_instance_id: r.get(6).map_err(c())?,
            rule: r.get(7).map_err(c())?,
            enforcement_id: r.get(8).map_err(c())?,
            parent_id: r.get(9).map_err(c())?,
            requested_by: r.get(10).map_err(c())?,
            created_at: from_ns(r.get(11).map_err(c())?),
            started_at: from_opt_ns(r.get(12).map_err(c())?),
            finished_at: from_opt_ns(r.get(13).map_err(c())?),
            timeout_secs: timeout_from_i64(r.get(14).map_err(c())?)?,
            node: r.get(15).map_err(c())?,
        },
        secrets: r.get(16).map_err(c())?,
    })
}

fn kv_from_row(r: &Row<'_>) -> Result<KeyValue, StoreError> {
    let c = || corrupt("datastore item");
    let scope: String = r.get(0).map_err(c())?;
    Ok(KeyValue {
        scope: parse_scope(&scope)?,
        name: r.get(1).map_err(c())?,
        value: r.get(2).map_err(c())?,
        secret: r.get(3).map_err(c())?,
        expire_at: from_opt_ns(r.get(4).map_err(c())?),
        updated_at: from_ns(r.get(5).map_err(c())?),
    })
}

fn token_from_row(r: &Row<'_>) -> Result<ApiToken, StoreError> {
    let c = || corrupt("API token");
    Ok(ApiToken {
        id: r.get(0).map_err(c())?,
        name: r.get(1).map_err(c())?,
        hash: r.get(2).map_err(c())?,
        role: r.get(3).map_err(c())?,
        created_at: from_ns(r.get(4).map_err(c())?),
        revoked_at: from_opt_ns(r.get(5).map_err(c())?),
        last_used_at: from_opt_ns(r.get(6).map_err(c())?),
    })
}

fn audit_from_row(r: &Row<'_>) -> Result<AuditRecord, StoreError> {
    let c = || corrupt("audit record");
    let details: String = r.get(5).map_err(c())?;
    Ok(AuditRecord {
        id: r.get(0).map_err(c())?,
        at: from_ns(r.get(1).map_err(c())?),
        actor: r.get(2).map_err(c())?,
        action: r.get(3).map_err(c())?,
        target: r.get(4).map_err(c())?,
        details: parse_json(&details, "audit details")?,
    })
}

/// Runs a query and decodes every row.
fn query_all<T>(
    conn: &Connection,
    op: &str,
    sql: &str,
    args: &[SqlValue],
    decode: fn(&Row<'_>) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).map_err(err(op))?;
    let mut rows = stmt.query(params_from_iter(args.iter())).map_err(err(op))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(err(op))? {
        out.push(decode(row)?);
    }
    Ok(out)
}

fn text(s: &str) -> SqlValue {
    SqlValue::Text(s.to_string())
}

/// An execution encoded for its row, so the writer thread only binds values.
struct ExecRow {
    id: String,
    action: String,
    runner: String,
    parameters: String,
    status: &'static str,
    result: String,
    trigger_instance_id: Option<String>,
    rule: Option<String>,
    enforcement_id: Option<String>,
    parent_id: Option<String>,
    requested_by: String,
    created_at: i64,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    timeout_secs: i64,
    node: Option<String>,
    secrets: Option<String>,
}

fn encode_exec(new: NewExecution) -> Result<ExecRow, StoreError> {
    let e = new.execution;
    Ok(ExecRow {
        parameters: json_text(&e.parameters),
        status: e.status.as_str(),
        result: json_text(&e.result),
        created_at: to_ns(e.created_at, "execution created_at")?,
        started_at: opt_ns(e.started_at, "execution started_at")?,
        finished_at: opt_ns(e.finished_at, "execution finished_at")?,
        timeout_secs: timeout_to_i64(e.timeout_secs)?,
        id: e.id,
        action: e.action,
        runner: e.runner,
        trigger_instance_id: e.trigger_instance_id,
        rule: e.rule,
        enforcement_id: e.enforcement_id,
        parent_id: e.parent_id,
        requested_by: e.requested_by,
        node: e.node,
        secrets: new.secrets,
    })
}

const INSERT_EXEC: &str = "INSERT INTO executions (id, action, runner, parameters, status, result, \
     trigger_instance_id, rule, enforcement_id, parent_id, requested_by, created_at, started_at, \
     finished_at, timeout_secs, node, secrets) VALUES \
     (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)";

fn insert_execution(conn: &Connection, e: &ExecRow) -> Result<(), StoreError> {
    let op = "storing an execution";
    conn.prepare_cached(INSERT_EXEC)
        .map_err(err(op))?
        .execute(params![
            e.id,
            e.action,
            e.runner,
            e.parameters,
            e.status,
            e.result,
            e.trigger_instance_id,
            e.rule,
            e.enforcement_id,
            e.parent_id,
            e.requested_by,
            e.created_at,
            e.started_at,
            e.finished_at,
            e.timeout_secs,
            e.node,
            e.secrets,
        ])
        .map_err(err(op))?;
    Ok(())
}

/// An enforcement encoded for its row: id, trigger instance, rule, execution, failure, time.
type EnfRow = (String, String, String, Option<String>, Option<String>, i64);

/// An event with its enforcements and executions, encoded for their rows.
struct IngestRows {
    ti: (String, String, String, i64, Option<String>, &'static str),
    enforcements: Vec<EnfRow>,
    executions: Vec<ExecRow>,
}

fn encode_ingest(ingest: Ingest) -> Result<IngestRows, StoreError> {
    let ti = ingest.trigger_instance;
    let mut enforcements = Vec::with_capacity(ingest.enforcements.len());
    for e in ingest.enforcements {
        let at = to_ns(e.enforced_at, "enforcement enforced_at")?;
        enforcements.push((
            e.id,
            e.trigger_instance_id,
            e.rule,
            e.execution_id,
            e.failure_reason,
            at,
        ));
    }
    let executions = ingest
        .executions
        .into_iter()
        .map(encode_exec)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(IngestRows {
        ti: (
            ti.id,
            ti.trigger,
            json_text(&ti.payload),
            to_ns(ti.occurrence_time, "event occurrence_time")?,
            ti.dedup_key,
            ti.status.as_str(),
        ),
        enforcements,
        executions,
    })
}

fn ingest_tx(conn: &Connection, rows: &IngestRows) -> Result<IngestOutcome, StoreError> {
    let op = "storing an event";
    let ti = &rows.ti;
    if let Some(key) = &ti.4 {
        let existing: Option<String> = conn
            .prepare_cached("SELECT id FROM trigger_instances WHERE dedup_key = ?1")
            .map_err(err(op))?
            .query_row([key], |r| r.get(0))
            .optional()
            .map_err(err(op))?;
        if let Some(existing_id) = existing {
            return Ok(IngestOutcome::Duplicate { existing_id });
        }
    }
    conn.prepare_cached(
        "INSERT INTO trigger_instances (id, trigger, payload, occurrence_time, dedup_key, status) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )
    .map_err(err(op))?
    .execute(params![ti.0, ti.1, ti.2, ti.3, ti.4, ti.5])
    .map_err(err(op))?;
    for e in &rows.enforcements {
        conn.prepare_cached(
            "INSERT INTO enforcements (id, trigger_instance_id, rule, execution_id, \
             failure_reason, enforced_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .map_err(err(op))?
        .execute(params![e.0, e.1, e.2, e.3, e.4, e.5])
        .map_err(err(op))?;
    }
    for x in &rows.executions {
        insert_execution(conn, x)?;
    }
    Ok(IngestOutcome::Stored)
}

fn count(conn: &Connection, op: &str, sql: &str, args: &[SqlValue]) -> Result<u64, StoreError> {
    let n: i64 = conn
        .prepare_cached(sql)
        .map_err(err(op))?
        .query_row(params_from_iter(args.iter()), |r| r.get(0))
        .map_err(err(op))?;
    Ok(count_to_u64(n))
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn ingest(&self, ingest: Ingest) -> Result<IngestOutcome, StoreError> {
        let rows = encode_ingest(ingest)?;
        self.write(move |conn| ingest_tx(conn, &rows)).await
    }

    async fn get_trigger_instance(&self, id: &str) -> Result<Option<TriggerInstance>, StoreError> {
        let id = id.to_string();
        self.read(move |conn| {
            let sql = format!("SELECT {TI_COLS} FROM trigger_instances WHERE id = ?1");
            Ok(query_all(
                conn,
                "reading a trigger instance",
                &sql,
                &[text(&id)],
                ti_from_row,
            )?
            .pop())
        })
        .await
    }

    async fn list_trigger_instances(
        &self,
        trigger: Option<&str>,
        limit: u32,
        offset: u32,
    ) -> Result<Vec<TriggerInstance>, StoreError> {
        let trigger = trigger.map(str::to_string);
        self.read(move |conn| {
            let op = "listing trigger instances";
            match trigger {
                Some(t) => query_all(
                    conn,
                    op,
                    &format!(
                        "SELECT {TI_COLS} FROM trigger_instances WHERE trigger = ?1 \
                         ORDER BY seq DESC LIMIT ?2 OFFSET ?3"
                    ),
                    &[text(&t), limit.into(), offset.into()],
                    ti_from_row,
                ),
                None => query_all(
                    conn,
                    op,
                    &format!(
                        "SELECT {TI_COLS} FROM trigger_instances ORDER BY seq DESC LIMIT ?1 OFFSET ?2"
                    ),
                    &[limit.into(), offset.into()],
                    ti_from_row,
                ),
            }
        })
        .await
    }

    async fn list_enforcements(
        &self,
        trigger_instance_id: Option<&str>,
        rule: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Enforcement>, StoreError> {
        let ti = trigger_instance_id.map(str::to_string);
        let rule = rule.map(str::to_string);
        self.read(move |conn| {
            let mut sql = format!("SELECT {ENF_COLS} FROM enforcements WHERE 1=1");
            let mut args = Vec::new();
            if let Some(ti) = ti {
                args.push(SqlValue::Text(ti));
                sql.push_str(&format!(" AND trigger_instance_id = ?{}", args.len()));
            }
            if let Some(rule) = rule {
                args.push(SqlValue::Text(rule));
                sql.push_str(&format!(" AND rule = ?{}", args.len()));
            }
            args.push(limit.into());
            sql.push_str(&format!(" ORDER BY seq DESC LIMIT ?{}", args.len()));
            query_all(conn, "listing enforcements", &sql, &args, enf_from_row)
        })
        .await
    }

    async fn count_trigger_instances(&self) -> Result<u64, StoreError> {
        self.read(|conn| {
            count(
                conn,
                "counting trigger instances",
                "SELECT COUNT(*) FROM trigger_instances",
                &[],
            )
        })
        .await
    }

    async fn create_execution(&self, new: NewExecution) -> Result<(), StoreError> {
        let row = encode_exec(new)?;
        self.write(move |conn| insert_execution(conn, &row)).await
    }

    async fn claim_executions(
        &self,
        node: &str,
        limit: u32,
    ) -> Result<Vec<NewExecution>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let node = node.to_string();
        let now = to_ns(Utc::now(), "claim time")?;
        self.write(move |conn| {
            let op = "claiming executions";
            let sql = format!(
                "UPDATE executions SET status = 'scheduled', node = ?1 \
                 WHERE seq IN (SELECT seq FROM executions WHERE status = 'requested' \
                               AND created_at <= ?3 \
                               ORDER BY created_at, seq LIMIT ?2) \
                 AND status = 'requested' \
                 RETURNING {EXEC_COLS}, seq"
            );
            let mut stmt = conn.prepare_cached(&sql).map_err(err(op))?;
            let mut rows = stmt.query(params![node, limit, now]).map_err(err(op))?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().map_err(err(op))? {
                let seq: i64 = row.get(17).map_err(corrupt("execution"))?;
                out.push((seq, exec_from_row(row)?));
            }
            out.sort_by_key(|(seq, x)| (x.execution.created_at, *seq));
            Ok(out.into_iter().map(|(_, x)| x).collect())
        })
        .await
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
        let at = to_ns(at, "transition time")?;
        let id = id.to_string();
        let mut from: Vec<ExecutionStatus> = from.to_vec();
        from.sort_by_key(|s| s.as_str());
        from.dedup();
        self.write(move |conn| transition_in(conn, &id, &from, to, result.as_ref(), at))
            .await
    }

    async fn get_execution(&self, id: &str) -> Result<Option<Execution>, StoreError> {
        let id = id.to_string();
        self.read(move |conn| {
            let sql = format!("SELECT {EXEC_COLS} FROM executions WHERE id = ?1");
            Ok(query_all(
                conn,
                "reading an execution",
                &sql,
                &[text(&id)],
                exec_from_row,
            )?
            .pop()
            .map(|x| x.execution))
        })
        .await
    }

    async fn list_executions(
        &self,
        filter: &ExecutionFilter,
    ) -> Result<Vec<Execution>, StoreError> {
        let filter = filter.clone();
        self.read(move |conn| {
            let mut sql = format!("SELECT {EXEC_COLS} FROM executions WHERE 1=1");
            let mut args: Vec<SqlValue> = Vec::new();
            let fields = [
                ("action", filter.action),
                ("status", filter.status.map(|s| s.as_str().to_string())),
                ("rule", filter.rule),
                ("trigger_instance_id", filter.trigger_instance_id),
                ("parent_id", filter.parent_id),
            ];
            for (col, value) in fields {
                if let Some(v) = value {
                    args.push(SqlValue::Text(v));
                    sql.push_str(&format!(" AND {col} = ?{}", args.len()));
                }
            }
            args.push(filter.limit.into());
            args.push(filter.offset.into());
            sql.push_str(&format!(
                " ORDER BY created_at DESC, seq DESC LIMIT ?{} OFFSET ?{}",
                args.len() - 1,
                args.len()
            ));
            Ok(
                query_all(conn, "listing executions", &sql, &args, exec_from_row)?
                    .into_iter()
                    .map(|x| x.execution)
                    .collect(),
            )
        })
        .await
    }

    async fn count_executions(&self, status: Option<ExecutionStatus>) -> Result<u64, StoreError> {
        self.read(move |conn| {
            let op = "counting executions";
            match status {
                Some(s) => count(
                    conn,
                    op,
                    "SELECT COUNT(*) FROM executions WHERE status = ?1",
                    &[text(s.as_str())],
                ),
                None => count(conn, op, "SELECT COUNT(*) FROM executions", &[]),
            }
        })
        .await
    }

    async fn recover_node(&self, node: &str, at: DateTime<Utc>) -> Result<Vec<String>, StoreError> {
        let at = to_ns(at, "recovery time")?;
        let node = node.to_string();
        self.write(move |conn| {
            let op = "recovering a node's executions";
            conn.prepare_cached(
                "UPDATE executions SET status = 'requested', node = NULL \
                 WHERE node = ?1 AND status = 'scheduled'",
            )
            .map_err(err(op))?
            .execute([&node])
            .map_err(err(op))?;
            let error = json_text(&abandoned_error(&node));
            let mut stmt = conn
                .prepare_cached(
                    "UPDATE executions SET status = 'abandoned', finished_at = ?2, \
                     result = CASE WHEN json_type(result) = 'object' \
                                   THEN json_patch(result, ?3) ELSE ?3 END \
                     WHERE node = ?1 AND status IN ('running', 'canceling') \
                     AND runner <> 'orquesta' \
                     RETURNING id",
                )
                .map_err(err(op))?;
            let ids = stmt
                .query_map(params![node, at, error], |r| r.get::<_, String>(0))
                .map_err(err(op))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(err(op))?;
            Ok(ids)
        })
        .await
    }

    async fn list_running_workflows(&self, node: Option<&str>) -> Result<Vec<String>, StoreError> {
        let node = node.map(str::to_string);
        self.read(move |conn| {
            let op = "listing running workflows";
            let mut stmt = conn
                .prepare_cached(
                    "SELECT id FROM executions WHERE runner = 'orquesta' \
                     AND status IN ('running', 'canceling', 'pausing', 'paused') \
                     AND (?1 IS NULL OR node = ?1) ORDER BY seq",
                )
                .map_err(err(op))?;
            let ids = stmt
                .query_map(params![node], |r| r.get::<_, String>(0))
                .map_err(err(op))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(err(op))?;
            Ok(ids)
        })
        .await
    }

    async fn load_workflow(
        &self,
        execution_id: &str,
    ) -> Result<Option<(i64, serde_json::Value)>, StoreError> {
        let id = execution_id.to_string();
        self.read(move |conn| {
            let op = "reading a workflow's state";
            let row: Option<(i64, String)> = conn
                .prepare_cached(
                    "SELECT version, state FROM workflow_states WHERE execution_id = ?1",
                )
                .map_err(err(op))?
                .query_row([&id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
                .map_err(err(op))?;
            row.map(|(v, s)| Ok((v, parse_json(&s, "workflow state")?)))
                .transpose()
        })
        .await
    }

    async fn save_workflow(
        &self,
        execution_id: &str,
        expected_version: Option<i64>,
        state: serde_json::Value,
        children: Vec<NewExecution>,
    ) -> Result<bool, StoreError> {
        let id = execution_id.to_string();
        let state = json_text(&state);
        let at = to_ns(Utc::now(), "workflow save time")?;
        let rows = children
            .into_iter()
            .map(encode_exec)
            .collect::<Result<Vec<_>, _>>()?;
        self.write(move |conn| {
            let op = "saving a workflow's state";
            let changed = match expected_version {
                None => conn
                    .prepare_cached(
                        "INSERT INTO workflow_states (execution_id, version, state, updated_at) \
                         VALUES (?1, 1, ?2, ?3) ON CONFLICT (execution_id) DO NOTHING",
                    )
                    .map_err(err(op))?
                    .execute(params![id, state, at])
                    .map_err(err(op))?,
                Some(v) => conn
                    .prepare_cached(
                        "UPDATE workflow_states SET version = version + 1, state = ?2, \
                         updated_at = ?3 WHERE execution_id = ?1 AND version = ?4",
                    )
                    .map_err(err(op))?
                    .execute(params![id, state, at, v])
                    .map_err(err(op))?,
            };
            if changed == 0 {
                return Ok(false);
            }
            for x in &rows {
                insert_execution(conn, x)?;
            }
            Ok(true)
        })
        .await
    }

    async fn save_workflow_step(
        &self,
        execution_id: &str,
        expected_version: i64,
        state: String,
        children: Vec<NewExecution>,
        ended: Option<ChildEnd>,
    ) -> Result<bool, StoreError> {
        let id = execution_id.to_string();
        let at = to_ns(Utc::now(), "workflow save time")?;
        let rows = children
            .into_iter()
            .map(encode_exec)
            .collect::<Result<Vec<_>, _>>()?;
        let ended = match ended {
            Some(e) => {
                let mut from = e.from.clone();
                from.sort_by_key(|s| s.as_str());
                from.dedup();
                let at = to_ns(e.at, "end time")?;
                Some((e, from, at))
            }
            None => None,
        };
        self.write(move |conn| {
            let op = "saving a workflow step";
            // Check the child first: nothing is written unless both hold
            // (this runs on the only writer, inside its transaction).
            if let Some((end, from, _)) = &ended {
                let status: Option<String> = conn
                    .prepare_cached("SELECT status FROM executions WHERE id = ?1")
                    .map_err(err(op))?
                    .query_row([&end.id], |r| r.get(0))
                    .optional()
                    .map_err(err(op))?;
                if !status.is_some_and(|st| from.iter().any(|f| f.as_str() == st)) {
                    return Ok(false);
                }
            }
            let changed = conn
                .prepare_cached(
                    "UPDATE workflow_states SET version = version + 1, state = ?2, \
                     updated_at = ?3 WHERE execution_id = ?1 AND version = ?4 \
                     AND EXISTS (SELECT 1 FROM executions \
                                 WHERE id = ?1 AND status = 'running')",
                )
                .map_err(err(op))?
                .execute(params![id, state, at, expected_version])
                .map_err(err(op))?;
            if changed == 0 {
                return Ok(false);
            }
            if let Some((end, from, end_at)) = &ended {
                transition_in(conn, &end.id, from, end.to, Some(&end.result), *end_at)?;
            }
            for x in &rows {
                insert_execution(conn, x)?;
            }
            Ok(true)
        })
        .await
    }

    async fn append_output(&self, chunks: Vec<OutputChunk>) -> Result<(), StoreError> {
        if chunks.is_empty() {
            return Ok(());
        }
        self.write(move |conn| {
            let op = "storing execution output";
            let mut stmt = conn
                .prepare_cached(
                    "INSERT INTO execution_output (execution_id, seq, stream, data, at) \
                     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
                )
                .map_err(err(op))?;
            for c in &chunks {
                stmt.execute(params![
                    c.execution_id,
                    c.seq,
                    c.stream,
                    c.data,
                    to_ns(c.at, "output time")?
                ])
                .map_err(err(op))?;
            }
            Ok(())
        })
        .await
    }

    async fn get_output(
        &self,
        execution_id: &str,
        after_seq: i64,
    ) -> Result<Vec<OutputChunk>, StoreError> {
        let id = execution_id.to_string();
        self.read(move |conn| {
            query_all(
                conn,
                "reading execution output",
                "SELECT execution_id, seq, stream, data, at FROM execution_output \
                 WHERE execution_id = ?1 AND seq > ?2 ORDER BY seq",
                &[SqlValue::Text(id), after_seq.into()],
                |r| {
                    let c = || corrupt("execution output");
                    Ok(OutputChunk {
                        execution_id: r.get(0).map_err(c())?,
                        seq: r.get(1).map_err(c())?,
                        stream: r.get(2).map_err(c())?,
                        data: r.get(3).map_err(c())?,
                        at: from_ns(r.get(4).map_err(c())?),
                    })
                },
            )
        })
        .await
    }

    async fn set_kv(&self, kv: KeyValue) -> Result<(), StoreError> {
        let expire = opt_ns(kv.expire_at, "datastore expire_at")?;
        let updated = to_ns(kv.updated_at, "datastore updated_at")?;
        self.write(move |conn| {
            let op = "storing a datastore item";
            conn.prepare_cached(&format!(
                "INSERT INTO kv ({KV_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                 ON CONFLICT (scope, name) DO UPDATE SET value = excluded.value, \
                 secret = excluded.secret, expire_at = excluded.expire_at, \
                 updated_at = excluded.updated_at"
            ))
            .map_err(err(op))?
            .execute(params![
                kv.scope.as_str(),
                kv.name,
                kv.value,
                kv.secret,
                expire,
                updated
            ])
            .map_err(err(op))?;
            Ok(())
        })
        .await
    }

    async fn get_kv(
        &self,
        scope: KvScope,
        name: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<KeyValue>, StoreError> {
        let now = to_ns(now, "current time")?;
        let name = name.to_string();
        self.read(move |conn| {
            let sql = format!(
                "SELECT {KV_COLS} FROM kv WHERE scope = ?1 AND name = ?2 \
                 AND (expire_at IS NULL OR expire_at > ?3)"
            );
            Ok(query_all(
                conn,
                "reading a datastore item",
                &sql,
                &[text(scope.as_str()), SqlValue::Text(name), now.into()],
                kv_from_row,
            )?
            .pop())
        })
        .await
    }

    async fn list_kv(
        &self,
        scope: Option<KvScope>,
        prefix: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let now = to_ns(now, "current time")?;
        let prefix = prefix.map(str::to_string);
        self.read(move |conn| {
            let mut sql =
                format!("SELECT {KV_COLS} FROM kv WHERE (expire_at IS NULL OR expire_at > ?1)");
            let mut args: Vec<SqlValue> = vec![now.into()];
            if let Some(scope) = scope {
                args.push(text(scope.as_str()));
                sql.push_str(&format!(" AND scope = ?{}", args.len()));
            }
            if let Some(prefix) = prefix {
                args.push(SqlValue::Text(prefix));
                let n = args.len();
                sql.push_str(&format!(" AND substr(name, 1, length(?{n})) = ?{n}"));
            }
            sql.push_str(" ORDER BY scope, name");
            query_all(conn, "listing datastore items", &sql, &args, kv_from_row)
        })
        .await
    }

    async fn delete_kv(&self, scope: KvScope, name: &str) -> Result<bool, StoreError> {
        let name = name.to_string();
        self.write(move |conn| {
            let op = "deleting a datastore item";
            let n = conn
                .prepare_cached("DELETE FROM kv WHERE scope = ?1 AND name = ?2")
                .map_err(err(op))?
                .execute(params![scope.as_str(), name])
                .map_err(err(op))?;
            Ok(n > 0)
        })
        .await
    }

    async fn delete_output(&self, execution_ids: &[String]) -> Result<u64, StoreError> {
        if execution_ids.is_empty() {
            return Ok(0);
        }
        let ids = execution_ids.to_vec();
        self.write(move |conn| {
            let op = "deleting execution output";
            let mut stmt = conn
                .prepare_cached("DELETE FROM execution_output WHERE execution_id = ?1")
                .map_err(err(op))?;
            let mut n = 0u64;
            for id in &ids {
                n += stmt.execute([id]).map_err(err(op))? as u64;
            }
            Ok(n)
        })
        .await
    }

    async fn purge_expired_kv(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let now = to_ns(now, "current time")?;
        self.write(move |conn| {
            let op = "purging expired datastore items";
            let n = conn
                .prepare_cached("DELETE FROM kv WHERE expire_at IS NOT NULL AND expire_at <= ?1")
                .map_err(err(op))?
                .execute([now])
                .map_err(err(op))?;
            Ok(n as u64)
        })
        .await
    }

    async fn insert_token(&self, token: ApiToken) -> Result<(), StoreError> {
        let created = to_ns(token.created_at, "token created_at")?;
        let revoked = opt_ns(token.revoked_at, "token revoked_at")?;
        let used = opt_ns(token.last_used_at, "token last_used_at")?;
        self.write(move |conn| {
            let op = "storing an API token";
            conn.prepare_cached(&format!(
                "INSERT INTO api_tokens ({TOKEN_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
            ))
            .map_err(err(op))?
            .execute(params![
                token.id, token.name, token.hash, token.role, created, revoked, used
            ])
            .map_err(err(op))?;
            Ok(())
        })
        .await
    }

    async fn find_token_by_hash(&self, hash: &str) -> Result<Option<ApiToken>, StoreError> {
        let hash = hash.to_string();
        self.read(move |conn| {
            let sql = format!(
                "SELECT {TOKEN_COLS} FROM api_tokens WHERE hash = ?1 AND revoked_at IS NULL"
            );
            Ok(query_all(
                conn,
                "looking up an API token",
                &sql,
                &[SqlValue::Text(hash)],
                token_from_row,
            )?
            .pop())
        })
        .await
    }

    async fn list_tokens(&self) -> Result<Vec<ApiToken>, StoreError> {
        self.read(|conn| {
            let sql = format!("SELECT {TOKEN_COLS} FROM api_tokens ORDER BY seq");
            query_all(conn, "listing API tokens", &sql, &[], token_from_row)
        })
        .await
    }

    async fn revoke_token(&self, id_or_name: &str, at: DateTime<Utc>) -> Result<bool, StoreError> {
        let at = to_ns(at, "revocation time")?;
        let key = id_or_name.to_string();
        self.write(move |conn| {
            let op = "revoking an API token";
            let n = conn
                .prepare_cached(
                    "UPDATE api_tokens SET revoked_at = ?2 \
                     WHERE (id = ?1 OR name = ?1) AND revoked_at IS NULL",
                )
                .map_err(err(op))?
                .execute(params![key, at])
                .map_err(err(op))?;
            Ok(n > 0)
        })
        .await
    }

    async fn count_tokens(&self) -> Result<u64, StoreError> {
        self.read(|conn| {
            count(
                conn,
                "counting API tokens",
                "SELECT COUNT(*) FROM api_tokens WHERE revoked_at IS NULL",
                &[],
            )
        })
        .await
    }

    async fn append_audit(&self, record: AuditRecord) -> Result<(), StoreError> {
        let at = to_ns(record.at, "audit time")?;
        self.write(move |conn| {
            let op = "appending to the audit trail";
            conn.prepare_cached(
                "INSERT INTO audit (id, at, actor, action, target, details) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .map_err(err(op))?
            .execute(params![
                record.id,
                at,
                record.actor,
                record.action,
                record.target,
                json_text(&record.details)
            ])
            .map_err(err(op))?;
            Ok(())
        })
        .await
    }

    async fn list_audit(&self, limit: u32) -> Result<Vec<AuditRecord>, StoreError> {
        self.read(move |conn| {
            query_all(
                conn,
                "listing the audit trail",
                "SELECT id, at, actor, action, target, details FROM audit \
                 ORDER BY seq DESC LIMIT ?1",
                &[limit.into()],
                audit_from_row,
            )
        })
        .await
    }

    async fn set_rule_enabled(&self, rule: &str, enabled: bool) -> Result<(), StoreError> {
        let rule = rule.to_string();
        let now = to_ns(Utc::now(), "current time")?;
        self.write(move |conn| {
            let op = "storing a rule override";
            conn.prepare_cached(
                "INSERT INTO rule_overrides (rule, enabled, updated_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (rule) DO UPDATE SET enabled = excluded.enabled, \
                 updated_at = excluded.updated_at",
            )
            .map_err(err(op))?
            .execute(params![rule, enabled, now])
            .map_err(err(op))?;
            Ok(())
        })
        .await
    }

    async fn rule_overrides(&self) -> Result<HashMap<String, bool>, StoreError> {
        self.read(|conn| {
            let rows = query_all(
                conn,
                "reading rule overrides",
                "SELECT rule, enabled FROM rule_overrides",
                &[],
                |r| {
                    let c = || corrupt("rule override");
                    Ok((
                        r.get::<_, String>(0).map_err(c())?,
                        r.get::<_, bool>(1).map_err(c())?,
                    ))
                },
            )?;
            Ok(rows.into_iter().collect())
        })
        .await
    }

    async fn get_timer_fired(&self, key: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        let key = key.to_string();
        self.read(move |conn| {
            Ok(query_all(
                conn,
                "reading timer state",
                "SELECT fired_at FROM timers WHERE key = ?1",
                &[SqlValue::Text(key)],
                |r| Ok(from_ns(r.get(0).map_err(corrupt("timer state"))?)),
            )?
            .pop())
        })
        .await
    }

    async fn set_timer_fired(&self, key: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        let key = key.to_string();
        let at = to_ns(at, "timer fire time")?;
        self.write(move |conn| {
            let op = "storing timer state";
            conn.prepare_cached(
                "INSERT INTO timers (key, fired_at) VALUES (?1, ?2) \
                 ON CONFLICT (key) DO UPDATE SET fired_at = excluded.fired_at",
            )
            .map_err(err(op))?
            .execute(params![key, at])
            .map_err(err(op))?;
            Ok(())
        })
        .await
    }
}

/// The conditional status change of [`Store::transition_execution`], on the
/// writer's connection. `from` must be sorted and deduplicated.
fn transition_in(
    conn: &Connection,
    id: &str,
    from: &[ExecutionStatus],
    to: ExecutionStatus,
    result: Option<&serde_json::Value>,
    at: i64,
) -> Result<bool, StoreError> {
    let mut args: Vec<SqlValue> = vec![
        text(to.as_str()),
        i64::from(to == ExecutionStatus::Running).into(),
        at.into(),
        i64::from(to.is_terminal()).into(),
        result.map(json_text).into(),
        SqlValue::Text(id.to_string()),
    ];
    let mut placeholders = Vec::new();
    for s in from {
        args.push(text(s.as_str()));
        placeholders.push(format!("?{}", args.len()));
    }
    let sql = format!(
        "UPDATE executions SET status = ?1, \
         started_at = CASE WHEN ?2 THEN ?3 ELSE started_at END, \
         finished_at = CASE WHEN ?4 THEN ?3 ELSE finished_at END, \
         result = COALESCE(?5, result) \
         WHERE id = ?6 AND status IN ({})",
        placeholders.join(", ")
    );
    let op = "changing an execution's status";
    let n = conn
        .prepare_cached(&sql)
        .map_err(err(op))?
        .execute(params_from_iter(args.iter()))
        .map_err(err(op))?;
    Ok(n > 0)
}
