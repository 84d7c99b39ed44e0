//! The consumer's part of the pipeline bench: two workloads, and the limit they are held
//! against. The limit does what outboxd's `order_status` consumer must do for the same events
//! in the same batches, as plain set-based SQL with one transaction per batch and every
//! statement pipelined: lock the batch's orders (`SELECT ... FOR UPDATE`, ID order), insert
//! the inbox rows, fold the fulfillments, update the orders that change, insert their history
//! rows and their `order.status_changed` outbox rows. Its decisions (which event is new, what
//! it moves) are computed before the clock starts, with outboxd's own rules; outboxd's
//! decisions count against outboxd. With 2 sessions, each batch is split by order into two
//! disjoint halves applied at once.

use outboxd::handlers::rules::{
    aggregate_target, decide, CurrentStatus, Decision, FulfillmentState, FulfillmentStatus,
    OrderStatus, StatusMapping,
};
use std::collections::{BTreeMap, HashMap, HashSet};

pub const FSC: &str = "fulfillment.status_changed";
pub const DC: &str = "delivery.confirmed";

/// One event: (topic, order ID, event ID, fulfillment status for `fulfillment.status_changed`).
pub type Event = (String, String, String, Option<String>);

fn event(topic: &str, order: &str, id: String, status: Option<&str>) -> Event {
    (
        topic.to_string(),
        order.to_string(),
        id,
        status.map(str::to_string),
    )
}

/// Events for `orders` orders, 10 per order: 3 real transitions (picking -> processing,
/// shipped -> shipped, delivery.confirmed -> delivered) and 7 duplicates of them, 5 on each
/// of the two streams. They are laid out as the consumer reads them: a read takes `batch`
/// entries from each stream, so each block of `batch / 5` orders has its fulfillment events,
/// then its delivery events; within a batch the consumer applies an order's events in stream
/// order, fulfillment's stream first, so every event is one real transition or a duplicate,
/// none is skipped.
pub fn transitions(orders: u64, events: u64, batch: usize) -> Vec<Event> {
    const PER_STREAM: u64 = 5;
    let orders = orders.min(events / (2 * PER_STREAM)).max(1);
    let block = (batch as u64 / PER_STREAM).max(1);
    let mut out = Vec::with_capacity((orders * 2 * PER_STREAM) as usize);
    let step = |o: u64, step: u8| {
        let order = format!("order-{o}");
        let id = format!("{order}-step{step}");
        match step {
            0 => event(FSC, &order, id, Some("picking")),
            1 => event(FSC, &order, id, Some("shipped")),
            _ => event(DC, &order, id, None),
        }
    };
    for first in (0..orders).step_by(block as usize) {
        let members = first..(first + block).min(orders);
        for o in members.clone() {
            for s in [0, 0, 1, 1, 1] {
                out.push(step(o, s));
            }
        }
        for o in members {
            for _ in 0..PER_STREAM {
                out.push(step(o, 2));
            }
        }
    }
    out
}

/// A user's workload: per order a `picking`, a `packed` and a `shipped` event of one
/// fulfillment, published round-robin over the orders (so a batch holds many orders, one
/// event each), then a fifth of those entries published again; then a `delivery.confirmed`
/// per order, likewise with a fifth again. Every event is a transition, a fold that leaves
/// the order where it is (`packed` after `picking`), or a duplicate of one.
pub fn fulfillment(orders: u64) -> Vec<Event> {
    let mut fulfillments = Vec::new();
    for status in ["picking", "packed", "shipped"] {
        for o in 0..orders {
            let order = format!("order-{o}");
            let id = format!("{order}-{status}");
            fulfillments.push(event(FSC, &order, id, Some(status)));
        }
    }
    let again: Vec<Event> = fulfillments.iter().step_by(5).cloned().collect();
    fulfillments.extend(again);
    let mut deliveries: Vec<Event> = (0..orders)
        .map(|o| {
            let order = format!("order-{o}");
            event(DC, &order, format!("{order}-delivered"), None)
        })
        .collect();
    let again: Vec<Event> = deliveries.iter().step_by(5).cloned().collect();
    deliveries.extend(again);
    fulfillments.extend(deliveries);
    fulfillments
}

