//! Redis-compatible servers, each a private server started by the test: the system's Redis 7
//! (`redis-server`), Valkey 8 and Redis 8.2 (both brought by `scripts/compat-servers`, which
//! `scripts/test` runs). On each, the same end-to-end story: relay, consume (applied and
//! dead-lettered), the handler's echo relayed as valid CloudEvents, `status`, and trimming
//! that keeps what a group has not acknowledged, by `XTRIM ... ACKED` where the server has it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::json;

const FSC: &str = "fulfillment.status_changed";
const OSC: &str = "order.status_changed";

async fn end_to_end_on(binary: &str, tag: &str, trims_by_acknowledgement: bool) {
    let server = PrivateRedis::start_binary(binary);
    let db = TestDb::new(tag).await;
    let streams = TestStreams::on(tag, &server.url());
    let cfg = TestConfig::new(&streams.prefix)
        .on_redis(&server.url())
        .database("orders", &db.url)
        .relay("orders", "table = \"outbox\"")
        .consumer(
            "order-status",
            "orders",
            &[FSC],
            "order_status",
            "max_deliveries = 1\nclaim_idle_ms = 200\nblock_ms = 200",
        )
        .migrated(tag);
    let client = db.client().await;
    for i in 0..5 {
        let order = format!("o{i}");
        client
            .execute(
                "INSERT INTO orders (id, status) VALUES ($1, 'confirmed')",
                &[&order],
            )
            .await
            .unwrap();
        client
            .execute(
                "INSERT INTO outbox (topic, aggregate_id, payload) VALUES ($1, $2,
                 jsonb_build_object('event_type', $1::text, 'order_id', $2::text,
                                    'fulfillment_id', 'f-' || $2, 'new_status', 'picking'))",
                &[&FSC, &order],
            )
            .await
            .unwrap();
    }
    outboxd(&cfg, &["relay", "--once"]);
    assert_eq!(streams.len(FSC).await, 5, "{binary}: relayed");
    xadd(&streams, FSC, &json!({"event_id": "poison"}).to_string()).await;

    let out = outboxd(&cfg, &["consume", "--once"]);
    assert!(out.contains("5 applied"), "{binary}: {out}");
    assert!(out.contains("1 dead-lettered"), "{binary}: {out}");
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM orders WHERE status = 'processing'"
        )
        .await,
        5,
        "{binary}"
    );
    let mut conn = streams.conn().await;
    let dlq: i64 = redis::cmd("XLEN")
        .arg(format!("{}:dlq", streams.key(FSC)))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(dlq, 1, "{binary}: the poison entry was dead-lettered");

    // the handler's order.status_changed rows, relayed as valid CloudEvents
    outboxd(&cfg, &["relay", "--once"]);
    let echoes = streams.entries(OSC).await;
    assert_eq!(echoes.len(), 5, "{binary}");
    if let Some(problems) = cloudevents_problems(
        &echoes
            .iter()
            .map(|(_, e)| e.to_string())
            .collect::<Vec<_>>(),
    ) {
        assert!(problems.is_empty(), "{binary}: {problems:?}");
    }

    let status: serde_json::Value =
        serde_json::from_str(outboxd(&cfg, &["status", "--json"]).trim()).unwrap();
    let c = &status["consumers"][0];
    assert_eq!(c["stream"], streams.key(FSC), "{binary}: {status}");
    assert_eq!(c["stream_length"], 6, "{binary}: {status}");
    assert_eq!(c["pending"], 0, "{binary}: {status}");
    assert_eq!(c["lag"], 0, "{binary}: {status}");
    assert_eq!(c["dead_letters"], 1, "{binary}: {status}");
    assert_eq!(
        status["outboxes"][0]["backlog_rows"], 0,
        "{binary}: {status}"
    );

    // trimming: a group that has read nothing keeps every entry; once it is gone, the stream
    // goes down to its target
    let key = streams.key(FSC);
    assert_eq!(
        outboxd::ops::trim::trims_by_acknowledgement(&mut conn)
            .await
            .unwrap(),
        trims_by_acknowledgement,
        "{binary}: which trimming path the server takes"
    );
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&key)
        .arg("late")
        .arg("0")
        .query_async(&mut conn)
        .await
        .unwrap();
    let removed = outboxd::ops::trim::trim_stream(&mut conn, &key, Some(1), None)
        .await
        .unwrap();
    assert_eq!(
        removed, 0,
        "{binary}: entries the late group has not read stay"
    );
    let _: i64 = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(&key)
        .arg("late")
        .query_async(&mut conn)
        .await
        .unwrap();
    let removed = outboxd::ops::trim::trim_stream(&mut conn, &key, Some(1), None)
        .await
        .unwrap();
    assert_eq!(removed, 5, "{binary}: down to the one entry asked for");
    assert_eq!(streams.len(FSC).await, 1, "{binary}");
}

#[tokio::test]
async fn redis_7_end_to_end() {
    end_to_end_on("redis-server", "compat_r7", false).await;
}

#[tokio::test]
async fn valkey_8_end_to_end() {
    let Some(valkey) = optional_tool("OUTBOXD_TEST_VALKEY_SERVER", "Valkey 8") else {
        return;
    };
    end_to_end_on(&valkey, "compat_valkey", false).await;
}

#[tokio::test]
async fn redis_8_2_end_to_end_trims_by_acknowledgement() {
    let Some(redis) = optional_tool("OUTBOXD_TEST_REDIS82_SERVER", "Redis 8.2") else {
        return;
    };
    end_to_end_on(&redis, "compat_r82", true).await;
}
