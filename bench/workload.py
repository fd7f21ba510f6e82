"""The rows the benchmark commits: the schema, the backlogs and the paced load.

Owns: the outbox table and its publication (made by `outboxd setup --apply`), a ~300-byte JSON
payload over 1,000 aggregates, the two backlogs (N single-row transactions written by
a procedure that COMMITs after every row, and one transaction of N rows), the slots,
a server-side wait for a slot's confirmed position, and offered load at a fixed rate
with pgbench --rate, one row or several per transaction. Must never: write to the outbox while a backlog's slots are
being measured (every consumer must see exactly the same backlog).
"""

import os
import re
import subprocess
import tempfile
import time

AGGREGATES = 1000

SCHEMA_SQL = f"""
-- A ~300-byte order event (jsonb text form) for sequence number i.
CREATE FUNCTION bench_payload(i bigint) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
  SELECT jsonb_build_object(
    'order_id', i,
    'customer_id', 'customer-' || lpad((i % 7919)::text, 5, '0'),
    'currency', 'EUR',
    'total', ((i % 100000) / 100.0)::text,
    'status', 'placed',
    'lines', jsonb_build_array(
      jsonb_build_object('sku', 'sku-' || (i % 4099), 'qty', 1 + i % 5, 'price', '12.34'),
      jsonb_build_object('sku', 'sku-' || (i % 3571), 'qty', 1 + i % 3, 'price', '99.90')),
    'shipping', jsonb_build_object('method', 'standard', 'country', 'DE', 'postcode', '10115'))
$$;

-- N rows, COMMIT after every `per_txn` rows: real transactions, written fast.
CREATE PROCEDURE bench_backlog(n bigint, per_txn bigint) LANGUAGE plpgsql AS $$
BEGIN
  FOR i IN 1..n LOOP
    INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
    VALUES ('Order', 'order-' || (i % {AGGREGATES}), 'OrderPlaced', bench_payload(i));
    IF i % per_txn = 0 THEN COMMIT; END IF;
  END LOOP;
  COMMIT;
END $$;

-- Blocks until the slot's confirmed_flush_lsn reaches `target` (pg_replication_slots
-- is read from shared memory, so a loop in one statement sees it move); returns the
-- wall-clock time it did, as Unix seconds, or NULL after `timeout_s`.
CREATE FUNCTION bench_wait_confirmed(slot text, target pg_lsn, timeout_s float8)
RETURNS float8 LANGUAGE plpgsql AS $$
DECLARE deadline timestamptz := clock_timestamp() + make_interval(secs => timeout_s);
BEGIN
  LOOP
    IF (SELECT confirmed_flush_lsn >= target FROM pg_replication_slots
        WHERE slot_name = slot) THEN
      RETURN extract(epoch FROM clock_timestamp());
    END IF;
    IF clock_timestamp() > deadline THEN RETURN NULL; END IF;
    PERFORM pg_sleep(0.005);
  END LOOP;
END $$;
"""

# pgbench takes one SQL command per line: the INSERT must stay on one line.
PGBENCH_SCRIPT = (
    "\\set i random(1, 1000000000)\n"
    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES "
    f"('Order', 'order-' || (:i % {AGGREGATES}), 'OrderPlaced', bench_payload(:i));\n")


