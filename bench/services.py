"""Throw-away services for one benchmark run, and the processes that run them.

Owns: starting PostgreSQL (initdb + pg_ctl as the `postgres` user when we are root,
like scripts/demo.sh and tests/support), nats-server -js and, when present, the tansu
Kafka-protocol broker, each on a free 127.0.0.1 port under the run's directory; and a
registry of every child process so that all of them are stopped on exit, also on an
error or a signal. Must never: touch a process it did not start (processes are
stopped by pid, never by name), or listen on anything but 127.0.0.1.
"""

import glob
import os
import shutil
import signal
import socket
import subprocess
import time


def free_port():
    """A free TCP port on 127.0.0.1 (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, what, timeout=20.0, alive=None):
    """Waits until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if alive is not None and not alive():
                raise RuntimeError(f"{what} exited before it listened on :{port}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not listen on :{port} within {timeout}s")
            time.sleep(0.02)


class Procs:
    """Every child process of the run; `stop_all` ends each one by its pid."""

    def __init__(self):
        self._live = {}  # pid -> (Popen, name)
        self._cleanups = []  # callables run after the processes stop (pg_ctl stop)

    def spawn(self, name, argv, **kw):
        p = subprocess.Popen(argv, **kw)
        self._live[p.pid] = (p, name)
        return p

    def forget(self, p):
        self._live.pop(p.pid, None)

    def on_exit(self, fn):
        self._cleanups.append(fn)

    def stop(self, p, timeout=10.0, sig=signal.SIGTERM):
        """SIGTERM (or `sig`), then SIGKILL after `timeout`; returns the exit code."""
        if p.poll() is None:
            try:
                p.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.forget(p)
        return p.returncode

    def stop_all(self):
        for p, _name in list(self._live.values()):
            self.stop(p, timeout=5.0)
        while self._cleanups:
            fn = self._cleanups.pop()
            try:
                fn()
            except Exception as e:  # cleanup goes on: every service must be stopped
                print(f"bench: cleanup step failed: {e}")


def fresh_root(path):
    """An empty run directory at `path` that the server (running as `postgres`, with its
    socket there) can use."""
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    os.chmod(path, 0o777)
    return path


def install_signal_handlers():
    """SIGTERM/SIGHUP end the run like Ctrl-C, so the `finally` that stops everything runs."""

    def handler(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, handler)


def _is_root():
    return os.geteuid() == 0


def _as_pg(argv):
    # initdb refuses to run as root: run the server as `postgres` (scripts/demo.sh).
    return ["runuser", "-u", "postgres", "--", *argv] if _is_root() else argv


def pg_bindir():
    env = os.environ.get("OUTBOXD_TEST_PG_BINDIR")
    if env:
        return env
    dirs = [d for d in glob.glob("/usr/lib/postgresql/*/bin") if os.path.exists(d + "/initdb")]
    if not dirs:
        raise RuntimeError("PostgreSQL server binaries not found (make deps installs them)")
    return sorted(dirs, key=lambda d: int(d.split("/")[-2]))[-1]


# Server settings of the benchmark cluster, and why:
# - wal_level=logical: required for the slots.
# - fsync=off: the disk is not under test (and is shared); commits still go through
#   XLogFlush, so the walsender sees each commit as soon as it is made.
# - synchronous_commit=on: as in production. With `off`, a commit reaches the WAL
#   flush position (all a walsender may send) only at the WAL writer's next round
#   (wal_writer_delay, 200 ms), which would dominate the end-to-end latency.
# - autovacuum=off, long checkpoints: no background work in the middle of a timed run.
# - max_replication_slots=64: every drain of a backlog has its own slot, all created
#   before the backlog (6 consumers x BENCH_REPEAT 5 = 30 per shape, with nats-eo and
#   kafka-eo); an idle slot only holds WAL back, it decodes nothing.
PG_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "wal_level": "logical",
    "max_wal_senders": "20",
    "max_replication_slots": "64",
    "fsync": "off",
    "synchronous_commit": "on",
    "autovacuum": "off",
    "max_wal_size": "8GB",
    "checkpoint_timeout": "30min",
    "max_connections": "100",
}


