//! Reading streams through a consumer group: group creation, `XREADGROUP` (own pending
//! entries with ID `0`, new ones with `>`), `XAUTOCLAIM` of entries idle too long, delivery
//! counts from `XPENDING`, and `XACK`. Replies are parsed from raw values so that entries
//! deleted from the stream while pending (their fields come back nil) are seen, not dropped.

use crate::error::{Error, Result};
use crate::redis_io::text;
use redis::aio::ConnectionLike;
use redis::Value;
use std::collections::HashMap;

/// One stream entry as read.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Index into the consumer's streams.
    pub stream: usize,
    pub id: String,
    /// All fields, in order (copied as they are into a dead letter).
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
    /// False when the entry was trimmed or deleted while pending.
    pub present: bool,
}

impl Entry {
    pub fn data(&self) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(k, _)| k.as_slice() == b"data")
            .map(|(_, v)| v.as_slice())
    }
}

/// `XGROUP CREATE key group 0 MKSTREAM`; an existing group is fine. Starting at `0` means a
/// new group also gets the entries published before it existed (the inbox dedups them).
pub async fn ensure_group<C: ConnectionLike>(conn: &mut C, key: &str, group: &str) -> Result<()> {
    let result: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(key)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) => Err(Error::redis(format!("creating group {group} on {key}"))(e)),
    }
}

/// `XREADGROUP GROUP group consumer COUNT n [BLOCK ms] STREAMS k1.. id..`, with the same `id`
/// (`0` for this consumer's pending entries, `>` for new ones) for every stream.
pub async fn read_group<C: ConnectionLike>(
    conn: &mut C,
    group: &str,
    consumer: &str,
    keys: &[String],
    id: &str,
    count: usize,
    block_ms: Option<u64>,
) -> Result<Vec<Entry>> {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP")
        .arg(group)
        .arg(consumer)
        .arg("COUNT")
        .arg(count);
    if let Some(ms) = block_ms {
        cmd.arg("BLOCK").arg(ms);
    }
    cmd.arg("STREAMS");
    for key in keys {
        cmd.arg(key);
    }
    for _ in keys {
        cmd.arg(id);
    }
    let reply: Value = cmd
        .query_async(conn)
        .await
        .map_err(Error::redis(format!("XREADGROUP {group}")))?;
    let mut out = Vec::new();
    let per_stream: Vec<(Value, Value)> = match reply {
        Value::Nil => return Ok(out),
        Value::Array(items) => items
            .into_iter()
            .filter_map(|item| match item {
                Value::Array(mut kv) if kv.len() == 2 => {
                    let entries = kv.pop()?;
                    let key = kv.pop()?;
                    Some((key, entries))
                }
                _ => None,
            })
            .collect(),
        Value::Map(pairs) => pairs,
        other => return Err(unexpected("XREADGROUP", &other)),
    };
    for (key, entries) in per_stream {
        let key = text(&key).unwrap_or_default();
        let Some(stream) = keys.iter().position(|k| *k == key) else {
            continue;
        };
        parse_entries(stream, entries, &mut out)?;
    }
    Ok(out)
}

/// `XAUTOCLAIM key group consumer min-idle 0 COUNT n`: entries idle longer than `min_idle_ms`
/// (a dead consumer's, or this one's failures waiting for a retry) move to this consumer,
/// their delivery count incremented. Loops over the cursor up to `count` entries.
pub async fn autoclaim<C: ConnectionLike>(
    conn: &mut C,
    stream: usize,
    key: &str,
    group: &str,
    consumer: &str,
    min_idle_ms: u64,
    count: usize,
) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    let mut cursor = "0-0".to_string();
    loop {
        let reply: Value = redis::cmd("XAUTOCLAIM")
            .arg(key)
            .arg(group)
            .arg(consumer)
            .arg(min_idle_ms)
            .arg(&cursor)
            .arg("COUNT")
            .arg(count)
            .query_async(conn)
            .await
            .map_err(Error::redis(format!("XAUTOCLAIM {key}")))?;
        let Value::Array(mut parts) = reply else {
            return Err(unexpected("XAUTOCLAIM", &reply));
        };
        if parts.len() < 2 {
            return Err(unexpected("XAUTOCLAIM", &Value::Array(parts)));
        }
        let rest = parts.split_off(1);
        let next = text(&parts[0]).unwrap_or_else(|| "0-0".into());
        let mut rest = rest.into_iter();
        if let Some(entries) = rest.next() {
            parse_entries(stream, entries, &mut out)?;
        }
        // Redis 7 also lists IDs that were pending but are gone from the stream.
        if let Some(Value::Array(deleted)) = rest.next() {
            for id in deleted {
                if let Some(id) = text(&id) {
                    out.push(Entry {
                        stream,
                        id,
                        fields: Vec::new(),
                        present: false,
                    });
                }
            }
        }
        if next == "0-0" || out.len() >= count {
            break;
        }
        cursor = next;
    }
    Ok(out)
}

