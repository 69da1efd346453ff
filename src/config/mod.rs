//! Configuration: command-line flags ([`args`]), envoyproxy/ratelimit's
//! environment for the upstream mode ([`upstream_env`], with Go's value
//! syntax in [`go_syntax`]) and the rules files ([`file`] for the YAML
//! shape, [`load`] to validate and compile it).
//!
//! Rules files use envoyproxy/ratelimit's YAML unchanged. A load is all or
//! nothing: the first problem found refuses the whole set, with the file, the
//! path inside it and the reason.

pub mod args;
pub mod cli;
pub mod concurrency;
pub mod file;
pub mod go_syntax;
pub mod load;
mod metadata;
pub mod upstream_env;

use std::fmt;
use std::path::PathBuf;

pub use args::{Cli, Command, KeyLayoutKind, LogFormat, ServeArgs, StoreKind};
pub use cli::CliError;
pub use load::{
    ConfigSnapshot, DomainFiles, DotFiles, load_rules, load_rules_with, parse_rules_file,
    read_snapshot, read_snapshot_with,
};

/// Why a rules file or directory was refused.
#[derive(Debug)]
pub enum ConfigError {
    /// A file could not be read.
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file's content is invalid.
    Invalid {
        /// The file, as given or found in the directory.
        file: String,
        /// Where inside the file, e.g. `descriptors[0].rate_limit.unit`;
        /// empty when the whole file is at fault.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

// === impl ConfigError ===

impl ConfigError {
    pub(crate) fn invalid(file: &str, path: &str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            file: file.to_owned(),
            path: path.to_owned(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            ConfigError::Invalid { file, path, reason } if path.is_empty() => {
                write!(f, "{file}: {reason}")
            }
            ConfigError::Invalid { file, path, reason } => write!(f, "{file}: {path}: {reason}"),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConfigError::Io { source, .. } => Some(source),
            ConfigError::Invalid { .. } => None,
        }
    }
}
