//! W3C Trace Context (`traceparent`, <https://www.w3.org/TR/trace-context/>): telling a valid
//! header from anything else a row's headers may hold, and continuing a trace with a new
//! span, so that events written because of a traced event (the `order.status_changed` echo)
//! carry the incoming trace ID.

/// A valid `traceparent`: `version-traceid-parentid-flags`, lowercase hex.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent<'a> {
    pub trace_id: &'a str,
    pub parent_id: &'a str,
    pub flags: &'a str,
}

impl<'a> TraceParent<'a> {
    /// `None` unless `header` is a trace context a receiver must accept: version `00` is
    /// exactly 55 characters; a later version (not `ff`) may carry more after a `-`; the trace
    /// and parent IDs are not all zeros.
    pub fn parse(header: &'a str) -> Option<TraceParent<'a>> {
        let b = header.as_bytes();
        if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let version = &header[0..2];
        let trace_id = &header[3..35];
        let parent_id = &header[36..52];
        let flags = &header[53..55];
        let hex = |s: &str| s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
        let zeros = |s: &str| s.bytes().all(|c| c == b'0');
        if !(hex(version) && hex(trace_id) && hex(parent_id) && hex(flags)) {
            return None;
        }
        if version == "ff" || (version == "00" && b.len() != 55) || (b.len() > 55 && b[55] != b'-')
        {
            return None;
        }
        if zeros(trace_id) || zeros(parent_id) {
            return None;
        }
        Some(TraceParent {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// The `traceparent` of a span that is a child of this one: same trace ID and flags, a
    /// new random parent ID, version `00`.
    pub fn child(&self) -> String {
        format!("00-{}-{}-{}", self.trace_id, new_span_id(), self.flags)
    }
}

/// 16 lowercase hex digits, random, never all zeros.
fn new_span_id() -> String {
    loop {
        let bits = uuid::Uuid::new_v4().as_u64_pair().0;
        if bits != 0 {
            return format!("{bits:016x}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TraceParent;

    const VALID: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn accepts_the_spec_example() {
        let tp = TraceParent::parse(VALID).expect("valid");
        assert_eq!(tp.trace_id, "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(tp.parent_id, "b7ad6b7169203331");
        assert_eq!(tp.flags, "01");
    }

    #[test]
    fn refuses_what_is_not_a_trace_context() {
        for bad in [
            "",
            "12",
            "garbage",
            &VALID.to_uppercase(),
            &VALID.replace("0af7651916cd43dd8448eb211c80319c", &"0".repeat(32)),
            &VALID.replace("b7ad6b7169203331", &"0".repeat(16)),
            &VALID.replacen("00", "ff", 1),
            &format!("{VALID}-extra"),
            &VALID.replace('-', "_"),
            &VALID[..54],
            "00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",
        ] {
            assert!(TraceParent::parse(bad).is_none(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn a_later_version_may_carry_more() {
        let later = VALID.replacen("00", "01", 1) + "-what-comes-next";
        assert!(TraceParent::parse(&later).is_some());
        let glued = VALID.replacen("00", "01", 1) + "x";
        assert!(TraceParent::parse(&glued).is_none());
    }

    #[test]
    fn a_child_keeps_the_trace_and_gets_a_new_span() {
        let parent = TraceParent::parse(VALID).expect("valid");
        let child = parent.child();
        let c = TraceParent::parse(&child).expect("the child is valid");
        assert_eq!(c.trace_id, parent.trace_id);
        assert_eq!(c.flags, parent.flags);
        assert_ne!(c.parent_id, parent.parent_id);
        assert_ne!(parent.child(), child, "span IDs are random");
    }
}
