//! Hot reload while a client calls continuously: a valid change applies
//! (and counters survive it), an invalid one is refused with the old rules
//! still serving, and both a same-directory atomic rename and a Kubernetes
//! ConfigMap `..data` symlink swap are picked up — with no failed call.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{T0, TestServer, allow_request, http_get};
use ratekeeper::Server;
use ratekeeper::clock::ManualClock;
use ratekeeper::config::{DomainFiles, read_snapshot};
use ratekeeper::proto::ratekeeper::v1::rate_limiter_client::RateLimiterClient;
use ratekeeper::reload::ReloadSettings;
use ratekeeper::store::MemoryStore;
use tonic::transport::Channel;

fn rules_yaml(limit: u32) -> String {
    format!(
        "domain: rl\ndescriptors:\n  - key: user\n    rate_limit: {{unit: minute, requests_per_unit: {limit}}}\n"
    )
}

/// Replaces `path` atomically: write a hidden temporary file, then rename it.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn start(config: &Path) -> TestServer {
    let store = Arc::new(MemoryStore::new(1_000, Arc::new(ManualClock::new(T0))));
    let snapshot = read_snapshot(config).unwrap();
    let rules = snapshot.compile().unwrap();
    let server = Server::new(rules, store).with_reload(ReloadSettings {
        path: config.to_owned(),
        interval: Duration::from_millis(20),
        loaded: Some(snapshot),
        domain_files: DomainFiles::Refuse,
        dot_files: Default::default(),
    });
    TestServer::start(server).await
}

/// (limit, remaining) for `user=a`, without consuming anything.
async fn peek(client: &mut RateLimiterClient<Channel>) -> (u64, u64) {
    let mut request = allow_request("rl", &[&[("user", "a")]], 1);
    request.dry_run = true;
    let result = client
        .should_allow(request)
        .await
        .unwrap()
        .into_inner()
        .results
        .remove(0);
    (result.limit, result.remaining)
}

