"""The measured runs: the pg_recvlogical ceiling, outboxd draining a backlog, and
outboxd under a paced load.

Owns: each run's start and end condition, the outboxd configs the runs use, and the
figures each run returns (a plain dict, so the report can be rendered again from
results.json). Must never: start a run before its slot exists and its backlog is
written, or leave a process of a run running when the run returns or fails.
"""

import os
import re
import subprocess
import time

import probe
import workload
from services import free_port, wait_port

DRAIN_TIMEOUT_S = 600

# What the bench calls a consumer of a backlog or a paced load, and what it runs:
# (`sink.kind`, exactly-once). "-eo" is the same sink with `<sink>.exactly_once = true`
# and the checkpoint defaults a user gets (`sink.checkpoint_interval_ms` = 200,
# `sink.checkpoint_max_events` = 10,000).
SINKS = {
    "stdout": ("stdout", False),
    "nats": ("nats", False),
    "nats-eo": ("nats", True),
    "kafka": ("kafka", False),
    "kafka-eo": ("kafka", True),
}


def sink_kind(sink):
    """The `sink.kind` a bench sink runs ("nats-eo" -> "nats")."""
    return SINKS[sink][0]


def exactly_once(sink):
    return SINKS[sink][1]


def slot_name(*parts):
    """A replication slot name from bench labels (slot names allow [a-z0-9_] only)."""
    return "_".join(str(p) for p in parts).replace("-", "_")


class Ctx:
    """What every run needs: the run directory, the processes, the services, the binary."""

    def __init__(self, root, procs, pg, nats, outboxd):
        self.root, self.procs, self.pg, self.nats, self.outboxd = root, procs, pg, nats, outboxd
        self.kafka = None  # a services.Tansu when the Kafka run is possible


