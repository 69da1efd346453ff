#!/usr/bin/env bash
# ratekeeper, its closest peer (limitador) and a no-op gRPC server under the same load, in one
# run, from an independent load generator (rls-bench), with the generator's own CPU reported:
# a run whose generator used more than MAX_GEN_CPU % of its core measured the generator, and is
# printed as INVALID instead of a figure.
#
#   benches/sidebyside.sh            # after building: cargo build --release
#
# Needs (paths given by environment, nothing is vendored):
#   RLS_BENCH   the rls-bench binary (an Envoy RLS load generator that reports its own CPU)
#   LIMITADOR   the limitador-server binary
#   redis-server, redis-cli, taskset, python3 on PATH
# Optional: DUR (measured seconds per run, 8), WARMUP (2), CONC (64 in flight), CONNS (4),
#   KEYS (100000 uniform values), ROUNDS (1), MAX_GEN_CPU (90), RK (ratekeeper binary,
#   target/release/ratekeeper), PASSES ("saturation latency descriptors upstream"), LOGS (where
#   a run with failed calls keeps its server's and Redis's logs, target/bench-logs).
#
# Each server (and its Redis) runs on CPU 0, the generator on CPU 1; servers are loaded in turn.
# Passes:
#   saturation   closed loop, CONC in flight: req/s, latency, server CPU per decision, Redis CPU
#                per decision (Redis's used_cpu_user+sys over the run / decisions)
#   latency      open loop at 70 % of limitador's saturation in each mode (the same rate for
#                both servers), and ratekeeper's Redis mode at 80 % of its own saturation
#   descriptors  3 descriptors per request on ratekeeper's Redis store: Redis CPU per extra
#                descriptor (against its 1-descriptor row)
#   upstream     envoyproxy/ratelimit's command pattern for one descriptor (INCRBY + EXPIRE,
#                pipelined) replayed into the same Redis: its Redis CPU per decision, once
#                by redis-cli --pipe (one endless pipeline: the pattern's floor) and once in
#                pipelines as full as ratekeeper's calls were in this round (its saturation
#                run's decisions per call, over 2 connections: the same batching); then
#                ratekeeper's own calls (1 and 3 descriptors) replayed the same way, so both
#                are measured with Redis alone on its core (in the runs above a server shares
#                it, as it would not in production)
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/benches/common.sh"
RK=${RK:-$ROOT/target/release/ratekeeper}
: "${RLS_BENCH:?set RLS_BENCH to the rls-bench binary}" "${LIMITADOR:?set LIMITADOR to the limitador-server binary}"
for tool in "$RK" "$RLS_BENCH" "$LIMITADOR"; do
  [ -x "$tool" ] || { echo "not executable: $tool" >&2; exit 2; }
done
DUR=${DUR:-8} WARMUP=${WARMUP:-2} CONC=${CONC:-64} CONNS=${CONNS:-4} KEYS=${KEYS:-100000}
ROUNDS=${ROUNDS:-1} MAX_GEN_CPU=${MAX_GEN_CPU:-90} LOGS=${LOGS:-$ROOT/target/bench-logs}
PASSES=${PASSES:-saturation latency descriptors upstream}
GRPC_PORT=${GRPC_PORT:-29181} HTTP_PORT=$((GRPC_PORT + 1)) REDIS_PORT=$((GRPC_PORT + 2))
start_bench_work

# The same limit for both servers (limitador's below).
write_bench_rules "$WORK/rules"
cat >"$WORK/limitador.yaml" <<'YAML'
- namespace: bench
  name: bench-per-user
  max_value: 1000000
  seconds: 60
  conditions: []
  variables: ["descriptors[0].user"]
YAML

