-- The size of a job's payload and result as JSON text, kept beside them: listings show
-- these and never read (detoast, parse) the bodies themselves. Recomputed by PostgreSQL
-- only when the body is written (submit, complete, retry), never by progress or leases.
ALTER TABLE jobs
    ADD COLUMN payload_bytes integer GENERATED ALWAYS AS (octet_length(payload::text)) STORED,
    ADD COLUMN result_bytes integer GENERATED ALWAYS AS (octet_length(result::text)) STORED;
