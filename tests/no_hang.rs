//! No hang (SPEC 7.7, issue #11): a peer that stops answering while its connection stays
//! open must never stall outboxd. A private PostgreSQL and a private Redis sit behind the
//! tests' fault proxy; two `outboxd run` processes of the real binary work through it while
//! producers write. One after another: every Redis connection frozen, every PostgreSQL
//! connection frozen (with `/healthz` failing while a loop is wedged, then recovering), only
//! the LISTEN connections frozen, only the blocking-read connections frozen, Redis at its
//! `maxmemory` with `noeviction`, PostgreSQL refusing writes (read-only), then Redis and
//! PostgreSQL each paused (SIGSTOP) while operator commands run against them. A test of its
//! own freezes one node of a Redis Cluster. Frozen connections stay frozen: outboxd must give
//! them up and make new ones. Each scenario prints the seconds until work resumed (default
//! settings: at most 15 s); afterwards the usual checks prove that nothing was lost, applied
//! twice or reordered.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::proxy::FaultProxy;
use common::workload::{seed, Setup};
use common::*;
use std::time::{Duration, Instant};

/// The bound the SPEC gives (and the defaults must meet): work resumes within 15 s.
const RESUME_WITHIN: Duration = Duration::from_secs(15);

async fn applied(orders: &tokio_postgres::Client) -> i64 {
    count(orders, "SELECT count(*) FROM ledger").await
}

