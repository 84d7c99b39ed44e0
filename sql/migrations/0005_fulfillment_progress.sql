-- The furthest forward status each fulfillment reported, kept apart from its highest status
-- (status_rank) so that a cancellation does not erase that work had started: the order's
-- status must not depend on whether "cancelled" arrived before "picking" (rules.rs,
-- FulfillmentState). -1: no forward status reported yet. Rows already cancelled before this
-- migration keep -1: what they reported before is not known any more.
ALTER TABLE order_fulfillments ADD COLUMN IF NOT EXISTS progress_rank smallint NOT NULL DEFAULT -1;
UPDATE order_fulfillments SET progress_rank = status_rank
 WHERE status <> 'cancelled' AND progress_rank = -1;
