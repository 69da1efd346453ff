//! The reference docs keep up with the code: every flag `ratekeeper serve
//! --help` lists is in docs/flags.md, and every metric name the code
//! exports (a `"ratelimit_…"` string anywhere under src/) is in
//! docs/operations.md's metrics section. A flag or metric added without
//! its line in the docs fails here.

use std::path::{Path, PathBuf};
use std::process::Command;

fn doc(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("docs")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `--flag` at the start of an option line of `serve --help`.
fn serve_flags() -> Vec<String> {
    let output = Command::new(env!("CARGO_BIN_EXE_ratekeeper"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    // Option lines start with the option ("-h, --help", "--config <CONFIG>");
    // descriptions that mention a flag do not.
    let mut flags: Vec<String> = help
        .lines()
        .map(str::trim_start)
        .filter(|line| line.starts_with('-'))
        .filter_map(|line| {
            let start = line.find("--")?;
            line[start..]
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .next()
                .map(str::to_owned)
        })
        .filter(|flag| flag.len() > 2 && flag != "--help")
        .collect();
    flags.sort();
    flags.dedup();
    flags
}

fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

/// Every `"ratelimit_…"` string literal in the crate's sources.
fn metric_names() -> Vec<String> {
    let mut files = Vec::new();
    rust_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    let mut names = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (i, _) in text.match_indices("\"ratelimit_") {
            let rest = &text[i + 1..];
            let end = rest.find('"').unwrap_or(rest.len());
            let name = &rest[..end];
            if name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                names.push(name.to_owned());
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

#[test]
fn every_serve_flag_is_in_the_flags_doc() {
    let flags = serve_flags();
    assert!(
        flags.len() > 40 && flags.contains(&"--config".to_owned()),
        "the help was not read: {flags:?}"
    );
    let doc = doc("flags.md");
    let missing: Vec<&String> = flags
        .iter()
        .filter(|flag| !doc.contains(&format!("`{flag}`")))
        .collect();
    assert!(missing.is_empty(), "docs/flags.md lacks {missing:?}");
}

#[test]
fn every_exported_metric_is_in_the_operations_doc() {
    let names = metric_names();
    assert!(
        names.contains(&"ratelimit_requests_total".to_owned()),
        "the sources were not read: {names:?}"
    );
    let doc = doc("operations.md");
    let metrics = doc
        .split("### Metrics")
        .nth(1)
        .expect("docs/operations.md has a Metrics section");
    let missing: Vec<&String> = names
        .iter()
        .filter(|name| !metrics.contains(&format!("`{name}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/operations.md's Metrics section lacks {missing:?}"
    );
}
