//! Bucket identity: Envoy's `BucketId` is an unordered map of non-empty keys
//! to non-empty values, chosen by the client (often from request headers),
//! so the server turns it into one canonical, injective key: entries sorted
//! by key, each key and value length-prefixed. `{a:A,b:B}` and `{b:B,a:A}`
//! are the same bucket; no two different maps share a key, whatever bytes
//! their values hold.

use std::collections::HashMap;
use std::fmt;

/// Most entries a bucket id may have.
pub const MAX_ENTRIES: usize = 16;
/// Longest key or value, in bytes.
pub const MAX_TEXT_BYTES: usize = 256;

/// A validated bucket id in canonical form.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BucketKey {
    /// The entries, sorted by key (keys are unique).
    entries: Vec<(String, String)>,
}

/// Why a bucket id was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BucketIdError {
    /// No entries at all.
    Empty,
    /// More than [`MAX_ENTRIES`] entries.
    TooManyEntries(usize),
    /// A key is empty.
    EmptyKey,
    /// The value of this key is empty.
    EmptyValue(String),
    /// A key or value is longer than [`MAX_TEXT_BYTES`].
    TooLong(String),
}

// === impl BucketKey ===

impl BucketKey {
    /// Validates and canonicalises a bucket id's map.
    ///
    /// # Errors
    ///
    /// [`BucketIdError`] naming the offending entry.
    pub fn new(bucket: &HashMap<String, String>) -> Result<Self, BucketIdError> {
        if bucket.is_empty() {
            return Err(BucketIdError::Empty);
        }
        if bucket.len() > MAX_ENTRIES {
            return Err(BucketIdError::TooManyEntries(bucket.len()));
        }
        let mut entries = Vec::with_capacity(bucket.len());
        for (key, value) in bucket {
            if key.is_empty() {
                return Err(BucketIdError::EmptyKey);
            }
            if key.len() > MAX_TEXT_BYTES || value.len() > MAX_TEXT_BYTES {
                return Err(BucketIdError::TooLong(truncated(key)));
            }
            if value.is_empty() {
                return Err(BucketIdError::EmptyValue(key.clone()));
            }
            entries.push((key.clone(), value.clone()));
        }
        entries.sort();
        Ok(Self { entries })
    }

    /// The entries, sorted by key.
    pub fn entries(&self) -> &[(String, String)] {
        &self.entries
    }

    /// The bucket id map again, for answers.
    pub fn to_map(&self) -> HashMap<String, String> {
        self.entries.iter().cloned().collect()
    }

    /// The injective encoding: `<len>:<key><len>:<value>` per entry, in key
    /// order. Lengths make every boundary explicit, so no choice of bytes in
    /// a value can imitate another entry.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        for (key, value) in &self.entries {
            out.push_str(&format!("{}:{key}{}:{value}", key.len(), value.len()));
        }
        out
    }
}

impl fmt::Display for BucketKey {
    /// `{k1=v1, k2=v2}`, for logs and the debug endpoint (not injective).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (i, (key, value)) in self.entries.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{key}={value}")?;
        }
        f.write_str("}")
    }
}

// === impl BucketIdError ===

impl fmt::Display for BucketIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BucketIdError::Empty => f.write_str("bucket_id has no entries"),
            BucketIdError::TooManyEntries(n) => write!(
                f,
                "bucket_id has {n} entries; at most {MAX_ENTRIES} are accepted"
            ),
            BucketIdError::EmptyKey => f.write_str("bucket_id has an empty key"),
            BucketIdError::EmptyValue(key) => {
                write!(f, "bucket_id entry '{key}' has an empty value")
            }
            BucketIdError::TooLong(key) => write!(
                f,
                "bucket_id entry '{key}' is longer than {MAX_TEXT_BYTES} bytes"
            ),
        }
    }
}

impl std::error::Error for BucketIdError {}

/// The first 32 characters of `text`, for error messages.
fn truncated(text: &str) -> String {
    text.chars().take(32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(&str, &str)]) -> HashMap<String, String> {
        entries
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn order_does_not_matter() {
        let a = BucketKey::new(&map(&[("a", "A"), ("b", "B")])).unwrap();
        let b = BucketKey::new(&map(&[("b", "B"), ("a", "A")])).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.encode(), b.encode());
        assert_eq!(a.to_string(), "{a=A, b=B}");
    }

    #[test]
    fn the_encoding_is_injective_where_joining_is_not() {
        let one = BucketKey::new(&map(&[("a", "1:b1:x")])).unwrap();
        let two = BucketKey::new(&map(&[("a", "x"), ("b", "x")])).unwrap();
        assert_ne!(one.encode(), two.encode());
        let three = BucketKey::new(&map(&[("ab", "c")])).unwrap();
        let four = BucketKey::new(&map(&[("a", "bc")])).unwrap();
        assert_ne!(three.encode(), four.encode());
    }

    #[test]
    fn bad_ids_are_refused_by_name() {
        assert_eq!(BucketKey::new(&map(&[])), Err(BucketIdError::Empty));
        assert_eq!(
            BucketKey::new(&map(&[("", "x")])),
            Err(BucketIdError::EmptyKey)
        );
        assert_eq!(
            BucketKey::new(&map(&[("user", "")])),
            Err(BucketIdError::EmptyValue("user".into()))
        );
        let long = "v".repeat(MAX_TEXT_BYTES + 1);
        let err = BucketKey::new(&map(&[("user", &long)])).unwrap_err();
        assert!(err.to_string().contains("longer than 256"), "{err}");
        let many: HashMap<String, String> = (0..=MAX_ENTRIES)
            .map(|i| (format!("k{i}"), "v".to_owned()))
            .collect();
        assert_eq!(
            BucketKey::new(&many),
            Err(BucketIdError::TooManyEntries(MAX_ENTRIES + 1))
        );
    }
}
