//! Wiring: turns a parsed command line into running loops. Builds the pools and the Redis
//! client from the configuration, supervises the relay and consumer loops in one `JoinSet`
//! (a loop that hits an error retrying cannot cure cancels the others and the process exits
//! 1 naming it), and serves the HTTP endpoint next to them.

use crate::cli::{Cli, Command};
use crate::config::{Config, Overrides};
use crate::error::{Error, Result};
use crate::redis_io::Redis;
use std::future::Future;
use std::pin::Pin;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub async fn execute(cli: Cli) -> Result<()> {
    if let Command::Demo(args) = &cli.command {
        return crate::ops::demo::run(args).await;
    }
    let config = load_config(&cli)?;
    match &cli.command {
        Command::Migrate => {
            let report = crate::migrate::migrate(&config).await?;
            for (db, target, version, name) in &report.applied {
                crate::outln!("migrate: {db}: applied {target} version {version} ({name})");
            }
            crate::outln!(
                "migrate: {} step(s) applied, {} already in place",
                report.applied.len(),
                report.already
            );
            Ok(())
        }
        Command::Relay(args) => {
            let shutdown = crate::shutdown::on_signals();
            if args.once {
                crate::ops::once::relay_once(&config, args.wait_held, args.give_up_after, &shutdown)
                    .await
            } else {
                daemon(&config, true, false, shutdown).await
            }
        }
        Command::Consume(args) => {
            let shutdown = crate::shutdown::on_signals();
            if args.once {
                crate::ops::once::consume_once(&config, args.give_up_after, &shutdown).await
            } else {
                daemon(&config, false, true, shutdown).await
            }
        }
        Command::Run => daemon(&config, true, true, crate::shutdown::on_signals()).await,
        Command::Status(args) => {
            // Every query and command in it has its own bound; this one is the backstop.
            let bound = config.largest_operation_bound() * 3;
            match tokio::time::timeout(bound, crate::ops::status::run(&config, args.json)).await {
                Ok(result) => result,
                Err(_) => Err(Error::Timeout {
                    server: "PostgreSQL or Redis",
                    context: "status".into(),
                    after_ms: bound.as_millis() as u64,
                }),
            }
        }
        Command::Dlq(cmd) => {
            use crate::cli::DlqCommand;
            use crate::ops::dlq::Action;
            let (action, a) = match cmd {
                DlqCommand::List(a) => (Action::List, a),
                DlqCommand::Retry(a) => (Action::Retry, a),
                DlqCommand::Discard(a) => (Action::Discard, a),
            };
            let sel = crate::ops::dlq::Selection {
                stream: a.stream.clone(),
                reason: a.reason.clone(),
                id: a.id.clone(),
                limit: a.limit,
                after: a.after.clone(),
            };
            crate::ops::dlq::run(&config, action, sel, a.all, a.json).await
        }
        Command::Replay(args) => {
            crate::ops::replay::run(
                &config,
                &args.topic,
                &args.since,
                args.until.as_deref(),
                args.relay.as_deref(),
            )
            .await
        }
        Command::Inbox(crate::cli::InboxCommand::Prune(args)) => {
            crate::ops::prune::run(&config, args.older_than, args.batch).await
        }
        Command::Demo(_) => Ok(()),
    }
}

pub fn load_config(cli: &Cli) -> Result<Config> {
    let overrides = Overrides {
        redis_url: cli.redis_url.clone(),
        stream_prefix: cli.stream_prefix.clone(),
        http_listen: cli.http_listen.clone(),
    };
    let env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with("OUTBOXD_DATABASES_"))
        .collect();
    Ok(Config::load(cli.config.as_deref(), &overrides, &env)?)
}

type Loop = Pin<Box<dyn Future<Output = (String, Result<()>)> + Send>>;

