-- The version of the newest USER_JOIN/USER_LEAVE stored for each user of a project: the
-- order in which the cluster's presence (Redis) decided them. A presence event decided
-- earlier than the one stored is dropped, so the log never ends on a stale transition
-- (a LEAVE stored after the JOIN that followed it). Written under the project's row lock.
CREATE TABLE presence_versions (
    project_id uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    user_id    uuid NOT NULL,
    version    bigint NOT NULL,
    PRIMARY KEY (project_id, user_id)
);
