//! `outboxd dlq list|retry|discard`: the two places where events stop, side by side:
//! dead-lettered stream entries (`<stream>:dlq` of every consumer stream) and quarantined
//! outbox rows (every relay's table). `retry` puts dead letters back on their stream (the
//! inbox makes a retry of an event that was in fact applied harmless) and releases
//! quarantined rows; `discard` removes them. Both act only on what is selected by `--id`
//! or `--all` (with the filters), and print each item as they act on it.

use crate::config::{Config, ConfigError};
use crate::error::{Error, Result};
use crate::inbox::dlq::dlq_key;
use crate::redis_io::Redis;
use redis::Value;

/// The configured databases' pools, built once per command.
use crate::db::Pools;
use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeadLetter {
    /// The dead-letter stream and the entry's ID in it.
    pub dlq: String,
    pub id: String,
    pub stream: String,
    pub original_entry_id: String,
    pub group: String,
    pub consumer: String,
    pub reason: String,
    pub deliveries: u64,
    /// The original entry's `data` field (lossy UTF-8), for reading.
    pub data: String,
    #[serde(skip)]
    fields: Vec<(Vec<u8>, Vec<u8>)>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct QuarantinedRow {
    pub relay: String,
    pub id: i64,
    pub topic: String,
    pub aggregate_id: String,
    pub attempts: i32,
    pub last_error: Option<String>,
}

/// Which items a command touches.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Topic (stream without prefix) of dead letters / topic of quarantined rows.
    pub stream: Option<String>,
    /// Substring of the reason / last error.
    pub reason: Option<String>,
    /// One dead letter's ID in its dlq stream, or one quarantined row's id.
    pub id: Option<String>,
    /// Page size and start (exclusive) for dead letters.
    pub limit: usize,
    pub after: Option<String>,
}

fn topics(config: &Config) -> Vec<String> {
    let mut t: Vec<String> = config
        .consumers
        .iter()
        .flat_map(|c| c.streams.iter().cloned())
        .collect();
    t.sort();
    t.dedup();
    t
}

pub async fn dead_letters(
    config: &Config,
    redis: &Redis,
    sel: &Selection,
) -> Result<Vec<DeadLetter>> {
    let mut conn = redis.commands();
    let mut out = Vec::new();
    let keys = topics(config)
        .into_iter()
        .filter(|topic| sel.stream.as_ref().is_none_or(|s| s == topic))
        .flat_map(|topic| redis.stream_keys(&topic));
    for key in keys {
        let dlq = dlq_key(&key);
        let start = match (&sel.id, &sel.after) {
            (Some(id), _) => id.clone(),
            (None, Some(after)) => format!("({after}"),
            (None, None) => "-".to_string(),
        };
        let end = sel.id.clone().unwrap_or_else(|| "+".to_string());
        let reply: Value = redis::cmd("XRANGE")
            .arg(&dlq)
            .arg(&start)
            .arg(&end)
            .arg("COUNT")
            .arg(sel.limit.max(1))
            .query_async(&mut conn)
            .await
            .map_err(Error::redis(format!("XRANGE {dlq}")))?;
        let Value::Array(entries) = reply else {
            continue;
        };
        for entry in entries {
            let Value::Array(parts) = entry else { continue };
            let (Some(id), Some(Value::Array(flat))) =
                (parts.first().and_then(crate::redis_io::text), parts.get(1))
            else {
                continue;
            };
            let mut fields = Vec::new();
            let mut it = flat.iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                let b = |v: &Value| match v {
                    Value::BulkString(b) => b.clone(),
                    Value::SimpleString(s) => s.clone().into_bytes(),
                    _ => Vec::new(),
                };
                fields.push((b(k), b(v)));
            }
            let get = |name: &str| {
                fields
                    .iter()
                    .find(|(k, _)| k.as_slice() == name.as_bytes())
                    .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default()
            };
            let letter = DeadLetter {
                dlq: dlq.clone(),
                id,
                stream: get("stream"),
                original_entry_id: get("entry_id"),
                group: get("group"),
                consumer: get("consumer"),
                reason: get("reason"),
                deliveries: get("deliveries").parse().unwrap_or(0),
                data: get("entry.data"),
                fields,
            };
            if sel
                .reason
                .as_ref()
                .is_some_and(|r| !letter.reason.contains(r.as_str()))
            {
                continue;
            }
            out.push(letter);
        }
    }
    Ok(out)
}

