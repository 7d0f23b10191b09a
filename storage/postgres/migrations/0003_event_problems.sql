-- How many problems the answer to each stored delivery named (a 422 whose valid part was stored).

ALTER TABLE events ADD COLUMN problems integer NOT NULL DEFAULT 0;
