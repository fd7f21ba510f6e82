#!/usr/bin/env bash
# The relay's main job, end to end, on this machine: a throw-away PostgreSQL
# (wal_level=logical) and nats-server -js on free ports, the outbox table, outboxd,
# sample events committed in application transactions, the CloudEvents read back
# from JetStream, and a crash (SIGKILL) in the middle that loses nothing.
# Everything lives under .tmp/demo and is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD/.tmp/demo"
rm -rf "$root"; mkdir -p "$root"; chmod 777 "$root"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
pg_port=$(free_port); nats_port=$(free_port)

cleanup() {
  [ -n "${relay_pid:-}" ] && kill "$relay_pid" 2>/dev/null || true
  [ -n "${nats_pid:-}" ] && kill "$nats_pid" 2>/dev/null || true
  as_pg "$pgbin/pg_ctl" -D "$root/pg" -m immediate stop >/dev/null 2>&1 || true
}
trap cleanup EXIT

echo "==> building outboxd"
cargo build --locked --quiet --bin outboxd --example nats_tail
bin=target/debug/outboxd

echo "==> starting PostgreSQL (wal_level=logical) on 127.0.0.1:$pg_port"
as_pg "$pgbin/initdb" -D "$root/pg" -U postgres -A trust -E UTF8 --locale=C --no-sync >/dev/null
as_pg "$pgbin/pg_ctl" -D "$root/pg" -l "$root/pg.log" -w \
  -o "-p $pg_port -k $root -c listen_addresses=127.0.0.1 -c wal_level=logical" start >/dev/null

echo "==> starting nats-server -js on 127.0.0.1:$nats_port"
nats-server -js -a 127.0.0.1 -p "$nats_port" -sd "$root/js" >"$root/nats.log" 2>&1 &
nats_pid=$!

cat >"$root/outboxd.toml" <<TOML
[postgres]
url = "postgres://postgres@127.0.0.1:$pg_port/postgres"
[cloudevents]
source = "/demo/orders"
type_prefix = "com.example."
[sink]
kind = "nats"
[nats]
url = "nats://127.0.0.1:$nats_port"
[http]
listen = "127.0.0.1:$(free_port)"
[log]
format = "text"
TOML
psql_() { psql -q -h 127.0.0.1 -p "$pg_port" -U postgres -d postgres -v ON_ERROR_STOP=1 "$@"; }

echo "==> outboxd setup --apply (outbox table, publication, slot)"
"$bin" setup --apply --config "$root/outboxd.toml"
"$bin" check --config "$root/outboxd.toml"

echo "==> outboxd run"
"$bin" run --config "$root/outboxd.toml" 2>"$root/outboxd.log" & relay_pid=$!

echo "==> the application commits events in its own transactions"
psql_ <<'SQL'
BEGIN;  -- place an order: one business change, two events, atomically
INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, correlation_id)
  VALUES ('Order', 'order-1001', 'OrderPlaced', '{"customer": "c-7", "total": 42.50}', 'checkout-77');
INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, correlation_id, causation_id, headers)
  VALUES ('Payment', 'order-1001', 'PaymentRequested', '{"amount": 42.50}', 'checkout-77', 'order-1001-placed',
          '{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}');
COMMIT;
BEGIN;  -- a transaction that fails publishes nothing
INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('Order', 'order-1002', 'OrderPlaced', '{}');
ROLLBACK;
SQL
target/debug/examples/nats_tail "nats://127.0.0.1:$nats_port" OUTBOX 2

echo "==> 2,000 more events; outboxd is killed (SIGKILL) in the middle and restarted"
psql_ -c "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
          SELECT 'Order', 'order-' || (g % 50), 'OrderUpdated', jsonb_build_object('n', g)
          FROM generate_series(1, 1000) g;" & writer_pid=$!
sleep 0.3; kill -9 "$relay_pid"; wait "$relay_pid" 2>/dev/null || true; wait "$writer_pid"
psql_ -c "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
          SELECT 'Order', 'order-' || (g % 50), 'OrderUpdated', jsonb_build_object('n', g)
          FROM generate_series(1001, 2000) g;"
"$bin" run --config "$root/outboxd.toml" 2>>"$root/outboxd.log" & relay_pid=$!
target/debug/examples/nats_tail "nats://127.0.0.1:$nats_port" OUTBOX 2002 | tail -1
last_event_lsn=$(psql_ -At -c "SELECT pg_current_wal_lsn()")
kill -TERM "$relay_pid"; wait "$relay_pid" && echo "==> outboxd exited 0 on SIGTERM (its last status update confirmed what JetStream acknowledged)"
relay_pid=
echo "==> slot position: confirmed past every event (the WAL was at $last_event_lsn after the last one was stored)"
psql_ -c "SELECT slot_name, confirmed_flush_lsn, confirmed_flush_lsn >= '$last_event_lsn'::pg_lsn AS past_every_event
          FROM pg_replication_slots"
echo "demo done; logs in $root"
