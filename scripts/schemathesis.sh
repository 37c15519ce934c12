#!/usr/bin/env bash
# Property-based API tests with schemathesis against the spec the server
# serves (/openapi.json): no 5xx, responses match their schemas, content
# types and documented status codes.
#
# Builds the debug binary, copies it to a temp dir, starts it on a free
# loopback port with a temp SQLite file, test secrets and rate limits off,
# posts the example payloads (examples/post-all.sh) so reads find data,
# then runs schemathesis up to seven times:
#   1. admin:         admin token as bearer, every operation;
#   2. moodle:        the moodle token, the hook (`ingest`) with source=moodle;
#   3. test:          the test token, the dry run and payload validation;
#   4. seeded:        admin token, getUser/getEvent pinned to stored data;
#   5. examples:      the served spec with the example payloads added as
#                     request examples (it has none), so the hook reaches its
#                     200 answers and they are checked too (moodle token);
#   6. examples-test: the same for the dry run and validation (test token);
#   7. async:         the hook of `moodle-async`, a copy of moodle with
#                     `processing: async` (when this build accepts it).
# Stops the server; exits non-zero if any run failed or the server panicked.
# Logs, the server log and JUnit reports land in $ST_OUT (default: a temp
# dir, printed at the end).
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

# Cargo waits by itself while another build holds the target dir's lock.
echo "== cargo build --bin rocket-rewards"
cargo build --bin rocket-rewards

