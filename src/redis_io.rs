//! Redis connections: one managed, multiplexed connection per process for ordinary commands
//! (it reconnects by itself with backoff), and a dedicated connection per blocking read (a
//! `XREADGROUP ... BLOCK` would stall a shared connection, and its response timeout must
//! exceed the block time); or, with `[redis] cluster`, the redis crate's async cluster
//! connection, with pipelines split per key so none crosses a slot. Also stream key naming
//! and the classification of Redis errors.

use crate::config::{redact_url, ConfigError, RedisConfig};
use crate::error::{Error, Result};
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, Client, Cmd, Pipeline, RedisFuture, RedisResult, Value};
use std::sync::Arc;
use std::time::Duration;

pub use crate::config::BLOCKING_READ_MARGIN;

#[derive(Clone)]
pub struct Redis {
    /// The single server's client (for dedicated connections); `None` on a cluster.
    client: Option<Client>,
    commands: Conn,
    prefix: String,
    connect_timeout: Duration,
    /// A single server over plain TCP or a Unix socket: the relays' publishing connections
    /// (resp.rs).
    publish_target: Option<crate::resp::Target>,
    /// Topics published to several streams: topic -> number of partitions (> 1).
    partitions: std::collections::HashMap<String, u32>,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("prefix", &self.prefix)
            .field("cluster", &self.is_cluster())
            .finish_non_exhaustive()
    }
}

/// A connection to a single Redis or to a Redis Cluster, used the same way by everyone:
/// every command outboxd sends names one key (or none), so the cluster client routes each
/// to its shard; pipelines go through [`pipeline_by_key`], which keeps them within one slot.
#[derive(Clone)]
pub enum Conn {
    /// The shared, self-reconnecting connection of a single server.
    Managed(Managed),
    /// A connection of its own (blocking reads) to a single server.
    Dedicated(MultiplexedConnection),
    /// The cluster connection (it follows slot moves and reconnects by itself), opened on
    /// first use so that a cluster that is down at start is retried like a lost server.
    Cluster(LazyCluster),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Conn::Managed(_) => "Conn::Managed",
            Conn::Dedicated(_) => "Conn::Dedicated",
            Conn::Cluster(_) => "Conn::Cluster",
        })
    }
}

/// The redis crate's `ConnectionManager` reconnects after a connection *error*, but a
/// command that times out leaves it on the same connection, so a peer that went silent with
/// its socket open (a hung server, a NAT that dropped its state) would time out every
/// command forever. This one is replaced by a fresh manager, on a new connection, as soon as
/// a command on it times out; commands already sent on the old one fail by their own
/// timeout.
#[derive(Clone)]
pub struct Managed {
    inner: Arc<ManagedInner>,
}

struct ManagedInner {
    client: Client,
    config: ConnectionManagerConfig,
    /// (generation, manager): a timeout replaces only the generation it happened on.
    current: std::sync::Mutex<(u64, ConnectionManager)>,
}

impl std::fmt::Debug for Managed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Managed").finish_non_exhaustive()
    }
}

impl Managed {
    fn new(client: Client, config: ConnectionManagerConfig) -> RedisResult<Managed> {
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?;
        Ok(Managed {
            inner: Arc::new(ManagedInner {
                client,
                config,
                current: std::sync::Mutex::new((0, manager)),
            }),
        })
    }

    fn get(&self) -> (u64, ConnectionManager) {
        match self.inner.current.lock() {
            Ok(current) => (current.0, current.1.clone()),
            Err(poisoned) => {
                let current = poisoned.into_inner();
                (current.0, current.1.clone())
            }
        }
    }

    /// A new connection in place of the current one, which goes when the commands in flight
    /// on it are done.
    fn renew(&self) {
        let Ok(mut current) = self.inner.current.lock() else {
            return;
        };
        match ConnectionManager::new_lazy_with_config(
            self.inner.client.clone(),
            self.inner.config.clone(),
        ) {
            Ok(manager) => *current = (current.0 + 1, manager),
            Err(e) => tracing::warn!(error = %e, "could not make a new Redis connection manager"),
        }
    }

