//! The pipeline benchmark: outboxd against the physical limits of this machine's PostgreSQL
//! and Redis, in the same run. `cargo bench --bench pipeline` prints progress on stderr and,
//! as its last line, one JSON object with the medians (and the spread) of at least 3 runs.
//!
//! - relay: `outboxd relay --once` over N outbox rows (default 200,000, 300-byte payloads,
//!   20,000 aggregates); its peak RSS is read from /proc while it runs.
//! - relay limit: the bare minimum in the same run: `DELETE ... WHERE id IN (SELECT ... LIMIT
//!   B FOR UPDATE SKIP LOCKED) RETURNING *` in batches of B with no ordering rules and no Redis,
//!   and pipelined `XADD` of the same entries with no PostgreSQL; the slower of the two.
//! - consume: `outboxd consume --once` over M events (default 100,000; 10,000 orders, each
//!   event one real transition or a duplicate) through the `order_status` handler.
//! - consume limit: the same inbox inserts and order updates as plain SQL in the same batches,
//!   without Redis.
//!
//! - latency: `outboxd run` (relay woken by NOTIFY, consumer) while producers commit 2,000
//!   events/s for 20 s (BENCH_LATENCY_SECONDS), each its own transaction: from the producer's
//!   commit returning to the entry's ID time in Redis (ms resolution), and to the
//!   `order_status_history` row of its effect (clock_timestamp() in the consumer's transaction,
//!   which commits right after).
//!
//! outboxd talks plain TCP to PostgreSQL here (`sslmode=disable`), as the limit queries do:
//! the default `prefer` would encrypt to a local server that has TLS on, and the comparison
//! would measure rustls rather than outboxd.
//!
//! Sizes: BENCH_RELAY_ROWS, BENCH_CONSUME_EVENTS, BENCH_RUNS (the test suite runs it tiny);
//! BENCH_ONLY=relay, consume or latency runs one part (the others' figures are 0).
//!
//! BENCH_ONLY=scale measures instead what each added instance brings: the same relay drain
//! and consume run by 1, 2 and 4 processes at once (`relay --once` / `consume --once`, all
//! started together; rate = work / wall time until the last one exits), one JSON line.
//!
//! BENCH_ONLY=growth measures the relay on big backlogs (see `pipeline/growth.rs`): drains of
//! 100,000 and 1,000,000 rows (10,000,000 with BENCH_GROWTH_10M=1; BENCH_GROWTH_ROWS scales
//! all three) with the rates of their first and last tenths, the limit at 100,000 rows, and 1,
//! 2 and 4 relay daemons on one outbox draining the 1,000,000-row backlog.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "pipeline/consume.rs"]
mod consume;
#[path = "pipeline/growth.rs"]
mod growth;

use consume::Event;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TOPIC: &str = "fulfillment.status_changed";
const BATCH: i64 = 1000;
const CONSUME_BATCH: usize = 200;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pg_admin() -> String {
    std::env::var("OUTBOXD_TEST_PG")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/postgres".into())
}

