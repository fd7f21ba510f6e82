#!/usr/bin/env python3
"""`make bench`: outboxd against the walsender's own limit, on this machine, in one run.

    1. a throw-away PostgreSQL (wal_level=logical) and nats-server -js on free ports
       (and tansu, a Kafka-protocol broker, when the binary has the Kafka sink);
    2. per backlog shape (N single-row transactions; one transaction of N rows): one
       fresh slot per consumer, all created before the backlog is written;
    3. the ceiling: pg_recvlogical (pgoutput, same publication) drains its slot;
    4. outboxd drains its own slot to stdout (/dev/null), NATS JetStream, Kafka, each
       broker in both delivery modes: at least once ("nats", "kafka") and exactly once
       ("nats-eo", "kafka-eo": `<sink>.exactly_once = true`, docs/exactly-once.md);
    5. outboxd under paced load (pgbench --rate): commit-to-ack latency, both modes;
    6. outboxd's CPU seconds and peak RSS for every run;
    7. a table on stdout, .tmp/bench/results.json, and BENCHMARKS.md.

Environment: BENCH_N (default 100000), BENCH_RATES (default 1000,5000,20000: events/s,
one row per transaction), BENCH_BATCHED (default 5000x10: 5,000 events/s in
transactions of 10 rows; empty for none), BENCH_LATENCY_SECS (default 15), BENCH_REPEAT (drain runs per consumer, default 5;
the median is reported), OUTBOXD_BIN (default target/release/outboxd).
`bench/bench.py --render FILE` rewrites BENCHMARKS.md from a results.json.
Not a test: nothing here asserts speed, and CI never runs it.
"""

import json
import os
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # keep bench/ free of __pycache__

import natsclient  # noqa: E402
import probe  # noqa: E402
import report  # noqa: E402
import runs  # noqa: E402
import workload  # noqa: E402
from services import (NatsServer, Postgres, Procs, Tansu, fresh_root, install_signal_handlers,
                      tansu_binary)  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = [("single", "{n} single-row transactions"), ("one", "one transaction of {n} rows")]


