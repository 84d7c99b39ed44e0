//! The loops' watchdog: what `/healthz`, `/readyz` and `outboxd_loop_last_progress_age_seconds`
//! know about the relay and consumer loops. Each loop says when it enters an operation (a
//! relay drain, a consumer's read and batch), when it makes progress (a batch done, an idle
//! round with nothing to do), and when it fails and backs off. A loop in one operation for
//! longer than `stuck_after` fails `/healthz`, so that a supervisor restarts the process:
//! every operation has a bound of its own, so this fires only when a bound does not hold.
//! A loop that is backing off fails `/readyz`.

use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug)]
struct State {
    last_progress: Instant,
    /// Since when the loop has been in its current operation.
    busy_since: Option<Instant>,
    /// The error it is backing off from.
    backing_off: Option<String>,
}

/// One loop's handle on the watchdog.
#[derive(Debug, Clone)]
pub struct LoopWatch {
    state: Arc<Mutex<State>>,
}

impl LoopWatch {
    fn with(&self, f: impl FnOnce(&mut State)) {
        match self.state.lock() {
            Ok(mut s) => f(&mut s),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    /// The loop enters an operation.
    pub fn busy(&self) {
        self.with(|s| s.busy_since = Some(Instant::now()));
    }

    /// Progress inside a long operation (one batch of a drain): its clock starts again.
    pub fn beat(&self) {
        self.with(|s| {
            let now = Instant::now();
            s.last_progress = now;
            if s.busy_since.is_some() {
                s.busy_since = Some(now);
            }
        });
    }

    /// The operation finished (an idle round counts): progress, not busy, not backing off.
    pub fn done(&self) {
        self.with(|s| {
            s.last_progress = Instant::now();
            s.busy_since = None;
            s.backing_off = None;
        });
    }

    /// The operation failed and the loop backs off.
    pub fn failed(&self, error: &str) {
        self.with(|s| {
            s.busy_since = None;
            s.backing_off = Some(error.to_string());
        });
    }
}

#[derive(Debug)]
struct Registry {
    loops: Mutex<Vec<(String, LoopWatch)>>,
    stuck_after: Mutex<Duration>,
}

static WATCHDOG: LazyLock<Registry> = LazyLock::new(|| Registry {
    loops: Mutex::new(Vec::new()),
    stuck_after: Mutex::new(Duration::from_secs(90)),
});

/// Sets when a loop counts as stuck (`Config::stuck_after`).
pub fn set_stuck_after(bound: Duration) {
    if let Ok(mut b) = WATCHDOG.stuck_after.lock() {
        *b = bound;
    }
}

/// The watchdog's name of the relay loop of `database`'s `table` (its label in the metrics).
pub fn relay_loop(database: &str, table: &str) -> String {
    format!("relay {database}.{table}")
}

/// The watchdog's name of a consumer's loop.
pub fn consumer_loop(consumer: &str) -> String {
    format!("consumer {consumer}")
}

/// Registers a loop under `name` (`relay_loop` or `consumer_loop`).
pub fn register(name: &str) -> LoopWatch {
    let watch = LoopWatch {
        state: Arc::new(Mutex::new(State {
            last_progress: Instant::now(),
            busy_since: None,
            backing_off: None,
        })),
    };
    if let Ok(mut loops) = WATCHDOG.loops.lock() {
        loops.retain(|(n, _)| n != name);
        loops.push((name.to_string(), watch.clone()));
    }
    watch
}

fn each(mut f: impl FnMut(&str, &State)) {
    let Ok(loops) = WATCHDOG.loops.lock() else {
        return;
    };
    for (name, watch) in loops.iter() {
        match watch.state.lock() {
            Ok(s) => f(name, &s),
            Err(poisoned) => f(name, &poisoned.into_inner()),
        }
    }
}

/// `/healthz`: Err naming every loop that has been in one operation longer than the bound.
pub fn health() -> Result<(), String> {
    let bound = WATCHDOG
        .stuck_after
        .lock()
        .map(|b| *b)
        .unwrap_or(Duration::from_secs(90));
    let mut stuck = Vec::new();
    each(|name, s| {
        if let Some(since) = s.busy_since {
            let for_ = since.elapsed();
            if for_ > bound {
                stuck.push(format!(
                    "{name}: in one operation for {:.0} s (bound {:.0} s)",
                    for_.as_secs_f64(),
                    bound.as_secs_f64()
                ));
            }
        }
    });
    if stuck.is_empty() {
        Ok(())
    } else {
        Err(stuck.join("; "))
    }
}

/// Part of `/readyz`: Err naming every loop that is backing off, with its error.
pub fn readiness() -> Result<(), String> {
    let mut failing = Vec::new();
    each(|name, s| {
        if let Some(error) = &s.backing_off {
            failing.push(format!("{name}: backing off after: {error}"));
        }
    });
    if failing.is_empty() {
        Ok(())
    } else {
        Err(failing.join("; "))
    }
}

/// Sets `outboxd_loop_last_progress_age_seconds` for every loop (before a scrape).
pub fn export() {
    let gauge = &crate::metrics::metrics().loop_progress_age_seconds;
    each(|name, s| {
        gauge
            .with_label_values(&[name])
            .set(s.last_progress.elapsed().as_secs_f64());
    });
}
