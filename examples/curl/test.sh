#!/usr/bin/env bash
# Dry run: the full pipeline (auth, mapping, rules) with nothing stored.
# Bearer ROCKET_TEST_TOKEN; the body is a canonical event. Answers the
# canonical event(s) and the points they would earn.
set -euo pipefail
URL="${ROCKET_URL:-http://127.0.0.1:8080}"

curl -sS -X POST "$URL/api/public/hook/test/event" \
  -H "Authorization: Bearer ${ROCKET_TEST_TOKEN:?set ROCKET_TEST_TOKEN}" \
  -H "Content-Type: application/json" \
  --data-binary '{"event_id":"dry-run-1","event_type":"course.completed","user_id":"u-1","course_id":"c-1","occurred_at":"2025-08-21T12:40:00Z"}'
echo
