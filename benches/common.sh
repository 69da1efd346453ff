# Shell helpers shared by the load benchmarks (sourced, not run).

# Processes a benchmark started; stopped on exit by `stop_started`.
pids=()
stop_started() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }

wait_port() { # host:port
  for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "nothing listening on $1" >&2; return 1
}

# start_bench_work: a work directory in WORK and, on exit, the server at
# $server_pid and the Redis on $REDIS_PORT stopped and WORK removed (the rls-bench benchmarks).
start_bench_work() {
  WORK=$(mktemp -d)
  server_pid=
  trap 'stop_bench_work' EXIT
}
stop_bench_work() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null
  redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1
  rm -rf "$WORK"
}

# port_open PORT: whether something listens on 127.0.0.1:PORT.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# stop_server PID PORT: stops the server and waits until its port is free.
stop_server() {
  kill "$1"; wait "$1" 2>/dev/null
  for _ in $(seq 100); do port_open "$2" || return 0; sleep 0.05; done
}

# write_bench_rules DIR: the limit of the rls-bench benchmarks (domain bench, key user,
# 1,000,000 a minute: never reached, so every call takes the counting path) as DIR/bench.yaml.
write_bench_rules() {
  mkdir -p "$1"
  cat >"$1/bench.yaml" <<'YAML'
domain: bench
descriptors:
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 1000000}
YAML
}

# field NAME LINE: the value of NAME=... in a loadgen RESULT line.
field() { sed -E "s/.* $1=([0-9.]+).*/\1/" <<<"$2"; }
# median: of the numbers on stdin, one per line.
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
