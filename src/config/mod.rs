//! Configuration: the TOML file of SPEC section 6, the `OUTBOXD_*` environment on top of it,
//! named defaults for every field, and `validate()`, whose errors name the offending key.
//!
//! Precedence is file < environment < command-line flag. The command-line flags that carry
//! configuration are declared with clap's `env` attribute (so clap already resolves flag over
//! environment); this module applies the rest of the environment (`OUTBOXD_DATABASES_<NAME>_URL`)
//! and whatever the flags resolved to, on top of the file.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// A configuration problem: which key, and what is wrong with it. Exits 2.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub redis: RedisConfig,
    /// Named PostgreSQL databases; relays and consumers refer to them by name.
    #[serde(default)]
    pub databases: BTreeMap<String, DatabaseConfig>,
    #[serde(default)]
    pub relays: Vec<RelayConfig>,
    #[serde(default)]
    pub consumers: Vec<ConsumerConfig>,
    #[serde(default)]
    pub http: HttpConfig,
    /// Per-topic options (partitioning).
    #[serde(default)]
    pub topics: Vec<TopicConfig>,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    #[serde(default)]
    pub watchdog: WatchdogConfig,
}

/// When a loop counts as stuck (see `crate::watchdog`).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct WatchdogConfig {
    /// A loop in one operation for longer than this fails `/healthz`. Default: three times
    /// the largest bound an operation has (the query and response timeouts, a blocking
    /// read's block time plus its margin), so that only a bound that does not hold trips it.
    #[serde(default)]
    pub stuck_after_ms: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://` or `rediss://` URL of a single Redis server.
    #[serde(default = "defaults::redis_url")]
    pub url: String,
    /// Instead of `url`: seed node URLs of a Redis Cluster.
    #[serde(default)]
    pub cluster: Vec<String>,
    /// For `rediss://`: PEM file of the CA certificates that may sign the server's
    /// certificate, instead of the operating system's CA store.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// Prepended to every stream key.
    #[serde(default)]
    pub stream_prefix: String,
    /// How long one Redis command (or pipeline) may take before it counts as failed.
    #[serde(default = "defaults::redis_response_timeout_ms")]
    pub response_timeout_ms: u64,
    /// How long establishing a connection may take.
    #[serde(default = "defaults::redis_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: defaults::redis_url(),
            cluster: Vec::new(),
            ca_file: None,
            stream_prefix: String::new(),
            response_timeout_ms: defaults::redis_response_timeout_ms(),
            connect_timeout_ms: defaults::redis_connect_timeout_ms(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `postgres://` connection URL (or a key=value connection string).
    pub url: String,
    /// Connections in this database's pool.
    #[serde(default = "defaults::pool_size")]
    pub pool_size: usize,
    /// How long one statement (or one relay or consumer transaction's step) may take before
    /// the connection counts as dead: it is closed, never pooled again, and a new one made.
    #[serde(default = "defaults::query_timeout_ms")]
    pub query_timeout_ms: u64,
}

impl DatabaseConfig {
    /// A database at `url` with every other setting at its default.
    pub fn with_url(url: impl Into<String>) -> DatabaseConfig {
        DatabaseConfig {
            url: url.into(),
            pool_size: defaults::pool_size(),
            query_timeout_ms: defaults::query_timeout_ms(),
        }
    }

