-- Durable waits, signals, cancellation and child runs.
ALTER TABLE storno_runs ADD COLUMN wake_at DOUBLE PRECISION;
ALTER TABLE storno_runs ADD COLUMN parent_run_id TEXT;
ALTER TABLE storno_runs ADD COLUMN inbox_seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE storno_runs ADD COLUMN state TEXT;
CREATE INDEX storno_runs_by_wake ON storno_runs (status, wake_at);
CREATE INDEX storno_runs_by_parent ON storno_runs (parent_run_id);

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

CREATE TRIGGER storno_inbox_no_update BEFORE UPDATE ON storno_inbox
    FOR EACH ROW EXECUTE FUNCTION storno_refuse_change('inbox', 'messages');
CREATE TRIGGER storno_inbox_no_delete BEFORE DELETE ON storno_inbox
    FOR EACH ROW EXECUTE FUNCTION storno_refuse_change('inbox', 'messages');
CREATE TRIGGER storno_inbox_no_truncate BEFORE TRUNCATE ON storno_inbox
    FOR EACH STATEMENT EXECUTE FUNCTION storno_refuse_change('inbox', 'messages');
