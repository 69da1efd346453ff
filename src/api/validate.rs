//! Request checks shared by both surfaces. Each returns
//! [`Error::InvalidRequest`] with the path of the offending field.

use super::{MAX_COST, RequestLimits};
use crate::error::Error;
use crate::rules::matcher::EntryRef;

// === impl RequestLimits ===

impl RequestLimits {
    /// The domain is non-empty and not too long.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRequest`] for `domain`.
    pub fn check_domain(&self, domain: &str) -> Result<(), Error> {
        if domain.is_empty() {
            return Err(Error::invalid("domain", "must not be empty"));
        }
        self.check_length("domain", domain)
    }

    /// There is at least one descriptor and not too many.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRequest`] for `descriptors`.
    pub fn check_descriptor_count(&self, count: usize) -> Result<(), Error> {
        if count == 0 {
            return Err(Error::invalid("descriptors", "must not be empty"));
        }
        if count > self.max_descriptors {
            return Err(Error::invalid(
                "descriptors",
                format!(
                    "{count} descriptors; at most {} are allowed",
                    self.max_descriptors
                ),
            ));
        }
        Ok(())
    }

    /// Checks the entries of descriptor `index` and borrows them for
    /// matching: at least `min` (1 on our API; Envoy allows none) and at most
    /// `max_entries`, each with a non-empty key, key and value within the
    /// length cap.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRequest`] for `descriptors[index].entries`, or for one
    /// entry's `.key` or `.value`.
    pub fn entries<'a>(
        &self,
        index: usize,
        entries: impl ExactSizeIterator<Item = (&'a str, &'a str)>,
        min: usize,
    ) -> Result<Vec<EntryRef<'a>>, Error> {
        let count = entries.len();
        let field = || format!("descriptors[{index}].entries");
        if count < min {
            return Err(Error::invalid(field(), "must not be empty"));
        }
        if count > self.max_entries {
            return Err(Error::invalid(
                field(),
                format!("{count} entries; at most {} are allowed", self.max_entries),
            ));
        }
        entries
            .enumerate()
            .map(|(e, (key, value))| {
                let field = |name: &str| format!("descriptors[{index}].entries[{e}].{name}");
                if key.is_empty() {
                    return Err(Error::invalid(field("key"), "must not be empty"));
                }
                self.check_length(&field("key"), key)?;
                self.check_length(&field("value"), value)?;
                Ok(EntryRef { key, value })
            })
            .collect()
    }

    fn check_length(&self, field: &str, text: &str) -> Result<(), Error> {
        if text.len() > self.max_value_bytes {
            return Err(Error::invalid(
                field,
                format!(
                    "{} bytes; at most {} are allowed",
                    text.len(),
                    self.max_value_bytes
                ),
            ));
        }
        Ok(())
    }
}

/// A cost is at most [`MAX_COST`].
///
/// # Errors
///
/// [`Error::InvalidRequest`] for `field`.
pub fn check_cost(field: &str, cost: u64) -> Result<u64, Error> {
    if cost > MAX_COST {
        return Err(Error::invalid(
            field,
            format!("{cost} exceeds the maximum cost {MAX_COST}"),
        ));
    }
    Ok(cost)
}
