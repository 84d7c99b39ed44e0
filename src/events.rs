//! What happens to a batch or an event that is both a log line and a metric, written once:
//! each function here writes the line (its level, message and fields) and moves the metric,
//! so the two can never disagree. Label values are the constants below.

use crate::metrics::metrics;
use std::time::Duration;

/// `kind` of `outboxd_relay_errors_total` and `outboxd_consumer_errors_total`.
pub mod kind {
    /// PostgreSQL or Redis away or refusing for a while: the batch backs off.
    pub const TRANSIENT: &str = "transient";
    /// Redis refused one outbox row for a reason of its own (the key holds another type).
    pub const ROW: &str = "row";
    /// A handler failed for one event; it stays pending and is retried.
    pub const HANDLER: &str = "handler";
}

/// `result` of `outboxd_consumer_events_total`.
pub mod result {
    pub const APPLIED: &str = "applied";
    pub const DUPLICATE: &str = "duplicate";
    pub const SKIPPED: &str = "skipped";
    pub const DEAD_LETTERED: &str = "dead_lettered";
    /// A duplicate event ID whose data differs from the first one applied.
    pub const CONFLICT: &str = "conflict";
}

/// Which event a line is about.
#[derive(Debug, Clone, Copy)]
pub struct EventRef<'a> {
    pub consumer: &'a str,
    pub entry_id: &'a str,
    pub event_id: &'a str,
    pub aggregate_id: &'a str,
    /// The W3C trace ID the event carried, empty when none.
    pub trace_id: &'a str,
}

/// A relay of `database`'s `table` starts: its counters are exported at 0 from the first
/// scrape, so that `increase(...) > 0` sees its first error or quarantined row.
pub fn relay_started(database: &str, table: &str) {
    let m = metrics();
    for kind in [kind::TRANSIENT, kind::ROW] {
        m.relay_errors.with_label_values(&[database, table, kind]);
    }
    m.relay_quarantined.with_label_values(&[database, table]);
    m.relay_active.with_label_values(&[database, table]);
    // 0 until the first refresh (within 5 s) or the loop's first round: the alert rules find
    // every series they use from the first scrape on
    m.outbox_backlog_rows.with_label_values(&[database, table]);
    m.outbox_oldest_age_seconds
        .with_label_values(&[database, table]);
    m.loop_progress_age_seconds
        .with_label_values(&[&crate::watchdog::relay_loop(database, table)]);
}

/// A consumer starts: its counters at 0 (as [`relay_started`]), for its stream keys, and
/// for order moves and skips when its handler moves orders.
pub fn consumer_started(consumer: &str, stream_keys: &[String], moves_orders: bool) {
    let m = metrics();
    for result in [
        result::APPLIED,
        result::DUPLICATE,
        result::SKIPPED,
        result::DEAD_LETTERED,
        result::CONFLICT,
    ] {
        m.consumer_events.with_label_values(&[consumer, result]);
    }
    for kind in [kind::TRANSIENT, kind::HANDLER] {
        m.consumer_errors.with_label_values(&[consumer, kind]);
    }
    for key in stream_keys {
        m.dead_letters.with_label_values(&[consumer, key]);
        // 0 until the first refresh of the gauges (within 5 s), so that the alert rules find
        // the series from the first scrape
        m.consumer_lag.with_label_values(&[consumer, key]);
        m.consumer_pending.with_label_values(&[consumer, key]);
    }
    m.loop_progress_age_seconds
        .with_label_values(&[&crate::watchdog::consumer_loop(consumer)]);
    m.order_skips.with_label_values(&[crate::handlers::EXPIRED]);
    if moves_orders {
        for code in crate::handlers::skip_codes() {
            m.order_skips.with_label_values(&[code]);
        }
        for (from, to) in crate::handlers::rules::possible_transitions() {
            m.order_transitions
                .with_label_values(&[from.as_str(), to.as_str()]);
        }
    }
}

