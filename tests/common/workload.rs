//! The order/fulfillment workload the breaking suites (faults, failover, scale-out) share:
//! producers that write fulfillment events into the fulfillment outbox while recording each
//! in a `produced` table in the same transaction (so the database, not the producer, says
//! what was committed), a configuration with relays for both databases and two consumer
//! groups (the `order_status` handler and a `sql`-handler ledger), and the checks that prove
//! every effect happened exactly once and in order.

use super::*;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::task::JoinHandle;

pub const TOPIC: &str = "fulfillment.status_changed";
/// The fulfillment statuses an order goes through, in order; event n carries STATUSES[n-1].
pub const STATUSES: [&str; 3] = ["picking", "packed", "shipped"];

/// A small xorshift generator; seeds are printed so a failing run can be repeated.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A seed from `var` or from the clock.
pub fn seed(var: &str) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

/// Where the workload lives: the two databases, Redis and the stream prefix.
#[derive(Clone)]
pub struct Setup {
    pub fulfillment_url: String,
    pub orders_url: String,
    pub redis_url: String,
    /// Seed nodes when the streams live on a Redis Cluster (then `redis_url` is unused).
    pub redis_cluster: Vec<String>,
    pub prefix: String,
    pub orders: usize,
    /// `partitions` of the fulfillment topic (0: unpartitioned).
    pub partitions: usize,
}

impl Setup {
    /// Relays for both databases, the two consumer groups, no HTTP listener. `redis` is the
    /// whole `[redis]` body (url or cluster).
    pub fn config(&self, redis: &str, extra_consumer: &str) -> String {
        format!(
            r#"
[redis]
{redis}
stream_prefix = "{prefix}"
[databases.fulfillment]
url = "{f}"
[databases.orders]
url = "{o}"
[[relays]]
database = "fulfillment"
poll_interval_ms = 200
[[relays]]
database = "orders"
poll_interval_ms = 200
[[consumers]]
name = "order-status"
database = "orders"
streams = ["{TOPIC}"]
handler = "order_status"
claim_idle_ms = 1000
max_deliveries = 1000
{extra_consumer}
[[consumers]]
name = "ledger"
database = "orders"
streams = ["{TOPIC}"]
handler = "sql"
function = "count_event"
claim_idle_ms = 1000
max_deliveries = 1000
{extra_consumer}
[http]
listen = ""
[shutdown]
timeout_ms = 5000
{topics}
"#,
            topics = if self.partitions > 0 {
                format!(
                    "[[topics]]\nname = \"{TOPIC}\"\npartitions = {}",
                    self.partitions
                )
            } else {
                String::new()
            },
            prefix = self.prefix,
            f = self.fulfillment_url,
            o = self.orders_url,
        )
    }

