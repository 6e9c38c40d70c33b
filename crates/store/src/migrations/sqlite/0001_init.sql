-- Aviary schema version 1 (SQLite).
-- Times are INTEGER nanoseconds since the Unix epoch (UTC); JSON is TEXT.
-- `seq` columns give insertion order ("newest first" lists).

CREATE TABLE trigger_instances (
    seq             INTEGER PRIMARY KEY,
    id              TEXT    NOT NULL UNIQUE,
    trigger         TEXT    NOT NULL,
    payload         TEXT    NOT NULL,
    occurrence_time INTEGER NOT NULL,
    dedup_key       TEXT    UNIQUE,
    status          TEXT    NOT NULL
);
CREATE INDEX trigger_instances_trigger ON trigger_instances (trigger, seq);

CREATE TABLE enforcements (
    seq                 INTEGER PRIMARY KEY,
    id                  TEXT    NOT NULL UNIQUE,
    trigger_instance_id TEXT    NOT NULL,
    rule                TEXT    NOT NULL,
    execution_id        TEXT,
    failure_reason      TEXT,
    enforced_at         INTEGER NOT NULL
);
CREATE INDEX enforcements_trigger_instance ON enforcements (trigger_instance_id);
CREATE INDEX enforcements_rule ON enforcements (rule, seq);

CREATE TABLE executions (
    seq                 INTEGER PRIMARY KEY,
    id                  TEXT    NOT NULL UNIQUE,
    action              TEXT    NOT NULL,
    runner              TEXT    NOT NULL,
    parameters          TEXT    NOT NULL,
    status              TEXT    NOT NULL,
    result              TEXT    NOT NULL,
    trigger_instance_id TEXT,
    rule                TEXT,
    enforcement_id      TEXT,
    parent_id           TEXT,
    requested_by        TEXT    NOT NULL,
    created_at          INTEGER NOT NULL,
    started_at          INTEGER,
    finished_at         INTEGER,
    timeout_secs        INTEGER NOT NULL,
    node                TEXT,
    secrets             TEXT
);
-- The durable queue: oldest `requested` first.
CREATE INDEX executions_queue ON executions (status, created_at, seq);
CREATE INDEX executions_action ON executions (action, seq);
CREATE INDEX executions_rule ON executions (rule, seq) WHERE rule IS NOT NULL;
CREATE INDEX executions_trigger_instance ON executions (trigger_instance_id) WHERE trigger_instance_id IS NOT NULL;
CREATE INDEX executions_parent ON executions (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX executions_node ON executions (node, status) WHERE node IS NOT NULL;

CREATE TABLE execution_output (
    execution_id TEXT    NOT NULL,
    seq          INTEGER NOT NULL,
    stream       TEXT    NOT NULL,
    data         TEXT    NOT NULL,
    at           INTEGER NOT NULL,
    PRIMARY KEY (execution_id, seq)
) WITHOUT ROWID;

CREATE TABLE kv (
    scope      TEXT    NOT NULL,
    name       TEXT    NOT NULL,
    value      TEXT    NOT NULL,
    secret     INTEGER NOT NULL,
    expire_at  INTEGER,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (scope, name)
) WITHOUT ROWID;
CREATE INDEX kv_expire ON kv (expire_at) WHERE expire_at IS NOT NULL;

CREATE TABLE api_tokens (
    seq          INTEGER PRIMARY KEY,
    id           TEXT    NOT NULL UNIQUE,
    name         TEXT    NOT NULL,
    hash         TEXT    NOT NULL UNIQUE,
    role         TEXT    NOT NULL,
    created_at   INTEGER NOT NULL,
    revoked_at   INTEGER,
    last_used_at INTEGER
);
-- A name is unique among tokens that are not revoked.
CREATE UNIQUE INDEX api_tokens_active_name ON api_tokens (name) WHERE revoked_at IS NULL;

CREATE TABLE audit (
    seq     INTEGER PRIMARY KEY,
    id      TEXT    NOT NULL UNIQUE,
    at      INTEGER NOT NULL,
    actor   TEXT    NOT NULL,
    action  TEXT    NOT NULL,
    target  TEXT    NOT NULL,
    details TEXT    NOT NULL
);

CREATE TABLE rule_overrides (
    rule       TEXT    PRIMARY KEY,
    enabled    INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE timers (
    key      TEXT    PRIMARY KEY,
    fired_at INTEGER NOT NULL
) WITHOUT ROWID;
