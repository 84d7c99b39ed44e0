//! The relay against real PostgreSQL and Redis: migrations, the producer contract, many
//! relays at once, commit-order safety, hot aggregates, crashes, Redis restarts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use outboxd::config::Config;
use std::time::Duration;

const TOPIC: &str = "fulfillment.status_changed";

async fn migrated(tag: &str) -> (TestDb, TestStreams, std::path::PathBuf) {
    let db = TestDb::new(tag).await;
    let streams = TestStreams::new(tag);
    let cfg = write_config(tag, &relay_config(&db.url, &streams.prefix, ""));
    let (code, out, err) = run_bin(&["--config", cfg.to_str().unwrap(), "migrate"], &[]);
    assert_eq!(code, 0, "migrate failed: {out}{err}");
    (db, streams, cfg)
}

/// A relay of `batch_size = 500` on the test's outbox, and the outbox's oid.
async fn relay_of_500(
    db: &TestDb,
    streams: &TestStreams,
    client: &tokio_postgres::Client,
) -> (outboxd::relay::Relay, u32) {
    let relay = relay_from(&relay_config(&db.url, &streams.prefix, "batch_size = 500"));
    let relid: u32 = client
        .query_one("SELECT 'outbox'::regclass::oid", &[])
        .await
        .unwrap()
        .get(0);
    (relay, relid)
}

fn relay_from(cfg_text: &str) -> outboxd::relay::Relay {
    let config = Config::parse(cfg_text).unwrap();
    config.validate().unwrap();
    let pools = outboxd::db::pools(&config).unwrap();
    let redis = outboxd::redis_io::Redis::new(&config.redis).unwrap();
    outboxd::relay::build_all(&config, &pools, &redis)
        .unwrap()
        .pop()
        .unwrap()
}

#[tokio::test]
async fn migrate_is_idempotent_and_producers_insert_plainly() {
    let (db, _streams, cfg) = migrated("migrate").await;
    let (code, out, err) = run_bin(&["--config", cfg.to_str().unwrap(), "migrate"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("0 step(s) applied"),
        "second migrate must be a no-op: {out}"
    );

    let client = db.client().await;
    client
        .execute(
            "INSERT INTO outbox (topic, aggregate_id, payload) VALUES ($1, 'o-1', '{\"a\":1}')",
            &[&TOPIC],
        )
        .await
        .expect("the producer's plain insert works");
    let row = client
        .query_one(
            "SELECT id, event_id IS NOT NULL, headers = '{}'::jsonb, attempts, quarantined_at IS NULL FROM outbox",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, i64>(0) > 0);
    assert!(row.get::<_, bool>(1));
    assert!(row.get::<_, bool>(2));
    assert_eq!(row.get::<_, i32>(3), 0);
    assert!(row.get::<_, bool>(4));
}

#[tokio::test]
async fn concurrent_migrations_do_not_collide() {
    let db = TestDb::new("migrate_conc").await;
    let streams = TestStreams::new("migrate_conc");
    let cfg = write_config("migrate_conc", &relay_config(&db.url, &streams.prefix, ""));
    let path = cfg.to_str().unwrap().to_string();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let p = path.clone();
            std::thread::spawn(move || run_bin(&["--config", &p, "migrate"], &[]))
        })
        .collect();
    let mut applied = 0;
    for h in handles {
        let (code, out, err) = h.join().unwrap();
        assert_eq!(code, 0, "{out}{err}");
        if out.contains("2 step(s) applied") {
            applied += 1;
        }
    }
    assert_eq!(applied, 1, "exactly one run applies the migration");
}

