# syntax=docker/dockerfile:1
#
# ratekeeper's container image. Not built in CI here: the machines that run
# this repository's tests have no Docker engine (see README and
# deploy/README.md). Build it with
#
#   docker build -t ratekeeper:latest .
#   docker build --build-arg FEATURES=otlp -t ratekeeper:otlp .   # OTLP export
#
# and run it with the example rules baked in at /etc/ratekeeper/config.yaml:
#
#   docker run --rm -p 8081:8081 -p 9090:9090 ratekeeper:latest
#
# or with your own rules directory mounted over /etc/ratekeeper.

# Any official Rust image on Debian bookworm (glibc of the runtime image
# below), at least rust-version 1.88 of Cargo.toml; pin it for reproducible
# builds, e.g. --build-arg RUST_IMAGE=rust:1.88-slim-bookworm.
ARG RUST_IMAGE=rust:1-bookworm

FROM ${RUST_IMAGE} AS builder
# Cargo features, space- or comma-separated; empty builds the default binary.
ARG FEATURES=""
WORKDIR /src

# Dependencies first. This layer sees only the manifests, build.rs and the
# protos, with the crate's own targets stubbed, so it (all of the dependency
# graph and the generated gRPC code) is rebuilt only when one of those
# changes, not on every source edit. The stubs stand for the targets that
# Cargo.toml names (lib, bin, and the bench it declares); stub any new one.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs \
 && echo '//! Dependency-caching stub.' > src/lib.rs \
 && echo 'fn main() {}' > benches/decision.rs \
 && cargo build --release --locked ${FEATURES:+--features "$FEATURES"} \
 && rm -rf src benches

# Then the crate itself. COPY keeps the files' own (older) modification
# times, which Cargo would take for "unchanged since the stub build": touch
# the crate roots so it recompiles them.
COPY . .
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked ${FEATURES:+--features "$FEATURES"} \
 && install -D -m 0755 target/release/ratekeeper /out/ratekeeper \
 && mkdir -p /out/bin \
 && ln -s /usr/local/bin/ratekeeper /out/bin/ratelimit

# glibc and libgcc only, no shell, no package manager. The binary needs
# nothing else: TLS is rustls, and the protos are compiled in.
FROM gcr.io/distroless/cc-debian12:nonroot

COPY --from=builder /out/ratekeeper /usr/local/bin/ratekeeper
# envoyproxy/ratelimit's image runs /bin/ratelimit; run under that name the
# binary reads upstream's environment variables (README, "Replacing
# envoyproxy/ratelimit"), so a Deployment written for upstream's image keeps
# its command and env and only changes the image. (The image has no shell to
# make the link with: it is made in the builder and copied as a link.)
COPY --from=builder /out/bin/ /bin/
# Default rules, so the image runs as is; a Kubernetes ConfigMap mounted as
# the directory /etc/ratekeeper replaces them (deploy/kubernetes).
COPY examples/config.yaml /etc/ratekeeper/config.yaml

# gRPC and the metrics-only port on every interface. The admin port
# (/readyz, /rules — which lists whitelisted values and file paths) keeps the
# binary's loopback default: probes use gRPC health and /healthz on 9090.
ENV RATEKEEPER_GRPC_ADDR=0.0.0.0:8081 \
    RATEKEEPER_METRICS_ADDR=0.0.0.0:9090

# gRPC (ratekeeper.v1, Envoy RLS v3, grpc.health.v1); metrics HTTP
# (/metrics, /healthz).
EXPOSE 8081 9090

# distroless's "nonroot", numerically, so that Kubernetes' runAsNonRoot can
# verify it without a runAsUser.
USER 65532:65532

# No HEALTHCHECK: the image has no shell or curl to run one. Use the
# orchestrator's probes instead: grpc.health.v1 on 8081 (readiness) and HTTP
# GET /healthz on 9090 (liveness).

# ratekeeper is PID 1 and handles SIGTERM itself: readiness turns false,
# it serves for --drain-delay, drains in-flight calls, exits 0.
ENTRYPOINT ["ratekeeper"]
CMD ["serve", "--config", "/etc/ratekeeper"]
