//! The relay's SQL, rendered once per outbox table. The rules it implements (DESIGN.md "The
//! relay loop", refined):
//!
//! * Claim: the first `batch_size` rows in id order that no other relay holds (`FOR UPDATE
//!   SKIP LOCKED`), that are not quarantined, whose aggregate has no quarantined earlier row,
//!   and whose aggregate is not marked by an open producer transaction (the shared advisory
//!   lock the outbox's BEFORE INSERT trigger takes, see `0001_outbox.sql`). `pg_locks` is read
//!   during the statement, after its snapshot was taken.
//! * Head of aggregate: a second statement (so with a fresh snapshot, taken after that lock
//!   read) keeps only the claimed rows with no row of their aggregate outside the batch before
//!   them: a row locked by another relay, a quarantined row, or a row whose producer committed
//!   since the claim. It is one index range scan per aggregate, zipping the table's rows of
//!   the aggregate with the batch's by rank, so a hot aggregate costs a batch, not a batch
//!   squared. Before it, cheaper tests: if the table holds no row up to the batch's last id
//!   but the batch's own, the batch is the head of the whole table and every row of it is
//!   publishable (the usual case of a single relay draining a backlog); if it holds only a
//!   few more (other relays' batches), those few are read and the check is done in the relay.
//! * Both start after the resume point (resume.rs: no row at or below it exists or can still
//!   appear), which the claim's lock read, returned as its last column, helps prove.

use tokio_postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};

/// A row's physical address (`ctid`) in PostgreSQL's binary form: the claim returns it, and
/// the statements that read and delete the claimed rows take it back, with no text to
/// format and parse on either side (as text, `tidout` in the claim and `tidin` in every
/// statement after it: `ctid::text` over 200,000 rows took 55-66 ms against 29 for `ctid`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowAddress {
    block: u32,
    item: u16,
}

impl RowAddress {
    #[cfg(test)]
    pub(crate) const fn at(block: u32, item: u16) -> RowAddress {
        RowAddress { block, item }
    }
}

impl<'a> FromSql<'a> for RowAddress {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        // tid_send: the block number (4 bytes), then the item offset (2), big-endian
        match *raw {
            [b0, b1, b2, b3, i0, i1] => Ok(RowAddress {
                block: u32::from_be_bytes([b0, b1, b2, b3]),
                item: u16::from_be_bytes([i0, i1]),
            }),
            _ => Err(format!("a tid of {} bytes, not 6", raw.len()).into()),
        }
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TID
    }
}

impl ToSql for RowAddress {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&self.block.to_be_bytes());
        out.extend_from_slice(&self.item.to_be_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TID
    }

    to_sql_checked!();
}

/// Advisory locks on this outbox held by other sessions: `objsubid = 2` per aggregate
/// (classid = table oid, objid = hashtext(aggregate_id)), `objsubid = 1` the table-wide key.
const HELD: &str = "held AS MATERIALIZED (
    SELECT l.objsubid, l.objid, l.pid, l.virtualtransaction AS vxid
    FROM pg_catalog.pg_locks l
    WHERE l.locktype = 'advisory'
      AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d WHERE d.datname = current_database())
      AND l.pid <> pg_backend_pid()
      AND ((l.objsubid = 2 AND l.classid = $1::oid)
        OR (l.objsubid = 1 AND l.classid = 0 AND l.objid = $1::oid))
)";

/// Held-back rows are looked for among this many of the oldest unpublished rows (an index
/// range), so that `status` costs the same on an outbox of any size; beyond it the count is
/// a lower bound. Held-back rows wait at the head of their aggregates: in a backlog they are
/// among the oldest.
pub const HELD_BACK_SCAN: i64 = 100_000;

