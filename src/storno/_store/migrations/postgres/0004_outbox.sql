-- Events: the runs a correlation id ties together, and the transactional outbox.
ALTER TABLE storno_runs ADD COLUMN correlation_id TEXT;
CREATE INDEX storno_runs_by_correlation ON storno_runs (correlation_id)
    WHERE correlation_id IS NOT NULL;

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
