//! `outboxd inbox prune --older-than D`: deletes inbox rows older than D for every configured
//! consumer, a batch per transaction so that consumers inserting into the inbox meanwhile are
//! never locked out for long. An inbox row is the only memory that an event was applied:
//! pruning it before the last possible redelivery or replay of that event would let it apply
//! twice, so D must exceed the stream's retention and any replay window.

use crate::config::{Config, ConfigError};
use crate::error::{Error, Result};
use std::time::Duration;

/// Deletes rows of one consumer older than `older_than`, `batch` rows per statement, each
/// statement bounded by `bound`; returns how many.
pub async fn prune_consumer(
    client: &tokio_postgres::Client,
    inbox_table: &str,
    consumer: &str,
    older_than: Duration,
    batch: u32,
    bound: Duration,
) -> Result<u64> {
    let sql = format!(
        "DELETE FROM {inbox} WHERE ctid = ANY(ARRAY(
            SELECT ctid FROM {inbox}
            WHERE consumer = $1 AND received_at < now() - make_interval(secs => $2)
            LIMIT $3))",
        inbox = crate::db::quote_qualified(inbox_table)
    );
    let ctx = format!("inbox prune {consumer}");
    let statement = crate::db::bounded(bound, &ctx, async {
        client.prepare(&sql).await.map_err(Error::pg(ctx.clone()))
    })
    .await?;
    let mut total = 0;
    loop {
        let n = crate::db::bounded(bound, &ctx, async {
            client
                .execute(
                    &statement,
                    &[&consumer, &older_than.as_secs_f64(), &i64::from(batch)],
                )
                .await
                .map_err(Error::pg(ctx.clone()))
        })
        .await?;
        total += n;
        if n < u64::from(batch) {
            return Ok(total);
        }
    }
}

pub async fn run(config: &Config, older_than: Duration, batch: u32) -> Result<()> {
    if config.consumers.is_empty() {
        return Err(crate::config::ConfigError::new("consumers", "no consumer configured").into());
    }
    let pools = crate::db::pools(config)?;
    for c in &config.consumers {
        let pool = pools.get(&c.database).ok_or_else(|| {
            ConfigError::new(format!("databases.{}", c.database), "not configured")
        })?;
        let bound = config.database(&c.database)?.query_timeout();
        let ctx = format!("inbox prune {}", c.name);
        let client = crate::db::bounded(bound, &ctx, async {
            pool.get().await.map_err(Error::pool(ctx.clone()))
        })
        .await?;
        let n = prune_consumer(&client, &c.inbox_table, &c.name, older_than, batch, bound).await?;
        crate::outln!(
            "inbox prune: consumer {}: {n} rows older than {}s deleted from {}.{}",
            c.name,
            older_than.as_secs(),
            c.database,
            c.inbox_table
        );
    }
    Ok(())
}
