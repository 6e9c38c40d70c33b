//! The data model shared by every crate: trigger instances, enforcements,
//! executions, datastore items, API tokens and audit records.
//!
//! Times are UTC `chrono::DateTime<Utc>`; identifiers are time-ordered UUIDv7
//! strings so that sorting by id sorts by creation.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A new time-ordered identifier (UUIDv7, hyphenated lowercase).
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// The trigger type of webhook events.
pub const WEBHOOK_TRIGGER: &str = "core.st2.webhook";
/// Interval timer trigger type.
pub const INTERVAL_TIMER_TRIGGER: &str = "core.st2.IntervalTimer";
/// Cron timer trigger type.
pub const CRON_TIMER_TRIGGER: &str = "core.st2.CronTimer";
/// Emitted when any execution ends (StackStorm's generic action trigger).
pub const ACTION_TRIGGER: &str = "core.st2.generic.actiontrigger";
/// One-shot date timer trigger type.
pub const DATE_TIMER_TRIGGER: &str = "core.st2.DateTimer";

/// One event, as stored: StackStorm's "trigger instance".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TriggerInstance {
    /// Identifier.
    pub id: String,
    /// Trigger type reference, e.g. `core.st2.webhook`.
    pub trigger: String,
    /// The event data; rules see it as `trigger`.
    pub payload: Value,
    /// When the event happened.
    pub occurrence_time: DateTime<Utc>,
    /// Optional deduplication key (e.g. `github:<X-GitHub-Delivery>`): a second
    /// event with the same key is not stored again.
    pub dedup_key: Option<String>,
    /// Processing status.
    pub status: TriggerInstanceStatus,
}

/// Processing state of a trigger instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TriggerInstanceStatus {
    /// Stored, rules not yet applied.
    Pending,
    /// Rules applied and their enforcements recorded.
    Processed,
    /// Applying rules failed (see enforcements for why).
    ProcessingFailed,
}

impl TriggerInstanceStatus {
    /// Stable lowercase name used in storage and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Processed => "processed",
            Self::ProcessingFailed => "processing_failed",
        }
    }
    /// Parses [`Self::as_str`]'s output.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "processed" => Self::Processed,
            "processing_failed" => Self::ProcessingFailed,
            _ => return None,
        })
    }
}

/// The record of one rule matching one trigger instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Enforcement {
    /// Identifier.
    pub id: String,
    /// The trigger instance that matched.
    pub trigger_instance_id: String,
    /// The rule reference (`pack.name`).
    pub rule: String,
    /// The execution it started, if any.
    pub execution_id: Option<String>,
    /// Why no execution was started (template or parameter error).
    pub failure_reason: Option<String>,
    /// When the rule was applied.
    pub enforced_at: DateTime<Utc>,
}

/// Status of an execution. Terminal states never change again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecutionStatus {
    /// Created, waiting in the durable queue.
    Requested,
    /// Claimed by a worker, about to start.
    Scheduled,
    /// The runner is running it.
    Running,
    /// Finished successfully.
    Succeeded,
    /// Finished with a failure.
    Failed,
    /// Killed because it ran past its timeout.
    Timeout,
    /// Cancel requested, the runner is stopping it.
    Canceling,
    /// Canceled before or while running.
    Canceled,
    /// It was running when its server died; it is not re-run silently.
    Abandoned,
    /// A workflow asked to pause: its running tasks may end, no new one starts.
    Pausing,
    /// A paused workflow (nothing of it runs) until resumed.
    Paused,
    /// Waiting for a human answer (a `core.ask` inquiry).
    Pending,
}

