-- Fair queues (issue 19): the claim takes the next job of the user with the fewest running
-- jobs, within a per-user running limit; submission keeps a per-user queued limit.
-- A user's waiting jobs in claim order: the next job of each user running jobs (the
-- claim), a user's waiting jobs counted (submission), a few of each user's first ones and
-- the users with waiting jobs, one probe each (position_in_queue). 0006's jobs_queue still
-- finds the first due jobs of users running none.
CREATE INDEX jobs_waiting ON jobs (user_id, priority DESC, seq)
    WHERE status IN ('queued', 'failed');
-- A user's running jobs: counted by every claim (the running limit) and position.
CREATE INDEX jobs_running ON jobs (user_id) WHERE status = 'running';
