-- Finished jobs by state, then finish time: the metrics count each finished state with an
-- index-only scan, the operator console lists the dead jobs newest first, and retention
-- still finds old finished jobs by (status, completed_at). Replaces 0006's jobs_finished.
DROP INDEX jobs_finished;
CREATE INDEX jobs_finished ON jobs (status, completed_at)
    WHERE status IN ('completed', 'dead', 'cancelled');
