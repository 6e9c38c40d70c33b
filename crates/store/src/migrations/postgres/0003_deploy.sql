-- Aviary schema version 3 (PostgreSQL): hosts, advertised versions, their
-- history, and deploy locks.

CREATE TABLE hosts (
    name       TEXT   PRIMARY KEY,
    address    TEXT   NOT NULL,
    tags       JSONB  NOT NULL,
    apps       JSONB  NOT NULL,
    last_seen  BIGINT,
    token_id   TEXT,
    created_at BIGINT NOT NULL
);

CREATE TABLE advertised_versions (
    app                TEXT   NOT NULL,
    role               TEXT   NOT NULL,
    canary_version     TEXT,
    production_version TEXT,
    updated_at         BIGINT NOT NULL,
    PRIMARY KEY (app, role)
);

CREATE TABLE version_history (
    seq          BIGSERIAL PRIMARY KEY,
    id           TEXT   NOT NULL UNIQUE,
    app          TEXT   NOT NULL,
    role         TEXT   NOT NULL,
    kind         TEXT   NOT NULL,
    old_version  TEXT,
    new_version  TEXT,
    actor        TEXT   NOT NULL,
    execution_id TEXT,
    at           BIGINT NOT NULL
);
CREATE INDEX version_history_app ON version_history (app, role, seq);

CREATE TABLE deploy_locks (
    app         TEXT   NOT NULL,
    role        TEXT   NOT NULL,
    holder      TEXT   NOT NULL,
    actor       TEXT   NOT NULL,
    acquired_at BIGINT NOT NULL,
    PRIMARY KEY (app, role)
);
