//! The `order_status` handler over a whole batch at once: what the per-event path
//! (`order_status.rs`) does one statement at a time, here in a fixed number of set-based
//! statements whatever the batch size. One round trip reads what the batch needs (its orders,
//! locked in ID order, and their fulfillments); the decisions are made in Rust, event by event
//! in stream order per order, by the same pure rules; one round trip writes the fulfillment
//! folds, the orders that change, their history rows and their `order.status_changed` events.
//! An event that cannot be applied (its order does not exist yet, its payload is malformed)
//! changes no state and is reported on its own; the others go ahead.

use super::order_status::{
    delivery_reason, echo_traceparent, kind_of, object_payload, order_missing, required_str,
    skipped, FulfillmentReport, OrderStatusHandler, DELIVERY_CONFIRMED, FULFILLMENT_STATUS_CHANGED,
    ORDER_STATUS_CHANGED,
};
use super::rules::{
    aggregate_target, decide, CurrentStatus, Decision, FulfillmentState, FulfillmentStatus,
    OrderStatus,
};
use super::{HandleError, Outcome};
use crate::db::{quote_ident, quote_qualified};
use crate::envelope::Incoming;
use futures_util::future::{try_join, try_join4};
use std::collections::{BTreeMap, HashMap};

/// The batch path's statements, prepared on one connection.
#[derive(Debug)]
pub struct BatchPrepared {
    lock: tokio_postgres::Statement,
    read: tokio_postgres::Statement,
    fold: tokio_postgres::Statement,
    update: tokio_postgres::Statement,
    history: tokio_postgres::Statement,
    outbox: tokio_postgres::Statement,
}

/// The statements of the batch path, built once per consumer.
#[derive(Debug, Clone)]
pub struct BatchStatements {
    lock_orders: String,
    read_fulfillments: String,
    fold_fulfillments: String,
    update_orders: String,
    insert_history: String,
    insert_outbox: String,
}

impl BatchStatements {
    pub fn new(config: &crate::config::ConsumerConfig) -> BatchStatements {
        let o = &config.orders;
        let orders = quote_qualified(&o.table);
        let id = quote_ident(&o.id_column);
        let status = quote_ident(&o.status_column);
        let updated_at = quote_ident(&o.updated_at_column);
        let outbox = quote_qualified(&config.outbox_table);
        BatchStatements {
            // ID order: two transactions locking overlapping sets of orders cannot deadlock.
            lock_orders: format!(
                "SELECT {id}::text, {status}::text FROM {orders} WHERE {id} = ANY($1) ORDER BY {id} FOR UPDATE"
            ),
            read_fulfillments: "SELECT order_id, fulfillment_id, status_rank, progress_rank, expected_count
FROM order_fulfillments WHERE order_id = ANY($1::text[])"
                .into(),
            // The values are the folds already made under the order locks this transaction
            // holds (every writer of an order's state takes its lock first).
            fold_fulfillments: "INSERT INTO order_fulfillments AS f
    (order_id, fulfillment_id, status, status_rank, progress_rank, expected_count, last_event_id)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int2[], $5::int2[], $6::int4[], $7::text[])
ON CONFLICT (order_id, fulfillment_id) DO UPDATE SET
    status = EXCLUDED.status, status_rank = EXCLUDED.status_rank,
    progress_rank = EXCLUDED.progress_rank, expected_count = EXCLUDED.expected_count,
    last_event_id = EXCLUDED.last_event_id, updated_at = now()"
                .into(),
            update_orders: format!(
                "UPDATE {orders} AS o SET {status} = u.status, {updated_at} = now()
FROM unnest($1::text[], $2::text[]) AS u(id, status) WHERE o.{id} = u.id"
            ),
            // WITH ORDINALITY ... ORDER BY: ids are given in the order the moves were made.
            insert_history: "INSERT INTO order_status_history (order_id, from_status, to_status, reason, event_id, created_at)
SELECT o, f, t, r, e, clock_timestamp()
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) WITH ORDINALITY AS h(o, f, t, r, e, n)
ORDER BY n"
                .into(),
            insert_outbox: format!(
                "INSERT INTO {outbox} (topic, aggregate_id, payload, headers)
SELECT '{ORDER_STATUS_CHANGED}', o, jsonb_build_object(
    'event_type', '{ORDER_STATUS_CHANGED}', 'order_id', o, 'old_status', f,
    'new_status', t, 'timestamp', now(), 'reason', r, 'caused_by', e),
    CASE WHEN tp IS NULL THEN '{{}}'::jsonb ELSE jsonb_build_object('traceparent', tp) END
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
    WITH ORDINALITY AS x(o, f, t, r, e, tp, n)
ORDER BY n"
            ),
        }
    }
}

