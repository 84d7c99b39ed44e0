//! The order-status rules: which order status a set of fulfillment events implies, and
//! whether an order may move there. Pure and I/O-free on purpose, so that every rule can be
//! tested exhaustively (including "the result does not depend on event arrival order")
//! without a database; the `order_status` handler only reads state, asks these functions and
//! writes back what they decide.

use std::fmt;

/// Order statuses the rules produce or understand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OrderStatus {
    Pending,
    Confirmed,
    Processing,
    Shipped,
    Delivered,
    Cancelled,
}

impl OrderStatus {
    pub const ALL: [OrderStatus; 6] = [
        OrderStatus::Pending,
        OrderStatus::Confirmed,
        OrderStatus::Processing,
        OrderStatus::Shipped,
        OrderStatus::Delivered,
        OrderStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Pending => "pending",
            OrderStatus::Confirmed => "confirmed",
            OrderStatus::Processing => "processing",
            OrderStatus::Shipped => "shipped",
            OrderStatus::Delivered => "delivered",
            OrderStatus::Cancelled => "cancelled",
        }
    }

    /// Exact lowercase names only: the database column is written by us and by other
    /// services, and guessing at variants would silently un-freeze statuses we do not own.
    pub fn parse(s: &str) -> Option<OrderStatus> {
        match s {
            "pending" => Some(OrderStatus::Pending),
            "confirmed" => Some(OrderStatus::Confirmed),
            "processing" => Some(OrderStatus::Processing),
            "shipped" => Some(OrderStatus::Shipped),
            "delivered" => Some(OrderStatus::Delivered),
            "cancelled" => Some(OrderStatus::Cancelled),
            _ => None,
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, OrderStatus::Delivered | OrderStatus::Cancelled)
    }

    /// Position on the forward path. `Cancelled` is a side exit, not a step on the path, so
    /// it has none; that is also why `Ord` is not derived.
    fn progress(self) -> Option<u8> {
        match self {
            OrderStatus::Pending => Some(0),
            OrderStatus::Confirmed => Some(1),
            OrderStatus::Processing => Some(2),
            OrderStatus::Shipped => Some(3),
            OrderStatus::Delivered => Some(4),
            OrderStatus::Cancelled => None,
        }
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The order's current status as read from the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CurrentStatus {
    Known(OrderStatus),
    /// Owned by someone else (payments, refunds) or not understood: never touched.
    Frozen(String),
}

impl CurrentStatus {
    pub fn from_db(s: &str) -> CurrentStatus {
        // The payment service writes `payment_confirmed`; for fulfillment purposes that is
        // simply a confirmed order.
        if s == "payment_confirmed" {
            return CurrentStatus::Known(OrderStatus::Confirmed);
        }
        match OrderStatus::parse(s) {
            Some(status) => CurrentStatus::Known(status),
            None => CurrentStatus::Frozen(s.to_string()),
        }
    }
}

/// Fulfillment statuses, declared in rank order so the derived `Ord` is the rank: taking the
/// maximum per fulfillment makes its state independent of arrival order and duplicates.
/// `Cancelled` sits after `Ready` and before `Shipped` because a fulfillment can be cancelled
/// until it ships, and a late "picking" after "cancelled" must not resurrect it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FulfillmentStatus {
    Pending,
    Planning,
    Picking,
    Picked,
    Packing,
    Packed,
    Ready,
    Cancelled,
    Shipped,
    Completed,
}

impl FulfillmentStatus {
    /// Every status, index equal to rank.
    pub const ALL: [FulfillmentStatus; 10] = [
        FulfillmentStatus::Pending,
        FulfillmentStatus::Planning,
        FulfillmentStatus::Picking,
        FulfillmentStatus::Picked,
        FulfillmentStatus::Packing,
        FulfillmentStatus::Packed,
        FulfillmentStatus::Ready,
        FulfillmentStatus::Cancelled,
        FulfillmentStatus::Shipped,
        FulfillmentStatus::Completed,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FulfillmentStatus::Pending => "pending",
            FulfillmentStatus::Planning => "planning",
            FulfillmentStatus::Picking => "picking",
            FulfillmentStatus::Picked => "picked",
            FulfillmentStatus::Packing => "packing",
            FulfillmentStatus::Packed => "packed",
            FulfillmentStatus::Ready => "ready",
            FulfillmentStatus::Cancelled => "cancelled",
            FulfillmentStatus::Shipped => "shipped",
            FulfillmentStatus::Completed => "completed",
        }
    }

    /// 0..=9, stored by the SQL layer so the database can keep the maximum with `GREATEST`.
    pub fn rank(self) -> i16 {
        match self {
            FulfillmentStatus::Pending => 0,
            FulfillmentStatus::Planning => 1,
            FulfillmentStatus::Picking => 2,
            FulfillmentStatus::Picked => 3,
            FulfillmentStatus::Packing => 4,
            FulfillmentStatus::Packed => 5,
            FulfillmentStatus::Ready => 6,
            FulfillmentStatus::Cancelled => 7,
            FulfillmentStatus::Shipped => 8,
            FulfillmentStatus::Completed => 9,
        }
    }

    pub fn from_rank(r: i16) -> Option<Self> {
        usize::try_from(r)
            .ok()
            .and_then(|i| Self::ALL.get(i).copied())
    }

    fn index(self) -> usize {
        // rank() is 0..=9 by construction, so this never falls back.
        usize::try_from(self.rank()).unwrap_or(0)
    }
}

