#!/usr/bin/env bash
# Thinkific: HMAC-SHA256 of the exact body, hex, in `X-Signature: sha256=<hex>`.
# Dedupe key = id. lesson.completed earns 10 points.
set -euo pipefail
URL="${ROCKET_URL:-http://127.0.0.1:8080}"
SECRET="${ROCKET_THINKIFIC_SECRET:?set ROCKET_THINKIFIC_SECRET}"

body='{"id":"20250821124000118031999","topic":"lesson.completed","created_at":"2025-08-21T12:40:00Z","payload":{"user":{"id":123},"course_id":987,"lesson_id":456}}'
sig="$(printf '%s' "$body" | openssl dgst -sha256 -hmac "$SECRET" | awk '{print $NF}')"

# --data-binary sends the string byte for byte: the signed bytes are the sent bytes.
curl -sS -X POST "$URL/api/public/hook/thinkific/event" \
  -H "Content-Type: application/json" \
  -H "X-Signature: sha256=$sig" \
  --data-binary "$body"
echo
