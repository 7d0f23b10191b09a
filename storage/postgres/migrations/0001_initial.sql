-- The first schema, as storage/migrations/0001_initial.sql on SQLite, in PostgreSQL's types: key text
-- COLLATE "C" (byte order, as SQLite compares, so cursors page the same on both backends), Unix seconds as
-- double precision, raw bodies as bytea.

CREATE SEQUENCE conversation_revs;

CREATE TABLE conversations (
    id                  text COLLATE "C" PRIMARY KEY,   -- the vendor's conversation_id
    source              text COLLATE "C" NOT NULL,      -- 'tavus' or 'api'
    status              text NOT NULL DEFAULT 'active' CONSTRAINT conversations_status
                            CHECK (status IN ('active', 'ended')),
    replica_id          text,
    shutdown_reason     text,
    started_at          double precision,               -- Unix seconds
    ended_at            double precision,
    message_count       bigint NOT NULL DEFAULT 0,
    last_message_at     double precision,
    recording_uri       text,
    recording_provider  text,
    recording_duration  double precision,
    recording_error     text,
    perception_analysis text,
    perception_unavailable_reason text,
    created_at          double precision NOT NULL,
    updated_at          double precision NOT NULL,
    -- Set anew by every write transaction that touches the conversation (its first statement, which also
    -- takes the row lock all writers of the conversation queue on): a replica's cached page is served only
    -- while the conversation's rev is the one it was cached at, whichever replica wrote since. Drawn from
    -- one sequence, never reused: a conversation erased and written again never shows a rev it had before.
    rev                 bigint NOT NULL DEFAULT nextval('conversation_revs')
);

CREATE INDEX conversations_by_activity ON conversations (updated_at DESC, id DESC);

-- Each source numbers its own positions: a vendor's final transcript and utterances an app forwarded live
-- for the same conversation are two streams, and neither may overwrite or reorder the other.
CREATE TABLE messages (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    conversation_id     text COLLATE "C" NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    source              text COLLATE "C" NOT NULL,
    seq                 bigint NOT NULL,                -- position in the source's stream
    role                text NOT NULL,
    content             text NOT NULL,
    timestamp           double precision,               -- Unix seconds, whichever form the sender used
    seconds_from_start  double precision,
    duration            double precision,
    inference_id        text,
    external_id         text COLLATE "C",               -- the client's id on the generic endpoint
    created_at          double precision NOT NULL,
    CONSTRAINT messages_position UNIQUE (conversation_id, source, seq)
);

-- Partial: transcript entries carry no client id, so this index costs nothing on the transcript path.
CREATE UNIQUE INDEX messages_by_external_id ON messages (conversation_id, external_id)
    WHERE external_id IS NOT NULL;

-- The unique delivery key is the claim across replicas: INSERT ... ON CONFLICT (delivery_key) DO NOTHING
-- RETURNING delivery_key names the deliveries this transaction stored first.
CREATE TABLE events (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_key        text COLLATE "C" NOT NULL CONSTRAINT events_delivery_key UNIQUE,
    source              text COLLATE "C" NOT NULL,
    event_type          text NOT NULL,
    conversation_id     text COLLATE "C" NOT NULL,
    received_at         double precision NOT NULL,
    body                bytea NOT NULL          -- the exact bytes received: the log to replay from
);

CREATE INDEX events_by_conversation ON events (conversation_id, id);

-- One row per replica, rewritten by its readiness probe: a real commit, so a server that cannot commit
-- (disk full, read-only, failed over) shows, for each replica on its own.
CREATE TABLE heartbeat (
    replica             text COLLATE "C" PRIMARY KEY,
    at                  double precision NOT NULL
);
