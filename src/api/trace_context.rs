//! W3C trace context: the `traceparent` a gateway sends with a request
//! (`00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`), read from the
//! gRPC metadata. The RPC's span records the caller's trace id, so its logs
//! can be joined with the gateway's trace, and, when spans are exported over
//! OTLP, the caller's span becomes its parent.

use tonic::metadata::MetadataMap;

/// The parts of a valid `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent<'a> {
    /// 32 lowercase hex digits, not all zero.
    pub trace_id: &'a str,
    /// The caller's span id: 16 lowercase hex digits, not all zero.
    pub parent_id: &'a str,
    /// Whether the caller records this trace (flag bit 0).
    pub sampled: bool,
}

/// The request's `traceparent`, if it carries a valid one; malformed ones
/// are ignored, as the W3C spec asks.
pub fn parse(metadata: &MetadataMap) -> Option<TraceParent<'_>> {
    let value = metadata.get("traceparent")?.to_str().ok()?;
    let mut parts = value.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && parent.bytes().any(|b| b != b'0')
        && hex(flags, 2)
        // Version 00 has exactly four parts; later versions may add more.
        && (version != "00" || parts.next().is_none());
    let sampled = u8::from_str_radix(flags, 16).ok()? & 1 == 1;
    valid.then_some(TraceParent {
        trace_id: trace,
        parent_id: parent,
        sampled,
    })
}

/// The span of one RPC, named `name` with `fields` already given, or a
/// disabled span when nothing would use it (see
/// [`crate::telemetry::rpc_span_wanted`]). It joins the caller's trace: its
/// `trace_id` field is recorded and the caller's span becomes its parent.
pub fn rpc_span(metadata: &MetadataMap, make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    let parent = parse(metadata);
    if !crate::telemetry::rpc_span_wanted(parent.map(|p| p.sampled)) {
        return tracing::Span::none();
    }
    let span = make();
    if let Some(parent) = parent {
        span.record("trace_id", parent.trace_id);
        crate::telemetry::set_remote_parent(
            &span,
            parent.trace_id,
            parent.parent_id,
            parent.sampled,
        );
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(value: &str) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        metadata.insert("traceparent", value.parse().unwrap());
        metadata
    }

    #[test]
    fn valid_traceparents_give_their_trace_id() {
        let metadata = with("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert_eq!(
            parse(&metadata),
            Some(TraceParent {
                trace_id: "4bf92f3577b34da6a3ce929d0e0e4736",
                parent_id: "00f067aa0ba902b7",
                sampled: true,
            })
        );
        let unsampled = with("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00");
        assert!(!parse(&unsampled).unwrap().sampled);
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "garbage",
        ] {
            assert_eq!(parse(&with(bad)), None, "{bad}");
        }
        assert_eq!(parse(&MetadataMap::new()), None);
    }
}
