//! The inbox consumer: stream entries -> exactly-once effects. One `Consumer` per configured
//! `[[consumers]]` entry; its name is the Redis consumer group and the inbox's consumer key.
//!
//! A batch is one PostgreSQL transaction: the inbox rows of all its events are inserted first
//! (`ON CONFLICT DO NOTHING`: an event already there is a duplicate), then the handler runs for
//! each new event, in order-ID order so concurrent consumers lock rows in the same order. After
//! the commit every entry of the batch is acknowledged, duplicates included. An event whose
//! handler fails is taken out and the batch redone without it (no savepoint round trips on the
//! common path); it stays pending and is retried (through `XAUTOCLAIM` after `claim_idle_ms`)
//! until it succeeds or reaches `max_deliveries` and is dead-lettered. Entries that can never be
//! handled (not JSON, no event ID, malformed payload) are dead-lettered at once.
//!
//! This module holds the `Consumer`, its daemon loop (`run`) and the `--once` drain
//! (`drain`). The rooms: `read` (the reads and read passes: pending, claim, new), `apply` (one
//! batch, triage to settle), `dlq` (writing a dead letter).

mod apply;
pub mod dlq;
mod inflight;
pub mod read;

use crate::config::{Config, ConsumerConfig};
use crate::error::{Error, Result};
use crate::handlers::Handler;
use crate::redis_io::Redis;
use crate::retry::Backoff;
use deadpool_postgres::Pool;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Counts of what batches did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Tally {
    pub applied: u64,
    pub duplicate: u64,
    pub skipped: u64,
    pub dead_lettered: u64,
    /// Failed this time, left pending for a retry.
    pub retrying: u64,
    /// Same event ID seen again with different data (first one won).
    pub conflicts: u64,
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        self.applied += o.applied;
        self.duplicate += o.duplicate;
        self.skipped += o.skipped;
        self.dead_lettered += o.dead_lettered;
        self.retrying += o.retrying;
        self.conflicts += o.conflicts;
    }

    pub fn handled(&self) -> u64 {
        self.applied + self.duplicate + self.skipped + self.dead_lettered
    }
}

pub struct Consumer {
    config: ConsumerConfig,
    pool: Pool,
    redis: Redis,
    /// Stream keys (prefix applied) and the topic each carries.
    keys: Vec<String>,
    topics: Vec<String>,
    /// This instance's consumer name within the group (`consumer_name`, default
    /// `<host>-<pid>`).
    instance: String,
    handler: Handler,
    inbox_insert: String,
    inbox_hashes: String,
    /// Deletes the inbox rows of events a set-based batch could not apply.
    inbox_forget: String,
    /// The bound of each step of a batch's transaction (the database's `query_timeout_ms`).
    query_timeout: Duration,
    /// `consume --once`: how long a server may stay away or silent before the drain gives up.
    give_up_after: Duration,
    /// Entries asked for per stream in the next read (see `observe`).
    read_count: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("name", &self.config.name)
            .field("consumer", &self.instance)
            .finish_non_exhaustive()
    }
}

