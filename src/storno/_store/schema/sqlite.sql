-- The whole current SQLite schema, for reading and for checking the migrations: applying
-- migrations/sqlite/*.sql to an empty database must give exactly this (tests compare the
-- catalogs). Change the schema by adding a migration, then bring this file in line.

CREATE TABLE storno_schema (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL);

-- Runs: one row each, the current state derived from the history.
CREATE TABLE storno_runs (
    run_id           TEXT PRIMARY KEY,
    saga             TEXT NOT NULL,
    status           TEXT NOT NULL,
    input            TEXT NOT NULL,
    result           TEXT,
    error            TEXT,
    created_at       REAL NOT NULL,
    updated_at       REAL NOT NULL,
    deadline         REAL,
    owner            TEXT,
    lease_expires_at REAL,
    epoch            INTEGER NOT NULL DEFAULT 0,
    wake_at          REAL,
    parent_run_id    TEXT,
    inbox_seq        INTEGER NOT NULL DEFAULT 0,
    state            TEXT,
    correlation_id   TEXT
);
CREATE INDEX storno_runs_by_status ON storno_runs (status, lease_expires_at);
CREATE INDEX storno_runs_by_created ON storno_runs (created_at);
CREATE INDEX storno_runs_by_saga ON storno_runs (saga, created_at);
CREATE INDEX storno_runs_by_wake ON storno_runs (status, wake_at);
CREATE INDEX storno_runs_by_parent ON storno_runs (parent_run_id);
CREATE INDEX storno_runs_by_correlation ON storno_runs (correlation_id)
    WHERE correlation_id IS NOT NULL;
CREATE INDEX storno_runs_by_status_created ON storno_runs (status, created_at);

-- History: append-only, numbered per run.
CREATE TABLE storno_events (
    run_id   TEXT NOT NULL,
    seq      INTEGER NOT NULL,
    type     TEXT NOT NULL,
    at       REAL NOT NULL,
    position INTEGER,
    data     TEXT NOT NULL,
    payload  TEXT,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;

CREATE TRIGGER storno_events_no_update BEFORE UPDATE ON storno_events
BEGIN
    SELECT RAISE(ABORT, 'storno history is append-only: events cannot be changed');
END;

CREATE TRIGGER storno_events_no_delete BEFORE DELETE ON storno_events
BEGIN
    SELECT RAISE(ABORT, 'storno history is append-only: events cannot be deleted');
END;

-- Inbox: messages for a run from outside its worker (signals, cancel requests, child
-- outcomes), numbered per run. Append-only like the history.
CREATE TABLE storno_inbox (
    run_id     TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    kind       TEXT NOT NULL,
    name       TEXT NOT NULL,
    message_id TEXT,
    payload    TEXT,
    meta       TEXT NOT NULL,
    sent_at    REAL NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX storno_inbox_by_message_id ON storno_inbox (run_id, message_id)
    WHERE message_id IS NOT NULL;

CREATE TRIGGER storno_inbox_no_update BEFORE UPDATE ON storno_inbox
BEGIN
    SELECT RAISE(ABORT, 'storno inbox is append-only: messages cannot be changed');
END;

CREATE TRIGGER storno_inbox_no_delete BEFORE DELETE ON storno_inbox
BEGIN
    SELECT RAISE(ABORT, 'storno inbox is append-only: messages cannot be deleted');
END;

-- The outbox: an event committed with what caused it, sent by a relay once the broker
-- confirms it. Order is kept per key; a dead row blocks its own key only.
CREATE TABLE storno_outbox (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id         TEXT NOT NULL UNIQUE,
    topic            TEXT NOT NULL,
    key              TEXT,
    payload          TEXT NOT NULL,
    headers          TEXT NOT NULL,
    correlation_id   TEXT,
    causation_id     TEXT,
    source           TEXT,
    traceparent      TEXT,
    run_id           TEXT,
    created_at       REAL NOT NULL,
    status           TEXT NOT NULL DEFAULT 'pending',
    attempts         INTEGER NOT NULL DEFAULT 0,
    available_at     REAL NOT NULL,
    owner            TEXT,
    token            TEXT,
    lease_expires_at REAL,
    sent_at          REAL,
    last_error       TEXT
);
CREATE INDEX storno_outbox_by_status ON storno_outbox (status, id);
CREATE INDEX storno_outbox_by_key ON storno_outbox (key, status, id) WHERE key IS NOT NULL;
CREATE INDEX storno_outbox_by_sent ON storno_outbox (sent_at) WHERE sent_at IS NOT NULL;
