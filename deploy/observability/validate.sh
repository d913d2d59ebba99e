#!/usr/bin/env bash
# Validate deploy/observability without a Prometheus or a Grafana running:
#   promtool check rules   prometheus-rules.yaml       (syntax, PromQL, templates)
#   promtool test rules    prometheus-rules.test.yaml  (each alert fires when it should, only then)
#   promtool check config  prometheus.yaml             (the example scrape configuration)
#   check_observability.py --promtool ...             (dashboard structure, its PromQL, and every
#                                                       metric name exists in the code)
#
#   deploy/observability/validate.sh    # exit 0: no finding; 1: findings; 2: cannot run
#
# promtool: $PROMTOOL, else `promtool` on PATH, else .infra/tools/promtool/usr/bin/promtool,
# else extracted there from Debian 12's `prometheus` package (pinned version, fetched with
# `apt-get download`, which checks it against the signed archive index). Only the promtool
# binary is unpacked: nothing is installed and no Prometheus server is started.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
TOOLS="$REPO/.infra/tools/promtool"
PROMETHEUS_DEB_VERSION="2.42.0+ds-5+deb12u1"
FAILED=()

die() { printf 'observability/validate.sh: %s\n' "$*" >&2; exit 2; }

step() {
    local name="$1"
    shift
    printf '\n== %s\n' "$name"
    if ! "$@"; then
        FAILED+=("$name")
        printf '  FAILED: %s\n' "$name"
    fi
}

extract_promtool() {
    if ! command -v apt-get > /dev/null || ! command -v dpkg-deb > /dev/null; then
        die "no promtool found and no apt-get/dpkg-deb to fetch one: set PROMTOOL=/path/to/promtool"
    fi
    local scratch
    scratch="$(mktemp -d)"
    # shellcheck disable=SC2064  # expand now: the path is fixed
    trap "rm -rf '$scratch'" RETURN
    if ! (cd "$scratch" && apt-get download -q "prometheus=$PROMETHEUS_DEB_VERSION" > /dev/null 2>&1); then
        if [[ $(id -u) -eq 0 ]]; then
            apt-get update -qq > /dev/null
        fi
        (cd "$scratch" && apt-get download -q "prometheus=$PROMETHEUS_DEB_VERSION" > /dev/null 2>&1) \
            || die "cannot download Debian package prometheus=$PROMETHEUS_DEB_VERSION (set PROMTOOL)"
    fi
    mkdir -p "$TOOLS"
    dpkg-deb --fsys-tarfile "$scratch"/prometheus_*.deb | tar -x -C "$TOOLS" ./usr/bin/promtool
}

find_promtool() {
    if [[ -n "${PROMTOOL:-}" ]]; then
        printf '%s\n' "$PROMTOOL"
    elif command -v promtool > /dev/null; then
        command -v promtool
    else
        [[ -x "$TOOLS/usr/bin/promtool" ]] || extract_promtool >&2
        printf '%s\n' "$TOOLS/usr/bin/promtool"
    fi
}

PROMTOOL="$(find_promtool)"
PYTHON="$(command -v python3)" || die "python3 is required"
printf 'promtool: %s (%s)\n' "$PROMTOOL" "$("$PROMTOOL" --version 2>&1 | head -n 1)"

cd "$HERE"
step "promtool check rules" "$PROMTOOL" check rules prometheus-rules.yaml
step "promtool test rules" "$PROMTOOL" test rules prometheus-rules.test.yaml
step "promtool check config" "$PROMTOOL" check config prometheus.yaml
step "dashboard and metric names" "$PYTHON" check_observability.py --promtool "$PROMTOOL"

if ((${#FAILED[@]})); then
    printf '\nobservability/validate.sh: %d check(s) failed: %s\n' "${#FAILED[@]}" "${FAILED[*]}"
    exit 1
fi
printf '\nobservability/validate.sh: all checks passed\n'
