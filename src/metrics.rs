//! Every Prometheus metric outboxd exports, each declared once in `metrics!` (name, help,
//! labels), and their text exposition. Hot paths update these once per batch, not per event.
//! The endpoint that serves them is `telemetry`.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec,
    Opts, Registry, TextEncoder,
};
use std::sync::LazyLock;

/// Declares every metric once: its field, its Prometheus name, help and labels. The
/// `Metrics` struct, its registration and [`Metrics::names`] all come from this list.
macro_rules! metrics {
    ($($field:ident: $kind:ident($name:literal, $help:literal $(, [$($label:literal),*])?);)*) => {
        #[derive(Debug)]
        pub struct Metrics {
            pub registry: Registry,
            $(pub $field: metric_type!($kind),)*
        }

        // The definitions are constants; a failure here is a programming error caught by any
        // test.
        #[allow(clippy::expect_used)]
        fn build() -> Metrics {
            let registry = Registry::new();
            $(
                let labels: &[&str] = &[$($($label),*)?];
                let $field = $kind($name, $help, labels);
                registry
                    .register(Box::new($field.clone()))
                    .expect("metric registered once");
            )*
            Metrics { registry, $($field,)* }
        }

        impl Metrics {
            /// The name of every metric exported (histograms add `_bucket`, `_sum`, `_count`).
            pub fn names(&self) -> Vec<String> {
                vec![$($name.to_string()),*]
            }
        }
    };
}

macro_rules! metric_type {
    (counter) => {
        IntCounterVec
    };
    (int_gauge) => {
        IntGaugeVec
    };
    (gauge) => {
        GaugeVec
    };
    (histogram) => {
        HistogramVec
    };
    (latency_histogram) => {
        Histogram
    };
    (plain_gauge) => {
        Gauge
    };
}

metrics! {
    relay_published: counter("outboxd_relay_events_published_total",
        "Outbox rows published to their stream, by database, table and topic.",
        ["database", "table", "topic"]);
    relay_batch_seconds: histogram("outboxd_relay_batch_duration_seconds",
        "Time to claim, publish and delete one relay batch.", ["database", "table"]);
    relay_errors: counter("outboxd_relay_errors_total",
        "Relay failures: kind=transient (PostgreSQL or Redis unavailable) or row (Redis rejected a row).",
        ["database", "table", "kind"]);
    relay_quarantined: counter("outboxd_relay_quarantined_total",
        "Outbox rows quarantined after max_attempts failed publishes.", ["database", "table"]);
    relay_active: int_gauge("outboxd_relay_active",
        "1 while this process's relay is the active one of its outbox (others stand by), else 0.",
        ["database", "table"]);
    outbox_backlog_rows: int_gauge("outboxd_outbox_backlog_rows",
        "Unpublished outbox rows (quarantined included).", ["database", "table"]);
    outbox_oldest_age_seconds: gauge("outboxd_outbox_oldest_unpublished_age_seconds",
        "Age of the oldest unpublished outbox row, 0 when empty.", ["database", "table"]);
    consumer_events: counter("outboxd_consumer_events_total",
        "Stream entries handled, by result: applied, duplicate, skipped, dead_lettered.",
        ["consumer", "result"]);
    consumer_batch_seconds: histogram("outboxd_consumer_processing_duration_seconds",
        "Time to apply and acknowledge one consumer batch.", ["consumer"]);
    consumer_errors: counter("outboxd_consumer_errors_total",
        "Consumer failures: kind=transient or handler.", ["consumer", "kind"]);
    consumer_lag: int_gauge("outboxd_consumer_group_lag",
        "Entries in the stream not yet delivered to the consumer group.", ["consumer", "stream"]);
    consumer_pending: int_gauge("outboxd_consumer_pending_entries",
        "Entries delivered to the group but not acknowledged.", ["consumer", "stream"]);
    dead_letters: counter("outboxd_dead_letters_total",
        "Entries moved to <stream>:dlq.", ["consumer", "stream"]);
    order_transitions: counter("outboxd_order_status_transitions_total",
        "Order status changes applied, by from and to status.", ["from", "to"]);
    order_skips: counter("outboxd_order_status_skipped_total",
        "Order events recorded but not applied, by reason (backwards, terminal, ...).", ["reason"]);
    end_to_end_seconds: latency_histogram("outboxd_end_to_end_latency_seconds",
        "From the outbox row's created_at to the commit of its effect.");
    oldest_confirmed_order_age_seconds: plain_gauge("outboxd_oldest_confirmed_order_age_seconds",
        "Age of the oldest order still in status confirmed, 0 when none.");
    connections_replaced: counter("outboxd_connections_replaced_total",
        "Connections given up because an operation on them ran out of time, by server.",
        ["server"]);
    loop_progress_age_seconds: gauge("outboxd_loop_last_progress_age_seconds",
        "Seconds since each relay or consumer loop last made progress (an idle round counts).",
        ["loop"]);
}

// Constructors for `metrics!`. The definitions are constants: a bad one fails every test run.
#[allow(clippy::expect_used)]
fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition")
}

#[allow(clippy::expect_used)]
fn int_gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition")
}

#[allow(clippy::expect_used)]
fn gauge(name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    GaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition")
}

/// Batch durations: 0.5 ms to 10 s.
#[allow(clippy::expect_used)]
fn histogram(name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let buckets = vec![
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid metric definition")
}

/// End-to-end latencies: 5 ms to 60 s. No labels.
#[allow(clippy::expect_used)]
fn latency_histogram(name: &str, help: &str, _labels: &[&str]) -> Histogram {
    let buckets = vec![
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ];
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("valid metric definition")
}

/// A gauge without labels.
#[allow(clippy::expect_used)]
fn plain_gauge(name: &str, help: &str, _labels: &[&str]) -> Gauge {
    Gauge::with_opts(Opts::new(name, help)).expect("valid metric definition")
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let metrics = build();
    for server in ["postgres", "redis"] {
        metrics.connections_replaced.with_label_values(&[server]);
    }
    metrics
});

pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// The Prometheus text exposition of every metric.
pub fn render() -> String {
    let mut buf = Vec::new();
    let encoder = TextEncoder::new();
    if let Err(e) = encoder.encode(&metrics().registry.gather(), &mut buf) {
        tracing::warn!(error = %e, "encoding metrics");
    }
    String::from_utf8(buf).unwrap_or_default()
}
