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
    epoch            INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX storno_runs_by_status ON storno_runs (status, lease_expires_at);
CREATE INDEX storno_runs_by_created ON storno_runs (created_at);
CREATE INDEX storno_runs_by_saga ON storno_runs (saga, created_at);

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
