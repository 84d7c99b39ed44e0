//! Retrying what a server's trouble makes fail: exponential backoff with jitter for the
//! loops that retry forever, and the budget of the `--once` drains, which retry a server
//! that is away or silent for `--give-up-after` and then give up.

use std::time::{Duration, Instant};

/// Exponential backoff with jitter (from `backon`, which the redis crate already uses),
/// 100 ms doubling to 10 s, never giving up on its own.
#[derive(Debug)]
pub struct Backoff {
    iter: backon::ExponentialBackoff,
}

impl Backoff {
    pub fn new() -> Backoff {
        use backon::BackoffBuilder;
        Backoff {
            iter: backon::ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(10))
                .with_jitter()
                .without_max_times()
                .build(),
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        self.iter.next().unwrap_or(Duration::from_secs(10))
    }

    pub fn reset(&mut self) {
        *self = Backoff::new();
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new()
    }
}

/// The `--once` drains' patience with transient failures: backoff between attempts, and a
/// deadline counted from the start of the first attempt that failed.
#[derive(Debug)]
pub struct TransientBudget {
    give_up_after: Duration,
    since: Option<Instant>,
    backoff: Backoff,
}

impl TransientBudget {
    pub fn new(give_up_after: Duration) -> TransientBudget {
        TransientBudget {
            give_up_after,
            since: None,
            backoff: Backoff::new(),
        }
    }

    /// An attempt succeeded: the next failure starts a new budget.
    pub fn reset(&mut self) {
        self.since = None;
        self.backoff.reset();
    }

    /// After an attempt that began at `started` failed transiently: how long to wait before
    /// the next one, or `None` when the budget is spent.
    pub fn next_wait(&mut self, started: Instant) -> Option<Duration> {
        let since = *self.since.get_or_insert(started);
        let left = self.give_up_after.checked_sub(since.elapsed())?;
        Some(self.backoff.next_delay().min(left))
    }
}
