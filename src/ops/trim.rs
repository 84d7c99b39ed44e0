//! Stream retention: trimming a stream toward a maximum length or age without ever removing
//! an entry that some consumer group has not acknowledged (SPEC section 7.5). The trim point
//! is the oldest of the target and, per group, its oldest pending entry or the entry after
//! the last one delivered to it; `XTRIM MINID` removes only entries before that point.
//! Where the server has Redis 8.2's acknowledgement-aware trimming (`XTRIM ... ACKED`, told
//! by its `XACKDEL` command), the server itself keeps every entry a group has not
//! acknowledged, in one command, with no window between reading the groups and trimming.

use crate::error::{Error, Result};
use redis::aio::ConnectionLike;
use redis::Value;

/// A stream entry ID as (milliseconds, sequence).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct StreamId(pub u64, pub u64);

impl StreamId {
    pub fn parse(s: &str) -> Option<StreamId> {
        let (ms, seq) = s.split_once('-')?;
        Some(StreamId(ms.parse().ok()?, seq.parse().ok()?))
    }

    fn next(self) -> StreamId {
        match self.1.checked_add(1) {
            Some(seq) => StreamId(self.0, seq),
            None => StreamId(self.0 + 1, 0),
        }
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// The first entry ID every group still needs: nothing before it may be trimmed.
/// `None` when the stream has no group (nothing to protect).
pub async fn safe_trim_point<C: ConnectionLike>(
    conn: &mut C,
    key: &str,
) -> Result<Option<StreamId>> {
    let groups: Value = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(key)
        .query_async(conn)
        .await
        .map_err(Error::redis(format!("XINFO GROUPS {key}")))?;
    let Value::Array(groups) = groups else {
        return Ok(None);
    };
    let mut safe: Option<StreamId> = None;
    for g in groups {
        let fields = crate::ops::status::fields_of(g);
        let name = fields
            .get("name")
            .and_then(crate::redis_io::text)
            .unwrap_or_default();
        let pending = matches!(fields.get("pending"), Some(Value::Int(n)) if *n > 0);
        let last = fields
            .get("last-delivered-id")
            .and_then(crate::redis_io::text)
            .and_then(|s| StreamId::parse(&s))
            .unwrap_or(StreamId(0, 0));
        let mut needed = last.next();
        if pending {
            let oldest: Value = redis::cmd("XPENDING")
                .arg(key)
                .arg(&name)
                .arg("-")
                .arg("+")
                .arg(1)
                .query_async(conn)
                .await
                .map_err(Error::redis(format!("XPENDING {key}")))?;
            if let Value::Array(rows) = oldest {
                if let Some(Value::Array(row)) = rows.first() {
                    if let Some(id) = row
                        .first()
                        .and_then(crate::redis_io::text)
                        .and_then(|s| StreamId::parse(&s))
                    {
                        needed = needed.min(id);
                    }
                }
            }
        }
        safe = Some(safe.map_or(needed, |s| s.min(needed)));
    }
    Ok(safe)
}

/// Trims `key` toward `max_len` entries and/or `max_age_ms`, never past the safe point.
/// Returns the number of entries removed.
pub async fn trim_stream<C: ConnectionLike>(
    conn: &mut C,
    key: &str,
    max_len: Option<u64>,
    max_age_ms: Option<u64>,
) -> Result<u64> {
    let mut target: Option<StreamId> = None;
    if let Some(age) = max_age_ms {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        target = Some(StreamId(now.saturating_sub(age), 0));
    }
    if let Some(len) = max_len {
        let newest: Value = redis::cmd("XREVRANGE")
            .arg(key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(len.max(1))
            .query_async(conn)
            .await
            .map_err(Error::redis(format!("XREVRANGE {key}")))?;
        if let Value::Array(entries) = newest {
            if entries.len() as u64 >= len.max(1) {
                let oldest_kept = entries.last().and_then(|e| match e {
                    Value::Array(p) => p.first().and_then(crate::redis_io::text),
                    _ => None,
                });
                if let Some(id) = oldest_kept.and_then(|s| StreamId::parse(&s)) {
                    target = Some(target.map_or(id, |t| t.max(id)));
                }
            }
        }
    }
    let Some(target) = target else { return Ok(0) };
    let mut removed = 0;
    if trims_by_acknowledgement(conn).await? {
        removed = redis::cmd("XTRIM")
            .arg(key)
            .arg("MINID")
            .arg("=")
            .arg(target.to_string())
            .arg("ACKED")
            .query_async(conn)
            .await
            .map_err(Error::redis(format!("XTRIM {key} MINID = {target} ACKED")))?;
        // Done, unless entries before the target are left. They may be unacknowledged (then
        // the safe point below keeps them too), or Redis 8.2 before the fix of
        // redis/redis#14552 kept a destroyed group's position and trims nothing since: the
        // safe point, read from the groups that exist, still brings the stream down.
        if oldest_entry(conn, key)
            .await?
            .is_none_or(|oldest| oldest >= target)
        {
            return Ok(removed);
        }
    }
    let point = match safe_trim_point(conn, key).await? {
        Some(safe) => target.min(safe),
        None => target,
    };
    let more: u64 = redis::cmd("XTRIM")
        .arg(key)
        .arg("MINID")
        .arg("=")
        .arg(point.to_string())
        .query_async(conn)
        .await
        .map_err(Error::redis(format!("XTRIM {key}")))?;
    Ok(removed + more)
}

/// The ID of the oldest entry of `key`, `None` when it has none.
async fn oldest_entry<C: ConnectionLike>(conn: &mut C, key: &str) -> Result<Option<StreamId>> {
    let first: Value = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .query_async(conn)
        .await
        .map_err(Error::redis(format!("XRANGE {key}")))?;
    Ok(match first {
        Value::Array(entries) => entries.first().and_then(|e| match e {
            Value::Array(p) => p
                .first()
                .and_then(crate::redis_io::text)
                .and_then(|s| StreamId::parse(&s)),
            _ => None,
        }),
        _ => None,
    })
}

/// Whether the server trims by acknowledgement (`XTRIM ... ACKED`, Redis 8.2 and later): it
/// has the `XACKDEL` command that came with it. Asked, not inferred from a version: Valkey
/// reports `redis_version:7.2.4` whatever its own version, and has neither.
pub async fn trims_by_acknowledgement<C: ConnectionLike>(conn: &mut C) -> Result<bool> {
    let info: Value = redis::cmd("COMMAND")
        .arg("INFO")
        .arg("XACKDEL")
        .query_async(conn)
        .await
        .map_err(Error::redis("COMMAND INFO XACKDEL"))?;
    Ok(match info {
        Value::Array(items) => items.first().is_some_and(|i| !matches!(i, Value::Nil)),
        _ => false,
    })
}
