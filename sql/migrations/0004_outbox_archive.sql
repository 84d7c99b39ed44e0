-- Published outbox rows kept for `outboxd replay` when a relay has archive_retention_hours
-- set: moved here in the transaction that deletes them from the outbox, pruned by the relay
-- once older than the retention. Same template placeholders as 0001_outbox.sql.
CREATE TABLE IF NOT EXISTS {{archive}} (
    id           bigint      PRIMARY KEY,      -- the row's outbox id: replay keeps its order
    event_id     uuid        NOT NULL,
    topic        text        NOT NULL,
    aggregate_id text        NOT NULL,
    payload      jsonb       NOT NULL,
    headers      jsonb       NOT NULL,
    created_at   timestamptz NOT NULL,
    published_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS {{name}}_archive_topic_created_idx ON {{archive}} (topic, created_at);
CREATE INDEX IF NOT EXISTS {{name}}_archive_published_idx ON {{archive}} (published_at);
