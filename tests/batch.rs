//! The `order_status` consumer's set-based batch path and its concurrency, against what it
//! can get wrong: events of one order in one batch, an event whose order does not exist in
//! the middle of a batch, a statement PostgreSQL refuses for one order, duplicates inside a
//! batch and across batches in flight, batches of two processes on the same orders, and a
//! SIGKILL with several batches in flight. Each checks the effects from the database: every
//! order where its events put it, along one history chain with no step twice, one
//! `order.status_changed` event per move.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::json;
use std::time::Duration;

const FSC: &str = "fulfillment.status_changed";
const DC: &str = "delivery.confirmed";

struct Orders {
    db: TestDb,
    streams: TestStreams,
    cfg: std::path::PathBuf,
}

impl Orders {
    async fn new(tag: &str, settings: &str) -> Orders {
        let db = TestDb::new(tag).await;
        let streams = TestStreams::new(tag);
        let cfg = TestConfig::new(&streams.prefix)
            .database("orders", &db.url)
            .consumer(
                "order-status",
                "orders",
                &[FSC, DC],
                "order_status",
                &format!("claim_idle_ms = 300\nblock_ms = 200\n{settings}"),
            )
            .migrated(tag);
        Orders { db, streams, cfg }
    }

    async fn orders(&self, ids: impl IntoIterator<Item = String>) {
        let ids: Vec<String> = ids.into_iter().collect();
        self.db
            .client()
            .await
            .execute(
                "INSERT INTO orders (id, status) SELECT unnest($1::text[]), 'confirmed'",
                &[&ids],
            )
            .await
            .unwrap();
    }

    /// XADDs, in one pipeline, fulfillment events (order, fulfillment, status, event ID) and
    /// deliveries (order, event ID).
    async fn publish(
        &self,
        events: &[(String, String, String, String)],
        deliveries: &[(String, String)],
    ) {
        let mut conn = self.streams.conn().await;
        let mut pipe = redis::pipe();
        for (order, fulfillment, status, id) in events {
            let e = json!({"specversion": "1.0", "id": id, "source": "t", "type": FSC, "subject": order,
                "data": {"order_id": order, "fulfillment_id": fulfillment, "new_status": status}});
            pipe.cmd("XADD")
                .arg(self.streams.key(FSC))
                .arg("*")
                .arg("data")
                .arg(e.to_string())
                .ignore();
        }
        for (order, id) in deliveries {
            let e = json!({"specversion": "1.0", "id": id, "source": "t", "type": DC, "subject": order,
                "data": {"order_id": order}});
            pipe.cmd("XADD")
                .arg(self.streams.key(DC))
                .arg("*")
                .arg("data")
                .arg(e.to_string())
                .ignore();
        }
        let () = pipe.query_async(&mut conn).await.unwrap();
    }

    /// `n` consumer daemons of this config, each with its own log.
    fn consumers(&self, n: usize) -> Vec<std::process::Child> {
        let dir = self.cfg.parent().unwrap();
        (0..n)
            .map(|i| {
                spawn_bin(
                    &["--config", self.cfg.to_str().unwrap(), "consume"],
                    &dir.join(format!("c{i}.log")),
                )
            })
            .collect()
    }

    /// Waits until every one of `n` orders is at `status` and nothing is pending.
    async fn settled_at(&self, n: i64, status: &str) {
        let sql = format!("SELECT count(*) FROM orders WHERE status = '{status}'");
        wait_until(
            &format!("every order {status}"),
            Duration::from_secs(90),
            || async { self.count(&sql).await == n },
        )
        .await;
        wait_until("nothing pending", Duration::from_secs(30), || {
            self.nothing_pending()
        })
        .await;
    }

    fn consume_once(&self) -> String {
        outboxd(&self.cfg, &["consume", "--once"])
    }

    async fn count(&self, sql: &str) -> i64 {
        count(&self.db.client().await, sql).await
    }

    /// Every order's history as "from>to" steps in id order.
    async fn histories(&self) -> std::collections::BTreeMap<String, Vec<String>> {
        let rows = self
            .db
            .client()
            .await
            .query(
                "SELECT order_id, from_status || '>' || to_status FROM order_status_history ORDER BY id",
                &[],
            )
            .await
            .unwrap();
        let mut out: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for r in rows {
            out.entry(r.get(0)).or_default().push(r.get(1));
        }
        out
    }