impl ExecutionStatus {
    /// All statuses, in lifecycle order.
    pub const ALL: [ExecutionStatus; 12] = [
        Self::Requested,
        Self::Scheduled,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Timeout,
        Self::Canceling,
        Self::Canceled,
        Self::Abandoned,
        Self::Pausing,
        Self::Paused,
        Self::Pending,
    ];
    /// Stable lowercase name used in storage and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::Scheduled => "scheduled",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Timeout => "timeout",
            Self::Canceling => "canceling",
            Self::Canceled => "canceled",
            Self::Abandoned => "abandoned",
            Self::Pausing => "pausing",
            Self::Paused => "paused",
            Self::Pending => "pending",
        }
    }
    /// Parses [`Self::as_str`]'s output.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
    /// True once the execution can no longer change.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Timeout | Self::Canceled | Self::Abandoned
        )
    }
}

impl std::fmt::Display for ExecutionStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One run of an action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Execution {
    /// Identifier.
    pub id: String,
    /// Action reference (`pack.name`).
    pub action: String,
    /// Runner type that runs it (`local-shell-cmd`, ...).
    pub runner: String,
    /// Parameters as given, with every secret parameter's value replaced by
    /// [`MASK`]. The real secret values are stored encrypted, apart.
    pub parameters: Value,
    /// Current status.
    pub status: ExecutionStatus,
    /// Result: stdout, stderr, exit code, HTTP status, parsed JSON, error...
    pub result: Value,
    /// Trace: the trigger instance that caused it, if any.
    pub trigger_instance_id: Option<String>,
    /// Trace: the rule that caused it, if any.
    pub rule: Option<String>,
    /// Trace: the enforcement that created it, if any.
    pub enforcement_id: Option<String>,
    /// Parent execution (workflows), if any.
    pub parent_id: Option<String>,
    /// Who asked for it: a token name, `rule:<ref>`, `timer:<ref>`...
    pub requested_by: String,
    /// When it was requested.
    pub created_at: DateTime<Utc>,
    /// When a runner started it.
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached a terminal state.
    pub finished_at: Option<DateTime<Utc>>,
    /// Timeout in seconds for the run.
    pub timeout_secs: u64,
    /// Server node that claimed it (for abandoning on that node's restart).
    pub node: Option<String>,
}

/// What replaces a secret value in API output, logs and stored parameters.
pub const MASK: &str = "********";

/// Datastore scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvScope {
    /// Shared by everything: `st2kv.system.<key>`.
    System,
    /// Per user: `st2kv.user.<key>`, stored under `<user>:<key>`.
    User,
}

impl KvScope {
    /// Stable lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
        }
    }
    /// Parses [`Self::as_str`]'s output (also StackStorm's `st2kv.system`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "system" | "st2kv.system" => Some(Self::System),
            "user" | "st2kv.user" => Some(Self::User),
            _ => None,
        }
    }
}

/// One datastore item as stored. For secrets `value` is the ciphertext
/// (see `crate::secret`), never the plain text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyValue {
    /// Scope.
    pub scope: KvScope,
    /// Key name (for the user scope: `<user>:<name>`).
    pub name: String,
    /// Value, or ciphertext when `secret`.
    pub value: String,
    /// Whether `value` is encrypted.
    pub secret: bool,
    /// When it expires, if it has a TTL.
    pub expire_at: Option<DateTime<Utc>>,
    /// Last write.
    pub updated_at: DateTime<Utc>,
}

/// An API token as stored: only a hash of the secret is kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiToken {
    /// Identifier.
    pub id: String,
    /// Human name (`admin`, `ci-bot`...).
    pub name: String,
    /// SHA-256 of the token secret, hex.
    pub hash: String,
    /// Role: `admin` or another name (RBAC comes later).
    pub role: String,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Revocation time; a revoked token authenticates nothing.
    pub revoked_at: Option<DateTime<Utc>>,
    /// Last successful use (best effort).
    pub last_used_at: Option<DateTime<Utc>>,
}

/// One line of the audit trail: who did what to what.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Identifier.
    pub id: String,
    /// When.
    pub at: DateTime<Utc>,
    /// Who: token name, `system`, `rule:<ref>`...
    pub actor: String,
    /// What: `token.create`, `rule.disable`, `key.set`, `execution.cancel`...
    pub action: String,
    /// On what: an id or reference.
    pub target: String,
    /// Details (never secret values).
    pub details: Value,
}
