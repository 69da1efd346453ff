//! Envoy's rate limit messages in proto3's JSON mapping, for the `/json`
//! endpoint: a `RateLimitRequest` in, a `RateLimitResponse` out, as
//! envoyproxy/ratelimit reads and writes them (Go's `protojson`).
//!
//! Reading follows protojson's rules: a field may be named in lowerCamelCase
//! or as in the proto (`hitsAddend` or `hits_addend`); an unknown field, a
//! field given twice, a value of the wrong type or out of range is an
//! error; `null` leaves a field unset; integers may be JSON numbers or
//! strings; enums are names or numbers. Writing follows protojson's
//! defaults: lowerCamelCase names, enums as names, fields at their zero
//! value left out, a `Duration` as `"58s"`, bytes in base64, fields in
//! field-number order.

use std::fmt::Write as _;

use serde::Deserialize;
use serde::de::{self, MapAccess, SeqAccess, Visitor};

use crate::proto::envoy::config::core::v3::HeaderValue;
use crate::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use crate::proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry, RateLimitOverride,
};
use crate::proto::envoy::service::ratelimit::v3::rate_limit_response::quota::ExpirationSpecifier;
use crate::proto::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, Quota, RateLimit, rate_limit::Unit,
};
use crate::proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use crate::proto::envoy::r#type::v3::RateLimitUnit;

/// Reads a `RateLimitRequest`.
///
/// # Errors
///
/// What protojson would refuse, with the field's path.
pub fn parse_request(body: &[u8]) -> Result<RateLimitRequest, String> {
    let value: Json = serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))?;
    let mut request = RateLimitRequest::default();
    for (name, value) in fields(&value, "")? {
        match name {
            Field::Named("domain") => request.domain = string(value, "domain")?,
            Field::Named("descriptors") => {
                request.descriptors = list(value, "descriptors", descriptor)?;
            }
            Field::Named("hitsAddend") => {
                request.hits_addend = uint32(value, "hitsAddend")?.unwrap_or(0);
            }
            Field::Named(other) | Field::Unknown(other) => return Err(unknown("", other)),
        }
    }
    Ok(request)
}

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

// === reading ===

