#!/usr/bin/env bash
# Lints the protos with buf (config: proto/buf.yaml). Exits non-zero on any
# lint or compile error.
#
#   proto/lint.sh          (from the repository root, or anywhere)
#
# buf comes from npm (@bufbuild/buf ships the binary), pinned below, installed
# once into target/buf/<version>/ (gitignored; set BUF_CACHE_DIR to put it
# elsewhere). Needs node and npm.
set -euo pipefail

BUF_VERSION=1.75.0

proto="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$proto/.." && pwd)"
prefix="${BUF_CACHE_DIR:-$root/target/buf}/$BUF_VERSION"
buf="$prefix/node_modules/.bin/buf"

if [[ ! -x "$buf" ]] || [[ "$("$buf" --version 2>/dev/null)" != "$BUF_VERSION" ]]; then
  echo "installing buf $BUF_VERSION into $prefix"
  mkdir -p "$prefix"
  npm install --prefix "$prefix" --no-audit --no-fund --no-save --loglevel=error \
    "@bufbuild/buf@$BUF_VERSION" >/dev/null
fi

echo "buf $("$buf" --version) lint $proto"
cd "$proto"
"$buf" lint
echo "buf lint: no findings"
