//! The inbox consumer and the order_status / sql handlers against real PostgreSQL and Redis:
//! every mapping rule end to end, duplicates, concurrent consumers, crashes, poison entries,
//! Dapr's entry layout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use outboxd::config::Config;
use serde_json::json;
use std::time::Duration;

const FSC: &str = "fulfillment.status_changed";
const DC: &str = "delivery.confirmed";

struct Setup {
    db: TestDb,
    streams: TestStreams,
    cfg_text: String,
}

fn consumer_toml(db_url: &str, prefix: &str, consumer_extra: &str) -> String {
    TestConfig::new(prefix)
        .database("orders", db_url)
        .relay("orders", "table = \"outbox\"")
        .consumer(
            "order-status",
            "orders",
            &[FSC, DC],
            "order_status",
            &format!("max_deliveries = 3\nclaim_idle_ms = 200\nblock_ms = 200\n{consumer_extra}"),
        )
        .toml()
}

async fn setup(tag: &str, consumer_extra: &str) -> Setup {
    let db = TestDb::new(tag).await;
    let streams = TestStreams::new(tag);
    let cfg_text = consumer_toml(&db.url, &streams.prefix, consumer_extra);
    let cfg_path = write_config(tag, &cfg_text);
    let (code, out, err) = run_bin(&["--config", cfg_path.to_str().unwrap(), "migrate"], &[]);
    assert_eq!(code, 0, "migrate: {out}{err}");
    Setup {
        db,
        streams,
        cfg_text,
    }
}

impl Setup {
    fn consumer(&self) -> outboxd::inbox::Consumer {
        let config = Config::parse(&self.cfg_text).unwrap();
        config.validate().unwrap();
        let pools = outboxd::db::pools(&config).unwrap();
        let redis = outboxd::redis_io::Redis::new(&config.redis).unwrap();
        outboxd::inbox::build_all(&config, &pools, &redis)
            .unwrap()
            .pop()
            .unwrap()
    }

    async fn drain(&self) -> outboxd::inbox::Tally {
        self.consumer()
            .drain(&tokio_util::sync::CancellationToken::new())
            .await
            .unwrap()
    }

    /// XADD a CloudEvents envelope as the relay writes it.
    async fn publish(&self, topic: &str, event_id: &str, data: serde_json::Value) {
        let env = json!({
            "specversion": "1.0", "id": event_id, "source": "test", "type": topic,
            "subject": data["order_id"], "time": "2026-11-22T08:00:00.000000Z",
            "datacontenttype": "application/json", "data": data,
        });
        self.xadd(topic, &env.to_string()).await;
    }

    async fn xadd(&self, topic: &str, data: &str) {
        let mut conn = self.streams.conn().await;
        let _: String = redis::cmd("XADD")
            .arg(self.streams.key(topic))
            .arg("*")
            .arg("data")
            .arg(data)
            .query_async(&mut conn)
            .await
            .unwrap();
    }

    async fn fulfillment(
        &self,
        event_id: &str,
        order: &str,
        f: &str,
        status: &str,
        count: Option<u32>,
    ) {
        let mut data = json!({
            "event_type": FSC, "fulfillment_id": f, "order_id": order,
            "old_status": "", "new_status": status, "timestamp": "2026-11-22T08:00:00Z",
        });
        if let Some(n) = count {
            data["metadata"] = json!({"fulfillment_count": n});
        }
        self.publish(FSC, event_id, data).await;
    }

    async fn delivered(&self, event_id: &str, order: &str) {
        self.publish(
            DC,
            event_id,
            json!({"event_type": DC, "order_id": order, "timestamp": "2026-11-22T09:00:00Z"}),
        )
        .await;
    }

    async fn order(&self, id: &str, status: &str) {
        self.db
            .client()
            .await
            .execute(
                "INSERT INTO orders (id, status) VALUES ($1, $2)",
                &[&id, &status],
            )
            .await
            .unwrap();
    }