/// The columns of the fulfillment folds, one entry per fulfillment the batch folded.
#[derive(Default)]
struct FoldColumns<'a> {
    order_ids: Vec<&'a str>,
    fulfillment_ids: Vec<&'a str>,
    statuses: Vec<&'static str>,
    ranks: Vec<i16>,
    progress: Vec<i16>,
    expected: Vec<Option<i32>>,
    last_event_ids: Vec<&'a str>,
}

/// One fulfillment of an order as the batch has it: read, then folded by its events.
#[derive(Debug, Clone, PartialEq)]
struct Fulfillment {
    state: FulfillmentState,
    expected: Option<i32>,
    last_event_id: String,
    /// Folded in this batch: to be written.
    touched: bool,
}

/// An order as the batch has it.
#[derive(Debug, Clone, PartialEq)]
struct Order {
    /// Status as read, then as moved by this batch.
    status: String,
    read_status: String,
    /// By fulfillment ID (sorted: the rules see them in a stable order).
    fulfillments: BTreeMap<String, Fulfillment>,
}

/// A move decided by the batch, written as history and as an `order.status_changed` event.
#[derive(Debug, Clone, PartialEq)]
pub struct Move {
    pub order_id: String,
    pub from: String,
    pub to: String,
    pub reason: String,
    pub event_id: String,
    pub traceparent: Option<String>,
}

/// The orders of a batch, locked and read, and what its events did to them.
#[derive(Debug, Default)]
pub struct Orders {
    orders: HashMap<String, Order>,
    moves: Vec<Move>,
}

impl Orders {
    /// From the rows read: (order ID, status) and (order ID, fulfillment ID, status rank,
    /// progress rank, expected count).
    fn from_rows(
        statuses: impl IntoIterator<Item = (String, String)>,
        fulfillments: impl IntoIterator<Item = (String, String, i16, i16, Option<i32>)>,
    ) -> Orders {
        let mut orders: HashMap<String, Order> = statuses
            .into_iter()
            .map(|(id, status)| {
                (
                    id,
                    Order {
                        read_status: status.clone(),
                        status,
                        fulfillments: BTreeMap::new(),
                    },
                )
            })
            .collect();
        for (order_id, fulfillment_id, rank, progress, expected) in fulfillments {
            let (Some(order), Some(status)) = (
                orders.get_mut(&order_id),
                FulfillmentStatus::from_rank(rank),
            ) else {
                continue;
            };
            order.fulfillments.insert(
                fulfillment_id,
                Fulfillment {
                    state: FulfillmentState {
                        status,
                        furthest: FulfillmentStatus::from_rank(progress),
                    },
                    expected,
                    last_event_id: String::new(),
                    touched: false,
                },
            );
        }
        Orders {
            orders,
            moves: Vec::new(),
        }
    }

    pub fn moves(&self) -> &[Move] {
        &self.moves
    }
}

impl OrderStatusHandler {
    /// The batch path's statements, prepared (a round trip the first time on a connection,
    /// cached after), so that the pipelines that use them send every statement at once.
    pub async fn prepare_batch(
        &self,
        client: &deadpool_postgres::ClientWrapper,
    ) -> Result<BatchPrepared, tokio_postgres::Error> {
        let sql = &self.batch;
        let ((lock, read), (fold, update, history, outbox)) = try_join(
            try_join(
                client.prepare_cached(&sql.lock_orders),
                client.prepare_cached(&sql.read_fulfillments),
            ),
            try_join4(
                client.prepare_cached(&sql.fold_fulfillments),
                client.prepare_cached(&sql.update_orders),
                client.prepare_cached(&sql.insert_history),
                client.prepare_cached(&sql.insert_outbox),
            ),
        )
        .await?;
        Ok(BatchPrepared {
            lock,
            read,
            fold,
            update,
            history,
            outbox,
        })
    }

