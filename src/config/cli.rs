//! Parsing the command line as a whole: clap's parse, errors that name the
//! environment variable a bad value came from, and refusal of flags that
//! would have no effect with the other flags given (a flag that silently
//! does nothing is a misconfiguration found in production).

use clap::parser::ValueSource;
use clap::{ArgMatches, Args as _, CommandFactory, FromArgMatches};

use super::args::{Cli, Command, KeyLayoutKind, ServeArgs, StoreKind};

/// Why the command line was refused, with the text to print.
#[derive(Debug)]
pub enum CliError {
    /// `--help` or `--version`: print and exit 0.
    Display(String),
    /// Bad flags: print and exit 64.
    Invalid(String),
}

/// Parses `argv` (the program name first); environment variables fill in
/// flags not given.
///
/// # Errors
///
/// [`CliError`] with the message to print.
pub fn parse<I, T>(argv: I) -> Result<Cli, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let argv: Vec<std::ffi::OsString> = argv.into_iter().map(Into::into).collect();
    let matches = match Cli::command().try_get_matches_from(&argv) {
        Ok(matches) => matches,
        Err(error) => return Err(explain(error, &argv)),
    };
    let cli = Cli::from_arg_matches(&matches).map_err(|e| explain(e, &argv))?;
    if let (Command::Serve(args), Some(("serve", serve))) = (&cli.command, matches.subcommand())
        && let Some(conflict) = conflicts(args, serve).into_iter().next()
    {
        return Err(CliError::Invalid(format!("error: {conflict}")));
    }
    if let (
        Command::CheckConfig {
            path,
            merge_domain_config: true,
            ..
        },
        Some(("check-config", check)),
    ) = (&cli.command, matches.subcommand())
        && path.is_file()
    {
        return Err(CliError::Invalid(format!(
            "error: {} has no effect without a directory of rules files; {} is one file",
            name(check, "merge_domain_config"),
            path.display()
        )));
    }
    Ok(cli)
}

