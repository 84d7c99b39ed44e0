//! PostgreSQL failover (SPEC section 7, issue "scale out"): a primary with a synchronous
//! streaming standby (`pg_basebackup -R`), outboxd configured with a multi-host URL and
//! `target_session_attrs=read-write`. The primary dies (`-m immediate`) while producers and
//! the daemon are busy, the standby is promoted, and outboxd must carry on against the new
//! primary with nothing lost and nothing applied twice.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::workload::{seed, Setup};
use common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_follows_a_promoted_standby_without_loss_or_doubles() {
    let primary = PrivatePg::start(&[]);
    primary.create_db("fulfillment").await;
    primary.create_db("orders").await;
    let redis = PrivateRedis::start();
    let both = |standby: u16, db: &str| {
        format!(
            "postgres://root@127.0.0.1:{},127.0.0.1:{standby}/{db}?target_session_attrs=read-write",
            primary.port
        )
    };
    // the standby's port is known only once it exists; migrate and prepare on the primary
    let mut setup = Setup {
        fulfillment_url: primary.url("fulfillment"),
        orders_url: primary.url("orders"),
        redis_url: redis.url(),
        redis_cluster: Vec::new(),
        prefix: format!("{}:", unique("failover")),
        orders: 300,
        partitions: 0,
    };
    let redis_toml = format!("url = \"{}\"", redis.url());
    outboxd(
        &write_config("failover_m", &setup.config(&redis_toml, "")),
        &["migrate"],
    );
    setup.prepare().await;

    let standby = PrivatePg::standby_of(&primary);
    // from here on every commit waits for the standby: what was acknowledged survives
    let admin = pg_connect(&primary.url("postgres")).await;
    admin
        .batch_execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
        .await
        .unwrap();
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    setup.fulfillment_url = both(standby.port, "fulfillment");
    setup.orders_url = both(standby.port, "orders");
    let cfg = write_config("failover", &setup.config(&redis_toml, ""));
    let mut daemon = spawn_bin(
        &["--config", cfg.to_str().unwrap(), "run"],
        &cfg.parent().unwrap().join("run.log"),
    );
    let seed = seed("OUTBOXD_FAILOVER_SEED");
    let producers = setup.start_producers(seed, 8);
    tokio::time::sleep(Duration::from_secs(3)).await;
    primary.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    standby.promote();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let committed = producers.stop().await;

    let settled = setup.wait_settled(Duration::from_secs(90)).await;
    let log = || std::fs::read_to_string(cfg.parent().unwrap().join("run.log")).unwrap_or_default();
    assert!(
        daemon.try_wait().unwrap().is_none(),
        "the daemon rode it out:\n{}",
        log()
    );
    let settled = settled.unwrap_or_else(|state| panic!("not settled: {state}\n{}", log()));
    // the multi-host URL now lands on the promoted standby
    let port: i32 = workload_port(&setup.orders_url).await;
    assert_eq!(port, standby.port as i32);
    sigterm(&daemon);
    assert!(daemon.wait().unwrap().success());
    let verdict = setup.verify(committed).await;
    assert!(verdict.events > 0);
    println!(
        "failover: {} events ({committed} acknowledged to producers), {} stream duplicates, settled {settled:.1} s after the producers stopped",
        verdict.events, verdict.duplicates
    );
}

async fn workload_port(url: &str) -> i32 {
    common::workload::reconnect(url)
        .await
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0)
}
