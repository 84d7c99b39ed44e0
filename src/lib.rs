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
//! - [`db`]: PostgreSQL pools (one per database: [`db::pools`]), bounded statements, quoting,
//!   SQLSTATE classification.
//! - [`redis_io`]: Redis connections (shared and dedicated), stream keys, error classes.
//! - [`resp`]: the relay's own publishing connection to a single server (RESP written and
//!   read by hand: the redis crate's per-reply values were half of the relay's CPU).
//! - [`tls`]: TLS over rustls: libpq's `sslmode` for PostgreSQL, CA files for Redis.
//! - [`migrate`]: embedded migrations from `sql/migrations`.
//! - [`envelope`]: CloudEvents encode/decode, and the RFC 3339 times they carry.
//! - [`fnv`]: the one hash outboxd routes and stores by (FNV-1a).
//! - [`relay`]: outbox -> stream. The loop in `relay/mod.rs`, one batch in `relay/batch.rs`,
//!   the batches in flight in `relay/inflight.rs`.
//! - [`retry`]: backoff and the `--once` drains' budget for transient failures.
//! - [`inbox`]: stream -> inbox + effect. The loop in `inbox/mod.rs`, the consumer's
//!   transaction in `inbox/apply.rs`, the reads in `inbox/read.rs`.
//! - [`large_work`]: one batch of large events in memory at a time per process.
//! - [`handlers`]: what a consumer does with an event (`order_status`, `sql`); the order
//!   transition rules, a pure function, in `handlers/rules.rs`.
//! - [`ops`]: the operator commands (`status`, `dlq`, `replay`, `inbox prune`, `relay --once`
//!   and `consume --once` in `ops/once.rs`, `demo`).
//! - [`housekeeping`]: the daemon's gauges, stream trimming and retention loops.
//! - [`app`]: wiring the commands together (nothing imports it).
//! - [`metrics`]: every Prometheus metric, declared once.
//! - [`events`]: what is both a log line and a metric (a batch failed, a row refused, an
//!   event retried, skipped or dead-lettered), written once each.
//! - [`telemetry`]: the `/metrics` `/healthz` `/readyz` endpoint.
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
pub mod events;
pub mod fnv;
pub mod handlers;
pub mod housekeeping;
pub mod inbox;
pub mod large_work;
pub mod metrics;
pub mod migrate;
pub mod ops;
pub mod redis_io;
pub mod relay;
pub mod resp;
pub mod retry;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod trace;
pub mod watchdog;