pub async fn quarantined(
    config: &Config,
    pools: &Pools,
    sel: &Selection,
) -> Result<Vec<QuarantinedRow>> {
    let mut out = Vec::new();
    for relay in &config.relays {
        let Some(pool) = pools.get(&relay.database) else {
            continue;
        };
        let sql = format!(
            "SELECT id, topic, aggregate_id, attempts, last_error FROM {} WHERE quarantined_at IS NOT NULL ORDER BY id LIMIT 10000",
            crate::db::quote_qualified(&relay.table)
        );
        let ctx = format!(
            "dlq: quarantined rows of {}.{}",
            relay.database, relay.table
        );
        let bound = config.database(&relay.database)?.query_timeout();
        let rows = crate::db::bounded(bound, &ctx, async {
            let client = pool.get().await.map_err(Error::pool(ctx.clone()))?;
            client
                .query(&sql, &[])
                .await
                .map_err(Error::pg(ctx.clone()))
        })
        .await?;
        for row in rows {
            let q = QuarantinedRow {
                relay: format!("{}.{}", relay.database, relay.table),
                id: row.get(0),
                topic: row.get(1),
                aggregate_id: row.get(2),
                attempts: row.get(3),
                last_error: row.get(4),
            };
            let keep = sel.stream.as_ref().is_none_or(|s| *s == q.topic)
                && sel
                    .reason
                    .as_ref()
                    .is_none_or(|r| q.last_error.as_deref().unwrap_or("").contains(r.as_str()))
                && sel.id.as_ref().is_none_or(|i| *i == q.id.to_string());
            if keep {
                out.push(q);
            }
        }
    }
    Ok(out)
}

/// Puts a dead letter's original fields back on its stream, then deletes the dead letter.
pub async fn retry_dead_letter(redis: &Redis, letter: &DeadLetter) -> Result<String> {
    let mut conn = redis.commands();
    let mut cmd = redis::cmd("XADD");
    cmd.arg(&letter.stream).arg("*");
    let mut any = false;
    for (k, v) in &letter.fields {
        if let Some(field) = k.strip_prefix(b"entry.") {
            cmd.arg(field).arg(v.as_slice());
            any = true;
        }
    }
    if !any {
        // an entry deleted before it was acknowledged has nothing to put back
        return Err(Error::Incomplete(format!(
            "dead letter {} keeps no original fields; discard it instead",
            letter.id
        )));
    }
    let new_id: String = cmd
        .query_async(&mut conn)
        .await
        .map_err(Error::redis(format!("XADD {}", letter.stream)))?;
    let _: i64 = redis::cmd("XDEL")
        .arg(&letter.dlq)
        .arg(&letter.id)
        .query_async(&mut conn)
        .await
        .map_err(Error::redis(format!("XDEL {}", letter.dlq)))?;
    Ok(new_id)
}

pub async fn discard_dead_letter(redis: &Redis, letter: &DeadLetter) -> Result<()> {
    let mut conn = redis.commands();
    let _: i64 = redis::cmd("XDEL")
        .arg(&letter.dlq)
        .arg(&letter.id)
        .query_async(&mut conn)
        .await
        .map_err(Error::redis(format!("XDEL {}", letter.dlq)))?;
    Ok(())
}

