//! `outboxd demo`: the order/fulfillment story end to end against local PostgreSQL and Redis.
//! It (re)creates two demo databases, migrates them, lets the fulfillment service write its
//! events into its outbox, relays them, plays a relay crash's duplicate, a late out-of-order
//! event and a poison entry, consumes everything with the `order_status` handler, relays the
//! resulting `order.status_changed` events, and prints each order's timeline and a summary.
//! Everything runs in this process and is finished when it returns; the databases
//! (`outboxd_demo_orders`, `outboxd_demo_fulfillment`) and the `outboxd-demo:` streams stay
//! for inspection and are recreated by the next run of the same `--name`.

use crate::cli::DemoArgs;
use crate::config::{redact_url, Config};
use crate::error::{Error, Result};
use crate::inbox::Tally;
use crate::redis_io::Redis;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const FSC: &str = "fulfillment.status_changed";
const DC: &str = "delivery.confirmed";

fn db_url(server: &str, db: &str) -> Result<String> {
    let cut = server
        .rfind('/')
        .filter(|i| *i > "postgres://".len())
        .ok_or_else(|| {
            crate::config::ConfigError::new(
                "--postgres",
                format!("{} has no database path", redact_url(server)),
            )
        })?;
    Ok(format!("{}/{db}", &server[..cut]))
}

async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let db = crate::config::DatabaseConfig {
        pool_size: 1,
        ..crate::config::DatabaseConfig::with_url(url)
    };
    let target = crate::db::pg_config("demo", &db)?;
    let (client, conn) = crate::db::connect_dedicated(&target)
        .await
        .map_err(Error::pg(format!("connecting to {}", redact_url(url))))?;
    tokio::spawn(conn);
    Ok(client)
}

