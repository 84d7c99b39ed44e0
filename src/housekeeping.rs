//! The daemon's housekeeping loops, beside the relay and consumer loops of `run`: the gauges
//! (backlog, lag, oldest confirmed order) refreshed every few seconds from the same figures
//! `status` reads, stream trimming that never drops an unacknowledged entry (`ops::trim`),
//! and the inbox and archive retention (`ops::prune`). A failed round is logged and tried
//! again next time; these loops never stop the daemon.

use crate::config::Config;
use crate::error::Error;
use crate::redis_io::Redis;
use deadpool_postgres::Pool;
use std::collections::HashMap;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The daemon's housekeeping, once a minute: trim the streams of topics with a `max_len` or
/// `max_age_hours`, and prune the inboxes of consumers with `inbox_retention_hours`. Failures
/// are logged and retried at the next round; they never stop the daemon.
pub async fn maintain_forever(
    config: crate::config::Config,
    pools: std::collections::HashMap<String, deadpool_postgres::Pool>,
    redis: crate::redis_io::Redis,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let wanted = config
        .topics
        .iter()
        .any(|t| t.max_len.is_some() || t.max_age_hours.is_some())
        || config.consumers.iter().any(|c| c.inbox_retention_hours > 0);
    if !wanted {
        return;
    }
    loop {
        let mut conn = redis.commands();
        for topic in &config.topics {
            if topic.max_len.is_none() && topic.max_age_hours.is_none() {
                continue;
            }
            let age = topic.max_age_hours.map(|h| h.saturating_mul(3_600_000));
            for key in redis.stream_keys(&topic.name) {
                match crate::ops::trim::trim_stream(&mut conn, &key, topic.max_len, age).await {
                    Ok(n) if n > 0 => tracing::info!(stream = %key, removed = n, "trimmed"),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(stream = %key, error = %crate::error::chain(&e), "trimming failed")
                    }
                }
            }
        }
        for c in config
            .consumers
            .iter()
            .filter(|c| c.inbox_retention_hours > 0)
        {
            let Some(pool) = pools.get(&c.database) else {
                continue;
            };
            let result = async {
                let bound = config.database(&c.database)?.query_timeout();
                let client = crate::db::bounded(bound, "inbox prune", async {
                    pool.get().await.map_err(Error::pool("inbox prune"))
                })
                .await?;
                crate::ops::prune::prune_consumer(
                    &client,
                    &c.inbox_table,
                    &c.name,
                    std::time::Duration::from_secs(c.inbox_retention_hours.saturating_mul(3600)),
                    5000,
                    bound,
                )
                .await
            };
            match result.await {
                Ok(n) if n > 0 => tracing::info!(consumer = %c.name, rows = n, "pruned the inbox"),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(consumer = %c.name, error = %crate::error::chain(&e), "inbox prune failed")
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => {}
        }
    }
}

/// Keeps the backlog and lag gauges current while the daemon runs (every 5 s).
pub async fn refresh_gauges_forever(
    config: Config,
    pools: HashMap<String, Pool>,
    redis: Redis,
    shutdown: CancellationToken,
) {
    let m = crate::metrics::metrics();
    // Each round is bounded as a whole too, so that a server gone silent cannot stop the
    // gauges for longer than a round's bound (its figures are then simply not refreshed).
    let bound = config.largest_operation_bound() * 2;
    loop {
        // A standing-by relay's outbox is measured by the active relay's process, not here:
        // every standby counting the same backlog every 5 s would multiply that cost by the
        // number of standbys. Its series are left out until it becomes active.
        let mut measured = config.clone();
        measured.relays.retain(|r| {
            let labels = [r.database.as_str(), r.table.as_str()];
            let standing_by = r.standby && crate::relay::standing_by(&r.database, &r.table);
            if standing_by {
                let _ = m.outbox_backlog_rows.remove_label_values(&labels);
                let _ = m.outbox_oldest_age_seconds.remove_label_values(&labels);
            }
            !standing_by
        });
        let Ok(status) = tokio::time::timeout(
            bound,
            crate::ops::status::collect(&measured, &pools, &redis, false),
        )
        .await
        else {
            tracing::warn!("refreshing the gauges timed out; will try again");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
            }
            continue;
        };
        for o in &status.outboxes {
            if o.error.is_none() {
                m.outbox_backlog_rows
                    .with_label_values(&[&o.database, &o.table])
                    .set(o.backlog_rows);
                m.outbox_oldest_age_seconds
                    .with_label_values(&[&o.database, &o.table])
                    .set(o.oldest_age_seconds.unwrap_or(0.0));
            }
        }
        for c in &status.consumers {
            if c.error.is_none() {
                m.consumer_lag
                    .with_label_values(&[&c.name, &c.stream])
                    .set(c.lag.unwrap_or(0) as i64);
                m.consumer_pending
                    .with_label_values(&[&c.name, &c.stream])
                    .set(c.pending as i64);
            }
        }
        if let Ok(Some(age)) =
            tokio::time::timeout(bound, oldest_confirmed_order_age(&config, &pools)).await
        {
            m.oldest_confirmed_order_age_seconds.set(age);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

/// Age of the oldest order still `confirmed` (or `payment_confirmed`) over the databases of
/// the `order_status` consumers; 0 when there is none, `None` when it cannot be read.
pub async fn oldest_confirmed_order_age(
    config: &Config,
    pools: &HashMap<String, Pool>,
) -> Option<f64> {
    let mut oldest: Option<f64> = None;
    for c in config.consumers.iter().filter(|c| c.moves_orders()) {
        let pool = pools.get(&c.database)?;
        let o = &c.orders;
        let sql = format!(
            "SELECT coalesce(extract(epoch FROM now() - min({updated}))::float8, 0) FROM {table} WHERE {status} IN ('confirmed', 'payment_confirmed')",
            updated = crate::db::quote_ident(&o.updated_at_column),
            table = crate::db::quote_qualified(&o.table),
            status = crate::db::quote_ident(&o.status_column),
        );
        let client = pool.get().await.ok()?;
        let age: f64 = client.query_one(&sql, &[]).await.ok()?.get(0);
        oldest = Some(oldest.map_or(age, |o| o.max(age)));
    }
    Some(oldest.unwrap_or(0.0))
}
