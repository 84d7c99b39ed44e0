//! The relay at scale against real PostgreSQL and Redis: the resume point (claims start
//! after the last id known settled) under the transactions that could break it, and several
//! relay daemons on one outbox (one active, the others standing by) joining, leaving, being
//! killed and being frozen.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const TOPIC: &str = "fulfillment.status_changed";
const ACTIVE: &str = "this relay is the active one for its outbox";

async fn migrated(tag: &str, extra: &str) -> (TestDb, TestStreams, std::path::PathBuf) {
    let db = TestDb::new(tag).await;
    let streams = TestStreams::new(tag);
    let cfg = write_config(tag, &relay_config(&db.url, &streams.prefix, extra));
    let (code, out, err) = run_bin(&["--config", cfg.to_str().unwrap(), "migrate"], &[]);
    assert_eq!(code, 0, "migrate failed: {out}{err}");
    (db, streams, cfg)
}

/// One row of aggregate `agg` with payload seq `seq` (what `check_stream` reads).
async fn insert_one(client: &tokio_postgres::Client, agg: &str, seq: i64) {
    client
        .execute(
            "INSERT INTO outbox (topic, aggregate_id, payload)
             VALUES ($1, $2, jsonb_build_object('agg', $2::text, 'seq', $3::bigint))",
            &[&TOPIC, &agg, &seq],
        )
        .await
        .unwrap();
}

/// Rows `from..to` (payload seq), aggregates `agg-(seq % aggregates)`, in chunks of 500 rows
/// per transaction; every fourth chunk's transaction first takes ids and rolls them back, so
/// the id sequence has gaps.
async fn insert_with_gaps(client: &tokio_postgres::Client, from: i64, to: i64, aggregates: i64) {
    let mut start = from;
    let mut chunk = 0;
    while start < to {
        let end = (start + 500).min(to);
        if chunk % 4 == 3 {
            client.batch_execute("BEGIN").await.unwrap();
            client
                .execute(
                    "INSERT INTO outbox (topic, aggregate_id, payload)
                     SELECT $1, 'gap', '{}' FROM generate_series(1, 37)",
                    &[&TOPIC],
                )
                .await
                .unwrap();
            client.batch_execute("ROLLBACK").await.unwrap();
        }
        client
            .execute(
                "INSERT INTO outbox (topic, aggregate_id, payload)
                 SELECT $1, 'agg-' || (g % $4), jsonb_build_object('agg', 'agg-' || (g % $4), 'seq', g)
                 FROM generate_series($2::bigint, $3::bigint - 1) g ORDER BY g",
                &[&TOPIC, &start, &end, &aggregates],
            )
            .await
            .unwrap();
        start = end;
        chunk += 1;
    }
}

fn relay(cfg: &std::path::Path, log: &std::path::Path) -> Child {
    spawn_bin(&["--config", cfg.to_str().unwrap(), "relay"], log)
}

