-- Erasure leaves a tombstone, so that a late re-delivery of an erased conversation is dropped instead of
-- bringing it back; and a conversation keeps the callback URL's query parameters as its metadata.

CREATE TABLE tombstones (
    conversation_id     TEXT PRIMARY KEY,
    deleted_at          REAL NOT NULL,          -- Unix seconds
    dropped             INTEGER NOT NULL DEFAULT 0,  -- deliveries dropped since (answered 2xx, stored nowhere)
    last_dropped_at     REAL
) WITHOUT ROWID;

-- A JSON object of string values (NULL: none yet), merged key by key across deliveries.
ALTER TABLE conversations ADD COLUMN metadata TEXT;
