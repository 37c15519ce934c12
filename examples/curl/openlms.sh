#!/usr/bin/env bash
# OpenLMS (a Moodle distribution, Event Trigger plugin): Bearer token, same
# payload as Moodle. A module completion maps to lesson.completed: 10 points.
set -euo pipefail
URL="${ROCKET_URL:-http://127.0.0.1:8080}"

curl -sS -X POST "$URL/api/public/hook/openlms/event" \
  -H "Authorization: Bearer ${ROCKET_OPENLMS_TOKEN:?set ROCKET_OPENLMS_TOKEN}" \
  -H "Content-Type: application/json" \
  --data-binary '{"id":"3310601","eventname":"\\core\\event\\course_module_completion_updated","userid":"15022","relateduserid":"15022","courseid":"412","objectid":"220433","timecreated":"1755769931","other":{"completionstate":"1"}}'
echo