#[tokio::test]
async fn relay_once_publishes_cloudevents_and_empties_the_outbox() {
    let (db, streams, cfg) = migrated("once").await;
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO outbox (topic, aggregate_id, payload, headers) VALUES ($1, 'o-1', $2, $3)",
            &[
                &TOPIC,
                &serde_json::json!({"order_id": "o-1", "new_status": "picking"}),
                &serde_json::json!({"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}),
            ],
        )
        .await
        .unwrap();
    insert_rows(&client, TOPIC, 100, 7).await;
    let (code, out, err) = run_bin(&["--config", cfg.to_str().unwrap(), "relay", "--once"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("101 rows in"), "summary names the rows: {out}");
    assert!(out.contains("rows/s"), "{out}");
    assert_eq!(count(&client, "SELECT count(*) FROM outbox").await, 0);
    let entries = streams.entries(TOPIC).await;
    assert_eq!(entries.len(), 101);
    let first = &entries[0].1;
    assert_eq!(first["specversion"], "1.0");
    assert_eq!(first["type"], TOPIC);
    assert_eq!(first["subject"], "o-1");
    assert_eq!(first["source"], "outboxd/main");
    assert_eq!(first["datacontenttype"], "application/json");
    assert_eq!(first["data"]["new_status"], "picking");
    assert_eq!(
        first["traceparent"],
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );
    assert!(first["id"].as_str().unwrap().len() == 36);
    assert!(first["time"].as_str().unwrap().ends_with('Z'));
    check_stream(&entries[1..], 100);
}

#[tokio::test]
async fn each_entry_carries_the_time_of_its_own_row() {
    // Times repeat (one producer transaction) and change from row to row, down to the
    // microsecond and before 1970: each envelope's `time` is its own row's.
    let (db, streams, cfg) = migrated("own_time").await;
    let client = db.client().await;
    let times = [
        "2026-11-22 08:00:00.123456+00",
        "2026-11-22 08:00:00.123456+00",
        "2026-11-22 08:00:00.123457+00",
        "2026-11-22 08:00:00.123456+00",
        "1969-12-31 23:59:59.999999+00",
        "2000-02-29 12:34:56+00",
        "2000-02-29 12:34:56+00",
    ];
    for time in times {
        client
            .execute(
                "INSERT INTO outbox (topic, aggregate_id, payload, created_at)
                 VALUES ($1, 'o-1', '{}', $2::text::timestamptz)",
                &[&TOPIC, &time],
            )
            .await
            .unwrap();
    }
    let expected: Vec<String> = client
        .query(
            "SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')
             FROM outbox ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let (code, _, err) = run_bin(&["--config", cfg.to_str().unwrap(), "relay", "--once"], &[]);
    assert_eq!(code, 0, "{err}");
    let published: Vec<String> = streams
        .entries(TOPIC)
        .await
        .iter()
        .map(|(_, e)| e["time"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(published, expected);
    assert_eq!(published[2], "2026-11-22T08:00:00.123457Z");
    assert_eq!(published[4], "1969-12-31T23:59:59.999999Z");
}

#[tokio::test]
async fn three_relays_keep_per_aggregate_order() {
    let (db, streams, _) = migrated("three").await;
    let client = db.client().await;
    const N: i64 = 30_000;
    let cfg_text = relay_config(
        &db.url,
        &streams.prefix,
        "batch_size = 200\npoll_interval_ms = 50",
    );
    let cfg = write_config("three", &cfg_text);
    let dir = cfg.parent().unwrap().to_path_buf();
    let mut relays: Vec<_> = (0..3)
        .map(|i| {
            spawn_bin(
                &["--config", cfg.to_str().unwrap(), "relay"],
                &dir.join(format!("relay{i}.log")),
            )
        })
        .collect();
    // Producers write while the relays run: 300 aggregates, committed in chunks.
    let mut start = 0;
    while start < N {
        let end = start + 1000;
        client
            .execute(
                "INSERT INTO outbox (topic, aggregate_id, payload)
                 SELECT $1, 'agg-' || (g % 300), jsonb_build_object('agg', 'agg-' || (g % 300), 'seq', g)
                 FROM generate_series($2::bigint, $3::bigint - 1) g ORDER BY g",
                &[&TOPIC, &start, &end],
            )
            .await
            .unwrap();
        start = end;
    }
    wait_until("outbox drained", Duration::from_secs(120), || async {
        count(&client, "SELECT count(*) FROM outbox").await == 0
    })
    .await;
    for r in &relays {
        sigterm(r);
    }
    for r in relays.iter_mut() {
        let status = r.wait().unwrap();
        assert!(status.success(), "relay exits 0 on SIGTERM: {status:?}");
    }
    let entries = streams.entries(TOPIC).await;
    let duplicates = check_stream(&entries, N);
    assert_eq!(duplicates, 0, "no crash, so every row exactly once");
    // all three took part
    for i in 0..3 {
        let log = std::fs::read_to_string(dir.join(format!("relay{i}.log"))).unwrap();
        assert!(log.contains("relay started"), "relay {i} log: {log}");
    }
}

#[tokio::test]
async fn open_transaction_holds_back_only_its_aggregate() {
    let (db, streams, cfg) = migrated("held").await;
    let cfg_path = cfg.to_str().unwrap().to_string();
    let holder = db.client().await;
    let other = db.client().await;
    let early_writer = db.client().await;

    // A transaction that got its xid before the holder, but writes X's later row after it:
    // commit order and xid order disagree; the aggregate lock still protects X.
    early_writer.batch_execute("BEGIN").await.unwrap();
    early_writer
        .execute("INSERT INTO outbox (topic, aggregate_id, payload) VALUES ($1, 'Z', '{\"agg\":\"Z\",\"seq\":0}')", &[&TOPIC])
        .await
        .unwrap();
    holder.batch_execute("BEGIN").await.unwrap();
    holder
        .execute("INSERT INTO outbox (topic, aggregate_id, payload) VALUES ($1, 'X', '{\"agg\":\"X\",\"seq\":1}')", &[&TOPIC])
        .await
        .unwrap();
    let holder_pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    early_writer
        .execute("INSERT INTO outbox (topic, aggregate_id, payload) VALUES ($1, 'X', '{\"agg\":\"X\",\"seq\":2}')", &[&TOPIC])
        .await
        .unwrap();
    early_writer.batch_execute("COMMIT").await.unwrap();
    for seq in 3..6 {
        other
            .execute(
                "INSERT INTO outbox (topic, aggregate_id, payload) VALUES ($1, 'X', jsonb_build_object('agg','X','seq',$2::int))",
                &[&TOPIC, &seq],
            )
            .await
            .unwrap();
    }
    for seq in 0..20 {
        other
            .execute(
                "INSERT INTO outbox (topic, aggregate_id, payload) VALUES ($1, 'Y' || ($2::int % 4), jsonb_build_object('agg','Y','seq',$2::int))",
                &[&TOPIC, &seq],
            )
            .await
            .unwrap();
    }

    let p = cfg_path.clone();
    let (code, out, err) =
        tokio::task::spawn_blocking(move || run_bin(&["--config", &p, "relay", "--once"], &[]))
            .await
            .unwrap();
    assert_eq!(code, 0, "{err}");
    let entries = streams.entries(TOPIC).await;
    let subjects: Vec<String> = entries
        .iter()
        .map(|e| e.1["subject"].as_str().unwrap().to_string())
        .collect();
    assert!(
        !subjects.iter().any(|s| s == "X"),
        "nothing of X may pass its open row: {subjects:?}"
    );
    assert_eq!(
        subjects.iter().filter(|s| s.starts_with('Y')).count(),
        20,
        "other aggregates flow"
    );
    assert_eq!(subjects.iter().filter(|s| *s == "Z").count(), 1);
    assert!(
        out.contains("4 held back"),
        "summary counts held rows: {out}"
    );
    assert!(
        out.contains(&holder_pid.to_string()),
        "summary names the blocking pid {holder_pid}: {out}"
    );

    holder.batch_execute("COMMIT").await.unwrap();
    let p = cfg_path.clone();
    let (code, _, err) =
        tokio::task::spawn_blocking(move || run_bin(&["--config", &p, "relay", "--once"], &[]))
            .await
            .unwrap();
    assert_eq!(code, 0, "{err}");
    let xs: Vec<i64> = streams
        .entries(TOPIC)
        .await
        .iter()
        .filter(|e| e.1["subject"] == "X")
        .map(|e| e.1["data"]["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(
        xs,
        vec![1, 2, 3, 4, 5],
        "X in outbox id order once its first row committed"
    );
}

#[tokio::test]
async fn hot_aggregate_drains_at_batch_speed() {
    let (db, streams, _) = migrated("hot").await;
    let client = db.client().await;
    insert_rows(&client, TOPIC, 5_000, 1).await;
    let mut relay = relay_from(&relay_config(&db.url, &streams.prefix, "batch_size = 1000"));
    let mut batches = 0;
    loop {
        let outcome = relay.run_batch().await.unwrap();
        if outcome.claimed == 0 {
            break;
        }
        batches += 1;
        assert!(
            batches <= 6,
            "5,000 rows of one aggregate at 1,000 per batch"
        );
    }
    assert_eq!(batches, 5);
    let entries = streams.entries(TOPIC).await;
    assert_eq!(check_stream(&entries, 5_000), 0);
}

#[tokio::test]
async fn sigkill_mid_batch_loses_nothing_and_keeps_order() {
    let (db, streams, _) = migrated("kill").await;
    let client = db.client().await;
    const N: i64 = 20_000;
    insert_rows(&client, TOPIC, N, 50).await;
    let cfg = write_config(
        "kill",
        &relay_config(&db.url, &streams.prefix, "batch_size = 100"),
    );
    let dir = cfg.parent().unwrap().to_path_buf();
    for round in 0..3 {
        let mut relay = spawn_bin(
            &["--config", cfg.to_str().unwrap(), "relay"],
            &dir.join(format!("r{round}.log")),
        );
        let target = (round + 1) * 3_000;
        wait_until("some rows published", Duration::from_secs(60), || async {
            streams.len(TOPIC).await >= target
        })
        .await;
        sigkill(&mut relay);
    }
    let (code, _, err) = run_bin(&["--config", cfg.to_str().unwrap(), "relay", "--once"], &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(count(&client, "SELECT count(*) FROM outbox").await, 0);
    let entries = streams.entries(TOPIC).await;
    let duplicates = check_stream(&entries, N);
    // a kill between XADD and COMMIT republishes at most one batch per kill
    assert!(
        duplicates <= 3 * 100,
        "duplicates bounded by killed batches: {duplicates}"
    );
}

#[tokio::test]
async fn bad_configuration_exits_2_naming_the_key() {
    let cases: &[(&str, &str)] = &[
        ("[redis]\nurl = 5\n", "url"),
        ("[redis]\nbogus = 1\n", "bogus"),
        ("[[relays]]\ndatabase = \"nowhere\"\n", "relays[0].database"),
        (
            "[databases.main]\nurl = \"postgres://u@h/d\"\n[[relays]]\ndatabase = \"main\"\ntable = \"outbox; DROP TABLE orders\"\n",
            "relays[0].table",
        ),
        (
            "[databases.main]\nurl = \"postgres://u@h/d\"\n[[relays]]\ndatabase = \"main\"\nbatch_size = 0\n",
            "relays[0].batch_size",
        ),
        ("[databases.main]\n", "url"),
        ("[http]\nlisten = \"not an address\"\n", "http.listen"),
        ("not toml at all [", "line 1"),
    ];
    for (text, key) in cases {
        let cfg = write_config("bad", text);
        let (code, _, err) = run_bin(&["--config", cfg.to_str().unwrap(), "relay", "--once"], &[]);
        assert_eq!(code, 2, "config {text:?} must exit 2: {err}");
        assert!(
            err.contains(key),
            "error for {text:?} must name {key}: {err}"
        );
    }
    let (code, _, err) = run_bin(&["--config", "/nonexistent/outboxd.toml", "migrate"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/outboxd.toml"), "{err}");
    let (code, _, err) = run_bin(&["relay", "--bogus"], &[]);
    assert_eq!(code, 2, "{err}");
}

#[tokio::test]
async fn passwords_never_appear_in_errors() {
    let cfg = write_config(
        "secret",
        "[databases.main]\nurl = \"postgres://app:sup3rs3cret@127.0.0.1:1/nowhere\"\n[[relays]]\ndatabase = \"main\"\n[redis]\nurl = \"redis://:hunter2pass@127.0.0.1:1\"\n",
    );
    let (code, out, err) = run_bin(&["--config", cfg.to_str().unwrap(), "migrate"], &[]);
    assert_ne!(code, 0);
    assert!(
        !out.contains("sup3rs3cret") && !err.contains("sup3rs3cret"),
        "{out}{err}"
    );
    assert!(
        !out.contains("hunter2pass") && !err.contains("hunter2pass"),
        "{out}{err}"
    );
}

#[tokio::test]
async fn relay_survives_redis_restart_without_loss() {
    let mut redis = PrivateRedis::start();
    let db = TestDb::new("redis_restart").await;
    let streams = TestStreams::on("redis_restart", &redis.url());
    let text = relay_config(
        &db.url,
        &streams.prefix,
        "batch_size = 100\npoll_interval_ms = 50",
    )
    .replace(&redis_url(), &redis.url());
    let cfg = write_config("redis_restart", &text);
    let (code, _, err) = run_bin(&["--config", cfg.to_str().unwrap(), "migrate"], &[]);
    assert_eq!(code, 0, "{err}");
    let client = db.client().await;
    let log = cfg.parent().unwrap().join("relay.log");
    let mut relay = spawn_bin(&["--config", cfg.to_str().unwrap(), "relay"], &log);
    insert_rows(&client, TOPIC, 2_000, 20).await;
    wait_until("first rows drained", Duration::from_secs(30), || async {
        count(&client, "SELECT count(*) FROM outbox").await == 0
    })
    .await;
    redis.kill();
    // rows written while Redis is away wait in the outbox
    client
        .execute(
            "INSERT INTO outbox (topic, aggregate_id, payload)
             SELECT $1, 'agg-' || (g % 20), jsonb_build_object('agg', 'agg-' || (g % 20), 'seq', g)
             FROM generate_series(2000, 2999) g ORDER BY g",
            &[&TOPIC],
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        count(&client, "SELECT count(*) FROM outbox").await,
        1_000,
        "nothing deleted while Redis is down"
    );
    assert_eq!(
        count(
            &client,
            "SELECT coalesce(max(attempts), 0)::bigint FROM outbox"
        )
        .await,
        0,
        "an outage counts no attempts against rows"
    );
    redis.restart();
    wait_until(
        "backlog drained after Redis is back",
        Duration::from_secs(60),
        || async { count(&client, "SELECT count(*) FROM outbox").await == 0 },
    )
    .await;
    sigterm(&relay);
    assert!(relay.wait().unwrap().success());
    let entries = streams.entries(TOPIC).await;
    check_stream(&entries, 3_000);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("backing off"),
        "the outage was seen and retried: {text}"
    );
}

/// The relay's publishing connection (resp.rs) logs in as the URL's user and uses its
/// database: on a server whose default user is off, entries land in database 5 and
/// nowhere else, every row once and in order.
#[tokio::test]
async fn relay_publishes_as_the_user_and_into_the_database_of_its_url() {
    let redis = PrivateRedis::start();
    let mut admin = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&test_redis_config())
        .await
        .unwrap();
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "relayer", "on", ">s3cret-pass", "~*", "+@all"])
        .query_async(&mut admin)
        .await
        .unwrap();
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "default", "off"])
        .query_async(&mut admin)
        .await
        .unwrap();
    drop(admin);
    let url = format!("redis://relayer:s3cret-pass@127.0.0.1:{}/5", redis.port);
    let db = TestDb::new("acl_db").await;
    let streams = TestStreams::on("acl_db", &url);
    let text =
        relay_config(&db.url, &streams.prefix, "batch_size = 300").replace(&redis_url(), &url);
    let cfg = write_config("acl_db", &text);
    let (code, _, err) = run_bin(&["--config", cfg.to_str().unwrap(), "migrate"], &[]);
    assert_eq!(code, 0, "{err}");
    let client = db.client().await;
    insert_rows(&client, TOPIC, 2_000, 13).await;
    let (code, out, err) = run_bin(&["--config", cfg.to_str().unwrap(), "relay", "--once"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(count(&client, "SELECT count(*) FROM outbox").await, 0);
    check_stream(&streams.entries(TOPIC).await, 2_000);
    // database 0 holds nothing of this run
    let mut in_db0 = redis::Client::open(format!(
        "redis://relayer:s3cret-pass@127.0.0.1:{}/0",
        redis.port
    ))
    .unwrap()
    .get_multiplexed_async_connection_with_config(&test_redis_config())
    .await
    .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut in_db0)
        .await
        .unwrap();
    assert!(keys.is_empty(), "{keys:?}");
    // and without the user's password nothing is published
    let bad = text.replace("s3cret-pass", "wrong-pass");
    let bad_cfg = write_config("acl_db_bad", &bad);
    insert_rows(&client, TOPIC, 10, 1).await;
    let (code, out, err) = run_bin(
        &[
            "--config",
            bad_cfg.to_str().unwrap(),
            "relay",
            "--once",
            "--give-up-after",
            "2s",
        ],
        &[],
    );
    assert_ne!(code, 0, "{out}{err}");
    assert!(!err.contains("wrong-pass"), "no password in errors: {err}");
    assert_eq!(count(&client, "SELECT count(*) FROM outbox").await, 10);
}

#[tokio::test]
async fn rejected_row_is_quarantined_and_holds_back_only_its_aggregate() {
    let db = TestDb::new("quarantine").await;
    let streams = TestStreams::new("quarantine");
    let cfg = write_config(
        "quarantine",
        &relay_config(&db.url, &streams.prefix, "max_attempts = 3"),
    );
    let (code, _, err) = run_bin(&["--config", cfg.to_str().unwrap(), "migrate"], &[]);
    assert_eq!(code, 0, "{err}");
    // The stream key of topic "broken" holds a string: Redis answers WRONGTYPE to XADD.
    let mut conn = streams.conn().await;
    let _: () = redis::cmd("SET")
        .arg(streams.key("broken"))
        .arg("not a stream")
        .query_async(&mut conn)
        .await
        .unwrap();
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO outbox (topic, aggregate_id, payload) VALUES
               ('fine', 'A', '{\"agg\":\"A\",\"seq\":0}'),
               ('broken', 'B', '{\"agg\":\"B\",\"seq\":1}'),
               ('fine', 'B', '{\"agg\":\"B\",\"seq\":2}'),
               ('fine', 'C', '{\"agg\":\"C\",\"seq\":3}'),
               ('', 'D', '{\"agg\":\"D\",\"seq\":4}'),
               ('fine', 'D', '{\"agg\":\"D\",\"seq\":5}')",
        )
        .await
        .unwrap();
    for _ in 0..4 {
        let (code, _, err) = run_bin(&["--config", cfg.to_str().unwrap(), "relay", "--once"], &[]);
        assert_eq!(code, 0, "{err}");
    }
    let rows = client
        .query(
            "SELECT aggregate_id, attempts, last_error, quarantined_at IS NOT NULL FROM outbox ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let summary: Vec<(String, i32, bool)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(3)))
        .collect();
    // B#1 and D#4 quarantined after 3 attempts; B#2 and D#5 held behind them, untouched
    assert_eq!(
        summary,
        vec![
            ("B".to_string(), 3, true),
            ("B".to_string(), 0, false),
            ("D".to_string(), 3, true),
            ("D".to_string(), 0, false),
        ]
    );
    let errors: Vec<String> = rows
        .iter()
        .filter_map(|r| r.get::<_, Option<String>>(2))
        .collect();
    assert!(errors[0].contains("WRONGTYPE"), "{errors:?}");
    assert!(errors[1].contains("unusable topic"), "{errors:?}");
    let fine: Vec<String> = streams
        .entries("fine")
        .await
        .iter()
        .map(|e| e.1["subject"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        fine,
        vec!["A", "C"],
        "other aggregates flow past the quarantined rows"
    );

    // status shows the quarantined rows and the backlog
    let (code, out, err) = run_bin(
        &["--config", cfg.to_str().unwrap(), "status", "--json"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value =
        serde_json::from_str(out.trim()).expect("status --json is one JSON object");
    let outbox = &status["outboxes"][0];
    assert_eq!(outbox["database"], "main");
    assert_eq!(outbox["table"], "outbox");
    assert_eq!(outbox["backlog_rows"], 4);
    assert_eq!(outbox["quarantined_rows"], 2);
    assert_eq!(outbox["held_back_rows"], 0);
    assert!(outbox["oldest_age_seconds"].as_f64().unwrap() >= 0.0);
}

#[tokio::test]
async fn a_large_held_back_head_takes_the_sql_head_check_and_others_flow() {
    // More than 20,000 rows wait behind a quarantined row at the head of the table, so the
    // head-of-aggregate check runs as one SQL statement instead of in the relay.
    let (db, streams, cfg) = migrated("big_gap").await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO outbox (topic, aggregate_id, payload) VALUES ('fulfillment.status_changed', 'H', '{\"agg\":\"H\",\"seq\":-1}');
             UPDATE outbox SET quarantined_at = now(), attempts = 5;",
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO outbox (topic, aggregate_id, payload)
             SELECT $1, 'H', jsonb_build_object('agg', 'H', 'seq', g) FROM generate_series(1, 20001) g ORDER BY g",
            &[&TOPIC],
        )
        .await
        .unwrap();
    insert_rows(&client, TOPIC, 100, 10).await;
    let (code, out, err) = run_bin(&["--config", cfg.to_str().unwrap(), "relay", "--once"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("100 rows in"), "{out}");
    let entries = streams.entries(TOPIC).await;
    assert_eq!(check_stream(&entries, 100), 0);
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM outbox WHERE aggregate_id = 'H'"
        )
        .await,
        20_002
    );
}

#[tokio::test]
async fn relay_once_wait_held_waits_for_the_open_transaction() {
    let (db, streams, cfg) = migrated("wait_held").await;
    let holder = db.client().await;
    holder.batch_execute("BEGIN").await.unwrap();
    holder
        .execute("INSERT INTO outbox (topic, aggregate_id, payload) VALUES ($1, 'W', '{\"agg\":\"W\",\"seq\":0}')", &[&TOPIC])
        .await
        .unwrap();
    let other = db.client().await;
    other
        .execute("INSERT INTO outbox (topic, aggregate_id, payload) VALUES ($1, 'W', '{\"agg\":\"W\",\"seq\":1}')", &[&TOPIC])
        .await
        .unwrap();
    let path = cfg.to_str().unwrap().to_string();
    let relay = tokio::task::spawn_blocking(move || {
        run_bin(
            &["--config", &path, "relay", "--once", "--wait-held", "20s"],
            &[],
        )
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    holder.batch_execute("COMMIT").await.unwrap();
    let (code, out, err) = relay.await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("2 rows in"),
        "the held rows were published once released: {out}"
    );
    assert!(out.contains("0 held back"), "{out}");
    let seqs: Vec<i64> = streams
        .entries(TOPIC)
        .await
        .iter()
        .map(|e| e.1["data"]["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, vec![0, 1]);
}

#[tokio::test]
async fn partitioned_topic_keeps_each_aggregate_in_one_ordered_stream_and_consumers_read_all() {
    let db = TestDb::new("parts").await;
    let streams = TestStreams::new("parts");
    let text = format!(
        r#"
[redis]
url = "{redis}"
stream_prefix = "{prefix}"
[databases.main]
url = "{url}"
[[relays]]
database = "main"
batch_size = 100
[[consumers]]
name = "ledger"
database = "main"
streams = ["{TOPIC}"]
handler = "sql"
function = "count_event"
claim_idle_ms = 200
[[topics]]
name = "{TOPIC}"
partitions = 4
[http]
listen = ""
"#,
        redis = redis_url(),
        prefix = streams.prefix,
        url = db.url
    );
    let cfg = write_config("parts", &text);
    outboxd(&cfg, &["migrate"]);
    let client = db.client().await;
    create_ledger(&client).await;
    insert_rows(&client, TOPIC, 3000, 60).await;
    let out = outboxd(&cfg, &["relay", "--once"]);
    assert!(out.contains("3000 rows in"), "{out}");

    let mut partition_of_aggregate = std::collections::HashMap::new();
    let mut total = 0;
    for p in 0..4u32 {
        let entries = streams.entries(&format!("{TOPIC}:{p}")).await;
        assert!(!entries.is_empty(), "partition {p} is used");
        let mut last_seq = std::collections::HashMap::new();
        for (id, env) in &entries {
            let agg = env["subject"].as_str().unwrap().to_string();
            assert_eq!(
                outboxd::redis_io::partition_of(&agg, 4),
                p,
                "stable hash of the aggregate"
            );
            let prev = partition_of_aggregate.insert(agg.clone(), p);
            assert!(
                prev.is_none_or(|q| q == p),
                "{agg} appears in two partitions"
            );
            let seq = env["data"]["seq"].as_i64().unwrap();
            if let Some(prev) = last_seq.insert(agg.clone(), seq) {
                assert!(
                    seq > prev,
                    "{agg}: seq {seq} (entry {id}) after {prev} in partition {p}"
                );
            }
        }
        total += entries.len();
    }
    assert_eq!(total, 3000);
    assert_eq!(partition_of_aggregate.len(), 60);
    assert!(
        streams.entries(TOPIC).await.is_empty(),
        "nothing on the unpartitioned key"
    );

    let out = outboxd(&cfg, &["consume", "--once"]);
    assert!(out.contains("3000 applied"), "{out}");
    assert_eq!(count(&client, "SELECT count(*) FROM ledger").await, 3000);
    assert_eq!(
        count(&client, "SELECT max(applications)::bigint FROM ledger").await,
        1
    );
    let status: serde_json::Value =
        serde_json::from_str(outboxd(&cfg, &["status", "--json"]).trim()).unwrap();
    let keys: Vec<String> = status["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["stream"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(keys.len(), 4, "{keys:?}");
    assert!(keys.iter().all(|k| k.starts_with(&streams.key(TOPIC))));
}

#[tokio::test]
async fn four_relays_and_three_consumers_keep_order_and_apply_once() {
    let db = TestDb::new("many").await;
    let streams = TestStreams::new("many");
    let text = format!(
        r#"
[redis]
url = "{redis}"
stream_prefix = "{prefix}"
[databases.main]
url = "{url}"
[[relays]]
database = "main"
batch_size = 200
poll_interval_ms = 50
[[consumers]]
name = "ledger"
database = "main"
streams = ["{TOPIC}"]
handler = "sql"
function = "count_event"
batch_size = 100
claim_idle_ms = 500
block_ms = 200
[http]
listen = ""
"#,
        redis = redis_url(),
        prefix = streams.prefix,
        url = db.url
    );
    let cfg = write_config("many", &text);
    outboxd(&cfg, &["migrate"]);
    let client = db.client().await;
    create_ledger(&client).await;
    let dir = cfg.parent().unwrap().to_path_buf();
    let mut procs: Vec<_> = (0..4)
        .map(|i| {
            spawn_bin(
                &["--config", cfg.to_str().unwrap(), "relay"],
                &dir.join(format!("r{i}.log")),
            )
        })
        .chain((0..3).map(|i| {
            spawn_bin(
                &["--config", cfg.to_str().unwrap(), "consume"],
                &dir.join(format!("c{i}.log")),
            )
        }))
        .collect();
    const N: i64 = 20_000;
    insert_rows(&client, TOPIC, N, 200).await;
    wait_until("every event applied", Duration::from_secs(120), || async {
        count(&client, "SELECT count(*) FROM ledger").await == N
    })
    .await;
    for p in &procs {
        sigterm(p);
    }
    for p in procs.iter_mut() {
        assert!(
            p.wait().unwrap().success(),
            "every instance exits 0 on SIGTERM"
        );
    }
    assert_eq!(
        count(&client, "SELECT max(applications)::bigint FROM ledger").await,
        1,
        "each effect exactly once"
    );
    assert_eq!(count(&client, "SELECT count(*) FROM outbox").await, 0);
    let entries = streams.entries(TOPIC).await;
    assert_eq!(
        check_stream(&entries, N),
        0,
        "no crash, so no duplicates; order per aggregate"
    );
}

#[tokio::test]
async fn a_known_stream_replaced_by_another_type_is_caught_and_retried() {
    // the relay skips the type check for keys it has published to; if such a key is later
    // replaced by another type, Redis's refusal undoes the batch and the check comes back
    let (db, streams, cfg) = migrated("retyped").await;
    // with a pool of one connection, so that the refused batch's bookkeeping must reuse the
    // connection it rolled back on
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("[databases.main]\n", "[databases.main]\npool_size = 1\n");
    assert!(text.contains("pool_size = 1"));
    let mut relay = relay_from(&text);
    let client = db.client().await;
    insert_rows(&client, "t", 3, 3).await;
    assert_eq!(relay.run_batch().await.unwrap().published, 3);
    let mut conn = streams.conn().await;
    let _: () = redis::cmd("DEL")
        .arg(streams.key("t"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(streams.key("t"))
        .arg("not a stream")
        .query_async(&mut conn)
        .await
        .unwrap();
    insert_rows(&client, "t", 2, 2).await;
    let outcome = relay.run_batch().await.unwrap();
    assert_eq!((outcome.published, outcome.failed), (0, 2), "{outcome:?}");
    assert_eq!(
        count(&client, "SELECT count(*) FROM outbox WHERE attempts = 1").await,
        2
    );
    let _: () = redis::cmd("DEL")
        .arg(streams.key("t"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(relay.run_batch().await.unwrap().published, 2);
    assert_eq!(count(&client, "SELECT count(*) FROM outbox").await, 0);
}

/// The pipelined relay claims past the batch in flight while batches are whole heads of the
/// table. A row whose transaction began first (lowest id) but commits in the middle of such a
/// run sits below that bound: it must still be published in the same run, not left behind
/// until the run ends.
#[tokio::test]
async fn a_late_commit_below_the_pipelines_bound_is_published_in_the_same_run() {
    let (db, streams, _) = migrated("late").await;
    let client = db.client().await;
    let late = db.client().await;
    late.batch_execute("BEGIN").await.unwrap();
    late.execute(
        "INSERT INTO outbox (topic, aggregate_id, payload) VALUES ($1, 'late', '{\"agg\":\"late\",\"seq\":30000}')",
        &[&TOPIC],
    )
    .await
    .unwrap();
    insert_rows(&client, TOPIC, 30_000, 300).await;
    let (relay, relid) = relay_of_500(&db, &streams, &client).await;
    let never = tokio_util::sync::CancellationToken::new();
    let committer = async {
        wait_until(
            "a few batches on the stream",
            Duration::from_secs(30),
            || async { streams.entries(TOPIC).await.len() >= 2_000 },
        )
        .await;
        late.batch_execute("COMMIT").await.unwrap();
    };
    let mut batches = 0;
    let mut progress = |_: &outboxd::relay::BatchOutcome| batches += 1;
    let (run, ()) = tokio::join!(
        relay.batches_in_flight(relid, &never, None, &mut progress),
        committer
    );
    assert!(batches >= 60, "one run of batches: {batches}");
    assert!(run.error.is_none(), "{:?}", run.error);
    assert_eq!(
        count(&client, "SELECT count(*) FROM outbox").await,
        0,
        "one run published everything, the late row included"
    );
    let entries = streams.entries(TOPIC).await;
    assert_eq!(check_stream(&entries, 30_001), 0, "no duplicates");
}

/// A batch in flight counts the next batch's head of the table in its own transaction (see
/// `Links` in src/relay/batch.rs). A row another session holds just below the next batch
/// must make that count fall short: the next batch then checks its aggregates itself, and the
/// held row's aggregate waits behind it while every other aggregate drains.
#[tokio::test]
async fn a_row_held_by_another_session_below_a_pipelined_batch_holds_back_its_aggregate() {
    let (db, streams, _) = migrated("heldbelow").await;
    let client = db.client().await;
    insert_rows(&client, TOPIC, 30_000, 300).await;
    // another relay's lock on one row a third of the way in
    let holder = db.client().await;
    holder.batch_execute("BEGIN").await.unwrap();
    let held = holder
        .query_one(
            // (not OFFSET ... FOR UPDATE, which locks every row it skips)
            "SELECT id, aggregate_id FROM outbox
             WHERE id = (SELECT id FROM outbox ORDER BY id OFFSET 10000 LIMIT 1) FOR UPDATE",
            &[],
        )
        .await
        .unwrap();
    let (held_id, held_agg): (i64, String) = (held.get(0), held.get(1));
    let behind = count(
        &client,
        &format!(
            "SELECT count(*) FROM outbox WHERE aggregate_id = '{held_agg}' AND id >= {held_id}"
        ),
    )
    .await;
    assert!(
        behind > 10,
        "the held aggregate has rows after the held one: {behind}"
    );

    let (relay, relid) = relay_of_500(&db, &streams, &client).await;
    let never = tokio_util::sync::CancellationToken::new();
    let mut batches = 0;
    let mut progress = |_: &outboxd::relay::BatchOutcome| batches += 1;
    let run = relay
        .batches_in_flight(relid, &never, None, &mut progress)
        .await;
    assert!(run.error.is_none(), "{:?}", run.error);
    assert!(batches >= 40, "batches: {batches}");
    assert_eq!(
        count(&client, "SELECT count(*) FROM outbox").await,
        behind,
        "everything but the held row and the rest of its aggregate was published"
    );

    holder.batch_execute("ROLLBACK").await.unwrap();
    let run = relay
        .batches_in_flight(relid, &never, None, &mut |_| {})
        .await;
    assert!(run.error.is_none(), "{:?}", run.error);
    assert_eq!(count(&client, "SELECT count(*) FROM outbox").await, 0);
    let entries = streams.entries(TOPIC).await;
    assert_eq!(check_stream(&entries, 30_000), 0, "no duplicates");
}

/// A batch's transaction is begun by hand (BEGIN travels with the claim). When such a
/// transaction is dropped unfinished, its connection must not go back to the pool with the
/// transaction still open.
#[tokio::test]
async fn an_unfinished_transaction_never_returns_to_the_pool() {
    let (db, _streams, cfg) = migrated("opentx").await;
    let config = Config::load(Some(&cfg), &Default::default(), &[]).unwrap();
    let pool = outboxd::db::pools(&config).unwrap().remove("main").unwrap();
    {
        let tx = outboxd::db::OpenTransaction::new(pool.get().await.unwrap());
        tx.client()
            .batch_execute(
                "BEGIN; INSERT INTO outbox (topic, aggregate_id, payload) VALUES ('t', 'a', '{}')",
            )
            .await
            .unwrap();
    }
    let client = pool.get().await.unwrap();
    let in_transaction: bool = client
        .query_one("SELECT txid_current_if_assigned() IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        !in_transaction,
        "a pooled connection was still in a transaction"
    );
    assert_eq!(
        count(&db.client().await, "SELECT count(*) FROM outbox").await,
        0,
        "the unfinished transaction rolled back"
    );
    let tx = outboxd::db::OpenTransaction::new(client);
    tx.client()
        .batch_execute(
            "BEGIN; INSERT INTO outbox (topic, aggregate_id, payload) VALUES ('t', 'a', '{}')",
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        count(&db.client().await, "SELECT count(*) FROM outbox").await,
        1
    );
}

/// SIGTERM in the middle of a drain: the relay daemon finishes and commits the batches in
/// hand (two while it pipelines) and exits 0. Had it given up a batch after its XADDs, those
/// rows would be published again by the next relay: so a clean stop leaves no duplicate.
#[tokio::test]
async fn sigterm_mid_drain_commits_the_batches_in_hand_and_exits_0() {
    let (db, streams, _) = migrated("relayterm").await;
    let client = db.client().await;
    const N: i64 = 60_000;
    insert_rows(&client, TOPIC, N, 200).await;
    let cfg = write_config(
        "relayterm",
        &relay_config(&db.url, &streams.prefix, "batch_size = 200"),
    );
    let mut relay = spawn_bin(
        &["--config", cfg.to_str().unwrap(), "relay"],
        &cfg.parent().unwrap().join("relay.log"),
    );
    wait_until(
        "the drain is under way",
        Duration::from_secs(60),
        || async { streams.len(TOPIC).await >= 4_000 },
    )
    .await;
    sigterm(&relay);
    let stopped = std::time::Instant::now();
    let status = loop {
        if let Some(status) = relay.try_wait().unwrap() {
            break status;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(10),
            "relay still running 10 s after SIGTERM (shutdown timeout)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit 0 on SIGTERM: {status:?}");
    let left = count(&client, "SELECT count(*) FROM outbox").await;
    assert!(left > 0, "stopped mid-drain, not at the end");
    let published = streams.entries(TOPIC).await.len() as i64;
    assert_eq!(
        published + left,
        N,
        "every row deleted is on the stream, every row on the stream is deleted"
    );
    let (code, _, err) = run_bin(&["--config", cfg.to_str().unwrap(), "relay", "--once"], &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        check_stream(&streams.entries(TOPIC).await, N),
        0,
        "no duplicates"
    );
}

/// Per-aggregate order rests on ids following the order they are handed out in; a sequence
/// that caches ids per session breaks that. The relay refuses to run on one, and says how to
/// fix it.
#[tokio::test]
async fn a_sequence_that_caches_ids_is_refused_with_the_fix() {
    let (db, _streams, cfg) = migrated("seqcache").await;
    let client = db.client().await;
    client
        .batch_execute("INSERT INTO outbox (topic, aggregate_id, payload) VALUES ('t', 'a', '{}')")
        .await
        .unwrap();
    let sequence: String = client
        .query_one("SELECT pg_get_serial_sequence('outbox', 'id')", &[])
        .await
        .unwrap()
        .get(0);
    client
        .batch_execute(&format!("ALTER SEQUENCE {sequence} CACHE 20"))
        .await
        .unwrap();
    let (code, _, err) = run_bin(&["--config", cfg.to_str().unwrap(), "relay", "--once"], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("caches 20 ids") && err.contains("CACHE 1"),
        "{err}"
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM outbox").await,
        1,
        "nothing published"
    );
    client
        .batch_execute(&format!("ALTER SEQUENCE {sequence} CACHE 1"))
        .await
        .unwrap();
    let (code, _, err) = run_bin(&["--config", cfg.to_str().unwrap(), "relay", "--once"], &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(count(&client, "SELECT count(*) FROM outbox").await, 0);
}

/// Issue #17: a batch's entries of one stream key used to go out as separate pipelined
/// `XADD`s, which Redis answers one by one. An early one refused for a passing reason (here
/// the key briefly holding another type; after a restart, `LOADING` while Redis reads its
/// AOF) while a later one of the same aggregate lands put the later event on the stream
/// first. The proxy tries that interleaving on purpose: it holds the relay's publish write
/// and lets its commands through one at a time, the key switching between a string and
/// nothing before each, a string for the last; the rows then land after it is free again.
/// Judged by first occurrences, as a deduplicating consumer applies them.
#[tokio::test]
async fn an_entry_refused_mid_batch_is_never_overtaken_by_a_later_one_of_its_aggregate() {
    let (db, streams, cfg) = migrated("overtake").await;
    let proxy = proxy::FaultProxy::start(redis_port());
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(&redis_url(), &proxy.redis_url());
    let cfg = write_config("overtake", &text);
    let client = db.client().await;
    // 12 rows of 3 aggregates, all on one stream key
    insert_rows(&client, "t", 12, 3).await;

    // the type check's write is small; the publish write carries 12 envelopes
    proxy.hold_next_write(2000);
    let args = ["--config", cfg.to_str().unwrap(), "relay", "--once"];
    let relay = std::thread::spawn({
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_bin(&args, &[])
        }
    });
    proxy.wait_held(Duration::from_secs(60));
    let mut conn = streams.conn().await;
    let mut passed = 0;
    let mut held = usize::MAX;
    while held > 0 {
        let flip = if passed % 2 == 0 || held == 1 {
            let mut set = redis::cmd("SET");
            set.arg(streams.key("t")).arg("briefly not a stream");
            set
        } else {
            let mut del = redis::cmd("DEL");
            del.arg(streams.key("t"));
            del
        };
        let _: () = flip.query_async(&mut conn).await.unwrap();
        held = proxy.pass_one_command(Duration::from_secs(30));
        passed += 1;
    }
    assert!(passed > 2, "the publish went out as {passed} command(s)");
    let _: () = redis::cmd("DEL")
        .arg(streams.key("t"))
        .query_async(&mut conn)
        .await
        .unwrap();
    proxy.thaw();
    let (code, out, err) = relay.join().unwrap();
    assert_eq!(code, 0, "{out}{err}");
    // the held publish was refused (its rows charged) and published again
    assert!(
        !out.contains(" 0 failed") && out.contains(" failed"),
        "the refused publish was not seen: {out}"
    );

    assert_eq!(count(&client, "SELECT count(*) FROM outbox").await, 0);
    // every row published, each aggregate's first occurrences in outbox order
    check_stream(&streams.entries("t").await, 12);
}
