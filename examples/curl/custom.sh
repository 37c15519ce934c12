#!/usr/bin/env bash
# Custom integrations: Bearer token; the body is the canonical event itself.
# Required: event_id (dedupe key), event_type, user_id.
# course.completed earns 50, lesson.completed 10, quiz.passed 20.
set -euo pipefail
URL="${ROCKET_URL:-http://127.0.0.1:8080}"

curl -sS -X POST "$URL/api/public/hook/custom/event" \
  -H "Authorization: Bearer ${ROCKET_CUSTOM_TOKEN:?set ROCKET_CUSTOM_TOKEN}" \
  -H "Content-Type: application/json" \
  --data-binary '{"event_id":"acme-academy-8a41d0c3","event_type":"quiz.passed","user_id":"emp-004512","course_id":"onboarding-2025","occurred_at":"2025-08-21T12:40:00Z"}'
echo