    async fn status(&self, id: &str) -> String {
        self.db
            .client()
            .await
            .query_one("SELECT status FROM orders WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0)
    }

    async fn history(&self, id: &str) -> Vec<(String, String)> {
        self.db
            .client()
            .await
            .query(
                "SELECT from_status, to_status FROM order_status_history WHERE order_id = $1 ORDER BY id",
                &[&id],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    async fn pending(&self, topic: &str) -> i64 {
        let mut conn = self.streams.conn().await;
        let reply: redis::Value = redis::cmd("XPENDING")
            .arg(self.streams.key(topic))
            .arg("order-status")
            .query_async(&mut conn)
            .await
            .unwrap();
        match reply {
            redis::Value::Array(v) => match v.first() {
                Some(redis::Value::Int(n)) => *n,
                _ => 0,
            },
            _ => 0,
        }
    }
}

#[tokio::test]
async fn every_default_mapping_row_end_to_end() {
    let s = setup("mapping", "").await;
    let cases = [
        ("planning", "processing"),
        ("picking", "processing"),
        ("picked", "processing"),
        ("packing", "processing"),
        ("packed", "processing"),
        ("ready", "processing"),
        ("shipped", "shipped"),
        ("completed", "shipped"),
        ("cancelled", "cancelled"),
        ("pending", "confirmed"),
        ("teleported", "confirmed"),
    ];
    for (i, (fstatus, _)) in cases.iter().enumerate() {
        let order = format!("o{i}");
        s.order(&order, "confirmed").await;
        s.fulfillment(&format!("e{i}"), &order, "f1", fstatus, None)
            .await;
    }
    let tally = s.drain().await;
    assert_eq!(tally.handled(), cases.len() as u64);
    for (i, (fstatus, expected)) in cases.iter().enumerate() {
        assert_eq!(
            &s.status(&format!("o{i}")).await,
            expected,
            "fulfillment {fstatus}"
        );
    }
    // every change wrote history and an order.status_changed event into the outbox
    let client = s.db.client().await;
    assert_eq!(
        count(&client, "SELECT count(*) FROM order_status_history").await,
        9
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM outbox WHERE topic = 'order.status_changed'"
        )
        .await,
        9
    );
    let row = client
        .query_one(
            "SELECT payload FROM outbox WHERE aggregate_id = 'o6' AND topic = 'order.status_changed'",
            &[],
        )
        .await
        .unwrap();
    let payload: serde_json::Value = row.get(0);
    assert_eq!(payload["old_status"], "confirmed");
    assert_eq!(payload["new_status"], "shipped");
    assert_eq!(payload["order_id"], "o6");
    assert_eq!(payload["caused_by"], "e6");
}

#[tokio::test]
async fn cod_order_story_and_guards() {
    let s = setup("story", "").await;
    s.order("cod", "confirmed").await;
    s.fulfillment("a1", "cod", "f1", "picking", None).await;
    s.fulfillment("a2", "cod", "f1", "packed", None).await;
    s.fulfillment("a3", "cod", "f1", "shipped", None).await;
    s.fulfillment("a4", "cod", "f1", "completed", None).await;
    s.delivered("a5", "cod").await;
    // late, out of order: must not move it backwards
    s.fulfillment("a6", "cod", "f1", "picking", None).await;
    // terminal: refunded/payment_failed never change
    s.order("refunded", "refunded").await;
    s.fulfillment("b1", "refunded", "f1", "shipped", None).await;
    s.order("paid", "payment_confirmed").await;
    s.fulfillment("c1", "paid", "f1", "picking", None).await;
    // cancelled is not reachable from shipped
    s.order("gone", "confirmed").await;
    s.fulfillment("d1", "gone", "f1", "shipped", None).await;
    s.fulfillment("d2", "gone", "f1", "cancelled", None).await;
    // delivery.confirmed is the only way to delivered
    s.order("pkg", "shipped").await;
    s.fulfillment("e1", "pkg", "f1", "completed", None).await;

    let t = s.drain().await;
    assert_eq!(s.status("cod").await, "delivered");
    assert_eq!(
        s.history("cod").await,
        vec![
            ("confirmed".into(), "processing".into()),
            ("processing".into(), "shipped".into()),
            ("shipped".into(), "delivered".into()),
        ]
    );
    assert_eq!(s.status("refunded").await, "refunded");
    assert_eq!(s.status("paid").await, "processing");
    assert_eq!(
        s.history("paid").await,
        vec![("payment_confirmed".into(), "processing".into())]
    );
    assert_eq!(s.status("gone").await, "shipped");
    assert_eq!(s.status("pkg").await, "shipped");
    assert_eq!((t.applied, t.skipped), (5, 6), "{t:?}");
    assert_eq!(t.dead_lettered, 0);
    // every event is in the inbox, skipped ones included
    let client = s.db.client().await;
    assert_eq!(count(&client, "SELECT count(*) FROM inbox").await, 11);
}

#[tokio::test]
async fn two_warehouses_follow_the_aggregate() {
    let s = setup("warehouses", "").await;
    s.order("two", "confirmed").await;
    s.fulfillment("w1", "two", "fA", "shipped", Some(2)).await;
    s.drain().await;
    assert_eq!(
        s.status("two").await,
        "processing",
        "one of two shipped is not shipped"
    );
    s.fulfillment("w2", "two", "fB", "picking", Some(2)).await;
    s.drain().await;
    assert_eq!(s.status("two").await, "processing");
    s.fulfillment("w3", "two", "fB", "completed", Some(2)).await;
    s.drain().await;
    assert_eq!(s.status("two").await, "shipped");

    s.order("half", "confirmed").await;
    s.fulfillment("h1", "half", "fA", "cancelled", Some(2))
        .await;
    s.fulfillment("h2", "half", "fB", "shipped", Some(2)).await;
    s.drain().await;
    assert_eq!(
        s.status("half").await,
        "shipped",
        "a cancelled warehouse does not hold the order"
    );

    s.order("none", "confirmed").await;
    s.fulfillment("n1", "none", "fA", "cancelled", Some(2))
        .await;
    s.drain().await;
    assert_eq!(
        s.status("none").await,
        "confirmed",
        "one of two cancelled is not cancelled"
    );
    s.fulfillment("n2", "none", "fB", "cancelled", Some(2))
        .await;
    s.drain().await;
    assert_eq!(s.status("none").await, "cancelled");
}

#[tokio::test]
async fn a_cancellation_arriving_first_does_not_erase_started_work() {
    // found by the rules' property test: warehouse B planned, then cancelled; A is pending.
    // In order the order went to processing; with B's cancellation first it must too.
    let s = setup("cancel_first", "").await;
    for order in ["in-order", "reversed"] {
        s.order(order, "confirmed").await;
    }
    s.fulfillment("a1", "in-order", "fA", "pending", Some(2))
        .await;
    s.fulfillment("a2", "in-order", "fB", "planning", Some(2))
        .await;
    s.fulfillment("a3", "in-order", "fB", "cancelled", Some(2))
        .await;
    s.fulfillment("b3", "reversed", "fB", "cancelled", Some(2))
        .await;
    s.fulfillment("b1", "reversed", "fA", "pending", Some(2))
        .await;
    s.fulfillment("b2", "reversed", "fB", "planning", Some(2))
        .await;
    s.drain().await;
    assert_eq!(s.status("in-order").await, "processing");
    assert_eq!(s.status("reversed").await, "processing");
    assert_eq!(
        s.history("reversed").await,
        vec![("confirmed".to_string(), "processing".to_string())]
    );
}

#[tokio::test]
async fn duplicates_and_replays_change_nothing() {
    let s = setup("dups", "").await;
    s.order("o1", "confirmed").await;
    s.fulfillment("same", "o1", "f1", "picking", None).await;
    s.fulfillment("same", "o1", "f1", "picking", None).await;
    let t = s.drain().await;
    assert_eq!((t.applied, t.duplicate), (1, 1));
    // replay the same event again later, and once with different data: first wins
    s.fulfillment("same", "o1", "f1", "picking", None).await;
    s.fulfillment("same", "o1", "f1", "shipped", None).await;
    let t = s.drain().await;
    assert_eq!((t.applied, t.duplicate, t.conflicts), (0, 2, 1), "{t:?}");
    assert_eq!(s.status("o1").await, "processing");
    assert_eq!(s.history("o1").await.len(), 1);
    assert_eq!(s.pending(FSC).await, 0, "duplicates are acknowledged too");
}

#[tokio::test]
async fn an_id_repeated_with_other_data_in_one_batch_is_a_conflict() {
    let s = setup("dups_in_batch", "").await;
    s.order("o1", "confirmed").await;
    s.fulfillment("twice", "o1", "f1", "picking", None).await;
    s.fulfillment("twice", "o1", "f1", "shipped", None).await;
    s.fulfillment("twice", "o1", "f1", "picking", None).await;
    let t = s.drain().await;
    assert_eq!(
        (t.applied, t.duplicate, t.conflicts),
        (1, 2, 1),
        "the first applied, the one with other data counted: {t:?}"
    );
    assert_eq!(s.status("o1").await, "processing");
}

#[tokio::test]
async fn poison_entries_are_dead_lettered_and_others_flow() {
    let s = setup("poison", "").await;
    s.order("ok", "confirmed").await;
    s.xadd(FSC, "this is not json").await;
    s.xadd(FSC, r#"{"order_id":"ok","new_status":"picking"}"#)
        .await; // no event ID
    s.publish(
        FSC,
        "badtype",
        json!({"order_id": 42, "fulfillment_id": "f", "new_status": "picking"}),
    )
    .await;
    s.fulfillment("missing", "no-such-order", "f1", "picking", None)
        .await;
    s.fulfillment("good", "ok", "f1", "picking", None).await;
    let mut conn = s.streams.conn().await;
    let _: String = redis::cmd("XADD")
        .arg(s.streams.key(FSC))
        .arg("*")
        .arg("data")
        .arg(&b"\xff\xfe\xfd"[..])
        .query_async(&mut conn)
        .await
        .unwrap();
    let t = s.drain().await;
    assert_eq!(s.status("ok").await, "processing");
    assert_eq!(t.dead_lettered, 5, "{t:?}");
    let dlq: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(format!("{}:dlq", s.streams.key(FSC)))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let reasons: Vec<String> = dlq
        .ids
        .iter()
        .map(|e| e.get::<String>("reason").unwrap())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("not JSON")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("no usable event ID")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("must be a string")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("does not exist")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("not UTF-8")),
        "{reasons:?}"
    );
    for e in &dlq.ids {
        assert_eq!(e.get::<String>("group").unwrap(), "order-status");
        assert!(e.get::<u64>("deliveries").unwrap() >= 1);
        assert!(
            e.map.contains_key("entry.data"),
            "the original entry is kept"
        );
    }
    let missing = dlq
        .ids
        .iter()
        .find(|e| {
            e.get::<String>("reason")
                .unwrap()
                .contains("does not exist")
        })
        .unwrap();
    assert_eq!(
        missing.get::<u64>("deliveries").unwrap(),
        3,
        "retried up to max_deliveries"
    );
    assert_eq!(s.pending(FSC).await, 0);
}

#[tokio::test]
async fn dapr_published_entry_is_applied() {
    let s = setup("dapr", "").await;
    s.order("d-1", "confirmed").await;
    // What Dapr's pubsub.redis writes: stream = topic, field "data" = its CloudEvent, with
    // Dapr's own type and extension attributes.
    let envelope = json!({
        "specversion": "1.0", "id": "9a3e1b52-6f4e-4f57-9d8a-2b7c3c1d0e11",
        "source": "fulfillment-service", "type": "com.dapr.event.sent",
        "datacontenttype": "application/json", "pubsubname": "pubsub",
        "topic": FSC, "traceid": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "",
        "time": "2026-11-22T08:00:00Z",
        "data": {"event_type": FSC, "fulfillment_id": "f1", "order_id": "d-1",
                 "old_status": "planning", "new_status": "picking", "timestamp": "2026-11-22T08:00:00Z"}
    });
    s.xadd(FSC, &envelope.to_string()).await;
    let t = s.drain().await;
    assert_eq!(t.applied, 1, "{t:?}");
    assert_eq!(s.status("d-1").await, "processing");
}

#[tokio::test]
async fn sql_handler_applies_a_user_function_exactly_once() {
    let db = TestDb::new("sqlh").await;
    let streams = TestStreams::new("sqlh");
    let text = format!(
        r#"
[redis]
url = "{}"
stream_prefix = "{}"
[databases.ledger]
url = "{}"
[[consumers]]
name = "ledger"
database = "ledger"
streams = ["payments"]
handler = "sql"
function = "apply_event"
claim_idle_ms = 200
"#,
        redis_url(),
        streams.prefix,
        db.url
    );
    let cfg = write_config("sqlh", &text);
    let (code, _, err) = run_bin(&["--config", cfg.to_str().unwrap(), "migrate"], &[]);
    assert_eq!(code, 0, "{err}");
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE ledger (event_id text PRIMARY KEY, applications int NOT NULL, amount numeric);
             CREATE FUNCTION apply_event(e jsonb) RETURNS void LANGUAGE plpgsql AS $$
             BEGIN
               IF (e->'data'->>'amount')::numeric < 0 THEN RAISE EXCEPTION 'negative amount'; END IF;
               INSERT INTO ledger VALUES (e->>'id', 1, (e->'data'->>'amount')::numeric)
               ON CONFLICT (event_id) DO UPDATE SET applications = ledger.applications + 1;
             END $$;",
        )
        .await
        .unwrap();
    let mut conn = streams.conn().await;
    for i in 0..50 {
        for _ in 0..2 {
            let _: String = redis::cmd("XADD")
                .arg(streams.key("payments"))
                .arg("*")
                .arg("data")
                .arg(json!({"event_id": format!("p{i}"), "amount": i}).to_string())
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    }
    let _: String = redis::cmd("XADD")
        .arg(streams.key("payments"))
        .arg("*")
        .arg("data")
        .arg(json!({"event_id": "neg", "amount": -1}).to_string())
        .query_async(&mut conn)
        .await
        .unwrap();
    let (code, out, err) = run_bin(
        &["--config", cfg.to_str().unwrap(), "consume", "--once"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("50 applied, 50 duplicate"), "{out}");
    assert!(out.contains("1 dead-lettered"), "{out}");
    assert_eq!(count(&client, "SELECT count(*) FROM ledger").await, 50);
    assert_eq!(
        count(&client, "SELECT max(applications)::bigint FROM ledger").await,
        1
    );
    let dlq: Vec<redis::Value> = redis::cmd("XRANGE")
        .arg(format!("{}:dlq", streams.key("payments")))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(dlq.len(), 1);
    assert!(format!("{dlq:?}").contains("negative amount"));
}

/// Ledger-style setup: a sql handler that counts applications per event ID.
async fn ledger_setup(tag: &str) -> (TestDb, TestStreams, std::path::PathBuf) {
    let db = TestDb::new(tag).await;
    let streams = TestStreams::new(tag);
    let cfg = TestConfig::new(&streams.prefix)
        .database("ledger", &db.url)
        .consumer(
            "ledger",
            "ledger",
            &["events"],
            "sql",
            "function = \"count_event\"\nbatch_size = 50\nclaim_idle_ms = 500\nblock_ms = 200",
        )
        .migrated(tag);
    create_ledger(&db.client().await).await;
    (db, streams, cfg)
}

async fn xadd_events(streams: &TestStreams, range: std::ops::Range<u32>) {
    let mut conn = streams.conn().await;
    let mut pipe = redis::pipe();
    for i in range {
        pipe.cmd("XADD")
            .arg(streams.key("events"))
            .arg("*")
            .arg("data")
            .arg(json!({"event_id": format!("ev{i}")}).to_string())
            .ignore();
    }
    let () = pipe.query_async(&mut conn).await.unwrap();
}

#[tokio::test]
async fn two_consumer_processes_apply_each_event_once() {
    let (db, streams, cfg) = ledger_setup("twoproc").await;
    let dir = cfg.parent().unwrap().to_path_buf();
    let mut procs: Vec<_> = (0..2)
        .map(|i| {
            spawn_bin(
                &["--config", cfg.to_str().unwrap(), "consume"],
                &dir.join(format!("c{i}.log")),
            )
        })
        .collect();
    xadd_events(&streams, 0..3000).await;
    // and every event once more, as a redelivery from a relay crash would do
    xadd_events(&streams, 0..3000).await;
    let client = db.client().await;
    wait_until("all events applied", Duration::from_secs(60), || async {
        count(&client, "SELECT count(*) FROM ledger").await == 3000
    })
    .await;
    let group_done = || async {
        let mut conn = streams.conn().await;
        let v: redis::Value = redis::cmd("XPENDING")
            .arg(streams.key("events"))
            .arg("ledger")
            .query_async(&mut conn)
            .await
            .unwrap();
        matches!(v, redis::Value::Array(ref a) if matches!(a.first(), Some(redis::Value::Int(0))))
    };
    wait_until("nothing pending", Duration::from_secs(30), group_done).await;
    for p in &procs {
        sigterm(p);
    }
    for p in procs.iter_mut() {
        assert!(p.wait().unwrap().success());
    }
    assert_eq!(
        count(&client, "SELECT max(applications)::bigint FROM ledger").await,
        1
    );
    assert_eq!(count(&client, "SELECT count(*) FROM inbox").await, 3000);
    let logs: Vec<String> = (0..2)
        .map(|i| std::fs::read_to_string(dir.join(format!("c{i}.log"))).unwrap())
        .collect();
    assert!(logs.iter().all(|l| l.contains("consumer started")));
}

#[tokio::test]
async fn killed_consumer_is_finished_by_a_restarted_one() {
    let (db, streams, cfg) = ledger_setup("killc").await;
    let dir = cfg.parent().unwrap().to_path_buf();
    xadd_events(&streams, 0..20_000).await;
    let client = db.client().await;
    let mut victim = spawn_bin(
        &["--config", cfg.to_str().unwrap(), "consume"],
        &dir.join("victim.log"),
    );
    wait_until("some events applied", Duration::from_secs(60), || async {
        count(&client, "SELECT count(*) FROM ledger").await >= 200
    })
    .await;
    sigkill(&mut victim);
    let applied_at_kill = count(&client, "SELECT count(*) FROM ledger").await;
    assert!(applied_at_kill < 20_000, "killed mid-stream");
    // a new instance (new consumer name) claims the dead one's pending entries after
    // claim_idle_ms and reads the rest
    let mut heir = spawn_bin(
        &["--config", cfg.to_str().unwrap(), "consume"],
        &dir.join("heir.log"),
    );
    wait_until("all events applied", Duration::from_secs(90), || async {
        count(&client, "SELECT count(*) FROM ledger").await == 20_000
    })
    .await;
    wait_until("nothing pending", Duration::from_secs(30), || async {
        let mut conn = streams.conn().await;
        let v: redis::Value = redis::cmd("XPENDING")
            .arg(streams.key("events"))
            .arg("ledger")
            .query_async(&mut conn)
            .await
            .unwrap();
        matches!(v, redis::Value::Array(ref a) if matches!(a.first(), Some(redis::Value::Int(0))))
    })
    .await;
    sigterm(&heir);
    assert!(heir.wait().unwrap().success());
    assert_eq!(
        count(&client, "SELECT max(applications)::bigint FROM ledger").await,
        1,
        "nothing doubled"
    );
}

#[tokio::test]
async fn relay_and_consumer_end_to_end_in_one_daemon() {
    // the fulfillment database produces, the orders database consumes; `run` does both
    let fdb = TestDb::new("e2e_f").await;
    let odb = TestDb::new("e2e_o").await;
    let streams = TestStreams::new("e2e");
    let port = free_port();
    let cfg = TestConfig::new(&streams.prefix)
        .database("fulfillment", &fdb.url)
        .database("orders", &odb.url)
        .relay("fulfillment", "")
        .relay("orders", "")
        .consumer(
            "order-status",
            "orders",
            &[FSC, DC],
            "order_status",
            "claim_idle_ms = 500",
        )
        .section(&format!("[http]\nlisten = \"127.0.0.1:{port}\""))
        .migrated("e2e");
    let orders = odb.client().await;
    let fulfil = fdb.client().await;
    for i in 0..20 {
        orders
            .execute(
                "INSERT INTO orders (id, status) VALUES ($1, 'confirmed')",
                &[&format!("o{i}")],
            )
            .await
            .unwrap();
    }
    let mut daemon = spawn_bin(
        &["--config", cfg.to_str().unwrap(), "run"],
        &cfg.parent().unwrap().join("run.log"),
    );
    for status in ["picking", "packed", "shipped"] {
        for i in 0..20 {
            fulfil
                .execute(
                    "INSERT INTO outbox (topic, aggregate_id, payload) VALUES ($1, $2, jsonb_build_object('event_type', $1::text, 'fulfillment_id', 'f-' || $2, 'order_id', $2::text, 'new_status', $3::text))",
                    &[&FSC, &format!("o{i}"), &status],
                )
                .await
                .unwrap();
        }
    }
    wait_until("every order shipped", Duration::from_secs(30), || async {
        count(
            &orders,
            "SELECT count(*) FROM orders WHERE status = 'shipped'",
        )
        .await
            == 20
    })
    .await;
    // the order database's own outbox (order.status_changed) was relayed too
    wait_until("order events relayed", Duration::from_secs(30), || async {
        count(&orders, "SELECT count(*) FROM outbox").await == 0
    })
    .await;
    assert_eq!(streams.entries("order.status_changed").await.len(), 40);
    // health and metrics
    let body = http_get(port, "/metrics").await;
    assert!(
        body.contains("outboxd_relay_events_published_total"),
        "{body}"
    );
    assert!(
        body.contains(
            "outboxd_order_status_transitions_total{from=\"confirmed\",to=\"processing\"} 20"
        ),
        "{body}"
    );
    assert!(http_get(port, "/healthz").await.contains("ok"));
    assert!(http_get(port, "/readyz").await.contains("ready"));
    assert!(http_get(port, "/nope").await.contains("404"));
    sigterm(&daemon);
    assert!(daemon.wait().unwrap().success(), "run exits 0 on SIGTERM");
}

#[test]
fn demo_tells_the_story_end_to_end() {
    // on the servers the suite uses (scripts/dev-services may have started a private
    // PostgreSQL on another port than the demo's default)
    // Its own databases and streams (another suite on the same servers may run the demo too),
    // dropped when the test ends.
    let name = unique("demo_t");
    let _databases = [
        TestDb {
            name: format!("{name}_orders"),
            url: String::new(),
        },
        TestDb {
            name: format!("{name}_fulfillment"),
            url: String::new(),
        },
    ];
    let _streams = TestStreams {
        prefix: format!("{}:", name.replace('_', "-")),
        url: redis_url(),
        ca_pem: None,
    };
    let (code, out, err) = run_bin(
        &["demo", "--name", &name],
        &[
            ("OUTBOXD_DEMO_POSTGRES", &pg_admin_url()),
            ("OUTBOXD_REDIS_URL", &redis_url()),
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("Every order ended where its events say."),
        "{out}"
    );
    assert!(
        out.contains("COD-1001     confirmed -> processing"),
        "{out}"
    );
    assert!(out.contains("delivered (delivery confirmed"), "{out}");
    assert!(out.contains("1 deduplicated, 1 dead-lettered"), "{out}");
    assert!(out.contains(&format!("{name}_orders")), "{out}");
    let (code, _, err) = run_bin(&["demo", "--name", "Bad-Name"], &[]);
    assert_eq!(code, 2, "a bad --name is a usage error: {err}");
    assert!(err.contains("\"Bad-Name\" is not a demo name"), "{err}");
}

#[tokio::test]
async fn inbox_prune_deletes_only_old_rows_of_its_consumer() {
    let (db, _streams, cfg) = ledger_setup("prune").await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO inbox (consumer, event_id, stream, entry_id, data_hash, received_at)
             SELECT 'ledger', 'old' || g, 's', '0-1', 0, now() - interval '20 days' FROM generate_series(1, 120) g;
             INSERT INTO inbox (consumer, event_id, stream, entry_id, data_hash, received_at)
             SELECT 'ledger', 'new' || g, 's', '0-1', 0, now() - interval '1 day' FROM generate_series(1, 30) g;
             INSERT INTO inbox (consumer, event_id, stream, entry_id, data_hash, received_at)
             SELECT 'other', 'old' || g, 's', '0-1', 0, now() - interval '20 days' FROM generate_series(1, 10) g;",
        )
        .await
        .unwrap();
    let (code, out, err) = run_bin(
        &[
            "--config",
            cfg.to_str().unwrap(),
            "inbox",
            "prune",
            "--older-than",
            "14d",
            "--batch",
            "50",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("consumer ledger: 120 rows older than"),
        "{out}"
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM inbox WHERE consumer = 'ledger'"
        )
        .await,
        30
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM inbox WHERE consumer = 'other'"
        )
        .await,
        10,
        "another consumer's rows are not this config's to prune"
    );
    let (code, _, err) = run_bin(
        &[
            "--config",
            cfg.to_str().unwrap(),
            "inbox",
            "prune",
            "--older-than",
            "soon",
        ],
        &[],
    );
    assert_eq!(code, 2, "a bad duration is a usage error");
    assert!(err.contains("soon"), "{err}");
}

#[tokio::test]
async fn redelivery_after_a_crash_between_commit_and_xack_changes_nothing() {
    let (db, streams, cfg) = ledger_setup("commit_no_ack").await;
    let client = db.client().await;
    xadd_events(&streams, 0..1).await;
    // A consumer ("ghost") read the entry, committed its effect and its inbox row, and died
    // before XACK: the entry is pending on it, the effect is in the database.
    let mut conn = streams.conn().await;
    let _: redis::Value = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(streams.key("events"))
        .arg("ledger")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await
        .unwrap();
    let read: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("ledger")
        .arg("ghost")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(streams.key("events"))
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(format!("{read:?}").contains("ev0"));
    client
        .batch_execute(
            "INSERT INTO ledger VALUES ('ev0', 1);
             INSERT INTO inbox (consumer, event_id, stream, entry_id, data_hash) VALUES ('ledger', 'ev0', 's', '0-1', 0);",
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await; // past claim_idle_ms
    let (code, out, err) = run_bin(
        &["--config", cfg.to_str().unwrap(), "consume", "--once"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("0 applied, 1 duplicate"), "{out}");
    assert_eq!(
        count(
            &client,
            "SELECT applications::bigint FROM ledger WHERE event_id = 'ev0'"
        )
        .await,
        1
    );
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg(streams.key("events"))
        .arg("ledger")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        matches!(pending, redis::Value::Array(ref a) if matches!(a.first(), Some(redis::Value::Int(0)))),
        "{pending:?}"
    );
}

#[tokio::test]
async fn sigterm_finishes_and_acknowledges_the_batch_in_hand() {
    let (db, streams, cfg) = ledger_setup("sigterm").await;
    let client = db.client().await;
    // slow the handler down so that SIGTERM lands while a batch is being applied
    client
        .batch_execute(
            "CREATE OR REPLACE FUNCTION count_event(e jsonb) RETURNS void LANGUAGE sql AS $$
               SELECT pg_sleep(0.002);
               INSERT INTO ledger VALUES (e->>'id', 1)
               ON CONFLICT (event_id) DO UPDATE SET applications = ledger.applications + 1 $$;",
        )
        .await
        .unwrap();
    xadd_events(&streams, 0..5000).await;
    let mut consumer = spawn_bin(
        &["--config", cfg.to_str().unwrap(), "consume"],
        &cfg.parent().unwrap().join("c.log"),
    );
    wait_until("a few batches applied", Duration::from_secs(60), || async {
        count(&client, "SELECT count(*) FROM ledger").await >= 120
    })
    .await;
    sigterm(&consumer);
    let status = consumer.wait().unwrap();
    assert!(status.success(), "exit 0 on SIGTERM: {status:?}");
    let applied = count(&client, "SELECT count(*) FROM ledger").await;
    assert!(applied < 5000, "stopped before the end ({applied})");
    let mut conn = streams.conn().await;
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg(streams.key("events"))
        .arg("ledger")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        matches!(pending, redis::Value::Array(ref a) if matches!(a.first(), Some(redis::Value::Int(0)))),
        "what was committed was acknowledged, nothing left pending: {pending:?}"
    );
    assert_eq!(count(&client, "SELECT count(*) FROM inbox").await, applied);
}

#[tokio::test]
async fn consume_once_leaves_no_consumer_name_behind() {
    let (db, streams, cfg) = ledger_setup("forget").await;
    xadd_events(&streams, 0..20).await;
    for _ in 0..3 {
        outboxd(&cfg, &["consume", "--once"]);
    }
    assert_eq!(
        count(&db.client().await, "SELECT count(*) FROM ledger").await,
        20
    );
    let consumers: Vec<redis::Value> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(streams.key("events"))
        .arg("ledger")
        .query_async(&mut streams.conn().await)
        .await
        .unwrap();
    assert!(consumers.is_empty(), "{consumers:?}");
}

/// `--log-format json`: one JSON object a line, and the lines about an event carry its
/// event ID and aggregate (order) ID as fields, for the log pipeline to search by.
#[tokio::test]
async fn json_logs_carry_event_and_aggregate_ids() {
    let s = setup("jsonlogs", "").await;
    s.fulfillment("evt-missing-order", "no-such-order", "f1", "picking", None)
        .await;
    let cfg = write_config("jsonlogs", &s.cfg_text);
    let (code, out, err) = run_bin(
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--log-format",
            "json",
            "consume",
            "--once",
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("1 dead-lettered"), "{out}");
    let lines: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let about = |message: &str| {
        lines
            .iter()
            .find(|l| l["fields"]["message"] == message)
            .unwrap_or_else(|| panic!("no {message:?} line in {err}"))
            .clone()
    };
    for message in [
        "event failed; it stays pending and is retried",
        "dead-lettered",
    ] {
        let line = about(message);
        assert_eq!(line["fields"]["event_id"], "evt-missing-order", "{line}");
        assert_eq!(line["fields"]["aggregate_id"], "no-such-order", "{line}");
    }
}
