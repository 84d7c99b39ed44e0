//! outboxd: exactly-once effects between PostgreSQL databases over Redis Streams.
//!
//! A relay moves committed outbox rows to Redis Streams in per-aggregate order; an inbox
//! consumer applies each stream entry's effect exactly once, recording its event ID in the
//! same transaction as the effect. See README.md for operating it and SPEC.md for the
//! contract.
//!
//! # Layout
//!
//! - [`cli`]: clap definitions; every global flag also from `OUTBOXD_*`.
//! - [`config`]: TOML + environment, named defaults, `validate()` naming the key.
//! - [`error`]: the top-level error, transient vs. permanent, exit codes.
//! - [`shutdown`]: signals -> `CancellationToken`.
//! - [`db`]: PostgreSQL pools, quoting, SQLSTATE classification.
//! - [`redis_io`]: Redis connections (shared and dedicated), stream keys, error classes.
//! - [`tls`]: TLS over rustls: libpq's `sslmode` for PostgreSQL, CA files for Redis.
//! - [`migrate`]: embedded migrations from `sql/migrations`.
//! - [`envelope`]: CloudEvents encode/decode.
//! - [`relay`]: outbox -> stream.
//! - [`retry`]: backoff and the `--once` drains' budget for transient failures.
//! - [`inbox`]: stream -> inbox + effect: reading, applying, dead letters.
//! - [`large_work`]: one batch of large events in memory at a time per process.
//! - [`handlers`]: what a consumer does with an event (`order_status`, `sql`).
//! - [`ops`]: the operator commands (`status`, `demo`).
//! - [`app`]: wiring the commands together.
//! - [`telemetry`]: metrics and the `/metrics` `/healthz` `/readyz` endpoint.
//! - [`watchdog`]: when each loop last made progress; stuck (`/healthz`) or backing off
//!   (`/readyz`).

/// `println!` for the commands' reports, except that a closed stdout (`outboxd status | head`)
/// ends the process quietly with exit 0, as a reader going away should, instead of panicking.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        if let Err(e) = ::std::writeln!(::std::io::stdout().lock(), $($arg)*) {
            if e.kind() == ::std::io::ErrorKind::BrokenPipe {
                ::std::process::exit(0);
            }
        }
    }};
}

pub mod app;
pub mod cli;
pub mod config;
pub mod db;
pub mod envelope;
pub mod error;
pub mod handlers;
pub mod inbox;
pub mod large_work;
pub mod migrate;
pub mod ops;
pub mod redis_io;
pub mod relay;
pub mod retry;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod watchdog;