/// Seconds from `fault` until the ledger grows again: first `settle` for the work in flight
/// when the fault struck to finish, then the first application after that.
async fn resumed(orders: &tokio_postgres::Client, fault: Instant, settle: Duration) -> f64 {
    tokio::time::sleep(settle).await;
    let before = applied(orders).await;
    loop {
        if applied(orders).await > before {
            return fault.elapsed().as_secs_f64();
        }
        assert!(
            fault.elapsed() < Duration::from_secs(90),
            "no work resumed within 90 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The client ports (as the server sees them) of the sessions whose current query matches.
async fn pg_client_ports(admin: &tokio_postgres::Client, query_like: &str) -> Vec<u16> {
    admin
        .query(
            "SELECT client_port FROM pg_stat_activity
              WHERE application_name = 'outboxd' AND query LIKE $1 AND client_port IS NOT NULL",
            &[&query_like],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, i32>(0) as u16)
        .collect()
}

/// The client ports of the Redis connections blocked in a command (`flags` has `b`).
async fn redis_blocked_ports(redis_url: &str) -> Vec<u16> {
    let client = redis::Client::open(redis_url).unwrap();
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&test_redis_config())
        .await
        .unwrap();
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut conn)
        .await
        .unwrap();
    list.lines()
        .filter(|l| {
            l.split(' ')
                .any(|f| f.starts_with("flags=") && f.contains('b'))
        })
        .filter_map(|l| {
            let addr = l.split(' ').find_map(|f| f.strip_prefix("addr="))?;
            addr.rsplit(':').next()?.parse().ok()
        })
        .collect()
}

async fn healthz(port: u16) -> String {
    let response = http_get(port, "/healthz").await;
    response.lines().next().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_given_up_and_work_resumes() {
    let seed = seed("OUTBOXD_FAULT_SEED");
    let pg = PrivatePg::start(&[]);
    let redis = PrivateRedis::start();
    let pg_proxy = FaultProxy::start(pg.port);
    let redis_proxy = FaultProxy::start(redis.port);
    let setup = Setup {
        fulfillment_url: pg.create_db("fulfillment").await,
        orders_url: pg.create_db("orders").await,
        redis_url: redis.url(),
        redis_cluster: Vec::new(),
        prefix: format!("{}:", unique("nohang")),
        orders: 1500,
        partitions: 0,
    };
    // outboxd goes through the proxies; the test's own connections do not
    let proxied =
        |url: &str| url.replace(&format!(":{}/", pg.port), &format!(":{}/", pg_proxy.port));
    let via = Setup {
        fulfillment_url: proxied(&setup.fulfillment_url),
        orders_url: proxied(&setup.orders_url),
        ..setup.clone()
    };
    let base = via.config(&format!("url = \"{}\"", redis_proxy.redis_url()), "");
    let http_port = free_port();
    // process A serves /healthz with a watchdog bound below the operations' own bounds, so
    // that a loop waiting on a frozen connection shows as wedged until that bound gives it up
    let watched = base.replace(
        "[http]\nlisten = \"\"",
        &format!("[http]\nlisten = \"127.0.0.1:{http_port}\"\n[watchdog]\nstuck_after_ms = 3500"),
    );
    assert!(watched.contains("stuck_after_ms"), "{watched}");
    let cfg_a = write_config("nohang_a", &watched);
    let cfg_b = write_config("nohang_b", &base);
    outboxd(&cfg_b, &["migrate"]);
    setup.prepare().await;
    let dir = cfg_a.parent().unwrap().to_path_buf();
    let cfg_a_s = cfg_a.to_str().unwrap().to_string();
    let cfg_b_s = cfg_b.to_str().unwrap().to_string();
    let mut a = spawn_bin(&["--config", &cfg_a_s, "run"], &dir.join("a.log"));
    let mut b = spawn_bin(&["--config", &cfg_b_s, "run"], &dir.join("b.log"));
    let producers = setup.start_producers(seed, 150);
    let orders = pg_connect(&setup.orders_url).await;
    let admin = pg_connect(&pg.url("postgres")).await;
    wait_until("work under way", Duration::from_secs(60), || async {
        applied(&orders).await > 20
    })
    .await;
    let mut report: Vec<(&str, f64)> = Vec::new();

    // 1. Every live Redis connection goes silent.
    let fault = Instant::now();
    redis_proxy.freeze();
    report.push((
        "every Redis connection frozen",
        resumed(&orders, fault, Duration::from_millis(1500)).await,
    ));

    // 2. Every live PostgreSQL connection goes silent; process A's /healthz reports the
    //    wedged loops, then recovers.
    // (the bound is above a blocking read's 2 s, below the 5 s query timeout)
    wait_until("/healthz 200 before", Duration::from_secs(20), || async {
        healthz(http_port).await.contains("200")
    })
    .await;
    let fault = Instant::now();
    pg_proxy.freeze();
    let mut saw_unhealthy = false;
    while fault.elapsed() < Duration::from_secs(8) {
        if healthz(http_port).await.contains("503") {
            saw_unhealthy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        saw_unhealthy,
        "/healthz never failed while loops waited on frozen connections"
    );
    report.push((
        "every PostgreSQL connection frozen",
        resumed(&orders, fault, Duration::from_millis(1500)).await,
    ));
    wait_until("/healthz recovers", Duration::from_secs(30), || async {
        healthz(http_port).await.contains("200")
    })
    .await;

    // 3. Only the LISTEN connections: the relays poll meanwhile, and the heartbeat makes
    //    new LISTEN connections.
    wait_until("LISTEN sessions", Duration::from_secs(30), || async {
        !pg_client_ports(&admin, "LISTEN%").await.is_empty()
    })
    .await;
    let listening = pg_client_ports(&admin, "LISTEN%").await;
    let fault = Instant::now();
    for port in &listening {
        assert!(pg_proxy.freeze_upstream_port(*port), "LISTEN port {port}");
    }
    report.push((
        "LISTEN connections frozen",
        resumed(&orders, fault, Duration::from_millis(500)).await,
    ));
    wait_until(
        "new LISTEN connections",
        Duration::from_secs(30),
        || async {
            let now = pg_client_ports(&admin, "LISTEN%").await;
            now.iter().filter(|p| !listening.contains(p)).count() >= listening.len()
        },
    )
    .await;

    // 4. Only the blocking-read connections.
    wait_until("blocked reads", Duration::from_secs(30), || async {
        !redis_blocked_ports(&redis.url()).await.is_empty()
    })
    .await;
    let fault = Instant::now();
    for port in redis_blocked_ports(&redis.url()).await {
        redis_proxy.freeze_upstream_port(port);
    }
    report.push((
        "blocking-read connections frozen",
        resumed(&orders, fault, Duration::from_millis(1500)).await,
    ));

    // 5. Redis refuses writes (maxmemory reached, noeviction) for 4 s, then has room again.
    let mut direct = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&test_redis_config())
        .await
        .unwrap();
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut direct)
        .await
        .unwrap();
    let used: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query_async(&mut direct)
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(used / 2)
        .query_async(&mut direct)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(0)
        .query_async(&mut direct)
        .await
        .unwrap();
    let freed = Instant::now();
    report.push((
        "Redis out of memory for 4 s (from the moment it has room)",
        resumed(&orders, freed, Duration::ZERO).await,
    ));

    // 6. PostgreSQL refuses writes: the orders database turns read-only and every outboxd
    //    session on it is cut, so the new ones land read-only (as on a standby after a
    //    failover moved the address). 4 s later writes are allowed again, but only to new
    //    sessions (a session keeps `default_transaction_read_only` from its start): outboxd
    //    must give up its read-only connections by itself.
    let orders_db = setup.orders_url.rsplit('/').next().unwrap().to_string();
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{orders_db}\" SET default_transaction_read_only = on"
        ))
        .await
        .unwrap();
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = $1 AND application_name = 'outboxd'",
            &[&orders_db],
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let while_read_only = applied(&orders).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        applied(&orders).await,
        while_read_only,
        "nothing is applied while the orders database is read-only"
    );
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{orders_db}\" RESET default_transaction_read_only"
        ))
        .await
        .unwrap();
    let writable = Instant::now();
    report.push((
        "PostgreSQL read-only for 4 s (from the moment it takes writes)",
        resumed(&orders, writable, Duration::ZERO).await,
    ));
    let logs = std::fs::read_to_string(dir.join("a.log")).unwrap()
        + &std::fs::read_to_string(dir.join("b.log")).unwrap();
    assert!(
        logs.contains("read-only transaction"),
        "the warnings name the cause"
    );

    // 7. Redis stops answering altogether (SIGSTOP): operator commands fail within their
    //    bound, naming Redis, instead of hanging; the daemons carry on after SIGCONT.
    redis.pause();
    let started = Instant::now();
    let (code, out, err) = run_bin(&["--config", &cfg_b_s, "status", "--json"], &[]);
    let status_secs = started.elapsed().as_secs_f64();
    assert_eq!(code, 1, "status against a silent Redis: {out}{err}");
    assert!(err.contains("Redis"), "names the server: {err}");
    let started = Instant::now();
    let (code, out, err) = run_bin(
        &[
            "--config",
            &cfg_b_s,
            "relay",
            "--once",
            "--give-up-after",
            "3s",
        ],
        &[],
    );
    let relay_secs = started.elapsed().as_secs_f64();
    assert_eq!(code, 1, "relay --once against a silent Redis: {out}{err}");
    assert!(err.contains("Redis"), "names the server: {err}");
    redis.resume();
    let fault = Instant::now();
    report.push((
        "Redis paused, then resumed",
        resumed(&orders, fault, Duration::ZERO).await,
    ));

    // 8. PostgreSQL stops answering altogether (every process of it SIGSTOPped): operator
    //    commands fail within their bound, naming PostgreSQL; the daemons carry on after
    //    SIGCONT.
    pg.pause();
    let mut pg_commands: Vec<(String, f64)> = Vec::new();
    for args in [
        &["status", "--json"][..],
        &["dlq", "list"][..],
        &["inbox", "prune", "--older-than", "30d"][..],
        &["migrate"][..],
        &["relay", "--once", "--give-up-after", "3s"][..],
        &["consume", "--once", "--give-up-after", "3s"][..],
    ] {
        let started = Instant::now();
        let mut full = vec!["--config", cfg_b_s.as_str()];
        full.extend_from_slice(args);
        let (code, out, err) = run_bin(&full, &[]);
        let secs = started.elapsed().as_secs_f64();
        assert!(secs < 30.0, "{args:?} took {secs:.1} s");
        // `consume --once` touches PostgreSQL only when Redis holds something for it: when
        // the daemons already took every entry (they wait on PostgreSQL too), it has nothing
        // to do and rightly says so. Anything else it does must fail naming PostgreSQL.
        let idle_consume =
            args[0] == "consume" && code == 0 && out.lines().all(|l| l.contains(": 0 events in "));
        if idle_consume {
            pg_commands.push((format!("{} (nothing to do) exit 0", args.join(" ")), secs));
            continue;
        }
        assert_eq!(code, 1, "{args:?} against a silent PostgreSQL: {out}{err}");
        assert!(
            err.contains("PostgreSQL"),
            "{args:?} names the server: {err}"
        );
        pg_commands.push((format!("{} exit 1", args.join(" ")), secs));
    }
    pg.resume();
    let fault = Instant::now();
    report.push((
        "PostgreSQL paused, then resumed",
        resumed(&orders, fault, Duration::ZERO).await,
    ));

    let committed = producers.stop().await;
    assert!(
        a.try_wait().unwrap().is_none(),
        "process A is still running"
    );
    assert!(
        b.try_wait().unwrap().is_none(),
        "process B is still running"
    );
    let settled = setup
        .wait_settled(Duration::from_secs(120))
        .await
        .unwrap_or_else(|state| panic!("not settled within 120 s: {state}"));
    sigterm(&a);
    sigterm(&b);
    assert!(a.wait().unwrap().success(), "A exits 0");
    assert!(b.wait().unwrap().success(), "B exits 0");
    let verdict = setup.verify(committed).await;
    let fulfillment = pg_connect(&setup.fulfillment_url).await;
    assert_eq!(
        count(
            &fulfillment,
            "SELECT count(*) FROM outbox WHERE quarantined_at IS NOT NULL"
        )
        .await,
        0,
        "nothing quarantined"
    );

    for (scenario, secs) in &report {
        println!("no hang: {scenario}: work resumed after {secs:.1} s");
    }
    println!(
        "no hang: operator commands against a paused Redis: status --json exit 1 after \
         {status_secs:.1} s, relay --once --give-up-after 3s exit 1 after {relay_secs:.1} s"
    );
    let pg_commands: Vec<String> = pg_commands
        .iter()
        .map(|(command, secs)| format!("{command} after {secs:.1} s"))
        .collect();
    println!(
        "no hang: operator commands against a paused PostgreSQL: {}",
        pg_commands.join(", ")
    );
    println!(
        "no hang: {} events ({} orders), {} stream duplicates, settled in {settled:.1} s; \
         exactly once: ok; out-of-order entries: {}",
        verdict.events, verdict.orders, verdict.duplicates, verdict.out_of_order
    );
    for (scenario, secs) in &report {
        assert!(
            *secs <= RESUME_WITHIN.as_secs_f64(),
            "{scenario}: work resumed only after {secs:.1} s"
        );
    }
    assert!(status_secs < 30.0, "status took {status_secs:.1} s");
    assert!(relay_secs < 30.0, "relay --once took {relay_secs:.1} s");
}

