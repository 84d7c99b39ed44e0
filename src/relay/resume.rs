//! The relay's resume point: the id at or below which no row of the outbox exists or can
//! still appear, so that claims and head checks start after it instead of walking the index
//! entries of every row a long drain has already deleted (which made a drain slow down as
//! it went: each batch rescanned the whole drained prefix).
//!
//! Why it is safe. An outbox row takes its producer's shared advisory lock before it gets
//! its id (0001_outbox.sql), and ids are handed out in order (sequence CACHE 1, checked at
//! startup). A claim reads `pg_locks` after its snapshot, and returns the virtual
//! transaction IDs holding this table's producer locks then. Every id up to the claim's last
//! id was handed out before that read; a transaction that had one and was still open at the
//! read is among those holders. So the claim's last id becomes a *safe horizon* as soon as
//! none of those holders is left (seen by a later claim's read; at once when there were
//! none): from then on every row at or below it is committed (visible to any later snapshot)
//! or never will be. A batch whose head check (a snapshot after that proof) found it to be
//! the whole head of the table above the current point, and that committed with all its rows
//! published, leaves no row up to min(horizon, its last id): the point moves there.
//!
//! An unrelated long transaction does not hold it back; an open producer transaction holds
//! back only the horizons taken while it was open. A quarantined, deferred or failed row is
//! never passed (such a batch is not a whole head). Every `RESCAN_EVERY` one claim and its
//! check start from the beginning anyway, and a row found at or below the point (an id
//! sequence reset by hand, `TRUNCATE ... RESTART IDENTITY`) resets it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How often a claim starts from the beginning of the table regardless of the point.
pub(super) const RESCAN_EVERY: Duration = Duration::from_secs(10);

/// Horizons kept while their holders are still open (older ones are dropped first: a later
/// horizon whose holders end covers them).
const PENDING_HORIZONS: usize = 64;

#[derive(Debug)]
pub(super) struct ResumePoint {
    /// No row with an id at or below it exists or can appear.
    point: i64,
    /// The largest proven safe horizon (see the module doc).
    safe: i64,
    /// (last id of a claim, the producer transactions open at its lock read), oldest first.
    pending: VecDeque<(i64, Vec<String>)>,
    last_rescan: Instant,
}

impl ResumePoint {
    pub(super) fn new() -> ResumePoint {
        ResumePoint {
            point: 0,
            safe: 0,
            pending: VecDeque::new(),
            last_rescan: Instant::now(),
        }
    }

    /// Where a claim and its head check start (exclusive): the point, or 0 when a rescan
    /// from the beginning is due.
    pub(super) fn floor(&mut self) -> i64 {
        if self.last_rescan.elapsed() >= RESCAN_EVERY {
            self.last_rescan = Instant::now();
            return 0;
        }
        self.point
    }

    /// A claim came back: `first_id..=last_id` claimed from `floor`, with `holders` the
    /// producer transactions open at its lock read. Proves earlier horizons safe, records
    /// this one. A claimed row at or below the point means the point was wrong (the id
    /// sequence went back): it is reset.
    pub(super) fn claimed(&mut self, first_id: i64, last_id: i64, holders: &[String]) {
        if first_id <= self.point {
            tracing::warn!(
                row_id = first_id,
                resume_point = self.point,
                "an outbox row has an id at or below the relay's resume point (was the id sequence reset?); scanning from the beginning again"
            );
            *self = ResumePoint::new();
        }
        let mut proven = self.safe;
        self.pending.retain(|(horizon, open)| {
            let ended = !open.iter().any(|t| holders.contains(t));
            if ended {
                proven = proven.max(*horizon);
            }
            !ended
        });
        if holders.is_empty() {
            proven = proven.max(last_id);
        } else {
            if self.pending.len() >= PENDING_HORIZONS {
                self.pending.pop_front();
            }
            self.pending.push_back((last_id, holders.to_vec()));
        }
        self.safe = proven;
    }

    /// The safe horizon as of now: read right before a head check, whose snapshot is then
    /// taken after every proof it rests on.
    pub(super) fn safe_horizon(&self) -> i64 {
        self.safe
    }

    /// A batch committed with every row up to `last_id` above its floor published (its head
    /// check, taken after `horizon` was proven, found it the whole head).
    pub(super) fn settled(&mut self, horizon: i64, last_id: i64) {
        self.point = self.point.max(horizon.min(last_id));
    }

    #[cfg(test)]
    fn point(&self) -> i64 {
        self.point
    }
}

#[cfg(test)]
mod tests {
    use super::ResumePoint;

    fn tx(s: &str) -> Vec<String> {
        vec![s.to_string()]
    }

    #[test]
    fn with_no_producer_open_a_whole_head_batch_moves_the_point_to_its_last_id() {
        let mut r = ResumePoint::new();
        assert_eq!(r.floor(), 0);
        r.claimed(1, 1000, &[]);
        let horizon = r.safe_horizon();
        r.settled(horizon, 1000);
        assert_eq!(r.point(), 1000);
        assert_eq!(r.floor(), 1000);
    }

    #[test]
    fn a_horizon_waits_until_every_transaction_open_at_its_claim_has_ended() {
        let mut r = ResumePoint::new();
        r.claimed(1, 100, &tx("3/7"));
        r.settled(r.safe_horizon(), 100);
        assert_eq!(r.point(), 0, "3/7 may still commit a row below 100");
        // still open at the next claim: nothing proven yet
        r.claimed(101, 200, &["3/7".to_string(), "4/9".to_string()]);
        r.settled(r.safe_horizon(), 200);
        assert_eq!(r.point(), 0);
        // 3/7 ended, 4/9 (open at the second claim) not: the first horizon only
        r.claimed(201, 300, &tx("4/9"));
        r.settled(r.safe_horizon(), 300);
        assert_eq!(r.point(), 100);
        r.claimed(301, 400, &[]);
        r.settled(r.safe_horizon(), 400);
        assert_eq!(r.point(), 400);
    }

    #[test]
    fn a_horizon_proven_after_the_head_check_does_not_count_for_that_batch() {
        let mut r = ResumePoint::new();
        r.claimed(1, 100, &tx("3/7"));
        let read_before_check = r.safe_horizon();
        // a later claim (another batch in flight) proves 100 safe after that check
        r.claimed(101, 200, &[]);
        r.settled(read_before_check, 100);
        assert_eq!(r.point(), 0);
    }

    #[test]
    fn the_point_never_passes_the_batch_that_settled_it() {
        let mut r = ResumePoint::new();
        r.claimed(1, 500, &[]);
        // a rescan batch from the beginning that ended lower
        r.settled(r.safe_horizon(), 200);
        assert_eq!(r.point(), 200);
        r.settled(r.safe_horizon(), 100);
        assert_eq!(r.point(), 200, "the point never goes back");
    }

    #[test]
    fn a_row_at_or_below_the_point_resets_it() {
        let mut r = ResumePoint::new();
        r.claimed(1, 500, &[]);
        r.settled(r.safe_horizon(), 500);
        r.claimed(3, 40, &tx("1/1"));
        assert_eq!(r.point(), 0);
        assert_eq!(r.safe_horizon(), 0);
        assert_eq!(r.floor(), 0);
    }
}