redis_start() {
  redis-cli -p $REDIS_PORT shutdown nosave >/dev/null 2>&1
  taskset -c 0 redis-server --port $REDIS_PORT --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize yes --dir "$WORK" --logfile "$WORK/redis.log" >/dev/null
  wait_port 127.0.0.1:$REDIS_PORT
}
redis_cpu() { redis-cli -p $REDIS_PORT info cpu | tr -d '\r' | awk -F: '/^used_cpu_(user|sys):/ { s += $2 } END { printf "%.6f", s }'; }
proc_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

# Starts target $1 on CPU 0; sets server_pid.
start() {
  local redis_url=redis://127.0.0.1:$REDIS_PORT cmd
  case $1 in
    noop) cmd=("$RLS_BENCH" mock --addr 127.0.0.1:$GRPC_PORT --limit 1000000000) ;;
    rk-mem) cmd=("$RK" serve --config "$WORK/rules" --grpc-addr 127.0.0.1:$GRPC_PORT
              --admin-addr 127.0.0.1:$HTTP_PORT --store memory) ;;
    rk-redis) cmd=("$RK" serve --config "$WORK/rules" --grpc-addr 127.0.0.1:$GRPC_PORT
              --admin-addr 127.0.0.1:$HTTP_PORT --store redis --redis-url "$redis_url") ;;
    lim-mem) cmd=("$LIMITADOR" -b 127.0.0.1 -p $GRPC_PORT -B 127.0.0.1 -P $HTTP_PORT
              "$WORK/limitador.yaml" memory) ;;
    lim-redis) cmd=("$LIMITADOR" -b 127.0.0.1 -p $GRPC_PORT -B 127.0.0.1 -P $HTTP_PORT
              "$WORK/limitador.yaml" redis "$redis_url") ;;
  esac
  # A server still on the port would be measured instead of this one.
  port_open $GRPC_PORT && { echo "port $GRPC_PORT is already in use" >&2; exit 1; }
  taskset -c 0 "${cmd[@]}" >"$WORK/$1.log" 2>&1 &
  server_pid=$!
  wait_port 127.0.0.1:$GRPC_PORT || { echo "$1 did not start:" >&2; tail -5 "$WORK/$1.log" >&2; exit 1; }
}

# Stops the server and waits until its port is free.
stop() {
  stop_server "$server_pid" "$GRPC_PORT"; server_pid=
}

# run TARGET DESCRIPTORS [RATE LABEL] -> one JSON line with the generator's figures and the CPU
# used; LABEL names the load for the summary ("closed" by default).
run() {
  local target=$1 descs=$2 rate=${3:-} label=${4:-closed} uses_redis=no
  case $target in *-redis) uses_redis=yes; redis_start ;; esac
  start "$target"
  local t0 r0=0 t1 r1=0
  t0=$(proc_ticks $server_pid)
  [ $uses_redis = yes ] && r0=$(redis_cpu)
  taskset -c 1 "$RLS_BENCH" load --addr http://127.0.0.1:$GRPC_PORT --domain bench --key user \
    --keys "$KEYS" --dist uniform --concurrency "$CONC" --connections "$CONNS" \
    --descriptors-per-request "$descs" --duration "${DUR}s" --warmup "${WARMUP}s" \
    ${rate:+--rate $rate} --json "$WORK/out.json" >"$WORK/out.txt" 2>&1
  t1=$(proc_ticks $server_pid)
  local calls=0
  if [ $uses_redis = yes ]; then
    r1=$(redis_cpu)
    calls=$(redis-cli -p $REDIS_PORT info commandstats | tr -d '\r' \
      | sed -nE 's/^cmdstat_(fcall|evalsha):calls=([0-9]+).*/\2/p' | head -1)
  fi
  stop
  [ $uses_redis = yes ] && redis-cli -p $REDIS_PORT shutdown nosave >/dev/null 2>&1
  # A run with failed calls keeps its server's log (and its Redis's) to say why.
  local failed
  failed=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1])).get('errors', 0))" "$WORK/out.json" 2>/dev/null)
  if [ "${failed:-0}" != 0 ]; then
    local kept="$LOGS/round$round-$target-$descs-${label//[^a-z0-9-]/_}"
    mkdir -p "$LOGS" && cp "$WORK/$target.log" "$kept.log"
    [ $uses_redis = yes ] && cp "$WORK/redis.log" "$kept.redis.log"
    echo "$target ($label): $failed failed calls; logs kept in $kept.*" >&2
  fi
  python3 - "$WORK/out.json" "$target" "$descs" "$((t1 - t0))" "$r0" "$r1" "$DUR" "$WARMUP" "$(getconf CLK_TCK)" "$label" "$round" "${calls:-0}" <<'PY'
