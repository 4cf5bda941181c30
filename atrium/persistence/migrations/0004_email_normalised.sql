-- One normalised email per account (atrium/emails.py: NFKC, case folding, NFKC), computed
-- by the application and enforced here: unique, in NFKC form, no ASCII capitals. Lookups
-- compare it for equality; PostgreSQL's lower() (locale-dependent) no longer decides who
-- is who. `email` keeps the address as it was typed, for display.
ALTER TABLE users ADD COLUMN email_normalised text;

-- ASCII addresses: lower-casing is the whole normalisation, done exactly here. Others get
-- a unique placeholder that migrate.py replaces (Python's case folding is not available
-- in SQL) in this same transaction; two accounts whose addresses now fold alike stop the
-- migration with both ids named, changing nothing.
UPDATE users SET email_normalised = CASE
    WHEN email ~ '^[ -~]*$' THEN lower(btrim(email) COLLATE "C")
    ELSE 'pending-normalisation:' || id::text
END;

ALTER TABLE users ALTER COLUMN email_normalised SET NOT NULL;
ALTER TABLE users ADD CONSTRAINT users_email_normalised_form CHECK (
    email_normalised IS NFKC NORMALIZED
    AND email_normalised = lower(email_normalised COLLATE "C")
);
CREATE UNIQUE INDEX users_email_normalised ON users (email_normalised);
DROP INDEX users_email_lower;
