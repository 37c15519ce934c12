#!/usr/bin/env bash
# Property-based API tests with schemathesis against the spec the server
# serves (/openapi.json): no 5xx, responses match their schemas, content
# types and documented status codes.
#
# Builds the debug binary, copies it to a temp dir, starts it on a free
# loopback port with a temp SQLite file, test secrets and rate limits off,
# then runs schemathesis three times:
#   1. admin token as bearer: every operation;
#   2. the moodle token: the hook (`ingest`) with source=moodle, authenticated;
#   3. the test token: the dry run and payload validation (source=moodle).
# Stops the server; exits non-zero if any run failed. Logs and reports land
# in $ST_OUT (default: a temp dir, printed).
#
# Environment:
#   ST_MAX_EXAMPLES  test cases per operation (default 100)
#   ST_CHECKS        checks (default: not_a_server_error,status_code_conformance,
#                    response_schema_conformance,content_type_conformance)
#   ST_SEED          hypothesis seed (default 1, for reproducible runs)
#   ST_MODE          positive | negative | all (default all)
#   ST_OUT           folder for logs and reports
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
MAX_EXAMPLES=${ST_MAX_EXAMPLES:-100}
CHECKS=${ST_CHECKS:-not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance}
SEED=${ST_SEED:-1}
MODE=${ST_MODE:-all}

if ! command -v schemathesis >/dev/null 2>&1; then
  echo "== installing schemathesis"
  python3 -m pip install --quiet schemathesis
fi
echo "== $(schemathesis --version)"

# Cargo waits by itself for a build holding the target dir's lock.
echo "== cargo build --bin rocket-rewards"
cargo build --bin rocket-rewards

WORK=$(mktemp -d /tmp/rocket-st.XXXXXX)
OUT=${ST_OUT:-$WORK/out}
mkdir -p "$OUT"
cp target/debug/rocket-rewards "$WORK/rocket-rewards"

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
BASE=http://127.0.0.1:$PORT

export ROCKET_ADMIN_TOKEN=st-admin-token
export ROCKET_TEST_TOKEN=st-test-token
export ROCKET_MOODLE_TOKEN=st-moodle-token
export ROCKET_CUSTOM_TOKEN=st-custom-token
export ROCKET_VALAMIS_TOKEN=st-valamis-token
export ROCKET_OPENLMS_TOKEN=st-openlms-token
export ROCKET_LEARNWORLDS_SECRET=st-learnworlds-secret
export ROCKET_THINKIFIC_SECRET=st-thinkific-secret
export ROCKET_RATE_LIMITS=off

SERVER_PID=
stop() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=
}
trap stop EXIT

echo "== serving on $BASE (db: $WORK/rocket.db, log: $OUT/server.log)"
"$WORK/rocket-rewards" serve \
  --listen "127.0.0.1:$PORT" \
  --database-url "sqlite://$WORK/rocket.db" \
  --config-dir "$ROOT" \
  >"$OUT/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 100); do
  if curl -fsS "$BASE/health/ready" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "FAIL: the server exited"; tail -n 30 "$OUT/server.log"; exit 1
  fi
  sleep 0.2
done
curl -fsS "$BASE/health/ready" >/dev/null

# Per-run config: pins path/query parameters so the hook reaches a real source.
cat >"$WORK/moodle.toml" <<'EOF'
[[operations]]
include-operation-id = "ingest"
parameters = { "path.source" = "moodle" }
EOF
cat >"$WORK/test.toml" <<'EOF'
[[operations]]
include-operation-id = "validateWebhook"
parameters = { "query.source" = "moodle" }
EOF

failed=()
run() { # name token config [schemathesis args...]
  local name=$1 token=$2 config=$3
  shift 3
  echo "== schemathesis: $name (log: $OUT/$name.log)"
  local cfg=()
  [ -n "$config" ] && cfg=(--config-file "$config")
  set +e
  schemathesis "${cfg[@]}" run "$BASE/openapi.json" \
    -H "Authorization: Bearer $token" \
    --checks "$CHECKS" \
    --max-examples "$MAX_EXAMPLES" \
    --mode "$MODE" \
    --seed "$SEED" \
    --workers 1 \
    --request-timeout 10 \
    --output-sanitize false \
    --report junit --report-dir "$OUT/$name" \
    "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  set -e
  # The summary and each failure with its curl reproducer.
  sed -n '/FAILURES/,$p' "$OUT/$name.log"
  [ "$rc" -eq 0 ] || { tail -n 25 "$OUT/$name.log" | grep -v '^$' | sed -n '/SUMMARY/,$p'; }
  if [ "$rc" -ne 0 ]; then
    failed+=("$name")
    echo "   FAIL (exit $rc)"
  else
    grep -E "passed|Test cases|operations" "$OUT/$name.log" | tail -n 5 | sed 's/^/   /'
    echo "   ok"
  fi
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "   the server died:"; tail -n 30 "$OUT/server.log"; failed+=("$name:server-died")
  fi
}

run admin "$ROCKET_ADMIN_TOKEN" ""
run moodle "$ROCKET_MOODLE_TOKEN" "$WORK/moodle.toml" --include-operation-id ingest
run test "$ROCKET_TEST_TOKEN" "$WORK/test.toml" --include-operation-id dryRun --include-operation-id validateWebhook

stop
if grep -qiE 'panicked' "$OUT/server.log"; then
  echo "FAIL: the server log holds a panic:"; grep -iE -A3 'panicked' "$OUT/server.log" | head -n 20
  failed+=(server-panic)
fi
echo "logs and reports: $OUT"
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAIL: ${failed[*]}"
  exit 1
fi
echo "ok: schemathesis found no failure"