    /// Nothing is pending in the group on either stream.
    async fn nothing_pending(&self) -> bool {
        let mut conn = self.streams.conn().await;
        for topic in [FSC, DC] {
            let v: redis::Value = redis::cmd("XPENDING")
                .arg(self.streams.key(topic))
                .arg("order-status")
                .query_async(&mut conn)
                .await
                .unwrap_or(redis::Value::Nil);
            if !matches!(v, redis::Value::Array(ref a) if matches!(a.first(), Some(redis::Value::Int(0))))
            {
                return false;
            }
        }
        true
    }

    /// One history chain per order, no step twice, one outbox event per step in the same
    /// order, and no event ID behind two steps.
    async fn assert_exactly_once(&self) {
        let client = self.db.client().await;
        assert_eq!(
            count(
                &client,
                "SELECT count(*) FROM (SELECT event_id FROM order_status_history GROUP BY event_id HAVING count(*) > 1) d"
            )
            .await,
            0,
            "an event made two moves"
        );
        for (order, steps) in self.histories().await {
            for pair in steps.windows(2) {
                let to = pair[0].split('>').nth(1).unwrap();
                let from = pair[1].split('>').next().unwrap();
                assert_eq!(to, from, "order {order}: broken chain {steps:?}");
            }
            let unique: std::collections::BTreeSet<&String> = steps.iter().collect();
            assert_eq!(
                unique.len(),
                steps.len(),
                "order {order}: a step twice {steps:?}"
            );
            let echoes: Vec<String> = client
                .query(
                    "SELECT (payload->>'old_status') || '>' || (payload->>'new_status') FROM outbox
                     WHERE topic = 'order.status_changed' AND aggregate_id = $1 ORDER BY id",
                    &[&order],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            assert_eq!(
                echoes, steps,
                "order {order}: one order.status_changed per move, in order"
            );
        }
    }
}

/// SIGTERM to each, and each must exit 0.
fn stop(procs: Vec<std::process::Child>) {
    for p in &procs {
        sigterm(p);
    }
    for mut p in procs {
        assert!(p.wait().unwrap().success());
    }
}

fn fulfillment(order: &str, f: &str, status: &str, id: &str) -> (String, String, String, String) {
    (order.into(), f.into(), status.into(), id.into())
}

#[tokio::test]
async fn events_of_one_order_in_one_batch_build_on_each_other() {
    let o = Orders::new("batch_one_order", "").await;
    o.orders(["o1".to_string(), "o2".to_string()]).await;
    o.publish(
        &[
            fulfillment("o1", "f1", "picking", "e1"),
            fulfillment("o2", "f1", "picking", "e2"),
            fulfillment("o1", "f1", "packed", "e3"),
            fulfillment("o1", "f1", "shipped", "e4"),
        ],
        &[("o1".into(), "e5".into())],
    )
    .await;
    let out = o.consume_once();
    assert!(
        out.contains("4 applied") && out.contains("1 skipped"),
        "{out}"
    );
    let h = o.histories().await;
    assert_eq!(
        h["o1"],
        [
            "confirmed>processing",
            "processing>shipped",
            "shipped>delivered"
        ]
    );
    assert_eq!(h["o2"], ["confirmed>processing"]);
    assert_eq!(
        o.count("SELECT count(*) FROM order_fulfillments WHERE order_id = 'o1' AND status = 'shipped' AND last_event_id = 'e4'").await,
        1
    );
    o.assert_exactly_once().await;
}

#[tokio::test]
async fn an_event_for_a_missing_order_in_the_middle_of_a_batch_waits_alone() {
    let o = Orders::new("batch_missing", "max_deliveries = 100").await;
    o.orders(["o1".to_string(), "o3".to_string()]).await;
    o.publish(
        &[
            fulfillment("o1", "f1", "picking", "e1"),
            fulfillment("o2", "f1", "picking", "e2"),
            fulfillment("o3", "f1", "picking", "e3"),
        ],
        &[],
    )
    .await;
    let dir = o.cfg.parent().unwrap().to_path_buf();
    let mut daemon = spawn_bin(
        &["--config", o.cfg.to_str().unwrap(), "consume"],
        &dir.join("consume.log"),
    );
    wait_until("the others applied", Duration::from_secs(30), || async {
        o.count("SELECT count(*) FROM orders WHERE status = 'processing'")
            .await
            == 2
    })
    .await;
    // retried (claimed again every claim_idle_ms), but never recorded meanwhile
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        o.count("SELECT count(*) FROM inbox WHERE event_id = 'e2'")
            .await,
        0,
        "no inbox row for the event not applied"
    );
    assert_eq!(
        o.count("SELECT count(*) FROM order_fulfillments WHERE order_id = 'o2'")
            .await,
        0
    );
    assert!(!o.nothing_pending().await, "e2 stays pending");
    o.orders(["o2".to_string()]).await;
    wait_until(
        "the late order applied",
        Duration::from_secs(30),
        || async {
            o.count("SELECT count(*) FROM orders WHERE status = 'processing'")
                .await
                == 3
        },
    )
    .await;
    wait_until("nothing pending", Duration::from_secs(30), || {
        o.nothing_pending()
    })
    .await;
    sigterm(&daemon);
    assert!(daemon.wait().unwrap().success());
    assert_eq!(o.count("SELECT count(*) FROM inbox").await, 3);
    o.assert_exactly_once().await;
}

