"""Tests consumer.py against a real nats-server (started here, on a free port).

Given a JetStream stream holding events as outboxd publishes them (binary and
structured mode), the same event twice (a redelivery after the duplicate window:
same CloudEvent id, another Nats-Msg-Id), and an event whose first handling fails,
when the consumer runs, then every event's effect is applied exactly once.
Run: python3 -m unittest test_consumer.py   (needs nats-server and nats-py)
"""

import asyncio
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import unittest

import nats

import consumer


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ce_headers(eid, subject, msg_id=None):
    # What outboxd sends in binary mode (a subset); ids percent-encoded.
    return {"Nats-Msg-Id": msg_id or eid, "ce-id": eid, "ce-specversion": "1.0",
            "ce-source": "/services/orders", "ce-type": "OrderPlaced", "ce-subject": subject,
            "content-type": "application/json"}


class ConsumerTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.port = free_port()
        server = shutil.which("nats-server") or "/usr/sbin/nats-server"
        self.server = subprocess.Popen([server, "-js", "-a", "127.0.0.1", "-p", str(self.port),
                                        "-sd", self.tmp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.url = f"nats://127.0.0.1:{self.port}"

    def tearDown(self):
        self.server.terminate()
        self.server.wait(10)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def test_each_event_is_applied_once(self):
        asyncio.run(self.scenario())

    async def scenario(self):
        # Given: a stream with events, one of them twice, one in structured mode.
        nc = await nats.connect(self.url)
        js = nc.jetstream()
        await js.add_stream(name="OUTBOX", subjects=["outbox.>"])
        odd = "r 1/ü+%"  # an id outboxd percent-encodes in a header
        encoded = "r%201/%C3%BC+%25"
        await js.publish("outbox.Order", b'{"total": 10}', headers=ce_headers("e-1", "o-1"))
        await js.publish("outbox.Order", b'{"total": 20}', headers=ce_headers(encoded, "o-2"))
        await js.publish("outbox.Order", b'{"total": 10}', headers=ce_headers("e-1", "o-1", msg_id="e-1-again"))
        structured = {"specversion": "1.0", "id": "e-3", "source": "/services/orders", "type": "OrderPlaced",
                      "subject": "o-3", "datacontenttype": "application/json", "data": {"total": 30}}
        await js.publish("outbox.Order", json.dumps(structured).encode(),
                         headers={"Nats-Msg-Id": "e-3", "content-type": "application/cloudevents+json"})
        await nc.close()

        db = consumer.open_store(os.path.join(self.tmp, "orders.db"))
        failed_once = set()
        real = consumer.place_order

        def flaky(event):  # the first attempt at o-3 fails (e.g. a deadlock), the retry works
            if event["subject"] == "o-3" and "o-3" not in failed_once:
                failed_once.add("o-3")
                def boom(_db):
                    raise RuntimeError("transient")
                return boom
            return real(event)
        consumer.place_order = flaky
        results = []
        stop = asyncio.Event()

        def on_result(eid, what):
            results.append((eid, what))
            if sum(1 for _, w in results if w in ("applied", "duplicate")) == 4:
                stop.set()
        try:
            # When: the consumer runs until it has handled every message.
            await asyncio.wait_for(consumer.consume(self.url, "OUTBOX", "outbox.>", db, stop, on_result), 30)
        finally:
            consumer.place_order = real

        # Then: each effect once, the duplicate skipped, the failed one retried.
        rows = dict(db.execute("SELECT id, total FROM orders_placed").fetchall())
        self.assertEqual(rows, {"o-1": 10, "o-2": 20, "o-3": 30})
        self.assertIn(("e-1", "duplicate"), results)
        self.assertIn(("e-3", "failed"), results)
        self.assertIn((odd, "applied"), results)
        ids = {r[0] for r in db.execute("SELECT id FROM processed_events")}
        self.assertEqual(ids, {"e-1", odd, "e-3"})


if __name__ == "__main__":
    unittest.main()
