//! A descriptor's `metadata`: YAML read into the JSON-like map that Envoy's
//! dynamic metadata (a protobuf `Struct`) can carry.
//!
//! The map is free-form, as upstream's, but it must be expressible as a
//! `Struct`: keys are strings at every depth, numbers are finite, and YAML
//! tags (`!foo`) have no JSON meaning. Anything else is refused at load,
//! naming the path inside the metadata, rather than dropped.

use serde_json::{Map, Number, Value};
use serde_yaml_ng::Value as Yaml;

use crate::rules::Metadata;

/// The metadata of `yaml`; `None` for an empty (`metadata:`) one.
///
/// # Errors
///
/// The reason, with the path inside the metadata, when it is not a map or
/// holds something a protobuf `Struct` cannot.
pub fn from_yaml(yaml: &Yaml) -> Result<Option<Metadata>, String> {
    match yaml {
        Yaml::Null => Ok(None),
        Yaml::Mapping(_) => match value("", yaml)? {
            Value::Object(map) => Ok(Some(map)),
            _ => unreachable!("a mapping converts to an object"),
        },
        other => Err(format!(
            "error parsing metadata: must be a map, not {}",
            kind(other)
        )),
    }
}

fn value(at: &str, yaml: &Yaml) -> Result<Value, String> {
    Ok(match yaml {
        Yaml::Null => Value::Null,
        Yaml::Bool(b) => Value::Bool(*b),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Number(n) => {
            let number = if let Some(i) = n.as_i64() {
                Number::from(i)
            } else if let Some(u) = n.as_u64() {
                Number::from(u)
            } else {
                n.as_f64().and_then(Number::from_f64).ok_or_else(|| {
                    format!(
                        "error parsing metadata{}: {n} is not a finite number",
                        show(at)
                    )
                })?
            };
            Value::Number(number)
        }
        Yaml::Sequence(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| value(&format!("{at}[{i}]"), item))
                .collect::<Result<_, _>>()?,
        ),
        Yaml::Mapping(mapping) => {
            let mut map = Map::with_capacity(mapping.len());
            for (key, item) in mapping {
                let Yaml::String(key) = key else {
                    return Err(format!(
                        "error parsing metadata{}: keys must be strings, not {}",
                        show(at),
                        kind(key)
                    ));
                };
                let inner = if at.is_empty() {
                    key.clone()
                } else {
                    format!("{at}.{key}")
                };
                map.insert(key.clone(), value(&inner, item)?);
            }
            Value::Object(map)
        }
        Yaml::Tagged(tagged) => {
            return Err(format!(
                "error parsing metadata{}: YAML tag {} has no meaning here",
                show(at),
                tagged.tag
            ));
        }
    })
}

/// ` at <path>` for a nested path, nothing at the top.
fn show(at: &str) -> String {
    if at.is_empty() {
        String::new()
    } else {
        format!(" at {at}")
    }
}

fn kind(yaml: &Yaml) -> &'static str {
    match yaml {
        Yaml::Null => "null",
        Yaml::Bool(_) => "a boolean",
        Yaml::Number(_) => "a number",
        Yaml::String(_) => "a string",
        Yaml::Sequence(_) => "a list",
        Yaml::Mapping(_) => "a map",
        Yaml::Tagged(_) => "a tagged value",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn convert(text: &str) -> Result<Option<Metadata>, String> {
        from_yaml(&serde_yaml_ng::from_str(text).unwrap())
    }

    #[test]
    fn maps_of_any_depth_convert() {
        let got =
            convert("{team: edge, weight: 2, ratio: 0.5, on: true, none: null, tags: [a, {b: 1}]}")
                .unwrap()
                .unwrap();
        assert_eq!(
            Value::Object(got),
            serde_json::json!({
                "team": "edge", "weight": 2, "ratio": 0.5, "on": true, "none": null,
                "tags": ["a", {"b": 1}]
            })
        );
        assert_eq!(convert("~").unwrap(), None);
    }

    #[test]
    fn what_a_struct_cannot_hold_is_refused_with_its_path() {
        let cases = [
            (
                "[a, b]",
                "error parsing metadata: must be a map, not a list",
            ),
            (
                "text",
                "error parsing metadata: must be a map, not a string",
            ),
            (
                "{1: x}",
                "error parsing metadata: keys must be strings, not a number",
            ),
            (
                "{a: {b: [{true: x}]}}",
                "error parsing metadata at a.b[0]: keys must be strings, not a boolean",
            ),
            (
                "{a: .inf}",
                "error parsing metadata at a: .inf is not a finite number",
            ),
            (
                "{a: !custom x}",
                "error parsing metadata at a: YAML tag !custom has no meaning here",
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(convert(text).unwrap_err(), expected, "{text}");
        }
    }
}
