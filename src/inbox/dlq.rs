//! Dead letters: an entry that can never be handled, or that failed `max_deliveries` times,
//! is copied to `<stream>:dlq` with the reason, the consumer group, this consumer, and its
//! delivery count, then acknowledged, so the rest of the stream keeps flowing.

use super::read::Entry;
use crate::error::{Error, Result};
use redis::aio::ConnectionLike;

/// The dead-letter stream of a stream key.
pub fn dlq_key(stream_key: &str) -> String {
    format!("{stream_key}:dlq")
}

/// Writes the dead letter, then acknowledges the original. If the process dies in between,
/// the entry is delivered again and dead-lettered again: a duplicate dead letter, never a
/// lost one.
#[allow(clippy::too_many_arguments)]
pub async fn dead_letter<C: ConnectionLike>(
    conn: &mut C,
    stream_key: &str,
    group: &str,
    consumer: &str,
    entry: &Entry,
    reason: &str,
    deliveries: u64,
) -> Result<()> {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(dlq_key(stream_key))
        .arg("*")
        .arg("stream")
        .arg(stream_key)
        .arg("entry_id")
        .arg(&entry.id)
        .arg("group")
        .arg(group)
        .arg("consumer")
        .arg(consumer)
        .arg("reason")
        .arg(reason)
        .arg("deliveries")
        .arg(deliveries)
        .arg("dead_lettered_at_ms")
        .arg(now_ms());
    for (field, value) in &entry.fields {
        let mut name = b"entry.".to_vec();
        name.extend_from_slice(field);
        cmd.arg(name).arg(value.as_slice());
    }
    let _: String = cmd
        .query_async(conn)
        .await
        .map_err(Error::redis(format!("XADD {}", dlq_key(stream_key))))?;
    let _: i64 = redis::cmd("XACK")
        .arg(stream_key)
        .arg(group)
        .arg(&entry.id)
        .query_async(conn)
        .await
        .map_err(Error::redis(format!("XACK {stream_key}")))?;
    Ok(())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
