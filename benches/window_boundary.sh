#!/usr/bin/env bash
# Failed calls at a window boundary. Every key counted in a fixed window expires at the window's
# end unless its expiry is spread: with many keys per window Redis then spends up to 25 ms of
# each 100 ms cron tick deleting them, and calls past --store-timeout fail. This run fills a
# minute with KEYS keys, then crosses into the next minute under an open-loop load, once per
# setting of --expiration-jitter-max in JITTERS ("default" runs without the flag), and prints
# each run's failed calls, latency and Redis's expiry counters side by side.
#
#   benches/window_boundary.sh       # after building: cargo build --release
#
# Needs: RLS_BENCH (the rls-bench binary); redis-server, redis-cli, taskset, python3 on PATH.
# Optional: KEYS (100000), RATE (8900 req/s across the boundary), JITTERS ("default 0s"),
#   RK (target/release/ratekeeper), GRPC_PORT (29191; Redis on GRPC_PORT + 2), LOGS (where a
#   run with failed calls keeps its server's log and Redis's latency events, target/bench-logs).
# Each setting waits for its own minute: about a minute and a half a setting.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/benches/common.sh"
RK=${RK:-$ROOT/target/release/ratekeeper}
: "${RLS_BENCH:?set RLS_BENCH to the rls-bench binary}"
for tool in "$RK" "$RLS_BENCH"; do
  [ -x "$tool" ] || { echo "not executable: $tool" >&2; exit 2; }
done
KEYS=${KEYS:-100000} RATE=${RATE:-8900} JITTERS=${JITTERS:-default 0s}
LOGS=${LOGS:-$ROOT/target/bench-logs}
GRPC_PORT=${GRPC_PORT:-29191} HTTP_PORT=$((GRPC_PORT + 1)) REDIS_PORT=$((GRPC_PORT + 2))
start_bench_work

write_bench_rules "$WORK/rules"
redis_stat() { redis-cli -p $REDIS_PORT info stats | tr -d '\r' | sed -nE "s/^$1:([0-9]+)/\1/p"; }
# Sleeps until Redis's clock is at second $1 of a minute.
until_second() {
  local now
  now=$(redis-cli -p $REDIS_PORT time | head -1)
  sleep $(( ($1 - now % 60 + 60) % 60 ))
}
load() { # LABEL ARGS...
  local label=$1; shift
  taskset -c 1 "$RLS_BENCH" load --addr http://127.0.0.1:$GRPC_PORT --domain bench --key user \
    --keys "$KEYS" --dist uniform --concurrency 64 --connections 4 --warmup 0s \
    --json "$WORK/$label.json" "$@" >"$WORK/$label.txt" 2>&1
}

printf '%-12s %8s %8s %7s %7s %8s %7s %8s %9s %8s\n' jitter-max offered served failed p99_ms \
  p999_ms max_ms expired cap_hits gen_cpu
for jitter in $JITTERS; do
  redis-cli -p $REDIS_PORT shutdown nosave >/dev/null 2>&1
  taskset -c 0 redis-server --port $REDIS_PORT --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize yes --dir "$WORK" --logfile "$WORK/redis.log" >/dev/null
  wait_port 127.0.0.1:$REDIS_PORT || exit 1
  # Redis records what blocked it for 5 ms or more (the expire cycle, a slow command).
  redis-cli -p $REDIS_PORT config set latency-monitor-threshold 5 >/dev/null
  flag=()
  [ "$jitter" = default ] || flag=(--expiration-jitter-max "$jitter")
  taskset -c 0 "$RK" serve --config "$WORK/rules" --grpc-addr 127.0.0.1:$GRPC_PORT \
    --admin-addr 127.0.0.1:$HTTP_PORT --store redis --redis-url redis://127.0.0.1:$REDIS_PORT \
    "${flag[@]}" >"$WORK/server.log" 2>&1 &
  server_pid=$!
  wait_port 127.0.0.1:$GRPC_PORT || { echo "ratekeeper did not start:" >&2; tail -5 "$WORK/server.log" >&2; exit 1; }
  # Fill one minute with (nearly) every key, closed loop, from second 38 to 50; then cross the
  # minute at RATE from second 51 to second 11 of the next.
  until_second 38
  load fill --duration 12s
  until_second 51
  expired0=$(redis_stat expired_keys) capped0=$(redis_stat expired_time_cap_reached_count)
  load cross --duration 20s --rate "$RATE"
  expired=$(( $(redis_stat expired_keys) - expired0 ))
  capped=$(( $(redis_stat expired_time_cap_reached_count) - capped0 ))
  stop_server "$server_pid" "$GRPC_PORT"; server_pid=
  if [ "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("errors", 0))' "$WORK/cross.json")" != 0 ]; then
    kept="$LOGS/window-boundary-$(date +%Y%m%dT%H%M%S)-$jitter"
    mkdir -p "$kept"
    cp "$WORK/server.log" "$WORK/cross.txt" "$kept/"
    redis-cli -p $REDIS_PORT latency latest >"$kept/redis-latency.txt"
    echo "failed calls: logs kept in $kept" >&2
  fi
  python3 - "$WORK/cross.json" "$jitter" "$RATE" "$expired" "$capped" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
lat = r.get("latency_us", {})
print("%-12s %8s %8.0f %7d %7.2f %8.2f %7.2f %8s %9s %7.0f%%" % (
    sys.argv[2], sys.argv[3], r["rps"], r.get("errors", 0), lat.get("p99", 0) / 1000,
    lat.get("p999", 0) / 1000, lat.get("max", 0) / 1000, sys.argv[4], sys.argv[5],
    r.get("client_cpu_pct", 0)))
PY
done
