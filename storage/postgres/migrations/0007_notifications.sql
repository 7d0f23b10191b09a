-- Outbound webhooks (storage/migrations/0007_notifications.sql): per receiver, how far the outbox has been
-- taken in, and each change's sending state. The same tables; on PostgreSQL any replica may take changes
-- in or prune, and the one holding the leader lock sends (storage/postgres/notifications.py, leader.py).

CREATE TABLE notify_cursors (
    receiver    text COLLATE "C" PRIMARY KEY,  -- the URL
    position    bigint NOT NULL                -- the last change taken in for it
);

CREATE TABLE notifications (
    receiver        text COLLATE "C" NOT NULL,
    position        bigint NOT NULL,           -- changes.position: no foreign key, retention prunes both
    conversation_id text COLLATE "C" NOT NULL,
    started_at      double precision NOT NULL,
    attempts        bigint NOT NULL DEFAULT 0,
    next_attempt_at double precision NOT NULL,
    last_status     integer,
    last_error      text,
    delivered_at    double precision,
    failed_at       double precision,
    PRIMARY KEY (receiver, position)
);

CREATE INDEX notifications_pending ON notifications (receiver, conversation_id, position)
    WHERE delivered_at IS NULL AND failed_at IS NULL;
CREATE INDEX notifications_undelivered ON notifications (position) WHERE delivered_at IS NULL;