/// The batches the consumer forms: each read takes up to `batch` entries from each of the
/// two streams, the fulfillment stream's first.
pub fn batches(events: &[Event], batch: usize) -> Vec<Vec<&Event>> {
    let fsc: Vec<&Event> = events.iter().filter(|e| e.0 == FSC).collect();
    let dc: Vec<&Event> = events.iter().filter(|e| e.0 != FSC).collect();
    let n = fsc.len().div_ceil(batch).max(dc.len().div_ceil(batch));
    (0..n)
        .map(|i| {
            let mut b: Vec<&Event> = fsc.iter().skip(i * batch).take(batch).copied().collect();
            b.extend(dc.iter().skip(i * batch).take(batch).copied());
            b
        })
        .collect()
}

/// The statements of one batch (or one half of it), with every value decided in advance.
/// The tuples are a statement's `unnest` parameters, in parameter order.
#[derive(Default)]
#[allow(clippy::type_complexity)]
pub struct Planned {
    order_ids: Vec<String>,
    inbox_ids: Vec<String>,
    folds: (
        Vec<String>,
        Vec<String>,
        Vec<String>,
        Vec<i16>,
        Vec<i16>,
        Vec<String>,
    ),
    updates: (Vec<String>, Vec<String>),
    moves: (
        Vec<String>,
        Vec<String>,
        Vec<String>,
        Vec<String>,
        Vec<String>,
    ),
}

/// What every event of every batch does, decided with outboxd's rules in the order the
/// consumer applies them (by order, stream order within it), split into `sessions` disjoint
/// sets of orders per batch.
pub fn plan(events: &[Event], batch: usize, sessions: usize) -> Vec<Vec<Planned>> {
    let mapping = StatusMapping::default();
    let mut seen: HashSet<&str> = HashSet::new();
    let mut status: HashMap<&str, String> = HashMap::new();
    let mut fulfillments: HashMap<&str, BTreeMap<String, FulfillmentState>> = HashMap::new();
    let mut out = Vec::new();
    for b in batches(events, batch) {
        let mut sorted = b.clone();
        sorted.sort_by(|x, y| x.1.cmp(&y.1));
        let mut parts: Vec<Planned> = (0..sessions).map(|_| Planned::default()).collect();
        let mut touched: BTreeMap<(&str, String), (FulfillmentState, &str)> = BTreeMap::new();
        let mut moved: BTreeMap<&str, String> = BTreeMap::new();
        for e in sorted {
            let (topic, order, id, reported) = e;
            let part = &mut parts[session_of(order, sessions)];
            if part.order_ids.last() != Some(order) {
                part.order_ids.push(order.clone());
            }
            part.inbox_ids.push(id.clone());
            if !seen.insert(id) {
                continue;
            }
            let current = status
                .entry(order)
                .or_insert_with(|| "confirmed".to_string())
                .clone();
            let (target, reason) = if topic == FSC {
                let reported = reported.as_deref().unwrap_or_default();
                let Some(s) = FulfillmentStatus::parse(reported) else {
                    continue;
                };
                let fid = format!("f-{order}");
                let fs = fulfillments.entry(order).or_default();
                let state = fs.get(&fid).map_or(FulfillmentState::of(s), |f| f.fold(s));
                fs.insert(fid.clone(), state);
                touched.insert((order, fid.clone()), (state, id));
                let states: Vec<FulfillmentState> = fs.values().copied().collect();
                (
                    aggregate_target(&states, None, &mapping),
                    format!("fulfillment {fid} {reported}"),
                )
            } else {
                (
                    Some(OrderStatus::Delivered),
                    "delivery confirmed".to_string(),
                )
            };
            if let Decision::Apply { to, .. } = decide(&CurrentStatus::from_db(&current), target) {
                let to = to.as_str().to_string();
                part.moves.0.push(order.clone());
                part.moves.1.push(current);
                part.moves.2.push(to.clone());
                part.moves.3.push(reason);
                part.moves.4.push(id.clone());
                status.insert(order, to.clone());
                moved.insert(order, to);
            }
        }
        for ((order, fid), (state, id)) in touched {
            let part = &mut parts[session_of(order, sessions)];
            part.folds.0.push(order.to_string());
            part.folds.1.push(fid);
            part.folds.2.push(state.status.as_str().to_string());
            part.folds.3.push(state.status.rank());
            part.folds
                .4
                .push(state.furthest.map_or(-1, FulfillmentStatus::rank));
            part.folds.5.push(id.to_string());
        }
        for (order, to) in moved {
            let part = &mut parts[session_of(order, sessions)];
            part.updates.0.push(order.to_string());
            part.updates.1.push(to);
        }
        for part in &mut parts {
            part.order_ids.sort();
            part.order_ids.dedup();
        }
        out.push(parts);
    }
    out
}

