-- Outbound webhooks (notify.url): per receiver, how far the outbox has been taken in, and each change's
-- sending state. A change is taken in (one row here) once per receiver; it is then pending until it is
-- delivered (a 2xx) or given up (failed, after notify.max_age), and `transcriptd notifications retry`
-- makes a failed one pending again.

CREATE TABLE notify_cursors (
    receiver    TEXT PRIMARY KEY,           -- the URL
    position    INTEGER NOT NULL            -- the last change taken in for it
) WITHOUT ROWID;

CREATE TABLE notifications (
    receiver        TEXT NOT NULL,
    position        INTEGER NOT NULL,       -- changes.position: no foreign key, retention prunes both
    conversation_id TEXT NOT NULL,
    started_at      REAL NOT NULL,          -- taken in, or retried by the operator: notify.max_age counts from it
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_status     INTEGER,                -- the receiver's last HTTP status (NULL: no answer)
    last_error      TEXT,
    delivered_at    REAL,
    failed_at       REAL,
    PRIMARY KEY (receiver, position)
) WITHOUT ROWID;

-- The pending ones, by conversation: the head of each conversation is the only one that may be sent.
CREATE INDEX notifications_pending ON notifications (receiver, conversation_id, position)
    WHERE delivered_at IS NULL AND failed_at IS NULL;
-- Not delivered, by position: the operator's list, and retention's check that nobody still owes a change.
CREATE INDEX notifications_undelivered ON notifications (position) WHERE delivered_at IS NULL;
