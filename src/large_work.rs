//! One large batch at a time per process. A relay batch holding large payloads and a
//! consumer batch of large entries each keep several copies of their events in memory (row,
//! envelope, command; reply, entry, parsed JSON, statement parameter); in `run` both would
//! otherwise peak together. Each takes this lock while it holds large events, so the peak is
//! one such batch's, whatever runs beside it. Small batches never take it.

use std::sync::LazyLock;
use tokio::sync::{Mutex, MutexGuard};

static LARGE_WORK: LazyLock<Mutex<()>> = LazyLock::new(|| Mutex::new(()));

/// Entries or payloads of at least this many bytes make a batch large.
pub const LARGE_EVENT_BYTES: usize = 256 * 1024;

/// Waits until no other large batch of this process is in memory.
pub async fn lock() -> MutexGuard<'static, ()> {
    LARGE_WORK.lock().await
}
