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
use crate::retry::Backoff;
use crate::telemetry::metrics;
use claim::Statements;
use deadpool_postgres::Pool;
use futures_util::StreamExt;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

/// Up to this many rows outside the batch before its end, the head-of-aggregate check reads
/// them and decides in the relay (one index range scan); beyond, it is one SQL statement
/// probing per aggregate.
const SMALL_GAP_ROWS: i64 = 20_000;

/// Below this many rows (by the statistics' live-tuple count) the backlog is counted exactly.
const EXACT_COUNT_BELOW: i64 = 1_000_000;

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

/// What a run of pipelined batches did (see [`Relay::pipeline`]).
#[derive(Debug, Default)]
pub struct PipelineRun {
    /// The batches' outcomes, summed.
    pub outcome: BatchOutcome,
    /// A batch claimed rows and could publish none of them: other relays hold the heads of
    /// their aggregates for the moment.
    pub stalled: bool,
    /// The first error of a batch; the batches beside it still finished.
    pub error: Option<Error>,
}

/// One claimed outbox row, in the claim's column order (see `claim.rs`).
struct OutboxRow<'a> {
    id: i64,
    /// The row's physical address, for the delete: stable while this transaction holds the
    /// row lock.
    ctid: &'a str,
    // uuid and timestamptz come in binary: PostgreSQL formatting them as text costs more
    // than doing it here
    event_id: uuid::Uuid,
    topic: &'a str,
    aggregate_id: &'a str,
    payload: &'a str,
    traceparent: Option<&'a str>,
    created_at: std::time::SystemTime,
}

impl<'a> OutboxRow<'a> {
    /// `payload`: the claim's payload column (read once by the caller), else the one read
    /// apart (a large one).
    fn from_claim(row: &'a tokio_postgres::Row, payload: Option<&'a str>) -> OutboxRow<'a> {
        OutboxRow {
            id: row.get(0),
            event_id: row.get(1),
            topic: row.get(2),
            aggregate_id: row.get(3),
            payload: payload.unwrap_or("null"),
            traceparent: row.get(5),
            created_at: row.get(6),
            ctid: row.get(7),
        }
    }
}

/// What a batch tells the pipeline once it has claimed.
#[derive(Debug, Clone, Copy)]
struct Claimed {
    /// The claim came back full: there is probably more.
    full: bool,
    /// The last id claimed (claims are in id order).
    last_id: i64,
    /// It holds large payloads: no second batch beside it, so that memory stays within
    /// about one batch's byte budget.
    heavy: bool,
}