class Postgres:
    """A throw-away cluster in `root/pg` on a free port."""

    def __init__(self, root, procs):
        self.root = root
        self.bindir = pg_bindir()
        self.port = free_port()
        self.data = os.path.join(root, "pg")
        self.log = os.path.join(root, "pg.log")
        self.version = ""
        self._procs = procs

    def start(self):
        subprocess.run(
            _as_pg([f"{self.bindir}/initdb", "-D", self.data, "-U", "postgres", "-A", "trust",
                    "-E", "UTF8", "--locale=C", "--no-sync"]),
            check=True, stdout=subprocess.DEVNULL)
        opts = f"-p {self.port} -k {self.root} " + " ".join(
            f"-c {k}={v}" for k, v in PG_SETTINGS.items())
        self._procs.on_exit(self.stop)
        subprocess.run(
            _as_pg([f"{self.bindir}/pg_ctl", "-D", self.data, "-l", self.log, "-o", opts,
                    "-w", "-t", "60", "start"]),
            check=True, stdout=subprocess.DEVNULL)
        self.version = self.sql("SHOW server_version").strip()

    def stop(self):
        subprocess.run(_as_pg([f"{self.bindir}/pg_ctl", "-D", self.data, "-m", "immediate",
                               "-w", "stop"]),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def postmaster_pid(self):
        with open(os.path.join(self.data, "postmaster.pid")) as f:
            return int(f.readline())

    @property
    def url(self):
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def conninfo(self):
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def psql_argv(self):
        return ["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", self.conninfo]

    def sql(self, query, timeout=600):
        """Runs SQL with psql; returns its unaligned, tuples-only output."""
        r = subprocess.run([*self.psql_argv(), "-c", query], capture_output=True, text=True,
                           timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"psql failed: {r.stderr.strip()}\n  query: {query[:200]}")
        return r.stdout

    def sql_file(self, path, timeout=600):
        r = subprocess.run([*self.psql_argv(), "-f", path], capture_output=True, text=True,
                           timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"psql -f {path} failed: {r.stderr.strip()}")
        return r.stdout


class NatsServer:
    """nats-server -js with its store under `root/js`."""

    def __init__(self, root, procs):
        self.root = root
        self.port = free_port()
        self._procs = procs
        self.version = ""

    def start(self):
        binary = _which("nats-server") or "/usr/sbin/nats-server"
        self.version = subprocess.run([binary, "--version"], capture_output=True,
                                      text=True).stdout.strip()
        log = open(os.path.join(self.root, "nats.log"), "w")
        self.proc = self._procs.spawn(
            "nats-server",
            [binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd",
             os.path.join(self.root, "js")],
            stdout=log, stderr=log)
        wait_port(self.port, "nats-server", alive=lambda: self.proc.poll() is None)

    @property
    def url(self):
        return f"nats://127.0.0.1:{self.port}"


def tansu_binary(repo):
    """The tansu broker the Kafka tests use, if installed (scripts/ensure-deps.sh)."""
    for cand in (os.environ.get("OUTBOXD_BENCH_TANSU"), os.environ.get("OUTBOXD_TEST_TANSU"),
                 os.path.join(repo, ".tmp/tools/tansu/tansu")):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


class Tansu:
    """The tansu Kafka-protocol broker with in-memory storage."""

    def __init__(self, root, procs, binary):
        self.root = root
        self.port = free_port()
        self.binary = binary
        self._procs = procs
        self.version = ""

    def start(self):
        r = subprocess.run([self.binary, "--version"], capture_output=True, text=True)
        lines = (r.stdout or r.stderr).strip().splitlines()
        self.version = lines[0] if r.returncode == 0 and lines else "tansu"
        url = f"tcp://127.0.0.1:{self.port}"
        log = open(os.path.join(self.root, "tansu.log"), "w")
        self.proc = self._procs.spawn(
            "tansu",
            [self.binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            cwd=self.root, stdout=log, stderr=log)
        wait_port(self.port, "tansu", alive=lambda: self.proc.poll() is None)

    @property
    def brokers(self):
        return f"127.0.0.1:{self.port}"


def _which(name):
    for d in os.environ.get("PATH", "").split(":") + ["/usr/sbin", "/usr/bin", "/usr/local/bin"]:
        p = os.path.join(d, name)
        if d and os.access(p, os.X_OK):
            return p
    return None
