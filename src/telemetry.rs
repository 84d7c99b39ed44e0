//! Every Prometheus metric outboxd exports, defined in one place, and the small HTTP endpoint
//! that serves them with `/healthz` (no loop stuck, see `watchdog`) and `/readyz` (no loop
//! backing off, and every configured database and Redis answer). Hot paths update these once per batch, not per event.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec,
    Opts, Registry, TextEncoder,
};
use std::sync::LazyLock;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub relay_published: IntCounterVec,
    pub relay_batch_seconds: HistogramVec,
    pub relay_errors: IntCounterVec,
    pub relay_quarantined: IntCounterVec,
    pub outbox_backlog_rows: IntGaugeVec,
    pub outbox_oldest_age_seconds: GaugeVec,
    pub consumer_events: IntCounterVec,
    pub consumer_batch_seconds: HistogramVec,
    pub consumer_errors: IntCounterVec,
    pub consumer_lag: IntGaugeVec,
    pub consumer_pending: IntGaugeVec,
    pub dead_letters: IntCounterVec,
    pub order_transitions: IntCounterVec,
    pub order_skips: IntCounterVec,
    pub end_to_end_seconds: Histogram,
    pub oldest_confirmed_order_age_seconds: Gauge,
    pub connections_replaced: IntCounterVec,
    pub loop_progress_age_seconds: GaugeVec,
}

#[allow(clippy::expect_used)] // constant definitions: a bad one fails every test run
fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    registry
        .register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

#[allow(clippy::expect_used)] // constant definitions: a bad one fails every test run
fn int_gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    registry
        .register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

#[allow(clippy::expect_used)] // constant definitions: a bad one fails every test run
fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let buckets = vec![
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid metric definition");
    registry
        .register(Box::new(h.clone()))
        .expect("metric registered once");
    h
}

// The definitions are constants; a failure here is a programming error caught by any test.
#[allow(clippy::expect_used)]
fn build() -> Metrics {
    let r = Registry::new();
    let relay_published = counter(
        &r,
        "outboxd_relay_events_published_total",
        "Outbox rows published to their stream, by table and topic.",
        &["table", "topic"],
    );
    let relay_batch_seconds = histogram(
        &r,
        "outboxd_relay_batch_duration_seconds",
        "Time to claim, publish and delete one relay batch.",
        &["table"],
    );
    let relay_errors = counter(
        &r,
        "outboxd_relay_errors_total",
        "Relay failures: kind=transient (PostgreSQL or Redis unavailable) or row (Redis rejected a row).",
        &["table", "kind"],
    );
    let relay_quarantined = counter(
        &r,
        "outboxd_relay_quarantined_total",
        "Outbox rows quarantined after max_attempts failed publishes.",
        &["table"],
    );
    let outbox_backlog_rows = int_gauge(
        &r,
        "outboxd_outbox_backlog_rows",
        "Unpublished outbox rows (quarantined included).",
        &["database", "table"],
    );
    let outbox_oldest_age_seconds = GaugeVec::new(
        Opts::new(
            "outboxd_outbox_oldest_unpublished_age_seconds",
            "Age of the oldest unpublished outbox row, 0 when empty.",
        ),
        &["database", "table"],
    )
    .expect("valid metric definition");
    r.register(Box::new(outbox_oldest_age_seconds.clone()))
        .expect("metric registered once");
    let consumer_events = counter(
        &r,
        "outboxd_consumer_events_total",
        "Stream entries handled, by result: applied, duplicate, skipped, dead_lettered.",
        &["consumer", "result"],
    );
    let consumer_batch_seconds = histogram(
        &r,
        "outboxd_consumer_processing_duration_seconds",
        "Time to apply and acknowledge one consumer batch.",
        &["consumer"],
    );
    let consumer_errors = counter(
        &r,
        "outboxd_consumer_errors_total",
        "Consumer failures: kind=transient or handler.",
        &["consumer", "kind"],
    );
    let consumer_lag = int_gauge(
        &r,
        "outboxd_consumer_group_lag",
        "Entries in the stream not yet delivered to the consumer group.",
        &["consumer", "stream"],
    );
    let consumer_pending = int_gauge(
        &r,
        "outboxd_consumer_pending_entries",
        "Entries delivered to the group but not acknowledged.",
        &["consumer", "stream"],
    );
    let dead_letters = counter(
        &r,
        "outboxd_dead_letters_total",
        "Entries moved to <stream>:dlq.",
        &["consumer", "stream"],
    );
    let order_transitions = counter(
        &r,
        "outboxd_order_status_transitions_total",
        "Order status changes applied, by from and to status.",
        &["from", "to"],
    );
    let order_skips = counter(
        &r,
        "outboxd_order_status_skipped_total",
        "Order events recorded but not applied, by reason (backwards, terminal, ...).",
        &["reason"],
    );
    let end_to_end_seconds = Histogram::with_opts(
        HistogramOpts::new(
            "outboxd_end_to_end_latency_seconds",
            "From the outbox row's created_at to the commit of its effect.",
        )
        .buckets(vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ]),
    )
    .expect("valid metric definition");
    r.register(Box::new(end_to_end_seconds.clone()))
        .expect("metric registered once");
    let oldest_confirmed_order_age_seconds = Gauge::with_opts(Opts::new(
        "outboxd_oldest_confirmed_order_age_seconds",
        "Age of the oldest order still in status confirmed, 0 when none.",
    ))
    .expect("valid metric definition");
    r.register(Box::new(oldest_confirmed_order_age_seconds.clone()))
        .expect("metric registered once");
    let connections_replaced = counter(
        &r,
        "outboxd_connections_replaced_total",
        "Connections given up because an operation on them ran out of time, by server.",
        &["server"],
    );
    for server in ["postgres", "redis"] {
        connections_replaced.with_label_values(&[server]);
    }
    let loop_progress_age_seconds = GaugeVec::new(
        Opts::new(
            "outboxd_loop_last_progress_age_seconds",
            "Seconds since each relay or consumer loop last made progress (an idle round counts).",
        ),
        &["loop"],
    )
    .expect("valid metric definition");
    r.register(Box::new(loop_progress_age_seconds.clone()))
        .expect("metric registered once");
    Metrics {
        registry: r,
        connections_replaced,
        loop_progress_age_seconds,
        relay_published,
        relay_batch_seconds,
        relay_errors,
        relay_quarantined,
        outbox_backlog_rows,
        outbox_oldest_age_seconds,
        consumer_events,
        consumer_batch_seconds,
        consumer_errors,
        consumer_lag,
        consumer_pending,
        dead_letters,
        order_transitions,
        order_skips,
        end_to_end_seconds,
        oldest_confirmed_order_age_seconds,
    }
}

