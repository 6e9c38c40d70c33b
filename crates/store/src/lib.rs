//! Aviary's storage: one [`Store`] interface with two backends.
//!
//! - **SQLite** (embedded, the default): WAL journal, `synchronous=FULL` (an
//!   acknowledged write is on disk), one writer thread doing group commit and
//!   a small pool of read-only connections. See [`sqlite`].
//! - **PostgreSQL** (shared by several servers): an `sqlx` pool; the execution
//!   queue is claimed with `FOR UPDATE SKIP LOCKED`. See [`postgres`].
//!
//! [`open`] picks the backend from a URL and runs the versioned migrations
//! (`schema_migrations` table, SQL files under `src/migrations/`).
//!
//! Storage conventions (both backends): times are stored as signed 64-bit
//! nanoseconds since the Unix epoch, so they round-trip exactly (years
//! 1677..2262); JSON is stored as TEXT (SQLite) or JSONB (PostgreSQL).

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use aviary_core::model::{
    ApiToken, AuditRecord, Enforcement, Execution, ExecutionStatus, KeyValue, KvScope,
    TriggerInstance,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use deploy::DeployStore;

mod common;
pub mod deploy;
pub mod postgres;
pub mod sqlite;

/// Errors of the storage layer. Messages say what failed, where, and what to do.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store URL could not be understood.
    #[error(
        "invalid store URL `{url}`: {reason}; use `sqlite:/path/to/aviary.db`, a file path, or `postgres://user@host:5432/db[?schema=name]`"
    )]
    InvalidUrl {
        /// The URL as given (password redacted).
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The SQLite database file could not be opened or configured.
    #[error(
        "cannot open SQLite database {path}: {message}; check that its directory exists and is writable"
    )]
    SqliteOpen {
        /// Database path.
        path: String,
        /// Underlying error.
        message: String,
    },
    /// PostgreSQL could not be reached.
    #[error(
        "cannot connect to PostgreSQL at {url}: {message}; is it running and reachable, and are the credentials and database name right?"
    )]
    PgConnect {
        /// The URL (password redacted).
        url: String,
        /// Underlying error.
        message: String,
    },
    /// A schema migration failed; nothing of that migration was applied.
    #[error(
        "{backend} schema migration {version} ({name}) failed: {message}; fix the cause and restart (the migration is retried on open)"
    )]
    Migration {
        /// `sqlite` or `postgres`.
        backend: &'static str,
        /// Migration version.
        version: i64,
        /// Migration name.
        name: String,
        /// Underlying error.
        message: String,
    },
    /// The database was migrated by a newer Aviary.
    #[error(
        "the {backend} database has schema version {found}, newer than this Aviary supports ({supported}); upgrade Aviary or use another database"
    )]
    SchemaTooNew {
        /// `sqlite` or `postgres`.
        backend: &'static str,
        /// Version found in `schema_migrations`.
        found: i64,
        /// Highest version this build knows.
        supported: i64,
    },
    /// A uniqueness rule was violated (an id, a token name or hash already in use).
    #[error(
        "{what} already exists ({detail}); use another name or id, or revoke/delete the existing one"
    )]
    Conflict {
        /// What collided (`API token`, `execution`...).
        what: String,
        /// The database's detail (constraint).
        detail: String,
    },
    /// A value cannot be stored (e.g. a time out of range).
    #[error("cannot store {what}: {reason}")]
    InvalidData {
        /// What value.
        what: String,
        /// Why.
        reason: String,
    },
    /// A stored row could not be decoded.
    #[error(
        "stored {what} is unreadable: {reason}; the database may have been edited by hand or by another program"
    )]
    Corrupt {
        /// What row/column.
        what: String,
        /// Why.
        reason: String,
    },
    /// Any other database error.
    #[error("{backend} database error while {op}: {message}")]
    Database {
        /// `sqlite` or `postgres`.
        backend: &'static str,
        /// The operation (`claiming executions`...).
        op: String,
        /// Underlying error.
        message: String,
    },
    /// The SQLite writer thread is gone (it panicked or the store was shut down).
    #[error(
        "the SQLite writer thread has stopped, so nothing can be written; restart the server and see earlier log lines for the cause"
    )]
    WriterStopped,
}

