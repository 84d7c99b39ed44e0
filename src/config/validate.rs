//! Validation: each section's `validate` (`[redis]`, `[databases.<name>]`, `[http]`), each
//! relay, consumer and topic entry by its own function, and what spans sections (a relay's
//! or consumer's database, retention horizons, names used twice). Every error names the key.
//! The identifier, table-name and topic checks are shared with the command line's flags.

use super::*;

impl Config {
    /// Rejects what cannot work, naming the key: each section by its own `validate`, then
    /// what spans sections (a relay's or consumer's database, retention horizons, names used
    /// twice).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.redis.validate()?;
        for (name, db) in &self.databases {
            db.validate(name)?;
        }
        for (i, relay) in self.relays.iter().enumerate() {
            self.validate_relay(i, relay)?;
        }
        for (i, consumer) in self.consumers.iter().enumerate() {
            self.validate_consumer(i, consumer)?;
        }
        self.http.validate()?;
        for (i, topic) in self.topics.iter().enumerate() {
            self.validate_topic_entry(i, topic)?;
        }
        positive("shutdown.timeout_ms", self.shutdown.timeout_ms)?;
        Ok(())
    }

    /// `relays[i]`.
    fn validate_relay(&self, i: usize, relay: &RelayConfig) -> Result<(), ConfigError> {
        let key = format!("relays[{i}]");
        self.known_database(&format!("{key}.database"), &relay.database)?;
        validate_table_name(&format!("{key}.table"), &relay.table)?;
        if relay.batch_size == 0 || relay.batch_size > 100_000 {
            return Err(ConfigError::new(
                format!("{key}.batch_size"),
                "must be between 1 and 100000",
            ));
        }
        positive(&format!("{key}.poll_interval_ms"), relay.poll_interval_ms)?;
        if relay.linger_ms > 1000 {
            return Err(ConfigError::new(
                format!("{key}.linger_ms"),
                "must be at most 1000",
            ));
        }
        positive(
            &format!("{key}.max_attempts"),
            u64::from(relay.max_attempts),
        )?;
        if relay.max_entry_bytes < 1024 || relay.max_entry_bytes > 512 * 1024 * 1024 {
            return Err(ConfigError::new(
                format!("{key}.max_entry_bytes"),
                "must be between 1024 and 536870912",
            ));
        }
        if relay.max_batch_bytes < 64 * 1024 || relay.max_batch_bytes > 1024 * 1024 * 1024 {
            return Err(ConfigError::new(
                format!("{key}.max_batch_bytes"),
                "must be between 65536 and 1073741824",
            ));
        }
        if relay.archive_retention_hours > 24 * 366 {
            return Err(ConfigError::new(
                format!("{key}.archive_retention_hours"),
                "must be at most 8784 (a year)",
            ));
        }
        if let Some(source) = &relay.source {
            validate_text(&format!("{key}.source"), source, 1000, false)?;
        }
        let duplicate = self.relays[..i]
            .iter()
            .any(|o| o.database == relay.database && o.table == relay.table);
        if duplicate {
            return Err(ConfigError::new(
                key,
                format!(
                    "relays the table {} of database {} a second time",
                    relay.table, relay.database
                ),
            ));
        }
        Ok(())
    }

    /// `consumers[i]`.
    fn validate_consumer(&self, i: usize, consumer: &ConsumerConfig) -> Result<(), ConfigError> {
        let key = format!("consumers[{i}]");
        validate_text(&format!("{key}.name"), &consumer.name, 200, false)?;
        if consumer.max_read_bytes < 64 * 1024 || consumer.max_read_bytes > 1024 * 1024 * 1024 {
            return Err(ConfigError::new(
                format!("{key}.max_read_bytes"),
                "must be between 65536 and 1073741824",
            ));
        }
        self.known_database(&format!("{key}.database"), &consumer.database)?;
        if consumer.streams.is_empty() {
            return Err(ConfigError::new(
                format!("{key}.streams"),
                "must name at least one stream",
            ));
        }
        for (j, stream) in consumer.streams.iter().enumerate() {
            validate_topic(&format!("{key}.streams[{j}]"), stream)?;
        }
        consumer.handler_choice(&key)?;
        positive(
            &format!("{key}.max_deliveries"),
            u64::from(consumer.max_deliveries),
        )?;
        if consumer.batch_size == 0 || consumer.batch_size > 10_000 {
            return Err(ConfigError::new(
                format!("{key}.batch_size"),
                "must be between 1 and 10000",
            ));
        }
        let pool_size = self
            .databases
            .get(&consumer.database)
            .map_or(usize::MAX, |d| d.pool_size);
        if consumer.concurrency == 0 || consumer.concurrency as usize > pool_size.min(64) {
            return Err(ConfigError::new(
                format!("{key}.concurrency"),
                format!(
                    "must be between 1 and the pool_size of database {:?} ({}), at most 64",
                    consumer.database,
                    pool_size.min(64)
                ),
            ));
        }
        positive(&format!("{key}.block_ms"), consumer.block_ms)?;
        if consumer.linger_ms > 1000 {
            return Err(ConfigError::new(
                format!("{key}.linger_ms"),
                "must be at most 1000",
            ));
        }
        positive(&format!("{key}.claim_idle_ms"), consumer.claim_idle_ms)?;
        if let Some(name) = &consumer.consumer_name {
            validate_text(&format!("{key}.consumer_name"), name, 200, false)?;
        }
        validate_table_name(&format!("{key}.inbox_table"), &consumer.inbox_table)?;
        validate_table_name(&format!("{key}.outbox_table"), &consumer.outbox_table)?;
        let o = &consumer.orders;
        validate_table_name(&format!("{key}.orders.table"), &o.table)?;
        validate_identifier(&format!("{key}.orders.id_column"), &o.id_column)?;
        validate_identifier(&format!("{key}.orders.status_column"), &o.status_column)?;
        validate_identifier(
            &format!("{key}.orders.updated_at_column"),
            &o.updated_at_column,
        )?;
        crate::handlers::rules::StatusMapping::with_overrides(
            consumer
                .status_mapping
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        )
        .map_err(|message| ConfigError::new(format!("{key}.status_mapping"), message))?;
        if consumer.inbox_retention_hours > 0 {
            let replay = self
                .relays
                .iter()
                .map(|r| r.archive_retention_hours)
                .max()
                .unwrap_or(0);
            let stream_age = self
                .topics
                .iter()
                .filter(|t| consumer.streams.contains(&t.name))
                .filter_map(|t| t.max_age_hours)
                .max()
                .unwrap_or(0);
            let horizon = replay.max(stream_age).max(24);
            if consumer.inbox_retention_hours <= horizon {
                return Err(ConfigError::new(
                    format!("{key}.inbox_retention_hours"),
                    format!(
                        "{} hours is not longer than the redelivery horizon of {horizon} hours (relays' archive_retention_hours, the streams' max_age_hours, at least 24): an event redelivered after its inbox row is gone would apply twice",
                        consumer.inbox_retention_hours
                    ),
                ));
            }
        }
        if self.consumers[..i].iter().any(|o| o.name == consumer.name) {
            return Err(ConfigError::new(
                format!("{key}.name"),
                format!("consumer name {:?} is used twice", consumer.name),
            ));
        }
        Ok(())
    }

    /// `topics[i]`.
    fn validate_topic_entry(&self, i: usize, topic: &TopicConfig) -> Result<(), ConfigError> {
        validate_topic(&format!("topics[{i}].name"), &topic.name)?;
        if let Some(p) = topic.partitions {
            if p == 0 || p > 1024 {
                return Err(ConfigError::new(
                    format!("topics[{i}].partitions"),
                    "must be between 1 and 1024",
                ));
            }
        }
        if self.topics[..i].iter().any(|t| t.name == topic.name) {
            return Err(ConfigError::new(
                format!("topics[{i}].name"),
                format!("topic {:?} is configured twice", topic.name),
            ));
        }
        Ok(())
    }

    fn known_database(&self, key: &str, name: &str) -> Result<(), ConfigError> {
        if self.databases.contains_key(name) {
            return Ok(());
        }
        let known: Vec<&str> = self.databases.keys().map(String::as_str).collect();
        Err(ConfigError::new(
            key,
            format!(
                "unknown database {name:?} (configured: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ),
        ))
    }
}