def create_schema(pg, outboxd):
    """The outbox table and publication as `outboxd setup --apply` makes them (the DDL
    lives in one place, the binary), then the benchmark's own functions. Returns the
    payload's size in bytes."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(f'[postgres]\nurl = "{pg.url}"\n[sink]\nkind = "stdout"\n')
        f.flush()
        done = subprocess.run([outboxd, "setup", "--apply", "--config", f.name],
                              capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"outboxd setup --apply failed: {done.stdout}{done.stderr}")
    pg.sql(SCHEMA_SQL)
    size = pg.sql("SELECT octet_length(bench_payload(123456)::text)").strip()
    return int(size)


def create_slots(pg, names):
    for name in names:
        pg.sql(f"SELECT pg_create_logical_replication_slot('{name}', 'pgoutput')")


def drop_slot(pg, name, timeout=10.0):
    """Drops the slot once its walsender has let go of it: a client that has just exited
    leaves its walsender running for a moment, and an active slot cannot be dropped."""
    deadline = time.monotonic() + timeout
    while pg.sql(f"SELECT 1 FROM pg_replication_slots WHERE slot_name = '{name}' "
                 "AND active").strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    pg.sql(f"SELECT pg_drop_replication_slot('{name}') FROM pg_replication_slots "
           f"WHERE slot_name = '{name}'")


def current_lsn(pg):
    return pg.sql("SELECT pg_current_wal_insert_lsn()").strip()


def lsn_bytes(lsn):
    hi, lo = lsn.split("/")
    return (int(hi, 16) << 32) + int(lo, 16)


def write_backlog(pg, n, shape):
    """Commits the backlog; returns (start LSN, end LSN, seconds). The end LSN is read in
    the same session right after the last COMMIT: every consumer is done when its
    slot's confirmed position reaches it."""
    if shape == "single":
        body = f"CALL bench_backlog({n}, 1);"
    else:
        body = (f"INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
                f"SELECT 'Order', 'order-' || (i % {AGGREGATES}), 'OrderPlaced', "
                f"bench_payload(i) FROM generate_series(1, {n}) i;")
    # The writer's own commits need not wait for the WAL write: only its end LSN matters.
    script = ("SET synchronous_commit = off;\n"
              "SELECT pg_current_wal_insert_lsn();\n"
              f"{body}\n"
              "SELECT pg_current_wal_insert_lsn();\n")
    t0 = time.monotonic()
    r = subprocess.run(pg.psql_argv(), input=script, capture_output=True, text=True,
                       timeout=1800)
    secs = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"backlog failed: {r.stderr.strip()}")
    start, end = r.stdout.split()
    # The writer committed asynchronously: wait until the WAL writer has flushed the end,
    # since a walsender sends only flushed WAL.
    pg.sql("DO $$ BEGIN WHILE pg_current_wal_flush_lsn() < '%s' LOOP "
           "PERFORM pg_sleep(0.01); END LOOP; END $$" % end)
    return start, end, secs


def wait_confirmed_argv(pg, slot, target, timeout_s):
    """A psql command that prints the Unix time the slot's confirmed LSN reached target."""
    return [*pg.psql_argv(), "-c",
            f"SELECT bench_wait_confirmed('{slot}', '{target}', {timeout_s})"]


def pgbench_script(rows):
    """One transaction of `rows` INSERTs' worth of rows (one statement)."""
    if rows == 1:
        return PGBENCH_SCRIPT
    return ("\\set i random(1, 1000000000)\n"
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) SELECT "
            f"'Order', 'order-' || ((:i + g) % {AGGREGATES}), 'OrderPlaced', bench_payload(:i + g) "
            f"FROM generate_series(1, {rows}) g;\n")


def paced_load(pg, root, rate, seconds, clients, threads, rows=1):
    """Offered load: `rate` events per second for `seconds`, in transactions of `rows`
    rows each (pgbench --rate at rate / rows transactions per second: a Poisson
    schedule, so the rate is offered whatever the latency). Returns (events committed,
    achieved events/s, mean schedule lag ms)."""
    path = os.path.join(root, f"insert-{rows}.sql")
    with open(path, "w") as f:
        f.write(pgbench_script(rows))
    # -M prepared: the cheapest way for pgbench to commit, leaving the most CPU to the relay.
    argv = ["pgbench", "-n", "-M", "prepared", "-f", path, "--rate", f"{rate / rows:g}",
            "-T", str(seconds),
            "-c", str(clients), "-j", str(threads), "-h", "127.0.0.1", "-p", str(pg.port),
            "-U", "postgres", "postgres"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120)
    if r.returncode != 0:
        raise RuntimeError(f"pgbench failed: {r.stderr.strip()[-500:]}")
    out = r.stdout
    txns = int(re.search(r"number of transactions actually processed: (\d+)", out).group(1))
    tps = float(re.search(r"tps = ([\d.]+)", out).group(1))
    lag = re.search(r"rate limit schedule lag: avg ([\d.]+)", out)
    return txns * rows, tps * rows, float(lag.group(1)) if lag else None
