//! The `order_status` handler: fulfillment events drive the order's status. The decision is
//! the pure `rules` module's; this file is the thin SQL around it: lock the order row, fold
//! the fulfillment's status into `order_fulfillments` (highest rank and furthest progress win,
//! so arrival order and duplicates do not matter), and when the rules say so, update the order, append to
//! `order_status_history` and write an `order.status_changed` event to the outbox, all in the
//! inbox transaction.

use super::rules::{
    aggregate_target, decide, CurrentStatus, Decision, FulfillmentState, FulfillmentStatus,
    OrderStatus, StatusMapping,
};
use super::{HandleError, Outcome};
use crate::config::ConsumerConfig;
use crate::db::{quote_ident, quote_qualified};
use crate::envelope::Incoming;
use serde_json::Value;

pub const FULFILLMENT_STATUS_CHANGED: &str = "fulfillment.status_changed";
pub const DELIVERY_CONFIRMED: &str = "delivery.confirmed";
pub const ORDER_STATUS_CHANGED: &str = "order.status_changed";

/// The skip codes of this handler itself (besides the rules').
pub const SKIP_CODES: [&str; 3] = ["own_event", "unhandled_type", "unknown_status"];

#[derive(Debug, Clone)]
pub struct OrderStatusHandler {
    pub(super) mapping: StatusMapping,
    fold_fulfillment: String,
    lock_order: String,
    apply: String,
    /// The set-based statements of `order_batch`.
    pub(super) batch: super::order_batch::BatchStatements,
}

