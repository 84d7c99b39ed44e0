//! The command line of SPEC section 5. Every global option can also come from the
//! environment (`OUTBOXD_*`); a flag wins over the environment, which wins over the file.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "outboxd",
    version,
    about = "Transactional outbox relay and exactly-once inbox consumer between PostgreSQL and Redis Streams"
)]
pub struct Cli {
    /// Configuration file (TOML).
    #[arg(long, global = true, env = "OUTBOXD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Overrides [redis] url.
    #[arg(
        long,
        global = true,
        env = "OUTBOXD_REDIS_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub redis_url: Option<String>,
    /// Overrides [redis] stream_prefix.
    #[arg(
        long,
        global = true,
        env = "OUTBOXD_REDIS_STREAM_PREFIX",
        value_name = "PREFIX"
    )]
    pub stream_prefix: Option<String>,
    /// Overrides [http] listen (empty disables the endpoint).
    #[arg(long, global = true, env = "OUTBOXD_HTTP_LISTEN", value_name = "ADDR")]
    pub http_listen: Option<String>,
    /// Threads that run outboxd's work (1: everything on one thread).
    ///
    /// One thread suits an I/O-bound process next to its databases: no wake-ups across cores
    /// (measured: `relay --once` 8% faster and end-to-end p99 25% lower than on two threads,
    /// on 2 cores shared with PostgreSQL and Redis). More threads spread many relays and
    /// consumers of one `run` over more cores; more processes do too.
    #[arg(
        long,
        global = true,
        env = "OUTBOXD_WORKER_THREADS",
        value_name = "N",
        default_value_t = 1,
        value_parser = clap::value_parser!(u16).range(1..=256)
    )]
    pub worker_threads: u16,
    /// Log format.
    #[arg(long, global = true, env = "OUTBOXD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter, e.g. `info` or `outboxd=debug` [default: info; the demo: off].
    #[arg(long, global = true, env = "OUTBOXD_LOG")]
    pub log: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or upgrade the tables in every configured database.
    Migrate,
    /// The daemon: every configured relay and consumer, plus the HTTP endpoint.
    Run,
    /// Relays only.
    Relay(RelayArgs),
    /// Consumers only.
    Consume(ConsumeArgs),
    /// Backlog and health of every outbox, stream, group and dead-letter store.
    Status(StatusArgs),
    /// The end-to-end order/fulfillment flow against local PostgreSQL and Redis.
    Demo(DemoArgs),
    /// Inbox maintenance.
    #[command(subcommand)]
    Inbox(InboxCommand),
    /// Publish again archived events of a topic in a time range (inbox consumers deduplicate).
    Replay(ReplayArgs),
    /// Dead letters and quarantined outbox rows.
    #[command(subcommand)]
    Dlq(DlqCommand),
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters and quarantined rows (paged with --limit and --after).
    List(DlqArgs),
    /// Put dead letters back on their stream and release quarantined rows.
    Retry(DlqArgs),
    /// Delete dead letters and quarantined rows (each is printed as it goes).
    Discard(DlqArgs),
}

#[derive(Debug, Args)]
pub struct DlqArgs {
    /// Only this topic (stream name without the prefix).
    #[arg(long)]
    pub stream: Option<String>,
    /// Only items whose reason (or last error) contains this text.
    #[arg(long)]
    pub reason: Option<String>,
    /// One dead letter (its ID in the dlq stream) or one quarantined row (its outbox id).
    #[arg(long)]
    pub id: Option<String>,
    /// With retry/discard: everything the filters select.
    #[arg(long)]
    pub all: bool,
    /// Dead letters per stream.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    /// Dead letters after this dlq entry ID (the next page).
    #[arg(long)]
    pub after: Option<String>,
    /// One JSON object (list only).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The topic whose events are replayed.
    #[arg(long)]
    pub topic: String,
    /// Start of the range (inclusive): 2026-11-22T08:00:00Z, or a duration ago like 2h.
    #[arg(long)]
    pub since: String,
    /// End of the range (exclusive); default now.
    #[arg(long)]
    pub until: Option<String>,
    /// Only this relay's archive, as database.table.
    #[arg(long, value_name = "DATABASE.TABLE")]
    pub relay: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum InboxCommand {
    /// Delete inbox rows older than a duration, in small batches.
    Prune(PruneArgs),
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Age beyond which inbox rows are deleted, e.g. 14d. Keep it longer than any redelivery
    /// or replay can reach back: an event whose inbox row is gone would be applied again.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_arg)]
    pub older_than: std::time::Duration,
    /// Rows deleted per transaction (small batches do not lock out the consumers).
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub batch: u32,
}

#[derive(Debug, Args)]
pub struct RelayArgs {
    /// Drain what is there now, then exit 0.
    #[arg(long)]
    pub once: bool,
    /// With --once: wait up to this long (e.g. 30s) for rows held back by open transactions.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_arg, requires = "once")]
    pub wait_held: Option<std::time::Duration>,
    /// With --once: retry a server that is away or not answering for up to this long, then
    /// exit 1 naming it.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_arg, requires = "once", default_value = "60s")]
    pub give_up_after: std::time::Duration,
}

#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// Stop when nothing new or pending is left, then exit 0.
    #[arg(long)]
    pub once: bool,
    /// With --once: retry a server that is away or not answering for up to this long, then
    /// exit 1 naming it.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_arg, requires = "once", default_value = "60s")]
    pub give_up_after: std::time::Duration,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// One JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// PostgreSQL server URL the demo creates its databases on.
    #[arg(
        long,
        env = "OUTBOXD_DEMO_POSTGRES",
        default_value = "postgres://root@127.0.0.1:5432/postgres"
    )]
    pub postgres: String,
    /// What the demo's databases (`<name>_orders`, `<name>_fulfillment`) and streams
    /// (`<name>:` with `-` for `_`) are called: lowercase letters, digits and `_`.
    #[arg(long, default_value = "outboxd_demo", value_parser = parse_demo_name)]
    pub name: String,
}

fn parse_demo_name(text: &str) -> Result<String, String> {
    let starts_with_letter = text.chars().next().is_some_and(|c| c.is_ascii_lowercase());
    let allowed = text
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    // 63 is PostgreSQL's identifier limit, less the longest suffix ("_fulfillment").
    if starts_with_letter && allowed && text.len() <= 63 - "_fulfillment".len() {
        Ok(text.to_string())
    } else {
        Err(format!(
            "{text:?} is not a demo name: lowercase letters, digits and `_`, starting with a letter, at most {} characters",
            63 - "_fulfillment".len()
        ))
    }
}

fn parse_duration_arg(text: &str) -> Result<std::time::Duration, String> {
    crate::config::parse_duration(text)
}
