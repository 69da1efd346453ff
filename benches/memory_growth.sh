#!/usr/bin/env bash
# Memory under a flood of distinct keys: ratekeeper on the memory store at
# saturation for 60 s with 1,000,000 distinct descriptor values (uniform), its
# resident memory sampled every 10 s. See BENCHMARKS.md.
#
# Usage: benches/memory_growth.sh [max keys of the memory store, default 1000000]
set -euo pipefail
cd "$(dirname "$0")/.."

MAX_KEYS=${1:-1000000}
GRPC=127.0.0.1:19191
ADMIN=127.0.0.1:19192
cargo build --release --quiet --bin ratekeeper --example loadgen
BIN=target/release

taskset -c 0 $BIN/ratekeeper serve --config benches/bench.yaml --grpc-addr $GRPC --admin-addr $ADMIN \
  --store memory --memory-max-keys "$MAX_KEYS" 2>/dev/null &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/19191) 2>/dev/null && break; sleep 0.05; done

rss() { awk '/VmRSS/ { print $2 }' "/proc/$server/status"; }
echo "seconds rss_kib"
echo "0 $(rss)"
taskset -c 1 $BIN/examples/loadgen --addr "http://$GRPC" --api envoy --connections 4 --concurrency 64 \
  --duration 60s --warmup 0s --keys 1000000 --domain bench > /tmp/memory_growth_load.txt &
load=$!
for t in 10 20 30 40 50 60; do
  sleep 10
  echo "$t $(rss)"
done
wait $load
grep '^RESULT ' /tmp/memory_growth_load.txt
