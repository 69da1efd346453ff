//! Reading, validating and compiling rules files into [`Rules`].
//!
//! A path is a single file or a directory. In a directory every regular file
//! is read, recursively, in name order, except names starting with `.` — so
//! the `..data` and `..2024_…` entries of a Kubernetes ConfigMap mount are
//! skipped while the symlinks to the files are followed (each domain is read
//! once; envoyproxy/ratelimit's #367 reads it twice). Each file holds one
//! domain, and a domain may appear in only one file.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::ConfigError;
use super::file::{DescriptorDoc, FileDoc, RateLimitDoc};
use crate::rules::{DescriptorTree, Limit, Node, Rule, RuleLimit, Rules, Unit, matcher::Level};

/// Largest rules file accepted; a bigger one is refused before parsing.
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// Loads every rules file at `path` (a file or a directory).
///
/// # Errors
///
/// [`ConfigError`] for the first unreadable or invalid file, naming the file,
/// the path inside it and the reason; nothing is loaded then.
pub fn load_rules(path: &Path) -> Result<Rules, ConfigError> {
    let io = |source| ConfigError::Io {
        path: path.to_owned(),
        source,
    };
    let files = if fs::metadata(path).map_err(io)?.is_dir() {
        let mut files = Vec::new();
        collect_files(path, &mut files)?;
        files
    } else {
        vec![path.to_owned()]
    };

    let mut domains: HashMap<String, (String, DescriptorTree)> = HashMap::new();
    for file in files {
        let name = file.display().to_string();
        let size = fs::metadata(&file).map_err(|source| ConfigError::Io {
            path: file.clone(),
            source,
        })?;
        if size.len() > MAX_FILE_BYTES {
            return Err(ConfigError::invalid(
                &name,
                "",
                format!(
                    "file is {} bytes; the limit is {MAX_FILE_BYTES}",
                    size.len()
                ),
            ));
        }
        let text = fs::read_to_string(&file).map_err(|source| ConfigError::Io {
            path: file.clone(),
            source,
        })?;
        let (domain, tree) = parse_rules_file(&name, &text)?;
        if let Some((first, _)) = domains.get(&domain) {
            return Err(ConfigError::invalid(
                &name,
                "domain",
                format!("duplicate domain '{domain}' (already defined in {first})"),
            ));
        }
        domains.insert(domain, (name, tree));
    }
    Ok(Rules::new(
        domains
            .into_iter()
            .map(|(domain, (_, tree))| (domain, tree))
            .collect(),
    ))
}

/// Parses and compiles one rules file; `name` is used in errors and as the
/// rules' source.
///
/// # Errors
///
/// [`ConfigError::Invalid`] naming the path inside the file and the reason.
pub fn parse_rules_file(name: &str, text: &str) -> Result<(String, DescriptorTree), ConfigError> {
    let doc: FileDoc = if text.trim().is_empty() {
        FileDoc {
            domain: None,
            descriptors: None,
        }
    } else {
        let deserializer = serde_yaml_ng::Deserializer::from_str(text);
        serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            ConfigError::invalid(name, &path, e.into_inner().to_string())
        })?
    };
    let domain = doc
        .domain
        .map(|d| d.0)
        .filter(|d| !d.is_empty())
        .ok_or_else(|| {
            ConfigError::invalid(name, "domain", "config file cannot have empty domain")
        })?;
    let compiler = Compiler {
        file: name,
        source: Arc::from(name),
    };
    let root = compiler.level(
        doc.descriptors.as_deref().unwrap_or_default(),
        "descriptors",
        &domain,
        &[],
    )?;
    Ok((domain.clone(), DescriptorTree::new(root)))
}

/// Compiles the descriptors of one file.
struct Compiler<'a> {
    file: &'a str,
    source: Arc<str>,
}

