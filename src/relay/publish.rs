//! One pipelined round trip of `XADD`s for a relay batch, with per-entry results so that a
//! row Redis rejects for its own reason (the key holds another type) is told apart from the
//! connection or server failing, which fails the whole batch.

use crate::error::{Error, Result};
use redis::aio::ConnectionManager;

/// The outcome of one entry of the pipeline.
#[derive(Debug)]
pub enum EntryResult {
    Published,
    /// Redis refused this entry for a reason of the row's own (counted as an attempt).
    Rejected(String),
}

/// The keys among `keys` that exist and hold something other than a stream: an `XADD` to
/// them would be refused. Checked before publishing so that a row bound for such a key stops
/// the rest of its aggregate in the batch instead of being overtaken by them.
pub async fn unusable_keys(
    conn: &mut ConnectionManager,
    keys: &[&str],
) -> Result<Vec<(String, String)>> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for key in keys {
        pipe.cmd("TYPE").arg(*key);
    }
    let types: Vec<String> = pipe
        .query_async(conn)
        .await
        .map_err(Error::redis("checking stream key types"))?;
    Ok(keys
        .iter()
        .zip(types)
        .filter(|(_, t)| t != "stream" && t != "none")
        .map(|(k, t)| ((*k).to_string(), t))
        .collect())
}

/// Sends `XADD key * data envelope` for every entry, in order, in one round trip.
pub async fn publish(
    conn: &mut ConnectionManager,
    entries: &[(String, Vec<u8>)],
) -> Result<Vec<EntryResult>> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for (key, envelope) in entries {
        pipe.cmd("XADD")
            .arg(key)
            .arg("*")
            .arg("data")
            .arg(envelope.as_slice());
    }
    let results: Vec<redis::RedisResult<redis::Value>> = pipe
        .ignore_errors()
        .query_async(conn)
        .await
        .map_err(Error::redis("publishing a batch"))?;
    if results.len() != entries.len() {
        return Err(Error::Other(format!(
            "Redis answered {} replies to a pipeline of {}",
            results.len(),
            entries.len()
        )));
    }
    let mut out = Vec::with_capacity(results.len());
    for result in results {
        match result {
            Ok(_) => out.push(EntryResult::Published),
            Err(e) if crate::redis_io::is_row_fault(&e) => {
                out.push(EntryResult::Rejected(e.to_string()))
            }
            Err(e) => return Err(Error::redis("publishing a batch")(e)),
        }
    }
    Ok(out)
}
