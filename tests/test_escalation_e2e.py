"""Escalation end to end: the daemon subprocess, a real broker, a scripted cloud agent on MQTT.

The scripted agent (``FakeCloud``) is a test double at the MQTT boundary: it answers every
request with a fixed label (or nothing, or garbage).  The reference agent `edgeagent cloud`
has its own tests.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.broker import Broker
from tests.conftest import DaemonFactory
from tests.harness import TestClient, results_by_id

pytestmark = pytest.mark.e2e

CLOUD = "[cloud]\nenabled = true\nretry_min_s = 0.5\nretry_max_s = 2\nmax_in_flight = 500\n"


def tasks(extra: str = "") -> str:
    return f"""
[tasks.alarm]
kind = "classify"
labels = ["fire", "intrusion", "water_leak"]
budget_per_minute = 6000
budget_burst = 1000
{extra}
[tasks.alarm.backend]
type = "rules"
[[tasks.alarm.backend.rules]]
label = "fire"
keywords = ["smoke"]

[tasks.reading]
kind = "extract"
budget_burst = 100
[tasks.reading.schema]
type = "object"
required = ["contact"]
properties.contact = {{ type = "string" }}
[tasks.reading.backend]
type = "rules"
fields.contact = "never-matches-(x)"
"""


class FakeCloud:
    """Answers escalation requests over MQTT; records every request it saw."""

    def __init__(self, port: int, *, label: str = "water_leak", mode: str = "ok") -> None:
        self.requests: list[dict[str, Any]] = []
        self.label = label
        self.mode = mode
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"fakecloud-{uuid.uuid4().hex[:6]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.max_inflight_messages_set(1000)
        self.client.will_set("edgeagent/cloud/status", b'{"state": "offline"}', qos=1, retain=True)
        ready = threading.Event()
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe("$share/agents/edgeagent/cloud/requests/+", qos=1)
        assert ready.wait(10)
        self.client.publish(
            "edgeagent/cloud/status", b'{"state": "online"}', qos=1, retain=True
        ).wait_for_publish(10)

    def _on_message(self, c: paho.Client, u: object, m: paho.MQTTMessage) -> None:
        req = json.loads(m.payload)
        self.requests.append(req)
        if self.mode == "silent":
            return
        if req["kind"] == "classify":
            output: Any = {"label": self.label if self.mode == "ok" else "not-a-label"}
        else:
            # Echo the placeholder back: the daemon must restore the original value.
            found = re.findall(r"<[A-Z]+_\d+>", json.dumps(req["input"]))
            output = {"contact": found[0] if found else "none"}
        reply = {
            "v": 1,
            "escalation_id": req["escalation_id"],
            "status": "ok",
            "output": output,
            "confidence": 0.99,
            "model": "fake-cloud",
            "usage": {"prompt_tokens": 1, "completion_tokens": 1},
        }
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.CorrelationData = m.properties.CorrelationData
        c.publish(m.properties.ResponseTopic, json.dumps(reply), qos=1, properties=props)

    def stop(self, *, graceful: bool = True) -> None:
        if graceful:
            self.client.publish(
                "edgeagent/cloud/status", b'{"state": "stopped"}', qos=1, retain=True
            ).wait_for_publish(10)
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def cloud_broker(own_broker: Broker) -> Broker:
    """A broker of the test's own: the cloud status topic is retained and global."""
    return own_broker


def _send(c: TestClient, device: str, task: str, texts: list[str], tag: str) -> list[str]:
    ids = []
    for i, text in enumerate(texts):
        jid = f"{tag}-{i}"
        ids.append(jid)
        c.publish_nowait(f"edgeagent/{device}/jobs/{task}", json.dumps({"id": jid, "input": text}))
    c.wait_published()
    return ids


def _until(pred: Any, timeout: float = 60.0) -> bool:
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        if pred():
            return True
        time.sleep(0.1)
    return False


