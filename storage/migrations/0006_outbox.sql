-- The transactional outbox: every commit that changes a conversation records one change here, in the same
-- transaction as the data, so no change commits without its notification, nor the other way round. The
-- change feed (GET /changes) reads it by position; outbound notifications are sent from it.

CREATE TABLE changes (
    position        INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: a pruned position is never reused
    conversation_id TEXT NOT NULL,
    source          TEXT NOT NULL,
    status          TEXT,             -- the conversation's status after this commit (NULL: erased)
    kinds           TEXT NOT NULL,    -- JSON object, what changed and how much, e.g.
                                      -- {"messages_added": 98, "messages_updated": 2, "status": 1,
                                      --  "recording": 1, "analysis": 1, "erased": 1}
    first_seq       INTEGER,          -- smallest / largest message seq added or updated in this commit
    last_seq        INTEGER,          -- (NULL when no message changed): a receiver that wants the messages reads them
    committed_at    REAL NOT NULL     -- Unix seconds
);

CREATE INDEX changes_by_conversation ON changes (conversation_id, position);
