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
command -v promtool >/dev/null 2>&1 || need+=(prometheus)   # promtool checks /metrics output

if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "ensure-deps: missing ${need[*]}; install them (as root: apt-get install ${need[*]})" >&2
    exit 1
  fi
  echo "ensure-deps: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq </dev/null
  # Packages (postgresql, prometheus) must not start their own services: the tests
  # start their own on free ports. policy-rc.d tells invoke-rc.d to start nothing.
  policy=/usr/sbin/policy-rc.d
  created_policy=
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; created_policy=1
  fi
  apt-get install -y -qq --no-install-recommends "${need[@]}" </dev/null >/dev/null
  [ -n "$created_policy" ] && rm -f "$policy"
fi
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  # initdb refuses to run as root; the harness runs it as `postgres`.
  useradd --system --home /var/lib/postgresql --shell /bin/bash postgres
fi
command -v cargo >/dev/null 2>&1 || { echo "ensure-deps: cargo not found (install Rust with rustup)" >&2; exit 1; }