#[tokio::test]
async fn a_statement_refused_for_one_order_is_found_event_by_event() {
    let o = Orders::new("batch_refused", "max_deliveries = 1").await;
    o.orders(["good1".to_string(), "bad".to_string(), "good2".to_string()])
        .await;
    // a trigger of the user's that refuses one order's update: the set-based UPDATE fails
    // for the whole set, and no one event can be blamed from its error
    o.db.client()
        .await
        .batch_execute(
            "CREATE FUNCTION refuse_bad() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN IF NEW.id = 'bad' THEN RAISE EXCEPTION 'order bad is on hold'; END IF; RETURN NEW; END $$;
             CREATE TRIGGER refuse_bad BEFORE UPDATE ON orders FOR EACH ROW EXECUTE FUNCTION refuse_bad();",
        )
        .await
        .unwrap();
    o.publish(
        &[
            fulfillment("good1", "f1", "picking", "g1"),
            fulfillment("bad", "f1", "picking", "b1"),
            fulfillment("good2", "f1", "picking", "g2"),
        ],
        &[],
    )
    .await;
    let (code, out, err) = run_bin(
        &["--config", o.cfg.to_str().unwrap(), "consume", "--once"],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("2 applied") && out.contains("1 dead-lettered"),
        "{out}"
    );
    assert!(
        err.contains("PostgreSQL refused a set-based batch"),
        "{err}"
    );
    assert_eq!(
        o.count("SELECT count(*) FROM orders WHERE status = 'processing'")
            .await,
        2
    );
    assert_eq!(
        o.count("SELECT count(*) FROM orders WHERE id = 'bad' AND status = 'confirmed'")
            .await,
        1
    );
    let reasons = o
        .streams
        .field_of_each(&format!("{}:dlq", o.streams.key(FSC)), "reason")
        .await;
    assert_eq!(reasons.len(), 1);
    assert!(reasons[0].contains("order bad is on hold"), "{reasons:?}");
    o.assert_exactly_once().await;
}

#[tokio::test]
async fn duplicates_inside_a_batch_and_across_batches_in_flight_apply_once() {
    let o = Orders::new("batch_dups", "batch_size = 40\nconcurrency = 4").await;
    let n = 150;
    o.orders((0..n).map(|i| format!("o{i}"))).await;
    // every event twice: once right after itself (the same batch), once far later (another
    // batch, of another process)
    let mut events = Vec::new();
    for status in ["picking", "shipped"] {
        for i in 0..n {
            let (order, id) = (format!("o{i}"), format!("o{i}-{status}"));
            events.push(fulfillment(&order, "f1", status, &id));
            events.push(fulfillment(&order, "f1", status, &id));
        }
    }
    let again = events.clone();
    events.extend(again);
    o.publish(&events, &[]).await;
    let procs = o.consumers(2);
    o.settled_at(n, "shipped").await;
    stop(procs);
    assert_eq!(o.count("SELECT count(*) FROM inbox").await, 2 * n);
    assert_eq!(
        o.count("SELECT count(*) FROM order_status_history").await,
        2 * n
    );
    o.assert_exactly_once().await;
}

