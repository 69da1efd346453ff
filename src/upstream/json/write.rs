//! Writing a `RateLimitResponse` as protojson does.

use std::fmt::Write as _;

use crate::proto::envoy::config::core::v3::HeaderValue;
use crate::proto::envoy::service::ratelimit::v3::RateLimitResponse;
use crate::proto::envoy::service::ratelimit::v3::rate_limit_response::quota::ExpirationSpecifier;
use crate::proto::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, Quota, RateLimit, rate_limit::Unit,
};

/// Writes a `RateLimitResponse`.
///
/// # Errors
///
/// A metadata number that JSON cannot hold (NaN or infinite), as protojson.
pub fn render_response(response: &RateLimitResponse) -> Result<String, String> {
    let mut out = Object::default();
    if let Ok(code) = Code::try_from(response.overall_code) {
        if code != Code::Unknown {
            out.raw("overallCode", &quoted(code.as_str_name()));
        }
    } else {
        out.raw("overallCode", &response.overall_code.to_string());
    }
    if !response.statuses.is_empty() {
        let statuses: Vec<String> = response.statuses.iter().map(status).collect();
        out.raw("statuses", &format!("[{}]", statuses.join(",")));
    }
    if !response.response_headers_to_add.is_empty() {
        out.raw(
            "responseHeadersToAdd",
            &headers(&response.response_headers_to_add),
        );
    }
    if !response.request_headers_to_add.is_empty() {
        out.raw(
            "requestHeadersToAdd",
            &headers(&response.request_headers_to_add),
        );
    }
    if !response.raw_body.is_empty() {
        out.raw("rawBody", &quoted(&base64(&response.raw_body)));
    }
    if let Some(metadata) = &response.dynamic_metadata {
        out.raw("dynamicMetadata", &structure(metadata)?);
    }
    if let Some(quota) = &response.quota {
        out.raw("quota", &quota_json(quota));
    }
    Ok(out.finish())
}

/// A JSON object written member by member.
#[derive(Default)]
struct Object {
    members: Vec<String>,
}

impl Object {
    /// Adds `name` with `json`, already written.
    fn raw(&mut self, name: &str, json: &str) {
        self.members.push(format!("{}:{json}", quoted(name)));
    }

    fn finish(self) -> String {
        format!("{{{}}}", self.members.join(","))
    }
}

fn quoted(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_owned())
}

fn status(status: &DescriptorStatus) -> String {
    let mut out = Object::default();
    match Code::try_from(status.code) {
        Ok(Code::Unknown) => {}
        Ok(code) => out.raw("code", &quoted(code.as_str_name())),
        Err(_) => out.raw("code", &status.code.to_string()),
    }
    if let Some(limit) = &status.current_limit {
        out.raw("currentLimit", &rate_limit(limit));
    }
    if status.limit_remaining != 0 {
        out.raw("limitRemaining", &status.limit_remaining.to_string());
    }
    if let Some(duration) = &status.duration_until_reset {
        out.raw(
            "durationUntilReset",
            &quoted(&duration_text(duration.seconds, duration.nanos)),
        );
    }
    if let Some(quota) = &status.quota {
        out.raw("quota", &quota_json(quota));
    }
    out.finish()
}

fn rate_limit(limit: &RateLimit) -> String {
    let mut out = Object::default();
    if limit.requests_per_unit != 0 {
        out.raw("requestsPerUnit", &limit.requests_per_unit.to_string());
    }
    match Unit::try_from(limit.unit) {
        Ok(Unit::Unknown) => {}
        Ok(unit) => out.raw("unit", &quoted(unit.as_str_name())),
        Err(_) => out.raw("unit", &limit.unit.to_string()),
    }
    if !limit.name.is_empty() {
        out.raw("name", &quoted(&limit.name));
    }
    out.finish()
}

