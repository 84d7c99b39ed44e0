//! The operator commands against real situations: status, dlq, replay, trimming.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::json;
use std::time::Duration;

const FSC: &str = "fulfillment.status_changed";

/// One database that is both producer (relayed outbox, with an archive) and consumer.
async fn setup(tag: &str) -> (TestDb, TestStreams, std::path::PathBuf) {
    let db = TestDb::new(tag).await;
    let streams = TestStreams::new(tag);
    let cfg = TestConfig::new(&streams.prefix)
        .database("main", &db.url)
        .relay("main", "archive_retention_hours = 48\nmax_attempts = 1")
        .consumer(
            "order-status",
            "main",
            &[FSC],
            "order_status",
            "max_deliveries = 2\nclaim_idle_ms = 100",
        )
        .migrated(tag);
    (db, streams, cfg)
}

async fn produce(client: &tokio_postgres::Client, order: &str, status: &str) {
    client
        .execute(
            "INSERT INTO outbox (topic, aggregate_id, payload) VALUES ($1, $2, jsonb_build_object('event_type', $1::text, 'fulfillment_id', 'f-' || $2, 'order_id', $2::text, 'new_status', $3::text))",
            &[&FSC, &order, &status],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn status_json_reports_constructed_situations() {
    let (db, streams, cfg) = setup("status").await;
    let client = db.client().await;
    // a consumer group with pending entries: read by a consumer that never acknowledges
    produce(&client, "o1", "picking").await;
    produce(&client, "o2", "picking").await;
    outboxd(&cfg, &["relay", "--once"]);
    let mut conn = streams.conn().await;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(streams.key(FSC))
        .arg("order-status")
        .arg("0")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("order-status")
        .arg("stuck")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(streams.key(FSC))
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    // a dead letter
    let _: String = redis::cmd("XADD")
        .arg(format!("{}:dlq", streams.key(FSC)))
        .arg("*")
        .arg("reason")
        .arg("test")
        .query_async(&mut conn)
        .await
        .unwrap();
    // a backlog of 5 rows, 2 of them held back by an open transaction
    for i in 0..3 {
        produce(&client, &format!("free{i}"), "picking").await;
    }
    let holder = db.client().await;
    holder.batch_execute("BEGIN").await.unwrap();
    holder
        .execute(
            "INSERT INTO outbox (topic, aggregate_id, payload) VALUES ($1, 'held', '{}')",
            &[&FSC],
        )
        .await
        .unwrap();
    let pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    produce(&client, "held", "picking").await;
    produce(&client, "held", "packed").await;

    let out = outboxd(&cfg, &["status", "--json"]);
    let s: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let o = &s["outboxes"][0];
    assert_eq!(o["backlog_rows"], 5, "{s}");
    assert_eq!(o["held_back_rows"], 2, "{s}");
    assert_eq!(o["quarantined_rows"], 0);
    assert_eq!(o["blockers"][0]["pid"], pid, "{s}");
    assert!(o["blockers"][0]["xact_age_seconds"].as_f64().unwrap() >= 0.0);
    assert!(o["oldest_age_seconds"].as_f64().is_some());
    let c = &s["consumers"][0];
    assert_eq!(c["name"], "order-status");
    assert_eq!(c["stream"], streams.key(FSC));
    assert_eq!(c["stream_length"], 2);
    assert_eq!(c["pending"], 1);
    assert_eq!(c["lag"], 1);
    assert_eq!(c["dead_letters"], 1);
    assert!(c["oldest_pending_idle_seconds"].as_f64().is_some());
    // the table form names the blocker too
    let text = outboxd(&cfg, &["status"]);
    assert!(text.contains(&format!("pid {pid}")), "{text}");
    holder.batch_execute("ROLLBACK").await.unwrap();
}

#[tokio::test]
async fn dlq_retry_after_the_cause_is_fixed_applies_exactly_once() {
    let (db, streams, cfg) = setup("dlq").await;
    let client = db.client().await;
    produce(&client, "late-order", "picking").await;
    outboxd(&cfg, &["relay", "--once"]);
    let out = outboxd(&cfg, &["consume", "--once"]);
    assert!(
        out.contains("1 dead-lettered"),
        "the order does not exist yet: {out}"
    );
    let list = outboxd(&cfg, &["dlq", "list", "--json"]);
    let l: serde_json::Value = serde_json::from_str(list.trim()).unwrap();
    assert_eq!(l["dead_letters"].as_array().unwrap().len(), 1);
    assert!(l["dead_letters"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("does not exist"));
    // retry and discard need a selection
    let (code, _, err) = run_bin(&["--config", cfg.to_str().unwrap(), "dlq", "retry"], &[]);
    assert_eq!(code, 2, "{err}");
    // fix the cause, retry, consume: applied once
    client
        .execute(
            "INSERT INTO orders (id, status) VALUES ('late-order', 'confirmed')",
            &[],
        )
        .await
        .unwrap();
    let out = outboxd(&cfg, &["dlq", "retry", "--all", "--stream", FSC]);
    assert!(out.contains("1 dead letter(s)"), "{out}");
    let out = outboxd(&cfg, &["consume", "--once"]);
    assert!(out.contains("1 applied"), "{out}");
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM order_status_history WHERE order_id = 'late-order'"
        )
        .await,
        1
    );
    let l: serde_json::Value =
        serde_json::from_str(outboxd(&cfg, &["dlq", "list", "--json"]).trim()).unwrap();
    assert_eq!(l["dead_letters"].as_array().unwrap().len(), 0);

    // a quarantined outbox row: released by dlq retry once its stream key is fixed
    let mut conn = streams.conn().await;
    let _: () = redis::cmd("SET")
        .arg(streams.key("blocked"))
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    client.execute("INSERT INTO outbox (topic, aggregate_id, payload) VALUES ('blocked', 'b1', '{\"k\":1}')", &[]).await.unwrap();
    outboxd(&cfg, &["relay", "--once"]);
    let l: serde_json::Value =
        serde_json::from_str(outboxd(&cfg, &["dlq", "list", "--json"]).trim()).unwrap();
    let row = &l["quarantined_rows"][0];
    assert!(
        row["last_error"].as_str().unwrap().contains("WRONGTYPE"),
        "{l}"
    );
    let _: () = redis::cmd("DEL")
        .arg(streams.key("blocked"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let out = outboxd(&cfg, &["dlq", "retry", "--id", &row["id"].to_string()]);
    assert!(out.contains("retried quarantined row"), "{out}");
    outboxd(&cfg, &["relay", "--once"]);
    assert_eq!(streams.entries("blocked").await.len(), 1);
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM outbox WHERE topic = 'blocked'"
        )
        .await,
        0
    );

    // discard: a poison entry and a quarantined row, each printed as it goes
    xadd(&streams, FSC, "not json").await;
    outboxd(&cfg, &["consume", "--once"]);
    let _: () = redis::cmd("SET")
        .arg(streams.key("blocked"))
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO outbox (topic, aggregate_id, payload) VALUES ('blocked', 'b2', '{}')",
            &[],
        )
        .await
        .unwrap();
    outboxd(&cfg, &["relay", "--once"]);
    let out = outboxd(&cfg, &["dlq", "discard", "--all"]);
    assert!(
        out.contains("discarded dead letter") && out.contains("not JSON"),
        "{out}"
    );
    assert!(out.contains("discarded quarantined row"), "{out}");
    assert!(
        out.contains("1 dead letter(s) and 1 quarantined row(s) discarded"),
        "{out}"
    );
    assert!(
        out.starts_with("dlq: discarding 1 dead letter(s) and 1 quarantined row(s)"),
        "counted before anything is deleted: {out}"
    );
    let l: serde_json::Value =
        serde_json::from_str(outboxd(&cfg, &["dlq", "list", "--json"]).trim()).unwrap();
    assert_eq!(l["dead_letters"].as_array().unwrap().len(), 0);
    assert_eq!(l["quarantined_rows"].as_array().unwrap().len(), 0);
    assert_eq!(count(&client, "SELECT count(*) FROM outbox").await, 0);
}