impl fmt::Display for FulfillmentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which order status each fulfillment status implies. `Delivered` is not representable as a
/// target: only `delivery.confirmed` may deliver an order, whatever the configuration says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusMapping {
    targets: [Option<OrderStatus>; 10],
}

impl Default for StatusMapping {
    fn default() -> Self {
        let mut targets = [None; 10];
        for f in FulfillmentStatus::ALL {
            targets[f.index()] = default_target(f);
        }
        StatusMapping { targets }
    }
}

fn default_target(f: FulfillmentStatus) -> Option<OrderStatus> {
    match f {
        FulfillmentStatus::Pending => None,
        FulfillmentStatus::Planning
        | FulfillmentStatus::Picking
        | FulfillmentStatus::Picked
        | FulfillmentStatus::Packing
        | FulfillmentStatus::Packed
        | FulfillmentStatus::Ready => Some(OrderStatus::Processing),
        FulfillmentStatus::Shipped | FulfillmentStatus::Completed => Some(OrderStatus::Shipped),
        FulfillmentStatus::Cancelled => Some(OrderStatus::Cancelled),
    }
}

impl StatusMapping {
    /// The defaults with the given `(fulfillment_status, target)` entries replaced. Errors
    /// name the offending key as `status_mapping.<key>` so they can be shown to whoever
    /// edits the config file. A repeated key: the last entry wins.
    pub fn with_overrides<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<StatusMapping, String> {
        let mut mapping = StatusMapping::default();
        for (key, value) in pairs {
            let Some(f) = FulfillmentStatus::parse(key) else {
                let known: Vec<&str> = FulfillmentStatus::ALL.iter().map(|f| f.as_str()).collect();
                return Err(format!(
                    "status_mapping.{key}: unknown fulfillment status (expected one of {})",
                    known.join(", ")
                ));
            };
            let target = match value {
                "processing" => Some(OrderStatus::Processing),
                "shipped" => Some(OrderStatus::Shipped),
                "cancelled" => Some(OrderStatus::Cancelled),
                "none" => None,
                _ => {
                    return Err(format!(
                        "status_mapping.{key}: {value:?} is not a valid target \
                         (expected processing, shipped, cancelled or none)"
                    ))
                }
            };
            mapping.targets[f.index()] = target;
        }
        Ok(mapping)
    }

    pub fn target(&self, f: FulfillmentStatus) -> Option<OrderStatus> {
        self.targets[f.index()]
    }
}

/// What one fulfillment's events say, folded so that their arrival order and duplicates do
/// not matter: the highest status reported (by rank; a late "picking" after "shipped" changes
/// nothing) and the furthest forward status reported, which a cancellation does not erase: a
/// warehouse that started picking and then cancelled did start, whether or not the
/// cancellation arrived first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FulfillmentState {
    pub status: FulfillmentStatus,
    pub furthest: Option<FulfillmentStatus>,
}

impl FulfillmentState {
    /// The state after a first report.
    pub fn of(reported: FulfillmentStatus) -> FulfillmentState {
        FulfillmentState {
            status: reported,
            furthest: Self::progress(reported),
        }
    }

    /// The state after one more report.
    pub fn fold(self, reported: FulfillmentStatus) -> FulfillmentState {
        FulfillmentState {
            status: self.status.max(reported),
            furthest: self.furthest.max(Self::progress(reported)),
        }
    }

    /// What a report adds to `furthest`: itself, unless it is the cancellation.
    pub fn progress(reported: FulfillmentStatus) -> Option<FulfillmentStatus> {
        (reported != FulfillmentStatus::Cancelled).then_some(reported)
    }

    /// `furthest` as the SQL layer stores it (-1: none yet).
    pub fn progress_rank(reported: FulfillmentStatus) -> i16 {
        Self::progress(reported).map_or(-1, FulfillmentStatus::rank)
    }
}

