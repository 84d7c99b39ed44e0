//! One relay batch, step by step: claim (ids and row addresses), read the claimed rows (the
//! payloads of small ones with them; large ones read apart within the byte budget), check
//! the heads (`check_heads`: the head-of-table count,
//! then the head-of-aggregate decision, pure in `heads_among` when few rows lie outside),
//! build the envelopes, delete beside the publish (`publish.rs`), settle what Redis refused
//! (charge or quarantine), commit, report. A batch is one PostgreSQL transaction: a crash
//! anywhere before its commit leaves its rows to be published again. How a batch is linked
//! to the batches beside it, and counts the next one's head of the table, is [`Links`].

use super::claim::RowAddress;
use super::publish::{self, Entry};
use super::{BatchOutcome, Relay};
use crate::envelope::Outgoing;
use crate::error::{Error, Result};
use crate::metrics::metrics;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::oneshot;

/// Up to this many rows outside the batch before its end, the head-of-aggregate check reads
/// them and decides in the relay (one index range scan); beyond, it is one SQL statement
/// probing per aggregate.
const SMALL_GAP_ROWS: i64 = 20_000;

/// One claimed outbox row (see `claim.rs`: the claim, then `rows`).
pub(super) struct OutboxRow<'a> {
    id: i64,
    /// The row's physical address, for the delete: stable while this transaction holds the
    /// row lock.
    ctid: RowAddress,
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
    /// `row`: the row as `rows` read it; `ctid` from the claim; `payload`: the row's payload
    /// column (read once by the caller), else the one read apart (a large one).
    fn read(
        row: &'a tokio_postgres::Row,
        ctid: RowAddress,
        payload: Option<&'a str>,
    ) -> OutboxRow<'a> {
        OutboxRow {
            id: row.get(0),
            event_id: row.get(1),
            topic: row.get(2),
            aggregate_id: row.get(3),
            payload: payload.unwrap_or("null"),
            traceparent: row.get(5),
            created_at: row.get(6),
            ctid,
        }
    }
}

/// What a batch tells the pipeline once it has claimed.
#[derive(Debug, Clone, Copy)]
pub(super) struct Claimed {
    /// The claim came back full: there is probably more.
    pub(super) full: bool,
    /// The last id claimed (claims are in id order).
    pub(super) last_id: i64,
    /// It holds large payloads: no second batch beside it, so that memory stays within
    /// about one batch's byte budget.
    pub(super) heavy: bool,
}

/// Where a batch asks the batch before it to run its head-of-table count: (its last id, the
/// floor it claimed from). See [`Links`].
pub(super) type CheckRequest = std::sync::Arc<std::sync::Mutex<Option<(i64, i64)>>>;

/// How a batch is linked to the batches beside it (inflight.rs).
///
/// The head-of-table check of a batch (is every row at or below its last id its own?) must
/// see the table as the previous batch's commit leaves it, and with a snapshot taken after
/// this batch's claim read `pg_locks`. Run on its own after that commit, it is a round trip
/// between two batches' publishes. So a batch that has claimed asks the batch before it, and
/// that one, if it has not yet deleted its rows, sends the count right behind its `DELETE`,
/// in its own transaction, beside its publish: its own deleted rows are gone for that
/// statement's snapshot, which is fresh and taken after the claim. The count is handed on
/// only if the previous batch then commits (then its rows are gone for everyone, exactly as
/// that snapshot saw them); a batch that fails hands on nothing and the next checks on its own.
/// It is worth what a check after the commit is worth: both snapshots follow the claim's lock
/// read, and a row that can commit after either with an id up to the batch's last id belongs
/// to a producer transaction open at that read, which the claim and the resume point already
/// account for (claim.rs, resume.rs). Rows of other relays' batches, and the previous batch's
/// rows it did not delete, are in the count, which then exceeds the batch's own: the batch
/// does the full check.
pub(super) struct Links {
    /// Fires when the previous batch committed (dropped when it failed), with this batch's
    /// head-of-table count if the previous batch ran it.
    pub(super) after: Option<oneshot::Receiver<Option<i64>>>,
    /// Where this batch asks the previous one to run its count.
    pub(super) ask_previous: Option<CheckRequest>,
    /// Where the next batch asks this one.
    pub(super) asked_by_next: Option<CheckRequest>,
    /// Told what was claimed (dropped unsent on an error).
    pub(super) claimed: oneshot::Sender<Claimed>,
    /// Fires after the commit, with the next batch's count if it was run here (dropped
    /// unsent when the batch fails: its rows stay in place).
    pub(super) done: oneshot::Sender<Option<i64>>,
}

