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

# field NAME LINE: the value of NAME=... in a loadgen RESULT line.
field() { sed -E "s/.* $1=([0-9.]+).*/\1/" <<<"$2"; }
# median: of the numbers on stdin, one per line.
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