/// A finished batch, and whether it was the whole head of the table (no row at or below its
/// last id outside it), which lets the next batch start before it has committed.
#[derive(Debug)]
struct Finished {
    outcome: BatchOutcome,
    clean: bool,
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
    /// Stream keys this relay has published to: they hold streams, so the type check before
    /// publishing skips them (one round trip less per batch). Forgotten when Redis rejects
    /// an entry, since a key can be deleted and recreated as another type. Shared by the
    /// batches in flight; never held across an await.
    known_streams: Mutex<HashSet<String>>,
    /// `relay --once`: how long a server may stay away or silent before the drain gives up.
    give_up_after: Duration,
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
            known_streams: Mutex::new(HashSet::new()),
            give_up_after: Duration::from_secs(60),
        }
    }

    pub fn name(&self) -> String {
        format!("{}.{}", self.database, self.table)
    }

    /// How long `drain` retries a server that is away or not answering (default 60 s).
    pub fn set_give_up_after(&mut self, after: Duration) {
        self.give_up_after = after;
    }

    fn ctx(&self, what: &str) -> String {
        format!("relay {}.{}: {what}", self.database, self.table)
    }

    /// The table's oid: the key of its advisory locks and NOTIFY channel.
    async fn relid(&mut self) -> Result<u32> {
        if let Some(relid) = self.relid {
            return Ok(relid);
        }
        let ctx = self.ctx("startup checks");
        let relid = crate::db::bounded(self.pg.query_timeout, &ctx, self.startup_checks()).await?;
        self.relid = Some(relid);
        Ok(relid)
    }

    /// The table's oid, after checking that its id sequence hands out ids one at a time.
    async fn startup_checks(&self) -> Result<u32> {
        let client = self
            .pool
            .get()
            .await
            .map_err(Error::pool(self.ctx("getting a connection")))?;
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
        // Commit-order safety rests on ids following the order in which they are handed out
        // (see 0001_outbox.sql): a sequence that caches ids per session breaks that, silently.
        let cached = client
            .query_opt(
                "SELECT s.seqrelid::regclass::text, s.seqcache FROM pg_catalog.pg_sequence s
                 WHERE s.seqrelid = pg_catalog.pg_get_serial_sequence($1, 'id')::regclass",
                &[&quote_qualified(&self.table)],
            )
            .await
            .map_err(Error::pg(self.ctx("checking the id sequence")))?;
        if let Some(row) = cached {
            let (sequence, cache): (String, i64) = (row.get(0), row.get(1));
            if cache > 1 {
                return Err(Error::Other(format!(
                    "{}: sequence {sequence} of table {} caches {cache} ids per session, so ids                      no longer follow the order they are handed out in and per-aggregate order                      cannot be kept; run ALTER SEQUENCE {sequence} CACHE 1",
                    self.ctx("startup"),
                    self.table
                )));
            }
        }
        Ok(relid)
    }

    /// Claims, publishes and deletes one batch, with no other batch of this relay in flight.
    pub async fn run_batch(&mut self) -> Result<BatchOutcome> {
        let relid = self.relid().await?;
        let (claimed, _) = oneshot::channel();
        let (done, _) = oneshot::channel();
        Ok(self.batch(relid, 0, None, claimed, done).await?.outcome)
    }

    /// Batches back to back while their claims come back full, up to two in flight: while
    /// one batch checks its heads, publishes and commits, the next one claims, and checks its
    /// own heads after that commit.
    ///
    /// The next batch is launched early only while the batches were whole heads of the table
    /// (no row at or below a batch's last id outside it: the single relay draining a
    /// backlog), and then it claims only rows after those of the batch in flight. Otherwise
    /// its claim would walk past the locked rows of the batch in flight one by one, which
    /// costs PostgreSQL more than the overlap saves: the batches then run one after another.
    /// Any subset of rows is a safe claim (order comes from the head check, not from what is
    /// claimed), and a row the bound skips (a late commit below it) is seen by the next check,
    /// which is then not clean, so the batch after it starts from the beginning again. The
    /// wait for the previous commit is for speed too: a check that ran earlier would see the
    /// previous batch's rows and hold their aggregates back, as with any other relay; after
    /// the commit they are gone and the check's fast path applies.
    ///
    /// Stops launching batches when a claim comes back short, when a batch publishes nothing
    /// of what it claimed (other relays hold the heads; no point spinning), on an error, or on
    /// shutdown, and returns once the batches in flight have finished.
    pub async fn pipeline(
        &self,
        relid: u32,
        shutdown: &CancellationToken,
        progress: &mut (dyn FnMut(&BatchOutcome) + Send),
    ) -> PipelineRun {
        const IN_FLIGHT: usize = 2;
        let mut run = PipelineRun::default();
        let mut in_flight = futures_util::stream::FuturesOrdered::new();
        let mut previous_done: Option<oneshot::Receiver<()>> = None;
        // the last id claimed by the batch launched last, and whether the batch that finished
        // last was the whole head of the table
        let mut last_claimed = 0_i64;
        let mut claimed_heavy = false;
        let mut clean = false;
        let mut launch = true;
        let mut finished = |result: Result<Finished>,
                            run: &mut PipelineRun,
                            launch: &mut bool,
                            clean: &mut bool| match result {
            Ok(Finished {
                outcome: o,
                clean: c,
            }) => {
                *clean = c;
                run.outcome.claimed += o.claimed;
                run.outcome.published += o.published;
                run.outcome.failed += o.failed;
                run.outcome.quarantined += o.quarantined;
                if o.claimed > 0 && o.published == 0 {
                    run.stalled = true;
                    *launch = false;
                }
                progress(&o);
            }
            Err(e) => {
                *launch = false;
                if run.error.is_none() {
                    run.error = Some(e);
                }
            }
        };
        loop {
            let room =
                in_flight.is_empty() || (clean && !claimed_heavy && in_flight.len() < IN_FLIGHT);
            if launch && room && !shutdown.is_cancelled() {
                let lower_bound = if in_flight.is_empty() {
                    0
                } else {
                    last_claimed
                };
                let (claimed_tx, mut claimed_rx) = oneshot::channel();
                let (done_tx, done_rx) = oneshot::channel();
                in_flight.push_back(self.batch(
                    relid,
                    lower_bound,
                    previous_done.replace(done_rx),
                    claimed_tx,
                    done_tx,
                ));
                // The batches in flight keep moving while this one claims.
                loop {
                    tokio::select! {
                        claimed = &mut claimed_rx => {
                            match claimed {
                                Ok(Claimed { full: true, last_id, heavy }) => {
                                    last_claimed = last_id;
                                    claimed_heavy = heavy;
                                }
                                _ => launch = false,
                            }
                            break;
                        }
                        Some(result) = in_flight.next() => {
                            finished(result, &mut run, &mut launch, &mut clean)
                        }
                    }
                }
                continue;
            }
            match in_flight.next().await {
                Some(result) => finished(result, &mut run, &mut launch, &mut clean),
                None => return run,
            }
        }
    }

    /// One batch: claim rows with an id above `lower_bound`, wait for `after` (the previous
    /// batch's commit, or its failure), check the heads, publish, delete and commit. `claimed`
    /// tells the pipeline what was claimed (dropped unsent on an error); `done` fires after
    /// the commit (dropped unsent when the batch fails: its rows stay in place).
    async fn batch(
        &self,
        relid: u32,
        lower_bound: i64,
        after: Option<oneshot::Receiver<()>>,
        claimed: oneshot::Sender<Claimed>,
        done: oneshot::Sender<()>,
    ) -> Result<Finished> {
        let mut started = Instant::now();
        // Every PostgreSQL step is bounded by the query timeout: a connection that stops
        // answering fails the batch there, and the dropped transaction takes the connection
        // with it (never back to the pool); Redis commands have their response timeout.
        let bound = self.pg.query_timeout;
        let ctx_get = self.ctx("getting a connection");
        let client = crate::db::bounded(bound, &ctx_get, async {
            self.pool.get().await.map_err(Error::pool(ctx_get.clone()))
        })
        .await?;
        let limit = i64::from(self.config.batch_size);
        let ctx_claim = self.ctx("claiming a batch");
        let claim = crate::db::bounded(bound, &ctx_claim, async {
            client
                .prepare_cached(&self.sql.claim)
                .await
                .map_err(Error::pg(ctx_claim.clone()))
        })
        .await?;
        let tx = crate::db::OpenTransaction::new(client);
        let client = tx.client();
        // BEGIN and the claim are sent together: the connection runs them in order, in one
        // round trip. A relay commit only deletes rows Redis already holds; if a crash loses
        // it, the rows are published again, which is the at-least-once contract anyway, so
        // the commit need not wait for the WAL flush (it is still ordered and atomic).
        // Payloads up to this many stored bytes come with the claim (a full claim of them
        // fits the byte budget); larger or compressed ones are read apart, within it.
        let inline_bytes = i32::try_from(
            (self.config.max_batch_bytes / self.config.batch_size.max(1) as usize)
                .clamp(256, 64 * 1024),
        )
        .unwrap_or(64 * 1024);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&relid, &limit, &lower_bound, &inline_bytes];
        let (begun, rows) = crate::db::bounded(bound, &ctx_claim, async {
            Ok::<_, Error>(tokio::join!(
                client.batch_execute("BEGIN; SET LOCAL synchronous_commit = off"),
                client.query(&claim, &params)
            ))
        })
        .await?;
        begun.map_err(Error::pg(ctx_claim.clone()))?;
        let rows = rows.map_err(Error::pg(ctx_claim.clone()))?;
        let mut outcome = BatchOutcome {
            claimed: rows.len(),
            ..BatchOutcome::default()
        };
        // the claim is in id order: its last row has the highest id
        let last_id = rows.last().map_or(0, |r| r.get::<_, i64>(0));
        // The payload column read once (a text column is checked for UTF-8 on every read):
        // NULL for a large payload the claim left out.
        let inline: Vec<Option<&str>> = rows.iter().map(|r| r.get(4)).collect();
        let large: Vec<usize> = (0..rows.len()).filter(|&i| inline[i].is_none()).collect();
        let _ = claimed.send(Claimed {
            full: rows.len() >= self.config.batch_size as usize,
            last_id,
            heavy: !large.is_empty(),
        });
        if rows.is_empty() {
            crate::db::bounded(bound, &ctx_claim, async {
                tx.rollback().await.map_err(Error::pg(ctx_claim.clone()))
            })
            .await?;
            return Ok(Finished {
                outcome,
                clean: true,
            });
        }
        // Large payloads, in id order, while the batch's byte budget has room: the first
        // always (a row larger than the budget goes alone), the others while the budget
        // holds their stored size. Those left are deferred to a later batch, and hold back
        // the rest of their aggregate in this one.
        let mut fetched: Vec<Option<String>> = vec![None; rows.len()];
        let mut deferred = vec![false; rows.len()];
        let holds_large = large.iter().any(|&i| {
            usize::try_from(rows[i].get::<_, i32>(8)).unwrap_or(0)
                >= crate::large_work::LARGE_EVENT_BYTES
        });
        if holds_large {
            // its connections would keep buffers this large for as long as they live
            tx.close_when_done();
        }
        let _large_work = if holds_large {
            Some(crate::large_work::lock().await)
        } else {
            None
        };
        if !large.is_empty() {
            let mut bytes: usize = inline.iter().flatten().map(|p| p.len()).sum();
            let ctx = self.ctx("reading a large payload");
            let read = crate::db::bounded(bound, &ctx, async {
                client
                    .prepare_cached(&self.sql.payload)
                    .await
                    .map_err(Error::pg(ctx.clone()))
            })
            .await?;
            for &i in &large {
                let stored = usize::try_from(rows[i].get::<_, i32>(8)).unwrap_or(0);
                if bytes > 0 && bytes + stored > self.config.max_batch_bytes {
                    deferred[i] = true;
                    continue;
                }
                let ctid: &str = rows[i].get(7);
                let text: String = crate::db::bounded(bound, &ctx, async {
                    client
                        .query_one(&read, &[&ctid])
                        .await
                        .map_err(Error::pg(ctx.clone()))
                })
                .await?
                .get(0);
                bytes += text.len();
                fetched[i] = Some(text);
            }
        }
        // Each column read once (a text column is checked for UTF-8 on every read), and every
        // envelope built before the wait below: most claimed rows are published.
        let claimed_rows: Vec<OutboxRow<'_>> = rows
            .iter()
            .zip(inline.iter().zip(&fetched))
            .map(|(row, (inline, fetched))| {
                OutboxRow::from_claim(row, inline.or(fetched.as_deref()))
            })
            .collect();
        let prepared = self.prepare(&claimed_rows);
        if let Some(after) = after {
            let waiting = Instant::now();
            // Sent or dropped, the previous batch's transaction is over or going: either way
            // the check below is right (see `pipeline`).
            let _ = after.await;
            started += waiting.elapsed();
        }
        let ids: Vec<i64> = claimed_rows.iter().map(|r| r.id).collect();
        let aggregates: Vec<&str> = claimed_rows.iter().map(|r| r.aggregate_id).collect();
        // Both checks run in statements of their own, so with snapshots taken after the
        // claim's read of pg_locks (see claim.rs).
        let ctx_head = self.ctx("head-of-table check");
        let rows_up_to: i64 = crate::db::bounded(bound, &ctx_head, async {
            let up_to = client
                .prepare_cached(&self.sql.rows_up_to)
                .await
                .map_err(Error::pg(ctx_head.clone()))?;
            client
                .query_one(&up_to, &[&last_id])
                .await
                .map_err(Error::pg(ctx_head.clone()))
        })
        .await?
        .get(0);
        let outside = rows_up_to - ids.len() as i64;
        // publishable[i]: claimed row i is at the head of its aggregate
        let publishable: Vec<bool> = if outside == 0 {
            vec![true; ids.len()]
        } else if outside <= SMALL_GAP_ROWS {
            let ctx = self.ctx("head-of-aggregate check");
            let table_rows = crate::db::bounded(bound, &ctx, async {
                let before = client
                    .prepare_cached(&self.sql.rows_before)
                    .await
                    .map_err(Error::pg(ctx.clone()))?;
                client
                    .query(&before, &[&last_id])
                    .await
                    .map_err(Error::pg(ctx.clone()))
            })
            .await?;
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
                .map(|(id, agg)| first_outside.get(agg).is_none_or(|g| id < g))
                .collect()
        } else {
            let ctx = self.ctx("head-of-aggregate check");
            let heads: HashSet<i64> = crate::db::bounded(bound, &ctx, async {
                let head = client
                    .prepare_cached(&self.sql.head_of_aggregate)
                    .await
                    .map_err(Error::pg(ctx.clone()))?;
                client
                    .query(&head, &[&ids, &aggregates])
                    .await
                    .map_err(Error::pg(ctx.clone()))
            })
            .await?
            .iter()
            .map(|r| r.get::<_, i64>(0))
            .collect();
            ids.iter().map(|id| heads.contains(id)).collect()
        };
        let clean = outside == 0;

        let mut conn = self.redis.commands();
        let mut unknown_keys: Vec<&str> = prepared
            .iter()
            .zip(&publishable)
            .filter(|(_, head)| **head)
            .filter_map(|(p, _)| p.as_ref().ok().map(|(key, _)| key.as_str()))
            .collect();
        unknown_keys.sort_unstable();
        unknown_keys.dedup();
        if let Ok(known) = self.known_streams.lock() {
            unknown_keys.retain(|k| !known.contains(*k));
        }
        let unusable: HashMap<String, String> = publish::unusable_keys(&mut conn, &unknown_keys)
            .await?
            .into_iter()
            .collect();

        // The entries in id order. A row that fails (too large, unusable topic, a key that
        // holds no stream) stops the rest of its aggregate in this batch, so nothing
        // overtakes it.
        let mut entries: Vec<(String, Vec<u8>)> = Vec::with_capacity(claimed_rows.len());
        let mut entry_rows: Vec<(i64, &str, &str)> = Vec::with_capacity(claimed_rows.len());
        let mut entry_aggregates: Vec<&str> = Vec::with_capacity(claimed_rows.len());
        let mut failures: Vec<(i64, String)> = Vec::new();
        let mut stopped: HashSet<&str> = HashSet::new();
        for (((row, prepared), head), deferred) in claimed_rows
            .iter()
            .zip(prepared)
            .zip(&publishable)
            .zip(&deferred)
        {
            if *deferred {
                stopped.insert(row.aggregate_id);
                continue;
            }
            if !head || (!stopped.is_empty() && stopped.contains(row.aggregate_id)) {
                continue;
            }
            let failure = prepared.and_then(|(key, envelope)| match unusable.get(&key) {
                Some(kind) => Err(format!(
                    "WRONGTYPE: stream key {key} holds a {kind}, not a stream"
                )),
                None => Ok((key, envelope)),
            });
            match failure {
                Ok(entry) => {
                    entries.push(entry);
                    entry_rows.push((row.id, row.ctid, row.topic));
                    entry_aggregates.push(row.aggregate_id);
                }
                Err(reason) => {
                    failures.push((row.id, reason));
                    stopped.insert(row.aggregate_id);
                }
            }
        }

        // The delete runs while Redis takes the entries: it is undone by the rollback if
        // publishing fails, and nothing commits before Redis has accepted every entry. It
        // goes by ctid (no index probe per row): the rows are locked by this transaction, so
        // nothing can have moved them.
        let entry_ctids: Vec<&str> = entry_rows.iter().map(|e| e.1).collect();
        let delete_sql = if self.config.archive_retention_hours > 0 {
            &self.sql.delete_to_archive
        } else {
            &self.sql.delete
        };
        let ctx_delete = self.ctx("deleting published rows");
        let delete = crate::db::bounded(bound, &ctx_delete, async {
            client
                .prepare_cached(delete_sql)
                .await
                .map_err(Error::pg(ctx_delete.clone()))
        })
        .await?;
        let delete_fut = crate::db::bounded(bound, &ctx_delete, async {
            if entry_ctids.is_empty() {
                Ok(0)
            } else {
                client
                    .execute(&delete, &[&entry_ctids])
                    .await
                    .map_err(Error::pg(ctx_delete.clone()))
            }
        });
        let (deleted, results) = tokio::join!(
            delete_fut,
            publish::publish(&mut conn, &entries, &entry_aggregates)
        );
        if holds_large {
            conn.renew().await;
        }
        let results = results?;
        deleted?;
        let mut per_topic: HashMap<&str, u64> = HashMap::new();
        let mut rejected = false;
        for ((id, _, topic), result) in entry_rows.iter().zip(results) {
            match result {
                publish::EntryResult::Published => {
                    *per_topic.entry(topic).or_default() += 1;
                }
                publish::EntryResult::Rejected(e) => {
                    failures.push((*id, e));
                    rejected = true;
                }
                // after a rejected entry of its key: stays for the next batch, uncharged
                publish::EntryResult::NotSent => rejected = true,
            }
        }
        if rejected {
            if let Ok(mut known) = self.known_streams.lock() {
                known.clear();
            }
            // Redis refused an entry the type check let through (the key changed meanwhile):
            // the delete above removed it too, and the rest of its key was not sent. Undo the
            // batch, charge the refused rows, and let the next batch publish the rest again
            // (duplicates on the stream, which the inbox absorbs).
            // On the same connection: handing it back to the pool in between could let the
            // next batch take it and then wait for this one, with a pool of one.
            let ctx = self.ctx("rolling back a batch");
            let client = crate::db::bounded(bound, &ctx, async {
                tx.rollback_and_keep().await.map_err(Error::pg(ctx.clone()))
            })
            .await?;
            let ctx = self.ctx("recording failed rows");
            let (failed, quarantined) =
                crate::db::bounded(bound, &ctx, self.record_failures(&**client, &failures)).await?;
            outcome.failed = failed;
            outcome.quarantined = quarantined;
            self.count_failures(&outcome);
            return Ok(Finished {
                outcome,
                clean: false,
            });
        }
        if !failures.is_empty() {
            let ctx = self.ctx("recording failed rows");
            let (failed, quarantined) =
                crate::db::bounded(bound, &ctx, self.record_failures(&***client, &failures))
                    .await?;
            outcome.failed = failed;
            outcome.quarantined = quarantined;
        }
        let published = entry_rows.len();
        let ctx = self.ctx("committing a batch");
        crate::db::bounded(bound, &ctx, async {
            tx.commit().await.map_err(Error::pg(ctx.clone()))
        })
        .await?;
        let _ = done.send(());
        outcome.published = published;
        if let Ok(mut known) = self.known_streams.lock() {
            if known.len() > 10_000 {
                known.clear();
            }
            for (key, _) in &entries {
                if !known.contains(key) {
                    known.insert(key.clone());
                }
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
        // Rows left behind for a retry are rows at or below the batch's last id: the next
        // claim must not start after them.
        Ok(Finished {
            outcome,
            clean: clean && outcome.failed == 0 && !deferred.contains(&true),
        })
    }

    /// Each claimed row's stream key and CloudEvents envelope, or why it cannot be
    /// published (a topic that is no usable stream name, an envelope over `max_entry_bytes`).
    fn prepare(&self, rows: &[OutboxRow<'_>]) -> Vec<Result<(String, Vec<u8>), String>> {
        // per topic: its stream key (unpartitioned) or its problem
        let mut topics: Vec<(&str, Result<String, String>)> = Vec::new();
        let mut time_buf = String::with_capacity(32);
        let mut uuid_buf = uuid::Uuid::encode_buffer();
        rows.iter()
            .map(|row| {
                let topic = match topics.iter().find(|(t, _)| *t == row.topic) {
                    Some((_, checked)) => checked.clone(),
                    None => {
                        let checked = crate::config::validate_topic("topic", row.topic)
                            .map(|()| self.redis.stream_key(row.topic))
                            .map_err(|e| format!("unusable topic: {}", e.message));
                        topics.push((row.topic, checked.clone()));
                        checked
                    }
                };
                let key = if self.redis.is_partitioned(row.topic) {
                    topic.map(|_| self.redis.stream_key_for(row.topic, row.aggregate_id))
                } else {
                    topic
                }?;
                let created_epoch = match row.created_at.duration_since(std::time::UNIX_EPOCH) {
                    Ok(after) => after.as_secs_f64(),
                    Err(before) => -before.duration().as_secs_f64(),
                };
                crate::envelope::format_rfc3339_micros(created_epoch, &mut time_buf);
                let mut envelope = Vec::with_capacity(row.payload.len() + 256);
                let len = encode_into(
                    &Outgoing {
                        event_id: row.event_id.hyphenated().encode_lower(&mut uuid_buf),
                        source: &self.source,
                        topic: row.topic,
                        aggregate_id: row.aggregate_id,
                        time: &time_buf,
                        payload_json: row.payload,
                        traceparent: row.traceparent,
                    },
                    &mut envelope,
                );
                if len > self.config.max_entry_bytes {
                    return Err(format!(
                        "envelope is {len} bytes, over max_entry_bytes = {}",
                        self.config.max_entry_bytes
                    ));
                }
                Ok((key, envelope))
            })
            .collect()
    }

    /// Deletes archived rows older than the retention, in batches of 5,000 (each statement
    /// bounded by the query timeout); returns how many.
    pub async fn prune_archive(&self) -> Result<u64> {
        let bound = self.pg.query_timeout;
        let ctx = self.ctx("pruning the archive");
        let client = crate::db::bounded(bound, &ctx, async {
            self.pool.get().await.map_err(Error::pool(ctx.clone()))
        })
        .await?;
        let hours = i32::try_from(self.config.archive_retention_hours).unwrap_or(i32::MAX);
        let mut total = 0;
        loop {
            let n = crate::db::bounded(bound, &ctx, async {
                client
                    .execute(&self.sql.prune_archive, &[&hours, &5000_i64])
                    .await
                    .map_err(Error::pg(ctx.clone()))
            })
            .await?;
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
            let (event_id, aggregate_id): (&str, &str) = (row.get(2), row.get(3));
            if row.get::<_, bool>(1) {
                quarantined += 1;
                tracing::error!(table = %self.table, row_id = id, event_id, aggregate_id, error, "outbox row quarantined after max_attempts; `outboxd dlq list` shows it, `outboxd dlq retry` releases it");
            } else {
                tracing::warn!(table = %self.table, row_id = id, event_id, aggregate_id, error, "Redis rejected an outbox row; will retry");
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
        let relid = self.relid().await?;
        let ctx = self.ctx("counting held-back rows");
        crate::db::bounded(self.pg.query_timeout, &ctx, async {
            let client = self
                .pool
                .get()
                .await
                .map_err(Error::pool(self.ctx("getting a connection")))?;
            held_back_with(&client, &self.sql, relid, &ctx).await
        })
        .await
    }

    /// Unpublished rows, quarantined rows and the age of the oldest.
    pub async fn backlog(&mut self) -> Result<Backlog> {
        let ctx = self.ctx("measuring the backlog");
        let row = crate::db::bounded(self.pg.query_timeout, &ctx, async {
            let client = self
                .pool
                .get()
                .await
                .map_err(Error::pool(self.ctx("getting a connection")))?;
            client
                .query_one(
                    &self.sql.backlog,
                    &[&EXACT_COUNT_BELOW, &quote_qualified(&self.table)],
                )
                .await
                .map_err(Error::pg(ctx.clone()))
        })
        .await?;
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
        let watch = crate::watchdog::register(&format!("relay {}", self.name()));
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
            watch.busy();
            let run = match self.relid().await {
                Ok(relid) => self.pipeline(relid, &shutdown, &mut |_| watch.beat()).await,
                Err(e) => PipelineRun {
                    error: Some(e),
                    ..PipelineRun::default()
                },
            };
            match run.error.map_or(Ok(run.outcome), Err) {
                Ok(_) => {
                    watch.done();
                    backoff.reset();
                    // Rows there but none publishable: another relay holds the head of
                    // their aggregates; look again shortly rather than at the poll interval.
                    let wait = if run.stalled {
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
                    watch.failed(&crate::error::chain(&e));
                    crate::db::after_failure(&self.pool, &e);
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
        mut progress: impl FnMut(u64) + Send,
    ) -> Result<DrainSummary> {
        let started = Instant::now();
        let mut summary = DrainSummary::default();
        let mut budget = crate::retry::TransientBudget::new(self.give_up_after);
        let mut idle_rounds = 0;
        let deadline = wait_held.map(|d| started + d);
        let mut waited_on_held = false;
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let mut published = summary.published;
            let round_started = Instant::now();
            let run = match self.relid().await {
                Ok(relid) => {
                    self.pipeline(relid, shutdown, &mut |o| {
                        published += o.published as u64;
                        progress(published);
                    })
                    .await
                }
                Err(e) => PipelineRun {
                    error: Some(e),
                    ..PipelineRun::default()
                },
            };
            let outcome = run.outcome;
            summary.published += outcome.published as u64;
            summary.failed += outcome.failed as u64;
            summary.quarantined += outcome.quarantined as u64;
            match run.error.map_or(Ok(()), Err) {
                Ok(()) => {
                    budget.reset();
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
                    let Some(delay) = budget.next_wait(round_started) else {
                        return Err(e);
                    };
                    crate::db::after_failure(&self.pool, &e);
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
    let rows = client
        .query(&sql.held_back, &[&relid])
        .await
        .map_err(Error::pg(ctx))?;
    Ok(HeldBack {
        rows: rows.first().map_or(0, |r| r.get(3)),
        blockers: rows
            .iter()
            .map(|r| Blocker {
                pid: r.get(0),
                xact_age_seconds: r.get(1),
                query: r.get(2),
            })
            .collect(),
    })
}

/// How often the LISTEN connection proves that it still answers.
const LISTEN_HEARTBEAT: Duration = Duration::from_secs(5);

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
        let bound = pg.query_timeout;
        let attempt = async {
            let relid: Option<u32> = crate::db::bounded(bound, "looking up the table", async {
                let client = pool.get().await.map_err(|e| Error::Other(e.to_string()))?;
                client
                    .query_one("SELECT to_regclass($1)::oid", &[&quote_qualified(&table)])
                    .await
                    .map_err(|e| Error::Other(e.to_string()))
            })
            .await
            .map_err(|e| crate::error::chain(&e))?
            .get(0);
            let relid = relid.ok_or_else(|| format!("table {table} does not exist"))?;
            let (client, mut connection) =
                crate::db::bounded(bound, "connecting for LISTEN", async {
                    crate::db::connect_dedicated(&pg)
                        .await
                        .map_err(|e| Error::Other(e.to_string()))
                })
                .await
                .map_err(|e| crate::error::chain(&e))?;
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
                // An idle connection sends nothing, so a peer gone silent would never be
                // noticed and notifications would stop without a word: a bounded empty
                // query every few seconds proves it still answers.
                loop {
                    tokio::time::sleep(LISTEN_HEARTBEAT).await;
                    crate::db::bounded(bound, "LISTEN heartbeat", async {
                        client
                            .simple_query("")
                            .await
                            .map_err(|e| Error::Other(e.to_string()))
                    })
                    .await
                    .map_err(|e| crate::error::chain(&e))?;
                }
            };
            // The driver must run for LISTEN to complete; it ends when the connection does.
            tokio::select! {
                reason = driver => Err(reason),
                r = listen => r,
            }
        };
        let result: std::result::Result<(), String> = tokio::select! {
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
