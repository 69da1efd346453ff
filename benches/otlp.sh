#!/usr/bin/env bash
# What OTLP span export costs: the same ratekeeper binary (built with
# `--features otlp`, memory store) three times on CPU 0: without
# `--otlp-endpoint`, with it and every request traced, and with it and 1 % of
# requests traced (`--otlp-sample-ratio 0.01`),
# exporting to a counting collector (examples/otlp_sink.rs)
# that runs with the load generator on CPU 1, as a collector would run
# elsewhere. Loaded in turn, round after round; the median of per-round
# throughput ratios is reported. See BENCHMARKS.md.
#
# Usage: benches/otlp.sh [rounds, default 5] [seconds per run, default 5]
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/common.sh

ROUNDS=${1:-5}
SECONDS_PER_RUN=${2:-5}
PLAIN=127.0.0.1:19381
TRACED=127.0.0.1:19383
SAMPLED=127.0.0.1:19387
SINK=127.0.0.1:19385

cargo build --release --quiet --features otlp --bin ratekeeper --example loadgen --example otlp_sink
BIN=target/release
trap stop_started EXIT

sink_log=$(mktemp)
taskset -c 1 $BIN/examples/otlp_sink --addr $SINK >"$sink_log" & pids+=($!)
taskset -c 0 $BIN/ratekeeper serve --config benches/bench.yaml --grpc-addr $PLAIN \
  --admin-addr 127.0.0.1:19382 2>/dev/null & pids+=($!)
taskset -c 0 $BIN/ratekeeper serve --config benches/bench.yaml --grpc-addr $TRACED \
  --admin-addr 127.0.0.1:19384 --otlp-endpoint "http://$SINK" 2>/dev/null & pids+=($!)
taskset -c 0 $BIN/ratekeeper serve --config benches/bench.yaml --grpc-addr $SAMPLED \
  --admin-addr 127.0.0.1:19388 --otlp-endpoint "http://$SINK" --otlp-sample-ratio 0.01 \
  2>/dev/null & pids+=($!)
for addr in $SINK $PLAIN $TRACED $SAMPLED; do wait_port $addr; done

run() { # addr
  taskset -c 1 $BIN/examples/loadgen --addr "http://$1" --connections 4 --concurrency 64 \
    --duration "${SECONDS_PER_RUN}s" --warmup 1s --keys 100000 --domain bench --api envoy | grep '^RESULT '
}

traced_ratios=()
sampled_ratios=()
for round in $(seq 1 "$ROUNDS"); do
  plain=$(run $PLAIN)
  traced=$(run $TRACED)
  sampled=$(run $SAMPLED)
  echo "round $round plain:   $plain"
  echo "round $round traced:  $traced"
  echo "round $round sampled: $sampled"
  traced_ratios+=("$(awk -v a="$(field rps "$traced")" -v b="$(field rps "$plain")" 'BEGIN { printf "%.3f", a / b }')")
  sampled_ratios+=("$(awk -v a="$(field rps "$sampled")" -v b="$(field rps "$plain")" 'BEGIN { printf "%.3f", a / b }')")
done
echo
echo "all traced / plain throughput, median of $ROUNDS rounds: $(printf '%s\n' "${traced_ratios[@]}" | median)"
echo "1 % sampled / plain throughput, median of $ROUNDS rounds: $(printf '%s\n' "${sampled_ratios[@]}" | median)"
echo "spans received by the collector: $(tail -n 1 "$sink_log")"
rm -f "$sink_log"
