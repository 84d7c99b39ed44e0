//! Test helpers: each test gets its own PostgreSQL database(s) and its own Redis stream
//! prefix, so the suite runs in parallel with no global lock. Servers default to the local
//! ones (`OUTBOXD_TEST_PG`, `OUTBOXD_TEST_REDIS` override them); nothing is mocked.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub fn pg_admin_url() -> String {
    std::env::var("OUTBOXD_TEST_PG")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/postgres".into())
}

pub fn redis_url() -> String {
    std::env::var("OUTBOXD_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A short name unique in this machine for this run: pid, counter, time.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros()
        % 1_000_000_000;
    format!("{prefix}_{}_{n}_{t}", std::process::id())
}

pub async fn pg_connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A database created for one test and dropped when the value is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn new(tag: &str) -> TestDb {
        let name = unique(&format!("outboxd_t_{tag}"));
        let admin = pg_connect(&pg_admin_url()).await;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .expect("create database");
        let base = pg_admin_url();
        let cut = base.rfind('/').expect("url has a path");
        let url = format!("{}/{name}", &base[..cut]);
        TestDb { name, url }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        pg_connect(&self.url).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if std::env::var("OUTBOXD_TEST_KEEP").is_ok() {
            return;
        }
        let name = self.name.clone();
        // Drop runs outside any runtime guarantee; use a thread with its own runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let admin = pg_connect(&pg_admin_url()).await;
                let _ = admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .await;
            });
        })
        .join();
    }
}

/// A Redis stream prefix owned by one test; its keys are deleted on drop.
pub struct TestStreams {
    pub prefix: String,
    pub url: String,
    /// For a `rediss://` server whose certificate a test's own CA signed: that CA (PEM).
    pub ca_pem: Option<Vec<u8>>,
}

impl TestStreams {
    pub fn new(tag: &str) -> TestStreams {
        TestStreams::on(tag, &redis_url())
    }

    pub fn on(tag: &str, url: &str) -> TestStreams {
        TestStreams {
            prefix: format!("{}:", unique(&format!("t_{tag}"))),
            url: url.to_string(),
            ca_pem: None,
        }
    }

    /// On a `rediss://` server whose certificate the CA in `ca_file` signed.
    pub fn on_tls(tag: &str, url: &str, ca_file: &std::path::Path) -> TestStreams {
        let mut streams = TestStreams::on(tag, url);
        streams.ca_pem = Some(std::fs::read(ca_file).expect("read the test CA"));
        streams
    }

    pub fn client(&self) -> redis::Client {
        redis_client(&self.url, self.ca_pem.as_deref())
    }

    pub fn key(&self, topic: &str) -> String {
        format!("{}{}", self.prefix, topic)
    }

    /// A connection with a response timeout fit for a loaded CI machine (redis-rs's default
    /// of 500 ms is not: a debug build decoding a large reply on two busy cores takes longer).
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        self.client()
            .get_multiplexed_async_connection_with_config(&test_redis_config())
            .await
            .expect("redis connection")
    }

    /// The number of entries on the stream of `topic` (0 while it does not exist or Redis
    /// is away).
    pub async fn len(&self, topic: &str) -> i64 {
        let mut conn = self.conn().await;
        redis::cmd("XLEN")
            .arg(self.key(topic))
            .query_async(&mut conn)
            .await
            .unwrap_or(0)
    }

    /// One field of every entry of the stream `key` (a full key: a dead-letter stream, say),
    /// as text ("" where an entry lacks it).
    pub async fn field_of_each(&self, key: &str, field: &str) -> Vec<String> {
        let mut conn = self.conn().await;
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(key)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .expect("XRANGE");
        reply
            .ids
            .iter()
            .map(|e| e.get::<String>(field).unwrap_or_default())
            .collect()
    }

    /// Every entry of a stream: (entry id, data field parsed as JSON), read in pages of
    /// 1,000 so that no reply is large.
    pub async fn entries(&self, topic: &str) -> Vec<(String, serde_json::Value)> {
        let mut conn = self.conn().await;
        let mut out = Vec::new();
        let mut from = "-".to_string();
        loop {
            let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                .arg(self.key(topic))
                .arg(&from)
                .arg("+")
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .expect("XRANGE");
            let Some(last) = reply.ids.last() else {
                return out;
            };
            from = format!("({}", last.id);
            out.extend(reply.ids.into_iter().map(|e| {
                let data: Vec<u8> = e.get("data").unwrap_or_default();
                (
                    e.id,
                    serde_json::from_slice(&data).unwrap_or(serde_json::Value::Null),
                )
            }));
        }
    }
}