fn quota_json(quota: &Quota) -> String {
    let mut out = Object::default();
    if quota.requests != 0 {
        out.raw("requests", &quota.requests.to_string());
    }
    if let Some(ExpirationSpecifier::ValidUntil(at)) = &quota.expiration_specifier {
        out.raw("validUntil", &quoted(&timestamp_text(at.seconds, at.nanos)));
    }
    if !quota.id.is_empty() {
        out.raw("id", &quoted(&quota.id));
    }
    out.finish()
}

fn headers(headers: &[HeaderValue]) -> String {
    let items: Vec<String> = headers
        .iter()
        .map(|header| {
            let mut out = Object::default();
            if !header.key.is_empty() {
                out.raw("key", &quoted(&header.key));
            }
            if !header.value.is_empty() {
                out.raw("value", &quoted(&header.value));
            }
            if !header.raw_value.is_empty() {
                out.raw("rawValue", &quoted(&base64(&header.raw_value)));
            }
            out.finish()
        })
        .collect();
    format!("[{}]", items.join(","))
}

/// A `google.protobuf.Struct` as the plain JSON object it stands for.
fn structure(value: &prost_types::Struct) -> Result<String, String> {
    // Sorted, as protojson writes map keys.
    let mut names: Vec<&String> = value.fields.keys().collect();
    names.sort();
    let mut out = Object::default();
    for name in names {
        out.raw(name, &struct_value(&value.fields[name])?);
    }
    Ok(out.finish())
}

fn struct_value(value: &prost_types::Value) -> Result<String, String> {
    use prost_types::value::Kind;
    Ok(match &value.kind {
        None | Some(Kind::NullValue(_)) => "null".to_owned(),
        Some(Kind::BoolValue(b)) => b.to_string(),
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n)
            .map(|n| n.to_string())
            .ok_or_else(|| format!("metadata number {n} has no JSON form"))?,
        Some(Kind::StringValue(text)) => quoted(text),
        Some(Kind::StructValue(inner)) => structure(inner)?,
        Some(Kind::ListValue(list)) => {
            let items = list
                .values
                .iter()
                .map(struct_value)
                .collect::<Result<Vec<_>, _>>()?;
            format!("[{}]", items.join(","))
        }
    })
}

/// A `google.protobuf.Duration` as protojson writes it: seconds with 0, 3,
/// 6 or 9 fractional digits and an `s`.
pub(super) fn duration_text(seconds: i64, nanos: i32) -> String {
    let negative = seconds < 0 || nanos < 0;
    let mut text = String::new();
    if negative {
        text.push('-');
    }
    let _ = write!(text, "{}", seconds.unsigned_abs());
    push_fraction(&mut text, nanos.unsigned_abs());
    text.push('s');
    text
}

/// A `google.protobuf.Timestamp` as RFC 3339 in UTC, as protojson writes it.
pub(super) fn timestamp_text(seconds: i64, nanos: i32) -> String {
    let days = seconds.div_euclid(86_400);
    let second_of_day = seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let mut text = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        second_of_day / 3_600,
        second_of_day % 3_600 / 60,
        second_of_day % 60
    );
    push_fraction(&mut text, nanos.unsigned_abs());
    text.push('Z');
    text
}

/// `.123`, `.123456` or `.123456789`: the fewest of 3, 6 or 9 digits that
/// hold `nanos` exactly; nothing for 0.
fn push_fraction(text: &mut String, nanos: u32) {
    if nanos == 0 {
        return;
    }
    if nanos.is_multiple_of(1_000_000) {
        let _ = write!(text, ".{:03}", nanos / 1_000_000);
    } else if nanos.is_multiple_of(1_000) {
        let _ = write!(text, ".{:06}", nanos / 1_000);
    } else {
        let _ = write!(text, ".{nanos:09}");
    }
}

/// The proleptic Gregorian date of a day count from 1970-01-01 (Howard
/// Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Standard base64 with padding, as protojson writes bytes.
pub(super) fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}