fn redis_url() -> String {
    std::env::var("OUTBOXD_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    c
}

struct Bench {
    db: String,
    url: String,
    prefix: String,
    /// The consumer with its defaults (concurrency 1, two batches in flight).
    config: std::path::PathBuf,
    /// The same with `concurrency = 2`.
    config_wide: std::path::PathBuf,
}

impl Bench {
    async fn new() -> Bench {
        let db = format!("outboxd_bench_{}", std::process::id());
        let admin = connect(&pg_admin()).await;
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db}"))
            .await
            .unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .unwrap();
        let base = pg_admin();
        let url = format!("{}/{db}", &base[..base.rfind('/').unwrap()]);
        let prefix = format!("outboxd-bench-{}:", std::process::id());
        let config = std::env::temp_dir().join(format!("{db}.toml"));
        let config_wide = std::env::temp_dir().join(format!("{db}-wide.toml"));
        let text = format!(
            r#"
[redis]
url = "{redis}"
stream_prefix = "{prefix}"
[databases.main]
url = "{url}?sslmode=disable"
[[relays]]
database = "main"
batch_size = {BATCH}
[[consumers]]
name = "order-status"
database = "main"
streams = ["{TOPIC}", "delivery.confirmed"]
handler = "order_status"
batch_size = {CONSUME_BATCH}
[http]
listen = ""
"#,
            redis = redis_url()
        );
        std::fs::write(&config, &text).unwrap();
        let wide = text.replace(
            &format!("batch_size = {CONSUME_BATCH}\n"),
            &format!("batch_size = {CONSUME_BATCH}\nconcurrency = 2\n"),
        );
        assert_ne!(wide, text);
        std::fs::write(&config_wide, wide).unwrap();
        let bench = Bench {
            db,
            url,
            prefix,
            config,
            config_wide,
        };
        let (ok, out) = bench.outboxd(&["migrate"]);
        assert!(ok, "migrate: {out}");
        bench
    }

    fn outboxd(&self, args: &[&str]) -> (bool, String) {
        self.outboxd_on(&self.config, args)
    }

    fn outboxd_on(&self, config: &std::path::Path, args: &[&str]) -> (bool, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_outboxd"))
            .arg("--config")
            .arg(config)
            .args(args)
            .env("OUTBOXD_LOG", "warn")
            .output()
            .expect("run outboxd");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }

    /// `outboxd <args>` started in the background (stdout piped or not, stderr inherited).
    fn spawn(&self, args: &[&str], stdout: Stdio) -> std::process::Child {
        Command::new(env!("CARGO_BIN_EXE_outboxd"))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env("OUTBOXD_LOG", "warn")
            .stdout(stdout)
            .spawn()
            .unwrap()
    }

    /// Drops the bench's database and streams.
    async fn drop_all(&self) {
        self.clear_streams().await;
        let admin = connect(&pg_admin()).await;
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.db))
            .await
            .unwrap();
    }

    /// Runs outboxd, sampling its peak RSS (VmHWM) until it exits.
    fn outboxd_with_rss(&self, args: &[&str]) -> (String, f64) {
        let mut child = self.spawn(args, Stdio::piped());
        let mut peak_kb = 0u64;
        loop {
            peak_kb = peak_kb.max(peak_rss_kb(child.id()));
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "outboxd {args:?} failed");
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            peak_kb as f64 / 1024.0,
        )
    }

    /// A connection whose response timeout fits a loaded machine (redis-rs's default of
    /// 500 ms is too short for a large reply on two busy cores).
    async fn redis(&self) -> redis::aio::MultiplexedConnection {
        let config =
            redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(30)));
        redis::Client::open(redis_url())
            .unwrap()
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .unwrap()
    }

    async fn clear_streams(&self) {
        let mut conn = self.redis().await;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query_async(&mut conn)
            .await
            .unwrap();
        for k in keys {
            let _: i64 = redis::cmd("DEL")
                .arg(k)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    }

    /// N rows over `aggregates` aggregates with ~300-byte payloads like SPEC's event.
    async fn fill_outbox(&self, client: &tokio_postgres::Client, n: i64, aggregates: i64) {
        client.batch_execute("TRUNCATE outbox").await.unwrap();
        let mut start = 0;
        while start < n {
            let end = (start + 20_000).min(n);
            client
                .execute(
                    "INSERT INTO outbox (topic, aggregate_id, payload)
                     SELECT $1, 'order-' || (g % $4),
                       jsonb_build_object('event_type', 'fulfillment.status_changed',
                         'fulfillment_id', 'ful-' || (g % $4), 'order_id', 'order-' || (g % $4),
                         'old_status', 'picking', 'new_status', 'picked',
                         'timestamp', '2026-11-22T08:00:00.000000Z',
                         'metadata', jsonb_build_object('warehouse', 'WH-HCM-01', 'picker', 'picker-0042',
                            'note', repeat('x', 60), 'seq', g))
                     FROM generate_series($2::bigint, $3::bigint - 1) g ORDER BY g",
                    &[&TOPIC, &start, &end, &aggregates],
                )
                .await
                .unwrap();
            start = end;
        }
        client.batch_execute("VACUUM ANALYZE outbox").await.unwrap();
    }
}