#[tokio::test]
async fn replay_changes_nothing_when_consumed_and_restores_a_lost_stream_once() {
    let (db, streams, cfg) = setup("replay").await;
    let client = db.client().await;
    for i in 0..10 {
        client
            .execute(
                "INSERT INTO orders (id, status) VALUES ($1, 'confirmed')",
                &[&format!("r{i}")],
            )
            .await
            .unwrap();
        produce(&client, &format!("r{i}"), "picking").await;
    }
    outboxd(&cfg, &["relay", "--once"]);
    assert_eq!(
        count(&client, "SELECT count(*) FROM outbox_archive").await,
        10,
        "published rows are archived"
    );
    let out = outboxd(&cfg, &["consume", "--once"]);
    assert!(out.contains("10 applied"), "{out}");
    // replay of a range already consumed: duplicates only
    let out = outboxd(&cfg, &["replay", "--topic", FSC, "--since", "1h"]);
    assert!(out.contains("replay: 10 events"), "{out}");
    let out = outboxd(&cfg, &["consume", "--once"]);
    assert!(out.contains("0 applied, 10 duplicate"), "{out}");
    assert_eq!(
        count(&client, "SELECT count(*) FROM order_status_history").await,
        10
    );

    // Redis loses the stream before the next events were consumed
    for i in 0..10 {
        produce(&client, &format!("r{i}"), "shipped").await;
    }
    outboxd(&cfg, &["relay", "--once"]);
    let mut conn = streams.conn().await;
    let _: () = redis::cmd("DEL")
        .arg(streams.key(FSC))
        .query_async(&mut conn)
        .await
        .unwrap();
    let out = outboxd(&cfg, &["replay", "--topic", FSC, "--since", "1h"]);
    assert!(out.contains("replay: 20 events"), "{out}");
    let out = outboxd(&cfg, &["consume", "--once"]);
    assert!(out.contains("10 applied, 10 duplicate"), "{out}");
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM orders WHERE status = 'shipped'"
        )
        .await,
        10
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM order_status_history").await,
        20,
        "each effect exactly once"
    );
    // bad ranges are usage errors
    let (code, _, err) = run_bin(
        &[
            "--config",
            cfg.to_str().unwrap(),
            "replay",
            "--topic",
            FSC,
            "--since",
            "whenever",
        ],
        &[],
    );
    assert_eq!(code, 2);
    assert!(err.contains("--since"), "{err}");
}

