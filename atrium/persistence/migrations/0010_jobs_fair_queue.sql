-- Fair queues (issue 19): the claim takes the next job of the user with the fewest running
-- jobs, within a per-user running limit; submission keeps a per-user queued limit.
-- A user's waiting jobs in claim order: the claim finds the users with waiting jobs (a
-- skip scan over user_id) and each one's next job; submission counts a user's waiting
-- jobs; position_in_queue reads each user's first few. Replaces 0006's jobs_queue, whose
-- global order (priority, then age) the claim no longer follows.
CREATE INDEX jobs_waiting ON jobs (user_id, priority DESC, seq)
    WHERE status IN ('queued', 'failed');
DROP INDEX jobs_queue;
-- A user's running jobs: counted by every claim (the running limit) and estimate.
CREATE INDEX jobs_running ON jobs (user_id) WHERE status = 'running';