impl OrderStatusHandler {
    pub fn new(config: &ConsumerConfig) -> Result<OrderStatusHandler, String> {
        let mapping = StatusMapping::with_overrides(
            config
                .status_mapping
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        )?;
        let o = &config.orders;
        let orders = quote_qualified(&o.table);
        let id = quote_ident(&o.id_column);
        let status = quote_ident(&o.status_column);
        let updated_at = quote_ident(&o.updated_at_column);
        let outbox = quote_qualified(&config.outbox_table);
        // The fulfillment row is written only if the order exists (`FROM o`), and after the
        // order row is locked, so every writer of an order's state takes the order lock first.
        let fold_fulfillment = format!(
            "WITH o AS (
    SELECT {status}::text AS status FROM {orders} WHERE {id} = $1 FOR UPDATE
), up AS (
    INSERT INTO order_fulfillments AS f
        (order_id, fulfillment_id, status, status_rank, progress_rank, expected_count, last_event_id)
    SELECT $1, $2, $3, $4, $7, $5, $6 FROM o
    ON CONFLICT (order_id, fulfillment_id) DO UPDATE SET
        status = CASE WHEN EXCLUDED.status_rank > f.status_rank THEN EXCLUDED.status ELSE f.status END,
        status_rank = GREATEST(f.status_rank, EXCLUDED.status_rank),
        progress_rank = GREATEST(f.progress_rank, EXCLUDED.progress_rank),
        expected_count = GREATEST(f.expected_count, EXCLUDED.expected_count),
        last_event_id = EXCLUDED.last_event_id,
        updated_at = now()
    RETURNING f.status_rank, f.progress_rank, f.expected_count
), all_f AS (
    SELECT status_rank, progress_rank FROM order_fulfillments WHERE order_id = $1 AND fulfillment_id <> $2
    UNION ALL SELECT status_rank, progress_rank FROM up
)
SELECT (SELECT status FROM o),
       coalesce(array_agg(status_rank), '{{}}')::smallint[],
       coalesce(array_agg(progress_rank), '{{}}')::smallint[],
       GREATEST((SELECT max(expected_count) FROM order_fulfillments
                 WHERE order_id = $1 AND fulfillment_id <> $2),
                (SELECT expected_count FROM up))
FROM all_f"
        );
        let lock_order = format!("SELECT {status}::text FROM {orders} WHERE {id} = $1 FOR UPDATE");
        let apply = format!(
            "WITH u AS (
    UPDATE {orders} SET {status} = $2, {updated_at} = now() WHERE {id} = $1
), h AS (
    INSERT INTO order_status_history (order_id, from_status, to_status, reason, event_id, created_at)
    VALUES ($1, $3, $2, $4, $5, clock_timestamp())
)
INSERT INTO {outbox} (topic, aggregate_id, payload, headers)
VALUES ('{ORDER_STATUS_CHANGED}', $1, jsonb_build_object(
    'event_type', '{ORDER_STATUS_CHANGED}', 'order_id', $1::text, 'old_status', $3::text,
    'new_status', $2::text, 'timestamp', now(), 'reason', $4::text, 'caused_by', $5::text),
    CASE WHEN $6::text IS NULL THEN '{{}}'::jsonb ELSE jsonb_build_object('traceparent', $6::text) END)"
        );
        Ok(OrderStatusHandler {
            mapping,
            fold_fulfillment,
            lock_order,
            apply,
            batch: super::order_batch::BatchStatements::new(config),
        })
    }

    pub async fn handle(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        topic: &str,
        event: &Incoming,
    ) -> Result<Outcome, HandleError> {
        match kind_of(topic, event) {
            Some(FULFILLMENT_STATUS_CHANGED) => {
                object_payload(event)?;
                self.fulfillment_changed(tx, event).await
            }
            Some(DELIVERY_CONFIRMED) => {
                object_payload(event)?;
                self.delivery_confirmed(tx, event).await
            }
            other => Ok(self.not_ours(topic, event, other)),
        }
    }

    /// The outcome of an event this handler does not apply: its own output, or a type it
    /// does not handle.
    pub(super) fn not_ours(&self, topic: &str, event: &Incoming, kind: Option<&str>) -> Outcome {
        match kind {
            Some(_) => Outcome::Skipped {
                code: "own_event",
                reason: "order.status_changed is this handler's own output".into(),
            },
            None => Outcome::Skipped {
                code: "unhandled_type",
                reason: format!(
                    "order_status does not handle events of stream {topic:?} / type {:?}",
                    event.event_type
                ),
            },
        }
    }

    async fn fulfillment_changed(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
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
        let statement = tx
            .prepare_cached(&self.fold_fulfillment)
            .await
            .map_err(|e| HandleError::from_pg("order_status: preparing", e))?;
        let row = tx
            .query_one(
                &statement,
                &[
                    &order_id,
                    &fulfillment_id,
                    &status.as_str(),
                    &status.rank(),
                    &expected,
                    &event.event_id,
                    &FulfillmentState::progress_rank(status),
                ],
            )
            .await
            .map_err(|e| HandleError::from_pg("order_status: recording the fulfillment", e))?;
        let current: Option<String> = row.get(0);
        let Some(current) = current else {
            return Err(order_missing(order_id));
        };
        let ranks: Vec<i16> = row.get(1);
        let progress: Vec<i16> = row.get(2);
        let expected: Option<i32> = row.get(3);
        let fulfillments: Vec<FulfillmentState> = ranks
            .into_iter()
            .zip(progress)
            .filter_map(|(status, furthest)| {
                Some(FulfillmentState {
                    status: FulfillmentStatus::from_rank(status)?,
                    furthest: FulfillmentStatus::from_rank(furthest),
                })
            })
            .collect();
        let expected = expected.and_then(|n| u32::try_from(n).ok());
        let target = aggregate_target(&fulfillments, expected, &self.mapping);
        self.transition(tx, order_id, &current, target, &report.reason(), event)
            .await
    }

    async fn delivery_confirmed(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        event: &Incoming,
    ) -> Result<Outcome, HandleError> {
        let order_id = required_str(&event.data, "order_id")?;
        let statement = tx
            .prepare_cached(&self.lock_order)
            .await
            .map_err(|e| HandleError::from_pg("order_status: preparing", e))?;
        let row = tx
            .query_opt(&statement, &[&order_id])
            .await
            .map_err(|e| HandleError::from_pg("order_status: locking the order", e))?;
        let Some(row) = row else {
            return Err(order_missing(order_id));
        };
        let current: String = row.get(0);
        let reason = delivery_reason(&event.data);
        self.transition(
            tx,
            order_id,
            &current,
            Some(OrderStatus::Delivered),
            &reason,
            event,
        )
        .await
    }

    async fn transition(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        order_id: &str,
        current: &str,
        target: Option<OrderStatus>,
        reason: &str,
        event: &Incoming,
    ) -> Result<Outcome, HandleError> {
        match decide(&CurrentStatus::from_db(current), target) {
            Decision::Skip(skip) => Ok(skipped(order_id, &skip)),
            Decision::Apply { to, .. } => {
                let statement = tx
                    .prepare_cached(&self.apply)
                    .await
                    .map_err(|e| HandleError::from_pg("order_status: preparing", e))?;
                let traceparent = echo_traceparent(event);
                tx.execute(
                    &statement,
                    &[
                        &order_id,
                        &to.as_str(),
                        &current,
                        &reason,
                        &event.event_id,
                        &traceparent,
                    ],
                )
                .await
                .map_err(|e| HandleError::from_pg("order_status: applying the transition", e))?;
                Ok(Outcome::Applied {
                    transition: Some((current.to_string(), to.as_str().to_string())),
                })
            }
        }
    }
}

/// A `fulfillment.status_changed` event's fields, checked (both paths read it the same way).
pub(super) struct FulfillmentReport<'a> {
    pub order_id: &'a str,
    pub fulfillment_id: &'a str,
    pub new_status: &'a str,
    pub status: FulfillmentStatus,
    /// `metadata.fulfillment_count`, when the event says how many fulfillments there are.
    pub expected: Option<i32>,
}

