//! Batches in flight: while one batch publishes and commits, the next claims the rows after
//! it, when the first is the whole head of the table (see `batches_in_flight`). What a run of
//! them did is an [`InFlightRun`].

use super::{BatchOutcome, CheckRequest, Claimed, Finished, Links, Relay};
use crate::error::{Error, Result};
use futures_util::StreamExt;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// What a run of pipelined batches did (see [`Relay::batches_in_flight`]).
#[derive(Debug, Default)]
pub struct InFlightRun {
    /// The batches' outcomes, summed.
    pub outcome: BatchOutcome,
    /// A batch claimed rows and could publish none of them: other relays hold the heads of
    /// their aggregates for the moment.
    pub stalled: bool,
    /// The first error of a batch; the batches beside it still finished.
    pub error: Option<Error>,
}

impl Relay {
    /// Opens the pool's connections for the batches in flight at once, in the background,
    /// each with the batch's statements prepared: made one after another as batches launch,
    /// the connects and prepares held up the first batches of every drain. Only connections
    /// the pool lacks are made (it keeps them, within `pool_size`), and one is left for the
    /// first batch to take.
    fn warm_up(&self, in_flight_max: usize) {
        let missing = in_flight_max.saturating_sub(self.pool.status().size + 1);
        if missing == 0 {
            return;
        }
        let statements: std::sync::Arc<[String]> = [
            self.sql.claim.as_str(),
            &self.sql.rows,
            &self.sql.rows_up_to,
            self.delete_sql(),
        ]
        .map(str::to_string)
        .into();
        for _ in 0..missing {
            let pool = self.pool.clone();
            let statements = statements.clone();
            let bound = self.pg.query_timeout;
            tokio::spawn(async move {
                // best effort: a batch that finds no connection ready makes its own
                let _ = tokio::time::timeout(bound, async {
                    if let Ok(client) = pool.get().await {
                        for sql in statements.iter() {
                            if client.prepare_cached(sql).await.is_err() {
                                return;
                            }
                        }
                    }
                })
                .await;
            });
        }
    }

    /// Batches back to back while their claims come back full, up to three in flight (at
    /// most the pool's size): while one batch publishes and commits, the next ones claim and
    /// read their rows, and each checks its heads only after the commit of the one before (or
    /// has the one before count them in its transaction, see `Links` in batch.rs). Three,
    /// because a claim is now cheap and reading the claimed rows is not: the third batch
    /// claims while the second reads, so that a batch is ready whenever the one before it
    /// commits (two in flight left the publishes waiting for the reads).
    ///
    /// The next batch is launched early only while the batches were whole heads of the table
    /// (no row at or below a batch's last id outside it: the single relay draining a
    /// backlog; taken to be so until the first batch has finished), and then it claims only rows after those of the batch in flight. Otherwise
    /// its claim would walk past the locked rows of the batch in flight one by one, which
    /// costs PostgreSQL more than the overlap saves: the batches then run one after another.
    /// Any subset of rows is a safe claim (order comes from the head check, not from what is
    /// claimed), and a row the bound skips (a late commit below it) is seen by the next check,
    /// which then finds it is not the whole head, so the batch after it starts from the beginning again. The
    /// wait for the previous commit is for speed too: a check that ran earlier would see the
    /// previous batch's rows and hold their aggregates back, as with any other relay; after
    /// the commit they are gone and the check's fast path applies.
    ///
    /// Stops launching batches when a claim comes back short, when a batch publishes nothing
    /// of what it claimed (other relays hold the heads; no point spinning), on an error, on
    /// shutdown, or when `still_active` (the active lock's connection, see active.rs) goes
    /// false, and returns once the batches in flight have finished.
    pub async fn batches_in_flight(
        &self,
        relid: u32,
        shutdown: &CancellationToken,
        still_active: Option<&AtomicBool>,
        progress: &mut (dyn FnMut(&BatchOutcome) + Send),
    ) -> InFlightRun {
        const IN_FLIGHT: usize = 3;
        // each batch in flight holds a connection until it commits
        let in_flight_max = IN_FLIGHT.min(self.pool.status().max_size).max(1);
        let mut run = InFlightRun::default();
        let mut in_flight = futures_util::stream::FuturesOrdered::new();
        let mut previous_done: Option<oneshot::Receiver<Option<i64>>> = None;
        // where the batch launched last takes the next one's head-of-table count request
        let mut previous_asked: Option<CheckRequest> = None;
        // the last id claimed by the batch launched last, and whether the batch that finished
        // last was the whole head of the table
        let mut last_claimed = 0_i64;
        let mut claimed_heavy = false;
        // Until a batch says otherwise, the drain is taken to be alone at the head of the
        // table: the second batch claims as soon as the first has claimed, instead of after
        // its commit (any subset of rows is a safe claim; a first batch that is not the
        // whole head stops the overlap when it finishes).
        let mut whole_head = true;
        let mut launch = true;
        self.warm_up(in_flight_max);
        let mut finished = |result: Result<Finished>,
                            run: &mut InFlightRun,
                            launch: &mut bool,
                            whole_head: &mut bool| match result {
            Ok(Finished {
                outcome: o,
                whole_head: c,
            }) => {
                *whole_head = c;
                run.outcome.claimed += o.claimed;
                run.outcome.published += o.published;
                run.outcome.failed += o.failed;
                run.outcome.quarantined += o.quarantined;
                if o.claimed > 0 && o.published == 0 {
                    run.stalled = true;
                    *launch = false;
                }
                progress(&o);
            }
            Err(e) => {
                *launch = false;
                if run.error.is_none() {
                    run.error = Some(e);
                }
            }
        };
        loop {
            let room = in_flight.is_empty()
                || (whole_head && !claimed_heavy && in_flight.len() < in_flight_max);
            // a relay that lost its active lock finishes the batches in flight, starts no more
            let active = still_active.is_none_or(|a| a.load(Ordering::Acquire));
            if launch && room && active && !shutdown.is_cancelled() {
                let lower_bound = if in_flight.is_empty() {
                    0
                } else {
                    last_claimed
                };
                let (claimed_tx, mut claimed_rx) = oneshot::channel();
                let (done_tx, done_rx) = oneshot::channel();
                let asked_by_next = CheckRequest::default();
                in_flight.push_back(self.batch(
                    relid,
                    lower_bound,
                    Links {
                        after: previous_done.replace(done_rx),
                        ask_previous: previous_asked.replace(asked_by_next.clone()),
                        asked_by_next: Some(asked_by_next),
                        claimed: claimed_tx,
                        done: done_tx,
                    },
                ));
                // The batches in flight keep moving while this one claims.
                loop {
                    tokio::select! {
                        claimed = &mut claimed_rx => {
                            match claimed {
                                Ok(Claimed { full: true, last_id, heavy }) => {
                                    last_claimed = last_id;
                                    claimed_heavy = heavy;
                                }
                                _ => launch = false,
                            }
                            break;
                        }
                        Some(result) = in_flight.next() => {
                            finished(result, &mut run, &mut launch, &mut whole_head)
                        }
                    }
                }
                continue;
            }
            match in_flight.next().await {
                Some(result) => finished(result, &mut run, &mut launch, &mut whole_head),
                None => return run,
            }
        }
    }
}