    /// Locks the orders of a batch (in ID order) and reads them and their fulfillments. The
    /// two are sent at once, the lock first (each query is sent when its future is first
    /// polled, and these are polled in order); PostgreSQL runs the read once the locks are
    /// granted.
    pub async fn read_orders(
        &self,
        client: &tokio_postgres::Client,
        statements: &BatchPrepared,
        order_ids: &[&str],
    ) -> Result<Orders, tokio_postgres::Error> {
        let (statuses, fulfillments) = try_join(
            client.query(&statements.lock, &[&order_ids]),
            client.query(&statements.read, &[&order_ids]),
        )
        .await?;
        Ok(Orders::from_rows(
            statuses.iter().map(|r| (r.get(0), r.get(1))),
            fulfillments
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))),
        ))
    }

    /// What one event of the batch does to the orders read, decided as the per-event path
    /// would have decided it after the events before it: the same outcome, or the same error
    /// (then it changed nothing).
    pub fn decide_in_batch(
        &self,
        orders: &mut Orders,
        topic: &str,
        event: &Incoming,
    ) -> Result<Outcome, HandleError> {
        match kind_of(topic, event) {
            Some(FULFILLMENT_STATUS_CHANGED) => {
                object_payload(event)?;
                self.fulfillment_in_batch(orders, event)
            }
            Some(DELIVERY_CONFIRMED) => {
                object_payload(event)?;
                let order_id = required_str(&event.data, "order_id")?;
                let order = orders
                    .orders
                    .get(order_id)
                    .ok_or_else(|| order_missing(order_id))?;
                let current = order.status.clone();
                let reason = delivery_reason(&event.data);
                Ok(orders.transition(
                    order_id,
                    &current,
                    Some(OrderStatus::Delivered),
                    reason,
                    event,
                ))
            }
            other => Ok(self.not_ours(topic, event, other)),
        }
    }

    fn fulfillment_in_batch(
        &self,
        orders: &mut Orders,
        event: &Incoming,
    ) -> Result<Outcome, HandleError> {
        let report = match FulfillmentReport::read(event)? {
            Ok(report) => report,
            Err(skipped) => return Ok(skipped),
        };
        let FulfillmentReport {
            order_id,
            fulfillment_id,
            status,
            expected,
            ..
        } = report;
        let order = orders
            .orders
            .get_mut(order_id)
            .ok_or_else(|| order_missing(order_id))?;
        let folded = match order.fulfillments.get(fulfillment_id) {
            Some(f) => Fulfillment {
                state: f.state.fold(status),
                expected: f.expected.max(expected),
                last_event_id: event.event_id.clone(),
                touched: true,
            },
            None => Fulfillment {
                state: FulfillmentState::of(status),
                expected,
                last_event_id: event.event_id.clone(),
                touched: true,
            },
        };
        order
            .fulfillments
            .insert(fulfillment_id.to_string(), folded);
        let states: Vec<FulfillmentState> = order.fulfillments.values().map(|f| f.state).collect();
        let expected = order
            .fulfillments
            .values()
            .filter_map(|f| f.expected)
            .max()
            .and_then(|n| u32::try_from(n).ok());
        let target = aggregate_target(&states, expected, &self.mapping);
        let current = order.status.clone();
        Ok(orders.transition(order_id, &current, target, report.reason(), event))
    }

    /// Writes what the batch decided, in one round trip: the fulfillment folds, the orders
    /// that moved, their history rows and their `order.status_changed` events.
    pub async fn write_orders(
        &self,
        client: &tokio_postgres::Client,
        statements: &BatchPrepared,
        orders: &Orders,
    ) -> Result<(), tokio_postgres::Error> {
        let mut folds = FoldColumns::default();
        let mut updates: (Vec<&str>, Vec<&str>) = Default::default();
        for (order_id, order) in &orders.orders {
            for (fulfillment_id, f) in order.fulfillments.iter().filter(|(_, f)| f.touched) {
                folds.order_ids.push(order_id);
                folds.fulfillment_ids.push(fulfillment_id);
                folds.statuses.push(f.state.status.as_str());
                folds.ranks.push(f.state.status.rank());
                folds
                    .progress
                    .push(f.state.furthest.map_or(-1, FulfillmentStatus::rank));
                folds.expected.push(f.expected);
                folds.last_event_ids.push(&f.last_event_id);
            }
            if order.status != order.read_status {
                updates.0.push(order_id);
                updates.1.push(&order.status);
            }
        }
        let m = &orders.moves;
        let column = |f: fn(&Move) -> &str| m.iter().map(f).collect::<Vec<&str>>();
        let (order_ids, froms, tos, reasons, events) = (
            column(|m| &m.order_id),
            column(|m| &m.from),
            column(|m| &m.to),
            column(|m| &m.reason),
            column(|m| &m.event_id),
        );
        let traces: Vec<Option<&str>> = m.iter().map(|m| m.traceparent.as_deref()).collect();
        let BatchPrepared {
            fold,
            update,
            history,
            outbox,
            ..
        } = statements;
        // No await before every statement is sent: the caller pipelines its COMMIT after.
        let fold_rows = async {
            if folds.order_ids.is_empty() {
                return Ok(0);
            }
            client
                .execute(
                    fold,
                    &[
                        &folds.order_ids,
                        &folds.fulfillment_ids,
                        &folds.statuses,
                        &folds.ranks,
                        &folds.progress,
                        &folds.expected,
                        &folds.last_event_ids,
                    ],
                )
                .await
        };
        let update_rows = async {
            if updates.0.is_empty() {
                return Ok(0);
            }
            client.execute(update, &[&updates.0, &updates.1]).await
        };
        let history_rows = async {
            if m.is_empty() {
                return Ok(0);
            }
            client
                .execute(history, &[&order_ids, &froms, &tos, &reasons, &events])
                .await
        };
        let outbox_rows = async {
            if m.is_empty() {
                return Ok(0);
            }
            client
                .execute(
                    outbox,
                    &[&order_ids, &froms, &tos, &reasons, &events, &traces],
                )
                .await
        };
        try_join4(fold_rows, update_rows, history_rows, outbox_rows).await?;
        Ok(())
    }
}

