//! One pipelined round trip of `XADD`s for a relay batch, with per-entry results so that a
//! row Redis rejects for its own reason (the key holds another type) is told apart from the
//! connection or server failing, which fails the whole batch.

use crate::error::{Error, Result};
use crate::redis_io::{pipeline_by_key, Conn};

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
pub async fn unusable_keys(conn: &mut Conn, keys: &[&str]) -> Result<Vec<(String, String)>> {
    let commands = keys
        .iter()
        .map(|key| {
            let mut cmd = redis::cmd("TYPE");
            cmd.arg(*key);
            ((*key).to_string(), cmd)
        })
        .collect();
    let replies = pipeline_by_key(conn, commands)
        .await
        .map_err(Error::redis("checking stream key types"))?;
    let mut unusable = Vec::new();
    for (key, reply) in keys.iter().zip(replies) {
        let reply = reply.map_err(Error::redis("checking stream key types"))?;
        let kind = crate::inbox::read::text(&reply).unwrap_or_default();
        if kind != "stream" && kind != "none" {
            unusable.push(((*key).to_string(), kind));
        }
    }
    Ok(unusable)
}

/// Sends `XADD key * data envelope` for every entry, each key's entries in order, in one
/// round trip (one per key on a cluster, all at once).
pub async fn publish(conn: &mut Conn, entries: &[(String, Vec<u8>)]) -> Result<Vec<EntryResult>> {
    let commands = entries
        .iter()
        .map(|(key, envelope)| {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(key).arg("*").arg("data").arg(envelope.as_slice());
            (key.clone(), cmd)
        })
        .collect();
    let results = pipeline_by_key(conn, commands)
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
