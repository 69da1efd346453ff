//! Reading variables as upstream's settings library does: typed getters
//! that record every variable asked about (so the mode knows all of its
//! variables) and every problem found, answering the default then so that
//! reading goes on and every problem is reported at once.

use std::collections::HashMap;

use super::EnvError;
use crate::config::go_syntax::{parse_bool, parse_duration, parse_int};

/// The environment, with typed getters that record every variable they are
/// asked about and every problem they find (answering the default then, so
/// reading goes on and every problem is reported).
pub(super) struct Reader<'a> {
    pub(super) env: &'a HashMap<String, String>,
    pub(super) errors: Vec<EnvError>,
    pub(super) seen: Vec<&'static str>,
}

impl<'a> Reader<'a> {
    pub(super) fn new(env: &'a HashMap<String, String>) -> Self {
        Self {
            env,
            errors: Vec::new(),
            seen: Vec::new(),
        }
    }

    pub(super) fn raw(&mut self, name: &'static str) -> Option<&'a str> {
        self.seen.push(name);
        self.env.get(name).map(String::as_str)
    }

    /// Set at all, even to the empty string.
    pub(super) fn given(&mut self, name: &'static str) -> bool {
        self.raw(name).is_some()
    }

    pub(super) fn error(&mut self, name: &str, message: impl Into<String>) {
        self.errors.push(EnvError {
            variable: name.to_owned(),
            message: message.into(),
        });
    }

    pub(super) fn string(&mut self, name: &'static str, default: &str) -> String {
        self.raw(name).unwrap_or(default).to_owned()
    }

    pub(super) fn bool(&mut self, name: &'static str, default: bool) -> bool {
        match self.raw(name).map(parse_bool) {
            None => default,
            Some(Ok(value)) => value,
            Some(Err(message)) => {
                self.error(name, message);
                default
            }
        }
    }

    pub(super) fn int(&mut self, name: &'static str, default: i64) -> i64 {
        match self.raw(name).map(|text| parse_int(text, 64)) {
            None => default,
            Some(Ok(value)) => value,
            Some(Err(message)) => {
                self.error(name, message);
                default
            }
        }
    }

    /// Nanoseconds.
    pub(super) fn duration(&mut self, name: &'static str, default: &str) -> i64 {
        let parsed = match self.raw(name) {
            None => parse_duration(default),
            Some(text) => parse_duration(text),
        };
        parsed.unwrap_or_else(|message| {
            self.error(name, message);
            parse_duration(default).unwrap_or(0)
        })
    }

    /// A variable that only matters with a feature ratekeeper refuses
    /// (xDS, memcache, statsd, …): refused when set at all.
    pub(super) fn refuse_if_given(&mut self, name: &'static str, why: &str) {
        if self.given(name) {
            self.error(name, format!("has no effect: {why}; remove it"));
        }
    }
}
