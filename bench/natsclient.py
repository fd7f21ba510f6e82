"""A minimal NATS client (stdlib only) for what the benchmark asks of JetStream.

Owns: requests to the JetStream API (stream info, delete) and reading back, after a
load window, each stored message's JetStream timestamp and its `ce-time` header, which
gives the exact commit-to-stored latency of every event. Must never: publish to the
outbox subjects or acknowledge anything outboxd relies on; it only reads.
"""

import collections
import json
import socket
import time
from datetime import datetime


class Nats:
    def __init__(self, port, timeout=10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = bytearray()
        self._line()  # INFO
        self._send(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,'
                   b'"no_responders":true,"protocol":1}\r\nPING\r\n')
        while True:
            msg = self._next()
            if msg == "PONG":
                break
        self._stash = collections.deque()  # messages that arrived during a request
        self._inbox = "_BENCH_INBOX"
        self._send(f"SUB {self._inbox}.* 1\r\n".encode())
        self._n = 0

    def close(self):
        self.sock.close()

    def _send(self, data):
        self.sock.sendall(data)

    def _fill(self):
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("nats connection closed")
        self.buf += chunk

    def _line(self):
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[:i + 2]
                return line.decode()
            self._fill()

    def _bytes(self, n):
        while len(self.buf) < n + 2:
            self._fill()
        data = bytes(self.buf[:n])
        del self.buf[:n + 2]
        return data

    def _next(self):
        """The next protocol message: "PONG", or (subject, sid, reply, headers, payload).
        A push consumer's deliveries keep their original subject: match them by sid."""
        while True:
            line = self._line()
            if line == "PING":
                self._send(b"PONG\r\n")
                continue
            if line in ("+OK", "PONG"):
                if line == "PONG":
                    return line
                continue
            if line.startswith("-ERR"):
                raise RuntimeError(f"nats: {line}")
            parts = line.split(" ")
            if parts[0] == "MSG":
                reply = parts[3] if len(parts) == 5 else None
                return parts[1], parts[2], reply, b"", self._bytes(int(parts[-1]))
            if parts[0] == "HMSG":
                reply = parts[3] if len(parts) == 6 else None
                hlen, total = int(parts[-2]), int(parts[-1])
                data = self._bytes(total)
                return parts[1], parts[2], reply, data[:hlen], data[hlen:]
            if parts[0] == "INFO":
                continue
            raise RuntimeError(f"nats: unexpected {line[:80]}")

    def request(self, subject, body=b""):
        self._n += 1
        reply = f"{self._inbox}.{self._n}"
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        self._send(f"PUB {subject} {reply} {len(body)}\r\n".encode() + body + b"\r\n")
        while True:
            m = self._next()
            if m == "PONG":
                continue
            if m[0] != reply:
                self._stash.append(m)  # e.g. a delivery that overtook the API reply
                continue
            if m[3].startswith(b"NATS/1.0 503"):
                raise RuntimeError(f"nats: no responders for {subject}")
            return json.loads(m[4]) if m[4] else {}

    # --- JetStream ---------------------------------------------------------------------

    def stream_info(self, stream):
        r = self.request(f"$JS.API.STREAM.INFO.{stream}")
        if "error" in r:
            return None
        return r

    def last_seq(self, stream):
        info = self.stream_info(stream)
        return info["state"]["last_seq"] if info else 0

    def messages(self, stream):
        info = self.stream_info(stream)
        return info["state"]["messages"] if info else 0

    def delete_stream(self, stream):
        """Deletes the stream, and with it its duplicate window: the next run relays the
        same event ids again, which a mere purge would still drop as duplicates."""
        if self.stream_info(stream):
            r = self.request(f"$JS.API.STREAM.DELETE.{stream}")
            if "error" in r:
                raise RuntimeError(f"jetstream: delete {stream}: {r['error']}")

    def stored_latencies(self, stream, first_seq, last_seq, timeout=120.0):
        """Seconds from each event's `ce-time` (the commit time, when `created_at` is
        not mapped) to the time JetStream stored it, for stream sequences
        first_seq..=last_seq. Read with a headers-only ephemeral push consumer with flow
        control, so the data itself is not transferred."""
        if last_seq < first_seq:
            return []
        deliver = f"_BENCH_LAT.{first_seq}"
        self._send(f"SUB {deliver} 2\r\n".encode())
        cfg = {"stream_name": stream, "config": {
            "deliver_subject": deliver, "deliver_policy": "by_start_sequence",
            "opt_start_seq": first_seq, "ack_policy": "none", "replay_policy": "instant",
            "headers_only": True, "flow_control": True, "idle_heartbeat": 1_000_000_000,
            "mem_storage": True}}
        r = self.request(f"$JS.API.CONSUMER.CREATE.{stream}", cfg)
        if "error" in r:
            raise RuntimeError(f"jetstream consumer: {r['error']}")
        out = []
        deadline = time.monotonic() + timeout
        while True:
            if time.monotonic() > deadline:
                raise RuntimeError(f"read {len(out)} of {last_seq - first_seq + 1} messages")
            m = self._stash.popleft() if self._stash else self._next()
            if m == "PONG" or m[1] != "2":
                continue
            _subject, _sid, reply, hdrs, _payload = m
            if hdrs.startswith(b"NATS/1.0 100"):  # flow control request or heartbeat
                if reply:
                    self._send(f"PUB {reply} 0\r\n\r\n".encode())
                continue
            # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts ns>.<pending>
            tok = reply.split(".")
            seq, stored_ns = int(tok[-4]), int(tok[-2])
            ce_time = _header(hdrs, b"ce-time")
            if ce_time is not None:
                commit = datetime.fromisoformat(ce_time.replace("Z", "+00:00")).timestamp()
                out.append(stored_ns / 1e9 - commit)
            if seq >= last_seq:
                break
        self._send(b"UNSUB 2\r\n")
        self._stash.clear()
        self.request(f"$JS.API.CONSUMER.DELETE.{stream}.{r['name']}")
        return out


def _header(block, name):
    for line in block.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == name:
            return v.strip().decode()
    return None
