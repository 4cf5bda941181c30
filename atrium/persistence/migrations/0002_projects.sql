-- Projects, their members and each project's event log.
CREATE TABLE projects (
    id          uuid PRIMARY KEY,
    name        text NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
    description text CHECK (char_length(description) <= 5000),
    visibility  text NOT NULL DEFAULT 'private' CHECK (visibility IN ('private', 'team')),
    -- The primary owner: the creator while they own it, else the longest-standing owner.
    owner_id    uuid NOT NULL REFERENCES users (id),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    -- Soft delete: the project is gone for every API, its event log stays for audit.
    deleted_at  timestamptz,
    -- The seq of the project's latest event. Bumping it in the writing transaction gives a
    -- gapless per-project sequence and serialises concurrent writers to one project.
    last_seq    bigint NOT NULL DEFAULT 0
);

CREATE TABLE project_members (
    project_id uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role       text NOT NULL CHECK (role IN ('owner', 'collaborator', 'viewer')),
    invited_at timestamptz NOT NULL DEFAULT now(),
    invited_by uuid REFERENCES users (id) ON DELETE SET NULL,
    PRIMARY KEY (project_id, user_id)
);
-- "My projects" starts from the member side.
CREATE INDEX project_members_user ON project_members (user_id, project_id);

CREATE TABLE project_events (
    project_id uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    seq        bigint NOT NULL CHECK (seq > 0),
    type       text NOT NULL,
    actor_id   uuid REFERENCES users (id) ON DELETE SET NULL,
    payload    jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, seq)
);
