//! Reading, validating and compiling rules files into [`Rules`].
//!
//! A path is a single file or a directory. In a directory every regular file
//! is read, recursively, in name order, except names starting with `.` — so
//! the `..data` and `..2024_…` entries of a Kubernetes ConfigMap mount are
//! skipped while the symlinks to the files are followed (each domain is read
//! once; envoyproxy/ratelimit's #367 reads it twice). The upstream mode can
//! read those names too ([`DotFiles::Read`], upstream's
//! `RUNTIME_IGNOREDOTFILES=false`). Each file holds one domain, and a
//! domain may appear in only one file unless the files are merged
//! ([`DomainFiles::Merge`], upstream's `MERGE_DOMAIN_CONFIG`).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::file::{DescriptorDoc, FileDoc, RateLimitDoc};
use super::{ConfigError, metadata};
use crate::algorithm::{AlgorithmKind, MAX_SCALED};
use crate::failure_policy::FailurePolicy;
use crate::rules::{
    DescriptorTree, LevelMatch, Limit, MAX_WINDOW_SECONDS, Metadata, Node, Rule, RuleLimit, Rules,
    StatsLevel, StatsPath, Unit, matcher::Level,
};

/// Largest rules file accepted; a bigger one is refused before parsing.
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// The text of every rules file at a path, as read at one moment: what a
/// reload compares to decide whether anything changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSnapshot {
    /// (file name, content), in name order.
    files: Vec<(String, String)>,
}

/// Whether a directory's entries whose names start with `.` are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DotFiles {
    /// Skipped, with everything under them (`serve`'s way).
    #[default]
    Skip,
    /// Read like any other (envoyproxy/ratelimit's default).
    Read,
}

/// Loads every rules file at `path` (a file or a directory).
///
/// # Errors
///
/// [`ConfigError`] for the first unreadable or invalid file, naming the file,
/// the path inside it and the reason; nothing is loaded then.
pub fn load_rules(path: &Path) -> Result<Rules, ConfigError> {
    load_rules_with(path, DomainFiles::Refuse)
}

/// Loads every rules file at `path`, a domain in several files handled as
/// `domain_files` says.
///
/// # Errors
///
/// As [`load_rules`].
pub fn load_rules_with(path: &Path, domain_files: DomainFiles) -> Result<Rules, ConfigError> {
    read_snapshot(path)?.compile_with(domain_files)
}

/// Reads every rules file at `path` without compiling them.
///
/// # Errors
///
/// [`ConfigError`] when a file cannot be read or is too large.
pub fn read_snapshot(path: &Path) -> Result<ConfigSnapshot, ConfigError> {
    read_snapshot_with(path, DotFiles::Skip)
}

/// Reads every rules file at `path` without compiling them, reading or
/// skipping names that start with `.` as `dot_files` says.
///
/// # Errors
///
/// [`ConfigError`] when a file cannot be read or is too large.
pub fn read_snapshot_with(path: &Path, dot_files: DotFiles) -> Result<ConfigSnapshot, ConfigError> {
    let io = |source| ConfigError::Io {
        path: path.to_owned(),
        source,
    };
    let paths = if fs::metadata(path).map_err(io)?.is_dir() {
        let mut paths = Vec::new();
        collect_files(path, dot_files, &mut paths)?;
        paths
    } else {
        vec![path.to_owned()]
    };
    let mut files = Vec::with_capacity(paths.len());
    for file in paths {
        let name = file.display().to_string();
        let io = |source| ConfigError::Io {
            path: file.clone(),
            source,
        };
        let size = fs::metadata(&file).map_err(io)?.len();
        if size > MAX_FILE_BYTES {
            return Err(ConfigError::invalid(
                &name,
                "",
                format!("file is {size} bytes; the limit is {MAX_FILE_BYTES}"),
            ));
        }
        files.push((name, fs::read_to_string(&file).map_err(io)?));
    }
    Ok(ConfigSnapshot { files })
}

impl ConfigSnapshot {
    /// Validates and compiles the files into rules.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] for the first invalid file.
    pub fn compile(&self) -> Result<Rules, ConfigError> {
        self.compile_with(DomainFiles::Refuse)
    }

    /// Validates and compiles the files into rules, a domain found in
    /// several files handled as `domain_files` says. Files are read in name
    /// order, so merged wildcards keep that order.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] for the first invalid file, a domain in two
    /// files unless merging, and a descriptor defined in two merged files
    /// (naming both).
    pub fn compile_with(&self, domain_files: DomainFiles) -> Result<Rules, ConfigError> {
        let mut domains: HashMap<String, MergedDomain<'_>> = HashMap::new();
        let mut rlqs = crate::rlqs::RlqsRules::default();
        for (name, text) in &self.files {
            let (domain, doc) = parse_document(name, text)?;
            rlqs.add(name, &domain, doc.rlqs.as_deref().unwrap_or_default())?;
            let descriptors = doc.descriptors.as_deref().unwrap_or_default();
            let compiler = Compiler {
                file: name,
                source: Arc::from(name.as_str()),
            };
            let Some(merged) = domains.get_mut(&domain) else {
                let mut merged = MergedDomain {
                    root: Level::default(),
                    first_file: name,
                    top_level: HashMap::new(),
                };
                merged.add(&compiler, &domain, descriptors)?;
                domains.insert(domain, merged);
                continue;
            };
            if domain_files == DomainFiles::Refuse {
                return Err(ConfigError::invalid(
                    name,
                    "domain",
                    format!(
                        "duplicate domain '{domain}' in config file (already defined in {}; --merge-domain-config merges them)",
                        merged.first_file
                    ),
                ));
            }
            merged.add(&compiler, &domain, descriptors)?;
        }
        Ok(Rules::new(
            domains
                .into_iter()
                .map(|(domain, merged)| (domain, DescriptorTree::new(merged.root)))
                .collect(),
        )
        .with_rlqs(rlqs))
    }
}

/// What to do with a domain found in more than one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DomainFiles {
    /// Refuse the config (envoyproxy/ratelimit's default).
    #[default]
    Refuse,
    /// Merge the files' descriptors into one tree (upstream's
    /// `MERGE_DOMAIN_CONFIG`); a descriptor defined in two of them is still
    /// refused.
    Merge,
}