impl Drop for TestStreams {
    fn drop(&mut self) {
        if std::env::var("OUTBOXD_TEST_KEEP").is_ok() {
            return;
        }
        let prefix = self.prefix.clone();
        let client = self.client();
        let _ = std::thread::spawn(move || {
            let Ok(mut conn) = client.get_connection() else {
                return;
            };
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{prefix}*"))
                .query(&mut conn)
                .unwrap_or_default();
            for k in keys {
                let _: redis::RedisResult<()> = redis::cmd("DEL").arg(k).query(&mut conn);
            }
        })
        .join();
    }
}

/// Connection settings for the tests' own Redis connections: a response timeout fit for a
/// loaded machine.
pub fn test_redis_config() -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new()
        .set_response_timeout(Some(Duration::from_secs(30)))
        .set_connection_timeout(Some(Duration::from_secs(10)))
}

/// A Redis client; with `ca_pem`, TLS (`rediss://`) trusting that CA instead of the system's.
pub fn redis_client(url: &str, ca_pem: Option<&[u8]>) -> redis::Client {
    match ca_pem {
        Some(pem) => {
            outboxd::tls::install_default_provider();
            redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.to_vec()),
                },
            )
            .expect("TLS redis client")
        }
        None => redis::Client::open(url).unwrap(),
    }
}

/// Writes a config file for a test and returns its path (kept in a temp dir per test).
pub fn write_config(tag: &str, toml: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(unique(&format!("outboxd_cfg_{tag}")));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("outboxd.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

/// The outboxd binary under test: cargo's build of this tree, or `OUTBOXD_TEST_BIN` (for
/// example a release build, or an older build to show a test fails without a fix).
pub fn bin() -> String {
    std::env::var("OUTBOXD_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_outboxd").to_string())
}

/// Runs the binary to completion; returns (exit code, stdout, stderr).
pub fn run_bin(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(bin());
    cmd.args(args).env_remove("OUTBOXD_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run outboxd");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts the binary in the background, logging to a file next to the config.
pub fn spawn_bin(args: &[&str], log: &std::path::Path) -> Child {
    let file = std::fs::File::create(log).unwrap();
    Command::new(bin())
        .args(args)
        .env_remove("OUTBOXD_CONFIG")
        .env("OUTBOXD_LOG", "info")
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .expect("spawn outboxd")
}

pub fn sigterm(child: &Child) {
    unsafe_free_kill(child.id(), "TERM");
}

pub fn sigkill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn unsafe_free_kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
}

/// Waits for a condition, polling; panics with `what` after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.expect(sql).get(0)
}

/// A test's configuration, section by section, so that each test says only what it needs
/// (the servers, its databases, relays and consumers, and the settings it is about) and the
/// rest comes from one place. `[http] listen = ""` unless a test sets its own `[http]`.
#[derive(Debug, Clone)]
pub struct TestConfig {
    redis: String,
    prefix: String,
    sections: Vec<String>,
}

impl TestConfig {
    /// On the suite's Redis, with the test's stream prefix.
    pub fn new(prefix: &str) -> TestConfig {
        TestConfig {
            redis: format!("url = \"{}\"", redis_url()),
            prefix: prefix.to_string(),
            sections: Vec::new(),
        }
    }

    /// On another Redis (a private one, another server kind).
    pub fn on_redis(mut self, url: &str) -> TestConfig {
        self.redis = format!("url = \"{url}\"");
        self
    }

    /// `[databases.<name>]` at `url`.
    pub fn database(mut self, name: &str, url: &str) -> TestConfig {
        self.sections
            .push(format!("[databases.{name}]\nurl = \"{url}\""));
        self
    }