impl<'a> FulfillmentReport<'a> {
    /// The report, or the skip of an unknown status; a malformed payload is an error.
    pub fn read(
        event: &'a Incoming,
    ) -> Result<Result<FulfillmentReport<'a>, Outcome>, HandleError> {
        let order_id = required_str(&event.data, "order_id")?;
        let fulfillment_id = required_str(&event.data, "fulfillment_id")?;
        let new_status = required_str(&event.data, "new_status")?;
        let expected = fulfillment_count(&event.data)?;
        let Some(status) = FulfillmentStatus::parse(new_status) else {
            return Ok(Err(Outcome::Skipped {
                code: "unknown_status",
                reason: format!("unknown fulfillment status {new_status:?}; no change"),
            }));
        };
        Ok(Ok(FulfillmentReport {
            order_id,
            fulfillment_id,
            new_status,
            status,
            expected,
        }))
    }

    /// The reason of the move it causes, as the history records it.
    pub fn reason(&self) -> String {
        format!("fulfillment {} {}", self.fulfillment_id, self.new_status)
    }
}

/// The reason of a move caused by a `delivery.confirmed` event.
pub(super) fn delivery_reason(data: &Value) -> String {
    match data.get("shipment_id").and_then(Value::as_str) {
        Some(s) => format!("delivery confirmed (shipment {s})"),
        None => "delivery confirmed".to_string(),
    }
}

/// An event whose order is not there: retried, it may be committed later.
pub(super) fn order_missing(order_id: &str) -> HandleError {
    HandleError::Retry(format!("order {order_id:?} does not exist (yet)"))
}

/// The outcome of an event the rules leave alone.
pub(super) fn skipped(order_id: &str, skip: &super::rules::SkipReason) -> Outcome {
    Outcome::Skipped {
        code: skip.code(),
        reason: format!("order {order_id}: {skip}"),
    }
}

/// The `traceparent` of the `order.status_changed` event a traced event causes: it continues
/// the incoming trace (same trace ID, a new span).
pub(super) fn echo_traceparent(event: &Incoming) -> Option<String> {
    event
        .traceparent
        .as_deref()
        .and_then(crate::trace::TraceParent::parse)
        .map(|tp| tp.child())
}

/// Which of the handler's event types an event is: by its stream, its CloudEvents `type` or
/// its payload's `event_type`, the first that names one.
pub(super) fn kind_of(topic: &str, event: &Incoming) -> Option<&'static str> {
    [
        Some(topic),
        event.event_type.as_deref(),
        event.data.get("event_type").and_then(Value::as_str),
    ]
    .into_iter()
    .flatten()
    .find_map(|t| {
        [
            FULFILLMENT_STATUS_CHANGED,
            DELIVERY_CONFIRMED,
            ORDER_STATUS_CHANGED,
        ]
        .into_iter()
        .find(|k| *k == t)
    })
}

/// An event the handler applies must carry a JSON object: when it carried text or bytes
/// that are not JSON (Dapr's string `data` or `data_base64`), the reason says so rather
/// than naming the first field missing. (JSON that is not an object still gets "no field".)
pub(super) fn object_payload(event: &Incoming) -> Result<(), HandleError> {
    match &event.data_problem {
        Some(problem) if !event.data.is_object() => Err(HandleError::Permanent(format!(
            "payload is not a JSON object: {problem}"
        ))),
        _ => Ok(()),
    }
}

pub(super) fn required_str<'a>(data: &'a Value, field: &str) -> Result<&'a str, HandleError> {
    match data.get(field) {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 1024 => Ok(s),
        Some(Value::String(s)) if s.is_empty() => Err(HandleError::Permanent(format!(
            "payload field {field:?} is empty"
        ))),
        Some(Value::String(_)) => Err(HandleError::Permanent(format!(
            "payload field {field:?} is longer than 1024 bytes"
        ))),
        Some(other) => Err(HandleError::Permanent(format!(
            "payload field {field:?} must be a string, not {}",
            type_name(other)
        ))),
        None => Err(HandleError::Permanent(format!(
            "payload has no field {field:?}"
        ))),
    }
}

pub(super) fn fulfillment_count(data: &Value) -> Result<Option<i32>, HandleError> {
    let Some(v) = data
        .get("metadata")
        .and_then(|m| m.get("fulfillment_count"))
    else {
        return Ok(None);
    };
    match v.as_u64() {
        Some(n) if (1..=1000).contains(&n) => Ok(i32::try_from(n).ok()),
        _ => Err(HandleError::Permanent(format!(
            "metadata.fulfillment_count must be an integer from 1 to 1000, not {v}"
        ))),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