    pub fn query_timeout(&self) -> Duration {
        Duration::from_millis(self.query_timeout_ms)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Name of a `[databases.NAME]` entry.
    pub database: String,
    /// Outbox table, optionally schema-qualified (`schema.table`).
    #[serde(default = "defaults::outbox_table")]
    pub table: String,
    /// Rows claimed and published per transaction.
    #[serde(default = "defaults::relay_batch_size")]
    pub batch_size: u32,
    /// Fallback poll interval when no NOTIFY arrives.
    #[serde(default = "defaults::relay_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// After a NOTIFY, wait this long for more rows before claiming, so that a stream of
    /// single-row transactions is relayed in batches instead of one batch per row.
    #[serde(default = "defaults::linger_ms")]
    pub linger_ms: u64,
    /// Failed publish attempts of one row before it is quarantined.
    #[serde(default = "defaults::relay_max_attempts")]
    pub max_attempts: u32,
    /// Largest CloudEvents envelope published; a larger row is a row fault.
    #[serde(default = "defaults::relay_max_entry_bytes")]
    pub max_entry_bytes: usize,
    /// Payload bytes one batch may hold (besides its row count): memory follows the bytes
    /// of a batch, not only its rows. A single row larger than this goes alone.
    #[serde(default = "defaults::relay_max_batch_bytes")]
    pub max_batch_bytes: usize,
    /// CloudEvents `source`; default `outboxd/<database>`.
    #[serde(default)]
    pub source: Option<String>,
    /// Keep published rows this long in `<table>_archive` for `outboxd replay`; 0 deletes
    /// them at once. This is the replay window: inbox retention must be longer.
    #[serde(default)]
    pub archive_retention_hours: u64,
    /// Several relay daemons on this outbox: one is active, the others stand by and take over
    /// (see README "Scaling"). `false` makes every daemon drain at once (needed behind a pooler
    /// in transaction mode, where a session lock does not stay with its session).
    #[serde(default = "defaults::yes")]
    pub standby: bool,
}

/// The `handler` key of a consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HandlerKind {
    OrderStatus,
    Sql,
}