pub(super) fn positive(key: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(ConfigError::new(key, "must be greater than 0"));
    }
    Ok(())
}

pub(super) fn validate_text(
    key: &str,
    value: &str,
    max: usize,
    empty_ok: bool,
) -> Result<(), ConfigError> {
    if value.is_empty() && !empty_ok {
        return Err(ConfigError::new(key, "must not be empty"));
    }
    if value.len() > max {
        return Err(ConfigError::new(
            key,
            format!("is {} bytes long; at most {max} allowed", value.len()),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(ConfigError::new(key, "must not contain control characters"));
    }
    Ok(())
}

impl ConsumerConfig {
    /// The handler with what it needs, or the error naming the key under `key` (the
    /// consumer's own key, e.g. `consumers[0]`).
    pub fn handler_choice(&self, key: &str) -> Result<HandlerChoice, ConfigError> {
        match (self.handler, &self.function) {
            (HandlerKind::OrderStatus, _) => Ok(HandlerChoice::OrderStatus),
            (HandlerKind::Sql, Some(function)) => {
                validate_table_name(&format!("{key}.function"), function)?;
                Ok(HandlerChoice::Sql {
                    function: function.clone(),
                })
            }
            (HandlerKind::Sql, None) => Err(ConfigError::new(
                format!("{key}.function"),
                "handler = \"sql\" needs function = \"<name of a PostgreSQL function>\"",
            )),
        }
    }

    /// Whether this consumer moves orders (and so writes `order.status_changed` events to its
    /// database's outbox).
    pub fn moves_orders(&self) -> bool {
        self.handler == HandlerKind::OrderStatus
    }
}

impl RedisConfig {
    /// `[redis]`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let r = self;
        if r.url.is_empty() {
            return Err(ConfigError::new("redis.url", "must not be empty"));
        }
        if !(r.url.starts_with("redis://")
            || r.url.starts_with("rediss://")
            || r.url.starts_with("unix://"))
        {
            return Err(ConfigError::new(
                "redis.url",
                format!("{} is not a redis:// or rediss:// URL", redact_url(&r.url)),
            ));
        }
        if !r.cluster.is_empty() && r.url != defaults::redis_url() {
            return Err(ConfigError::new(
                "redis.cluster",
                "set either redis.url (one server) or redis.cluster (seed nodes), not both",
            ));
        }
        for (i, node) in r.cluster.iter().enumerate() {
            if !(node.starts_with("redis://") || node.starts_with("rediss://")) {
                return Err(ConfigError::new(
                    format!("redis.cluster[{i}]"),
                    format!("{} is not a redis:// or rediss:// URL", redact_url(node)),
                ));
            }
        }
        if r.url.contains("#insecure") {
            return Err(ConfigError::new(
                "redis.url",
                "#insecure (TLS without checking the server's certificate) is not supported: set redis.ca_file to the CA that signed the server's certificate",
            ));
        }
        if let Some(ca_file) = &r.ca_file {
            let tls = if r.cluster.is_empty() {
                r.url.starts_with("rediss://")
            } else {
                r.cluster.iter().all(|n| n.starts_with("rediss://"))
            };
            if !tls {
                return Err(ConfigError::new(
                    "redis.ca_file",
                    format!(
                        "is set, but redis.url {} (or a redis.cluster node) is not a rediss:// (TLS) URL",
                        redact_url(&r.url)
                    ),
                ));
            }
            crate::tls::read_ca_file(ca_file)
                .map_err(|message| ConfigError::new("redis.ca_file", message))?;
        }
        validate_text("redis.stream_prefix", &r.stream_prefix, 200, true)?;
        positive("redis.response_timeout_ms", r.response_timeout_ms)?;
        positive("redis.connect_timeout_ms", r.connect_timeout_ms)?;
        Ok(())
    }
}

impl DatabaseConfig {
    /// `[databases.<name>]`.
    pub fn validate(&self, name: &str) -> Result<(), ConfigError> {
        let db = self;
        let key = format!("databases.{name}");
        validate_identifier(&key, name)?;
        if db.url.trim().is_empty() {
            return Err(ConfigError::new(format!("{key}.url"), "missing URL"));
        }
        // sslmode, sslrootcert (the CA file must be readable and hold certificates) and
        // everything tokio-postgres checks, by building the settings as a connection would.
        crate::db::pg_config(name, db)?;
        if db.pool_size == 0 || db.pool_size > 1000 {
            return Err(ConfigError::new(
                format!("{key}.pool_size"),
                "must be between 1 and 1000",
            ));
        }
        positive(&format!("{key}.query_timeout_ms"), db.query_timeout_ms)?;
        Ok(())
    }
}

impl HttpConfig {
    /// `[http]`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.listen.is_empty() {
            self.listen.parse::<std::net::SocketAddr>().map_err(|e| {
                ConfigError::new(
                    "http.listen",
                    format!(
                        "{:?} is not an address like 127.0.0.1:9464: {e}",
                        self.listen
                    ),
                )
            })?;
        }
        Ok(())
    }
}

