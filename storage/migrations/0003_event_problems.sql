-- How many problems the answer to each stored delivery named (a 422 whose valid part was stored): 0 for a
-- delivery stored whole. The delivery timeline (GET /conversations/{id}/events) shows "partial" for more.
-- Rows stored before this migration read 0.

ALTER TABLE events ADD COLUMN problems INTEGER NOT NULL DEFAULT 0;
