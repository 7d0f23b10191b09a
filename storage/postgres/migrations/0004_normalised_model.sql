-- The normalised model: a message keeps the vendor's own role beside the normalised one, and a
-- conversation keeps how it ended, the vendor's analysis, and 'failed' for a call that never connected.
-- PostgreSQL alters the CHECK constraint in place (SQLite rebuilds the table).

ALTER TABLE messages ADD COLUMN vendor_role text;

ALTER TABLE conversations
    DROP CONSTRAINT conversations_status,
    ADD CONSTRAINT conversations_status CHECK (status IN ('active', 'ended', 'failed')),
    ADD COLUMN end_reason text,
    ADD COLUMN analysis text;