def test_low_confidence_job_answered_by_cloud_and_cached(
    cloud_broker: Broker, daemon_factory: DaemonFactory, client_factory, device: str
) -> None:
    cloud = FakeCloud(cloud_broker.port)
    d = daemon_factory(cloud_broker.port, extra=CLOUD, tasks=tasks())
    d.wait_connected()
    c = client_factory(cloud_broker.port)
    c.subscribe(f"edgeagent/{device}/results/#")
    _send(c, device, "alarm", ["a pipe burst in the cellar", "smoke!"], "e")
    got = {json.loads(m.payload)["id"]: json.loads(m.payload) for m in c.collect(2)}
    assert got["e-1"]["source"] == "local" and got["e-1"]["output"] == {"label": "fire"}
    cloud_res = got["e-0"]
    assert cloud_res["status"] == "ok" and cloud_res["source"] == "cloud"
    assert cloud_res["output"] == {"label": "water_leak"}
    assert cloud_res["escalation"]["reason"] == "out_of_scope"
    assert len(cloud.requests) == 1
    req = cloud.requests[0]
    assert req["labels"] == ["fire", "intrusion", "water_leak"] and req["kind"] == "classify"
    # The same hard input again: answered from the cache, not escalated twice.
    _send(c, device, "alarm", ["a pipe  burst in the cellar"], "again")
    [again] = c.collect(1)
    assert json.loads(again.payload)["source"] == "cache"
    assert len(cloud.requests) == 1
    cloud.stop()


def test_invalid_cloud_answer_is_not_used(
    cloud_broker: Broker, daemon_factory: DaemonFactory, client_factory, device: str
) -> None:
    cloud = FakeCloud(cloud_broker.port, mode="bad-label")
    d = daemon_factory(cloud_broker.port, extra=CLOUD, tasks=tasks())
    d.wait_connected()
    c = client_factory(cloud_broker.port)
    c.subscribe(f"edgeagent/{device}/results/#")
    _send(c, device, "alarm", ["strange noise"], "bad")
    [msg] = c.collect(1)
    res = json.loads(msg.payload)
    assert res["status"] == "unrecognized" and res["error"]["code"] == "cloud_error"
    cloud.stop()


def test_cloud_down_provisional_burst_then_superseded(
    cloud_broker: Broker, daemon_factory: DaemonFactory, client_factory, device: str
) -> None:
    d = daemon_factory(cloud_broker.port, extra=CLOUD, tasks=tasks())
    d.wait_connected()
    c = client_factory(cloud_broker.port)
    c.subscribe(f"edgeagent/{device}/results/#")
    texts = [f"odd event {i}" if i % 2 else f"smoke {i}" for i in range(200)]
    ids = _send(c, device, "alarm", texts, "p")
    first = results_by_id(c.collect(200, timeout=60))
    assert set(first) == set(ids)  # every job answered at once
    provisional = {k for k, v in first.items() if json.loads(v[0])["provisional"]}
    assert len(provisional) == 100
    cloud = FakeCloud(cloud_broker.port)
    later = results_by_id(c.collect(100, timeout=60))
    assert set(later) == provisional  # every escalated one superseded, none else
    for v in later.values():
        res = json.loads(v[0])
        assert res["supersedes"] == res["id"] and res["source"] == "cloud"
        assert res["provisional"] is False
    assert len({r["escalation_id"] for r in cloud.requests}) == 100
    cloud.stop()


def test_cloud_down_wait_policy_answers_when_it_starts_or_expires(
    cloud_broker: Broker, daemon_factory: DaemonFactory, client_factory, device: str
) -> None:
    d = daemon_factory(
        cloud_broker.port,
        extra=CLOUD,
        tasks=tasks('offline = "wait"\non_deadline = "expired"'),
    )
    d.wait_connected()
    c = client_factory(cloud_broker.port)
    c.subscribe(f"edgeagent/{device}/results/#")
    c.publish(f"edgeagent/{device}/jobs/alarm", {"id": "short", "input": "hm", "deadline_ms": 500})
    c.publish(
        f"edgeagent/{device}/jobs/alarm", {"id": "long", "input": "hmm", "deadline_ms": 60000}
    )
    [expired] = c.collect(1, timeout=30)
    res = json.loads(expired.payload)
    assert res["id"] == "short" and res["status"] == "expired"
    assert not c.collect(1, timeout=1.0)  # "long" still waits
    cloud = FakeCloud(cloud_broker.port)
    [answered] = c.collect(1, timeout=30)
    res = json.loads(answered.payload)
    assert res["id"] == "long" and res["source"] == "cloud" and res["provisional"] is False
    cloud.stop()