/// What a flag needs to have an effect.
#[derive(Debug, Clone, Copy)]
enum Needs {
    /// One of these stores.
    Store(&'static [StoreKind], &'static str),
    /// Another flag (set, or true).
    Flag(bool, &'static str),
}

const REDIS: &[StoreKind] = &[StoreKind::Redis];
const SENTINEL: &[StoreKind] = &[StoreKind::RedisSentinel];
const SHARED: &[StoreKind] = &[
    StoreKind::Redis,
    StoreKind::RedisCluster,
    StoreKind::RedisSentinel,
];
const SHARED_STORES: &str = "--store redis, redis-cluster or redis-sentinel";

/// Every flag of `serve` that has no effect with the others given.
pub fn conflicts(args: &ServeArgs, matches: &ArgMatches) -> Vec<String> {
    let given = |id: &str| {
        matches!(
            matches.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    };
    // A single rules file holds one domain: nothing to merge.
    let merges = !args.config.is_file();
    let envoy_layout = args.key_layout == KeyLayoutKind::EnvoyRatelimit;
    let rules: [(&str, Needs); 25] = [
        ("redis_url", Needs::Store(REDIS, "--store redis")),
        ("redis_pool_size", Needs::Store(SHARED, SHARED_STORES)),
        (
            "redis_sentinel_nodes",
            Needs::Store(SENTINEL, "--store redis-sentinel"),
        ),
        (
            "redis_sentinel_master",
            Needs::Store(SENTINEL, "--store redis-sentinel"),
        ),
        (
            "redis_sentinel_master_username",
            Needs::Store(SENTINEL, "--store redis-sentinel"),
        ),
        (
            "redis_sentinel_master_password",
            Needs::Store(SENTINEL, "--store redis-sentinel"),
        ),
        (
            "redis_cluster_nodes",
            Needs::Store(&[StoreKind::RedisCluster], "--store redis-cluster"),
        ),
        ("redis_connect_timeout", Needs::Store(SHARED, SHARED_STORES)),
        ("redis_ca_cert", Needs::Store(SHARED, SHARED_STORES)),
        ("redis_client_cert", Needs::Store(SHARED, SHARED_STORES)),
        ("redis_client_key", Needs::Store(SHARED, SHARED_STORES)),
        ("store_timeout", Needs::Store(SHARED, SHARED_STORES)),
        ("failure_policy", Needs::Store(SHARED, SHARED_STORES)),
        ("breaker_failures", Needs::Store(SHARED, SHARED_STORES)),
        ("breaker_cooldown", Needs::Store(SHARED, SHARED_STORES)),
        ("expiration_jitter_max", Needs::Store(SHARED, SHARED_STORES)),
        ("key_layout", Needs::Store(SHARED, SHARED_STORES)),
        (
            "cache_key_prefix",
            Needs::Flag(envoy_layout, "--key-layout envoy-ratelimit"),
        ),
        (
            "memory_max_keys",
            Needs::Store(&[StoreKind::Memory], "--store memory"),
        ),
        (
            "max_reservations",
            Needs::Store(&[StoreKind::Memory], "--store memory"),
        ),
        (
            "otlp_sample_ratio",
            Needs::Flag(args.otlp_endpoint.is_some(), "--otlp-endpoint"),
        ),
        (
            "limit_header",
            Needs::Flag(args.response_headers, "--response-headers"),
        ),
        (
            "remaining_header",
            Needs::Flag(args.response_headers, "--response-headers"),
        ),
        (
            "reset_header",
            Needs::Flag(args.response_headers, "--response-headers"),
        ),
        (
            "merge_domain_config",
            Needs::Flag(merges, "--config naming a directory of rules files"),
        ),
    ];
    let store = if given("store") {
        format!("{} {}", name(matches, "store"), store_name(args.store))
    } else {
        format!("--store {} (the default)", store_name(args.store))
    };
    let mut found: Vec<String> = rules
        .into_iter()
        .filter(|(id, _)| given(id))
        .filter_map(|(id, needs)| match needs {
            Needs::Store(stores, _) if stores.contains(&args.store) => None,
            Needs::Flag(true, _) => None,
            Needs::Store(_, applies) => Some(format!(
                "{} has no effect with {store}; it applies to {applies}",
                name(matches, id)
            )),
            Needs::Flag(false, flag) => Some(format!(
                "{} has no effect without {flag}",
                name(matches, id)
            )),
        })
        .collect();
    // Upstream's keys get whole seconds of jitter, as upstream draws them.
    let jitter = args.expiration_jitter_max;
    if envoy_layout && given("expiration_jitter_max") && jitter.subsec_nanos() != 0 {
        found.push(format!(
            "{} {}: its fraction of a second has no effect with {}, whose jitter is whole seconds (upstream's EXPIRATION_JITTER_MAX_SECONDS)",
            name(matches, "expiration_jitter_max"),
            humantime::format_duration(jitter),
            layout_name(matches),
        ));
    }
    found
}

/// How the user chose the envoy-ratelimit layout.
fn layout_name(matches: &ArgMatches) -> String {
    format!("{} envoy-ratelimit", name(matches, "key_layout"))
}

/// How the user named the flag `id`: `--flag`, or the variable that set it.
fn name(matches: &ArgMatches, id: &str) -> String {
    let command = ServeArgs::augment_args(clap::Command::new("serve"));
    let Some(arg) = command.get_arguments().find(|a| a.get_id() == id) else {
        return id.to_owned();
    };
    let long = format!("--{}", arg.get_long().unwrap_or(id));
    match (matches.value_source(id), arg.get_env()) {
        (Some(ValueSource::EnvVariable), Some(env)) => {
            format!("{} ({long})", env.to_string_lossy())
        }
        _ => long,
    }
}

fn store_name(store: StoreKind) -> &'static str {
    match store {
        StoreKind::Memory => "memory",
        StoreKind::Redis => "redis",
        StoreKind::RedisCluster => "redis-cluster",
        StoreKind::RedisSentinel => "redis-sentinel",
    }
}

/// clap's error, plus the environment variable that held the bad value
/// when it did not come from the command line.
fn explain(error: clap::Error, argv: &[std::ffi::OsString]) -> CliError {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let text = error.render().to_string();
    if !error.use_stderr() {
        return CliError::Display(text);
    }
    if !matches!(
        error.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation
    ) {
        return CliError::Invalid(text);
    }
    let Some(ContextValue::String(shown)) = error.get(ContextKind::InvalidArg) else {
        return CliError::Invalid(text);
    };
    let long = shown
        .split([' ', '='])
        .next()
        .unwrap_or_default()
        .to_owned();
    let on_command_line = argv.iter().any(|a| {
        a.to_str()
            .is_some_and(|a| a == long || a.starts_with(&format!("{long}=")))
    });
    let command = ServeArgs::augment_args(clap::Command::new("serve"));
    let env = command
        .get_arguments()
        .find(|a| a.get_long().is_some_and(|l| format!("--{l}") == long))
        .and_then(|a| a.get_env())
        .map(|env| env.to_string_lossy().into_owned());
    match env {
        Some(env) if !on_command_line => CliError::Invalid(format!(
            "{}\n(the value came from the environment variable {env})\n",
            text.trim_end()
        )),
        _ => CliError::Invalid(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(args: &[&str]) -> String {
        let argv = ["ratekeeper", "serve", "--config", "rules.yaml"]
            .iter()
            .chain(args);
        match parse(argv) {
            Err(CliError::Invalid(text)) => text,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn flags_without_effect_are_refused_naming_both() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["--redis-url", "redis://r:6379"],
                "--redis-url has no effect with --store memory (the default); it applies to --store redis",
            ),
            (
                &["--store", "redis", "--redis-cluster-nodes", "a:7000"],
                "--redis-cluster-nodes has no effect with --store redis; it applies to --store redis-cluster",
            ),
            (
                &[
                    "--store",
                    "redis",
                    "--redis-url",
                    "redis://r:6379",
                    "--max-reservations",
                    "10",
                ],
                "--max-reservations has no effect with --store redis; it applies to --store memory",
            ),
            (
                &[
                    "--store",
                    "redis-cluster",
                    "--redis-cluster-nodes",
                    "a:7000",
                    "--redis-url",
                    "redis://x:1",
                ],
                "--redis-url has no effect with --store redis-cluster; it applies to --store redis",
            ),
            (
                &["--otlp-sample-ratio", "0.5"],
                "--otlp-sample-ratio has no effect without --otlp-endpoint",
            ),
            (
                &["--store", "redis", "--memory-max-keys", "10"],
                "--memory-max-keys has no effect with --store redis; it applies to --store memory",
            ),
            (
                &["--failure-policy", "allow"],
                "--failure-policy has no effect with --store memory (the default)",
            ),
            (
                &["--breaker-failures", "5"],
                "--breaker-failures has no effect with --store memory (the default)",
            ),
            (
                &["--expiration-jitter-max", "5s"],
                "--expiration-jitter-max has no effect with --store memory (the default)",
            ),
            (
                &["--reset-header", "X-Reset"],
                "--reset-header has no effect without --response-headers",
            ),
            (
                &["--key-layout", "envoy-ratelimit"],
                "--key-layout has no effect with --store memory (the default); it applies to --store redis, redis-cluster or redis-sentinel",
            ),
            (
                &["--store", "redis", "--cache-key-prefix", "rl:"],
                "--cache-key-prefix has no effect without --key-layout envoy-ratelimit",
            ),
            (
                &[
                    "--store",
                    "redis",
                    "--key-layout",
                    "ratekeeper",
                    "--cache-key-prefix",
                    "rl:",
                ],
                "--cache-key-prefix has no effect without --key-layout envoy-ratelimit",
            ),
            (
                &[
                    "--store",
                    "redis",
                    "--key-layout",
                    "envoy-ratelimit",
                    "--expiration-jitter-max",
                    "1500ms",
                ],
                "--expiration-jitter-max 1s 500ms: its fraction of a second has no effect with --key-layout envoy-ratelimit, whose jitter is whole seconds",
            ),
        ];
        for (args, expected) in cases {
            let text = refused(args);
            assert!(text.contains(expected), "{args:?}:\n{text}");
        }
    }

    #[test]
    fn merging_domains_needs_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("rules.yaml");
        std::fs::write(&file, "domain: d").unwrap();
        let (file, dir) = (file.to_str().unwrap(), dir.path().to_str().unwrap());
        let serve = |config: &str| {
            parse([
                "ratekeeper",
                "serve",
                "--config",
                config,
                "--merge-domain-config",
            ])
        };
        match serve(file) {
            Err(CliError::Invalid(text)) => assert!(
                text.contains("--merge-domain-config has no effect without --config naming a directory of rules files"),
                "{text}"
            ),
            other => panic!("{other:?}"),
        }
        assert!(serve(dir).is_ok());
        let check =
            |path: &str| parse(["ratekeeper", "check-config", "--merge-domain-config", path]);
        match check(file) {
            Err(CliError::Invalid(text)) => assert!(
                text.contains(
                    "--merge-domain-config has no effect without a directory of rules files; "
                ) && text.contains("rules.yaml is one file"),
                "{text}"
            ),
            other => panic!("{other:?}"),
        }
        assert!(check(dir).is_ok());
    }

    #[test]
    fn flags_with_effect_are_accepted() {
        for args in [
            &[
                "--store",
                "redis",
                "--redis-url",
                "redis://r:6379",
                "--redis-pool-size",
                "2",
            ][..],
            &[
                "--store",
                "redis-cluster",
                "--redis-cluster-nodes",
                "a:7000,b:7001",
            ],
            &["--response-headers", "--reset-header", "X-Reset"],
            &["--memory-max-keys", "10"],
            &[
                "--store",
                "redis-sentinel",
                "--key-layout",
                "envoy-ratelimit",
                "--cache-key-prefix",
                "rl:",
                "--expiration-jitter-max",
                "300s",
            ],
            &["--store", "redis", "--expiration-jitter-max", "1500ms"],
        ] {
            let argv = ["ratekeeper", "serve", "--config", "r.yaml"]
                .iter()
                .chain(args);
            assert!(parse(argv).is_ok(), "{args:?}");
        }
    }
}
