#!/usr/bin/env bash
# CI entry of the Python example: installs the pinned requirements into a
# virtualenv, generates the stubs, starts a ratekeeper server with
# examples/config.yaml on free loopback ports, and runs `client.py --check`
# against it. The server is always stopped when this script exits.
#
#   examples/python/run.sh            (from the repository root, or anywhere)
#
# Environment:
#   RATEKEEPER_BIN   the server binary (default target/debug/ratekeeper,
#                    relative to the repository root)
#   PYTHON_VENV      the virtualenv to create or reuse
#                    (default examples/python/.venv, gitignored)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

bin="${RATEKEEPER_BIN:-target/debug/ratekeeper}"
case "$bin" in /*) ;; *) bin="$root/$bin" ;; esac
if [[ ! -x "$bin" ]]; then
  echo "run.sh: no server binary at $bin" >&2
  echo "  build it with: cargo build --all-features --bin ratekeeper" >&2
  echo "  or point RATEKEEPER_BIN at one" >&2
  exit 1
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/ratekeeper-python.XXXXXX")"
server_pid=""
cleanup() {
  local status=$?
  if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    # Give it 5 s to stop, then kill it.
    for _ in $(seq 50); do
      kill -0 "$server_pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  if [[ $status -ne 0 && -s "$work/server.log" ]]; then
    echo "--- last lines of the server's log ---" >&2
    tail -n 30 "$work/server.log" >&2
  fi
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT
# Make Ctrl-C and SIGTERM go through the EXIT trap too.
trap 'exit 130' INT
trap 'exit 143' TERM

# 1. The virtualenv with the pinned requirements.
venv="${PYTHON_VENV:-$here/.venv}"
if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install --quiet --disable-pip-version-check -r "$here/requirements.txt"

# 2. The stubs.
PYTHON="$py" "$here/generate.sh"

# 3. The server, on two free loopback ports (both sockets are held open
# together so the ports differ).
read -r grpc_port admin_port < <("$py" - <<'PY'
import socket
a, b = socket.socket(), socket.socket()
a.bind(("127.0.0.1", 0)); b.bind(("127.0.0.1", 0))
print(a.getsockname()[1], b.getsockname()[1])
a.close(); b.close()
PY
)
if [[ -z "${admin_port:-}" ]]; then
  echo "run.sh: could not pick free ports" >&2
  exit 1
fi
grpc_addr="127.0.0.1:$grpc_port"
admin_addr="127.0.0.1:$admin_port"
echo "starting $bin on grpc $grpc_addr, admin $admin_addr"
"$bin" serve \
  --config "$root/examples/config.yaml" \
  --grpc-addr "$grpc_addr" \
  --admin-addr "$admin_addr" \
  --shutdown-timeout 2s \
  >"$work/server.log" 2>&1 &
server_pid=$!

# 4. Wait (at most 30 s) for /readyz to answer 200.
deadline=$((SECONDS + 30))
until "$py" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' \
    "http://$admin_addr/readyz" 2>/dev/null; do
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "run.sh: the server exited before it was ready" >&2
    exit 1
  fi
  if ((SECONDS >= deadline)); then
    echo "run.sh: the server was not ready within 30 s" >&2
    exit 1
  fi
  sleep 0.2
done
echo "server ready"

# 5. The checks (bounded: the client's calls have deadlines; this caps the lot).
timeout 120 "$py" "$here/client.py" --addr "$grpc_addr" --check
