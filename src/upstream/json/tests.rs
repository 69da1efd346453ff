//! The JSON mapping both ways, and what protojson refuses.

use super::write::{base64, duration_text, timestamp_text};
use super::*;
use crate::proto::envoy::config::core::v3::HeaderValue;
use crate::proto::envoy::service::ratelimit::v3::rate_limit_response::quota::ExpirationSpecifier;
use crate::proto::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, Quota, RateLimit, rate_limit::Unit,
};
use crate::proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use crate::proto::envoy::r#type::v3::RateLimitUnit;

fn parsed(text: &str) -> RateLimitRequest {
    parse_request(text.as_bytes()).unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn refused(text: &str) -> String {
    match parse_request(text.as_bytes()) {
        Ok(request) => panic!("{text}: accepted as {request:?}"),
        Err(error) => error,
    }
}

#[test]
fn a_request_in_either_field_spelling() {
    let request = parsed(
        r#"{"domain":"shop","descriptors":[{"entries":[{"key":"user","value":"alice"},{"key":"path"}],
            "hitsAddend":"0"},{"entries":[],"limit":{"requestsPerUnit":5,"unit":"MINUTE"}}],"hitsAddend":3}"#,
    );
    assert_eq!(request.domain, "shop");
    assert_eq!(request.hits_addend, 3);
    assert_eq!(request.descriptors.len(), 2);
    let first = &request.descriptors[0];
    assert_eq!(first.entries[0].key, "user");
    assert_eq!(first.entries[0].value, "alice");
    assert_eq!(first.entries[1].value, "");
    // A wrapper: present and 0 is "check only", not "absent".
    assert_eq!(first.hits_addend, Some(0));
    let limit = request.descriptors[1].limit.unwrap();
    assert_eq!(limit.requests_per_unit, 5);
    assert_eq!(limit.unit, RateLimitUnit::Minute as i32);

    let snake = parsed(
        r#"{"domain":"d","descriptors":[{"entries":[{"key":"k"}],"hits_addend":7,
            "limit":{"requests_per_unit":"9","unit":2}}],"hits_addend":"4"}"#,
    );
    assert_eq!(snake.hits_addend, 4);
    assert_eq!(snake.descriptors[0].hits_addend, Some(7));
    assert_eq!(snake.descriptors[0].limit.unwrap().requests_per_unit, 9);
    assert_eq!(snake.descriptors[0].limit.unwrap().unit, 2);
}

#[test]
fn null_leaves_a_field_unset() {
    let request = parsed(
        r#"{"domain":null,"descriptors":[{"entries":null,"hitsAddend":null,"limit":null}],"hitsAddend":null}"#,
    );
    assert_eq!(request.domain, "");
    assert_eq!(request.hits_addend, 0);
    assert_eq!(request.descriptors[0].hits_addend, None);
    assert!(request.descriptors[0].limit.is_none());
    assert!(parsed("{}").descriptors.is_empty());
}

