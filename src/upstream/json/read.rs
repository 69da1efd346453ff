//! Reading a `RateLimitRequest` from proto3 JSON as protojson does.

use serde::Deserialize;
use serde::de::{self, MapAccess, SeqAccess, Visitor};

use crate::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use crate::proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry, RateLimitOverride,
};
use crate::proto::envoy::service::ratelimit::v3::RateLimitRequest;
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