/// One node of a Redis Cluster goes silent (its live connections frozen; new ones are
/// answered): the cluster connection that waited on it is given up and made anew, and work
/// resumes on every shard, the silent node's included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_redis_cluster_node_is_given_up_and_work_resumes() {
    let (cluster, proxies) = PrivateRedisCluster::behind_proxies();
    let fulfillment = TestDb::new("nohang_cluster_f").await;
    let orders_db = TestDb::new("nohang_cluster_o").await;
    let setup = Setup {
        fulfillment_url: fulfillment.url.clone(),
        orders_url: orders_db.url.clone(),
        redis_url: String::new(),
        redis_cluster: cluster.urls(),
        prefix: format!("{}:", unique("nohang_cluster")),
        orders: 600,
        partitions: 6,
    };
    let cfg = write_config(
        "nohang_cluster",
        &setup.config(&PrivateRedisCluster::proxied_toml(&proxies), ""),
    );
    outboxd(&cfg, &["migrate"]);
    setup.prepare().await;
    let dir = cfg.parent().unwrap().to_path_buf();
    let mut daemon = spawn_bin(
        &["--config", cfg.to_str().unwrap(), "run"],
        &dir.join("run.log"),
    );
    let producers = setup.start_producers(seed("OUTBOXD_FAULT_SEED"), 120);
    let orders = pg_connect(&setup.orders_url).await;
    wait_until("work under way", Duration::from_secs(60), || async {
        applied(&orders).await > 20
    })
    .await;
    // the node holding the most of the topic's partition streams goes silent
    let per_node = cluster.keys_per_node(&setup.prefix);
    let silent = (0..per_node.len()).max_by_key(|&i| per_node[i]).unwrap();
    assert!(per_node[silent] > 0, "{per_node:?}");
    let accepted_before = proxies[silent].accepted();
    let fault = Instant::now();
    proxies[silent].freeze();
    let secs = resumed(&orders, fault, Duration::from_millis(1500)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let committed = producers.stop().await;
    // settling needs every partition, the silent node's too: outboxd made new connections
    // to it (the frozen ones stay frozen for good)
    let settled = setup
        .wait_settled(Duration::from_secs(120))
        .await
        .unwrap_or_else(|state| panic!("not settled within 120 s: {state}"));
    assert!(
        proxies[silent].accepted() > accepted_before,
        "new connections to the silent node"
    );
    assert!(daemon.try_wait().unwrap().is_none(), "run is still running");
    sigterm(&daemon);
    assert!(daemon.wait().unwrap().success(), "run exits 0");
    let verdict = setup.verify(committed).await;
    println!(
        "no hang: one Redis Cluster node frozen (keys per node {per_node:?}): work resumed after \
         {secs:.1} s; {} events, settled in {settled:.1} s; exactly once: ok; out-of-order \
         entries: {}",
        verdict.events, verdict.out_of_order
    );
    assert!(
        secs <= RESUME_WITHIN.as_secs_f64(),
        "work resumed only after {secs:.1} s"
    );
}