    /// A `[[relays]]` entry on `database`, with `settings` (TOML lines) added.
    pub fn relay(mut self, database: &str, settings: &str) -> TestConfig {
        self.sections
            .push(format!("[[relays]]\ndatabase = \"{database}\"\n{settings}"));
        self
    }

    /// A `[[consumers]]` entry named `name` on `database` reading `streams` with `handler`
    /// (`order_status`, or `sql` with a `function` line in `settings`).
    pub fn consumer(
        mut self,
        name: &str,
        database: &str,
        streams: &[&str],
        handler: &str,
        settings: &str,
    ) -> TestConfig {
        let streams: Vec<String> = streams.iter().map(|s| format!("\"{s}\"")).collect();
        self.sections.push(format!(
            "[[consumers]]\nname = \"{name}\"\ndatabase = \"{database}\"\nstreams = [{}]\nhandler = \"{handler}\"\n{settings}",
            streams.join(", ")
        ));
        self
    }

    /// Any other TOML, as it is.
    pub fn section(mut self, toml: &str) -> TestConfig {
        self.sections.push(toml.to_string());
        self
    }

    pub fn toml(&self) -> String {
        let mut out = format!(
            "[redis]\n{}\nstream_prefix = \"{}\"\n",
            self.redis, self.prefix
        );
        for section in &self.sections {
            out.push('\n');
            out.push_str(section);
            out.push('\n');
        }
        if !self
            .sections
            .iter()
            .any(|s| s.trim_start().starts_with("[http]"))
        {
            out.push_str("\n[http]\nlisten = \"\"\n");
        }
        out
    }

    /// Written to a file of the test's own.
    pub fn write(&self, tag: &str) -> std::path::PathBuf {
        write_config(tag, &self.toml())
    }

    /// Written, and `outboxd migrate` run on it (which must succeed).
    pub fn migrated(&self, tag: &str) -> std::path::PathBuf {
        let cfg = self.write(tag);
        let (code, out, err) = run_bin(&["--config", cfg.to_str().unwrap(), "migrate"], &[]);
        assert_eq!(code, 0, "migrate: {out}{err}");
        cfg
    }
}

/// The TOML of a relay-only config over one database.
pub fn relay_config(db_url: &str, prefix: &str, extra_relay: &str) -> String {
    TestConfig::new(prefix)
        .database("main", db_url)
        .relay("main", &format!("table = \"outbox\"\n{extra_relay}"))
        .section("[shutdown]\ntimeout_ms = 10000")
        .toml()
}

/// Inserts `n` rows spread over `aggregates` aggregates, in one statement per 5,000 rows;
/// payload carries (aggregate, seq-within-aggregate) so order can be checked from the stream.
pub async fn insert_rows(client: &tokio_postgres::Client, topic: &str, n: i64, aggregates: i64) {
    let mut start = 0;
    while start < n {
        let end = (start + 5000).min(n);
        client
            .execute(
                "INSERT INTO outbox (topic, aggregate_id, payload)
                 SELECT $1, 'agg-' || (g % $4), jsonb_build_object('agg', 'agg-' || (g % $4), 'seq', g)
                 FROM generate_series($2::bigint, $3::bigint - 1) g ORDER BY g",
                &[&topic, &start, &end, &aggregates],
            )
            .await
            .expect("insert rows");
        start = end;
    }
}

/// Checks a stream's entries: every `seq` in 0..n appears, and per aggregate the first
/// occurrences are in increasing seq order. Returns the number of duplicate entries.
pub fn check_stream(entries: &[(String, serde_json::Value)], n: i64) -> usize {
    use std::collections::{HashMap, HashSet};
    let mut seen: HashSet<i64> = HashSet::new();
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut duplicates = 0;
    for (id, env) in entries {
        let data = &env["data"];
        let seq = data["seq"]
            .as_i64()
            .unwrap_or_else(|| panic!("entry {id} has no seq: {env}"));
        let agg = data["agg"].as_str().expect("agg").to_string();
        assert_eq!(
            env["subject"].as_str(),
            Some(agg.as_str()),
            "subject is the aggregate"
        );
        if !seen.insert(seq) {
            duplicates += 1;
            continue;
        }
        if let Some(prev) = last.get(&agg) {
            assert!(
                seq > *prev,
                "aggregate {agg}: seq {seq} (entry {id}) arrived after seq {prev}"
            );
        }
        last.insert(agg, seq);
    }
    for seq in 0..n {
        assert!(
            seen.contains(&seq),
            "row seq {seq} never reached the stream"
        );
    }
    assert_eq!(seen.len() as i64, n, "unexpected extra rows on the stream");
    duplicates
}

