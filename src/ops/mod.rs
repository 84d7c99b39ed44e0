//! The operator commands: `status` (backlog and health of every outbox, stream and group),
//! `dlq` (dead letters and quarantined rows), stream trimming,
//! `inbox prune` (inbox retention), `replay` (republish archived events) and `demo` (the order/fulfillment story end to end against
//! local servers).

pub mod demo;
pub mod dlq;
pub mod once;
pub mod prune;
pub mod replay;
pub mod status;
pub mod trim;
