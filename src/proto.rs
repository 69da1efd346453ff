//! Code generated from `proto/` by `build.rs`, in modules that mirror the
//! protobuf packages (the generated code refers to sibling packages by
//! relative path).
#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// ratekeeper's own API.
pub mod ratekeeper {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("ratekeeper.v1");
    }
}

/// Envoy's rate limit service API (RLS v3) and the messages it uses.
pub mod envoy {
    /// `envoy.service.*`
    pub mod service {
        /// `envoy.service.ratelimit.*`
        pub mod ratelimit {
            /// `envoy.service.ratelimit.v3`
            pub mod v3 {
                tonic::include_proto!("envoy.service.ratelimit.v3");
            }
        }
        /// `envoy.service.rate_limit_quota.*` (RLQS)
        pub mod rate_limit_quota {
            /// `envoy.service.rate_limit_quota.v3`
            pub mod v3 {
                tonic::include_proto!("envoy.service.rate_limit_quota.v3");
            }
        }
    }
    /// `envoy.extensions.*`
    pub mod extensions {
        /// `envoy.extensions.common.*`
        pub mod common {
            /// `envoy.extensions.common.ratelimit.*`
            pub mod ratelimit {
                /// `envoy.extensions.common.ratelimit.v3`
                pub mod v3 {
                    tonic::include_proto!("envoy.extensions.common.ratelimit.v3");
                }
            }
        }
    }
    /// `envoy.config.*`
    pub mod config {
        /// `envoy.config.core.*`
        pub mod core {
            /// `envoy.config.core.v3`
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    /// `envoy.type.*`
    pub mod r#type {
        /// `envoy.type.v3`
        pub mod v3 {
            tonic::include_proto!("envoy.r#type.v3");
        }
    }
}

/// The encoded descriptor set of every proto above, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/ratekeeper_descriptor.bin"));