    /// The tables the producers and checks use (after `outboxd migrate`): `produced`, the
    /// ledger, and the orders in `confirmed`.
    pub async fn prepare(&self) {
        let fulfil = pg_connect(&self.fulfillment_url).await;
        fulfil
            .batch_execute(
                "CREATE TABLE produced (event_id uuid PRIMARY KEY, order_id text NOT NULL,
                   seq int NOT NULL, UNIQUE (order_id, seq))",
            )
            .await
            .unwrap();
        let orders = pg_connect(&self.orders_url).await;
        create_ledger(&orders).await;
        orders
            .execute(
                "INSERT INTO orders (id, status)
                 SELECT 'o' || i, 'confirmed' FROM generate_series(0, $1::int - 1) i",
                &[&(self.orders as i32)],
            )
            .await
            .unwrap();
    }

    /// Two producers, paced so the events (three per order) spread over `seconds`.
    pub fn start_producers(&self, seed: u64, seconds: u64) -> Producers {
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicU64::new(0));
        let handles = (0..2)
            .map(|share| {
                tokio::spawn(produce(
                    self.fulfillment_url.clone(),
                    self.orders,
                    share,
                    seed.wrapping_add(share as u64 + 1),
                    seconds,
                    stop.clone(),
                    committed.clone(),
                ))
            })
            .collect();
        Producers {
            stop,
            committed,
            handles,
        }
    }

    /// Waits until everything produced went through both consumer groups, both outboxes
    /// are empty and nothing is pending; returns the seconds it took, or what is missing.
    pub async fn wait_settled(&self, timeout: Duration) -> Result<f64, String> {
        let fulfil = reconnect(&self.fulfillment_url).await;
        let orders = reconnect(&self.orders_url).await;
        let produced = count(&fulfil, "SELECT count(*) FROM produced").await;
        let mut conn = self.redis().await;
        let started = Instant::now();
        let mut last = String::new();
        while started.elapsed() < timeout {
            let f_left = count(&fulfil, "SELECT count(*) FROM outbox").await;
            let o_left = count(&orders, "SELECT count(*) FROM outbox").await;
            let ledger = count(&orders, "SELECT count(*) FROM ledger").await;
            let inbox = count(
                &orders,
                "SELECT count(*) FROM inbox WHERE consumer = 'order-status'",
            )
            .await;
            let pending = self.pending(&mut conn).await;
            last = format!(
                "produced {produced}, fulfillment outbox {f_left}, orders outbox {o_left}, \
                 ledger {ledger}, order-status inbox {inbox}, pending {pending}"
            );
            if f_left == 0 && o_left == 0 && ledger == produced && inbox == produced && pending == 0
            {
                return Ok(started.elapsed().as_secs_f64());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(last)
    }

    /// A connection to the workload's Redis or Redis Cluster (outboxd's own connection type,
    /// which routes each command to its shard).
    pub async fn redis(&self) -> outboxd::redis_io::Conn {
        let config = outboxd::config::RedisConfig {
            url: self.redis_url.clone(),
            cluster: self.redis_cluster.clone(),
            ..Default::default()
        };
        outboxd::redis_io::Redis::new(&config).unwrap().commands()
    }

    /// The stream keys of the fulfillment topic (one, or one per partition).
    pub fn keys(&self) -> Vec<String> {
        let partitions = self.partitions;
        if partitions == 0 {
            vec![format!("{}{TOPIC}", self.prefix)]
        } else {
            (0..partitions)
                .map(|p| format!("{}{TOPIC}:{p}", self.prefix))
                .collect()
        }
    }

    async fn pending(&self, conn: &mut outboxd::redis_io::Conn) -> i64 {
        let mut all = 0;
        for key in self.keys() {
            for group in ["order-status", "ledger"] {
                let v: redis::Value = redis::cmd("XPENDING")
                    .arg(&key)
                    .arg(group)
                    .query_async(conn)
                    .await
                    .unwrap_or(redis::Value::Nil);
                if let redis::Value::Array(a) = v {
                    if let Some(redis::Value::Int(n)) = a.first() {
                        all += n;
                    }
                }
            }
        }
        all
    }

    /// Checks, from the databases and streams, after `wait_settled`:
    /// - the ledger shows every produced event applied exactly once, and nothing else;
    /// - every order is at the status its events imply, along one unbroken history chain
    ///   with no step twice, and every change was relayed as `order.status_changed`;
    /// - on the stream, each order's entries come in outbox order (duplicates allowed);
    /// - no dead letters.
    pub async fn verify(&self, committed: u64) -> Verdict {
        let fulfil = reconnect(&self.fulfillment_url).await;
        let orders = reconnect(&self.orders_url).await;
        let mut conn = self.redis().await;
        assert_eq!(
            count(
                &orders,
                "SELECT count(*) FROM ledger WHERE applications <> 1"
            )
            .await,
            0,
            "an event applied more than once"
        );
        let produced: HashMap<String, (String, i32)> = fulfil
            .query("SELECT event_id::text, order_id, seq FROM produced", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
        assert!(
            committed as usize <= produced.len(),
            "a commit a producer saw is missing"
        );
        let ledger: HashSet<String> = orders
            .query("SELECT event_id FROM ledger", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(ledger.len(), produced.len(), "ledger vs produced");
        assert!(
            produced.keys().all(|id| ledger.contains(id)),
            "a produced event never applied"
        );

        let last_seq: HashMap<String, i32> = fulfil
            .query(
                "SELECT order_id, max(seq) FROM produced GROUP BY order_id",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let statuses: HashMap<String, String> = orders
            .query("SELECT id, status FROM orders", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        for (order, status) in &statuses {
            let want = match last_seq.get(order) {
                None => "confirmed",
                Some(1 | 2) => "processing",
                Some(_) => "shipped",
            };
            assert_eq!(status, want, "order {order}");
        }
        // Several consumers may apply an order's events in either order, so the path may
        // skip a step; but it is one unbroken chain from confirmed to the final status.
        let mut chains: HashMap<String, Vec<(String, String)>> = HashMap::new();
        for r in orders
            .query(
                "SELECT order_id, from_status, to_status FROM order_status_history ORDER BY id",
                &[],
            )
            .await
            .unwrap()
        {
            chains
                .entry(r.get(0))
                .or_default()
                .push((r.get(1), r.get(2)));
        }
        let mut transitions = 0;
        for (order, status) in &statuses {
            let chain = chains.remove(order).unwrap_or_default();
            transitions += chain.len();
            let mut at = "confirmed".to_string();
            for (from, to) in &chain {
                assert_eq!(from, &at, "order {order}: history {chain:?}");
                at = to.clone();
            }
            assert_eq!(&at, status, "order {order}: history {chain:?}");
        }
        assert!(chains.is_empty(), "history of unknown orders: {chains:?}");
        let changed: HashSet<String> =
            stream_ids(&mut conn, &format!("{}order.status_changed", self.prefix))
                .await
                .into_iter()
                .collect();
        assert_eq!(changed.len(), transitions, "order.status_changed events");

        // Per-aggregate order, judged by first occurrences (what a deduplicating consumer
        // applies): on the fulfillment stream(s) each order's events in outbox order, on
        // the order.status_changed stream each order's changes along its history chain.
        let mut out_of_order: Vec<String> = Vec::new();
        let mut seen: HashSet<String> = HashSet::new();
        let mut duplicates = 0;
        for key in self.keys() {
            let mut last: HashMap<String, i32> = HashMap::new();
            for id in stream_ids(&mut conn, &key).await {
                if !seen.insert(id.clone()) {
                    duplicates += 1;
                    continue;
                }
                let (order, seq) = &produced[&id];
                let before = last.insert(order.clone(), *seq).unwrap_or(0);
                if before + 1 != *seq {
                    out_of_order.push(format!("{key}: order {order}: entry {seq} after {before}"));
                }
            }
            let dead: i64 = redis::cmd("XLEN")
                .arg(format!("{key}:dlq"))
                .query_async(&mut conn)
                .await
                .unwrap();
            assert_eq!(dead, 0, "dead letters on {key}");
        }
        assert_eq!(seen.len(), produced.len(), "entries on the stream");
        let changes_key = format!("{}order.status_changed", self.prefix);
        let mut at: HashMap<String, String> = HashMap::new();
        let mut first: HashSet<String> = HashSet::new();
        for (id, data) in stream_entries(&mut conn, &changes_key).await {
            if !first.insert(id) {
                continue;
            }
            let order = data["order_id"].as_str().unwrap_or_default().to_string();
            let (old, new) = (
                data["old_status"].as_str().unwrap_or_default(),
                data["new_status"].as_str().unwrap_or_default(),
            );
            let was = at.insert(order.clone(), new.to_string());
            if was.as_deref().unwrap_or("confirmed") != old {
                out_of_order.push(format!(
                    "{changes_key}: order {order}: {old} -> {new} after {was:?}"
                ));
            }
        }
        assert!(
            out_of_order.is_empty(),
            "{} entries out of per-aggregate order: {out_of_order:?}",
            out_of_order.len()
        );
        Verdict {
            out_of_order: out_of_order.len(),
            events: produced.len(),
            orders: statuses.len(),
            duplicates,
            transitions,
        }
    }
}

/// What `verify` counted.
#[derive(Debug)]
pub struct Verdict {
    /// Stream entries out of per-aggregate order by first occurrence (`verify` fails on any).
    pub out_of_order: usize,
    pub events: usize,
    pub orders: usize,
    pub duplicates: usize,
    pub transitions: usize,
}

/// The running producers.
pub struct Producers {
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
    handles: Vec<JoinHandle<()>>,
}

impl Producers {
    /// Stops them; returns how many events they saw committed.
    pub async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles {
            h.await.unwrap();
        }
        self.committed.load(Ordering::Relaxed)
    }
}

/// The CloudEvents ids of a stream's entries, in stream order.
async fn stream_ids(conn: &mut outboxd::redis_io::Conn, key: &str) -> Vec<String> {
    stream_entries(conn, key)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect()
}

/// A stream's entries as (CloudEvents id, data), in stream order, read in pages so that no
/// single reply is large.
async fn stream_entries(
    conn: &mut outboxd::redis_io::Conn,
    key: &str,
) -> Vec<(String, serde_json::Value)> {
    let mut out = Vec::new();
    let mut from = "-".to_string();
    loop {
        let page: Vec<(String, HashMap<String, Vec<u8>>)> = redis::cmd("XRANGE")
            .arg(key)
            .arg(&from)
            .arg("+")
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .unwrap();
        let Some((last, _)) = page.last() else {
            return out;
        };
        from = format!("({last}");
        for (_, fields) in &page {
            let mut v: serde_json::Value = serde_json::from_slice(&fields["data"]).unwrap();
            let id = v["id"].as_str().unwrap().to_string();
            out.push((id, v["data"].take()));
        }
    }
}

/// A connection, retried for a while (the server may be recovering or failing over).
pub async fn reconnect(url: &str) -> tokio_postgres::Client {
    let started = Instant::now();
    loop {
        match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                return client;
            }
            Err(e) if started.elapsed() > Duration::from_secs(60) => panic!("connect {url}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// One producer: emits the next fulfillment events of random orders of its share (order
/// index % 2 == share): one to three orders per transaction, and for each one to three of
/// its next events, so a transaction often holds several rows of one aggregate beside rows
/// of others (adjacent ids, usually one relay batch). Rides out outages by reconnecting.
async fn produce(
    url: String,
    orders: usize,
    share: usize,
    seed: u64,
    seconds: u64,
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
) {
    let mut rng = Rng(seed | 1);
    // this share's events (3 per order, about 3 per transaction) spread over `seconds`
    let pause_ms = (seconds * 1000 * 3 / (orders as u64 * 3 / 2).max(1)).max(1);
    let mut client: Option<tokio_postgres::Client> = None;
    while !stop.load(Ordering::Relaxed) {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                Ok((c, conn)) => {
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    Some(c)
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
        }
        let Some(c) = client.as_mut() else { continue };
        let picks: Vec<String> = (0..1 + rng.below(3))
            .flat_map(|_| {
                let i = rng.below((orders / 2) as u64) as usize * 2 + share;
                let events = 1 + rng.below(3) as usize;
                std::iter::repeat_n(format!("o{i}"), events)
            })
            .collect();
        let result = async {
            let tx = c.transaction().await?;
            let mut n = 0;
            for order in &picks {
                let seq: i32 = tx
                    .query_one(
                        "SELECT coalesce(max(seq), 0) + 1 FROM produced WHERE order_id = $1",
                        &[order],
                    )
                    .await?
                    .get(0);
                let Some(status) = STATUSES.get(seq as usize - 1) else {
                    continue;
                };
                tx.execute(
                    "WITH o AS (INSERT INTO outbox (topic, aggregate_id, payload)
                       VALUES ($1, $2, jsonb_build_object('event_type', $1::text,
                         'fulfillment_id', 'f-' || $2, 'order_id', $2::text,
                         'new_status', $3::text, 'seq', $4::int))
                       RETURNING event_id)
                     INSERT INTO produced SELECT event_id, $2, $4 FROM o",
                    &[&TOPIC, order, status, &seq],
                )
                .await?;
                n += 1;
            }
            tx.commit().await?;
            Ok::<u64, tokio_postgres::Error>(n)
        }
        .await;
        match result {
            Ok(n) => {
                committed.fetch_add(n, Ordering::Relaxed);
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
        tokio::time::sleep(Duration::from_millis(pause_ms / 2 + rng.below(pause_ms))).await;
    }
}
