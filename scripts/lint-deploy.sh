#!/usr/bin/env bash
# Validates the deployment files offline: Dockerfile, docker-compose.yml,
# deploy/ (manifests, Prometheus rules and their tests, the Grafana dashboard),
# helm/outboxd (every ci/ values example), and the docs that go with them: every
# config key documented and settable from the chart, links and anchors across
# README.md and docs/, the consumer examples of docs/consuming.md built and tested
# (Go, Java, Python against a nats-server it starts on a free port). No cluster, no
# Docker engine, no helm binary, no Prometheus server.
#
#   bash scripts/lint-deploy.sh
#
# Installs what it needs (pinned, from PyPI and npm; Debian packages only if
# python3-venv, node, go, javac or nats-server are missing, and `prometheus` for
# promtool, see scripts/check-prometheus.sh) under .tmp/tools, and reinstalls when the
# pins change. Delete .tmp/tools to rebuild from nothing. Runs every check even
# after a failure, prints a summary, exits 1 if any check failed.
#
# Environment: TOOLS_DIR (default .tmp/tools), K8S_VERSIONS (default
# "1.29.0,1.37.0": the chart's minimum, where native sidecars are on, and the
# newest schemas kubernetes-validate ships).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
HERE=$ROOT/scripts/lint-deploy
TOOLS=${TOOLS_DIR:-$ROOT/.tmp/tools}
WORK=.tmp/lint-deploy
K8S_VERSIONS=${K8S_VERSIONS:-1.29.0,1.37.0}
export DEBIAN_FRONTEND=noninteractive PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
export PIP_CACHE_DIR=$TOOLS/pip-cache npm_config_cache=$TOOLS/npm-cache
start=$SECONDS

log() { printf '%s\n' "$*"; }
stamp_of() { cat "$@" | sha256sum | cut -d' ' -f1; }

