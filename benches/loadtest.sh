#!/usr/bin/env bash
# End-to-end load benchmark: ratekeeper (memory and Redis stores) against a
# no-op gRPC server with the same protos, measured in one run so every figure
# is a ratio to this machine's gRPC ceiling. See BENCHMARKS.md.
#
# Server (and Redis) are pinned to CPU 0, the load generator to CPU 1.
# Usage: benches/loadtest.sh [duration, default 10s]
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${1:-10s}
SERVER_CPU=0
LOAD_CPU=1
GRPC=127.0.0.1:19181
ADMIN=127.0.0.1:19182
NOOP=127.0.0.1:19183
REDIS_PORT=19184
CONNECTIONS=4
CONCURRENCY=64
KEYS=100000

cargo build --release --quiet --bin ratekeeper --example loadgen --example noop_server
BIN=target/release
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

wait_port() { # host:port
  for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "nothing listening on $1" >&2; return 1
}

# cpu_seconds PID: user+system CPU time of a process so far.
cpu_seconds() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.3f", ($14 + $15) / hz }' "/proc/$1/stat"; }

# load NAME ADDR [extra loadgen flags...]: one run; prints its RESULT line
# prefixed with NAME and the server's CPU seconds per 1,000 decisions.
load() {
  local name=$1 addr=$2 server_pid=$3; shift 3
  local before after result
  before=$(cpu_seconds "$server_pid")
  result=$(taskset -c $LOAD_CPU $BIN/examples/loadgen --addr "http://$addr" --connections $CONNECTIONS \
    --concurrency $CONCURRENCY --duration "$DURATION" --warmup 2s --keys $KEYS --domain bench "$@" | grep '^RESULT ')
  after=$(cpu_seconds "$server_pid")
  local requests; requests=$(sed -E 's/.* requests=([0-9]+).*/\1/' <<<"$result")
  echo "$name $result cpu_ms_per_1k=$(awk -v b="$before" -v a="$after" -v n="$requests" 'BEGIN { if (n > 0) printf "%.1f", (a - b) * 1000 * 1000 / n; else print 0 }')"
}

rps_of() { sed -E 's/.* rps=([0-9.]+).*/\1/' <<<"$1"; }
seventy() { awk -v r="$1" 'BEGIN { printf "%d", r * 0.7 }'; }

# --- no-op baseline
taskset -c $SERVER_CPU $BIN/examples/noop_server --addr $NOOP --threads 1 & pids+=($!); noop_pid=$!
wait_port $NOOP
noop=$(load noop $NOOP $noop_pid --api envoy)
echo "$noop"
echo "$(load noop-70% $NOOP $noop_pid --api envoy --rate "$(seventy "$(rps_of "$noop")")")"

# --- memory store
taskset -c $SERVER_CPU $BIN/ratekeeper serve --config benches/bench.yaml --grpc-addr $GRPC --admin-addr $ADMIN \
  --store memory & pids+=($!); rk_pid=$!
wait_port $GRPC
memory=$(load memory $GRPC $rk_pid --api envoy)
echo "$memory"
echo "$(load memory-70% $GRPC $rk_pid --api envoy --rate "$(seventy "$(rps_of "$memory")")")"
echo "$(load memory-should-allow $GRPC $rk_pid --api should-allow)"
echo "$(load memory-10-descriptors $GRPC $rk_pid --api envoy --descriptors 10)"
kill $rk_pid; wait $rk_pid 2>/dev/null || true

# --- Redis store (Redis shares the server's CPU)
taskset -c $SERVER_CPU redis-server --port $REDIS_PORT --bind 127.0.0.1 --save "" --appendonly no \
  --daemonize no >/dev/null & pids+=($!)
wait_port 127.0.0.1:$REDIS_PORT
taskset -c $SERVER_CPU $BIN/ratekeeper serve --config benches/bench.yaml --grpc-addr $GRPC --admin-addr $ADMIN \
  --store redis --redis-url redis://127.0.0.1:$REDIS_PORT --store-timeout 100ms & pids+=($!); rk_pid=$!
wait_port $GRPC
redis-cli -p $REDIS_PORT CONFIG RESETSTAT >/dev/null
redis=$(load redis $GRPC $rk_pid --api envoy)
echo "$redis"
calls=$(redis-cli -p $REDIS_PORT INFO commandstats | tr -d '\r' | awk -F'[:=,]' '/^cmdstat_evalsha/ { print $3 }')
echo "redis-evalsha-calls $calls"
echo "$(load redis-70% $GRPC $rk_pid --api envoy --rate "$(seventy "$(rps_of "$redis")")")"
echo "$(load redis-10-descriptors $GRPC $rk_pid --api envoy --descriptors 10)"