pub async fn run(args: &DemoArgs) -> Result<()> {
    let redis_url =
        std::env::var("OUTBOXD_REDIS_URL").unwrap_or_else(|_| crate::config::defaults::redis_url());
    crate::outln!(
        "outboxd demo: PostgreSQL {}, Redis {}",
        redact_url(&args.postgres),
        redact_url(&redis_url)
    );
    // Named by `--name`, so that two demos (two test suites, say) never share databases.
    let orders_db = format!("{}_orders", args.name);
    let fulfillment_db = format!("{}_fulfillment", args.name);
    let prefix = format!("{}:", args.name.replace('_', "-"));
    let admin = connect(&args.postgres).await?;
    for db in [&orders_db, &fulfillment_db] {
        for statement in [
            format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
            format!("CREATE DATABASE {db}"),
        ] {
            admin
                .batch_execute(&statement)
                .await
                .map_err(Error::pg(format!("recreating {db}")))?;
        }
    }
    let orders_url = db_url(&args.postgres, &orders_db)?;
    let fulfillment_url = db_url(&args.postgres, &fulfillment_db)?;
    let text = format!(
        r#"
[redis]
url = "{redis_url}"
stream_prefix = "{prefix}"
[databases.orders]
url = "{orders_url}"
[databases.fulfillment]
url = "{fulfillment_url}"
[[relays]]
database = "fulfillment"
[[relays]]
database = "orders"
[[consumers]]
name = "order-status"
database = "orders"
streams = ["{FSC}", "{DC}"]
handler = "order_status"
max_deliveries = 3
[http]
listen = ""
"#
    );
    let config = Config::parse(&text)?;
    config.validate()?;
    let redis = Redis::for_config(&config)?;
    let mut conn = redis.commands();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .map_err(Error::redis("listing old demo streams"))?;
    for key in keys {
        let _: i64 = redis::cmd("DEL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .map_err(Error::redis("DEL"))?;
    }

    let report = crate::migrate::migrate(&config).await?;
    crate::outln!(
        "1. migrate: {} steps applied to {orders_db} and {fulfillment_db}",
        report.applied.len()
    );

    let orders = connect(&orders_url).await?;
    let mut fulfillment = connect(&fulfillment_url).await?;
    orders
        .batch_execute(
            "INSERT INTO orders (id, status) VALUES
               ('COD-1001', 'confirmed'), ('MULTI-2002', 'confirmed'),
               ('DUP-3003', 'confirmed'), ('LATE-4004', 'confirmed'),
               ('REFUND-5005', 'refunded')",
        )
        .await
        .map_err(Error::pg("creating demo orders"))?;
    crate::outln!("2. the order service has 5 orders: COD-1001, MULTI-2002, DUP-3003, LATE-4004 (confirmed) and REFUND-5005 (refunded)");

    // What the fulfillment service writes, each inside its own business transaction.
    let events: Vec<(&str, &str, serde_json::Value)> = vec![
        (FSC, "COD-1001", fse("COD-1001", "F-1", "planning", None)),
        (FSC, "COD-1001", fse("COD-1001", "F-1", "picking", None)),
        (FSC, "COD-1001", fse("COD-1001", "F-1", "packed", None)),
        (FSC, "COD-1001", fse("COD-1001", "F-1", "shipped", None)),
        (FSC, "COD-1001", fse("COD-1001", "F-1", "completed", None)),
        (
            DC,
            "COD-1001",
            json!({"event_type": DC, "order_id": "COD-1001", "shipment_id": "SHP-77", "timestamp": now()}),
        ),
        (
            FSC,
            "MULTI-2002",
            fse("MULTI-2002", "F-HAN", "picking", Some(2)),
        ),
        (
            FSC,
            "MULTI-2002",
            fse("MULTI-2002", "F-HCM", "picking", Some(2)),
        ),
        (
            FSC,
            "MULTI-2002",
            fse("MULTI-2002", "F-HAN", "shipped", Some(2)),
        ),
        (
            FSC,
            "MULTI-2002",
            fse("MULTI-2002", "F-HCM", "shipped", Some(2)),
        ),
        (FSC, "DUP-3003", fse("DUP-3003", "F-3", "picking", None)),
        (FSC, "LATE-4004", fse("LATE-4004", "F-4", "shipped", None)),
        (FSC, "LATE-4004", fse("LATE-4004", "F-4", "picking", None)),
        (
            FSC,
            "REFUND-5005",
            fse("REFUND-5005", "F-5", "shipped", None),
        ),
    ];
    for (topic, aggregate, payload) in &events {
        let tx = fulfillment
            .transaction()
            .await
            .map_err(Error::pg("begin"))?;
        tx.execute(
            "INSERT INTO outbox (topic, aggregate_id, payload) VALUES ($1, $2, $3)",
            &[topic, aggregate, payload],
        )
        .await
        .map_err(Error::pg("writing the fulfillment outbox"))?;
        tx.commit().await.map_err(Error::pg("commit"))?;
    }
    crate::outln!("3. the fulfillment service commits {} events to its outbox (LATE-4004's picking arrives after its shipped)", events.len());

    let pools = crate::db::pools(&config)?;
    let mut relays = crate::relay::build_all(&config, &pools, &redis)?;
    let never = CancellationToken::new();
    let s = relays[0].drain(None, &never, |_| {}).await?;
    crate::outln!(
        "4. relay {}: {} rows published in {:.3} s",
        relays[0].name(),
        s.published,
        s.seconds
    );

    // A relay that crashed after XADD but before its commit publishes the same event again;
    // a broken producer writes an entry that is not JSON at all.
    let key = redis.stream_key(FSC);
    let dup: redis::Value = redis::cmd("XRANGE")
        .arg(&key)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .map_err(Error::redis("XRANGE"))?;
    let dup_data = find_entry(&dup, "DUP-3003")
        .ok_or_else(|| Error::Incomplete("demo: DUP-3003's entry is missing".into()))?;
    let _: String = redis::cmd("XADD")
        .arg(&key)
        .arg("*")
        .arg("data")
        .arg(dup_data)
        .query_async(&mut conn)
        .await
        .map_err(Error::redis("XADD"))?;
    let _: String = redis::cmd("XADD")
        .arg(&key)
        .arg("*")
        .arg("data")
        .arg("{oops, not json")
        .query_async(&mut conn)
        .await
        .map_err(Error::redis("XADD"))?;
    crate::outln!(
        "5. a relay crash republishes DUP-3003's event; a broken producer adds a poison entry"
    );

    let consumers = crate::inbox::build_all(&config, &pools, &redis)?;
    let t: Tally = consumers[0].drain(&never).await?;
    crate::outln!(
        "6. consumer order-status: {} entries: {} applied, {} skipped, {} duplicate, {} dead-lettered",
        t.handled(),
        t.applied,
        t.skipped,
        t.duplicate,
        t.dead_lettered
    );
    let s = relays[1].drain(None, &never, |_| {}).await?;
    crate::outln!(
        "7. relay {}: {} order.status_changed events published to {}",
        relays[1].name(),
        s.published,
        redis.stream_key("order.status_changed")
    );

    crate::outln!("\nTimelines (order_status_history):");
    let rows = orders
        .query(
            "SELECT o.id, o.status,
                    coalesce(string_agg(h.to_status || ' (' || h.reason || ')', ' -> ' ORDER BY h.id), '') AS steps
             FROM orders o LEFT JOIN order_status_history h ON h.order_id = o.id
             GROUP BY o.id, o.status ORDER BY o.id",
            &[],
        )
        .await
        .map_err(Error::pg("reading timelines"))?;
    for row in &rows {
        let (id, status, steps): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        let start = if id == "REFUND-5005" {
            "refunded"
        } else {
            "confirmed"
        };
        if steps.is_empty() {
            crate::outln!("  {id:<12} {start}  (unchanged; now {status})");
        } else {
            crate::outln!("  {id:<12} {start} -> {steps}");
        }
    }
    // An order with several warehouses moves by all of them: its events one by one show the
    // wait (the first warehouse's `shipped` changes nothing until the second has shipped).
    let history: std::collections::HashMap<String, String> = orders
        .query(
            "SELECT event_id, to_status FROM order_status_history WHERE order_id = 'MULTI-2002'",
            &[],
        )
        .await
        .map_err(Error::pg("reading MULTI-2002's history"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut shipped: Vec<String> = Vec::new();
    let mut steps: Vec<String> = Vec::new();
    for data in field_values_raw(&dup, "data") {
        let v: serde_json::Value = serde_json::from_slice(data).unwrap_or_default();
        if v["subject"] != "MULTI-2002" {
            continue;
        }
        let (warehouse, status) = (
            v["data"]["fulfillment_id"].as_str().unwrap_or_default(),
            v["data"]["new_status"].as_str().unwrap_or_default(),
        );
        if status == "shipped" && !shipped.iter().any(|w| w == warehouse) {
            shipped.push(warehouse.to_string());
        }
        let effect = match history.get(v["id"].as_str().unwrap_or_default()) {
            Some(to) => format!("order -> {to}"),
            None if status == "shipped" => {
                format!("no change: {} of 2 warehouses shipped", shipped.len())
            }
            None => "no change".to_string(),
        };
        steps.push(format!("{warehouse} {status}: {effect}"));
    }
    crate::outln!(
        "
MULTI-2002, two warehouses, event by event:"
    );
    for step in &steps {
        crate::outln!("  {step}");
    }

    let dlq: redis::Value = redis::cmd("XRANGE")
        .arg(crate::inbox::dlq::dlq_key(&key))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .map_err(Error::redis("XRANGE dlq"))?;
    crate::outln!("\nDead letters ({}):", crate::inbox::dlq::dlq_key(&key));
    for reason in field_values(&dlq, "reason") {
        crate::outln!("  {reason}");
    }
    let expected = [
        ("COD-1001", "delivered"),
        ("MULTI-2002", "shipped"),
        ("DUP-3003", "processing"),
        ("LATE-4004", "shipped"),
        ("REFUND-5005", "refunded"),
    ];
    let mut ok = true;
    for (id, want) in expected {
        let got = rows
            .iter()
            .find(|r| r.get::<_, String>(0) == id)
            .map(|r| r.get::<_, String>(1))
            .unwrap_or_default();
        if got != want {
            ok = false;
            crate::outln!("  UNEXPECTED: {id} is {got}, expected {want}");
        }
    }
    crate::outln!(
        "\nSummary: {} applied, {} skipped (never backwards, terminal, already there), {} deduplicated, {} dead-lettered. {}",
        t.applied,
        t.skipped,
        t.duplicate,
        t.dead_lettered,
        if ok { "Every order ended where its events say." } else { "Some orders did not end as expected." }
    );
    // The same server and role the demo used, over TCP: works for any OS user (a bare
    // `psql -d` would try the local socket as the OS user, which peer authentication refuses).
    let inspect_url = db_url(&args.postgres, &orders_db)?;
    let redis_port = redis_url
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse::<u16>().ok())
        .unwrap_or(6379);
    crate::outln!(
        "Inspect: psql '{}' -c 'table order_status_history'; redis-cli -p {redis_port} XRANGE {prefix}order.status_changed - +",
        redact_url(&inspect_url)
    );
    if ok {
        Ok(())
    } else {
        Err(Error::Incomplete("demo: unexpected final statuses".into()))
    }
}

/// Now as RFC 3339 UTC.
fn now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let mut out = String::new();
    crate::envelope::format_rfc3339_micros(secs, &mut out);
    out
}

fn fse(order: &str, fulfillment: &str, status: &str, count: Option<u32>) -> serde_json::Value {
    let mut v = json!({
        "event_type": FSC, "fulfillment_id": fulfillment, "order_id": order,
        "old_status": "", "new_status": status, "timestamp": now(),
    });
    if let Some(n) = count {
        v["metadata"] = json!({"fulfillment_count": n, "warehouse": fulfillment});
    }
    v
}

/// The values of `field` in every entry of an XRANGE reply, in order.
fn field_values_raw<'a>(range: &'a redis::Value, field: &'a str) -> impl Iterator<Item = &'a [u8]> {
    let entries: &[redis::Value] = match range {
        redis::Value::Array(entries) => entries,
        _ => &[],
    };
    entries.iter().flat_map(move |entry| {
        let fields: &[redis::Value] = match entry {
            redis::Value::Array(parts) => match parts.get(1) {
                Some(redis::Value::Array(fields)) => fields,
                _ => &[],
            },
            _ => &[],
        };
        fields.chunks(2).filter_map(move |pair| match pair {
            [redis::Value::BulkString(k), redis::Value::BulkString(v)] if k == field.as_bytes() => {
                Some(v.as_slice())
            }
            _ => None,
        })
    })
}

/// The `data` field of the first entry whose envelope's subject is `subject`.
fn find_entry(range: &redis::Value, subject: &str) -> Option<Vec<u8>> {
    field_values_raw(range, "data")
        .find(|v| {
            serde_json::from_slice::<serde_json::Value>(v).unwrap_or_default()["subject"] == subject
        })
        .map(<[u8]>::to_vec)
}

fn field_values(range: &redis::Value, field: &str) -> Vec<String> {
    field_values_raw(range, field)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}
