//! TLS to PostgreSQL (libpq's sslmode over rustls) and to Redis (`rediss://`), against
//! private servers whose certificates a CA made by the test (with the `openssl` CLI) signed.
//! The PostgreSQL servers accept TCP connections only over TLS (`hostssl`), so whatever
//! outboxd did over TCP it did encrypted; the Redis servers listen only on a TLS port. The
//! tests' own PostgreSQL sessions use the server's Unix socket. Passwords given in URLs must
//! never show in outboxd's output.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A CA and server certificates signed by it, in a directory of the test's own that the
/// `postgres` OS user can read.
struct Pki {
    dir: PathBuf,
}

/// A server's certificate and key files.
struct ServerCert {
    cert: PathBuf,
    key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl CLI");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `openssl req` with a new P-256 key: a certificate signing request, or with `-x509` in
/// `extra` a self-signed certificate.
fn new_key_and_request(dir: &Path, key: &str, out: &str, subject: &str, extra: &[&str]) {
    let mut args = vec!["req", "-new", "-newkey", "ec", "-pkeyopt"];
    args.extend(["ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key]);
    args.extend(["-out", out, "-subj", subject]);
    args.extend_from_slice(extra);
    openssl(dir, &args);
}

impl Pki {
    fn new(tag: &str) -> Pki {
        let dir = std::env::temp_dir().join(unique(&format!("outboxd_pki_{tag}")));
        std::fs::create_dir_all(&dir).unwrap();
        new_key_and_request(
            &dir,
            "ca.key",
            "ca.pem",
            "/CN=outboxd test CA",
            &[
                "-x509",
                "-days",
                "2",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        Pki { dir }
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A server certificate for the subjectAltName `san` (e.g. `IP:127.0.0.1,DNS:localhost`),
    /// owned by the `postgres` OS user with its key at mode 0600, as PostgreSQL demands.
    fn server(&self, name: &str, san: &str) -> ServerCert {
        let ext = format!(
            "subjectAltName = {san}\nbasicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature\nextendedKeyUsage = serverAuth\n"
        );
        std::fs::write(self.dir.join(format!("{name}.ext")), ext).unwrap();
        let (key, csr, cert) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        new_key_and_request(&self.dir, &key, &csr, &format!("/CN={name}"), &[]);
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &cert,
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
        let server = ServerCert {
            cert: self.dir.join(cert),
            key: self.dir.join(key),
        };
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&server.key, std::fs::Permissions::from_mode(0o600)).unwrap();
        give_to_postgres(&[&server.cert, &server.key]);
        server
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn give_to_postgres(paths: &[&Path]) {
    let status = Command::new("chown")
        .arg("postgres:postgres")
        .args(paths)
        .status()
        .expect("chown");
    assert!(status.success(), "chown {paths:?}");
}

/// A private PostgreSQL with TLS on, reachable over TCP only with TLS (`hostssl`; plain TCP
/// has no pg_hba.conf entry) and over its Unix socket without. `root` needs no password;
/// `app` authenticates with SCRAM.
fn tls_pg(pki: &Pki, cert: &ServerCert) -> PrivatePg {
    let hba = pki.dir.join(format!("{}.hba", unique("pg")));
    std::fs::write(
        &hba,
        "local all all trust\nhostssl all root 127.0.0.1/32 trust\nhostssl all app 127.0.0.1/32 scram-sha-256\n",
    )
    .unwrap();
    give_to_postgres(&[&hba]);
    PrivatePg::start(&[
        "ssl = on",
        &format!("ssl_cert_file = '{}'", cert.cert.display()),
        &format!("ssl_key_file = '{}'", cert.key.display()),
        &format!("hba_file = '{}'", hba.display()),
    ])
}

/// The tests' own session: over the Unix socket, no TLS.
fn socket_url(pg: &PrivatePg, db: &str) -> String {
    format!(
        "host={} port={} user=root dbname={db}",
        pg.dir.display(),
        pg.port
    )
}

/// Creates a database and the SCRAM role `app` (superuser, so it may migrate and run the
/// ledger function) with `password`.
async fn create_db_and_app_role(pg: &PrivatePg, db: &str, password: &str) {
    let admin = pg_connect(&socket_url(pg, "postgres")).await;
    admin
        .batch_execute(&format!("CREATE DATABASE \"{db}\""))
        .await
        .expect("create database");
    admin
        .batch_execute(&format!(
            "CREATE ROLE app LOGIN SUPERUSER PASSWORD '{password}'"
        ))
        .await
        .expect("create role");
}

/// A private redis-server listening only on a TLS port, with `requirepass` when given. Killed
/// on drop.
struct TlsRedis {
    port: u16,
    dir: PathBuf,
    child: Child,
}

impl TlsRedis {
    fn start(pki: &Pki, cert: &ServerCert, password: Option<&str>) -> TlsRedis {
        let port = free_port();
        let dir = std::env::temp_dir().join(unique("outboxd_tls_redis"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .arg("--tls-cert-file")
            .arg(&cert.cert)
            .arg("--tls-key-file")
            .arg(&cert.key)
            .arg("--tls-ca-cert-file")
            .arg(pki.ca())
            .args(["--tls-auth-clients", "no"]);
        if let Some(password) = password {
            cmd.args(["--requirepass", password]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/dev-services)");
        let redis = TlsRedis { port, dir, child };
        // Ready when the TLS port accepts connections (the certificate may be for another
        // host, so no handshake here).
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "redis-server with TLS did not start (built without TLS?)"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        redis
    }

    fn url(&self, password: Option<&str>) -> String {
        match password {
            Some(p) => format!("rediss://:{p}@127.0.0.1:{}", self.port),
            None => format!("rediss://127.0.0.1:{}", self.port),
        }
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A relay and a `sql`-handler (ledger) consumer over one database, on the topic `events`.
fn config(db_url: &str, redis_url: &str, ca_file: Option<&Path>, prefix: &str) -> String {
    let ca = ca_file
        .map(|p| format!("ca_file = \"{}\"", p.display()))
        .unwrap_or_default();
    format!(
        r#"
[redis]
url = "{redis_url}"
{ca}
stream_prefix = "{prefix}"
connect_timeout_ms = 2000

[databases.main]
url = "{db_url}"

[[relays]]
database = "main"

[[consumers]]
name = "ledger"
database = "main"
streams = ["events"]
handler = "sql"
function = "count_event"
block_ms = 200

[http]
listen = ""

[shutdown]
timeout_ms = 5000
"#
    )
}

fn run_with(cfg: &Path, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["--config", cfg.to_str().unwrap()];
    all.extend_from_slice(args);
    run_bin(&all, &[])
}

/// Runs outboxd, requires exit 0, appends stdout and stderr to `printed`.
fn run_ok(cfg: &Path, args: &[&str], printed: &mut String) -> String {
    let (code, out, err) = run_with(cfg, args);
    assert_eq!(code, 0, "outboxd {args:?}: {out}{err}");
    assert!(!err.contains("panicked"), "{err}");
    printed.push_str(&out);
    printed.push_str(&err);
    out
}

#[tokio::test]
async fn relay_and_consumer_work_end_to_end_over_tls_to_postgres_and_redis() {
    let pki = Pki::new("e2e");
    let cert = pki.server("server", "IP:127.0.0.1,DNS:localhost");
    let pg = tls_pg(&pki, &cert);
    let (pg_password, redis_password) = ("pg-Secret-e2e", "redis-Secret-e2e");
    create_db_and_app_role(&pg, "shop", pg_password).await;
    let redis = TlsRedis::start(&pki, &cert, Some(redis_password));
    let streams = TestStreams::on_tls("tls_e2e", &redis.url(Some(redis_password)), &pki.ca());
    // verify-full against the test CA, and SCRAM with channel binding required: the
    // password exchange is tied to this very TLS session (tls-server-end-point).
    let db_url = format!(
        "postgres://app:{pg_password}@127.0.0.1:{}/shop?sslmode=verify-full&sslrootcert={}&channel_binding=require",
        pg.port,
        pki.ca().display()
    );
    let cfg = write_config(
        "tls_e2e",
        &config(
            &db_url,
            &redis.url(Some(redis_password)),
            Some(&pki.ca()),
            &streams.prefix,
        ),
    );
    let mut printed = String::new();
    run_ok(&cfg, &["migrate"], &mut printed);

    let client = pg_connect(&socket_url(&pg, "shop")).await;
    create_ledger(&client).await;
    insert_rows(&client, "events", 300, 20).await;

    let summary = run_ok(&cfg, &["relay", "--once"], &mut printed);
    assert!(summary.contains("300 rows"), "{summary}");
    assert_eq!(count(&client, "SELECT count(*) FROM outbox").await, 0);
    let entries = streams.entries("events").await;
    assert_eq!(check_stream(&entries, 300), 0, "no duplicates expected");

    run_ok(&cfg, &["consume", "--once"], &mut printed);
    assert_eq!(count(&client, "SELECT count(*) FROM ledger").await, 300);
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM ledger WHERE applications <> 1"
        )
        .await,
        0,
        "every event applied exactly once"
    );

    let status = run_ok(&cfg, &["status", "--json"], &mut printed);
    let status: serde_json::Value = serde_json::from_str(&status).expect("status JSON");
    assert_eq!(status["outboxes"][0]["backlog_rows"], 0, "{status}");
    assert!(status["outboxes"][0].get("error").is_none(), "{status}");
    assert_eq!(status["consumers"][0]["pending"], 0, "{status}");
    assert_eq!(status["consumers"][0]["lag"], 0, "{status}");
    // The key=value form of the connection string, with the same checks.
    let key_value = format!(
        "host=127.0.0.1 port={} dbname=shop user=app password='{pg_password}' sslmode=verify-full sslrootcert='{}'",
        pg.port,
        pki.ca().display()
    );
    let key_value_cfg = write_config(
        "tls_e2e_kv",
        &config(
            &key_value,
            &redis.url(Some(redis_password)),
            Some(&pki.ca()),
            &streams.prefix,
        ),
    );
    let status = run_ok(&key_value_cfg, &["status", "--json"], &mut printed);
    assert!(!status.contains("\"error\""), "{status}");
    for secret in [pg_password, redis_password] {
        assert!(!printed.contains(secret), "{secret} printed: {printed}");
    }

    // The control: the same URL without TLS finds no pg_hba.conf entry, so everything above
    // went over TLS.
    let plain = write_config(
        "tls_e2e_plain",
        &config(
            &db_url.replace("sslmode=verify-full", "sslmode=disable"),
            &redis.url(Some(redis_password)),
            Some(&pki.ca()),
            &streams.prefix,
        ),
    );
    let (code, out, err) = run_with(&plain, &["migrate"]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("no pg_hba.conf entry"), "{err}");
    assert!(err.contains("no encryption"), "{err}");
}

#[tokio::test]
async fn certificates_are_checked_as_the_sslmode_says() {
    let pki = Pki::new("modes");
    // A certificate signed by the test CA, but for another host.
    let cert = pki.server("elsewhere", "DNS:db.elsewhere.example");
    let pg = tls_pg(&pki, &cert);
    let admin = pg_connect(&socket_url(&pg, "postgres")).await;
    admin.batch_execute("CREATE DATABASE shop").await.unwrap();
    let other_ca = Pki::new("other_ca");
    let redis = TlsRedis::start(&pki, &cert, None);
    let streams = TestStreams::on("tls_modes", &redis.url(None));
    let migrate = |query: &str| {
        let url = format!("postgres://root@127.0.0.1:{}/shop?{query}", pg.port);
        let cfg = write_config(
            "tls_modes",
            &config(&url, &redis.url(None), Some(&pki.ca()), &streams.prefix),
        );
        let started = Instant::now();
        let (code, out, err) = run_with(&cfg, &["migrate"]);
        assert!(!err.contains("panicked"), "{err}");
        (code, format!("{out}{err}"), started.elapsed())
    };
    let ca = pki.ca().display().to_string();
    let wrong_ca = other_ca.ca().display().to_string();

    // verify-full: the chain is fine, the name is not.
    let (code, out, took) = migrate(&format!("sslmode=verify-full&sslrootcert={ca}"));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("certificate"), "{out}");
    assert!(
        out.contains("127.0.0.1"),
        "names the host it expected: {out}"
    );
    assert!(
        took < Duration::from_secs(20),
        "failed at once, not after retries"
    );
    // verify-ca does not compare names; require without a CA file checks nothing.
    for query in [
        format!("sslmode=verify-ca&sslrootcert={ca}"),
        "sslmode=require".to_string(),
        "sslmode=prefer".to_string(),
    ] {
        let (code, out, _) = migrate(&query);
        assert_eq!(code, 0, "{query}: {out}");
    }
    // A CA that did not sign the certificate: refused by verify-ca, and (as in libpq) by
    // require once a root certificate is named.
    for query in [
        format!("sslmode=verify-ca&sslrootcert={wrong_ca}"),
        format!("sslmode=require&sslrootcert={wrong_ca}"),
    ] {
        let (code, out, _) = migrate(&query);
        assert_eq!(code, 1, "{query}: {out}");
        assert!(out.contains("certificate"), "{query}: {out}");
    }
    // verify-full without sslrootcert trusts only the system's CAs, which did not sign it.
    let (code, out, _) = migrate("sslmode=verify-full");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("certificate"), "{out}");
    // No TLS at all: there is no pg_hba.conf entry for it.
    let (code, out, _) = migrate("sslmode=disable");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no encryption"), "{out}");

    // Redis checks the name too: a relay with something to publish gives up at once with
    // the certificate error instead of retrying it as a connection problem.
    let db_url = format!("postgres://root@127.0.0.1:{}/shop?sslmode=require", pg.port);
    let client = pg_connect(&socket_url(&pg, "shop")).await;
    insert_rows(&client, "events", 5, 5).await;
    let cfg = write_config(
        "tls_modes_redis",
        &config(&db_url, &redis.url(None), Some(&pki.ca()), &streams.prefix),
    );
    let started = Instant::now();
    let (code, out, err) = run_with(&cfg, &["relay", "--once"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("certificate"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "a certificate error is not retried: {:?}",
        started.elapsed()
    );
    assert_eq!(count(&client, "SELECT count(*) FROM outbox").await, 5);
}

#[tokio::test]
async fn passwords_never_appear_in_output_logs_or_status() {
    let pki = Pki::new("secrets");
    let cert = pki.server("server", "IP:127.0.0.1,DNS:localhost");
    let pg = tls_pg(&pki, &cert);
    create_db_and_app_role(&pg, "shop", "the-right-one").await;
    let redis = TlsRedis::start(&pki, &cert, Some("redis-right-one"));
    let streams = TestStreams::on("tls_secrets", &redis.url(None));
    let (pg_secret, redis_secret) = ("pgPassw0rd-never-shown", "redisPassw0rd-never-shown");
    let nobody = free_port();
    let mut cases = vec![
        // Nothing listening.
        (
            format!("postgres://app:{pg_secret}@127.0.0.1:{nobody}/shop?sslmode=require"),
            format!("rediss://:{redis_secret}@127.0.0.1:{nobody}"),
        ),
        // Servers that refuse the password.
        (
            format!(
                "postgres://app:{pg_secret}@127.0.0.1:{}/shop?sslmode=verify-full&sslrootcert={}",
                pg.port,
                pki.ca().display()
            ),
            redis.url(Some(redis_secret)),
        ),
    ];
    // The key=value form, quoted.
    cases.push((
        format!(
            "host=127.0.0.1 port={} dbname=shop user=app password='{pg_secret}' sslmode=require",
            pg.port
        ),
        redis.url(Some(redis_secret)),
    ));
    for (i, (db_url, redis_url)) in cases.iter().enumerate() {
        let cfg = write_config(
            "tls_secrets",
            &config(db_url, redis_url, Some(&pki.ca()), &streams.prefix),
        );
        let mut printed = String::new();
        let (code, out, err) = run_with(&cfg, &["migrate"]);
        assert_ne!(code, 0, "case {i}: {out}{err}");
        printed += &format!("{out}{err}");
        if i > 0 {
            assert!(
                err.contains("password authentication failed"),
                "case {i}: {err}"
            );
        }
        let (_, out, err) = run_with(&cfg, &["status", "--json"]);
        let status: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
        assert!(
            status["outboxes"][0]["error"].is_string(),
            "case {i}: {status}"
        );
        assert!(
            status["consumers"][0]["error"].is_string(),
            "case {i}: {status}"
        );
        printed += &format!("{out}{err}");
        // The daemon retries and logs each failure.
        let log = cfg.with_file_name("run.log");
        let mut child = spawn_bin(&["--config", cfg.to_str().unwrap(), "run"], &log);
        tokio::time::sleep(Duration::from_secs(3)).await;
        sigterm(&child);
        let _ = child.wait();
        let logged = std::fs::read_to_string(&log).unwrap();
        assert!(!logged.is_empty(), "case {i}: the daemon logged nothing");
        printed += &logged;
        for secret in [pg_secret, redis_secret] {
            assert!(
                !printed.contains(secret),
                "case {i}: {secret} printed: {printed}"
            );
        }
    }
}

/// A server that wants a password the URL does not carry: no retry can cure that, so
/// `relay --once` fails at once (exit 1, naming it) instead of retrying for a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_password_fails_at_once_without_retries() {
    let pki = Pki::new("nopassword");
    let cert = pki.server("server", "IP:127.0.0.1,DNS:localhost");
    let pg = tls_pg(&pki, &cert);
    create_db_and_app_role(&pg, "shop", "the-right-one").await;
    let streams = TestStreams::new("tls_nopassword");
    let db_url = format!("postgres://app@127.0.0.1:{}/shop?sslmode=require", pg.port);
    let cfg = write_config(
        "tls_nopassword",
        &config(&db_url, &redis_url(), None, &streams.prefix),
    );
    let (code, out, err) = run_with(&cfg, &["relay", "--once"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("password missing"), "{err}");
    assert!(!err.contains("retrying"), "not retried: {err}");
}

#[test]
fn unreadable_ca_files_are_configuration_errors_naming_the_key() {
    let cases = [
        (
            "[redis]\nurl = \"rediss://:pw@127.0.0.1:6380\"\nca_file = \"/nonexistent/redis-ca.pem\"\n",
            "status",
            "redis.ca_file: /nonexistent/redis-ca.pem: cannot read",
        ),
        (
            "[databases.main]\nurl = \"postgres://u:pw@127.0.0.1/d?sslmode=verify-full&sslrootcert=/nonexistent/pg-ca.pem\"\n",
            "migrate",
            "databases.main.url: sslrootcert /nonexistent/pg-ca.pem: cannot read",
        ),
    ];
    for (toml, command, message) in cases {
        let cfg = write_config("tls_ca_missing", toml);
        let (code, _, err) = run_with(&cfg, &[command]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(message), "{err}");
        assert!(!err.contains(":pw@"), "{err}");
    }
}
