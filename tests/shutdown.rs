//! SIGTERM under load, on the real binary: readiness turns false first
//! while calls keep succeeding, no call fails before the listener closes, and
//! the process exits 0 within the drain deadline.

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{allow_request, free_port, http_get};
use ratekeeper::proto::ratekeeper::v1::rate_limiter_client::RateLimiterClient;
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_ratekeeper");
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/config.yaml");
const DRAIN_DELAY: Duration = Duration::from_millis(800);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_cleanly() {
    let (grpc, admin) = (free_port(), free_port());
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--config",
            EXAMPLE,
            "--drain-delay",
            "800ms",
            "--shutdown-timeout",
            "5s",
        ])
        .args([
            "--grpc-addr",
            &format!("127.0.0.1:{grpc}"),
            "--admin-addr",
            &format!("127.0.0.1:{admin}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let admin_addr = format!("127.0.0.1:{admin}").parse().unwrap();
    let endpoint = Channel::from_shared(format!("http://127.0.0.1:{grpc}")).unwrap();
    let started = Instant::now();
    let channel = loop {
        if let Ok(channel) = endpoint.connect().await {
            break channel;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "no listener");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // A steady stream of calls from 4 tasks, each call stamped with when it ended.
    let stop = Arc::new(AtomicBool::new(false));
    let epoch = Instant::now();
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let mut client = RateLimiterClient::new(channel.clone());
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut log = Vec::new();
                for _ in 0..50_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let request = allow_request("example", &[&[("tenant", "t")]], 1);
                    let ok = client.should_allow(request).await.is_ok();
                    log.push((epoch.elapsed(), ok));
                    if !ok {
                        // After the listener closed there is no point hammering.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                log
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let term_at = epoch.elapsed();
    common::process::sigterm(child.id());
    // Readiness is false at once, while the server still serves.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ready = http_get(admin_addr, "/readyz").await;
    assert!(
        ready.starts_with("HTTP/1.1 503") && ready.contains("shutting down"),
        "{ready}"
    );

    let exit = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            epoch.elapsed() - term_at < Duration::from_secs(10),
            "no exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let exited_after = epoch.elapsed() - term_at;
    stop.store(true, Ordering::Relaxed);
    let mut log = Vec::new();
    for caller in callers {
        log.extend(caller.await.unwrap());
    }

    assert_eq!(exit.code(), Some(0));
    assert!(
        exited_after < DRAIN_DELAY + Duration::from_secs(5),
        "{exited_after:?}"
    );
    // Every call that ended before the listener could have closed succeeded.
    let before_close: Vec<_> = log
        .iter()
        .filter(|(at, _)| *at < term_at + DRAIN_DELAY)
        .collect();
    let during_drain = before_close.iter().filter(|(at, _)| *at > term_at).count();
    assert!(during_drain > 0, "no call ran during the drain delay");
    let failed = before_close.iter().filter(|(_, ok)| !ok).count();
    assert_eq!(
        failed,
        0,
        "{failed} of {} calls failed before the listener closed",
        before_close.len()
    );
}
