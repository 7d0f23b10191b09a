-- Full-text search over messages (storage.search): an FTS5 index of their text, kept in step with every
-- write, in the same transaction, by the code that writes (storage.search_index).

-- External content: the text is stored once, in messages; the index holds only its tokens. Case and
-- accents are folded away, so "reservation" finds "Réservation".
CREATE VIRTUAL TABLE messages_fts USING fts5(
    content,
    content = 'messages',
    content_rowid = 'id',
    tokenize = 'unicode61 remove_diacritics 2'
);

-- The messages not indexed yet: those with next_id <= id <= last_id, while a row is here. The index of
-- an existing database is filled in chunks after this migration (storage.search_index.backfill: at
-- start-up, or `transcriptd search rebuild`), with progress; searches meanwhile say they are partial.
-- disabled = 1: search.enabled is false, the range covers every id and nothing is indexed.
CREATE TABLE search_backfill (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    next_id     INTEGER NOT NULL,
    last_id     INTEGER NOT NULL,
    disabled    INTEGER NOT NULL DEFAULT 0
);

INSERT INTO search_backfill (id, next_id, last_id) SELECT 1, min(id), max(id) FROM messages HAVING count(*) > 0;

-- A message is in the index exactly when no backfill range covers its id: the writes, erasure, retention
-- and the backfill all keep to that (storage.search_index), so nothing is indexed twice or missed. There
-- are no triggers: FTS5 writes its pending terms out at every savepoint, so a trigger per row cost 5x the
-- CPU of one statement per write.
