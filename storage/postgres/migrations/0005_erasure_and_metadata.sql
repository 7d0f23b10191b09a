-- Erasure leaves a tombstone, so that a late re-delivery of an erased conversation is dropped instead of
-- bringing it back; and a conversation keeps the callback URL's query parameters as its metadata.

CREATE TABLE tombstones (
    conversation_id     text COLLATE "C" PRIMARY KEY,
    deleted_at          double precision NOT NULL,
    dropped             bigint NOT NULL DEFAULT 0,
    last_dropped_at     double precision
);

-- A JSON object of string values (NULL: none yet), merged key by key across deliveries. Text, as on
-- SQLite, so both backends hand the same column to the readers.
ALTER TABLE conversations ADD COLUMN metadata text;

-- The metadata of one conversation after a batch's deliveries, in order: ``patches`` is a JSON array of
-- their objects. Each is merged key by key unless the result would hold more than ``max_keys`` (then that
-- delivery's keys are dropped whole), exactly as SQLite's writer applies them one upsert at a time.
CREATE FUNCTION merged_metadata(kept text, patches jsonb, max_keys integer) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    patch jsonb;
    merged jsonb;
BEGIN
    FOR patch IN SELECT value FROM jsonb_array_elements(coalesce(patches, '[]')) LOOP
        IF kept IS NULL THEN
            kept := patch::text;
            CONTINUE;
        END IF;
        merged := kept::jsonb || patch;
        IF (SELECT count(*) FROM jsonb_object_keys(merged)) <= max_keys THEN
            kept := merged::text;
        END IF;
    END LOOP;
    RETURN kept;
END
$$;