WORK=$(mktemp -d /tmp/rocket-st.XXXXXX)
OUT=${ST_OUT:-$WORK/out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
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

# The shipped config, plus `moodle-async` (moodle with `processing: async`)
# when this build accepts it, so the 202 path is exercised too.
CONFIG=$WORK/config
mkdir -p "$CONFIG"
cp -r sources.d rules "$CONFIG/"
{ echo "processing: async"; grep -v '^processing:' sources.d/moodle.yaml; } >"$CONFIG/sources.d/moodle-async.yaml"
ASYNC=1
if ! "$WORK/rocket-rewards" check --config-dir "$CONFIG" >"$OUT/check.log" 2>&1; then
  echo "   (no async source: this build refuses it, see $OUT/check.log)"
  rm "$CONFIG/sources.d/moodle-async.yaml"
  ASYNC=0
fi

echo "== serving on $BASE (db: $WORK/rocket.db, log: $OUT/server.log)"
"$WORK/rocket-rewards" serve \
  --listen "127.0.0.1:$PORT" \
  --database-url "sqlite://$WORK/rocket.db" \
  --config-dir "$CONFIG" \
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

echo "== posting the example payloads (log: $OUT/seed.log)"
ROCKET_URL=$BASE examples/post-all.sh >"$OUT/seed.log" 2>&1 || {
  echo "   some example posts failed:"; sed 's/^/   | /' "$OUT/seed.log"
}
EVENT_ID=$(curl -fsS -X POST "$BASE/api/public/hook/moodle/event" \
  -H "Authorization: Bearer $ROCKET_MOODLE_TOKEN" -H "Content-Type: application/json" \
  --data-binary @examples/payloads/moodle.json |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["event_id"])')
echo "   stored event: $EVENT_ID"

# Per-run configs: pin path/query parameters so requests reach real data.
cat >"$WORK/moodle.toml" <<'TOML'
[[operations]]
include-operation-id = "ingest"
parameters = { "path.source" = "moodle" }
TOML
cat >"$WORK/test.toml" <<'TOML'
[[operations]]
include-operation-id = "validateWebhook"
parameters = { "query.source" = "moodle" }
TOML
cat "$WORK/moodle.toml" "$WORK/test.toml" >"$WORK/examples.toml"
cat >"$WORK/seeded.toml" <<TOML
[[operations]]
include-operation-id = "getUser"
parameters = { "path.source" = "moodle", "path.user_id" = "8774" }

[[operations]]
include-operation-id = "getEvent"
parameters = { "path.event_id" = "$EVENT_ID" }

[[operations]]
include-operation-id = "retryEvent"
parameters = { "path.event_id" = "$EVENT_ID" }
TOML
sed 's/"path.source" = "moodle"/"path.source" = "moodle-async"/' "$WORK/moodle.toml" >"$WORK/async.toml"

# The served spec, with the example payloads as request-body examples.
curl -fsS "$BASE/openapi.json" >"$WORK/served.json"
python3 - "$WORK/served.json" "$WORK/examples.json" <<'PY'
import json, sys
spec = json.load(open(sys.argv[1]))
moodle = json.load(open("examples/payloads/moodle.json"))
form = dict(kv.split("=", 1) for kv in open("examples/payloads/moodle-form.txt").read().strip().split("&"))
canonical = json.load(open("examples/payloads/custom.json"))
def add(path, json_example, form_example=None):
    content = spec["paths"][path]["post"]["requestBody"]["content"]
    content["application/json"]["example"] = json_example
    if form_example is not None:
        content["application/x-www-form-urlencoded"]["example"] = form_example
add("/api/public/hook/{source}/event", moodle, form)
add("/api/public/validate/webhook", moodle, form)
add("/api/public/hook/test/event", canonical)
json.dump(spec, open(sys.argv[2], "w"))
PY

failed=()
run() { # name token config spec [schemathesis args...]
  local name=$1 token=$2 config=$3 spec=$4
  shift 4
  echo "== schemathesis: $name (log: $OUT/$name.log)"
  set +e
  # From the work dir, so schemathesis keeps its cache (.schemathesis/) there.
  (cd "$WORK" && schemathesis --config-file "$config" run "$spec" --url "$BASE" \
    -H "Authorization: Bearer $token" \
    --checks "$CHECKS" \
    --max-examples "$MAX_EXAMPLES" \
    --mode "$MODE" \
    --seed "$SEED" \
    --workers 1 \
    --request-timeout 10 \
    --output-sanitize false \
    --report junit,har --report-dir "$OUT/$name" \
    "$@") >"$OUT/$name.log" 2>&1
  local rc=$?
  set -e
  # Each failure, with its curl reproducer.
  sed -n '/^=* FAILURES =*$/,/^=* WARNINGS\|SUMMARY =*$/p' "$OUT/$name.log"
  grep -E '^ +[0-9]+ generated' "$OUT/$name.log" | sed 's/^ */   test cases: /'
  # Status codes answered, per operation (from the HAR report).
  python3 - "$OUT/$name" "$WORK/served.json" <<'PY' || true
import collections, glob, json, re, sys
spec = json.load(open(sys.argv[2]))
# Literal paths first, so /hook/test/event is not taken as /hook/{source}/event.
templates = sorted(spec["paths"], key=lambda t: t.count("{"))
rx = [(t, re.compile("^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(t)) + "$")) for t in templates]
seen = collections.defaultdict(collections.Counter)
for har in glob.glob(sys.argv[1] + "/har-*.json"):
    for e in json.load(open(har))["log"]["entries"]:
        method = e["request"]["method"]
        path = re.sub(r"^https?://[^/]+", "", e["request"]["url"]).split("?")[0]
        path = next((t for t, r in rx if r.match(path)), path)
        if method not in spec["paths"].get(path, {}) and method.lower() not in spec["paths"].get(path, {}):
            path, method = "(undocumented method)", "*"
        seen[f"{method} {path}"][e["response"]["status"]] += 1
for op, codes in sorted(seen.items()):
    print(f"   {op}: " + ", ".join(f"{c}x{n}" for c, n in sorted(codes.items())))
PY
  if [ "$rc" -ne 0 ]; then
    failed+=("$name")
    echo "   FAIL (exit $rc)"
  else
    echo "   ok"
  fi
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "   the server died:"; tail -n 30 "$OUT/server.log"; failed+=("$name:server-died")
  fi
}

touch "$WORK/empty.toml"
SERVED=$BASE/openapi.json
run admin "$ROCKET_ADMIN_TOKEN" "$WORK/empty.toml" "$SERVED"
run moodle "$ROCKET_MOODLE_TOKEN" "$WORK/moodle.toml" "$SERVED" --include-operation-id ingest
run test "$ROCKET_TEST_TOKEN" "$WORK/test.toml" "$SERVED" \
  --include-operation-id dryRun --include-operation-id validateWebhook
run seeded "$ROCKET_ADMIN_TOKEN" "$WORK/seeded.toml" "$SERVED" \
  --include-operation-id getUser --include-operation-id getEvent --include-operation-id retryEvent
run examples "$ROCKET_MOODLE_TOKEN" "$WORK/examples.toml" "$WORK/examples.json" \
  --include-operation-id ingest --phases examples,coverage
run examples-test "$ROCKET_TEST_TOKEN" "$WORK/examples.toml" "$WORK/examples.json" \
  --include-operation-id dryRun --include-operation-id validateWebhook --phases examples,coverage
if [ "$ASYNC" = 1 ]; then
  run async "$ROCKET_MOODLE_TOKEN" "$WORK/async.toml" "$WORK/examples.json" --include-operation-id ingest
fi

stop
# Status codes the server answered, per source and outcome.
python3 - "$OUT/server.log" <<'PY' || true
import collections, json, sys
c = collections.Counter()
for line in open(sys.argv[1], errors="replace"):
    try:
        j = json.loads(line)
    except ValueError:
        continue
    if j.get("message") == "hook":
        c[(j.get("source"), j.get("status"), j.get("outcome"))] += 1
print("== hook answers (source, status, outcome): count")
for k, v in sorted(c.items(), key=lambda kv: -kv[1]):
    print(f"   {k}: {v}")
PY
if grep -qaE 'panicked' "$OUT/server.log"; then
  echo "FAIL: the server log holds a panic:"; grep -aE -A3 'panicked' "$OUT/server.log" | head -n 20
  failed+=(server-panic)
fi
echo "logs and reports: $OUT"
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAIL: ${failed[*]}"
  exit 1
fi
echo "ok: schemathesis found no failure"
