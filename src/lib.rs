//! ratekeeper: a gRPC rate limit decision service.
//!
//! Gateways (through Envoy's rate limit service API) and services (through
//! our own `ShouldAllow`) ask, on every request, whether it may pass. The
//! answer comes from limits in envoyproxy/ratelimit's YAML and is counted
//! atomically in memory or in Redis, so any number of instances share a limit.
//!
//! ```text
//! gRPC request ──▶ api (validate, translate) ──▶ Limiter
//!                                                 │ rules: domain + descriptors ──▶ matched limits (pure)
//!                                                 │ store: apply all hits in ONE call ──▶ outcomes
//!                                                 ▼
//!                          api ◀── Decision (per descriptor)
//! ```
//!
//! Modules:
//! - [`config`]: CLI flags and the rules files (load, validate, compile).
//! - [`rules`]: the compiled rules, descriptor matching, storage keys and
//!   metric stats keys (pure).
//! - [`algorithm`]: the limit math and batch semantics (pure).
//! - [`store`]: `CounterStore` with the memory and Redis backends.
//! - [`limiter`]: match → hits → one store call → decision.
//! - [`failure_policy`]: what to answer when the store fails.
//! - [`lease`]: concurrency rules: the `Leases` API and Envoy's slots.
//! - [`reservation`]: reserve an estimated cost, then settle the actual one.
//! - [`fuzzing`]: fuzz targets for the config loader, matcher and keys.
//! - [`huge_pages`]: transparent huge pages off for the process (tail latency).
//! - [`api`]: the `ShouldAllow` and Envoy RLS gRPC services (with the Envoy
//!   answer's quota mode, headers and dynamic metadata).
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics`, `/rules`.
//! - [`overrides`]: runtime limit overrides, kept in the store.
//! - [`admin_api`]: the authenticated admin API (overrides, inspect,
//!   reset) over gRPC and HTTP JSON, and the `ratekeeper admin` client.
//! - [`metrics`]: the Prometheus metrics.
//! - [`reload`]: hot reload of the rules.
//! - [`rlqs`]: Envoy's Rate Limit Quota Service: one global limit divided
//!   among Envoys by demand.
//! - [`readiness`]: readiness for `/readyz` and gRPC health.
//! - [`server`]: the listeners, health, reflection, shutdown order.
//! - [`upstream`]: envoyproxy/ratelimit's HTTP surface (`/healthcheck`,
//!   `/json`, `/rlconfig`, Prometheus) for the upstream mode.
//! - [`clock`], [`telemetry`], [`shutdown`], [`error`], [`proto`].

pub mod admin;
pub mod admin_api;
pub mod algorithm;
pub mod api;
pub mod clock;
pub mod config;
pub mod error;
pub mod failure_policy;
pub mod fuzzing;
pub mod huge_pages;
pub mod lease;
pub mod limiter;
pub mod metrics;
pub mod overrides;
pub mod proto;
pub mod readiness;
pub mod reload;
pub mod reservation;
pub mod rlqs;
pub mod rules;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod upstream;

pub use error::Error;
pub use server::{Listeners, Server, TlsSettings};
