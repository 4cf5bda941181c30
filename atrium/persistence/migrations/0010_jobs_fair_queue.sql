-- Fair queues (issue 19): the claim takes the next job of the user with the fewest running
-- jobs, within a per-user running limit; submission keeps a per-user queued limit.
-- A user's waiting jobs in claim order: the next job of each user running jobs (the
-- claim), a user's waiting jobs counted (submission), a few of each user's first ones and
-- the users with waiting jobs, one probe each (the claim, position_in_queue). 0006's
-- jobs_queue still finds the first due jobs of users running none.
CREATE INDEX jobs_waiting ON jobs (user_id, priority DESC, seq)
    WHERE status IN ('queued', 'failed');
-- The running limit, kept by the database whatever the claimers: a running job holds one
-- of its user's JOB_MAX_RUNNING_PER_USER run slots (0 .. limit - 1), and two running jobs
-- of a user never hold the same one. NULL (no limit) holds none. The index also counts a
-- user's running jobs.
ALTER TABLE jobs ADD COLUMN run_slot smallint;
CREATE UNIQUE INDEX jobs_run_slots ON jobs (user_id, run_slot) WHERE status = 'running';
