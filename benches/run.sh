#!/usr/bin/env bash
# Load harness for rocket-rewards: builds the release binary, starts
# it on a free port with a temp SQLite ledger, and measures /health/live vs the
# signed LearnWorlds hook route. See benches/load.rs or `bash benches/run.sh --help`.
#   bash benches/run.sh --seconds 10 --connections 64
#   bash benches/run.sh --seconds 3 --connections 1,8,64,256
#   bash benches/run.sh --prefill 1000000 --seconds 10
#   bash benches/run.sh --sources 500
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo bench --bench load -- "$@"
