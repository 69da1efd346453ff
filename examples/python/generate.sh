#!/usr/bin/env bash
# Generates the Python stubs for ratekeeper's gRPC APIs into examples/python/gen/
# (gitignored) from the repository's proto/ directory.
#
# Needs grpcio-tools (see requirements.txt). Uses $PYTHON, default python3.
# Works from any directory: examples/python/generate.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
python="${PYTHON:-python3}"
out="$here/gen"

# Every file the two services need: ratekeeper's own API, and Envoy's rate
# limit service with the files it imports. google/protobuf/*.proto come with
# grpc_tools, which adds them to the include path itself.
protos=(
  ratekeeper/v1/ratekeeper.proto
  ratekeeper/v1/leases.proto
  ratekeeper/v1/reservations.proto
  envoy/service/ratelimit/v3/rls.proto
  envoy/extensions/common/ratelimit/v3/ratelimit.proto
  envoy/type/v3/ratelimit_unit.proto
  envoy/config/core/v3/base.proto
)

# Start clean so a removed proto leaves no stale module behind.
rm -rf "$out"
mkdir -p "$out"

cd "$root"
"$python" -m grpc_tools.protoc \
  -I proto \
  --python_out="$out" \
  --pyi_out="$out" \
  --grpc_python_out="$out" \
  "${protos[@]}"

echo "generated Python stubs in ${out#"$root"/}"
