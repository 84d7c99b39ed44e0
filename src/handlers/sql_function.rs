//! The `sql` handler: `SELECT <function>($1::jsonb)` with the event's CloudEvents envelope,
//! inside the inbox transaction, so any database effect is had exactly once without Rust.
//! An error raised by the function is that event's failure: retried, then dead-lettered.

use super::{HandleError, Outcome};
use crate::envelope::Incoming;

#[derive(Debug, Clone)]
pub struct SqlFunctionHandler {
    statement: String,
}

impl SqlFunctionHandler {
    /// `function` was validated as `name` or `schema.name`.
    pub fn new(function: &str) -> SqlFunctionHandler {
        SqlFunctionHandler {
            statement: format!("SELECT {}($1::jsonb)", crate::db::quote_qualified(function)),
        }
    }

    pub async fn handle(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        event: &Incoming,
    ) -> Result<Outcome, HandleError> {
        let statement = tx
            .prepare_cached(&self.statement)
            .await
            .map_err(|e| HandleError::from_pg("preparing the sql handler", e))?;
        tx.execute(&statement, &[&event.envelope()])
            .await
            .map_err(|e| HandleError::from_pg("sql handler function", e))?;
        Ok(Outcome::Applied { transition: None })
    }
}
