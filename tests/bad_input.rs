//! Bad input gets a clear outcome (quarantine, dead letter, skip with a reason, or exit 2
//! naming the key), never a panic, and holds nothing else up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::json;

const FSC: &str = "fulfillment.status_changed";

async fn setup(tag: &str) -> (TestDb, TestStreams, std::path::PathBuf) {
    let db = TestDb::new(tag).await;
    let streams = TestStreams::new(tag);
    let cfg = TestConfig::new(&streams.prefix)
        .database("main", &db.url)
        .relay("main", "max_attempts = 1\nmax_entry_bytes = 1048576")
        .consumer(
            "order-status",
            "main",
            &[FSC, "weird.topic"],
            "order_status",
            "max_deliveries = 2\nclaim_idle_ms = 100",
        )
        .migrated(tag);
    (db, streams, cfg)
}

#[tokio::test]
async fn oversized_row_is_quarantined_and_others_flow() {
    let (db, streams, cfg) = setup("huge").await;
    let client = db.client().await;
    // 3 MB payload against max_entry_bytes = 1 MiB
    client
        .execute(
            "INSERT INTO outbox (topic, aggregate_id, payload) VALUES ($1, 'big', jsonb_build_object('blob', repeat('x', 3000000)))",
            &[&FSC],
        )
        .await
        .unwrap();
    client
        .execute("INSERT INTO outbox (topic, aggregate_id, payload) VALUES ($1, 'small', '{\"ok\":true}')", &[&FSC])
        .await
        .unwrap();
    outboxd(&cfg, &["relay", "--once"]);
    let entries = streams.entries(FSC).await;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].1["subject"], "small");
    let err: String = client
        .query_one("SELECT last_error FROM outbox WHERE aggregate_id = 'big' AND quarantined_at IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(err.contains("over max_entry_bytes"), "{err}");
}

#[tokio::test]
async fn odd_events_are_skipped_or_dead_lettered_with_a_reason() {
    let (db, streams, cfg) = setup("odd").await;
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO orders (id, status) VALUES ('o1', 'confirmed')",
            &[],
        )
        .await
        .unwrap();
    let mut conn = streams.conn().await;
    let envelope = |id: &str, data: serde_json::Value| {
        json!({"specversion": "1.0", "id": id, "source": "t", "type": FSC, "data": data})
            .to_string()
    };
    let entries: Vec<(&str, String)> = vec![
        // an unknown fulfillment status: recorded, skipped
        (
            FSC,
            envelope(
                "e1",
                json!({"order_id": "o1", "fulfillment_id": "f", "new_status": "teleported"}),
            ),
        ),
        // JSON null as payload: no order_id -> dead letter
        (FSC, envelope("e2", serde_json::Value::Null)),
        // a negative fulfillment_count -> dead letter
        (
            FSC,
            envelope(
                "e3",
                json!({"order_id": "o1", "fulfillment_id": "f", "new_status": "picking", "metadata": {"fulfillment_count": -2}}),
            ),
        ),
        // an order ID of 2,000 bytes -> dead letter
        (
            FSC,
            envelope(
                "e4",
                json!({"order_id": "x".repeat(2000), "fulfillment_id": "f", "new_status": "picking"}),
            ),
        ),
        // an event ID of 600 bytes -> dead letter
        (FSC, envelope(&"i".repeat(600), json!({"order_id": "o1"}))),
        // a topic the handler does not know: recorded, skipped
        (
            "weird.topic",
            json!({"event_id": "w1", "order_id": "o1"}).to_string(),
        ),
        // and a good one after all of them
        (
            FSC,
            envelope(
                "e9",
                json!({"order_id": "o1", "fulfillment_id": "f", "new_status": "picking"}),
            ),
        ),
    ];
    for (topic, data) in &entries {
        let _: String = redis::cmd("XADD")
            .arg(streams.key(topic))
            .arg("*")
            .arg("data")
            .arg(data)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let out = outboxd(&cfg, &["consume", "--once"]);
    assert!(out.contains("1 applied"), "{out}");
    assert!(out.contains("2 skipped"), "{out}");
    assert!(out.contains("4 dead-lettered"), "{out}");
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM orders WHERE status = 'processing'"
        )
        .await,
        1
    );
    let list: serde_json::Value =
        serde_json::from_str(outboxd(&cfg, &["dlq", "list", "--json"]).trim()).unwrap();
    let reasons: Vec<String> = list["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["reason"].as_str().unwrap().to_string())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("no field \"order_id\"")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("fulfillment_count")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("longer than 1024")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("longer than 512")),
        "{reasons:?}"
    );
}

