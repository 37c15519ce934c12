#!/usr/bin/env bash
# Validates the Prometheus alerting rules and runs their unit tests.
# Installs promtool (Debian package `prometheus`) when it is missing.
# Works from the repository root whatever the caller's cwd; exits non-zero on
# any failure.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."

if ! command -v promtool >/dev/null 2>&1; then
    echo "promtool not found; installing the Debian package 'prometheus'" >&2
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        sudo="sudo"
    fi
    $sudo apt-get update
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y prometheus
fi

promtool check rules examples/prometheus/alerts.yml
promtool test rules examples/prometheus/alerts.test.yml
# The example scrape config (also loads alerts.yml through rule_files).
promtool check config examples/prometheus/prometheus.yml
