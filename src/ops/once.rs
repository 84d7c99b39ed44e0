//! The `--once` drains side by side: `relay --once` (every configured relay drained in turn)
//! and `consume --once` (every configured consumer), each with a summary line, retrying a
//! server that is away for up to `--give-up-after`.

use crate::config::Config;
use crate::error::Result;
use crate::redis_io::Redis;
use std::io::IsTerminal;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// `relay --once`: every configured relay drained in turn, a progress line on a terminal, and
/// a summary line per relay (rows, seconds, rows/s, held back with the blocking pids).
pub async fn relay_once(
    config: &Config,
    wait_held: Option<std::time::Duration>,
    give_up_after: std::time::Duration,
    shutdown: &CancellationToken,
) -> Result<()> {
    let pools = crate::db::pools(config)?;
    let redis = Redis::for_config(config)?;
    let relays = crate::relay::build_all(config, &pools, &redis)?;
    if relays.is_empty() {
        return Err(crate::config::ConfigError::new("relays", "no relay configured").into());
    }
    let tty = std::io::stderr().is_terminal();
    for mut relay in relays {
        relay.set_give_up_after(give_up_after);
        let name = relay.name();
        let mut last = Instant::now();
        let summary = relay
            .drain(wait_held, shutdown, |published| {
                if tty && last.elapsed().as_millis() >= 250 {
                    last = Instant::now();
                    eprint!("\rrelay {name}: {published} rows published");
                }
            })
            .await?;
        if tty {
            eprintln!();
        }
        let held = &summary.held_back;
        let blockers = if held.blockers.is_empty() {
            String::new()
        } else {
            format!(
                " (blocking pids: {})",
                held.blockers
                    .iter()
                    .map(|b| format!("{} open {:.1}s", b.pid, b.xact_age_seconds))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        crate::outln!(
            "relay {name}: {} rows in {:.3} s ({:.0} rows/s); {} failed, {} quarantined; {} held back by open transactions{blockers}",
            summary.published,
            summary.seconds,
            summary.rate(),
            summary.failed,
            summary.quarantined,
            held.rows,
        );
    }
    Ok(())
}

/// `consume --once` for every configured consumer, with a summary line each.
pub async fn consume_once(
    config: &Config,
    give_up_after: Duration,
    shutdown: &CancellationToken,
) -> Result<()> {
    let pools = crate::db::pools(config)?;
    let redis = Redis::for_config(config)?;
    let mut consumers = crate::inbox::build_all(config, &pools, &redis)?;
    for consumer in &mut consumers {
        consumer.set_give_up_after(give_up_after);
    }
    if consumers.is_empty() {
        return Err(crate::config::ConfigError::new("consumers", "no consumer configured").into());
    }
    for consumer in consumers {
        let started = Instant::now();
        let t = consumer.drain(shutdown).await?;
        consumer.forget_self().await;
        let secs = started.elapsed().as_secs_f64();
        crate::outln!(
            "consume {}: {} events in {:.3} s ({:.0} events/s): {} applied, {} duplicate, {} skipped, {} dead-lettered",
            consumer.group(),
            t.handled(),
            secs,
            if secs > 0.0 { t.handled() as f64 / secs } else { 0.0 },
            t.applied,
            t.duplicate,
            t.skipped,
            t.dead_lettered
        );
    }
    Ok(())
}