/// What a consumer does with its events, as a value that cannot be built wrong: the
/// `handler` key together with the `function` only `sql` has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerChoice {
    /// Fulfillment events move orders along (`handler = "order_status"`).
    OrderStatus,
    /// `SELECT function($1::jsonb)` for each event (`handler = "sql"`).
    Sql { function: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    /// Inbox consumer name, also the Redis consumer group.
    pub name: String,
    /// Name of a `[databases.NAME]` entry.
    pub database: String,
    /// Topics (stream keys before the prefix) this consumer reads.
    pub streams: Vec<String>,
    /// `order_status` or `sql` (see [`ConsumerConfig::handler_choice`]).
    pub handler: HandlerKind,
    /// For `handler = "sql"`: the function called as `SELECT function($1::jsonb)`.
    #[serde(default)]
    pub function: Option<String>,
    /// Deliveries of one entry before it is dead-lettered.
    #[serde(default = "defaults::consumer_max_deliveries")]
    pub max_deliveries: u32,
    /// Entries read and applied per transaction.
    #[serde(default = "defaults::consumer_batch_size")]
    pub batch_size: u32,
    /// Transactions one batch of the `order_status` handler is applied in at once: its events
    /// split by order into this many disjoint sets (two never lock the same order), each on
    /// its own connection. Two batches are in flight anyway (the next one is read and applied
    /// while the last one commits), so 1 already keeps two PostgreSQL sessions busy; more
    /// helps where PostgreSQL has cores to spare. At most the database's `pool_size`.
    #[serde(default = "defaults::consumer_concurrency")]
    pub concurrency: u32,
    /// How long one blocking read waits for new entries.
    #[serde(default = "defaults::consumer_block_ms")]
    pub block_ms: u64,
    /// Entry bytes one read may bring: the entries asked for per read follow the sizes
    /// (first estimated from the streams' memory usage, then doubling up to `batch_size`
    /// while this many bytes of the largest entries just read fit), so a backlog of large
    /// events is read a few at a time.
    #[serde(default = "defaults::consumer_max_read_bytes")]
    pub max_read_bytes: usize,
    /// When a read returns a small batch, wait this long and read once more before applying,
    /// so that a trickle of entries is applied in batches rather than one transaction each.
    #[serde(default = "defaults::linger_ms")]
    pub linger_ms: u64,
    /// Pending entries idle longer than this are claimed from other consumers.
    #[serde(default = "defaults::consumer_claim_idle_ms")]
    pub claim_idle_ms: u64,
    /// This instance's consumer name in the group; default `<host>-<pid>`.
    #[serde(default)]
    pub consumer_name: Option<String>,
    /// Inbox table, optionally schema-qualified.
    #[serde(default = "defaults::inbox_table")]
    pub inbox_table: String,
    /// Outbox table of this database that `order.status_changed` events are written to.
    #[serde(default = "defaults::outbox_table")]
    pub outbox_table: String,
    /// Where the `order_status` handler finds orders.
    #[serde(default)]
    pub orders: OrdersTableConfig,
    /// Overrides of the fulfillment status -> order status mapping.
    #[serde(default)]
    pub status_mapping: BTreeMap<String, String>,
    /// The daemon deletes inbox rows older than this; 0 keeps them. An inbox row is the only
    /// memory that an event was applied, so this must be longer than any redelivery or replay
    /// can reach back: longer than every relay's archive_retention_hours and the max_age_hours
    /// of this consumer's streams (validated).
    #[serde(default)]
    pub inbox_retention_hours: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrdersTableConfig {
    #[serde(default = "defaults::orders_table")]
    pub table: String,
    #[serde(default = "defaults::orders_id_column")]
    pub id_column: String,
    #[serde(default = "defaults::orders_status_column")]
    pub status_column: String,
    #[serde(default = "defaults::orders_updated_at_column")]
    pub updated_at_column: String,
}

impl Default for OrdersTableConfig {
    fn default() -> Self {
        OrdersTableConfig {
            table: defaults::orders_table(),
            id_column: defaults::orders_id_column(),
            status_column: defaults::orders_status_column(),
            updated_at_column: defaults::orders_updated_at_column(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the /metrics, /healthz, /readyz endpoint; empty disables it.
    #[serde(default = "defaults::http_listen")]
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: defaults::http_listen(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    pub name: String,
    /// Streams per topic, chosen by a stable hash of `aggregate_id`.
    #[serde(default)]
    pub partitions: Option<u32>,
    /// The daemon trims the stream toward this many entries...
    #[serde(default)]
    pub max_len: Option<u64>,
    /// ...and/or this age, but never removes an entry a consumer group has not acknowledged.
    #[serde(default)]
    pub max_age_hours: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// After SIGTERM/SIGINT, how long the batch in hand may take before the process exits.
    #[serde(default = "defaults::shutdown_timeout_ms")]
    pub timeout_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            timeout_ms: defaults::shutdown_timeout_ms(),
        }
    }
}

/// How much longer than its block time a blocking read may take before its connection
/// counts as dead.
pub const BLOCKING_READ_MARGIN: Duration = std::time::Duration::from_secs(5);

/// Named defaults, one function per field so serde and the docs agree.
mod validate;
pub use validate::{validate_identifier, validate_table_name, validate_topic};

pub mod defaults {
    pub fn redis_url() -> String {
        "redis://127.0.0.1:6379".into()
    }
    pub fn redis_response_timeout_ms() -> u64 {
        5_000
    }
    pub fn redis_connect_timeout_ms() -> u64 {
        5_000
    }
    pub fn pool_size() -> usize {
        8
    }
    pub fn query_timeout_ms() -> u64 {
        5_000
    }
    pub fn outbox_table() -> String {
        "outbox".into()
    }
    pub fn inbox_table() -> String {
        "inbox".into()
    }
    pub fn relay_batch_size() -> u32 {
        1_000
    }
    pub fn relay_poll_interval_ms() -> u64 {
        1_000
    }
    pub fn linger_ms() -> u64 {
        2
    }
    pub fn relay_max_attempts() -> u32 {
        5
    }
    pub fn relay_max_entry_bytes() -> usize {
        8 * 1024 * 1024
    }
    pub fn relay_max_batch_bytes() -> usize {
        4 * 1024 * 1024
    }
    pub fn consumer_max_read_bytes() -> usize {
        4 * 1024 * 1024
    }
    pub fn consumer_max_deliveries() -> u32 {
        5
    }
    pub fn consumer_batch_size() -> u32 {
        200
    }
    pub fn consumer_concurrency() -> u32 {
        1
    }
    pub fn consumer_block_ms() -> u64 {
        2_000
    }
    pub fn consumer_claim_idle_ms() -> u64 {
        30_000
    }
    pub fn orders_table() -> String {
        "orders".into()
    }
    pub fn orders_id_column() -> String {
        "id".into()
    }
    pub fn orders_status_column() -> String {
        "status".into()
    }
    pub fn orders_updated_at_column() -> String {
        "updated_at".into()
    }
    pub fn http_listen() -> String {
        "127.0.0.1:9464".into()
    }
    pub fn yes() -> bool {
        true
    }
    pub fn shutdown_timeout_ms() -> u64 {
        30_000
    }
}

/// Values that override the file, as resolved by the command line (flag, else environment).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub redis_url: Option<String>,
    pub stream_prefix: Option<String>,
    pub http_listen: Option<String>,
}

impl Config {
    /// Reads the file (if any), applies the environment and the overrides, and validates.
    pub fn load(
        path: Option<&Path>,
        overrides: &Overrides,
        env: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let mut config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
                })?;
                Config::parse(&text).map_err(|mut e| {
                    e.key = format!("{}: {}", path.display(), e.key);
                    e
                })?
            }
            None => Config::default(),
        };
        config.apply_env(env)?;
        if let Some(url) = &overrides.redis_url {
            config.redis.url = url.clone();
        }
        if let Some(prefix) = &overrides.stream_prefix {
            config.redis.stream_prefix = prefix.clone();
        }
        if let Some(listen) = &overrides.http_listen {
            config.http.listen = listen.clone();
        }
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text; unknown keys and wrong types are errors naming the key.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let key = match e.span() {
                Some(span) => key_at(text, span.start),
                None => "config".into(),
            };
            ConfigError::new(key, e.message().to_string())
        })
    }

    /// `OUTBOXD_DATABASES_<NAME>_URL` sets (or adds) a database URL; `<NAME>` is matched
    /// case-insensitively against the configured names.
    fn apply_env(&mut self, env: &[(String, String)]) -> Result<(), ConfigError> {
        for (key, value) in env {
            let Some(rest) = key.strip_prefix("OUTBOXD_DATABASES_") else {
                continue;
            };
            let Some(name) = rest.strip_suffix("_URL") else {
                return Err(ConfigError::new(
                    key.clone(),
                    "unknown variable (expected OUTBOXD_DATABASES_<NAME>_URL)",
                ));
            };
            let lower = name.to_ascii_lowercase();
            let existing = self
                .databases
                .keys()
                .find(|k| k.eq_ignore_ascii_case(name))
                .cloned();
            match existing {
                Some(k) => {
                    if let Some(db) = self.databases.get_mut(&k) {
                        db.url = value.clone();
                    }
                }
                None => {
                    self.databases
                        .insert(lower, DatabaseConfig::with_url(value.clone()));
                }
            }
        }
        Ok(())
    }

    pub fn database(&self, name: &str) -> Result<&DatabaseConfig, ConfigError> {
        self.databases
            .get(name)
            .ok_or_else(|| ConfigError::new(format!("databases.{name}"), "not configured"))
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown.timeout_ms)
    }

    /// The longest any one operation may take before it counts as failed: a statement, a
    /// Redis command, or a blocking read (its block time plus the margin its connection's
    /// response timeout adds).
    pub fn largest_operation_bound(&self) -> Duration {
        let query = self
            .databases
            .values()
            .map(|d| d.query_timeout_ms)
            .max()
            .unwrap_or(0);
        let read = self
            .consumers
            .iter()
            .map(|c| c.block_ms + BLOCKING_READ_MARGIN.as_millis() as u64)
            .max()
            .unwrap_or(0);
        Duration::from_millis(query.max(read).max(self.redis.response_timeout_ms))
    }

    /// When a loop counts as stuck: `[watchdog] stuck_after_ms`, or three times the largest
    /// operation bound.
    pub fn stuck_after(&self) -> Duration {
        self.watchdog
            .stuck_after_ms
            .map(Duration::from_millis)
            .unwrap_or_else(|| self.largest_operation_bound() * 3)
    }
}

