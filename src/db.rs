//! PostgreSQL connections: one deadpool pool per configured database, dedicated connections
//! for LISTEN, TLS as the connection string's `sslmode` asks (see [`crate::tls`]), identifier
//! quoting, and the classification of database errors into "retry after backoff" and "give
//! up" by SQLSTATE.

use crate::config::{redact_url, ConfigError, DatabaseConfig};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres_rustls::MakeRustlsConnect;

/// The stream of a connection that may or may not have negotiated TLS.
pub type PgStream = <MakeRustlsConnect as MakeTlsConnect<tokio_postgres::Socket>>::Stream;

/// Everything needed to connect to one database: tokio-postgres's settings and the TLS
/// connector that the connection string's `sslmode` and `sslrootcert` call for.
#[derive(Clone)]
pub struct PgTarget {
    pub config: tokio_postgres::Config,
    pub tls: MakeRustlsConnect,
    /// The database's `query_timeout_ms`: the bound of one statement or transaction step.
    pub query_timeout: std::time::Duration,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // tokio-postgres's Debug shows the password as `_`.
        f.debug_struct("PgTarget")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Builds the pool of one database. Connections are made lazily, so this does not fail when
/// the server is down; the first use does, and is retried by the caller.
pub fn pool(name: &str, db: &DatabaseConfig) -> Result<Pool, ConfigError> {
    let target = pg_config(name, db)?;
    // A pooled connection is checked with an empty query, bounded (by the query timeout, at
    // most 2 s: an empty query answers in well under a millisecond), each time it is handed
    // out: one whose peer went silent (its statement timed out, or it idled while a load
    // balancer dropped its state) is thrown away there, instead of stalling the next user.
    // One round trip per checkout, which every caller amortises over a batch.
    let manager = Manager::from_config(
        target.config,
        target.tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Verified,
        },
    );
    Pool::builder(manager)
        .max_size(db.pool_size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(std::time::Duration::from_secs(30)))
        .create_timeout(Some(
            db.query_timeout().max(std::time::Duration::from_secs(1)),
        ))
        .recycle_timeout(Some(
            db.query_timeout().min(std::time::Duration::from_secs(2)),
        ))
        .build()
        .map_err(|e| ConfigError::new(format!("databases.{name}"), e.to_string()))
}

/// Parses a database's connection string into tokio-postgres settings plus TLS: `sslmode`
/// and `sslrootcert` are taken out first (tokio-postgres knows neither verify-ca nor
/// verify-full nor root certificates) and applied here. Errors name `databases.<name>.url`.
pub fn pg_config(name: &str, db: &DatabaseConfig) -> Result<PgTarget, ConfigError> {
    let key = format!("databases.{name}.url");
    let invalid = |e: &dyn std::fmt::Display| {
        ConfigError::new(
            key.clone(),
            format!(
                "{} is not a valid connection string: {e}",
                redact_url(&db.url)
            ),
        )
    };
    let (rest, tls) = crate::tls::split_pg_tls(&db.url).map_err(|e| invalid(&e))?;
    // With the cause: tokio-postgres says "invalid connection string", its cause which option.
    let mut config: tokio_postgres::Config = rest
        .parse()
        .map_err(|e: tokio_postgres::Error| invalid(&crate::error::chain(&e)))?;
    config.ssl_mode(tls.mode.negotiation());
    if config.get_application_name().is_none() {
        config.application_name("outboxd");
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(std::time::Duration::from_secs(10));
    }
    // A peer that vanishes without a word (a failed-over primary's old address, a NAT that
    // dropped its state) is noticed by the kernel even on an idle connection: keepalive
    // probes after 10 s of silence, and unacknowledged data given up after the query timeout.
    // A peer that still acknowledges at TCP level but never answers is the bounded
    // operations' job (`bounded`), and the pool's check on checkout.
    config.keepalives(true);
    config.keepalives_idle(std::time::Duration::from_secs(10));
    config.keepalives_interval(std::time::Duration::from_secs(5));
    config.keepalives_retries(2);
    config.tcp_user_timeout(db.query_timeout());
    let client_config = tls
        .client_config()
        .map_err(|e| ConfigError::new(key.clone(), e))?;
    Ok(PgTarget {
        config,
        tls: MakeRustlsConnect::new(client_config),
        query_timeout: db.query_timeout(),
    })
}

/// `operation`, or `Error::Timeout` naming PostgreSQL and `context` when it has not finished
/// within `limit`. The caller must give up the connection the operation ran on (an
/// [`OpenTransaction`] does so when dropped; the pool's checkout check catches a pooled
/// connection handed back).
pub async fn bounded<T, E>(
    limit: std::time::Duration,
    context: &str,
    operation: impl std::future::Future<Output = Result<T, E>>,
) -> crate::error::Result<T>
where
    E: Into<crate::error::Error>,
{
    match tokio::time::timeout(limit, operation).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => Err(crate::error::Error::Timeout {
            server: "PostgreSQL",
            context: context.to_string(),
            after_ms: limit.as_millis() as u64,
        }),
    }
}