#[derive(Debug, Clone)]
pub struct Statements {
    /// $1 table oid, $2 lower bound (exclusive) of the ids claimed, $3 the largest payload
    /// (stored bytes) read with the rest of the row by `rows`; the batch size is written
    /// into the statement, so that its generic plan knows how few rows it reads (the relay's
    /// batches run generic plans, see batch.rs). Returns
    /// (id, ctid, whether the payload is that small and not compressed, its stored size),
    /// and as the last column the virtual transaction IDs holding this table's producer
    /// locks at the claim's lock read (NULL for none), for the resume point.
    ///
    /// The rest of each row is read by `rows`, not here: claims run one after another (each
    /// starts after the last id of the one before), while `rows` runs beside the next claim.
    /// Turning a `jsonb` payload into text and sending it is most of what PostgreSQL spends
    /// on a claimed row, and the other columns were most of the rest (a claim of 1,000 rows
    /// with them took 5.5 ms in psql, 2.0 without the payloads, 0.7 with ids alone).
    pub claim: String,
    /// $1 ctids of rows this transaction has locked, $2 the claim's $3 -> (id,
    /// event_id, topic, aggregate_id, payload as text if small (else NULL: read apart by
    /// `payload`), traceparent, created_at), in no particular order.
    pub rows: String,
    /// $1 ctid of a claimed row -> its payload as text.
    pub payload: String,
    /// $1 last claimed id, $2 the resume point (no row at or below it) -> rows with an id
    /// in between. When that equals the batch size the batch is exactly the head of the table
    /// and every claimed row is publishable.
    pub rows_up_to: String,
    /// $1 last claimed id, $2 the resume point -> (id, aggregate_id) of every row in between,
    /// for a batch with few rows outside it before its end (the head-of-aggregate check done
    /// in the relay).
    pub rows_before: String,
    /// $1 ids, $2 aggregate ids (claimed, in id order), $3 the resume point -> publishable ids.
    pub head_of_aggregate: String,
    /// $1 ctids of rows this transaction has locked.
    pub delete: String,
    /// $1 ctids: delete and keep in the archive (for replay).
    pub delete_to_archive: String,
    /// $1 retention hours, $2 batch -> archive rows pruned.
    pub prune_archive: String,
    /// $1 ids, $2 errors, $3 max attempts -> (id, quarantined, event id, aggregate id).
    pub record_failures: String,
    /// $1 table oid -> (pid, transaction age seconds, query, held-back rows) per session
    /// holding back rows, the count repeated on each; no row when nothing is held back. Rows
    /// are looked for among the oldest `HELD_BACK_SCAN` unpublished rows, and not at all
    /// while no producer transaction is open on the table.
    pub held_back: String,
    /// $1 exact-count threshold, $2 table name -> (backlog rows, estimated?, quarantined rows,
    /// oldest age seconds). Cheap on any size: the backlog is counted exactly below the
    /// threshold and above it taken from the statistics' live-tuple count (kept current by
    /// every insert and delete, unlike `reltuples`, which waits for the next VACUUM or
    /// ANALYZE and so would show a drained outbox as still full); quarantined rows come from
    /// their partial index; the oldest row is the first by id (ids follow insertion order).
    pub backlog: String,
}