/// Names the TOML key at a byte offset: `table.key (line N)`, from the nearest `[table]`
/// header above and the `key =` on that line.
fn key_at(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let line_no = text[..offset].matches('\n').count() + 1;
    let lines: Vec<&str> = text.lines().collect();
    let Some(line) = lines.get(line_no - 1) else {
        return format!("line {line_no}");
    };
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"'));
    let table = lines[..line_no - 1]
        .iter()
        .rev()
        .map(|l| l.trim())
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim());
    match (table, key) {
        (Some(t), Some(k)) if !k.is_empty() => format!("{t}.{k} (line {line_no})"),
        (None, Some(k)) if !k.is_empty() => format!("{k} (line {line_no})"),
        _ => format!("line {line_no}"),
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// A URL (or key=value connection string) with any password replaced by `***`, for logs,
/// errors and `status`.
pub fn redact_url(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let after = &url[scheme_end + 3..];
        let authority_end = after.find(['/', '?', '#']).unwrap_or(after.len());
        let authority = &after[..authority_end];
        let mut out = String::with_capacity(url.len());
        out.push_str(&url[..scheme_end + 3]);
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..colon]);
                        out.push_str(":***");
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        let rest = &after[authority_end..];
        out.push_str(&redact_query_password(rest));
        out
    } else {
        // key=value form: blank out the password, quoted (`password = 'a b'`) or not.
        if let Ok(pairs) = crate::tls::key_values(url) {
            return pairs
                .iter()
                .map(|(k, v)| {
                    if k.eq_ignore_ascii_case("password") {
                        format!("{k}=***")
                    } else if v.is_empty()
                        || v.contains(|c: char| c.is_whitespace() || c == '\'' || c == '\\')
                    {
                        format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
                    } else {
                        format!("{k}={v}")
                    }
                })
                .collect::<Vec<_>>()
                .join(" ");
        }
        // Not parseable: keep nothing from the word "password" on.
        match url.to_ascii_lowercase().find("password") {
            Some(at) => format!("{}password=*** (rest not shown)", &url[..at]),
            None => url.to_string(),
        }
    }
}