impl Compiler<'_> {
    /// Compiles one level. `at` is the YAML path of the list, `stats_path` the
    /// dotted rule path so far, `shared` the share_threshold patterns of the
    /// levels above.
    fn level(
        &self,
        docs: &[DescriptorDoc],
        at: &str,
        stats_path: &str,
        shared: &[Option<String>],
    ) -> Result<Level, ConfigError> {
        let mut level = Level::default();
        for (i, doc) in docs.iter().enumerate() {
            let here = format!("{at}[{i}]");
            let key = doc.key.as_ref().map(|k| k.as_str()).unwrap_or_default();
            if key.is_empty() {
                return Err(self.error(&format!("{here}.key"), "descriptor has empty key"));
            }
            let value = doc
                .value
                .as_ref()
                .map(|v| v.as_str())
                .filter(|v| !v.is_empty());
            let segment = match value {
                Some(value) => format!("{key}_{value}"),
                None => key.to_owned(),
            };
            let path = format!("{stats_path}.{segment}");

            if doc.quota_mode == Some(true) {
                return Err(
                    self.error(&format!("{here}.quota_mode"), "quota_mode is not supported")
                );
            }
            let share = doc.share_threshold.unwrap_or(false);
            if share && !value.is_some_and(|v| v.contains('*')) {
                return Err(self.error(
                    &format!("{here}.share_threshold"),
                    format!("share_threshold can only be used with wildcard values (containing '*'), but found key '{segment}'"),
                ));
            }
            let mut shared_here = shared.to_vec();
            shared_here.push(share.then(|| value.unwrap_or_default().to_owned()));

            let rule = doc
                .rate_limit
                .as_ref()
                .map(|rl| self.rule(rl, doc, &here, &path, &shared_here))
                .transpose()?
                .map(Arc::new);
            let children = self.level(
                doc.descriptors.as_deref().unwrap_or_default(),
                &format!("{here}.descriptors"),
                &path,
                &shared_here,
            )?;
            level
                .insert(key, value, Node::new(rule, children))
                .map_err(|_| {
                    self.error(
                        &here,
                        format!("duplicate descriptor composite key '{path}'"),
                    )
                })?;
        }
        Ok(level)
    }

    fn rule(
        &self,
        doc: &RateLimitDoc,
        descriptor: &DescriptorDoc,
        here: &str,
        path: &str,
        shared: &[Option<String>],
    ) -> Result<Rule, ConfigError> {
        let at = format!("{here}.rate_limit");
        let unit_text = doc.unit.as_ref().map(|u| u.as_str()).unwrap_or_default();
        let unit = Unit::parse(unit_text);
        let limit = if doc.unlimited.unwrap_or(false) {
            if unit.is_some() {
                return Err(self.error(
                    &format!("{at}.unit"),
                    "should not specify rate limit unit when unlimited",
                ));
            }
            RuleLimit::Unlimited
        } else {
            let unit = unit.ok_or_else(|| {
                self.error(
                    &format!("{at}.unit"),
                    format!("invalid rate limit unit '{unit_text}'"),
                )
            })?;
            RuleLimit::Limited(Limit {
                requests_per_unit: u64::from(doc.requests_per_unit.unwrap_or(0)),
                unit,
            })
        };
        let name = doc
            .name
            .as_ref()
            .map(|n| n.0.clone())
            .filter(|n| !n.is_empty());
        let mut replaces = Vec::new();
        for (i, entry) in doc.replaces.iter().flatten().enumerate() {
            let replaced = entry.name.as_ref().map(|n| n.as_str()).unwrap_or_default();
            let field = format!("{at}.replaces[{i}].name");
            if replaced.is_empty() {
                return Err(self.error(&field, "should not have an empty replaces entry"));
            }
            if name.as_deref() == Some(replaced) {
                return Err(self.error(
                    &field,
                    "replaces should not contain name of same descriptor",
                ));
            }
            replaces.push(replaced.to_owned());
        }
        Ok(Rule {
            name,
            limit,
            replaces,
            shadow_mode: descriptor.shadow_mode.unwrap_or(false),
            detailed_metric: descriptor.detailed_metric.unwrap_or(false),
            path: path.to_owned(),
            source: self.source.clone(),
            shared_values: shared.to_vec(),
        })
    }

    fn error(&self, path: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::invalid(self.file, path, reason)
    }
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), ConfigError> {
    let io = |source| ConfigError::Io {
        path: dir.to_owned(),
        source,
    };
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io)?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(io)?;
    entries.sort();
    for path in entries {
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        let meta = fs::metadata(&path).map_err(|source| ConfigError::Io {
            path: path.clone(),
            source,
        })?;
        if meta.is_dir() {
            collect_files(&path, out)?;
        } else if meta.is_file() {
            out.push(path);
        }
    }
    Ok(())
}
