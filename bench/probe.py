"""What the benchmark observes of running processes, without disturbing them.

Owns: CPU seconds and peak RSS from /proc (and from wait4's rusage for a child that
exits by itself), the walsender of a run, machine-wide CPU use, and outboxd's
/metrics: scraping, histogram deltas between two scrapes and quantiles from them.
Must never: signal or change a process, except resetting a peak-RSS counter
(/proc/<pid>/clear_refs) of a process this run started.
"""

import os
import re
import urllib.request

TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(path):
    with open(path) as f:
        s = f.read()
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    head, _, rest = s.rpartition(")")
    return head.partition("(")[2], rest.split()


def cpu_seconds(pid):
    """utime + stime of a process (all its threads), in seconds."""
    _comm, f = _stat_fields(f"/proc/{pid}/stat")
    return (int(f[11]) + int(f[12])) / TICK


def threads_cpu(pid):
    """CPU seconds per thread name, e.g. {"tokio-runtime-w": 3.2, ...}."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm, f = _stat_fields(f"/proc/{pid}/task/{tid}/stat")
        except OSError:
            continue
        out[comm] = out.get(comm, 0.0) + (int(f[11]) + int(f[12])) / TICK
    return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def runqueue_wait_s(pid):
    """Seconds the process's threads were runnable but waiting for a CPU (schedstat):
    time lost to other processes on a busy machine, not to outboxd's own waiting."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


def _status_kb(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def peak_rss_mb(pid):
    """VmHWM: the peak resident set size, in MiB."""
    return _status_kb(pid, "VmHWM") / 1024


def rss_mb(pid):
    return _status_kb(pid, "VmRSS") / 1024


def reset_peak_rss(pid):
    """Resets VmHWM to the current RSS (Linux: `5` > clear_refs), to measure one window."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def walsender_pids(postmaster_pid):
    """Pids of the walsender backends (children of the postmaster named `walsender`)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
            if ppid != postmaster_pid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"walsender" in f.read():
                    out.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return out


class MachineCpu:
    """Machine-wide CPU use between `start` and `stop`, in cores (2.0 = both busy)."""

    @staticmethod
    def _read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + v[4]
        return sum(v) - idle, sum(v), os.times().elapsed

    def __init__(self, postmaster_pid=None):
        self._pm = postmaster_pid
        self.others = None

    def start(self):
        self._a = self._read()
        self._ours = run_cpu_seconds(self._pm) if self._pm else None

    def stop(self):
        """Cores the machine used; `self.others` is the part this benchmark did not."""
        b = self._read()
        busy = b[0] - self._a[0]
        wall = b[2] - self._a[2]
        if wall <= 0:
            return 0.0
        if self._pm:
            ours = run_cpu_seconds(self._pm) - self._ours
            self.others = max(0.0, busy / TICK - ours) / wall
        return busy / TICK / wall


def _children_of(ppid):
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rpartition(")")[2].split()[1]) == ppid:
                    out.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return out


def _own_and_reaped(pid):
    """utime + stime + cutime + cstime: the process and its children it has waited for."""
    _comm, f = _stat_fields(f"/proc/{pid}/stat")
    return sum(int(x) for x in f[11:15]) / TICK


def run_cpu_seconds(postmaster_pid):
    """CPU seconds used so far by everything this benchmark runs: this process and its
    children (pgbench, psql, outboxd, brokers, pg_recvlogical) and the Postgres cluster
    (the postmaster and its backends; exited ones are counted in the postmaster's
    cutime). Its increase over a window, next to MachineCpu, tells how much CPU the
    rest of the machine took meanwhile."""
    total = 0.0
    for root in (os.getpid(), postmaster_pid):
        try:
            total += _own_and_reaped(root)
        except OSError:
            continue
        for child in _children_of(root):
            try:
                total += cpu_seconds(child)
            except OSError:
                continue
    return total


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# --- /metrics -------------------------------------------------------------------------

def scrape(port, timeout=5):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        return r.read().decode()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def metric_sum(text, name):
    """Sum of all samples of `name` (any labels)."""
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(1) == name:
            total += float(m.group(3))
    return total


def histogram(text, name):
    """{"buckets": [(le, cumulative count)], "sum": s, "count": n} of an unlabelled histogram."""
    buckets, s, n = [], 0.0, 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        if m.group(1) == name + "_bucket":
            le = re.search(r'le="([^"]+)"', m.group(2)).group(1)
            buckets.append((float("inf") if le == "+Inf" else float(le), float(m.group(3))))
        elif m.group(1) == name + "_sum":
            s = float(m.group(3))
        elif m.group(1) == name + "_count":
            n = float(m.group(3))
    return {"buckets": sorted(buckets), "sum": s, "count": n}


def histogram_delta(before, after):
    b = dict(before["buckets"])
    return {"buckets": [(le, c - b.get(le, 0.0)) for le, c in after["buckets"]],
            "sum": after["sum"] - before["sum"], "count": after["count"] - before["count"]}


def quantile(h, q):
    """Prometheus-style histogram_quantile: linear interpolation inside the bucket that
    holds the q-th observation (the first bucket's lower bound is 0). Bucket-interpolated,
    not exact: the true value lies somewhere in that bucket."""
    total = h["count"]
    if total <= 0:
        return None
    rank = q * total
    lower, prev = 0.0, 0.0
    for le, cum in h["buckets"]:
        if cum >= rank:
            if le == float("inf"):
                return lower  # beyond the last finite bucket: its bound is all we know
            return lower + (le - lower) * ((rank - prev) / (cum - prev) if cum > prev else 1.0)
        lower, prev = le, cum
    return lower


def max_bound(h):
    """The upper bound of the highest non-empty bucket: the max is at most this."""
    prev = 0.0
    bound = None
    for le, cum in h["buckets"]:
        if cum > prev:
            bound = le
        prev = cum
    return bound


def fraction_at_most(h, le_limit):
    """Share of observations <= le_limit (exact when le_limit is a bucket bound)."""
    for le, cum in h["buckets"]:
        if abs(le - le_limit) < 1e-12:
            return cum / h["count"] if h["count"] else None
    return None


def exact_quantile(sorted_values, q):
    """Nearest-rank quantile of sorted values."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, int(-(-q * len(sorted_values) // 1)) - 1))
    return sorted_values[k]