fn redact_query_password(rest: &str) -> String {
    let Some(q) = rest.find('?') else {
        return rest.to_string();
    };
    let (path, query) = rest.split_at(q + 1);
    let params: Vec<String> = query
        .split('&')
        .map(|p| {
            if p.to_ascii_lowercase().starts_with("password=") {
                "password=***".to_string()
            } else {
                p.to_string()
            }
        })
        .collect();
    format!("{path}{}", params.join("&"))
}

/// Parses `250ms`, `30s`, `5m`, `2h`, `7d` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 30s, 5m, 2h or 7d"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86_400.0,
        other => {
            return Err(format!(
                "{text:?} has an unknown unit {other:?} (use ms, s, m, h or d)"
            ))
        }
    };
    if !seconds.is_finite() || !(0.0..=10.0 * 365.0 * 86_400.0).contains(&seconds) {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> &'static str {
        r#"
[databases.fulfillment]
url = "postgres://root@127.0.0.1/fulfillment"
[[relays]]
database = "fulfillment"
"#
    }

    #[test]
    fn redis_cluster_or_url_not_both() {
        let ok = Config::parse("[redis]\ncluster = [\"redis://127.0.0.1:7000\"]\n").unwrap();
        ok.validate().unwrap();
        let both = Config::parse(
            "[redis]\nurl = \"redis://other:6379\"\ncluster = [\"redis://127.0.0.1:7000\"]\n",
        )
        .unwrap();
        assert_eq!(both.validate().unwrap_err().key, "redis.cluster");
        let bad = Config::parse("[redis]\ncluster = [\"http://x\"]\n").unwrap();
        assert_eq!(bad.validate().unwrap_err().key, "redis.cluster[0]");
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(minimal()).expect("parses");
        c.validate().expect("valid");
        assert_eq!(c.relays[0].table, "outbox");
        assert_eq!(c.relays[0].batch_size, 1000);
        assert_eq!(c.redis.url, "redis://127.0.0.1:6379");
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::parse("[redis]\nurll = \"x\"\n").expect_err("unknown key");
        assert!(e.message.contains("urll"), "{e}");
        assert_eq!(e.key, "redis.urll (line 2)");
        let e = Config::parse("[redis]\nurl = 5\n").expect_err("wrong type");
        assert_eq!(e.key, "redis.url (line 2)");
    }

    #[test]
    fn unknown_database_is_named() {
        let c = Config::parse("[[relays]]\ndatabase = \"nope\"\n").expect("parses");
        let e = c.validate().expect_err("unknown db");
        assert_eq!(e.key, "relays[0].database");
        assert!(e.message.contains("nope"));
    }

    #[test]
    fn injection_in_table_name_is_rejected() {
        let text = format!("{}table = \"outbox; DROP TABLE orders\"\n", minimal());
        let e = Config::parse(&text)
            .expect("parses")
            .validate()
            .expect_err("bad table");
        assert_eq!(e.key, "relays[0].table");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/orders?sslmode=require"),
            "postgres://app:***@db:5432/orders?sslmode=require"
        );
        assert_eq!(
            redact_url("redis://:hunter2@127.0.0.1:6379/0"),
            "redis://:***@127.0.0.1:6379/0"
        );
        assert_eq!(
            redact_url("host=db user=app password=s3cret"),
            "host=db user=app password=***"
        );
        assert!(!redact_url("postgres://u@h/db?password=zz").contains("zz"));
        assert_eq!(
            redact_url("host=db password = 'two words' dbname='my db'"),
            "host=db password=*** dbname='my db'"
        );
        assert!(!redact_url("host=db password='two words").contains("words"));
    }

    #[test]
    fn env_sets_database_url() {
        let mut c = Config::parse(minimal()).expect("parses");
        c.apply_env(&[(
            "OUTBOXD_DATABASES_FULFILLMENT_URL".into(),
            "postgres://root@127.0.0.1/other".into(),
        )])
        .expect("applies");
        assert_eq!(
            c.databases["fulfillment"].url,
            "postgres://root@127.0.0.1/other"
        );
    }

    #[test]
    fn shipped_example_configs_are_valid() {
        for text in [
            include_str!("../../config/outboxd.example.toml"),
            include_str!("../../config/minimal.toml"),
        ] {
            Config::parse(text)
                .expect("parses")
                .validate()
                .expect("valid");
        }
    }

    #[test]
    fn unsupported_features_are_refused_not_ignored() {
        let e = Config::parse("[[topics]]\nname = \"t\"\npartitions = 0\n")
            .expect("parses")
            .validate()
            .expect_err("partitions");
        assert_eq!(e.key, "topics[0].partitions");
        let e = Config::parse("[databases.main]\nurl = \"postgres://u@h/d?sslmode=allow\"\n")
            .expect("parses")
            .validate()
            .expect_err("sslmode=allow");
        assert_eq!(e.key, "databases.main.url");
        let e = Config::parse("[redis]\nurl = \"rediss://127.0.0.1:6380/#insecure\"\n")
            .expect("parses")
            .validate()
            .expect_err("#insecure");
        assert_eq!(e.key, "redis.url");
    }

    #[test]
    fn tls_settings_are_accepted_and_their_files_checked() {
        for url in [
            "postgres://u:pw@h/d?sslmode=require",
            "postgres://u@h/d?sslmode=verify-full",
            "host=h user=u sslmode=verify-ca dbname=d",
            "postgres://u@h/d?sslmode=disable",
        ] {
            Config::parse(&format!("[databases.main]\nurl = \"{url}\"\n"))
                .expect("parses")
                .validate()
                .unwrap_or_else(|e| panic!("{url}: {e}"));
        }
        let e = Config::parse(
            "[databases.main]\nurl = \"postgres://u:s3cret@h/d?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem\"\n",
        )
        .expect("parses")
        .validate()
        .expect_err("missing sslrootcert");
        assert_eq!(e.key, "databases.main.url");
        assert!(e.message.contains("sslrootcert /nonexistent/ca.pem"), "{e}");
        assert!(!e.to_string().contains("s3cret"), "{e}");
        let e = Config::parse(
            "[redis]\nurl = \"rediss://h:6380\"\nca_file = \"/nonexistent/ca.pem\"\n",
        )
        .expect("parses")
        .validate()
        .expect_err("missing ca_file");
        assert_eq!(e.key, "redis.ca_file");
        assert!(e.message.contains("/nonexistent/ca.pem"), "{e}");
        let e =
            Config::parse("[redis]\nurl = \"redis://h:6379\"\nca_file = \"/nonexistent/ca.pem\"\n")
                .expect("parses")
                .validate()
                .expect_err("ca_file without TLS");
        assert_eq!(e.key, "redis.ca_file");
        assert!(e.message.contains("rediss://"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert!(parse_duration("3 weeks").is_err());
        assert!(parse_duration("").is_err());
    }
}