#[tokio::test]
async fn batches_of_two_processes_on_the_same_orders_fold_every_event() {
    // Two fulfillments per order, both must ship for the order to ship: a fold lost to two
    // transactions on one order at once would leave it processing.
    let o = Orders::new("batch_same_orders", "batch_size = 7\nconcurrency = 3").await;
    let n = 60;
    o.orders((0..n).map(|i| format!("o{i}"))).await;
    let procs = o.consumers(2);
    for status in ["picking", "packed", "shipped"] {
        let mut events = Vec::new();
        for f in ["fa", "fb"] {
            for i in 0..n {
                let order = format!("o{i}");
                events.push(fulfillment(
                    &order,
                    f,
                    status,
                    &format!("{order}-{f}-{status}"),
                ));
            }
        }
        o.publish(&events, &[]).await;
    }
    o.settled_at(n, "shipped").await;
    stop(procs);
    assert_eq!(
        o.count("SELECT count(*) FROM order_fulfillments WHERE status = 'shipped'")
            .await,
        2 * n,
        "every fold kept"
    );
    for (order, steps) in o.histories().await {
        assert_eq!(
            steps,
            ["confirmed>processing", "processing>shipped"],
            "order {order}"
        );
    }
    o.assert_exactly_once().await;
}

#[tokio::test]
async fn sigkill_with_several_batches_in_flight_loses_and_doubles_nothing() {
    let o = Orders::new("batch_kill", "batch_size = 50\nconcurrency = 4").await;
    let n = 1500;
    o.orders((0..n).map(|i| format!("o{i}"))).await;
    let mut events = Vec::new();
    for status in ["picking", "packed", "shipped"] {
        for i in 0..n {
            let order = format!("o{i}");
            events.push(fulfillment(
                &order,
                "f1",
                status,
                &format!("{order}-{status}"),
            ));
        }
    }
    o.publish(&events, &[]).await;
    let dir = o.cfg.parent().unwrap().to_path_buf();
    let mut victim = spawn_bin(
        &["--config", o.cfg.to_str().unwrap(), "consume"],
        &dir.join("victim.log"),
    );
    wait_until("some moves made", Duration::from_secs(60), || async {
        o.count("SELECT count(*) FROM order_status_history").await >= 300
    })
    .await;
    sigkill(&mut victim);
    let at_kill = o.count("SELECT count(*) FROM order_status_history").await;
    assert!(at_kill < 2 * n, "killed mid-backlog ({at_kill} moves)");
    let mut heir = spawn_bin(
        &["--config", o.cfg.to_str().unwrap(), "consume"],
        &dir.join("heir.log"),
    );
    o.settled_at(n, "shipped").await;
    sigterm(&heir);
    assert!(heir.wait().unwrap().success());
    assert_eq!(
        o.count("SELECT count(*) FROM order_status_history").await,
        2 * n
    );
    assert_eq!(o.count("SELECT count(*) FROM inbox").await, 3 * n);
    o.assert_exactly_once().await;
}

#[test]
fn concurrency_outside_its_range_is_refused_by_name() {
    for (value, tag) in [("0", "zero"), ("9", "over_pool")] {
        let cfg = TestConfig::new("unused:")
            .database("orders", "postgres://root@127.0.0.1:1/none")
            .consumer(
                "order-status",
                "orders",
                &[FSC],
                "order_status",
                &format!("concurrency = {value}"),
            )
            .write(&format!("batch_conc_{tag}"));
        let (code, _, err) = run_bin(
            &["--config", cfg.to_str().unwrap(), "consume", "--once"],
            &[],
        );
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("consumers[0].concurrency"), "{err}");
        assert!(err.contains("pool_size"), "{err}");
    }
}