import json, sys
out, target, descs, ticks, r0, r1, dur, warmup, hz, label, rnd, calls = sys.argv[1:]
j = json.load(open(out))
wall = float(dur) + float(warmup)  # CPU is sampled over warm-up and measured window alike
served = j["rps"] * wall
j.update(target=target, descs=int(descs), label=label, round=int(rnd),
         server_cpu_pct=100.0 * int(ticks) / int(hz) / wall,
         server_us=1e6 * int(ticks) / int(hz) / max(served, 1),
         redis_us=1e6 * (float(r1) - float(r0)) / max(served, 1) if float(r1) > 0 else None,
         per_call=served / int(calls) if int(calls) > 0 else None)
print(json.dumps(j))
PY
}

# Replays envoyproxy/ratelimit's commands for N one-descriptor decisions (INCRBY key 1, EXPIRE
# key 60 on uniform keys) into a fresh Redis; prints Redis CPU per decision. With BATCH, in
# pipelines of BATCH decisions over 2 connections, one pipeline out per connection at a time
# (as a client batching like ratekeeper would); without it, as one endless redis-cli --pipe.
upstream() {
  local n=400000 batch=${1:-} label
  redis_start
  python3 - "$n" "$KEYS" >"$WORK/upstream.resp" <<'PY'
import random, sys
n, keys = int(sys.argv[1]), int(sys.argv[2])
def cmd(*a):
    return "*%d\r\n" % len(a) + "".join("$%d\r\n%s\r\n" % (len(x), x) for x in a)
out = sys.stdout
for _ in range(n):
    k = "bench_user_%d_1700000000" % random.randrange(keys)
    out.write(cmd("INCRBY", k, "1")); out.write(cmd("EXPIRE", k, "60"))
PY
  local r0 r1
  r0=$(redis_cpu)
  if [ -z "$batch" ]; then
    label="redis-cli --pipe"
    taskset -c 1 redis-cli -p $REDIS_PORT --pipe <"$WORK/upstream.resp" >/dev/null
  else
    label="pipelines of $batch, 2 connections"
    taskset -c 1 python3 - "$WORK/upstream.resp" "$REDIS_PORT" "$batch" <<'PY'
import socket, sys, threading
data, port, batch = open(sys.argv[1], "rb").read(), int(sys.argv[2]), int(sys.argv[3])
# Every command here is 7 lines (*3, then three bulk strings) and answers one line.
lines = data.split(b"\r\n")
cmds = [b"\r\n".join(lines[k:k + 7]) + b"\r\n" for k in range(0, len(lines) - 1, 7)]
pipes = [(b"".join(cmds[k:k + 2 * batch]), len(cmds[k:k + 2 * batch]))
         for k in range(0, len(cmds), 2 * batch)]
def worker(part):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = s.makefile("rb")
    for payload, replies in part:
        s.sendall(payload)
        for _ in range(replies):
            f.readline()
threads = [threading.Thread(target=worker, args=(pipes[c::2],)) for c in range(2)]
for t in threads: t.start()
for t in threads: t.join()
PY
  fi
  r1=$(redis_cpu)
  redis-cli -p $REDIS_PORT shutdown nosave >/dev/null 2>&1
  python3 -c "import json,sys; print(json.dumps({'target': 'upstream-pattern', 'label': sys.argv[4], 'redis_us': (float(sys.argv[2]) - float(sys.argv[1])) * 1e6 / int(sys.argv[3])}))" "$r0" "$r1" "$n" "$label"
}