/// The order status implied by all of an order's fulfillments. `expected_count` guards
/// against concluding "all shipped" or "all cancelled" from the first warehouse to report
/// when others have not reported yet.
pub fn aggregate_target(
    fulfillments: &[FulfillmentState],
    expected_count: Option<u32>,
    mapping: &StatusMapping,
) -> Option<OrderStatus> {
    let known = fulfillments.len();
    let complete = match expected_count {
        None => true,
        Some(n) => usize::try_from(n).is_ok_and(|n| known >= n),
    };
    let targets: Vec<Option<OrderStatus>> = fulfillments
        .iter()
        .map(|f| mapping.target(f.status))
        .collect();
    let is_cancelled = |t: &Option<OrderStatus>| *t == Some(OrderStatus::Cancelled);

    if known > 0 && complete && targets.iter().all(is_cancelled) {
        return Some(OrderStatus::Cancelled);
    }
    // A cancelled fulfillment does not hold the order back: the rest of the order can still
    // ship. Fulfillments mapping to no change (e.g. pending) are active but not started.
    let active: Vec<Option<OrderStatus>> =
        targets.into_iter().filter(|t| !is_cancelled(t)).collect();
    if complete && !active.is_empty() && active.iter().all(|t| *t == Some(OrderStatus::Shipped)) {
        return Some(OrderStatus::Shipped);
    }
    // Work has started somewhere (even if that warehouse cancelled since).
    if fulfillments.iter().any(|f| {
        matches!(
            f.furthest.and_then(|s| mapping.target(s)),
            Some(OrderStatus::Processing | OrderStatus::Shipped)
        )
    }) {
        return Some(OrderStatus::Processing);
    }
    None
}

/// Why an order was left alone. Not an error: events routinely arrive late, twice or out of
/// order, and the right response is to do nothing and say why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    NoTarget,
    AlreadyThere(OrderStatus),
    Backwards { from: OrderStatus, to: OrderStatus },
    Terminal { from: String, to: OrderStatus },
    CancelNotAllowed { from: OrderStatus },
    Frozen { status: String },
}

impl SkipReason {
    /// The code of [`SkipReason::AlreadyThere`].
    pub const ALREADY_THERE: &'static str = "already_there";

    /// Every [`SkipReason::code`].
    pub const CODES: [&'static str; 6] = [
        "no_target",
        "already_there",
        "backwards",
        "terminal",
        "cancel_not_allowed",
        "frozen",
    ];