/// One domain's tree while its files are compiled.
struct MergedDomain<'a> {
    root: Level,
    first_file: &'a str,
    /// Which file defined each top-level descriptor (key, value or pattern).
    top_level: HashMap<(String, String), &'a str>,
}

impl<'a> MergedDomain<'a> {
    /// Adds one file's top-level descriptors.
    fn add(
        &mut self,
        compiler: &Compiler<'a>,
        domain: &str,
        descriptors: &[DescriptorDoc],
    ) -> Result<(), ConfigError> {
        for (i, doc) in descriptors.iter().enumerate() {
            let key = doc.key.as_ref().map(|k| k.0.clone()).unwrap_or_default();
            let value = doc.value.as_ref().map(|v| v.0.clone()).unwrap_or_default();
            if key.is_empty() {
                continue; // refused with its own message below
            }
            if let Some(other) = self.top_level.get(&(key.clone(), value.clone()))
                && *other != compiler.file
            {
                let segment = if value.is_empty() {
                    key
                } else {
                    format!("{key}_{value}")
                };
                return Err(compiler.error(
                    &format!("descriptors[{i}]"),
                    format!(
                        "duplicate descriptor composite key '{domain}.{segment}' (already defined in {other})"
                    ),
                ));
            }
            self.top_level.insert((key, value), compiler.file);
        }
        compiler.level_into(
            &mut self.root,
            descriptors,
            "descriptors",
            domain,
            &Above::default(),
        )
    }
}

/// Parses and compiles one rules file; `name` is used in errors and as the
/// rules' source.
///
/// # Errors
///
/// [`ConfigError::Invalid`] naming the path inside the file and the reason.
pub fn parse_rules_file(name: &str, text: &str) -> Result<(String, DescriptorTree), ConfigError> {
    let (domain, doc) = parse_document(name, text)?;
    let compiler = Compiler {
        file: name,
        source: Arc::from(name),
    };
    let root = compiler.level(
        doc.descriptors.as_deref().unwrap_or_default(),
        "descriptors",
        &domain,
        &Above::default(),
    )?;
    Ok((domain, DescriptorTree::new(root)))
}

/// Parses one file into its domain and document.
fn parse_document(name: &str, text: &str) -> Result<(String, FileDoc), ConfigError> {
    let doc: FileDoc = if text.trim().is_empty() {
        FileDoc {
            domain: None,
            descriptors: None,
            rlqs: None,
        }
    } else {
        // The YAML error text already carries the path inside the file and
        // the line and column.
        serde_yaml_ng::from_str(text).map_err(|e| ConfigError::invalid(name, "", e.to_string()))?
    };
    let domain = doc
        .domain
        .as_ref()
        .map(|d| d.0.clone())
        .filter(|d| !d.is_empty())
        .ok_or_else(|| {
            ConfigError::invalid(name, "domain", "config file cannot have empty domain")
        })?;
    Ok((domain, doc))
}

/// What a level inherits from the levels above it.
#[derive(Debug, Clone, Default)]
struct Above {
    /// Per level, the share_threshold pattern, if any.
    shared: Vec<Option<String>>,
    /// Per level, how metrics name it.
    stats: Vec<StatsLevel>,
}

/// Compiles the descriptors of one file.
struct Compiler<'a> {
    file: &'a str,
    source: Arc<str>,
}

