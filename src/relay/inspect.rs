//! What `status` and the gauges read about a relay's outbox: its backlog (counted, or
//! estimated on a large table), and the rows an open producer transaction holds back, with
//! the sessions holding them.

use super::claim::Statements;
use super::Relay;
use crate::db::quote_qualified;
use crate::error::{Error, Result};

/// A session whose open transaction holds rows back.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Blocker {
    pub pid: i32,
    pub xact_age_seconds: f64,
    pub query: String,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct HeldBack {
    pub rows: i64,
    pub blockers: Vec<Blocker>,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Backlog {
    pub rows: i64,
    /// `rows` is the planner's estimate (the table is too large to count on every call).
    pub estimated: bool,
    pub quarantined: i64,
    pub oldest_age_seconds: Option<f64>,
}

/// Below this many rows (by the statistics' live-tuple count) the backlog is counted exactly.
const EXACT_COUNT_BELOW: i64 = 1_000_000;

pub async fn held_back_with(
    client: &tokio_postgres::Client,
    sql: &Statements,
    relid: u32,
    ctx: &str,
) -> Result<HeldBack> {
    let rows = client
        .query(&sql.held_back, &[&relid])
        .await
        .map_err(Error::pg(ctx))?;
    Ok(HeldBack {
        rows: rows.first().map_or(0, |r| r.get(3)),
        blockers: rows
            .iter()
            .map(|r| Blocker {
                pid: r.get(0),
                xact_age_seconds: r.get(1),
                query: r.get(2),
            })
            .collect(),
    })
}

impl Relay {
    /// Rows held back by open producer transactions, and the sessions responsible.
    pub async fn held_back(&mut self) -> Result<HeldBack> {
        let relid = self.relid().await?;
        let ctx = self.ctx("counting held-back rows");
        crate::db::bounded(self.pg.query_timeout, &ctx, async {
            let client = self
                .pool
                .get()
                .await
                .map_err(Error::pool(self.ctx("getting a connection")))?;
            held_back_with(&client, &self.sql, relid, &ctx).await
        })
        .await
    }

    /// Unpublished rows, quarantined rows and the age of the oldest.
    pub async fn backlog(&mut self) -> Result<Backlog> {
        let ctx = self.ctx("measuring the backlog");
        let row = crate::db::bounded(self.pg.query_timeout, &ctx, async {
            let client = self
                .pool
                .get()
                .await
                .map_err(Error::pool(self.ctx("getting a connection")))?;
            client
                .query_one(
                    &self.sql.backlog,
                    &[&EXACT_COUNT_BELOW, &quote_qualified(&self.table)],
                )
                .await
                .map_err(Error::pg(ctx.clone()))
        })
        .await?;
        Ok(Backlog {
            rows: row.get::<_, i64>(0).max(0),
            estimated: row.get(1),
            quarantined: row.get(2),
            oldest_age_seconds: row.get(3),
        })
    }
}
