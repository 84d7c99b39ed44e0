//! Memory stays bounded under a flood: a backlog far larger than any batch (50,000 events of
//! 2 KB, 100 MB) goes through `relay --once` and `consume --once`, and each process's peak
//! resident set (VmHWM) stays under 64 MB, because reads are batched (`batch_size`) and
//! nothing queues between the stages.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

const ROWS: i64 = 50_000;
const LIMIT_MB: f64 = 64.0;

/// Runs `outboxd --config cfg <args>` to the end, sampling /proc/<pid>/status; returns its
/// stdout and peak RSS in MB.
fn run_sampling_rss(cfg: &std::path::Path, args: &[&str]) -> (String, f64) {
    let mut child = Command::new(bin())
        .arg("--config")
        .arg(cfg)
        .args(args)
        .env("OUTBOXD_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let status = format!("/proc/{}/status", child.id());
    let mut peak_kb = 0u64;
    while child.try_wait().unwrap().is_none() {
        if let Ok(text) = std::fs::read_to_string(&status) {
            if let Some(kb) = text
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
            {
                peak_kb = peak_kb.max(kb);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "outboxd {args:?} failed");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        peak_kb as f64 / 1024.0,
    )
}

/// A relay on the test database's outbox and a `sql`-handler ledger consumer of `events`.
fn ledger_config(db: &TestDb, streams: &TestStreams) -> String {
    TestConfig::new(&streams.prefix)
        .database("main", &db.url)
        .relay("main", "")
        .consumer(
            "ledger",
            "main",
            &["events"],
            "sql",
            "function = \"count_event\"",
        )
        .toml()
}

#[tokio::test]
async fn a_large_backlog_passes_in_bounded_memory() {
    let db = TestDb::new("memory").await;
    let streams = TestStreams::new("memory");
    let text = ledger_config(&db, &streams);
    let cfg = write_config("memory", &text);
    outboxd(&cfg, &["migrate"]);
    let client = db.client().await;
    create_ledger(&client).await;
    client
        .execute(
            "INSERT INTO outbox (topic, aggregate_id, payload)
             SELECT 'events', 'agg-' || (g % 5000), jsonb_build_object('n', g, 'blob', repeat('x', 2000))
             FROM generate_series(1, $1::bigint) g",
            &[&ROWS],
        )
        .await
        .unwrap();

    let (out, relay_mb) = run_sampling_rss(&cfg, &["relay", "--once"]);
    assert!(out.contains(&format!("{ROWS} rows")), "{out}");
    let (out, consume_mb) = run_sampling_rss(&cfg, &["consume", "--once"]);
    assert!(out.contains(&format!("{ROWS} events")), "{out}");
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM ledger WHERE applications = 1"
        )
        .await,
        ROWS
    );
    println!("memory: relay peak {relay_mb:.1} MB, consumer peak {consume_mb:.1} MB for {ROWS} events of 2 KB");
    assert!(relay_mb < LIMIT_MB, "relay peak RSS {relay_mb:.1} MB");
    assert!(
        consume_mb < LIMIT_MB,
        "consumer peak RSS {consume_mb:.1} MB"
    );
}

/// Issue #11: memory follows bytes, not only rows. 40 events of 4 MB each (incompressible)
/// go through `relay --once` and `consume --once` with default settings; each must peak at
/// most 64 MB plus twice the largest event. Then 40 more through `run`, which must apply
/// them all within the same bound. Without the byte budgets a relay claim of 1,000
/// such rows, or a read of 200 entries, would hold gigabytes (3.2 GB measured for 150 rows).
#[tokio::test]
async fn large_events_pass_within_64_mb_plus_twice_the_largest() {
    const EVENTS: i64 = 40;
    let db = TestDb::new("memory_large").await;
    let streams = TestStreams::new("memory_large");
    let text = ledger_config(&db, &streams);
    let cfg = write_config("memory_large", &text);
    outboxd(&cfg, &["migrate"]);
    let client = db.client().await;
    create_ledger(&client).await;
    // 4 MB of hex per event, from md5s (pglz finds nothing to compress in it)
    client
        .execute(
            "INSERT INTO outbox (topic, aggregate_id, payload)
             SELECT 'events', 'agg-' || (g % 3), jsonb_build_object('n', g, 'blob',
               (SELECT string_agg(md5(g::text || '-' || i), '') FROM generate_series(1, 131072) i))
             FROM generate_series(1, $1::bigint) g",
            &[&EVENTS],
        )
        .await
        .unwrap();
    let largest_mb: f64 = client
        .query_one(
            "SELECT max(octet_length(payload::text))::float8 / 1048576 FROM outbox",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let limit_mb = LIMIT_MB + 2.0 * largest_mb;

    let (out, relay_mb) = run_sampling_rss(&cfg, &["relay", "--once"]);
    assert!(out.contains(&format!("{EVENTS} rows")), "{out}");
    check_stream_order(&streams.entries("events").await);
    let (out, consume_mb) = run_sampling_rss(&cfg, &["consume", "--once"]);
    assert!(out.contains(&format!("{EVENTS} events")), "{out}");
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM ledger WHERE applications = 1"
        )
        .await,
        EVENTS
    );
    // the daemon, relaying and consuming at once
    client
        .execute(
            "INSERT INTO outbox (topic, aggregate_id, payload)
             SELECT 'events', 'agg-' || (g % 3), jsonb_build_object('n', g, 'blob',
               (SELECT string_agg(md5(g::text || '-' || i), '') FROM generate_series(1, 131072) i))
             FROM generate_series($1::bigint + 1, 2 * $1::bigint) g",
            &[&EVENTS],
        )
        .await
        .unwrap();
    let mut daemon = Command::new(bin())
        .args(["--config", cfg.to_str().unwrap(), "run"])
        .env("OUTBOXD_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let status = format!("/proc/{}/status", daemon.id());
    let peak = || {
        std::fs::read_to_string(&status)
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<f64>().ok())
            })
            .unwrap_or(0.0)
            / 1024.0
    };
    let started = std::time::Instant::now();
    while count(&client, "SELECT count(*) FROM ledger").await < 2 * EVENTS {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "run did not apply everything"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let run_mb = peak();
    sigterm(&daemon);
    assert!(daemon.wait().unwrap().success(), "run exits 0");
    println!(
        "memory: relay peak {relay_mb:.1} MB, consumer peak {consume_mb:.1} MB, run peak \
         {run_mb:.1} MB for {EVENTS} events of {largest_mb:.1} MB each (limit {limit_mb:.1} MB)"
    );
    assert!(relay_mb <= limit_mb, "relay peak RSS {relay_mb:.1} MB");
    assert!(
        consume_mb <= limit_mb,
        "consumer peak RSS {consume_mb:.1} MB"
    );
    // relaying and consuming in one process: one large batch in memory at a time, and no
    // connection keeps a large batch's buffers afterwards
    assert!(run_mb <= limit_mb, "run peak RSS {run_mb:.1} MB");
}

/// Each aggregate's entries in `n` order (the large events carry `n` and `agg-<n % 3>`).
fn check_stream_order(entries: &[(String, serde_json::Value)]) {
    let mut last: std::collections::HashMap<String, i64> = Default::default();
    for (id, env) in entries {
        let agg = env["subject"].as_str().unwrap().to_string();
        let n = env["data"]["n"].as_i64().unwrap();
        if let Some(prev) = last.insert(agg.clone(), n) {
            assert!(n > prev, "{agg}: {n} (entry {id}) after {prev}");
        }
    }
}