/// A private redis-server on its own port and directory (AOF, fsync always), for tests that
/// stop and restart Redis. Killed on drop.
pub struct PrivateRedis {
    pub port: u16,
    pub dir: std::path::PathBuf,
    /// The server binary: `redis-server` from PATH, or another Redis-compatible one.
    binary: String,
    child: Option<Child>,
}

impl PrivateRedis {
    pub fn start() -> PrivateRedis {
        PrivateRedis::start_binary("redis-server")
    }

    /// The same with another server binary (Valkey's `valkey-server`, another Redis).
    pub fn start_binary(binary: &str) -> PrivateRedis {
        let port = free_port();
        let dir = std::env::temp_dir().join(unique("outboxd_redis"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = PrivateRedis {
            port,
            dir,
            binary: binary.to_string(),
            child: None,
        };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port and data directory.
    pub fn restart(&mut self) {
        let child = Command::new(&self.binary)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--dir",
                self.dir.to_str().unwrap(),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "{} must be installed (scripts/dev-services): {e}",
                    self.binary
                )
            });
        self.child = Some(child);
        wait_for_redis(self.port);
    }

    /// Writes `keys` small filler keys, so that a restart spends a while loading the AOF
    /// (answering `LOADING` to commands in between, as a production-sized Redis does).
    pub fn fill(&self, keys: u32) {
        let client = redis::Client::open(self.url()).unwrap();
        let mut conn = client.get_connection().unwrap();
        let mut done = 0;
        while done < keys {
            let n = (keys - done).min(50_000);
            let _: () = redis::cmd("EVAL")
                .arg("for i = tonumber(ARGV[1]), tonumber(ARGV[2]) do redis.call('SET', 'filler:' .. i, i) end")
                .arg(0)
                .arg(done)
                .arg(done + n - 1)
                .query(&mut conn)
                .unwrap();
            done += n;
        }
    }

    /// SIGSTOP: the server stops answering; its sockets (and new connections, which the
    /// kernel still accepts) stay open.
    pub fn pause(&self) {
        if let Some(c) = &self.child {
            unsafe_free_kill(c.id(), "STOP");
        }
    }

