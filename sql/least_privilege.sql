-- Least-privilege roles for outboxd. Run as the owner of the tables, in every database
-- outboxd works on, after `outboxd migrate` (which itself needs the owner: it creates tables,
-- functions and triggers), e.g. `psql -d orders -f sql/least_privilege.sql`. Idempotent; each
-- grant applies only where its table exists (a producer-only database has no inbox). Rename
-- the roles to taste. tests/privileges.rs runs this very file and then the relay and the
-- consumer as these roles.

DO $$
BEGIN
    CREATE ROLE outboxd_relay LOGIN;
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;
DO $$
BEGIN
    CREATE ROLE outboxd_consumer LOGIN;
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;

GRANT USAGE ON SCHEMA public TO outboxd_relay, outboxd_consumer;

DO $$
BEGIN
    -- The relay reads its outbox, counts failed attempts and quarantines (UPDATE), and
    -- deletes what Redis accepted. Its claim also reads pg_locks and calls to_regclass():
    -- both open to every role. Nothing else in the database is visible to it.
    IF to_regclass('outbox') IS NOT NULL THEN
        GRANT SELECT, UPDATE, DELETE ON outbox TO outboxd_relay;
    END IF;
    -- With archive_retention_hours > 0 (replay) published rows move to the archive, which
    -- the relay prunes.
    IF to_regclass('outbox_archive') IS NOT NULL THEN
        GRANT SELECT, INSERT, DELETE ON outbox_archive TO outboxd_relay;
    END IF;

    -- The consumer records event IDs in its inbox (and prunes it), then runs its handler.
    IF to_regclass('inbox') IS NOT NULL THEN
        GRANT SELECT, INSERT, DELETE ON inbox TO outboxd_consumer;
    END IF;
    -- handler = "order_status": the orders it moves, the warehouses it tracks, the history it
    -- writes, and the order.status_changed events it adds to this database's outbox (whose
    -- BEFORE INSERT trigger draws the row id from the outbox's sequence).
    IF to_regclass('orders') IS NOT NULL THEN
        GRANT SELECT, UPDATE ON orders TO outboxd_consumer;
        GRANT SELECT, INSERT, UPDATE ON order_fulfillments TO outboxd_consumer;
        GRANT INSERT ON order_status_history TO outboxd_consumer;
        GRANT INSERT ON outbox TO outboxd_consumer;
        GRANT USAGE ON SEQUENCE outbox_id_seq TO outboxd_consumer;
    END IF;
    -- handler = "sql": instead of the grants on orders above, EXECUTE on the configured
    -- function and whatever it touches (or make the function SECURITY DEFINER):
    --   GRANT EXECUTE ON FUNCTION apply_fulfillment_event(jsonb) TO outboxd_consumer;
END $$;

-- `outboxd status` and the daemon's gauges read backlog figures from the outbox and inbox and
-- the blocking sessions from pg_stat_activity; without pg_read_all_stats (or pg_monitor) the
-- query text of other roles' sessions shows as "<insufficient privilege>":
--   GRANT pg_monitor TO outboxd_relay;