impl Orders {
    /// Whether `order_id` in `current` moves to `target`, as the rules decide; a move is
    /// made on the batch's copy and remembered for the writes.
    fn transition(
        &mut self,
        order_id: &str,
        current: &str,
        target: Option<OrderStatus>,
        reason: String,
        event: &Incoming,
    ) -> Outcome {
        match decide(&CurrentStatus::from_db(current), target) {
            Decision::Skip(skip) => skipped(order_id, &skip),
            Decision::Apply { to, .. } => {
                if let Some(order) = self.orders.get_mut(order_id) {
                    order.status = to.as_str().to_string();
                }
                self.moves.push(Move {
                    order_id: order_id.to_string(),
                    from: current.to_string(),
                    to: to.as_str().to_string(),
                    reason,
                    event_id: event.event_id.clone(),
                    traceparent: echo_traceparent(event),
                });
                Outcome::Applied {
                    transition: Some((current.to_string(), to.as_str().to_string())),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::decode;

    fn handler() -> OrderStatusHandler {
        let config: crate::config::Config = crate::config::Config::parse(
            r#"
[redis]
url = "redis://127.0.0.1:6379"
[databases.orders]
url = "postgres://root@127.0.0.1/orders"
[[consumers]]
name = "c"
database = "orders"
streams = ["fulfillment.status_changed", "delivery.confirmed"]
handler = "order_status"
"#,
        )
        .expect("config");
        OrderStatusHandler::new(&config.consumers[0]).expect("handler")
    }

    fn event(id: &str, order: &str, fulfillment: &str, status: &str) -> Incoming {
        let text = serde_json::json!({
            "specversion": "1.0", "id": id, "type": FULFILLMENT_STATUS_CHANGED,
            "data": {"order_id": order, "fulfillment_id": fulfillment, "new_status": status},
        })
        .to_string();
        decode(Some(text.as_bytes()), FULFILLMENT_STATUS_CHANGED).expect("decodes")
    }

    fn delivered(id: &str, order: &str) -> Incoming {
        let text = serde_json::json!({
            "specversion": "1.0", "id": id, "type": DELIVERY_CONFIRMED,
            "data": {"order_id": order},
        })
        .to_string();
        decode(Some(text.as_bytes()), DELIVERY_CONFIRMED).expect("decodes")
    }

    #[test]
    fn events_of_one_order_in_one_batch_build_on_each_other() {
        let h = handler();
        let mut orders = Orders::from_rows([("o1".to_string(), "confirmed".to_string())], []);
        let outcomes: Vec<Outcome> = [
            event("e1", "o1", "f1", "picking"),
            event("e2", "o1", "f1", "packed"),
            event("e3", "o1", "f1", "shipped"),
        ]
        .iter()
        .map(|e| {
            h.decide_in_batch(&mut orders, FULFILLMENT_STATUS_CHANGED, e)
                .expect("ok")
        })
        .collect();
        assert!(
            matches!(&outcomes[0], Outcome::Applied { transition: Some((f, t)) } if f == "confirmed" && t == "processing")
        );
        assert!(matches!(
            &outcomes[1],
            Outcome::Skipped {
                code: "already_there",
                ..
            }
        ));
        assert!(
            matches!(&outcomes[2], Outcome::Applied { transition: Some((f, t)) } if f == "processing" && t == "shipped")
        );
        let moves: Vec<(&str, &str)> = orders
            .moves()
            .iter()
            .map(|m| (m.from.as_str(), m.to.as_str()))
            .collect();
        assert_eq!(
            moves,
            vec![("confirmed", "processing"), ("processing", "shipped")]
        );
        let f = &orders.orders["o1"].fulfillments["f1"];
        assert_eq!(f.state.status, FulfillmentStatus::Shipped);
        assert_eq!(f.last_event_id, "e3");
        assert!(f.touched);
    }

    #[test]
    fn a_failing_event_changes_nothing_and_the_rest_go_ahead() {
        let h = handler();
        let mut orders = Orders::from_rows([("o1".to_string(), "confirmed".to_string())], []);
        let missing = h.decide_in_batch(
            &mut orders,
            FULFILLMENT_STATUS_CHANGED,
            &event("m", "nope", "f1", "picking"),
        );
        assert!(
            matches!(missing, Err(HandleError::Retry(ref m)) if m.contains("does not exist")),
            "{missing:?}"
        );
        let malformed = serde_json::json!({"specversion": "1.0", "id": "x", "type": FULFILLMENT_STATUS_CHANGED, "data": {"order_id": "o1"}}).to_string();
        let malformed =
            decode(Some(malformed.as_bytes()), FULFILLMENT_STATUS_CHANGED).expect("decodes");
        assert!(matches!(
            h.decide_in_batch(&mut orders, FULFILLMENT_STATUS_CHANGED, &malformed),
            Err(HandleError::Permanent(_))
        ));
        assert!(orders.moves().is_empty());
        assert!(
            orders.orders["o1"].fulfillments.is_empty(),
            "nothing folded by failures"
        );
        let ok = h
            .decide_in_batch(&mut orders, DELIVERY_CONFIRMED, &delivered("d", "o1"))
            .expect("ok");
        assert!(matches!(ok, Outcome::Applied { .. }), "{ok:?}");
    }

    #[test]
    fn the_batch_decides_what_the_rules_decide_whatever_the_order() {
        // Two fulfillments of one order; every arrival order of their events ends the same.
        let h = handler();
        let events = [
            event("a1", "o1", "fa", "picking"),
            event("a2", "o1", "fa", "shipped"),
            event("b1", "o1", "fb", "packed"),
            event("b2", "o1", "fb", "shipped"),
        ];
        let mut finals = std::collections::BTreeSet::new();
        let mut order = [0usize, 1, 2, 3];
        for _ in 0..24 {
            let mut orders = Orders::from_rows([("o1".to_string(), "confirmed".to_string())], []);
            for &i in &order {
                h.decide_in_batch(&mut orders, FULFILLMENT_STATUS_CHANGED, &events[i])
                    .expect("ok");
            }
            finals.insert(orders.orders["o1"].status.clone());
            next_permutation(&mut order);
        }
        assert_eq!(
            finals.into_iter().collect::<Vec<_>>(),
            vec!["shipped".to_string()]
        );
    }

    fn next_permutation(v: &mut [usize]) {
        let Some(i) = (1..v.len()).rev().find(|&i| v[i - 1] < v[i]) else {
            v.reverse();
            return;
        };
        let j = (i..v.len()).rev().find(|&j| v[j] > v[i - 1]).unwrap_or(i);
        v.swap(i - 1, j);
        v[i..].reverse();
    }

    #[test]
    fn fulfillments_read_are_folded_into() {
        let h = handler();
        let mut orders = Orders::from_rows(
            [("o1".to_string(), "processing".to_string())],
            [
                (
                    "o1".to_string(),
                    "fa".to_string(),
                    FulfillmentStatus::Shipped.rank(),
                    FulfillmentStatus::Shipped.rank(),
                    Some(2),
                ),
                (
                    "o1".to_string(),
                    "fb".to_string(),
                    FulfillmentStatus::Picking.rank(),
                    FulfillmentStatus::Picking.rank(),
                    None,
                ),
            ],
        );
        let not_yet = h
            .decide_in_batch(
                &mut orders,
                FULFILLMENT_STATUS_CHANGED,
                &event("b", "o1", "fb", "packed"),
            )
            .expect("ok");
        assert!(matches!(not_yet, Outcome::Skipped { .. }), "{not_yet:?}");
        let shipped = h
            .decide_in_batch(
                &mut orders,
                FULFILLMENT_STATUS_CHANGED,
                &event("c", "o1", "fb", "shipped"),
            )
            .expect("ok");
        assert!(
            matches!(shipped, Outcome::Applied { transition: Some((_, ref t)) } if t == "shipped"),
            "{shipped:?}"
        );
        assert!(
            !orders.orders["o1"].fulfillments["fa"].touched,
            "only what the batch folded is written"
        );
    }
}