/// The end of a workflow's child, recorded in the same transaction as the
/// workflow step that applies it (see [`Store::save_workflow_step`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ChildEnd {
    /// The child execution.
    pub id: String,
    /// Statuses it may end from (as in [`Store::transition_execution`]).
    pub from: Vec<ExecutionStatus>,
    /// Its final status.
    pub to: ExecutionStatus,
    /// Its result.
    pub result: serde_json::Value,
    /// When it ended.
    pub at: DateTime<Utc>,
}

/// A new execution with its encrypted secret parameters (opaque ciphertext).
#[derive(Clone, PartialEq)]
pub struct NewExecution {
    /// The execution (parameters with secrets masked).
    pub execution: Execution,
    /// Ciphertext of the secret parameter values, if any.
    pub secrets: Option<String>,
}

impl std::fmt::Debug for NewExecution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewExecution")
            .field("execution", &self.execution)
            .field("secrets", &self.secrets.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Everything one event produces, written in one transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct Ingest {
    /// The event.
    pub trigger_instance: TriggerInstance,
    /// The rules it matched.
    pub enforcements: Vec<Enforcement>,
    /// The executions those rules requested.
    pub executions: Vec<NewExecution>,
}

/// Result of [`Store::ingest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IngestOutcome {
    /// Everything was written.
    Stored,
    /// An event with the same dedup key exists; nothing was written.
    Duplicate {
        /// Id of the trigger instance already stored with that key.
        existing_id: String,
    },
}

/// Filter for [`Store::list_executions`]. All set fields must match.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecutionFilter {
    /// Action reference.
    pub action: Option<String>,
    /// Status.
    pub status: Option<ExecutionStatus>,
    /// Rule reference.
    pub rule: Option<String>,
    /// Trigger instance that caused it.
    pub trigger_instance_id: Option<String>,
    /// Parent execution.
    pub parent_id: Option<String>,
    /// Maximum number of rows (default 50).
    pub limit: u32,
    /// Rows to skip.
    pub offset: u32,
}

impl Default for ExecutionFilter {
    fn default() -> Self {
        Self {
            action: None,
            status: None,
            rule: None,
            trigger_instance_id: None,
            parent_id: None,
            limit: 50,
            offset: 0,
        }
    }
}

/// A piece of an execution's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputChunk {
    /// The execution.
    pub execution_id: String,
    /// Sequence number within the execution (increasing).
    pub seq: i64,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// The text.
    pub data: String,
    /// When it was produced.
    pub at: DateTime<Utc>,
}