impl Statements {
    pub fn for_table(quoted: &str, archive: &str, batch_size: u32) -> Statements {
        Statements {
            delete_to_archive: format!(
                "WITH d AS (DELETE FROM {quoted} WHERE ctid = ANY($1::tid[])
    RETURNING id, event_id, topic, aggregate_id, payload, headers, created_at)
INSERT INTO {archive} (id, event_id, topic, aggregate_id, payload, headers, created_at)
SELECT * FROM d ON CONFLICT (id) DO NOTHING"
            ),
            prune_archive: format!(
                "DELETE FROM {archive} WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM {archive} WHERE published_at < now() - make_interval(hours => $1::int) LIMIT $2))"
            ),
            claim: format!(
                "WITH {HELD}
SELECT o.id, o.ctid,
       pg_catalog.pg_column_size(o.payload) <= $3
             AND pg_catalog.pg_column_compression(o.payload) IS NULL,
       pg_catalog.pg_column_size(o.payload),
       (SELECT array_agg(DISTINCT h.vxid) FROM held h)
FROM {quoted} o
WHERE o.id > $2
  AND o.quarantined_at IS NULL
  AND NOT EXISTS (SELECT 1 FROM held h WHERE h.objsubid = 1)
  -- Aggregates marked by an open producer transaction: one hash table of the marks, built
  -- once and probed per row, and not even that while there are none (an InitPlan). As a
  -- correlated NOT EXISTS it was an anti join rescanning the marks for every row.
  AND (NOT EXISTS (SELECT 1 FROM held h0 WHERE h0.objsubid = 2)
       OR NOT (hashtext(o.aggregate_id)::oid IN (SELECT h.objid FROM held h WHERE h.objsubid = 2)))
  -- The per-row probe for an earlier quarantined row of the aggregate only runs when the
  -- table holds a quarantined row at all (evaluated once, as an InitPlan).
  AND (NOT EXISTS (SELECT 1 FROM {quoted} q0 WHERE q0.quarantined_at IS NOT NULL)
       OR NOT EXISTS (SELECT 1 FROM {quoted} q
                      WHERE q.quarantined_at IS NOT NULL AND q.aggregate_id = o.aggregate_id AND q.id < o.id))
ORDER BY o.id
LIMIT {batch_size}
FOR UPDATE OF o SKIP LOCKED"
            ),
            payload: format!("SELECT payload::text FROM {quoted} WHERE ctid = $1::tid"),
            rows: format!(
                "SELECT id, event_id, topic, aggregate_id,
       CASE WHEN pg_catalog.pg_column_size(payload) <= $2
             AND pg_catalog.pg_column_compression(payload) IS NULL
            THEN payload::text END,
       headers->>'traceparent', created_at
FROM {quoted} WHERE ctid = ANY($1::tid[])"
            ),
            rows_up_to: format!("SELECT count(*) FROM {quoted} WHERE id > $2 AND id <= $1"),
            rows_before: format!(
                "SELECT id, aggregate_id FROM {quoted} WHERE id > $2 AND id <= $1"
            ),
            head_of_aggregate: format!(
                "WITH b AS (
    SELECT c.id, c.agg, row_number() OVER (PARTITION BY c.agg ORDER BY c.id) AS rn
    FROM unnest($1::bigint[], $2::text[]) AS c(id, agg)
), m AS (
    SELECT agg, max(id) AS last_id FROM b GROUP BY agg
), t AS (
    SELECT o.aggregate_id AS agg, o.id,
           row_number() OVER (PARTITION BY o.aggregate_id ORDER BY o.id) AS rn
    FROM m JOIN {quoted} o ON o.aggregate_id = m.agg AND o.id > $3 AND o.id <= m.last_id
)
SELECT b.id FROM b JOIN t ON t.agg = b.agg AND t.rn = b.rn AND t.id = b.id"
            ),
            delete: format!("DELETE FROM {quoted} WHERE ctid = ANY($1::tid[])"),
            record_failures: format!(
                "UPDATE {quoted} AS o
SET attempts = o.attempts + 1,
    last_error = f.err,
    last_attempt_at = now(),
    quarantined_at = CASE WHEN o.attempts + 1 >= $3 THEN now() END
FROM unnest($1::bigint[], $2::text[]) AS f(id, err)
WHERE o.id = f.id
RETURNING o.id, o.quarantined_at IS NOT NULL, o.event_id::text, o.aggregate_id"
            ),
            held_back: format!(
                "WITH {HELD},
hit AS MATERIALIZED (
    SELECT s.hash FROM (
        SELECT hashtext(o.aggregate_id)::oid AS hash FROM {quoted} o
        WHERE EXISTS (SELECT 1 FROM held) AND o.quarantined_at IS NULL
        ORDER BY o.id LIMIT {HELD_BACK_SCAN}) s
    WHERE EXISTS (SELECT 1 FROM held h
                  WHERE h.objsubid = 1 OR (h.objsubid = 2 AND h.objid = s.hash))
)
SELECT b.pid, b.age, b.query, (SELECT count(*) FROM hit)
FROM (SELECT DISTINCT h.pid,
             coalesce(extract(epoch FROM now() - a.xact_start)::float8, 0) AS age,
             coalesce(left(a.query, 500), '') AS query
      FROM held h
      LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = h.pid
      WHERE h.objsubid = 1 OR h.objid IN (SELECT hash FROM hit)) b
ORDER BY 1"
            ),
            backlog: format!(
                "SELECT
    CASE WHEN s.live < $1 THEN (SELECT count(*) FROM {quoted}) ELSE s.live END,
    s.live >= $1,
    (SELECT count(*) FROM {quoted} WHERE quarantined_at IS NOT NULL),
    (SELECT extract(epoch FROM now() - created_at)::float8 FROM {quoted} ORDER BY id LIMIT 1)
FROM (SELECT pg_catalog.pg_stat_get_live_tuples(to_regclass($2)) AS live) s"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RowAddress;
    use tokio_postgres::types::{FromSql, ToSql, Type};

    #[test]
    fn a_row_address_goes_both_ways_in_the_binary_tid_form() {
        let address = RowAddress::at(0x0102_0304, 0x0506);
        let mut out = bytes::BytesMut::new();
        address.to_sql(&Type::TID, &mut out).expect("writes");
        assert_eq!(&out[..], [1, 2, 3, 4, 5, 6]);
        assert_eq!(
            RowAddress::from_sql(&Type::TID, &out).expect("reads"),
            address
        );
        let short = RowAddress::from_sql(&Type::TID, &[1, 2, 3]).expect_err("too short");
        assert!(short.to_string().contains("3 bytes"), "{short}");
        assert!(!<RowAddress as FromSql>::accepts(&Type::TEXT));
    }
}
