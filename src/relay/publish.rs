//! Publishing a relay batch: the `XADD`s of each stream key run as one script on the server,
//! every key's script sent in one pipelined round trip (one per key on a cluster, all at
//! once), with per-entry results so that a row Redis rejects for its own reason (the key
//! holds another type) is told apart from the connection or server failing, which fails the
//! whole batch.
//!
//! Why a script and not plain pipelined `XADD`s: a pipeline is not all-or-nothing, and not
//! even "a prefix or nothing". Redis answers each command on its own, so an early `XADD` can
//! be refused for a passing reason (`LOADING` while a restarted server reads its AOF,
//! `OOM`, `MISCONF`, a key briefly of another type) while a later one of the same aggregate,
//! read from the socket a moment later, lands. The batch then rolls back and is published
//! again, but the later event is already on the stream ahead of the earlier one: the
//! per-aggregate order (SPEC 7.2) is broken for every consumer that sees first occurrences.
//! A script is one command: it runs whole, with nothing else in between, and it stops at
//! the first refused `XADD`, so what lands of a key's entries is always all of them or a
//! prefix of them (in practice all or none: every refusal above happens on the first write).
//! Each aggregate's events go to one key, so each aggregate's landed events are a prefix of
//! the batch's, and the earlier ones it waits for (the head check) landed before.

use crate::error::{Error, Result};
use crate::redis_io::{pipeline_by_key, Conn};

/// `XADD KEYS[1] * data ARGV[i]` for every argument in order; stops at the first refusal and
/// answers with it (its own error code first, so it is classified like a plain `XADD`'s),
/// otherwise with the number of entries added. `pcall` rather than `call` so the refusal
/// comes back as it is on every server version (a raised error is reworded by Redis 6).
const XADD_ALL: &str = "for i = 1, #ARGV do
  local r = redis.pcall('XADD', KEYS[1], '*', 'data', ARGV[i])
  if type(r) == 'table' and r.err then return redis.error_reply(r.err) end
end
return #ARGV";

/// The outcome of one entry of a batch.
#[derive(Debug)]
pub enum EntryResult {
    Published,
    /// Redis refused this entry for a reason of the row's own (counted as an attempt).
    Rejected(String),
    /// Not attempted: an earlier entry of the same aggregate was refused, and nothing may
    /// overtake it.
    NotSent,
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
        let kind = crate::redis_io::text(&reply).unwrap_or_default();
        if kind != "stream" && kind != "none" {
            unusable.push(((*key).to_string(), kind));
        }
    }
    Ok(unusable)
}

/// Appends every entry to its stream, each key's entries in order and all or none of them
/// (see the module doc), in one round trip. `aggregates[i]` is entry i's aggregate. Results
/// come back in the order of `entries`.
pub async fn publish(
    conn: &mut Conn,
    entries: &[(String, Vec<u8>)],
    aggregates: &[&str],
) -> Result<Vec<EntryResult>> {
    // per key, in order of first appearance: the indexes of its entries, in batch order
    let mut keys: Vec<(&str, Vec<usize>)> = Vec::new();
    let mut slot_of: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (i, (key, _)) in entries.iter().enumerate() {
        let slot = *slot_of.entry(key.as_str()).or_insert_with(|| {
            keys.push((key.as_str(), Vec::new()));
            keys.len() - 1
        });
        keys[slot].1.push(i);
    }
    let commands = keys
        .iter()
        .map(|(key, members)| {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(XADD_ALL).arg(1).arg(*key);
            for &i in members {
                cmd.arg(entries[i].1.as_slice());
            }
            ((*key).to_string(), cmd)
        })
        .collect();
    let replies = pipeline_by_key(conn, commands)
        .await
        .map_err(Error::redis("publishing a batch"))?;
    if replies.len() != keys.len() {
        return Err(Error::UnexpectedReply {
            command: "publishing a batch".into(),
            reply: format!("{} replies to a pipeline of {}", replies.len(), keys.len()),
        });
    }
    let mut out: Vec<EntryResult> = (0..entries.len()).map(|_| EntryResult::NotSent).collect();
    for ((_, members), reply) in keys.iter().zip(replies) {
        match reply {
            Ok(_) => {
                for &i in members {
                    out[i] = EntryResult::Published;
                }
            }
            Err(e) if crate::redis_io::is_row_fault(&e) => {
                // The key holds another type: every entry would be refused. As when the type
                // check finds it, the first of each aggregate is charged and the rest of the
                // aggregate waits behind it (none was tried).
                let mut charged: std::collections::HashSet<&str> = Default::default();
                for &i in members {
                    if charged.insert(aggregates[i]) {
                        out[i] = EntryResult::Rejected(e.to_string());
                    }
                }
            }
            Err(e) => return Err(Error::redis("publishing a batch")(e)),
        }
    }
    Ok(out)
}
