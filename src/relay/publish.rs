//! Publishing a relay batch: the `XADD`s of each stream key run as one `MULTI`/`EXEC`
//! transaction, every key's transaction sent in one pipelined round trip (one per key on a
//! cluster, all at once), with per-entry results so that a row Redis rejects for its own
//! reason (the key holds another type) is told apart from the connection or server failing,
//! which fails the whole batch.
//!
//! Why a transaction and not plain pipelined `XADD`s: a pipeline is not all-or-nothing, and
//! not even "a prefix or nothing". Redis answers each command on its own, so an early `XADD`
//! can be refused for a passing reason (`LOADING` while a restarted server reads its AOF,
//! `OOM`, `MISCONF`, a key briefly of another type) while a later one of the same aggregate,
//! read from the socket a moment later, lands. The batch then rolls back and is published
//! again, but the later event is already on the stream ahead of the earlier one: the
//! per-aggregate order (SPEC 7.2) is broken for every consumer that sees first occurrences.
//! In a transaction nothing runs before `EXEC`, and then all of it runs with nothing in
//! between: a command refused while queueing (`LOADING`, `OOM`, `MISCONF`, `READONLY`, a
//! redirection) makes `EXEC` discard the whole transaction, `EXEC` itself is refused whole
//! for the same reasons, and a connection lost before `EXEC` leaves nothing. At `EXEC`, a key
//! that holds another type refuses every `XADD` of it. So what lands of a key's entries is
//! all of them or none. Each aggregate's events go to one key, so each aggregate's landed
//! events are all of the batch's, and the earlier ones it waits for (the head check) landed
//! before.
//!
//! This rests on `MULTI` itself being accepted: Redis and Valkey take it while loading,
//! while a script is busy and when out of memory (the states that refuse the `XADD`s), so a
//! refused `MULTI` is not expected; if one came, the `XADD`s after it would run unwrapped,
//! and its error fails the batch.
//!
//! The transactions go out on the relay's own connection (resp.rs) on a single server
//! without TLS, else through the redis crate's shared or cluster connection; both give the
//! same results, entry by entry.
//!
//! Why not a Lua script, which gives the same: Redis's Lua hashes every byte of every
//! argument it makes a string, which nearly doubled Redis's CPU an entry (2.1-2.5 us against
//! 1.2-1.3 us, README "Benchmark results").

use crate::envelope::{write_envelope, Outgoing};
use crate::error::{Error, Result};
use crate::redis_io::{pipeline_by_key, Conn};
use redis::{Cmd, Value};
use std::collections::HashMap;
use std::sync::Arc;

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

/// One stream entry ready to send: its stream key and its envelope.
pub struct Entry {
    pub key: Arc<str>,
    envelope: Vec<u8>,
}

impl Entry {
    /// The entry of `event`'s envelope on `key`, and the envelope's length.
    pub fn new(key: Arc<str>, event: &Outgoing<'_>) -> (Entry, usize) {
        // room for the envelope's members around the payload: the buffer does not grow
        let mut envelope = Vec::with_capacity(event.payload_json.len() + 512);
        let len = write_envelope(event, &mut envelope);
        (Entry { key, envelope }, len)
    }