/// Releases (`retry`) or deletes (`discard`) one quarantined row.
pub async fn act_on_row(
    config: &Config,
    pools: &Pools,
    row: &QuarantinedRow,
    retry: bool,
) -> Result<u64> {
    let relay = config
        .relays
        .iter()
        .find(|r| format!("{}.{}", r.database, r.table) == row.relay)
        .ok_or_else(|| ConfigError::new("relays", format!("relay {} not configured", row.relay)))?;
    let pool = pools.get(&relay.database).ok_or_else(|| {
        ConfigError::new(format!("databases.{}", relay.database), "not configured")
    })?;
    let table = crate::db::quote_qualified(&relay.table);
    let sql = if retry {
        format!("UPDATE {table} SET quarantined_at = NULL, attempts = 0 WHERE id = $1 AND quarantined_at IS NOT NULL")
    } else {
        format!("DELETE FROM {table} WHERE id = $1 AND quarantined_at IS NOT NULL")
    };
    let ctx = format!("dlq: row {} of {}", row.id, row.relay);
    let bound = config.database(&relay.database)?.query_timeout();
    crate::db::bounded(bound, &ctx, async {
        let client = pool.get().await.map_err(Error::pool(ctx.clone()))?;
        client
            .execute(&sql, &[&row.id])
            .await
            .map_err(Error::pg(ctx.clone()))
    })
    .await
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    List,
    Retry,
    Discard,
}

pub async fn run(
    config: &Config,
    action: Action,
    sel: Selection,
    all: bool,
    json: bool,
) -> Result<()> {
    if action != Action::List && sel.id.is_none() && !all {
        return Err(crate::config::ConfigError::new(
            "--id/--all",
            "retry and discard act on what --id names, or on everything selected with --all",
        )
        .into());
    }
    let redis = Redis::for_config(config)?;
    let letters = dead_letters(config, &redis, &sel).await?;
    let pools = crate::db::pools(config)?;
    let rows = quarantined(config, &pools, &sel).await?;
    match action {
        Action::List => {
            if json {
                crate::outln!(
                    "{}",
                    serde_json::json!({"dead_letters": letters, "quarantined_rows": rows})
                );
            } else {
                crate::outln!("DEAD LETTERS ({})", letters.len());
                for l in &letters {
                    crate::outln!(
                        "  {} {}  stream {} entry {} deliveries {}  reason: {}",
                        l.dlq,
                        l.id,
                        l.stream,
                        l.original_entry_id,
                        l.deliveries,
                        l.reason
                    );
                }
                crate::outln!("QUARANTINED OUTBOX ROWS ({})", rows.len());
                for r in &rows {
                    crate::outln!(
                        "  {} id {}  topic {} aggregate {} attempts {}  error: {}",
                        r.relay,
                        r.id,
                        r.topic,
                        r.aggregate_id,
                        r.attempts,
                        r.last_error.as_deref().unwrap_or("")
                    );
                }
                if letters.len() == sel.limit.max(1) {
                    if let Some(last) = letters.last() {
                        crate::outln!("(more may follow: --after {})", last.id);
                    }
                }
            }
        }
        Action::Retry | Action::Discard => {
            let verb = if action == Action::Retry {
                "retried"
            } else {
                "discarded"
            };
            // Count what is selected before touching anything.
            crate::outln!(
                "dlq: {} {} dead letter(s) and {} quarantined row(s)",
                if action == Action::Retry {
                    "retrying"
                } else {
                    "discarding"
                },
                letters.len(),
                rows.len()
            );
            for l in &letters {
                if action == Action::Retry {
                    let new_id = retry_dead_letter(&redis, l).await?;
                    crate::outln!(
                        "dlq: {verb} dead letter {} {} -> {} {new_id}",
                        l.dlq,
                        l.id,
                        l.stream
                    );
                } else {
                    discard_dead_letter(&redis, l).await?;
                    crate::outln!(
                        "dlq: {verb} dead letter {} {} (reason: {})",
                        l.dlq,
                        l.id,
                        l.reason
                    );
                }
            }
            for r in &rows {
                let n = act_on_row(config, &pools, r, action == Action::Retry).await?;
                if n > 0 {
                    crate::outln!(
                        "dlq: {verb} quarantined row {} id {} (topic {}, aggregate {})",
                        r.relay,
                        r.id,
                        r.topic,
                        r.aggregate_id
                    );
                }
            }
            crate::outln!(
                "dlq: {} dead letter(s) and {} quarantined row(s) {verb}",
                letters.len(),
                rows.len()
            );
        }
    }
    Ok(())
}
