"""Consume outboxd's CloudEvents from JetStream and apply each event once.

At-least-once delivery means an event can arrive twice (after a relay crash, a
replay, a slot recovery, a redelivery of an unacknowledged message). The consumer
makes its effect idempotent: it records the CloudEvent id in the same database
transaction as the effect, and skips an id it has recorded. The message is
acknowledged only after that transaction committed, so a crash in between means a
redelivery, which the recorded id turns into a no-op.

Standard library only, except the NATS client (pip install nats-py). The store is
sqlite3 here; with PostgreSQL it is the same two statements:
    CREATE TABLE processed_events (id text PRIMARY KEY, processed_at timestamptz DEFAULT now());
    INSERT INTO processed_events (id) VALUES ($1) ON CONFLICT DO NOTHING;  -- 0 rows: a duplicate

Usage: python3 consumer.py nats://127.0.0.1:4222 OUTBOX 'outbox.>' orders.db
"""

import asyncio
import json
import sqlite3
import sys
from urllib.parse import unquote

import nats


def event_id(headers, body):
    """The CloudEvent id of a message from outboxd, in either content mode.

    Binary mode: the `ce-id` header, percent-encoded by the CloudEvents HTTP rule
    (NATS headers are text lines), so decode it; `unquote` leaves `+` alone, as the
    rule does. Structured mode: the `id` member of the JSON body.
    """
    if headers and "ce-id" in headers:
        return unquote(headers["ce-id"])
    return json.loads(body)["id"]


def open_store(path):
    db = sqlite3.connect(path, isolation_level=None)  # explicit BEGIN/COMMIT below
    db.execute("CREATE TABLE IF NOT EXISTS processed_events (id TEXT PRIMARY KEY)")
    db.execute("CREATE TABLE IF NOT EXISTS orders_placed (id TEXT PRIMARY KEY, total REAL)")
    return db


def handle_once(db, eid, apply):
    """Runs apply(db) and records eid in one transaction, unless eid was recorded.

    Returns True when the effect was applied, False for a duplicate. If apply
    raises, nothing is recorded (the transaction rolls back) and the caller does not
    acknowledge, so the message comes again.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        if db.execute("INSERT OR IGNORE INTO processed_events (id) VALUES (?)", (eid,)).rowcount == 0:
            db.execute("ROLLBACK")
            return False
        apply(db)
        db.execute("COMMIT")
        return True
    except BaseException:
        db.execute("ROLLBACK")
        raise


def place_order(event):
    """The business effect of one event (here: a row in orders_placed)."""
    def apply(db):
        data = event["data"]
        db.execute("INSERT INTO orders_placed (id, total) VALUES (?, ?)", (event["subject"], data["total"]))
    return apply


def decode(msg):
    """The event as a dict with `subject` and `data`, from either content mode."""
    if msg.headers and "ce-id" in msg.headers:
        return {"subject": unquote(msg.headers["ce-subject"]), "data": json.loads(msg.data)}
    return json.loads(msg.data)


async def consume(url, stream, subject, db, stop, on_result=None):
    """Pulls from a durable consumer until `stop` is set; acks after each commit."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(subject, durable="orders", stream=stream)
        while not stop.is_set():
            try:
                msgs = await sub.fetch(10, timeout=0.5)
            except nats.errors.TimeoutError:
                continue
            for msg in msgs:
                eid = event_id(msg.headers, msg.data)
                try:
                    applied = handle_once(db, eid, place_order(decode(msg)))
                except Exception:
                    await msg.nak()  # redelivered later; nothing was recorded
                    if on_result:
                        on_result(eid, "failed")
                    continue
                await msg.ack()  # only after the commit
                if on_result:
                    on_result(eid, "applied" if applied else "duplicate")
    finally:
        await nc.close()


if __name__ == "__main__":
    url, stream, subject, path = sys.argv[1:5]
    asyncio.run(consume(url, stream, subject, open_store(path), asyncio.Event()))
