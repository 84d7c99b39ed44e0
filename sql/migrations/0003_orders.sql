-- The order side of the order_status handler. `orders` may be an existing table (its name
-- and columns are configurable); it is created only when missing. A plain
-- INSERT INTO orders (id, status) VALUES (...) works.
CREATE TABLE IF NOT EXISTS {{orders}} (
    {{id}}         text        PRIMARY KEY,
    {{status}}     text        NOT NULL DEFAULT 'pending',
    {{updated_at}} timestamptz NOT NULL DEFAULT now()
);

-- Each fulfillment's highest status seen (by rank), and the fulfillment count its events
-- announced: the order follows the aggregate of these rows, whatever the arrival order.
CREATE TABLE IF NOT EXISTS order_fulfillments (
    order_id        text        NOT NULL,
    fulfillment_id  text        NOT NULL,
    status          text        NOT NULL,
    status_rank     smallint    NOT NULL,
    expected_count  integer,
    last_event_id   text        NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (order_id, fulfillment_id)
);

CREATE TABLE IF NOT EXISTS order_status_history (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id    text        NOT NULL,
    from_status text        NOT NULL,
    to_status   text        NOT NULL,
    reason      text        NOT NULL,
    event_id    text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS order_status_history_order_idx ON order_status_history (order_id, id);
