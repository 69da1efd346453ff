#!/usr/bin/env bash
# End-to-end load benchmark: ratekeeper on the memory store and on the Redis
# store against a no-op gRPC server with the same protos (the gRPC ceiling of
# this machine). All three servers (and Redis) run at once, pinned to CPU 0,
# and are loaded in turn, round after round, by the load generator pinned to
# CPU 1: each ratio is taken within a round and the median over rounds is
# reported, because this shared machine's speed drifts by ±20 % between
# minutes. See BENCHMARKS.md.
#
# Usage: benches/loadtest.sh [rounds, default 5] [seconds per run, default 5]
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/common.sh

ROUNDS=${1:-5}
SECONDS_PER_RUN=${2:-5}
SERVER_CPU=0
LOAD_CPU=1
NOOP=127.0.0.1:19183
MEMORY=127.0.0.1:19181
REDIS_RK=127.0.0.1:19185
REDIS_PORT=19184
KEYS=100000

cargo build --release --quiet --bin ratekeeper --example loadgen --example noop_server
BIN=target/release
trap stop_started EXIT

taskset -c $SERVER_CPU $BIN/examples/noop_server --addr $NOOP --threads 1 >/dev/null 2>&1 & pids+=($!); declare -A pid_of; pid_of[noop]=$!
taskset -c $SERVER_CPU $BIN/ratekeeper serve --config benches/bench.yaml --grpc-addr $MEMORY \
  --admin-addr 127.0.0.1:19182 --store memory 2>/dev/null & pids+=($!); pid_of[memory]=$!
taskset -c $SERVER_CPU redis-server --port $REDIS_PORT --bind 127.0.0.1 --save "" --appendonly no \
  --daemonize no >/dev/null & pids+=($!)
wait_port 127.0.0.1:$REDIS_PORT
taskset -c $SERVER_CPU $BIN/ratekeeper serve --config benches/bench.yaml --grpc-addr $REDIS_RK \
  --admin-addr 127.0.0.1:19186 --store redis --redis-url redis://127.0.0.1:$REDIS_PORT \
  --store-timeout 100ms 2>/dev/null & pids+=($!); pid_of[redis]=$!
declare -A addr_of=([noop]=$NOOP [memory]=$MEMORY [redis]=$REDIS_RK)
for name in noop memory redis; do wait_port "${addr_of[$name]}"; done

# cpu_seconds PID: user+system CPU time of a process so far.
cpu_seconds() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.3f", ($14 + $15) / hz }' "/proc/$1/stat"; }

# run NAME [loadgen flags...]: one measured run against server NAME; prints
# its RESULT line with the server's CPU milliseconds per 1,000 decisions.
run() {
  local name=$1; shift
  local pid=${pid_of[$name]} before after result requests
  before=$(cpu_seconds "$pid")
  result=$(taskset -c $LOAD_CPU $BIN/examples/loadgen --addr "http://${addr_of[$name]}" --connections 4 \
    --concurrency 64 --duration "${SECONDS_PER_RUN}s" --warmup 1s --keys $KEYS --domain bench "$@" | grep '^RESULT ')
  after=$(cpu_seconds "$pid")
  requests=$(sed -E 's/.* requests=([0-9]+).*/\1/' <<<"$result")
  echo "$result cpu_ms_per_1k=$(awk -v b="$before" -v a="$after" -v n="$requests" 'BEGIN { printf "%.1f", (a - b) * 1e6 / n }')"
}

declare -A rps ratio cpu p50 p99 p999
for round in $(seq 1 "$ROUNDS"); do
  for name in noop memory redis; do
    line=$(run $name --api envoy)
    echo "round $round $name $line"
    rps[$name,$round]=$(field rps "$line"); cpu[$name,$round]=$(field cpu_ms_per_1k "$line")
    p50[$name,$round]=$(field p50_us "$line"); p99[$name,$round]=$(field p99_us "$line"); p999[$name,$round]=$(field p999_us "$line")
  done
  for name in memory redis; do
    ratio[$name,$round]=$(awk -v a="${rps[$name,$round]}" -v b="${rps[noop,$round]}" 'BEGIN { printf "%.3f", a / b }')
  done
done

echo
echo "median over $ROUNDS rounds (saturation, closed loop, 64 in flight):"
printf "%-8s %10s %8s %10s %10s %10s %12s\n" server req/s ratio p50_us p99_us p999_us cpu_us/dec
declare -A sat
for name in noop memory redis; do
  r=$(for i in $(seq 1 "$ROUNDS"); do echo "${rps[$name,$i]}"; done | median); sat[$name]=$r
  q=1; [ "$name" != noop ] && q=$(for i in $(seq 1 "$ROUNDS"); do echo "${ratio[$name,$i]}"; done | median)
  printf "%-8s %10s %8s %10s %10s %10s %12s\n" $name "$r" "$q" \
    "$(for i in $(seq 1 "$ROUNDS"); do echo "${p50[$name,$i]}"; done | median)" \
    "$(for i in $(seq 1 "$ROUNDS"); do echo "${p99[$name,$i]}"; done | median)" \
    "$(for i in $(seq 1 "$ROUNDS"); do echo "${p999[$name,$i]}"; done | median)" \
    "$(for i in $(seq 1 "$ROUNDS"); do echo "${cpu[$name,$i]}"; done | median)"
done

echo
echo "open loop at 70% of each server's median saturation:"
for name in noop memory redis; do
  rate=$(awk -v r="${sat[$name]}" 'BEGIN { printf "%d", r * 0.7 }')
  echo "70% $name $(run $name --api envoy --rate "$rate")"
done

echo
echo "more shapes (one run each):"
echo "memory should-allow $(run memory --api should-allow)"
echo "memory 10-descriptors $(run memory --api envoy --descriptors 10)"
redis-cli -p $REDIS_PORT CONFIG RESETSTAT >/dev/null
line=$(run redis --api envoy --descriptors 10)
echo "redis 10-descriptors $line"
calls=$(redis-cli -p $REDIS_PORT INFO commandstats | tr -d '\r' | awk -F'[:=,]' '/^cmdstat_evalsha/ { print $3 }')
echo "redis evalsha calls during that run (warm-up included): $calls for $(field requests "$line") measured requests"
