//! Which of several relay daemons on one outbox drains it: the one holding the outbox's
//! *active* lock, a session advisory lock on a dedicated connection (not pooled: a pooled
//! connection goes back to the pool and would carry the lock to whoever takes it next). The
//! others stand by and try for the lock every `STANDBY_RETRY`.
//!
//! Why: several relays on one outbox are safe (SKIP LOCKED, the head checks), but they do not
//! add speed. They share one table's index head and one database's CPU, each batch's head
//! check meets the others' locked rows and takes the slow path, and none of them gets the
//! resume point's whole-head batches. Measured, two relays drained at 0.66 and four at 0.52
//! of one. One active relay with hot standbys drains as fast as one, and a standby takes
//! over within seconds:
//! - the active relay exits or is killed: its connection closes, PostgreSQL releases the
//!   lock at once, and a standby gets it at its next try (within a second);
//! - the active relay freezes (SIGSTOP, a hung host, a network partition): its connection
//!   stops sending the heartbeat, and `idle_session_timeout` (set on that session) makes the
//!   server end it after `HOLDER_IDLE_TIMEOUT`, releasing the lock;
//! - the active relay's lock connection fails: it stops launching batches (those in flight
//!   finish) and tries for the lock again like a standby.
//!
//! Two relays briefly both active (a frozen one thawing while its batch was in flight) is
//! harmless: it is the shape the relay always supported. So is neither being sure: when the
//! lock connection cannot be made at all, the relay works (it could be the only one left).
//! `relay --once` takes no part: it is for backfills and for draining a stuck outbox, and a
//! stuck daemon holding the lock is exactly when it must not wait.
//!
//! The lock key: (`ACTIVE_LOCK_CLASS`, table oid) in the two-key form. The producers' keys
//! are (table oid, hash of the aggregate) and (table oid) in the one-key form; no user table
//! has an oid below 16384, so the two never meet.

use crate::db::PgTarget;
use crate::error::Error;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The first key of the active lock (an oid no user table can have, see the module doc).
pub const ACTIVE_LOCK_CLASS: i32 = 4242;
/// How often the active relay's lock connection proves it is alive.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long the server keeps the lock of a holder that went silent.
pub const HOLDER_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a standby tries for the lock.
pub const STANDBY_RETRY: Duration = Duration::from_secs(1);

/// This relay's side of the active lock of one outbox.
#[derive(Debug)]
pub(super) struct Leadership {
    pg: PgTarget,
    relay: String,
    database: String,
    table: String,
    /// The table's name quoted for `to_regclass`: the lock's key is its oid, looked up by the
    /// statement that takes the lock, so that a standby needs no other connection.
    quoted_table: String,
    held: Option<Held>,
    /// A standby's lock connection, kept for its next try.
    waiting: Option<LockConnection>,
    next_try: Instant,
    /// Last answer, to log changes only.
    was_active: Option<bool>,
}

/// The lock while this relay holds it.
#[derive(Debug)]
struct Held {
    /// True while the lock's connection is alive; cleared when it fails.
    alive: Arc<AtomicBool>,
    /// Owns the connection's client: aborting it closes the session, and the lock goes.
    heartbeat: tokio::task::JoinHandle<()>,
}

/// The outboxes (database, table) whose relay in this process found another one active at
/// its last try.
static STANDING_BY: std::sync::Mutex<std::collections::BTreeSet<(String, String)>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// Whether this process's relay of the outbox is standing by (another relay is active): its
/// gauges are the active relay's process's to measure (housekeeping.rs).
pub fn standing_by(database: &str, table: &str) -> bool {
    STANDING_BY
        .lock()
        .is_ok_and(|s| s.contains(&(database.to_string(), table.to_string())))
}

/// A dedicated connection for the lock, and the flag its driver clears when it ends.
#[derive(Debug)]
struct LockConnection {
    client: tokio_postgres::Client,
    driver: tokio::task::JoinHandle<()>,
    alive: Arc<AtomicBool>,
}

/// The answer of one try for the lock.
enum Tried {
    Taken(Held),
    /// Another session holds it: its backend pid, and ", client <address>".
    HeldBy(i32, String),
    Failed(String),
}

impl Leadership {
    pub(super) fn new(pg: PgTarget, database: &str, table: &str) -> Leadership {
        Leadership {
            pg,
            relay: format!("{database}.{table}"),
            database: database.to_string(),
            table: table.to_string(),
            quoted_table: crate::db::quote_qualified(table),
            held: None,
            waiting: None,
            next_try: Instant::now(),
            was_active: None,
        }
    }

    /// Whether this relay should drain now: it holds the lock (tried for again when due), or
    /// the lock connection cannot be made at all.
    pub(super) async fn active(&mut self) -> bool {
        if let Some(held) = &self.held {
            if held.alive.load(Ordering::Acquire) {
                return true;
            }
            tracing::warn!(relay = %self.relay, "lost the relay's active lock (its connection failed); trying for it again");
            self.release();
            self.was_active = None;
            self.export(false);
        }
        if Instant::now() < self.next_try {
            return false;
        }
        self.next_try = Instant::now() + STANDBY_RETRY;
        let (active, message) = match self.try_take().await {
            Tried::Taken(held) => {
                self.held = Some(held);
                (
                    true,
                    "this relay is the active one for its outbox".to_string(),
                )
            }
            Tried::HeldBy(pid, who) => (
                false,
                format!(
                    "another relay is active for this outbox (backend pid {pid}{who}); standing by"
                ),
            ),
            Tried::Failed(reason) => (
                true,
                format!("cannot take the relay's active lock ({reason}); relaying anyway"),
            ),
        };
        if self.was_active != Some(active) {
            tracing::info!(relay = %self.relay, "{message}");
            self.was_active = Some(active);
        }
        self.export(active);
        active
    }

