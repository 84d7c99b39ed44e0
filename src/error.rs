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
    #[error("{0}")]
    Other(String),
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
            Error::Config(_) | Error::Other(_) => false,
            Error::Postgres { source, .. } => crate::db::is_transient(source),
            Error::Pool { source, .. } => crate::db::pool_error_is_transient(source),
            Error::Redis { source, .. } => crate::redis_io::is_transient(source),
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
            _ => 1,
        }
    }
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
