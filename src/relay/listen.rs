//! The relay's LISTEN connection: a dedicated PostgreSQL connection (not pooled: a pooled
//! one would drop notifications) whose messages this task drives, waking the relay loop on
//! every `NOTIFY` of its outbox, with a bounded heartbeat so that a silent connection is
//! given up and made anew.

use crate::db::quote_qualified;
use crate::error::Error;
use crate::retry::Backoff;
use deadpool_postgres::Pool;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How often the LISTEN connection proves that it still answers.
const LISTEN_HEARTBEAT: Duration = Duration::from_secs(5);

/// Keeps a dedicated connection LISTENing on the table's channel and wakes the relay on each
/// notification. deadpool's pooled connections drop notifications, so this one is driven by
/// hand (`poll_message`). Reconnects with backoff; the relay's poll interval covers the gaps.
pub(super) async fn listen(
    pg: crate::db::PgTarget,
    relay: String,
    pool: Pool,
    table: String,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new();
    loop {
        let wake = wake.clone();
        let bound = pg.query_timeout;
        let attempt = async {
            let relid: Option<u32> = crate::db::bounded(bound, "looking up the table", async {
                let client = pool
                    .get()
                    .await
                    .map_err(Error::pool("looking up the table"))?;
                client
                    .query_one("SELECT to_regclass($1)::oid", &[&quote_qualified(&table)])
                    .await
                    .map_err(Error::pg("looking up the table"))
            })
            .await
            .map_err(|e| crate::error::chain(&e))?
            .get(0);
            let relid = relid.ok_or_else(|| format!("table {table} does not exist"))?;
            let (client, mut connection) =
                crate::db::bounded(bound, "connecting for LISTEN", async {
                    crate::db::connect_dedicated(&pg)
                        .await
                        .map_err(Error::pg("connecting for LISTEN"))
                })
                .await
                .map_err(|e| crate::error::chain(&e))?;
            let channel = format!("outboxd_{relid}");
            let driver = async move {
                while let Some(message) =
                    std::future::poll_fn(|cx| connection.poll_message(cx)).await
                {
                    match message {
                        Ok(tokio_postgres::AsyncMessage::Notification(_)) => wake.notify_one(),
                        Ok(_) => {}
                        Err(e) => return e.to_string(),
                    }
                }
                "connection closed".to_string()
            };
            let listen = async {
                client
                    .batch_execute(&format!("LISTEN {}", crate::db::quote_ident(&channel)))
                    .await
                    .map_err(|e| e.to_string())?;
                tracing::debug!(relay, channel, "listening");
                // An idle connection sends nothing, so a peer gone silent would never be
                // noticed and notifications would stop without a word: a bounded empty
                // query every few seconds proves it still answers.
                loop {
                    tokio::time::sleep(LISTEN_HEARTBEAT).await;
                    crate::db::bounded(bound, "LISTEN heartbeat", async {
                        client
                            .simple_query("")
                            .await
                            .map_err(Error::pg("LISTEN heartbeat"))
                    })
                    .await
                    .map_err(|e| crate::error::chain(&e))?;
                }
            };
            // The driver must run for LISTEN to complete; it ends when the connection does.
            tokio::select! {
                reason = driver => Err(reason),
                r = listen => r,
            }
        };
        let result: std::result::Result<(), String> = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = attempt => r,
        };
        if let Err(reason) = result {
            let delay = backoff.next_delay();
            tracing::debug!(
                relay,
                reason,
                "LISTEN connection lost; polling until it is back"
            );
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}
