//! `outboxd replay --topic T --since S [--until U] [--relay DB.TABLE]`: publishes again the
//! archived events of a topic whose `created_at` falls in [S, U), in their original outbox
//! order and with their original event IDs, for the runbook "Redis lost data" and for new
//! consumers. It reads the archive that relays with `archive_retention_hours` keep, so events
//! older than that retention cannot be replayed. Inbox consumers recognise the event IDs, so a
//! replay never applies an effect twice; it only restores what is missing.

use crate::config::{Config, ConfigError};
use crate::db::quote_qualified;
use crate::envelope::Outgoing;
use crate::error::{Error, Result};
use crate::redis_io::Redis;
use std::time::SystemTime;

/// A point in time given as RFC 3339 (`2026-11-22T08:00:00Z`) or as a duration ago (`2h`).
pub fn parse_instant(text: &str) -> Result<SystemTime, String> {
    if let Some(t) = crate::envelope::parse_rfc3339(text.trim()) {
        return Ok(t);
    }
    let ago = crate::config::parse_duration(text).map_err(|_| {
        format!("{text:?} is neither a time like 2026-11-22T08:00:00Z nor a duration ago like 2h")
    })?;
    SystemTime::now()
        .checked_sub(ago)
        .ok_or_else(|| format!("{text:?} is too far back"))
}

fn epoch(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Replays from every relay with an archive (or the one named `db.table`).
pub async fn replay(
    config: &Config,
    topic: &str,
    since: SystemTime,
    until: SystemTime,
    relay_filter: Option<&str>,
) -> Result<Vec<(String, u64)>> {
    let pools = crate::db::pools(config)?;
    let redis = Redis::for_config(config)?;
    let relays: Vec<_> = crate::relay::build_all(config, &pools, &redis)?
        .into_iter()
        .filter(|r| relay_filter.is_none_or(|f| r.name() == f))
        .collect();
    if relays.is_empty() {
        return Err(ConfigError::new(
            "--relay",
            format!(
                "no configured relay is named {:?}",
                relay_filter.unwrap_or("")
            ),
        )
        .into());
    }
    if relays
        .iter()
        .all(|r| r.config().archive_retention_hours == 0)
    {
        return Err(ConfigError::new(
            "relays[].archive_retention_hours",
            "no relay keeps an archive, so there is nothing to replay from (set archive_retention_hours)",
        )
        .into());
    }
    let mut conn = redis.commands();
    let mut out = Vec::new();
    for relay in relays
        .iter()
        .filter(|r| r.config().archive_retention_hours > 0)
    {
        let bound = config.database(&relay.config().database)?.query_timeout();
        let ctx = format!("replay {}: reading the archive", relay.name());
        let client = crate::db::bounded(bound, &ctx, async {
            relay.pool().get().await.map_err(Error::pool(ctx.clone()))
        })
        .await?;
        let archive = quote_qualified(&crate::migrate::archive_table(&relay.config().table));
        let sql = format!(
            "SELECT id, event_id::text, aggregate_id, payload::text, headers->>'traceparent',
                    to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')
             FROM {archive}
             WHERE topic = $1 AND created_at >= to_timestamp($2) AND created_at < to_timestamp($3) AND id > $4
             ORDER BY id LIMIT 1000"
        );
        let mut after: i64 = 0;
        let mut count = 0u64;
        loop {
            let rows = crate::db::bounded(bound, &ctx, async {
                client
                    .query(&sql, &[&topic, &epoch(since), &epoch(until), &after])
                    .await
                    .map_err(Error::pg(ctx.clone()))
            })
            .await?;
            let Some(last) = rows.last() else { break };
            after = last.get(0);
            let mut commands = Vec::with_capacity(rows.len());
            for row in &rows {
                let key = redis.stream_key_for(topic, row.get(2));
                let (entry, _) = crate::relay::publish::Entry::new(
                    key.into(),
                    &Outgoing {
                        event_id: row.get(1),
                        source: relay.source(),
                        topic,
                        aggregate_id: row.get(2),
                        time: row.get(5),
                        payload_json: row.get(3),
                        traceparent: row.get(4),
                    },
                );
                commands.push(entry.into_command());
            }
            let failed = |e| Error::redis(format!("replay of {topic}"))(e);
            for reply in crate::redis_io::pipeline_by_key(&mut conn, commands)
                .await
                .map_err(failed)?
            {
                reply.map_err(failed)?;
            }
            count += rows.len() as u64;
        }
        out.push((relay.name(), count));
    }
    Ok(out)
}

pub async fn run(
    config: &Config,
    topic: &str,
    since: &str,
    until: Option<&str>,
    relay: Option<&str>,
) -> Result<()> {
    crate::config::validate_topic("--topic", topic)?;
    let since_t = parse_instant(since).map_err(|m| ConfigError::new("--since", m))?;
    let until_t = match until {
        Some(u) => parse_instant(u).map_err(|m| ConfigError::new("--until", m))?,
        None => SystemTime::now(),
    };
    if until_t <= since_t {
        return Err(ConfigError::new("--until", "must be later than --since").into());
    }
    let results = replay(config, topic, since_t, until_t, relay).await?;
    for (name, n) in &results {
        crate::outln!(
            "replay: {n} events of topic {topic} from the archive of {name} republished to {}{topic}",
            config.redis.stream_prefix
        );
    }
    if results.iter().all(|(_, n)| *n == 0) {
        // Say where nothing was found, so a misspelled topic or a relay without an archive
        // is not mistaken for "nothing was lost".
        let unarchived: Vec<String> = config
            .relays
            .iter()
            .filter(|r| r.archive_retention_hours == 0)
            .map(|r| format!("{}.{}", r.database, r.table))
            .collect();
        crate::outln!(
            "replay: no archived event of topic {topic} in that range; check the topic's spelling{}",
            if unarchived.is_empty() {
                String::new()
            } else {
                format!(
                    "; not searched (no archive_retention_hours): {}",
                    unarchived.join(", ")
                )
            }
        );
    }
    Ok(())
}
