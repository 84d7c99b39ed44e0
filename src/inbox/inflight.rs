//! The consumer's batches in flight: while one batch is applied (its transactions waiting on
//! PostgreSQL), the next is read from Redis, decoded and started, so that reading, deciding
//! and committing overlap instead of taking turns. Two batches that touch one order are
//! harmless: the later one's lock on the order waits for the earlier one's commit, then reads
//! what it committed (and the rules make the result independent of arrival order anyway).
//! A batch of large events runs alone: its memory is the point.

use super::read::Entry;
use super::{Consumer, Tally};
use crate::error::{Error, Result};
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};

/// Batches applied at once by one consumer.
pub(super) const BATCHES_IN_FLIGHT: usize = 2;

/// The batches of one consumer being applied.
pub(super) struct Batches<'a> {
    running: FuturesUnordered<BoxFuture<'a, (bool, Result<Tally>)>>,
    /// Running batches that carry large events.
    large: usize,
    /// What the finished batches handled.
    tally: Tally,
    /// The first error of a finished batch, for the caller to act on.
    failure: Option<Error>,
}

impl<'a> Batches<'a> {
    pub(super) fn new() -> Batches<'a> {
        Batches {
            running: FuturesUnordered::new(),
            large: 0,
            tally: Tally::default(),
            failure: None,
        }
    }

    /// Whether another batch may start now.
    pub(super) fn has_room(&self) -> bool {
        self.large == 0 && self.running.len() < BATCHES_IN_FLIGHT
    }

    /// Starts applying `entries` (new entries, delivered once) beside the running batches.
    pub(super) fn start(&mut self, consumer: &'a Consumer, entries: Vec<Entry>) {
        let large = super::apply::carries_large_entries(&entries);
        if large {
            self.large += 1;
        }
        self.running.push(Box::pin(async move {
            (large, consumer.process(entries, true).await)
        }));
    }

    fn finished(&mut self, large: bool, result: Result<Tally>) {
        if large {
            self.large -= 1;
        }
        match result {
            Ok(t) => self.tally.add(&t),
            Err(e) => {
                self.failure.get_or_insert(e);
            }
        }
    }

    /// Waits for one batch to finish (at once when none runs).
    pub(super) async fn one(&mut self) {
        if let Some((large, result)) = self.running.next().await {
            self.finished(large, result);
        }
    }

    /// Runs `work` (the next read) while the batches go on.
    pub(super) async fn beside<T>(&mut self, work: impl std::future::Future<Output = T>) -> T {
        tokio::pin!(work);
        loop {
            tokio::select! {
                biased;
                out = &mut work => return out,
                Some((large, result)) = self.running.next(), if !self.running.is_empty() => {
                    self.finished(large, result);
                }
            }
        }
    }

    /// Waits for every running batch: none is cut off in the middle of its transaction.
    pub(super) async fn finish(&mut self) {
        while let Some((large, result)) = self.running.next().await {
            self.finished(large, result);
        }
    }

    /// Whether a batch that finished failed.
    pub(super) fn has_failed(&self) -> bool {
        self.failure.is_some()
    }

    /// The first error of a batch that finished, if any (taken).
    pub(super) fn failure(&mut self) -> Option<Error> {
        self.failure.take()
    }

    /// What the finished batches handled so far (taken).
    pub(super) fn tally(&mut self) -> Tally {
        std::mem::take(&mut self.tally)
    }
}