/// A topic becomes a stream key: printable, no spaces, bounded.
pub fn validate_topic(key: &str, topic: &str) -> Result<(), ConfigError> {
    validate_text(key, topic, 200, false)?;
    if topic.chars().any(char::is_whitespace) {
        return Err(ConfigError::new(
            key,
            format!("{topic:?} contains white space"),
        ));
    }
    Ok(())
}

/// A plain SQL identifier: letters, digits and `_`, not starting with a digit, at most 63
/// bytes. Everything outboxd splices into SQL passes this check and is then quoted too.
pub fn validate_identifier(key: &str, ident: &str) -> Result<(), ConfigError> {
    let ok = !ident.is_empty()
        && ident.len() <= 63
        && ident
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && ident.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(
            key,
            format!(
                "{:?} is not a valid identifier (letters, digits and _, not starting with a digit, at most 63 characters)",
                truncate(ident, 80)
            ),
        ))
    }
}

/// `table` or `schema.table`, each part an identifier.
pub fn validate_table_name(key: &str, name: &str) -> Result<(), ConfigError> {
    let mut parts = name.split('.');
    let (first, second, rest) = (parts.next(), parts.next(), parts.next());
    match (first, second, rest) {
        (Some(t), None, None) => validate_identifier(key, t),
        (Some(s), Some(t), None) => {
            validate_identifier(key, s)?;
            validate_identifier(key, t)
        }
        _ => Err(ConfigError::new(
            key,
            format!("{:?} must be table or schema.table", truncate(name, 80)),
        )),
    }
}