def test_sigkill_with_escalations_in_flight(
    cloud_broker: Broker, daemon_factory: DaemonFactory, client_factory, device: str
) -> None:
    d = daemon_factory(cloud_broker.port, extra=CLOUD, tasks=tasks('offline = "wait"'))
    d.wait_connected()
    c = client_factory(cloud_broker.port)
    c.subscribe(f"edgeagent/{device}/results/#")
    ids = _send(c, device, "alarm", [f"unknown thing {i}" for i in range(50)], "k")
    assert _until(
        lambda: sum(1 for r in d.log_records() if r.get("event") == "escalation.started") == 50
    )
    d.kill()
    d2 = daemon_factory(cloud_broker.port, extra=CLOUD, tasks=tasks('offline = "wait"'))
    d2.wait_connected()
    cloud = FakeCloud(cloud_broker.port)
    got = results_by_id(c.collect(50, timeout=60) + c.drain(2.0))
    assert set(got) == set(ids)
    assert all(len(set(v)) == 1 for v in got.values())  # none computed twice
    assert all(json.loads(v[0])["source"] == "cloud" for v in got.values())
    cloud.stop()


def test_nothing_private_reaches_cloud_topics_and_values_are_restored(
    cloud_broker: Broker, daemon_factory: DaemonFactory, client_factory, device: str
) -> None:
    spy = client_factory(cloud_broker.port)
    spy.subscribe("#")
    cloud = FakeCloud(cloud_broker.port)
    d = daemon_factory(cloud_broker.port, extra=CLOUD, tasks=tasks())
    d.wait_connected()
    c = client_factory(cloud_broker.port)
    c.subscribe(f"edgeagent/{device}/results/#")
    secrets = [
        "jane.doe@example.com",
        "+49 30 1234567",
        "DE89 3704 0044 0532 0130 00",
        "4111 1111 1111 1111",
        "192.168.17.4",
    ]
    text = "call " + ", ".join(secrets) + " about the alarm"
    c.publish(f"edgeagent/{device}/jobs/alarm", {"id": "pii-1", "input": text})
    c.publish(
        f"edgeagent/{device}/jobs/reading", {"id": "pii-2", "input": "mail jane.doe@example.com"}
    )
    got = {json.loads(m.payload)["id"]: json.loads(m.payload) for m in c.collect(2)}
    assert got["pii-1"]["source"] == "cloud"
    # The extract task's cloud answer named a placeholder; the device restored the value.
    assert got["pii-2"]["output"] == {"contact": "jane.doe@example.com"}
    cloud_msgs = [m for m in spy.drain(1.0) if "/cloud/" in m.topic]
    assert len(cloud.requests) == 2 and cloud_msgs
    for m in cloud_msgs:
        body = m.payload.decode()
        for s in [*secrets, "jane.doe@example.com"]:
            assert s not in body, (m.topic, s)
    assert "jane.doe" not in d.log_path.read_text()
    cloud.stop()


def test_budget_caps_escalations_in_a_burst(
    cloud_broker: Broker, daemon_factory: DaemonFactory, client_factory, device: str
) -> None:
    budget = tasks().replace(
        "budget_per_minute = 6000\nbudget_burst = 1000", "budget_per_minute = 6\nbudget_burst = 25"
    )
    cloud = FakeCloud(cloud_broker.port, mode="silent")
    d = daemon_factory(cloud_broker.port, extra=CLOUD, tasks=budget)
    d.wait_connected()
    c = client_factory(cloud_broker.port)
    c.subscribe(f"edgeagent/{device}/results/#")
    ids = _send(c, device, "alarm", [f"weird {i}" for i in range(1000)], "b")
    got = results_by_id(c.collect(1000 - 26, timeout=120))
    time.sleep(1.0)
    # 25 from the burst, maybe a few more refilled at 0.1/s during the run.  (Unanswered
    # requests are re-sent with backoff: count escalations, not messages.)
    escalations = {r["escalation_id"] for r in cloud.requests}
    assert 25 <= len(escalations) <= 25 + 6
    over = [json.loads(v[0]) for v in got.values()]
    assert sum(1 for r in over if r["error"] and r["error"]["code"] == "budget_exceeded") >= 900
    assert set(got) <= set(ids)
    d.signal(signal.SIGTERM)
    cloud.stop()


