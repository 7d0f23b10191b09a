-- The transactional outbox (storage/migrations/0006_outbox.sql): one change per conversation per commit, in
-- the same transaction as the data. Positions come from an identity column. Unlike SQLite's single writer,
-- several replicas hand them out before they commit, so position order would not be commit order across
-- conversations: every insert into changes takes an advisory lock held to its commit, which makes
-- positions visible in order (storage/postgres/outbox.py).

CREATE TABLE changes (
    position        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    conversation_id text COLLATE "C" NOT NULL,
    source          text COLLATE "C" NOT NULL,
    status          text,
    kinds           text NOT NULL,
    first_seq       bigint,
    last_seq        bigint,
    committed_at    double precision NOT NULL
);

CREATE INDEX changes_by_conversation ON changes (conversation_id, position);
