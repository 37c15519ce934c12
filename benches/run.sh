#!/usr/bin/env bash
# Load harness for rocket-rewards: builds the release binary, starts
# it on a free port with a temp SQLite ledger, and measures /health/live vs the
# signed LearnWorlds hook route, then the same signed request against a peer
# (Debian's `webhook`, installed if missing). See benches/load.rs or
# `bash benches/run.sh --help`.
#   bash benches/run.sh --seconds 10 --connections 64
#   bash benches/run.sh --seconds 3 --connections 1,8,64,256
#   bash benches/run.sh --prefill 1000000 --seconds 10
#   bash benches/run.sh --sources 500
set -euo pipefail
cd "$(dirname "$0")/.."
# The peer measured beside the durable hook: Debian's `webhook` (adnanh/webhook).
if ! command -v webhook >/dev/null 2>&1 && [[ " $* " != *" --no-peer "* ]]; then
  echo "installing the peer (Debian package webhook)" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq webhook >/dev/null; } ||
    echo "could not install webhook: the peer is not measured" >&2
fi
exec cargo bench --bench load -- "$@"
