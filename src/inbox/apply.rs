//! Applying a batch: decode and triage each entry (undecodable or unhandled: dead-lettered
//! now), apply the rest in one transaction, redoing it without any event whose handler fails
//! (no savepoint round trips), record each event ID in the inbox in that same transaction,
//! acknowledge after the commit, then settle the failures (retry while deliveries remain,
//! dead-letter after). The effects themselves are the handler's (`handlers`).

use super::dlq;
use super::read::{self, Entry};
use super::{Consumer, Tally};
use crate::envelope::{decode, Incoming};
use crate::error::{Error, Result};
use crate::events::{result, EventRef};
use crate::handlers::order_status::OrderStatusHandler;
use crate::handlers::{HandleError, Handler, Outcome};
use crate::metrics::metrics;
use std::collections::{HashMap, HashSet};
use std::time::Instant;

struct Work {
    entry: usize,
    event: Incoming,
    hash: i64,
    lock_key: Option<String>,
    /// Its CloudEvents `expiration` had passed when the batch was read: recorded in the
    /// inbox and skipped, never applied (as a Dapr subscriber drops it).
    expired: bool,
}

/// Whether any of `entries` is large (see [`crate::large_work`]).
pub(super) fn carries_large_entries(entries: &[Entry]) -> bool {
    entries.iter().any(|e| {
        e.fields
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
            >= crate::large_work::LARGE_EVENT_BYTES
    })
}

/// What became of one entry of a batch: every entry ends with exactly one.
#[derive(Debug)]
enum Fate {
    /// Applied in this batch's transaction, with the order transition it made, if any.
    Applied {
        transition: Option<(String, String)>,
    },
    /// Its event ID was in the inbox already.
    Duplicate,
    /// Recorded in the inbox; it changed nothing (backwards, terminal, ...).
    Skipped { code: &'static str, reason: String },
    /// Its handler failed: taken out of the batch, then retried or dead-lettered.
    Failed(HandleError),
    /// To the dead-letter stream, for this reason.
    Dead(String),
}

impl Fate {
    /// Covered by the commit, so acknowledged after it.
    fn committed(&self) -> bool {
        matches!(
            self,
            Fate::Applied { .. } | Fate::Duplicate | Fate::Skipped { .. }
        )
    }
}

/// The decoded events of a batch (sorted by lock key, so orders are locked in ID order) and
/// each entry's fate so far, by entry index.
struct Triage {
    work: Vec<Work>,
    /// `work_of[i]`: the index in `work` of entry `i`, if it decoded.
    work_of: Vec<Option<usize>>,
    fates: Vec<Option<Fate>>,
}

impl Triage {
    /// The event ID and aggregate ID (the order, for `order_status`) of entry `i`, for the
    /// logs; empty where the entry could not be read that far.
    fn ids(&self, i: usize) -> (&str, &str, &str) {
        self.work_of[i].map_or(("", "", ""), |k| {
            let w = &self.work[k];
            (
                w.event.event_id.as_str(),
                w.lock_key.as_deref().unwrap_or(""),
                w.event.trace_id(),
            )
        })
    }

