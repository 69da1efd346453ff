#!/usr/bin/env bash
# Redis Cluster benchmark: ratekeeper on a 3-master Redis Cluster against
# ratekeeper on one Redis, with requests of 1 and of 10 descriptors (Envoy
# API, each descriptor a different key and so, on the cluster, mostly a
# different slot and master). Servers (ratekeeper and every redis-server)
# are pinned to CPU 0, the load generator to CPU 1; each round runs every
# shape in turn, and medians over rounds are reported. See BENCHMARKS.md.
# The load generator is rls-bench (RLS_BENCH: an Envoy RLS load generator
# that reports its own CPU); a run whose generator used more than 90 % of
# its core measured the generator, and is printed as INVALID.
#
# Usage: RLS_BENCH=path/to/rls-bench benches/cluster.sh [rounds, default 3] [seconds per run, default 5] [open-loop rate, default 2000]
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/common.sh
: "${RLS_BENCH:?set RLS_BENCH to the rls-bench binary}"

ROUNDS=${1:-3}
SECONDS_PER_RUN=${2:-5}
RATE=${3:-2000}
SERVER_CPU=0
LOAD_CPU=1
SINGLE_PORT=19284
CLUSTER_PORTS=(19291 19292 19293)
SINGLE_RK=127.0.0.1:19285
CLUSTER_RK=127.0.0.1:19295
KEYS=100000

cargo build --release --quiet --bin ratekeeper
BIN=target/release
work=$(mktemp -d)
cleanup() { stop_started; rm -rf "$work"; }
trap cleanup EXIT

redis() { # port [extra args]
  local port=$1; shift
  taskset -c $SERVER_CPU redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
    --daemonize no --dir "$work" "$@" >/dev/null & pids+=($!)
  wait_port "127.0.0.1:$port"
}

redis $SINGLE_PORT
nodes=()
for port in "${CLUSTER_PORTS[@]}"; do
  redis "$port" --cluster-enabled yes --cluster-config-file "nodes-$port.conf"
  nodes+=("127.0.0.1:$port")
done
redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >/dev/null
until redis-cli -p "${CLUSTER_PORTS[0]}" CLUSTER INFO | grep -q cluster_state:ok; do sleep 0.1; done

taskset -c $SERVER_CPU $BIN/ratekeeper serve --config benches/bench.yaml --grpc-addr $SINGLE_RK \
  --admin-addr 127.0.0.1:19286 --store redis --redis-url redis://127.0.0.1:$SINGLE_PORT \
  --store-timeout 100ms 2>/dev/null & pids+=($!)
taskset -c $SERVER_CPU $BIN/ratekeeper serve --config benches/bench.yaml --grpc-addr $CLUSTER_RK \
  --admin-addr 127.0.0.1:19296 --store redis-cluster \
  --redis-cluster-nodes "$(IFS=,; echo "${nodes[*]}")" --store-timeout 100ms 2>/dev/null & pids+=($!)
wait_port $SINGLE_RK
wait_port $CLUSTER_RK
declare -A addr_of=([single]=$SINGLE_RK [cluster]=$CLUSTER_RK)

run() { # server descriptors [rls-bench flags...]: prints "rps=… p50_us=… p99_us=… gen_cpu=…"
  local server=$1 descriptors=$2; shift 2
  taskset -c $LOAD_CPU "$RLS_BENCH" load --addr "http://${addr_of[$server]}" --connections 4 \
    --duration "${SECONDS_PER_RUN}s" --warmup 1s --keys $KEYS --dist uniform --domain bench \
    --key user --descriptors-per-request "$descriptors" --json "$work/out.json" "$@" \
    >"$work/out.txt" 2>&1 || true
  python3 - "$work/out.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
lat, cpu = r["latency_us"], r.get("client_cpu_pct") or 0
flag = " INVALID(generator saturated)" if cpu > 90 else ""
print("RESULT rps=%.0f p50_us=%.0f p99_us=%.0f errors=%d gen_cpu=%.0f%s" % (
    r["rps"], lat["p50"], lat["p99"], r.get("errors", 0), cpu, flag))
PY
}

shapes=("single 1" "single 10" "cluster 1" "cluster 10")
declare -A rps sat_p99 open_p50 open_p99
for round in $(seq 1 "$ROUNDS"); do
  for shape in "${shapes[@]}"; do
    read -r server descriptors <<<"$shape"
    closed=$(run "$server" "$descriptors" --concurrency 64)
    open=$(run "$server" "$descriptors" --concurrency 256 --rate "$RATE")
    echo "round $round $server $descriptors-descriptor closed: $closed"
    echo "round $round $server $descriptors-descriptor open@$RATE: $open"
    rps[$shape,$round]=$(field rps "$closed"); sat_p99[$shape,$round]=$(field p99_us "$closed")
    open_p50[$shape,$round]=$(field p50_us "$open"); open_p99[$shape,$round]=$(field p99_us "$open")
  done
done

echo
echo "median over $ROUNDS rounds:"
printf "%-8s %5s %12s %14s %14s %14s\n" store descs "req/s(sat)" "p99_us(sat)" "p50_us@$RATE" "p99_us@$RATE"
for shape in "${shapes[@]}"; do
  read -r server descriptors <<<"$shape"
  m() { for i in $(seq 1 "$ROUNDS"); do eval "echo \${$1[\$shape,\$i]}"; done | median; }
  printf "%-8s %5s %12s %14s %14s %14s\n" "$server" "$descriptors" "$(m rps)" "$(m sat_p99)" "$(m open_p50)" "$(m open_p99)"
done