    /// Short, stable label for metrics; do not rename, dashboards key on it.
    pub fn code(&self) -> &'static str {
        match self {
            SkipReason::NoTarget => "no_target",
            SkipReason::AlreadyThere(_) => Self::ALREADY_THERE,
            SkipReason::Backwards { .. } => "backwards",
            SkipReason::Terminal { .. } => "terminal",
            SkipReason::CancelNotAllowed { .. } => "cancel_not_allowed",
            SkipReason::Frozen { .. } => "frozen",
        }
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::NoTarget => f.write_str("the event implies no order status change"),
            SkipReason::AlreadyThere(s) => write!(f, "order is already {s}"),
            SkipReason::Backwards { from, to } => {
                write!(f, "order is {from}; {to} would move it backwards")
            }
            SkipReason::Terminal { from, to } => {
                write!(f, "order is {from}, which is final; not moving it to {to}")
            }
            SkipReason::CancelNotAllowed { from } => write!(
                f,
                "order is {from}; only pending, confirmed or processing orders can be cancelled"
            ),
            SkipReason::Frozen { status } => write!(
                f,
                "order status {status:?} is not managed by fulfillment events; left unchanged"
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Apply { from: OrderStatus, to: OrderStatus },
    Skip(SkipReason),
}

/// Every (from, to) move [`decide`] can apply.
pub fn possible_transitions() -> Vec<(OrderStatus, OrderStatus)> {
    let mut out = Vec::new();
    for from in OrderStatus::ALL {
        for to in OrderStatus::ALL {
            if let Decision::Apply { .. } = decide(&CurrentStatus::Known(from), Some(to)) {
                out.push((from, to));
            }
        }
    }
    out
}

/// Whether an order in `current` may move to `target`. Only ever forward along
/// pending < confirmed < processing < shipped < delivered, or sideways into cancelled before
/// shipping; together with the per-fulfillment maximum this makes the final status
/// independent of event arrival order.
pub fn decide(current: &CurrentStatus, target: Option<OrderStatus>) -> Decision {
    // Frozen is checked first: for an order we do not manage, that is the real reason
    // nothing happened, whatever the event implied.
    let from = match current {
        CurrentStatus::Frozen(status) => {
            return Decision::Skip(SkipReason::Frozen {
                status: status.clone(),
            })
        }
        CurrentStatus::Known(s) => *s,
    };
    let Some(to) = target else {
        return Decision::Skip(SkipReason::NoTarget);
    };
    if from == to {
        return Decision::Skip(SkipReason::AlreadyThere(to));
    }
    if from.is_terminal() {
        return Decision::Skip(SkipReason::Terminal {
            from: from.as_str().to_string(),
            to,
        });
    }
    match (from.progress(), to.progress()) {
        (_, None) => match from {
            OrderStatus::Pending | OrderStatus::Confirmed | OrderStatus::Processing => {
                Decision::Apply { from, to }
            }
            _ => Decision::Skip(SkipReason::CancelNotAllowed { from }),
        },
        (Some(f), Some(t)) if t > f => Decision::Apply { from, to },
        _ => Decision::Skip(SkipReason::Backwards { from, to }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    use FulfillmentStatus as F;
    use OrderStatus as O;

    fn known(s: OrderStatus) -> CurrentStatus {
        CurrentStatus::Known(s)
    }

    const CHAIN: [OrderStatus; 5] = [
        O::Pending,
        O::Confirmed,
        O::Processing,
        O::Shipped,
        O::Delivered,
    ];
    const ALL_ORDER: [OrderStatus; 6] = [
        O::Pending,
        O::Confirmed,
        O::Processing,
        O::Shipped,
        O::Delivered,
        O::Cancelled,
    ];

    #[test]
    fn default_mapping_rows() {
        let m = StatusMapping::default();
        let rows = [
            (F::Pending, None),
            (F::Planning, Some(O::Processing)),
            (F::Picking, Some(O::Processing)),
            (F::Picked, Some(O::Processing)),
            (F::Packing, Some(O::Processing)),
            (F::Packed, Some(O::Processing)),
            (F::Ready, Some(O::Processing)),
            (F::Shipped, Some(O::Shipped)),
            (F::Completed, Some(O::Shipped)),
            (F::Cancelled, Some(O::Cancelled)),
        ];
        for (f, want) in rows {
            assert_eq!(m.target(f), want, "{f}");
        }
        assert!(F::ALL.iter().all(|&f| m.target(f) != Some(O::Delivered)));
    }

    #[test]
    fn fulfillment_rank_parse_roundtrip() {
        for (i, f) in F::ALL.into_iter().enumerate() {
            assert_eq!(f.rank(), i as i16);
            assert_eq!(F::from_rank(f.rank()), Some(f));
            assert_eq!(F::parse(f.as_str()), Some(f));
        }
        assert!(F::ALL.windows(2).all(|w| w[0] < w[1]));
        assert!(F::Ready < F::Cancelled && F::Cancelled < F::Shipped);
        assert_eq!(F::from_rank(-1), None);
        assert_eq!(F::from_rank(10), None);
        assert_eq!(F::parse("Picking"), None);
        assert_eq!(F::parse("delivered"), None);
    }

    #[test]
    fn order_status_parse_exact_lowercase() {
        for s in ALL_ORDER {
            assert_eq!(O::parse(s.as_str()), Some(s));
            assert_eq!(s.to_string(), s.as_str());
        }
        assert_eq!(O::parse("Shipped"), None);
        assert_eq!(O::parse(" shipped"), None);
        assert_eq!(O::parse("payment_confirmed"), None);
        assert!(O::Delivered.is_terminal() && O::Cancelled.is_terminal());
        assert!(CHAIN[..4].iter().all(|s| !s.is_terminal()));
    }

    #[test]
    fn forward_moves_apply() {
        for (i, &from) in CHAIN.iter().enumerate() {
            for &to in &CHAIN[i + 1..] {
                if from.is_terminal() {
                    continue;
                }
                assert_eq!(
                    decide(&known(from), Some(to)),
                    Decision::Apply { from, to },
                    "{from} -> {to}"
                );
            }
        }
    }

    #[test]
    fn every_backward_case_skips() {
        let cases = [
            (O::Confirmed, O::Pending),
            (O::Processing, O::Pending),
            (O::Processing, O::Confirmed),
            (O::Shipped, O::Pending),
            (O::Shipped, O::Confirmed),
            (O::Shipped, O::Processing),
        ];
        for (from, to) in cases {
            let d = decide(&known(from), Some(to));
            assert_eq!(d, Decision::Skip(SkipReason::Backwards { from, to }));
        }
        let reason = SkipReason::Backwards {
            from: O::Shipped,
            to: O::Processing,
        };
        assert_eq!(reason.code(), "backwards");
        assert_eq!(
            reason.to_string(),
            "order is shipped; processing would move it backwards"
        );
    }

    #[test]
    fn every_terminal_case_skips() {
        for from in [O::Delivered, O::Cancelled] {
            for to in ALL_ORDER {
                let d = decide(&known(from), Some(to));
                if to == from {
                    assert_eq!(d, Decision::Skip(SkipReason::AlreadyThere(to)));
                } else {
                    assert_eq!(
                        d,
                        Decision::Skip(SkipReason::Terminal {
                            from: from.as_str().to_string(),
                            to
                        }),
                        "{from} -> {to}"
                    );
                }
            }
        }
    }

    #[test]
    fn same_status_is_already_there_and_no_target_is_skipped() {
        for s in ALL_ORDER {
            let d = decide(&known(s), Some(s));
            assert_eq!(d, Decision::Skip(SkipReason::AlreadyThere(s)));
            assert_eq!(
                decide(&known(s), None),
                Decision::Skip(SkipReason::NoTarget)
            );
        }
        assert_eq!(SkipReason::NoTarget.code(), "no_target");
        assert_eq!(SkipReason::AlreadyThere(O::Shipped).code(), "already_there");
    }

    #[test]
    fn payment_confirmed_is_confirmed() {
        let cur = CurrentStatus::from_db("payment_confirmed");
        assert_eq!(cur, known(O::Confirmed));
        assert_eq!(
            decide(&cur, Some(O::Processing)),
            Decision::Apply {
                from: O::Confirmed,
                to: O::Processing
            }
        );
        assert_eq!(
            decide(&cur, Some(O::Cancelled)),
            Decision::Apply {
                from: O::Confirmed,
                to: O::Cancelled
            }
        );
    }

    #[test]
    fn refunded_failed_and_unknown_are_frozen() {
        for s in ["refunded", "payment_failed", "on_hold", "Shipped", ""] {
            let cur = CurrentStatus::from_db(s);
            assert_eq!(cur, CurrentStatus::Frozen(s.to_string()));
            for target in ALL_ORDER.map(Some).into_iter().chain([None]) {
                let d = decide(&cur, target);
                let want = SkipReason::Frozen {
                    status: s.to_string(),
                };
                assert_eq!(d, Decision::Skip(want.clone()));
                assert_eq!(want.code(), "frozen");
                assert!(want.to_string().contains(&format!("{s:?}")));
            }
        }
    }

    #[test]
    fn cancel_only_from_pending_confirmed_processing() {
        for from in [O::Pending, O::Confirmed, O::Processing] {
            assert_eq!(
                decide(&known(from), Some(O::Cancelled)),
                Decision::Apply {
                    from,
                    to: O::Cancelled
                }
            );
        }
        let d = decide(&known(O::Shipped), Some(O::Cancelled));
        let want = SkipReason::CancelNotAllowed { from: O::Shipped };
        assert_eq!(d, Decision::Skip(want.clone()));
        assert_eq!(want.code(), "cancel_not_allowed");
        assert!(want.to_string().starts_with("order is shipped;"));
        assert_eq!(
            decide(&known(O::Delivered), Some(O::Cancelled)).skip_code(),
            Some("terminal")
        );
        assert_eq!(
            decide(&known(O::Cancelled), Some(O::Cancelled)).skip_code(),
            Some("already_there")
        );
    }

    #[test]
    fn delivered_reachable_from_any_open_status() {
        for from in [O::Pending, O::Confirmed, O::Processing, O::Shipped] {
            assert_eq!(
                decide(&known(from), Some(O::Delivered)),
                Decision::Apply {
                    from,
                    to: O::Delivered
                }
            );
        }
        assert_eq!(
            decide(
                &CurrentStatus::from_db("payment_confirmed"),
                Some(O::Delivered)
            ),
            Decision::Apply {
                from: O::Confirmed,
                to: O::Delivered
            }
        );
    }

    #[test]
    fn overrides_apply_and_keep_other_defaults() {
        let m = StatusMapping::with_overrides([
            ("pending", "processing"),
            ("completed", "none"),
            ("ready", "shipped"),
        ])
        .unwrap();
        assert_eq!(m.target(F::Pending), Some(O::Processing));
        assert_eq!(m.target(F::Completed), None);
        assert_eq!(m.target(F::Ready), Some(O::Shipped));
        let d = StatusMapping::default();
        for f in [
            F::Planning,
            F::Picking,
            F::Picked,
            F::Packing,
            F::Packed,
            F::Shipped,
            F::Cancelled,
        ] {
            assert_eq!(m.target(f), d.target(f), "{f}");
        }
        let empty: [(&str, &str); 0] = [];
        assert_eq!(StatusMapping::with_overrides(empty).unwrap(), d);
        let last_wins =
            StatusMapping::with_overrides([("picked", "none"), ("picked", "shipped")]).unwrap();
        assert_eq!(last_wins.target(F::Picked), Some(O::Shipped));
    }

    #[test]
    fn overrides_reject_bad_names_with_the_key() {
        let err = StatusMapping::with_overrides([("picked", "delivered")]).unwrap_err();
        assert_eq!(
            err,
            "status_mapping.picked: \"delivered\" is not a valid target \
             (expected processing, shipped, cancelled or none)"
        );
        let err = StatusMapping::with_overrides([("pickd", "processing")]).unwrap_err();
        assert!(err.starts_with("status_mapping.pickd: "), "{err}");
        assert!(err.contains("unknown fulfillment status"), "{err}");
        for bad in ["Processing", "pending", "confirmed", ""] {
            let err = StatusMapping::with_overrides([("ready", bad)]).unwrap_err();
            assert!(err.starts_with("status_mapping.ready: "), "{err}");
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn aggregate_single_fulfillment_follows_mapping() {
        let m = StatusMapping::default();
        assert_eq!(aggregate_target(&[], None, &m), None);
        assert_eq!(aggregate_target(&[], Some(2), &m), None);
        for f in F::ALL {
            let one = [FulfillmentState::of(f)];
            assert_eq!(aggregate_target(&one, None, &m), m.target(f), "{f}");
            assert_eq!(aggregate_target(&one, Some(1), &m), m.target(f), "{f}");
        }
    }

    #[test]
    fn two_warehouses() {
        let m = StatusMapping::default();
        let agg = |fs: &[F], n: Option<u32>| {
            let states: Vec<FulfillmentState> =
                fs.iter().map(|&f| FulfillmentState::of(f)).collect();
            aggregate_target(&states, n, &m)
        };
        assert_eq!(agg(&[F::Shipped, F::Picking], None), Some(O::Processing));
        assert_eq!(agg(&[F::Shipped, F::Picking], Some(2)), Some(O::Processing));
        assert_eq!(agg(&[F::Shipped, F::Completed], Some(2)), Some(O::Shipped));
        assert_eq!(agg(&[F::Shipped, F::Shipped], None), Some(O::Shipped));
        assert_eq!(agg(&[F::Cancelled, F::Shipped], Some(2)), Some(O::Shipped));
        assert_eq!(agg(&[F::Shipped, F::Cancelled], None), Some(O::Shipped));
        assert_eq!(
            agg(&[F::Cancelled, F::Cancelled], Some(2)),
            Some(O::Cancelled)
        );
        assert_eq!(agg(&[F::Cancelled, F::Cancelled], None), Some(O::Cancelled));
        // Not everyone has reported yet: neither "all shipped" nor "all cancelled" holds.
        assert_eq!(agg(&[F::Shipped], Some(2)), Some(O::Processing));
        assert_eq!(agg(&[F::Cancelled], Some(2)), None);
        assert_ne!(agg(&[F::Cancelled], Some(2)), Some(O::Cancelled));
        // A warehouse that has not started keeps the order from counting as shipped.
        assert_eq!(agg(&[F::Shipped, F::Pending], Some(2)), Some(O::Processing));
        assert_eq!(agg(&[F::Pending, F::Pending], Some(2)), None);
        assert_eq!(agg(&[F::Cancelled, F::Pending], Some(2)), None);
        assert_eq!(
            agg(&[F::Cancelled, F::Picking], Some(2)),
            Some(O::Processing)
        );
        // More reports than announced still counts as complete.
        assert_eq!(
            agg(&[F::Shipped, F::Shipped, F::Shipped], Some(2)),
            Some(O::Shipped)
        );
    }

    impl Decision {
        fn skip_code(&self) -> Option<&'static str> {
            match self {
                Decision::Skip(r) => Some(r.code()),
                Decision::Apply { .. } => None,
            }
        }
    }

    // ---- order-independence ----------------------------------------------------------

    #[derive(Debug, Clone, Copy)]
    enum Kind {
        Fulfillment {
            fulfillment: &'static str,
            status: FulfillmentStatus,
            count: Option<u32>,
        },
        Delivered,
    }

    #[derive(Debug, Clone, Copy)]
    struct Event {
        id: u32,
        kind: Kind,
    }

    struct Sim {
        current: CurrentStatus,
        fulfillments: BTreeMap<&'static str, FulfillmentState>,
        expected: Option<u32>,
        seen: BTreeSet<u32>,
        mapping: StatusMapping,
    }

    impl Sim {
        fn new(initial: &str) -> Sim {
            Sim {
                current: CurrentStatus::from_db(initial),
                fulfillments: BTreeMap::new(),
                expected: None,
                seen: BTreeSet::new(),
                mapping: StatusMapping::default(),
            }
        }

        fn apply(&mut self, e: Event) {
            if !self.seen.insert(e.id) {
                return;
            }
            let target = match e.kind {
                Kind::Delivered => Some(O::Delivered),
                Kind::Fulfillment {
                    fulfillment,
                    status,
                    count,
                } => {
                    let slot = self
                        .fulfillments
                        .entry(fulfillment)
                        .or_insert(FulfillmentState::of(status));
                    *slot = slot.fold(status);
                    self.expected = self.expected.max(count);
                    let fs: Vec<FulfillmentState> = self.fulfillments.values().copied().collect();
                    aggregate_target(&fs, self.expected, &self.mapping)
                }
            };
            if let Decision::Apply { from, to } = decide(&self.current, target) {
                assert_eq!(self.current, known(from));
                self.current = known(to);
            }
        }
    }

    fn run(initial: &str, events: impl IntoIterator<Item = Event>) -> CurrentStatus {
        let mut sim = Sim::new(initial);
        for e in events {
            sim.apply(e);
        }
        sim.current
    }

    fn permutations(n: usize) -> Vec<Vec<usize>> {
        fn go(prefix: &mut Vec<usize>, used: &mut [bool], out: &mut Vec<Vec<usize>>) {
            if prefix.len() == used.len() {
                out.push(prefix.clone());
                return;
            }
            for i in 0..used.len() {
                if !used[i] {
                    used[i] = true;
                    prefix.push(i);
                    go(prefix, used, out);
                    prefix.pop();
                    used[i] = false;
                }
            }
        }
        let mut out = Vec::new();
        go(&mut Vec::new(), &mut vec![false; n], &mut out);
        out
    }

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn history(steps: &[(Option<&'static str>, Option<F>, Option<u32>)]) -> Vec<Event> {
        steps
            .iter()
            .enumerate()
            .map(|(i, &(fulfillment, status, count))| Event {
                id: i as u32 + 1,
                kind: match (fulfillment, status) {
                    (Some(fulfillment), Some(status)) => Kind::Fulfillment {
                        fulfillment,
                        status,
                        count,
                    },
                    _ => Kind::Delivered,
                },
            })
            .collect()
    }

    fn assert_order_independent(name: &str, initial: &str, events: &[Event], want: OrderStatus) {
        assert!(events.len() <= 7, "{name}: keep histories small");
        let in_order = run(initial, events.iter().copied());
        assert_eq!(in_order, known(want), "{name}: in-order result");
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ events.len() as u64);
        let mut next_id = 1000;
        for perm in permutations(events.len()) {
            let shuffled: Vec<Event> = perm.iter().map(|&i| events[i]).collect();
            assert_eq!(
                run(initial, shuffled.iter().copied()),
                in_order,
                "{name}: order {perm:?}"
            );
            // Redeliveries: some with the same event id (dedup path), some re-sent under a
            // fresh id (only the max-fold and the forward-only rule protect us there).
            let mut noisy = shuffled;
            for _ in 0..1 + rng.below(3) {
                let mut dup = events[rng.below(events.len())];
                if rng.below(2) == 0 {
                    next_id += 1;
                    dup.id = next_id;
                }
                let at = rng.below(noisy.len() + 1);
                noisy.insert(at, dup);
            }
            assert_eq!(
                run(initial, noisy.iter().copied()),
                in_order,
                "{name}: order {perm:?} with duplicates {noisy:?}"
            );
        }
    }

    #[test]
    fn permutation_single_warehouse_happy_path() {
        let a = Some("wh-a");
        let events = history(&[
            (a, Some(F::Pending), None),
            (a, Some(F::Picking), None),
            (a, Some(F::Packed), None),
            (a, Some(F::Ready), None),
            (a, Some(F::Shipped), None),
            (a, Some(F::Completed), None),
            (None, None, None),
        ]);
        assert_order_independent("happy path", "payment_confirmed", &events, O::Delivered);
        assert_order_independent("happy path", "pending", &events, O::Delivered);
    }

    #[test]
    fn permutation_single_warehouse_happy_path_without_delivery() {
        let a = Some("wh-a");
        let events = history(&[
            (a, Some(F::Pending), None),
            (a, Some(F::Planning), None),
            (a, Some(F::Picking), None),
            (a, Some(F::Packing), None),
            (a, Some(F::Ready), None),
            (a, Some(F::Shipped), None),
            (a, Some(F::Completed), None),
        ]);
        assert_order_independent("shipped", "payment_confirmed", &events, O::Shipped);
    }

    #[test]
    fn permutation_cancelled_after_picking() {
        let a = Some("wh-a");
        let events = history(&[
            (a, Some(F::Pending), None),
            (a, Some(F::Planning), None),
            (a, Some(F::Picking), None),
            (a, Some(F::Cancelled), None),
        ]);
        assert_order_independent("cancelled", "payment_confirmed", &events, O::Cancelled);
    }

    #[test]
    fn permutation_two_warehouses_one_cancelled_one_ships() {
        let (a, b, n) = (Some("wh-a"), Some("wh-b"), Some(2));
        let events = history(&[
            (a, Some(F::Planning), n),
            (a, Some(F::Picking), n),
            (a, Some(F::Cancelled), n),
            (b, Some(F::Picking), n),
            (b, Some(F::Packed), n),
            (b, Some(F::Shipped), n),
        ]);
        assert_order_independent("one cancelled", "payment_confirmed", &events, O::Shipped);
    }

    #[test]
    fn permutation_two_warehouses_both_ship_then_delivered() {
        let (a, b, n) = (Some("wh-a"), Some("wh-b"), Some(2));
        let events = history(&[
            (a, Some(F::Picking), n),
            (a, Some(F::Shipped), n),
            (b, Some(F::Picking), n),
            (b, Some(F::Shipped), n),
            (b, Some(F::Completed), n),
            (None, None, None),
        ]);
        assert_order_independent("both ship", "payment_confirmed", &events, O::Delivered);
    }

    #[test]
    fn permutation_two_warehouses_both_ship_no_delivery() {
        let (a, b, n) = (Some("wh-a"), Some("wh-b"), Some(2));
        let events = history(&[
            (a, Some(F::Planning), n),
            (a, Some(F::Picking), n),
            (a, Some(F::Shipped), n),
            (b, Some(F::Pending), n),
            (b, Some(F::Picking), n),
            (b, Some(F::Shipped), n),
            (b, Some(F::Completed), n),
        ]);
        assert_order_independent("both ship", "pending", &events, O::Shipped);
    }

    #[test]
    fn permutation_two_warehouses_both_cancelled() {
        let (a, b, n) = (Some("wh-a"), Some("wh-b"), Some(2));
        let events = history(&[
            (a, Some(F::Picking), n),
            (a, Some(F::Cancelled), n),
            (b, Some(F::Planning), n),
            (b, Some(F::Cancelled), n),
        ]);
        assert_order_independent("both cancelled", "payment_confirmed", &events, O::Cancelled);
    }

    #[test]
    fn permutation_frozen_order_never_moves() {
        let a = Some("wh-a");
        let events = history(&[
            (a, Some(F::Picking), None),
            (a, Some(F::Shipped), None),
            (None, None, None),
        ]);
        for initial in ["refunded", "payment_failed", "mystery"] {
            for perm in permutations(events.len()) {
                let got = run(initial, perm.iter().map(|&i| events[i]));
                assert_eq!(got, CurrentStatus::Frozen(initial.to_string()));
            }
        }
    }

    // ---- the same property, over generated histories -----------------------------------

    /// Forward statuses a warehouse may report, in order (Cancelled aside).
    const FORWARD: [F; 9] = [
        F::Pending,
        F::Planning,
        F::Picking,
        F::Picked,
        F::Packing,
        F::Packed,
        F::Ready,
        F::Shipped,
        F::Completed,
    ];
    const WAREHOUSES: [&str; 3] = ["wh-a", "wh-b", "wh-c"];

    /// A consistent history: per warehouse an increasing run of forward statuses (a subset
    /// picked by `mask`, up to `end`), cut short by a cancellation before shipping when
    /// `cancel`; `fulfillment_count` announced on every event when there are several
    /// warehouses; a delivery confirmation only when every warehouse shipped or cancelled and
    /// at least one shipped, as in the real world.
    fn generated_history(warehouses: &[(usize, u16, bool)], delivered: bool) -> Vec<Event> {
        let count = (warehouses.len() > 1).then_some(warehouses.len() as u32);
        let mut steps = Vec::new();
        let mut shipped = 0;
        for (w, &(end, mask, cancel)) in warehouses.iter().enumerate() {
            let cancel = cancel && end < 7;
            for (i, &status) in FORWARD.iter().enumerate().take(end + 1) {
                if mask & (1 << i) != 0 || i == end {
                    steps.push((Some(WAREHOUSES[w]), Some(status), count));
                }
            }
            if cancel {
                steps.push((Some(WAREHOUSES[w]), Some(F::Cancelled), count));
            } else if end >= 7 {
                shipped += 1;
            }
        }
        let all_done = warehouses
            .iter()
            .all(|&(end, _, cancel)| end >= 7 || cancel);
        if delivered && all_done && shipped > 0 {
            steps.push((None, None, None));
        }
        history(&steps)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Any interleaving of an order's events, with redeliveries under the same or a new
        /// event id, ends where the in-order history ends.
        #[test]
        fn any_interleaving_and_duplication_ends_like_the_in_order_history(
            warehouses in proptest::collection::vec((0usize..9, proptest::prelude::any::<u16>(), proptest::prelude::any::<bool>()), 1..=3),
            delivered in proptest::prelude::any::<bool>(),
            initial in proptest::sample::select(vec!["pending", "payment_confirmed", "confirmed", "processing"]),
            seed in 1u64..,
            duplicates in 0usize..4,
        ) {
            let events = generated_history(&warehouses, delivered);
            let in_order = run(initial, events.iter().copied());
            let mut rng = XorShift(seed);
            let mut shuffled = events.clone();
            for i in (1..shuffled.len()).rev() {
                shuffled.swap(i, rng.below(i + 1));
            }
            for n in 0..duplicates {
                let mut dup = events[rng.below(events.len())];
                if rng.below(2) == 0 {
                    dup.id = 10_000 + n as u32;
                }
                let at = rng.below(shuffled.len() + 1);
                shuffled.insert(at, dup);
            }
            proptest::prop_assert_eq!(
                run(initial, shuffled.iter().copied()),
                in_order,
                "history {:?}, delivered as {:?}",
                events,
                shuffled
            );
        }
    }
}
