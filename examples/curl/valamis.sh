#!/usr/bin/env bash
# Valamis (xAPI): Bearer token; one statement or a JSON array of statements,
# each its own event, deduplicated by statement id. User = actor.account.name
# (or actor.mbox). verb passed earns 20 points; completed 25 (50 for a course).
set -euo pipefail
URL="${ROCKET_URL:-http://127.0.0.1:8080}"

curl -sS -X POST "$URL/api/public/hook/valamis/event" \
  -H "Authorization: Bearer ${ROCKET_VALAMIS_TOKEN:?set ROCKET_VALAMIS_TOKEN}" \
  -H "Content-Type: application/json" \
  --data-binary '{"id":"5f0c2a8e-91b4-4d7a-a3e6-0c8d7b2e4f11","actor":{"account":{"homePage":"https://learn.example.com","name":"learner-42"}},"verb":{"id":"http://adlnet.gov/expapi/verbs/passed"},"object":{"id":"https://learn.example.com/quiz/7"},"result":{"score":{"scaled":0.92},"success":true},"timestamp":"2025-08-21T12:40:00Z"}'
echo