#[tokio::test]
async fn trimming_under_a_lagging_group_keeps_every_unacknowledged_entry() {
    let streams = TestStreams::new("trim");
    let key = streams.key("events");
    let mut conn = streams.conn().await;
    let mut ids = Vec::new();
    for i in 0..100 {
        let id: String = redis::cmd("XADD")
            .arg(&key)
            .arg("*")
            .arg("data")
            .arg(json!({"i": i}).to_string())
            .query_async(&mut conn)
            .await
            .unwrap();
        ids.push(id);
    }
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&key)
        .arg("fast")
        .arg("0")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&key)
        .arg("slow")
        .arg("0")
        .query_async(&mut conn)
        .await
        .unwrap();
    // fast: read everything, acknowledged all. slow: read 50, acknowledged the first 30.
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("fast")
        .arg("c")
        .arg("COUNT")
        .arg(100)
        .arg("STREAMS")
        .arg(&key)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: i64 = redis::cmd("XACK")
        .arg(&key)
        .arg("fast")
        .arg(&ids)
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("slow")
        .arg("c")
        .arg("COUNT")
        .arg(50)
        .arg("STREAMS")
        .arg(&key)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: i64 = redis::cmd("XACK")
        .arg(&key)
        .arg("slow")
        .arg(&ids[..30])
        .query_async(&mut conn)
        .await
        .unwrap();

    // target: 10 entries; the slow group still needs ids[30..]
    let removed = outboxd::ops::trim::trim_stream(&mut conn, &key, Some(10), None)
        .await
        .unwrap();
    assert_eq!(removed, 30);
    let first: redis::Value = redis::cmd("XRANGE")
        .arg(&key)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        format!("{first:?}").contains(&ids[30]),
        "the oldest unacknowledged entry is kept: {first:?}"
    );
    // the slow group acknowledges its pending entries but has not read the rest: those stay
    let _: i64 = redis::cmd("XACK")
        .arg(&key)
        .arg("slow")
        .arg(&ids[30..50])
        .query_async(&mut conn)
        .await
        .unwrap();
    let removed = outboxd::ops::trim::trim_stream(&mut conn, &key, Some(10), Some(3_600_000))
        .await
        .unwrap();
    assert_eq!(
        removed, 20,
        "up to the entry after the last one delivered to slow"
    );
    let len: i64 = redis::cmd("XLEN")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(len, 50);
    // everything read and acknowledged: down to the target
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("slow")
        .arg("c")
        .arg("COUNT")
        .arg(100)
        .arg("STREAMS")
        .arg(&key)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: i64 = redis::cmd("XACK")
        .arg(&key)
        .arg("slow")
        .arg(&ids[50..])
        .query_async(&mut conn)
        .await
        .unwrap();
    outboxd::ops::trim::trim_stream(&mut conn, &key, Some(10), None)
        .await
        .unwrap();
    let len: i64 = redis::cmd("XLEN")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(len, 10);
    tokio::time::sleep(Duration::from_millis(1)).await;
}

#[test]
fn inbox_retention_must_outlast_the_replay_window() {
    let text = r#"
[databases.main]
url = "postgres://u@h/d"
[[relays]]
database = "main"
archive_retention_hours = 72
[[consumers]]
name = "c"
database = "main"
streams = ["t"]
handler = "order_status"
inbox_retention_hours = 48
"#;
    let cfg = write_config("retention", text);
    let (code, _, err) = run_bin(&["--config", cfg.to_str().unwrap(), "status"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("consumers[0].inbox_retention_hours"), "{err}");
}
