-- Deliveries the database refused (poison isolation), as on SQLite: kept with their exact raw body, so
-- that once the cause is fixed `transcriptd dead-letters retry` can store them.

CREATE TABLE dead_letters (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_key        text COLLATE "C" NOT NULL,
    source              text COLLATE "C" NOT NULL,
    event_type          text NOT NULL,
    conversation_id     text COLLATE "C" NOT NULL,
    received_at         double precision NOT NULL,  -- Unix seconds, of the latest attempt
    body                bytea NOT NULL,             -- the exact bytes received (may hold secrets: never printed)
    error               text NOT NULL,              -- why the database refused it, the latest time
    failed_at           double precision NOT NULL,  -- Unix seconds, the latest failure
    attempts            bigint NOT NULL DEFAULT 1,
    resolved_at         double precision            -- set once stored by a retry; NULL while unresolved
);

CREATE UNIQUE INDEX dead_letters_unresolved ON dead_letters (delivery_key) WHERE resolved_at IS NULL;
