#!/usr/bin/env bash
# Checks outboxd's Prometheus rules offline:
#   - promtool check rules deploy/prometheus/alerts.yml
#   - promtool test rules deploy/prometheus/alerts_test.yml
#   - promtool check config deploy/prometheus/prometheus.yml (docker-compose's)
#   - the copies of the rules are identical to alerts.yml: helm/outboxd/files/alerts.yml
#     byte for byte (the chart's PrometheusRule loads it with .Files.Get), and the spec
#     of deploy/kubernetes/prometheusrule.yaml (alerts.yml indented under `spec:`).
#
#   bash scripts/check-prometheus.sh             check; exit 1 if anything failed
#   bash scripts/check-prometheus.sh --sync      first rewrite both copies from alerts.yml
#   bash scripts/check-prometheus.sh --install   only make sure promtool is there
#
# Non-interactive and idempotent. When promtool is missing it installs the Debian
# package `prometheus` (as root, --no-install-recommends) without letting it start the
# server: a policy-rc.d forbids service starts during the install, and a service that
# started anyway is stopped and disabled, so nothing is left listening on :9090.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
RULES=deploy/prometheus/alerts.yml
TESTS=deploy/prometheus/alerts_test.yml
CONFIG=deploy/prometheus/prometheus.yml
HELM_COPY=helm/outboxd/files/alerts.yml
K8S_RULE=deploy/kubernetes/prometheusrule.yaml
POLICY=/usr/sbin/policy-rc.d
export DEBIAN_FRONTEND=noninteractive

log() { printf '%s\n' "$*"; }
indent() { sed 's/^./  &/'; } # two spaces on non-empty lines: no trailing blanks for yamllint
k8s_header() { sed '/^spec:$/q' "$K8S_RULE"; }
k8s_body() { sed '1,/^spec:$/d' "$K8S_RULE"; }

stop_started_server() {
  # Only called right after this script installed the package: whatever runs now was
  # started by that install.
  if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
    systemctl disable --now prometheus.service >/dev/null 2>&1 || true
  elif [[ -x /etc/init.d/prometheus ]]; then
    /etc/init.d/prometheus stop >/dev/null 2>&1 || true
  fi
}

install_promtool() {
  command -v promtool >/dev/null && return
  if [[ $(id -u) != 0 ]]; then
    log "promtool is missing; install it as root: apt-get install --no-install-recommends prometheus"
    return 1
  fi
  log "installing promtool (Debian package prometheus; its server is not started)"
  if [[ ! -e $POLICY ]]; then
    printf '#!/bin/sh\n# written by scripts/check-prometheus.sh during an install\nexit 101\n' >"$POLICY"
    chmod 755 "$POLICY"
    trap 'rm -f "$POLICY"' EXIT
    trap 'exit 130' INT TERM # so that the EXIT trap runs
  fi
  local apt=(apt-get -y -qq -o DPkg::Lock::Timeout=300)
  apt-cache show prometheus >/dev/null 2>&1 || "${apt[@]}" update </dev/null
  "${apt[@]}" install --no-install-recommends prometheus </dev/null >/dev/null \
    || { "${apt[@]}" update </dev/null && "${apt[@]}" install --no-install-recommends prometheus </dev/null >/dev/null; }
  stop_started_server
  command -v promtool >/dev/null
}

sync_copies() {
  mkdir -p "$(dirname "$HELM_COPY")"
  cp "$RULES" "$HELM_COPY"
  local header
  header=$(k8s_header)
  { printf '%s\n' "$header"; indent <"$RULES"; } >"$K8S_RULE"
  log "synced $HELM_COPY and $K8S_RULE from $RULES"
}

copies_in_sync() {
  local rc=0
  if cmp -s "$RULES" "$HELM_COPY"; then
    log "ok   $HELM_COPY is identical to $RULES"
  else
    log "FAIL $HELM_COPY differs from $RULES (run: bash scripts/check-prometheus.sh --sync)"
    diff -u "$RULES" "$HELM_COPY" | head -20 || true
    rc=1
  fi
  if ! grep -q '^spec:$' "$K8S_RULE"; then
    log "FAIL $K8S_RULE has no top-level 'spec:' line"
    rc=1
  elif diff -q <(k8s_body) <(indent <"$RULES") >/dev/null; then
    log "ok   $K8S_RULE spec is $RULES"
  else
    log "FAIL $K8S_RULE spec differs from $RULES (run: bash scripts/check-prometheus.sh --sync)"
    diff -u <(indent <"$RULES") <(k8s_body) | head -20 || true
    rc=1
  fi
  return "$rc"
}

case ${1:-} in
  --install) install_promtool; exit ;;
  --sync) sync_copies ;;
  "") ;;
  *) log "usage: $0 [--sync|--install]"; exit 2 ;;
esac

failed=0 # every step runs; any failure fails the script
if install_promtool; then
  log "$(promtool --version 2>&1 | head -1)"
  promtool check rules --lint-fatal "$RULES" || failed=1
  promtool test rules "$TESTS" || failed=1
  promtool check config "$CONFIG" || failed=1
else
  log "FAIL promtool is not available"
  failed=1
fi
copies_in_sync || failed=1
exit "$failed"
