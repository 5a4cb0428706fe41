"""A bare MQTT v5 echo service: the baseline round trip for bench_daemon.py.

Subscribes to ``bench/echo/req`` (QoS 1) and republishes each payload to the
message's Response Topic with its Correlation Data, like the daemon does with
results, but with no parsing, journal or inference.

``--durable normal|full`` (with a database path) is the *floor* of any daemon that keeps
PROTOCOL.md's guarantees, with none of edgeagent's work: each job is journalled with its
answer (the payload itself) and an outbox row in one SQLite transaction (WAL, the given
``synchronous``) before it is acknowledged and its answer published; the outbox row is
deleted once the broker acknowledges the answer (in the next transaction). Jobs read in
one turn of the loop share one commit (group commit), and there is one thread: paho's
socket is driven from this loop, so there is no hand-off between threads. No JSON parse,
no validation, no cache, no metrics, no logging.
"""

from __future__ import annotations

import select
import socket
import sqlite3
import sys
import threading

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def _client(client_id: str, manual_ack: bool = False) -> paho.Client:
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5,
        manual_ack=manual_ack,
    )
    client.max_inflight_messages_set(65535)
    return client


def main(port: int) -> None:
    client = _client("bench-echo")
    ready = threading.Event()

    def on_connect(c: paho.Client, u: object, f: object, rc: object, p: object) -> None:
        c.subscribe("bench/echo/req", qos=1)

    def on_subscribe(*_: object) -> None:
        ready.set()
        print("ready", flush=True)

    def on_message(c: paho.Client, u: object, m: paho.MQTTMessage) -> None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.CorrelationData = m.properties.CorrelationData
        c.publish(m.properties.ResponseTopic, m.payload, qos=1, properties=props)

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.loop_forever()


def durable(port: int, synchronous: str, db_path: str, topic: str) -> None:
    """The durable echo (see the module docstring), subscribed to ``topic``."""
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute(f"PRAGMA synchronous = {synchronous}")
    db.execute(
        "CREATE TABLE IF NOT EXISTS jobs (id INTEGER PRIMARY KEY, payload BLOB, answer BLOB)"
    )
    db.execute(
        "CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, job INTEGER, topic TEXT,"
        " corr BLOB)"
    )
    client = _client("bench-durable-echo-" + synchronous, manual_ack=True)
    received: list[paho.MQTTMessage] = []
    delivered: list[int] = []  # mids of our answers the broker acknowledged
    seq_of: dict[int, int] = {}  # answer mid -> outbox seq

    def on_connect(c: paho.Client, u: object, f: object, rc: object, p: object) -> None:
        c.subscribe(topic, qos=1)

    def on_subscribe(*_: object) -> None:
        print("ready", flush=True)

    def on_message(c: paho.Client, u: object, m: paho.MQTTMessage) -> None:
        received.append(m)

    def on_publish(c: paho.Client, u: object, mid: int, *_: object) -> None:
        delivered.append(mid)

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    sock = client.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        client.loop(timeout=1.0)  # select, read what arrived, write what is queued
        while select.select([sock], [], [], 0)[0]:  # drain the socket: one commit per turn
            client.loop_read()
        if not received and not delivered:
            continue
        jobs, received[:] = list(received), []
        done, delivered[:] = [seq_of.pop(mid) for mid in delivered if mid in seq_of], []
        db.execute("BEGIN")
        rows = []
        for m in jobs:
            (job_id,) = db.execute(
                "INSERT INTO jobs (payload, answer) VALUES (?, ?) RETURNING id",
                (m.payload, m.payload),
            ).fetchone()
            (seq,) = db.execute(
                "INSERT INTO outbox (job, topic, corr) VALUES (?, ?, ?) RETURNING seq",
                (job_id, m.properties.ResponseTopic, m.properties.CorrelationData),
            ).fetchone()
            rows.append((m, seq))
        if done:
            db.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in done])
        db.execute("COMMIT")  # durable before any acknowledgement or answer
        for m, seq in rows:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.CorrelationData = m.properties.CorrelationData
            info = client.publish(m.properties.ResponseTopic, m.payload, qos=1, properties=props)
            seq_of[info.mid] = seq
            client.ack(m.mid, 1)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[2] == "--durable":
        durable(int(sys.argv[1]), sys.argv[3], sys.argv[4], sys.argv[5])
    else:
        main(int(sys.argv[1]))