/// Aviary's storage interface, shared as `Arc<dyn Store>`.
#[async_trait]
pub trait Store: DeployStore + Send + Sync + 'static {
    /// `"sqlite"` or `"postgres"`.
    fn backend(&self) -> &'static str;

    /// Stores an event, its enforcements and executions in one transaction.
    /// If the trigger instance's `dedup_key` is already stored, nothing is
    /// written and [`IngestOutcome::Duplicate`] is returned.
    async fn ingest(&self, ingest: Ingest) -> Result<IngestOutcome, StoreError>;
    /// One trigger instance by id.
    async fn get_trigger_instance(&self, id: &str) -> Result<Option<TriggerInstance>, StoreError>;
    /// Trigger instances, newest first, optionally of one trigger type.
    async fn list_trigger_instances(
        &self,
        trigger: Option<&str>,
        limit: u32,
        offset: u32,
    ) -> Result<Vec<TriggerInstance>, StoreError>;
    /// Enforcements, newest first, optionally of one trigger instance and/or rule.
    async fn list_enforcements(
        &self,
        trigger_instance_id: Option<&str>,
        rule: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Enforcement>, StoreError>;
    /// Number of stored trigger instances.
    async fn count_trigger_instances(&self) -> Result<u64, StoreError>;

    /// Stores a new execution (normally `requested`).
    async fn create_execution(&self, new: NewExecution) -> Result<(), StoreError>;
    /// Atomically moves up to `limit` oldest `requested` executions to
    /// `scheduled`, setting `node`; returns them (oldest first) with their secrets.
    /// Concurrent claimers never get the same execution.
    async fn claim_executions(
        &self,
        node: &str,
        limit: u32,
    ) -> Result<Vec<NewExecution>, StoreError>;
    /// Conditional transition: only if the current status is in `from`. Sets
    /// `started_at` when `to` is Running, `finished_at` when `to` is terminal;
    /// replaces the result when `result` is Some. Returns whether it changed.
    async fn transition_execution(
        &self,
        id: &str,
        from: &[ExecutionStatus],
        to: ExecutionStatus,
        result: Option<serde_json::Value>,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError>;
    /// One execution by id.
    async fn get_execution(&self, id: &str) -> Result<Option<Execution>, StoreError>;
    /// Executions matching the filter, newest first.
    async fn list_executions(&self, filter: &ExecutionFilter)
    -> Result<Vec<Execution>, StoreError>;
    /// Number of executions, optionally in one status.
    async fn count_executions(&self, status: Option<ExecutionStatus>) -> Result<u64, StoreError>;
    /// At a node's start: its `scheduled` executions go back to `requested`
    /// (they never started, node cleared); its `running`/`canceling` ones become
    /// `abandoned` with an `error` in their result, except `orquesta`
    /// workflows, which stay as they are (they resume from their stored
    /// state). Returns the abandoned ids.
    async fn recover_node(&self, node: &str, at: DateTime<Utc>) -> Result<Vec<String>, StoreError>;

    /// Ids of `orquesta` executions that are `running`, `canceling`,
    /// `pausing` or `paused`,
    /// optionally only those of one node (the workflow resume scan).
    async fn list_running_workflows(&self, node: Option<&str>) -> Result<Vec<String>, StoreError>;
    /// A workflow execution's stored state and its version, if saved.
    async fn load_workflow(
        &self,
        execution_id: &str,
    ) -> Result<Option<(i64, serde_json::Value)>, StoreError>;
    /// Saves a workflow's state and creates its new child executions, in one
    /// transaction. `expected_version` `None` inserts the first state (fails
    /// if one exists); `Some(v)` replaces the state only if its version is
    /// still `v`. The stored version becomes `v + 1` (1 for a new one).
    /// Returns `false`, writing nothing, when the version did not match (the
    /// caller reloads and retries).
    async fn save_workflow(
        &self,
        execution_id: &str,
        expected_version: Option<i64>,
        state: serde_json::Value,
        children: Vec<NewExecution>,
    ) -> Result<bool, StoreError>;

    /// One step of a running workflow in one transaction: ends the child
    /// `ended` (only if its status is still in `ended.from`), replaces the
    /// state (only if its version is still `expected_version`, it becomes
    /// `expected_version + 1`, and the workflow execution is still
    /// `running`) and creates the new children (in the status
    /// they carry: `requested`, or `scheduled`/`running` on the node that
    /// starts them at once). `state` is JSON text (as [`Self::load_workflow`]
    /// returns it parsed). Returns `false`, writing nothing, when either
    /// condition failed.
    async fn save_workflow_step(
        &self,
        execution_id: &str,
        expected_version: i64,
        state: String,
        children: Vec<NewExecution>,
        ended: Option<ChildEnd>,
    ) -> Result<bool, StoreError>;

    /// Appends output chunks. A chunk whose `(execution_id, seq)` is already
    /// stored is ignored (appending is idempotent).
    async fn append_output(&self, chunks: Vec<OutputChunk>) -> Result<(), StoreError>;
    /// Output chunks of an execution with `seq > after_seq`, in `seq` order.
    async fn get_output(
        &self,
        execution_id: &str,
        after_seq: i64,
    ) -> Result<Vec<OutputChunk>, StoreError>;

    /// Deletes the output of these executions (build log retention); the
    /// executions stay. Returns the number of chunks deleted.
    async fn delete_output(&self, execution_ids: &[String]) -> Result<u64, StoreError>;

    /// Creates or replaces a datastore item.
    async fn set_kv(&self, kv: KeyValue) -> Result<(), StoreError>;
    /// A datastore item, unless missing or expired (`expire_at <= now`).
    async fn get_kv(
        &self,
        scope: KvScope,
        name: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<KeyValue>, StoreError>;
    /// Unexpired datastore items, by scope then name; optionally one scope and
    /// names starting with `prefix` (case-sensitive).
    async fn list_kv(
        &self,
        scope: Option<KvScope>,
        prefix: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Vec<KeyValue>, StoreError>;
    /// Deletes a datastore item; returns whether one was stored.
    async fn delete_kv(&self, scope: KvScope, name: &str) -> Result<bool, StoreError>;
    /// Deletes expired items; returns how many.
    async fn purge_expired_kv(&self, now: DateTime<Utc>) -> Result<u64, StoreError>;

    /// Stores a token (hash only). A name already used by a non-revoked token,
    /// or a hash/id already stored, gives [`StoreError::Conflict`].
    async fn insert_token(&self, token: ApiToken) -> Result<(), StoreError>;
    /// The non-revoked token with this hash.
    async fn find_token_by_hash(&self, hash: &str) -> Result<Option<ApiToken>, StoreError>;
    /// All tokens (revoked included), oldest first.
    async fn list_tokens(&self) -> Result<Vec<ApiToken>, StoreError>;
    /// Revokes the non-revoked token with this id or name; returns whether one was.
    async fn revoke_token(&self, id_or_name: &str, at: DateTime<Utc>) -> Result<bool, StoreError>;
    /// Number of non-revoked tokens.
    async fn count_tokens(&self) -> Result<u64, StoreError>;

    /// Appends an audit record.
    async fn append_audit(&self, record: AuditRecord) -> Result<(), StoreError>;
    /// Audit records, newest first.
    async fn list_audit(&self, limit: u32) -> Result<Vec<AuditRecord>, StoreError>;

    /// Records a rule enable/disable override.
    async fn set_rule_enabled(&self, rule: &str, enabled: bool) -> Result<(), StoreError>;
    /// All rule overrides: rule reference -> enabled.
    async fn rule_overrides(&self) -> Result<HashMap<String, bool>, StoreError>;

    /// Last fire time of a timer.
    async fn get_timer_fired(&self, key: &str) -> Result<Option<DateTime<Utc>>, StoreError>;
    /// Records a timer's fire time.
    async fn set_timer_fired(&self, key: &str, at: DateTime<Utc>) -> Result<(), StoreError>;
}

/// Opens a store and runs its migrations.
///
/// - `sqlite:/path/aviary.db`, `sqlite:///abs/path`, `sqlite://rel/path`,
///   `sqlite::memory:` (private in-memory database), or a bare file path -> SQLite.
/// - `postgres://...` or `postgresql://...` -> PostgreSQL. A `schema=<name>`
///   query parameter selects (and creates) a schema via `search_path`.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    let trimmed = url.trim();
    if trimmed.is_empty() {
        return Err(StoreError::InvalidUrl {
            url: String::new(),
            reason: "it is empty".into(),
        });
    }
    if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
        let store = postgres::PgStore::connect(trimmed).await?;
        return Ok(Arc::new(store));
    }
    let path = if let Some(rest) = trimmed.strip_prefix("sqlite:") {
        // sqlite:///abs -> /abs ; sqlite://rel -> rel ; sqlite:/abs -> /abs ; sqlite:rel -> rel
        let rest = rest.strip_prefix("//").unwrap_or(rest);
        // Drop query parameters such as `?mode=rwc` that sqlx-style URLs carry.
        let rest = rest.split('?').next().unwrap_or(rest);
        if rest.is_empty() {
            return Err(StoreError::InvalidUrl {
                url: trimmed.to_string(),
                reason: "no database file path after `sqlite:`".into(),
            });
        }
        rest.to_string()
    } else if let Some((scheme, _)) = trimmed.split_once("://") {
        return Err(StoreError::InvalidUrl {
            url: common::redact_url(trimmed),
            reason: format!("unsupported scheme `{scheme}`"),
        });
    } else {
        trimmed.to_string()
    };
    let store = sqlite::SqliteStore::open(&path).await?;
    Ok(Arc::new(store))
}
