-- The first schema: conversations, their messages, and every accepted webhook body as received.

CREATE TABLE conversations (
    id                  TEXT PRIMARY KEY,       -- the vendor's conversation_id
    source              TEXT NOT NULL,          -- 'tavus' or 'api'
    status              TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'ended')),
    replica_id          TEXT,
    shutdown_reason     TEXT,
    started_at          REAL,                   -- Unix seconds
    ended_at            REAL,
    message_count       INTEGER NOT NULL DEFAULT 0,
    last_message_at     REAL,
    recording_uri       TEXT,                   -- storage_uri, or s3://bucket/key from the old shape
    recording_provider  TEXT,
    recording_duration  REAL,
    recording_error     TEXT,
    perception_analysis TEXT,
    perception_unavailable_reason TEXT,
    created_at          REAL NOT NULL,
    updated_at          REAL NOT NULL
);

CREATE INDEX conversations_by_activity ON conversations (updated_at DESC, id DESC);

-- A rowid table: a transcript's rows arrive together, so they are appended together and stay
-- adjacent on disk; the (conversation_id, source, seq) key below is what makes a re-delivery a no-op.
-- Each source numbers its own positions: a vendor's final transcript and utterances an app forwarded
-- live for the same conversation are two streams, and neither may overwrite or reorder the other.
CREATE TABLE messages (
    id                  INTEGER PRIMARY KEY,
    conversation_id     TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    source              TEXT NOT NULL,          -- 'tavus' (transcript) or 'api' (generic endpoint)
    seq                 INTEGER NOT NULL,       -- position in the source's stream
    role                TEXT NOT NULL,
    content             TEXT NOT NULL,
    timestamp           REAL,                   -- Unix seconds, whichever form the sender used
    seconds_from_start  REAL,
    duration            REAL,
    inference_id        TEXT,
    external_id         TEXT,                   -- the client's id on the generic endpoint
    created_at          REAL NOT NULL,
    UNIQUE (conversation_id, source, seq)
);

-- Partial: transcript entries carry no client id, so this index costs nothing on the Tavus path.
CREATE UNIQUE INDEX messages_by_external_id ON messages (conversation_id, external_id)
    WHERE external_id IS NOT NULL;

CREATE TABLE events (
    id                  INTEGER PRIMARY KEY,
    delivery_key        TEXT NOT NULL UNIQUE,   -- webhook-id header, else a hash of the body
    source              TEXT NOT NULL,
    event_type          TEXT NOT NULL,
    conversation_id     TEXT NOT NULL,
    received_at         REAL NOT NULL,
    body                BLOB NOT NULL           -- the exact bytes received: the log to replay from
);

CREATE INDEX events_by_conversation ON events (conversation_id, id);

-- One row, rewritten by the readiness probe: a real commit, so a full disk or read-only file shows.
CREATE TABLE heartbeat (
    id                  INTEGER PRIMARY KEY CHECK (id = 1),
    at                  REAL NOT NULL
);
