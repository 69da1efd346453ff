//! gRPC health (grpc.health.v1) and the admin port's /healthz and /readyz.

mod common;

use std::sync::Arc;

use common::{T0, TestServer, rules};
use ratekeeper::clock::ManualClock;
use ratekeeper::store::MemoryStore;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test]
async fn every_service_name_reports_serving() {
    let store = Arc::new(MemoryStore::new(10, Arc::new(ManualClock::new(T0))));
    let server = TestServer::with(rules(&["domain: d"]), store).await;
    let mut health = HealthClient::new(server.channel().await);
    for service in [
        "",
        "ratelimit",
        "ratekeeper.v1.RateLimiter",
        "envoy.service.ratelimit.v3.RateLimitService",
    ] {
        let response = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.status(), ServingStatus::Serving, "{service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    let live = common::http_get(server.admin_addr, "/healthz").await;
    assert!(
        live.starts_with("HTTP/1.1 200") && live.ends_with("ok\n"),
        "{live}"
    );
    let ready = common::http_get(server.admin_addr, "/readyz").await;
    assert!(
        ready.starts_with("HTTP/1.1 200") && ready.ends_with("ready\n"),
        "{ready}"
    );
    server.stop().await;
}
