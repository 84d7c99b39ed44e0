-- The outbox of SPEC section 3, plus the relay's own columns.
-- Template: {{table}} is the quoted table name, {{table_literal}} the same as a SQL string
-- literal, {{name}} the bare table name (used in index and trigger names).
CREATE TABLE IF NOT EXISTS {{table}} (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        uuid        NOT NULL DEFAULT gen_random_uuid(),
    topic           text        NOT NULL,
    aggregate_id    text        NOT NULL,
    payload         jsonb       NOT NULL,
    headers         jsonb       NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- relay bookkeeping: failed publish attempts of this row (Redis rejected it for a
    -- reason of its own), the last such error, and when it was quarantined
    attempts        integer     NOT NULL DEFAULT 0,
    last_error      text,
    last_attempt_at timestamptz,
    quarantined_at  timestamptz,
    CONSTRAINT {{name}}_event_id_key UNIQUE (event_id)
);

-- head-of-aggregate checks walk (aggregate_id, id)
CREATE INDEX IF NOT EXISTS {{name}}_aggregate_id_idx ON {{table}} (aggregate_id, id);
-- quarantined rows are few; this keeps "is an earlier row of my aggregate quarantined?" cheap
CREATE INDEX IF NOT EXISTS {{name}}_quarantined_idx ON {{table}} (aggregate_id, id)
    WHERE quarantined_at IS NOT NULL;

-- Commit-order safety. Before a row gets its id, the inserting transaction takes a shared
-- advisory lock on (outbox oid, hashtext(aggregate_id)), held until it commits or aborts.
-- A relay that sees the lock held leaves that aggregate alone, so a committed later row can
-- never overtake an earlier row of the same aggregate whose transaction is still open.
-- The id is assigned after the lock (not by the column default, which runs before BEFORE
-- triggers), so "lock held" always precedes "id allocated". Past 64 rows in one transaction
-- the transaction takes one table-wide key instead, to bound its use of the lock table; that
-- holds back the whole outbox until it ends.
CREATE OR REPLACE FUNCTION outboxd_outbox_before_insert() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    held integer := coalesce(nullif(current_setting('outboxd.held_keys', true), ''), '0')::integer;
BEGIN
    IF held < 64 THEN
        PERFORM pg_advisory_xact_lock_shared(TG_RELID::integer, hashtext(NEW.aggregate_id));
        PERFORM set_config('outboxd.held_keys', (held + 1)::text, true);
    ELSIF held = 64 THEN
        PERFORM pg_advisory_xact_lock_shared(TG_RELID::bigint);
        PERFORM set_config('outboxd.held_keys', '65', true);
    END IF;
    NEW.id := nextval(TG_ARGV[0]::regclass);
    RETURN NEW;
END
$fn$;

-- One notification per inserting statement (and PostgreSQL folds duplicates per transaction).
CREATE OR REPLACE FUNCTION outboxd_outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_notify('outboxd_' || TG_RELID::text, '');
    RETURN NULL;
END
$fn$;

DO $do$
BEGIN
    EXECUTE format(
        'CREATE OR REPLACE TRIGGER %I BEFORE INSERT ON %s FOR EACH ROW EXECUTE FUNCTION outboxd_outbox_before_insert(%L)',
        '{{name}}_outboxd_order', {{table_literal}}, pg_get_serial_sequence({{table_literal}}, 'id'));
    EXECUTE format(
        'CREATE OR REPLACE TRIGGER %I AFTER INSERT ON %s FOR EACH STATEMENT EXECUTE FUNCTION outboxd_outbox_notify()',
        '{{name}}_outboxd_notify', {{table_literal}});
END
$do$;
