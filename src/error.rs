//! The top-level error: what went wrong, whether retrying can cure it, and the process exit
//! code it maps to (SPEC section 5: 1 for a runtime failure, 2 for bad usage or configuration).

use crate::config::ConfigError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("PostgreSQL ({context}): {source}")]
    Postgres {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("PostgreSQL pool ({context}): {source}")]
    Pool {
        context: String,
        #[source]
        source: deadpool_postgres::PoolError,
    },
    #[error("Redis ({context}): {source}")]
    Redis {
        context: String,
        #[source]
        source: redis::RedisError,
    },
    /// A server gave no answer within the operation's bound. The connection it was on is
    /// given up (never pooled or reused again); retrying gets a new one.
    #[error("{server} ({context}): no answer within {after_ms} ms; connection given up")]
    Timeout {
        server: &'static str,
        context: String,
        after_ms: u64,
    },
    /// A loop of the daemon failed for good; what it failed on is the source, so whether it
    /// was transient and its exit code are still known.
    #[error("{name}")]
    Loop {
        name: String,
        #[source]
        source: Box<Error>,
    },
    /// A loop's task panicked.
    #[error("a loop panicked: {0}")]
    Panicked(String),
    /// What a database holds cannot work as it is (a missing table, a sequence that caches
    /// ids): refused, saying what to do.
    #[error("{context}: {reason}")]
    Refused { context: String, reason: String },
    /// A server answered what outboxd never expects of it.
    #[error("{command}: unexpected reply {reply}")]
    UnexpectedReply { command: String, reply: String },
    /// The HTTP endpoint's address cannot be listened on.
    #[error("http.listen {address}: {source}")]
    Listen {
        address: String,
        #[source]
        source: std::io::Error,
    },
    /// An operator command could not do all it was asked; the text says what is missing.
    #[error("{0}")]
    Incomplete(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn pg(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> Error {
        let context = context.into();
        move |source| Error::Postgres { context, source }
    }

    pub fn pool(context: impl Into<String>) -> impl FnOnce(deadpool_postgres::PoolError) -> Error {
        let context = context.into();
        move |source| Error::Pool { context, source }
    }

    pub fn redis(context: impl Into<String>) -> impl FnOnce(redis::RedisError) -> Error {
        let context = context.into();
        move |source| Error::Redis { context, source }
    }

    /// Worth retrying after a backoff: the server or the connection, not the request.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Loop { source, .. } => source.is_transient(),
            Error::Config(_)
            | Error::Panicked(_)
            | Error::Refused { .. }
            | Error::UnexpectedReply { .. }
            | Error::Listen { .. }
            | Error::Incomplete(_) => false,
            Error::Postgres { source, .. } => postgres_is_transient(source),
            Error::Pool { source, .. } => pool_is_transient(source),
            Error::Redis { source, .. } => redis_is_transient(source),
            Error::Timeout { .. } => true,
        }
    }

    /// Whether a server stopped answering (a bounded operation ran out of time).
    pub fn is_timeout(&self) -> bool {
        match self {
            Error::Timeout { .. } => true,
            Error::Redis { source, .. } => source.is_timeout(),
            Error::Pool { source, .. } => {
                matches!(source, deadpool_postgres::PoolError::Timeout(_))
            }
            _ => false,
        }
    }

    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) => 2,
            Error::Loop { source, .. } => source.exit_code(),
            _ => 1,
        }
    }
}

// Which failures pass: the classification every retry decision rests on, per server.

/// Whether a database error is worth retrying after a backoff: the server went away or is
/// starting or shutting down, the connection broke, a deadlock or serialization failure, too
/// many connections. Anything else (a missing table, a permission, a syntax error, a server
/// certificate that fails the `sslmode` check) will not cure itself.
pub fn postgres_is_transient(err: &tokio_postgres::Error) -> bool {
    if crate::tls::is_certificate_error(err) {
        return false;
    }
    if err.is_closed() {
        return true;
    }
    // tokio-postgres has no public kind for a connection string it cannot use as it is (a
    // server asking for a password the URL does not have, say); its message is stable, and
    // retrying cannot cure it.
    if err.code().is_none() && err.to_string().starts_with("invalid configuration") {
        return false;
    }
    match err.code() {
        None => true, // I/O, timeouts, protocol: the connection, not the statement
        Some(code) => sqlstate_is_transient(code),
    }
}

pub fn sqlstate_is_transient(code: &tokio_postgres::error::SqlState) -> bool {
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

pub fn pool_is_transient(err: &deadpool_postgres::PoolError) -> bool {
    match err {
        deadpool_postgres::PoolError::Backend(e) => postgres_is_transient(e),
        deadpool_postgres::PoolError::Timeout(_) => true,
        deadpool_postgres::PoolError::Closed => false,
        deadpool_postgres::PoolError::NoRuntimeSpecified => false,
        deadpool_postgres::PoolError::PostCreateHook(_) => true,
    }
}

/// Worth retrying after a backoff: the connection (not a server certificate that fails the
/// TLS check) or a server state that passes (loading,
/// read-only replica during failover, cluster reconfiguring, out of memory until trimmed).
pub fn redis_is_transient(err: &redis::RedisError) -> bool {
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
        Some(
            "LOADING"
                | "READONLY"
                | "MASTERDOWN"
                | "TRYAGAIN"
                | "CLUSTERDOWN"
                | "OOM"
                | "BUSY"
                | "MISCONF"
                | "NOREPLICAS"
        )
    ) || matches!(err.kind(), redis::ErrorKind::Io | redis::ErrorKind::Client)
}

/// The error and its causes, one after another: `a: b: c`. Causes are never flattened away.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}
