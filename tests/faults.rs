//! The fault-injection suite (SPEC section 7): producers write fulfillment events without
//! pause while two relay and two consumer processes (the real binary) are SIGKILLed and
//! restarted, their PostgreSQL backends terminated, a private Redis (AOF, fsync always)
//! killed and restarted, and a private PostgreSQL cluster crash-restarted. After a calm
//! period the databases and streams must show every effect exactly once, in order.
//!
//! `OUTBOXD_FAULT_SECONDS` sets how long faults are injected (default 40).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::collections::{HashMap, HashSet};
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TOPIC: &str = "fulfillment.status_changed";
const ORDERS: usize = 2000;
/// The fulfillment statuses an order goes through, in order; event n carries STATUSES[n-1].
const STATUSES: [&str; 3] = ["picking", "packed", "shipped"];

/// A small xorshift generator; the seed is printed so a failing run can be repeated.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A relay or consumer process the suite kills and restarts.
struct Proc {
    args: Vec<String>,
    log: std::path::PathBuf,
    child: Child,
    starts: u32,
}

impl Proc {
    fn spawn(args: &[&str], log: std::path::PathBuf) -> Proc {
        let child = spawn_bin(args, &log.with_extension("0.log"));
        Proc {
            args: args.iter().map(|s| s.to_string()).collect(),
            log,
            child,
            starts: 1,
        }
    }
    fn restart(&mut self) {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.child = spawn_bin(
            &args,
            &self.log.with_extension(format!("{}.log", self.starts)),
        );
        self.starts += 1;
    }
    /// Panics (with the log) if the process ended by itself: outages must be ridden out.
    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            let log = std::fs::read_to_string(
                self.log.with_extension(format!("{}.log", self.starts - 1)),
            )
            .unwrap_or_default();
            panic!("{:?} exited by itself ({status:?}):\n{log}", self.args);
        }
    }
}

fn config(pg: &PrivatePg, redis: &PrivateRedis, prefix: &str) -> String {
    format!(
        r#"
[redis]
url = "{redis}"
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
[[consumers]]
name = "ledger"
database = "orders"
streams = ["{TOPIC}"]
handler = "sql"
function = "count_event"
claim_idle_ms = 1000
max_deliveries = 1000
[http]
listen = ""
[shutdown]
timeout_ms = 5000
"#,
        redis = redis.url(),
        f = pg.url("fulfillment"),
        o = pg.url("orders"),
    )
}

