//! The relay: outbox rows -> Redis Streams. One `Relay` per configured outbox table. A batch
//! is one PostgreSQL transaction: claim (see `claim`), publish with one pipelined round trip
//! (see `publish`), delete what was published, record what Redis rejected, commit. A crash
//! anywhere before the commit leaves the rows in place to be published again (duplicates on
//! the stream are harmless to inbox consumers); nothing is deleted before Redis accepted it.

pub mod claim;
pub mod publish;

use crate::config::{ConfigError, RelayConfig};
use crate::db::quote_qualified;
use crate::envelope::{encode_into, Outgoing};
use crate::error::{Error, Result};
use crate::redis_io::Redis;
use crate::telemetry::metrics;
use claim::Statements;
use deadpool_postgres::Pool;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Up to this many rows outside the batch before its end, the head-of-aggregate check reads
/// them and decides in the relay (one index range scan); beyond, it is one SQL statement
/// probing per aggregate.
const SMALL_GAP_ROWS: i64 = 20_000;

/// Below this many rows (by the planner's estimate) the backlog is counted exactly.
const EXACT_COUNT_BELOW: f32 = 1_000_000.0;

/// What one batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Rows claimed (locked) by this batch.
    pub claimed: usize,
    /// Rows published and deleted.
    pub published: usize,
    /// Rows Redis (or the size limit) rejected: attempt recorded.
    pub failed: usize,
    /// Of those, rows that reached max_attempts and were quarantined.
    pub quarantined: usize,
}