impl Links {
    /// A batch with no other beside it.
    pub(super) fn alone() -> Links {
        Links {
            after: None,
            ask_previous: None,
            asked_by_next: None,
            claimed: oneshot::channel().0,
            done: oneshot::channel().0,
        }
    }
}

/// A finished batch, and whether it was the whole head of the table (no row at or below its
/// last id outside it), which lets the next batch start before it has committed.
#[derive(Debug)]
pub(super) struct Finished {
    pub(super) outcome: BatchOutcome,
    pub(super) whole_head: bool,
}

impl Relay {
    /// One batch: claim rows with an id above `lower_bound`, wait for the previous batch's
    /// commit or failure (`links`), check the heads, publish, delete and commit.
    pub(super) async fn batch(
        &self,
        relid: u32,
        lower_bound: i64,
        links: Links,
    ) -> Result<Finished> {
        let Links {
            after,
            ask_previous,
            asked_by_next,
            claimed,
            done,
        } = links;
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
        let ctx_claim = self.ctx("claiming a batch");
        let claim = self.prepared(&client, &self.sql.claim, &ctx_claim).await?;
        let tx = crate::db::OpenTransaction::new(client);
        let client = tx.client();
        // BEGIN and the claim are sent together: the connection runs them in order, in one
        // round trip. A relay commit only deletes rows Redis already holds; if a crash loses
        // it, the rows are published again, which is the at-least-once contract anyway, so
        // the commit need not wait for the WAL flush (it is still ordered and atomic).
        // The batch's statements run their prepared (generic) plans: left to choose, the
        // server planned the claim afresh on every execution (its estimate for a generic
        // `id > $3 ... LIMIT $2` is worse than for any given bound), 0.25-0.5 ms of a 1,000-row
        // claim's 1.1-1.6, for the same plan; the counts and row reads likewise. The claim has
        // its batch size written in (claim.rs), without which its generic plan is costed as
        // reading a tenth of the table. No JIT: on a large outbox that cost crossed
        // `jit_above_cost` and every claim compiled itself (20 ms against 1 ms at 1,000,000
        // rows); these are short statements JIT never pays off for.
        // Payloads up to this many stored bytes come with the claim (a full claim of them
        // fits the byte budget); larger or compressed ones are read apart, within it.
        let inline_bytes = i32::try_from(
            (self.config.max_batch_bytes / self.config.batch_size.max(1) as usize)
                .clamp(256, 64 * 1024),
        )
        .unwrap_or(64 * 1024);
        // Claims and checks start after the resume point (see resume.rs): rows at or below it
        // are all gone, and walking their index entries is what made long drains slow.
        let floor = self.resume_point().floor();
        let lower_bound = lower_bound.max(floor);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
            [&relid, &lower_bound, &inline_bytes];
        let (begun, rows) = crate::db::bounded(bound, &ctx_claim, async {
            Ok::<_, Error>(tokio::join!(
                client.batch_execute(
                    "BEGIN; SET LOCAL synchronous_commit = off; \
                     SET LOCAL plan_cache_mode = force_generic_plan; SET LOCAL jit = off"
                ),
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
        if let Some(first) = rows.first() {
            let holders: Option<Vec<String>> = first.get(4);
            self.resume_point().claimed(
                first.get(0),
                last_id,
                holders.as_deref().unwrap_or_default(),
            );
        }
        let small: Vec<bool> = rows.iter().map(|r| r.get(2)).collect();
        let large: Vec<usize> = (0..rows.len()).filter(|&i| !small[i]).collect();
        let _ = claimed.send(Claimed {
            full: rows.len() >= self.config.batch_size as usize,
            last_id,
            heavy: !large.is_empty(),
        });
        // Asked as soon as the claim is back, so that the previous batch is still to delete.
        // The horizon is read before: the count's snapshot is then taken after every proof it
        // rests on (and after the claim's lock read).
        let mut horizon = self.resume_point().safe_horizon();
        if let (Some(ask), false) = (&ask_previous, rows.is_empty()) {
            if let Ok(mut request) = ask.lock() {
                *request = Some((last_id, floor));
            }
        }
        if rows.is_empty() {
            crate::db::bounded(bound, &ctx_claim, async {
                tx.rollback().await.map_err(Error::pg(ctx_claim.clone()))
            })
            .await?;
            return Ok(Finished {
                outcome,
                whole_head: true,
            });
        }
        let holds_large = large.iter().any(|&i| {
            usize::try_from(rows[i].get::<_, i32>(3)).unwrap_or(0)
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
        // The rows themselves in one statement, while the next batch claims (see claim.rs),
        // in the claim's (id) order.
        let read = self.read_rows(client, &rows, inline_bytes).await?;
        // The payload column read once (a text column is checked for UTF-8 on every read):
        // NULL for a large payload, read apart.
        let inline: Vec<Option<&str>> = read.iter().map(|r| r.get(4)).collect();
        let large: Vec<usize> = (0..read.len()).filter(|&i| inline[i].is_none()).collect();
        let (fetched, deferred) = self
            .fetch_large_payloads(client, &rows, &inline, &large)
            .await?;
        // Each column read once, and every envelope built before the wait below: most
        // claimed rows are published.
        let claimed_rows: Vec<OutboxRow<'_>> = read
            .iter()
            .zip(&rows)
            .zip(inline.iter().zip(&fetched))
            .map(|((row, claim), (inline, fetched))| {
                OutboxRow::read(row, claim.get(1), inline.or(fetched.as_deref()))
            })
            .collect();
        let prepared = self.prepare(&claimed_rows);
        let mut counted = None;
        if let Some(after) = after {
            let waiting = Instant::now();
            // Sent or dropped, the previous batch's transaction is over or going: either way
            // the check below is right (see `batches_in_flight`).
            counted = after.await.ok().flatten();
            started += waiting.elapsed();
        }
        let ids: Vec<i64> = claimed_rows.iter().map(|r| r.id).collect();
        let aggregates: Vec<&str> = claimed_rows.iter().map(|r| r.aggregate_id).collect();
        let (publishable, whole_head) = if counted == Some(ids.len() as i64) {
            // the previous batch counted for us (see `Links`): the whole head of the table
            (vec![true; ids.len()], true)
        } else {
            horizon = self.resume_point().safe_horizon();
            self.check_heads(client, &ids, &aggregates, last_id, floor)
                .await?
        };

        let mut conn = self.redis.commands();
        let mut unknown_keys: Vec<&str> = prepared
            .iter()
            .zip(&publishable)
            .filter(|(_, head)| **head)
            .filter_map(|(p, _)| p.as_ref().ok().map(|entry| &*entry.key))
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

        let Chosen {
            entries,
            rows: entry_rows,
            aggregates: entry_aggregates,
            mut failures,
        } = choose_entries(&claimed_rows, prepared, &publishable, &deferred, &unusable);

        // The delete runs while Redis takes the entries: it is undone by the rollback if
        // publishing fails, and nothing commits before Redis has accepted every entry. It
        // goes by ctid (no index probe per row): the rows are locked by this transaction, so
        // nothing can have moved them.
        let entry_ctids: Vec<RowAddress> = entry_rows.iter().map(|e| e.1).collect();
        let delete_sql = self.delete_sql();
        let ctx_delete = self.ctx("deleting published rows");
        let delete = crate::db::bounded(bound, &ctx_delete, async {
            client
                .prepare_cached(delete_sql)
                .await
                .map_err(Error::pg(ctx_delete.clone()))
        })
        .await?;
        // the next batch's head-of-table count, right behind the delete (see `Links`)
        let count_for_next = if entry_ctids.is_empty() {
            None
        } else {
            asked_by_next
                .as_ref()
                .and_then(|asked| asked.lock().ok().and_then(|mut r| r.take()))
        };
        let count_for_next = match count_for_next {
            Some(request) => Some((
                self.prepared(client, &self.sql.rows_up_to, &ctx_delete)
                    .await?,
                request,
            )),
            None => None,
        };
        let delete_fut = crate::db::bounded(bound, &ctx_delete, async {
            if entry_ctids.is_empty() {
                return Ok::<_, Error>(None);
            }
            // queued on the connection in this order: the count's snapshot follows the delete
            let delete_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&entry_ctids];
            let deleting = client.execute(&delete, &delete_params);
            match &count_for_next {
                Some((statement, (next_last_id, next_floor))) => {
                    let count_params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] =
                        [next_last_id, next_floor];
                    let counting = client.query_one(statement, &count_params);
                    let (deleted, count) = tokio::join!(deleting, counting);
                    deleted.map_err(Error::pg(ctx_delete.clone()))?;
                    let count = count.map_err(Error::pg(self.ctx("head-of-table check")))?;
                    Ok(Some(count.get::<_, i64>(0)))
                }
                None => {
                    deleting.await.map_err(Error::pg(ctx_delete.clone()))?;
                    Ok(None)
                }
            }
        });
        // the keys published to, remembered after the commit (the entries go to Redis)
        let mut published_keys: Vec<Arc<str>> = Vec::new();
        for entry in &entries {
            if published_keys.last() != Some(&entry.key) && !published_keys.contains(&entry.key) {
                published_keys.push(entry.key.clone());
            }
        }
        let (deleted, results) = tokio::join!(
            delete_fut,
            publish::publish(
                &mut conn,
                self.publisher.as_ref(),
                entries,
                &entry_aggregates
            )
        );
        if holds_large {
            conn.renew().await;
        }
        let results = results?;
        let count_for_next = deleted?;
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
            (outcome.failed, outcome.quarantined) = self.undo_refused(tx, &failures).await?;
            self.count_failures(&outcome);
            return Ok(Finished {
                outcome,
                whole_head: false,
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
        let whole_head = whole_head && outcome.failed == 0 && !deferred.contains(&true);
        if whole_head {
            self.resume_point().settled(horizon, last_id);
        }
        let _ = done.send(count_for_next);
        outcome.published = published;
        self.remember_streams(&published_keys);
        self.report(&outcome, per_topic, started);
        // Rows left behind for a retry are rows at or below the batch's last id: the next
        // claim must not start after them.
        Ok(Finished {
            outcome,
            whole_head,
        })
    }

    /// The statement that deletes a batch's published rows: into the archive when it keeps
    /// them for replay.
    pub(super) fn delete_sql(&self) -> &str {
        if self.config.archive_retention_hours > 0 {
            &self.sql.delete_to_archive
        } else {
            &self.sql.delete
        }
    }

    /// Redis refused an entry the type check let through (the key changed meanwhile): the
    /// delete beside the publish removed it too, and the rest of its key was not sent. Undoes
    /// the batch, charges the refused rows, and leaves the rest for the next batch to publish
    /// again (duplicates on the stream, which the inbox absorbs). Returns (failed,
    /// quarantined).
    async fn undo_refused(
        &self,
        tx: crate::db::OpenTransaction,
        failures: &[(i64, String)],
    ) -> Result<(usize, usize)> {
        let bound = self.pg.query_timeout;
        if let Ok(mut known) = self.known_streams.lock() {
            known.clear();
        }
        // On the same connection: handing it back to the pool in between could let the next
        // batch take it and then wait for this one, with a pool of one.
        let ctx = self.ctx("rolling back a batch");
        let client = crate::db::bounded(bound, &ctx, async {
            tx.rollback_and_keep().await.map_err(Error::pg(ctx.clone()))
        })
        .await?;
        let ctx = self.ctx("recording failed rows");
        crate::db::bounded(bound, &ctx, self.record_failures(&**client, failures)).await
    }

    /// The stream keys a committed batch published to hold streams: the next batches skip
    /// their type check (forgotten past 10,000 keys, and whenever Redis refuses an entry).
    fn remember_streams(&self, keys: &[Arc<str>]) {
        if let Ok(mut known) = self.known_streams.lock() {
            if known.len() > 10_000 {
                known.clear();
            }
            for key in keys {
                if !known.contains(&**key) {
                    known.insert(key.to_string());
                }
            }
        }
    }

    /// A committed batch's metrics.
    fn report(&self, outcome: &BatchOutcome, per_topic: HashMap<&str, u64>, started: Instant) {
        let m = metrics();
        for (topic, n) in per_topic {
            m.relay_published
                .with_label_values(&[&self.database, &self.table, topic])
                .inc_by(n);
        }
        self.count_failures(outcome);
        m.relay_batch_seconds
            .with_label_values(&[&self.database, &self.table])
            .observe(started.elapsed().as_secs_f64());
    }

    /// The claimed rows as `rows` reads them, in the order of `claimed` (id order).
    async fn read_rows(
        &self,
        client: &deadpool_postgres::Object,
        claimed: &[tokio_postgres::Row],
        inline_bytes: i32,
    ) -> Result<Vec<tokio_postgres::Row>> {
        let ctids: Vec<RowAddress> = claimed.iter().map(|r| r.get(1)).collect();
        let ctx = self.ctx("reading the claimed rows");
        let statement = self.prepared(client, &self.sql.rows, &ctx).await?;
        let read = crate::db::bounded(self.pg.query_timeout, &ctx, async {
            client
                .query(&statement, &[&ctids, &inline_bytes])
                .await
                .map_err(Error::pg(ctx.clone()))
        })
        .await?;
        // each id read once (a column read checks its type every time)
        let mut by_id: Vec<(i64, tokio_postgres::Row)> =
            read.into_iter().map(|r| (r.get(0), r)).collect();
        by_id.sort_unstable_by_key(|(id, _)| *id);
        // every claimed row, once: impossible otherwise while this transaction holds them
        let same = by_id.len() == claimed.len()
            && by_id
                .iter()
                .zip(claimed)
                .all(|((id, _), c)| *id == c.get::<_, i64>(0));
        if !same {
            return Err(Error::UnexpectedReply {
                command: ctx,
                reply: format!(
                    "{} rows read back for {} claimed",
                    by_id.len(),
                    claimed.len()
                ),
            });
        }
        Ok(by_id.into_iter().map(|(_, r)| r).collect())
    }

    /// Large payloads, in id order, while the batch's byte budget has room: the first always
    /// (a row larger than the budget goes alone), the others while the budget holds their
    /// stored size. Returns each row's fetched payload, and which rows are deferred to a later
    /// batch (they hold back the rest of their aggregate in this one).
    async fn fetch_large_payloads(
        &self,
        client: &deadpool_postgres::Object,
        rows: &[tokio_postgres::Row],
        inline: &[Option<&str>],
        large: &[usize],
    ) -> Result<(Vec<Option<String>>, Vec<bool>)> {
        let bound = self.pg.query_timeout;
        let mut fetched: Vec<Option<String>> = vec![None; rows.len()];
        let mut deferred = vec![false; rows.len()];
        if !large.is_empty() {
            let mut bytes: usize = inline.iter().flatten().map(|p| p.len()).sum();
            let ctx = self.ctx("reading a large payload");
            let read = self.prepared(client, &self.sql.payload, &ctx).await?;
            for &i in large {
                let stored = usize::try_from(rows[i].get::<_, i32>(3)).unwrap_or(0);
                if bytes > 0 && bytes + stored > self.config.max_batch_bytes {
                    deferred[i] = true;
                    continue;
                }
                let ctid: RowAddress = rows[i].get(1);
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
        Ok((fetched, deferred))
    }

    /// `sql` prepared on `client` (cached per connection), within the query timeout.
    async fn prepared(
        &self,
        client: &deadpool_postgres::Object,
        sql: &str,
        ctx: &str,
    ) -> Result<tokio_postgres::Statement> {
        crate::db::bounded(self.pg.query_timeout, ctx, async {
            client
                .prepare_cached(sql)
                .await
                .map_err(Error::pg(ctx.to_string()))
        })
        .await
    }

    /// Which claimed rows are at the head of their aggregate (`publishable[i]` for `ids[i]`),
    /// and whether the batch is the whole head of the table (no row at or below `last_id`
    /// outside it). Both checks run in statements of their own, so with snapshots taken after
    /// the claim's read of pg_locks (see claim.rs), and look only above `floor` (the resume
    /// point the claim started from: no row at or below it).
    async fn check_heads(
        &self,
        client: &deadpool_postgres::Object,
        ids: &[i64],
        aggregates: &[&str],
        last_id: i64,
        floor: i64,
    ) -> Result<(Vec<bool>, bool)> {
        let bound = self.pg.query_timeout;
        let ctx_head = self.ctx("head-of-table check");
        let rows_up_to: i64 = crate::db::bounded(bound, &ctx_head, async {
            let up_to = client
                .prepare_cached(&self.sql.rows_up_to)
                .await
                .map_err(Error::pg(ctx_head.clone()))?;
            client
                .query_one(&up_to, &[&last_id, &floor])
                .await
                .map_err(Error::pg(ctx_head.clone()))
        })
        .await?
        .get(0);
        let outside = rows_up_to - ids.len() as i64;
        if outside == 0 {
            return Ok((vec![true; ids.len()], true));
        }
        let ctx = self.ctx("head-of-aggregate check");
        let publishable = if outside <= SMALL_GAP_ROWS {
            let table_rows = crate::db::bounded(bound, &ctx, async {
                let before = client
                    .prepare_cached(&self.sql.rows_before)
                    .await
                    .map_err(Error::pg(ctx.clone()))?;
                client
                    .query(&before, &[&last_id, &floor])
                    .await
                    .map_err(Error::pg(ctx.clone()))
            })
            .await?;
            let table_rows: Vec<(i64, &str)> =
                table_rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            heads_among(ids, aggregates, &table_rows)
        } else {
            let heads: HashSet<i64> = crate::db::bounded(bound, &ctx, async {
                let head = client
                    .prepare_cached(&self.sql.head_of_aggregate)
                    .await
                    .map_err(Error::pg(ctx.clone()))?;
                client
                    .query(&head, &[&ids, &aggregates, &floor])
                    .await
                    .map_err(Error::pg(ctx.clone()))
            })
            .await?
            .iter()
            .map(|r| r.get::<_, i64>(0))
            .collect();
            ids.iter().map(|id| heads.contains(id)).collect()
        };
        Ok((publishable, false))
    }

    /// Each claimed row's stream key and CloudEvents envelope, or why it cannot be
    /// published (a topic that is no usable stream name, an envelope over `max_entry_bytes`).
    pub(super) fn prepare(&self, rows: &[OutboxRow<'_>]) -> Vec<Result<Entry, String>> {
        // per topic: its stream key (unpartitioned) or its problem
        let mut topics: Vec<(&str, Result<Arc<str>, String>)> = Vec::new();
        let mut time_buf = String::with_capacity(32);
        let mut time_of: Option<i64> = None;
        let mut uuid_buf = uuid::Uuid::encode_buffer();
        rows.iter()
            .map(|row| {
                let topic = match topics.iter().find(|(t, _)| *t == row.topic) {
                    Some((_, checked)) => checked.clone(),
                    None => {
                        let checked = crate::config::validate_topic("topic", row.topic)
                            .map(|()| Arc::from(self.redis.stream_key(row.topic)))
                            .map_err(|e| format!("unusable topic: {}", e.message));
                        topics.push((row.topic, checked.clone()));
                        checked
                    }
                };
                let key = if self.redis.is_partitioned(row.topic) {
                    topic.map(|_| Arc::from(self.redis.stream_key_for(row.topic, row.aggregate_id)))
                } else {
                    topic
                }?;
                let created_micros = match row.created_at.duration_since(std::time::UNIX_EPOCH) {
                    Ok(after) => i64::try_from(after.as_micros()).unwrap_or(i64::MAX),
                    Err(before) => {
                        -i64::try_from(before.duration().as_micros()).unwrap_or(i64::MAX)
                    }
                };
                // rows written by one transaction share their time: formatted once
                if time_of != Some(created_micros) {
                    crate::envelope::format_rfc3339_from_micros(created_micros, &mut time_buf);
                    time_of = Some(created_micros);
                }
                let (entry, len) = Entry::new(
                    key,
                    &Outgoing {
                        event_id: row.event_id.hyphenated().encode_lower(&mut uuid_buf),
                        source: &self.source,
                        topic: row.topic,
                        aggregate_id: row.aggregate_id,
                        time: &time_buf,
                        payload_json: row.payload,
                        traceparent: row.traceparent,
                    },
                );
                if len > self.config.max_entry_bytes {
                    return Err(format!(
                        "envelope is {len} bytes, over max_entry_bytes = {}",
                        self.config.max_entry_bytes
                    ));
                }
                Ok(entry)
            })
            .collect()
    }

    /// Charges a failed attempt to each row, quarantining those at max_attempts.
    /// Returns (failed, quarantined).
    pub(super) async fn record_failures<C: tokio_postgres::GenericClient + Sync>(
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

    pub(super) fn count_failures(&self, outcome: &BatchOutcome) {
        crate::events::rows_refused(
            &self.database,
            &self.table,
            outcome.failed,
            outcome.quarantined,
        );
    }
}

/// What a batch sends and what it charges, in id order.
pub(super) struct Chosen<'r> {
    /// Each entry to publish.
    pub(super) entries: Vec<Entry>,
    /// (id, ctid, topic) of each entry's row.
    pub(super) rows: Vec<(i64, RowAddress, &'r str)>,
    /// Each entry's aggregate.
    pub(super) aggregates: Vec<&'r str>,
    /// Rows that cannot be published as they are, with the reason: charged an attempt.
    pub(super) failures: Vec<(i64, String)>,
}

/// The entries of a batch, in id order: the rows at the head of their aggregate
/// (`publishable`), not deferred, whose envelope could be built and whose stream key is usable.
/// A row that fails (too large, unusable topic, a key that holds no stream) or is deferred
/// stops the rest of its aggregate in this batch, so nothing overtakes it.
fn choose_entries<'r>(
    claimed_rows: &[OutboxRow<'r>],
    prepared: Vec<Result<Entry, String>>,
    publishable: &[bool],
    deferred: &[bool],
    unusable: &HashMap<String, String>,
) -> Chosen<'r> {
    let mut entries: Vec<Entry> = Vec::with_capacity(claimed_rows.len());
    let mut entry_rows: Vec<(i64, RowAddress, &str)> = Vec::with_capacity(claimed_rows.len());
    let mut entry_aggregates: Vec<&str> = Vec::with_capacity(claimed_rows.len());
    let mut failures: Vec<(i64, String)> = Vec::new();
    let mut stopped: HashSet<&str> = HashSet::new();
    for (((row, prepared), head), deferred) in claimed_rows
        .iter()
        .zip(prepared)
        .zip(publishable)
        .zip(deferred)
    {
        if *deferred {
            stopped.insert(row.aggregate_id);
            continue;
        }
        if !head || (!stopped.is_empty() && stopped.contains(row.aggregate_id)) {
            continue;
        }
        let failure = prepared.and_then(|entry| match unusable.get(&*entry.key) {
            Some(kind) => Err(format!(
                "WRONGTYPE: stream key {} holds a {kind}, not a stream",
                entry.key
            )),
            None => Ok(entry),
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
    Chosen {
        entries,
        rows: entry_rows,
        aggregates: entry_aggregates,
        failures,
    }
}

/// The head decision when only a few rows lie outside the batch before its end: `ids[i]`
/// (of aggregate `aggregates[i]`) is publishable unless a row of its aggregate that is not
/// in the batch comes before it. `table_rows`: every (id, aggregate) of the table up to the
/// batch's last id, the batch's own included.
fn heads_among(ids: &[i64], aggregates: &[&str], table_rows: &[(i64, &str)]) -> Vec<bool> {
    let in_batch: HashSet<i64> = ids.iter().copied().collect();
    // the first row of each aggregate that is not in the batch: nothing of that aggregate
    // after it may be published
    let mut first_outside: HashMap<&str, i64> = HashMap::new();
    for &(id, aggregate) in table_rows {
        if !in_batch.contains(&id) {
            let e = first_outside.entry(aggregate).or_insert(id);
            *e = (*e).min(id);
        }
    }
    ids.iter()
        .zip(aggregates)
        .map(|(id, agg)| first_outside.get(agg).is_none_or(|g| id < g))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{choose_entries, heads_among, Entry, OutboxRow};
    use std::collections::HashMap;

    fn entry(key: &str) -> Result<Entry, String> {
        let event = crate::envelope::Outgoing {
            event_id: "e",
            source: "outboxd/test",
            topic: "t",
            aggregate_id: "a",
            time: "2026-11-22T08:00:00.000000Z",
            payload_json: "{}",
            traceparent: None,
        };
        Ok(Entry::new(key.into(), &event).0)
    }

    fn row(id: i64, aggregate_id: &'static str) -> OutboxRow<'static> {
        OutboxRow {
            id,
            ctid: crate::relay::claim::RowAddress::at(0, 1),
            event_id: uuid::Uuid::nil(),
            topic: "t",
            aggregate_id,
            payload: "{}",
            traceparent: None,
            created_at: std::time::UNIX_EPOCH,
        }
    }

    #[test]
    fn a_failing_or_deferred_row_stops_the_rest_of_its_aggregate_only() {
        let rows = [
            row(1, "a"),
            row(2, "b"),
            row(3, "a"),
            row(4, "c"),
            row(5, "c"),
        ];
        let prepared = vec![
            Err("payload too large".to_string()), // a fails: 3 must not overtake it
            entry("s:t"),
            entry("s:t"),
            entry("s:t"), // deferred: 5 waits behind it
            entry("s:t"),
        ];
        let chosen = choose_entries(
            &rows,
            prepared,
            &[true; 5],
            &[false, false, false, true, false],
            &HashMap::new(),
        );
        let ids: Vec<i64> = chosen.rows.iter().map(|r| r.0).collect();
        assert_eq!(ids, [2]);
        assert_eq!(chosen.aggregates, ["b"]);
        assert_eq!(chosen.failures, [(1, "payload too large".to_string())]);
    }

    #[test]
    fn a_key_that_holds_no_stream_fails_its_row_and_rows_not_at_their_head_wait_uncharged() {
        let rows = [row(1, "a"), row(2, "b"), row(3, "b"), row(4, "c")];
        let prepared = vec![entry("s:bad"), entry("s:t"), entry("s:t"), entry("s:t")];
        let unusable = HashMap::from([("s:bad".to_string(), "string".to_string())]);
        // b's head is elsewhere (another relay's row, a late commit): 2 and 3 wait
        let publishable = [true, false, false, true];
        let chosen = choose_entries(&rows, prepared, &publishable, &[false; 4], &unusable);
        assert_eq!(chosen.rows.iter().map(|r| r.0).collect::<Vec<_>>(), [4]);
        assert_eq!(chosen.failures.len(), 1, "only the refused row is charged");
        assert_eq!(chosen.failures[0].0, 1);
        assert!(
            chosen.failures[0].1.starts_with("WRONGTYPE"),
            "{:?}",
            chosen.failures
        );
    }

    #[test]
    fn a_row_outside_the_batch_holds_back_the_later_rows_of_its_aggregate_only() {
        // row 3 (aggregate a) is another relay's, or committed late: 4 and 6 wait, 5 does not
        let table = [(1, "a"), (2, "b"), (3, "a"), (4, "a"), (5, "b"), (6, "a")];
        assert_eq!(
            heads_among(&[1, 2, 4, 5, 6], &["a", "b", "a", "b", "a"], &table),
            [true, true, false, true, false]
        );
    }

    #[test]
    fn rows_outside_the_batch_of_other_aggregates_hold_nothing_back() {
        let table = [(1, "x"), (2, "a"), (3, "y"), (4, "a")];
        assert_eq!(heads_among(&[2, 4], &["a", "a"], &table), [true, true]);
    }

    #[test]
    fn a_row_outside_after_the_batch_row_does_not_hold_it_back() {
        // the order of `table_rows` does not matter: the first outside row is by id
        let table = [(9, "a"), (2, "a"), (7, "a")];
        assert_eq!(heads_among(&[2, 9], &["a", "a"], &table), [true, false]);
    }
}
