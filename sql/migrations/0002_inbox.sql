-- The inbox: one row per (consumer, event ID) applied. Inserted in the same transaction as
-- the handler's effect, so an event ID found here has had its effect exactly once.
CREATE TABLE IF NOT EXISTS {{table}} (
    consumer     text        NOT NULL,
    event_id     text        NOT NULL,
    stream       text        NOT NULL,
    entry_id     text        NOT NULL,
    -- hash of the event's data, to notice the same event ID arriving with another payload
    data_hash    bigint      NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
CREATE INDEX IF NOT EXISTS {{name}}_received_at_idx ON {{table}} (received_at);