    /// The stream key and the `XADD`, for a caller that sends it on its own.
    pub fn into_command(self) -> (Arc<str>, Cmd) {
        let mut xadd = redis::cmd("XADD");
        xadd.arg(&*self.key).arg("*").arg("data").arg(self.envelope);
        (self.key, xadd)
    }
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// Appends every entry to its stream, each key's entries in order and all or none of them
/// (see the module doc), in one round trip, on the relay's own connection (`own`, resp.rs)
/// when it has one, else on `conn`. `aggregates[i]` is entry i's aggregate. Results come back
/// in the order of `entries`.
pub async fn publish(
    conn: &mut Conn,
    own: Option<&crate::resp::Publisher>,
    entries: Vec<Entry>,
    aggregates: &[&str],
) -> Result<Vec<EntryResult>> {
    let count = entries.len();
    // per key, in order of first appearance: the indexes of its entries, in batch order
    // (a batch's entries mostly share one key: the previous entry's is tried first)
    let mut keys: Vec<(Arc<str>, Vec<usize>)> = Vec::new();
    let mut slot_of: HashMap<Arc<str>, usize> = HashMap::new();
    let mut last_slot: Option<usize> = None;
    for (i, entry) in entries.iter().enumerate() {
        let slot = match last_slot {
            Some(slot) if keys[slot].0 == entry.key => slot,
            _ => *slot_of.entry(entry.key.clone()).or_insert_with(|| {
                keys.push((entry.key.clone(), Vec::new()));
                keys.len() - 1
            }),
        };
        last_slot = Some(slot);
        keys[slot].1.push(i);
    }
    if let Some(own) = own {
        return publish_on_own(own, &entries, &keys, aggregates).await;
    }
    // per key: MULTI, its XADDs in batch order, EXEC
    let mut xadds: Vec<Option<Cmd>> = entries
        .into_iter()
        .map(|e| Some(e.into_command().1))
        .collect();
    let mut commands = Vec::with_capacity(count + 2 * keys.len());
    for (key, members) in &keys {
        commands.push((key.clone(), redis::cmd("MULTI")));
        for &i in members {
            if let Some(xadd) = xadds[i].take() {
                commands.push((key.clone(), xadd));
            }
        }
        commands.push((key.clone(), redis::cmd("EXEC")));
    }
    let sent = commands.len();
    let replies = pipeline_by_key(conn, commands)
        .await
        .map_err(Error::redis("publishing a batch"))?;
    if replies.len() != sent {
        return Err(Error::UnexpectedReply {
            command: "publishing a batch".into(),
            reply: format!("{} replies to a pipeline of {sent}", replies.len()),
        });
    }
    let mut out: Vec<EntryResult> = (0..count).map(|_| EntryResult::NotSent).collect();
    let mut replies = replies.into_iter();
    for (_, members) in &keys {
        // `OK` and a `QUEUED` per entry; a refusal here is the server's state (and EXEC
        // then answers EXECABORT: nothing ran)
        for reply in replies.by_ref().take(members.len() + 1) {
            reply.map_err(Error::redis("publishing a batch"))?;
        }
        let exec = match replies.next() {
            Some(reply) => reply.map_err(Error::redis("publishing a batch"))?,
            None => {
                return Err(Error::UnexpectedReply {
                    command: "publishing a batch".into(),
                    reply: "no reply to EXEC".into(),
                })
            }
        };
        let Value::Array(results) = exec else {
            return Err(Error::UnexpectedReply {
                command: "publishing a batch (EXEC)".into(),
                reply: format!("{exec:?}"),
            });
        };
        let refused = results.into_iter().find_map(|r| match r {
            Value::ServerError(e) => Some(redis::RedisError::from(e)),
            _ => None,
        });
        match refused {
            None => {
                for &i in members {
                    out[i] = EntryResult::Published;
                }
            }
            Some(e) => refuse(&mut out, members, aggregates, e)?,
        }
    }
    Ok(out)
}

/// A key's transaction ran and Redis refused an entry of it (`e`, the first refusal).
fn refuse(
    out: &mut [EntryResult],
    members: &[usize],
    aggregates: &[&str],
    e: redis::RedisError,
) -> Result<()> {
    if !crate::redis_io::is_row_fault(&e) {
        return Err(Error::redis("publishing a batch")(e));
    }
    // The key holds another type: every entry was refused. As when the type check finds
    // it, the first of each aggregate is charged and the rest of the aggregate waits behind
    // it.
    let mut charged: std::collections::HashSet<&str> = Default::default();
    for &i in members {
        if charged.insert(aggregates[i]) {
            out[i] = EntryResult::Rejected(e.to_string());
        }
    }
    Ok(())
}

/// [`publish`] on the relay's own connection: the same transactions, written and read by
/// resp.rs, and the same results.
async fn publish_on_own(
    own: &crate::resp::Publisher,
    entries: &[Entry],
    keys: &[(Arc<str>, Vec<usize>)],
    aggregates: &[&str],
) -> Result<Vec<EntryResult>> {
    let counts: Vec<usize> = keys.iter().map(|(_, members)| members.len()).collect();
    let answers = own
        .transactions(&counts, |out| {
            for (key, members) in keys {
                crate::resp::put_transaction(
                    out,
                    key,
                    members.iter().map(|&i| entries[i].envelope.as_slice()),
                );
            }
        })
        .await
        .map_err(Error::redis("publishing a batch"))?;
    let mut out: Vec<EntryResult> = (0..entries.len()).map(|_| EntryResult::NotSent).collect();
    for ((_, members), answer) in keys.iter().zip(answers) {
        match answer {
            crate::resp::Executed::All => {
                for &i in members {
                    out[i] = EntryResult::Published;
                }
            }
            crate::resp::Executed::Refused(e) => refuse(&mut out, members, aggregates, e)?,
        }
    }
    Ok(out)
}
