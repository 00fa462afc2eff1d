#!/usr/bin/env bash
# Install the two Pipecat web SDK generations that tests/test_funvoice_rtvi_browser.py bundles, at the exact
# versions of their lockfiles (npm ci), into .cache/rtvi-js/{v0,v1}. Idempotent: a second run only checks.
# Called by `./bootstrap.sh test`; the test itself never touches the network.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${EDGEVOICE_RTVI_JS_CACHE:-$(cd "$here/../../.." && pwd)/.cache/rtvi-js}
for gen in v0 v1; do
  src=$here/$gen
  dst=$cache/$gen
  want=$(cat "$src/package.json" "$src/package-lock.json" | sha256sum | cut -c1-16)
  if [ -e "$dst/.installed-$want" ] && [ -x "$dst/node_modules/.bin/esbuild" ]; then continue; fi
  echo "==> npm ci (Pipecat web SDK $gen) into $dst"
  mkdir -p "$dst"
  rm -f "$dst"/.installed-*
  cp "$src/package.json" "$src/package-lock.json" "$dst/"
  (cd "$dst" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
  touch "$dst/.installed-$want"
done
