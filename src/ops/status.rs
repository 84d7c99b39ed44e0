//! `outboxd status [--json]`: per outbox its backlog, oldest unpublished age, quarantined
//! rows, rows held back by open transactions and the sessions holding them; per consumer and
//! stream its length, group lag, pending entries, oldest pending idle time and dead letters.
//! The same figures feed the backlog and lag gauges of the daemon.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::redis_io::Redis;
use crate::relay::{Blocker, Relay};
use deadpool_postgres::Pool;
use redis::Value;
use serde::Serialize;
use std::collections::HashMap;

#[derive(Debug, Serialize)]
pub struct Status {
    pub outboxes: Vec<OutboxStatus>,
    pub consumers: Vec<ConsumerStatus>,
}

#[derive(Debug, Serialize)]
pub struct OutboxStatus {
    pub database: String,
    pub table: String,
    pub backlog_rows: i64,
    /// True when backlog_rows is PostgreSQL's estimate (outboxes of a million rows or more).
    pub backlog_estimated: bool,
    pub oldest_age_seconds: Option<f64>,
    pub quarantined_rows: i64,
    pub held_back_rows: i64,
    /// True when the backlog is larger than the oldest rows searched for held-back rows
    /// (`HELD_BACK_SCAN`): held_back_rows is then a lower bound.
    pub held_back_estimated: bool,
    pub blockers: Vec<Blocker>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ConsumerStatus {
    pub name: String,
    pub stream: String,
    pub stream_length: u64,
    pub lag: Option<u64>,
    pub pending: u64,
    pub oldest_pending_idle_seconds: Option<f64>,
    pub dead_letters: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Every figure of `status`; `held_back` says whether to look for held-back rows and their
/// blockers (the daemon's gauges do not need them).
pub async fn collect(
    config: &Config,
    pools: &HashMap<String, Pool>,
    redis: &Redis,
    held_back: bool,
) -> Status {
    let mut outboxes = Vec::new();
    for mut relay in crate::relay::build_all(config, pools, redis).unwrap_or_default() {
        let (database, table) = (relay_db(&relay), relay_table(&relay));
        let mut s = OutboxStatus {
            database,
            table,
            backlog_rows: 0,
            backlog_estimated: false,
            oldest_age_seconds: None,
            quarantined_rows: 0,
            held_back_rows: 0,
            held_back_estimated: false,
            blockers: Vec::new(),
            error: None,
        };
        match outbox_figures(&mut relay, held_back).await {
            Ok((backlog, held)) => {
                s.backlog_rows = backlog.rows;
                s.backlog_estimated = backlog.estimated;
                s.oldest_age_seconds = backlog.oldest_age_seconds;
                s.quarantined_rows = backlog.quarantined;
                s.held_back_rows = held.rows;
                s.held_back_estimated =
                    held.rows > 0 && backlog.rows > crate::relay::claim::HELD_BACK_SCAN;
                s.blockers = held.blockers;
            }
            Err(e) => s.error = Some(crate::error::chain(&e)),
        }
        outboxes.push(s);
    }
    let mut consumers = Vec::new();
    let mut conn = redis.commands();
    let mut redis_silent: Option<String> = None;
    for c in &config.consumers {
        for key in c.streams.iter().flat_map(|t| redis.stream_keys(t)) {
            let mut s = ConsumerStatus {
                name: c.name.clone(),
                stream: key.clone(),
                stream_length: 0,
                lag: None,
                pending: 0,
                oldest_pending_idle_seconds: None,
                dead_letters: 0,
                error: None,
            };
            if let Some(silent) = &redis_silent {
                s.error = Some(format!("not asked: {silent}"));
            } else if let Err(e) = stream_figures(&mut conn, &key, &c.name, &mut s).await {
                let text = crate::error::chain(&e);
                // A Redis that does not answer is not asked again for every stream.
                if e.is_timeout() || e.is_transient() {
                    redis_silent = Some(text.clone());
                }
                s.error = Some(text);
            }
            consumers.push(s);
        }
    }
    Status {
        outboxes,
        consumers,
    }
}

fn relay_db(relay: &Relay) -> String {
    relay
        .name()
        .split_once('.')
        .map(|(d, _)| d.to_string())
        .unwrap_or_default()
}

fn relay_table(relay: &Relay) -> String {
    relay
        .name()
        .split_once('.')
        .map(|(_, t)| t.to_string())
        .unwrap_or_default()
}

async fn outbox_figures(
    relay: &mut Relay,
    held_back: bool,
) -> Result<(crate::relay::Backlog, crate::relay::HeldBack)> {
    let backlog = relay.backlog().await?;
    let held = if held_back {
        relay.held_back().await?
    } else {
        crate::relay::HeldBack::default()
    };
    Ok((backlog, held))
}

async fn stream_figures(
    conn: &mut crate::redis_io::Conn,
    key: &str,
    group: &str,
    s: &mut ConsumerStatus,
) -> Result<()> {
    // two commands, not a pipeline: on a cluster the dead letters may live on another shard
    let len: u64 = redis::cmd("XLEN")
        .arg(key)
        .query_async(conn)
        .await
        .map_err(Error::redis(format!("XLEN {key}")))?;
    let dlq_key = crate::inbox::dlq::dlq_key(key);
    let dlq: u64 = redis::cmd("XLEN")
        .arg(&dlq_key)
        .query_async(conn)
        .await
        .map_err(Error::redis(format!("XLEN {dlq_key}")))?;
    s.stream_length = len;
    s.dead_letters = dlq;
    if len == 0 {
        let exists: bool = redis::cmd("EXISTS")
            .arg(key)
            .query_async(conn)
            .await
            .map_err(Error::redis("EXISTS"))?;
        if !exists {
            return Ok(());
        }
    }
    let groups: Value = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(key)
        .query_async(conn)
        .await
        .map_err(Error::redis(format!("XINFO GROUPS {key}")))?;
    if let Value::Array(groups) = groups {
        for g in groups {
            let fields = fields_of(g);
            if fields
                .get("name")
                .and_then(crate::redis_io::text)
                .as_deref()
                != Some(group)
            {
                continue;
            }
            s.pending = fields.get("pending").and_then(int).unwrap_or(0);
            s.lag = fields.get("lag").and_then(int);
        }
    }
    if s.pending > 0 {
        let oldest: Value = redis::cmd("XPENDING")
            .arg(key)
            .arg(group)
            .arg("-")
            .arg("+")
            .arg(1)
            .query_async(conn)
            .await
            .map_err(Error::redis(format!("XPENDING {key}")))?;
        // The idle time of the oldest pending entry (first by ID).
        if let Value::Array(rows) = oldest {
            if let Some(Value::Array(row)) = rows.into_iter().next() {
                if let Some(Value::Int(ms)) = row.get(2) {
                    s.oldest_pending_idle_seconds = Some(*ms as f64 / 1000.0);
                }
            }
        }
    }
    Ok(())
}

pub fn fields_of(v: Value) -> HashMap<String, Value> {
    let mut out = HashMap::new();
    match v {
        Value::Array(flat) => {
            let mut it = flat.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                if let Some(k) = crate::redis_io::text(&k) {
                    out.insert(k, v);
                }
            }
        }
        Value::Map(pairs) => {
            for (k, v) in pairs {
                if let Some(k) = crate::redis_io::text(&k) {
                    out.insert(k, v);
                }
            }
        }
        _ => {}
    }
    out
}

fn int(v: &Value) -> Option<u64> {
    match v {
        Value::Int(n) => u64::try_from(*n).ok(),
        _ => None,
    }
}

pub async fn run(config: &Config, json: bool) -> Result<()> {
    let pools = crate::db::pools(config)?;
    let redis = Redis::for_config(config)?;
    let status = collect(config, &pools, &redis, true).await;
    // What could be read is printed; anything that could not makes the command fail (exit
    // 1), naming the server and what was being read, so a script never takes a partial
    // status for a healthy one.
    let failures: Vec<String> = status
        .outboxes
        .iter()
        .filter_map(|o| {
            o.error
                .as_ref()
                .map(|e| format!("outbox {}.{}: {e}", o.database, o.table))
        })
        .chain(status.consumers.iter().filter_map(|c| {
            c.error
                .as_ref()
                .map(|e| format!("consumer {} stream {}: {e}", c.name, c.stream))
        }))
        .collect();
    let outcome = if failures.is_empty() {
        Ok(())
    } else {
        Err(Error::Incomplete(format!(
            "status is incomplete: {}",
            failures.join("; ")
        )))
    };
    if json {
        crate::outln!(
            "{}",
            serde_json::to_string(&status).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
        );
        return outcome;
    }
    crate::outln!("OUTBOXES");
    crate::outln!(
        "{:<28} {:>10} {:>12} {:>11} {:>10}  blockers",
        "database.table",
        "backlog",
        "oldest (s)",
        "quarantined",
        "held back"
    );
    for o in &status.outboxes {
        let blockers = o
            .blockers
            .iter()
            .map(|b| format!("pid {} ({:.0}s)", b.pid, b.xact_age_seconds))
            .collect::<Vec<_>>()
            .join(", ");
        crate::outln!(
            "{:<28} {:>10} {:>12} {:>11} {:>10}  {}{}",
            format!("{}.{}", o.database, o.table),
            format!(
                "{}{}",
                if o.backlog_estimated { "~" } else { "" },
                o.backlog_rows
            ),
            o.oldest_age_seconds
                .map(|a| format!("{a:.1}"))
                .unwrap_or_else(|| "-".into()),
            o.quarantined_rows,
            format!(
                "{}{}",
                if o.held_back_estimated { "~" } else { "" },
                o.held_back_rows
            ),
            blockers,
            o.error
                .as_deref()
                .map(|e| format!(" ERROR: {e}"))
                .unwrap_or_default()
        );
    }
    crate::outln!();
    crate::outln!("CONSUMERS");
    crate::outln!(
        "{:<20} {:<34} {:>8} {:>8} {:>8} {:>14} {:>6}",
        "name",
        "stream",
        "length",
        "lag",
        "pending",
        "oldest idle(s)",
        "dlq"
    );
    for c in &status.consumers {
        crate::outln!(
            "{:<20} {:<34} {:>8} {:>8} {:>8} {:>14} {:>6}{}",
            c.name,
            c.stream,
            c.stream_length,
            c.lag.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
            c.pending,
            c.oldest_pending_idle_seconds
                .map(|a| format!("{a:.1}"))
                .unwrap_or_else(|| "-".into()),
            c.dead_letters,
            c.error
                .as_deref()
                .map(|e| format!(" ERROR: {e}"))
                .unwrap_or_default()
        );
    }
    outcome
}