    /// Gives up the connection of `generation` after a timeout on it.
    fn replace(&self, generation: u64) {
        let Ok(mut current) = self.inner.current.lock() else {
            return;
        };
        if current.0 != generation {
            return; // replaced already, by another command that timed out
        }
        match ConnectionManager::new_lazy_with_config(
            self.inner.client.clone(),
            self.inner.config.clone(),
        ) {
            Ok(manager) => {
                tracing::warn!("a Redis command timed out; giving up its connection for a new one");
                *current = (generation + 1, manager);
                crate::metrics::metrics()
                    .connections_replaced
                    .with_label_values(&["redis"])
                    .inc();
            }
            Err(e) => tracing::warn!(error = %e, "could not make a new Redis connection manager"),
        }
    }
}

/// The cluster connection, made on first use and made anew after a command on it timed out
/// (see [`Managed`]; the redis crate's cluster client reconnects a node only after errors).
#[derive(Clone)]
pub struct LazyCluster {
    inner: Arc<LazyClusterInner>,
}

struct LazyClusterInner {
    client: ClusterClient,
    /// (generation, connection) once made.
    slot: tokio::sync::Mutex<Option<(u64, ClusterConnection)>>,
    generations: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for LazyCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyCluster").finish_non_exhaustive()
    }
}