impl Compiler<'_> {
    /// Compiles one level. `at` is the YAML path of the list, `stats_path` the
    /// dotted rule path so far, `above` the levels above (their
    /// share_threshold patterns and how they name metrics).
    fn level(
        &self,
        docs: &[DescriptorDoc],
        at: &str,
        stats_path: &str,
        above: &Above,
    ) -> Result<Level, ConfigError> {
        let mut level = Level::default();
        self.level_into(&mut level, docs, at, stats_path, above)?;
        Ok(level)
    }

    /// Compiles the descriptors `docs` into `level`, which may already hold
    /// others (a domain merged from several files).
    fn level_into(
        &self,
        level: &mut Level,
        docs: &[DescriptorDoc],
        at: &str,
        stats_path: &str,
        above: &Above,
    ) -> Result<(), ConfigError> {
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

            let share = doc.share_threshold.unwrap_or(false);
            if share && !value.is_some_and(|v| v.contains('*')) {
                return Err(self.error(
                    &format!("{here}.share_threshold"),
                    format!("share_threshold can only be used with wildcard values (containing '*'), but found key '{segment}'"),
                ));
            }
            let mut here_and_above = above.clone();
            here_and_above
                .shared
                .push(share.then(|| value.unwrap_or_default().to_owned()));
            here_and_above.stats.push(StatsLevel {
                key: key.to_owned(),
                segment,
                matched: match value {
                    None => LevelMatch::KeyOnly,
                    Some(v) if v.contains('*') => LevelMatch::Wildcard,
                    Some(_) => LevelMatch::Exact,
                },
                value_to_metric: doc.value_to_metric.unwrap_or(false),
                shared: share,
            });

            // Checked wherever it is, though only a rule's is ever sent.
            let metadata = doc
                .metadata
                .as_ref()
                .map(|yaml| {
                    metadata::from_yaml(yaml)
                        .map_err(|reason| self.error(&format!("{here}.metadata"), reason))
                })
                .transpose()?
                .flatten()
                .map(Arc::new);
            let concurrency = super::concurrency::limit(doc, &here)
                .map_err(|(field, reason)| self.error(&field, reason))?;
            let rule = match concurrency {
                Some(limit) => Some(Rule {
                    name: None,
                    limit: RuleLimit::Concurrency(limit),
                    extra_limits: Vec::new(),
                    replaces: Vec::new(),
                    shadow_mode: false,
                    detailed_metric: doc.detailed_metric.unwrap_or(false),
                    quota_mode: false,
                    metadata,
                    stats: StatsPath::Levels(here_and_above.stats.clone()),
                    path: path.clone(),
                    source: self.source.clone(),
                    shared_values: here_and_above.shared.clone(),
                    failure_policy: None,
                }),
                None => match (&doc.rate_limit, &doc.rate_limits) {
                    (Some(_), Some(_)) => {
                        return Err(self.error(
                            &format!("{here}.rate_limits"),
                            "a descriptor has either rate_limit or rate_limits, not both",
                        ));
                    }
                    (Some(rl), None) => Some(self.rule(
                        rl,
                        doc,
                        &format!("{here}.rate_limit"),
                        &path,
                        &here_and_above,
                        metadata,
                    )?),
                    (None, Some(list)) => Some(self.multi_limit_rule(
                        list,
                        doc,
                        &format!("{here}.rate_limits"),
                        &path,
                        &here_and_above,
                        metadata,
                    )?),
                    (None, None) => None,
                },
            }
            .map(Arc::new);
            let children = self.level(
                doc.descriptors.as_deref().unwrap_or_default(),
                &format!("{here}.descriptors"),
                &path,
                &here_and_above,
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
        Ok(())
    }

    /// Compiles a `rate_limits` list at `at`: the first entry is the rule
    /// (with its name, replaces and failure policy, which cover every
    /// limit), the others add only a limit each.
    fn multi_limit_rule(
        &self,
        list: &[RateLimitDoc],
        descriptor: &DescriptorDoc,
        at: &str,
        path: &str,
        levels: &Above,
        metadata: Option<Arc<Metadata>>,
    ) -> Result<Rule, ConfigError> {
        let Some((first, rest)) = list.split_first() else {
            return Err(self.error(
                at,
                "rate_limits needs at least one limit; remove it for a descriptor without a limit",
            ));
        };
        for (i, doc) in list.iter().enumerate() {
            if doc.unlimited.is_some() {
                return Err(self.error(
                    &format!("{at}[{i}].unlimited"),
                    "a rate_limits entry cannot be unlimited; use rate_limit: {unlimited: true}",
                ));
            }
        }
        let mut rule = self.rule(
            first,
            descriptor,
            &format!("{at}[0]"),
            path,
            levels,
            metadata,
        )?;
        let mut seen: Vec<Limit> = rule.limited().copied().into_iter().collect();
        for (i, doc) in rest.iter().enumerate() {
            let here = format!("{at}[{}]", i + 1);
            let whole_rule = [
                ("name", doc.name.is_some()),
                ("replaces", doc.replaces.is_some()),
                ("failure_policy", doc.failure_policy.is_some()),
            ];
            if let Some((field, _)) = whole_rule.into_iter().find(|(_, given)| *given) {
                return Err(self.error(
                    &format!("{here}.{field}"),
                    format!("{field} applies to every limit of the descriptor; write it on rate_limits[0] only"),
                ));
            }
            let unit_text = doc.unit.as_ref().map(|u| u.as_str()).unwrap_or_default();
            let unit = Unit::parse(unit_text).ok_or_else(|| {
                self.error(
                    &format!("{here}.unit"),
                    format!("invalid rate limit unit '{unit_text}'"),
                )
            })?;
            let limit = self.limit(doc, &here, unit)?;
            // Same algorithm and window would share one counter.
            if let Some(j) = seen.iter().position(|other| {
                other.algorithm == limit.algorithm && other.window_ms() == limit.window_ms()
            }) {
                return Err(self.error(
                    &here,
                    format!(
                        "counts the same window as rate_limits[{j}] ({} over {} s); keep only the stricter one",
                        limit.algorithm.as_str(),
                        limit.window_ms() / 1_000
                    ),
                ));
            }
            seen.push(limit);
            rule.extra_limits.push(limit);
        }
        Ok(rule)
    }

    fn rule(
        &self,
        doc: &RateLimitDoc,
        descriptor: &DescriptorDoc,
        at: &str,
        path: &str,
        levels: &Above,
        metadata: Option<Arc<Metadata>>,
    ) -> Result<Rule, ConfigError> {
        let unit_text = doc.unit.as_ref().map(|u| u.as_str()).unwrap_or_default();
        let unit = Unit::parse(unit_text);
        let limit = if doc.unlimited.unwrap_or(false) {
            let extras = [
                ("unit", unit.is_some()),
                ("algorithm", doc.algorithm.is_some()),
                ("unit_multiplier", doc.unit_multiplier.is_some()),
                ("burst", doc.burst.is_some()),
                ("failure_policy", doc.failure_policy.is_some()),
            ];
            if let Some((field, _)) = extras.into_iter().find(|(_, given)| *given) {
                return Err(self.error(
                    &format!("{at}.{field}"),
                    format!("should not specify rate limit {field} when unlimited"),
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
            RuleLimit::Limited(self.limit(doc, at, unit)?)
        };
        let failure_policy = match &doc.failure_policy {
            None => None,
            Some(name) => Some(FailurePolicy::parse(name.as_str()).ok_or_else(|| {
                self.error(
                    &format!("{at}.failure_policy"),
                    format!(
                        "unknown failure policy '{}'; expected error, allow, deny or local",
                        name.as_str()
                    ),
                )
            })?),
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
            extra_limits: Vec::new(),
            replaces,
            shadow_mode: descriptor.shadow_mode.unwrap_or(false),
            detailed_metric: descriptor.detailed_metric.unwrap_or(false),
            quota_mode: descriptor.quota_mode.unwrap_or(false),
            metadata,
            stats: StatsPath::Levels(levels.stats.clone()),
            path: path.to_owned(),
            source: self.source.clone(),
            shared_values: levels.shared.clone(),
            failure_policy,
        })
    }

    /// Validates the algorithm, window and burst of a finite limit.
    fn limit(&self, doc: &RateLimitDoc, at: &str, unit: Unit) -> Result<Limit, ConfigError> {
        let algorithm = match &doc.algorithm {
            None => AlgorithmKind::FixedWindow,
            Some(name) => AlgorithmKind::parse(name.as_str()).ok_or_else(|| {
                self.error(
                    &format!("{at}.algorithm"),
                    format!(
                        "unknown algorithm '{}'; expected fixed_window, sliding_window or token_bucket",
                        name.as_str()
                    ),
                )
            })?,
        };
        let requests_per_unit = u64::from(doc.requests_per_unit.unwrap_or(0));
        let unit_multiplier = u64::from(doc.unit_multiplier.unwrap_or(1));
        if unit_multiplier == 0 {
            return Err(self.error(&format!("{at}.unit_multiplier"), "must be at least 1"));
        }
        if unit
            .seconds()
            .checked_mul(unit_multiplier)
            .is_none_or(|seconds| seconds > MAX_WINDOW_SECONDS)
        {
            return Err(self.error(
                &format!("{at}.unit_multiplier"),
                format!(
                    "a window of {unit_multiplier} × {unit} is longer than the maximum of 10 years"
                ),
            ));
        }
        let burst = doc.burst.map(u64::from);
        match (algorithm, burst) {
            (AlgorithmKind::TokenBucket, Some(0)) => {
                return Err(self.error(&format!("{at}.burst"), "must be at least 1"));
            }
            (AlgorithmKind::TokenBucket, _) if requests_per_unit == 0 => {
                return Err(self.error(
                    &format!("{at}.requests_per_unit"),
                    "a token bucket must refill at least 1 token per window",
                ));
            }
            (AlgorithmKind::FixedWindow | AlgorithmKind::SlidingWindow, Some(_)) => {
                return Err(self.error(
                    &format!("{at}.burst"),
                    format!(
                        "burst is only valid with algorithm token_bucket, not {}",
                        algorithm.as_str()
                    ),
                ));
            }
            _ => {}
        }
        let limit = Limit {
            requests_per_unit,
            unit,
            unit_multiplier,
            algorithm,
            burst,
        };
        // Sliding window and token bucket compute in hits × milliseconds;
        // keep that exact in Redis's Lua (doubles). Checked: a product past
        // u64 must be refused, not wrapped into something small.
        let (field, capacity) = match algorithm {
            AlgorithmKind::FixedWindow => return Ok(limit),
            AlgorithmKind::SlidingWindow => ("requests_per_unit", requests_per_unit),
            AlgorithmKind::TokenBucket if burst.is_some() => ("burst", limit.quota().burst),
            AlgorithmKind::TokenBucket => ("requests_per_unit", requests_per_unit),
        };
        match capacity.checked_mul(limit.window_ms()) {
            Some(scaled) if scaled <= MAX_SCALED => Ok(limit),
            scaled => Err(self.error(
                &format!("{at}.{field}"),
                format!(
                    "{field} × window in milliseconds is {}, over the {MAX_SCALED} that {} can count exactly; use a smaller {field} or a shorter window",
                    scaled.map_or_else(
                        || format!("{}", u128::from(capacity) * u128::from(limit.window_ms())),
                        |s| s.to_string()
                    ),
                    algorithm.as_str()
                ),
            )),
        }
    }

    fn error(&self, path: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::invalid(self.file, path, reason)
    }
}

fn collect_files(
    dir: &Path,
    dot_files: DotFiles,
    out: &mut Vec<PathBuf>,
) -> Result<(), ConfigError> {
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
        if hidden && dot_files == DotFiles::Skip {
            continue;
        }
        let meta = fs::metadata(&path).map_err(|source| ConfigError::Io {
            path: path.clone(),
            source,
        })?;
        if meta.is_dir() {
            collect_files(&path, dot_files, out)?;
        } else if meta.is_file() {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::matcher::EntryRef;
    use crate::rules::{LevelMatch, StatsLevel, StatsPath};

    fn error(text: &str) -> String {
        match parse_rules_file("rules.yaml", text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn an_upstream_file_loads_unchanged() {
        let text = r#"
domain: upstream
descriptors:
  - key: remote_address
    value: 443
    detailed_metric: true
    value_to_metric: true
    metadata: {team: edge, tags: [a, b]}
    rate_limit:
      unit: Minute
      requests_per_unit: 20
      name: by-ip
  - key: path
    value: "/files/*"
    share_threshold: true
    rate_limit: {unit: week, requests_per_unit: 1}
  - key: free
    rate_limit: {unlimited: true, replaces: [{name: by-ip}]}
  - key: nothing
"#;
        let (domain, tree) = parse_rules_file("up.yaml", text).unwrap();
        assert_eq!(domain, "upstream");
        let rule = tree
            .find(&[EntryRef {
                key: "remote_address",
                value: "443",
            }])
            .unwrap();
        assert_eq!(rule.name.as_deref(), Some("by-ip"));
        assert_eq!(rule.limited().unwrap().requests_per_unit, 20);
        assert_eq!(rule.limited().unwrap().unit, Unit::Minute);
        assert_eq!(rule.path, "upstream.remote_address_443");
        assert!(rule.detailed_metric);
        let shared = tree
            .find(&[EntryRef {
                key: "path",
                value: "/files/a",
            }])
            .unwrap();
        assert_eq!(shared.shared_values, vec![Some("/files/*".to_owned())]);
        let free = tree
            .find(&[EntryRef {
                key: "free",
                value: "x",
            }])
            .unwrap();
        assert_eq!(free.limit, RuleLimit::Unlimited);
        assert_eq!(free.replaces, vec!["by-ip".to_owned()]);
        assert!(
            tree.find(&[EntryRef {
                key: "nothing",
                value: "x"
            }])
            .is_none()
        );
        // Metadata is kept as loaded, as JSON.
        assert_eq!(
            serde_json::Value::Object(rule.metadata.as_deref().unwrap().clone()),
            serde_json::json!({"team": "edge", "tags": ["a", "b"]})
        );
        assert!(!rule.quota_mode);
    }

    #[test]
    fn quota_mode_and_stats_levels_are_compiled() {
        let text = r#"
domain: q
descriptors:
  - key: route
    value_to_metric: true
    descriptors:
      - key: model
        value: "gpt-*"
        quota_mode: true
        metadata: {backend: b1}
        rate_limit: {unit: minute, requests_per_unit: 5}
  - key: plain
    value: x
    metadata: ~
    rate_limit: {unit: minute, requests_per_unit: 5}
"#;
        let (_, tree) = parse_rules_file("q.yaml", text).unwrap();
        let rule = tree
            .find(&[
                EntryRef {
                    key: "route",
                    value: "r1",
                },
                EntryRef {
                    key: "model",
                    value: "gpt-4",
                },
            ])
            .unwrap();
        assert!(rule.quota_mode);
        assert_eq!(rule.metadata.as_deref().unwrap()["backend"], "b1");
        let StatsPath::Levels(levels) = &rule.stats else {
            panic!("{:?}", rule.stats);
        };
        let summary: Vec<_> = levels
            .iter()
            .map(|l| (l.segment.as_str(), l.matched, l.value_to_metric, l.shared))
            .collect();
        assert_eq!(
            summary,
            [
                ("route", LevelMatch::KeyOnly, true, false),
                ("model_gpt-*", LevelMatch::Wildcard, false, false),
            ]
        );
        let plain = tree
            .find(&[EntryRef {
                key: "plain",
                value: "x",
            }])
            .unwrap();
        assert_eq!(plain.metadata, None);
        assert_eq!(
            plain.stats,
            StatsPath::Levels(vec![StatsLevel {
                key: "plain".into(),
                segment: "plain_x".into(),
                matched: LevelMatch::Exact,
                value_to_metric: false,
                shared: false,
            }])
        );
    }

    #[test]
    fn algorithm_extensions_load() {
        let text = r#"
domain: ext
descriptors:
  - key: a
    rate_limit: {unit: minute, requests_per_unit: 10, unit_multiplier: 5}
  - key: b
    rate_limit: {unit: second, requests_per_unit: 3, algorithm: sliding_window}
  - key: c
    rate_limit: {unit: hour, requests_per_unit: 100, algorithm: token_bucket, burst: 20}
  - key: d
    rate_limit: {unit: hour, requests_per_unit: 100, algorithm: token_bucket}
"#;
        let (_, tree) = parse_rules_file("ext.yaml", text).unwrap();
        let limit = |key| {
            *tree
                .find(&[EntryRef { key, value: "x" }])
                .unwrap()
                .limited()
                .unwrap()
        };
        let a = limit("a");
        assert_eq!(
            (a.algorithm, a.window_ms(), a.quota().burst),
            (AlgorithmKind::FixedWindow, 300_000, 10)
        );
        assert_eq!(limit("b").algorithm, AlgorithmKind::SlidingWindow);
        let c = limit("c");
        assert_eq!(
            (c.algorithm, c.quota().limit, c.quota().burst),
            (AlgorithmKind::TokenBucket, 100, 20)
        );
        assert_eq!(limit("d").quota().burst, 100);
    }

    #[test]
    fn failure_policies_load_per_rule() {
        let text = r#"
domain: fp
descriptors:
  - {key: a, rate_limit: {unit: minute, requests_per_unit: 1, failure_policy: allow}}
  - {key: b, rate_limit: {unit: minute, requests_per_unit: 1, failure_policy: deny}}
  - {key: c, rate_limit: {unit: minute, requests_per_unit: 1, failure_policy: local}}
  - {key: d, rate_limit: {unit: minute, requests_per_unit: 1, failure_policy: error}}
  - {key: e, rate_limit: {unit: minute, requests_per_unit: 1}}
"#;
        let (_, tree) = parse_rules_file("fp.yaml", text).unwrap();
        let policy = |key| {
            tree.find(&[EntryRef { key, value: "x" }])
                .unwrap()
                .failure_policy
        };
        assert_eq!(policy("a"), Some(FailurePolicy::Allow));
        assert_eq!(policy("b"), Some(FailurePolicy::Deny));
        assert_eq!(policy("c"), Some(FailurePolicy::Local));
        assert_eq!(policy("d"), Some(FailurePolicy::Error));
        assert_eq!(policy("e"), None);
    }

    #[test]
    fn missing_requests_per_unit_means_zero_like_upstream() {
        let (_, tree) = parse_rules_file(
            "z.yaml",
            "domain: d\ndescriptors: [{key: k, rate_limit: {unit: second}}]",
        )
        .unwrap();
        let rule = tree
            .find(&[EntryRef {
                key: "k",
                value: "v",
            }])
            .unwrap();
        assert_eq!(rule.limited().unwrap().requests_per_unit, 0);
    }

    #[test]
    fn domain_only_and_empty_descriptor_lists_are_valid() {
        for text in [
            "domain: d",
            "domain: d\ndescriptors: []",
            "domain: d\ndescriptors:",
        ] {
            parse_rules_file("d.yaml", text).unwrap_or_else(|e| panic!("{text}: {e}"));
        }
    }

    #[test]
    fn invalid_files_name_the_file_the_path_and_the_reason() {
        let cases: &[(&str, &str)] = &[
            (
                "",
                "rules.yaml: domain: config file cannot have empty domain",
            ),
            (
                "descriptors: []",
                "rules.yaml: domain: config file cannot have empty domain",
            ),
            (
                "domain: ''",
                "rules.yaml: domain: config file cannot have empty domain",
            ),
            (
                "domain: [a]",
                "rules.yaml: domain: invalid type: sequence, expected a string",
            ),
            (
                "domain: d\nunknown: 1",
                "rules.yaml: unknown field `unknown`",
            ),
            (
                "domain: d\ndescriptors:\n  - key: k\n    ratelimit: {unit: second}",
                "rules.yaml: descriptors[0]: unknown field `ratelimit`",
            ),
            (
                "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requestsperunit: 1}",
                "rules.yaml: descriptors[0].rate_limit: unknown field `requestsperunit`",
            ),
            (
                "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: -1}",
                "rules.yaml: descriptors[0].rate_limit.requests_per_unit: invalid type: integer `-1`, expected u32",
            ),
            (
                "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 4294967296}",
                "rules.yaml: descriptors[0].rate_limit.requests_per_unit: invalid value: integer `4294967296`, expected u32",
            ),
            (
                "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: abc}",
                "rules.yaml: descriptors[0].rate_limit.requests_per_unit: invalid type: string \"abc\", expected u32",
            ),
            (
                "domain: d\ndescriptors:\n  - key: k\n    value: 1.5",
                "rules.yaml: descriptors[0].value: invalid type: floating point `1.5`, expected a string",
            ),
            (
                "domain: d\ndescriptors: [1]",
                "rules.yaml: descriptors[0]: invalid type: integer `1`, expected struct DescriptorDoc",
            ),
            (
                "domain: d\ndescriptors:\n  - value: v",
                "rules.yaml: descriptors[0].key: descriptor has empty key",
            ),
            (
                "domain: d\ndescriptors:\n  - key: ''",
                "rules.yaml: descriptors[0].key: descriptor has empty key",
            ),
            (
                "domain: d\ndescriptors:\n  - {key: k, value: v}\n  - {key: k, value: v}",
                "rules.yaml: descriptors[1]: duplicate descriptor composite key 'd.k_v'",
            ),
            (
                "domain: d\ndescriptors:\n  - {key: k}\n  - {key: k, value: ''}",
                "rules.yaml: descriptors[1]: duplicate descriptor composite key 'd.k'",
            ),
            (
                "domain: d\ndescriptors:\n  - {key: k, rate_limit: {unit: minutes, requests_per_unit: 1}}",
                "rules.yaml: descriptors[0].rate_limit.unit: invalid rate limit unit 'minutes'",
            ),
            (
                "domain: d\ndescriptors:\n  - {key: k, rate_limit: {requests_per_unit: 1}}",
                "rules.yaml: descriptors[0].rate_limit.unit: invalid rate limit unit ''",
            ),
            (
                "domain: d\ndescriptors:\n  - {key: k, rate_limit: {unit: unknown, requests_per_unit: 1}}",
                "rules.yaml: descriptors[0].rate_limit.unit: invalid rate limit unit 'unknown'",
            ),
            (
                "domain: d\ndescriptors:\n  - {key: k, rate_limit: {unlimited: true, unit: second}}",
                "rules.yaml: descriptors[0].rate_limit.unit: should not specify rate limit unit when unlimited",
            ),
            (
                "domain: d\ndescriptors:\n  - {key: k, rate_limit: {unit: second, replaces: [{name: ''}]}}",
                "rules.yaml: descriptors[0].rate_limit.replaces[0].name: should not have an empty replaces entry",
            ),
            (
                "domain: d\ndescriptors:\n  - {key: k, rate_limit: {unit: second, name: me, replaces: [{name: me}]}}",
                "rules.yaml: descriptors[0].rate_limit.replaces[0].name: replaces should not contain name of same descriptor",
            ),
            (
                "domain: d\ndescriptors:\n  - {key: k, value: v, share_threshold: true}",
                "rules.yaml: descriptors[0].share_threshold: share_threshold can only be used with wildcard values (containing '*'), but found key 'k_v'",
            ),
            (
                "domain: d\ndescriptors:\n  - {key: k, metadata: [a], rate_limit: {unit: second}}",
                "rules.yaml: descriptors[0].metadata: error parsing metadata: must be a map, not a list",
            ),
            (
                "domain: d\ndescriptors:\n  - {key: k, metadata: {1: a}, rate_limit: {unit: second}}",
                "rules.yaml: descriptors[0].metadata: error parsing metadata: keys must be strings, not a number",
            ),
            (
                "domain: d\ndescriptors:\n  - {key: k, quota_mode: yes please, rate_limit: {unit: second}}",
                "rules.yaml: descriptors[0].quota_mode: invalid type: string \"yes please\", expected a boolean",
            ),
            (
                "domain: d\ndescriptors:\n  - key: a\n  - key: b\n    descriptors:\n      - {key: c, rate_limit: {unit: fortnight}}",
                "rules.yaml: descriptors[1].descriptors[0].rate_limit.unit: invalid rate limit unit 'fortnight'",
            ),
            (
                "domain: d\ndescriptors:\n  - {key: k, rate_limit: {unit: second, algorithm: leaky}}",
                "rules.yaml: descriptors[0].rate_limit.algorithm: unknown algorithm 'leaky'; expected fixed_window, sliding_window or token_bucket",
            ),
            (
                "domain: d\ndescriptors:\n  - {key: k, rate_limit: {unit: second, unit_multiplier: 0}}",
                "rules.yaml: descriptors[0].rate_limit.unit_multiplier: must be at least 1",
            ),
            (
                "domain: d\ndescriptors:\n  - {key: k, rate_limit: {unit: year, unit_multiplier: 11}}",
                "rules.yaml: descriptors[0].rate_limit.unit_multiplier: a window of 11 × year is longer than the maximum of 10 years",
            ),
            (
                "domain: d\ndescriptors:\n  - {key: k, rate_limit: {unit: second, unit_multiplier: -5}}",
                "rules.yaml: descriptors[0].rate_limit.unit_multiplier: invalid type: integer `-5`, expected u32",
            ),
            (
                "domain: d\ndescriptors:\n  - {key: k, rate_limit: {unit: second, requests_per_unit: 5, burst: 10}}",
                "rules.yaml: descriptors[0].rate_limit.burst: burst is only valid with algorithm token_bucket, not fixed_window",
            ),
            (
                "domain: d\ndescriptors:\n  - {key: k, rate_limit: {unit: second, algorithm: sliding_window, burst: 10}}",
                "rules.yaml: descriptors[0].rate_limit.burst: burst is only valid with algorithm token_bucket, not sliding_window",
            ),
            (
                "domain: d\ndescriptors:\n  - {key: k, rate_limit: {unit: second, algorithm: token_bucket, requests_per_unit: 1, burst: 0}}",
                "rules.yaml: descriptors[0].rate_limit.burst: must be at least 1",
            ),
            (
                "domain: d\ndescriptors:\n  - {key: k, rate_limit: {unit: second, algorithm: token_bucket}}",
                "rules.yaml: descriptors[0].rate_limit.requests_per_unit: a token bucket must refill at least 1 token per window",
            ),
            (
                "domain: d\ndescriptors:\n  - {key: k, rate_limit: {unit: hour, algorithm: sliding_window, requests_per_unit: 4000000000}}",
                "rules.yaml: descriptors[0].rate_limit.requests_per_unit: requests_per_unit × window in milliseconds is 14400000000000000, over the 4503599627370496 that sliding_window can count exactly",
            ),
            (
                "domain: d\ndescriptors:\n  - {key: k, rate_limit: {unit: day, algorithm: token_bucket, requests_per_unit: 1, burst: 200000000}}",
                "rules.yaml: descriptors[0].rate_limit.burst: burst × window in milliseconds is 17280000000000000, over the 4503599627370496 that token_bucket can count exactly",
            ),
            (
                // The product wraps u64 to a small number: refused, not wrapped.
                "domain: d\ndescriptors:\n  - {key: k, rate_limit: {unit: year, algorithm: sliding_window, requests_per_unit: 584942418}}",
                "rules.yaml: descriptors[0].rate_limit.requests_per_unit: requests_per_unit × window in milliseconds is 18446744094048000000, over the 4503599627370496 that sliding_window can count exactly",
            ),
            (
                "domain: d\ndescriptors:\n  - {key: k, rate_limit: {unit: year, unit_multiplier: 4294967295, algorithm: token_bucket, requests_per_unit: 4294967295, burst: 4294967295}}",
                "rules.yaml: descriptors[0].rate_limit.unit_multiplier: a window of 4294967295 × year is longer than the maximum of 10 years",
            ),
            (
                "domain: d\ndescriptors:\n  - {key: k, rate_limit: {unit: year, algorithm: token_bucket, requests_per_unit: 1, burst: 4294967295}}",
                "rules.yaml: descriptors[0].rate_limit.burst: burst × window in milliseconds is 135446088615120000000, over",
            ),
            (
                "domain: d\ndescriptors:\n  - {key: k, rate_limit: {unit: second, failure_policy: open}}",
                "rules.yaml: descriptors[0].rate_limit.failure_policy: unknown failure policy 'open'; expected error, allow, deny or local",
            ),
            (
                "domain: d\ndescriptors:\n  - {key: k, rate_limit: {unlimited: true, failure_policy: allow}}",
                "rules.yaml: descriptors[0].rate_limit.failure_policy: should not specify rate limit failure_policy when unlimited",
            ),
            (
                "domain: d\ndescriptors:\n  - {key: k, rate_limit: {unlimited: true, algorithm: token_bucket}}",
                "rules.yaml: descriptors[0].rate_limit.algorithm: should not specify rate limit algorithm when unlimited",
            ),
            (
                "domain: d\ndescriptors:\n  - {key: k, rate_limit: {unlimited: true, unit_multiplier: 2}}",
                "rules.yaml: descriptors[0].rate_limit.unit_multiplier: should not specify rate limit unit_multiplier when unlimited",
            ),
            (
                "domain: d\n  bad: indentation",
                "rules.yaml: mapping values are not allowed in this context at line 2 column 6",
            ),
            (
                "domain: d\n---\ndomain: e",
                "rules.yaml: deserializing from YAML containing more than one document is not supported",
            ),
        ];
        for (text, expected) in cases {
            let got = error(text);
            assert!(
                got.starts_with(expected),
                "for:\n{text}\nwant: {expected}\ngot:  {got}"
            );
        }
    }

    #[test]
    fn hostile_yaml_is_refused_not_expanded() {
        // A "billion laughs" of aliases must be refused quickly.
        let mut bomb = String::from(
            "domain: d\ndescriptors:\n  - key: k\n    metadata:\n      a: &a [x, x, x, x, x, x, x, x, x, x]\n",
        );
        for level in 1..10u8 {
            let prev = (b'a' + level - 1) as char;
            let this = (b'a' + level) as char;
            let refs = vec![format!("*{prev}"); 10].join(", ");
            bomb.push_str(&format!("      {this}: &{this} [{refs}]\n"));
        }
        let refused = error(&bomb);
        assert!(refused.contains("repetition limit exceeded"), "{refused}");
        // Deep nesting hits the parser's recursion limit.
        let deep = format!(
            "domain: d\ndescriptors:\n  - key: k\n    metadata: {}{}",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        assert!(
            error(&deep).contains("recursion limit exceeded"),
            "{}",
            error(&deep)
        );
    }

    mod directories {
        use std::fs;

        use super::*;

        fn write(dir: &Path, name: &str, text: &str) {
            let path = dir.join(name);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        }

        #[test]
        fn loads_every_visible_file_recursively() {
            let dir = tempfile::tempdir().unwrap();
            write(dir.path(), "a.yaml", "domain: a");
            write(dir.path(), "nested/b.yml", "domain: b");
            write(dir.path(), "c.conf", "domain: c");
            write(dir.path(), ".hidden.yaml", "not: [valid");
            write(dir.path(), ".git/config", "nonsense: [");
            let rules = load_rules(dir.path()).unwrap();
            let domains: Vec<&str> = rules.domains().map(|(d, _)| d).collect();
            assert_eq!(domains, ["a", "b", "c"]);
        }

        #[test]
        fn kubernetes_configmap_layout_reads_each_domain_once() {
            let dir = tempfile::tempdir().unwrap();
            write(
                dir.path(),
                "..2026_11_29_06_00_00.123/rules.yaml",
                "domain: cm",
            );
            std::os::unix::fs::symlink("..2026_11_29_06_00_00.123", dir.path().join("..data"))
                .unwrap();
            std::os::unix::fs::symlink("..data/rules.yaml", dir.path().join("rules.yaml")).unwrap();
            let rules = load_rules(dir.path()).unwrap();
            assert_eq!(rules.domains().count(), 1);
            assert!(rules.domain("cm").is_some());
        }

        #[test]
        fn a_domain_in_two_files_is_refused_naming_both() {
            let dir = tempfile::tempdir().unwrap();
            write(dir.path(), "one.yaml", "domain: same");
            write(dir.path(), "two.yaml", "domain: same");
            let error = load_rules(dir.path()).unwrap_err().to_string();
            assert!(
                error.contains("two.yaml: domain: duplicate domain 'same'"),
                "{error}"
            );
            assert!(error.contains("one.yaml"), "{error}");
        }

        #[test]
        fn merged_domains_join_their_files_trees() {
            let dir = tempfile::tempdir().unwrap();
            write(
                dir.path(),
                "a.yaml",
                "domain: same\ndescriptors: [{key: k, value: a, rate_limit: {unit: second, requests_per_unit: 1}}, {key: w, value: 'x*', rate_limit: {unit: second, requests_per_unit: 1, name: first}}]",
            );
            write(
                dir.path(),
                "b.yaml",
                "domain: same\ndescriptors: [{key: k, value: b, rate_limit: {unit: minute, requests_per_unit: 2}}, {key: w, value: '*', rate_limit: {unit: second, requests_per_unit: 1, name: second}}]",
            );
            write(dir.path(), "c.yaml", "domain: other");
            let rules = read_snapshot(dir.path())
                .unwrap()
                .compile_with(DomainFiles::Merge)
                .unwrap();
            let tree = rules.domain("same").unwrap();
            let find = |key, value| tree.find(&[EntryRef { key, value }]).cloned();
            let a = find("k", "a").unwrap();
            let b = find("k", "b").unwrap();
            assert_eq!(a.limited().unwrap().unit, Unit::Second);
            assert_eq!(b.limited().unwrap().unit, Unit::Minute);
            assert!(a.source.ends_with("a.yaml") && b.source.ends_with("b.yaml"));
            // Wildcards keep file order: a.yaml's pattern is tried first.
            assert_eq!(find("w", "xy").unwrap().name.as_deref(), Some("first"));
            assert_eq!(find("w", "y").unwrap().name.as_deref(), Some("second"));
            assert!(rules.domain("other").is_some());
            // Without merging the same files are refused.
            let error = load_rules(dir.path()).unwrap_err().to_string();
            assert!(
                error.contains(
                    "b.yaml: domain: duplicate domain 'same' in config file (already defined in"
                ) && error.contains("a.yaml"),
                "{error}"
            );
        }

        #[test]
        fn a_descriptor_in_two_merged_files_is_refused_naming_both() {
            let dir = tempfile::tempdir().unwrap();
            write(
                dir.path(),
                "one.yaml",
                "domain: same\ndescriptors: [{key: k, value: v}]",
            );
            write(
                dir.path(),
                "two.yaml",
                "domain: same\ndescriptors: [{key: other}, {key: k, value: v, rate_limit: {unit: second}}]",
            );
            let error = load_rules_with(dir.path(), DomainFiles::Merge)
                .unwrap_err()
                .to_string();
            assert!(
                error.contains(
                    "two.yaml: descriptors[1]: duplicate descriptor composite key 'same.k_v' (already defined in"
                ) && error.contains("one.yaml)"),
                "{error}"
            );
            // A duplicate inside one of the merged files names that file.
            write(
                dir.path(),
                "two.yaml",
                "domain: same\ndescriptors: [{key: z}, {key: z}]",
            );
            let error = load_rules_with(dir.path(), DomainFiles::Merge)
                .unwrap_err()
                .to_string();
            assert!(
                error.contains(
                    "two.yaml: descriptors[1]: duplicate descriptor composite key 'same.z'"
                ) && !error.contains("already defined"),
                "{error}"
            );
        }

        #[test]
        fn one_bad_file_refuses_the_whole_set() {
            let dir = tempfile::tempdir().unwrap();
            write(dir.path(), "good.yaml", "domain: good");
            write(
                dir.path(),
                "bad.yaml",
                "domain: bad\ndescriptors: [{key: k, rate_limit: {unit: parsec}}]",
            );
            let error = load_rules(dir.path()).unwrap_err().to_string();
            assert!(
                error.contains(
                    "bad.yaml: descriptors[0].rate_limit.unit: invalid rate limit unit 'parsec'"
                ),
                "{error}"
            );
        }

        #[test]
        fn missing_paths_and_huge_files_are_refused() {
            let dir = tempfile::tempdir().unwrap();
            let error = load_rules(&dir.path().join("absent.yaml"))
                .unwrap_err()
                .to_string();
            assert!(
                error.contains("absent.yaml: No such file or directory"),
                "{error}"
            );
            let huge = format!("domain: big\n# {}\n", "x".repeat(MAX_FILE_BYTES as usize));
            write(dir.path(), "big.yaml", &huge);
            let error = load_rules(dir.path()).unwrap_err().to_string();
            assert!(error.contains("big.yaml: file is"), "{error}");
        }

        #[test]
        fn dot_files_are_read_when_asked_as_upstream_reads_them() {
            let dir = tempfile::tempdir().unwrap();
            write(dir.path(), "a.yaml", "domain: a");
            write(dir.path(), ".b.yaml", "domain: b");
            write(dir.path(), ".nested/c.yaml", "domain: c");
            let domains = |dot_files| {
                let rules = read_snapshot_with(dir.path(), dot_files)
                    .unwrap()
                    .compile()
                    .unwrap();
                rules
                    .domains()
                    .map(|(d, _)| d.to_owned())
                    .collect::<Vec<_>>()
            };
            assert_eq!(domains(DotFiles::Read), ["a", "b", "c"]);
            assert_eq!(domains(DotFiles::Skip), ["a"]);
            // So a ConfigMap mount read with its dot entries has every
            // domain twice, as upstream finds it (its #367).
            let cm = tempfile::tempdir().unwrap();
            write(
                cm.path(),
                "..2026_11_29_06_00_00.123/rules.yaml",
                "domain: cm",
            );
            std::os::unix::fs::symlink("..2026_11_29_06_00_00.123", cm.path().join("..data"))
                .unwrap();
            std::os::unix::fs::symlink("..data/rules.yaml", cm.path().join("rules.yaml")).unwrap();
            let error = read_snapshot_with(cm.path(), DotFiles::Read)
                .unwrap()
                .compile()
                .unwrap_err()
                .to_string();
            assert!(error.contains("duplicate domain 'cm'"), "{error}");
        }

        #[test]
        fn an_empty_directory_is_a_valid_config_with_no_domains() {
            let dir = tempfile::tempdir().unwrap();
            assert_eq!(load_rules(dir.path()).unwrap().domains().count(), 0);
        }
    }
}