def test_replay_reports_local_share_reasons_and_accuracy(
    cloud_broker: Broker, daemon_factory: DaemonFactory, device: str, tmp_path: Path
) -> None:
    cloud = FakeCloud(cloud_broker.port, label="water_leak")
    d = daemon_factory(cloud_broker.port, extra=CLOUD, tasks=tasks())
    d.wait_connected()
    rec = tmp_path / "recorded.jsonl"
    lines = [{"input": f"smoke {i}", "label": "fire"} for i in range(6)]
    lines += [{"input": f"pipe burst {i}", "label": "water_leak"} for i in range(3)]
    lines += [{"input": "door ajar", "label": "intrusion"}]
    rec.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeagent",
            "replay",
            "--config",
            str(d.config),
            "alarm",
            str(rec),
            "--timeout",
            "60",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert rep["jobs"] == 10 and rep["answered"] == 10
    assert rep["answered_locally"] == 0.6
    assert rep["escalation_rate"] == 0.4
    assert rep["escalation_reasons"] == {"out_of_scope": 4}
    assert rep["accuracy_local"] == 1.0
    assert rep["accuracy_cloud"] == 0.75
    assert rep["accuracy_overall"] == 0.9
    assert rep["latency_ms"]["p50"] is not None
    # What the cloud taught the device is exportable as labelled examples.
    ex = subprocess.run(
        [sys.executable, "-m", "edgeagent", "examples", "--config", str(d.config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    rows = [json.loads(x) for x in ex.stdout.splitlines()]
    assert len(rows) == 4 and all(r["cloud_output"] == {"label": "water_leak"} for r in rows)
    assert {r["reason"] for r in rows} == {"out_of_scope"}
    cloud.stop()


def test_issue9_formats_do_not_reach_the_cloud(
    cloud_broker: Broker, daemon_factory: DaemonFactory, client_factory, device: str
) -> None:
    """Issue 9: these reached ``edgeagent/cloud/requests/...`` unredacted."""
    spy = client_factory(cloud_broker.port)
    spy.subscribe("#")
    cloud = FakeCloud(cloud_broker.port)
    d = daemon_factory(cloud_broker.port, extra=CLOUD, tasks=tasks())
    d.wait_connected()
    c = client_factory(cloud_broker.port)
    c.subscribe(f"edgeagent/{device}/results/#")
    secrets = [
        "4111.1111.1111.1111",
        "5555\u00a05555\u00a05555\u00a04444",
        "4012  8888  8888  1881",
        "３７８２ ８２２４６３ １０００５",
        "5551234567",
    ]
    for i, secret in enumerate(secrets):
        c.publish(f"edgeagent/{device}/jobs/alarm", {"id": f"f{i}", "input": f"pay {secret} now"})
    got = {json.loads(m.payload)["id"]: json.loads(m.payload) for m in c.collect(len(secrets))}
    assert {r["source"] for r in got.values()} == {"cloud"}
    cloud_msgs = [m for m in spy.drain(1.0) if "/cloud/" in m.topic]
    assert len(cloud.requests) == len(secrets) and cloud_msgs
    for m in cloud_msgs:
        body = json.dumps(json.loads(m.payload), ensure_ascii=False)
        for secret in secrets:
            assert secret not in body, (m.topic, secret)
    for request in cloud.requests:
        assert re.fullmatch(r"pay <(CARD|PHONE)_1> now", request["input"]), request["input"]
    cloud.stop()


def test_replay_counts_declined_out_of_scope_as_right_and_cache_hits_as_local(
    cloud_broker: Broker, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """No cloud: out-of-scope jobs are declined (`unrecognized`/`out_of_scope`), which is the
    right answer for a gold `oos` label; a second replay is served from the cache, and
    those answers are local answers."""
    d = daemon_factory(cloud_broker.port, tasks=tasks())
    d.wait_connected()
    rec = tmp_path / "recorded.jsonl"
    lines = [{"input": f"smoke {i}", "label": "fire"} for i in range(6)]
    lines += [{"input": f"what is the capital of peru {i}", "label": "oos"} for i in range(3)]
    lines += [{"input": "door ajar", "label": "intrusion"}]
    rec.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    cmd = [sys.executable, "-m", "edgeagent", "replay", "--config", str(d.config), "alarm"]
    reports = []
    for _ in range(2):
        out = subprocess.run(
            [*cmd, str(rec), "--timeout", "60"], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        reports.append(json.loads(out.stdout))
    first, second = reports
    # 6 fire right locally, 3 oos declined (right), "door ajar" declined (wrong: intrusion).
    assert first["accuracy_overall"] == 0.9
    assert first["out_of_scope_jobs"] == 3 and first["accuracy_out_of_scope"] == 1.0
    assert first["answered_locally"] == 0.6 and first["answered_from_cache"] == 0.0
    assert second["answered_locally"] == 0.6 and second["answered_from_cache"] == 0.6
    assert second["accuracy_local"] == 1.0 and second["accuracy_overall"] == 0.9