fn log_of(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn signal(child: &Child, sig: &str) {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
}

/// The backend pids holding the outbox's active lock (see src/relay/active.rs).
async fn active_holders(client: &tokio_postgres::Client) -> Vec<i32> {
    client
        .query(
            "SELECT l.pid FROM pg_locks l
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
               AND l.classid = $1::int::oid AND l.objid = 'outbox'::regclass::oid
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[&outboxd::relay::active::ACTIVE_LOCK_CLASS],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Which of the relays' logs say they are active now (the last word of each on it).
fn active_ones(logs: &[std::path::PathBuf]) -> Vec<usize> {
    logs.iter()
        .enumerate()
        .filter(|(_, p)| {
            let log = log_of(p);
            let took = log.rfind(ACTIVE);
            let lost = log
                .rfind("standing by")
                .max(log.rfind("lost the relay's active lock"));
            took.is_some() && took > lost
        })
        .map(|(i, _)| i)
        .collect()
}

#[tokio::test]
async fn a_producer_transaction_open_across_the_resume_point_commits_its_row_in_order() {
    let (db, streams, cfg) =
        migrated("resume_open", "batch_size = 100\npoll_interval_ms = 50").await;
    let client = db.client().await;
    let holder = db.client().await;
    let dir = cfg.parent().unwrap().to_path_buf();
    let mut relay = relay(&cfg, &dir.join("relay.log"));

    // The holder takes the lowest id and stays open while 5,000 later rows of other
    // aggregates are drained in 50 whole-head batches: a resume point that moved past the
    // holder's id would never look there again (until a rescan).
    holder.batch_execute("BEGIN").await.unwrap();
    insert_one(&holder, "held", 0).await;
    insert_with_gaps(&client, 1, 5001, 50).await;
    wait_until(
        "the other rows drained",
        Duration::from_secs(60),
        || async { streams.len(TOPIC).await >= 5000 },
    )
    .await;
    // The holder commits, and at once a later row of its aggregate: if the claim started
    // after the holder's id, that later row would be published first.
    holder.batch_execute("COMMIT").await.unwrap();
    insert_one(&client, "held", 5001).await;
    let committed = Instant::now();
    wait_until(
        "the late rows published",
        Duration::from_secs(30),
        || async { streams.len(TOPIC).await >= 5002 },
    )
    .await;
    // well within the 10 s rescan: found by the claim itself, not by the safety net
    assert!(
        committed.elapsed() < Duration::from_secs(8),
        "the late commit took {:?}",
        committed.elapsed()
    );
    let entries = streams.entries(TOPIC).await;
    let held: Vec<i64> = entries
        .iter()
        .filter(|(_, e)| e["data"]["agg"] == "held")
        .map(|(_, e)| e["data"]["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(held, [0, 5001], "the held aggregate in order");
    assert_eq!(check_stream(&entries, 5002), 0);
    sigterm(&relay);
    assert!(relay.wait().unwrap().success());
}

#[tokio::test]
async fn long_drains_with_id_gaps_and_producers_writing_lose_nothing_and_keep_order() {
    let (db, streams, cfg) =
        migrated("resume_gaps", "batch_size = 200\npoll_interval_ms = 50").await;
    let client = db.client().await;
    let dir = cfg.parent().unwrap().to_path_buf();
    // a backlog with gaps in its ids, drained by `relay --once` ...
    insert_with_gaps(&client, 0, 20_000, 300).await;
    let out = outboxd(&cfg, &["relay", "--once"]);
    assert!(out.contains("20000 rows"), "{out}");
    // ... then a daemon while producers keep writing, some of them holding their
    // transactions open across many batches, and an operator's `relay --once` beside it
    let mut relay = relay(&cfg, &dir.join("relay.log"));
    let slow = db.client().await;
    let mut next = 20_000;
    for round in 0..6 {
        slow.batch_execute("BEGIN").await.unwrap();
        insert_one(&slow, &format!("agg-{}", next % 300), next).await;
        next += 1;
        insert_with_gaps(&client, next, next + 2000, 300).await;
        next += 2000;
        if round == 3 {
            let out = outboxd(&cfg, &["relay", "--once"]);
            assert!(out.contains("relay main.outbox"), "{out}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        slow.batch_execute("COMMIT").await.unwrap();
    }
    wait_until("everything published", Duration::from_secs(90), || async {
        count(&client, "SELECT count(*) FROM outbox").await == 0
    })
    .await;
    let entries = streams.entries(TOPIC).await;
    check_stream(&entries, next);
    sigterm(&relay);
    assert!(relay.wait().unwrap().success());
}

#[tokio::test]
async fn an_id_sequence_reset_below_the_resume_point_is_noticed() {
    let (db, streams, cfg) =
        migrated("resume_reset", "batch_size = 100\npoll_interval_ms = 50").await;
    let client = db.client().await;
    let dir = cfg.parent().unwrap().to_path_buf();
    let mut relay = relay(&cfg, &dir.join("relay.log"));
    insert_with_gaps(&client, 0, 3000, 30).await;
    wait_until("first rows drained", Duration::from_secs(60), || async {
        count(&client, "SELECT count(*) FROM outbox").await == 0
    })
    .await;
    // ids start again from 1, all far below the resume point
    client
        .batch_execute("TRUNCATE outbox RESTART IDENTITY")
        .await
        .unwrap();
    insert_with_gaps(&client, 3000, 3500, 30).await;
    wait_until(
        "rows below the resume point published (a rescan is due every 10 s)",
        Duration::from_secs(40),
        || async { count(&client, "SELECT count(*) FROM outbox").await == 0 },
    )
    .await;
    check_stream(&streams.entries(TOPIC).await, 3500);
    sigterm(&relay);
    assert!(relay.wait().unwrap().success());
    assert!(
        log_of(&dir.join("relay.log")).contains("at or below the relay's resume point"),
        "the reset is logged"
    );
}

#[tokio::test]
async fn one_of_several_relays_is_active_and_a_killed_one_is_replaced_within_seconds() {
    let (db, streams, cfg) =
        migrated("standby_kill", "batch_size = 200\npoll_interval_ms = 50").await;
    let client = db.client().await;
    let dir = cfg.parent().unwrap().to_path_buf();
    let logs: Vec<_> = (0..3).map(|i| dir.join(format!("relay{i}.log"))).collect();
    let mut relays: Vec<Option<Child>> = logs.iter().map(|l| Some(relay(&cfg, l))).collect();
    wait_until("one relay active", Duration::from_secs(30), || async {
        active_ones(&logs).len() == 1 && active_holders(&client).await.len() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        active_ones(&logs).len(),
        1,
        "still one: {:?}",
        active_ones(&logs)
    );
    for (i, log) in logs.iter().enumerate() {
        if !active_ones(&logs).contains(&i) {
            assert!(
                log_of(log).contains("standing by"),
                "relay {i}: {}",
                log_of(log)
            );
        }
    }

    // A drain the active relay is killed in the middle of, twice; producers keep writing.
    let mut next = 0;
    let mut dead: Vec<usize> = Vec::new();
    for kill in 0..2 {
        insert_with_gaps(&client, next, next + 15_000, 200).await;
        next += 15_000;
        let target = streams.len(TOPIC).await + 3000;
        wait_until("the drain under way", Duration::from_secs(60), || async {
            streams.len(TOPIC).await >= target
        })
        .await;
        let victim = active_ones(&logs)
            .into_iter()
            .find(|i| !dead.contains(i))
            .unwrap();
        sigkill(relays[victim].as_mut().unwrap());
        relays[victim] = None;
        let killed = Instant::now();
        dead.push(victim);
        wait_until("a standby took over", Duration::from_secs(20), || async {
            let now: Vec<usize> = active_ones(&logs)
                .into_iter()
                .filter(|i| !dead.contains(i))
                .collect();
            now.len() == 1 && now[0] != victim
        })
        .await;
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "takeover {kill} took {:?}",
            killed.elapsed()
        );
        wait_until(
            "drained after the takeover",
            Duration::from_secs(60),
            || async { count(&client, "SELECT count(*) FROM outbox").await == 0 },
        )
        .await;
        assert_eq!(active_holders(&client).await.len(), 1);
    }
    // one relay joins again; still exactly one active, and it keeps working
    relays.push(Some(relay(&cfg, &dir.join("relay3.log"))));
    insert_with_gaps(&client, next, next + 2000, 200).await;
    next += 2000;
    wait_until("drained", Duration::from_secs(60), || async {
        count(&client, "SELECT count(*) FROM outbox").await == 0
    })
    .await;
    assert_eq!(active_holders(&client).await.len(), 1);
    let duplicates = check_stream(&streams.entries(TOPIC).await, next);
    assert!(
        duplicates <= 2 * 2 * 200,
        "at most the batches in flight of each kill: {duplicates}"
    );
    for r in relays.iter_mut().flatten() {
        sigterm(r);
        assert!(r.wait().unwrap().success());
    }
}

#[tokio::test]
async fn a_frozen_active_relay_loses_its_lock_and_a_standby_drains() {
    let (db, streams, cfg) =
        migrated("standby_frozen", "batch_size = 200\npoll_interval_ms = 50").await;
    let client = db.client().await;
    let dir = cfg.parent().unwrap().to_path_buf();
    let logs: Vec<_> = (0..2).map(|i| dir.join(format!("relay{i}.log"))).collect();
    let ports = [free_port(), free_port()];
    let mut relays: Vec<Child> = logs
        .iter()
        .zip(ports)
        .map(|(log, port)| {
            spawn_bin(
                &[
                    "--config",
                    cfg.to_str().unwrap(),
                    "--http-listen",
                    &format!("127.0.0.1:{port}"),
                    "relay",
                ],
                log,
            )
        })
        .collect();
    wait_until("one relay active", Duration::from_secs(30), || async {
        active_ones(&logs).len() == 1
    })
    .await;
    let frozen = active_ones(&logs)[0];
    // the gauge says the same as the logs: 1 in the active process, 0 in the standby
    for (i, port) in ports.iter().enumerate() {
        let expected = if i == frozen { "1" } else { "0" };
        let series =
            format!("outboxd_relay_active{{database=\"main\",table=\"outbox\"}} {expected}\n");
        wait_until(
            &format!("relay {i} exports {series}"),
            Duration::from_secs(30),
            || async {
                tokio::net::TcpStream::connect(("127.0.0.1", *port))
                    .await
                    .is_ok()
                    && http_get(*port, "/metrics").await.contains(&series)
            },
        )
        .await;
    }
    signal(&relays[frozen], "STOP");
    let stopped = Instant::now();
    insert_with_gaps(&client, 0, 5000, 100).await;
    wait_until(
        "the standby drained while the active one is frozen",
        Duration::from_secs(40),
        || async { count(&client, "SELECT count(*) FROM outbox").await == 0 },
    )
    .await;
    // the holder's session ends 5 s after its last heartbeat; the standby tries every second
    assert!(
        stopped.elapsed() < Duration::from_secs(25),
        "took {:?}",
        stopped.elapsed()
    );
    // thawed, the old one finds its lock gone and stands by; work goes on in order
    signal(&relays[frozen], "CONT");
    wait_until(
        "the thawed relay stands by",
        Duration::from_secs(30),
        || async { log_of(&logs[frozen]).contains("lost the relay's active lock") },
    )
    .await;
    insert_with_gaps(&client, 5000, 8000, 100).await;
    wait_until("drained", Duration::from_secs(60), || async {
        count(&client, "SELECT count(*) FROM outbox").await == 0
    })
    .await;
    assert_eq!(active_holders(&client).await.len(), 1);
    check_stream(&streams.entries(TOPIC).await, 8000);
    for r in relays.iter_mut() {
        sigterm(r);
        assert!(r.wait().unwrap().success());
    }
}

/// The backend pids connected to the test's database, this session's aside.
async fn backends(client: &tokio_postgres::Client) -> std::collections::BTreeSet<i32> {
    client
        .query(
            "SELECT pid FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// A standby holds one connection, the same one from try to try: no LISTEN connection, no
/// pooled one, and no new backend a second.
#[tokio::test]
async fn a_standby_holds_one_connection_and_keeps_it_between_tries() {
    let (db, _streams, cfg) = migrated("standby_conn", "poll_interval_ms = 50").await;
    let client = db.client().await;
    let dir = cfg.parent().unwrap().to_path_buf();
    let (log_a, log_b) = (dir.join("a.log"), dir.join("b.log"));
    let mut a = relay(&cfg, &log_a);
    wait_until(
        "the first relay active",
        Duration::from_secs(30),
        || async { log_of(&log_a).contains(ACTIVE) && active_holders(&client).await.len() == 1 },
    )
    .await;
    // the active relay's own connections settle (pool, LISTEN, lock)
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = backends(&client).await;
    let mut b = relay(&cfg, &log_b);
    wait_until(
        "the second relay standing by",
        Duration::from_secs(30),
        || async { log_of(&log_b).contains("standing by") },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let first: Vec<i32> = backends(&client)
        .await
        .difference(&before)
        .copied()
        .collect();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let later: Vec<i32> = backends(&client)
        .await
        .difference(&before)
        .copied()
        .collect();
    signal(&b, "TERM");
    signal(&a, "TERM");
    assert!(b.wait().unwrap().success());
    assert!(a.wait().unwrap().success());
    assert_eq!(first.len(), 1, "the standby's backends: {first:?}");
    assert_eq!(
        first, later,
        "the standby kept its connection across its tries"
    );
    assert!(!log_of(&log_b).contains(ACTIVE), "{}", log_of(&log_b));
}

#[tokio::test]
async fn with_standby_off_every_relay_drains_and_none_takes_the_lock() {
    let (db, streams, cfg) = migrated(
        "standby_off",
        "batch_size = 100\npoll_interval_ms = 50\nstandby = false",
    )
    .await;
    let client = db.client().await;
    let dir = cfg.parent().unwrap().to_path_buf();
    let logs: Vec<_> = (0..2).map(|i| dir.join(format!("relay{i}.log"))).collect();
    let mut relays: Vec<Child> = logs.iter().map(|l| relay(&cfg, l)).collect();
    insert_with_gaps(&client, 0, 6000, 100).await;
    wait_until("drained", Duration::from_secs(60), || async {
        count(&client, "SELECT count(*) FROM outbox").await == 0
    })
    .await;
    assert!(active_holders(&client).await.is_empty());
    check_stream(&streams.entries(TOPIC).await, 6000);
    for (r, log) in relays.iter_mut().zip(&logs) {
        sigterm(r);
        assert!(r.wait().unwrap().success());
        let log = log_of(log);
        assert!(log.contains("relay started"), "{log}");
        assert!(
            !log.contains(ACTIVE) && !log.contains("standing by"),
            "{log}"
        );
    }
}
