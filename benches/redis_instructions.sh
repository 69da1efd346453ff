#!/usr/bin/env bash
# Instructions Redis executes per decision, counted by valgrind's callgrind: ratekeeper's calls
# (runs of windowed fixed-window keys, as its Redis store sends Envoy's requests) against
# envoyproxy/ratelimit's commands for the same decisions (INCRBY + EXPIRE per descriptor), on the
# same number of keys, in calls of the same size. Instructions, not seconds: the figures repeat
# on a noisy machine, whatever else it runs (the CPU time of the same calls, which also pays for
# memory stalls and system calls, is in benches/sidebyside.sh).
#
#   benches/redis_instructions.sh
#
# Needs valgrind (callgrind_control), redis-server, redis-cli and python3 on PATH.
# Optional: N (decisions measured, 200000), BATCH (decisions per call, 23), KEYS (100000),
#   DESCS (descriptors per decision, 1), PORT (29400).
#
# Three states of the keys, each measured on a fresh redis-server under callgrind:
#   steady    every key already counted in this window (a first pass, not measured, counts
#             them): the common case of a hot key
#   fresh     an empty Redis: a window's first hit on every key creates it
#   rollover  the first pass in one window, the measured pass in the next: each key's first
#             hit of a window, with the last window's keys still there
# ratekeeper's calls carry a fixed time (the code's injected-time argument) so no window ends
# during the slow run; in production each call reads Redis's TIME once instead. Under valgrind a
# pass takes longer than a window, while Redis expires keys by its own clock: both sides' keys
# get an hour more to live (ratekeeper's TTL grace argument, upstream's EXPIRE 3600 instead of
# 60, which costs the same), or "steady" would measure keys expiring and being created again.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
N=${N:-200000} BATCH=${BATCH:-23} KEYS=${KEYS:-100000} DESCS=${DESCS:-1} PORT=${PORT:-29400}
for tool in valgrind callgrind_control redis-server redis-cli python3; do
  command -v $tool >/dev/null || { echo "needs $tool on PATH" >&2; exit 2; }
done
WORK=$(mktemp -d)
vg_pid=
cleanup() {
  [ -n "$vg_pid" ] && { redis-cli -p $PORT shutdown nosave >/dev/null 2>&1; wait $vg_pid 2>/dev/null; }
  rm -rf "$WORK"
}
trap cleanup EXIT

# The function library as ratekeeper loads it (src/store/redis/decide.rs), under a fixed name.
{
  echo '#!lua name=ratekeeper_bench'
  cat "$ROOT/src/store/redis/ratekeeper.lua"
  echo "redis.register_function{function_name='ratekeeper_bench', callback=decide_all}"
} >"$WORK/library.lua"

# gen WHO NOW SEED -> RESP of N decisions for WHO (ratekeeper or upstream) at Unix ms NOW.
gen() {
  PYTHONPATH="$ROOT/benches" python3 - "$1" "$2" "$3" "$N" "$BATCH" "$KEYS" "$DESCS" <<'PY'
import random, sys
from ratekeeper_keys import WINDOW_MS as WINDOW, counter
who, now, seed, n, batch, keys, descs = sys.argv[1], *map(int, sys.argv[2:])
start = now - now % WINDOW
rnd = random.Random(seed)
counters = [counter(v) for v in range(keys)] if who == "ratekeeper" else None
def cmd(*args):
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
out = sys.stdout.buffer
for _ in range(n // batch):
    picks = [rnd.randrange(keys) for _ in range(batch * descs)]
    if who == "ratekeeper":
        ks = [counters[p] + b"|%d" % (start // WINDOW) for p in picks]
        out.write(cmd(b"FCALL", b"ratekeeper_bench", b"%d" % len(ks), *ks, b"%d" % now, b"0", b"3600000",
                      b"4", b"%d" % len(ks), b"60000", b"1", b"%d" % (start // WINDOW)))
    else:
        # Upstream's key: domain_key_value_windowstart (seconds).
        for p in picks:
            k = b"bench_user_%d_%d" % (p, start // 1000)
            out.write(cmd(b"INCRBY", k, b"1") + cmd(b"EXPIRE", k, b"3600"))
PY
}

# measure WHO STATE -> instructions per decision.
measure() {
  local who=$1 state=$2 now=1700000010000 warm=
  case $state in
    steady) warm=$now ;;
    rollover) warm=$now; now=$((now + 60000)) ;;
  esac
  [ -n "$warm" ] && gen "$who" "$warm" 1 >"$WORK/warm.resp"
  gen "$who" "$now" 2 >"$WORK/measured.resp"
  valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.%p" redis-server --port $PORT \
    --bind 127.0.0.1 --save '' --appendonly no >"$WORK/valgrind.log" 2>&1 &
  vg_pid=$!
  for _ in $(seq 600); do redis-cli -p $PORT ping >/dev/null 2>&1 && break; sleep 0.1; done
  [ "$who" = ratekeeper ] && redis-cli -p $PORT -x function load <"$WORK/library.lua" >/dev/null
  [ -n "$warm" ] && redis-cli -p $PORT --pipe <"$WORK/warm.resp" >/dev/null
  callgrind_control -z $vg_pid >/dev/null 2>&1
  redis-cli -p $PORT --pipe <"$WORK/measured.resp" >"$WORK/pipe.log"
  # The dump is asked for until it is written: the first request to a
  # freshly started valgrind can go unanswered.
  for _ in $(seq 20); do
    callgrind_control -d $vg_pid >/dev/null 2>&1
    ls "$WORK"/cg.*.1 >/dev/null 2>&1 && break
    sleep 0.5
  done
  grep -q "errors: 0," "$WORK/pipe.log" || { echo "$who $state: Redis answered errors" >&2; cat "$WORK/pipe.log" >&2; exit 1; }
  redis-cli -p $PORT shutdown nosave >/dev/null 2>&1
  wait $vg_pid 2>/dev/null; vg_pid=
  local dump
  dump=$(ls "$WORK"/cg.*.1)
  awk -v n=$((N / BATCH * BATCH)) '/^(summary|totals):/ { printf "%.0f", $2 / n; exit }' "$dump"
  rm -f "$WORK"/cg.*
}

echo "| keys | ratekeeper, instructions per decision | envoyproxy/ratelimit's commands | ratio |"
echo "|---|---|---|---|"
for state in steady fresh rollover; do
  rk=$(measure ratekeeper $state) up=$(measure upstream $state)
  echo "| $state | $rk | $up | $(python3 -c "print(f'{$rk / $up:.2f}')") |"
done
echo
echo "($N decisions of $DESCS descriptor(s) on $KEYS keys, $BATCH decisions per call or pipeline)"
