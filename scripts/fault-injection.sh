#!/usr/bin/env bash
# Fault injection against the real binary: what an attacker and a failing
# disk get. Each scenario prints what it did and what it saw.
#   bash scripts/fault-injection.sh
# Scenarios: wrong tokens from forged addresses behind a trusted proxy;
# guessed admin tokens; idle connections from one address; idle keep-alive
# connections at the global cap; an HTTP/2 header block left open; the database
# files deleted under the server; a full disk (a small tmpfs, where the
# machine lets this script mount one).
set -uo pipefail
cd "$(dirname "$0")/.."
cargo build -q --bin rocket-rewards
BIN=$PWD/target/debug/rocket-rewards
WORK=$(mktemp -d)
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; umount "$WORK/full" 2>/dev/null; rm -rf "$WORK"' EXIT
cp -r sources.d rules "$WORK/"
# Shared by the Python snippets below: whether the server closed a socket.
cat > "$WORK/fi.py" <<'PY'
def closed(s):
    s.setblocking(False)
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
PY
PORT=$((20000 + RANDOM % 20000))
URL=http://127.0.0.1:$PORT

start() { # $1: database URL; extra env after
  local db=$1; shift
  env ROCKET_LISTEN=127.0.0.1:$PORT ROCKET_CONFIG_DIR="$WORK" ROCKET_DATABASE_URL="$db" \
    ROCKET_MOODLE_TOKEN=moodle-token ROCKET_ADMIN_TOKEN=admin-token \
    ROCKET_TRUSTED_PROXIES=127.0.0.1/32 ROCKET_LOG=warn "$@" "$BIN" serve >"$WORK/log" 2>&1 &
  PID=$!
  for _ in $(seq 1 100); do curl -sf "$URL/health/live" >/dev/null && return; sleep 0.1; done
  echo "the server did not start:"; cat "$WORK/log"; exit 1
}
stop() { kill $PID; wait $PID 2>/dev/null; }
hook() { # $1: token, $2: id, $3: forwarded-for
  curl -s -o /dev/null -w '%{http_code}' -X POST "$URL/api/public/hook/moodle/event" \
    -H "Authorization: Bearer $1" -H "X-Forwarded-For: $3" -H 'Content-Type: application/json' \
    -d "{\"id\":$2,\"eventname\":\"\\\\core\\\\event\\\\course_completed\",\"relateduserid\":7,\"courseid\":$2}"
}
tally() { sort | uniq -c | awk '{printf "%s x %s  ", $1, $2} END {print ""}'; }

echo "== 1. wrong tokens from 5 forged addresses, then a valid sender"
start "sqlite://$WORK/db1/rocket.db" ROCKET_RATE_LIMIT_SOURCE=60:30 ROCKET_RATE_LIMIT_GLOBAL=60:30
for i in $(seq 1 300); do hook wrong-token "$i" "198.51.100.$((i % 5))"; echo; done | tally
echo "   the valid sender then gets: $(hook moodle-token 1000 203.0.113.9) (want 200)"

echo "== 2. 25 guessed admin tokens from one address, then the right one"
for i in $(seq 1 25); do
  curl -s -o /dev/null -w '%{http_code}\n' "$URL/api/admin/sources" -H 'Authorization: Bearer guess' -H 'X-Forwarded-For: 203.0.113.7'
done | tally
echo "   the right token from that address: $(curl -s -o /dev/null -w '%{http_code}' "$URL/api/admin/sources" -H 'Authorization: Bearer admin-token' -H 'X-Forwarded-For: 203.0.113.7') (want 429), from another: $(curl -s -o /dev/null -w '%{http_code}' "$URL/api/admin/sources" -H 'Authorization: Bearer admin-token' -H 'X-Forwarded-For: 203.0.113.8') (want 200)"
stop

echo "== 3. 300 silent connections from 127.0.0.2 (ROCKET_MAX_CONNECTIONS=200, _PER_IP=50), then a client from 127.0.0.1"
start "sqlite://$WORK/db3/rocket.db" ROCKET_MAX_CONNECTIONS=200 ROCKET_MAX_CONNECTIONS_PER_IP=50
PYTHONPATH="$WORK" python3 - "$PORT" <<'PY'
from fi import closed
import socket, sys, time, urllib.request
port = int(sys.argv[1])
idle = []
for _ in range(300):
    try:
        idle.append(socket.create_connection(("127.0.0.1", port), timeout=2, source_address=("127.0.0.2", 0)))
    except OSError:
        break
time.sleep(0.5)
print(f"   opened {len(idle)} silent connections; {sum(map(closed, idle))} closed by the server at once")
start = time.time()
try:
    urllib.request.urlopen(f"http://127.0.0.1:{port}/health/live", timeout=15).read()
    print(f"   a well-behaved client got an answer after {time.time() - start:.1f} s")
except Exception as e:
    print(f"   a well-behaved client got no answer within 15 s: {e}")
PY
stop

echo "== 3b. 200 idle keep-alive connections from 4 addresses fill ROCKET_MAX_CONNECTIONS=200; an HTTP/2 header block left open"
start "sqlite://$WORK/db3b/rocket.db" ROCKET_MAX_CONNECTIONS=200 ROCKET_MAX_CONNECTIONS_PER_IP=50 ROCKET_HEADER_TIMEOUT=2
PYTHONPATH="$WORK" python3 - "$PORT" <<'PY'
from fi import closed
import socket, struct, sys, time, urllib.request
port = int(sys.argv[1])
idle = []
for n in range(200):
    s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(f"127.0.0.{3 + n // 50}", 0))
    s.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    s.recv(4096)
    idle.append(s)
start = time.time()
try:
    urllib.request.urlopen(f"http://127.0.0.1:{port}/health/live", timeout=15).read()
    print(f"   with every place held by an idle connection, a new client got an answer after {time.time() - start:.2f} s")
except Exception as e:
    print(f"   a new client got no answer within 15 s: {e}")
print(f"   idle connections closed to make room: {sum(map(closed, idle))} (the oldest)")
for s in idle:
    s.close()
h2 = socket.create_connection(("127.0.0.1", port), timeout=10)
frame = lambda kind, flags, stream, payload: struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload
h2.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b"") + frame(1, 1, 1, bytes([0x82, 0x86, 0x84])))
start = time.time()
try:
    while h2.recv(4096):
        pass
    print(f"   an HTTP/2 HEADERS frame without END_HEADERS, then silence: closed after {time.time() - start:.1f} s (ROCKET_HEADER_TIMEOUT=2)")
except socket.timeout:
    print("   an HTTP/2 header block left open was still open after 10 s")
PY
stop

echo "== 4. the database files deleted under the running server"
start "sqlite://$WORK/db4/rocket.db"
echo "   before: hook $(hook moodle-token 1 203.0.113.1)"
rm -f "$WORK/db4/rocket.db" "$WORK/db4/rocket.db-wal" "$WORK/db4/rocket.db-shm"
echo "   after rm: hook $(hook moodle-token 2 203.0.113.1) (want 503), readiness $(curl -s "$URL/health/ready")"
stop

echo "== 5. a full disk (a 1 MiB tmpfs)"
mkdir -p "$WORK/full"
if mount -t tmpfs -o size=1m tmpfs "$WORK/full" 2>/dev/null; then
  start "sqlite://$WORK/full/rocket.db" ROCKET_RATE_LIMITS=off
  for i in $(seq 1 3000); do hook moodle-token "$i" 203.0.113.$((i % 200)); echo; done | tally
  echo "   readiness: $(curl -s "$URL/health/ready")"
  stop
else
  echo "   skipped: this machine does not let the script mount a tmpfs"
fi