impl Metrics {
    /// The name of every metric exported (histograms add `_bucket`, `_sum`, `_count`).
    pub fn names(&self) -> Vec<String> {
        use prometheus::core::Collector;
        let collectors: [&dyn Collector; 18] = [
            &self.connections_replaced,
            &self.loop_progress_age_seconds,
            &self.relay_published,
            &self.relay_batch_seconds,
            &self.relay_errors,
            &self.relay_quarantined,
            &self.outbox_backlog_rows,
            &self.outbox_oldest_age_seconds,
            &self.consumer_events,
            &self.consumer_batch_seconds,
            &self.consumer_errors,
            &self.consumer_lag,
            &self.consumer_pending,
            &self.dead_letters,
            &self.order_transitions,
            &self.order_skips,
            &self.end_to_end_seconds,
            &self.oldest_confirmed_order_age_seconds,
        ];
        collectors
            .iter()
            .flat_map(|c| c.desc())
            .map(|d| d.fq_name.clone())
            .collect()
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(build);

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

/// What `/readyz` checks: every database answers `SELECT 1` and Redis answers `PING`.
#[derive(Clone, Debug)]
pub struct Readiness {
    pub databases: Vec<(String, deadpool_postgres::Pool)>,
    pub redis: Option<crate::redis_io::Redis>,
}

impl Readiness {
    pub async fn check(&self) -> Result<(), String> {
        for (name, pool) in &self.databases {
            let probe = async {
                let client = pool.get().await.map_err(|e| e.to_string())?;
                client
                    .simple_query("SELECT 1")
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<(), String>(())
            };
            match tokio::time::timeout(Duration::from_secs(2), probe).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(format!("database {name}: {e}")),
                Err(_) => return Err(format!("database {name}: no answer within 2s")),
            }
        }
        if let Some(redis) = &self.redis {
            let mut conn = redis.commands();
            let ping_cmd = redis::cmd("PING");
            let ping = ping_cmd.query_async::<String>(&mut conn);
            match tokio::time::timeout(Duration::from_secs(2), ping).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(format!("redis: {e}")),
                Err(_) => return Err("redis: no answer within 2s".into()),
            }
        }
        Ok(())
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown`; nothing else (every other
/// path is 404, every other method 405).
pub async fn serve(
    listener: tokio::net::TcpListener,
    readiness: Readiness,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((stream, _)) = accepted else {
            continue;
        };
        let readiness = readiness.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), answer(stream, &readiness)).await;
        });
    }
}

async fn answer(mut stream: tokio::net::TcpStream, readiness: &Readiness) -> std::io::Result<()> {
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    // Read the request head only; these endpoints take no body.
    while len < buf.len() {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            break;
        }
        len += n;
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", {
            crate::watchdog::export();
            render()
        }),
        ("GET", "/healthz") => match crate::watchdog::health() {
            Ok(()) => ("200 OK", "text/plain", "ok\n".to_string()),
            Err(e) => (
                "503 Service Unavailable",
                "text/plain",
                format!("stuck: {e}\n"),
            ),
        },
        ("GET", "/readyz") => match crate::watchdog::readiness().and(readiness.check().await) {
            Ok(()) => ("200 OK", "text/plain", "ready\n".to_string()),
            Err(e) => (
                "503 Service Unavailable",
                "text/plain",
                format!("not ready: {e}\n"),
            ),
        },
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