fn session_of(order: &str, sessions: usize) -> usize {
    let hash = order.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    (hash % sessions as u64) as usize
}

const LOCK: &str = "SELECT id, status FROM orders WHERE id = ANY($1) ORDER BY id FOR UPDATE";
const INBOX: &str = "INSERT INTO inbox (consumer, event_id, stream, entry_id, data_hash)
SELECT 'limit', e, 's', '0-0', 0 FROM unnest($1::text[]) e ON CONFLICT DO NOTHING RETURNING event_id";
const FOLD: &str = "INSERT INTO order_fulfillments AS f
    (order_id, fulfillment_id, status, status_rank, progress_rank, expected_count, last_event_id)
SELECT o, fid, s, r, p, NULL, e FROM unnest($1::text[], $2::text[], $3::text[], $4::int2[], $5::int2[], $6::text[]) AS x(o, fid, s, r, p, e)
ON CONFLICT (order_id, fulfillment_id) DO UPDATE SET
    status = EXCLUDED.status, status_rank = EXCLUDED.status_rank,
    progress_rank = EXCLUDED.progress_rank, last_event_id = EXCLUDED.last_event_id, updated_at = now()";
const UPDATE: &str = "UPDATE orders AS o SET status = u.status, updated_at = now()
FROM unnest($1::text[], $2::text[]) AS u(id, status) WHERE o.id = u.id";
const HISTORY: &str = "INSERT INTO order_status_history (order_id, from_status, to_status, reason, event_id, created_at)
SELECT o, f, t, r, e, clock_timestamp() FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) WITH ORDINALITY AS h(o, f, t, r, e, n) ORDER BY n";
const OUTBOX: &str = "INSERT INTO outbox (topic, aggregate_id, payload)
SELECT 'order.status_changed', o, jsonb_build_object('event_type', 'order.status_changed', 'order_id', o,
    'old_status', f, 'new_status', t, 'timestamp', now(), 'reason', r, 'caused_by', e)
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) WITH ORDINALITY AS x(o, f, t, r, e, n) ORDER BY n";

/// One session of the limit.
pub struct Session {
    client: tokio_postgres::Client,
    statements: Vec<tokio_postgres::Statement>,
}

impl Session {
    pub async fn new(client: tokio_postgres::Client) -> Session {
        let mut statements = Vec::new();
        for sql in [LOCK, INBOX, FOLD, UPDATE, HISTORY, OUTBOX] {
            statements.push(client.prepare(sql).await.unwrap());
        }
        Session { client, statements }
    }

    /// One transaction, every statement sent at once.
    pub async fn apply(&self, p: &Planned) {
        let (c, s) = (&self.client, &self.statements);
        let f = &p.folds;
        let u = &p.updates;
        let m = &p.moves;
        let lock: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&p.order_ids];
        let inbox: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&p.inbox_ids];
        let fold: [&(dyn tokio_postgres::types::ToSql + Sync); 6] =
            [&f.0, &f.1, &f.2, &f.3, &f.4, &f.5];
        let update: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&u.0, &u.1];
        let moves: [&(dyn tokio_postgres::types::ToSql + Sync); 5] = [&m.0, &m.1, &m.2, &m.3, &m.4];
        tokio::try_join!(
            c.batch_execute("BEGIN"),
            c.query(&s[0], &lock),
            c.query(&s[1], &inbox),
            c.execute(&s[2], &fold),
            c.execute(&s[3], &update),
            c.execute(&s[4], &moves),
            c.execute(&s[5], &moves),
            c.batch_execute("COMMIT"),
        )
        .unwrap();
    }
}
