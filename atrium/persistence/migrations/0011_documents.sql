-- Live documents: a project's files as Yjs CRDTs (atrium/persistence/documents.py).
-- A document is its latest snapshot (a Yjs update holding everything up to snapshot_seq)
-- plus the updates appended after it; compaction folds updates into a new snapshot.
CREATE TABLE documents (
    id           uuid PRIMARY KEY,
    project_id   uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    path         text NOT NULL CHECK (char_length(path) BETWEEN 1 AND 1024),
    created_by   uuid REFERENCES users (id) ON DELETE SET NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    -- The seq of the document's latest update. Bumping it in the appending transaction
    -- gives a gapless per-document sequence, even with writers in several processes.
    last_seq     bigint NOT NULL DEFAULT 0,
    snapshot     bytea,
    snapshot_seq bigint NOT NULL DEFAULT 0,
    -- Bytes stored for the document: its snapshot plus the updates after it.
    byte_size    bigint NOT NULL DEFAULT 0,
    UNIQUE (project_id, path)
);

CREATE TABLE document_updates (
    document_id uuid NOT NULL REFERENCES documents (id) ON DELETE CASCADE,
    seq         bigint NOT NULL CHECK (seq > 0),
    update      bytea NOT NULL,
    user_id     uuid REFERENCES users (id) ON DELETE SET NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (document_id, seq)
);