/// A relay batch failed on a server that is away or silent; it backs off for `retry_in`.
pub fn relay_batch_failed(
    relay: &str,
    database: &str,
    table: &str,
    error: &str,
    retry_in: Duration,
) {
    metrics()
        .relay_errors
        .with_label_values(&[database, table, kind::TRANSIENT])
        .inc();
    tracing::warn!(
        relay = %relay,
        error = %error,
        retry_in_ms = retry_in.as_millis() as u64,
        "relay batch failed; backing off"
    );
}

/// Redis refused `failed` rows of a batch of `database`'s `table`, of which `quarantined`
/// reached their last attempt (each row has its own line where it was charged).
pub fn rows_refused(database: &str, table: &str, failed: usize, quarantined: usize) {
    let m = metrics();
    if failed > 0 {
        m.relay_errors
            .with_label_values(&[database, table, kind::ROW])
            .inc_by(failed as u64);
    }
    if quarantined > 0 {
        m.relay_quarantined
            .with_label_values(&[database, table])
            .inc_by(quarantined as u64);
    }
}

/// A consumer batch failed on a server that is away or silent; it backs off for `retry_in`.
pub fn consumer_batch_failed(consumer: &str, error: &str, retry_in: Duration) {
    metrics()
        .consumer_errors
        .with_label_values(&[consumer, kind::TRANSIENT])
        .inc();
    tracing::warn!(
        consumer = %consumer,
        error = %error,
        retry_in_ms = retry_in.as_millis() as u64,
        "consumer batch failed; backing off"
    );
}

/// An event's handler failed; the entry stays pending and is retried.
pub fn event_retrying(event: EventRef<'_>, deliveries: u64, error: &str) {
    metrics()
        .consumer_errors
        .with_label_values(&[event.consumer, kind::HANDLER])
        .inc();
    tracing::warn!(
        consumer = %event.consumer,
        entry_id = %event.entry_id,
        event_id = event.event_id,
        aggregate_id = event.aggregate_id,
        trace_id = event.trace_id,
        deliveries,
        error = %error,
        "event failed; it stays pending and is retried"
    );
}

/// An entry was moved to the dead-letter stream of `stream`.
pub fn dead_lettered(event: EventRef<'_>, stream: &str, reason: &str) {
    metrics()
        .dead_letters
        .with_label_values(&[event.consumer, stream])
        .inc();
    tracing::error!(
        consumer = %event.consumer,
        stream = %stream,
        entry_id = %event.entry_id,
        event_id = event.event_id,
        aggregate_id = event.aggregate_id,
        trace_id = event.trace_id,
        reason,
        "dead-lettered"
    );
}

/// An event was recorded but changed nothing (`code`: backwards, terminal, ...). An order
/// already at the status an event implies is the routine case (a fulfillment moving from
/// picking to packed): at thousands of events a second a line each would be noise, so it
/// goes to debug; the rest (backwards, terminal, ...) say something and stay at info.
pub fn event_skipped(event: EventRef<'_>, code: &str, reason: &str) {
    metrics().order_skips.with_label_values(&[code]).inc();
    if code == crate::handlers::rules::SkipReason::ALREADY_THERE {
        tracing::debug!(
            consumer = event.consumer,
            entry_id = %event.entry_id,
            event_id = event.event_id,
            aggregate_id = event.aggregate_id,
            trace_id = event.trace_id,
            reason = %reason,
            "event skipped"
        );
        return;
    }
    tracing::info!(
        consumer = event.consumer,
        entry_id = %event.entry_id,
        event_id = event.event_id,
        aggregate_id = event.aggregate_id,
        trace_id = event.trace_id,
        reason = %reason,
        "event skipped"
    );
}

/// An event ID arrived again with other data; the first one stays applied.
pub fn data_conflict(consumer: &str, event_id: &str) {
    metrics()
        .consumer_events
        .with_label_values(&[consumer, result::CONFLICT])
        .inc();
    tracing::warn!(
        consumer = %consumer,
        event_id = %event_id,
        "same event ID arrived with different data; the first one was applied, this one is ignored"
    );
}