impl LazyCluster {
    fn new(client: ClusterClient) -> LazyCluster {
        LazyCluster {
            inner: Arc::new(LazyClusterInner {
                client,
                slot: tokio::sync::Mutex::new(None),
                generations: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    async fn get(&self) -> RedisResult<(u64, ClusterConnection)> {
        let LazyClusterInner {
            client,
            slot,
            generations,
        } = &*self.inner;
        let mut slot = slot.lock().await;
        if let Some((generation, conn)) = &*slot {
            return Ok((*generation, conn.clone()));
        }
        let conn = client.get_async_connection().await?;
        let generation = generations.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *slot = Some((generation, conn.clone()));
        Ok((generation, conn))
    }

    /// Drops the cluster connection; the next command makes a new one.
    async fn renew(&self) {
        *self.inner.slot.lock().await = None;
    }

    async fn forget(&self, generation: u64) {
        let mut slot = self.inner.slot.lock().await;
        if slot.as_ref().is_some_and(|(g, _)| *g == generation) {
            tracing::warn!(
                "a Redis Cluster command timed out; giving up the cluster connection for a new one"
            );
            *slot = None;
            crate::metrics::metrics()
                .connections_replaced
                .with_label_values(&["redis"])
                .inc();
        }
    }
}

impl Conn {
    /// Replaces the shared connection after it carried large messages: redis-rs keeps a
    /// connection's buffers at the largest size they ever reached, for as long as it lives,
    /// so without this each large batch would leave megabytes behind for good. Commands in
    /// flight on the old connection finish there. A dedicated connection's owner drops it
    /// instead.
    pub async fn renew(&self) {
        match self {
            Conn::Managed(managed) => managed.renew(),
            Conn::Dedicated(_) => {}
            Conn::Cluster(lazy) => lazy.renew().await,
        }
    }
}

fn timed_out<T>(result: &RedisResult<T>) -> bool {
    matches!(result, Err(e) if e.is_timeout())
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Managed(managed) => Box::pin(async move {
                let (generation, mut c) = managed.get();
                let result = c.req_packed_command(cmd).await;
                if timed_out(&result) {
                    managed.replace(generation);
                }
                result
            }),
            Conn::Dedicated(c) => c.req_packed_command(cmd),
            Conn::Cluster(lazy) => Box::pin(async move {
                let (generation, mut c) = lazy.get().await?;
                let result = c.req_packed_command(cmd).await;
                if timed_out(&result) {
                    lazy.forget(generation).await;
                }
                result
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Managed(managed) => Box::pin(async move {
                let (generation, mut c) = managed.get();
                let result = c.req_packed_commands(cmd, offset, count).await;
                if timed_out(&result) {
                    managed.replace(generation);
                }
                result
            }),
            Conn::Dedicated(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(lazy) => Box::pin(async move {
                let (generation, mut c) = lazy.get().await?;
                let result = c.req_packed_commands(cmd, offset, count).await;
                if timed_out(&result) {
                    lazy.forget(generation).await;
                }
                result
            }),
        }
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// Runs `commands`, each paired with the one key it touches, in as few round trips as the
/// deployment allows: one pipeline on a single server; on a cluster one pipeline per key (a
/// pipeline must stay within one slot), all sent at once. Results come back in the order of
/// `commands`, an error reply as that command's own result; a connection failure fails all.
pub async fn pipeline_by_key<K: PartialEq>(
    conn: &mut Conn,
    commands: Vec<(K, Cmd)>,
) -> RedisResult<Vec<RedisResult<Value>>> {
    if commands.is_empty() {
        return Ok(Vec::new());
    }
    let total = commands.len();
    if !matches!(conn, Conn::Cluster(_)) {
        let mut pipe = redis::pipe();
        for (_, cmd) in commands {
            pipe.add_command(cmd);
        }
        return pipe.ignore_errors().query_async(conn).await;
    }
    // one pipeline per key, remembering where each command's answer goes
    let mut groups: Vec<(K, Vec<usize>, Pipeline)> = Vec::new();
    for (i, (key, cmd)) in commands.into_iter().enumerate() {
        let at = match groups.iter().position(|(k, _, _)| *k == key) {
            Some(at) => at,
            None => {
                groups.push((key, Vec::new(), redis::pipe()));
                groups.len() - 1
            }
        };
        groups[at].1.push(i);
        groups[at].2.add_command(cmd);
    }
    let runs = groups.iter_mut().map(|(_, _, pipe)| {
        let mut conn = conn.clone();
        async move {
            pipe.ignore_errors()
                .query_async::<Vec<RedisResult<Value>>>(&mut conn)
                .await
        }
    });
    let answers = futures_util::future::join_all(runs).await;
    let mut out: Vec<Option<RedisResult<Value>>> = (0..total).map(|_| None).collect();
    for ((_, members, _), answer) in groups.iter().zip(answers) {
        for (&i, result) in members.iter().zip(answer?) {
            out[i] = Some(result);
        }
    }
    Ok(out
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                Err(redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "missing pipeline reply",
                )))
            })
        })
        .collect())
}

/// A connection reserved for blocking reads (a BLOCK stalls every other command sent on the
/// same connection), and its Redis client id (single server only: on a cluster, reads do
/// not block, see `inbox`).
pub struct BlockingConnection {
    pub conn: Conn,
    pub client_id: Option<i64>,
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
        let connect_timeout = Duration::from_millis(config.connect_timeout_ms);
        let response_timeout = Duration::from_millis(config.response_timeout_ms);
        // rediss:// is set up by the redis crate with rustls's process-wide provider.
        crate::tls::install_default_provider();
        let root_cert = match &config.ca_file {
            Some(path) => Some(
                crate::tls::read_ca_file(path)
                    .map_err(|message| ConfigError::new("redis.ca_file", message))?,
            ),
            None => None,
        };
        if !config.cluster.is_empty() {
            let mut builder = ClusterClient::builder(config.cluster.iter().map(String::as_str))
                .connection_timeout(connect_timeout)
                .response_timeout(response_timeout)
                .tcp_settings(tcp_settings(response_timeout));
            if let Some(root_cert) = root_cert {
                builder = builder.certs(redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                });
            }
            let client = builder.build().map_err(|e| {
                let nodes: Vec<String> = config.cluster.iter().map(|u| redact_url(u)).collect();
                ConfigError::new(
                    "redis.cluster",
                    format!("{} is not usable: {e}", nodes.join(", ")),
                )
            })?;
            return Ok(Redis {
                client: None,
                commands: Conn::Cluster(LazyCluster::new(client)),
                prefix: config.stream_prefix.clone(),
                connect_timeout,
                publish_target: None,
                partitions: std::collections::HashMap::new(),
            });
        }
        let opened = redis::IntoConnectionInfo::into_connection_info(config.url.as_str())
            .map(|info| info.set_tcp_settings(tcp_settings(response_timeout)))
            .and_then(|info| match root_cert {
                Some(root_cert) => {
                    let certificates = redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(root_cert),
                    };
                    Client::build_with_tls(info, certificates)
                }
                None => Client::open(info),
            });
        let client = opened.map_err(|e| {
            ConfigError::new(
                "redis.url",
                format!("{} is not usable: {e}", redact_url(&config.url)),
            )
        })?;
        let manager_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(response_timeout))
            .set_connection_timeout(Some(connect_timeout))
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(5))
            // One reconnection attempt per command: the loops retry with their own backoff,
            // and an operator command against a Redis that does not answer should fail in
            // seconds, not after a row of connect timeouts.
            .set_number_of_retries(1);
        let commands = Managed::new(client.clone(), manager_config)
            .map_err(Error::redis("creating the connection manager"))?;
        let publish_target = crate::resp::Target::of(
            client.get_connection_info(),
            tcp_settings(response_timeout),
            connect_timeout,
            response_timeout,
        );
        Ok(Redis {
            client: Some(client),
            commands: Conn::Managed(commands),
            prefix: config.stream_prefix.clone(),
            connect_timeout,
            publish_target,
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

    /// Whether this is a Redis Cluster (streams spread over shards).
    pub fn is_cluster(&self) -> bool {
        matches!(self.commands, Conn::Cluster(_))
    }

    /// A publishing connection of its own for a relay (made on first use), on a single
    /// server reached without TLS; else `None`, and the relay publishes on [`Redis::commands`].
    pub fn publisher(&self) -> Option<crate::resp::Publisher> {
        self.publish_target.clone().map(crate::resp::Publisher::new)
    }

    /// The shared connection for non-blocking commands. Cheap to clone.
    pub fn commands(&self) -> Conn {
        self.commands.clone()
    }

    /// A connection of its own for blocking reads of up to `block`, with the Redis client
    /// id that lets the command connection wake it early. On a cluster, the shared one.
    pub async fn dedicated(&self, block: Duration) -> Result<BlockingConnection> {
        let Some(client) = &self.client else {
            return Ok(BlockingConnection {
                conn: self.commands(),
                client_id: None,
            });
        };
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(block + BLOCKING_READ_MARGIN));
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(Error::redis("opening a dedicated connection"))?;
        let client_id: i64 = redis::cmd("CLIENT")
            .arg("ID")
            .query_async(&mut conn)
            .await
            .map_err(Error::redis("CLIENT ID"))?;
        Ok(BlockingConnection {
            conn: Conn::Dedicated(conn),
            client_id: Some(client_id),
        })
    }

    /// Ends a blocking read on the connection with `client_id` now, as if its time had run
    /// out (`CLIENT UNBLOCK .. TIMEOUT`). A read Redis has already answered is not affected,
    /// so whatever it delivered still arrives: nothing is left pending unseen.
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

    /// Whether the topic is spread over partition streams.
    pub fn is_partitioned(&self, topic: &str) -> bool {
        self.partitions.contains_key(topic)
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

/// Every Redis socket: no Nagle delay; keepalive probes after 10 s of silence, every 5 s, 2
/// retries; unacknowledged data given up after the response timeout (`TCP_USER_TIMEOUT`), so
/// that a peer that vanished is noticed by the kernel even while nothing is being asked.
pub(crate) fn tcp_settings(response_timeout: Duration) -> redis::io::tcp::TcpSettings {
    let keepalive = redis::io::tcp::socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(5))
        .with_retries(2);
    redis::io::tcp::TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(keepalive)
        .set_user_timeout(response_timeout)
}

/// FNV-1a (64-bit) of the aggregate ID modulo the partition count: fixed forever, since
/// changing it would move an aggregate to another stream mid-life.
pub fn partition_of(aggregate_id: &str, partitions: u32) -> u32 {
    (crate::fnv::fnv1a64(aggregate_id.as_bytes()) % u64::from(partitions.max(1))) as u32
}

/// A reply's text, for the replies that are strings (bulk or simple) of valid UTF-8.
pub fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// Whether Redis rejected one command for a reason of its own row: the key holds another
/// type. Only this counts an attempt against an outbox row; everything else is the server's
/// or the connection's state.
pub fn is_row_fault(err: &redis::RedisError) -> bool {
    matches!(err.code(), Some("WRONGTYPE"))
}
