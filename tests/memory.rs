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

#[tokio::test]
async fn a_large_backlog_passes_in_bounded_memory() {
    let db = TestDb::new("memory").await;
    let streams = TestStreams::new("memory");
    let text = format!(
        r#"
[redis]
url = "{}"
stream_prefix = "{}"
[databases.main]
url = "{}"
[[relays]]
database = "main"
[[consumers]]
name = "ledger"
database = "main"
streams = ["events"]
handler = "sql"
function = "count_event"
[http]
listen = ""
"#,
        redis_url(),
        streams.prefix,
        db.url
    );
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
