-- Background jobs: the row is the durable truth of a job (atrium/persistence/jobs.py).
CREATE TABLE jobs (
    id               uuid PRIMARY KEY,
    -- Submission order: the queue's "age" without ties between jobs submitted at once.
    seq              bigserial NOT NULL,
    user_id          uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    project_id       uuid REFERENCES projects (id) ON DELETE CASCADE,
    task_name        text NOT NULL,
    payload          jsonb NOT NULL,
    priority         smallint NOT NULL CHECK (priority IN (0, 1, 2)),  -- low, normal, high
    status           text NOT NULL CHECK (status IN
                         ('queued', 'running', 'completed', 'failed', 'dead', 'cancelled')),
    timeout_seconds  double precision NOT NULL CHECK (timeout_seconds > 0),
    max_retries      integer NOT NULL CHECK (max_retries >= 0),
    -- Attempts that counted (a job released by a stopping worker does not count one).
    attempt_count    integer NOT NULL DEFAULT 0,
    -- attempt_count when the job was last retried by hand: the retry budget counts from it.
    budget_from      integer NOT NULL DEFAULT 0,
    -- Every attempt: {"n", "started_at", "ended_at", "error", "outcome", "worker"}.
    attempts         jsonb NOT NULL DEFAULT '[]',
    progress         smallint NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
    progress_message text,
    result           jsonb,
    error            text,
    idempotency_key  text,
    cancel_requested boolean NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL,
    started_at       timestamptz,
    completed_at     timestamptz,
    -- A queued or failed job is not claimed before this moment (retry backoff).
    next_attempt_at  timestamptz NOT NULL,
    -- The running attempt's holder: a fresh token per claim fences off a worker whose
    -- lease was taken away (its late writes match nothing).
    lease_token      uuid,
    lease_owner      text,
    lease_expires_at timestamptz,
    UNIQUE (user_id, idempotency_key)
);
-- The claim: highest priority first, then oldest, among the jobs waiting to run.
CREATE INDEX jobs_queue ON jobs (priority DESC, seq) WHERE status IN ('queued', 'failed');
-- The reaper: running jobs by lease expiry.
CREATE INDEX jobs_leases ON jobs (lease_expires_at) WHERE status = 'running';
-- "My jobs", newest first; a project's jobs; retention by finish time.
CREATE INDEX jobs_user ON jobs (user_id, seq DESC);
CREATE INDEX jobs_project ON jobs (project_id, seq DESC) WHERE project_id IS NOT NULL;
CREATE INDEX jobs_finished ON jobs (completed_at)
    WHERE status IN ('completed', 'dead', 'cancelled');
