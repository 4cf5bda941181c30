-- Who made a live document's latest stored update (REST lists it; atrium/persistence/documents.py
-- sets it in the appending transaction). Kept through compaction, which deletes the updates.
ALTER TABLE documents ADD COLUMN last_edited_by uuid REFERENCES users (id) ON DELETE SET NULL;
