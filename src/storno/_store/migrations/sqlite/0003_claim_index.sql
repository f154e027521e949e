-- Claiming reads due runs by status: pending ones oldest first. Without this index the claim
-- walked every run of a saga, finished ones included, and slowed with the history's size.
CREATE INDEX storno_runs_by_status_created ON storno_runs (status, created_at);