install_system_deps() {
  local pkgs=()
  command -v python3 >/dev/null || pkgs+=(python3)
  python3 -c 'import venv, ensurepip' 2>/dev/null || pkgs+=(python3-venv)
  { command -v node && command -v npm; } >/dev/null || pkgs+=(nodejs npm)
  command -v go >/dev/null || pkgs+=(golang-go)                  # docs/consuming.md's Go example
  command -v javac >/dev/null || pkgs+=(default-jdk-headless)    # ... and its Java example
  { command -v nats-server || [ -x /usr/sbin/nats-server ]; } >/dev/null || pkgs+=(nats-server)
  if ((${#pkgs[@]})); then
    log "installing Debian packages: ${pkgs[*]}"
    apt-get update -qq </dev/null
    apt-get install -y -qq --no-install-recommends "${pkgs[@]}" </dev/null >/dev/null
  fi
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { log "python3 >= 3.11 is needed (tomllib)"; exit 2; }
}

install_python_tools() {
  local want
  want=$(stamp_of "$HERE/requirements.txt" <(python3 --version))
  [[ -f $TOOLS/venv/.stamp && $(cat "$TOOLS/venv/.stamp") == "$want" ]] && return
  log "installing Python validators into $TOOLS/venv"
  rm -rf "$TOOLS/venv"
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install -q -r "$HERE/requirements.txt" </dev/null
  echo "$want" >"$TOOLS/venv/.stamp"
}

install_node_tools() {
  local want
  want=$(stamp_of "$HERE/package.json" "$HERE/package-lock.json")
  [[ -f $TOOLS/node/.stamp && $(cat "$TOOLS/node/.stamp") == "$want" ]] && return
  log "installing npm validators into $TOOLS/node"
  rm -rf "$TOOLS/node"
  mkdir -p "$TOOLS/node"
  cp "$HERE/package.json" "$HERE/package-lock.json" "$TOOLS/node/"
  (cd "$TOOLS/node" && npm ci --no-audit --no-fund --loglevel=error --engine-strict=false </dev/null)
  echo "$want" >"$TOOLS/node/.stamp"
}

mkdir -p "$TOOLS"
install_system_deps
install_python_tools
install_node_tools
bash scripts/check-prometheus.sh --install # promtool, from the Debian package prometheus
PATH=$TOOLS/venv/bin:$PATH
log "tools ready ($((SECONDS - start))s)"

results=()
failures=0
check() { # check NAME COMMAND...: runs it, records ok/FAIL, never stops the script
  local name=$1
  shift
  printf '\n== %s\n' "$name"
  if "$@"; then
    results+=("ok    $name")
    log "-> ok"
  else
    results+=("FAIL  $name")
    log "-> FAIL"
    failures=$((failures + 1))
  fi
}

yaml_files=(docker-compose.yml deploy helm/outboxd/Chart.yaml helm/outboxd/values.yaml helm/outboxd/ci helm/outboxd/files
  "$HERE/yamllint.yaml" "$HERE/parent-chart/Chart.yaml" "$HERE/parent-chart/values.yaml")
json_files() {
  check-jsonschema --check-metaschema helm/outboxd/values.schema.json
  for f in deploy/grafana/*.json; do
    python -c 'import json, sys; json.load(open(sys.argv[1]))' "$f" && log "ok -- $f is JSON"
  done
}
kubernetes() {
  python "$HERE/k8s_validate.py" "$TOOLS/node" "$K8S_VERSIONS" deploy/kubernetes/*.yaml "$WORK"/rendered/*.yaml
}
consumer_examples() {
  local dir=examples/consumers classes
  (cd "$dir/go" && GOPATH=$TOOLS/go GOCACHE=$TOOLS/go-cache GOFLAGS=-mod=mod GOPROXY=off \
    go vet ./... && GOPATH=$TOOLS/go GOCACHE=$TOOLS/go-cache GOFLAGS=-mod=mod GOPROXY=off go test ./...) || return 1
  classes=$(mktemp -d)
  if ! { javac -Xlint:all -Werror -d "$classes" "$dir/java/Dedup.java" "$dir/java/DedupCheck.java" &&
    java -cp "$classes" DedupCheck; }; then
    rm -rf "$classes"
    return 1
  fi
  rm -rf "$classes"
  PATH=$PATH:/usr/sbin python -m unittest discover -s "$dir/python" -p 'test_*.py' -v
}
dashboard_and_metric_names() {
  python "$HERE/metrics_check.py" src/telemetry/metrics.rs deploy/grafana/outboxd.json \
    deploy/prometheus/alerts.yml deploy/prometheus/alerts_test.yml --promtool promtool
}

rm -rf "$WORK"
mkdir -p "$WORK/rendered"
check "yamllint" yamllint -c "$HERE/yamllint.yaml" "${yaml_files[@]}"
check "hadolint Dockerfile" hadolint --no-color Dockerfile
check "shellcheck" shellcheck scripts/lint-deploy.sh scripts/check-prometheus.sh deploy/compose/sample-writer.sh scripts/ensure-deps.sh scripts/test-matrix.sh
check "compose schema (compose-spec)" check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml
check "compose semantics" python "$HERE/compose_check.py" docker-compose.yml
if docker compose version >/dev/null 2>&1; then
  check "docker compose config" docker compose --profile nats --profile kafka config --quiet
else
  printf "\nnote: no docker compose plugin here; compose is checked by its schema and compose_check.py\n"
fi
check "JSON files" json_files
check "helm lint + render (ci/*.yaml, refused values, config round trip, parent chart)" \
  python "$HERE/helm_render.py" helm/outboxd "$HERE/parent-chart" "$WORK/rendered" config/outboxd.toml
check "kubernetes manifests (k8s $K8S_VERSIONS, CRDs, PSS restricted)" kubernetes
check "prometheus rules (promtool check + test, copies in sync)" bash scripts/check-prometheus.sh
check "grafana dashboard + metric names (vs src/telemetry/metrics.rs)" dashboard_and_metric_names
check "config keys (src structs vs config/outboxd.toml, docs/configuration.md, chart schema)" \
  python "$HERE/config_keys.py" src config/outboxd.toml docs/configuration.md helm/outboxd/values.schema.json
check "docs/operations.md lists every metric and alert" \
  python "$HERE/docs_lists.py" src/telemetry/metrics.rs deploy/prometheus/alerts.yml docs/operations.md
check "link checker reports a missing file and a missing anchor (self-test)" python "$HERE/links_check.py" --self-test
check "doc links and #anchors (README.md, docs/, every page linked from the README)" \
  python "$HERE/links_check.py" --front-page README.md --pages docs README.md docs/*.md BENCHMARKS.md
check "consumer examples (Go vet+test, Java compile+run, Python vs nats-server)" consumer_examples

printf '\n== summary (%ss; rendered manifests in %s/rendered)\n' "$((SECONDS - start))" "$WORK"
printf '  %s\n' "${results[@]}"
log "lint-deploy: $((${#results[@]} - failures)) passed, $failures failed"
((failures == 0))
