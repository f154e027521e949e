-- The whole current PostgreSQL schema, for reading and for checking the migrations: applying
-- migrations/postgres/*.sql to an empty schema must give exactly this (tests compare the
-- catalogs). Change the schema by adding a migration, then bring this file in line.
-- Times are Unix seconds (double precision).

CREATE TABLE storno_schema (version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL);

-- Runs: one row each, the current state derived from the history.
CREATE TABLE storno_runs (
    run_id           TEXT PRIMARY KEY,
    saga             TEXT NOT NULL,
    status           TEXT NOT NULL,
    input            TEXT NOT NULL,
    result           TEXT,
    error            TEXT,
    created_at       DOUBLE PRECISION NOT NULL,
    updated_at       DOUBLE PRECISION NOT NULL,
    deadline         DOUBLE PRECISION,
    owner            TEXT,
    lease_expires_at DOUBLE PRECISION,
    epoch            BIGINT NOT NULL DEFAULT 0,
    wake_at          DOUBLE PRECISION,
    parent_run_id    TEXT,
    inbox_seq        INTEGER NOT NULL DEFAULT 0,
    state            TEXT,
    correlation_id   TEXT
);
CREATE INDEX storno_runs_by_status ON storno_runs (status, lease_expires_at);
CREATE INDEX storno_runs_by_created ON storno_runs (created_at);
CREATE INDEX storno_runs_by_saga ON storno_runs (saga, created_at);
CREATE INDEX storno_runs_by_wake ON storno_runs (status, wake_at);
CREATE INDEX storno_runs_by_status_created ON storno_runs (status, created_at);
CREATE INDEX storno_runs_by_parent ON storno_runs (parent_run_id);
CREATE INDEX storno_runs_by_correlation ON storno_runs (correlation_id)
    WHERE correlation_id IS NOT NULL;

-- History: append-only, numbered per run.
CREATE TABLE storno_events (
    run_id   TEXT NOT NULL,
    seq      INTEGER NOT NULL,
    type     TEXT NOT NULL,
    at       DOUBLE PRECISION NOT NULL,
    position INTEGER,
    data     TEXT NOT NULL,
    payload  TEXT,
    PRIMARY KEY (run_id, seq)
);

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
    sent_at    DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (run_id, seq)
);
CREATE UNIQUE INDEX storno_inbox_by_message_id ON storno_inbox (run_id, message_id)
    WHERE message_id IS NOT NULL;

-- The database refuses to change or delete what was recorded. TG_ARGV: what, and its rows.
CREATE FUNCTION storno_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'storno % is append-only: % cannot be %', TG_ARGV[0], TG_ARGV[1],
        CASE TG_OP WHEN 'UPDATE' THEN 'changed' ELSE 'deleted' END;
END
$$;

CREATE TRIGGER storno_events_no_update BEFORE UPDATE ON storno_events
    FOR EACH ROW EXECUTE FUNCTION storno_refuse_change('history', 'events');
CREATE TRIGGER storno_events_no_delete BEFORE DELETE ON storno_events
    FOR EACH ROW EXECUTE FUNCTION storno_refuse_change('history', 'events');
CREATE TRIGGER storno_events_no_truncate BEFORE TRUNCATE ON storno_events
    FOR EACH STATEMENT EXECUTE FUNCTION storno_refuse_change('history', 'events');

CREATE TRIGGER storno_inbox_no_update BEFORE UPDATE ON storno_inbox
    FOR EACH ROW EXECUTE FUNCTION storno_refuse_change('inbox', 'messages');
CREATE TRIGGER storno_inbox_no_delete BEFORE DELETE ON storno_inbox
    FOR EACH ROW EXECUTE FUNCTION storno_refuse_change('inbox', 'messages');
CREATE TRIGGER storno_inbox_no_truncate BEFORE TRUNCATE ON storno_inbox
    FOR EACH STATEMENT EXECUTE FUNCTION storno_refuse_change('inbox', 'messages');

-- The outbox: an event committed with what caused it, sent by a relay once the broker
-- confirms it. Order is kept per key; a dead row blocks its own key only.
CREATE TABLE storno_outbox (
    id               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
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
    created_at       DOUBLE PRECISION NOT NULL,
    status           TEXT NOT NULL DEFAULT 'pending',
    attempts         INTEGER NOT NULL DEFAULT 0,
    available_at     DOUBLE PRECISION NOT NULL,
    owner            TEXT,
    token            TEXT,
    lease_expires_at DOUBLE PRECISION,
    sent_at          DOUBLE PRECISION,
    last_error       TEXT
);
CREATE INDEX storno_outbox_by_status ON storno_outbox (status, id);
CREATE INDEX storno_outbox_by_key ON storno_outbox (key, status, id) WHERE key IS NOT NULL;
CREATE INDEX storno_outbox_by_sent ON storno_outbox (sent_at) WHERE sent_at IS NOT NULL;
-- Rows are updated twice and deleted once each: vacuum and analyze the table early, so the
-- claim's plan sees how many rows wait and dead row versions do not pile up.
ALTER TABLE storno_outbox SET (autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02);
-- A run's row is rewritten a few times in its life (claimed, parked, ended): dead versions in
-- the status indexes slow the claim, so autovacuum visits the runs table early too.
ALTER TABLE storno_runs SET (autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02, autovacuum_vacuum_cost_delay = 0);