    /// SIGCONT after `pause`.
    pub fn resume(&self) {
        if let Some(c) = &self.child {
            unsafe_free_kill(c.id(), "CONT");
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A free port for a Redis Cluster node: its bus listens 10,000 above it, so it must be at
/// most 55535 (Redis refuses to start otherwise), and the bus port must be free too.
pub fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port <= 55535 && std::net::TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
}

/// Runs the binary with `--config cfg`, requires exit 0 and no panic, returns stdout.
pub fn outboxd(cfg: &std::path::Path, args: &[&str]) -> String {
    let mut all = vec!["--config", cfg.to_str().unwrap()];
    all.extend_from_slice(args);
    let (code, out, err) = run_bin(&all, &[]);
    assert_eq!(code, 0, "outboxd {args:?}: {out}{err}");
    assert!(!err.contains("panicked"), "{err}");
    out
}

/// XADD one entry with a `data` field to the test's stream of `topic`.
pub async fn xadd(streams: &TestStreams, topic: &str, data: &str) {
    let mut conn = streams.conn().await;
    let _: String = redis::cmd("XADD")
        .arg(streams.key(topic))
        .arg("*")
        .arg("data")
        .arg(data)
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// A ledger for `handler = "sql"` consumers: `count_event(e)` counts the applications of each
/// event ID, so a test can prove each effect happened exactly once.
pub async fn create_ledger(client: &tokio_postgres::Client) {
    client
        .batch_execute(
            "CREATE TABLE ledger (event_id text PRIMARY KEY, applications int NOT NULL);
             CREATE FUNCTION count_event(e jsonb) RETURNS void LANGUAGE sql AS $$
               INSERT INTO ledger VALUES (e->>'id', 1)
               ON CONFLICT (event_id) DO UPDATE SET applications = ledger.applications + 1 $$;",
        )
        .await
        .expect("create the ledger");
}

/// A PostgreSQL cluster of the test's own (`initdb` + `pg_ctl`, run as the `postgres` OS
/// user because the server refuses root), on its own port and data directory, with trust
/// authentication for `root` over TCP. Stopped (`-m immediate`) and deleted when dropped.
pub struct PrivatePg {
    pub port: u16,
    pub dir: std::path::PathBuf,
}

/// The directory of `initdb`, `pg_ctl`, `pg_basebackup` of the installed server.
pub fn pg_bin(tool: &str) -> String {
    let mut dirs: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries in /usr/lib/postgresql (scripts/dev-services)")
        .filter_map(|d| d.ok().map(|d| d.path()))
        .collect();
    dirs.sort();
    let dir = dirs.last().expect("a PostgreSQL version directory");
    dir.join("bin").join(tool).to_string_lossy().into_owned()
}

/// Runs a PostgreSQL tool as the `postgres` OS user; panics with its output on failure.
fn as_postgres(tool: &str, args: &[&str]) {
    let out = Command::new("runuser")
        .current_dir("/")
        .args(["-u", "postgres", "--", &pg_bin(tool)])
        .args(args)
        .output()
        .expect("runuser");
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl PrivatePg {
    /// A fresh cluster; `settings` are appended to its postgresql.conf before the start.
    pub fn start(settings: &[&str]) -> PrivatePg {
        let port = free_port();
        let dir = std::env::temp_dir().join(unique("outboxd_pg"));
        as_postgres(
            "initdb",
            &[
                "-D",
                dir.to_str().unwrap(),
                "-U",
                "root",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        let pg = PrivatePg { port, dir };
        pg.configure(settings);
        pg.pg_ctl(&["start"]);
        pg
    }

    /// A streaming standby of `primary` (pg_basebackup -R), started on its own port.
    pub fn standby_of(primary: &PrivatePg) -> PrivatePg {
        let port = free_port();
        let dir = std::env::temp_dir().join(unique("outboxd_pg_standby"));
        as_postgres(
            "pg_basebackup",
            &[
                "-D",
                dir.to_str().unwrap(),
                "-h",
                "127.0.0.1",
                "-p",
                &primary.port.to_string(),
                "-U",
                "root",
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ],
        );
        let pg = PrivatePg { port, dir };
        pg.configure(&[]);
        pg.pg_ctl(&["start"]);
        pg
    }

    fn configure(&self, settings: &[&str]) {
        use std::io::Write;
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.join("postgresql.conf"))
            .unwrap();
        writeln!(
            conf,
            "\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nfsync = off\nmax_connections = 200",
            self.port,
            self.dir.display()
        )
        .unwrap();
        for s in settings {
            writeln!(conf, "{s}").unwrap();
        }
    }

    pub fn pg_ctl(&self, args: &[&str]) {
        let log = self.dir.join("server.log");
        let mut all = vec![
            "-D",
            self.dir.to_str().unwrap(),
            "-l",
            log.to_str().unwrap(),
            "-w",
        ];
        all.extend_from_slice(args);
        as_postgres("pg_ctl", &all);
    }

    /// `postgres://root@127.0.0.1:<port>/<db>`
    pub fn url(&self, db: &str) -> String {
        format!("postgres://root@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a database and returns its URL.
    pub async fn create_db(&self, db: &str) -> String {
        let admin = pg_connect(&self.url("postgres")).await;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{db}\""))
            .await
            .expect("create database");
        self.url(db)
    }

    /// Crash and recover: `pg_ctl restart -m immediate` (no checkpoint, WAL replay).
    pub fn crash_restart(&self) {
        self.pg_ctl(&["restart", "-m", "immediate"]);
    }

    pub fn promote(&self) {
        self.pg_ctl(&["promote"]);
    }

    pub fn stop(&self) {
        self.pg_ctl(&["stop", "-m", "immediate"]);
    }

    /// Stops every process of the cluster (SIGSTOP: the postmaster first, so it forks no
    /// more, then its backends and helpers): connections stay open and the kernel still
    /// accepts new ones, but nothing answers, as with a hung server.
    pub fn pause(&self) {
        let postmaster = self.postmaster_pid();
        unsafe_free_kill(postmaster, "STOP");
        for child in children_of(postmaster) {
            unsafe_free_kill(child, "STOP");
        }
    }

    /// SIGCONT after `pause`.
    pub fn resume(&self) {
        let postmaster = self.postmaster_pid();
        for child in children_of(postmaster) {
            unsafe_free_kill(child, "CONT");
        }
        unsafe_free_kill(postmaster, "CONT");
    }

    fn postmaster_pid(&self) -> u32 {
        let text = std::fs::read_to_string(self.dir.join("postmaster.pid")).unwrap();
        text.lines().next().unwrap().trim().parse().unwrap()
    }
}

/// The pids whose parent is `parent` (from /proc).
fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces, so split after the last ')'
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            out.push(pid);
        }
    }
    out
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--", &pg_bin("pg_ctl")])
            .args(["-D", self.dir.to_str().unwrap(), "stop", "-m", "immediate"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
pub mod workload;

/// A three-master Redis Cluster of the test's own on loopback ports (`redis-server
/// --cluster-enabled yes` three times, then `redis-cli --cluster create`), stopped and
/// deleted when dropped.
pub struct PrivateRedisCluster {
    pub ports: Vec<u16>,
    dir: std::path::PathBuf,
    children: Vec<Child>,
}

impl PrivateRedisCluster {
    pub fn start() -> PrivateRedisCluster {
        PrivateRedisCluster::start_announcing(|_| None)
    }

    /// A cluster whose clients reach each node only through a fault proxy of its own: each
    /// node announces its proxy's port (`cluster-announce-port`), so the slot map a client
    /// fetches sends it through the proxies; the cluster bus stays direct. Connect with
    /// [`PrivateRedisCluster::proxied_toml`].
    pub fn behind_proxies() -> (PrivateRedisCluster, Vec<proxy::FaultProxy>) {
        let mut proxies = Vec::new();
        let cluster = PrivateRedisCluster::start_announcing(|port| {
            let proxy = proxy::FaultProxy::start(port);
            let announced = proxy.port;
            proxies.push(proxy);
            Some(announced)
        });
        (cluster, proxies)
    }

    /// `cluster = [...]` through the given proxies (see [`PrivateRedisCluster::behind_proxies`]).
    pub fn proxied_toml(proxies: &[proxy::FaultProxy]) -> String {
        let urls: Vec<String> = proxies
            .iter()
            .map(|p| format!("\"{}\"", p.redis_url()))
            .collect();
        format!("cluster = [{}]", urls.join(", "))
    }

    /// `announce(port)`: the port a node on `port` tells clients to use, if not its own.
    fn start_announcing(mut announce: impl FnMut(u16) -> Option<u16>) -> PrivateRedisCluster {
        let dir = std::env::temp_dir().join(unique("outboxd_cluster"));
        let mut cluster = PrivateRedisCluster {
            ports: Vec::new(),
            dir,
            children: Vec::new(),
        };
        for _ in 0..3 {
            let port = free_cluster_port();
            let node_dir = cluster.dir.join(port.to_string());
            std::fs::create_dir_all(&node_dir).unwrap();
            let announced = match announce(port) {
                Some(announced) => vec![
                    "--cluster-announce-ip".to_string(),
                    "127.0.0.1".to_string(),
                    "--cluster-announce-port".to_string(),
                    announced.to_string(),
                    "--cluster-announce-bus-port".to_string(),
                    (u32::from(port) + 10000).to_string(),
                ],
                None => Vec::new(),
            };
            let child = Command::new("redis-server")
                .args(announced)
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    node_dir.to_str().unwrap(),
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server must be installed (scripts/dev-services)");
            cluster.ports.push(port);
            cluster.children.push(child);
        }
        for &port in &cluster.ports {
            wait_for_redis(port);
        }
        let nodes: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // every node must agree the cluster is up before anyone uses it
        let start = Instant::now();
        for &port in &cluster.ports {
            loop {
                let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
                let info: String = client
                    .get_connection()
                    .and_then(|mut c| redis::cmd("CLUSTER").arg("INFO").query(&mut c))
                    .unwrap_or_default();
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "cluster did not come up"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        cluster
    }

    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// `cluster = ["redis://...", ...]` for a `[redis]` section.
    pub fn toml(&self) -> String {
        let urls: Vec<String> = self.urls().iter().map(|u| format!("\"{u}\"")).collect();
        format!("cluster = [{}]", urls.join(", "))
    }

    /// How many keys starting with `prefix` each node holds.
    pub fn keys_per_node(&self, prefix: &str) -> Vec<usize> {
        self.ports
            .iter()
            .map(|port| {
                let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
                let mut c = client.get_connection().unwrap();
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(format!("{prefix}*"))
                    .query(&mut c)
                    .unwrap();
                keys.len()
            })
            .collect()
    }
}

impl Drop for PrivateRedisCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_for_redis(port: u16) {
    let start = Instant::now();
    loop {
        if let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}")) {
            if let Ok(mut conn) = client.get_connection() {
                if redis::cmd("PING").query::<String>(&mut conn).is_ok() {
                    return;
                }
            }
        }
        // generous: a restarted Redis answers only after loading its AOF, which on a loaded
        // machine takes long for the fault suite's filler keys
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "redis on {port} did not start within 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
pub mod proxy;

/// The port of the test Redis (`OUTBOXD_TEST_REDIS`, default 6379).
pub fn redis_port() -> u16 {
    let url = redis_url();
    url.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or(6379)
}

/// A plain HTTP/1.1 GET to 127.0.0.1:`port`; the whole response (status line first).
pub async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// The path of an optional tool the suite uses (a linter, another server, the CloudEvents
/// SDK's Python), from the environment variable `var` that `scripts/test` sets. When it is
/// missing the test says so loudly and is skipped (`None`), unless
/// `OUTBOXD_REQUIRE_OPTIONAL_TOOLS=1` (as in `.ci/run`), where it fails.
pub fn optional_tool(var: &str, what: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(path) if !path.is_empty() && std::path::Path::new(&path).exists() => Some(path),
        _ => {
            let message = format!(
                "SKIPPED: {what} is not available (${var} unset or missing; scripts/test sets it)"
            );
            assert!(
                std::env::var("OUTBOXD_REQUIRE_OPTIONAL_TOOLS").as_deref() != Ok("1"),
                "{message}, and OUTBOXD_REQUIRE_OPTIONAL_TOOLS=1"
            );
            // Straight to the process's stderr: libtest captures eprintln! and shows it only
            // for a failing test, so a skipped test would look like any passing one.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "\n*** {message} ***\n");
            None
        }
    }
}

/// Checks CloudEvents JSON envelopes with the CloudEvents Python SDK
/// (`tests/support/check_cloudevents.py`); `None` when that SDK is not available.
pub fn cloudevents_problems(envelopes: &[String]) -> Option<Vec<String>> {
    use std::io::Write;
    let python = optional_tool(
        "OUTBOXD_TEST_CLOUDEVENTS_PYTHON",
        "the CloudEvents Python SDK",
    )?;
    let mut child = Command::new(python)
        .arg("tests/support/check_cloudevents.py")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the CloudEvents check");
    let mut stdin = child.stdin.take().unwrap();
    for e in envelopes {
        assert!(!e.contains('\n'), "one envelope per line: {e}");
        writeln!(stdin, "{e}").unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        assert_eq!(
            stdout.trim(),
            format!("ok {}", envelopes.len()),
            "every envelope was checked: {stderr}"
        );
        return Some(Vec::new());
    }
    assert!(
        !stdout.trim().is_empty(),
        "the CloudEvents check failed without a finding: {stderr}"
    );
    Some(stdout.lines().map(str::to_string).collect())
}