/// A session whose open transaction holds rows back.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Blocker {
    pub pid: i32,
    pub xact_age_seconds: f64,
    pub query: String,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct HeldBack {
    pub rows: i64,
    pub blockers: Vec<Blocker>,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Backlog {
    pub rows: i64,
    /// `rows` is the planner's estimate (the table is too large to count on every call).
    pub estimated: bool,
    pub quarantined: i64,
    pub oldest_age_seconds: Option<f64>,
}

pub struct Relay {
    database: String,
    table: String,
    pool: Pool,
    pg: crate::db::PgTarget,
    redis: Redis,
    config: RelayConfig,
    source: String,
    sql: Statements,
    relid: Option<u32>,
    buf: Vec<u8>,
    /// Stream keys this relay has published to: they hold streams, so the type check before
    /// publishing skips them (one round trip less per batch). Forgotten when Redis rejects
    /// an entry, since a key can be deleted and recreated as another type.
    known_streams: HashSet<String>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("database", &self.database)
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl Relay {
    pub fn new(config: RelayConfig, pool: Pool, pg: crate::db::PgTarget, redis: Redis) -> Relay {
        let quoted = quote_qualified(&config.table);
        let source = config
            .source
            .clone()
            .unwrap_or_else(|| format!("outboxd/{}", config.database));
        Relay {
            database: config.database.clone(),
            table: config.table.clone(),
            sql: Statements::for_table(
                &quoted,
                &quote_qualified(&crate::migrate::archive_table(&config.table)),
            ),
            pool,
            pg,
            redis,
            config,
            source,
            relid: None,
            buf: Vec::with_capacity(1024),
            known_streams: HashSet::new(),
        }
    }

    pub fn name(&self) -> String {
        format!("{}.{}", self.database, self.table)
    }

    fn ctx(&self, what: &str) -> String {
        format!("relay {}.{}: {what}", self.database, self.table)
    }

    /// The table's oid: the key of its advisory locks and NOTIFY channel.
    async fn relid(&mut self, client: &deadpool_postgres::Client) -> Result<u32> {
        if let Some(relid) = self.relid {
            return Ok(relid);
        }
        let row = client
            .query_one(
                "SELECT to_regclass($1)::oid",
                &[&quote_qualified(&self.table)],
            )
            .await
            .map_err(Error::pg(self.ctx("looking up the table")))?;
        let relid: Option<u32> = row.get(0);
        let relid = relid.ok_or_else(|| {
            Error::Other(format!(
                "{}: table {} does not exist in database {} (run `outboxd migrate`)",
                self.ctx("startup"),
                self.table,
                self.database
            ))
        })?;
        self.relid = Some(relid);
        Ok(relid)
    }

    /// Claims, publishes and deletes one batch.
    pub async fn run_batch(&mut self) -> Result<BatchOutcome> {
        let started = Instant::now();
        let mut client = self
            .pool
            .get()
            .await
            .map_err(Error::pool(self.ctx("getting a connection")))?;
        let relid = self.relid(&client).await?;
        let limit = i64::from(self.config.batch_size);
        let ctx_claim = self.ctx("claiming a batch");
        let tx = client
            .transaction()
            .await
            .map_err(Error::pg(ctx_claim.clone()))?;
        // A relay commit only deletes rows Redis already holds. If a crash loses it, the rows
        // are published again, which is the at-least-once contract anyway, so the commit
        // need not wait for the WAL flush (it is still ordered and atomic).
        let claim = tx
            .prepare_cached(&self.sql.claim)
            .await
            .map_err(Error::pg(ctx_claim.clone()))?;
        // Sent together: the connection runs them in order, one round trip for both.
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&relid, &limit];
        let (set, rows) = tokio::join!(
            tx.batch_execute("SET LOCAL synchronous_commit = off"),
            tx.query(&claim, &params)
        );
        set.map_err(Error::pg(ctx_claim.clone()))?;
        let rows = rows.map_err(Error::pg(ctx_claim.clone()))?;
        let mut outcome = BatchOutcome {
            claimed: rows.len(),
            ..BatchOutcome::default()
        };
        if rows.is_empty() {
            tx.rollback().await.map_err(Error::pg(ctx_claim))?;
            return Ok(outcome);
        }
        let ids: Vec<i64> = rows.iter().map(|r| r.get::<_, i64>(0)).collect();
        let aggregates: Vec<&str> = rows.iter().map(|r| r.get::<_, &str>(3)).collect();
        // Both checks run in statements of their own, so with snapshots taken after the
        // claim's read of pg_locks (see claim.rs).
        let last_id = ids.iter().copied().max().unwrap_or(0);
        let up_to = tx
            .prepare_cached(&self.sql.rows_up_to)
            .await
            .map_err(Error::pg(self.ctx("head-of-table check")))?;
        let rows_up_to: i64 = tx
            .query_one(&up_to, &[&last_id])
            .await
            .map_err(Error::pg(self.ctx("head-of-table check")))?
            .get(0);
        let outside = rows_up_to - ids.len() as i64;
        let publishable: HashSet<i64> = if outside == 0 {
            ids.iter().copied().collect()
        } else if outside <= SMALL_GAP_ROWS {
            let before = tx
                .prepare_cached(&self.sql.rows_before)
                .await
                .map_err(Error::pg(self.ctx("head-of-aggregate check")))?;
            let table_rows = tx
                .query(&before, &[&last_id])
                .await
                .map_err(Error::pg(self.ctx("head-of-aggregate check")))?;
            let in_batch: HashSet<i64> = ids.iter().copied().collect();
            // the first row of each aggregate that is not in the batch: nothing of that
            // aggregate after it may be published
            let mut first_outside: HashMap<&str, i64> = HashMap::new();
            for r in &table_rows {
                let id: i64 = r.get(0);
                if !in_batch.contains(&id) {
                    let e = first_outside.entry(r.get::<_, &str>(1)).or_insert(id);
                    *e = (*e).min(id);
                }
            }
            ids.iter()
                .zip(&aggregates)
                .filter(|(id, agg)| first_outside.get(*agg).is_none_or(|g| **id < *g))
                .map(|(id, _)| *id)
                .collect()
        } else {
            let head = tx
                .prepare_cached(&self.sql.head_of_aggregate)
                .await
                .map_err(Error::pg(self.ctx("head-of-aggregate check")))?;
            tx.query(&head, &[&ids, &aggregates])
                .await
                .map_err(Error::pg(self.ctx("head-of-aggregate check")))?
                .iter()
                .map(|r| r.get::<_, i64>(0))
                .collect()
        };

        // Build the entries in id order. A row that fails locally (too large, unusable topic)
        // stops the rest of its aggregate in this batch, so nothing overtakes it.
        let mut entries: Vec<(String, Vec<u8>)> = Vec::with_capacity(publishable.len());
        let mut entry_rows: Vec<(i64, &str, f64)> = Vec::with_capacity(publishable.len());
        let mut failures: Vec<(i64, String)> = Vec::new();
        let mut stopped: HashSet<&str> = HashSet::new();
        let mut time_buf = String::with_capacity(32);
        let mut conn = self.redis.commands();
        let mut stream_keys: Vec<String> = rows
            .iter()
            .filter(|r| publishable.contains(&r.get::<_, i64>(0)))
            .map(|r| self.redis.stream_key_for(r.get(2), r.get(3)))
            .collect();
        stream_keys.sort_unstable();
        stream_keys.dedup();
        stream_keys.retain(|k| !self.known_streams.contains(k));
        let key_refs: Vec<&str> = stream_keys.iter().map(String::as_str).collect();
        let unusable: HashMap<String, String> = publish::unusable_keys(&mut conn, &key_refs)
            .await?
            .into_iter()
            .collect();
        for row in &rows {
            let id: i64 = row.get(0);
            let aggregate: &str = row.get(3);
            if !publishable.contains(&id) || stopped.contains(aggregate) {
                continue;
            }
            let topic: &str = row.get(2);
            if let Err(e) = crate::config::validate_topic("topic", topic) {
                failures.push((id, format!("unusable topic: {}", e.message)));
                stopped.insert(aggregate);
                continue;
            }
            let key = self.redis.stream_key_for(topic, aggregate);
            if let Some(kind) = unusable.get(&key) {
                failures.push((
                    id,
                    format!("WRONGTYPE: stream key {key} holds a {kind}, not a stream"),
                ));
                stopped.insert(aggregate);
                continue;
            }
            let event_id: &str = row.get(1);
            let payload: &str = row.get(4);
            let traceparent: Option<&str> = row.get(5);
            let created_epoch: f64 = row.get(6);
            crate::envelope::format_rfc3339_micros(created_epoch, &mut time_buf);
            let time = time_buf.as_str();
            let len = encode_into(
                &Outgoing {
                    event_id,
                    source: &self.source,
                    topic,
                    aggregate_id: aggregate,
                    time,
                    payload_json: payload,
                    traceparent,
                },
                &mut self.buf,
            );
            if len > self.config.max_entry_bytes {
                failures.push((
                    id,
                    format!(
                        "envelope is {len} bytes, over max_entry_bytes = {}",
                        self.config.max_entry_bytes
                    ),
                ));
                stopped.insert(aggregate);
                continue;
            }
            entries.push((key, self.buf.clone()));
            entry_rows.push((id, topic, created_epoch));
        }

        // The delete runs while Redis takes the entries: it is undone by the rollback if
        // publishing fails, and nothing commits before Redis has accepted every entry.
        let entry_ids: Vec<i64> = entry_rows.iter().map(|e| e.0).collect();
        let delete_sql = if self.config.archive_retention_hours > 0 {
            &self.sql.delete_to_archive
        } else {
            &self.sql.delete
        };
        let delete = tx
            .prepare_cached(delete_sql)
            .await
            .map_err(Error::pg(self.ctx("deleting published rows")))?;
        let delete_fut = async {
            if entry_ids.is_empty() {
                Ok(0)
            } else {
                tx.execute(&delete, &[&entry_ids]).await
            }
        };
        let (deleted, results) = tokio::join!(delete_fut, publish::publish(&mut conn, &entries));
        let results = results?;
        deleted.map_err(Error::pg(self.ctx("deleting published rows")))?;
        let mut per_topic: HashMap<&str, u64> = HashMap::new();
        let mut rejected = false;
        for ((id, topic, _), result) in entry_rows.iter().zip(results) {
            match result {
                publish::EntryResult::Published => {
                    *per_topic.entry(topic).or_default() += 1;
                }
                publish::EntryResult::Rejected(e) => {
                    failures.push((*id, e));
                    rejected = true;
                }
            }
        }
        if rejected {
            self.known_streams.clear();
            // Redis refused an entry the type check let through (the key changed meanwhile):
            // the delete above removed it too. Undo the batch, charge the refused rows, and let
            // the next batch publish the rest again (duplicates on the stream, which the inbox
            // absorbs).
            tx.rollback()
                .await
                .map_err(Error::pg(self.ctx("rolling back a batch")))?;
            let (failed, quarantined) = self.record_failures(&**client, &failures).await?;
            outcome.failed = failed;
            outcome.quarantined = quarantined;
            self.count_failures(&outcome);
            return Ok(outcome);
        }
        if !failures.is_empty() {
            let (failed, quarantined) = self.record_failures(&*tx, &failures).await?;
            outcome.failed = failed;
            outcome.quarantined = quarantined;
        }
        let published_ids = entry_ids;
        tx.commit()
            .await
            .map_err(Error::pg(self.ctx("committing a batch")))?;
        outcome.published = published_ids.len();
        if self.known_streams.len() > 10_000 {
            self.known_streams.clear();
        }
        for (key, _) in &entries {
            if !self.known_streams.contains(key) {
                self.known_streams.insert(key.clone());
            }
        }

        let m = metrics();
        for (topic, n) in per_topic {
            m.relay_published
                .with_label_values(&[&self.table, topic])
                .inc_by(n);
        }
        self.count_failures(&outcome);
        m.relay_batch_seconds
            .with_label_values(&[&self.table])
            .observe(started.elapsed().as_secs_f64());
        Ok(outcome)
    }

    /// Deletes archived rows older than the retention, in batches; returns how many.
    pub async fn prune_archive(&self) -> Result<u64> {
        let client = self
            .pool
            .get()
            .await
            .map_err(Error::pool(self.ctx("getting a connection")))?;
        let hours = i32::try_from(self.config.archive_retention_hours).unwrap_or(i32::MAX);
        let mut total = 0;
        loop {
            let n = client
                .execute(&self.sql.prune_archive, &[&hours, &5000_i64])
                .await
                .map_err(Error::pg(self.ctx("pruning the archive")))?;
            total += n;
            if n < 5000 {
                return Ok(total);
            }
        }
    }

    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Charges a failed attempt to each row, quarantining those at max_attempts.
    /// Returns (failed, quarantined).
    async fn record_failures<C: tokio_postgres::GenericClient + Sync>(
        &self,
        client: &C,
        failures: &[(i64, String)],
    ) -> Result<(usize, usize)> {
        let ids: Vec<i64> = failures.iter().map(|f| f.0).collect();
        let errors: Vec<&str> = failures.iter().map(|f| f.1.as_str()).collect();
        let max = i32::try_from(self.config.max_attempts).unwrap_or(i32::MAX);
        let updated = client
            .query(&self.sql.record_failures, &[&ids, &errors, &max])
            .await
            .map_err(Error::pg(self.ctx("recording failed rows")))?;
        let mut quarantined = 0;
        for row in &updated {
            let id: i64 = row.get(0);
            let error = failures
                .iter()
                .find(|f| f.0 == id)
                .map(|f| f.1.as_str())
                .unwrap_or("");
            if row.get::<_, bool>(1) {
                quarantined += 1;
                tracing::error!(table = %self.table, row_id = id, error, "outbox row quarantined after max_attempts; `outboxd dlq list` shows it, `outboxd dlq retry` releases it");
            } else {
                tracing::warn!(table = %self.table, row_id = id, error, "Redis rejected an outbox row; will retry");
            }
        }
        Ok((failures.len(), quarantined))
    }

    fn count_failures(&self, outcome: &BatchOutcome) {
        let m = metrics();
        if outcome.failed > 0 {
            m.relay_errors
                .with_label_values(&[&self.table, "row"])
                .inc_by(outcome.failed as u64);
        }
        if outcome.quarantined > 0 {
            m.relay_quarantined
                .with_label_values(&[&self.table])
                .inc_by(outcome.quarantined as u64);
        }
    }

    /// Rows held back by open producer transactions, and the sessions responsible.
    pub async fn held_back(&mut self) -> Result<HeldBack> {
        let client = self
            .pool
            .get()
            .await
            .map_err(Error::pool(self.ctx("getting a connection")))?;
        let relid = self.relid(&client).await?;
        held_back_with(
            &client,
            &self.sql,
            relid,
            &self.ctx("counting held-back rows"),
        )
        .await
    }

    /// Unpublished rows, quarantined rows and the age of the oldest.
    pub async fn backlog(&mut self) -> Result<Backlog> {
        let client = self
            .pool
            .get()
            .await
            .map_err(Error::pool(self.ctx("getting a connection")))?;
        let row = client
            .query_one(
                &self.sql.backlog,
                &[&EXACT_COUNT_BELOW, &quote_qualified(&self.table)],
            )
            .await
            .map_err(Error::pg(self.ctx("measuring the backlog")))?;
        Ok(Backlog {
            rows: row.get::<_, i64>(0).max(0),
            estimated: row.get(1),
            quarantined: row.get(2),
            oldest_age_seconds: row.get(3),
        })
    }

    /// The daemon loop: batches back to back while they come back full, otherwise wait for a
    /// NOTIFY or the poll interval. PostgreSQL or Redis trouble backs off and retries without
    /// counting attempts against rows. Returns when `shutdown` is cancelled (after finishing
    /// the batch in hand), or with an error retrying cannot cure.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<()> {
        let wake = Arc::new(Notify::new());
        let listener = tokio::spawn(listen(
            self.pg.clone(),
            self.name(),
            self.pool.clone(),
            self.table.clone(),
            wake.clone(),
            shutdown.child_token(),
        ));
        let poll = Duration::from_millis(self.config.poll_interval_ms);
        let mut backoff = Backoff::new();
        let mut last_prune: Option<Instant> = None;
        tracing::info!(relay = %self.name(), "relay started");
        let result = loop {
            if shutdown.is_cancelled() {
                break Ok(());
            }
            if self.config.archive_retention_hours > 0
                && last_prune.is_none_or(|t| t.elapsed() > Duration::from_secs(60))
            {
                last_prune = Some(Instant::now());
                match self.prune_archive().await {
                    Ok(n) if n > 0 => {
                        tracing::info!(relay = %self.name(), rows = n, "pruned the archive")
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(relay = %self.name(), error = %crate::error::chain(&e), "pruning the archive failed; will retry")
                    }
                }
            }
            match self.run_batch().await {
                Ok(outcome) => {
                    backoff.reset();
                    if outcome.claimed >= self.config.batch_size as usize && outcome.published > 0 {
                        continue;
                    }
                    // Rows there but none publishable: another relay holds the head of
                    // their aggregates; look again shortly rather than at the poll interval.
                    let wait = if outcome.claimed > 0 && outcome.published == 0 {
                        poll.min(Duration::from_millis(50))
                    } else {
                        poll
                    };
                    let notified = tokio::select! {
                        _ = shutdown.cancelled() => break Ok(()),
                        _ = wake.notified() => true,
                        _ = tokio::time::sleep(wait) => false,
                    };
                    if notified && self.config.linger_ms > 0 {
                        tokio::time::sleep(Duration::from_millis(self.config.linger_ms)).await;
                    }
                }
                Err(e) if e.is_transient() => {
                    metrics()
                        .relay_errors
                        .with_label_values(&[&self.table, "transient"])
                        .inc();
                    let delay = backoff.next_delay();
                    tracing::warn!(relay = %self.name(), error = %crate::error::chain(&e), retry_in_ms = delay.as_millis() as u64, "relay batch failed; backing off");
                    tokio::select! {
                        _ = shutdown.cancelled() => break Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(e) => break Err(e),
            }
        };
        listener.abort();
        tracing::info!(relay = %self.name(), "relay stopped");
        result
    }

    /// `relay --once`: publish everything publishable now, then report what is held back.
    /// With `wait_held`, keep going for up to that long while open transactions hold rows.
    pub async fn drain(
        &mut self,
        wait_held: Option<Duration>,
        shutdown: &CancellationToken,
        mut progress: impl FnMut(u64),
    ) -> Result<DrainSummary> {
        let started = Instant::now();
        let mut summary = DrainSummary::default();
        let mut backoff = Backoff::new();
        let mut transient_since: Option<Instant> = None;
        let mut idle_rounds = 0;
        let deadline = wait_held.map(|d| started + d);
        let mut waited_on_held = false;
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            match self.run_batch().await {
                Ok(outcome) => {
                    backoff.reset();
                    transient_since = None;
                    summary.published += outcome.published as u64;
                    summary.failed += outcome.failed as u64;
                    summary.quarantined += outcome.quarantined as u64;
                    progress(summary.published);
                    if outcome.published > 0 || outcome.failed > 0 {
                        idle_rounds = 0;
                        continue;
                    }
                    if outcome.claimed > 0 && idle_rounds < 20 {
                        // another relay holds the heads of these aggregates for a moment
                        idle_rounds += 1;
                        tokio::time::sleep(Duration::from_millis(25)).await;
                        continue;
                    }
                    if let Some(deadline) = deadline {
                        if Instant::now() < deadline && self.held_back().await?.rows > 0 {
                            waited_on_held = true;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                        // The blocker may have ended between the last claim and this check:
                        // claim once more before concluding there is nothing left.
                        if waited_on_held {
                            waited_on_held = false;
                            continue;
                        }
                    }
                    break;
                }
                Err(e) if e.is_transient() => {
                    let since = *transient_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_secs(60) {
                        return Err(e);
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(relay = %self.name(), error = %crate::error::chain(&e), "relay --once batch failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e),
            }
        }
        summary.seconds = started.elapsed().as_secs_f64();
        summary.held_back = self.held_back().await?;
        Ok(summary)
    }
}

#[derive(Debug, Default, Clone, PartialEq, serde::Serialize)]
pub struct DrainSummary {
    pub published: u64,
    pub failed: u64,
    pub quarantined: u64,
    pub seconds: f64,
    pub held_back: HeldBack,
}

impl DrainSummary {
    pub fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.published as f64 / self.seconds
        } else {
            0.0
        }
    }
}

pub async fn held_back_with(
    client: &tokio_postgres::Client,
    sql: &Statements,
    relid: u32,
    ctx: &str,
) -> Result<HeldBack> {
    let rows: i64 = client
        .query_one(&sql.held_back_rows, &[&relid])
        .await
        .map_err(Error::pg(ctx))?
        .get(0);
    if rows == 0 {
        return Ok(HeldBack::default());
    }
    let blockers = client
        .query(&sql.blockers, &[&relid])
        .await
        .map_err(Error::pg(ctx))?
        .iter()
        .map(|r| Blocker {
            pid: r.get(0),
            xact_age_seconds: r.get(1),
            query: r.get(2),
        })
        .collect();
    Ok(HeldBack { rows, blockers })
}

/// Keeps a dedicated connection LISTENing on the table's channel and wakes the relay on each
/// notification. deadpool's pooled connections drop notifications, so this one is driven by
/// hand (`poll_message`). Reconnects with backoff; the relay's poll interval covers the gaps.
async fn listen(
    pg: crate::db::PgTarget,
    relay: String,
    pool: Pool,
    table: String,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new();
    loop {
        let wake = wake.clone();
        let attempt = async {
            let client = pool.get().await.map_err(|e| e.to_string())?;
            let relid: Option<u32> = client
                .query_one("SELECT to_regclass($1)::oid", &[&quote_qualified(&table)])
                .await
                .map_err(|e| e.to_string())?
                .get(0);
            drop(client);
            let relid = relid.ok_or_else(|| format!("table {table} does not exist"))?;
            let (client, mut connection) = crate::db::connect_dedicated(&pg)
                .await
                .map_err(|e| e.to_string())?;
            let channel = format!("outboxd_{relid}");
            let driver = async move {
                while let Some(message) =
                    std::future::poll_fn(|cx| connection.poll_message(cx)).await
                {
                    match message {
                        Ok(tokio_postgres::AsyncMessage::Notification(_)) => wake.notify_one(),
                        Ok(_) => {}
                        Err(e) => return e.to_string(),
                    }
                }
                "connection closed".to_string()
            };
            let listen = async {
                client
                    .batch_execute(&format!("LISTEN {}", crate::db::quote_ident(&channel)))
                    .await
                    .map_err(|e| e.to_string())?;
                tracing::debug!(relay, channel, "listening");
                std::future::pending::<()>().await;
                Ok::<(), String>(())
            };
            // The driver must run for LISTEN to complete; it ends when the connection does.
            tokio::select! {
                reason = driver => Err(reason),
                r = listen => r,
            }
        };
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = attempt => r,
        };
        if let Err(reason) = result {
            let delay = backoff.next_delay();
            tracing::debug!(
                relay,
                reason,
                "LISTEN connection lost; polling until it is back"
            );
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}

/// Exponential backoff with jitter (from `backon`, which the redis crate already uses),
/// 100 ms doubling to 10 s, never giving up on its own.
#[derive(Debug)]
pub struct Backoff {
    iter: backon::ExponentialBackoff,
}

impl Backoff {
    pub fn new() -> Backoff {
        use backon::BackoffBuilder;
        Backoff {
            iter: backon::ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(10))
                .with_jitter()
                .without_max_times()
                .build(),
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        self.iter.next().unwrap_or(Duration::from_secs(10))
    }

    pub fn reset(&mut self) {
        *self = Backoff::new();
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new()
    }
}

/// Builds every configured relay.
pub fn build_all(
    config: &crate::config::Config,
    pools: &HashMap<String, Pool>,
    redis: &Redis,
) -> Result<Vec<Relay>, ConfigError> {
    config
        .relays
        .iter()
        .map(|r| {
            let pool = pools
                .get(&r.database)
                .ok_or_else(|| ConfigError::new("relays.database", "unknown database"))?
                .clone();
            let pg = crate::db::pg_config(&r.database, config.database(&r.database)?)?;
            Ok(Relay::new(r.clone(), pool, pg, redis.clone()))
        })
        .collect()
}