def outboxd_config(ctx, name, slot, sink, http_port, commit_time=False):
    """An outboxd config: the defaults a user gets, except `status_interval_ms = 100`
    (the confirmed LSN, which ends a drain measurement, reaches the server within 100 ms
    rather than 1 s) and, with `commit_time`, `created_at` unmapped so that each event's
    `time` is its transaction's commit time (the exact latency read-back uses it).
    `sink` is a key of SINKS: "nats-eo" and "kafka-eo" add `exactly_once = true`."""
    kind, once = SINKS[sink]
    lines = [
        "[postgres]",
        f'url = "{ctx.pg.url}"',
        f'slot = "{slot}"',
        "status_interval_ms = 100",
    ]
    if commit_time:
        lines += ["[postgres.columns]", 'created_at = ""']
    lines += ["[cloudevents]", 'source = "/bench/orders"', "[sink]", f'kind = "{kind}"']
    if kind == "nats":
        lines += ["[nats]", f'url = "{ctx.nats.url}"']
    if kind == "kafka":
        # Without a broker (ctx.kafka is None) port 9 refuses at once, and `outboxd check`
        # still says whether this binary has a Kafka sink at all.
        brokers = ctx.kafka.brokers if ctx.kafka is not None else "127.0.0.1:9"
        lines += ["[kafka]", f'brokers = "{brokers}"']
    if once:
        lines += ["exactly_once = true"]  # under [nats] or [kafka], just opened
    lines += ["[http]", f'listen = "127.0.0.1:{http_port}"', "[log]", 'format = "text"']
    path = os.path.join(ctx.root, f"{name}.toml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def check(ctx, cfg):
    """`outboxd check`: (exit code, output)."""
    r = subprocess.run([ctx.outboxd, "check", "--config", cfg], capture_output=True, text=True,
                       timeout=60)
    return r.returncode, (r.stdout + r.stderr).strip()


class WalsenderWatch:
    """Follows the (single) walsender of a run and keeps its last CPU reading, since it
    exits together with its client."""

    def __init__(self, pg):
        self.postmaster = pg.postmaster_pid()
        self.pid, self.cpu, self.wait = None, 0.0, 0.0

    def sample(self):
        if self.pid is None:
            pids = probe.walsender_pids(self.postmaster)
            if len(pids) != 1:
                return
            self.pid = pids[0]
        try:
            self.cpu = probe.cpu_seconds(self.pid)
            self.wait = probe.runqueue_wait_s(self.pid)
        except OSError:
            pass


def run_ceiling(ctx, slot, end_lsn, n):
    """pg_recvlogical drains `slot` up to `end_lsn` into /dev/null."""
    argv = ["pg_recvlogical", "-d", ctx.pg.conninfo, "--slot", slot, "--start", "--no-loop",
            "-o", "proto_version=1", "-o", "publication_names=outboxd",
            "--endpos", end_lsn, "-f", "/dev/null"]
    ws = WalsenderWatch(ctx.pg)
    machine = probe.MachineCpu(ctx.pg.postmaster_pid())
    machine.start()
    t0 = time.monotonic()
    p = ctx.procs.spawn("pg_recvlogical", argv, stderr=subprocess.PIPE)
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        ws.sample()
        if time.monotonic() - t0 > DRAIN_TIMEOUT_S:
            ctx.procs.stop(p)
            raise RuntimeError("pg_recvlogical did not reach the end LSN")
        time.sleep(0.01)
    secs = time.monotonic() - t0
    busy = machine.stop()
    p.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4, not by Popen
    ctx.procs.forget(p)
    if p.returncode != 0:
        raise RuntimeError(f"pg_recvlogical failed: {p.stderr.read().decode().strip()}")
    confirmed = ctx.pg.sql(f"SELECT confirmed_flush_lsn FROM pg_replication_slots "
                           f"WHERE slot_name = '{slot}'").strip()
    return {"consumer": "pg_recvlogical", "seconds": secs, "events_per_s": n / secs,
            "cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_mb": ru.ru_maxrss / 1024,
            "walsender_cpu_s": ws.cpu, "walsender_wait_s": ws.wait,
            "machine_busy_cores": busy, "others_cores": machine.others, "broker_cpu_s": 0.0,
            "confirmed_lsn": confirmed}


def _spawn_outboxd(ctx, name, cfg, sink):
    log = open(os.path.join(ctx.root, f"{name}.log"), "w")
    out = subprocess.DEVNULL if sink == "stdout" else log
    return ctx.procs.spawn(f"outboxd {name}", [ctx.outboxd, "run", "--config", cfg],
                           stdout=out, stderr=log)


def _log_tail(ctx, name, lines=3):
    """The last warnings and errors of an outboxd run's log, for a failure's message."""
    try:
        with open(os.path.join(ctx.root, f"{name}.log"), errors="replace") as f:
            text = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in f]
    except OSError:
        return ""
    bad = [ln for ln in text if re.search(r"\b(WARN|ERROR)\b", ln)]
    return " | ".join(bad[-lines:])


def _failed(ctx, name, e):
    """`e` with the tail of the run's log, so that results.json says why."""
    tail = _log_tail(ctx, name)
    return RuntimeError(f"{e}; {name}.log: {tail}" if tail else str(e))


def _stop_outboxd(ctx, p, name):
    code = ctx.procs.stop(p, timeout=30)
    if code != 0:
        raise RuntimeError(f"outboxd ({name}) exited {code} on SIGTERM; see {name}.log")