/// Delivery counts of pending entries, from `XPENDING key group start end count`.
pub async fn delivery_counts<C: ConnectionLike>(
    conn: &mut C,
    key: &str,
    group: &str,
    ids: &[&str],
) -> Result<HashMap<String, u64>> {
    let mut out = HashMap::new();
    if ids.is_empty() {
        return Ok(out);
    }
    let mut pipe = redis::pipe();
    for id in ids {
        pipe.cmd("XPENDING")
            .arg(key)
            .arg(group)
            .arg(*id)
            .arg(*id)
            .arg(1);
    }
    let replies: Vec<Value> = pipe
        .query_async(conn)
        .await
        .map_err(Error::redis(format!("XPENDING {key}")))?;
    for reply in replies {
        let Value::Array(rows) = reply else { continue };
        for row in rows {
            if let Value::Array(fields) = row {
                if fields.len() >= 4 {
                    if let (Some(id), Value::Int(n)) = (text(&fields[0]), &fields[3]) {
                        out.insert(id, u64::try_from(*n).unwrap_or(0));
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Pending entries of the whole group on one stream (`XPENDING key group` summary count).
pub async fn pending_count<C: ConnectionLike>(conn: &mut C, key: &str, group: &str) -> Result<u64> {
    let reply: Value = redis::cmd("XPENDING")
        .arg(key)
        .arg(group)
        .query_async(conn)
        .await
        .map_err(Error::redis(format!("XPENDING {key}")))?;
    match reply {
        Value::Array(parts) => match parts.first() {
            Some(Value::Int(n)) => Ok(u64::try_from(*n).unwrap_or(0)),
            _ => Ok(0),
        },
        _ => Ok(0),
    }
}

fn parse_entries(stream: usize, entries: Value, out: &mut Vec<Entry>) -> Result<()> {
    let Value::Array(entries) = entries else {
        return Ok(());
    };
    for entry in entries {
        let Value::Array(mut parts) = entry else {
            continue;
        };
        if parts.is_empty() {
            continue;
        }
        let body = if parts.len() > 1 { parts.pop() } else { None };
        let Some(id) = parts.first().and_then(text) else {
            continue;
        };
        let (fields, present) = match body {
            Some(Value::Array(flat)) => {
                let mut fields = Vec::with_capacity(flat.len() / 2);
                let mut it = flat.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    fields.push((bytes(k), bytes(v)));
                }
                (fields, true)
            }
            Some(Value::Map(pairs)) => (
                pairs
                    .into_iter()
                    .map(|(k, v)| (bytes(k), bytes(v)))
                    .collect(),
                true,
            ),
            _ => (Vec::new(), false),
        };
        out.push(Entry {
            stream,
            id,
            fields,
            present,
        });
    }
    Ok(())
}

fn bytes(v: Value) -> Vec<u8> {
    match v {
        Value::BulkString(b) => b,
        Value::SimpleString(s) => s.into_bytes(),
        Value::Int(n) => n.to_string().into_bytes(),
        _ => Vec::new(),
    }
}

fn unexpected(command: &str, v: &Value) -> Error {
    Error::UnexpectedReply {
        command: command.to_string(),
        reply: format!("{v:?}"),
    }
}

/// The read passes of a consumer: sizing a read by bytes, the pending pass at start, the
/// claim pass over idle entries of dead instances, and the read of new entries.
impl super::Consumer {
    /// Entries to ask for per stream in the next read, at most `batch_size`. Before the
    /// first read it estimates the streams' entry size from Redis (`MEMORY USAGE` over
    /// `XLEN`), so that a backlog of large entries is not read `batch_size` at a time; where
    /// that cannot be asked, it starts at 1 and grows as `observe` sees small entries.
    pub(super) async fn read_count(&self, conn: &mut crate::redis_io::Conn) -> usize {
        let batch = self.config.batch_size.max(1) as usize;
        let known = self.read_count.load(std::sync::atomic::Ordering::Relaxed);
        if known > 0 {
            return known.clamp(1, batch);
        }
        let mut largest_average = 0_usize;
        let mut asked = true;
        for key in &self.keys {
            let usage: redis::RedisResult<Option<u64>> = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(key)
                .query_async(conn)
                .await;
            let len: redis::RedisResult<u64> = redis::cmd("XLEN").arg(key).query_async(conn).await;
            match (usage, len) {
                (Ok(Some(bytes)), Ok(len)) if len > 0 => {
                    largest_average = largest_average.max((bytes / len) as usize);
                }
                (Ok(_), Ok(_)) => {}
                _ => asked = false,
            }
        }
        let count = if !asked {
            1
        } else {
            match self.config.max_read_bytes.checked_div(largest_average) {
                Some(fit) => (fit / self.keys.len().max(1)).clamp(1, batch),
                None => batch, // empty streams: nothing to go by yet
            }
        };
        self.read_count
            .store(count, std::sync::atomic::Ordering::Relaxed);
        count
    }

    /// After a read: the next one asks for twice as many entries, up to `batch_size`, but
    /// never more than `max_read_bytes` of entries as large as the largest just read can
    /// fill (over every stream a read covers). Memory then follows bytes, not entry counts:
    /// a backlog of multi-megabyte events is read a few at a time. (A stream whose entries
    /// grow suddenly from small to large can overshoot for one read.)
    pub(super) fn observe(&self, entries: &[Entry]) {
        let Some(largest) = entries
            .iter()
            .map(|e| {
                e.fields
                    .iter()
                    .map(|(k, v)| k.len() + v.len())
                    .sum::<usize>()
            })
            .max()
        else {
            return;
        };
        let fit = self.config.max_read_bytes / largest.max(1) / self.keys.len().max(1);
        let current = self
            .read_count
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(1);
        let next = (current * 2)
            .min(fit)
            .clamp(1, self.config.batch_size.max(1) as usize);
        self.read_count
            .store(next, std::sync::atomic::Ordering::Relaxed);
    }

    pub(super) async fn ensure_groups(&self) -> Result<()> {
        let mut conn = self.redis.commands();
        for key in &self.keys {
            ensure_group(&mut conn, key, &self.config.name).await?;
        }
        Ok(())
    }

    /// One pass through this consumer's own pending entries, stream by stream, oldest first.
    pub(super) async fn pending_pass(&self) -> Result<super::Tally> {
        let mut tally = super::Tally::default();
        let mut conn = self.redis.commands();
        for key in &self.keys {
            let mut cursor = "0".to_string();
            loop {
                let entries = read_group(
                    &mut conn,
                    &self.config.name,
                    &self.instance,
                    std::slice::from_ref(key),
                    &cursor,
                    self.read_count(&mut self.redis.commands()).await,
                    None,
                )
                .await?;
                self.observe(&entries);
                let Some(last) = entries.last() else { break };
                cursor = last.id.clone();
                // read_group indexes streams within the keys it was given; map back.
                let stream = self.keys.iter().position(|k| k == key).unwrap_or(0);
                let entries = entries
                    .into_iter()
                    .map(|mut e| {
                        e.stream = stream;
                        e
                    })
                    .collect();
                tally.add(&self.process(entries, false).await?);
            }
        }
        Ok(tally)
    }

    /// Entries idle longer than `claim_idle_ms` in any consumer of the group, this one's
    /// failed entries included: claimed and processed.
    pub(super) async fn claim_pass(&self) -> Result<super::Tally> {
        let mut tally = super::Tally::default();
        let mut conn = self.redis.commands();
        for (stream, key) in self.keys.iter().enumerate() {
            let entries = autoclaim(
                &mut conn,
                stream,
                key,
                &self.config.name,
                &self.instance,
                self.config.claim_idle_ms,
                self.read_count(&mut self.redis.commands()).await,
            )
            .await?;
            self.observe(&entries);
            if !entries.is_empty() {
                tracing::info!(consumer = %self.config.name, stream = %key, entries = entries.len(), "claimed idle pending entries");
                tally.add(&self.process(entries, false).await?);
            }
        }
        Ok(tally)
    }

    /// New entries for this consumer, up to `count` per read. On a single Redis one
    /// `XREADGROUP` over every stream, blocking up to `block_ms`; on a cluster, whose streams
    /// live on different shards (a multi-key read would cross slots), one non-blocking read
    /// per stream, all at once.
    pub(super) async fn read_new(
        &self,
        conn: &mut crate::redis_io::Conn,
        count: usize,
        block_ms: Option<u64>,
    ) -> Result<Vec<Entry>> {
        let count = count.min(self.read_count(&mut self.redis.commands()).await);
        if !self.redis.is_cluster() {
            let entries = read_group(
                conn,
                &self.config.name,
                &self.instance,
                &self.keys,
                ">",
                count,
                block_ms,
            )
            .await?;
            self.observe(&entries);
            return Ok(entries);
        }
        let reads = self.keys.iter().enumerate().map(|(stream, key)| {
            let mut conn = conn.clone();
            async move {
                let entries = read_group(
                    &mut conn,
                    &self.config.name,
                    &self.instance,
                    std::slice::from_ref(key),
                    ">",
                    count,
                    None,
                )
                .await?;
                Ok::<Vec<Entry>, Error>(
                    entries
                        .into_iter()
                        .map(|mut e| {
                            e.stream = stream;
                            e
                        })
                        .collect(),
                )
            }
        });
        let mut out = Vec::new();
        for entries in futures_util::future::join_all(reads).await {
            out.extend(entries?);
        }
        self.observe(&out);
        Ok(out)
    }
}