/// A JSON value that keeps an object's members in order, duplicates
/// included (protojson refuses a field given twice).
#[derive(Debug, Clone)]
enum Json {
    Null,
    /// No field of the request is a boolean: only its presence matters.
    Bool,
    Number(serde_json::Number),
    String(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Json, E> {
        Ok(Json::Bool)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Json, E> {
        Ok(Json::Number(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Json, E> {
        Ok(Json::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Json, E> {
        serde_json::Number::from_f64(v)
            .map(Json::Number)
            .ok_or_else(|| E::custom("not a finite number"))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Json, E> {
        Ok(Json::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Json, E> {
        Ok(Json::String(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut members = Vec::new();
        while let Some((key, value)) = map.next_entry::<String, Json>()? {
            members.push((key, value));
        }
        Ok(Json::Object(members))
    }
}

/// A member name, resolved to the field's JSON name.
enum Field<'a> {
    /// A known field, by its lowerCamelCase name.
    Named(&'a str),
    /// Not a field of this message.
    Unknown(&'a str),
}

/// The members of the object `value` (at `path`) that are not `null`, each
/// named by its field's JSON name; a field given twice (under either of
/// its names) is an error.
fn fields<'a>(value: &'a Json, path: &str) -> Result<Vec<(Field<'a>, &'a Json)>, String> {
    let Json::Object(members) = value else {
        return Err(format!("{}: expected an object", shown(path)));
    };
    let mut seen: Vec<&str> = Vec::new();
    let mut out = Vec::new();
    for (name, value) in members {
        let field = match json_name(name) {
            Some(json) => Field::Named(json),
            None => Field::Unknown(name.as_str()),
        };
        if let Field::Named(json) = field {
            if seen.contains(&json) {
                return Err(format!("{}: field {json} given twice", shown(path)));
            }
            seen.push(json);
        }
        if !matches!(value, Json::Null) {
            out.push((field, value));
        }
    }
    Ok(out)
}

/// The JSON name of every field of the request's messages, from either
/// spelling.
fn json_name(name: &str) -> Option<&'static str> {
    Some(match name {
        "domain" => "domain",
        "descriptors" => "descriptors",
        "hitsAddend" | "hits_addend" => "hitsAddend",
        "entries" => "entries",
        "limit" => "limit",
        "key" => "key",
        "value" => "value",
        "requestsPerUnit" | "requests_per_unit" => "requestsPerUnit",
        "unit" => "unit",
        _ => return None,
    })
}

fn shown(path: &str) -> &str {
    if path.is_empty() { "request" } else { path }
}

fn unknown(path: &str, name: &str) -> String {
    format!("{}: unknown field {name}", shown(path))
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

fn descriptor(value: &Json, path: &str) -> Result<RateLimitDescriptor, String> {
    let mut descriptor = RateLimitDescriptor::default();
    for (name, value) in fields(value, path)? {
        match name {
            Field::Named("entries") => {
                descriptor.entries = list(value, &join(path, "entries"), entry)?;
            }
            Field::Named("limit") => {
                descriptor.limit = Some(limit_override(value, &join(path, "limit"))?);
            }
            // A wrapper (UInt64Value): present, even 0, means "given".
            Field::Named("hitsAddend") => {
                descriptor.hits_addend = Some(uint64(value, &join(path, "hitsAddend"))?);
            }
            Field::Named(other) | Field::Unknown(other) => return Err(unknown(path, other)),
        }
    }
    Ok(descriptor)
}

fn entry(value: &Json, path: &str) -> Result<Entry, String> {
    let mut entry = Entry::default();
    for (name, value) in fields(value, path)? {
        match name {
            Field::Named("key") => entry.key = string(value, &join(path, "key"))?,
            Field::Named("value") => entry.value = string(value, &join(path, "value"))?,
            Field::Named(other) | Field::Unknown(other) => return Err(unknown(path, other)),
        }
    }
    Ok(entry)
}

fn limit_override(value: &Json, path: &str) -> Result<RateLimitOverride, String> {
    let mut limit = RateLimitOverride::default();
    for (name, value) in fields(value, path)? {
        match name {
            Field::Named("requestsPerUnit") => {
                limit.requests_per_unit =
                    uint32(value, &join(path, "requestsPerUnit"))?.unwrap_or(0);
            }
            Field::Named("unit") => limit.unit = unit(value, &join(path, "unit"))?,
            Field::Named(other) | Field::Unknown(other) => return Err(unknown(path, other)),
        }
    }
    Ok(limit)
}

fn list<T>(
    value: &Json,
    path: &str,
    item: impl Fn(&Json, &str) -> Result<T, String>,
) -> Result<Vec<T>, String> {
    let Json::Array(items) = value else {
        return Err(format!("{path}: expected a list"));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, value)| item(value, &format!("{path}[{i}]")))
        .collect()
}

fn string(value: &Json, path: &str) -> Result<String, String> {
    match value {
        Json::String(text) => Ok(text.clone()),
        _ => Err(format!("{path}: expected a string")),
    }
}

/// An integer field: a JSON number with no fraction, or a string holding
/// one (proto3's JSON mapping allows both).
fn integer(value: &Json, path: &str) -> Result<i128, String> {
    let number = match value {
        Json::Number(number) => number.clone(),
        // The number's own text: no spaces around it.
        Json::String(text) if text.trim() == text => {
            serde_json::from_str::<serde_json::Number>(text)
                .map_err(|_| format!("{path}: '{text}' is not an integer"))?
        }
        Json::String(text) => return Err(format!("{path}: '{text}' is not an integer")),
        _ => return Err(format!("{path}: expected an integer")),
    };
    if let Some(n) = number.as_u64() {
        return Ok(i128::from(n));
    }
    if let Some(n) = number.as_i64() {
        return Ok(i128::from(n));
    }
    match number.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 1e20 => Ok(f as i128),
        _ => Err(format!("{path}: {number} is not an integer")),
    }
}

/// A `uint32`; `None` for 0 (the field's zero value).
fn uint32(value: &Json, path: &str) -> Result<Option<u32>, String> {
    let n = integer(value, path)?;
    u32::try_from(n)
        .map(|n| (n != 0).then_some(n))
        .map_err(|_| format!("{path}: {n} is out of range for uint32"))
}

fn uint64(value: &Json, path: &str) -> Result<u64, String> {
    let n = integer(value, path)?;
    u64::try_from(n).map_err(|_| format!("{path}: {n} is out of range for uint64"))
}

/// `envoy.type.v3.RateLimitUnit`: a name, or a number (an unknown number
/// is kept, as protobuf keeps it; the service refuses it).
fn unit(value: &Json, path: &str) -> Result<i32, String> {
    match value {
        Json::String(name) => RateLimitUnit::from_str_name(name)
            .map(|unit| unit as i32)
            .ok_or_else(|| format!("{path}: '{name}' is not a rate limit unit")),
        _ => {
            let n = integer(value, path)?;
            i32::try_from(n).map_err(|_| format!("{path}: {n} is out of range for an enum"))
        }
    }
}

// === writing ===

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
fn duration_text(seconds: i64, nanos: i32) -> String {
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
fn timestamp_text(seconds: i64, nanos: i32) -> String {
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
fn base64(bytes: &[u8]) -> String {
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

#[cfg(test)]
mod tests;
