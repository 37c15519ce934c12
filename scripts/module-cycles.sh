#!/usr/bin/env bash
# Lists each top-level module of src/ with the top-level modules it uses
# (`crate::x` outside comments), then any two that use each other; exits 1
# on such a cycle. Usage: bash scripts/module-cycles.sh
set -euo pipefail
cd "$(dirname "$0")/../src"
declare -A deps
for f in $(find . -name '*.rs' | sort); do
  m=$(echo "$f" | sed -E 's#^\./##; s#/.*##; s#\.rs$##')
  used=$(grep -vE '^\s*//' "$f" | grep -oE 'crate::[a-z_]+' | sed 's/crate:://' | grep -vx "$m" || true)
  deps[$m]="${deps[$m]:-} $used"
done
status=0
for m in $(printf '%s\n' "${!deps[@]}" | sort); do
  list=$(printf '%s\n' ${deps[$m]} | sort -u | tr '\n' ' ')
  echo "$m -> $list"
done
for a in "${!deps[@]}"; do
  for b in $(printf '%s\n' ${deps[$a]} | sort -u); do
    if printf '%s\n' ${deps[$b]:-} | grep -qx "$a" && [[ "$a" < "$b" ]]; then
      echo "cycle: $a <-> $b"
      status=1
    fi
  done
done
exit $status
