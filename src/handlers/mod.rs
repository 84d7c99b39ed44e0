//! What an inbox consumer does with an event, inside the inbox transaction: the built-in
//! `order_status` handler (fulfillment-driven order status) and the `sql` handler (a
//! user-supplied PostgreSQL function). A handler returns whether it changed something or
//! skipped with a reason; errors say whether to retry the event or dead-letter it now.

pub mod order_batch;
pub mod order_status;
pub mod rules;
pub mod sql_function;

use crate::envelope::Incoming;
use crate::error::Error;

/// Every `code` an event can be skipped with (`outboxd_order_status_skipped_total{reason}`):
/// the rules' reasons, the `order_status` handler's own, and `expired` (any handler).
pub fn skip_codes() -> impl Iterator<Item = &'static str> {
    rules::SkipReason::CODES
        .into_iter()
        .chain(order_status::SKIP_CODES)
        .chain([EXPIRED])
}

/// The skip code of an event whose CloudEvents `expiration` had passed.
pub const EXPIRED: &str = "expired";

/// What the handler did with an event it accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The effect was applied; `transition` is the order status change, if it was one.
    Applied {
        transition: Option<(String, String)>,
    },
    /// Recorded in the inbox, no effect: `code` is a short label for metrics, `reason` a
    /// sentence for the log.
    Skipped { code: &'static str, reason: String },
}

/// Why a handler could not handle an event.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// The database or the connection: retry the whole batch after a backoff.
    #[error(transparent)]
    Transient(Error),
    /// Might succeed later (the order is not committed yet, the function failed): leave the
    /// entry pending; dead-letter it when its delivery count reaches max_deliveries.
    #[error("{0}")]
    Retry(String),
    /// Can never succeed (malformed payload): dead-letter at once.
    #[error("{0}")]
    Permanent(String),
    /// Not this event's fault: an earlier statement of the batch failed and aborted the
    /// transaction. The event is applied again when the batch is redone.
    #[error("transaction aborted by another event of the batch")]
    Aborted,
}

impl HandleError {
    pub fn from_pg(context: &str, err: tokio_postgres::Error) -> HandleError {
        if err.code() == Some(&tokio_postgres::error::SqlState::IN_FAILED_SQL_TRANSACTION) {
            return HandleError::Aborted;
        }
        if crate::error::postgres_is_transient(&err) {
            HandleError::Transient(Error::pg(context)(err))
        } else {
            HandleError::Retry(format!("{context}: {}", crate::error::chain(&err)))
        }
    }
}

/// One configured handler.
#[derive(Debug, Clone)]
pub enum Handler {
    /// Boxed: it holds its statements, the other variant is a name.
    OrderStatus(Box<order_status::OrderStatusHandler>),
    Sql(sql_function::SqlFunctionHandler),
}

impl Handler {
    /// The key a batch is sorted by before applying, so that concurrent consumers lock the
    /// same rows in the same order (no deadlocks between them).
    pub fn lock_key(&self, event: &Incoming) -> Option<String> {
        match self {
            Handler::OrderStatus(_) => event
                .data
                .get("order_id")
                .and_then(|v| v.as_str())
                .map(str::to_string),
            Handler::Sql(_) => None,
        }
    }

    pub async fn handle(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        topic: &str,
        event: &Incoming,
    ) -> Result<Outcome, HandleError> {
        match self {
            Handler::OrderStatus(h) => h.handle(tx, topic, event).await,
            Handler::Sql(h) => h.handle(tx, event).await,
        }
    }
}
