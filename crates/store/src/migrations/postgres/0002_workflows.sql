-- Aviary schema version 2 (PostgreSQL): durable Orquesta workflow state.
-- One row per running (or finished) workflow execution; `version` is bumped
-- on every save so concurrent steppers detect each other (optimistic lock).

CREATE TABLE workflow_states (
    execution_id TEXT   PRIMARY KEY,
    version      BIGINT NOT NULL,
    state        JSONB  NOT NULL,
    updated_at   BIGINT NOT NULL
);
