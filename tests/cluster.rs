//! Redis Cluster: a three-master cluster started by the test, the relay publishing a
//! partitioned topic whose partition streams spread over the shards, two consumers reading
//! them (one SIGKILLed mid-batch and restarted), and every effect exactly once and in order.
//! The operator commands work against the cluster too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::workload::{seed, Setup};
use common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_topic_over_a_cluster_is_applied_exactly_once() {
    let cluster = PrivateRedisCluster::start();
    let fdb = TestDb::new("cluster_f").await;
    let odb = TestDb::new("cluster_o").await;
    let setup = Setup {
        fulfillment_url: fdb.url.clone(),
        orders_url: odb.url.clone(),
        redis_url: String::new(),
        redis_cluster: cluster.urls(),
        prefix: format!("{}:", unique("cluster")),
        orders: 400,
        partitions: 6,
    };
    let cfg = write_config("cluster", &setup.config(&cluster.toml(), ""));
    outboxd(&cfg, &["migrate"]);
    setup.prepare().await;
    let dir = cfg.parent().unwrap();
    let spawn = |cmd: &str, i: usize| {
        spawn_bin(
            &["--config", cfg.to_str().unwrap(), cmd],
            &dir.join(format!("{cmd}{i}.log")),
        )
    };
    let mut procs = vec![
        spawn("relay", 0),
        spawn("relay", 1),
        spawn("consume", 2),
        spawn("consume", 3),
    ];
    let producers = setup.start_producers(seed("OUTBOXD_CLUSTER_SEED"), 6);
    // a consumer dies mid-batch; its pending entries go to the other by XAUTOCLAIM, and it
    // comes back later
    tokio::time::sleep(Duration::from_secs(2)).await;
    sigkill(&mut procs[2]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    procs[2] = spawn("consume", 4);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let committed = producers.stop().await;
    let settled = setup.wait_settled(Duration::from_secs(60)).await;
    for p in &mut procs {
        assert!(p.try_wait().unwrap().is_none(), "a process died");
    }
    let settled = settled.unwrap_or_else(|state| {
        let log = std::fs::read_to_string(dir.join("consume3.log")).unwrap_or_default();
        panic!(
            "not settled: {state}\n{}",
            &log[log.len().saturating_sub(3000)..]
        )
    });

    // operator commands on the cluster
    let status: serde_json::Value =
        serde_json::from_str(outboxd(&cfg, &["status", "--json"]).trim()).unwrap();
    assert!(status.is_object(), "{status}");
    outboxd(&cfg, &["dlq", "list"]);

    for p in &mut procs {
        sigterm(p);
        assert!(p.wait().unwrap().success());
    }
    let verdict = setup.verify(committed).await;
    assert!(verdict.events > 0);
    // the six partition streams (and their neighbours) live on more than one shard
    let per_node = cluster.keys_per_node(&setup.prefix);
    assert!(
        per_node.iter().filter(|&&n| n > 0).count() >= 2,
        "partitions spread over shards: {per_node:?}"
    );
    println!(
        "cluster: {} events over 6 partitions, keys per node {per_node:?}, {} duplicates, settled in {settled:.1} s",
        verdict.events, verdict.duplicates
    );
}