/// Closes every idle connection of the pool, saying why. After an operation on one of its
/// connections ran out of time: a silent peer (a NAT or load balancer that lost its state, a
/// hung server) has usually silenced the idle ones too, and checking each on checkout would
/// cost a check timeout apiece, where connecting anew costs one round trip. After the server
/// refused a write as read-only: the sessions were made on a standby (or with
/// `default_transaction_read_only`, which a session keeps from its start), and only new
/// ones can reach the primary the address now points to.
pub fn forget_idle(pool: &Pool, why: &str) {
    let removed = pool.retain(|_, _| false).removed.len();
    tracing::warn!(
        closed_idle = removed,
        "{why}; its connection and the pool's idle ones are given up"
    );
    crate::metrics::metrics()
        .connections_replaced
        .with_label_values(&["postgres"])
        .inc_by(removed as u64 + 1);
}

/// What a loop does with its pool after a failure: when a PostgreSQL operation ran out of
/// time, or the server refused a write as read-only, the idle connections go too (see
/// [`forget_idle`]); the failed operation's own connection was closed with its transaction.
pub fn after_failure(pool: &Pool, error: &crate::error::Error) {
    match error {
        crate::error::Error::Timeout {
            server: "PostgreSQL",
            ..
        } => forget_idle(pool, "a PostgreSQL operation timed out"),
        crate::error::Error::Postgres { source, .. }
            if source.code() == Some(&SqlState::READ_ONLY_SQL_TRANSACTION) =>
        {
            forget_idle(pool, "PostgreSQL refused a write (read-only session)")
        }
        _ => {}
    }
}

/// The pools of a process, by database name.
pub type Pools = std::collections::HashMap<String, Pool>;

/// One pool per configured database.
pub fn pools(config: &crate::config::Config) -> crate::error::Result<Pools> {
    config
        .databases
        .iter()
        .map(|(name, db)| Ok((name.clone(), pool(name, db)?)))
        .collect()
}

/// A dedicated connection (not from the pool), whose `Connection` half the caller drives.
pub async fn connect_dedicated(
    target: &PgTarget,
) -> Result<
    (
        tokio_postgres::Client,
        tokio_postgres::Connection<tokio_postgres::Socket, PgStream>,
    ),
    tokio_postgres::Error,
> {
    target.config.connect(target.tls.clone()).await
}

/// A transaction begun by hand on a pooled connection, so that `BEGIN` can travel in the same
/// round trip as the transaction's first statement (tokio-postgres's own `transaction()`
/// waits for it alone). Dropped while still open (an error, a cancelled future), it takes
/// the connection out of the pool and closes it, which makes the server roll back: a
/// connection never goes back to the pool in the middle of a transaction.
pub struct OpenTransaction {
    client: Option<deadpool_postgres::Object>,
    /// Close the connection when the transaction ends instead of pooling it.
    close_when_done: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for OpenTransaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenTransaction")
            .field("open", &self.client.is_some())
            .finish()
    }
}

impl OpenTransaction {
    /// Takes charge of `client`, on which the caller is about to send `BEGIN`.
    pub fn new(client: deadpool_postgres::Object) -> OpenTransaction {
        OpenTransaction {
            client: Some(client),
            close_when_done: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The connection is closed when the transaction ends, not pooled: for a transaction that
    /// carried large messages, whose buffers the connection would otherwise keep (tokio-postgres
    /// never shrinks them) for as long as it lives in the pool.
    pub fn close_when_done(&self) {
        self.close_when_done
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The connection, for the transaction's statements.
    pub fn client(&self) -> &deadpool_postgres::Object {
        // Always Some until commit or rollback consume self.
        self.client.as_ref().unwrap_or_else(|| unreachable!())
    }

    pub async fn commit(self) -> Result<(), tokio_postgres::Error> {
        self.end("COMMIT").await
    }

    pub async fn rollback(self) -> Result<(), tokio_postgres::Error> {
        self.end("ROLLBACK").await
    }

    /// Rolls back and keeps the connection for statements of its own (it goes back to the
    /// pool when the caller drops it), so that no other pool user can take it in between.
    pub async fn rollback_and_keep(
        mut self,
    ) -> Result<deadpool_postgres::Object, tokio_postgres::Error> {
        self.client().batch_execute("ROLLBACK").await?;
        Ok(self.client.take().unwrap_or_else(|| unreachable!()))
    }

    /// Ends the transaction; the connection goes back to the pool only if that worked.
    async fn end(self, statement: &str) -> Result<(), tokio_postgres::Error> {
        self.client().batch_execute(statement).await?;
        self.ended();
        Ok(())
    }

    /// The caller's own `COMMIT` (sent in a pipeline with the last statements) succeeded:
    /// the connection goes back to the pool, or is closed if `close_when_done`.
    pub fn ended(mut self) {
        match self.client.take() {
            Some(client)
                if self
                    .close_when_done
                    .load(std::sync::atomic::Ordering::Relaxed) =>
            {
                drop(deadpool_postgres::Object::take(client))
            }
            _ => {} // back to the pool
        }
    }
}

impl Drop for OpenTransaction {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

/// `"schema"."table"` or `"table"` for a name that config validation has already checked.
pub fn quote_qualified(name: &str) -> String {
    name.split('.')
        .map(quote_ident)
        .collect::<Vec<_>>()
        .join(".")
}

/// Quotes one identifier, doubling embedded quotes (validated names have none; this is the
/// second line of defence).
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// A SQL string literal.
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The last part of `schema.table`.
pub fn bare_name(name: &str) -> &str {
    name.rsplit('.').next().unwrap_or(name)
}