#[test]
fn very_long_and_malicious_config_values_exit_2() {
    let long = "x".repeat(100_000);
    let cases = [
        (format!("[redis]\nstream_prefix = \"{long}\"\n"), "redis.stream_prefix"),
        (
            "[databases.main]\nurl = \"postgres://u@h/d\"\n[[consumers]]\nname = \"c\"\ndatabase = \"main\"\nstreams = [\"t\"]\nhandler = \"sql\"\nfunction = \"f(); DROP TABLE x; --\"\n".to_string(),
            "consumers[0].function",
        ),
        (
            "[databases.main]\nurl = \"postgres://u@h/d\"\n[[consumers]]\nname = \"c\"\ndatabase = \"main\"\nstreams = [\"t\"]\nhandler = \"order_status\"\n[consumers.orders]\nstatus_column = \"status\\\" = 'x'; --\"\n".to_string(),
            "consumers[0].orders.status_column",
        ),
        (
            "[databases.main]\nurl = \"postgres://u@h/d\"\n[[consumers]]\nname = \"c\"\ndatabase = \"main\"\nstreams = [\"t\"]\nhandler = \"order_status\"\n[consumers.status_mapping]\npicked = \"delivered\"\n".to_string(),
            "status_mapping",
        ),
        ("[[topics]]\nname = \"has space\"\n".to_string(), "topics[0].name"),
        ("[databases.\"bad name\"]\nurl = \"postgres://u@h/d\"\n".to_string(), "databases.bad name"),
    ];
    for (text, key) in &cases {
        let cfg = write_config("badcfg", text);
        let (code, _, err) = run_bin(&["--config", cfg.to_str().unwrap(), "status"], &[]);
        assert_eq!(code, 2, "{key}: {err}");
        assert!(err.contains(key), "error must name {key}: {err}");
        assert!(
            err.len() < 2000,
            "the error does not echo 100 kB back: {} bytes",
            err.len()
        );
        assert!(!err.contains("panicked"));
    }
}

#[tokio::test]
async fn contract_breaking_outbox_rows_are_refused_or_dead_lettered() {
    let (db, streams, cfg) = setup("contract").await;
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO orders (id, status) VALUES ('o1', 'confirmed')",
            &[],
        )
        .await
        .unwrap();
    // NULLs where the contract says NOT NULL: refused at the producer's INSERT, so they can
    // never reach (or stall) the relay
    for (column, sql) in [
        ("topic", "INSERT INTO outbox (topic, aggregate_id, payload) VALUES (NULL, 'a', '{}')"),
        ("aggregate_id", "INSERT INTO outbox (topic, aggregate_id, payload) VALUES ('t', NULL, '{}')"),
        ("payload", "INSERT INTO outbox (topic, aggregate_id, payload) VALUES ('t', 'a', NULL)"),
        ("headers", "INSERT INTO outbox (topic, aggregate_id, payload, headers) VALUES ('t', 'a', '{}', NULL)"),
    ] {
        let e = client.execute(sql, &[]).await.unwrap_err();
        assert_eq!(
            e.code(),
            Some(&tokio_postgres::error::SqlState::NOT_NULL_VIOLATION),
            "{column}: {e:?}"
        );
    }
    // payloads that are valid JSON but not the object the contract promises: relayed as they
    // are (the relay does not judge payloads), dead-lettered by the consumer with a reason
    for payload in ["null", "\"a string\"", "[1, 2]", "{\"order_id\": null}"] {
        client
            .execute(
                "INSERT INTO outbox (topic, aggregate_id, payload) VALUES ($1, 'o1', $2::text::jsonb)",
                &[&FSC, &payload],
            )
            .await
            .unwrap();
    }
    client
        .execute(
            "INSERT INTO outbox (topic, aggregate_id, payload) VALUES ($1, 'o1',
               '{\"order_id\": \"o1\", \"fulfillment_id\": \"f\", \"new_status\": \"picking\"}')",
            &[&FSC],
        )
        .await
        .unwrap();
    let out = outboxd(&cfg, &["relay", "--once"]);
    assert!(out.contains("5 rows"), "{out}");
    let out = outboxd(&cfg, &["consume", "--once"]);
    assert!(out.contains("1 applied"), "{out}");
    assert!(out.contains("4 dead-lettered"), "{out}");
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM orders WHERE status = 'processing'"
        )
        .await,
        1
    );
    let dead: i64 = redis::cmd("XLEN")
        .arg(format!("{}:dlq", streams.key(FSC)))
        .query_async(&mut streams.conn().await)
        .await
        .unwrap();
    assert_eq!(dead, 4);
}

#[tokio::test]
async fn an_event_of_several_megabytes_is_applied_and_others_flow() {
    let (db, streams, cfg) = setup("bigevent").await;
    let client = db.client().await;
    for o in ["o1", "o2"] {
        client
            .execute(
                "INSERT INTO orders (id, status) VALUES ($1, 'confirmed')",
                &[&o],
            )
            .await
            .unwrap();
    }
    let big = json!({"specversion": "1.0", "id": "big", "source": "t", "type": FSC,
        "data": {"order_id": "o1", "fulfillment_id": "f", "new_status": "picking",
                 "metadata": {"notes": "n".repeat(5_000_000)}}})
    .to_string();
    xadd(&streams, FSC, &big).await;
    let small = json!({"specversion": "1.0", "id": "small", "source": "t", "type": FSC,
        "data": {"order_id": "o2", "fulfillment_id": "f", "new_status": "shipped"}})
    .to_string();
    xadd(&streams, FSC, &small).await;
    let out = outboxd(&cfg, &["consume", "--once"]);
    assert!(out.contains("2 applied"), "{out}");
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM orders WHERE status IN ('processing', 'shipped')"
        )
        .await,
        2
    );
}

#[tokio::test]
async fn a_reader_that_goes_away_ends_the_output_quietly() {
    // `outboxd status | head -1`: stdout closes early; no panic, exit 0
    let (_db, _streams, cfg) = setup("pipe").await;
    let mut child = std::process::Command::new(bin())
        .args(["--config", cfg.to_str().unwrap(), "status"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
}