/// Peeks until the limit is `limit` (at most 5 s); returns the remaining.
async fn until_limit(client: &mut RateLimiterClient<Channel>, limit: u64) -> u64 {
    let started = Instant::now();
    loop {
        let (now, remaining) = peek(client).await;
        if now == limit {
            return remaining;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "limit still {now}, want {limit}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A client calling without pause until stopped; counts its failures.
struct Caller {
    stop: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<usize>,
}

impl Caller {
    fn start(mut client: RateLimiterClient<Channel>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let calls = Arc::new(AtomicUsize::new(0));
        let (s, c) = (stop.clone(), calls.clone());
        let task = tokio::spawn(async move {
            let mut failures = 0;
            // Bounded: at most 100,000 calls even if never stopped.
            for _ in 0..100_000 {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let request = allow_request("rl", &[&[("user", "steady")], &[("other", "x")]], 0);
                if client.should_allow(request).await.is_err() {
                    failures += 1;
                }
                c.fetch_add(1, Ordering::Relaxed);
            }
            failures
        });
        Caller { stop, calls, task }
    }

    async fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let failures = self.task.await.unwrap();
        (self.calls.load(Ordering::Relaxed), failures)
    }
}

fn reloads(metrics: &str, result: &str) -> usize {
    let prefix = format!("ratelimit_config_reloads_total{{result=\"{result}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_changes_apply_and_invalid_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rules.yaml");
    std::fs::write(&file, rules_yaml(2)).unwrap();
    let server = start(dir.path()).await;
    let mut client = server.client().await;
    let caller = Caller::start(server.client().await);

    assert!(
        client
            .should_allow(allow_request("rl", &[&[("user", "a")]], 1))
            .await
            .unwrap()
            .into_inner()
            .allowed
    );
    assert_eq!(peek(&mut client).await, (2, 1));

    // A valid change by atomic rename in the same directory: the new limit
    // applies, and the hit already counted is still there.
    replace(&file, &rules_yaml(5));
    assert_eq!(until_limit(&mut client, 5).await, 4);

    // An invalid change is refused; the last good rules keep serving.
    replace(
        &file,
        "domain: rl\ndescriptors:\n  - key: user\n    rate_limit: {unit: fortnight}\n",
    );
    let started = Instant::now();
    while reloads(&http_get(server.admin_addr, "/metrics").await, "failure") == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "refusal not counted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(peek(&mut client).await, (5, 4));
    let ready = http_get(server.admin_addr, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    assert!(ready.contains("last config change refused"), "{ready}");
    assert!(
        ready.contains("invalid rate limit unit 'fortnight'"),
        "{ready}"
    );

    // Fixed again: applied, and the refusal is no longer reported.
    replace(&file, &rules_yaml(7));
    assert_eq!(until_limit(&mut client, 7).await, 6);
    let metrics = http_get(server.admin_addr, "/metrics").await;
    assert_eq!(
        (reloads(&metrics, "success"), reloads(&metrics, "failure")),
        (2, 1),
        "{metrics}"
    );
    assert!(
        !http_get(server.admin_addr, "/readyz")
            .await
            .contains("refused")
    );

    let (calls, failures) = caller.finish().await;
    assert!(calls > 0);
    assert_eq!(
        failures, 0,
        "{failures} of {calls} calls failed during reloads"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_symlink_swap_is_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let version = |name: &str, limit| {
        std::fs::create_dir(root.join(name)).unwrap();
        std::fs::write(root.join(name).join("rules.yaml"), rules_yaml(limit)).unwrap();
    };
    version("..2026_11_29_08_00_00.1", 3);
    std::os::unix::fs::symlink("..2026_11_29_08_00_00.1", root.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/rules.yaml", root.join("rules.yaml")).unwrap();
    let server = start(root).await;
    let mut client = server.client().await;
    let caller = Caller::start(server.client().await);
    assert_eq!(peek(&mut client).await, (3, 3));

    // What the kubelet does: a new timestamped directory, a new `..data`
    // link renamed over the old one.
    version("..2026_11_29_08_01_00.2", 9);
    std::os::unix::fs::symlink("..2026_11_29_08_01_00.2", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    std::fs::remove_dir_all(root.join("..2026_11_29_08_00_00.1")).unwrap();
    assert_eq!(until_limit(&mut client, 9).await, 9);

    let (calls, failures) = caller.finish().await;
    assert!(calls > 0);
    assert_eq!(
        failures, 0,
        "{failures} of {calls} calls failed during the swap"
    );
}

/// A change made after the rules were loaded but before the watcher's first
/// look is still applied: changes are judged against what was loaded, not
/// against whatever the watcher happens to read first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_before_the_first_look_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rules.yaml");
    std::fs::write(&file, rules_yaml(2)).unwrap();
    let snapshot = read_snapshot(dir.path()).unwrap();
    let rules = snapshot.compile().unwrap();
    replace(&file, &rules_yaml(7));
    let store = Arc::new(MemoryStore::new(1_000, Arc::new(ManualClock::new(T0))));
    let server = TestServer::start(Server::new(rules, store).with_reload(ReloadSettings {
        path: dir.path().to_owned(),
        interval: Duration::from_millis(20),
        loaded: Some(snapshot),
        domain_files: DomainFiles::Refuse,
        dot_files: Default::default(),
    }))
    .await;
    let mut client = server.client().await;
    assert_eq!(until_limit(&mut client, 7).await, 7);
}

fn token_bucket_yaml(per_hour: u32) -> String {
    format!(
        "domain: rl\ndescriptors:\n  - key: user\n    rate_limit: {{unit: hour, requests_per_unit: {per_hour}, algorithm: token_bucket}}\n  - key: other\n    rate_limit: {{unit: hour, requests_per_unit: 10}}\n"
    )
}

/// The outage a review found: a token bucket used up, then shrunk by a
/// reload, left a stored level above the new capacity; every request on the
/// key then failed (a protocol error in Redis, a panic in memory) and the
/// breaker opened for every rule. Now the level reads as an empty bucket
/// under the new rule: denied with an exact retry, nothing fails, and other
/// rules keep answering — on both stores, behind the breaker as in production.
async fn shrinking_a_used_up_token_bucket_denies_and_fails_nothing(backend: common::Backend) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rules.yaml");
    std::fs::write(&file, token_bucket_yaml(100)).unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let test_store = common::TestStore::new(backend, clock.clone());
    let store: Arc<dyn ratekeeper::store::CounterStore> =
        Arc::new(ratekeeper::store::CircuitBreaker::new(
            test_store.store.clone(),
            3,
            Duration::from_secs(3600),
        ));
    let snapshot = read_snapshot(dir.path()).unwrap();
    let server = TestServer::start(Server::new(snapshot.compile().unwrap(), store).with_reload(
        ReloadSettings {
            path: dir.path().to_owned(),
            interval: Duration::from_millis(20),
            loaded: Some(snapshot),
            domain_files: DomainFiles::Refuse,
            dot_files: Default::default(),
        },
    ))
    .await;
    let mut client = server.client().await;
    assert!(common::allowed(&mut client, allow_request("rl", &[&[("user", "a")]], 100)).await);
    assert_eq!(peek(&mut client).await, (100, 0));

    replace(&file, &token_bucket_yaml(50));
    assert_eq!(until_limit(&mut client, 50).await, 0);
    for _ in 0..5 {
        let answer = client
            .should_allow(allow_request("rl", &[&[("user", "a")]], 1))
            .await
            .expect("a shrunk bucket is an answer, not an error")
            .into_inner();
        assert!(!answer.allowed);
        assert_eq!(answer.results[0].remaining, 0);
        // Empty under the new rule, refilling one token every 72 s.
        assert_eq!(
            answer.retry_after,
            Some(prost_types::Duration {
                seconds: 72,
                nanos: 0
            })
        );
    }
    // The breaker stayed closed: another rule still counts in the store.
    assert!(common::allowed(&mut client, allow_request("rl", &[&[("other", "x")]], 1)).await);
    common::assert_retry_is_exact(
        &mut client,
        &clock,
        allow_request("rl", &[&[("user", "a")]], 1),
        72_000,
    )
    .await;
}

both_stores!(
    shrinking_a_used_up_token_bucket_denies_and_fails_nothing,
    merged_domains_reload_merged,
);

/// Waits (at most 5 s) until `/readyz` does or does not report a refusal.
async fn until_refusal_shown(server: &TestServer, shown: bool) -> String {
    let started = Instant::now();
    loop {
        let ready = http_get(server.admin_addr, "/readyz").await;
        if ready.contains("last config change refused") == shown {
            return ready;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "refusal shown: {}, want {shown}: {ready}",
            !shown
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A file that is briefly unreadable (here: gone, as mid-way through a
/// deploy) is reported, and the report clears once the same files are back:
/// the rules in force never changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_read_failure_clears_when_the_files_return() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rules.yaml");
    std::fs::write(&file, rules_yaml(2)).unwrap();
    let server = start(&file).await;
    let mut client = server.client().await;

    let aside = dir.path().join("aside");
    std::fs::rename(&file, &aside).unwrap();
    let ready = until_refusal_shown(&server, true).await;
    assert!(ready.contains("No such file"), "{ready}");
    assert_eq!(peek(&mut client).await, (2, 2));

    std::fs::rename(&aside, &file).unwrap();
    until_refusal_shown(&server, false).await;
    assert_eq!(peek(&mut client).await, (2, 2));
}

/// With `--merge-domain-config`, hot reload merges a domain's files as the
/// first load did: a change to either file applies, and a change that
/// defines one descriptor in both is refused, the old rules serving on.
async fn merged_domains_reload_merged(backend: common::Backend) {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("a.yaml");
    let second = dir.path().join("b.yaml");
    std::fs::write(&first, rules_yaml(2)).unwrap();
    let other = |limit: u32| {
        format!(
            "domain: rl\ndescriptors:\n  - key: other\n    rate_limit: {{unit: minute, requests_per_unit: {limit}}}\n"
        )
    };
    std::fs::write(&second, other(3)).unwrap();
    let snapshot = read_snapshot(dir.path()).unwrap();
    assert!(snapshot.compile().is_err(), "one domain in two files");
    let rules = snapshot.compile_with(DomainFiles::Merge).unwrap();
    let store = common::TestStore::new(backend, Arc::new(ManualClock::new(T0)));
    let server = TestServer::start(Server::new(rules, store.store.clone()).with_reload(
        ReloadSettings {
            path: dir.path().to_owned(),
            interval: Duration::from_millis(20),
            loaded: Some(snapshot),
            domain_files: DomainFiles::Merge,
            dot_files: Default::default(),
        },
    ))
    .await;
    let mut client = server.client().await;
    assert_eq!(peek(&mut client).await, (2, 2));
    // A change to one file applies, the other file's rules stay.
    replace(&first, &rules_yaml(9));
    assert_eq!(until_limit(&mut client, 9).await, 9);
    let limit_of_other = |client: &mut RateLimiterClient<Channel>| {
        let mut client = client.clone();
        async move {
            let mut request = allow_request("rl", &[&[("other", "x")]], 1);
            request.dry_run = true;
            client
                .should_allow(request)
                .await
                .unwrap()
                .into_inner()
                .results[0]
                .limit
        }
    };
    assert_eq!(limit_of_other(&mut client).await, 3);
    // A descriptor in both files is refused; the merged rules stay.
    replace(
        &second,
        &format!(
            "{}  - key: user\n    rate_limit: {{unit: minute, requests_per_unit: 1}}\n",
            other(4)
        ),
    );
    let started = Instant::now();
    let refused = loop {
        let ready = http_get(server.admin_addr, "/readyz").await;
        if ready.contains("last config change refused") {
            break ready;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "{ready}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        refused.contains("b.yaml: descriptors[1]: duplicate descriptor composite key 'rl.user' (already defined in"),
        "{refused}"
    );
    assert_eq!(peek(&mut client).await, (9, 9));
    assert_eq!(limit_of_other(&mut client).await, 3);
}
