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

pub mod dlq;
pub mod read;

use crate::config::{Config, ConsumerConfig};
use crate::envelope::{decode, Incoming};
use crate::error::{Error, Result};
use crate::handlers::{HandleError, Handler, Outcome};
use crate::redis_io::Redis;
use crate::retry::Backoff;
use crate::telemetry::metrics;
use deadpool_postgres::Pool;
use read::Entry;
use std::collections::{HashMap, HashSet};
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
    consumer_name: String,
    handler: Handler,
    inbox_insert: String,
    inbox_hashes: String,
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
            .field("consumer", &self.consumer_name)
            .finish_non_exhaustive()
    }
}

struct Work {
    entry: usize,
    event: Incoming,
    hash: i64,
    lock_key: Option<String>,
}

impl Consumer {
    pub fn new(config: ConsumerConfig, pool: Pool, redis: Redis) -> Result<Consumer> {
        let handler = match config.handler.as_str() {
            "sql" => Handler::Sql(crate::handlers::sql_function::SqlFunctionHandler::new(
                config.function.as_deref().unwrap_or_default(),
            )),
            _ => Handler::OrderStatus(
                crate::handlers::order_status::OrderStatusHandler::new(&config).map_err(|m| {
                    crate::config::ConfigError::new(
                        format!("consumers.{}.status_mapping", config.name),
                        m,
                    )
                })?,
            ),
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
        let consumer_name = config
            .consumer_name
            .clone()
            .unwrap_or_else(default_consumer_name);
        let inbox = crate::db::quote_qualified(&config.inbox_table);
        Ok(Consumer {
            inbox_insert: format!(
                "INSERT INTO {inbox} (consumer, event_id, stream, entry_id, data_hash)
SELECT $1, e.event_id, e.stream, e.entry_id, e.hash
FROM unnest($2::text[], $3::text[], $4::text[], $5::int8[]) AS e(event_id, stream, entry_id, hash)
ON CONFLICT (consumer, event_id) DO NOTHING
RETURNING event_id"
            ),
            inbox_hashes: format!(
                "SELECT event_id, data_hash FROM {inbox} WHERE consumer = $1 AND event_id = ANY($2::text[])"
            ),
            config,
            pool,
            redis,
            keys,
            topics,
            consumer_name,
            handler,
            query_timeout: Duration::from_millis(crate::config::defaults::query_timeout_ms()),
            give_up_after: Duration::from_secs(60),
            read_count: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    pub fn name(&self) -> String {
        self.config.name.clone()
    }

    /// How long `drain` retries a server that is away or not answering (default 60 s).
    pub fn set_give_up_after(&mut self, after: Duration) {
        self.give_up_after = after;
    }

    /// Entries to ask for per stream in the next read, at most `batch_size`. Before the
    /// first read it estimates the streams' entry size from Redis (`MEMORY USAGE` over
    /// `XLEN`), so that a backlog of large entries is not read `batch_size` at a time; where
    /// that cannot be asked, it starts at 1 and grows as `observe` sees small entries.
    async fn read_count(&self, conn: &mut crate::redis_io::Conn) -> usize {
        let batch = self.config.batch_size.max(1) as usize;
        let known = self.read_count.load(std::sync::atomic::Ordering::Relaxed);
        if known > 0 {
            return known.clamp(1, batch);
        }
        let mut largest_average = 0_usize;
        let mut asked = true;
        for key in &self.keys {
            let usage: redis::RedisResult<Option<u64>> = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(key)
                .query_async(conn)
                .await;
            let len: redis::RedisResult<u64> = redis::cmd("XLEN").arg(key).query_async(conn).await;
            match (usage, len) {
                (Ok(Some(bytes)), Ok(len)) if len > 0 => {
                    largest_average = largest_average.max((bytes / len) as usize);
                }
                (Ok(_), Ok(_)) => {}
                _ => asked = false,
            }
        }
        let count = if !asked {
            1
        } else {
            match self.config.max_read_bytes.checked_div(largest_average) {
                Some(fit) => (fit / self.keys.len().max(1)).clamp(1, batch),
                None => batch, // empty streams: nothing to go by yet
            }
        };
        self.read_count
            .store(count, std::sync::atomic::Ordering::Relaxed);
        count
    }

    /// After a read: the next one asks for twice as many entries, up to `batch_size`, but
    /// never more than `max_read_bytes` of entries as large as the largest just read can
    /// fill (over every stream a read covers). Memory then follows bytes, not entry counts:
    /// a backlog of multi-megabyte events is read a few at a time. (A stream whose entries
    /// grow suddenly from small to large can overshoot for one read.)
    fn observe(&self, entries: &[Entry]) {
        let Some(largest) = entries
            .iter()
            .map(|e| {
                e.fields
                    .iter()
                    .map(|(k, v)| k.len() + v.len())
                    .sum::<usize>()
            })
            .max()
        else {
            return;
        };
        let fit = self.config.max_read_bytes / largest.max(1) / self.keys.len().max(1);
        let current = self
            .read_count
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(1);
        let next = (current * 2)
            .min(fit)
            .clamp(1, self.config.batch_size.max(1) as usize);
        self.read_count
            .store(next, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn consumer_name(&self) -> &str {
        &self.consumer_name
    }

    async fn ensure_groups(&self) -> Result<()> {
        let mut conn = self.redis.commands();
        for key in &self.keys {
            read::ensure_group(&mut conn, key, &self.config.name).await?;
        }
        Ok(())
    }

    /// One pass through this consumer's own pending entries, stream by stream, oldest first.
    async fn pending_pass(&self) -> Result<Tally> {
        let mut tally = Tally::default();
        let mut conn = self.redis.commands();
        for key in &self.keys {
            let mut cursor = "0".to_string();
            loop {
                let entries = read::read_group(
                    &mut conn,
                    &self.config.name,
                    &self.consumer_name,
                    std::slice::from_ref(key),
                    &cursor,
                    self.read_count(&mut self.redis.commands()).await,
                    None,
                )
                .await?;
                self.observe(&entries);
                let Some(last) = entries.last() else { break };
                cursor = last.id.clone();
                // read_group indexes streams within the keys it was given; map back.
                let stream = self.keys.iter().position(|k| k == key).unwrap_or(0);
                let entries = entries
                    .into_iter()
                    .map(|mut e| {
                        e.stream = stream;
                        e
                    })
                    .collect();
                tally.add(&self.process(entries, false).await?);
            }
        }
        Ok(tally)
    }

    /// Entries idle longer than `claim_idle_ms` in any consumer of the group, this one's
    /// failed entries included: claimed and processed.
    async fn claim_pass(&self) -> Result<Tally> {
        let mut tally = Tally::default();
        let mut conn = self.redis.commands();
        for (stream, key) in self.keys.iter().enumerate() {
            let entries = read::autoclaim(
                &mut conn,
                stream,
                key,
                &self.config.name,
                &self.consumer_name,
                self.config.claim_idle_ms,
                self.read_count(&mut self.redis.commands()).await,
            )
            .await?;
            self.observe(&entries);
            if !entries.is_empty() {
                tracing::info!(consumer = %self.config.name, stream = %key, entries = entries.len(), "claimed idle pending entries");
                tally.add(&self.process(entries, false).await?);
            }
        }
        Ok(tally)
    }

    /// New entries for this consumer, up to `count` per read. On a single Redis one
    /// `XREADGROUP` over every stream, blocking up to `block_ms`; on a cluster, whose streams
    /// live on different shards (a multi-key read would cross slots), one non-blocking read
    /// per stream, all at once.
    async fn read_new(
        &self,
        conn: &mut crate::redis_io::Conn,
        count: usize,
        block_ms: Option<u64>,
    ) -> Result<Vec<Entry>> {
        let count = count.min(self.read_count(&mut self.redis.commands()).await);
        if !self.redis.is_cluster() {
            let entries = read::read_group(
                conn,
                &self.config.name,
                &self.consumer_name,
                &self.keys,
                ">",
                count,
                block_ms,
            )
            .await?;
            self.observe(&entries);
            return Ok(entries);
        }
        let reads = self.keys.iter().enumerate().map(|(stream, key)| {
            let mut conn = conn.clone();
            async move {
                let entries = read::read_group(
                    &mut conn,
                    &self.config.name,
                    &self.consumer_name,
                    std::slice::from_ref(key),
                    ">",
                    count,
                    None,
                )
                .await?;
                Ok::<Vec<Entry>, Error>(
                    entries
                        .into_iter()
                        .map(|mut e| {
                            e.stream = stream;
                            e
                        })
                        .collect(),
                )
            }
        });
        let mut out = Vec::new();
        for entries in futures_util::future::join_all(reads).await {
            out.extend(entries?);
        }
        self.observe(&out);
        Ok(out)
    }

    /// Handles one batch: dead-letters what cannot be handled, applies the rest in one
    /// transaction, acknowledges after the commit.
    pub async fn process(&self, entries: Vec<Entry>, fresh: bool) -> Result<Tally> {
        let started = Instant::now();
        let mut tally = Tally::default();
        if entries.is_empty() {
            return Ok(tally);
        }
        let large = carries_large_entries(&entries);
        let _large_work = if large {
            Some(crate::large_work::lock().await)
        } else {
            None
        };
        let mut conn = self.redis.commands();
        // Delivery counts matter only for entries delivered before (pending or claimed).
        let mut counts: HashMap<String, u64> = HashMap::new();
        if !fresh {
            for (stream, key) in self.keys.iter().enumerate() {
                let ids: Vec<&str> = entries
                    .iter()
                    .filter(|e| e.stream == stream)
                    .map(|e| e.id.as_str())
                    .collect();
                counts
                    .extend(read::delivery_counts(&mut conn, key, &self.config.name, &ids).await?);
            }
        }
        let deliveries = |e: &Entry| counts.get(&e.id).copied().unwrap_or(1);

        let mut dead: Vec<(usize, String)> = Vec::new();
        let mut work: Vec<Work> = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            if !entry.present {
                dead.push((
                    i,
                    "entry was deleted from the stream before it was acknowledged".into(),
                ));
                continue;
            }
            let n = deliveries(entry);
            if n > u64::from(self.config.max_deliveries) {
                dead.push((
                    i,
                    format!(
                        "delivered {n} times without being acknowledged (max_deliveries = {})",
                        self.config.max_deliveries
                    ),
                ));
                continue;
            }
            match decode(entry.data(), &self.topics[entry.stream]) {
                Ok(event) => {
                    let hash = data_hash(&event.data);
                    let lock_key = self.handler.lock_key(&event);
                    work.push(Work {
                        entry: i,
                        event,
                        hash,
                        lock_key,
                    });
                }
                Err(e) => dead.push((i, e.to_string())),
            }
        }
        // Stable: entries of one order keep their stream order.
        work.sort_by(|a, b| a.lock_key.cmp(&b.lock_key));

        let mut failed: Vec<(usize, HandleError)> = Vec::new();
        let mut skips: Vec<(&'static str, String, usize)> = Vec::new();
        let mut transitions: Vec<(String, String)> = Vec::new();
        let mut handled: Vec<usize> = Vec::new();
        loop {
            let excluded: HashSet<usize> = failed.iter().map(|(i, _)| *i).collect();
            let active: Vec<&Work> = work
                .iter()
                .filter(|w| !excluded.contains(&w.entry))
                .collect();
            skips.clear();
            transitions.clear();
            handled.clear();
            // Every step of the transaction is bounded: a connection that stops answering
            // fails the batch (its entries stay pending), and the pool's checkout check
            // throws that connection away instead of handing it out again.
            let bound = self.query_timeout;
            let ctx = format!("consumer {}: applying a batch", self.config.name);
            let mut client = crate::db::bounded(bound, &ctx, async {
                self.pool.get().await.map_err(Error::pool(format!(
                    "consumer {}: getting a connection",
                    self.config.name
                )))
            })
            .await?;
            let tx = crate::db::bounded(bound, &ctx, async {
                client.transaction().await.map_err(Error::pg(ctx.clone()))
            })
            .await?;
            let mut new_ids: HashSet<String> = HashSet::new();
            if !active.is_empty() {
                let event_ids: Vec<&str> =
                    active.iter().map(|w| w.event.event_id.as_str()).collect();
                let streams: Vec<&str> = active
                    .iter()
                    .map(|w| self.keys[entries[w.entry].stream].as_str())
                    .collect();
                let entry_ids: Vec<&str> = active
                    .iter()
                    .map(|w| entries[w.entry].id.as_str())
                    .collect();
                let hashes: Vec<i64> = active.iter().map(|w| w.hash).collect();
                let inserted = crate::db::bounded(bound, &ctx, async {
                    let insert = tx
                        .prepare_cached(&self.inbox_insert)
                        .await
                        .map_err(Error::pg(ctx.clone()))?;
                    tx.query(
                        &insert,
                        &[&self.config.name, &event_ids, &streams, &entry_ids, &hashes],
                    )
                    .await
                    .map_err(Error::pg(ctx.clone()))
                })
                .await?;
                for row in inserted {
                    new_ids.insert(row.get(0));
                }
            }
            let mut duplicates: Vec<&Work> = Vec::new();
            let mut to_apply: Vec<&Work> = Vec::new();
            for w in &active {
                // The first occurrence of a new event ID is applied; any other is a duplicate.
                if new_ids.remove(&w.event.event_id) {
                    to_apply.push(w);
                } else {
                    duplicates.push(w);
                    handled.push(w.entry);
                }
            }
            // Events of different orders are independent, so their statements are pipelined
            // on the connection: one group per order, each in stream order. Events without a
            // lock key (the sql handler) form one group, applied strictly in stream order.
            let mut groups: Vec<Vec<&Work>> = Vec::new();
            let mut unkeyed: Vec<&Work> = Vec::new();
            for w in to_apply {
                match (&w.lock_key, groups.last_mut()) {
                    (None, _) => unkeyed.push(w),
                    (Some(k), Some(g)) if g[0].lock_key.as_ref() == Some(k) => g.push(w),
                    (Some(_), _) => groups.push(vec![w]),
                }
            }
            if !unkeyed.is_empty() {
                groups.push(unkeyed);
            }
            let tx_ref = &tx;
            let entries_ref = &entries;
            let handlers = futures_util::future::join_all(groups.iter().map(|group| async move {
                let mut out = Vec::with_capacity(group.len());
                for w in group {
                    let topic = &self.topics[entries_ref[w.entry].stream];
                    let result = self.handler.handle(tx_ref, topic, &w.event).await;
                    let stop = result.is_err();
                    out.push((w.entry, result));
                    if stop {
                        break;
                    }
                }
                out
            }));
            let results =
                crate::db::bounded(bound, &ctx, async { Ok::<_, Error>(handlers.await) }).await?;
            let mut retry_batch = false;
            for (entry, result) in results.into_iter().flatten() {
                match result {
                    Ok(Outcome::Applied { transition }) => {
                        if let Some(t) = transition {
                            transitions.push(t);
                        }
                        handled.push(entry);
                    }
                    Ok(Outcome::Skipped { code, reason }) => {
                        skips.push((code, reason, entry));
                        handled.push(entry);
                    }
                    Err(HandleError::Transient(e)) => return Err(e),
                    // Another event's failure aborted the transaction under this one: it is
                    // not at fault and goes again in the redone batch.
                    Err(HandleError::Aborted) => retry_batch = true,
                    Err(e) => {
                        failed.push((entry, e));
                        retry_batch = true;
                    }
                }
            }
            if retry_batch {
                crate::db::bounded(bound, &ctx, async {
                    tx.rollback().await.map_err(Error::pg(ctx.clone()))
                })
                .await?;
                continue;
            }
            if !duplicates.is_empty() {
                tally.conflicts +=
                    crate::db::bounded(bound, &ctx, self.count_conflicts(&tx, &duplicates)).await?;
            }
            crate::db::bounded(bound, &ctx, async {
                tx.commit().await.map_err(Error::pg(ctx.clone()))
            })
            .await?;
            if large {
                // closed, not pooled: it would keep buffers this large for as long as it lives
                drop(deadpool_postgres::Object::take(client));
            }
            tally.duplicate = duplicates.len() as u64;
            break;
        }
        let committed_at = std::time::SystemTime::now();

        // Acknowledge everything the commit covered, in one round trip.
        let mut acks: Vec<Vec<&str>> = vec![Vec::new(); self.keys.len()];
        for &i in &handled {
            acks[entries[i].stream].push(entries[i].id.as_str());
        }
        let acks: Vec<(String, redis::Cmd)> = acks
            .iter()
            .enumerate()
            .filter(|(_, ids)| !ids.is_empty())
            .map(|(stream, ids)| {
                let mut cmd = redis::cmd("XACK");
                cmd.arg(&self.keys[stream]).arg(&self.config.name).arg(ids);
                (self.keys[stream].clone(), cmd)
            })
            .collect();
        let xack = |e| Error::redis(format!("consumer {}: XACK", self.config.name))(e);
        for reply in crate::redis_io::pipeline_by_key(&mut conn, acks)
            .await
            .map_err(xack)?
        {
            reply.map_err(xack)?;
        }
        if large {
            // the shared connection may have carried them (pending and claimed entries)
            conn.renew().await;
        }

        // Failures: permanent ones now, retryable ones when out of deliveries.
        for (i, err) in failed {
            let entry = &entries[i];
            let permanent = matches!(err, HandleError::Permanent(_));
            let n = if fresh && !permanent {
                read::delivery_counts(
                    &mut conn,
                    &self.keys[entry.stream],
                    &self.config.name,
                    &[entry.id.as_str()],
                )
                .await?
                .get(&entry.id)
                .copied()
                .unwrap_or(1)
            } else {
                deliveries(entry)
            };
            if permanent || n >= u64::from(self.config.max_deliveries) {
                dead.push((i, err.to_string()));
            } else {
                tally.retrying += 1;
                metrics()
                    .consumer_errors
                    .with_label_values(&[&self.config.name, "handler"])
                    .inc();
                let (event_id, aggregate_id) = ids_of(&work, i);
                tracing::warn!(consumer = %self.config.name, entry_id = %entry.id, event_id, aggregate_id, deliveries = n, error = %err, "event failed; it stays pending and is retried");
            }
        }
        for (i, reason) in &dead {
            let entry = &entries[*i];
            let key = &self.keys[entry.stream];
            dlq::dead_letter(
                &mut conn,
                key,
                &self.config.name,
                &self.consumer_name,
                entry,
                reason,
                deliveries(entry).max(1),
            )
            .await?;
            metrics()
                .dead_letters
                .with_label_values(&[&self.config.name, key])
                .inc();
            let (event_id, aggregate_id) = ids_of(&work, *i);
            tracing::error!(consumer = %self.config.name, stream = %key, entry_id = %entry.id, event_id, aggregate_id, reason, "dead-lettered");
        }
        tally.dead_lettered = dead.len() as u64;
        tally.skipped = skips.len() as u64;
        tally.applied = (handled.len() as u64).saturating_sub(tally.duplicate + tally.skipped);

        let m = metrics();
        let name = self.config.name.as_str();
        for (code, reason, i) in &skips {
            m.order_skips.with_label_values(&[code]).inc();
            let event = work.iter().find(|w| w.entry == *i);
            tracing::info!(
                consumer = name,
                entry_id = %entries[*i].id,
                event_id = event.map(|w| w.event.event_id.as_str()).unwrap_or(""),
                aggregate_id = event.and_then(|w| w.lock_key.as_deref()).unwrap_or(""),
                reason = %reason,
                "event skipped"
            );
        }
        for (from, to) in &transitions {
            m.order_transitions.with_label_values(&[from, to]).inc();
        }
        for (result, n) in [
            ("applied", tally.applied),
            ("duplicate", tally.duplicate),
            ("skipped", tally.skipped),
            ("dead_lettered", tally.dead_lettered),
        ] {
            if n > 0 {
                m.consumer_events
                    .with_label_values(&[name, result])
                    .inc_by(n);
            }
        }
        for w in &work {
            if let Some(created) = w
                .event
                .envelope
                .get("time")
                .and_then(|t| t.as_str())
                .and_then(parse_rfc3339)
            {
                if let Ok(age) = committed_at.duration_since(created) {
                    m.end_to_end_seconds.observe(age.as_secs_f64());
                }
            }
        }
        m.consumer_batch_seconds
            .with_label_values(&[name])
            .observe(started.elapsed().as_secs_f64());
        Ok(tally)
    }

    async fn count_conflicts(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        duplicates: &[&Work],
    ) -> Result<u64> {
        let ids: Vec<&str> = duplicates
            .iter()
            .map(|w| w.event.event_id.as_str())
            .collect();
        let rows = tx
            .query(&self.inbox_hashes, &[&self.config.name, &ids])
            .await
            .map_err(Error::pg(format!(
                "consumer {}: reading inbox hashes",
                self.config.name
            )))?;
        let stored: HashMap<String, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let mut conflicts = 0;
        for w in duplicates {
            if stored.get(&w.event.event_id).is_some_and(|h| *h != w.hash) {
                conflicts += 1;
                tracing::warn!(consumer = %self.config.name, event_id = %w.event.event_id, "same event ID arrived with different data; the first one was applied, this one is ignored");
            }
        }
        if conflicts > 0 {
            metrics()
                .consumer_events
                .with_label_values(&[&self.config.name, "conflict"])
                .inc_by(conflicts);
        }
        Ok(conflicts)
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
                .arg(&self.consumer_name)
                .query_async(&mut conn)
                .await;
            if matches!(mine, Ok(redis::Value::Array(ref held)) if held.is_empty()) {
                let _: redis::RedisResult<i64> = redis::cmd("XGROUP")
                    .arg("DELCONSUMER")
                    .arg(key)
                    .arg(&self.config.name)
                    .arg(&self.consumer_name)
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
        let watch = crate::watchdog::register(&format!("consumer {}", self.config.name));
        tracing::info!(consumer = %self.config.name, instance = %self.consumer_name, "consumer started");
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            watch.busy();
            let step = async {
                if rescan {
                    self.ensure_groups().await?;
                    self.pending_pass().await?;
                    rescan = false;
                }
                if last_claim.elapsed() >= claim_every {
                    last_claim = Instant::now();
                    self.claim_pass().await?;
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
                                    return Ok(false);
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
                let large = carries_large_entries(&entries);
                self.process(entries, true).await?;
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
                    metrics()
                        .consumer_errors
                        .with_label_values(&[&self.config.name, "transient"])
                        .inc();
                    watch.failed(&crate::error::chain(&e));
                    crate::db::after_failure(&self.pool, &e);
                    let delay = backoff.next_delay();
                    tracing::warn!(consumer = %self.config.name, error = %crate::error::chain(&e), retry_in_ms = delay.as_millis() as u64, "consumer batch failed; backing off");
                    blocking = None;
                    rescan = true;
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(e) => return Err(e),
            }
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
                loop {
                    if shutdown.is_cancelled() {
                        break;
                    }
                    let entries = self
                        .read_new(&mut conn, self.config.batch_size as usize, None)
                        .await?;
                    if entries.is_empty() {
                        break;
                    }
                    round.add(&self.process(entries, true).await?);
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

/// The event ID and aggregate ID (the order, for `order_status`) of entry `entry` of a batch,
/// for the logs; empty where the entry could not be read that far.
fn ids_of(work: &[Work], entry: usize) -> (&str, &str) {
    work.iter()
        .find(|w| w.entry == entry)
        .map_or(("", ""), |w| {
            (
                w.event.event_id.as_str(),
                w.lock_key.as_deref().unwrap_or(""),
            )
        })
}

fn is_missing_group(e: &Error) -> bool {
    matches!(e, Error::Redis { source, .. } if source.code() == Some("NOGROUP"))
}

fn default_consumer_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "outboxd".into());
    format!("{host}-{}", std::process::id())
}

/// FNV-1a over the event data's JSON (keys sorted by serde_json's map), to notice the same
/// event ID arriving with other data.
fn data_hash(data: &serde_json::Value) -> i64 {
    let text = data.to_string();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

/// Parses the `YYYY-MM-DDTHH:MM:SS[.fraction](Z|+HH:MM)` times outboxd and most producers
/// write; anything else is `None` (it only feeds a latency metric).
pub fn parse_rfc3339(s: &str) -> Option<std::time::SystemTime> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || (b[10] != b'T' && b[10] != b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut i = 19;
    let mut nanos: i64 = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let frac = s.get(start..i)?;
        let digits = frac.len().min(9);
        nanos = frac.get(..digits)?.parse::<i64>().ok()? * 10_i64.pow((9 - digits) as u32);
    }
    let offset = match s.get(i..)? {
        "Z" | "z" => 0,
        tz if tz.len() == 6 => {
            let sign = if tz.starts_with('-') { -1 } else { 1 };
            sign * (tz.get(1..3)?.parse::<i64>().ok()? * 3600
                + tz.get(4..6)?.parse::<i64>().ok()? * 60)
        }
        _ => return None,
    };
    // days from civil (Howard Hinnant's algorithm)
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset;
    let secs = u64::try_from(secs).ok()?;
    Some(std::time::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_nanos(nanos as u64))
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

/// `consume --once` for every configured consumer, with a summary line each.
pub async fn consume_once(
    config: &Config,
    give_up_after: Duration,
    shutdown: &CancellationToken,
) -> Result<()> {
    let pools = crate::app::pools(config)?;
    let redis = Redis::for_config(config)?;
    let mut consumers = build_all(config, &pools, &redis)?;
    for consumer in &mut consumers {
        consumer.set_give_up_after(give_up_after);
    }
    if consumers.is_empty() {
        return Err(crate::config::ConfigError::new("consumers", "no consumer configured").into());
    }
    for consumer in consumers {
        let started = Instant::now();
        let t = consumer.drain(shutdown).await?;
        consumer.forget_self().await;
        let secs = started.elapsed().as_secs_f64();
        crate::outln!(
            "consume {}: {} events in {:.3} s ({:.0} events/s): {} applied, {} duplicate, {} skipped, {} dead-lettered",
            consumer.name(),
            t.handled(),
            secs,
            if secs > 0.0 { t.handled() as f64 / secs } else { 0.0 },
            t.applied,
            t.duplicate,
            t.skipped,
            t.dead_lettered
        );
    }
    Ok(())
}

/// Whether any of `entries` is large (see [`crate::large_work`]).
fn carries_large_entries(entries: &[Entry]) -> bool {
    entries.iter().any(|e| {
        e.fields
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
            >= crate::large_work::LARGE_EVENT_BYTES
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        let t = parse_rfc3339("1970-01-02T00:00:01.5Z").expect("parses");
        assert_eq!(t, std::time::UNIX_EPOCH + Duration::from_millis(86_401_500));
        let t = parse_rfc3339("2026-11-22T08:00:00+01:00").expect("parses");
        let u = parse_rfc3339("2026-11-22T07:00:00Z").expect("parses");
        assert_eq!(t, u);
        assert!(parse_rfc3339("yesterday").is_none());
    }

    #[test]
    fn hash_is_key_order_independent() {
        let a: serde_json::Value = serde_json::from_str(r#"{"a":1,"b":2}"#).expect("json");
        let b: serde_json::Value = serde_json::from_str(r#"{"b":2,"a":1}"#).expect("json");
        assert_eq!(data_hash(&a), data_hash(&b));
    }
}
