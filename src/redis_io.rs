//! Redis connections: one managed, multiplexed connection per process for ordinary commands
//! (it reconnects by itself with backoff), and a dedicated connection per blocking read (a
//! `XREADGROUP ... BLOCK` would stall a shared connection, and its response timeout must
//! exceed the block time). Also stream key naming and the classification of Redis errors.

use crate::config::{redact_url, ConfigError, RedisConfig};
use crate::error::{Error, Result};
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client};
use std::time::Duration;

#[derive(Clone)]
pub struct Redis {
    client: Client,
    commands: ConnectionManager,
    prefix: String,
    connect_timeout: Duration,
    /// Topics published to several streams: topic -> number of partitions (> 1).
    partitions: std::collections::HashMap<String, u32>,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// A connection reserved for blocking reads (a BLOCK stalls every other command sent on the
/// same connection), and its Redis client id.
pub struct BlockingConnection {
    pub conn: MultiplexedConnection,
    pub client_id: i64,
}

impl std::fmt::Debug for BlockingConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockingConnection")
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

impl Redis {
    /// Creates the client; connects lazily, so a Redis that is down now is not an error here.
    pub fn new(config: &RedisConfig) -> Result<Redis> {
        // rediss:// is set up by the redis crate with rustls's process-wide provider.
        crate::tls::install_default_provider();
        let opened = match &config.ca_file {
            Some(path) => {
                let root_cert = crate::tls::read_ca_file(path)
                    .map_err(|message| ConfigError::new("redis.ca_file", message))?;
                let certificates = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                };
                Client::build_with_tls(config.url.as_str(), certificates)
            }
            None => Client::open(config.url.as_str()),
        };
        let client = opened.map_err(|e| {
            ConfigError::new(
                "redis.url",
                format!("{} is not usable: {e}", redact_url(&config.url)),
            )
        })?;
        let connect_timeout = Duration::from_millis(config.connect_timeout_ms);
        let manager_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(Duration::from_millis(config.response_timeout_ms)))
            .set_connection_timeout(Some(connect_timeout))
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(5))
            .set_number_of_retries(3);
        let commands = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)
            .map_err(Error::redis("creating the connection manager"))?;
        Ok(Redis {
            client,
            commands,
            prefix: config.stream_prefix.clone(),
            connect_timeout,
            partitions: std::collections::HashMap::new(),
        })
    }

    /// The client for a whole configuration: Redis settings plus partitioned topics.
    pub fn for_config(config: &crate::config::Config) -> Result<Redis> {
        let mut redis = Redis::new(&config.redis)?;
        redis.partitions = config
            .topics
            .iter()
            .filter_map(|t| t.partitions.filter(|p| *p > 1).map(|p| (t.name.clone(), p)))
            .collect();
        Ok(redis)
    }

    /// The shared connection for non-blocking commands. Cheap to clone.
    pub fn commands(&self) -> ConnectionManager {
        self.commands.clone()
    }

    /// A connection of its own for blocking reads of up to `block`, with the Redis client
    /// id that lets the command connection wake it early.
    pub async fn dedicated(&self, block: Duration) -> Result<BlockingConnection> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(block + Duration::from_secs(5)));
        let mut conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(Error::redis("opening a dedicated connection"))?;
        let client_id: i64 = redis::cmd("CLIENT")
            .arg("ID")
            .query_async(&mut conn)
            .await
            .map_err(Error::redis("CLIENT ID"))?;
        Ok(BlockingConnection { conn, client_id })
    }

    /// Ends a blocking read on the connection with `client_id` now, as if its time had run out (`CLIENT UNBLOCK
    /// .. TIMEOUT`). A read Redis has already answered is not affected, so whatever it
    /// delivered still arrives: nothing is left pending unseen.
    pub async fn unblock(&self, client_id: i64) -> Result<()> {
        let _: i64 = redis::cmd("CLIENT")
            .arg("UNBLOCK")
            .arg(client_id)
            .arg("TIMEOUT")
            .query_async(&mut self.commands())
            .await
            .map_err(Error::redis("CLIENT UNBLOCK"))?;
        Ok(())
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The stream key of an unpartitioned topic: the configured prefix, then the topic
    /// (exactly the topic without a prefix, as Dapr expects).
    pub fn stream_key(&self, topic: &str) -> String {
        format!("{}{}", self.prefix, topic)
    }

    /// Every stream key of a topic: one, or `<prefix><topic>:<p>` for each partition p.
    pub fn stream_keys(&self, topic: &str) -> Vec<String> {
        match self.partitions.get(topic) {
            Some(n) => (0..*n)
                .map(|p| format!("{}{}:{p}", self.prefix, topic))
                .collect(),
            None => vec![self.stream_key(topic)],
        }
    }

    /// The stream an aggregate's events of a topic go to: its partition is a stable hash of
    /// the aggregate ID, so all its events land in one stream, in order.
    pub fn stream_key_for(&self, topic: &str, aggregate_id: &str) -> String {
        match self.partitions.get(topic) {
            Some(n) => format!(
                "{}{}:{}",
                self.prefix,
                topic,
                partition_of(aggregate_id, *n)
            ),
            None => self.stream_key(topic),
        }
    }
}

/// FNV-1a (64-bit) of the aggregate ID modulo the partition count: fixed forever, since
/// changing it would move an aggregate to another stream mid-life.
pub fn partition_of(aggregate_id: &str, partitions: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in aggregate_id.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % u64::from(partitions.max(1))) as u32
}

/// Worth retrying after a backoff: the connection (not a server certificate that fails the
/// TLS check) or a server state that passes (loading,
/// read-only replica during failover, cluster reconfiguring, out of memory until trimmed).
pub fn is_transient(err: &redis::RedisError) -> bool {
    // A server certificate that fails the check is configuration, whatever its error kind.
    if crate::tls::is_certificate_error(err) {
        return false;
    }
    if err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
        || err.is_cluster_error()
    {
        return true;
    }
    matches!(
        err.code(),
        Some("LOADING" | "READONLY" | "MASTERDOWN" | "TRYAGAIN" | "CLUSTERDOWN" | "OOM" | "BUSY")
    ) || matches!(err.kind(), redis::ErrorKind::Io | redis::ErrorKind::Client)
}

/// Whether Redis rejected one command for a reason of its own row: the key holds another
/// type. Only this counts an attempt against an outbox row; everything else is the server's
/// or the connection's state.
pub fn is_row_fault(err: &redis::RedisError) -> bool {
    matches!(err.code(), Some("WRONGTYPE"))
}
