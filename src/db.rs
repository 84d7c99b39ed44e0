//! PostgreSQL connections: one deadpool pool per configured database, dedicated connections
//! for LISTEN, identifier quoting, and the classification of database errors into "retry
//! after backoff" and "give up" by SQLSTATE.

use crate::config::{redact_url, ConfigError, DatabaseConfig};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

/// Builds the pool of one database. Connections are made lazily, so this does not fail when
/// the server is down; the first use does, and is retried by the caller.
pub fn pool(name: &str, db: &DatabaseConfig) -> Result<Pool, ConfigError> {
    let pg_config = pg_config(name, db)?;
    let manager = Manager::from_config(
        pg_config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(db.pool_size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(std::time::Duration::from_secs(30)))
        .create_timeout(Some(std::time::Duration::from_secs(10)))
        .build()
        .map_err(|e| ConfigError::new(format!("databases.{name}"), e.to_string()))
}

pub fn pg_config(name: &str, db: &DatabaseConfig) -> Result<tokio_postgres::Config, ConfigError> {
    let mut config: tokio_postgres::Config = db.url.parse().map_err(|e| {
        ConfigError::new(
            format!("databases.{name}.url"),
            format!(
                "{} is not a valid connection string: {e}",
                redact_url(&db.url)
            ),
        )
    })?;
    if config.get_application_name().is_none() {
        config.application_name("outboxd");
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(std::time::Duration::from_secs(10));
    }
    Ok(config)
}

/// A dedicated connection (not from the pool), whose `Connection` half the caller drives.
pub async fn connect_dedicated(
    config: &tokio_postgres::Config,
) -> Result<
    (
        tokio_postgres::Client,
        tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>,
    ),
    tokio_postgres::Error,
> {
    config.connect(NoTls).await
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

/// Whether a database error is worth retrying after a backoff: the server went away or is
/// starting or shutting down, the connection broke, a deadlock or serialization failure, too
/// many connections. Anything else (a missing table, a permission, a syntax error) will not
/// cure itself.
pub fn is_transient(err: &tokio_postgres::Error) -> bool {
    if err.is_closed() {
        return true;
    }
    match err.code() {
        None => true, // I/O, timeouts, protocol: the connection, not the statement
        Some(code) => is_transient_state(code),
    }
}

pub fn is_transient_state(code: &SqlState) -> bool {
    let c = code.code();
    c.starts_with("08") // connection exception
        || c.starts_with("53") // insufficient resources
        || c.starts_with("57P") // admin/crash shutdown, cannot connect now
        || c == "40001" // serialization failure
        || c == "40P01" // deadlock detected
        || c == "55P03" // lock not available
        || c == "25006" // read-only transaction: a standby after failover
        || c == "57014" // query cancelled (statement_timeout)
}

pub fn pool_error_is_transient(err: &deadpool_postgres::PoolError) -> bool {
    match err {
        deadpool_postgres::PoolError::Backend(e) => is_transient(e),
        deadpool_postgres::PoolError::Timeout(_) => true,
        deadpool_postgres::PoolError::Closed => false,
        deadpool_postgres::PoolError::NoRuntimeSpecified => false,
        deadpool_postgres::PoolError::PostCreateHook(_) => true,
    }
}