/// Runs the configured relays and/or consumers and the HTTP endpoint until a signal (exit 0
/// after the batches in hand are committed, within the shutdown timeout) or until one loop
/// fails for good (exit 1).
pub async fn daemon(
    config: &Config,
    relays: bool,
    consumers: bool,
    shutdown: CancellationToken,
) -> Result<()> {
    let pools = crate::db::pools(config)?;
    let redis = Redis::for_config(config)?;
    crate::watchdog::set_stuck_after(config.stuck_after());
    let mut loops: Vec<Loop> = Vec::new();
    if relays {
        for relay in crate::relay::build_all(config, &pools, &redis)? {
            let token = shutdown.clone();
            loops.push(Box::pin(async move {
                let name = format!("relay {}", relay.name());
                (name, relay.run(token).await)
            }));
        }
    }
    if consumers {
        for consumer in crate::inbox::build_all(config, &pools, &redis)? {
            let token = shutdown.clone();
            loops.push(Box::pin(async move {
                let name = format!("consumer {}", consumer.group());
                (name, consumer.run(token).await)
            }));
        }
    }
    if loops.is_empty() {
        return Err(crate::config::ConfigError::new(
            if relays && !consumers {
                "relays"
            } else if consumers && !relays {
                "consumers"
            } else {
                "relays/consumers"
            },
            "nothing configured to run",
        )
        .into());
    }
    let http_token = shutdown.child_token();
    if !config.http.listen.is_empty() {
        let listener = tokio::net::TcpListener::bind(&config.http.listen)
            .await
            .map_err(|source| Error::Listen {
                address: config.http.listen.clone(),
                source,
            })?;
        let readiness = crate::telemetry::Readiness {
            databases: pools.iter().map(|(n, p)| (n.clone(), p.clone())).collect(),
            redis: Some(redis.clone()),
        };
        tracing::info!(listen = %config.http.listen, "serving /metrics /healthz /readyz");
        tokio::spawn(crate::telemetry::serve(
            listener,
            readiness,
            http_token.clone(),
        ));
    }
    // The gauges are only read through /metrics: without it, their queries (an exact count of
    // each outbox below a million rows, every 5 s) would be PostgreSQL's time for nothing.
    let gauges = (!config.http.listen.is_empty()).then(|| {
        tokio::spawn(crate::housekeeping::refresh_gauges_forever(
            config.clone(),
            pools.clone(),
            redis.clone(),
            shutdown.child_token(),
        ))
    });
    let housekeeping = tokio::spawn(crate::housekeeping::maintain_forever(
        config.clone(),
        pools.clone(),
        redis.clone(),
        shutdown.child_token(),
    ));
    let mut set = JoinSet::new();
    for l in loops {
        set.spawn(l);
    }
    let mut failure: Option<Error> = None;
    let timeout = config.shutdown_timeout();
    loop {
        let next = tokio::select! {
            n = set.join_next() => n,
            _ = shutdown.cancelled() => break,
        };
        match next {
            None => break,
            Some(Ok((_, Ok(())))) => {}
            Some(Ok((name, Err(e)))) => {
                tracing::error!(%name, error = %crate::error::chain(&e), "loop failed; stopping");
                failure = Some(Error::Loop {
                    name,
                    source: Box::new(e),
                });
                shutdown.cancel();
                break;
            }
            Some(Err(join)) => {
                failure = Some(Error::Panicked(join.to_string()));
                shutdown.cancel();
                break;
            }
        }
    }
    // Give the loops the shutdown timeout to commit and acknowledge the batch in hand.
    let drained = tokio::time::timeout(timeout, async {
        while let Some(joined) = set.join_next().await {
            if let Ok((name, Err(e))) = joined {
                if failure.is_none() && !e.is_transient() {
                    failure = Some(Error::Loop {
                        name,
                        source: Box::new(e),
                    });
                }
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(timeout_ms = timeout.as_millis() as u64, "shutdown timeout reached; abandoning the batches in hand (their transactions roll back)");
        set.abort_all();
    }
    http_token.cancel();
    if let Some(gauges) = gauges {
        gauges.abort();
    }
    housekeeping.abort();
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
