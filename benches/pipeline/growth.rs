//! The relay on big backlogs (`BENCH_ONLY=growth`): the same `relay --once` drain over
//! 100,000 and 1,000,000 rows (and 10,000,000 with BENCH_GROWTH_10M=1; it takes minutes),
//! each with the rate of its first and its last tenth, read from the stream's
//! `entries-added` counter sampled while it runs (Redis 7+; the stream is then trimmed
//! meanwhile, so that a 10M drain does not hold gigabytes in Redis; before 7 its length,
//! untrimmed), and its peak RSS. Then the 1,000,000-row drain by 1, 2 and 4 relay daemons
//! started together.

use super::{connect, Bench, TOPIC};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One drain: its overall rate (the drain's own summary), its first and last tenths' rates
/// (rows per second), and peak RSS (MB).
#[derive(Debug, Clone, Copy)]
pub struct Drain {
    pub rate: f64,
    pub first_tenth: f64,
    pub last_tenth: f64,
    pub rss_mb: f64,
}

/// Entries ever added to the stream, and whether that is Redis 7's `entries-added` counter
/// (else it is the stream's length, and the stream must not be trimmed meanwhile); 0 while
/// the stream does not exist.
async fn stream_count(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> (i64, bool) {
    let info: redis::RedisResult<std::collections::HashMap<String, redis::Value>> =
        redis::cmd("XINFO")
            .arg("STREAM")
            .arg(key)
            .query_async(conn)
            .await;
    let Ok(info) = info else {
        return (0, true);
    };
    match (info.get("entries-added"), info.get("length")) {
        (Some(redis::Value::Int(n)), _) => (*n, true),
        (None, Some(redis::Value::Int(n))) => (*n, false),
        _ => (0, true),
    }
}

async fn entries_added(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> i64 {
    stream_count(conn, key).await.0
}

/// When the sampled counter first reached `target` (linear between samples).
fn time_at(samples: &[(f64, i64)], target: i64) -> f64 {
    for pair in samples.windows(2) {
        let ((t0, n0), (t1, n1)) = (pair[0], pair[1]);
        if n1 >= target && n0 < target {
            return t0 + (t1 - t0) * (target - n0) as f64 / (n1 - n0) as f64;
        }
    }
    samples.last().map_or(0.0, |s| s.0)
}

pub async fn drain(b: &Bench, rows: i64) -> Drain {
    let client = connect(&b.url).await;
    b.fill_outbox(&client, rows, 20_000.min(rows.max(1))).await;
    b.clear_streams().await;
    let mut conn = b.redis().await;
    let key = format!("{}{TOPIC}", b.prefix);
    let mut child = b.spawn(&["relay", "--once"], Stdio::piped());
    let started = Instant::now();
    let mut samples: Vec<(f64, i64)> = vec![(0.0, 0)];
    let mut peak_kb = 0u64;
    loop {
        peak_kb = peak_kb.max(super::peak_rss_kb(child.id()));
        let (added, counter) = stream_count(&mut conn, &key).await;
        samples.push((started.elapsed().as_secs_f64(), added));
        if counter && added > 200_000 {
            let _: redis::RedisResult<i64> = redis::cmd("XTRIM")
                .arg(&key)
                .arg("MAXLEN")
                .arg("~")
                .arg(100_000)
                .query_async(&mut conn)
                .await;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "relay --once failed");
    let final_added = entries_added(&mut conn, &key).await;
    samples.push((started.elapsed().as_secs_f64(), final_added));
    assert!(
        final_added >= rows,
        "{final_added} of {rows} rows published"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("relay main.outbox"))
        .unwrap();
    let tenth = rows / 10;
    // the first tenth starts with the first entry (process start and connecting excluded)
    let first_from = time_at(&samples, 1);
    let first_tenth = (tenth - 1) as f64 / (time_at(&samples, tenth) - first_from).max(1e-3);
    let last_tenth =
        tenth as f64 / (time_at(&samples, rows) - time_at(&samples, rows - tenth)).max(1e-3);
    let d = Drain {
        rate: super::summary_rate(line),
        first_tenth,
        last_tenth,
        rss_mb: peak_kb as f64 / 1024.0,
    };
    eprintln!(
        "  {rows} rows: {line}; first tenth {:.0} rows/s, last tenth {:.0} rows/s, peak RSS {:.1} MB",
        d.first_tenth, d.last_tenth, d.rss_mb
    );
    d
}

/// The same drain by `n` relay daemons (`outboxd relay`) started together: rows / seconds
/// from their start until every row is on the stream. (Daemons, not `relay --once`: the
/// daemons of one outbox elect an active one, `--once` drains beside whatever runs.)
pub async fn drain_by(b: &Bench, rows: i64, n: usize) -> f64 {
    let client = connect(&b.url).await;
    b.fill_outbox(&client, rows, 20_000.min(rows.max(1))).await;
    b.clear_streams().await;
    let mut conn = b.redis().await;
    let key = format!("{}{TOPIC}", b.prefix);
    let started = Instant::now();
    let mut children: Vec<_> = (0..n).map(|_| b.spawn(&["relay"], Stdio::null())).collect();
    while entries_added(&mut conn, &key).await < rows {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "drain by {n} relays stalled"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    for c in &children {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
    }
    for c in children.iter_mut() {
        assert!(c.wait().unwrap().success(), "relay daemon failed");
    }
    super::assert_drained(&client).await;
    let rate = rows as f64 / secs;
    eprintln!("  {n} relay daemon(s): {rows} rows in {secs:.2} s ({rate:.0} rows/s)");
    rate
}