    fn count(&self, which: impl Fn(&Fate) -> bool) -> u64 {
        self.fates.iter().flatten().filter(|f| which(f)).count() as u64
    }
}

impl Consumer {
    /// Handles one batch, step by step: triage (what can never be handled is dead-lettered),
    /// apply the rest in one transaction (redone without any event whose handler fails),
    /// acknowledge what the commit covered, settle the failures (retry or dead-letter),
    /// report.
    pub async fn process(&self, entries: Vec<Entry>, fresh: bool) -> Result<Tally> {
        let started = Instant::now();
        if entries.is_empty() {
            return Ok(Tally::default());
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
        let mut triage = self.triage(&entries, &deliveries);
        // Sets of a batch commit on their own: what committed is acknowledged and reported
        // even when another set failed (its entries stay pending for a retry).
        let (conflicts, failed) = match &self.handler {
            Handler::OrderStatus(h) => self.apply_in_sets(h, &entries, &mut triage, large).await,
            Handler::Sql(_) => {
                let all: Vec<usize> = (0..triage.work.len()).collect();
                match self.apply_each(&entries, &mut triage, &all, large).await {
                    Ok(conflicts) => (conflicts, None),
                    Err(e) => return Err(e),
                }
            }
        };
        let committed_at = std::time::SystemTime::now();
        self.acknowledge(&mut conn, &entries, &triage).await?;
        if large {
            // the shared connection may have carried them (pending and claimed entries)
            conn.renew().await;
        }
        let retrying = self
            .settle(&mut conn, &entries, &mut triage, fresh, &deliveries)
            .await?;
        let tally = Tally {
            applied: triage.count(|f| matches!(f, Fate::Applied { .. })),
            duplicate: triage.count(|f| matches!(f, Fate::Duplicate)),
            skipped: triage.count(|f| matches!(f, Fate::Skipped { .. })),
            dead_lettered: triage.count(|f| matches!(f, Fate::Dead(_))),
            retrying,
            conflicts,
        };
        self.report(&entries, &triage, &tally, committed_at, started);
        match failed {
            Some(e) => Err(e),
            None => Ok(tally),
        }
    }

    /// Decodes each entry; one that can never be handled (deleted before it was acknowledged,
    /// delivered too often, not a valid event) is marked dead at once.
    fn triage(&self, entries: &[Entry], deliveries: &impl Fn(&Entry) -> u64) -> Triage {
        let mut fates: Vec<Option<Fate>> = (0..entries.len()).map(|_| None).collect();
        let mut work: Vec<Work> = Vec::with_capacity(entries.len());
        let now = std::time::SystemTime::now();
        for (i, entry) in entries.iter().enumerate() {
            if !entry.present {
                fates[i] = Some(Fate::Dead(
                    "entry was deleted from the stream before it was acknowledged".into(),
                ));
                continue;
            }
            let n = deliveries(entry);
            if n > u64::from(self.config.max_deliveries) {
                fates[i] = Some(Fate::Dead(format!(
                    "delivered {n} times without being acknowledged (max_deliveries = {})",
                    self.config.max_deliveries
                )));
                continue;
            }
            match decode(entry.data(), &self.topics[entry.stream]) {
                Ok(event) => {
                    let hash = data_hash(&event.data);
                    let lock_key = self.handler.lock_key(&event);
                    let expired = event.expired_at(now);
                    work.push(Work {
                        entry: i,
                        event,
                        hash,
                        lock_key,
                        expired,
                    });
                }
                Err(e) => fates[i] = Some(Fate::Dead(e.to_string())),
            }
        }
        // Stable: entries of one order keep their stream order.
        work.sort_by(|a, b| a.lock_key.cmp(&b.lock_key));
        let mut work_of = vec![None; entries.len()];
        for (k, w) in work.iter().enumerate() {
            work_of[w.entry] = Some(k);
        }
        Triage {
            work,
            work_of,
            fates,
        }
    }

    /// A transaction over the events `owned` (indices into the work), one event at a time:
    /// the inbox rows of every event, then each new event's handler, commit. An event whose
    /// handler fails is marked failed and the transaction redone without it. The `sql`
    /// handler's path, and `order_status`'s where a set-based transaction was refused.
    /// Returns the conflicts seen (a duplicate event ID with other data).
    async fn apply_each(
        &self,
        entries: &[Entry],
        triage: &mut Triage,
        owned: &[usize],
        large: bool,
    ) -> Result<u64> {
        let Triage { work, fates, .. } = triage;
        loop {
            // What an aborted round decided is decided again.
            for &k in owned {
                let fate = &mut fates[work[k].entry];
                if fate.as_ref().is_some_and(Fate::committed) {
                    *fate = None;
                }
            }
            let active: Vec<&Work> = owned
                .iter()
                .map(|&k| &work[k])
                .filter(|w| fates[w.entry].is_none())
                .collect();
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
                if !new_ids.remove(&w.event.event_id) {
                    duplicates.push(w);
                } else if w.expired {
                    fates[w.entry] = Some(Fate::Skipped {
                        code: crate::handlers::EXPIRED,
                        reason: expired_reason(&w.event),
                    });
                } else {
                    to_apply.push(w);
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
            let entries_ref = entries;
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
            for w in &duplicates {
                fates[w.entry] = Some(Fate::Duplicate);
            }
            let mut retry_batch = false;
            for (entry, result) in results.into_iter().flatten() {
                match result {
                    Ok(Outcome::Applied { transition }) => {
                        fates[entry] = Some(Fate::Applied { transition });
                    }
                    Ok(Outcome::Skipped { code, reason }) => {
                        fates[entry] = Some(Fate::Skipped {
                            code,
                            reason: reason.to_string(),
                        });
                    }
                    Err(HandleError::Transient(e)) => return Err(e),
                    // Another event's failure aborted the transaction under this one: it is
                    // not at fault and goes again in the redone batch.
                    Err(HandleError::Aborted) => retry_batch = true,
                    Err(e) => {
                        fates[entry] = Some(Fate::Failed(e));
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
            let conflicts = if duplicates.is_empty() {
                0
            } else {
                let ids: Vec<&str> = duplicates
                    .iter()
                    .map(|w| w.event.event_id.as_str())
                    .collect();
                let stored = crate::db::bounded(bound, &ctx, async {
                    tx.query(&self.inbox_hashes, &[&self.config.name, &ids])
                        .await
                        .map_err(Error::pg(format!(
                            "consumer {}: reading inbox hashes",
                            self.config.name
                        )))
                })
                .await?;
                self.count_conflicts(&stored, &duplicates)
            };
            crate::db::bounded(bound, &ctx, async {
                tx.commit().await.map_err(Error::pg(ctx.clone()))
            })
            .await?;
            if large {
                // closed, not pooled: it would keep buffers this large for as long as it lives
                drop(deadpool_postgres::Object::take(client));
            }
            return Ok(conflicts);
        }
    }

    /// The `order_status` batch, set-based: the events split by order into up to
    /// `concurrency` disjoint sets (so no two transactions lock one order), each applied in a
    /// transaction of its own at once. A set whose statements PostgreSQL refuses for a reason
    /// no single event can be blamed for is applied event by event instead, which finds the
    /// event at fault. Returns the conflicts seen, and the error of a set that failed.
    async fn apply_in_sets(
        &self,
        handler: &OrderStatusHandler,
        entries: &[Entry],
        triage: &mut Triage,
        large: bool,
    ) -> (u64, Option<Error>) {
        // A batch of large events keeps to one connection: its memory is the point.
        let n = if large {
            1
        } else {
            self.config.concurrency.max(1) as usize
        };
        let mut sets: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (k, w) in triage.work.iter().enumerate() {
            if triage.fates[w.entry].is_some() {
                continue;
            }
            // Work is sorted by lock key, so each set keeps an order's events in stream order.
            let slot = w.lock_key.as_deref().map_or(0, |key| {
                (crate::fnv::fnv1a64(key.as_bytes()) % n as u64) as usize
            });
            sets[slot].push(k);
        }
        sets.retain(|s| !s.is_empty());
        let results = futures_util::future::join_all(
            sets.iter()
                .map(|set| self.apply_set(handler, entries, &triage.work, set, large)),
        )
        .await;
        let mut conflicts = 0;
        let mut failed = None;
        let mut refused: Vec<usize> = Vec::new();
        for (set, result) in sets.iter().zip(results) {
            match result {
                Ok(Some(set_fates)) => {
                    for (k, fate) in set_fates.fates {
                        triage.fates[triage.work[k].entry] = Some(fate);
                    }
                    conflicts += set_fates.conflicts;
                }
                Ok(None) => refused.extend(set),
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        if !refused.is_empty() {
            refused.sort_unstable();
            match self.apply_each(entries, triage, &refused, large).await {
                Ok(c) => conflicts += c,
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        (conflicts, failed)
    }

    /// One set's transaction: lock its orders and read them, insert the inbox rows, decide
    /// each event in Rust, write it all set-based, commit; a fixed number of round trips
    /// whatever the set's size. `None` when PostgreSQL refused a statement for a reason
    /// that is not the server's state (a constraint, a trigger of the user's): the caller
    /// then goes event by event.
    async fn apply_set(
        &self,
        handler: &OrderStatusHandler,
        entries: &[Entry],
        work: &[Work],
        set: &[usize],
        large: bool,
    ) -> Result<Option<SetFates>> {
        let bound = self.query_timeout;
        let ctx = format!("consumer {}: applying a batch", self.config.name);
        let client = crate::db::bounded(bound, &ctx, async {
            self.pool.get().await.map_err(Error::pool(format!(
                "consumer {}: getting a connection",
                self.config.name
            )))
        })
        .await?;
        let prepared = crate::db::bounded(bound, &ctx, async {
            let (insert, hashes, forget, batch) = futures_util::future::try_join4(
                client.prepare_cached(&self.inbox_insert),
                client.prepare_cached(&self.inbox_hashes),
                client.prepare_cached(&self.inbox_forget),
                handler.prepare_batch(&client),
            )
            .await
            .map_err(SetError)?;
            Ok::<_, SetError>((insert, hashes, forget, batch))
        })
        .await;
        let (insert, hashes_of, forget, batch) = match prepared {
            Ok(p) => p,
            Err(e) => return self.set_refused(e),
        };
        // From BEGIN on, a connection that fails (or a future dropped midway) is closed, not
        // pooled: it may hold the transaction open. Every pipeline below sends all its
        // statements on its first poll (each is prepared), so they reach PostgreSQL in order.
        let tx = crate::db::OpenTransaction::new(client);
        if large {
            // closed, not pooled: it would keep buffers this large for as long as it lives
            tx.close_when_done();
        }
        let items: Vec<&Work> = set.iter().map(|&k| &work[k]).collect();
        let mut order_ids: Vec<&str> = items.iter().filter_map(|w| w.lock_key.as_deref()).collect();
        order_ids.sort_unstable();
        order_ids.dedup();
        let event_ids: Vec<&str> = items.iter().map(|w| w.event.event_id.as_str()).collect();
        let streams: Vec<&str> = items
            .iter()
            .map(|w| self.keys[entries[w.entry].stream].as_str())
            .collect();
        let entry_ids: Vec<&str> = items.iter().map(|w| entries[w.entry].id.as_str()).collect();
        let hashes: Vec<i64> = items.iter().map(|w| w.hash).collect();
        let c: &tokio_postgres::Client = tx.client();
        // One round trip: BEGIN; the orders locked (in ID order) and read with their
        // fulfillments; the inbox rows.
        let read = crate::db::bounded(bound, &ctx, async {
            // Index probes, never a scan of a whole table: a plan made while a table was small
            // (or for a batch of many orders) scans it whole, comparing every row with every
            // element of `= ANY($1)`, and keeps doing so as it grows (measured: most of
            // PostgreSQL's time on a 10,000-order run). Every statement here has an index.
            let ((), (), (orders, inserted)) = futures_util::future::try_join3(
                c.batch_execute("BEGIN"),
                c.batch_execute("SET LOCAL enable_seqscan = off"),
                futures_util::future::try_join(
                    handler.read_orders(c, &batch, &order_ids),
                    c.query(
                        &insert,
                        &[&self.config.name, &event_ids, &streams, &entry_ids, &hashes],
                    ),
                ),
            )
            .await
            .map_err(SetError)?;
            Ok::<_, SetError>((orders, inserted))
        })
        .await;
        let (mut orders, inserted) = match read {
            Ok(read) => read,
            Err(e) => return self.set_refused(e),
        };
        let mut new_ids: HashSet<String> = inserted.iter().map(|r| r.get(0)).collect();
        // The data hash each event ID was recorded with in this transaction: its first
        // occurrence in the set (the inbox insert keeps the first of a repeated ID).
        let mut recorded: HashMap<&str, i64> = HashMap::new();
        for w in &items {
            if new_ids.contains(w.event.event_id.as_str()) {
                recorded.entry(w.event.event_id.as_str()).or_insert(w.hash);
            }
        }
        let mut fates: Vec<(usize, Fate)> = Vec::with_capacity(set.len());
        // Duplicates of events recorded before this batch: their hashes are read back.
        let mut duplicates: Vec<&Work> = Vec::new();
        let mut repeated_with_other_data: Vec<&str> = Vec::new();
        for (&k, w) in set.iter().zip(&items) {
            let id = w.event.event_id.as_str();
            if !new_ids.contains(id) {
                match recorded.get(id) {
                    // repeated within the batch: compared here, no round trip
                    Some(&first) => {
                        if first != w.hash {
                            repeated_with_other_data.push(id);
                        }
                    }
                    None => duplicates.push(w),
                }
                fates.push((k, Fate::Duplicate));
                continue;
            }
            let topic = &self.topics[entries[w.entry].stream];
            let fate = if w.expired {
                Fate::Skipped {
                    code: crate::handlers::EXPIRED,
                    reason: expired_reason(&w.event),
                }
            } else {
                match handler.decide_in_batch(&mut orders, topic, &w.event) {
                    Ok(Outcome::Applied { transition }) => Fate::Applied { transition },
                    Ok(Outcome::Skipped { code, reason }) => Fate::Skipped { code, reason },
                    Err(e) => Fate::Failed(e),
                }
            };
            // The first occurrence that is applied or skipped settles its event ID; after a
            // failed one, a later occurrence in the batch is decided again.
            if fate.committed() {
                new_ids.remove(id);
            }
            fates.push((k, fate));
        }
        // The inbox rows of events that failed go: they are retried.
        let unsettled: Vec<&str> = new_ids.iter().map(String::as_str).collect();
        let duplicate_ids: Vec<&str> = duplicates
            .iter()
            .map(|w| w.event.event_id.as_str())
            .collect();
        // One round trip: the writes, the inbox rows forgotten, the stored hashes of the
        // duplicates, COMMIT. A write that fails aborts the transaction and the COMMIT then
        // rolls it back; its error is the one reported.
        let written = crate::db::bounded(bound, &ctx, async {
            let forget_rows = async {
                if unsettled.is_empty() {
                    return Ok(0);
                }
                c.execute(&forget, &[&self.config.name, &unsettled]).await
            };
            let stored = async {
                if duplicate_ids.is_empty() {
                    return Ok(Vec::new());
                }
                c.query(&hashes_of, &[&self.config.name, &duplicate_ids])
                    .await
            };
            let ((), _, stored, ()) = futures_util::future::try_join4(
                handler.write_orders(c, &batch, &orders),
                forget_rows,
                stored,
                c.batch_execute("COMMIT"),
            )
            .await
            .map_err(SetError)?;
            Ok::<_, SetError>(stored)
        })
        .await;
        let stored = match written {
            Ok(stored) => stored,
            Err(e) => return self.set_refused(e),
        };
        tx.ended();
        for id in &repeated_with_other_data {
            crate::events::data_conflict(&self.config.name, id);
        }
        let conflicts =
            repeated_with_other_data.len() as u64 + self.count_conflicts(&stored, &duplicates);
        Ok(Some(SetFates { fates, conflicts }))
    }

    /// A set's statement failed: the server or the connection (an error for a retry), or
    /// PostgreSQL refused the statement itself (`None`: go event by event).
    fn set_refused(&self, e: Error) -> Result<Option<SetFates>> {
        match e {
            Error::Postgres { source, .. } if !crate::error::postgres_is_transient(&source) => {
                tracing::warn!(
                    consumer = %self.config.name,
                    error = %crate::error::chain(&source),
                    "PostgreSQL refused a set-based batch; applying its events one by one"
                );
                Ok(None)
            }
            e => Err(e),
        }
    }

    /// Acknowledges everything the commit covered, in one round trip.
    async fn acknowledge(
        &self,
        conn: &mut crate::redis_io::Conn,
        entries: &[Entry],
        triage: &Triage,
    ) -> Result<()> {
        let mut acks: Vec<Vec<&str>> = vec![Vec::new(); self.keys.len()];
        for (entry, fate) in entries.iter().zip(&triage.fates) {
            if fate.as_ref().is_some_and(Fate::committed) {
                acks[entry.stream].push(entry.id.as_str());
            }
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
        for reply in crate::redis_io::pipeline_by_key(conn, acks)
            .await
            .map_err(xack)?
        {
            reply.map_err(xack)?;
        }
        Ok(())
    }

    /// Failures: permanent ones dead now, retryable ones when out of deliveries (the others
    /// stay pending for a retry); then every dead entry to its dead-letter stream. Returns
    /// how many are left for a retry.
    async fn settle(
        &self,
        conn: &mut crate::redis_io::Conn,
        entries: &[Entry],
        triage: &mut Triage,
        fresh: bool,
        deliveries: &impl Fn(&Entry) -> u64,
    ) -> Result<u64> {
        let mut retrying = 0;
        for (i, entry) in entries.iter().enumerate() {
            let Some(Fate::Failed(err)) = &triage.fates[i] else {
                continue;
            };
            let permanent = matches!(err, HandleError::Permanent(_));
            let n = if fresh && !permanent {
                read::delivery_counts(
                    conn,
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
                triage.fates[i] = Some(Fate::Dead(err.to_string()));
            } else {
                retrying += 1;
                crate::events::event_retrying(
                    self.event_ref(entries, triage, i),
                    n,
                    &err.to_string(),
                );
            }
        }
        for (i, entry) in entries.iter().enumerate() {
            let Some(Fate::Dead(reason)) = &triage.fates[i] else {
                continue;
            };
            let key = &self.keys[entry.stream];
            dlq::dead_letter(
                conn,
                key,
                &self.config.name,
                &self.instance,
                entry,
                reason,
                deliveries(entry).max(1),
            )
            .await?;
            crate::events::dead_lettered(self.event_ref(entries, triage, i), key, reason);
        }
        Ok(retrying)
    }

    /// Which event entry `i` is, for a log line.
    fn event_ref<'a>(&'a self, entries: &'a [Entry], triage: &'a Triage, i: usize) -> EventRef<'a> {
        let (event_id, aggregate_id, trace_id) = triage.ids(i);
        EventRef {
            consumer: &self.config.name,
            entry_id: &entries[i].id,
            event_id,
            aggregate_id,
            trace_id,
        }
    }

    /// The batch's metrics and its lines about skipped events.
    fn report(
        &self,
        entries: &[Entry],
        triage: &Triage,
        tally: &Tally,
        committed_at: std::time::SystemTime,
        started: Instant,
    ) {
        let m = metrics();
        let name = self.config.name.as_str();
        for (i, fate) in triage.fates.iter().enumerate() {
            match fate {
                Some(Fate::Skipped { code, reason }) => {
                    crate::events::event_skipped(self.event_ref(entries, triage, i), code, reason);
                }
                Some(Fate::Applied {
                    transition: Some((from, to)),
                }) => m.order_transitions.with_label_values(&[from, to]).inc(),
                _ => {}
            }
        }
        for (result, n) in [
            (result::APPLIED, tally.applied),
            (result::DUPLICATE, tally.duplicate),
            (result::SKIPPED, tally.skipped),
            (result::DEAD_LETTERED, tally.dead_lettered),
        ] {
            if n > 0 {
                m.consumer_events
                    .with_label_values(&[name, result])
                    .inc_by(n);
            }
        }
        for w in &triage.work {
            if let Some(created) = w.event.created {
                if let Ok(age) = committed_at.duration_since(created) {
                    m.end_to_end_seconds.observe(age.as_secs_f64());
                }
            }
        }
        m.consumer_batch_seconds
            .with_label_values(&[name])
            .observe(started.elapsed().as_secs_f64());
    }

    /// The duplicates whose data differs from the first one applied (`stored`: event ID and
    /// data hash rows from the inbox), each said in a line and a metric.
    fn count_conflicts(&self, stored: &[tokio_postgres::Row], duplicates: &[&Work]) -> u64 {
        let stored: HashMap<String, i64> = stored.iter().map(|r| (r.get(0), r.get(1))).collect();
        let mut conflicts = 0;
        for w in duplicates {
            if stored.get(&w.event.event_id).is_some_and(|h| *h != w.hash) {
                conflicts += 1;
                crate::events::data_conflict(&self.config.name, &w.event.event_id);
            }
        }
        conflicts
    }
}

/// What a set's transaction decided, by work index.
struct SetFates {
    fates: Vec<(usize, Fate)>,
    conflicts: u64,
}

/// A PostgreSQL error inside a set's transaction, kept whole so that it can be told apart:
/// the server's state (retry) or the statement refused (go event by event).
struct SetError(tokio_postgres::Error);

impl From<tokio_postgres::Error> for SetError {
    fn from(e: tokio_postgres::Error) -> SetError {
        SetError(e)
    }
}

impl From<SetError> for Error {
    fn from(e: SetError) -> Error {
        Error::pg("consumer: applying a set-based batch")(e.0)
    }
}

fn expired_reason(event: &Incoming) -> String {
    format!(
        "expired (CloudEvents expiration {}) before it was applied",
        // as JSON, the way the entry wrote it
        serde_json::Value::from(event.expiration_text.as_deref())
    )
}

/// FNV-1a over the event data's JSON (keys sorted by serde_json's map), to notice the same
/// event ID arriving with other data.
fn data_hash(data: &serde_json::Value) -> i64 {
    // streamed into the hash: the same bytes as `data.to_string()`, without building them
    // (a Value always serializes, and this writer never fails)
    let mut hasher = crate::fnv::Fnv1a64::new();
    let _ = serde_json::to_writer(&mut hasher, data);
    hasher.finish() as i64
}

#[cfg(test)]
mod tests {
    use super::data_hash;

    #[test]
    fn an_expired_event_is_said_with_its_expiration_as_the_entry_wrote_it() {
        let entry = br#"{"specversion":"1.0","id":"e1","source":"s","type":"t","expiration":"2020-01-02T03:04:05Z","data":{}}"#;
        let event = crate::envelope::decode(Some(entry), "t").expect("decodes");
        assert!(event.expired_at(std::time::SystemTime::now()));
        assert_eq!(
            super::expired_reason(&event),
            r#"expired (CloudEvents expiration "2020-01-02T03:04:05Z") before it was applied"#
        );
    }

    #[test]
    fn hash_is_key_order_independent() {
        let a: serde_json::Value = serde_json::from_str(r#"{"a":1,"b":2}"#).expect("json");
        let b: serde_json::Value = serde_json::from_str(r#"{"b":2,"a":1}"#).expect("json");
        assert_eq!(data_hash(&a), data_hash(&b));
    }

    #[test]
    fn hash_is_the_one_inbox_rows_already_hold() {
        // rows recorded before the hash was streamed hold FNV-1a of the JSON text
        let v: serde_json::Value =
            serde_json::from_str(r#"{"order_id":"o1","n":[1,2.5,"x\"y"],"m":{"z":null}}"#)
                .expect("json");
        assert_eq!(
            data_hash(&v),
            crate::fnv::fnv1a64(v.to_string().as_bytes()) as i64
        );
    }
}
