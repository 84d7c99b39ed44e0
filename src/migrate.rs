//! `outboxd migrate`: the embedded, versioned migrations of `sql/migrations`, rendered for
//! each configured table and applied once per (target, version) in every configured
//! database, under an advisory lock so concurrent runs queue instead of colliding.

use crate::config::{Config, ConsumerConfig};
use crate::db::{bare_name, quote_ident, quote_literal, quote_qualified};
use crate::error::{Error, Result};
use std::collections::BTreeSet;

const OUTBOX_V1: &str = include_str!("../sql/migrations/0001_outbox.sql");
const OUTBOX_ARCHIVE_V2: &str = include_str!("../sql/migrations/0004_outbox_archive.sql");
const INBOX_V1: &str = include_str!("../sql/migrations/0002_inbox.sql");
const ORDERS_V1: &str = include_str!("../sql/migrations/0003_orders.sql");
const ORDERS_PROGRESS_V2: &str = include_str!("../sql/migrations/0005_fulfillment_progress.sql");

const LEDGER: &str = "CREATE TABLE IF NOT EXISTS outboxd_migrations (
    target     text        NOT NULL,
    version    integer     NOT NULL,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (target, version)
)";

/// One thing a database needs, with its ordered migrations already rendered.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Target {
    /// e.g. `outbox:public.outbox`; the key in `outboxd_migrations`.
    pub key: String,
    pub steps: Vec<(i32, &'static str, String)>,
}

#[derive(Debug, Default)]
pub struct Report {
    /// (database, target, version, name) applied by this run.
    pub applied: Vec<(String, String, i32, String)>,
    /// How many steps were already in place.
    pub already: usize,
}

fn outbox_target(table: &str) -> Target {
    let render = |template: &str| {
        template
            .replace("{{table_literal}}", &quote_literal(&quote_qualified(table)))
            .replace("{{archive}}", &quote_qualified(&archive_table(table)))
            .replace("{{table}}", &quote_qualified(table))
            .replace("{{name}}", bare_name(table))
    };
    Target {
        key: format!("outbox:{table}"),
        steps: vec![
            (1, "outbox", render(OUTBOX_V1)),
            (2, "outbox archive", render(OUTBOX_ARCHIVE_V2)),
        ],
    }
}

/// The archive of an outbox (`schema.table` -> `schema.table_archive`).
pub fn archive_table(table: &str) -> String {
    format!("{table}_archive")
}

fn inbox_target(table: &str) -> Target {
    let sql = INBOX_V1
        .replace("{{table}}", &quote_qualified(table))
        .replace("{{name}}", bare_name(table));
    Target {
        key: format!("inbox:{table}"),
        steps: vec![(1, "inbox", sql)],
    }
}

fn orders_target(consumer: &ConsumerConfig) -> Target {
    let o = &consumer.orders;
    let sql = ORDERS_V1
        .replace("{{orders}}", &quote_qualified(&o.table))
        .replace("{{id}}", &quote_ident(&o.id_column))
        .replace("{{status}}", &quote_ident(&o.status_column))
        .replace("{{updated_at}}", &quote_ident(&o.updated_at_column));
    Target {
        key: format!("orders:{}", o.table),
        steps: vec![
            (1, "orders", sql),
            (2, "fulfillment progress", ORDERS_PROGRESS_V2.to_string()),
        ],
    }
}

/// What one database needs: the outboxes relayed from it or written by its handlers, the
/// inboxes of its consumers, and the order tables of its `order_status` consumers. A
/// database nothing refers to gets the default outbox (it is a producer not relayed yet).
pub fn targets_for(config: &Config, database: &str) -> Vec<Target> {
    let mut outboxes = BTreeSet::new();
    let mut inboxes = BTreeSet::new();
    let mut targets = Vec::new();
    for relay in config.relays.iter().filter(|r| r.database == database) {
        outboxes.insert(relay.table.clone());
    }
    let mut orders_seen = BTreeSet::new();
    for consumer in config.consumers.iter().filter(|c| c.database == database) {
        inboxes.insert(consumer.inbox_table.clone());
        if consumer.moves_orders() {
            outboxes.insert(consumer.outbox_table.clone());
            if orders_seen.insert(consumer.orders.table.clone()) {
                targets.push(orders_target(consumer));
            }
        }
    }
    if outboxes.is_empty() && inboxes.is_empty() {
        outboxes.insert(crate::config::defaults::outbox_table());
    }
    let mut all: Vec<Target> = outboxes.iter().map(|t| outbox_target(t)).collect();
    all.extend(inboxes.iter().map(|t| inbox_target(t)));
    all.extend(targets);
    all
}