/// A process's peak resident set so far (VmHWM), in KiB; 0 once it is gone.
fn peak_rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU seconds used so far by the PostgreSQL and Redis servers on this host (every process
/// named `postgres`, with the backends that have exited counted in their parent's
/// children's times, and every `redis-server`), read from /proc: printed beside a phase's
/// rate as what the servers spent per event. Zero where /proc has no such processes.
fn server_cpu_seconds() -> (f64, f64) {
    // utime, stime, cutime, cstime are fields 14-17 of /proc/PID/stat, in clock ticks
    // (100 per second on Linux); the fields after the ")" that closes the name.
    let mut pg = 0u64;
    let mut redis = 0u64;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return (0.0, 0.0);
    };
    for entry in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((name, rest)) = stat.split_once(" (").and_then(|(_, r)| r.rsplit_once(") "))
        else {
            continue;
        };
        let fields: Vec<u64> = rest
            .split_whitespace()
            .skip(11)
            .take(4)
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        match name {
            "postgres" => pg += fields.iter().sum::<u64>(),
            "redis-server" => redis += fields.iter().take(2).sum::<u64>(),
            _ => {}
        }
    }
    (pg as f64 / 100.0, redis as f64 / 100.0)
}

/// What the servers spent on `events` since `before` (from [`server_cpu_seconds`]), as a
/// line's tail: "PostgreSQL X us, Redis Y us of CPU an event".
fn server_cpu_per_event(before: (f64, f64), events: usize) -> String {
    let after = server_cpu_seconds();
    let per = |a: f64, b: f64| (a - b) * 1e6 / events.max(1) as f64;
    format!(
        "PostgreSQL {:.1} us, Redis {:.1} us of CPU an event",
        per(after.0, before.0),
        per(after.1, before.1)
    )
}

fn summary_rate(line: &str) -> f64 {
    // "... N rows in S s (R rows/s) ..." or "... (R events/s) ..."
    let open = line.find('(').unwrap();
    line[open + 1..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// The median; 0 for a part that did not run (BENCH_ONLY).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn spread(v: &[f64]) -> f64 {
    let (min, max) = v
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(*x), b.max(*x)));
    if max > 0.0 {
        (max - min) / max
    } else {
        0.0
    }
}

async fn relay_run(b: &Bench, rows: i64) -> (f64, f64) {
    let client = connect(&b.url).await;
    b.fill_outbox(&client, rows, 20_000.min(rows.max(1))).await;
    b.clear_streams().await;
    let cpu = server_cpu_seconds();
    let (out, rss) = b.outboxd_with_rss(&["relay", "--once"]);
    let cpu = server_cpu_per_event(cpu, rows as usize);
    let line = out
        .lines()
        .find(|l| l.starts_with("relay main.outbox"))
        .unwrap()
        .to_string();
    eprintln!("  {line}; peak RSS {rss:.1} MB; {cpu}");
    (summary_rate(&line), rss)
}