/// Producer task: emits the next fulfillment event of random orders of its share (order
/// index % 2 == share), one to three per transaction, recording each in `produced` in the
/// same transaction, so the database, not the producer, says what was committed. Rides out
/// outages by reconnecting.
async fn produce(
    url: String,
    share: usize,
    seed: u64,
    seconds: u64,
    stop: Arc<AtomicBool>,
    made: Arc<AtomicU64>,
) {
    let mut rng = Rng(seed | 1);
    // paced so that this share's events (3 per order, 2 per transaction on average) spread
    // over the whole fault period
    let pause_ms = (seconds * 1000 * 2 / (ORDERS as u64 * 3 / 2)).max(1);
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
        let c = client.as_mut().unwrap();
        let picks: Vec<String> = (0..1 + rng.below(3))
            .map(|_| {
                let i = rng.below((ORDERS / 2) as u64) as usize * 2 + share;
                format!("o{i}")
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
                made.fetch_add(n, Ordering::Relaxed);
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
        tokio::time::sleep(Duration::from_millis(pause_ms / 2 + rng.below(pause_ms))).await;
    }
}

#[derive(Default, Debug)]
struct Faults {
    relay_kills: u32,
    consumer_kills: u32,
    backend_terminations: u32,
    redis_restarts: u32,
    postgres_crashes: u32,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_lose_nothing_and_double_nothing() {
    let seconds: u64 = std::env::var("OUTBOXD_FAULT_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let seed = std::env::var("OUTBOXD_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("fault suite: seed {seed} (OUTBOXD_FAULT_SEED repeats it)");
    let mut rng = Rng(seed | 1);

    let pg = PrivatePg::start(&[]);
    let mut redis = PrivateRedis::start();
    let fulfillment_url = pg.create_db("fulfillment").await;
    let orders_url = pg.create_db("orders").await;
    let prefix = format!("{}:", unique("faults"));
    let cfg = write_config("faults", &config(&pg, &redis, &prefix));
    let cfg_s = cfg.to_str().unwrap().to_string();
    outboxd(&cfg, &["migrate"]);

    let fulfil = pg_connect(&fulfillment_url).await;
    fulfil
        .batch_execute(
            "CREATE TABLE produced (event_id uuid PRIMARY KEY, order_id text NOT NULL, seq int NOT NULL,
               UNIQUE (order_id, seq))",
        )
        .await
        .unwrap();
    let orders = pg_connect(&orders_url).await;
    create_ledger(&orders).await;
    orders
        .execute(
            "INSERT INTO orders (id, status) SELECT 'o' || i, 'confirmed' FROM generate_series(0, $1::int - 1) i",
            &[&(ORDERS as i32)],
        )
        .await
        .unwrap();

    let dir = cfg.parent().unwrap().to_path_buf();
    let mut procs: Vec<Proc> = ["relay", "relay", "consume", "consume"]
        .iter()
        .enumerate()
        .map(|(i, cmd)| Proc::spawn(&["--config", &cfg_s, cmd], dir.join(format!("{cmd}{i}"))))
        .collect();

    let stop = Arc::new(AtomicBool::new(false));
    let made = Arc::new(AtomicU64::new(0));
    let producers: Vec<_> = (0..2)
        .map(|share| {
            tokio::spawn(produce(
                fulfillment_url.clone(),
                share,
                seed.wrapping_add(share as u64 + 1),
                seconds,
                stop.clone(),
                made.clone(),
            ))
        })
        .collect();

    // Faults, one every 0.3-1.5 s, until the time is up.
    let mut faults = Faults::default();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_millis(300 + rng.below(1200))).await;
        for p in &mut procs {
            p.assert_running();
        }
        match rng.below(10) {
            0..=4 => {
                let i = rng.below(procs.len() as u64) as usize;
                sigkill(&mut procs[i].child);
                if i < 2 {
                    faults.relay_kills += 1;
                } else {
                    faults.consumer_kills += 1;
                }
                // sometimes leave it dead a while, so the others take over its work
                if rng.below(2) == 0 {
                    tokio::time::sleep(Duration::from_millis(rng.below(1500))).await;
                }
                procs[i].restart();
            }
            5..=6 => {
                let admin = pg_connect(&pg.url("postgres")).await;
                let n = admin
                    .query(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                          WHERE application_name = 'outboxd' AND pid <> pg_backend_pid()",
                        &[],
                    )
                    .await
                    .unwrap()
                    .len();
                faults.backend_terminations += n as u32;
            }
            7..=8 => {
                redis.kill();
                tokio::time::sleep(Duration::from_millis(rng.below(1000))).await;
                redis.restart();
                faults.redis_restarts += 1;
            }
            _ => {
                pg.crash_restart();
                faults.postgres_crashes += 1;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for p in producers {
        p.await.unwrap();
    }
    for p in &mut procs {
        p.assert_running();
    }

    // Calm: everything produced must come through.
    let fulfil = pg_connect(&fulfillment_url).await;
    let orders = pg_connect(&orders_url).await;
    let produced = count(&fulfil, "SELECT count(*) FROM produced").await;
    let calm = Instant::now();
    let settled = async {
        loop {
            let f_left = count(&fulfil, "SELECT count(*) FROM outbox").await;
            let o_left = count(&orders, "SELECT count(*) FROM outbox").await;
            let ledger = count(&orders, "SELECT count(*) FROM ledger").await;
            let inbox = count(
                &orders,
                "SELECT count(*) FROM inbox WHERE consumer = 'order-status'",
            )
            .await;
            if f_left == 0 && o_left == 0 && ledger == produced && inbox == produced {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(120), settled)
        .await
        .is_err()
    {
        for p in &procs {
            eprintln!("--- {:?}", p.args);
            let log =
                std::fs::read_to_string(p.log.with_extension(format!("{}.log", p.starts - 1)))
                    .unwrap_or_default();
            eprintln!("{}", &log[log.len().saturating_sub(4000)..]);
        }
        panic!("not settled within 120 s of calm; {produced} produced");
    }
    // let the last acknowledgements land, then stop everything cleanly
    let mut conn = redis::Client::open(redis.url().as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = format!("{prefix}{TOPIC}");
    wait_until("no entry left pending", Duration::from_secs(30), || {
        let mut conn = conn.clone();
        let key = key.clone();
        async move {
            let mut all = 0;
            for group in ["order-status", "ledger"] {
                let v: redis::Value = redis::cmd("XPENDING")
                    .arg(&key)
                    .arg(group)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                if let redis::Value::Array(a) = v {
                    if let Some(redis::Value::Int(n)) = a.first() {
                        all += n;
                    }
                }
            }
            all == 0
        }
    })
    .await;
    let settle_seconds = calm.elapsed().as_secs_f64();
    for p in &mut procs {
        sigterm(&p.child);
        assert!(p.child.wait().unwrap().success(), "{:?} exits 0", p.args);
    }

    // 1. every event had its effect exactly once
    assert_eq!(
        count(
            &orders,
            "SELECT count(*) FROM ledger WHERE applications <> 1"
        )
        .await,
        0,
        "an event applied more than once"
    );
    let produced_ids: HashMap<String, (String, i32)> = fulfil
        .query("SELECT event_id::text, order_id, seq FROM produced", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let ledger_ids: HashSet<String> = orders
        .query("SELECT event_id FROM ledger", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ledger_ids.len(), produced_ids.len());
    assert!(produced_ids.keys().all(|id| ledger_ids.contains(id)));

    // 2. every order reached the status its history implies, each transition recorded once
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
    // Two consumers may apply an order's events in either order, so the path may skip a
    // step; but it is one unbroken chain from confirmed to the final status, no step twice.
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
        transitions += chain.len() as i64;
        let mut at = "confirmed".to_string();
        for (from, to) in &chain {
            assert_eq!(from, &at, "order {order}: history {chain:?}");
            at = to.clone();
        }
        assert_eq!(&at, status, "order {order}: history {chain:?}");
    }
    assert!(chains.is_empty(), "history of unknown orders: {chains:?}");
    // the order database's own events (order.status_changed), relayed exactly as recorded
    let mut changed: HashSet<String> = HashSet::new();
    let changed_entries: Vec<(String, HashMap<String, Vec<u8>>)> = redis::cmd("XRANGE")
        .arg(format!("{prefix}order.status_changed"))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    for (_, fields) in &changed_entries {
        let v: serde_json::Value = serde_json::from_slice(&fields["data"]).unwrap();
        changed.insert(v["id"].as_str().unwrap().to_string());
    }
    assert_eq!(changed.len() as i64, transitions);

    // 3. each aggregate's entries in outbox order on the stream (duplicates allowed)
    let entries: Vec<(String, HashMap<String, Vec<u8>>)> = redis::cmd("XRANGE")
        .arg(&key)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut seen: HashSet<String> = HashSet::new();
    let mut last: HashMap<String, i32> = HashMap::new();
    let mut duplicates = 0;
    for (_, fields) in &entries {
        let v: serde_json::Value = serde_json::from_slice(&fields["data"]).unwrap();
        let id = v["id"].as_str().unwrap().to_string();
        if !seen.insert(id.clone()) {
            duplicates += 1;
            continue;
        }
        let (order, seq) = &produced_ids[&id];
        let before = last.insert(order.clone(), *seq).unwrap_or(0);
        assert_eq!(
            before + 1,
            *seq,
            "order {order}: entry {seq} after {before}"
        );
    }
    assert_eq!(seen.len(), produced_ids.len());

    // 4. nothing dead-lettered, nothing pending (checked above)
    let dlq: i64 = redis::cmd("XLEN")
        .arg(format!("{key}:dlq"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(dlq, 0, "dead letters");
    assert!(
        made.load(Ordering::Relaxed) as i64 <= produced,
        "a commit the producer saw is missing"
    );

    println!(
        "fault suite: {seconds} s of faults, {produced} events ({} orders), {} stream duplicates; \
         faults: {} relay SIGKILLs, {} consumer SIGKILLs, {} backends terminated, {} Redis restarts, \
         {} PostgreSQL crash restarts; settled in {settle_seconds:.1} s; exactly once: ok",
        statuses.len(),
        duplicates,
        faults.relay_kills,
        faults.consumer_kills,
        faults.backend_terminations,
        faults.redis_restarts,
        faults.postgres_crashes,
    );
    drop(redis);
}
