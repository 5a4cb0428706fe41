"""Escalation benchmark and evaluation with a *perfect* cloud, through the real daemon and broker.

    # round-trip overhead only (a rules task; no data needed)
    .venv/bin/python benchmarks/bench_escalation.py
    # plus accuracy vs escalation rate on a labelled stream, for a task of yours
    .venv/bin/python benchmarks/bench_escalation.py --task-file task.toml --task intent \\
        --data validation.jsonl [--limit 2000] [--thresholds 0.3,0.5,0.7,0.9]

Starts its own mosquitto, a bare MQTT echo (benchmarks/echo.py), a benchmark-only
"gold cloud" agent that answers every escalation with the gold label of its input (so
escalated jobs are always right, as in the offline curve of bench_classify.py), and the
daemon.  Prints:

* sequential round trips p50: bare echo; a job answered locally; a job escalated to the
  cloud — and the escalation leg as a ratio to the echo;
* with ``--data``: for each threshold (changed by rewriting the config and SIGHUP, the
  daemon keeps running), the escalation rate, local accuracy and overall accuracy.
  Compare with the offline curve: they must agree.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_daemon import Producer, pct  # noqa: E402

from tests.broker import Broker  # noqa: E402

RULES_TASK = """
[tasks.alarm]
kind = "classify"
labels = ["fire", "water_leak"]
cache = false
threshold = {threshold}
budget_per_minute = 1000000
budget_burst = 100000
[tasks.alarm.backend]
type = "rules"
[[tasks.alarm.backend.rules]]
label = "fire"
keywords = ["smoke"]
"""


class GoldCloud:
    """Benchmark-only agent: answers each escalation with the gold label of its input."""

    def __init__(self, port: int, gold: dict[str, str], default: str) -> None:
        self.gold = gold
        self.default = default
        self.requests = 0
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"gold-{uuid.uuid4().hex[:6]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.max_inflight_messages_set(65535)
        ready = threading.Event()
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.loop_start()
        self.client.subscribe("$share/gold/edgeagent/cloud/requests/+", qos=1)
        ready.wait(10)
        self.client.publish(
            "edgeagent/cloud/status", b'{"state": "online"}', qos=1, retain=True
        ).wait_for_publish(10)

    def _on_message(self, c: paho.Client, u: object, m: paho.MQTTMessage) -> None:
        req = json.loads(m.payload)
        self.requests += 1
        label = self.gold.get(req["input"] if isinstance(req["input"], str) else "", self.default)
        reply = {
            "v": 1,
            "escalation_id": req["escalation_id"],
            "status": "ok",
            "output": {"label": label},
            "confidence": 1.0,
            "model": "gold",
        }
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.CorrelationData = m.properties.CorrelationData
        c.publish(m.properties.ResponseTopic, json.dumps(reply), qos=1, properties=props)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def write_config(path: Path, port: int, state: Path, tasks: str) -> None:
    path.write_text(
        f'device_id = "bench"\n[mqtt]\nport = {port}\nreceive_maximum = 256\n'
        f'[store]\nstate_dir = "{state}"\nsynchronous = "normal"\n'
        f'[metrics]\nlisten = ""\n[log]\nformat = "json"\nlevel = "info"\n'
        f'[topics]\nallowed_reply_prefixes = ["bench/"]\n'
        f"[cloud]\nenabled = true\nmax_in_flight = 100000\n" + tasks
    )


def wait_log(log: Path, event: str, count: int, timeout: float = 60) -> None:
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        text = log.read_text(errors="replace") if log.exists() else ""
        if text.count(f'"event": "{event}"') >= count:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{event} x{count} not seen")


def run_stream(
    prod: Producer, topic: str, items: list[dict[str, Any]], window: int
) -> dict[str, Any]:
    """Send the labelled stream; collect each job's (first) result."""
    results: dict[str, dict[str, Any]] = {}
    lock = threading.Condition()
    orig = prod.client.on_message

    def on_message(c: paho.Client, u: object, m: paho.MQTTMessage) -> None:
        res = json.loads(m.payload)
        with lock:
            results.setdefault(res["id"], res)
            lock.notify_all()

    prod.client.on_message = on_message
    ids = []
    try:
        for i, item in enumerate(items):
            jid = f"e{i}-{uuid.uuid4().hex[:6]}"
            ids.append(jid)
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = prod.reply_topic
            props.CorrelationData = jid.encode()
            with lock:
                while len(ids) - len(results) > window:
                    lock.wait(1)
            payload = json.dumps({"v": 1, "id": jid, "input": item["text"], "deadline_ms": 600000})
            prod.client.publish(topic, payload, qos=1, properties=props)
        with lock:
            until = time.monotonic() + 600
            while len(results) < len(ids) and time.monotonic() < until:
                lock.wait(1)
    finally:
        prod.client.on_message = orig
    n = len(items)
    right = local_n = local_right = 0
    for jid, item in zip(ids, items, strict=True):
        res = results.get(jid)
        if res is None:
            continue
        ok = res["status"] == "ok" and (res.get("output") or {}).get("label") == item["label"]
        right += ok
        if res.get("source") in ("local", "cache") and res["status"] == "ok":
            local_n += 1
            local_right += ok
    return {
        "escalation_rate": 1 - local_n / n,
        "local_accuracy": local_right / local_n if local_n else float("nan"),
        "overall_accuracy": right / n,
        "missing": n - len(results),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=300, help="sequential round trips per case")
    ap.add_argument(
        "--task-file", type=Path, help="TOML with [tasks.NAME] (threshold = {threshold})"
    )
    ap.add_argument("--task", default="alarm", help="task name in --task-file")
    ap.add_argument("--data", type=Path, help="JSONL with text and label")
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--thresholds", default="0.3,0.5,0.7,0.8,0.9,0.95")
    ap.add_argument("--window", type=int, default=64)
    args = ap.parse_args()

    items: list[dict[str, Any]] = []
    if args.data:
        with args.data.open() as fh:
            for line in fh:
                row = json.loads(line)
                items.append({"text": row.get("text") or row.get("input"), "label": row["label"]})
        items = items[: args.limit]
    gold = {it["text"]: it["label"] for it in items}
    task_tpl = args.task_file.read_text() if args.task_file else RULES_TASK
    task = args.task if args.task_file else "alarm"

    with (
        tempfile.TemporaryDirectory() as tmp,
        Broker(Path(tmp) / "broker", extra_config=["set_tcp_nodelay true"]) as broker,
    ):
        work = Path(tmp)
        echo = subprocess.Popen(
            [sys.executable, str(REPO / "benchmarks" / "echo.py"), str(broker.port)],
            stdout=subprocess.PIPE,
        )
        assert echo.stdout is not None
        echo.stdout.readline()
        cloud = GoldCloud(broker.port, gold, default="water_leak")
        cfg = work / "d.toml"
        first_t = args.thresholds.split(",")[0]
        write_config(cfg, broker.port, work / "state", task_tpl.replace("{threshold}", first_t))
        log = work / "daemon.log"
        daemon = subprocess.Popen(
            [sys.executable, "-m", "edgeagent", "run", "--config", str(cfg)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=log.open("wb"),
        )
        prod = Producer(broker.port)
        rows = []
        try:
            wait_log(log, "mqtt.connected", 1)
            topic = f"edgeagent/bench/jobs/{task}"

            def job(text: str) -> Any:
                return lambda i: json.dumps(
                    {"v": 1, "id": uuid.uuid4().hex, "input": text.format(i=i)}
                ).encode()

            prod.sequential("bench/echo/req", job("x{i}"), 30)
            echo_lat = prod.sequential("bench/echo/req", job("x{i}"), args.n)
            if not args.task_file:
                prod.sequential(topic, job("smoke {i}"), 30)
                local_lat = prod.sequential(topic, job("smoke {i}"), args.n)
                prod.sequential(topic, job("pipe burst {i}"), 30)
                esc_lat = prod.sequential(topic, job("pipe burst {i}"), args.n)
                e, lo, es = pct(echo_lat, 0.5), pct(local_lat, 0.5), pct(esc_lat, 0.5)
                print("\nround trips, p50 ms (sequential, one producer)")
                print(f"  bare MQTT echo            {e:7.2f}")
                print(f"  daemon, answered locally  {lo:7.2f}   ({lo / e:.2f}x echo)")
                print(f"  daemon, escalated         {es:7.2f}   ({es / e:.2f}x echo)")
                print(
                    f"  escalation leg (escalated - local) = {es - lo:.2f} ms "
                    f"= {(es - lo) / e:.2f}x echo"
                )
            if items:
                for reloads, t in enumerate(args.thresholds.split(","), start=1):
                    write_config(
                        cfg, broker.port, work / "state", task_tpl.replace("{threshold}", t)
                    )
                    daemon.send_signal(signal.SIGHUP)  # new threshold, same process
                    wait_log(log, "reload.done", reloads, timeout=300)
                    r = run_stream(prod, topic, items, args.window)
                    rows.append((float(t), r))
        finally:
            prod.close()
            cloud.close()
            daemon.terminate()
            echo.terminate()
            daemon.wait(60)
            echo.wait(10)
    if rows:
        print(f"\naccuracy vs escalation through the daemon ({len(items)} jobs, perfect cloud)")
        print(f"{'threshold':>9} {'escalated':>9} {'local acc':>9} {'overall':>8} {'missing':>7}")
        for t, r in rows:
            print(
                f"{t:9.2f} {r['escalation_rate']:9.3f} {r['local_accuracy']:9.3f} "
                f"{r['overall_accuracy']:8.3f} {r['missing']:7d}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