    fn export(&self, active: bool) {
        crate::metrics::metrics()
            .relay_active
            .with_label_values(&[&self.database, &self.table])
            .set(i64::from(active));
        let key = (self.database.clone(), self.table.clone());
        if let Ok(mut standing_by) = STANDING_BY.lock() {
            if active {
                standing_by.remove(&key);
            } else {
                standing_by.insert(key);
            }
        }
    }

    /// The lock connection a standby keeps between its tries (made anew only when it
    /// failed): a connection a second would be a backend started and ended a second per
    /// standby, which cost PostgreSQL more than the standby's whole watch otherwise.
    async fn lock_connection(&mut self) -> Result<LockConnection, Error> {
        if let Some(kept) = self.waiting.take() {
            if kept.alive.load(Ordering::Acquire) && !kept.client.is_closed() {
                return Ok(kept);
            }
            kept.driver.abort();
        }
        let bound = self.pg.query_timeout;
        let (client, connection) =
            crate::db::bounded(bound, "connecting for the active lock", async {
                crate::db::connect_dedicated(&self.pg)
                    .await
                    .map_err(Error::pg("connecting for the active lock"))
            })
            .await?;
        let alive = Arc::new(AtomicBool::new(true));
        let driver = {
            let alive = alive.clone();
            tokio::spawn(async move {
                let _ = connection.await;
                alive.store(false, Ordering::Release);
            })
        };
        let timeout_ms = HOLDER_IDLE_TIMEOUT.as_millis().to_string();
        // The server ends this session once it is silent for longer than the timeout (the
        // heartbeat, or a standby's tries, keep it talking), so a frozen holder lets go.
        let set = crate::db::bounded(bound, "setting idle_session_timeout", async {
            client
                .batch_execute(&format!(
                    "SET idle_session_timeout = {timeout_ms}; SET application_name = 'outboxd relay'"
                ))
                .await
                .map_err(Error::pg("setting idle_session_timeout"))
        })
        .await;
        if let Err(e) = set {
            driver.abort();
            return Err(e);
        }
        Ok(LockConnection {
            client,
            driver,
            alive,
        })
    }

    async fn try_take(&mut self) -> Tried {
        let bound = self.pg.query_timeout;
        let conn = match self.lock_connection().await {
            Ok(conn) => conn,
            Err(e) => return Tried::Failed(crate::error::chain(&e)),
        };
        // the holder is looked up for the log line, which is written when the answer changes
        let name_holder = self.was_active != Some(false);
        let client = &conn.client;
        let taken = crate::db::bounded(bound, "taking the active lock", async {
            let row = client
                .query_one(
                    "SELECT pg_try_advisory_lock($1::int, to_regclass($2)::oid::int)",
                    &[&ACTIVE_LOCK_CLASS, &self.quoted_table],
                )
                .await
                .map_err(Error::pg("taking the active lock"))?;
            match row.get::<_, Option<bool>>(0) {
                Some(true) => return Ok::<_, Error>(None),
                Some(false) => {}
                // no such table: the relay's own startup checks say so when it runs
                None => {
                    return Err(Error::Refused {
                        context: "taking the active lock".into(),
                        reason: format!("no table {}", self.quoted_table),
                    })
                }
            }
            if !name_holder {
                return Ok(Some((0, String::new())));
            }
            let holder = client
                .query_opt(
                    "SELECT l.pid, coalesce(a.client_addr::text, 'local')
                     FROM pg_catalog.pg_locks l
                     LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
                     WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                       AND l.classid = $1::int::oid AND l.objid = to_regclass($2)::oid
                       AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())",
                    &[&ACTIVE_LOCK_CLASS, &self.quoted_table],
                )
                .await
                .map_err(Error::pg("reading the active lock's holder"))?;
            Ok(Some(holder.map_or((0, String::new()), |r| {
                (r.get::<_, i32>(0), format!(", client {}", r.get::<_, String>(1)))
            })))
        })
        .await;
        match taken {
            Ok(None) => {
                let LockConnection {
                    client,
                    driver,
                    alive,
                } = conn;
                let heartbeat = {
                    let alive = alive.clone();
                    tokio::spawn(async move {
                        loop {
                            tokio::time::sleep(HEARTBEAT).await;
                            let beat = tokio::time::timeout(bound, client.simple_query("")).await;
                            if !matches!(beat, Ok(Ok(_))) || !alive.load(Ordering::Acquire) {
                                // dropping the client closes the session: the lock goes with it
                                alive.store(false, Ordering::Release);
                                driver.abort();
                                return;
                            }
                        }
                    })
                };
                Tried::Taken(Held { alive, heartbeat })
            }
            Ok(Some((pid, who))) => {
                self.waiting = Some(conn);
                Tried::HeldBy(pid, who)
            }
            Err(e) => {
                conn.driver.abort();
                Tried::Failed(crate::error::chain(&e))
            }
        }
    }

    /// While the lock is held: the flag its connection clears when it fails.
    pub(super) fn still_active(&self) -> Option<Arc<AtomicBool>> {
        self.held.as_ref().map(|h| h.alive.clone())
    }

    /// Lets the lock go (closes its connection).
    fn release(&mut self) {
        if let Some(held) = self.held.take() {
            held.heartbeat.abort();
        }
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.release();
        if let Some(waiting) = self.waiting.take() {
            waiting.driver.abort();
        }
        if let Ok(mut standing_by) = STANDING_BY.lock() {
            standing_by.remove(&(self.database.clone(), self.table.clone()));
        }
    }
}
