-- Deliveries the database refused (poison isolation): kept with their exact raw body, so that once the
-- cause is fixed `transcriptd dead-letters retry` can store them. The sender was answered 5xx each time.

CREATE TABLE dead_letters (
    id                  INTEGER PRIMARY KEY,
    delivery_key        TEXT NOT NULL,          -- the key the delivery would have been stored under
    source              TEXT NOT NULL,
    event_type          TEXT NOT NULL,
    conversation_id     TEXT NOT NULL,
    received_at         REAL NOT NULL,          -- Unix seconds, of the latest attempt
    body                BLOB NOT NULL,          -- the exact bytes received (may hold secrets: never printed)
    error               TEXT NOT NULL,          -- why the database refused it, the latest time
    failed_at           REAL NOT NULL,          -- Unix seconds, the latest failure
    attempts            INTEGER NOT NULL DEFAULT 1,
    resolved_at         REAL                    -- set once stored by a retry; NULL while unresolved
);

-- At most one unresolved row per delivery (a re-sent delivery bumps its attempts), and the list to work on.
CREATE UNIQUE INDEX dead_letters_unresolved ON dead_letters (delivery_key) WHERE resolved_at IS NULL;