/// The bound of one migration step, and of the wait for another `migrate` run's lock: a
/// step may create an index on, or rewrite, a large existing table, which takes far longer
/// than any statement of the daemon. The other statements get the database's query timeout,
/// so a server that does not answer at all is found within seconds.
pub const STEP_BOUND: std::time::Duration = std::time::Duration::from_secs(600);

/// Applies every pending step in every configured database.
pub async fn migrate(config: &Config) -> Result<Report> {
    let mut report = Report::default();
    for (name, db) in &config.databases {
        let pg = crate::db::pg_config(name, db)?;
        let (mut client, connection) = crate::db::bounded(
            db.query_timeout().max(std::time::Duration::from_secs(1)),
            &format!("connecting to database {name}"),
            async {
                crate::db::connect_dedicated(&pg)
                    .await
                    .map_err(Error::pg(format!("connecting to database {name}")))
            },
        )
        .await?;
        let driver = tokio::spawn(connection);
        let result = migrate_one(
            &mut client,
            name,
            db.query_timeout(),
            &targets_for(config, name),
            &mut report,
        )
        .await;
        drop(client);
        // The connection ends once the client is gone; one given up on a timeout may never.
        let abort = driver.abort_handle();
        if tokio::time::timeout(std::time::Duration::from_secs(1), driver)
            .await
            .is_err()
        {
            abort.abort();
        }
        result?;
    }
    Ok(report)
}

async fn migrate_one(
    client: &mut tokio_postgres::Client,
    database: &str,
    bound: std::time::Duration,
    targets: &[Target],
    report: &mut Report,
) -> Result<()> {
    use crate::db::bounded;
    let ctx = |what: &str| format!("migrating database {database}: {what}");
    let tx = bounded(bound, &ctx("begin"), async {
        client.transaction().await.map_err(Error::pg(ctx("begin")))
    })
    .await?;
    // Serialises concurrent `migrate` runs on this database; released at commit.
    bounded(STEP_BOUND, &ctx("advisory lock"), async {
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('outboxd.migrate'))",
            &[],
        )
        .await
        .map_err(Error::pg(ctx("advisory lock")))
    })
    .await?;
    bounded(bound, &ctx("outboxd_migrations"), async {
        tx.batch_execute(LEDGER)
            .await
            .map_err(Error::pg(ctx("outboxd_migrations")))
    })
    .await?;
    for target in targets {
        for (version, name, sql) in &target.steps {
            let done = bounded(bound, &ctx("reading outboxd_migrations"), async {
                tx.query_opt(
                    "SELECT 1 FROM outboxd_migrations WHERE target = $1 AND version = $2",
                    &[&target.key, version],
                )
                .await
                .map_err(Error::pg(ctx("reading outboxd_migrations")))
            })
            .await?
            .is_some();
            if done {
                report.already += 1;
                continue;
            }
            let step = ctx(&format!("{} version {version}", target.key));
            bounded(STEP_BOUND, &step, async {
                tx.batch_execute(sql).await.map_err(Error::pg(step.clone()))
            })
            .await?;
            bounded(bound, &ctx("recording the migration"), async {
                tx.execute(
                    "INSERT INTO outboxd_migrations (target, version, name) VALUES ($1, $2, $3)",
                    &[&target.key, version, name],
                )
                .await
                .map_err(Error::pg(ctx("recording the migration")))
            })
            .await?;
            report.applied.push((
                database.to_string(),
                target.key.clone(),
                *version,
                (*name).to_string(),
            ));
        }
    }
    bounded(bound, &ctx("commit"), async {
        tx.commit().await.map_err(Error::pg(ctx("commit")))
    })
    .await?;
    Ok(())
}
