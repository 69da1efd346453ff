//! `ratekeeper admin …`: the admin API from a shell, over the admin port's
//! HTTP JSON ([`super::http`]), so an operator needs no other tool. Prints
//! the JSON answer; exits 0 on success, 1 when the server refused or failed
//! (its message on stderr), 64 for bad flags.

use std::io::{Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{Value, json};

/// `ratekeeper admin`'s flags.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The admin HTTP port of a ratekeeper (its --admin-addr).
    #[arg(long, env = "RATEKEEPER_ADMIN_ADDR", default_value = crate::config::args::DEFAULT_ADMIN_ADDR)]
    pub addr: String,

    /// File holding the bearer token (the server's --admin-token-file).
    #[arg(long, env = "RATEKEEPER_ADMIN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// The operation.
    #[command(subcommand)]
    pub operation: Operation,
}

/// A domain and a descriptor, as flags.
#[derive(Debug, Args)]
pub struct TargetArgs {
    /// A configured domain.
    #[arg(long)]
    pub domain: String,

    /// One descriptor entry, outermost first: `key=value`, or `key` alone
    /// (an override: any value; inspect and reset: the empty value).
    #[arg(long = "entry", required = true)]
    pub entries: Vec<String>,
}

/// The admin operations.
#[derive(Debug, Subcommand)]
pub enum Operation {
    /// List the overrides in force.
    List,
    /// Show the override of a domain and descriptor.
    Get(TargetArgs),
    /// Store an override (validated as a rules file's rate_limit).
    Put {
        /// Which descriptor.
        #[command(flatten)]
        target: TargetArgs,
        /// Hits per window.
        #[arg(long)]
        requests_per_unit: u64,
        /// second, minute, hour, day, week, month or year.
        #[arg(long)]
        unit: String,
        /// The window spans this many units.
        #[arg(long)]
        unit_multiplier: Option<u64>,
        /// fixed_window, sliding_window or token_bucket.
        #[arg(long)]
        algorithm: Option<String>,
        /// Token bucket capacity.
        #[arg(long)]
        burst: Option<u64>,
        /// error, allow, deny or local when the store fails.
        #[arg(long)]
        failure_policy: Option<String>,
        /// Expire after this long (e.g. 30m, 2h).
        #[arg(long, value_parser = humantime::parse_duration)]
        expires_in: Option<Duration>,
    },
    /// Delete the override of a domain and descriptor.
    Delete(TargetArgs),
    /// Show the rule in force and the counter, consuming nothing.
    Inspect {
        /// Which descriptor.
        #[command(flatten)]
        target: TargetArgs,
        /// Hits to ask about.
        #[arg(long, default_value_t = 1)]
        hits: u64,
    },
    /// Delete the descriptor's counters on every instance.
    Reset(TargetArgs),
}

/// Runs the command; the process exit code.
pub fn run(args: AdminArgs) -> u8 {
    match call(&args) {
        Ok(answer) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&answer).unwrap_or_default()
            );
            0
        }
        Err(message) => {
            eprintln!("ratekeeper admin: {message}");
            1
        }
    }
}

fn call(args: &AdminArgs) -> Result<Value, String> {
    let token = match &args.token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| format!("--token-file {}: {e}", path.display()))?
                .trim()
                .to_owned(),
        ),
        None => None,
    };
    let (method, path, body) = match &args.operation {
        Operation::List => ("GET", "/admin/v1/overrides", None),
        Operation::Get(t) => ("POST", "/admin/v1/overrides/get", Some(target(t))),
        Operation::Delete(t) => ("POST", "/admin/v1/overrides/delete", Some(target(t))),
        Operation::Reset(t) => ("POST", "/admin/v1/reset", Some(target(t))),
        Operation::Inspect { target: t, hits } => {
            let mut body = target(t);
            body["hits"] = json!(hits);
            ("POST", "/admin/v1/inspect", Some(body))
        }
        Operation::Put {
            target: t,
            requests_per_unit,
            unit,
            unit_multiplier,
            algorithm,
            burst,
            failure_policy,
            expires_in,
        } => {
            let mut body = target(t);
            let mut limit = json!({ "requests_per_unit": requests_per_unit, "unit": unit });
            for (name, value) in [
                ("unit_multiplier", unit_multiplier.map(|v| json!(v))),
                ("algorithm", algorithm.as_ref().map(|v| json!(v))),
                ("burst", burst.map(|v| json!(v))),
                ("failure_policy", failure_policy.as_ref().map(|v| json!(v))),
            ] {
                if let Some(value) = value {
                    limit[name] = value;
                }
            }
            body["rate_limit"] = limit;
            if let Some(expires_in) = expires_in {
                body["expires_in_seconds"] = json!(expires_in.as_secs().max(1));
            }
            ("PUT", "/admin/v1/overrides", Some(body))
        }
    };
    request(&args.addr, method, path, body.as_ref(), token.as_deref())
}

/// The JSON body of a domain and descriptor given as flags.
fn target(t: &TargetArgs) -> Value {
    let descriptor: Vec<Value> = t
        .entries
        .iter()
        .map(|entry| match entry.split_once('=') {
            Some((key, value)) => json!({ "key": key, "value": value }),
            None => json!({ "key": entry }),
        })
        .collect();
    json!({ "domain": t.domain, "descriptor": descriptor })
}

/// One HTTP/1.1 exchange (the admin port speaks plain HTTP).
fn request(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
    token: Option<&str>,
) -> Result<Value, String> {
    let address = addr
        .to_socket_addrs()
        .map_err(|e| format!("--addr {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("--addr {addr}: no address"))?;
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let timeout = Some(Duration::from_secs(30));
    stream
        .set_read_timeout(timeout)
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(timeout)
        .map_err(|e| e.to_string())?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| format!("sending to {addr}: {e}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| format!("reading from {addr}: {e}"))?;
    let response = String::from_utf8_lossy(&response);
    let (head, payload) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{addr} answered something other than HTTP"))?;
    let status: u16 = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{addr} answered something other than HTTP"))?;
    let json: Value = serde_json::from_str(payload).unwrap_or(Value::String(payload.to_owned()));
    if (200..300).contains(&status) {
        Ok(json)
    } else {
        let message = json["error"]
            .as_str()
            .map_or_else(|| json.to_string(), str::to_owned);
        Err(format!("{status}: {message}"))
    }
}