def _wait_confirmed(ctx, p, slot, target, ws=None, timeout=DRAIN_TIMEOUT_S):
    """Blocks until `slot` is confirmed up to `target`; the Unix time it was. Fails at
    once if outboxd exits meanwhile."""
    w = ctx.procs.spawn("psql wait", workload.wait_confirmed_argv(ctx.pg, slot, target, timeout),
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while w.poll() is None:
            if p.poll() is not None:
                raise RuntimeError(f"outboxd exited ({p.returncode}) before the slot reached "
                                   f"{target}")
            if ws is not None:
                ws.sample()
            time.sleep(0.02)
        out = w.stdout.read().strip()
        if w.returncode != 0 or not out:
            raise RuntimeError(f"slot {slot} did not reach {target}: {w.stderr.read().strip()}")
        return float(out)
    finally:
        ctx.procs.stop(w)


def run_drain(ctx, sink, slot, end_lsn, n):
    """outboxd drains `slot` to `sink` until the slot is confirmed up to `end_lsn`."""
    http = free_port()
    name = f"drain-{slot}"
    cfg = outboxd_config(ctx, name, slot, sink, http)
    kind = sink_kind(sink)
    if kind == "nats":
        # outboxd creates it again (nats.create_stream). Exactly-once: the checkpoint
        # subject is per slot and every run has a fresh slot, so no checkpoint is found
        # and the (empty) stream's last messages are read back instead.
        ctx.js.delete_stream("OUTBOX")
    ws = WalsenderWatch(ctx.pg)
    broker0 = broker_cpu(ctx, sink)
    machine = probe.MachineCpu(ctx.pg.postmaster_pid())
    machine.start()
    t0 = time.time()
    p = _spawn_outboxd(ctx, name, cfg, kind)
    try:
        try:
            t_end = _wait_confirmed(ctx, p, slot, end_lsn, ws)
        except RuntimeError as e:
            raise _failed(ctx, name, e) from e
        ws.sample()
        secs = t_end - t0
        busy = machine.stop()
        try:
            metrics = probe.scrape(http)
        except OSError:
            metrics = None  # a binary without the HTTP endpoint: the slot still tells
        res = {
            "consumer": f"outboxd → {sink}", "sink": sink, "exactly_once": exactly_once(sink),
            "seconds": secs,
            "events_per_s": n / secs,
            "cpu_s": probe.cpu_seconds(p.pid), "peak_rss_mb": probe.peak_rss_mb(p.pid),
            "wait_s": probe.runqueue_wait_s(p.pid), "walsender_wait_s": ws.wait,
            "threads_cpu_s": probe.threads_cpu(p.pid),
            "walsender_cpu_s": ws.cpu, "machine_busy_cores": busy,
            "others_cores": machine.others,
            "broker_cpu_s": broker_cpu(ctx, sink) - broker0,
        }
        if metrics is not None:
            res["published"] = probe.metric_sum(metrics, "outboxd_events_published_total")
            res["publish_errors"] = probe.metric_sum(metrics, "outboxd_publish_errors_total")
            res["last_ack_s"] = probe.metric_sum(
                metrics, "outboxd_last_ack_timestamp_seconds") - t0
    finally:
        _stop_outboxd(ctx, p, name)
    if kind == "nats":
        res["stored"] = ctx.js.messages("OUTBOX")
    delivered = res.get("stored", res.get("published"))
    if delivered is not None and delivered != n:
        raise RuntimeError(f"{name}: {delivered:.0f} events delivered, expected {n}")
    return res


def broker_cpu(ctx, sink):
    """CPU seconds of the broker process a sink talks to (0 for stdout)."""
    proc = {"nats": getattr(ctx.nats, "proc", None),
            "kafka": getattr(ctx.kafka, "proc", None)}.get(sink_kind(sink))
    return probe.cpu_seconds(proc.pid) if proc is not None else 0.0


def rate_plan(rate, rows=1):
    """pgbench clients and threads for an offered rate of events in transactions of
    `rows` rows."""
    clients = max(2, min(8, rate // rows // 2500))
    return clients, (2 if clients >= 4 else 1)


def run_latency(ctx, sink, slot, loads, secs):
    """One outboxd against `sink`; for each (rate, rows) of `loads`, pgbench offers
    `rate` events per second in transactions of `rows` rows for `secs`, and the
    commit-to-ack latency of exactly the window's events is the delta of outboxd's
    histogram across the window."""
    http = free_port()
    name = f"latency-{sink}"
    workload.create_slots(ctx.pg, [slot])
    cfg = outboxd_config(ctx, name, slot, sink, http, commit_time=True)
    if sink_kind(sink) == "nats":
        ctx.js.delete_stream("OUTBOX")
    p = _spawn_outboxd(ctx, name, cfg, sink_kind(sink))
    results = []
    try:
        wait_port(http, "outboxd /metrics", alive=lambda: p.poll() is None)
        # Warm-up: connections, stream/topic creation, first allocations.
        rate0, rows0 = loads[0]
        workload.paced_load(ctx.pg, ctx.root, rate0, 3, *rate_plan(rate0, rows0), rows0)
        _wait_confirmed(ctx, p, slot, workload.current_lsn(ctx.pg))
        for rate, rows in loads:
            results.append(_latency_window(ctx, p, http, sink, slot, rate, rows, secs))
    except RuntimeError as e:
        raise _failed(ctx, name, e) from e
    finally:
        _stop_outboxd(ctx, p, name)
        workload.drop_slot(ctx.pg, slot)
    return results


def _latency_window(ctx, p, http, sink, slot, rate, rows, secs):
    nats = sink_kind(sink) == "nats"
    seq0 = ctx.js.last_seq("OUTBOX") if nats else None
    h0 = probe.histogram(probe.scrape(http), "outboxd_end_to_end_latency_seconds")
    cpu0, wait0 = probe.cpu_seconds(p.pid), probe.runqueue_wait_s(p.pid)
    broker0 = broker_cpu(ctx, sink)
    probe.reset_peak_rss(p.pid)
    ws = WalsenderWatch(ctx.pg)
    ws.sample()
    ws_cpu0, ws_wait0 = ws.cpu, ws.wait
    machine = probe.MachineCpu(ctx.pg.postmaster_pid())
    machine.start()
    t0 = time.monotonic()
    events, tps, sched_lag = workload.paced_load(ctx.pg, ctx.root, rate, secs,
                                                 *rate_plan(rate, rows), rows)
    load_end = time.monotonic()
    end = workload.current_lsn(ctx.pg)
    _wait_confirmed(ctx, p, slot, end, ws)
    wall = time.monotonic() - t0
    busy = machine.stop()
    ws.sample()
    cpu = probe.cpu_seconds(p.pid) - cpu0
    h = probe.histogram_delta(h0, probe.histogram(probe.scrape(http),
                                                  "outboxd_end_to_end_latency_seconds"))
    res = {
        "sink": sink, "exactly_once": exactly_once(sink), "offered_per_s": rate, "rows_per_txn": rows, "achieved_per_s": tps,
        "events": events,
        "pgbench_schedule_lag_ms": sched_lag, "observed": h["count"],
        "p50_s": probe.quantile(h, 0.50), "p99_s": probe.quantile(h, 0.99),
        "max_le_s": probe.max_bound(h), "mean_s": h["sum"] / h["count"] if h["count"] else None,
        "share_le_25ms": probe.fraction_at_most(h, 0.025), "buckets": h["buckets"],
        "cpu_s": cpu, "cpu_cores": cpu / wall, "peak_rss_mb": probe.peak_rss_mb(p.pid),
        "wait_share": (probe.runqueue_wait_s(p.pid) - wait0) / wall,
        "walsender_cpu_cores": (ws.cpu - ws_cpu0) / wall,
        "walsender_wait_share": (ws.wait - ws_wait0) / wall, "machine_busy_cores": busy,
        "others_cores": machine.others,
        "broker_cpu_cores": (broker_cpu(ctx, sink) - broker0) / wall,
        "wall_s": wall, "catch_up_s": time.monotonic() - load_end,
    }
    if nats:
        lat = sorted(ctx.js.stored_latencies("OUTBOX", seq0 + 1, ctx.js.last_seq("OUTBOX")))
        res["exact"] = {"n": len(lat), "p50_s": probe.exact_quantile(lat, 0.50),
                        "p99_s": probe.exact_quantile(lat, 0.99),
                        "max_s": lat[-1] if lat else None}
    return res