# Replays ratekeeper's own calls for N decisions of DESCS descriptors each (the FCALLs its Redis
# store sends for Envoy requests: runs of windowed keys, Redis's TIME), BATCH decisions per call,
# into a fresh Redis the same way as upstream's commands with BATCH: over 2 connections, one call
# out per connection, from CPU 1 while Redis has CPU 0 to itself. Redis's cost of the calls
# themselves, without a server beside it on its core. Prints Redis CPU per decision.
replay() {
  local batch=$1 descs=$2 n=400000
  redis_start
  # A ratekeeper loads its code into this Redis (one decision), then leaves it.
  start rk-redis
  taskset -c 1 "$RLS_BENCH" load --addr http://127.0.0.1:$GRPC_PORT --domain bench --key user \
    --keys 1 --concurrency 1 --connections 1 --duration 1s --warmup 0s --rate 5 \
    --json "$WORK/load.json" >/dev/null 2>&1
  stop
  local function
  function=$(redis-cli -p $REDIS_PORT function list | grep -m1 -o 'ratekeeper_decide_[0-9a-f]*')
  [ -n "$function" ] || { echo "ratekeeper's code is not in Redis" >&2; exit 1; }
  redis-cli -p $REDIS_PORT flushall >/dev/null
  local r0 r1
  r0=$(redis_cpu)
  PYTHONPATH="$ROOT/benches" taskset -c 1 python3 - "$REDIS_PORT" "$function" "$n" "$batch" "$descs" "$KEYS" <<'PY'
import random, socket, sys, threading, time
from ratekeeper_keys import WINDOW_MS as WINDOW, counter
port, function, n, batch, descs, keys = int(sys.argv[1]), sys.argv[2].encode(), *map(int, sys.argv[3:])
counters = [counter(v) for v in range(keys)]
def bulk(x):
    return b"$%d\r\n%s\r\n" % (len(x), x)
# Every call made before any is sent (so Redis is fed as fast as the pattern's pre-made file
# feeds it): one run (window, 1 hit) of its keys, windowed for this host's clock when sent
# (the placeholder is as long as a window number); '' = Redis's TIME.
PLACE = b"S" * len(b"%d" % (int(time.time() * 1000) // WINDOW))
def call(decisions):
    ks = [counters[random.randrange(keys)] + b"|" + PLACE for _ in range(decisions * descs)]
    args = [b"FCALL", function, b"%d" % len(ks), *ks, b"", b"0", b"0", b"4", b"%d" % len(ks), b"60000", b"1", PLACE]
    return b"*%d\r\n" % len(args) + b"".join(bulk(a) for a in args)
def worker(count):
    calls = [call(batch) for _ in range(count)]
    ready.wait()
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = s.makefile("rb")
    for payload in calls:
        now = int(time.time() * 1000)
        s.sendall(payload.replace(PLACE, b"%d" % (now // WINDOW)))
        head = f.readline()
        if not head.startswith(b"*"):
            sys.exit("unexpected reply: %r" % head)
        for _ in range(int(head[1:])):
            f.readline()
ready = threading.Barrier(2)
threads = [threading.Thread(target=worker, args=(n // batch // 2,)) for _ in range(2)]
for t in threads: t.start()
for t in threads: t.join()
PY
  r1=$(redis_cpu)
  redis-cli -p $REDIS_PORT shutdown nosave >/dev/null 2>&1
  python3 -c "import json,sys; print(json.dumps({'target': 'rk-replay', 'descs': int(sys.argv[5]), 'label': sys.argv[4], 'redis_us': (float(sys.argv[2]) - float(sys.argv[1])) * 1e6 / int(sys.argv[3])}))" \
    "$r0" "$r1" "$(( n / batch / 2 * 2 * batch ))" "calls of $batch, 2 connections" "$descs"
}

results=$WORK/results.jsonl
: >"$results"
for round in $(seq "$ROUNDS"); do
  for pass in $PASSES; do
    case $pass in
      saturation)
        for t in noop rk-mem lim-mem rk-redis lim-redis; do run $t 1 >>"$results"; done ;;
      latency)
        sat() { python3 -c "import json,sys
rows=[json.loads(l) for l in open(sys.argv[1]) if 'rps' in l]
rows=[r for r in rows if r['target']==sys.argv[2] and r['mode']=='closed' and r['descs']==1]
print(int(rows[-1]['rps']*float(sys.argv[3])))" "$results" "$1" "$2"; }
        mem_rate=$(sat lim-mem 0.7) redis_rate=$(sat lim-redis 0.7) rk_redis_80=$(sat rk-redis 0.8)
        run rk-mem 1 "$mem_rate" "70% of lim-mem" >>"$results"
        run lim-mem 1 "$mem_rate" "70% of lim-mem" >>"$results"
        run rk-redis 1 "$redis_rate" "70% of lim-redis" >>"$results"
        run lim-redis 1 "$redis_rate" "70% of lim-redis" >>"$results"
        run rk-redis 1 "$rk_redis_80" "80% of rk-redis" >>"$results" ;;
      descriptors)
        # (limitador's limit counts the first descriptor only: no peer row here.)
        run rk-redis 3 >>"$results" ;;
      upstream)
        upstream >>"$results"
        batch=$(python3 -c "import json,sys
rows=[json.loads(l) for l in open(sys.argv[1]) if 'rps' in l]
rows=[r for r in rows if r['target']=='rk-redis' and r['mode']=='closed' and r['descs']==1 and r.get('per_call')]
print(round(rows[-1]['per_call']) if rows else '')" "$results")
        if [ -n "$batch" ]; then
          upstream "$batch" >>"$results"
          replay "$batch" 1 >>"$results"
          replay "$batch" 3 >>"$results"
        fi ;;
    esac
  done
done

python3 - "$results" "$MAX_GEN_CPU" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
limit = float(sys.argv[2])
print("| target | descs | load | req/s | p50 µs | p99 µs | p99.9 µs | errors | server CPU | server µs/decision | Redis µs/decision | decisions/call | generator CPU |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    if r["target"] == "upstream-pattern":
        print(f"| envoyproxy/ratelimit's commands (INCRBY+EXPIRE) | 1 | {r['label']} | | | | | | | | {r['redis_us']:.2f} | |")
        continue
    if r["target"] == "rk-replay":
        print(f"| ratekeeper's calls, replayed | {r['descs']} | {r['label']} | | | | | | | | {r['redis_us']:.2f} | |")
        continue
    lat = r["latency_us"]; gen = r.get("client_cpu_pct") or 0.0
    load = "closed, %d in flight" % r["concurrency"] if r["mode"] == "closed" else "open, %d/s" % r["target_rate"]
    redis = "" if r["redis_us"] is None else f"{r['redis_us']:.2f}"
    if gen > limit:
        print(f"| {r['target']} | {r['descs']} | {load} | INVALID: generator at {gen:.0f} % of its core | | | | | | | | | {gen:.0f} % |")
        continue
    per_call = "" if not r.get("per_call") else f"{r['per_call']:.1f}"
    print(f"| {r['target']} | {r['descs']} | {load} | {r['rps']:.0f} | {lat.get('p50')} | {lat.get('p99')} | {lat.get('p999')} | {r['errors']} | {r['server_cpu_pct']:.0f} % | {r['server_us']:.1f} | {redis} | {per_call} | {gen:.0f} % |")

# Medians over rounds (INVALID runs left out), and the ratios the targets are stated in.
from statistics import median
groups = {}
for r in rows:
    if r["target"] not in ("upstream-pattern", "rk-replay") and (r.get("client_cpu_pct") or 0) > limit:
        continue
    groups.setdefault((r["target"], r.get("descs", 1), r["label"]), []).append(r)
print()
print("Medians over %d round(s):" % max(r.get("round", 1) for r in rows))
print()
print("| target | descs | load | req/s | p99 µs | p99.9 µs | errors | Redis µs/decision | generator CPU |")
print("|---|---|---|---|---|---|---|---|---|")
med = {}
for (t, d, l), rs in groups.items():
    m = lambda f: median(f(r) for r in rs)
    if t in ("upstream-pattern", "rk-replay"):
        med[(t, d, l)] = {"redis_us": m(lambda r: r["redis_us"])}
        print(f"| {t} | {d} | {l} | | | | | {med[(t, d, l)]['redis_us']:.2f} | |")
        continue
    redis = [r["redis_us"] for r in rs if r["redis_us"] is not None]
    med[(t, d, l)] = {"rps": m(lambda r: r["rps"]), "p99": m(lambda r: r["latency_us"]["p99"]),
                      "redis_us": median(redis) if redis else None}
    print(f"| {t} | {d} | {l} | {med[(t, d, l)]['rps']:.0f} | {med[(t, d, l)]['p99']:.0f} | {m(lambda r: r['latency_us']['p999']):.0f} | {sum(r['errors'] for r in rs)} | "
          + ("" if not redis else f"{median(redis):.2f}") + f" | {m(lambda r: r.get('client_cpu_pct') or 0):.0f} % |")
def ratio(a, b, f="rps"):
    try:
        return f"{med[a][f] / med[b][f]:.2f}"
    except (KeyError, ZeroDivisionError, TypeError):
        return "n/a"
print()
print("rk-mem / lim-mem throughput:", ratio(("rk-mem", 1, "closed"), ("lim-mem", 1, "closed")))
print("rk-redis / lim-redis throughput:", ratio(("rk-redis", 1, "closed"), ("lim-redis", 1, "closed")))
print("rk-mem / lim-mem p99 at 70% of lim-mem:", ratio(("rk-mem", 1, "70% of lim-mem"), ("lim-mem", 1, "70% of lim-mem"), "p99"))
print("rk-redis / lim-redis p99 at 70% of lim-redis:", ratio(("rk-redis", 1, "70% of lim-redis"), ("lim-redis", 1, "70% of lim-redis"), "p99"))
print("Redis CPU per decision, rk-redis / upstream pattern (redis-cli --pipe):", ratio(("rk-redis", 1, "closed"), ("upstream-pattern", 1, "redis-cli --pipe"), "redis_us"))
for (t, d, l) in med:
    if t == "upstream-pattern" and l.startswith("pipelines"):
        print(f"Redis CPU per decision, rk-redis / upstream pattern ({l}):", ratio(("rk-redis", 1, "closed"), (t, d, l), "redis_us"))
try:
    extra = (med[("rk-redis", 3, "closed")]["redis_us"] - med[("rk-redis", 1, "closed")]["redis_us"]) / 2
    print(f"Redis CPU per extra descriptor (3 vs 1): {extra:.2f} µs")
except KeyError:
    pass
for (t, d, l) in med:
    if t == "rk-replay" and d == 1:
        pattern = ("upstream-pattern", 1, l.replace("calls", "pipelines"))
        print(f"Replayed alone on Redis's core ({l}): ratekeeper {med[(t, d, l)]['redis_us']:.2f} µs per decision, "
              f"upstream pattern {med[pattern]['redis_us']:.2f} µs: ratio", ratio((t, d, l), pattern, "redis_us"))
        if (t, 3, l) in med:
            print(f"Replayed alone, Redis CPU per extra descriptor (3 vs 1): {(med[(t, 3, l)]['redis_us'] - med[(t, 1, l)]['redis_us']) / 2:.2f} µs")
PY
