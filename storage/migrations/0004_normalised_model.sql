-- The normalised model every source maps onto: a message keeps the vendor's own role beside the
-- normalised one (system | user | assistant | tool), and a conversation keeps how it ended, what the
-- vendor's analysis said, and 'failed' for a call that never connected.

ALTER TABLE messages ADD COLUMN vendor_role TEXT;  -- the role as the vendor wrote it, where it differs

-- A CHECK constraint cannot be altered in place: the table is rebuilt (SQLite's documented procedure;
-- the migration runner turns foreign keys off around it, so dropping the old table cascades nothing).
CREATE TABLE conversations_normalised (
    id                  TEXT PRIMARY KEY,       -- the vendor's conversation or call id
    source              TEXT NOT NULL,          -- a source of the registry ('tavus', 'api', 'vapi', ...)
    status              TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'ended', 'failed')),
    replica_id          TEXT,
    shutdown_reason     TEXT,
    started_at          REAL,                   -- Unix seconds
    ended_at            REAL,
    message_count       INTEGER NOT NULL DEFAULT 0,
    last_message_at     REAL,
    recording_uri       TEXT,                   -- storage_uri, s3://bucket/key, or the vendor's recording URL
    recording_provider  TEXT,
    recording_duration  REAL,
    recording_error     TEXT,
    perception_analysis TEXT,
    perception_unavailable_reason TEXT,
    created_at          REAL NOT NULL,
    updated_at          REAL NOT NULL,
    end_reason          TEXT,                   -- the vendor's reason the call ended (or failed)
    analysis            TEXT                    -- the vendor's analysis (summary, success, data) as JSON
);

INSERT INTO conversations_normalised (
    id, source, status, replica_id, shutdown_reason, started_at, ended_at, message_count, last_message_at,
    recording_uri, recording_provider, recording_duration, recording_error, perception_analysis,
    perception_unavailable_reason, created_at, updated_at
)
SELECT
    id, source, status, replica_id, shutdown_reason, started_at, ended_at, message_count, last_message_at,
    recording_uri, recording_provider, recording_duration, recording_error, perception_analysis,
    perception_unavailable_reason, created_at, updated_at
FROM conversations;

DROP TABLE conversations;

ALTER TABLE conversations_normalised RENAME TO conversations;

CREATE INDEX conversations_by_activity ON conversations (updated_at DESC, id DESC);
