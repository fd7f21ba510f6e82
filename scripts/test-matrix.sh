#!/usr/bin/env bash
# The version matrix (docs/versions.md): the tests whose outcome depends
# on the server version, run once per pinned PostgreSQL and once per pinned
# nats-server (scripts/ensure-deps.sh --matrix installs them under .tmp/tools). The
# full suite (`make test`) runs on Debian's PostgreSQL 15 and nats-server; this adds
# the other versions within a budget of about 15 minutes on 2 cores, so it picks the
# tests that prove the most per minute rather than the whole suite per version.
#
#   bash scripts/test-matrix.sh            # every leg
#   MATRIX_PG="17" MATRIX_UNSUPPORTED_PG="" MATRIX_NATS="" bash scripts/test-matrix.sh
#
# Each leg is one `cargo test --test main` with the server chosen by the harness's
# environment variables (OUTBOXD_TEST_PG_BINDIR, OUTBOXD_TEST_NATS_SERVER). Prints
# every leg's wall time and a closing count; exits 1 if any leg failed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TOOLS=$PWD/.tmp/tools
MATRIX_PG=${MATRIX_PG-14 16 17 18}
MATRIX_UNSUPPORTED_PG=${MATRIX_UNSUPPORTED_PG-13}
MATRIX_NATS=${MATRIX_NATS-2.10.26 2.15.1}
CARGO=${CARGO:-cargo}

# Per PostgreSQL version: the relay end to end with SIGKILLs (nothing lost, order per
# aggregate), the table-less outbox, a schema change, slot loss, a re-created or
# unpublished outbox table, standby takeover of
# outboxd replicas, the initial snapshot (also SIGKILLed mid-way), setup's SQL as a least-privilege role and
# check, failover slots (both sides), decoding on a hot standby (both sides).
PG_TESTS=(
  relay_nats::sigkill_while_writing_loses_nothing_and_keeps_order
  tableless::emitted_events_follow_commit_order_and_rollbacks
  failures_edges::schema_change_add_column_carries_on
  failures_edges::dropping_a_mapped_column_stops_with_its_name
  slot_loss::
  table_changes::
  standby::one_streams_standbys_take_over_on_sigkill_and_sigterm
  snapshot::snapshot_and_stream_deliver_every_row_exactly_once_in_order
  snapshot::a_kill_during_the_snapshot_redoes_it_and_loses_nothing
  security_postgres::verify_full_streams_with_a_least_privilege_role_and_check_passes
  cli::setup_apply_then_check_passes
  cli::failover_slot_is_refused_before_postgres_17_and_created_from_17_on
  versions::
)
# On an unsupported PostgreSQL (13): the version tests, which assert there that the
# relay stops naming the reason, check warns, and standby decoding and failover
# slots are refused.
UNSUPPORTED_PG_TESTS=(versions::)
# Per nats-server version: the NATS black-box tests (CloudEvents attributes, dedup by
# Nats-Msg-Id across SIGKILLs, SIGTERM drain, the stream the relay creates), the
# duplicate count after a restart, a stream's size limit, TLS and every auth method,
# and exactly-once mode (the checkpoint stream and reading the stream back).
NATS_TESTS=(
  relay_nats::
  exactly_once::nats_
  failures_crash::sigterm_mid_batch_then_restart_publishes_no_duplicates
  dead_letter::an_event_larger_than_the_stream_allows_becomes_a_dead_letter
  security_nats::
)

declare -a summary=()
passed=0
failed=0
legs_failed=0
start=$SECONDS

# leg NAME ENV=VALUE -- FILTERS...
leg() {
  local name=$1 env=$2 log t0 counts
  shift 3
  log=$(mktemp)
  t0=$SECONDS
  echo "=== matrix: $name"
  if env "$env" "$CARGO" test --locked --test main -- "$@" 2>&1 | tee "$log"; then
    counts=ok
  else
    counts=FAILED
    legs_failed=$((legs_failed + 1))
  fi
  local p f
  p=$(grep -o '[0-9]* passed' "$log" | awk '{s += $1} END {print s + 0}')
  f=$(grep -o '[0-9]* failed' "$log" | awk '{s += $1} END {print s + 0}')
  rm -f "$log"
  if [ "$p" -eq 0 ] && [ "$counts" = ok ]; then
    counts=FAILED
    legs_failed=$((legs_failed + 1))
    echo "matrix: leg $name ran no test" >&2
  fi
  passed=$((passed + p))
  failed=$((failed + f))
  summary+=("$(printf '%-24s %-6s %3d passed %3d failed %4ds' "$name" "$counts" "$p" "$f" $((SECONDS - t0)))")
}

# Build once before timing the legs.
"$CARGO" test --locked --test main --no-run >/dev/null 2>&1 || "$CARGO" test --locked --test main --no-run

for v in $MATRIX_PG; do
  bin=$TOOLS/postgresql-$v/bin
  [ -x "$bin/postgres" ] || { echo "matrix: $bin missing: run scripts/ensure-deps.sh --matrix" >&2; exit 1; }
  leg "postgresql $v" "OUTBOXD_TEST_PG_BINDIR=$bin" -- "${PG_TESTS[@]}"
done
for v in $MATRIX_UNSUPPORTED_PG; do
  bin=$TOOLS/postgresql-$v/bin
  [ -x "$bin/postgres" ] || { echo "matrix: $bin missing: run scripts/ensure-deps.sh --matrix" >&2; exit 1; }
  leg "postgresql $v (refused)" "OUTBOXD_TEST_PG_BINDIR=$bin" -- "${UNSUPPORTED_PG_TESTS[@]}"
done
for v in $MATRIX_NATS; do
  bin=$TOOLS/nats-server-$v/nats-server
  [ -x "$bin" ] || { echo "matrix: $bin missing: run scripts/ensure-deps.sh --matrix" >&2; exit 1; }
  leg "nats-server $v" "OUTBOXD_TEST_NATS_SERVER=$bin" -- "${NATS_TESTS[@]}"
done

echo
echo "=== matrix summary ($((SECONDS - start)) s)"
printf '%s\n' "${summary[@]}"
echo "matrix: $passed passed, $failed failed"
[ "$legs_failed" -eq 0 ]
