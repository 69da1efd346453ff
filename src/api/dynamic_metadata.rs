//! `RateLimitResponse.dynamic_metadata` (opt-in, `--response-dynamic-metadata`),
//! filled exactly as envoyproxy/ratelimit fills it with
//! `RESPONSE_DYNAMIC_METADATA=true`. Envoy stores it under its filter's
//! namespace (`envoy.filters.http.ratelimit`) for later filters and access
//! logs; quota-based routing reads `metadata` there.
//!
//! The struct holds:
//! - `domain`: the request's domain;
//! - `descriptors`: one struct per request descriptor, in order, with
//!   `entries` (a list of `"key=value"`), `limit` (the request's limit
//!   override in protobuf text form, `requests_per_unit:10 unit:MINUTE`, when
//!   it has one) and `hitsAddend` (the descriptor's own addend, when set,
//!   including 0);
//! - `hitsAddend`: the request-level addend, when it is not 0;
//! - `metadata`: the rule `metadata` of every descriptor whose status is not
//!   OVER_LIMIT, merged in request order — maps merge key by key, and on any
//!   other clash the earlier descriptor's value stays. Absent when empty.
//!
//! Quota mode adds nothing of its own: a quota descriptor over its limit has
//! an OVER_LIMIT status, so its metadata is left out, and what remains names
//! the quotas that still have room (how Envoy routes by quota).

use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Value};

use crate::limiter::{Decision, DescriptorDecision};
use crate::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use crate::proto::envoy::service::ratelimit::v3::RateLimitRequest;
use crate::proto::envoy::r#type::v3::RateLimitUnit;

/// Whether answers carry dynamic metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DynamicMetadata {
    /// No dynamic metadata (upstream's default).
    #[default]
    Off,
    /// Every answer carries it.
    On,
}

/// The dynamic metadata for `request`, decided as `decision`.
pub(crate) fn build(request: &RateLimitRequest, decision: &Decision) -> Struct {
    let mut fields = std::collections::BTreeMap::new();
    fields.insert("domain".to_owned(), string(request.domain.clone()));
    fields.insert(
        "descriptors".to_owned(),
        list(request.descriptors.iter().map(descriptor).collect()),
    );
    if request.hits_addend != 0 {
        fields.insert(
            "hitsAddend".to_owned(),
            number(f64::from(request.hits_addend)),
        );
    }
    let mut merged = Struct::default();
    for outcome in &decision.descriptors {
        if let DescriptorDecision::Limited { rule, .. } = outcome
            && !outcome.denies()
            && let Some(metadata) = &rule.metadata
        {
            merge(&mut merged, &to_struct(metadata));
        }
    }
    if !merged.fields.is_empty() {
        fields.insert(
            "metadata".to_owned(),
            Value {
                kind: Some(Kind::StructValue(merged)),
            },
        );
    }
    Struct { fields }
}

fn descriptor(descriptor: &RateLimitDescriptor) -> Value {
    let mut fields = std::collections::BTreeMap::new();
    fields.insert(
        "entries".to_owned(),
        list(
            descriptor
                .entries
                .iter()
                .map(|e| string(format!("{}={}", e.key, e.value)))
                .collect(),
        ),
    );
    if let Some(limit) = &descriptor.limit {
        // Protobuf text form, fields at their default (0, UNKNOWN) omitted.
        let mut text = Vec::new();
        if limit.requests_per_unit != 0 {
            text.push(format!("requests_per_unit:{}", limit.requests_per_unit));
        }
        if limit.unit != 0 {
            let unit = RateLimitUnit::try_from(limit.unit)
                .map_or_else(|_| limit.unit.to_string(), |u| u.as_str_name().to_owned());
            text.push(format!("unit:{unit}"));
        }
        fields.insert("limit".to_owned(), string(text.join(" ")));
    }
    if let Some(hits) = descriptor.hits_addend {
        fields.insert("hitsAddend".to_owned(), number(hits as f64));
    }
    Value {
        kind: Some(Kind::StructValue(Struct { fields })),
    }
}

/// Merges `from` into `into`: nested structs key by key, and on any other
/// clash `into` keeps its value (the earlier descriptor wins).
fn merge(into: &mut Struct, from: &Struct) {
    for (key, value) in &from.fields {
        match (into.fields.get_mut(key), &value.kind) {
            (None, _) => {
                into.fields.insert(key.clone(), value.clone());
            }
            (
                Some(Value {
                    kind: Some(Kind::StructValue(existing)),
                }),
                Some(Kind::StructValue(nested)),
            ) => merge(existing, nested),
            (Some(_), _) => {}
        }
    }
}

fn to_struct(map: &serde_json::Map<String, serde_json::Value>) -> Struct {
    Struct {
        fields: map
            .iter()
            .map(|(key, value)| (key.clone(), to_value(value)))
            .collect(),
    }
}

fn to_value(value: &serde_json::Value) -> Value {
    let kind = match value {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(items) => Kind::ListValue(ListValue {
            values: items.iter().map(to_value).collect(),
        }),
        serde_json::Value::Object(map) => Kind::StructValue(to_struct(map)),
    };
    Value { kind: Some(kind) }
}

fn string(text: String) -> Value {
    Value {
        kind: Some(Kind::StringValue(text)),
    }
}

fn number(n: f64) -> Value {
    Value {
        kind: Some(Kind::NumberValue(n)),
    }
}

fn list(values: Vec<Value>) -> Value {
    Value {
        kind: Some(Kind::ListValue(ListValue { values })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(value: serde_json::Value) -> Struct {
        match value {
            serde_json::Value::Object(map) => to_struct(&map),
            other => panic!("not a map: {other}"),
        }
    }

    #[test]
    fn merging_keeps_the_first_value_and_descends_into_maps() {
        let mut merged = json(serde_json::json!({"route": {"a": 1, "list": [1]}, "name": "first"}));
        merge(
            &mut merged,
            &json(
                serde_json::json!({"route": {"a": 2, "b": 3, "list": [2]}, "name": {"x": 1}, "new": true}),
            ),
        );
        assert_eq!(
            merged,
            json(
                serde_json::json!({"route": {"a": 1, "b": 3, "list": [1]}, "name": "first", "new": true})
            )
        );
    }
}