def machine_info():
    def first(path, key):
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        return "?"

    def cmd(*argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, cwd=REPO).stdout.strip()
        except OSError:
            return "?"

    return {
        "nproc": os.cpu_count(),
        "memory": f"{int(first('/proc/meminfo', 'MemTotal').split()[0]) / 2**20:.1f} GiB",
        "cpu_model": first("/proc/cpuinfo", "model name"),
        "kernel": os.uname().release,
        "os": _os_name(),
        "commit": cmd("git", "rev-parse", "--short", "HEAD"),
        # What the binary is built from: uncommitted changes elsewhere do not count.
        "dirty": bool(cmd("git", "status", "--porcelain", "--", "src", "Cargo.toml",
                          "Cargo.lock")),
        "loadavg_start": probe.loadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def _os_name():
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return "?"


def kafka_available(ctx):
    """Whether the Kafka runs can happen: a tansu broker must be installed and `outboxd
    check` must pass against it with `sink.kind = "kafka"`. Returns (ok, note); on
    success ctx.kafka is the running broker."""
    binary = tansu_binary(REPO)
    probe_slot = "bench_kafka_check"
    workload.create_slots(ctx.pg, [probe_slot])
    try:
        if binary is None:
            # Without a broker the check still tells whether the binary has the sink.
            _code, out = runs.check(ctx, runs.outboxd_config(ctx, "kafka-check", probe_slot,
                                                             "kafka", 9))
            return False, ("no Kafka-protocol broker: tansu is not installed "
                           "(scripts/ensure-deps.sh installs it with the Kafka sink); "
                           f"`outboxd check` says: {_fail_lines(out)}")
        ctx.kafka = Tansu(ctx.root, ctx.procs, binary)
        ctx.kafka.start()
        code, out = runs.check(ctx, runs.outboxd_config(ctx, "kafka-check", probe_slot, "kafka", 9))
        if code != 0:
            ctx.procs.stop(ctx.kafka.proc)
            ctx.kafka = None
            return False, f"this outboxd has no working Kafka sink: {_fail_lines(out)}"
        return True, (f"ran against {ctx.kafka.version}, a Kafka-protocol broker with "
                      "in-memory storage (the one the Kafka tests use)")
    finally:
        workload.drop_slot(ctx.pg, probe_slot)


def _fail_lines(out):
    lines = [" ".join(ln.split()) for ln in out.splitlines()
             if "FAIL" in ln or "error" in ln.lower()]
    return " / ".join(lines[:3]) or out[-300:]


def median_run(rs):
    """The run with the median events/s, with the range of all repeats."""
    ok = sorted((r for r in rs if "error" not in r), key=lambda r: r["events_per_s"])
    if not ok:
        return rs[0]
    m = dict(ok[(len(ok) - 1) // 2])
    m["repeats"] = len(ok)
    m["range_events_per_s"] = [ok[0]["events_per_s"], ok[-1]["events_per_s"]]
    if len(ok) < len(rs):
        m["failed_repeats"] = len(rs) - len(ok)
    return m


def run_all(ctx, cfg, res):
    ok, note = kafka_available(ctx)
    res["kafka_note"] = note
    res["kafka_short"] = ("no Kafka sink in this outboxd build" if "not built" in note or
                          "no working Kafka sink" in note else
                          "no Kafka-protocol broker installed" if "tansu is not installed" in note
                          else note)
    print(f"bench: Kafka: {'yes' if ok else 'skipped'} — {note}")
    brokers = ["nats", "nats-eo"] + (["kafka", "kafka-eo"] if ok else [])
    sinks = ["stdout"] + brokers

    res["phases"] = []
    for shape, title in SHAPES:
        consumers = ["ceiling"] + sinks
        # Round robin (ceiling, stdout, nats, ..., ceiling, stdout, ...), so that load from
        # outside the benchmark falls on every consumer alike; each figure is the median.
        order = [(c, k) for k in range(cfg["repeat"]) for c in consumers]
        slots = {(c, k): runs.slot_name("bench", shape, c, k) for c, k in order}
        # Every slot exists before the first row of the backlog: each consumer decodes
        # exactly the same transactions from its own fresh slot.
        workload.create_slots(ctx.pg, slots.values())
        print(f"bench: writing {title.format(n=cfg['n'])} ...", flush=True)
        start, end, secs = workload.write_backlog(ctx.pg, cfg["n"], shape)
        phase = {"shape": shape, "title": title.format(n=f"{cfg['n']:,}"), "n": cfg["n"],
                 "end_lsn": end,
                 "wal_bytes": workload.lsn_bytes(end) - workload.lsn_bytes(start),
                 "write_s": secs, "runs": [], "all_runs": []}
        res["phases"].append(phase)
        for c, k in order:
            print(f"bench:   {shape}: draining with {c} ({k + 1}/{cfg['repeat']}) ...", flush=True)
            try:
                if c == "ceiling":
                    r = runs.run_ceiling(ctx, slots[(c, k)], end, cfg["n"])
                else:
                    r = runs.run_drain(ctx, c, slots[(c, k)], end, cfg["n"])
            except Exception as e:
                if not tolerated(c):
                    raise
                r = {"consumer": f"outboxd → {c}", "sink": c,
                     "exactly_once": runs.exactly_once(c), "error": str(e)}
            finally:
                workload.drop_slot(ctx.pg, slots[(c, k)])
            phase["all_runs"].append(r)
            print("bench:     " + report.run_line(r, None), flush=True)
        for c in consumers:
            phase["runs"].append(median_run([r for (cc, _k), r in zip(order, phase["all_runs"])
                                             if cc == c]))
        ctx.pg.sql("TRUNCATE outbox")  # not published (publish = 'insert'); keeps it small

    res["latency"] = []
    for sink in brokers:
        loads = [(r, 1) for r in cfg["rates"]] + [tuple(b) for b in cfg.get("batched", [])]
        print(f"bench: paced load against {sink}: {report.loads_text(loads)} events/s, "
              f"{cfg['latency_secs']} s each ...", flush=True)
        try:
            for r in runs.run_latency(ctx, sink, runs.slot_name("bench_latency", sink), loads,
                                      cfg["latency_secs"]):
                res["latency"].append(r)
                print("bench:     " + report.latency_line(r), flush=True)
        except Exception as e:
            if not tolerated(sink):
                raise
            res["latency"].append({"sink": sink, "exactly_once": runs.exactly_once(sink),
                                   "error": str(e)})
            print("bench:     " + report.latency_line(res["latency"][-1]), flush=True)


def tolerated(consumer):
    """Whether a failed run is recorded (and the bench goes on) rather than fatal: Kafka
    (a broker other than Apache Kafka) and the exactly-once modes, whose failure is
    itself a finding to report."""
    if consumer not in runs.SINKS:  # the ceiling
        return False
    return runs.sink_kind(consumer) == "kafka" or runs.exactly_once(consumer)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--render":
        with open(sys.argv[2]) as f:
            res = json.load(f)
        report.write_markdown(res, os.path.join(REPO, "BENCHMARKS.md"))
        print(report.table(res))
        return 0
    cfg = {
        "n": int(os.environ.get("BENCH_N", "100000")),
        "rates": [int(r) for r in os.environ.get("BENCH_RATES", "1000,5000,20000").split(",")],
        # RATExROWS: RATE events/s offered in transactions of ROWS rows each.
        "batched": [[int(x) for x in b.split("x")]
                    for b in os.environ.get("BENCH_BATCHED", "5000x10").split(",") if b],
        "latency_secs": int(os.environ.get("BENCH_LATENCY_SECS", "15")),
        "repeat": int(os.environ.get("BENCH_REPEAT", "5")),
        "outboxd": os.environ.get("OUTBOXD_BIN", os.path.join(REPO, "target/release/outboxd")),
    }
    if not os.access(cfg["outboxd"], os.X_OK):
        print(f"bench: {cfg['outboxd']} not found: run `make build-release`", file=sys.stderr)
        return 1
    root = fresh_root(os.path.join(REPO, ".tmp/bench"))

    install_signal_handlers()
    procs = Procs()
    t0 = time.monotonic()
    res = {"config": cfg, "machine": machine_info()}
    js = None
    try:
        pg = Postgres(root, procs)
        pg.start()
        nats = NatsServer(root, procs)
        nats.start()
        res["versions"] = {"postgres": pg.version, "nats": nats.version,
                           "outboxd": subprocess.run([cfg["outboxd"], "--version"],
                                                     capture_output=True, text=True).stdout.strip()}
        res["payload_bytes"] = workload.create_schema(pg, cfg["outboxd"])
        js = natsclient.Nats(nats.port)
        ctx = runs.Ctx(root, procs, pg, nats, cfg["outboxd"])
        ctx.js = js
        run_all(ctx, cfg, res)
        if ctx.kafka is not None:
            res["versions"]["kafka"] = ctx.kafka.version
    except KeyboardInterrupt as e:
        print(f"bench: interrupted ({e}); stopping everything", file=sys.stderr)
        return 130
    finally:
        if js is not None:
            js.close()
        procs.stop_all()
    res["machine"]["loadavg_end"] = probe.loadavg()
    res["wall_s"] = time.monotonic() - t0
    with open(os.path.join(root, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    print()
    print(report.table(res))
    report.write_markdown(res, os.path.join(REPO, "BENCHMARKS.md"))
    print(f"\nbench: done in {res['wall_s']:.0f} s; BENCHMARKS.md and {root}/results.json written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
