#!/usr/bin/env python3
"""`python3 bench/ab.py A B`: two outboxd binaries drain the same backlogs in one run.

For a change that must not cost speed (a restructure, a dependency upgrade): the same
throw-away PostgreSQL and nats-server as `make bench`, one backlog per shape (N
single-row transactions; one transaction of N rows), a fresh slot per drain, and the
drains interleaved A, B, A, B, ... to stdout and to NATS, so that load from outside
falls on both alike. Prints, per shape and sink, the median events/s, outboxd CPU
microseconds per event and peak RSS of each binary, as a Markdown table for
BENCHMARKS.md. Environment: BENCH_N (default 100000), BENCH_REPEAT (default 5).
Not a test: nothing here asserts speed, and CI never runs it.
"""

import os
import statistics
import sys

sys.dont_write_bytecode = True  # keep bench/ free of __pycache__

import natsclient  # noqa: E402
import runs  # noqa: E402
import workload  # noqa: E402
from services import NatsServer, Postgres, Procs, fresh_root, install_signal_handlers  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = [("single", "single-row transactions"), ("one", "one transaction")]
SINKS = ["stdout", "nats"]


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    binaries = {"A": os.path.abspath(sys.argv[1]), "B": os.path.abspath(sys.argv[2])}
    for path in binaries.values():
        if not os.access(path, os.X_OK):
            print(f"ab: {path} is not an executable", file=sys.stderr)
            return 1
    n = int(os.environ.get("BENCH_N", "100000"))
    repeat = int(os.environ.get("BENCH_REPEAT", "5"))
    root = fresh_root(os.path.join(REPO, ".tmp/bench-ab"))
    install_signal_handlers()
    procs = Procs()
    js = None
    results = {}
    try:
        pg = Postgres(root, procs)
        pg.start()
        nats = NatsServer(root, procs)
        nats.start()
        workload.create_schema(pg, binaries["A"])
        js = natsclient.Nats(nats.port)
        ctx = runs.Ctx(root, procs, pg, nats, binaries["A"])
        ctx.js = js
        for shape, _title in SHAPES:
            order = [(label, sink, k) for k in range(repeat) for sink in SINKS for label in binaries]
            slots = {o: f"ab_{shape}_{o[0]}_{o[1]}_{o[2]}".lower() for o in order}
            workload.create_slots(pg, slots.values())
            print(f"ab: writing {n} events ({shape}) ...", flush=True)
            _start, end, _secs = workload.write_backlog(pg, n, shape)
            for label, sink, k in order:
                ctx.outboxd = binaries[label]
                try:
                    r = runs.run_drain(ctx, sink, slots[(label, sink, k)], end, n)
                finally:
                    workload.drop_slot(pg, slots[(label, sink, k)])
                results.setdefault((shape, sink, label), []).append(r)
                print(f"ab:   {shape} {sink} {label} #{k + 1}: {r['events_per_s']:,.0f} events/s, "
                      f"{r['cpu_s'] / n * 1e6:.1f} µs CPU/event, {r['peak_rss_mb']:.0f} MB", flush=True)
            pg.sql("TRUNCATE outbox")
    finally:
        if js is not None:
            js.close()
        procs.stop_all()

    print(f"\nA = {binaries['A']}\nB = {binaries['B']}\n{n:,} events, median of {repeat}\n")
    print("| backlog | sink | binary | events/s | outboxd CPU µs/event | peak RSS MB |")
    print("|---|---|---|---:|---:|---:|")
    for shape, title in SHAPES:
        for sink in SINKS:
            for label in binaries:
                rs = results[(shape, sink, label)]
                med = lambda key: statistics.median(r[key] for r in rs)  # noqa: E731
                print(f"| {title} | {sink} | {label} | {med('events_per_s'):,.0f} | "
                      f"{med('cpu_s') / n * 1e6:.1f} | {med('peak_rss_mb'):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