/// The bare minimum: claim+delete in batches without ordering rules or Redis (best of 1 and
/// 2 sessions), and XADD of the same entries without PostgreSQL; the slower of the two.
async fn relay_limit_run(b: &Bench, rows: i64) -> f64 {
    let client = connect(&b.url).await;
    b.fill_outbox(&client, rows, 20_000.min(rows.max(1))).await;
    // The envelopes the relay writes for these rows, for the XADD half.
    let payloads: Vec<Vec<u8>> = client
        .query(
            "SELECT event_id::text, topic, aggregate_id, payload::text,
                    to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')
             FROM outbox ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let mut envelope = Vec::new();
            outboxd::envelope::encode_into(
                &outboxd::envelope::Outgoing {
                    event_id: r.get(0),
                    source: "outboxd/main",
                    topic: r.get(1),
                    aggregate_id: r.get(2),
                    time: r.get(4),
                    payload_json: r.get(3),
                    traceparent: None,
                },
                &mut envelope,
            );
            envelope
        })
        .collect();
    let mut best_pg = 0.0f64;
    for sessions in [1usize, 2] {
        b.fill_outbox(&client, rows, 20_000.min(rows.max(1))).await;
        let cpu = server_cpu_seconds();
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..sessions {
            let url = b.url.clone();
            tasks.push(tokio::spawn(async move {
                let c = connect(&url).await;
                let stmt = c
                    .prepare(
                        "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) RETURNING *",
                    )
                    .await
                    .unwrap();
                loop {
                    let n = c.query(&stmt, &[&BATCH]).await.unwrap().len();
                    if n == 0 {
                        break;
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let rate = rows as f64 / started.elapsed().as_secs_f64();
        let cpu = server_cpu_per_event(cpu, rows as usize);
        eprintln!(
            "  limit: PostgreSQL claim+delete, {sessions} session(s): {rate:.0} rows/s; {cpu}"
        );
        best_pg = best_pg.max(rate);
    }
    b.clear_streams().await;
    let mut conn = b.redis().await;
    let key = format!("{}{TOPIC}", b.prefix);
    let cpu = server_cpu_seconds();
    let started = Instant::now();
    for chunk in payloads.chunks(BATCH as usize) {
        let mut pipe = redis::pipe();
        for p in chunk {
            pipe.cmd("XADD")
                .arg(&key)
                .arg("*")
                .arg("data")
                .arg(p)
                .ignore();
        }
        let () = pipe.query_async(&mut conn).await.unwrap();
    }
    let redis_rate = rows as f64 / started.elapsed().as_secs_f64();
    let cpu = server_cpu_per_event(cpu, rows as usize);
    eprintln!(
        "  limit: PostgreSQL claim+delete {best_pg:.0} rows/s, Redis XADD {redis_rate:.0} rows/s ({cpu})"
    );
    best_pg.min(redis_rate)
}

async fn publish_events(b: &Bench, events: &[Event]) {
    b.clear_streams().await;
    let mut conn = b.redis().await;
    for chunk in events.chunks(2000) {
        let mut pipe = redis::pipe();
        for (topic, order, id, status) in chunk {
            let data = match status {
                Some(s) => {
                    serde_json::json!({"event_type": topic, "fulfillment_id": format!("f-{order}"), "order_id": order, "new_status": s, "timestamp": "2026-11-22T08:00:00Z"})
                }
                None => {
                    serde_json::json!({"event_type": topic, "order_id": order, "timestamp": "2026-11-22T08:00:00Z"})
                }
            };
            let env = serde_json::json!({"specversion": "1.0", "id": id, "source": "bench", "type": topic, "subject": order,
                "time": "2026-11-22T08:00:00.000000Z", "datacontenttype": "application/json", "data": data});
            pipe.cmd("XADD")
                .arg(format!("{}{topic}", b.prefix))
                .arg("*")
                .arg("data")
                .arg(env.to_string())
                .ignore();
        }
        let () = pipe.query_async(&mut conn).await.unwrap();
    }
}

async fn reset_orders(client: &tokio_postgres::Client, orders: u64) {
    client
        .batch_execute("TRUNCATE orders, order_fulfillments, order_status_history, inbox, outbox")
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO orders (id, status) SELECT 'order-' || g, 'confirmed' FROM generate_series(0, $1::bigint - 1) g",
            &[&(orders as i64)],
        )
        .await
        .unwrap();
    client.batch_execute("VACUUM ANALYZE orders").await.unwrap();
}

/// The two workloads of the consume bench.
#[derive(Clone, Copy, PartialEq)]
enum Workload {
    /// Every event a transition or a duplicate of one (`consume::transitions`).
    Transitions,
    /// Picking, packed, shipped round-robin over the orders, deliveries after, a fifth of
    /// each again (`consume::fulfillment`).
    Fulfillment,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Transitions => "transitions",
            Workload::Fulfillment => "fulfillment",
        }
    }

    fn events(self, orders: u64, events: u64) -> Vec<Event> {
        match self {
            Workload::Transitions => consume::transitions(orders, events, CONSUME_BATCH),
            Workload::Fulfillment => consume::fulfillment(orders),
        }
    }
}

/// `outboxd consume --once` over the workload, with the consumer's concurrency of `config`.
async fn consume_run(
    b: &Bench,
    config: &std::path::Path,
    workload: Workload,
    orders: u64,
    events: u64,
) -> f64 {
    let client = connect(&b.url).await;
    reset_orders(&client, orders).await;
    let evs = workload.events(orders, events);
    publish_events(b, &evs).await;
    let cpu = server_cpu_seconds();
    let (ok, out) = b.outboxd_on(config, &["consume", "--once"]);
    assert!(ok, "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("consume order-status"))
        .unwrap()
        .to_string();
    eprintln!(
        "  {}: {line}; {}",
        workload.name(),
        server_cpu_per_event(cpu, evs.len())
    );
    let delivered = client
        .query_one(
            "SELECT count(*) FROM orders WHERE status = 'delivered'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    let orders_used = evs
        .iter()
        .map(|e| &e.1)
        .collect::<std::collections::HashSet<_>>()
        .len();
    assert_eq!(delivered as usize, orders_used, "every order delivered");
    if workload == Workload::Transitions {
        assert!(
            line.contains(" 0 skipped"),
            "every event is a transition or a duplicate: {line}"
        );
    }
    summary_rate(&line)
}

/// The limit (see `consume`): the same effects as set-based SQL, one pipelined transaction
/// per batch, on `sessions` connections over disjoint orders.
async fn consume_limit_run(
    b: &Bench,
    workload: Workload,
    orders: u64,
    events: u64,
    sessions: usize,
) -> f64 {
    let client = connect(&b.url).await;
    reset_orders(&client, orders).await;
    let evs = workload.events(orders, events);
    let plans = consume::plan(&evs, CONSUME_BATCH, sessions);
    let mut conns = Vec::new();
    for _ in 0..sessions {
        conns.push(consume::Session::new(connect(&b.url).await).await);
    }
    let cpu = server_cpu_seconds();
    let started = Instant::now();
    for parts in &plans {
        futures_util::future::join_all(conns.iter().zip(parts).map(|(c, p)| c.apply(p))).await;
    }
    let rate = evs.len() as f64 / started.elapsed().as_secs_f64();
    let cpu = server_cpu_per_event(cpu, evs.len());
    let delivered: i64 = client
        .query_one(
            "SELECT count(*) FROM orders WHERE status = 'delivered'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(delivered > 0, "the limit did the work");
    eprintln!(
        "  {}: limit with {sessions} session(s): {rate:.0} events/s; {cpu}",
        workload.name()
    );
    rate
}

/// One-row `UPDATE` transactions per second on one connection for 3 s: what one client's
/// commits cost here, whatever else the machine does.
async fn commit_probe(b: &Bench) -> f64 {
    let client = connect(&b.url).await;
    client
        .batch_execute(
            "INSERT INTO orders (id, status) VALUES ('probe', 'confirmed') ON CONFLICT DO NOTHING",
        )
        .await
        .unwrap();
    let update = client
        .prepare("UPDATE orders SET updated_at = now() WHERE id = 'probe'")
        .await
        .unwrap();
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < Duration::from_secs(3) {
        client.execute(&update, &[]).await.unwrap();
        n += 1;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    eprintln!("  commit probe: {rate:.0} one-row UPDATE transactions/s");
    rate
}

fn epoch_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Returns (publish p50 ms, publish p99 ms, end-to-end p99 ms).
async fn latency_run(b: &Bench, seconds: u64, rate: u64) -> (f64, f64, f64) {
    let total = rate * seconds;
    let client = connect(&b.url).await;
    reset_orders(&client, 0).await;
    client
        .execute(
            "INSERT INTO orders (id, status) SELECT 'lat-' || g, 'confirmed' FROM generate_series(0, $1::bigint - 1) g",
            &[&(total as i64)],
        )
        .await
        .unwrap();
    client.batch_execute("VACUUM ANALYZE orders").await.unwrap();
    b.clear_streams().await;
    let mut daemon = b.spawn(&["run"], Stdio::null());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // two producers, each committing every other event at half the rate
    let started = Instant::now();
    let mut producers = Vec::new();
    for p in 0..2u64 {
        let url = b.url.clone();
        producers.push(tokio::spawn(async move {
            let c = connect(&url).await;
            let insert = c
                .prepare(
                    "INSERT INTO outbox (topic, aggregate_id, payload) VALUES ($1, $2, jsonb_build_object(
                       'event_type', $1::text, 'fulfillment_id', 'f-' || $2::text, 'order_id', $2::text,
                       'new_status', 'picking', 'seq', $3::bigint))",
                )
                .await
                .unwrap();
            let mut commits = Vec::new();
            let mut i = p;
            while i < total {
                let due = started + Duration::from_micros(i * 1_000_000 / rate);
                tokio::time::sleep_until(due.into()).await;
                let order = format!("lat-{i}");
                c.execute(&insert, &[&TOPIC, &order, &(i as i64)]).await.unwrap();
                commits.push((i, epoch_now()));
                i += 2;
            }
            commits
        }));
    }
    let mut committed = vec![0f64; total as usize];
    for p in producers {
        for (i, t) in p.await.unwrap() {
            committed[i as usize] = t;
        }
    }
    let produce_secs = started.elapsed().as_secs_f64();
    // wait for every effect
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done: i64 = client
            .query_one("SELECT count(*) FROM order_status_history", &[])
            .await
            .unwrap()
            .get(0);
        if done as u64 >= total || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(daemon.id().to_string())
        .status();
    let _ = daemon.wait();
    // publish latency from the entry IDs (Redis's clock, ms)
    let mut conn = b.redis().await;
    let key = format!("{}{TOPIC}", b.prefix);
    let mut publish = Vec::with_capacity(total as usize);
    let mut start = "-".to_string();
    loop {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(&key)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(5000)
            .query_async(&mut conn)
            .await
            .unwrap();
        let Some(last) = reply.ids.last() else { break };
        start = format!("({}", last.id);
        for e in &reply.ids {
            let data: Vec<u8> = e.get("data").unwrap();
            let v: serde_json::Value = serde_json::from_slice(&data).unwrap();
            let seq = v["data"]["seq"].as_u64().unwrap() as usize;
            let ms: f64 = e.id.split('-').next().unwrap().parse().unwrap();
            publish.push(((ms / 1000.0 - committed[seq]) * 1000.0).max(0.0));
        }
    }
    let mut e2e: Vec<f64> = client
        .query(
            "SELECT split_part(order_id, '-', 2)::int, extract(epoch FROM created_at)::float8 FROM order_status_history",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let seq: i32 = r.get(0);
            let t: f64 = r.get(1);
            ((t - committed[seq as usize]) * 1000.0).max(0.0)
        })
        .collect();
    publish.sort_by(|a, b| a.partial_cmp(b).unwrap());
    e2e.sort_by(|a, b| a.partial_cmp(b).unwrap());
    eprintln!(
        "  latency: {} events in {produce_secs:.1} s; publish p50 {:.1} ms p99 {:.1} ms; end-to-end p50 {:.1} ms p99 {:.1} ms ({} effects)",
        total,
        percentile(&publish, 0.5),
        percentile(&publish, 0.99),
        percentile(&e2e, 0.5),
        percentile(&e2e, 0.99),
        e2e.len()
    );
    assert_eq!(e2e.len() as u64, total, "every event had its effect");
    (
        percentile(&publish, 0.5),
        percentile(&publish, 0.99),
        percentile(&e2e, 0.99),
    )
}

/// Panics unless the outbox is empty.
async fn assert_drained(client: &tokio_postgres::Client) {
    let left: i64 = client
        .query_one("SELECT count(*) FROM outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "outbox drained");
}

/// N processes of `outboxd <args>` at once; seconds until the last one exits.
fn processes_at_once(b: &Bench, n: usize, args: &[&str]) -> f64 {
    let started = Instant::now();
    let children: Vec<_> = (0..n).map(|_| b.spawn(args, Stdio::null())).collect();
    for mut c in children {
        assert!(c.wait().unwrap().success(), "outboxd {args:?} failed");
    }
    started.elapsed().as_secs_f64()
}

/// Relay and consume rates with 1, 2 and 4 processes sharing the work.
async fn scale_run(b: &Bench, rows: i64, orders: u64, events: u64) -> serde_json::Value {
    let client = connect(&b.url).await;
    let mut relay = serde_json::Map::new();
    let mut consume = serde_json::Map::new();
    for n in [1usize, 2, 4] {
        b.fill_outbox(&client, rows, 20_000.min(rows.max(1))).await;
        b.clear_streams().await;
        let secs = processes_at_once(b, n, &["relay", "--once"]);
        assert_drained(&client).await;
        let rate = (rows as f64 / secs).round();
        eprintln!("  {n} relay process(es): {rows} rows in {secs:.2} s ({rate} rows/s)");
        relay.insert(n.to_string(), rate.into());

        reset_orders(&client, orders).await;
        publish_events(b, &consume::transitions(orders, events, CONSUME_BATCH)).await;
        let secs = processes_at_once(b, n, &["consume", "--once"]);
        let inbox: i64 = client
            .query_one("SELECT count(DISTINCT event_id) FROM inbox", &[])
            .await
            .unwrap()
            .get(0);
        let rate = (events as f64 / secs).round();
        eprintln!("  {n} consumer process(es): {events} events ({inbox} distinct) in {secs:.2} s ({rate} events/s)");
        consume.insert(n.to_string(), rate.into());
    }
    serde_json::json!({"relay_events_per_sec_by_processes": relay, "consume_events_per_sec_by_processes": consume, "relay_rows": rows, "consume_events": events})
}

/// `BENCH_ONLY=growth` (see growth.rs): medians of `runs` runs, one JSON object.
async fn growth_run(b: &Bench, runs: u64) -> serde_json::Value {
    // BENCH_GROWTH_ROWS scales the sizes (the test suite's tiny run)
    let base = env_num("BENCH_GROWTH_ROWS", 100_000) as i64;
    // The relays drain the 1M-row backlog: a drain of a second or less measured the standbys'
    // process start-up on the same two cores (2-3% of it) more than their effect on the
    // drain.
    let relay_rows = base * 10;
    let all_sizes = [base, base * 10, base * 100];
    let mut sizes = all_sizes[..2].to_vec();
    let ten_million = std::env::var("BENCH_GROWTH_10M").is_ok_and(|v| v == "1");
    let mut by_size: Vec<Vec<growth::Drain>> = vec![vec![], vec![], vec![]];
    let (mut limit, mut by_relays) = (vec![], [vec![], vec![], vec![]]);
    for run in 0..runs {
        eprintln!("growth run {}", run + 1);
        if ten_million && run == 0 {
            sizes.push(all_sizes[2]);
        } else {
            sizes.truncate(2);
        }
        for (i, rows) in sizes.iter().enumerate() {
            by_size[i].push(growth::drain(b, *rows).await);
        }
        limit.push(relay_limit_run(b, base).await);
        for (i, n) in [1usize, 2, 4].into_iter().enumerate() {
            by_relays[i].push(growth::drain_by(b, relay_rows, n).await);
        }
    }
    let round2 = |x: f64| (x * 100.0).round() / 100.0;
    let med = |v: Vec<f64>| median(&mut v.clone());
    let mut drains = serde_json::Map::new();
    let mut rates = vec![];
    for (i, rows) in all_sizes.iter().enumerate() {
        let d = &by_size[i];
        if d.is_empty() {
            rates.push(0.0);
            continue;
        }
        let rate = med(d.iter().map(|x| x.rate).collect());
        let (first, last) = (
            med(d.iter().map(|x| x.first_tenth).collect()),
            med(d.iter().map(|x| x.last_tenth).collect()),
        );
        rates.push(rate);
        drains.insert(
            rows.to_string(),
            serde_json::json!({
                "rows_per_sec": rate.round(),
                "first_tenth_rows_per_sec": first.round(),
                "last_tenth_rows_per_sec": last.round(),
                "last_tenth_to_first": round2(med(d.iter().map(|x| x.last_tenth / x.first_tenth).collect())),
                "peak_rss_mb": round2(med(d.iter().map(|x| x.rss_mb).collect())),
                "spread": round2(spread(&d.iter().map(|x| x.rate).collect::<Vec<_>>())),
                "runs": d.len(),
            }),
        );
    }
    let ratio = |a: f64, b: f64| if b > 0.0 { round2(a / b) } else { 0.0 };
    let relays = by_relays.clone().map(med);
    serde_json::json!({
        "drains": drains,
        "base_rows": base,
        "ratio_10x_to_base": ratio(rates[1], rates[0]),
        "ratio_100x_to_base": ratio(rates[2], rates[0]),
        "limit_base_rows_per_sec": med(limit.clone()).round(),
        "ratio_relay_to_limit_base": ratio(rates[0], med(limit.clone())),
        "relays_rows": relay_rows,
        "relays_rows_per_sec": {"1": relays[0].round(), "2": relays[1].round(), "4": relays[2].round()},
        "ratio_2_relays_to_1": ratio(relays[1], relays[0]),
        "ratio_4_relays_to_1": ratio(relays[2], relays[0]),
        "relays_spread": by_relays.iter().map(|v| round2(spread(v))).collect::<Vec<_>>(),
        "runs": runs,
    })
}

#[tokio::main]
async fn main() {
    let relay_rows = env_num("BENCH_RELAY_ROWS", 200_000) as i64;
    let events = env_num("BENCH_CONSUME_EVENTS", 100_000);
    let orders = (events / 10).max(1);
    let runs = env_num("BENCH_RUNS", 3).max(1);
    let b = Bench::new().await;
    eprintln!("pipeline bench: {relay_rows} relay rows, {events} consume events, {runs} runs, database {}", b.db);
    let (mut relay, mut relay_limit, mut rss) = (vec![], vec![], vec![]);
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    if only == "scale" {
        let result = scale_run(&b, relay_rows, orders, events).await;
        b.drop_all().await;
        println!("{result}");
        return;
    }
    if only == "growth" {
        println!("{}", growth_run(&b, runs).await);
        b.drop_all().await;
        return;
    }
    let latency_seconds = env_num("BENCH_LATENCY_SECONDS", 20);
    let (mut lat50, mut lat99, mut e2e99, mut probes, mut rates) =
        (vec![], vec![], vec![], vec![], vec![]);
    // per workload: outboxd with its defaults and at concurrency 2, the limit with 1 and 2
    // sessions
    let mut consumed: Vec<[Vec<f64>; 4]> = vec![Default::default(), Default::default()];
    let workloads = [Workload::Transitions, Workload::Fulfillment];
    for run in 0..runs {
        eprintln!("run {}", run + 1);
        if only.is_empty() || only == "relay" {
            let (rate, peak) = relay_run(&b, relay_rows).await;
            relay.push(rate);
            rss.push(peak);
            relay_limit.push(relay_limit_run(&b, relay_rows).await);
        }
        if only.is_empty() || only == "consume" {
            for (w, figures) in workloads.iter().zip(consumed.iter_mut()) {
                figures[0].push(consume_run(&b, &b.config, *w, orders, events).await);
                figures[1].push(consume_run(&b, &b.config_wide, *w, orders, events).await);
                figures[2].push(consume_limit_run(&b, *w, orders, events, 1).await);
                figures[3].push(consume_limit_run(&b, *w, orders, events, 2).await);
            }
        }
        if only.is_empty() || only == "latency" {
            let probe = commit_probe(&b).await;
            let rate = 2000.0f64.min(probe / 2.0).floor().max(100.0) as u64;
            let (p50, p99, e99) = latency_run(&b, latency_seconds, rate).await;
            probes.push(probe);
            rates.push(rate as f64);
            lat50.push(p50);
            lat99.push(p99);
            e2e99.push(e99);
        }
    }
    for v in [&mut relay, &mut relay_limit, &mut rss] {
        if v.is_empty() {
            v.push(0.0);
        }
    }
    b.drop_all().await;
    let _ = std::fs::remove_file(&b.config);
    let _ = std::fs::remove_file(&b.config_wide);
    let (r, rl, m) = (
        median(&mut relay.clone()),
        median(&mut relay_limit.clone()),
        median(&mut rss.clone()),
    );
    let round2 = |x: f64| (x * 100.0).round() / 100.0;
    let ratio = |a: f64, b: f64| if b > 0.0 { round2(a / b) } else { 0.0 };
    let mut consume = serde_json::Map::new();
    for (w, figures) in workloads.iter().zip(&consumed) {
        let [c1, c2, l1, l2] = [0, 1, 2, 3].map(|i| median(&mut figures[i].clone()));
        let spreads = [0, 1, 2, 3].map(|i| round2(spread(&figures[i])));
        consume.insert(
            w.name().to_string(),
            serde_json::json!({
                "consume_events_per_sec": c1.round(),
                "consume_concurrency_2_events_per_sec": c2.round(),
                "limit_1_session_events_per_sec": l1.round(),
                "limit_2_sessions_events_per_sec": l2.round(),
                "ratio_to_limit_1": ratio(c1, l1),
                "ratio_to_limit_2": ratio(c1, l2),
                "ratio_concurrency_2_to_limit_2": ratio(c2, l2),
                "spread": spreads,
            }),
        );
    }
    let result = serde_json::json!({
        "relay_events_per_sec": r.round(),
        "relay_limit_events_per_sec": rl.round(),
        "relay_ratio": ratio(r, rl),
        "consume": consume,
        "commit_probe_per_sec": median(&mut probes.clone()).round(),
        "latency_rate_per_sec": median(&mut rates.clone()).round(),
        "latency_p50_ms": (median(&mut lat50.clone()) * 10.0).round() / 10.0,
        "latency_p99_ms": (median(&mut lat99.clone()) * 10.0).round() / 10.0,
        "e2e_p99_ms": (median(&mut e2e99.clone()) * 10.0).round() / 10.0,
        "e2e_p99_ms_runs": e2e99.iter().map(|x| (x * 10.0).round() / 10.0).collect::<Vec<_>>(),
        "peak_rss_mb": (m * 10.0).round() / 10.0,
        "runs": runs,
        "spread": {
            "relay": round2(spread(&relay)),
            "relay_limit": round2(spread(&relay_limit)),
        },
        "relay_rows": relay_rows,
        "consume_events": events,
    });
    println!("{result}");
}
