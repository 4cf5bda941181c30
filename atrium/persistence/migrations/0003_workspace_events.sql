-- Client-chosen ids on workspace events: a client that resends an edit after a reconnect
-- (it never saw the ACK) gets the stored event back instead of a duplicate.
ALTER TABLE project_events ADD COLUMN client_event_id text;
CREATE UNIQUE INDEX project_events_client_id
    ON project_events (project_id, actor_id, client_event_id)
    WHERE client_event_id IS NOT NULL;
