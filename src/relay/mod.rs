//! The relay: outbox rows -> Redis Streams. One `Relay` per configured outbox table; this
//! module holds it, its startup checks, the daemon loop (`run`) and the `--once` drain
//! (`drain`). The rooms:
//! - `active`: which of several relay daemons on one outbox drains it (the others stand by);
//! - `batch`: one batch, claim to commit, step by step;
//! - `inflight`: two batches in flight;
//! - `claim`: the SQL of every step, rendered once per table;
//! - `publish`: the `XADD`s, one `MULTI`/`EXEC` transaction per stream key;
//! - `listen`: the LISTEN connection that wakes the loop;
//! - `inspect`: backlog and held-back rows for `status` and the gauges;
//! - `resume`: the resume point claims start after, so that long drains stay fast.
//!
//! A crash anywhere before a batch's commit leaves its rows in place to be published again
//! (duplicates on the stream are harmless to inbox consumers); nothing is deleted before
//! Redis accepted it.

pub mod active;
mod batch;
pub mod claim;
mod inflight;
mod inspect;
mod listen;
pub mod publish;
mod resume;

pub use active::standing_by;
use batch::{CheckRequest, Claimed, Finished, Links};
pub use inflight::InFlightRun;
pub use inspect::{held_back_with, Backlog, Blocker, HeldBack};
use listen::listen;

use crate::config::{ConfigError, RelayConfig};
use crate::db::quote_qualified;
use crate::error::{Error, Result};
use crate::redis_io::Redis;
use crate::retry::Backoff;
use claim::Statements;
use deadpool_postgres::Pool;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

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
    /// Where claims start (see resume.rs). Shared by the batches in flight; never held
    /// across an await.
    resume: Mutex<resume::ResumePoint>,
    /// This relay's own publishing connection (resp.rs), or `None` (TLS, Cluster): the
    /// shared one.
    publisher: Option<crate::resp::Publisher>,
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
        crate::events::relay_started(&config.database, &config.table);
        Relay {
            database: config.database.clone(),
            table: config.table.clone(),
            sql: Statements::for_table(
                &quoted,
                &quote_qualified(&crate::migrate::archive_table(&config.table)),
                config.batch_size,
            ),
            pool,
            pg,
            publisher: redis.publisher(),
            redis,
            config,
            source,
            relid: None,
            known_streams: Mutex::new(HashSet::new()),
            give_up_after: Duration::from_secs(60),
            resume: Mutex::new(resume::ResumePoint::new()),
        }
    }

    fn resume_point(&self) -> std::sync::MutexGuard<'_, resume::ResumePoint> {
        // the state is a few integers, always left consistent: a panic elsewhere while it
        // was held does not spoil it
        self.resume
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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
        let relid = relid.ok_or_else(|| Error::Refused {
            context: self.ctx("startup"),
            reason: format!(
                "table {} does not exist in database {} (run `outboxd migrate`)",
                self.table, self.database
            ),
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
                return Err(Error::Refused {
                    context: self.ctx("startup"),
                    reason: format!(
                        "sequence {sequence} of table {} caches {cache} ids per session, so ids \
                         no longer follow the order they are handed out in and per-aggregate \
                         order cannot be kept; run ALTER SEQUENCE {sequence} CACHE 1",
                        self.table
                    ),
                });
            }
        }
        Ok(relid)
    }

    /// Claims, publishes and deletes one batch, with no other batch of this relay in flight.
    pub async fn run_batch(&mut self) -> Result<BatchOutcome> {
        let relid = self.relid().await?;
        Ok(self.batch(relid, 0, Links::alone()).await?.outcome)
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

    /// The daemon loop: batches back to back while they come back full, otherwise wait for a
    /// NOTIFY or the poll interval. PostgreSQL or Redis trouble backs off and retries without
    /// counting attempts against rows. Returns when `shutdown` is cancelled (after finishing
    /// the batch in hand), or with an error retrying cannot cure.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<()> {
        let wake = Arc::new(Notify::new());
        // LISTEN starts when this relay first drains: a standby has no use for wake-ups, and
        // its connections (the LISTEN one and the pooled one it looks the table up on) would
        // be one more backend per standby for nothing
        let mut listener: Option<tokio::task::JoinHandle<()>> = None;
        let poll = Duration::from_millis(self.config.poll_interval_ms);
        let mut backoff = Backoff::new();
        let mut last_prune: Option<Instant> = None;
        let watch =
            crate::watchdog::register(&crate::watchdog::relay_loop(&self.database, &self.table));
        let mut leadership: Option<active::Leadership> = None;
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
            // A standby only tries for the active lock (on the lock's own connection); the
            // startup checks and LISTEN wait until it drains.
            if self.config.standby {
                let leader = leadership.get_or_insert_with(|| {
                    active::Leadership::new(self.pg.clone(), &self.database, &self.table)
                });
                if !leader.active().await {
                    // standing by: an idle round, as far as the watchdog is concerned
                    watch.done();
                    tokio::select! {
                        _ = shutdown.cancelled() => break Ok(()),
                        _ = tokio::time::sleep(active::STANDBY_RETRY) => {}
                    }
                    continue;
                }
            }
            let run = match self.relid().await {
                Ok(relid) => {
                    if listener.is_none() {
                        listener = Some(tokio::spawn(listen(
                            self.pg.clone(),
                            self.name(),
                            self.pool.clone(),
                            self.table.clone(),
                            wake.clone(),
                            shutdown.child_token(),
                        )));
                    }
                    let still_active = leadership
                        .as_ref()
                        .and_then(active::Leadership::still_active);
                    self.batches_in_flight(relid, &shutdown, still_active.as_deref(), &mut |_| {
                        watch.beat()
                    })
                    .await
                }
                Err(e) => InFlightRun {
                    error: Some(e),
                    ..InFlightRun::default()
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
                    let error = crate::error::chain(&e);
                    watch.failed(&error);
                    crate::db::after_failure(&self.pool, &e);
                    let delay = backoff.next_delay();
                    crate::events::relay_batch_failed(
                        &self.name(),
                        &self.database,
                        &self.table,
                        &error,
                        delay,
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => break Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(e) => break Err(e),
            }
        };
        if let Some(listener) = listener {
            listener.abort();
        }
        // the active lock goes with `leadership`, dropped here
        drop(leadership);
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
                    self.batches_in_flight(relid, shutdown, None, &mut |o| {
                        published += o.published as u64;
                        progress(published);
                    })
                    .await
                }
                Err(e) => InFlightRun {
                    error: Some(e),
                    ..InFlightRun::default()
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