#[test]
fn integers_may_be_numbers_or_strings_without_a_fraction() {
    assert_eq!(parsed(r#"{"hitsAddend":1e2}"#).hits_addend, 100);
    assert_eq!(parsed(r#"{"hitsAddend":2.0}"#).hits_addend, 2);
    assert_eq!(
        parsed(r#"{"hitsAddend":"4294967295"}"#).hits_addend,
        u32::MAX
    );
    assert!(refused(r#"{"hitsAddend":1.5}"#).contains("hitsAddend: 1.5 is not an integer"));
    assert!(refused(r#"{"hitsAddend":-1}"#).contains("out of range for uint32"));
    assert!(refused(r#"{"hitsAddend":4294967296}"#).contains("out of range for uint32"));
    assert!(refused(r#"{"hitsAddend":"x"}"#).contains("'x' is not an integer"));
    assert!(refused(r#"{"hitsAddend":" 1"}"#).contains("is not an integer"));
    assert!(refused(r#"{"hitsAddend":true}"#).contains("expected an integer"));
    assert!(
        refused(r#"{"descriptors":[{"hitsAddend":-2}]}"#)
            .contains("descriptors[0].hitsAddend: -2 is out of range for uint64")
    );
}

#[test]
fn what_protojson_refuses() {
    let cases = [
        ("", "invalid JSON"),
        ("{", "invalid JSON"),
        ("[]", "request: expected an object"),
        (r#"{"domain":"a"} x"#, "invalid JSON"),
        (r#"{"domian":"a"}"#, "request: unknown field domian"),
        (r#"{"domain":"a","domain":"b"}"#, "field domain given twice"),
        (
            r#"{"hitsAddend":1,"hits_addend":2}"#,
            "field hitsAddend given twice",
        ),
        (r#"{"domain":5}"#, "domain: expected a string"),
        (r#"{"descriptors":{}}"#, "descriptors: expected a list"),
        (
            r#"{"descriptors":[null]}"#,
            "descriptors[0]: expected an object",
        ),
        (
            r#"{"descriptors":[{"entries":[{"key":"k","val":"v"}]}]}"#,
            "descriptors[0].entries[0]: unknown field val",
        ),
        (
            r#"{"descriptors":[{"entries":[{"key":1}]}]}"#,
            "descriptors[0].entries[0].key: expected a string",
        ),
        (
            r#"{"descriptors":[{"limit":{"unit":"FORTNIGHT"}}]}"#,
            "descriptors[0].limit.unit: 'FORTNIGHT' is not a rate limit unit",
        ),
        (
            r#"{"descriptors":[{"limit":{"unit":"minute"}}]}"#,
            "'minute' is not a rate limit unit",
        ),
        (
            r#"{"descriptors":[{"limit":{"requestsPerUnit":1,"unit":"SECOND","name":"x"}}]}"#,
            "descriptors[0].limit: unknown field name",
        ),
    ];
    for (text, message) in cases {
        let error = refused(text);
        assert!(error.contains(message), "{text}: {error}");
    }
}

#[test]
fn a_response_as_protojson_writes_it() {
    let response = RateLimitResponse {
        overall_code: Code::OverLimit.into(),
        statuses: vec![
            DescriptorStatus {
                code: Code::Ok.into(),
                current_limit: Some(RateLimit {
                    requests_per_unit: 10,
                    unit: Unit::Minute.into(),
                    name: "per-user".into(),
                }),
                limit_remaining: 9,
                duration_until_reset: Some(prost_types::Duration {
                    seconds: 58,
                    nanos: 0,
                }),
                quota: None,
            },
            DescriptorStatus {
                code: Code::OverLimit.into(),
                current_limit: Some(RateLimit {
                    requests_per_unit: 0,
                    unit: Unit::Week.into(),
                    name: String::new(),
                }),
                limit_remaining: 0,
                duration_until_reset: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 0,
                }),
                quota: None,
            },
            // No rule: only the code.
            DescriptorStatus {
                code: Code::Ok.into(),
                ..Default::default()
            },
        ],
        response_headers_to_add: vec![HeaderValue {
            key: "RateLimit-Limit".into(),
            value: "10".into(),
            raw_value: Vec::new(),
        }],
        ..Default::default()
    };
    assert_eq!(
        render_response(&response).unwrap(),
        r#"{"overallCode":"OVER_LIMIT","statuses":[{"code":"OK","currentLimit":{"requestsPerUnit":10,"unit":"MINUTE","name":"per-user"},"limitRemaining":9,"durationUntilReset":"58s"},{"code":"OVER_LIMIT","currentLimit":{"unit":"WEEK"},"durationUntilReset":"0s"},{"code":"OK"}],"responseHeadersToAdd":[{"key":"RateLimit-Limit","value":"10"}]}"#
    );
    assert_eq!(
        render_response(&RateLimitResponse::default()).unwrap(),
        "{}"
    );
}

#[test]
fn the_rarely_set_fields_have_their_json_forms_too() {
    let mut metadata = prost_types::Struct::default();
    let value = |kind| prost_types::Value { kind: Some(kind) };
    use prost_types::value::Kind;
    metadata
        .fields
        .insert("b".into(), value(Kind::NumberValue(1.5)));
    metadata
        .fields
        .insert("a".into(), value(Kind::StringValue("x\"y".into())));
    metadata.fields.insert(
        "c".into(),
        value(Kind::ListValue(prost_types::ListValue {
            values: vec![value(Kind::BoolValue(true)), value(Kind::NullValue(0))],
        })),
    );
    let response = RateLimitResponse {
        request_headers_to_add: vec![HeaderValue {
            key: "k".into(),
            value: String::new(),
            raw_value: b"\x00\xffab".to_vec(),
        }],
        raw_body: b"hello".to_vec(),
        dynamic_metadata: Some(metadata),
        quota: Some(Quota {
            requests: 3,
            id: "q".into(),
            expiration_specifier: Some(ExpirationSpecifier::ValidUntil(prost_types::Timestamp {
                seconds: 1_700_000_020,
                nanos: 21_000_000,
            })),
        }),
        ..Default::default()
    };
    assert_eq!(
        render_response(&response).unwrap(),
        r#"{"requestHeadersToAdd":[{"key":"k","rawValue":"AP9hYg=="}],"rawBody":"aGVsbG8=","dynamicMetadata":{"a":"x\"y","b":1.5,"c":[true,null]},"quota":{"requests":3,"validUntil":"2023-11-14T22:13:40.021Z","id":"q"}}"#
    );
    let mut bad = prost_types::Struct::default();
    bad.fields
        .insert("n".into(), value(Kind::NumberValue(f64::NAN)));
    let error = render_response(&RateLimitResponse {
        dynamic_metadata: Some(bad),
        ..Default::default()
    })
    .unwrap_err();
    assert!(error.contains("no JSON form"), "{error}");
}

#[test]
fn durations_timestamps_and_base64_edge_cases() {
    assert_eq!(duration_text(1, 500_000_000), "1.500s");
    assert_eq!(duration_text(0, 1_000), "0.000001s");
    assert_eq!(duration_text(0, 1), "0.000000001s");
    assert_eq!(duration_text(-1, -500_000_000), "-1.500s");
    assert_eq!(timestamp_text(0, 0), "1970-01-01T00:00:00Z");
    assert_eq!(timestamp_text(951_782_400, 0), "2000-02-29T00:00:00Z");
    assert_eq!(timestamp_text(-1, 0), "1969-12-31T23:59:59Z");
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"f"), "Zg==");
    assert_eq!(base64(b"fo"), "Zm8=");
    assert_eq!(base64(b"foo"), "Zm9v");
    assert_eq!(base64(b"foobar"), "Zm9vYmFy");
}
