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

mod read;
mod write;

pub use read::parse_request;
pub use write::render_response;

#[cfg(test)]
mod tests;
