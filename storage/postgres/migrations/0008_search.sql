-- Full-text search over messages (storage/migrations/0008_search.sql): PostgreSQL's counterpart of SQLite's
-- FTS5 table is a GIN index over the messages' text as a tsvector, with case and accents folded away as
-- unicode61's remove_diacritics does. CREATE INDEX indexes the messages already stored. PostgreSQL keeps
-- the index in step with every write itself, so nothing needs a backfill range (storage/postgres/search.py
-- runs the queries).

CREATE EXTENSION IF NOT EXISTS unaccent;

-- unaccent() is only STABLE, since its dictionary could change. An index expression must be IMMUTABLE, so
-- this wrapper names the dictionary explicitly and pins it, in whichever schema the extension lives.
DO $$
DECLARE
    home text;
BEGIN
    SELECT n.nspname INTO STRICT home
    FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
    WHERE e.extname = 'unaccent';
    EXECUTE format(
        'CREATE FUNCTION search_document(content text) RETURNS tsvector LANGUAGE sql IMMUTABLE PARALLEL SAFE '
        'RETURN to_tsvector(%L::regconfig, %I.unaccent(%L::regdictionary, translate(content, ''<>'', ''  '')))',
        'simple', home, quote_ident(home) || '.unaccent'
    );
END
$$;

-- translate(): the parser reads "<script>" or "<b>" as an HTML tag and drops it, words and all; FTS5 reads
-- the angle brackets as separators, so they are made spaces here too (and a query's terms go through this
-- same function, so both sides agree).
CREATE INDEX messages_search ON messages USING gin (search_document(content));
