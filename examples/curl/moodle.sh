#!/usr/bin/env bash
# Moodle (Event Trigger plugin, tool_trigger): Bearer token, JSON or form-encoded.
# Learner = relateduserid (falls back to userid); dedupe key = id.
# \core\event\course_completed earns 50 points with the shipped rules.
set -euo pipefail
URL="${ROCKET_URL:-http://127.0.0.1:8080}"

curl -sS -X POST "$URL/api/public/hook/moodle/event" \
  -H "Authorization: Bearer ${ROCKET_MOODLE_TOKEN:?set ROCKET_MOODLE_TOKEN}" \
  -H "Content-Type: application/json" \
  --data-binary '{"id":9194801,"eventname":"\\core\\event\\course_completed","userid":2,"relateduserid":8774,"courseid":987,"timecreated":1755771330}'
echo

# The same event as the plugin's form-encoded post (flat keys, `other_*`):
curl -sS -X POST "$URL/api/public/hook/moodle/event" \
  -H "Authorization: Bearer $ROCKET_MOODLE_TOKEN" \
  -H "Content-Type: application/x-www-form-urlencoded" \
  --data-binary 'id=9194802&eventname=%5Ccore%5Cevent%5Ccourse_completed&userid=2&relateduserid=8775&courseid=987&timecreated=1755771330&other_completiontime=1755771330'
echo
