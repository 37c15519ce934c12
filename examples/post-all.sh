#!/usr/bin/env bash
# Posts every example payload in examples/payloads/ to a running Rocket server,
# authenticated the way each built-in source expects:
#
#   moodle, openlms, valamis, custom   Authorization: Bearer $ROCKET_<SOURCE>_TOKEN
#   learnworlds, thinkific             X-Signature: sha256=<hex HMAC-SHA256(secret, body)>
#
# Environment:
#   ROCKET_URL                  server base URL (default http://127.0.0.1:8080)
#   ROCKET_MOODLE_TOKEN  ROCKET_OPENLMS_TOKEN  ROCKET_VALAMIS_TOKEN  ROCKET_CUSTOM_TOKEN
#   ROCKET_LEARNWORLDS_SECRET  ROCKET_THINKIFIC_SECRET
# A variable may hold several comma-separated values (as on the server, for
# rotation); the first one is used. A source whose variable is unset is skipped.
#
# The body is sent with `curl --data-binary @file`, so the bytes signed are
# exactly the bytes sent. Prints source, HTTP status and response body per
# request; exits 1 if any response is not 2xx.
#
# Posting the same files twice is safe: the second run answers
# "duplicate":true with the first run's event id and points.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
payloads="$here/payloads"
base="${ROCKET_URL:-http://127.0.0.1:8080}"
base="${base%/}"

for tool in curl openssl; do
  command -v "$tool" >/dev/null || { echo "post-all.sh: $tool is required" >&2; exit 2; }
done

failures=0
tmp="$(mktemp)"
trap 'rm -f "$tmp"' EXIT

# post LABEL SOURCE FILE CONTENT_TYPE AUTH(bearer|hmac) ENV_VAR
post() {
  local label="$1" source="$2" file="$3" ctype="$4" auth="$5" var="$6"
  local secret="${!var:-}"
  local -a headers=(-H "Content-Type: $ctype")

  if [[ -z "$secret" ]]; then
    printf '%-18s skipped: %s is not set\n' "$label" "$var"
    return 0
  fi
  secret="${secret%%,*}"   # first of a comma-separated rotation list

  case "$auth" in
    bearer)
      headers+=(-H "Authorization: Bearer $secret")
      ;;
    hmac)
      local sig
      # `openssl dgst` prints "...(stdin)= <hex>": keep the last field.
      sig="$(openssl dgst -sha256 -hmac "$secret" <"$file" | awk '{print $NF}')"
      headers+=(-H "X-Signature: sha256=$sig")
      ;;
  esac

  local status
  status="$(curl -sS -o "$tmp" -w '%{http_code}' --max-time 30 \
    -X POST "${headers[@]}" --data-binary "@$file" \
    "$base/api/public/hook/$source/event")" || status="${status:-000}"

  printf '%-18s %s %s\n' "$label" "$status" "$(cat "$tmp" 2>/dev/null)"
  : >"$tmp"
  if [[ ! "$status" =~ ^2[0-9][0-9]$ ]]; then
    failures=$((failures + 1))
  fi
}

json=application/json
form=application/x-www-form-urlencoded

post moodle            moodle      "$payloads/moodle.json"         $json bearer ROCKET_MOODLE_TOKEN
post "moodle (form)"   moodle      "$payloads/moodle-form.txt"     $form bearer ROCKET_MOODLE_TOKEN
post openlms           openlms     "$payloads/openlms.json"        $json bearer ROCKET_OPENLMS_TOKEN
post learnworlds       learnworlds "$payloads/learnworlds.json"    $json hmac   ROCKET_LEARNWORLDS_SECRET
post thinkific         thinkific   "$payloads/thinkific.json"      $json hmac   ROCKET_THINKIFIC_SECRET
post valamis           valamis     "$payloads/valamis.json"        $json bearer ROCKET_VALAMIS_TOKEN
post "valamis (batch)" valamis     "$payloads/valamis-batch.json"  $json bearer ROCKET_VALAMIS_TOKEN
post custom            custom      "$payloads/custom.json"         $json bearer ROCKET_CUSTOM_TOKEN

if ((failures > 0)); then
  echo "post-all.sh: $failures request(s) did not get a 2xx answer" >&2
  exit 1
fi
