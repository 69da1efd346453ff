#!/usr/bin/env bash
# Coverage-guided fuzzing of every target for a bounded time each:
#   fuzz/run.sh [SECONDS_PER_TARGET]   (default 60)
# Needs a nightly toolchain (libFuzzer's instrumentation) and cargo-fuzz,
# installed here if missing. A crash is copied to fuzz/regressions/<target>/,
# where tests/fuzz_targets.rs replays it on stable in every test run: commit
# it with the fix.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-60}"

if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi

status=0
for target in config_loader matcher_and_keys; do
  echo "== $target: ${seconds}s"
  # Work on a copy of the seeds so the committed corpus stays small.
  work="target/corpus/$target"
  mkdir -p "$work" "artifacts/$target"
  cp corpus/"$target"/seed-* "$work"/
  if ! cargo +nightly fuzz run "$target" "$work" -- \
      -max_total_time="$seconds" -max_len=65536 -timeout=10; then
    status=1
    for crash in artifacts/"$target"/*; do
      [ -f "$crash" ] || continue
      cp "$crash" regressions/"$target"/
      echo "crash saved: fuzz/regressions/$target/$(basename "$crash")"
    done
  fi
done
exit "$status"
