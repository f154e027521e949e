-- Runs: one row each, the current state derived from the history. Times are Unix seconds.
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
    epoch            BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX storno_runs_by_status ON storno_runs (status, lease_expires_at);
CREATE INDEX storno_runs_by_created ON storno_runs (created_at);
CREATE INDEX storno_runs_by_saga ON storno_runs (saga, created_at);

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
