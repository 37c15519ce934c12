#!/usr/bin/env bash
# LearnWorlds: HMAC-SHA256 of the exact body, hex, in `X-Signature: sha256=<hex>`.
# The payload has no id, so the dedupe key is the SHA-256 of the body.
# course.completed earns 50 points.
set -euo pipefail
URL="${ROCKET_URL:-http://127.0.0.1:8080}"
SECRET="${ROCKET_LEARNWORLDS_SECRET:?set ROCKET_LEARNWORLDS_SECRET}"

body='{"topic":"course.completed","occurred_at":"2025-08-21T12:40:00Z","data":{"user_id":"U-123","course_id":"C-987","progress":100}}'
sig="$(printf '%s' "$body" | openssl dgst -sha256 -hmac "$SECRET" | awk '{print $NF}')"

# --data-binary sends the string byte for byte: the signed bytes are the sent bytes.
curl -sS -X POST "$URL/api/public/hook/learnworlds/event" \
  -H "Content-Type: application/json" \
  -H "X-Signature: sha256=$sig" \
  --data-binary "$body"
echo