impl Consumer {
    pub fn new(config: ConsumerConfig, pool: Pool, redis: Redis) -> Result<Consumer> {
        let key = format!("consumers.{}", config.name);
        let handler = match config.handler_choice(&key)? {
            crate::config::HandlerChoice::Sql { function } => Handler::Sql(
                crate::handlers::sql_function::SqlFunctionHandler::new(&function),
            ),
            crate::config::HandlerChoice::OrderStatus => Handler::OrderStatus(Box::new(
                crate::handlers::order_status::OrderStatusHandler::new(&config).map_err(|m| {
                    crate::config::ConfigError::new(
                        format!("consumers.{}.status_mapping", config.name),
                        m,
                    )
                })?,
            )),
        };
        // A partitioned topic is read from all its partition streams.
        let mut keys = Vec::new();
        let mut topics = Vec::new();
        for topic in &config.streams {
            for key in redis.stream_keys(topic) {
                keys.push(key);
                topics.push(topic.clone());
            }
        }
        let instance = config
            .consumer_name
            .clone()
            .unwrap_or_else(default_instance_name);
        let inbox = crate::db::quote_qualified(&config.inbox_table);
        crate::events::consumer_started(
            &config.name,
            &keys,
            matches!(handler, Handler::OrderStatus(_)),
        );
        Ok(Consumer {
            inbox_insert: format!(
                "INSERT INTO {inbox} (consumer, event_id, stream, entry_id, data_hash)
SELECT $1, e.event_id, e.stream, e.entry_id, e.hash
FROM unnest($2::text[], $3::text[], $4::text[], $5::int8[]) AS e(event_id, stream, entry_id, hash)
ON CONFLICT (consumer, event_id) DO NOTHING
RETURNING event_id"
            ),
            inbox_hashes: format!(
                "SELECT i.event_id, i.data_hash FROM unnest($2::text[]) AS k(event_id)
JOIN {inbox} AS i ON i.consumer = $1 AND i.event_id = k.event_id"
            ),
            inbox_forget: format!(
                "DELETE FROM {inbox} WHERE consumer = $1 AND event_id = ANY($2::text[])"
            ),
            config,
            pool,
            redis,
            keys,
            topics,
            instance,
            handler,
            query_timeout: Duration::from_millis(crate::config::defaults::query_timeout_ms()),
            give_up_after: Duration::from_secs(60),
            read_count: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// The consumer's name: its Redis consumer group and its key in the inbox.
    pub fn group(&self) -> &str {
        &self.config.name
    }

    /// How long `drain` retries a server that is away or not answering (default 60 s).
    pub fn set_give_up_after(&mut self, after: Duration) {
        self.give_up_after = after;
    }

    /// This instance's consumer name within the group.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Removes this instance's consumer name from its groups when it holds no pending entry,
    /// so short-lived instances (`consume --once`, restarts) do not pile up in `XINFO
    /// CONSUMERS`. A name with pending entries stays: deleting it would orphan them. Best
    /// effort: a failure here only leaves the name behind.
    pub async fn forget_self(&self) {
        let mut conn = self.redis.commands();
        for key in &self.keys {
            let mine: redis::RedisResult<redis::Value> = redis::cmd("XPENDING")
                .arg(key)
                .arg(&self.config.name)
                .arg("-")
                .arg("+")
                .arg(1)
                .arg(&self.instance)
                .query_async(&mut conn)
                .await;
            if matches!(mine, Ok(redis::Value::Array(ref held)) if held.is_empty()) {
                let _: redis::RedisResult<i64> = redis::cmd("XGROUP")
                    .arg("DELCONSUMER")
                    .arg(key)
                    .arg(&self.config.name)
                    .arg(&self.instance)
                    .query_async(&mut conn)
                    .await;
            }
        }
    }

    /// The daemon loop: own pending entries first, then new ones with a blocking read on a
    /// dedicated connection, claiming idle entries every half `claim_idle_ms`. Transient
    /// trouble backs off, reconnects, and rescans the pending entries before going on.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let mut backoff = Backoff::new();
        let mut rescan = true;
        let mut blocking: Option<crate::redis_io::BlockingConnection> = None;
        let claim_every = Duration::from_millis((self.config.claim_idle_ms / 2).max(50));
        let mut last_claim = Instant::now();
        let mut idle = Duration::ZERO;
        let watch = crate::watchdog::register(&crate::watchdog::consumer_loop(&self.config.name));
        tracing::info!(consumer = %self.config.name, instance = %self.instance, "consumer started");
        // The next batch is read and started while the last ones are applied.
        let mut batches = inflight::Batches::new();
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            watch.busy();
            let step = async {
                if let Some(e) = batches.failure() {
                    return Err(e);
                }
                let _ = batches.tally();
                if rescan || last_claim.elapsed() >= claim_every {
                    // The passes read this instance's pending entries: none may be in flight.
                    batches.finish().await;
                    if let Some(e) = batches.failure() {
                        return Err(e);
                    }
                }
                if rescan {
                    self.ensure_groups().await?;
                    self.pending_pass().await?;
                    rescan = false;
                }
                if last_claim.elapsed() >= claim_every {
                    last_claim = Instant::now();
                    self.claim_pass().await?;
                }
                if !batches.has_room() {
                    batches.one().await;
                    return Ok(false);
                }
                if blocking.is_none() {
                    blocking = Some(
                        self.redis
                            .dedicated(Duration::from_millis(self.config.block_ms))
                            .await?,
                    );
                }
                let Some(blocking) = blocking.as_mut() else {
                    return Ok(false);
                };
                let client_id = blocking.client_id;
                let conn = &mut blocking.conn;
                let block = Duration::from_millis(self.config.block_ms)
                    .min(claim_every.saturating_sub(last_claim.elapsed()))
                    .max(Duration::from_millis(10));
                let batch = self.config.batch_size as usize;
                let read = async {
                    // Shutdown interrupts only this wait, never a batch being applied. The read is
                    // woken, not dropped: dropped just as Redis delivered, its entries would stay
                    // pending here until a restart or another instance's XAUTOCLAIM.
                    let mut entries = if self.redis.is_cluster() {
                        // Reads do not block on a cluster: when nothing came, wait a little
                        // longer each time (5 ms up to 100 ms), so an idle consumer polls gently
                        // and a busy one never waits.
                        let entries = self.read_new(conn, batch, None).await?;
                        if entries.is_empty() {
                            idle = (idle * 2).clamp(
                                Duration::from_millis(5),
                                block.min(Duration::from_millis(100)),
                            );
                            tokio::select! {
                                _ = shutdown.cancelled() => {}
                                _ = tokio::time::sleep(idle) => {}
                            }
                        } else {
                            idle = Duration::ZERO;
                        }
                        entries
                    } else {
                        let read = self.read_new(conn, batch, Some(block.as_millis() as u64));
                        tokio::pin!(read);
                        tokio::select! {
                            biased;
                            r = &mut read => r?,
                            _ = shutdown.cancelled() => {
                                if let Some(client_id) = client_id {
                                    if let Err(e) = self.redis.unblock(client_id).await {
                                        tracing::warn!(consumer = %self.config.name, error = %crate::error::chain(&e), "could not wake the blocking read; leaving its entries to the next start");
                                        return Ok(None);
                                    }
                                }
                                read.await?
                            }
                        }
                    };
                    if !entries.is_empty()
                        && entries.len() < batch / 4
                        && self.config.linger_ms > 0
                        && !shutdown.is_cancelled()
                    {
                        tokio::time::sleep(Duration::from_millis(self.config.linger_ms)).await;
                        let more = self.read_new(conn, batch - entries.len(), None).await?;
                        entries.extend(more);
                    }
                    Ok::<Option<Vec<read::Entry>>, Error>(Some(entries))
                };
                let Some(entries) = batches.beside(read).await? else {
                    return Ok(false);
                };
                let large = apply::carries_large_entries(&entries);
                if !entries.is_empty() {
                    batches.start(&self, entries);
                }
                Ok::<bool, Error>(large)
            };
            let result = step.await;
            match result {
                Ok(large) => {
                    if large {
                        // a new one next round: this one keeps buffers as large as its
                        // largest reply for as long as it lives
                        blocking = None;
                    }
                    watch.done();
                    backoff.reset()
                }
                Err(e) if e.is_transient() || is_missing_group(&e) => {
                    // the batches still in flight end first (their own errors are the same
                    // trouble; the rescan after the backoff picks up what they left pending)
                    batches.finish().await;
                    let _ = batches.failure();
                    let error = crate::error::chain(&e);
                    watch.failed(&error);
                    crate::db::after_failure(&self.pool, &e);
                    let delay = backoff.next_delay();
                    crate::events::consumer_batch_failed(&self.config.name, &error, delay);
                    blocking = None;
                    rescan = true;
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(e) => {
                    batches.finish().await;
                    return Err(e);
                }
            }
        }
        batches.finish().await;
        if let Some(e) = batches.failure() {
            tracing::warn!(consumer = %self.config.name, error = %crate::error::chain(&e), "a batch failed while stopping; its entries stay pending for the next start");
        }
        self.forget_self().await;
        tracing::info!(consumer = %self.config.name, "consumer stopped");
        Ok(())
    }

    /// `consume --once`: own pending, then everything new, then idle entries of others, until
    /// nothing is left. Entries that fail are retried right away until they succeed or are
    /// dead-lettered at max_deliveries, so nothing of this consumer stays pending.
    pub async fn drain(&self, shutdown: &CancellationToken) -> Result<Tally> {
        let mut tally = Tally::default();
        let mut budget = crate::retry::TransientBudget::new(self.give_up_after);
        loop {
            if shutdown.is_cancelled() {
                return Ok(tally);
            }
            let round_started = Instant::now();
            let round = async {
                let mut round = Tally::default();
                self.ensure_groups().await?;
                round.add(&self.pending_pass().await?);
                let mut conn = self.redis.commands();
                // The next batch is read and started while the last ones are applied.
                let mut batches = inflight::Batches::new();
                let read_failed = loop {
                    if shutdown.is_cancelled() || batches.has_failed() {
                        break None;
                    }
                    if !batches.has_room() {
                        batches.one().await;
                        continue;
                    }
                    let read = batches
                        .beside(self.read_new(&mut conn, self.config.batch_size as usize, None))
                        .await;
                    match read {
                        Ok(entries) if entries.is_empty() => break None,
                        Ok(entries) => batches.start(self, entries),
                        Err(e) => break Some(e),
                    }
                };
                batches.finish().await;
                round.add(&batches.tally());
                if let Some(e) = batches.failure().or(read_failed) {
                    return Err(e);
                }
                round.add(&self.claim_pass().await?);
                Ok::<Tally, Error>(round)
            };
            match round.await {
                Ok(round) => {
                    tally.add(&round);
                    budget.reset();
                    // Failed entries of this round are still pending here: go round again.
                    if round.retrying == 0 && round.handled() == 0 {
                        return Ok(tally);
                    }
                    if round.retrying > 0 {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                Err(e) if e.is_transient() => {
                    let Some(delay) = budget.next_wait(round_started) else {
                        return Err(e);
                    };
                    crate::db::after_failure(&self.pool, &e);
                    tracing::warn!(consumer = %self.config.name, error = %crate::error::chain(&e), "consume --once round failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

fn is_missing_group(e: &Error) -> bool {
    matches!(e, Error::Redis { source, .. } if source.code() == Some("NOGROUP"))
}

fn default_instance_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "outboxd".into());
    format!("{host}-{}", std::process::id())
}

/// Builds every configured consumer.
pub fn build_all(
    config: &Config,
    pools: &HashMap<String, Pool>,
    redis: &Redis,
) -> Result<Vec<Consumer>> {
    config
        .consumers
        .iter()
        .map(|c| {
            let pool = pools
                .get(&c.database)
                .ok_or_else(|| {
                    crate::config::ConfigError::new("consumers.database", "unknown database")
                })?
                .clone();
            let mut consumer = Consumer::new(c.clone(), pool, redis.clone())?;
            consumer.query_timeout = config.database(&c.database)?.query_timeout();
            Ok(consumer)
        })
        .collect()
}
