//! The crate's error type and its single mapping to a gRPC [`Status`].
//!
//! A decision ("over limit") is never an error; an [`Error`] means ratekeeper
//! could not decide. Bad input maps to `INVALID_ARGUMENT` with a message that
//! names the field, a store failure to `UNAVAILABLE` (so the gateway's own
//! failure mode decides), no configuration loaded yet to `UNKNOWN` (as
//! envoyproxy/ratelimit), and anything else to `INTERNAL` with a generic
//! message while the details go to the log.

use tonic::Status;

use crate::config::ConfigError;
use crate::store::StoreError;

/// Why a request or the service failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; `field` names the offending field.
    #[error("{field}: {reason}")]
    InvalidRequest {
        /// Path of the field in the request, e.g. `descriptors[2].entries[0].key`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The counter store failed or timed out.
    #[error(transparent)]
    Storage(#[from] StoreError),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Too many requests are being decided at once; this one was shed.
    #[error("overloaded: {max} requests are being decided; retry later")]
    Overloaded {
        /// The cap on requests in flight.
        max: usize,
    },
    /// A bounded store is full: nothing was written. The message says
    /// what to do (delete something, or raise the named bound).
    #[error("{0}")]
    Full(String),
    /// No rate limit configuration has loaded yet (the upstream mode serves
    /// before a first valid config, as envoyproxy/ratelimit does); its
    /// message is upstream's.
    #[error("no rate limit configuration loaded")]
    NoConfig,
    /// A reservation could not be made or settled.
    #[error(transparent)]
    Reservation(#[from] crate::reservation::ReservationError),
    /// A bug or an unexpected condition.
    #[error("internal error: {0}")]
    Internal(String),
}

// === impl Error ===

impl Error {
    /// An [`Error::InvalidRequest`] for `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidRequest {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        match &error {
            Error::InvalidRequest { .. } => Status::invalid_argument(error.to_string()),
            Error::Storage(e) => {
                tracing::debug!(error = %e, "store call failed");
                Status::unavailable(format!("rate limit store unavailable: {e}"))
            }
            Error::Overloaded { .. } | Error::Full(_) => {
                Status::resource_exhausted(error.to_string())
            }
            Error::Reservation(e) => e.clone().into(),
            // UNKNOWN with upstream's text, as upstream answers it.
            Error::NoConfig => Status::unknown(error.to_string()),
            Error::Config(_) | Error::Internal(_) => {
                tracing::error!(error = %error, "internal error while deciding");
                Status::internal("internal error")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn invalid_request_names_the_field() {
        let status = Status::from(Error::invalid(
            "descriptors[1].entries[0].key",
            "must not be empty",
        ));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "descriptors[1].entries[0].key: must not be empty"
        );
    }

    #[test]
    fn storage_errors_are_unavailable() {
        let status = Status::from(Error::Storage(StoreError::Timeout(
            std::time::Duration::from_millis(5),
        )));
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            status.message().contains("timed out"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn no_config_is_unknown_with_upstreams_message() {
        let status = Status::from(Error::NoConfig);
        assert_eq!(status.code(), Code::Unknown);
        assert_eq!(status.message(), "no rate limit configuration loaded");
    }

    #[test]
    fn internal_errors_hide_details() {
        let status = Status::from(Error::Internal("secret detail".into()));
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
    }
}
