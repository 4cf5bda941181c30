-- Event-log retention finds each project's newest event older than the cutoff by walking
-- this index (seq included: an index-only scan), and deletes by primary key ranges.
CREATE INDEX project_events_created ON project_events (project_id, created_at) INCLUDE (seq);
