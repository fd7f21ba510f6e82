#!/usr/bin/env bash
# Installs what the test suite and the demo need and a fresh Debian machine may lack:
# PostgreSQL server binaries (initdb, pg_ctl, pg_recvlogical), nats-server, and the
# C toolchain pieces the crates build with. Idempotent; quiet when all is present.
set -euo pipefail

need=()
have_pg_server() { ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; }
have_pg_server || need+=(postgresql)
command -v psql >/dev/null 2>&1 || need+=(postgresql-client)
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || need+=(nats-server)
command -v cc >/dev/null 2>&1 || need+=(gcc)
command -v make >/dev/null 2>&1 || need+=(make)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v runuser >/dev/null 2>&1 || need+=(util-linux)

if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "ensure-deps: missing ${need[*]}; install them (as root: apt-get install ${need[*]})" >&2
    exit 1
  fi
  echo "ensure-deps: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # The postgresql package may try to start a cluster; the tests never use it.
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  # initdb refuses to run as root; the harness runs it as `postgres`.
  useradd --system --home /var/lib/postgresql --shell /bin/bash postgres
fi
command -v cargo >/dev/null 2>&1 || { echo "ensure-deps: cargo not found (install Rust with rustup)" >&2; exit 1; }
